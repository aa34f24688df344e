//! The SDK facade: what an app calls, in Rust or (through `veil-ffi`) from Swift and Kotlin.
//! With the `uniffi` feature its records, enums, error and listener trait carry UniFFI derives,
//! so the FFI crate exports them as they are (no mirror types).
//!
//! - `types`: the typed options (`Policy`, `Scheduler`, `WireFormat`, `WireCodec`, `Device`).
//! - `config`: `VeilConfig` (model folder, shard servers, policy, wire, defaults, the
//!   `obfuscated` settings) and its up-front validation; the server list reader.
//! - `error`: `VeilError`, the small public error every internal failure maps to.
//! - `key`: the device's persistent obfuscation key in a file (`obfuscation_key_file`),
//!   created with a fresh CSPRNG key on first use.
//! - `report`: `GenerationStats` and the per-server `PrivacyReport` of a generation.
//! - `client`: `Veil` — loads the model once, then `generate(prompt, options, progress, cancel)`
//!   any number of times, concurrently if wanted; `CancelHandle`, `ProgressListener` (with
//!   previews), `GeneratedImage`.

mod client;
mod config;
mod error;
mod key;
mod report;
mod sessions;
mod types;

pub use client::{CancelHandle, GeneratedImage, ProgressListener, StepPreview, Veil};
pub use config::{
    parse_server_configs, read_server_configs, GenerationDefaults, GenerationOptions, LoraConfig,
    ObfuscationConfig, ServerConfig, VeilConfig,
};
pub use error::VeilError;
pub use key::{load_or_create_obfuscation_key, read_obfuscation_key, KeyFileError};
pub use report::{
    GenerationStats, ObfuscationSummary, PrivacyReport, ResolutionRows, RowRange, SensitiveSpan,
    ServerTraffic, ServerView,
};
pub use types::{Device, Policy, Scheduler, WireCodec, WireFormat};

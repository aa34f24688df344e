//! The SDK facade: what an app calls, in Rust or (through `veil-ffi`) from Swift and Kotlin.
//!
//! - `config`: `VeilConfig` (model folder, shard servers, policy, wire, defaults) and its
//!   up-front validation.
//! - `error`: `VeilError`, the small public error every internal failure maps to.
//! - `key`: the device's persistent obfuscation key in a file (`obfuscation_key_file`),
//!   created with a fresh CSPRNG key on first use.
//! - `client`: `Veil` — loads the model once, then `generate(prompt, options, progress, cancel)`
//!   any number of times, concurrently if wanted; `CancelHandle`, `ProgressListener`,
//!   `GeneratedImage`.

mod client;
mod config;
mod error;
mod key;
mod sessions;

pub use client::{
    CancelHandle, GeneratedImage, GenerationStats, ProgressListener, ServerTraffic, Veil,
};
pub use config::{
    parse_server_configs, read_server_configs, GenerationDefaults, GenerationOptions, ServerConfig,
    VeilConfig,
};
pub use error::VeilError;
pub use key::{load_or_create_obfuscation_key, read_obfuscation_key, KeyFileError};

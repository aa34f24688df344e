//! The SDK facade: what an app calls, in Rust or (through `veil-ffi`) from Swift and Kotlin.
//!
//! - `config`: `VeilConfig` (model folder, shard servers, policy, wire, defaults) and its
//!   up-front validation.
//! - `error`: `VeilError`, the small public error every internal failure maps to.
//! - `client`: `Veil` — loads the model once, then `generate(prompt, options, progress, cancel)`
//!   any number of times, concurrently if wanted; `CancelHandle`, `ProgressListener`,
//!   `GeneratedImage`.

mod client;
mod config;
mod error;

pub use client::{
    CancelHandle, GeneratedImage, GenerationStats, ProgressListener, ServerTraffic, Veil,
};
pub use config::{GenerationDefaults, GenerationOptions, ServerConfig, VeilConfig};
pub use error::VeilError;

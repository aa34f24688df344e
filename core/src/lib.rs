//! veil-core: private Stable Diffusion for phones, in layers, each importing only those below
//! it (checked by `tests/layers.rs`; the map is docs/ARCHITECTURE.md):
//!
//! 1. `vocab`: the shared vocabulary (layer specs, precision, shard ops and the backend trait,
//!    the engine trait, the `EarlySteps` job, the error).
//! 2. `model`: configs, weights, CLIP, VAE, schedulers, and the U-Net over a trait of ops;
//!    `obfuscation`: the sensitive-attribute lexicon and candidate prompts.
//! 3. `placement`: the runtime that decides where each U-Net op runs (policy table, values,
//!    engines, accounting, audit, the shard executor).
//! 4. `wire`: typed messages and their binary codec, model identity.
//! 5. `transport`: QUIC and TLS to the shard servers.
//! 6. `client`: the pipeline with its one denoise loop and generation strategies (split,
//!    hybrid), and `veil plan`'s accounting from shapes.
//! 7. `sdk`: the facade apps call, with the small public error.

#[cfg(feature = "uniffi")]
uniffi::setup_scaffolding!("veil_core");

pub mod client;
pub mod model;
pub mod obfuscation;
pub mod placement;
pub mod sdk;
pub mod transport;
pub mod vocab;
pub mod wire;

pub use vocab::error;
pub use vocab::error::{Error, Result};

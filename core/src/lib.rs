//! veil-core: the Stable Diffusion model (config, weights, CLIP, VAE, U-Net, schedulers,
//! pipeline), the placement runtime that decides where each U-Net op runs (phone or N shard
//! backends), the accounting that measures what moves between them, the QUIC client, and the
//! SDK facade (`sdk::Veil`) that apps use directly or through `veil-ffi`.

pub mod error;
pub mod model;
pub mod obfuscation;
pub mod placement;
pub mod sdk;
pub mod transport;
pub mod wire;

pub use error::{Error, Result};

//! veil-eval: what Veil measures its pictures and its privacy with.
//!
//! - `dataset`: scenes of one or two shapes in named colours, positions and sizes on a named
//!   background, their captions ("a small red circle at the top left on a white background"),
//!   rendered deterministically from a seed; a fixed held-out caption set for evaluation.
//! - `score`: the prompt-adherence scorer — recovers colour, shape, position and size of the
//!   objects from the pixels alone and compares them with what the caption asked for.
//! - `metrics`: PSNR and SSIM, over all rows or a subset of rows.
//! - `linalg`: least squares, the attacker's K/V inversion.
//! - `attacker`: the white-box attacker's shared primitives (its error type, the public weights
//!   it reads, the K/V least-squares inversion).
//! - `privacy`: the attack suite — a white-box attacker per shard server against the strip-only
//!   control and the one-server ceiling.
//! - `invert_latent`, `invert_text`: the latent and the prompt inverted through the public
//!   weights from the keys and values a `ppidm` server receives.
//! - `obf_prior`: the slot-aware prior attacker of an `obfuscated` server.

pub mod attacker;
pub mod dataset;
pub mod invert_latent;
pub mod invert_text;
pub mod linalg;
pub mod metrics;
pub mod obf_prior;
pub mod privacy;
pub mod score;

pub use dataset::{Background, Colour, Dataset, Object, Position, Scene, Shape, Size};
pub use metrics::{psnr, ssim, Picture};
pub use score::{detect, score, Adherence, Detected, ScoreError};

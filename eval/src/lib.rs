//! veil-eval: what Veil measures its pictures and its privacy with.
//!
//! - `dataset`: scenes of one or two shapes in named colours, positions and sizes on a named
//!   background, their captions ("a small red circle at the top left on a white background"),
//!   rendered deterministically from a seed; a fixed held-out caption set for evaluation.
//! - `score`: the prompt-adherence scorer — recovers colour, shape, position and size of the
//!   objects from the pixels alone and compares them with what the caption asked for.
//! - `metrics`: PSNR and SSIM, over all rows or a subset of rows.
//! - `linalg`: least squares and ridge regression, the attacker's tools.
//! - `attack`: the white-box attack suite against what each shard server received.

pub mod attack;
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

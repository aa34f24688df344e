//! The Stable Diffusion model: configs, weights (and LoRA adapters merged into them), text
//! encoders, VAE, schedulers, and the U-Net written once over a trait of ops (`ops::UNetOps`),
//! so the placement runtime above decides where each op runs without the model knowing it.

pub mod clip;
pub mod config;
pub mod cpu_conv;
pub mod cpu_linear;
pub mod cpu_ops;
pub mod device;
pub mod flash_attention;
pub mod lora;
pub mod ops;
pub mod scheduler;
pub mod softmax_block;
pub mod stored;
pub mod unet;
pub mod vae;
pub mod weights;
pub mod winograd;

/// The layer specs are vocabulary (`vocab::layers`); re-exported where the U-Net builds them.
pub use crate::vocab::layers;

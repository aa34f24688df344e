//! The Stable Diffusion model: configs, weights, text encoder, VAE, U-Net, schedulers, pipeline.

pub mod clip;
pub mod config;
pub mod layers;
pub mod pipeline;
pub mod scheduler;
pub mod unet;
pub mod vae;
pub mod weights;

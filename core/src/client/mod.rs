//! The client: one generation pipeline with one denoise loop, and the strategies that split a
//! generation between the phone and the servers.
//!
//! - `options`: what a generation is asked (`GenerateOptions`, the obfuscated policy's
//!   settings and device U-Net) and what it returns (`Generation`, `RunStats`, PNG).
//! - `prompt`: the prompt's encoding (one text encoder, or SDXL's two and its pooled
//!   embedding).
//! - `pipeline`: `StableDiffusion` (a loaded model) and `generate`, which picks the strategy.
//! - `img2img`: where a generation starts, from noise or from an init image (VAE-encoded on
//!   the phone, noised to the first step the strength keeps), for every strategy.
//! - `denoise`: the one denoise loop every policy runs, over K guided candidates.
//! - `guidance`: a guided step's two halves on disjoint server groups (`strict`'s default),
//!   so no server holds both halves of the same rows.
//! - `hybrid`: the `obfuscated` strategy (ObCLIP): a server runs the first k steps of K
//!   candidate prompts, the phone finishes the real one with its device U-Net.
//! - `early_steps`: the server's side of `obfuscated` (K candidates' first k steps).
//! - `plan`: `veil plan`'s accounting of a policy from shapes alone.
//! - `preview`: a cheap latent-to-RGB progress preview, a linear map fitted to the model's VAE.
//! - `preview_fit`: fitting that map, on real latents (`veil preview-fit`) or random ones.
//!
//! Within the client the files import one way too: `guidance` and `prompt`, then `denoise` and
//! `options`, then `pipeline`, then `img2img`, `early_steps` and `plan`, then `hybrid`
//! (`pipeline` and `hybrid` call `img2img`'s and `early_steps`' methods on `StableDiffusion`
//! without importing them).

pub mod denoise;
pub mod early_steps;
pub mod guidance;
pub mod hybrid;
pub mod img2img;
pub mod options;
pub mod pipeline;
pub mod plan;
pub mod preview;
pub mod preview_fit;
pub mod prompt;

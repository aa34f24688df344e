//! The client: one generation pipeline with one denoise loop, and the strategies that split a
//! generation between the phone and the servers.
//!
//! - `pipeline`: `StableDiffusion` (a loaded model), `generate`, options, results, PNG.
//! - `denoise`: the one denoise loop every policy runs, over K guided candidates.
//! - `hybrid`: the `obfuscated` strategy (ObCLIP): a server runs the first k steps of K
//!   candidate prompts, the phone finishes the real one with its device U-Net.
//! - `plan`: `veil plan`'s accounting of a policy from shapes alone.

pub mod denoise;
pub mod early_steps;
pub mod hybrid;
pub mod pipeline;
pub mod plan;

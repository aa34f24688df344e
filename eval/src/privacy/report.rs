//! docs/eval/attacks.json: per setting and server, the best attack against its control, and
//! every family's own number, so the summary can be traced to what produced it.

use std::collections::BTreeMap;

use serde::Serialize;

/// The attack file.
#[derive(Debug, Clone, Serialize)]
pub struct AttacksFile {
    pub format: &'static str,
    pub test_pictures: usize,
    pub attacker_training_samples: usize,
    /// Timestep of the attacked calls and range of the training calls.
    pub test_timestep: usize,
    pub train_timesteps: [usize; 2],
    pub gate: Gate,
    /// PSNR (dB) over object pixels of the mean picture and of the test pictures' own VAE
    /// reconstruction against themselves (the truth is the VAE decode of the clean latent).
    pub mean_picture_psnr: Option<f64>,
    pub settings: Vec<SettingRow>,
    /// The `obfuscated` server (filled by the caller, which holds the lexicon): the slot-aware
    /// prior over many requests without pictures, and with every candidate finished.
    pub obfuscated: Option<ObfuscatedRows>,
}

/// The `obfuscated` policy's attacker.
#[derive(Debug, Clone, Serialize)]
pub struct ObfuscatedRows {
    pub prior: crate::obf_prior::ObfuscatedRow,
    pub finished: Option<crate::obf_prior::ObfuscatedRow>,
}

/// The N = 1 gate: what the attack families reach when one server sees everything.
#[derive(Debug, Clone, Serialize)]
pub struct Gate {
    pub one_server_psnr_outside: Option<f64>,
    pub one_server_prompt_word_accuracy: Option<f64>,
    /// Per policy, the same two numbers.
    pub per_policy: BTreeMap<String, [Option<f64>; 2]>,
    pub image_bound_db: f64,
    pub prompt_bound: f64,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SettingRow {
    pub policy: String,
    pub servers: usize,
    pub server: usize,
    /// Where the guidance halves go, and which this server holds.
    pub guidance_halves: String,
    pub holds: String,
    /// Its own rows at the latent resolution.
    pub strip: [usize; 2],
    pub image: ImageRow,
    pub objects_outside: ObjectsRow,
    pub prompt: PromptRow,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageRow {
    pub attack_psnr_outside: Option<f64>,
    pub control_psnr_outside: Option<f64>,
    pub background_fill_psnr_outside: Option<f64>,
    pub mean_picture_psnr_outside: Option<f64>,
    /// Attack family → PSNR outside.
    pub families: BTreeMap<String, Option<f64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ObjectsRow {
    /// Objects lying wholly outside the strip and halo, over the test pictures.
    pub objects: usize,
    pub attack_accuracy: Option<f64>,
    pub control_accuracy: Option<f64>,
    pub families: BTreeMap<String, Option<f64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptRow {
    /// Attribute slots right (main object's size, colour, shape, position; background).
    pub attack_word_accuracy: Option<f64>,
    pub control_word_accuracy: Option<f64>,
    /// Whole caption recovered exactly.
    pub attack_exact: Option<f64>,
    pub families: BTreeMap<String, Option<f64>>,
}

/// The best of some families' numbers (None where none ran).
pub fn best(families: &BTreeMap<String, Option<f64>>) -> Option<f64> {
    families
        .values()
        .flatten()
        .copied()
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
}

//! The privacy evaluation: what a capable white-box attacker on each shard server learns, and
//! against what baselines (DESIGN.md §7).
//!
//! The attacker holds the public model and makes its own training data: single U-Net calls on
//! forward-noised dataset latents with their real captions, run under the same placement
//! (`calls`). It is scored on held-out pictures, at a late timestep (the call whose input is
//! nearly the finished picture — the most revealing one of a generation):
//! - image: PSNR of the pooled squared error over object pixels outside its strip and halo
//!   rows; attribute accuracy of objects lying wholly outside them (`metrics`);
//! - prompt: the main object's attribute slots and the background recovered, and exact
//!   captions.
//!
//! Families (`server`): the strip-only control (learned decoders from the server's own latent
//! rows alone), the mean picture and the background fill; under `strict` the learned decoder
//! and prompt probe over its whole view (`features`), the closed form from the GroupNorm
//! moments, and the CFG-difference dictionary test (`cross`); under `ppidm` the latent
//! inverted through the public weights from the self-attention keys and values then finished
//! with the prompt recovered from the cross-attention ones (`ppidm`). An attack family counts
//! only if it reaches the one-server ceiling (the gate in the report).

pub mod calls;
pub mod cross;
pub mod features;
pub mod generations;
pub mod metrics;
pub mod ppidm;
pub mod report;
pub mod ridge;
pub mod server;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;

use veil_core::client::pipeline::StableDiffusion;
use veil_core::placement::Policy;

use crate::attacker::Result;
use crate::dataset::Dataset;
use crate::invert_text::Vocabulary;
use crate::metrics::Picture;

use calls::{make_items, random_t, Item, Setting};
use cross::CfgAttack;
use features::{rows_features, slot_targets};
use report::{AttacksFile, Gate, SettingRow};
use ridge::Linear;

/// What one evaluation runs.
#[derive(Debug, Clone)]
pub struct PrivacyConfig {
    /// Attacker training calls (per setting that needs them) and held-out test pictures.
    pub train: usize,
    pub test: usize,
    /// Pictures per batched U-Net call.
    pub batch: usize,
    /// Training captions added to the test captions in the CFG-difference dictionary.
    pub dictionary_extra: usize,
    pub train_t: Range<usize>,
    pub test_t: usize,
    pub seed: u64,
    pub settings: Vec<Setting>,
}

impl PrivacyConfig {
    /// The full evaluation: N = 1 (the gate), `ppidm` and `strict` at N = 2 and 4, and
    /// `strict` with the guidance halves together at N = 4 (the leak the default closes).
    pub fn full() -> Self {
        use veil_core::client::guidance::GuidanceHalves;
        let ppidm = Policy::Ppidm {
            gn: Default::default(),
        };
        let mut together = Setting::new(Policy::Strict, 4);
        together.halves = GuidanceHalves::Together;
        Self {
            train: 5000,
            test: 100,
            batch: 50,
            dictionary_extra: 1000,
            train_t: 1..21,
            test_t: 1,
            seed: 11,
            settings: vec![
                Setting::new(ppidm, 1),
                Setting::new(Policy::Strict, 1),
                Setting::new(ppidm, 2),
                Setting::new(ppidm, 4),
                Setting::new(Policy::Strict, 2),
                Setting::new(Policy::Strict, 4),
                together,
            ],
        }
    }
}

/// Everything the per-server attacks share.
pub struct Shared<'a> {
    pub sd: &'a StableDiffusion,
    pub train: Vec<Item>,
    pub test: Vec<Item>,
    pub mean_picture: Picture,
    pub cfg_attack: CfgAttack,
    pub vocabulary: Vocabulary,
    /// Greedy prompt inversions so far, by true caption.
    inverted_prompts: std::cell::RefCell<HashMap<String, String>>,
    /// Strip-only controls by held rows: one map to the clean latent and the prompt's slots.
    controls: HashMap<Range<usize>, Linear>,
}

impl Shared<'_> {
    /// The strip-only control for a server holding latent `rows` (fitted once per range):
    /// the clean latent then the prompt's slot scores (`targets`).
    pub fn control(&mut self, rows: &Range<usize>) -> Result<&Linear> {
        if !self.controls.contains_key(rows) {
            let x: Vec<Vec<f32>> = self.train.iter().map(|i| rows_features(i, rows)).collect();
            let y: Vec<Vec<f32>> = self.train.iter().map(targets).collect();
            self.controls.insert(rows.clone(), Linear::fit(&x, &y)?);
        }
        self.controls
            .get(rows)
            .ok_or_else(|| crate::attacker::AttackError::Setup("control not fitted".into()))
    }
}

/// Runs the evaluation; `progress(stage, done, total)`.
pub fn run(
    sd: &StableDiffusion,
    model_dir: &Path,
    cfg: &PrivacyConfig,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<AttacksFile> {
    let data = Dataset::new(cfg.seed, 64);
    let batch = cfg.batch.max(1);
    progress("attacker data", 0, cfg.train + cfg.test);
    let t_group = random_t(cfg.seed, cfg.train_t.clone());
    let train = make_items(sd, &data, 0..cfg.train as u64, false, &|i| {
        t_group(i / batch as u64)
    })?;
    let test = make_items(sd, &data, 0..cfg.test as u64, true, &|_| cfg.test_t)?;
    progress("attacker data", cfg.train + cfg.test, cfg.train + cfg.test);
    let truths: Vec<Picture> = train.iter().map(|i| i.truth.clone()).collect();
    let mean_picture = crate::metrics::mean_picture(&truths)
        .ok_or_else(|| crate::attacker::AttackError::Setup("no training pictures".into()))?;
    let mut dictionary: Vec<String> = test.iter().map(|i| i.caption.clone()).collect();
    for it in &train {
        if dictionary.len() >= cfg.test + cfg.dictionary_extra {
            break;
        }
        if !dictionary.contains(&it.caption) {
            dictionary.push(it.caption.clone());
        }
    }
    let cfg_attack = CfgAttack::new(sd, dictionary)?;
    let mut shared = Shared {
        sd,
        train,
        test,
        mean_picture,
        cfg_attack,
        vocabulary: Vocabulary::load(model_dir)?,
        inverted_prompts: Default::default(),
        controls: HashMap::new(),
    };
    let mut rows = Vec::new();
    for (k, setting) in cfg.settings.iter().enumerate() {
        progress(&setting.label(), k, cfg.settings.len());
        rows.extend(server::attack_setting(
            &mut shared,
            setting,
            batch,
            progress,
        )?);
    }
    progress("done", cfg.settings.len(), cfg.settings.len());
    let mean_psnr = server::mean_picture_psnr(&shared);
    Ok(AttacksFile {
        format: "veil-attacks/1",
        test_pictures: shared.test.len(),
        attacker_training_samples: shared.train.len(),
        test_timestep: cfg.test_t,
        train_timesteps: [cfg.train_t.start, cfg.train_t.end.saturating_sub(1)],
        gate: gate(&rows),
        mean_picture_psnr: mean_psnr,
        settings: rows,
        obfuscated: None,
    })
}

/// Image PSNR at least this on N = 1 counts as the ceiling (issue 15), and prompt slots.
pub const GATE_DB: f64 = 35.0;
pub const GATE_WORDS: f64 = 0.90;

fn gate(rows: &[SettingRow]) -> Gate {
    let mut per_policy = BTreeMap::new();
    for r in rows.iter().filter(|r| r.servers == 1) {
        per_policy.insert(
            r.policy.clone(),
            [r.image.attack_psnr_outside, r.prompt.attack_word_accuracy],
        );
    }
    let worst = |i: usize| {
        per_policy
            .values()
            .map(|v: &[Option<f64>; 2]| v[i])
            .try_fold(f64::INFINITY, |m, v| v.map(|v| m.min(v)))
            .filter(|v| v.is_finite())
    };
    let (img, words) = (worst(0), worst(1));
    Gate {
        one_server_psnr_outside: img,
        one_server_prompt_word_accuracy: words,
        per_policy,
        image_bound_db: GATE_DB,
        prompt_bound: GATE_WORDS,
        met: img.is_some_and(|v| v >= GATE_DB) && words.is_some_and(|v| v >= GATE_WORDS),
    }
}

/// What the learned attacks predict of a picture: its clean latent, then one score per value
/// of each prompt slot (`features::slot_targets`). One fit serves both.
pub fn targets(item: &Item) -> Vec<f32> {
    let mut t = item.x0.clone();
    t.extend(slot_targets(&item.scene));
    t
}

/// Splits a prediction of `targets` into (latent of `n` values, slot scores).
pub fn split_targets(p: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
    let n = n.min(p.len());
    (p[..n].to_vec(), p[n..].to_vec())
}

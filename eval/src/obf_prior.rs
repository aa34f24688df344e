//! The slot-aware prior attacker of an `obfuscated` server: it sees the K candidate captions
//! of a request and guesses the real one as the candidate whose colour values are most frequent
//! in the dataset, for its slots (object or background, one or two objects).
//!
//! The prior is estimated from the dataset's own caption generator (training samples of a
//! seed): how often each tuple of slot values appears for each slot structure, with the
//! per-slot value frequencies as a back-off for tuples never seen. It knows, so, that a
//! background is never red and that an object never has its background's colour — what a
//! server that knows the domain knows. `measure` runs it over held-out captions: against the
//! partition of `veil_core::obfuscation` its accuracy should stay near 1/K, the chance of a
//! uniform guess.
//!
//! `obfuscated_row` runs it end to end against `obfuscated` generations (`ObfuscatedAttack`,
//! `ObfuscatedRow`): which candidate is real, which value each sensitive slot has, and — the
//! server holding the whole model can finish every candidate's picture — how close the
//! picture of its guess, and the best of the K, come to the user's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use veil_core::client::hybrid::{EarlySteps, ObfuscationOptions};
use veil_core::client::pipeline::{seeded_normal, GenerateOptions, StableDiffusion};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::obfuscation::{candidates_with_key, Lexicon, ObfuscationKey};
use veil_core::placement::{Policy, ShardBackend};

use crate::attacker::{AttackError, Result as AttackResult};
use crate::dataset::Dataset;
use crate::metrics::{psnr, Picture};

/// Weight of the back-off (product of per-slot frequencies) against a seen tuple's count.
const BACKOFF: f64 = 1e-3;

/// What the attacker knows of the captions: tuple and per-slot value frequencies.
#[derive(Debug, Clone)]
pub struct SlotPrior {
    /// The attacker's lexicon (with its slot rules: how it names each span's slot).
    lex: Lexicon,
    /// (slot structure, value tuple) → count.
    tuples: BTreeMap<(String, String), f64>,
    /// slot structure → captions seen.
    structures: BTreeMap<String, f64>,
    /// (slot, value) → count, and slot → count.
    values: BTreeMap<(String, String), f64>,
    slots: BTreeMap<String, f64>,
}

/// A caption's slots ("colour/object") and values, as the attacker's lexicon reads them.
fn slots_of(lex: &Lexicon, caption: &str) -> Vec<(String, String)> {
    lex.detect(caption)
        .into_iter()
        .map(|s| {
            let role = lex
                .rule_for(caption, &s)
                .map(|r| r.role.clone())
                .unwrap_or_default();
            (format!("{}/{role}", s.category), s.value)
        })
        .collect()
}

fn key_of(slots: &[(String, String)]) -> (String, String) {
    let structure: Vec<&str> = slots.iter().map(|(s, _)| s.as_str()).collect();
    let values: Vec<&str> = slots.iter().map(|(_, v)| v.as_str()).collect();
    (structure.join(","), values.join("|"))
}

impl SlotPrior {
    /// Counts the slot values of `samples` training captions of `data` read with `lex`.
    pub fn estimate(lex: &Lexicon, data: &Dataset, samples: u64) -> Self {
        let mut prior = SlotPrior {
            lex: lex.clone(),
            tuples: BTreeMap::new(),
            structures: BTreeMap::new(),
            values: BTreeMap::new(),
            slots: BTreeMap::new(),
        };
        for i in 0..samples {
            let slots = slots_of(lex, &data.sample(i).1);
            let (structure, values) = key_of(&slots);
            *prior.structures.entry(structure.clone()).or_default() += 1.0;
            *prior.tuples.entry((structure, values)).or_default() += 1.0;
            for (slot, value) in slots {
                *prior.slots.entry(slot.clone()).or_default() += 1.0;
                *prior.values.entry((slot, value)).or_default() += 1.0;
            }
        }
        prior
    }

    /// The log prior of `caption`'s slot values (up to a constant per slot structure).
    pub fn score(&self, caption: &str) -> f64 {
        let slots = slots_of(&self.lex, caption);
        let backoff: f64 = slots
            .iter()
            .map(|(slot, value)| {
                let n = self.slots.get(slot).copied().unwrap_or(0.0);
                let c = self.values.get(&(slot.clone(), value.clone())).copied();
                (c.unwrap_or(0.0) + 0.5) / (n + 1.0)
            })
            .product();
        let key = key_of(&slots);
        let n = self.structures.get(&key.0).copied().unwrap_or(0.0);
        let seen = self.tuples.get(&key).copied().unwrap_or(0.0);
        ((seen + BACKOFF * backoff) / (n + 1.0)).ln()
    }

    /// The guess: the candidate of highest prior × `likelihood` (what the attacker knows of
    /// P(this set is sent | candidate j is real); all equal when it cannot compute it), ties
    /// broken uniformly with `rng`.
    pub fn guess(&self, candidates: &[String], likelihood: &[f64], rng: &mut impl Rng) -> usize {
        let scores: Vec<f64> = candidates
            .iter()
            .enumerate()
            .map(|(j, c)| self.score(c) + likelihood.get(j).copied().unwrap_or(1.0).ln())
            .collect();
        let best = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let top: Vec<usize> = (0..scores.len())
            .filter(|&j| scores[j] >= best - 1e-9)
            .collect();
        match top.len() {
            0 => 0,
            n => top[rng.random_range(0..n)],
        }
    }
}

/// The attacker's result over many requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PriorAttackReport {
    pub prompts: usize,
    /// Mean number of candidates per request.
    pub mean_k: f64,
    /// Mean 1/K: a uniform guess.
    pub chance: f64,
    /// How often the prior's guess was the real caption.
    pub accuracy: f64,
    /// How often the real caption was among the candidates (1 unless the device is broken).
    pub real_sent: f64,
}

/// What the server receives for one caption: the candidates in send order, and what the
/// attacker can compute of P(set | candidate j is real) from the algorithm (empty: nothing,
/// all candidates alike).
pub struct ServerView {
    pub candidates: Vec<String>,
    pub likelihood: Vec<f64>,
}

/// Runs `prior` against `prompts` held-out captions of `data` (seed `seed` for the attacker's
/// tie-breaks); `send` is the device: caption in, the server's view out. The real candidate is
/// the one equal to the caption (captions are written with canonical values).
pub fn measure(
    prior: &SlotPrior,
    data: &Dataset,
    prompts: usize,
    seed: u64,
    send: &mut dyn FnMut(&str) -> veil_core::Result<ServerView>,
) -> veil_core::Result<PriorAttackReport> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut ks, mut chance, mut hits, mut sent) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..prompts {
        let caption = data.held_out(i as u64).1;
        let view = send(&caption)?;
        let k = view.candidates.len().max(1);
        let real = view
            .candidates
            .iter()
            .position(|c| c.eq_ignore_ascii_case(&caption));
        let guess = prior.guess(&view.candidates, &view.likelihood, &mut rng);
        ks += k as f64;
        chance += 1.0 / k as f64;
        hits += f64::from(u8::from(real == Some(guess)));
        sent += f64::from(u8::from(real.is_some()));
    }
    let n = prompts.max(1) as f64;
    Ok(PriorAttackReport {
        prompts,
        mean_k: ks / n,
        chance: chance / n,
        accuracy: hits / n,
        real_sent: sent / n,
    })
}

// ---- the attacker of an `obfuscated` server, end to end ------------------------------------

/// One run of the attack on an `obfuscated` server: `prompts` held-out shapes captions, one
/// request each, the sensitive category the one of the lexicon given (the shapes' colours
/// with `eval/lexicons/colours.toml`).
#[derive(Debug, Clone, PartialEq)]
pub struct ObfuscatedAttack {
    /// Held-out captions attacked.
    pub prompts: usize,
    /// T, the denoising steps, and k, the steps the server runs for every candidate (≥ 1).
    pub steps: usize,
    pub server_steps: usize,
    /// K_max, the most candidates a request sends.
    pub k_max: usize,
    pub guidance: f64,
    /// Picture side in pixels (the model's).
    pub side: usize,
    /// The dataset's seed; it also draws the device's key and each request's noise.
    pub seed: u64,
    /// Training captions the attacker's `SlotPrior` is estimated from.
    pub prior_samples: u64,
    /// Generate every request and have the server finish all K pictures (the PSNR columns);
    /// false: no picture at all, the candidates computed as the device computes them
    /// (`candidates_with_key`, same lexicon, K_max and key), for many prompts cheaply.
    pub finish_all: bool,
}

/// Training captions `SlotPrior::estimate` reads by default (the `obf_prior` test's).
pub const DEFAULT_PRIOR_SAMPLES: u64 = 20_000;

/// What the attacker of an `obfuscated` server achieves, per request averaged over the
/// attacked captions. The device holds one secret key for all of them (drawn from the seed);
/// the attacker knows the algorithm, the lexicon and the dataset's caption distribution, not
/// the key. Its view of a request is the K candidate texts in send order and the noise.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ObfuscatedRow {
    /// Requests (held-out captions) attacked.
    pub prompts: usize,
    /// Mean K, candidates sent per request.
    pub k_mean: f64,
    /// How often the `SlotPrior` attacker's guess (the candidate whose slot values the
    /// training captions make most likely; ties broken at random) is the real caption.
    pub prior_accuracy: f64,
    /// Mean 1/K: the accuracy of a uniform guess, what `prior_accuracy` should stay near.
    pub chance: f64,
    /// With `finish_all`: the server finishes all K candidates' pictures itself (T steps from
    /// the request's noise, its own full model) and keeps the one of its guess; the mean PSNR
    /// (dB, identical pictures counted as 100) of that picture against the user's true final
    /// picture. None without `finish_all`.
    pub picked_psnr: Option<f64>,
    /// With `finish_all`: the mean PSNR of the best of the K pictures against the true one,
    /// an upper bound on any pick (an oracle that knew the real candidate; not 100 dB because
    /// the phone's late steps differ from the server's). None without `finish_all`.
    pub best_of_k_psnr: Option<f64>,
    /// Over every sensitive slot of every request (each detected span, e.g. an object's
    /// colour or the background's): how often the guessed candidate has the real value there.
    pub sensitive_slot_accuracy: f64,
    /// Its chance level: the mean over the same slots of 1 / (distinct values the K candidates
    /// show in that slot).
    pub slot_chance: f64,
    /// How often the real caption was among the candidates (1 unless the device is broken or
    /// the lexicon writes a value unlike the captions).
    pub real_sent: f64,
}

/// The sums over requests behind an `ObfuscatedRow`.
#[derive(Debug, Default)]
struct Tally {
    k: f64,
    chance: f64,
    hits: f64,
    sent: f64,
    slot_hits: f64,
    slot_chance: f64,
    slots: f64,
    picked: f64,
    best: f64,
}

impl Tally {
    fn row(&self, cfg: &ObfuscatedAttack) -> ObfuscatedRow {
        let n = cfg.prompts.max(1) as f64;
        let psnr = |s: f64| cfg.finish_all.then_some(s / n);
        ObfuscatedRow {
            prompts: cfg.prompts,
            k_mean: self.k / n,
            prior_accuracy: self.hits / n,
            chance: self.chance / n,
            picked_psnr: psnr(self.picked),
            best_of_k_psnr: psnr(self.best),
            sensitive_slot_accuracy: self.slot_hits / self.slots.max(1.0),
            slot_chance: self.slot_chance / self.slots.max(1.0),
            real_sent: self.sent / n,
        }
    }

    /// Counts one request: the candidates in send order, the caption, the attacker's guess.
    fn request(&mut self, lex: &Lexicon, candidates: &[String], caption: &str, guess: usize) {
        let k = candidates.len().max(1) as f64;
        let real = candidates
            .iter()
            .position(|c| c.eq_ignore_ascii_case(caption));
        self.k += k;
        self.chance += 1.0 / k;
        self.hits += f64::from(u8::from(real == Some(guess)));
        self.sent += f64::from(u8::from(real.is_some()));
        let values =
            |text: &str| -> Vec<String> { lex.detect(text).into_iter().map(|s| s.value).collect() };
        let per_candidate: Vec<Vec<String>> = candidates.iter().map(|c| values(c)).collect();
        for (slot, truth) in values(caption).iter().enumerate() {
            let guessed = per_candidate.get(guess).and_then(|v| v.get(slot));
            self.slot_hits += f64::from(u8::from(guessed == Some(truth)));
            let shown: BTreeSet<&String> =
                per_candidate.iter().filter_map(|v| v.get(slot)).collect();
            self.slot_chance += 1.0 / shown.len().max(1) as f64;
            self.slots += 1.0;
        }
    }
}

/// Runs the attack (`ObfuscatedAttack`) with the in-process full-model server;
/// `progress(done, total)` after each request.
pub fn obfuscated_row(
    sd: &Arc<StableDiffusion>,
    lex: &Arc<Lexicon>,
    cfg: &ObfuscatedAttack,
    progress: &mut dyn FnMut(usize, usize),
) -> AttackResult<ObfuscatedRow> {
    Ok(run_attack(sd, lex, cfg, progress)?.row(cfg))
}

/// The attack's loop: the sums over its requests.
fn run_attack(
    sd: &Arc<StableDiffusion>,
    lex: &Arc<Lexicon>,
    cfg: &ObfuscatedAttack,
    progress: &mut dyn FnMut(usize, usize),
) -> AttackResult<Tally> {
    if cfg.server_steps == 0 || cfg.server_steps > cfg.steps || cfg.k_max == 0 {
        return Err(AttackError::Setup(format!(
            "the obfuscated attack needs 1 ≤ server steps ≤ steps and K_max ≥ 1, got k = {} of \
             T = {}, K_max = {}",
            cfg.server_steps, cfg.steps, cfg.k_max
        )));
    }
    let data = Dataset::new(cfg.seed, cfg.side);
    // Captions do not depend on the picture side: estimate from small renders.
    let prior = SlotPrior::estimate(lex, &Dataset::new(cfg.seed, 8), cfg.prior_samples);
    let key = Arc::new(ObfuscationKey::generate(&mut StdRng::seed_from_u64(
        cfg.seed ^ 0x6b65_795f_7365_6564,
    )));
    let mut rng = StdRng::seed_from_u64(cfg.seed.wrapping_add(1));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| AttackError::Setup(format!("async runtime: {e}")))?;
    let server = sd.in_process_full_server();
    let mut tally = Tally::default();
    for i in 0..cfg.prompts {
        let caption = data.held_out(i as u64).1;
        let request = Request {
            caption: &caption,
            seed: 1 + i as u64,
        };
        let (candidates, truth) = if cfg.finish_all {
            let (c, t) = request.generate(sd, &server, lex, &key, cfg, &rt)?;
            (c, Some(t))
        } else {
            let spans = lex.detect(&caption);
            let set = candidates_with_key(&caption, &spans, lex, cfg.k_max, &key, &mut rng)?;
            (set.prompts, None)
        };
        let guess = prior.guess(&candidates, &[], &mut rng);
        tally.request(lex, &candidates, &caption, guess);
        if let Some(truth) = truth {
            let scores = request.finish_all(sd, &candidates, cfg, &truth)?;
            tally.picked += scores.get(guess).copied().unwrap_or(0.0);
            tally.best += scores.iter().copied().fold(0.0, f64::max);
        }
        progress(i + 1, cfg.prompts);
    }
    Ok(tally)
}

/// One attacked request: its caption and the seed of its noise.
struct Request<'a> {
    caption: &'a str,
    seed: u64,
}

impl Request<'_> {
    fn noise(&self, sd: &StableDiffusion, side: usize) -> AttackResult<Tensor> {
        let (h, w) = sd.latent_size(side, side)?;
        let shape = [1, sd.unet.config.in_channels, h, w];
        Ok(seeded_normal(self.seed, &shape, &sd.device)?)
    }

    /// The `obfuscated` generation of the caption: the candidates the server received, in
    /// send order, and the user's true final picture.
    fn generate(
        &self,
        sd: &Arc<StableDiffusion>,
        server: &Arc<dyn ShardBackend<Tensor>>,
        lex: &Arc<Lexicon>,
        key: &Arc<ObfuscationKey>,
        cfg: &ObfuscatedAttack,
        rt: &tokio::runtime::Runtime,
    ) -> AttackResult<(Vec<String>, Picture)> {
        let opts = GenerateOptions {
            prompt: self.caption.to_string(),
            steps: cfg.steps,
            guidance: cfg.guidance,
            seed: self.seed,
            width: cfg.side,
            height: cfg.side,
            scheduler: SchedulerKind::Ddim,
            latents: Some(self.noise(sd, cfg.side)?),
            policy: Policy::Obfuscated,
            obfuscation: ObfuscationOptions {
                server_steps: Some(cfg.server_steps),
                k_max: Some(cfg.k_max),
                lexicon: Some(lex.clone()),
                key: Some(key.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        let g = rt.block_on(sd.generate(&opts, std::slice::from_ref(server), &mut |_| {}))?;
        // The server's view in send order (the negative prompt comes after the candidates).
        let sent = g.obfuscation.as_ref().map_or(0, |o| o.candidates);
        let candidates = g.audit.texts.iter().take(sent).map(|t| t.text.clone());
        Ok((candidates.collect(), picture_of(&g.image)?))
    }

    /// The server finishes every candidate from the request's noise (all T steps on its full
    /// model, as it could after its k): each picture's PSNR to `truth`, capped at 100 dB.
    fn finish_all(
        &self,
        sd: &StableDiffusion,
        candidates: &[String],
        cfg: &ObfuscatedAttack,
        truth: &Picture,
    ) -> AttackResult<Vec<f64>> {
        let job = EarlySteps {
            candidates: candidates.to_vec(),
            negative_prompt: String::new(),
            noise: self.noise(sd, cfg.side)?,
            steps: cfg.steps,
            server_steps: cfg.steps,
            start_step: None,
            condition: None,
            guidance: cfg.guidance,
            scheduler: SchedulerKind::Ddim,
            accel: Default::default(),
        };
        let finals = sd.early_steps(&job, &mut |_, _| {})?.latents;
        let mut scores = Vec::with_capacity(candidates.len());
        for j in 0..candidates.len() {
            let p = picture_of(&sd.decode(&finals.narrow(0, j, 1)?)?)?;
            // None: identical pictures (infinite PSNR).
            scores.push(psnr(&p, truth, None)?.unwrap_or(100.0).min(100.0));
        }
        Ok(scores)
    }
}

fn picture_of(t: &Tensor) -> AttackResult<Picture> {
    let (_, h, w) = t.dims3()?;
    Ok(Picture::new(h, w, t.flatten_all()?.to_vec1::<f32>()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Arc<StableDiffusion>, Arc<Lexicon>) {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let sd = StableDiffusion::load(
            &root.join("../models/tiny-random"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let lex = Lexicon::from_file(&root.join("lexicons/colours.toml")).unwrap();
        (Arc::new(sd), Arc::new(lex))
    }

    fn cfg(prompts: usize, finish_all: bool) -> ObfuscatedAttack {
        ObfuscatedAttack {
            prompts,
            steps: 2,
            server_steps: 1,
            k_max: 8,
            guidance: 5.0,
            side: 64,
            seed: 3,
            prior_samples: 2000,
            finish_all,
        }
    }

    #[test]
    fn the_row_says_what_each_attack_achieved() {
        let (sd, lex) = setup();
        let mut calls = 0;
        let row = obfuscated_row(&sd, &lex, &cfg(3, true), &mut |_, _| calls += 1).unwrap();
        assert_eq!((row.prompts, calls), (3, 3));
        assert_eq!((row.k_mean, row.chance, row.real_sent), (8.0, 0.125, 1.0));
        let (picked, best) = (row.picked_psnr.unwrap(), row.best_of_k_psnr.unwrap());
        assert!(picked.is_finite() && picked <= best + 1e-9, "{row:?}");
        assert!((0.0..=1.0).contains(&row.prior_accuracy));
        assert!(row.slot_chance > 0.0 && row.slot_chance <= 1.0);
        let json = serde_json::to_value(&row).unwrap();
        for field in [
            "prior_accuracy",
            "chance",
            "picked_psnr",
            "sensitive_slot_accuracy",
        ] {
            assert!(json.get(field).is_some(), "{field}");
        }

        // Without pictures: many requests cheaply, no PSNR columns (deterministic: the key,
        // the send order and the tie-breaks all come from the seed).
        let cheap = obfuscated_row(&sd, &lex, &cfg(200, false), &mut |_, _| {}).unwrap();
        assert_eq!((cheap.picked_psnr, cheap.best_of_k_psnr), (None, None));
        assert_eq!((cheap.k_mean, cheap.real_sent), (8.0, 1.0));
        assert!(cheap.prior_accuracy <= 0.125 + 0.1, "{cheap:?}");
        assert!(
            cheap.sensitive_slot_accuracy <= cheap.slot_chance + 0.15,
            "{cheap:?}"
        );

        let mut bad = cfg(1, false);
        bad.server_steps = 0;
        assert!(matches!(
            obfuscated_row(&sd, &lex, &bad, &mut |_, _| {}),
            Err(AttackError::Setup(_))
        ));
    }
}

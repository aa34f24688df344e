//! The whole-generation attack: the attacker runs its own whole generations (held-out noise,
//! real captions, the README's settings) under a placement, captures what each server sees at
//! every step, and learns a map from everything one server saw over the whole generation to
//! the picture the phone finally shows and to the prompt's attribute slots.
//!
//! Where the single-call attacks (`calls`) measure what one U-Net call reveals independently
//! of how well the model follows prompts, this measures what the user's real exposure is: a
//! server sees every step of the same picture, and the final picture is what the user keeps.
//!
//! Families, per server (each a ridge map fitted on the attacker's training generations,
//! correcting the latent rows the server received in the last step — nearly the final
//! latent there — so that a few hundred generations suffice where the server sees rows):
//! - the strip-only control: the server's own latent rows (strip and halo) at every step;
//! - the view decoder / probe: those rows plus, at every step, the first layers' GroupNorm
//!   moments and the first scattered streams (what `features::view_extras` reads);
//! - the mean picture of the training generations.
//!
//! Scored on held-out captions: PSNR of the pooled squared error over every pixel outside the
//! server's strip and halo (the whole picture at N = 1; the generated picture is not a
//! dataset render, so there is no object mask), and the prompt's attribute slots.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::Serialize;
use veil_core::client::denoise::{denoise, Conditioning, LoopHooks};
use veil_core::client::options::GenerateOptions;
use veil_core::client::pipeline::{seeded_normal, StableDiffusion};
use veil_core::model::scheduler::new_scheduler;
use veil_core::placement::runtime::CapturedReply;
use veil_core::placement::{Policy, View};
use veil_core::vocab::job::{Accelerations, BatchRedundancy};

use crate::attacker::{AttackError, Result};
use crate::dataset::{Dataset, Scene};
use crate::metrics::Picture;

use super::calls::{
    decode, latent_dims, run_captured, sights, Captured, Seen, ServerSight, Setting,
};
use super::features::{sight_rows, slot_scene, slot_targets, view_extras, ViewParts};
use super::metrics::{known_pixel_rows, pooled_psnr, slots_right};
use super::ridge::Linear;

/// What one whole-generation evaluation runs.
#[derive(Debug, Clone)]
pub struct GenerationsConfig {
    /// Attacker training generations and held-out test generations (per setting).
    pub train: usize,
    pub test: usize,
    /// Generations denoised together (one guided batch).
    pub batch: usize,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    pub settings: Vec<Setting>,
}

impl GenerationsConfig {
    /// The sizes: 500 training and 100 held-out generations of 20 steps, under the
    /// default `strict` at N = 1 (the ceiling), 2 and 4.
    pub fn full() -> Self {
        Self {
            train: 500,
            test: 100,
            batch: 50,
            steps: 20,
            guidance: GenerateOptions::default().guidance,
            seed: 11,
            settings: [1, 2, 4]
                .into_iter()
                .map(|n| Setting::new(Policy::Strict, n))
                .collect(),
        }
    }
}

/// One generation as the attacker scores it.
struct Generation {
    scene: Scene,
    /// The final latent [C·H·W] and its decode: what the phone shows.
    latent: Vec<f32>,
    picture: Picture,
    /// Per server, what it saw over every step.
    servers: Vec<Seen1>,
}

/// One server's features of one generation.
#[derive(Clone, Default)]
struct Seen1 {
    /// Its strip at the latent resolution.
    strip: Range<usize>,
    /// The control's features (own rows, every step) and the view's.
    own: Vec<f32>,
    view: Vec<f32>,
    /// The latent rows it received in the last step, in place (zero elsewhere): the base both
    /// families' decoders correct, since the last step's input is nearly the final latent.
    last: Vec<f32>,
}

/// The file docs/eval/attacks_generations.json.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationsFile {
    pub format: &'static str,
    pub training_generations: usize,
    pub test_generations: usize,
    pub steps: usize,
    pub guidance: f64,
    pub settings: Vec<GenerationRow>,
}

/// One server of one setting: its families' numbers.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationRow {
    pub policy: String,
    pub servers: usize,
    pub server: usize,
    pub holds: String,
    pub strip: [usize; 2],
    /// Features the view decoder read (all steps) and the control's.
    pub view_features: usize,
    pub control_features: usize,
    /// PSNR (dB) over pixels outside the strip and halo of the final picture.
    pub mean_picture_psnr_outside: Option<f64>,
    pub control_psnr_outside: Option<f64>,
    pub attack_psnr_outside: Option<f64>,
    /// Prompt slots (size, colour, shape, position, background) right.
    pub control_word_accuracy: Option<f64>,
    pub attack_word_accuracy: Option<f64>,
}

/// Runs every setting; `progress(stage, done, total)` counts generations.
pub fn run(
    sd: &StableDiffusion,
    cfg: &GenerationsConfig,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<GenerationsFile> {
    let data = Dataset::new(cfg.seed, super::calls::SIDE);
    let train: Vec<(Scene, String)> = (0..cfg.train as u64)
        .map(|i| {
            let (s, c, _) = data.sample(i);
            (s, c)
        })
        .collect();
    let test: Vec<(Scene, String)> = (0..cfg.test as u64)
        .map(|i| {
            let (s, c, _) = data.held_out(i);
            (s, c)
        })
        .collect();
    let mut rows = Vec::new();
    for setting in &cfg.settings {
        let label = setting.label();
        let total = train.len() + test.len();
        let mut done = 0;
        let mut generate = |captions: &[(Scene, String)], seed: u64| {
            let mut out = Vec::with_capacity(captions.len());
            for (k, chunk) in captions.chunks(cfg.batch.max(1)).enumerate() {
                let first = seed + (k * cfg.batch.max(1)) as u64;
                out.extend(generate_batch(sd, cfg, setting, chunk, first)?);
                done += chunk.len();
                progress(&label, done, total);
            }
            Ok::<_, AttackError>(out)
        };
        let train_g = generate(&train, 0)?;
        let test_g = generate(&test, 1 << 32)?;
        rows.extend(attack(sd, setting, &train_g, &test_g)?);
    }
    Ok(GenerationsFile {
        format: "veil-attacks-generations/1",
        training_generations: cfg.train,
        test_generations: cfg.test,
        steps: cfg.steps,
        guidance: cfg.guidance,
        settings: rows,
    })
}

/// Whole generations of `captions` under `setting`, one guided batch, the noise of picture
/// `i` seeded by `first_seed + i`; what each server saw at every step, reduced to features.
fn generate_batch(
    sd: &StableDiffusion,
    cfg: &GenerationsConfig,
    setting: &Setting,
    captions: &[(Scene, String)],
    first_seed: u64,
) -> Result<Vec<Generation>> {
    let b = captions.len();
    let (c, h, w) = latent_dims(sd);
    let texts: Vec<Tensor> = captions
        .iter()
        .map(|(_, t)| sd.encode_prompt(t))
        .collect::<veil_core::vocab::error::Result<_>>()?;
    let accel = Accelerations {
        batch_redundancy: BatchRedundancy::Off,
        attention_gate: None,
    };
    let conditioning = Conditioning::new(
        Tensor::cat(&texts, 0)?,
        Some(sd.encode_prompt("")?),
        cfg.guidance,
        accel,
    )?;
    let opts = GenerateOptions::default();
    let mut scheduler = new_scheduler(opts.scheduler, &sd.scheduler_config, cfg.steps)?;
    let noise: Vec<Tensor> = (0..b as u64)
        .map(|i| seeded_normal(first_seed + i, &[1, c, h, w], &Device::Cpu))
        .collect::<veil_core::vocab::error::Result<_>>()?;
    let latents = (Tensor::cat(&noise, 0)? * scheduler.init_noise_sigma())?;
    let backends = sd.in_process_backends(setting.servers);
    let (final_latents, seen_all) = run_generation(
        sd,
        setting,
        &backends,
        scheduler.as_mut(),
        latents,
        &conditioning,
    )?;
    let Captured {
        sent: captured,
        replies,
        strips,
    } = seen_all;
    // Group what was seen by step, then reduce each step's sights to features.
    let mut by_step: BTreeMap<u64, StepSeen<'_>> = BTreeMap::new();
    for v in &captured {
        by_step.entry(v.0.call).or_default().0.push(v);
    }
    for r in &replies {
        by_step.entry(r.call).or_default().1.push(r);
    }
    let n = setting.servers;
    let mut feats: Vec<Vec<Seen1>> = vec![vec![Seen1::default(); n]; b];
    for (cap, rep) in by_step.values() {
        let seen = Seen {
            captured: cap,
            replies: rep,
            strips: &strips,
        };
        let per_item = sights(setting, &seen, n, b, (c, h, w))?;
        for (item, servers) in per_item.iter().enumerate() {
            for (s, sight) in servers.iter().enumerate() {
                append_step(&mut feats[item][s], sight);
            }
        }
    }
    let mut out = Vec::with_capacity(b);
    for (i, servers) in feats.into_iter().enumerate() {
        let latent = final_latents
            .narrow(0, i, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        out.push(Generation {
            scene: captions[i].0.clone(),
            picture: decode(sd, &latent)?,
            latent,
            servers,
        });
    }
    Ok(out)
}

/// One step's sight appended to a server's features of one generation (steps in order).
fn append_step(acc: &mut Seen1, sight: &ServerSight) {
    let rows = sight_rows(sight);
    acc.strip = sight.strip.clone();
    acc.own.extend_from_slice(&rows);
    acc.view.extend(rows);
    acc.view.extend(view_extras(sight, ViewParts::All));
    acc.last = sight.latent_rows().0;
}

/// What the servers were sent and returned in one step.
type StepSeen<'a> = (Vec<&'a (View, Tensor)>, Vec<&'a CapturedReply<Tensor>>);

/// The whole denoise loop (the one every generation runs) under `setting` with every step
/// captured: the final latents and what the servers saw.
fn run_generation(
    sd: &StableDiffusion,
    setting: &Setting,
    backends: &[Arc<dyn veil_core::placement::ShardBackend<Tensor>>],
    scheduler: &mut (dyn veil_core::model::scheduler::Scheduler + Send),
    latents: Tensor,
    conditioning: &Conditioning,
) -> Result<(Tensor, Captured)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| AttackError::Setup(e.to_string()))?;
    let total = scheduler.timesteps().len();
    rt.block_on(run_captured(sd, setting, backends, async |runners| {
        let mut progress = |_: veil_core::client::denoise::Progress<'_>| {};
        let hooks = LoopHooks {
            cancelled: &|| false,
            progress: &mut progress,
        };
        let report = denoise(
            &sd.unet,
            runners,
            scheduler,
            latents,
            0..total,
            conditioning,
            hooks,
        )
        .await?;
        Ok(report.latents)
    }))
}

/// Standardises columns by the training rows' mean and spread (a constant column keeps scale
/// 1), so the ridge penalty weighs the rows, the moments and the streams alike.
fn standardise(train: &mut [Vec<f32>], test: &mut [Vec<f32>]) {
    let d = train.first().map_or(0, Vec::len);
    let n = train.len().max(1) as f64;
    for j in 0..d {
        let mean = train.iter().map(|r| r[j] as f64).sum::<f64>() / n;
        let var = train
            .iter()
            .map(|r| (r[j] as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        let sd = if var > 1e-12 { var.sqrt() } else { 1.0 };
        for r in train.iter_mut().chain(test.iter_mut()) {
            if let Some(v) = r.get_mut(j) {
                *v = ((*v as f64 - mean) / sd) as f32;
            }
        }
    }
}

/// Squared error and pixel count over every pixel of `g`'s picture outside the rows its
/// server knows (its strip and one halo row per side, at the latent resolution `rows`), or
/// over the whole picture where it holds every row.
fn outside_error(
    g: &Generation,
    guess: &Picture,
    strip: &Range<usize>,
    rows: usize,
) -> (f64, usize) {
    let (h, w) = (g.picture.height, g.picture.width);
    // One server holding every row (N = 1, the ceiling) is scored on the whole picture.
    let known = match strip.len() >= rows {
        true => 0..0,
        false => known_pixel_rows(strip, rows, h / rows.max(1)),
    };
    let plane = h * w;
    let (mut se, mut n) = (0f64, 0usize);
    for y in (0..h).filter(|y| !known.contains(y)) {
        for x in 0..w {
            for c in 0..3 {
                let i = c * plane + y * w + x;
                if let (Some(a), Some(b)) = (g.picture.data.get(i), guess.data.get(i)) {
                    se += (*a as f64 - *b as f64).powi(2);
                    n += 1;
                }
            }
        }
    }
    (se, n)
}

/// Image PSNR outside the strip, prompt slot accuracy, and the feature count of one family
/// (features `pick` of each generation, correcting the latent `base`) fitted on `train`,
/// scored on `test`.
fn family(
    sd: &StableDiffusion,
    strip: &Range<usize>,
    train: &[Generation],
    test: &[Generation],
    pick: &dyn Fn(&Generation) -> Vec<f32>,
    base: &dyn Fn(&Generation) -> Vec<f32>,
) -> Result<(Option<f64>, Option<f64>, usize)> {
    let (_, rows, _) = latent_dims(sd);
    let n_latent = train.first().map_or(0, |g| g.latent.len());
    let y: Vec<Vec<f32>> = train
        .iter()
        .map(|g| {
            let base = base(g);
            let mut t: Vec<f32> = g.latent.iter().zip(&base).map(|(a, b)| a - b).collect();
            t.extend(slot_targets(&g.scene));
            t
        })
        .collect();
    let mut x: Vec<Vec<f32>> = train.iter().map(pick).collect();
    let mut xt: Vec<Vec<f32>> = test.iter().map(pick).collect();
    standardise(&mut x, &mut xt);
    let d = x.first().map_or(0, Vec::len);
    let pred = Linear::fit(&x, &y)?.predict(&xt)?;
    let (mut se, mut px, mut right) = (0f64, 0usize, 0usize);
    for (g, p) in test.iter().zip(&pred) {
        let lat: Vec<f32> = p.iter().zip(base(g)).map(|(a, b)| a + b).collect();
        let guess = decode(sd, &lat)?;
        let (e, k) = outside_error(g, &guess, strip, rows);
        se += e;
        px += k;
        let scene = slot_scene(p.get(n_latent..).unwrap_or(&[]));
        right += slots_right(&g.scene, scene.as_ref());
    }
    let words = (!test.is_empty()).then(|| right as f64 / (5 * test.len()) as f64);
    Ok((pooled_psnr(se, px), words, d))
}

/// The families of every server of one setting, fitted on `train`, scored on `test`.
fn attack(
    sd: &StableDiffusion,
    setting: &Setting,
    train: &[Generation],
    test: &[Generation],
) -> Result<Vec<GenerationRow>> {
    let pictures: Vec<Picture> = train.iter().map(|g| g.picture.clone()).collect();
    let mean = crate::metrics::mean_picture(&pictures)
        .ok_or_else(|| AttackError::Setup("no training generations".into()))?;
    let (_, latent_rows, _) = latent_dims(sd);
    let mut rows = Vec::new();
    for s in 0..setting.servers {
        let strip = test
            .first()
            .and_then(|g| g.servers.get(s))
            .map_or(0..0, |v| v.strip.clone());
        let part = |g: &Generation, f: fn(&Seen1) -> &Vec<f32>| {
            g.servers.get(s).map_or(Vec::new(), |v| f(v).clone())
        };
        let own = |g: &Generation| part(g, |v| &v.own);
        let view = |g: &Generation| part(g, |v| &v.view);
        let last = |g: &Generation| {
            let v = part(g, |v| &v.last);
            match v.len() == g.latent.len() {
                true => v,
                false => vec![0.0; g.latent.len()],
            }
        };
        let (c_psnr, c_words, c_d) = family(sd, &strip, train, test, &own, &last)?;
        let (a_psnr, a_words, a_d) = family(sd, &strip, train, test, &view, &last)?;
        let (mut se, mut px) = (0f64, 0usize);
        for g in test {
            let (e, k) = outside_error(g, &mean, &strip, latent_rows);
            se += e;
            px += k;
        }
        rows.push(GenerationRow {
            policy: setting.policy.name().to_string(),
            servers: setting.servers,
            server: s,
            holds: match setting.halves_of(s) {
                (true, true) => "both halves",
                (false, true) => "conditional half",
                _ => "unconditional half",
            }
            .to_string(),
            strip: [strip.start, strip.end],
            view_features: a_d,
            control_features: c_d,
            mean_picture_psnr_outside: pooled_psnr(se, px),
            control_psnr_outside: c_psnr,
            attack_psnr_outside: a_psnr,
            control_word_accuracy: c_words,
            attack_word_accuracy: a_words,
        });
    }
    Ok(rows)
}

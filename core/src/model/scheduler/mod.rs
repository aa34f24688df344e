//! Diffusers-compatible noise schedulers: DDIM (eta = 0), DPM-Solver++ 2M, Euler, Euler
//! Ancestral and LCM, driven by a diffusers `scheduler_config.json`. The last two are
//! stochastic (fresh noise every step, from a [`StepNoise`]: see `noise`) and serve few-step
//! models (SD-Turbo / SDXL-Turbo with `trailing` spacing, LCM).
//!
//! The reference is diffusers itself (`DDIMScheduler`, `DPMSolverMultistepScheduler`,
//! `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `LCMScheduler`);
//! `core/tests/scheduler_golden.rs` replays loops recorded from it (the stochastic ones with
//! the noise diffusers drew).
//! Schedule arrays are f64; the sampling math on tensors is f32 (samples are upcast, and cast back
//! to their dtype on return).
//!
//! Two places deliberately reproduce diffusers' float32 rounding, because the difference is not
//! negligible: the training table `alphas_cumprod` (torch builds it in f32; recomputing it in
//! f64 moves the small sigmas by up to 1.3e-5 relative) and the per-step sigmas of DPM/Euler
//! (diffusers stores them as f32). Timestep rounding follows numpy exactly (round half to even,
//! numpy's `linspace`/`arange` arithmetic).
//!
//! Steps are addressed by their index in [`Scheduler::timesteps`], not by timestep value, so a
//! schedule with repeated timesteps (possible with `leading` spacing and many steps) is walked
//! in order; diffusers' value lookup would pick the second occurrence instead.
//!
//! One deliberate deviation: with `trailing` spacing numpy's float `arange` sometimes returns
//! n + 1 values (n = 61, 103, 121, ... for 1000 training steps); diffusers keeps the extra one as
//! timestep -1, which DDIM then reads as `alphas_cumprod[-1]`, the *noisiest* entry. Veil keeps
//! exactly n timesteps. diffusers' quirks that are well defined are kept, e.g. DDIM always
//! steps back by `num_train_timesteps / n`, even with trailing/linspace spacing.
//!
//! This file holds what the samplers share: the config and its validation, the [`Scheduler`]
//! trait, [`new_scheduler`], the numpy-exact schedule helpers and the f32 tensor arithmetic.
//! Each sampler lives in its own file (`ddim`, `dpm_solver`, `euler`, `euler_ancestral`,
//! `lcm`); the step noise of the stochastic ones in `noise`.

mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod lcm;
mod noise;

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Deserializer};

use crate::vocab::error::{Error, Result};

pub use ddim::DdimScheduler;
pub use dpm_solver::DpmSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use lcm::LcmScheduler;
pub use noise::{seeded_normal, ReplayStepNoise, SeededStepNoise, StepNoise};

/// How betas are laid out over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    #[default]
    Linear,
    /// Linear in sqrt(beta): the schedule of every Stable Diffusion checkpoint.
    ScaledLinear,
    /// The GLIDE cosine schedule (betas capped at 0.999).
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// What the U-Net predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise (SD 1.x, SD 2.x base).
    #[default]
    Epsilon,
    /// The velocity alpha * noise - sigma * x0 (SD 2.x 768).
    VPrediction,
    /// The clean sample x0.
    Sample,
}

/// How the inference timesteps are picked from the training range (table 2 of
/// "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// A diffusers `scheduler_config.json`. Missing fields take diffusers' defaults; fields Veil does
/// not know are ignored (SD configs carry PNDM-only keys such as `skip_prk_steps`). The beta
/// defaults are DDIM's/Euler's/DPM's; `LCMScheduler`'s differ (scaled_linear 0.00085..0.012),
/// which matters only for a config that leaves them out (no diffusers-written config does).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Explicit betas; when present they replace `beta_start`/`beta_end`/`beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    /// DDIM only: use alpha_cumprod = 1 after the last step instead of alphas_cumprod[0].
    pub set_alpha_to_one: bool,
    /// Added to `leading` timesteps (1 for Stable Diffusion).
    pub steps_offset: usize,
    /// `None` means the scheduler's own diffusers default: `leading` for DDIM, `linspace` for
    /// DPM-Solver++ and both Eulers (LCM ignores it). SD 1.5/2.1 configs do not set it, so the
    /// default matters.
    pub timestep_spacing: Option<TimestepSpacing>,
    /// DDIM and LCM: clamp the predicted x0 to `±clip_sample_range`. `None` means the
    /// scheduler's diffusers default (DDIM true, LCM false; SD configs set false).
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    /// DPM-Solver++ only: drop the tail of the schedule whose log-SNR is below this value.
    #[serde(deserialize_with = "lenient_f64")]
    pub lambda_min_clipped: f64,
    /// LCM only: the length of the distillation schedule its timesteps are picked from.
    pub original_inference_steps: usize,
    /// LCM only: the timestep scale of the boundary-condition scalings c_skip and c_out.
    pub timestep_scaling: f64,
    /// diffusers options that change the math and that Veil does not implement. They are parsed
    /// only so that a config asking for one fails loudly instead of sampling differently.
    #[serde(flatten)]
    pub advanced: AdvancedOptions,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            set_alpha_to_one: true,
            steps_offset: 0,
            timestep_spacing: None,
            clip_sample: None,
            clip_sample_range: 1.0,
            lambda_min_clipped: f64::NEG_INFINITY,
            original_inference_steps: 50,
            timestep_scaling: 10.0,
            advanced: AdvancedOptions::default(),
        }
    }
}

/// diffusers options outside what Veil implements. Defaults are the supported values; anything
/// else makes [`new_scheduler`] return [`Error::Unsupported`] for a scheduler that reads it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct AdvancedOptions {
    pub thresholding: bool,
    pub rescale_betas_zero_snr: bool,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub algorithm_type: Option<String>,
    pub solver_order: Option<usize>,
    pub solver_type: Option<String>,
    pub final_sigmas_type: Option<String>,
    pub variance_type: Option<String>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
}

/// Accepts a number, `null` (the default, -inf), or the strings that [`sanitize_json`] makes of
/// Python's bare `Infinity`/`-Infinity`/`NaN`.
fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        F(f64),
        S(String),
    }
    match Option::<Num>::deserialize(d)? {
        None => Ok(f64::NEG_INFINITY),
        Some(Num::F(v)) => Ok(v),
        Some(Num::S(s)) => match s.as_str() {
            "-Infinity" => Ok(f64::NEG_INFINITY),
            "Infinity" => Ok(f64::INFINITY),
            "NaN" => Ok(f64::NAN),
            other => other.parse().map_err(serde::de::Error::custom),
        },
    }
}

/// diffusers writes configs with Python's `json`, which emits bare `Infinity`, `-Infinity` and
/// `NaN` (e.g. `"lambda_min_clipped": -Infinity` in DPM-Solver configs). Those are not JSON, so
/// quote them before parsing.
fn sanitize_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        } else if let Some(tok) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push('"');
            out.push_str(tok);
            out.push('"');
            rest = &rest[tok.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

impl SchedulerConfig {
    /// Reads a diffusers `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                what: "scheduler config (diffusers scheduler/scheduler_config.json)".into(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| Error::Config {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses the text of a `scheduler_config.json` (errors name the path as `<inline json>`).
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::parse(text).map_err(|message| Error::Config {
            path: "<inline json>".into(),
            message,
        })
    }

    fn parse(text: &str) -> std::result::Result<Self, String> {
        let config: Self = serde_json::from_str(&sanitize_json(text)).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.num_train_timesteps == 0 {
            return Err("num_train_timesteps must be at least 1".into());
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != self.num_train_timesteps {
                return Err(format!(
                    "trained_betas has {} values but num_train_timesteps is {}",
                    betas.len(),
                    self.num_train_timesteps
                ));
            }
        }
        if self.clip_sample_range.is_nan() || self.clip_sample_range <= 0.0 {
            return Err(format!(
                "clip_sample_range must be > 0, got {}",
                self.clip_sample_range
            ));
        }
        Ok(())
    }

    /// The spacing `kind` uses: the configured one, or that scheduler's diffusers default
    /// (LCM's is `leading`, but LCM picks its timesteps its own way and never reads it).
    pub fn spacing_for(&self, kind: SchedulerKind) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(match kind {
            SchedulerKind::Ddim | SchedulerKind::Lcm => TimestepSpacing::Leading,
            SchedulerKind::DpmSolverMultistep
            | SchedulerKind::EulerDiscrete
            | SchedulerKind::EulerAncestral => TimestepSpacing::Linspace,
        })
    }

    /// Whether `kind` clamps its x0 prediction: the configured `clip_sample`, or that
    /// scheduler's diffusers default (true for DDIM, false for LCM; the others never clip).
    pub fn clip_for(&self, kind: SchedulerKind) -> bool {
        match kind {
            SchedulerKind::Ddim => self.clip_sample.unwrap_or(true),
            SchedulerKind::Lcm => self.clip_sample.unwrap_or(false),
            _ => false,
        }
    }

    /// Rejects the options `kind` would read but Veil does not implement.
    fn check_supported(&self, kind: SchedulerKind) -> Result<()> {
        let a = &self.advanced;
        let mut bad: Vec<String> = Vec::new();
        if a.rescale_betas_zero_snr {
            bad.push("rescale_betas_zero_snr".into());
        }
        let dpm = kind == SchedulerKind::DpmSolverMultistep;
        let euler = kind == SchedulerKind::EulerDiscrete;
        // The Euler samplers do not read `thresholding`.
        if a.thresholding
            && !matches!(
                kind,
                SchedulerKind::EulerDiscrete | SchedulerKind::EulerAncestral
            )
        {
            bad.push("thresholding".into());
        }
        if dpm || euler {
            for (name, v) in [
                ("use_karras_sigmas", a.use_karras_sigmas),
                ("use_exponential_sigmas", a.use_exponential_sigmas),
                ("use_beta_sigmas", a.use_beta_sigmas),
            ] {
                if v == Some(true) {
                    bad.push(name.into());
                }
            }
            if let Some(t) = a.final_sigmas_type.as_deref().filter(|t| *t != "zero") {
                bad.push(format!("final_sigmas_type {t:?}"));
            }
        }
        if dpm {
            for (name, v) in [
                ("use_lu_lambdas", a.use_lu_lambdas),
                ("use_flow_sigmas", a.use_flow_sigmas),
            ] {
                if v == Some(true) {
                    bad.push(name.into());
                }
            }
            // diffusers itself maps "deis" to dpmsolver++ and logrho/bh1/bh2 to midpoint.
            if let Some(t) = a
                .algorithm_type
                .as_deref()
                .filter(|t| !matches!(*t, "dpmsolver++" | "deis"))
            {
                bad.push(format!("algorithm_type {t:?}"));
            }
            if let Some(o) = a.solver_order.filter(|o| *o != 2) {
                bad.push(format!("solver_order {o}"));
            }
            if let Some(t) = a
                .solver_type
                .as_deref()
                .filter(|t| !matches!(*t, "midpoint" | "logrho" | "bh1" | "bh2"))
            {
                bad.push(format!("solver_type {t:?}"));
            }
            if let Some(t) = a.variance_type.as_deref() {
                bad.push(format!("variance_type {t:?}"));
            }
        }
        if euler {
            if let Some(t) = a.interpolation_type.as_deref().filter(|t| *t != "linear") {
                bad.push(format!("interpolation_type {t:?}"));
            }
            if a.timestep_type.as_deref() == Some("continuous")
                && self.prediction_type == PredictionType::VPrediction
            {
                bad.push("timestep_type \"continuous\" with v_prediction".into());
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "{kind} scheduler option(s): {}",
                bad.join(", ")
            )))
        }
    }

    /// What every sampler's constructor starts with: rejects options `kind` does not implement
    /// and step counts outside the training range, then builds `alphas_cumprod`.
    fn prepare(&self, kind: SchedulerKind, num_inference_steps: usize) -> Result<Vec<f64>> {
        self.check_supported(kind)?;
        check_steps(self, num_inference_steps)?;
        self.alphas_cumprod()
    }

    /// `alphas_cumprod` as diffusers builds it: betas and alphas in f32, the running product
    /// accumulated in f64 (torch's CPU cumprod) and stored in f32. Returned widened to f64.
    pub fn alphas_cumprod(&self) -> Result<Vec<f64>> {
        self.validate().map_err(Error::InvalidArgument)?;
        let n = self.num_train_timesteps;
        let betas: Vec<f64> = match (&self.trained_betas, self.beta_schedule) {
            (Some(b), _) => b.clone(),
            (None, BetaSchedule::Linear) => np_linspace(self.beta_start, self.beta_end, n),
            (None, BetaSchedule::ScaledLinear) => {
                np_linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            (None, BetaSchedule::SquaredcosCapV2) => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                    })
                    .collect()
            }
        };
        let mut acc = 1.0f64;
        let mut out = Vec::with_capacity(n);
        for (t, &beta) in betas.iter().enumerate() {
            let alpha = 1.0f32 - beta as f32;
            if alpha.is_nan() || alpha <= 0.0 || alpha > 1.0 {
                return Err(Error::InvalidArgument(format!(
                    "beta at training timestep {t} is {beta}, outside [0, 1)"
                )));
            }
            acc *= f64::from(alpha);
            out.push(f64::from(acc as f32));
        }
        if out.last().is_some_and(|&a| a <= 0.0) {
            return Err(Error::InvalidArgument(
                "alphas_cumprod underflows to 0 in f32; the beta schedule is too aggressive".into(),
            ));
        }
        Ok(out)
    }
}

pub use crate::vocab::job::SchedulerKind;

/// A sampler over a fixed inference schedule. Steps are addressed by index into
/// [`Scheduler::timesteps`]; call them in order (DPM-Solver++ keeps the previous model output).
/// The stochastic samplers (Euler Ancestral, LCM) draw step `i`'s fresh noise from the
/// [`StepNoise`] they own, by index: `step` keeps its signature, and a generation keys that
/// noise by its initial noise (`set_step_noise`), a golden test replays diffusers' own.
pub trait Scheduler: Send {
    fn kind(&self) -> SchedulerKind;
    /// The timestep the U-Net is conditioned on at each step (integral for DDIM/DPM; Euler's
    /// `linspace` timesteps can be fractional, e.g. 499.5).
    fn timesteps(&self) -> &[f64];
    /// Scale for unit-variance starting noise: 1 for DDIM/DPM, the largest sigma for Euler.
    /// The default is the variance-preserving samplers' 1.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// What the U-Net sees at `step_index` (Euler divides by sqrt(sigma^2 + 1); others pass
    /// through). The default is the variance-preserving samplers' pass-through.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(self, step_index)?;
        Ok(sample.clone())
    }
    /// Whether `step` adds fresh noise (drawn from its [`StepNoise`]).
    fn is_stochastic(&self) -> bool {
        false
    }
    /// Where a stochastic sampler draws its step noise from; deterministic ones ignore it.
    fn set_step_noise(&mut self, noise: Box<dyn StepNoise>) {
        let _ = noise;
    }
    /// One denoising step: from the sample at `step_index` to the next one.
    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor)
        -> Result<Tensor>;
    /// Noise a clean sample to the noise level of `step_index` (img2img's starting point).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;
    /// Number of denoising steps, i.e. `timesteps().len()`.
    fn len(&self) -> usize {
        self.timesteps().len()
    }
    fn is_empty(&self) -> bool {
        self.timesteps().is_empty()
    }
}

/// Builds the scheduler `kind` for `num_inference_steps` steps.
pub fn new_scheduler(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler + Send>> {
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(config, num_inference_steps)?),
        SchedulerKind::DpmSolverMultistep => Box::new(DpmSolverMultistepScheduler::new(
            config,
            num_inference_steps,
        )?),
        SchedulerKind::EulerDiscrete => {
            Box::new(EulerDiscreteScheduler::new(config, num_inference_steps)?)
        }
        SchedulerKind::EulerAncestral => Box::new(EulerAncestralDiscreteScheduler::new(
            config,
            num_inference_steps,
        )?),
        SchedulerKind::Lcm => Box::new(LcmScheduler::new(config, num_inference_steps)?),
    })
}

/// [`new_scheduler`] with a stochastic sampler's step noise keyed by the generation's initial
/// noise (before `init_noise_sigma`), so every party that runs a step of it draws the same.
pub fn new_seeded_scheduler(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
    initial_noise: &Tensor,
) -> Result<Box<dyn Scheduler + Send>> {
    let mut s = new_scheduler(kind, config, num_inference_steps)?;
    key_step_noise(s.as_mut(), initial_noise)?;
    Ok(s)
}

/// Keys a stochastic sampler's step noise by `key` (the tensor every party that runs a step
/// holds: the initial noise, or image-to-image's noised init latents); nothing for the others.
pub fn key_step_noise(s: &mut (dyn Scheduler + Send), key: &Tensor) -> Result<()> {
    if s.is_stochastic() {
        s.set_step_noise(Box::new(SeededStepNoise::keyed_by(key)?));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// numpy-exact helpers: timestep rounding decides which training timestep is used, so these copy
// numpy's arithmetic rather than the textbook formula.

/// `np.linspace(start, stop, num)`: `i * step + start`, last element pinned to `stop`.
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = v.last_mut() {
        *last = stop;
    }
    v
}

/// `np.arange(start, stop, step)` for floats: length `ceil((stop - start) / step)`, values
/// `start + i * delta` with `delta = (start + step) - start`, as numpy fills them.
fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, arange(fp.len()), fp)`.
fn np_interp_index(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j];
    }
    (fp[j + 1] - fp[j]) * (x - j as f64) + fp[j]
}

/// `trailing` spacing: `round(arange(start, 0, -n_train / n)) - 1`. numpy's float `arange`
/// sometimes yields n + 1 elements (n = 61, 103, ... for 1000 training steps); diffusers keeps the
/// extra one as timestep -1. We keep at most `n`: see the module docs.
fn trailing(start: usize, n_train: usize, n: usize) -> Vec<f64> {
    let mut v: Vec<f64> = np_arange(start as f64, 0.0, -(n_train as f64 / n as f64))
        .into_iter()
        .map(|t| t.round_ties_even() - 1.0)
        .collect();
    v.truncate(n);
    v
}

/// Rounds to f32 and back, where diffusers stores a value in float32.
fn f32r(x: f64) -> f64 {
    f64::from(x as f32)
}

fn check_steps(config: &SchedulerConfig, n: usize) -> Result<()> {
    if n == 0 || n > config.num_train_timesteps {
        return Err(Error::InvalidArgument(format!(
            "num_inference_steps must be in 1..={}, got {n}",
            config.num_train_timesteps
        )));
    }
    Ok(())
}

fn check_index<S: Scheduler + ?Sized>(scheduler: &S, step_index: usize) -> Result<()> {
    let len = scheduler.len();
    if step_index >= len {
        return Err(Error::InvalidArgument(format!(
            "{}: step_index {step_index} out of range for {len} steps",
            scheduler.kind()
        )));
    }
    Ok(())
}

/// `sum(c_i * t_i)` in f32.
fn lincomb(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for (c, t) in terms {
        let term = if *c == 1.0 {
            (*t).clone()
        } else {
            t.affine(*c, 0.0)?
        };
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    acc.ok_or_else(|| Error::InvalidArgument("empty linear combination".into()))
}

/// `x / d` as a true division (not a multiplication by 1/d), like torch's tensor / scalar.
fn div_scalar(x: &Tensor, d: f32) -> Result<Tensor> {
    let d = Tensor::new(d, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&d)?)
}

/// Runs one step's math in f32: `update(model_output, sample)` on both upcast, the result cast
/// back to the sample's dtype (every sampler computes in f32 whatever the caller's dtype).
fn step_in_f32(
    model_output: &Tensor,
    sample: &Tensor,
    update: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let m = model_output.to_dtype(DType::F32)?;
    let x = sample.to_dtype(DType::F32)?;
    Ok(update(&m, &x)?.to_dtype(sample.dtype())?)
}

/// `signal * original + noise_scale * noise` in f32, cast back to the original's dtype: every
/// sampler's `add_noise`, which differ only in the two coefficients of the step.
fn noised(original: &Tensor, noise: &Tensor, signal: f64, noise_scale: f64) -> Result<Tensor> {
    let x = original.to_dtype(DType::F32)?;
    let n = noise.to_dtype(DType::F32)?;
    Ok(lincomb(&[(signal, &x), (noise_scale, &n)])?.to_dtype(original.dtype())?)
}

/// `leading` spacing on integer timesteps: `i * ratio + steps_offset` for `steps` high to low.
fn leading(ratio: usize, steps: impl DoubleEndedIterator<Item = usize>, offset: usize) -> Vec<f64> {
    steps.rev().map(|i| (i * ratio + offset) as f64).collect()
}

/// Per-step sigmas followed by the final sigma 0, as f32: the training sigmas
/// `sqrt((1 - a) / a)` (rounded to f32 like diffusers' table) interpolated at the timesteps.
fn step_sigmas(timesteps: &[f64], alphas_cumprod: &[f64]) -> Vec<f64> {
    let table: Vec<f64> = alphas_cumprod
        .iter()
        .map(|&a| f32r(((1.0 - a) / a).sqrt()))
        .collect();
    timesteps
        .iter()
        .map(|&t| f32r(np_interp_index(t, &table)))
        .chain(std::iter::once(0.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 3), vec![0.0, 499.5, 999.0]);
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 3.0).len(), 3);
        // numpy's float arange yields an extra, near-zero element here.
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(trailing(1000, 1000, 61).len(), 61);
        assert_eq!(np_interp_index(1.5, &[0.0, 1.0, 3.0]), 2.0);
        assert_eq!(np_interp_index(-1.0, &[5.0, 1.0]), 5.0);
        assert_eq!(499.5f64.round_ties_even(), 500.0);
    }

    #[test]
    fn config_parsing() -> Result<()> {
        let c = SchedulerConfig::from_json_str(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "scaled_linear",
                "lambda_min_clipped": -Infinity, "note": "NaN inside a string", "sigma_max": null}"#,
        )?;
        assert_eq!(c.beta_schedule, BetaSchedule::ScaledLinear);
        assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
        assert_eq!(c.spacing_for(SchedulerKind::Ddim), TimestepSpacing::Leading);
        assert_eq!(
            c.spacing_for(SchedulerKind::EulerDiscrete),
            TimestepSpacing::Linspace
        );
        assert!(matches!(
            SchedulerConfig::from_json_str(r#"{"beta_schedule": "cubic"}"#),
            Err(Error::Config { .. })
        ));
        assert!(matches!(
            SchedulerConfig::from_file("/nonexistent/scheduler_config.json"),
            Err(Error::MissingFile { .. })
        ));
        let karras = SchedulerConfig::from_json_str(r#"{"use_karras_sigmas": true}"#)?;
        assert!(matches!(
            new_scheduler(SchedulerKind::EulerDiscrete, &karras, 10),
            Err(Error::Unsupported(_))
        ));
        // DDIM does not read use_karras_sigmas, as in diffusers.
        assert!(new_scheduler(SchedulerKind::Ddim, &karras, 10).is_ok());
        assert!(new_scheduler(SchedulerKind::Ddim, &SchedulerConfig::default(), 0).is_err());
        assert!(new_scheduler(SchedulerKind::Ddim, &SchedulerConfig::default(), 1001).is_err());
        let lcm = SchedulerConfig::from_json_str(
            r#"{"original_inference_steps": 8, "timestep_scaling": 5.0, "thresholding": false}"#,
        )?;
        assert_eq!(
            (lcm.original_inference_steps, lcm.timestep_scaling),
            (8, 5.0)
        );
        assert!(new_scheduler(SchedulerKind::Lcm, &lcm, 8)?.is_stochastic());
        assert!(new_scheduler(SchedulerKind::Lcm, &lcm, 9).is_err());
        let thresholding = SchedulerConfig::from_json_str(r#"{"thresholding": true}"#)?;
        assert!(matches!(
            new_scheduler(SchedulerKind::Lcm, &thresholding, 4),
            Err(Error::Unsupported(_))
        ));
        assert!(new_scheduler(SchedulerKind::EulerAncestral, &thresholding, 4).is_ok());
        let x0 = SchedulerConfig::from_json_str(r#"{"prediction_type": "sample"}"#)?;
        assert!(matches!(
            new_scheduler(SchedulerKind::EulerAncestral, &x0, 4),
            Err(Error::Unsupported(_))
        ));
        assert!(!new_scheduler(SchedulerKind::Ddim, &x0, 4)?.is_stochastic());
        Ok(())
    }
}

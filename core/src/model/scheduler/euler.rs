//! diffusers `EulerDiscreteScheduler` (deterministic Euler).

use candle_core::Tensor;

use super::{
    check_index, div_scalar, f32r, lincomb, noised, np_linspace, step_in_f32, step_sigmas,
    trailing, PredictionType, Scheduler, SchedulerConfig, SchedulerKind, TimestepSpacing,
};
use crate::vocab::error::Result;

/// diffusers `EulerDiscreteScheduler`: deterministic Euler (no churn), linear sigma
/// interpolation, no Karras sigmas. Works in the "variance exploding" parametrisation, hence
/// the input scaling and the large initial noise.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    timesteps: Vec<f64>,
    /// One per step plus the final 0.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction_type: PredictionType,
}

/// The sigma schedule every Euler sampler (`kind`) shares: (timesteps, the per-step sigmas
/// followed by the final 0, init_noise_sigma).
pub(super) fn euler_schedule(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    num_inference_steps: usize,
) -> Result<(Vec<f64>, Vec<f64>, f64)> {
    let alphas_cumprod = config.prepare(kind, num_inference_steps)?;
    let n_train = config.num_train_timesteps;
    let n = num_inference_steps;
    let spacing = config.spacing_for(kind);
    // Euler keeps float32 timesteps (linspace ones can be fractional).
    let timesteps: Vec<f64> = match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(f32r)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = n_train / n;
            (0..n)
                .rev()
                .map(|i| f32r((i * ratio) as f64) + f32r(config.steps_offset as f64))
                .collect()
        }
        TimestepSpacing::Trailing => trailing(n_train, n_train, n),
    };
    let sigmas = step_sigmas(&timesteps, &alphas_cumprod);
    let max_sigma = sigmas.iter().copied().fold(0.0, f64::max);
    // Leading spacing does not start at the top of the schedule, so diffusers uses the
    // variance of x_t = x0 + sigma * noise with unit-variance x0.
    let init_noise_sigma = match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
        TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
    };
    Ok((timesteps, sigmas, init_noise_sigma))
}

/// The Euler samplers' input scaling: `sample / sqrt(sigma^2 + 1)` with diffusers' f32 scalar.
pub(super) fn euler_scale(sample: &Tensor, sigma: f64) -> Result<Tensor> {
    let sigma = sigma as f32;
    div_scalar(sample, (sigma * sigma + 1.0).sqrt())
}

/// The data prediction x0 of the Euler samplers (f32 math on `m` and `x`).
pub(super) fn euler_x0(
    prediction_type: PredictionType,
    sigma: f64,
    m: &Tensor,
    x: &Tensor,
) -> Result<Tensor> {
    Ok(match prediction_type {
        PredictionType::Epsilon => lincomb(&[(1.0, x), (-sigma, m)])?,
        PredictionType::Sample => m.clone(),
        PredictionType::VPrediction => {
            // c_out * m + c_skip * x, with diffusers' f32 scalars.
            let s = sigma as f32;
            let s2 = s * s + 1.0;
            (m.affine(f64::from(-s / s2.sqrt()), 0.0)? + div_scalar(x, s2)?)?
        }
    })
}

impl EulerDiscreteScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let (timesteps, sigmas, init_noise_sigma) =
            euler_schedule(config, SchedulerKind::EulerDiscrete, num_inference_steps)?;
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction_type: config.prediction_type,
        })
    }

    /// The sigma of each step followed by the final 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The step in f32: the model output `m` and sample `x` to the previous sample.
    fn update(&self, step_index: usize, m: &Tensor, x: &Tensor) -> Result<Tensor> {
        let sigma = self.sigmas[step_index];
        let x0 = euler_x0(self.prediction_type, sigma, m, x)?;
        // The ODE derivative (x - x0) / sigma, integrated over d sigma. Kept in diffusers' f32
        // operation order (true division, f32 dt, x + d * dt): with a huge sigma_max (2e4 for
        // the cosine schedule) the update cancels catastrophically and any reordering moves
        // the result by ~1e-3 relative.
        let dt = f64::from(self.sigmas[step_index + 1] as f32 - sigma as f32);
        let derivative = div_scalar(&(x - &x0)?, sigma as f32)?;
        Ok((x + derivative.affine(dt, 0.0)?)?)
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerDiscrete
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(self, step_index)?;
        euler_scale(sample, self.sigmas[step_index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        check_index(self, step_index)?;
        step_in_f32(model_output, sample, |m, x| self.update(step_index, m, x))
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(self, step_index)?;
        noised(original, noise, 1.0, self.sigmas[step_index])
    }
}

//! diffusers `EulerAncestralDiscreteScheduler` (Euler with ancestral sampling: fresh noise at
//! every step). With `timestep_spacing = "trailing"` it is SD-Turbo's / SDXL-Turbo's sampler.

use candle_core::Tensor;

use super::euler::{euler_scale, euler_schedule, euler_x0};
use super::noise::{step_noise, SeededStepNoise, StepNoise};
use super::{
    check_index, div_scalar, noised, step_in_f32, PredictionType, Scheduler, SchedulerConfig,
    SchedulerKind,
};
use crate::vocab::error::{Error, Result};

/// diffusers `EulerAncestralDiscreteScheduler`: each step goes down to `sigma_down` along the
/// ODE and adds fresh noise of `sigma_up`, where `sigma_down^2 + sigma_up^2` is the next
/// sigma^2. Shares the timesteps, sigmas, input scaling and initial sigma of Euler.
pub struct EulerAncestralDiscreteScheduler {
    timesteps: Vec<f64>,
    /// One per step plus the final 0.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction_type: PredictionType,
    noise: Box<dyn StepNoise>,
}

impl std::fmt::Debug for EulerAncestralDiscreteScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EulerAncestralDiscreteScheduler")
            .field("timesteps", &self.timesteps)
            .field("sigmas", &self.sigmas)
            .field("init_noise_sigma", &self.init_noise_sigma)
            .field("prediction_type", &self.prediction_type)
            .finish_non_exhaustive()
    }
}

impl EulerAncestralDiscreteScheduler {
    /// Draws its step noise from `SeededStepNoise::new(0)` until `set_step_noise` says
    /// otherwise (a generation keys it by its initial noise).
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        if config.prediction_type == PredictionType::Sample {
            // diffusers raises NotImplementedError for it.
            return Err(Error::Unsupported(
                "euler-a scheduler with prediction_type \"sample\"".into(),
            ));
        }
        let (timesteps, sigmas, init_noise_sigma) =
            euler_schedule(config, SchedulerKind::EulerAncestral, num_inference_steps)?;
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction_type: config.prediction_type,
            noise: Box::new(SeededStepNoise::new(0)),
        })
    }

    /// The sigma of each step followed by the final 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// (sigma_up, sigma_down) from step `i`'s sigma to the next, in diffusers' f32 arithmetic.
    /// f32 rounding can make sigma_to^2 - sigma_up^2 a hair below 0 (diffusers then yields
    /// NaN); it is clamped to 0.
    fn up_down(&self, i: usize) -> (f32, f32) {
        let from = self.sigmas[i] as f32;
        let to = self.sigmas[i + 1] as f32;
        let (f2, t2) = (from * from, to * to);
        let up = (t2 * (f2 - t2) / f2).sqrt();
        let down = (t2 - up * up).max(0.0).sqrt();
        (up, down)
    }

    /// The step in f32: the model output `m` and sample `x` to the previous sample.
    fn update(&mut self, step_index: usize, m: &Tensor, x: &Tensor) -> Result<Tensor> {
        let sigma = self.sigmas[step_index];
        let x0 = euler_x0(self.prediction_type, sigma, m, x)?;
        let (up, down) = self.up_down(step_index);
        // diffusers' operation order, as in Euler: (x - x0) / sigma, f32 dt, x + d * dt.
        let dt = f64::from(down - sigma as f32);
        let derivative = div_scalar(&(x - &x0)?, sigma as f32)?;
        let prev = (x + derivative.affine(dt, 0.0)?)?;
        if up == 0.0 {
            // The last step (sigma_to = 0) adds nothing; diffusers draws and multiplies by 0.
            return Ok(prev);
        }
        let noise = step_noise(self.noise.as_mut(), step_index, x)?;
        Ok((prev + noise.affine(f64::from(up), 0.0)?)?)
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
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

    fn is_stochastic(&self) -> bool {
        true
    }

    fn set_step_noise(&mut self, noise: Box<dyn StepNoise>) {
        self.noise = noise;
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

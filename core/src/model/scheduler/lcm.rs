//! diffusers `LCMScheduler`: the Latent Consistency Model sampler (multistep consistency
//! sampling, 1 to 8 steps typically).

use candle_core::Tensor;

use super::noise::{step_noise, SeededStepNoise, StepNoise};
use super::{
    check_index, div_scalar, lincomb, noised, step_in_f32, PredictionType, Scheduler,
    SchedulerConfig, SchedulerKind,
};
use crate::vocab::error::{Error, Result};

/// The consistency models' sigma_data.
const SIGMA_DATA: f32 = 0.5;

/// diffusers `LCMScheduler`. Its timesteps are its own: `original_inference_steps` evenly
/// spaced training timesteps `k - 1, 2k - 1, ...` (k = num_train_timesteps /
/// original_inference_steps), of which `num_inference_steps` are picked at evenly spaced
/// indices from the top; `timestep_spacing` and `steps_offset` are not read. Each step maps the
/// sample to the consistency function's output `c_skip * x + c_out * x0` (the boundary
/// condition scalings at `timestep * timestep_scaling`), then re-noises it to the next timestep
/// with fresh noise, except after the last step.
pub struct LcmScheduler {
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    timestep_scaling: f64,
    prediction_type: PredictionType,
    clip: Option<f64>,
    noise: Box<dyn StepNoise>,
}

impl std::fmt::Debug for LcmScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LcmScheduler")
            .field("timesteps", &self.timesteps)
            .field("timestep_scaling", &self.timestep_scaling)
            .field("prediction_type", &self.prediction_type)
            .field("clip", &self.clip)
            .finish_non_exhaustive()
    }
}

/// LCM's inference timesteps (numpy-exact: `floor(linspace(0, len, n, endpoint=False))`
/// indexes the descending training schedule).
fn lcm_timesteps(n_train: usize, original_steps: usize, n: usize) -> Result<Vec<f64>> {
    if original_steps == 0 || original_steps > n_train {
        return Err(Error::InvalidArgument(format!(
            "lcm: original_inference_steps must be in 1..={n_train}, got {original_steps}"
        )));
    }
    if n > original_steps {
        return Err(Error::InvalidArgument(format!(
            "lcm: {n} steps is more than original_inference_steps ({original_steps}); the \
             schedule is a subset of those"
        )));
    }
    let k = n_train / original_steps;
    let origin: Vec<usize> = (1..=original_steps).rev().map(|i| i * k - 1).collect();
    let step = origin.len() as f64 / n as f64;
    Ok((0..n)
        .map(|i| origin[(i as f64 * step).floor() as usize] as f64)
        .collect())
}

impl LcmScheduler {
    /// Draws its step noise from `SeededStepNoise::new(0)` until `set_step_noise` says
    /// otherwise (a generation keys it by its initial noise).
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let alphas_cumprod = config.prepare(SchedulerKind::Lcm, num_inference_steps)?;
        let timesteps = lcm_timesteps(
            config.num_train_timesteps,
            config.original_inference_steps,
            num_inference_steps,
        )?;
        if !config.timestep_scaling.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "lcm: timestep_scaling must be finite, got {}",
                config.timestep_scaling
            )));
        }
        Ok(Self {
            alphas_cumprod,
            timesteps,
            timestep_scaling: config.timestep_scaling,
            prediction_type: config.prediction_type,
            clip: config
                .clip_for(SchedulerKind::Lcm)
                .then_some(config.clip_sample_range),
            noise: Box::new(SeededStepNoise::new(0)),
        })
    }

    /// (c_skip, c_out) at step `i`, in f32 like diffusers (the timestep is a torch integer
    /// tensor, so its scaled value and both scalings are float32).
    fn boundary_scalings(&self, i: usize) -> (f32, f32) {
        let scaled = self.timesteps[i] as f32 * self.timestep_scaling as f32;
        let d2 = SIGMA_DATA * SIGMA_DATA;
        let c_skip = d2 / (scaled * scaled + d2);
        let c_out = scaled / (scaled * scaled + d2).sqrt();
        (c_skip, c_out)
    }

    /// alpha_cumprod at step `i`'s timestep, as the f32 diffusers indexes.
    fn alpha(&self, i: usize) -> f32 {
        self.alphas_cumprod[self.timesteps[i] as usize] as f32
    }

    /// The step in f32: the model output `m` and sample `x` to the previous sample.
    fn update(&mut self, i: usize, m: &Tensor, x: &Tensor) -> Result<Tensor> {
        let a = self.alpha(i);
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => div_scalar(&lincomb(&[(1.0, x), (-f64::from(sb), m)])?, sa)?,
            PredictionType::Sample => m.clone(),
            PredictionType::VPrediction => lincomb(&[(f64::from(sa), x), (-f64::from(sb), m)])?,
        };
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        let (c_skip, c_out) = self.boundary_scalings(i);
        let denoised = lincomb(&[(f64::from(c_out), &x0), (f64::from(c_skip), x)])?;
        if i + 1 == self.timesteps.len() {
            // No noise after the last step (so none at all for one-step sampling).
            return Ok(denoised);
        }
        let a_prev = self.alpha(i + 1);
        let noise = step_noise(self.noise.as_mut(), i, x)?;
        lincomb(&[
            (f64::from(a_prev.sqrt()), &denoised),
            (f64::from((1.0 - a_prev).sqrt()), &noise),
        ])
    }
}

impl Scheduler for LcmScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Lcm
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
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

    /// diffusers' (DDPM's) `add_noise` at the step's timestep.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(self, step_index)?;
        let a = self.alphas_cumprod[self.timesteps[step_index] as usize];
        noised(original, noise, a.sqrt(), (1.0 - a).sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lcm_timesteps_match_diffusers() -> Result<()> {
        // LCMScheduler().set_timesteps(n) with 1000 training steps and 50 original steps.
        assert_eq!(
            lcm_timesteps(1000, 50, 4)?,
            vec![999.0, 759.0, 499.0, 259.0]
        );
        assert_eq!(lcm_timesteps(1000, 50, 1)?, vec![999.0]);
        assert_eq!(lcm_timesteps(1000, 50, 2)?, vec![999.0, 499.0]);
        assert!(lcm_timesteps(1000, 50, 51).is_err());
        assert!(lcm_timesteps(1000, 0, 1).is_err());
        assert!(lcm_timesteps(1000, 1001, 1).is_err());
        Ok(())
    }
}

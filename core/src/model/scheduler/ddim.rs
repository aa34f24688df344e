//! diffusers `DDIMScheduler` with eta = 0.

use candle_core::Tensor;

use super::{
    check_index, leading, lincomb, noised, np_linspace, step_in_f32, trailing, PredictionType,
    Scheduler, SchedulerConfig, SchedulerKind, TimestepSpacing,
};
use crate::vocab::error::{Error, Result};

/// diffusers `DDIMScheduler` with eta = 0: deterministic, the setting of the PPIDM paper.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    /// `num_train_timesteps / num_inference_steps`; diffusers steps back by this for every
    /// spacing, even where the next timestep is not exactly that far (trailing/linspace).
    stride: i64,
    prediction_type: PredictionType,
    clip: Option<f64>,
}

impl DdimScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let alphas_cumprod = config.prepare(SchedulerKind::Ddim, num_inference_steps)?;
        let n_train = config.num_train_timesteps;
        let n = num_inference_steps;
        let timesteps: Vec<f64> = match config.spacing_for(SchedulerKind::Ddim) {
            TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(f64::round_ties_even)
                .collect(),
            TimestepSpacing::Leading => leading(n_train / n, 0..n, config.steps_offset),
            TimestepSpacing::Trailing => trailing(n_train, n_train, n),
        };
        if let Some(t) = timesteps.iter().find(|&&t| t < 0.0 || t >= n_train as f64) {
            return Err(Error::InvalidArgument(format!(
                "ddim: timestep {t} outside the {n_train} training timesteps (steps_offset {} with {n} steps)",
                config.steps_offset
            )));
        }
        Ok(Self {
            final_alpha_cumprod: if config.set_alpha_to_one {
                1.0
            } else {
                alphas_cumprod[0]
            },
            alphas_cumprod,
            timesteps,
            stride: (n_train / n) as i64,
            prediction_type: config.prediction_type,
            clip: config
                .clip_for(SchedulerKind::Ddim)
                .then_some(config.clip_sample_range),
        })
    }

    /// (alpha_cumprod at the step's timestep, at the previous timestep).
    fn alphas(&self, step_index: usize) -> (f64, f64) {
        let t = self.timesteps[step_index] as i64;
        let prev = t - self.stride;
        let a_t = self.alphas_cumprod[t as usize];
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        (a_t, a_prev)
    }

    /// The step in f32: the model output `m` and sample `x` to the previous sample.
    fn update(&self, step_index: usize, m: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (a_t, a_prev) = self.alphas(step_index);
        let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let (x0, eps) = match self.prediction_type {
            PredictionType::Epsilon => (lincomb(&[(1.0 / sa, x), (-sb / sa, m)])?, m.clone()),
            PredictionType::Sample => (m.clone(), lincomb(&[(1.0 / sb, x), (-sa / sb, m)])?),
            PredictionType::VPrediction => (
                lincomb(&[(sa, x), (-sb, m)])?,
                lincomb(&[(sa, m), (sb, x)])?,
            ),
        };
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        lincomb(&[(a_prev.sqrt(), &x0), ((1.0 - a_prev).sqrt(), &eps)])
    }
}

impl Scheduler for DdimScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
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
        let a = self.alphas_cumprod[self.timesteps[step_index] as usize];
        noised(original, noise, a.sqrt(), (1.0 - a).sqrt())
    }
}

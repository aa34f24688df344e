//! diffusers `DPMSolverMultistepScheduler` (DPM-Solver++ 2M).

use candle_core::Tensor;

use super::{
    check_index, f32r, leading, lincomb, noised, np_linspace, step_in_f32, step_sigmas, trailing,
    PredictionType, Scheduler, SchedulerConfig, SchedulerKind, TimestepSpacing,
};
use crate::vocab::error::{Error, Result};

/// diffusers `DPMSolverMultistepScheduler` with its defaults: dpmsolver++, order 2, midpoint,
/// final sigma 0 (so the last step is first order), no Karras sigmas.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    timesteps: Vec<f64>,
    /// One per step plus the final 0.
    sigmas: Vec<f64>,
    prediction_type: PredictionType,
    /// The data prediction x0 of the last step taken, with its step index.
    previous: Option<(usize, Tensor)>,
}

/// (alpha_t, sigma_t, lambda_t) of the VP process at "sigma" = sigma_t / alpha_t.
fn vp(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let s = sigma * alpha;
    (alpha, s, alpha.ln() - s.ln())
}

impl DpmSolverMultistepScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let alphas_cumprod =
            config.prepare(SchedulerKind::DpmSolverMultistep, num_inference_steps)?;
        let n_train = config.num_train_timesteps;
        let n = num_inference_steps;
        // lambda_min_clipped: drop the training timesteps whose log-SNR lies below it.
        let clipped = alphas_cumprod
            .iter()
            .filter(|&&a| {
                let lambda = f32r(0.5 * a.ln() - 0.5 * (1.0 - a).ln());
                lambda < config.lambda_min_clipped
            })
            .count();
        let last = n_train - clipped;
        let timesteps: Vec<f64> = match config.spacing_for(SchedulerKind::DpmSolverMultistep) {
            TimestepSpacing::Linspace => np_linspace(0.0, last as f64 - 1.0, n + 1)
                .into_iter()
                .skip(1)
                .rev()
                .map(f64::round_ties_even)
                .collect(),
            TimestepSpacing::Leading => leading(last / (n + 1), 1..=n, config.steps_offset),
            TimestepSpacing::Trailing => trailing(last, n_train, n),
        };
        if timesteps.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "dpm++2m: lambda_min_clipped {} leaves no timesteps",
                config.lambda_min_clipped
            )));
        }
        let sigmas = step_sigmas(&timesteps, &alphas_cumprod);
        Ok(Self {
            timesteps,
            sigmas,
            prediction_type: config.prediction_type,
            previous: None,
        })
    }

    /// The sigma of each step followed by the final 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The step in f32: the model output `m` and sample `x` to the previous sample. Keeps this
    /// step's data prediction for the next step's second-order update.
    fn update(&mut self, step_index: usize, m: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (alpha_s0, sigma_s0, lambda_s0) = vp(self.sigmas[step_index]);
        // DPM-Solver++ integrates the data prediction x0.
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => lincomb(&[(1.0 / alpha_s0, x), (-sigma_s0 / alpha_s0, m)])?,
            PredictionType::Sample => m.clone(),
            PredictionType::VPrediction => lincomb(&[(alpha_s0, x), (-sigma_s0, m)])?,
        };
        let sigma_next = self.sigmas[step_index + 1];
        let (alpha_t, sigma_t, lambda_t) = vp(sigma_next);
        // h = inf at the final sigma 0: exp(-h) = 0 and the step lands exactly on x0.
        let h = lambda_t - lambda_s0;
        let c = alpha_t * -(-h).exp_m1();
        let ratio = sigma_t / sigma_s0;
        let is_last = step_index + 1 == self.timesteps.len();
        let previous = match self.previous.take() {
            Some((i, m1)) if i + 1 == step_index && !is_last => Some(m1),
            _ => None,
        };
        let prev = match previous {
            // First order (DPM-Solver++ 1 = DDIM): the first step, and the last step because the
            // final sigma is 0 (diffusers' lower_order_final).
            None => lincomb(&[(ratio, x), (c, &x0)])?,
            // Second order, midpoint: D1 = (m0 - m1) / r0 with r0 = h_0 / h.
            Some(m1) => {
                let (_, _, lambda_s1) = vp(self.sigmas[step_index - 1]);
                let r0 = (lambda_s0 - lambda_s1) / h;
                lincomb(&[
                    (ratio, x),
                    (c * (1.0 + 0.5 / r0), &x0),
                    (-0.5 * c / r0, &m1),
                ])?
            }
        };
        self.previous = Some((step_index, x0));
        Ok(prev)
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmSolverMultistep
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
        let (alpha, sigma, _) = vp(self.sigmas[step_index]);
        noised(original, noise, alpha, sigma)
    }
}

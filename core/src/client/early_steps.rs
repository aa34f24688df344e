//! The server's side of the `obfuscated` policy: a server that holds the whole model runs the
//! first k denoising steps of all K candidate prompts in one guided batch, through the same
//! denoise loop as every other generation (`denoise::denoise`), and answers with K latents.
//! Image-to-image (`EarlySteps::start_step`), the candidates start from the noised init latents
//! the phone sent, at that step of the schedule.
//! `early_steps_flops` gives the same job's cost from shapes alone, by the same batching rule.

use candle_core::{DType, Tensor};

use crate::client::denoise::{denoise, LoopHooks, Progress, Runners};
use crate::client::pipeline::StableDiffusion;
use crate::client::plan::{account_step, PlanInput};
use crate::model::scheduler::new_seeded_scheduler;
use crate::model::unet::UNet;
use crate::placement::accounting::Accounting;
use crate::placement::policy::Policy;
use crate::placement::runtime::Runtime;
use crate::placement::runtime::DEFAULT_ATTENTION_CHUNK;
use crate::vocab::error::{Error, Result};
use crate::vocab::job::{
    Accelerations, EarlySteps, EarlyStepsRunner, EARLY_STEPS_ATTENTION_BYTES, MAX_EARLY_STEPS_FLOPS,
};
use crate::vocab::precision::WireDtype;

/// What a run of early steps cost the server.
#[derive(Debug, Clone)]
pub struct EarlyReport {
    /// [K, C, h, w] after the server's steps.
    pub latents: Tensor,
    /// The server's FLOPs (as `device_flops`: the server runs the whole U-Net locally).
    pub accounting: Accounting,
    /// U-Net batch rows summed over the steps (2K per step without batch redundancy).
    pub unet_rows: u64,
}

impl StableDiffusion {
    /// Runs a job's early steps here (the server side of `obfuscated`). `observe` sees the K
    /// latents after every step, with the step's index in the schedule.
    pub fn early_steps(
        &self,
        job: &EarlySteps<Tensor>,
        observe: &mut (dyn FnMut(usize, &Tensor) + Send),
    ) -> Result<EarlyReport> {
        job.validate()?;
        let k = job.candidates.len();
        let (one, c, h, w) = job.noise.dims4()?;
        if one != 1 || c != self.latent_channels() || h == 0 || w == 0 {
            return Err(Error::InvalidArgument(format!(
                "noise of shape {:?}, expected [1, {}, h, w]",
                job.noise.dims(),
                self.latent_channels()
            )));
        }
        // Inpainting's channels exactly when this U-Net takes them, shaped to fill its input
        // (`inpainting` has refused a U-Net taking fewer channels than the latent).
        let inpainting = self.inpainting()?;
        let extra = self.unet.config.in_channels.saturating_sub(c);
        let want = [1, extra, h, w];
        match (&job.condition, inpainting) {
            (Some(cond), true) if cond.dims() == want => {}
            (None, false) => {}
            (cond, _) => {
                return Err(Error::InvalidArgument(format!(
                    "inpainting channels of shape {:?} for a U-Net taking {} channels over the \
                     {c}-channel latent (expected {})",
                    cond.as_ref().map(|t| t.dims().to_vec()),
                    self.unet.config.in_channels,
                    match inpainting {
                        true => format!("{want:?}"),
                        false => "none".into(),
                    }
                )));
            }
        }
        let chunk = self.admit_early_steps(job, (h, w))?;
        let noise = job.noise.to_dtype(DType::F32)?;
        // A stochastic sampler's step noise is keyed by the job's starting tensor, as on the
        // phone (`client::img2img`).
        let mut sched =
            new_seeded_scheduler(job.scheduler, &self.scheduler_config, job.steps, &noise)?;
        // Text-to-image: the noise times the initial sigma; image-to-image: the latents as sent.
        let start = match job.start_step {
            None => (noise * sched.init_noise_sigma())?,
            Some(_) => noise,
        };
        let latents = start.repeat((k, 1, 1, 1))?;
        let first = job.first_step();
        let prompts: Vec<&str> = job.candidates.iter().map(String::as_str).collect();
        let (neg, g) = (job.negative_prompt.as_str(), job.guidance);
        let condition = job
            .condition
            .as_ref()
            .map(|t| t.to_dtype(DType::F32))
            .transpose()?;
        let conditioning = self
            .conditioning(&prompts, neg, g, job.accel, (h, w))?
            .with_image_condition(condition);
        let gate = job.accel.attention_gate;
        let mut rt = Runtime::new(
            &self.unet_engine,
            Policy::Local.placement(),
            &[],
            WireDtype::F32,
        )?
        .with_attention_reuse(gate.map(|g| g as u64))
        .with_attention_chunk(chunk);
        let mut progress = |p: Progress<'_>| observe(p.step - 1, p.latents);
        let run = denoise(
            &self.unet,
            Runners::One(&mut rt),
            sched.as_mut(),
            latents,
            first..first + job.server_steps,
            &conditioning,
            LoopHooks {
                cancelled: &|| false,
                progress: &mut progress,
            },
        );
        // Under `local` placement with no backends no op ever waits, so this future is ready
        // at every poll; the server runs it on a blocking thread of its own.
        let report = futures::executor::block_on(run)?;
        Ok(EarlyReport {
            latents: report.latents,
            accounting: report.accounting,
            unet_rows: report.unet_rows,
        })
    }
}

impl StableDiffusion {
    /// Prices a job from shapes before anything runs: refuses one over `MAX_EARLY_STEPS_FLOPS`,
    /// and returns the attention query chunk that keeps a chunk's scores within
    /// `EARLY_STEPS_ATTENTION_BYTES` for the job's batch (refusing where one query row cannot).
    fn admit_early_steps(&self, job: &EarlySteps<Tensor>, (h, w): (usize, usize)) -> Result<usize> {
        let k = job.candidates.len();
        let cfg = job.guidance > 1.0;
        let refuse = |m: String| Error::InvalidArgument(format!("early steps refused: {m}"));
        let flops = early_steps_flops(
            &self.unet,
            (h, w),
            self.tokenizer.max_len(),
            k,
            job.server_steps,
            cfg,
            &job.accel,
        )?;
        if flops > MAX_EARLY_STEPS_FLOPS {
            return Err(refuse(format!(
                "{flops} FLOPs, over the limit of {MAX_EARLY_STEPS_FLOPS}"
            )));
        }
        let c = &self.unet.config;
        let heads = (0..c.block_out_channels.len())
            .filter_map(|i| c.heads(i).ok())
            .max()
            .unwrap_or(1) as u64;
        // Rows × heads × keys × (scores + probabilities) for one query row, at the finest map.
        let tokens = (h as u64).saturating_mul(w as u64);
        let rows = 2 * k as u64;
        let per_query = rows
            .saturating_mul(heads)
            .saturating_mul(tokens)
            .saturating_mul(8);
        let chunk = EARLY_STEPS_ATTENTION_BYTES / per_query.max(1);
        if chunk == 0 {
            return Err(refuse(format!(
                "one attention query of a {rows}-row batch over {tokens} tokens needs \
                 {per_query} bytes, over {EARLY_STEPS_ATTENTION_BYTES}"
            )));
        }
        Ok(chunk.min(DEFAULT_ATTENTION_CHUNK as u64) as usize)
    }
}

impl EarlyStepsRunner<Tensor> for StableDiffusion {
    fn run_early_steps(&self, job: &EarlySteps<Tensor>) -> Result<Tensor> {
        Ok(self.early_steps(job, &mut |_, _| {})?.latents)
    }

    /// Per batch row: every skip activation the down path keeps for the up path, plus eight
    /// maps of the largest level (an up block's concatenated input is twice its width, and a
    /// resnet holds its input, normalised input, convolution output and residual at once), in
    /// f32; times the rows (2K with guidance); plus one attention chunk.
    fn working_bytes(&self, job: &EarlySteps<Tensor>) -> Result<u64> {
        let dims = job.noise.dims();
        let (h, w) = match dims {
            [_, _, h, w] => (*h as u64, *w as u64),
            _ => return Err(Error::InvalidArgument(format!("noise of shape {dims:?}"))),
        };
        let c = &self.unet.config;
        let n = c.block_out_channels.len();
        let (mut skips, mut largest) = (0u64, 0u64);
        let (mut lh, mut lw) = (h, w);
        skips = skips
            .saturating_add(c.block_out_channels.first().copied().unwrap_or(0) as u64 * lh * lw);
        for (i, &ch) in c.block_out_channels.iter().enumerate() {
            let map = (ch as u64).saturating_mul(lh).saturating_mul(lw);
            let layers = c.layers_per_block.get(i, n, "layers_per_block")? as u64;
            skips = skips.saturating_add(map.saturating_mul(layers));
            largest = largest.max(map);
            if i + 1 < n {
                lh = lh.div_ceil(2);
                lw = lw.div_ceil(2);
                skips = skips.saturating_add((ch as u64).saturating_mul(lh).saturating_mul(lw));
            }
        }
        let rows =
            (job.candidates.len() as u64).saturating_mul(if job.guidance > 1.0 { 2 } else { 1 });
        let per_row = skips
            .saturating_add(largest.saturating_mul(8))
            .saturating_mul(4);
        Ok(per_row
            .saturating_mul(rows)
            .saturating_add(EARLY_STEPS_ATTENTION_BYTES))
    }
}

/// The server's FLOPs for a job, from shapes alone: FLOPs are linear in the batch, so one
/// shape-only U-Net call per row (an ordinary one and, with a gate, one that reuses attention)
/// times the rows of each step (`Accelerations::rows_at`, the rule the server batches by).
pub fn early_steps_flops(
    unet: &UNet,
    latent: (usize, usize),
    context_len: usize,
    k: usize,
    server_steps: usize,
    cfg: bool,
    accel: &Accelerations,
) -> Result<u64> {
    let per_row = |reuse: bool| {
        account_step(
            unet,
            &PlanInput {
                latent_height: latent.0,
                latent_width: latent.1,
                batch: 1,
                context_len,
                servers: 0,
                policy: Policy::Local,
                wire: WireDtype::F32,
                reuse_attention: reuse,
                stale_sync: false,
                guidance_halves: None,
            },
        )
        .map(|a| a.device_flops)
    };
    let full = per_row(false)?;
    let reused = if accel.attention_gate.is_some() {
        per_row(true)?
    } else {
        full
    };
    Ok((0..server_steps)
        .map(|i| {
            let f = if accel.attention_gate.is_some_and(|g| i >= g) {
                reused
            } else {
                full
            };
            accel.rows_at(i, k, cfg).count(k) * f
        })
        .sum())
}

//! The one denoise loop. Every policy runs it: a `local`, `ppidm` or `strict` generation over
//! all T steps with one candidate, the `obfuscated` server over its first k steps with K
//! candidates in one guided batch, and the `obfuscated` phone over the last T − k steps. What
//! differs between them is data: the runtime (where the ops run), the step range, and the
//! candidates' conditioning with its batching rule (`Accelerations::rows_at`).

use std::ops::Range;

use candle_core::Tensor;

pub use crate::client::guidance::Runners;
use crate::model::scheduler::Scheduler;
use crate::model::unet::UNet;
use crate::placement::accounting::Accounting;
use crate::vocab::engine::Engine;
use crate::vocab::error::{Error, Result};
use crate::vocab::job::{Accelerations, BatchRedundancy, StepRows};

/// The text conditioning of K candidates denoised together (K = 1 for an ordinary generation),
/// with classifier-free guidance when an unconditional text is given.
pub struct Conditioning {
    /// Candidates: K.
    k: usize,
    /// [K, T, D] conditional states, one row per candidate.
    cond: Tensor,
    /// Guided: [1, T, D] unconditional states, and the contexts of both batch layouts.
    guided: Option<Guided>,
    guidance: f64,
    accel: Accelerations,
    /// SDXL's added conditioning inputs (`UNet::forward_added`), in the same rows as the text
    /// states.
    added: Option<Added>,
    /// Inpainting: [1, Cc, h, w] appended to every row's U-Net input channels after the
    /// sampler's scaling (`img2img::Start::condition`).
    image: Option<Tensor>,
}

/// The added conditioning's rows in each batch layout, as `Guided` lays out the states.
struct Added {
    /// [K, P].
    cond: Tensor,
    /// [2K, P] and [K + 1, P] when guided.
    guided: Option<(Tensor, Tensor)>,
}

struct Guided {
    /// [2K, T, D]: K unconditional rows, then the K conditional ones.
    full: Tensor,
    /// [K + 1, T, D]: one unconditional row shared by the K conditional ones.
    shared: Tensor,
}

impl Conditioning {
    /// `cond` [K, T, D]; `uncond` [1, T, D] when `guidance > 1` (classifier-free guidance).
    pub fn new(
        cond: Tensor,
        uncond: Option<Tensor>,
        guidance: f64,
        accel: Accelerations,
    ) -> Result<Self> {
        let k = cond.dim(0)?;
        let guided = match uncond {
            Some(u) => Some(Guided {
                full: Tensor::cat(&[&u.repeat((k, 1, 1))?, &cond], 0)?,
                shared: Tensor::cat(&[&u, &cond], 0)?,
            }),
            None => None,
        };
        Ok(Self {
            k,
            cond,
            guided,
            guidance,
            accel,
            added: None,
            image: None,
        })
    }

    /// With inpainting's channels [1, Cc, h, w] (the same for every candidate and both guided
    /// halves, as diffusers repeats them).
    pub fn with_image_condition(mut self, condition: Option<Tensor>) -> Self {
        self.image = condition;
        self
    }

    /// The U-Net's input for the scaled batch `x` [B, C, h, w]: with inpainting's channels
    /// appended.
    fn unet_input(&self, x: Tensor) -> Result<Tensor> {
        match &self.image {
            Some(c) => Ok(Tensor::cat(&[&x, &c.repeat((x.dim(0)?, 1, 1, 1))?], 1)?),
            None => Ok(x),
        }
    }

    /// With SDXL's added conditioning inputs: `cond` [K, P] for the candidates, `uncond`
    /// [1, P] exactly when the states are guided.
    pub fn with_added(mut self, cond: Tensor, uncond: Option<Tensor>) -> Result<Self> {
        if cond.dim(0)? != self.k || uncond.is_some() != self.guided.is_some() {
            return Err(Error::InvalidArgument(
                "added conditioning rows do not match the text states'".into(),
            ));
        }
        let guided = match uncond {
            Some(u) => Some((
                Tensor::cat(&[&u.repeat((self.k, 1))?, &cond], 0)?,
                Tensor::cat(&[&u, &cond], 0)?,
            )),
            None => None,
        };
        self.added = Some(Added { cond, guided });
        Ok(self)
    }

    /// How the `i`-th step of a run (counted from the run's first step) is batched.
    pub fn rows(&self, i: usize) -> StepRows {
        self.accel.rows_at(i, self.k, self.guided.is_some())
    }

    /// The added conditioning in the rows of a step batched as `rows`.
    fn added(&self, rows: StepRows) -> Option<&Tensor> {
        let a = self.added.as_ref()?;
        Some(match (rows, &a.guided) {
            (StepRows::Full, Some((full, _))) => full,
            (StepRows::SharedUncond, Some((_, shared))) => shared,
            _ => &a.cond,
        })
    }

    /// The U-Net's input (before the scheduler's scaling) and context for the K latents
    /// [K, C, h, w] in a step batched as `rows` (`Cond` whenever there is no guidance).
    fn batch(&self, rows: StepRows, latents: &Tensor) -> Result<(Tensor, &Tensor)> {
        Ok(match (rows, &self.guided) {
            (StepRows::Full, Some(g)) => (Tensor::cat(&[latents, latents], 0)?, &g.full),
            (StepRows::SharedUncond, Some(g)) => {
                // Exact: the K latents are identical here, so the first one is all of them.
                // Shared (ObCLIP): their mean stands for all, an approximation.
                let row = match self.accel.batch_redundancy {
                    BatchRedundancy::Shared => latents.mean_keepdim(0)?,
                    _ => latents.narrow(0, 0, 1)?,
                };
                (Tensor::cat(&[&row, latents], 0)?, &g.shared)
            }
            _ => (latents.clone(), &self.cond),
        })
    }

    /// The guided noise prediction [K, C, h, w] from the U-Net's output of a step batched as
    /// `rows`.
    fn combine(&self, rows: StepRows, out: Tensor) -> Result<Tensor> {
        let k = self.k;
        let g = self.guidance;
        Ok(match rows {
            StepRows::Cond => out,
            StepRows::Full => {
                let eu = out.narrow(0, 0, k)?;
                let ec = out.narrow(0, k, k)?;
                (&eu + ((ec - &eu)? * g)?)?
            }
            StepRows::SharedUncond => {
                let eu = out.narrow(0, 0, 1)?;
                let ec = out.narrow(0, 1, k)?;
                eu.broadcast_add(&(ec.broadcast_sub(&eu)? * g)?)?
            }
        })
    }
}

/// Reported after every denoising step.
pub struct Progress<'a> {
    pub step: usize,
    pub total: usize,
    /// The latents after this step.
    pub latents: &'a Tensor,
}

/// What the loop reports and asks between steps.
pub struct LoopHooks<'h> {
    /// Asked before every step: once it answers true the loop stops with `Error::Cancelled`
    /// (a step in flight is finished first, so no server is left mid-request).
    pub cancelled: &'h (dyn Fn() -> bool + Sync),
    /// Told after every step (`step` counts from 1 over the whole schedule).
    pub progress: &'h mut (dyn FnMut(Progress<'_>) + Send),
}

/// What a run of the loop did besides moving the latents.
pub struct LoopReport {
    pub latents: Tensor,
    /// Everything the runtime accounted, summed over the steps.
    pub accounting: Accounting,
    /// U-Net batch rows summed over the steps.
    pub unet_rows: u64,
}

/// Runs steps `steps` of `scheduler` from `latents` [K, C, h, w] (as they enter the first of
/// them: scaled by the scheduler's initial sigma, or an image-to-image start), every U-Net call
/// through `rt` (one runtime, or the guidance halves' two).
pub async fn denoise<E: Engine<T = Tensor>>(
    unet: &UNet,
    mut rt: Runners<'_, '_, E>,
    scheduler: &mut dyn Scheduler,
    mut latents: Tensor,
    steps: Range<usize>,
    conditioning: &Conditioning,
    hooks: LoopHooks<'_>,
) -> Result<LoopReport> {
    let mut accounting = rt.take_accounting();
    let mut unet_rows = 0;
    let timesteps = scheduler.timesteps().to_vec();
    let total = timesteps.len();
    for (i, &t) in timesteps
        .iter()
        .enumerate()
        .take(steps.end)
        .skip(steps.start)
    {
        if (hooks.cancelled)() {
            return Err(Error::Cancelled);
        }
        // Batching counts from the run's first step (an image-to-image run starts mid-schedule;
        // an `obfuscated` server's first step is where its K latents are identical).
        let rows = conditioning.rows(i - steps.start);
        let (x, context) = conditioning.batch(rows, &latents)?;
        unet_rows += x.dim(0)? as u64;
        let x = conditioning.unet_input(scheduler.scale_model_input(&x, i)?)?;
        let added = conditioning.added(rows);
        let out = rt
            .forward(unet, &x, t, (context, added), rows, conditioning.k)
            .await?;
        let eps = conditioning.combine(rows, out)?;
        latents = scheduler.step(&eps, i, &latents)?;
        accounting.absorb(rt.take_accounting());
        (hooks.progress)(Progress {
            step: i + 1,
            total,
            latents: &latents,
        });
    }
    Ok(LoopReport {
        latents,
        accounting,
        unet_rows,
    })
}

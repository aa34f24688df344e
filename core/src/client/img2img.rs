//! Where a generation's schedule starts, text-to-image or image-to-image, for every policy.
//!
//! Text-to-image starts at step 0 from the initial noise (seeded, or the caller's `latents`)
//! times the sampler's `init_noise_sigma`. Image-to-image follows diffusers'
//! `StableDiffusionImg2ImgPipeline`: the init image, in [-1, 1], is encoded on the phone with
//! the VAE's posterior **mean** (diffusers samples the posterior with its generator,
//! `retrieve_latents(..., sample_mode="sample")`; the mean is its `"argmax"` mode, and makes a
//! run a function of the image, the noise and the prompt alone), shifted and scaled like
//! diffusers (`(z − shift_factor) · scaling_factor`); the schedule of `steps` steps is cut to
//! its last ⌊steps × strength⌋ (`get_timesteps`: `t_start = steps − ⌊steps × strength⌋`); the
//! latents are noised to the first kept step by the sampler's own `add_noise` (diffusers'
//! `scheduler.add_noise(init_latents, noise, timesteps[:1])`, with Euler-type samplers' begin
//! index there); and the one denoise loop runs the steps `t_start..steps`. The noise is the
//! caller's (`GenerateOptions::noise`, the CLI's `--noise`: what makes a run comparable with
//! diffusers') or seeded from the seed like text-to-image's.
//!
//! A stochastic sampler's step noise is keyed by the tensor a generation starts from and an
//! `obfuscated` server receives: the initial noise (text-to-image) or the noised init latents
//! (image-to-image), so the phone and the server draw the same.
//!
//! Inpainting (diffusers' `StableDiffusionInpaintPipeline` with a 9-channel U-Net: the latent,
//! the mask, the masked image's latents): the mask is binarised (≥ 0.5 repaints), the masked
//! image (the init image with repainted pixels set to mid-grey, 0 in [-1, 1]) is encoded with
//! the posterior mean like the init image, and the mask is taken to the latent grid by nearest
//! sampling (torch's `interpolate(mode="nearest")`: cell (i, j) reads pixel (⌊i·H/h⌋, ⌊j·W/w⌋)).
//! Both are appended to every U-Net input after the sampler's scaling (`Start::condition`). At
//! strength 1 the run starts from pure noise times `init_noise_sigma`, as text-to-image does
//! (diffusers' `is_strength_max`); below it, from the unmasked image noised as image-to-image.
//!
//! The phone keeps only the VAE decoder resident (`LoadRole::Phone`); for an image-to-image
//! generation it reads the encoder from the model folder (`VaeEncoder::load`), encodes, and
//! drops it before the denoise loop, so the encoder's weights and its full-resolution
//! activations never add to the loop's peak, and text-to-image never pays for them.

use candle_core::{DType, Tensor};

use crate::client::options::GenerateOptions;
use crate::client::pipeline::{Progress, StableDiffusion};
use crate::model::scheduler::{
    key_step_noise, new_scheduler, new_seeded_scheduler, seeded_normal, Scheduler,
};
use crate::model::vae::VaeEncoder;
use crate::vocab::error::{Error, Result};

/// The start of a generation: the sampler, the latents entering its first step, and that step.
pub(crate) struct Start {
    pub scheduler: Box<dyn Scheduler + Send>,
    /// [1, C, h, w], entering step `first()` (already scaled or noised).
    pub latents: Tensor,
    /// Image-to-image: the first schedule step that runs (`t_start`); None: text-to-image
    /// (from step 0). The `obfuscated` job's `start_step`.
    pub start_step: Option<usize>,
    /// What an `obfuscated` server is sent as the job's `noise`: the initial noise before
    /// `init_noise_sigma` (text-to-image) or the noised init latents (image-to-image).
    pub sent: Tensor,
    /// Inpainting: [1, 1 + C, h, w], the mask on the latent grid then the masked image's
    /// latents, appended to every U-Net input's channels.
    pub condition: Option<Tensor>,
}

impl Start {
    /// The first schedule step that runs.
    pub fn first(&self) -> usize {
        self.start_step.unwrap_or(0)
    }

    /// Steps that run: the schedule's length less the skipped head.
    pub fn steps_run(&self) -> usize {
        self.scheduler
            .timesteps()
            .len()
            .saturating_sub(self.first())
    }

    /// `progress` told over the steps that run: step 1 of `steps_run` is the schedule's step
    /// `first` (the loop counts over the whole schedule).
    pub fn shifted<'p>(
        &self,
        progress: &'p mut (dyn FnMut(Progress<'_>) + Send),
    ) -> impl FnMut(Progress<'_>) + Send + 'p {
        let first = self.first();
        move |p: Progress<'_>| {
            progress(Progress {
                step: p.step.saturating_sub(first),
                total: p.total.saturating_sub(first),
                latents: p.latents,
            })
        }
    }
}

/// The first step that runs for `strength` in a schedule of `steps` (diffusers'
/// `get_timesteps`): `steps − min(⌊steps × strength⌋, steps)`. Refuses a strength outside
/// (0, 1] and one that keeps no step.
pub fn first_step(steps: usize, strength: f64) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "strength must be in (0, 1], got {strength}"
        )));
    }
    let kept = ((steps as f64 * strength).floor() as usize).min(steps);
    if kept == 0 {
        return Err(Error::InvalidArgument(format!(
            "strength {strength} keeps no step of {steps} (⌊{steps} × {strength}⌋ = 0): raise \
             the strength or the steps"
        )));
    }
    Ok(steps - kept)
}

impl StableDiffusion {
    /// The start of a generation of `opts` (see the module docs), every option checked.
    pub(crate) fn start(&self, opts: &GenerateOptions) -> Result<Start> {
        let (h, w) = self.latent_size(opts.width, opts.height)?;
        let inpainting = self.inpainting()?;
        match (inpainting, opts.mask.is_some(), opts.init_image.is_some()) {
            (false, true, _) => {
                return Err(Error::InvalidArgument(format!(
                    "a mask needs an inpainting U-Net (2 × {} + 1 input channels); this one \
                     takes {}",
                    self.latent_channels(),
                    self.unet.config.in_channels
                )))
            }
            (true, false, _) | (true, _, false) => {
                return Err(Error::InvalidArgument(
                    "this is an inpainting U-Net (latent, mask and masked-image channels): give \
                     an init image and a mask"
                        .into(),
                ))
            }
            _ => {}
        }
        let Some(image) = &opts.init_image else {
            if opts.noise.is_some() {
                return Err(Error::InvalidArgument(
                    "noise is image-to-image's (with an init image); text-to-image takes its \
                     initial noise as latents"
                        .into(),
                ));
            }
            let noise = self.initial_noise(opts, h, w)?;
            return self.start_from_noise(opts, noise, None);
        };
        if opts.latents.is_some() {
            return Err(Error::InvalidArgument(
                "latents (text-to-image's initial noise) and an init image exclude each other; \
                 give image-to-image's noise as noise"
                    .into(),
            ));
        }
        let first = first_step(opts.steps, opts.strength)?;
        let want = [1, self.latent_channels(), h, w];
        let noise = match &opts.noise {
            Some(n) if n.dims() != want => {
                return Err(Error::InvalidArgument(format!(
                    "noise has shape {:?}, expected {want:?} for {}x{}",
                    n.dims(),
                    opts.width,
                    opts.height
                )))
            }
            Some(n) => n.to_dtype(DType::F32)?.to_device(&self.device)?,
            None => seeded_normal(opts.seed, &want, &self.device)?,
        };
        let (width, height) = (opts.width, opts.height);
        // Inpainting below strength 1 encodes the masked image and the image itself with one
        // read of the encoder.
        let (condition, init) = match &opts.mask {
            Some(m) => {
                let (masked, repaint) = self.inpaint_inputs(image, m, width, height)?;
                let mut images = vec![&masked];
                if first > 0 {
                    images.push(image);
                }
                let mut z = self.encode_images(&images, width, height)?.into_iter();
                let masked_latents = z
                    .next()
                    .ok_or_else(|| Error::Internal("img2img: no encoding".into()))?;
                let cond = self.inpaint_assemble(&repaint, &masked_latents, height, width)?;
                (Some(cond), z.next())
            }
            None => (None, None),
        };
        if condition.is_some() && first == 0 {
            // Inpainting at strength 1: pure noise; the image enters through the condition only.
            return self.start_from_noise(opts, noise, condition);
        }
        let init = match init {
            Some(z) => z,
            None => self.encode_image(image, width, height)?,
        };
        if init.dims() != want {
            return Err(Error::InvalidArgument(format!(
                "the VAE encodes to {:?}, the U-Net takes {want:?}",
                init.dims()
            )));
        }
        let mut scheduler = new_scheduler(opts.scheduler, &self.scheduler_config, opts.steps)?;
        // `add_noise` refuses a step past the schedule's end.
        let latents = scheduler.add_noise(&init, &noise, first)?;
        key_step_noise(scheduler.as_mut(), &latents)?;
        Ok(Start {
            sent: latents.clone(),
            latents,
            scheduler,
            start_step: Some(first),
            condition,
        })
    }

    /// A start from step 0 at `noise` × the sampler's `init_noise_sigma`.
    fn start_from_noise(
        &self,
        opts: &GenerateOptions,
        noise: Tensor,
        condition: Option<Tensor>,
    ) -> Result<Start> {
        let scheduler =
            new_seeded_scheduler(opts.scheduler, &self.scheduler_config, opts.steps, &noise)?;
        Ok(Start {
            latents: (&noise * scheduler.init_noise_sigma())?,
            scheduler,
            start_step: None,
            sent: noise,
            condition,
        })
    }

    /// The latent space's channels (the VAE's `latent_channels`).
    pub fn latent_channels(&self) -> usize {
        self.vae.config.latent_channels
    }

    /// Whether the U-Net is an inpainting one (latent, mask and masked-image channels in, the
    /// latent's out); a U-Net whose input is neither is refused.
    pub fn inpainting(&self) -> Result<bool> {
        let (c, lc) = (&self.unet.config, self.latent_channels());
        match c.in_channels {
            i if i == lc => Ok(false),
            i if i == 2 * lc + 1 && c.out_channels == lc => Ok(true),
            i => Err(Error::Unsupported(format!(
                "a U-Net taking {i} channels over a {lc}-channel latent space (neither the \
                 latent nor the inpainting layout)"
            ))),
        }
    }

    /// Inpainting's extra U-Net input [1, 1 + C, h, w] for the init image RGB [3, H, W] and
    /// the mask [1, H, W] (see the module docs).
    pub fn inpaint_condition(
        &self,
        image: &Tensor,
        mask: &Tensor,
        width: usize,
        height: usize,
    ) -> Result<Tensor> {
        let (masked, repaint) = self.inpaint_inputs(image, mask, width, height)?;
        let z = self.encode_image(&masked, width, height)?;
        self.inpaint_assemble(&repaint, &z, height, width)
    }

    /// The masked image RGB [3, H, W] in [0, 1] (repainted pixels at mid-grey) and the
    /// binarised mask [1, H, W] (1 repaints), every shape and value checked.
    fn inpaint_inputs(
        &self,
        image: &Tensor,
        mask: &Tensor,
        width: usize,
        height: usize,
    ) -> Result<(Tensor, Tensor)> {
        if mask.dims() != [1, height, width] {
            return Err(Error::InvalidArgument(format!(
                "mask of shape {:?}, expected [1, {height}, {width}] (the generation's size)",
                mask.dims()
            )));
        }
        let mask = mask.to_dtype(DType::F32)?.to_device(&self.device)?;
        let (lo, hi) = (
            mask.min_all()?.to_scalar::<f32>()?,
            mask.max_all()?.to_scalar::<f32>()?,
        );
        if !(lo >= 0.0 && hi <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "mask values span [{lo}, {hi}], expected [0, 1]"
            )));
        }
        let repaint = mask.ge(0.5f32)?.to_dtype(DType::F32)?;
        let keep = (1.0 - &repaint)?;
        let image = image.to_dtype(DType::F32)?.to_device(&self.device)?;
        // Repainted pixels at mid-grey: 0 once the encoder maps [0, 1] to [-1, 1].
        let masked = (image.broadcast_mul(&keep)? + (repaint.broadcast_as(image.dims())? * 0.5)?)?;
        Ok((masked, repaint))
    }

    /// The condition from the binarised mask [1, H, W] and the masked image's latents
    /// [1, C, h, w]: the mask sampled nearest onto the latent grid, then the latents.
    fn inpaint_assemble(
        &self,
        repaint: &Tensor,
        latents: &Tensor,
        height: usize,
        width: usize,
    ) -> Result<Tensor> {
        let (h, w) = (latents.dim(2)?, latents.dim(3)?);
        let nearest = |out: usize, len: usize| -> Result<Tensor> {
            let idx: Vec<u32> = (0..out).map(|i| (i * len / out) as u32).collect();
            Ok(Tensor::from_vec(idx, out, &self.device)?)
        };
        let grid = repaint
            .index_select(&nearest(h, height)?, 1)?
            .index_select(&nearest(w, width)?, 2)?
            .unsqueeze(0)?;
        Ok(Tensor::cat(&[&grid, latents], 1)?)
    }

    /// The scaled latents [1, C, h, w] of an init image RGB [3, `height`, `width`] in [0, 1]:
    /// `(mean − shift_factor) · scaling_factor` of the VAE posterior of `2 · image − 1`, on
    /// this device. Uses the loaded encoder, else reads it from `vae_dir` for this call only.
    pub fn encode_image(&self, image: &Tensor, width: usize, height: usize) -> Result<Tensor> {
        self.encode_images(&[image], width, height)?
            .pop()
            .ok_or_else(|| Error::Internal("img2img: no encoding".into()))
    }

    /// `encode_image` of each image, the encoder read (where it is not resident) once.
    fn encode_images(
        &self,
        images: &[&Tensor],
        width: usize,
        height: usize,
    ) -> Result<Vec<Tensor>> {
        let channels = self.vae.config.in_channels;
        let mut inputs = Vec::with_capacity(images.len());
        for image in images {
            if image.dims() != [channels, height, width] {
                return Err(Error::InvalidArgument(format!(
                    "init image of shape {:?}, expected [{channels}, {height}, {width}] (RGB, \
                     the generation's height and width)",
                    image.dims()
                )));
            }
            let x = image.to_dtype(DType::F32)?.to_device(&self.device)?;
            let (lo, hi) = (
                x.min_all()?.to_scalar::<f32>()?,
                x.max_all()?.to_scalar::<f32>()?,
            );
            if !(lo >= 0.0 && hi <= 1.0) {
                return Err(Error::InvalidArgument(format!(
                    "init image values span [{lo}, {hi}], expected [0, 1]"
                )));
            }
            inputs.push(((x * 2.0)? - 1.0)?.unsqueeze(0)?);
        }
        let loaded;
        let encoder = match self.vae.encoder() {
            Some(e) => e,
            None => {
                loaded = VaeEncoder::load(&self.vae_dir, &self.device)?;
                &loaded
            }
        };
        inputs
            .iter()
            .map(|x| {
                let mean = encoder.encode_mean(x)?;
                let z = match self.vae.config.shift_factor {
                    Some(s) => (mean - s)?,
                    None => mean,
                };
                Ok((z * self.vae.config.scaling_factor)?)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_follows_diffusers_get_timesteps() -> Result<()> {
        // init_timestep = min(int(steps * strength), steps); t_start = steps - init_timestep.
        assert_eq!(first_step(10, 0.6)?, 4);
        assert_eq!(first_step(10, 0.3)?, 7);
        // 6 × 0.6 = 3.5999999999999996 in f64: 3 steps kept, as Python's int() keeps.
        assert_eq!(first_step(6, 0.6)?, 3);
        assert_eq!(first_step(50, 1.0)?, 0);
        assert_eq!(first_step(4, 0.25)?, 3);
        for bad in [0.0, -0.1, 1.01, f64::NAN, f64::INFINITY] {
            assert!(
                matches!(first_step(10, bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
        // ⌊4 × 0.2⌋ = 0: no step would run.
        assert!(matches!(first_step(4, 0.2), Err(Error::InvalidArgument(_))));
        Ok(())
    }
}

//! The pipeline: tokenize and encode the prompt on the device, start from noise (text-to-image)
//! or from the init image's noised latents (image-to-image, `img2img`), denoise with
//! classifier-free guidance where every U-Net call runs through the placement runtime (and so
//! over the shard backends the policy uses), decode with the VAE on the device, write a PNG.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

pub use crate::client::denoise::Progress;
use crate::client::denoise::{denoise, Conditioning, LoopHooks, Runners};
#[cfg(feature = "eval-capture")]
use crate::client::guidance::merge_captured;
use crate::client::guidance::{half_groups, merge_audit};
pub use crate::client::options::{
    image_from_png, image_to_png, mask_from_png, GenerateOptions, Generation, RunStats, ServerStats,
};
use crate::client::prompt::{encode, encode_negative, PromptEmbedding, XlText};
use crate::model::clip::{ClipTextEncoder, ClipTokenizer};
use crate::model::config::ModelPaths;
use crate::model::lora::{adapted_identity, LoraAdapter};
pub use crate::model::scheduler::seeded_normal;
use crate::model::scheduler::SchedulerConfig;
use crate::model::unet::{default_time_ids, text_time_input, UNet};
use crate::model::vae::Vae;
pub use crate::model::weights::load_unet_weights;
use crate::model::weights::{load_unet_parameters, NamedShape};
use crate::placement::backend::{InProcessBackend, ShardBackend};
use crate::placement::engine::CandleEngine;
use crate::placement::policy::Policy;
use crate::placement::runtime::Runtime;
use crate::vocab::error::{Error, Result};
use crate::vocab::job::Accelerations;

/// A loaded diffusers-layout Stable Diffusion folder.
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextEncoder,
    /// SDXL's second text side (`tokenizer_2`, `text_encoder_2`), when the folder has one.
    pub xl: Option<XlText>,
    pub unet: UNet,
    /// The U-Net's weights, by diffusers name.
    pub unet_engine: CandleEngine,
    pub vae: Vae,
    /// The model's `vae/` folder: where a phone that loaded the decoder only reads the encoder
    /// for an image-to-image generation (`img2img`).
    pub vae_dir: PathBuf,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    /// The LoRA adapters merged into the U-Net (`with_lora`), as digests over the shard layers
    /// (those adapting any): with them a shard server's identity is the adapted one
    /// (`adapted_identity`).
    pub lora_digests: Vec<[u8; 32]>,
    /// The same adapters' digests over every layer: a full-model server's identity
    /// (`full_identity`) covers the attention layers' part too.
    pub lora_full_digests: Vec<[u8; 32]>,
}

/// What a process loads of a model folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadRole {
    /// Everything, the U-Net in f32: local generation, in-process shard servers, the
    /// `obfuscated` policy's server.
    Full,
    /// The phone of a generation under `policy` with `servers` shard servers: the text encoder,
    /// the VAE decoder, and only the U-Net layers the policy's table runs on the device (all of
    /// them where the phone runs whole U-Net calls: `local`, `obfuscated`, or a guided half it
    /// keeps for want of servers), each in its stored precision. An image-to-image generation
    /// reads the VAE encoder for its one encoding and drops it (`img2img`).
    Phone { policy: Policy, servers: usize },
}

impl LoadRole {
    /// The U-Net parameters this role reads, sorted by name.
    pub fn unet_parameters(&self, unet: &UNet) -> Vec<NamedShape> {
        let LoadRole::Phone { policy, servers } = *self else {
            return unet.parameters();
        };
        let placement = policy.placement();
        let keeps_a_half = crate::client::guidance::halves_apart(policy, None, true)
            && half_groups(servers).1.is_empty();
        if !placement.offloads() || policy == Policy::Obfuscated || keeps_a_half {
            return unet.parameters();
        }
        let mut v: Vec<NamedShape> = unet
            .all_layers()
            .iter()
            .filter(|l| placement.on_device(l))
            .flat_map(|l| l.params())
            .collect();
        // SDXL: the maps carrying the pooled embedding's bias are normalised on the phone even
        // where GroupNorm runs on the strips (`Runtime::add_channel_bias`).
        if placement.resident() {
            v.extend(
                unet.text_biased_norms()
                    .into_iter()
                    .flat_map(|g| g.params()),
            );
        }
        v.sort();
        v.dedup();
        v
    }
}

impl StableDiffusion {
    pub fn load(root: &Path, device: &Device) -> Result<Self> {
        Self::load_for(root, device, LoadRole::Full)
    }

    /// Loads what `role` needs of a diffusers-layout folder (see `LoadRole`); the VAE encoder
    /// is read only for `LoadRole::Full` (a phone reads it per image-to-image generation).
    pub fn load_for(root: &Path, device: &Device, role: LoadRole) -> Result<Self> {
        let paths = ModelPaths::new(root)?;
        let te_cfg = paths.text_encoder_config()?;
        let tokenizer = ClipTokenizer::from_dir(
            &paths.component("tokenizer"),
            te_cfg.max_position_embeddings,
        )?;
        let text_encoder = ClipTextEncoder::load(&paths.component("text_encoder"), device)?;
        let xl = XlText::load(&paths, device)?;
        let unet = UNet::new(&paths.unet_config()?)?;
        if xl.is_some() != unet.text_time().is_some() {
            return Err(Error::Unsupported(
                "an SDXL folder needs both a second text encoder and a U-Net with `text_time` \
                 added conditioning"
                    .into(),
            ));
        }
        let (weights, vae) = match role {
            LoadRole::Full => (
                load_unet_weights(&paths.component("unet"), &unet, device)?,
                Vae::load(&paths.component("vae"), device)?,
            ),
            LoadRole::Phone { .. } => (
                load_unet_parameters(
                    &paths.component("unet"),
                    &role.unet_parameters(&unet),
                    device,
                )?,
                Vae::load_decoder(&paths.component("vae"), device)?,
            ),
        };
        let scheduler_config =
            SchedulerConfig::from_file(paths.component("scheduler").join("scheduler_config.json"))?;
        Ok(Self {
            tokenizer,
            text_encoder,
            xl,
            unet,
            unet_engine: CandleEngine::new(weights, device.clone()),
            vae,
            vae_dir: paths.component("vae"),
            scheduler_config,
            device: device.clone(),
            lora_digests: Vec::new(),
            lora_full_digests: Vec::new(),
        })
    }

    /// Merges the LoRA adapter at `path` at `scale` into the U-Net weights this process holds
    /// (a phone only its own layers: an adapter's attention layers stay on the phone, its
    /// convolution and feed-forward layers are the servers', which merge them themselves).
    pub fn with_lora(mut self, path: &Path, scale: f64) -> Result<Self> {
        let adapter = LoraAdapter::load(path, &self.unet)?;
        adapter.merge_into(self.unet_engine.weights_mut(), scale)?;
        let shard = self.unet.shard_layers();
        let is_shard = |m: &str| shard.contains_key(m);
        // An adapter of attention layers only changes nothing a shard server holds.
        self.lora_digests.extend(adapter.digest(&is_shard, scale)?);
        self.lora_full_digests
            .extend(adapter.digest(&|_| true, scale)?);
        Ok(self)
    }

    /// The identity a shard server holding this model's shard layers presents, from the base
    /// model's (`base`, e.g. the manifest's): adapted by the merged LoRA adapters, if any.
    pub fn adapted_identity(&self, base: &[u8; 32]) -> [u8; 32] {
        adapted_identity(base, &self.lora_digests)
    }

    /// The identity a full-model server of this model presents (the `obfuscated` policy), from
    /// the base U-Net identity and the component files' hashes (`wire::manifest`): adapted by
    /// every merged adapter over all its layers.
    pub fn full_identity(&self, base: &[u8; 32], components: &[(String, String)]) -> [u8; 32] {
        let unet = adapted_identity(base, &self.lora_full_digests);
        crate::wire::manifest::full_model_identity(&unet, components)
    }

    /// `n` in-process shard backends, each holding only the convolution and GroupNorm weights
    /// a shard server needs.
    pub fn in_process_backends(&self, n: usize) -> Vec<Arc<dyn ShardBackend<Tensor>>> {
        let layers = self.unet.shard_layers();
        let names: Vec<String> = layers.keys().cloned().collect();
        (0..n)
            .map(|_| {
                let engine = self.unet_engine.subset(&names);
                Arc::new(InProcessBackend::new(engine, layers.clone()))
                    as Arc<dyn ShardBackend<Tensor>>
            })
            .collect()
    }

    /// One in-process server holding this whole model: it runs the `obfuscated` policy's
    /// early steps (and every shard op too).
    pub fn in_process_full_server(self: &Arc<Self>) -> Arc<dyn ShardBackend<Tensor>> {
        let layers = self.unet.shard_layers();
        let names: Vec<String> = layers.keys().cloned().collect();
        let mut backend = InProcessBackend::new(self.unet_engine.subset(&names), layers);
        backend.executor = backend.executor.with_denoiser(self.clone());
        Arc::new(backend)
    }

    /// Text states [1, 77, D] of a prompt.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor> {
        Ok(self.encode_text(prompt)?.states)
    }

    /// A prompt's text states and, under SDXL, its pooled text embedding.
    pub fn encode_text(&self, prompt: &str) -> Result<PromptEmbedding> {
        let (t, e) = (&self.tokenizer, &self.text_encoder);
        encode(t, e, self.xl.as_ref(), prompt, &self.device)
    }

    /// The conditioning of `prompts` (K candidates denoised together) for latents of
    /// `latent` (h, w), guided by `negative` when `guidance > 1`: text states, and under SDXL
    /// the added conditioning (pooled embeddings and the image's size ids).
    pub fn conditioning(
        &self,
        prompts: &[&str],
        negative: &str,
        guidance: f64,
        accel: Accelerations,
        latent: (usize, usize),
    ) -> Result<Conditioning> {
        let conds = prompts
            .iter()
            .map(|p| self.encode_text(p))
            .collect::<Result<Vec<_>>>()?;
        let first = conds
            .first()
            .ok_or_else(|| Error::InvalidArgument("no prompt to condition on".into()))?;
        let uncond = match guidance > 1.0 {
            true => {
                let (t, e, xl) = (&self.tokenizer, &self.text_encoder, self.xl.as_ref());
                Some(encode_negative(t, e, xl, negative, first, &self.device)?)
            }
            false => None,
        };
        let states: Vec<&Tensor> = conds.iter().map(|c| &c.states).collect();
        let c = Conditioning::new(
            Tensor::cat(&states, 0)?,
            uncond.as_ref().map(|u| u.states.clone()),
            guidance,
            accel,
        )?;
        let Some(tt) = self.unet.text_time() else {
            return Ok(c);
        };
        let f = self.vae.config.downsample_factor();
        let ids = default_time_ids(latent.0 * f, latent.1 * f);
        let (flip, shift) = (
            self.unet.config.flip_sin_to_cos,
            self.unet.config.freq_shift,
        );
        let added = |e: &PromptEmbedding| -> Result<Tensor> {
            let pooled = e.pooled.as_ref().ok_or_else(|| {
                Error::InvalidArgument(
                    "an SDXL prompt encoding without its pooled embedding".into(),
                )
            })?;
            text_time_input(&tt, pooled, &ids, flip, shift)
        };
        let cond_added = conds.iter().map(&added).collect::<Result<Vec<_>>>()?;
        let uncond_added = uncond.as_ref().map(&added).transpose()?;
        c.with_added(Tensor::cat(&cond_added, 0)?, uncond_added)
    }

    /// Latent size for an image size, checking divisibility.
    pub fn latent_size(&self, width: usize, height: usize) -> Result<(usize, usize)> {
        let f = self.vae.config.downsample_factor();
        if width == 0 || height == 0 || !width.is_multiple_of(f) || !height.is_multiple_of(f) {
            return Err(Error::Resolution {
                width,
                height,
                multiple: f,
            });
        }
        Ok((height / f, width / f))
    }

    /// Runs a whole generation. `backends` may be empty for `Policy::Local`.
    pub async fn generate(
        &self,
        opts: &GenerateOptions,
        backends: &[Arc<dyn ShardBackend<Tensor>>],
        progress: &mut (dyn FnMut(Progress<'_>) + Send),
    ) -> Result<Generation> {
        self.generate_cancellable(opts, backends, progress, &|| false)
            .await
    }

    /// `generate`, asking `cancelled` before every denoising step: once it answers true the
    /// generation stops there with `Error::Cancelled` (a step in flight is finished first, so
    /// no server is left mid-request). The policy picks the strategy: `obfuscated` splits the
    /// schedule in time (`hybrid`), every other policy runs each U-Net call through the
    /// placement runtime (`generate_split`).
    pub async fn generate_cancellable(
        &self,
        opts: &GenerateOptions,
        backends: &[Arc<dyn ShardBackend<Tensor>>],
        progress: &mut (dyn FnMut(Progress<'_>) + Send),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<Generation> {
        if cancelled() {
            return Err(Error::Cancelled);
        }
        if opts.steps == 0 {
            return Err(Error::InvalidArgument("steps must be at least 1".into()));
        }
        if opts.policy == Policy::Obfuscated {
            return self
                .generate_hybrid(opts, backends, progress, cancelled)
                .await;
        }
        self.generate_split(opts, backends, progress, cancelled)
            .await
    }

    /// Every step on the phone and the servers the policy's placement table names.
    async fn generate_split(
        &self,
        opts: &GenerateOptions,
        backends: &[Arc<dyn ShardBackend<Tensor>>],
        progress: &mut (dyn FnMut(Progress<'_>) + Send),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<Generation> {
        let clock = Instant::now();
        let mut start = self.start(opts)?;
        let conditioning = self
            .text_conditioning(opts)?
            .with_image_condition(start.condition.clone());
        let total = start.scheduler.timesteps().len();
        let (first, steps_run) = (start.first(), start.steps_run());
        let mut progress = start.shifted(progress);
        let hooks = LoopHooks {
            cancelled,
            progress: &mut progress,
        };
        let (cond_servers, uncond_servers) = if opts.halves_apart() {
            half_groups(backends.len())
        } else {
            (0..backends.len(), backends.len()..backends.len())
        };
        let mut rt = self.runtime(opts, opts.policy, &backends[cond_servers])?;
        // With too few servers for two groups the phone runs the unconditional half.
        let uncond_policy = match uncond_servers.is_empty() {
            true => Policy::Local,
            false => opts.policy,
        };
        let mut uncond_rt = self.runtime(opts, uncond_policy, &backends[uncond_servers.clone()])?;
        let runners = if opts.halves_apart() {
            Runners::Apart {
                cond: &mut rt,
                uncond: &mut uncond_rt,
                uncond_offset: uncond_servers.start,
            }
        } else {
            Runners::One(&mut rt)
        };
        let report = denoise(
            &self.unet,
            runners,
            start.scheduler.as_mut(),
            start.latents,
            first..total,
            &conditioning,
            hooks,
        )
        .await?;
        let image = self.decode(&report.latents)?;
        let stats = RunStats::new(&report.accounting, steps_run, clock.elapsed().as_secs_f64());
        let offset = uncond_servers.start;
        Ok(Generation {
            image,
            latents: report.latents,
            accounting: report.accounting,
            audit: match opts.halves_apart() {
                true => merge_audit(rt.take_audit(), uncond_rt.take_audit(), offset),
                false => rt.take_audit(),
            },
            #[cfg(feature = "eval-capture")]
            captured: merge_captured(rt.take_captured(), uncond_rt.take_captured(), offset),
            stats,
            obfuscation: None,
        })
    }

    /// A runtime of `policy` over `backends`, with this generation's settings.
    fn runtime<'s>(
        &'s self,
        opts: &GenerateOptions,
        policy: Policy,
        backends: &'s [Arc<dyn ShardBackend<Tensor>>],
    ) -> Result<Runtime<'s, CandleEngine>> {
        if opts.stale_sync_from.is_some() && !policy.placement().resident() {
            return Err(Error::InvalidArgument(format!(
                "stale synchronisation needs strips resident on the servers (strict), not {}",
                policy.name()
            )));
        }
        let rt = Runtime::new(&self.unet_engine, policy.placement(), backends, opts.wire)?
            .with_attention_reuse(opts.attention_reuse_from.map(|s| s as u64))
            .with_stale_sync(opts.stale_sync_from.map(|s| s as u64))
            .with_reply_check(self.unet.shard_layers());
        #[cfg(feature = "eval-capture")]
        let rt = rt.with_capture(opts.capture_from_step.map(|s| s as u64));
        Ok(rt)
    }

    /// The initial noise [1, C, h, w]: the caller's latents (checked), or seeded noise.
    pub(crate) fn initial_noise(
        &self,
        opts: &GenerateOptions,
        h: usize,
        w: usize,
    ) -> Result<Tensor> {
        let want = [1, self.latent_channels(), h, w];
        match &opts.latents {
            Some(l) if l.dims() != want => Err(Error::InvalidArgument(format!(
                "initial latents have shape {:?}, expected {want:?} for {}x{}",
                l.dims(),
                opts.width,
                opts.height
            ))),
            Some(l) => Ok(l.to_dtype(DType::F32)?.to_device(&self.device)?),
            None => seeded_normal(opts.seed, &want, &self.device),
        }
    }

    /// The prompt's conditioning, guided by the negative prompt when `guidance > 1`.
    pub(crate) fn text_conditioning(&self, opts: &GenerateOptions) -> Result<Conditioning> {
        let latent = self.latent_size(opts.width, opts.height)?;
        let (p, n) = (opts.prompt.as_str(), opts.negative_prompt.as_str());
        self.conditioning(&[p], n, opts.guidance, Accelerations::default(), latent)
    }

    /// Decodes final latents to an RGB image [3, H, W] in [0, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents / self.vae.config.scaling_factor)?;
        let z = match self.vae.config.shift_factor {
            Some(s) => (z + s)?,
            None => z,
        };
        let x = self.vae.decode(&z)?;
        Ok(((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?.squeeze(0)?)
    }
}

//! `Veil`: the client an app keeps for its lifetime. It loads the model once; each `generate`
//! takes sessions with the shard servers (those the last generation kept, else new ones; two
//! concurrent generations never share one, so never share server state), runs the denoising loop
//! off the async executor, then keeps the sessions for the next generation (`sessions`) or, after
//! an error, closes them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::Tensor;

use crate::client::options::ObfuscationOptions;
use crate::client::options::{image_from_png, mask_from_png, DEFAULT_STRENGTH};
use crate::client::pipeline::{image_to_png, GenerateOptions, LoadRole, StableDiffusion};
use crate::client::preview::LatentPreview;
use crate::obfuscation::ObfuscationKey;
use crate::placement::backend::ShardBackend;
use crate::transport::{compression_for, ClientOptions, ReplicaSet, TrafficTotals};
use crate::wire::manifest::{component_hashes, resolve_unet_identity};
use crate::wire::ModelId;

use super::config::{check_generation, GenerationOptions, Validated, VeilConfig};
use super::error::VeilError;
use super::key::load_or_create_obfuscation_key;
use super::report::{GenerationStats, PrivacyReport, ServerTraffic};
use super::sessions::Sessions;
use super::types::Policy;

/// A small preview of the image being denoised: the latents projected to RGB on the phone
/// (`client::preview`), 1/8 of the image's size.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct StepPreview {
    /// PNG-encoded RGB.
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// Told after every denoising step, from the thread running the generation (not the caller's
/// thread); keep it quick and thread-safe. `preview` is set on the steps
/// `GenerationOptions::preview_every_steps` asks for.
#[cfg_attr(feature = "uniffi", uniffi::export(with_foreign))]
pub trait ProgressListener: Send + Sync {
    fn on_progress(&self, step: u32, total: u32, preview: Option<StepPreview>);
}

/// Cancels a generation between denoising steps. Swift's `Task.cancel()` and Kotlin's
/// coroutine cancellation do not reach Rust, so the SDK takes an explicit handle; the Swift and
/// Kotlin wrappers wire their own cancellation to it. Cancelling before a run starts makes it
/// return `Cancelled` at once; cancelling after it finished changes nothing.
#[derive(Debug, Clone, Default)]
pub struct CancelHandle(Arc<AtomicBool>);

impl CancelHandle {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A finished image.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct GeneratedImage {
    /// PNG-encoded RGB.
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// The seed used (drawn at random when the options gave none): pass it back to reproduce.
    pub seed: u64,
    pub stats: GenerationStats,
    /// What each server received.
    pub privacy: PrivacyReport,
}

/// The SDK client. Cheap to clone (shares the loaded model); `Send + Sync`, so one instance
/// serves concurrent generations.
#[derive(Clone)]
pub struct Veil {
    inner: Arc<Inner>,
}

struct Inner {
    sd: StableDiffusion,
    model_id: ModelId,
    config: Validated,
    /// The policy as the app named it.
    policy: Policy,
    /// The `obfuscated` policy's settings, loaded once (lexicon, device U-Net) with the user's
    /// obfuscation key, read from (or created at) `obfuscation_key_file` (`None`: the
    /// per-process key).
    obfuscation: ObfuscationOptions,
    /// The latent-to-RGB projection of previews, fitted to the VAE at the first preview.
    preview: OnceLock<Result<LatentPreview, String>>,
    /// The endpoint and the sessions kept between generations.
    sessions: Sessions,
}

impl std::fmt::Debug for Veil {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Veil")
            .field("model_dir", &self.inner.config.model_dir)
            .field("policy", &self.inner.policy)
            .field("servers", &self.inner.config.servers.len())
            .finish()
    }
}

/// The `obfuscated` settings of `config`, loaded: lexicon files and the device U-Net.
fn obfuscation_options(
    config: &VeilConfig,
    key: Option<Arc<ObfuscationKey>>,
    device: &candle_core::Device,
) -> Result<ObfuscationOptions, VeilError> {
    use crate::client::options::DeviceUNet;
    use crate::obfuscation::Lexicon;
    let o = &config.obfuscation;
    let mut options = ObfuscationOptions {
        server_steps: o.server_steps.map(|k| k as usize),
        k_max: Some(o.k_max as usize),
        key,
        ..Default::default()
    };
    if config.policy != Policy::Obfuscated {
        return Ok(options);
    }
    if !o.lexicon_files.is_empty() || !o.builtin_lexicon {
        let mut lex = match o.builtin_lexicon {
            true => Lexicon::builtin().map_err(|e| VeilError::internal(e.to_string()))?,
            false => Lexicon::default(),
        };
        for p in &o.lexicon_files {
            let more = Lexicon::from_file(p).map_err(|e| {
                VeilError::config(format!("obfuscation lexicon {}: {e}", p.display()))
            })?;
            lex.extend(more);
        }
        options.lexicon = Some(Arc::new(lex));
    }
    if let Some(dir) = &o.device_model_dir {
        let unet = DeviceUNet::load(dir, device).map_err(VeilError::from_load)?;
        options.device_unet = Some(Arc::new(unet));
    }
    Ok(options)
}

impl Veil {
    /// Validates `config` (nothing is read before it passes), reads or creates the obfuscation
    /// key file if one is named, then loads the model. Blocking: call it off the UI thread.
    pub fn new(config: VeilConfig) -> Result<Self, VeilError> {
        let validated = config.validate()?;
        let key = match &validated.obfuscation_key_file {
            Some(path) => Some(Arc::new(load_or_create_obfuscation_key(path)?)),
            None => None,
        };
        if !validated.model_dir.is_dir() {
            return Err(VeilError::ModelLoad {
                detail: format!(
                    "model folder {} does not exist",
                    validated.model_dir.display()
                ),
            });
        }
        let (device, _fallback) = validated.device.select().map_err(VeilError::from_load)?;
        // Only what the phone runs is read (`LoadRole::Phone`); the identity the handshake
        // carries comes from the folder's manifest, so the servers' weights stay unread.
        let role = LoadRole::Phone {
            policy: validated.policy,
            servers: validated.servers.len(),
        };
        let dir = &validated.model_dir;
        let mut sd = StableDiffusion::load_for(dir, &device, role).map_err(VeilError::from_load)?;
        for l in &config.lora {
            sd = sd
                .with_lora(&l.path, l.scale)
                .map_err(VeilError::from_load)?;
        }
        // A full-model server (`obfuscated`) answers for the text encoder, tokenizer and
        // scheduler too; servers merged the same adapters into their base weights.
        let model_id = match config.policy {
            Policy::Obfuscated => resolve_unet_identity(dir)
                .and_then(|(id, _)| Ok(sd.full_identity(&id, &component_hashes(dir)?))),
            _ => resolve_unet_identity(dir).map(|(id, _)| sd.adapted_identity(&id)),
        }
        .map_err(VeilError::from_load)?;
        let obfuscation = obfuscation_options(&config, key, &device)?;
        let veil = Self {
            inner: Arc::new(Inner {
                sd,
                model_id,
                config: validated,
                policy: config.policy,
                obfuscation,
                preview: OnceLock::new(),
                sessions: Sessions::default(),
            }),
        };
        // A default size the model cannot take is a config error, not a first-generate error.
        let (w, h) = veil.inner.size(None, None);
        veil.inner
            .sd
            .latent_size(w, h)
            .map_err(|e| VeilError::config(format!("defaults: {e}")))?;
        Ok(veil)
    }

    /// Ends the sessions kept for the next generation (an app going to the background); the
    /// next `generate` connects again. Dropping the `Veil` ends them too.
    pub async fn disconnect(&self) {
        self.inner.sessions.close().await;
    }

    /// The placement policy.
    pub fn policy(&self) -> Policy {
        self.inner.policy
    }

    /// The default image size in pixels (width, height).
    pub fn default_size(&self) -> (u32, u32) {
        let (w, h) = self.inner.size(None, None);
        (w as u32, h as u32)
    }

    /// Generates one image. The model work runs on a blocking thread of the current tokio
    /// runtime (never on its async workers), so this future is cheap to poll; `progress` is
    /// told after every step; `cancel` is checked before every step.
    pub async fn generate(
        &self,
        prompt: &str,
        options: &GenerationOptions,
        progress: Option<Arc<dyn ProgressListener>>,
        cancel: &CancelHandle,
    ) -> Result<GeneratedImage, VeilError> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| VeilError::internal("Veil::generate must run inside a tokio runtime"))?;
        let inner = self.inner.clone();
        let prompt = prompt.to_owned();
        let options = options.clone();
        let cancel = cancel.clone();
        tokio::task::spawn_blocking(move || {
            handle.block_on(inner.generate(&prompt, &options, progress, &cancel))
        })
        .await
        .map_err(|e| VeilError::internal(format!("the generation thread failed: {e}")))?
    }
}

impl Inner {
    fn size(&self, width: Option<u32>, height: Option<u32>) -> (usize, usize) {
        let f = self.sd.vae.config.downsample_factor();
        let side = self.sd.unet.config.sample_size.unwrap_or(64) * f;
        let d = &self.config.defaults;
        let pick = |o: Option<u32>, d: Option<u32>| o.or(d).map_or(side, |v| v as usize);
        (pick(width, d.width), pick(height, d.height))
    }

    fn options(&self, prompt: &str, o: &GenerationOptions) -> Result<GenerateOptions, VeilError> {
        let d = &self.config.defaults;
        let steps = o.steps.unwrap_or(d.steps);
        let guidance = o.guidance.unwrap_or(d.guidance);
        check_generation(steps, guidance).map_err(|e| match e {
            VeilError::InvalidConfig { detail } => VeilError::InvalidRequest { detail },
            other => other,
        })?;
        let (mut width, mut height) = self.size(o.width, o.height);
        let init_image = match &o.init_image {
            Some(bytes) => {
                let image = image_from_png(bytes, &self.sd.device)?;
                let (_, h, w) = image.dims3().map_err(crate::vocab::error::Error::from)?;
                let asked = |v: Option<u32>, got: usize| v.is_some_and(|v| v as usize != got);
                if asked(o.width, w) || asked(o.height, h) {
                    return Err(VeilError::InvalidRequest {
                        detail: format!(
                            "the init image is {w}x{h}; width and height must match it or be left out"
                        ),
                    });
                }
                (width, height) = (w, h);
                Some(image)
            }
            None => None,
        };
        Ok(GenerateOptions {
            prompt: prompt.to_owned(),
            negative_prompt: o
                .negative_prompt
                .clone()
                .unwrap_or_else(|| d.negative_prompt.clone()),
            steps: steps as usize,
            guidance,
            seed: o.seed.unwrap_or_else(rand::random),
            width,
            height,
            scheduler: o.scheduler.unwrap_or(d.scheduler).into(),
            latents: None,
            init_image,
            mask: o
                .mask
                .as_ref()
                .map(|bytes| mask_from_png(bytes, &self.sd.device))
                .transpose()?,
            strength: o.strength.unwrap_or(DEFAULT_STRENGTH),
            policy: self.config.policy,
            wire: self.config.wire,
            attention_reuse_from: o.reuse_attention_from.map(|s| s as usize),
            stale_sync_from: self
                .config
                .stale_sync
                .then_some(self.config.exact_steps.max(1) as usize),
            obfuscation: self.obfuscation.clone(),
            ..Default::default()
        })
    }

    async fn connect(&self) -> Result<Vec<Arc<ReplicaSet>>, VeilError> {
        if !self.config.policy.needs_backends() {
            return Ok(Vec::new());
        }
        let c = &self.config;
        let options = ClientOptions {
            wire: c.wire,
            compression: compression_for(c.wire, c.zstd_level),
            codec: c.codec,
            exact_steps: u64::from(c.exact_steps),
            request_timeout: c.request_timeout,
            connect_timeout: c.connect_timeout,
            device: self.sd.device.clone(),
            endpoint: self.sessions.endpoint(),
            ..ClientOptions::default()
        };
        Ok(self
            .sessions
            .checkout(&c.servers, self.model_id, &options)
            .await?)
    }

    /// The preview of `latents`, or `None` (logged) if the projection or the PNG failed: a
    /// preview never fails a generation.
    fn preview(&self, latents: &Tensor) -> Option<StepPreview> {
        let projection = self.preview.get_or_init(|| {
            LatentPreview::load_or_fit(&self.config.model_dir, &self.sd.vae, &self.sd.device)
                .map_err(|e| e.to_string())
        });
        let rendered = projection
            .as_ref()
            .map_err(|e| e.clone())
            .and_then(|p| p.render(latents).map_err(|e| e.to_string()))
            .and_then(|img| {
                let png = img.to_png().map_err(|e| e.to_string())?;
                Ok(StepPreview {
                    png,
                    width: img.width,
                    height: img.height,
                })
            });
        match rendered {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!("no preview: {e}");
                None
            }
        }
    }

    async fn generate(
        &self,
        prompt: &str,
        options: &GenerationOptions,
        progress: Option<Arc<dyn ProgressListener>>,
        cancel: &CancelHandle,
    ) -> Result<GeneratedImage, VeilError> {
        let opts = self.options(prompt, options)?;
        if cancel.is_cancelled() {
            return Err(VeilError::Cancelled);
        }
        let quic = self.connect().await?;
        let before: Vec<TrafficTotals> = quic.iter().map(|b| b.traffic()).collect();
        let backends: Vec<Arc<dyn ShardBackend<Tensor>>> = quic
            .iter()
            .map(|b| b.clone() as Arc<dyn ShardBackend<Tensor>>)
            .collect();
        let every = options.preview_every_steps.filter(|&n| n > 0);
        let mut report = |p: crate::client::pipeline::Progress<'_>| {
            let Some(l) = &progress else { return };
            let (step, total) = (p.step as u32, p.total as u32);
            let due = every.is_some_and(|n| step.is_multiple_of(n) || step == total);
            let preview = if due { self.preview(p.latents) } else { None };
            l.on_progress(step, total, preview);
        };
        let result = self
            .sd
            .generate_cancellable(&opts, &backends, &mut report, &|| cancel.is_cancelled())
            .await;
        let addresses: Vec<String> = quic.iter().map(|b| b.address()).collect();
        let traffic: Vec<TrafficTotals> = quic
            .iter()
            .zip(&before)
            .map(|(b, t0)| b.traffic().since(t0))
            .collect();
        // Kept for the next generation unless something went wrong on the way (then closed:
        // the servers drop our handles at once).
        let reusable = matches!(result, Ok(_) | Err(crate::vocab::error::Error::Cancelled));
        self.sessions.checkin(quic, reusable).await;
        let generation = result.map_err(|e| VeilError::from_generation(e, &addresses))?;
        let png = image_to_png(&generation.image)?;
        let s = &generation.stats;
        let a = &generation.accounting;
        let privacy = PrivacyReport::new(
            self.policy,
            &generation.audit,
            s.unet_calls,
            &addresses,
            generation.obfuscation.as_ref(),
        );
        let per_server = addresses
            .into_iter()
            .zip(traffic)
            .enumerate()
            .map(|(i, (address, t))| ServerTraffic {
                server: i as u32,
                address,
                bytes_up: a.bytes_up_of(i),
                bytes_down: a.bytes_down_of(i),
                wire_bytes_sent: t.bytes_sent,
                wire_bytes_received: t.bytes_received,
                requests: t.requests,
                busy_seconds: t.busy_nanos as f64 * 1e-9,
            })
            .collect();
        Ok(GeneratedImage {
            png,
            width: opts.width as u32,
            height: opts.height as u32,
            seed: opts.seed,
            stats: GenerationStats {
                wall_seconds: s.wall_seconds,
                steps: s.steps as u32,
                round_trips: s.round_trips,
                bytes_up: s.bytes_up,
                bytes_down: s.bytes_down,
                device_flops: s.device_flops,
                server_flops: s.server_flops,
                per_server,
            },
            privacy,
        })
    }
}

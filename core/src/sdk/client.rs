//! `Veil`: the client an app keeps for its lifetime. It loads the model once; each `generate`
//! takes sessions with the shard servers (those the last generation kept, else new ones; two
//! concurrent generations never share one, so never share server state), runs the denoising loop
//! off the async executor, then keeps the sessions for the next generation (`sessions`) or, after
//! an error, closes them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::Tensor;

use crate::client::options::ObfuscationOptions;
use crate::client::pipeline::{image_to_png, GenerateOptions, LoadRole, StableDiffusion};
use crate::obfuscation::ObfuscationKey;
use crate::placement::backend::ShardBackend;
use crate::transport::{compression_for, ClientOptions, ReplicaSet, TrafficTotals};
use crate::wire::manifest::resolve_unet_identity;
use crate::wire::ModelId;

use super::config::{check_generation, parse_scheduler, GenerationOptions, Validated, VeilConfig};
use super::error::VeilError;
use super::key::load_or_create_obfuscation_key;
use super::sessions::Sessions;

/// Told after every denoising step, from the thread running the generation (not the caller's
/// thread); keep it quick and thread-safe.
pub trait ProgressListener: Send + Sync {
    fn on_progress(&self, step: u32, total: u32);
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

/// What one shard server cost this generation.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTraffic {
    /// Index in the server list (= its strip).
    pub server: u32,
    pub address: String,
    /// Tensor payload bytes sent to / received from it (as the runtime accounts them).
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Encoded QUIC stream bytes (framing and compression included).
    pub wire_bytes_sent: u64,
    pub wire_bytes_received: u64,
    pub requests: u64,
    /// Time spent waiting on its requests (overlaps other servers').
    pub busy_seconds: f64,
}

/// Time and traffic of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationStats {
    pub wall_seconds: f64,
    pub steps: u32,
    pub round_trips: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Multiply-accumulates done on this device / on all servers.
    pub device_flops: u64,
    pub server_flops: u64,
    pub per_server: Vec<ServerTraffic>,
}

/// A finished image.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedImage {
    /// PNG-encoded RGB.
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// The seed used (drawn at random when the options gave none): pass it back to reproduce.
    pub seed: u64,
    pub stats: GenerationStats,
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
    /// The user's obfuscation key, read from (or created at) `obfuscation_key_file`; `None`:
    /// the per-process key.
    obfuscation_key: Option<Arc<ObfuscationKey>>,
    /// The endpoint and the sessions kept between generations.
    sessions: Sessions,
}

impl std::fmt::Debug for Veil {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Veil")
            .field("model_dir", &self.inner.config.model_dir)
            .field("policy", &self.inner.config.policy.name())
            .field("servers", &self.inner.config.servers.len())
            .finish()
    }
}

impl Veil {
    /// Validates `config` (nothing is read before it passes), reads or creates the obfuscation
    /// key file if one is named, then loads the model. Blocking: call it off the UI thread.
    pub fn new(config: VeilConfig) -> Result<Self, VeilError> {
        let config = config.validate()?;
        let obfuscation_key = match &config.obfuscation_key_file {
            Some(path) => Some(Arc::new(load_or_create_obfuscation_key(path)?)),
            None => None,
        };
        if !config.model_dir.is_dir() {
            return Err(VeilError::ModelLoad {
                message: format!("model folder {} does not exist", config.model_dir.display()),
            });
        }
        let (device, _fallback) = config.device.select().map_err(VeilError::from_load)?;
        // Only what the phone runs is read (`LoadRole::Phone`); the identity the handshake
        // carries comes from the folder's manifest, so the servers' weights stay unread.
        let role = LoadRole::Phone {
            policy: config.policy,
            servers: config.servers.len(),
        };
        let sd = StableDiffusion::load_for(&config.model_dir, &device, role)
            .map_err(VeilError::from_load)?;
        let (model_id, source) =
            resolve_unet_identity(&config.model_dir).map_err(VeilError::from_load)?;
        tracing::debug!(?source, "model identity");
        let veil = Self {
            inner: Arc::new(Inner {
                sd,
                model_id,
                config,
                obfuscation_key,
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

    /// The placement policy's name.
    pub fn policy(&self) -> &'static str {
        self.inner.config.policy.name()
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
        let invalid = |e: VeilError| match e {
            VeilError::InvalidConfig { message } => VeilError::InvalidRequest { message },
            other => other,
        };
        check_generation(steps, guidance).map_err(invalid)?;
        let scheduler = match &o.scheduler {
            Some(s) => parse_scheduler(s).map_err(invalid)?,
            None => self.config.scheduler,
        };
        let (width, height) = self.size(o.width, o.height);
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
            scheduler,
            latents: None,
            policy: self.config.policy,
            wire: self.config.wire,
            attention_reuse_from: o.reuse_attention_from.map(|s| s as usize),
            stale_sync_from: self
                .config
                .stale_sync
                .then_some(self.config.exact_steps.max(1) as usize),
            // The SDK runs the split policies only: no obfuscation settings but the user's key.
            obfuscation: ObfuscationOptions {
                key: self.obfuscation_key.clone(),
                ..Default::default()
            },
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
        let mut report = |p: crate::client::pipeline::Progress<'_>| {
            if let Some(l) = &progress {
                l.on_progress(p.step as u32, p.total as u32);
            }
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
        })
    }
}

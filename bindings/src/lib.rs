//! veil-ffi: the thin UniFFI layer over veil-core's SDK facade (`veil_core::sdk`), for Swift and
//! Kotlin. Everything here is a mirror type or a conversion; behaviour lives in the core.
//!
//! - Records and the error enum mirror `veil_core::sdk` one to one (`From` both ways).
//! - `VeilClient::generate` is async: it runs on an owned multi-thread tokio runtime (QUIC I/O on
//!   its workers, model work on its blocking pool), and the foreign caller only polls a join
//!   handle, whatever executor it uses.
//! - A generation's future dropped by the foreign side (a Swift task or Kotlin coroutine that
//!   went away) cancels the generation instead of leaving it running unseen.

use std::sync::{Arc, OnceLock};

use veil_core::sdk;

uniffi::setup_scaffolding!();

mod log;
pub use log::{set_log_sink, LogLevel, LogSink};

/// The version of Veil these bindings were built from.
#[uniffi::export]
pub fn veil_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// The servers of a server list: `servers.toml` text (or the same schema as JSON), the format
/// the CLI reads too. A relative `token_file` is resolved against the current directory.
#[uniffi::export]
pub fn parse_server_list(text: String) -> Result<Vec<ServerConfig>, VeilError> {
    let configs = sdk::parse_server_configs(&text, std::path::Path::new("."))?;
    Ok(configs.into_iter().map(Into::into).collect())
}

/// The servers of a server-list file (`servers.toml` or its JSON form); a relative
/// `token_file` is resolved against the file's folder.
#[uniffi::export]
pub fn read_server_list(path: String) -> Result<Vec<ServerConfig>, VeilError> {
    let configs = sdk::read_server_configs(std::path::Path::new(&path))?;
    Ok(configs.into_iter().map(Into::into).collect())
}

/// The runtime every client shares: two I/O workers (QUIC), model work on the blocking pool.
fn runtime() -> Result<&'static tokio::runtime::Runtime, VeilError> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("veil-io")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| VeilError::Internal {
            detail: format!("cannot start the async runtime: {e}"),
        })
}

/// One shard server: `host:port`, the pinned `sha256:` certificate fingerprint, the token, and
/// optionally its tenant (servers with the same tenant are replicas of one strip).
#[derive(uniffi::Record, Clone)]
pub struct ServerConfig {
    pub address: String,
    pub fingerprint: String,
    pub token: String,
    #[uniffi(default)]
    pub tenant: Option<String>,
}

/// Defaults for every generation of a client.
#[derive(uniffi::Record, Clone)]
pub struct GenerationDefaults {
    #[uniffi(default = 30)]
    pub steps: u32,
    #[uniffi(default = 5.0)]
    pub guidance: f64,
    /// `None`: the model's native size.
    #[uniffi(default)]
    pub width: Option<u32>,
    #[uniffi(default)]
    pub height: Option<u32>,
    /// `ddim`, `dpm++2m` or `euler`.
    #[uniffi(default = "ddim")]
    pub scheduler: String,
    #[uniffi(default = "")]
    pub negative_prompt: String,
}

/// A client's configuration; validated by `VeilClient(config)` before anything is loaded.
#[derive(uniffi::Record, Clone)]
pub struct VeilConfig {
    /// A diffusers-layout Stable Diffusion folder on the device.
    pub model_dir: String,
    /// The shard servers in strip order (empty only for the `local` policy).
    pub servers: Vec<ServerConfig>,
    /// `strict` (recommended), `ppidm` or `local`.
    #[uniffi(default = "strict")]
    pub policy: String,
    /// `f32`, `f16` or `bf16`.
    #[uniffi(default = "f32")]
    pub wire: String,
    /// Byte-split zstd level on the wire, 0 = off.
    #[uniffi(default = 0)]
    pub zstd_level: i32,
    /// Lossy coding of activations on the wire: `none`, `int8`, `int4`, `residual-int4`,
    /// `residual-int2` or `residual-sign` (docs/PROTOCOL.md §8).
    #[uniffi(default = "none")]
    pub compress: String,
    /// Denoising steps, from the first, whose activations travel exact.
    #[uniffi(default = 1)]
    pub exact_steps: u32,
    /// Stale synchronisation after the exact steps: fewer round trips, lossy.
    #[uniffi(default = false)]
    pub stale_sync: bool,
    #[uniffi(default = 120.0)]
    pub request_timeout_seconds: f64,
    #[uniffi(default = 10.0)]
    pub connect_timeout_seconds: f64,
    #[uniffi(default)]
    pub defaults: GenerationDefaults,
    /// The user's obfuscation key file (`None`: none): created with a fresh random key (mode
    /// 0600) when missing, read at every later start; put it in app-private storage that
    /// survives updates (Android `filesDir`, iOS Application Support), one per user. A file
    /// that is not a key fails with `InvalidConfig` and is never replaced. See
    /// `veil_core::sdk::VeilConfig::obfuscation_key_file` for what the key protects.
    #[uniffi(default)]
    pub obfuscation_key_file: Option<String>,
    /// Where the phone's share runs: `auto` (Metal on Apple in a build with Metal, else the
    /// CPU), `cpu` or `metal`; a Metal device that cannot be created falls back to the CPU.
    #[uniffi(default = "auto")]
    pub device: String,
}

/// Per-call overrides; `None` takes the client's default (a `None` seed is drawn at random).
#[derive(uniffi::Record, Clone, Default)]
pub struct GenerationOptions {
    #[uniffi(default)]
    pub negative_prompt: Option<String>,
    #[uniffi(default)]
    pub steps: Option<u32>,
    #[uniffi(default)]
    pub guidance: Option<f64>,
    #[uniffi(default)]
    pub seed: Option<u64>,
    #[uniffi(default)]
    pub width: Option<u32>,
    #[uniffi(default)]
    pub height: Option<u32>,
    #[uniffi(default)]
    pub scheduler: Option<String>,
    #[uniffi(default)]
    pub reuse_attention_from: Option<u32>,
}

/// What one shard server cost a generation.
#[derive(uniffi::Record, Clone, Debug, PartialEq)]
pub struct ServerTraffic {
    pub server: u32,
    pub address: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub wire_bytes_sent: u64,
    pub wire_bytes_received: u64,
    pub requests: u64,
    pub busy_seconds: f64,
}

/// Time and traffic of a generation.
#[derive(uniffi::Record, Clone, Debug, PartialEq)]
pub struct GenerationStats {
    pub wall_seconds: f64,
    pub steps: u32,
    pub round_trips: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub device_flops: u64,
    pub server_flops: u64,
    pub per_server: Vec<ServerTraffic>,
}

/// A finished image: PNG bytes, its size, the seed used, and what it cost.
#[derive(uniffi::Record, Clone, Debug, PartialEq)]
pub struct GeneratedImage {
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub stats: GenerationStats,
}

/// Every failure an app can see; `server` is the index in the server list.
#[derive(uniffi::Error, thiserror::Error, Debug, Clone, PartialEq)]
pub enum VeilError {
    #[error("invalid configuration: {detail}")]
    InvalidConfig { detail: String },
    #[error("cannot load the model: {detail}")]
    ModelLoad { detail: String },
    #[error("invalid request: {detail}")]
    InvalidRequest { detail: String },
    #[error("server {server} ({address}) unreachable: {detail}")]
    Unreachable {
        server: u32,
        address: String,
        detail: String,
    },
    #[error("server {server} ({address}) refused the token")]
    AuthFailed { server: u32, address: String },
    #[error("server {server} ({address}) presented certificate sha256:{actual}, pinned sha256:{expected}")]
    CertificateMismatch {
        server: u32,
        address: String,
        expected: String,
        actual: String,
    },
    #[error("server {server} ({address}) holds a different model")]
    ModelMismatch { server: u32, address: String },
    #[error("server {server} ({address}) failed: {detail}")]
    ServerFailed {
        server: u32,
        address: String,
        detail: String,
    },
    #[error("server {server} ({address}) connection lost: {detail}")]
    ConnectionLost {
        server: u32,
        address: String,
        detail: String,
    },
    #[error("server {server} ({address}) timed out after {seconds} s")]
    Timeout {
        server: u32,
        address: String,
        seconds: f64,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("internal error: {detail}")]
    Internal { detail: String },
}

#[uniffi::export]
impl VeilError {
    /// A sentence for the user (the same text as Rust's `Display`).
    pub fn describe(&self) -> String {
        self.to_string()
    }

    /// Whether trying the same generation again may succeed (a server unreachable, busy, lost
    /// or slow); false for what needs a change first (config, token, certificate, model).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. }
                | Self::ServerFailed { .. }
                | Self::ConnectionLost { .. }
                | Self::Timeout { .. }
        )
    }
}

impl From<sdk::VeilError> for VeilError {
    fn from(e: sdk::VeilError) -> Self {
        use sdk::VeilError as E;
        match e {
            E::InvalidConfig { message } => Self::InvalidConfig { detail: message },
            E::ModelLoad { message } => Self::ModelLoad { detail: message },
            E::InvalidRequest { message } => Self::InvalidRequest { detail: message },
            E::Unreachable {
                server,
                address,
                message: detail,
            } => Self::Unreachable {
                server,
                address,
                detail,
            },
            E::AuthFailed { server, address } => Self::AuthFailed { server, address },
            E::CertificateMismatch {
                server,
                address,
                expected,
                actual,
            } => Self::CertificateMismatch {
                server,
                address,
                expected,
                actual,
            },
            E::ModelMismatch { server, address } => Self::ModelMismatch { server, address },
            E::ServerFailed {
                server,
                address,
                message: detail,
            } => Self::ServerFailed {
                server,
                address,
                detail,
            },
            E::ConnectionLost {
                server,
                address,
                message: detail,
            } => Self::ConnectionLost {
                server,
                address,
                detail,
            },
            E::Timeout {
                server,
                address,
                seconds,
            } => Self::Timeout {
                server,
                address,
                seconds,
            },
            E::Cancelled => Self::Cancelled,
            E::Internal { message } => Self::Internal { detail: message },
        }
    }
}

impl From<sdk::ServerConfig> for ServerConfig {
    fn from(s: sdk::ServerConfig) -> Self {
        Self {
            address: s.address,
            fingerprint: s.fingerprint,
            token: s.token,
            tenant: s.tenant,
        }
    }
}

impl From<ServerConfig> for sdk::ServerConfig {
    fn from(s: ServerConfig) -> Self {
        Self {
            address: s.address,
            fingerprint: s.fingerprint,
            token: s.token,
            tenant: s.tenant,
        }
    }
}

impl From<VeilConfig> for sdk::VeilConfig {
    fn from(c: VeilConfig) -> Self {
        let d = c.defaults;
        Self {
            model_dir: c.model_dir.into(),
            servers: c.servers.into_iter().map(Into::into).collect(),
            policy: c.policy,
            wire: c.wire,
            zstd_level: c.zstd_level,
            compress: c.compress,
            exact_steps: c.exact_steps,
            stale_sync: c.stale_sync,
            request_timeout_seconds: c.request_timeout_seconds,
            connect_timeout_seconds: c.connect_timeout_seconds,
            defaults: sdk::GenerationDefaults {
                steps: d.steps,
                guidance: d.guidance,
                width: d.width,
                height: d.height,
                scheduler: d.scheduler,
                negative_prompt: d.negative_prompt,
            },
            obfuscation_key_file: c.obfuscation_key_file.map(Into::into),
            device: c.device,
        }
    }
}

impl From<GenerationOptions> for sdk::GenerationOptions {
    fn from(o: GenerationOptions) -> Self {
        Self {
            negative_prompt: o.negative_prompt,
            steps: o.steps,
            guidance: o.guidance,
            seed: o.seed,
            width: o.width,
            height: o.height,
            scheduler: o.scheduler,
            reuse_attention_from: o.reuse_attention_from,
        }
    }
}

impl From<sdk::GeneratedImage> for GeneratedImage {
    fn from(g: sdk::GeneratedImage) -> Self {
        let s = g.stats;
        Self {
            png: g.png,
            width: g.width,
            height: g.height,
            seed: g.seed,
            stats: GenerationStats {
                wall_seconds: s.wall_seconds,
                steps: s.steps,
                round_trips: s.round_trips,
                bytes_up: s.bytes_up,
                bytes_down: s.bytes_down,
                device_flops: s.device_flops,
                server_flops: s.server_flops,
                per_server: s
                    .per_server
                    .into_iter()
                    .map(|t| ServerTraffic {
                        server: t.server,
                        address: t.address,
                        bytes_up: t.bytes_up,
                        bytes_down: t.bytes_down,
                        wire_bytes_sent: t.wire_bytes_sent,
                        wire_bytes_received: t.wire_bytes_received,
                        requests: t.requests,
                        busy_seconds: t.busy_seconds,
                    })
                    .collect(),
            },
        }
    }
}

/// Told after every denoising step, from a Veil worker thread (hop to the UI thread yourself).
#[uniffi::export(with_foreign)]
pub trait ProgressListener: Send + Sync {
    fn on_progress(&self, step: u32, total: u32);
}

/// Adapts a foreign listener to the core's trait.
struct Listener(Arc<dyn ProgressListener>);

impl sdk::ProgressListener for Listener {
    fn on_progress(&self, step: u32, total: u32) {
        self.0.on_progress(step, total)
    }
}

/// Cancels a generation between denoising steps (Swift's `Task.cancel()` and Kotlin's
/// coroutine cancellation do not reach Rust on their own).
#[derive(uniffi::Object, Default)]
pub struct CancelHandle(sdk::CancelHandle);

#[uniffi::export]
impl CancelHandle {
    #[uniffi::constructor]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub fn cancel(&self) {
        self.0.cancel()
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }
}

/// Cancels the generation when the foreign side drops its future before it finished.
struct CancelOnDrop(Option<sdk::CancelHandle>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.cancel();
        }
    }
}

/// The Veil client: load the model once (the constructor blocks; call it off the UI thread),
/// then `generate` as often, and as concurrently, as wanted.
#[derive(uniffi::Object)]
pub struct VeilClient {
    inner: sdk::Veil,
}

#[uniffi::export]
impl VeilClient {
    #[uniffi::constructor]
    pub fn new(config: VeilConfig) -> Result<Arc<Self>, VeilError> {
        let inner = sdk::Veil::new(config.into())?;
        Ok(Arc::new(Self { inner }))
    }

    /// The placement policy's name.
    pub fn policy(&self) -> String {
        self.inner.policy().to_string()
    }

    /// Generates one image from `prompt`. `listener` hears every step; `cancel` stops the
    /// generation before its next step with `VeilError.Cancelled`.
    pub async fn generate(
        &self,
        prompt: String,
        options: GenerationOptions,
        listener: Option<Arc<dyn ProgressListener>>,
        cancel: Option<Arc<CancelHandle>>,
    ) -> Result<GeneratedImage, VeilError> {
        let cancel = cancel.map(|c| c.0.clone()).unwrap_or_default();
        let mut guard = CancelOnDrop(Some(cancel.clone()));
        let veil = self.inner.clone();
        let options = options.into();
        let listener = listener.map(|l| Arc::new(Listener(l)) as Arc<dyn sdk::ProgressListener>);
        let task = runtime()?
            .spawn(async move { veil.generate(&prompt, &options, listener, &cancel).await });
        let result = task.await;
        guard.0 = None;
        match result {
            Ok(r) => r.map(Into::into).map_err(Into::into),
            Err(e) => Err(VeilError::Internal {
                detail: format!("the generation task failed: {e}"),
            }),
        }
    }
}

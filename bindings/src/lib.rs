//! veil-ffi: the thin UniFFI layer over veil-core's SDK facade (`veil_core::sdk`), for Swift and
//! Kotlin. The records, enums, error and progress listener are the core's own, derived behind
//! its `uniffi` feature (matrix-rust-sdk's pattern); this crate holds only what is FFI-specific:
//!
//! - `VeilClient::generate` is async: it runs on an owned multi-thread tokio runtime (QUIC I/O on
//!   its workers, model work on its blocking pool), and the foreign caller only polls a join
//!   handle, whatever executor it uses.
//! - A generation's future dropped by the foreign side (a Swift task or Kotlin coroutine that
//!   went away) cancels the generation instead of leaving it running unseen.
//! - `CancelHandle` as a foreign object; the log sink (`log`); the server-list readers.

use std::sync::{Arc, OnceLock};

use veil_core::sdk;
/// The SDK's own types, exported through their derives in veil-core.
pub use veil_core::sdk::{
    Device, GeneratedImage, GenerationDefaults, GenerationOptions, GenerationStats,
    ObfuscationConfig, ObfuscationSummary, Policy, PrivacyReport, ProgressListener, ResolutionRows,
    RowRange, Scheduler, SensitiveSpan, ServerConfig, ServerTraffic, ServerView, StepPreview,
    VeilConfig, VeilError, WireCodec, WireFormat,
};

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
    sdk::parse_server_configs(&text, std::path::Path::new("."))
}

/// The servers of a server-list file (`servers.toml` or its JSON form); a relative
/// `token_file` is resolved against the file's folder.
#[uniffi::export]
pub fn read_server_list(path: String) -> Result<Vec<ServerConfig>, VeilError> {
    sdk::read_server_configs(std::path::Path::new(&path))
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
        let inner = sdk::Veil::new(config)?;
        Ok(Arc::new(Self { inner }))
    }

    /// The placement policy.
    pub fn policy(&self) -> Policy {
        self.inner.policy()
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
        let task = runtime()?
            .spawn(async move { veil.generate(&prompt, &options, listener, &cancel).await });
        let result = task.await;
        guard.0 = None;
        match result {
            Ok(r) => r,
            Err(e) => Err(VeilError::Internal {
                detail: format!("the generation task failed: {e}"),
            }),
        }
    }
}

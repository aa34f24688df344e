//! What a `Veil` client is built from, and the checks made before anything is loaded or sent.

use std::path::PathBuf;
use std::time::Duration;

use crate::model::device::DeviceChoice;
use crate::model::scheduler::SchedulerKind;
use crate::placement::engine::WireDtype;
use crate::placement::policy::{GnVariant, Policy};
use crate::transport::{Fingerprint, ServerSpec};
use crate::vocab::precision::ShardCodec;

use super::error::VeilError;

/// One shard server: the fields of a `[[server]]` table of `servers.toml`.
#[derive(Clone, PartialEq)]
pub struct ServerConfig {
    /// `host:port`.
    pub address: String,
    /// `sha256:<64 hex digits>`, as `veil-server` prints at start.
    pub fingerprint: String,
    /// The tenant's bearer token.
    pub token: String,
    /// The tenant: servers with the same tenant are replicas of one strip (None: a strip of
    /// its own).
    pub tenant: Option<String>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("address", &self.address)
            .field("fingerprint", &self.fingerprint)
            .field("token", &"<redacted>")
            .field("tenant", &self.tenant)
            .finish()
    }
}

/// Defaults for every generation of a client; `GenerationOptions` overrides them per call.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationDefaults {
    pub steps: u32,
    /// Classifier-free guidance scale (≤ 1 turns guidance off and halves the work).
    pub guidance: f64,
    /// Image size in pixels; `None`: the U-Net's `sample_size` × the VAE factor.
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// `ddim`, `dpm++2m` or `euler`.
    pub scheduler: String,
    pub negative_prompt: String,
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        Self {
            steps: 30,
            guidance: 5.0,
            width: None,
            height: None,
            scheduler: "ddim".into(),
            negative_prompt: String::new(),
        }
    }
}

/// Per-call overrides; every `None` takes the client's default (a `None` seed draws a fresh
/// random one, reported back in `GeneratedImage::seed`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationOptions {
    pub negative_prompt: Option<String>,
    pub steps: Option<u32>,
    pub guidance: Option<f64>,
    pub seed: Option<u64>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub scheduler: Option<String>,
    /// T-GATE-style reuse of attention outputs from this step on (fewer bytes, slightly
    /// different image); `None`: recompute every step.
    pub reuse_attention_from: Option<u32>,
}

/// Everything a client needs.
#[derive(Debug, Clone, PartialEq)]
pub struct VeilConfig {
    /// A diffusers-layout Stable Diffusion folder on the device.
    pub model_dir: PathBuf,
    /// The shard servers, in strip order (empty only for `local`).
    pub servers: Vec<ServerConfig>,
    /// `strict` (each server confined to its strip; recommended), `ppidm` (the paper's split,
    /// which leaks through attention K/V: for comparison) or `local` (no servers).
    pub policy: String,
    /// Tensor dtype on the wire: `f32`, `f16` or `bf16`.
    pub wire: String,
    /// Byte-split zstd level for tensors on the wire, 0 = off.
    pub zstd_level: i32,
    /// Lossy coding of activations on the wire (docs/PROTOCOL.md §8): `none`, `int8`, `int4`,
    /// `residual-int4`, `residual-int2` or `residual-sign`. Lossy: see docs/BENCHMARKS.md for
    /// each codec's fidelity against `local`.
    pub compress: String,
    /// Denoising steps, from the first, whose activations travel exact.
    pub exact_steps: u32,
    /// Stale synchronisation after the exact steps (at least one): GroupNorm moments and halo
    /// rows one step old, so a `strict` step waits only for its attention gathers and output
    /// (fewer round trips; lossy, see docs/BENCHMARKS.md).
    pub stale_sync: bool,
    /// Longest a single request to a server may take.
    pub request_timeout_seconds: f64,
    /// Longest the QUIC + Veil handshake with a server may take.
    pub connect_timeout_seconds: f64,
    pub defaults: GenerationDefaults,
    /// Where this user's obfuscation key lives (`None`: no key file). `Veil::new` creates the
    /// file with a fresh key from the OS-seeded CSPRNG when nothing is there (mode 0600 on
    /// unix; the folder must exist) and reads it at every later start; a file it cannot read
    /// as a key (another format, a short key) fails with `InvalidConfig` and is never
    /// replaced. Keep one file per user, in app-private storage that survives updates (Android
    /// `Context.getFilesDir()`, iOS Application Support): the `obfuscated` policy picks the K
    /// candidates a request sends with this key, so that a server linking a user's requests
    /// cannot narrow an attribute the user keeps across prompts (their own gender) by
    /// intersecting them — a guarantee that lasts as long as the key. Without a file each
    /// process draws its own key, and a server that sees requests from two app launches can
    /// intersect them. (The SDK does not offer the `obfuscated` policy yet; the key is read,
    /// checked and handed to every generation now, so an app can ship its key file before.)
    pub obfuscation_key_file: Option<PathBuf>,
    /// Where the phone's share runs: `auto` (Metal on Apple targets in a build with the
    /// `metal` feature, else the CPU), `cpu` or `metal`. A Metal device that cannot be created
    /// falls back to the CPU with the reason logged.
    pub device: String,
}

impl VeilConfig {
    /// A config with the recommended settings: strict, f32 wire, no compression.
    pub fn new(model_dir: impl Into<PathBuf>, servers: Vec<ServerConfig>) -> Self {
        Self {
            model_dir: model_dir.into(),
            servers,
            policy: "strict".into(),
            wire: "f32".into(),
            zstd_level: 0,
            compress: "none".into(),
            exact_steps: 1,
            stale_sync: false,
            request_timeout_seconds: 120.0,
            connect_timeout_seconds: 10.0,
            defaults: GenerationDefaults::default(),
            obfuscation_key_file: None,
            device: "auto".into(),
        }
    }
}

/// A config whose every field has been checked and parsed.
#[derive(Debug, Clone)]
pub(crate) struct Validated {
    pub model_dir: PathBuf,
    pub servers: Vec<ServerSpec>,
    pub policy: Policy,
    pub wire: WireDtype,
    pub zstd_level: i32,
    pub codec: ShardCodec,
    pub exact_steps: u32,
    pub stale_sync: bool,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub defaults: GenerationDefaults,
    pub scheduler: SchedulerKind,
    pub obfuscation_key_file: Option<PathBuf>,
    pub device: DeviceChoice,
}

/// The zstd levels the codec accepts.
const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 0..=22;

fn seconds(what: &str, s: f64) -> Result<Duration, VeilError> {
    crate::vocab::positive_seconds(s).ok_or_else(|| {
        VeilError::config(format!(
            "{what} must be a positive number of seconds, got {s}"
        ))
    })
}

/// The SDK's policies: those of `Policy::parse` that run with shard servers alone (the
/// `obfuscated` policy needs a full-model server and a device U-Net, not offered here yet).
pub(crate) fn parse_policy(name: &str) -> Result<Policy, VeilError> {
    match Policy::parse(name, GnVariant::Exact) {
        Ok(Policy::Obfuscated) => Err(VeilError::config(
            "the SDK does not offer the obfuscated policy yet (expected strict, ppidm or local)",
        )),
        Ok(p) => Ok(p),
        // The SDK offers a subset of the parser's names: say which.
        Err(_) => Err(VeilError::config(format!(
            "unknown policy `{}` (expected strict, ppidm or local)",
            name.trim()
        ))),
    }
}

pub(crate) fn parse_scheduler(name: &str) -> Result<SchedulerKind, VeilError> {
    name.parse::<SchedulerKind>()
        .map_err(|e| VeilError::config(e.to_string()))
}

/// Checks a `host:port` shape without resolving the name (that happens at connect time).
/// Reads a server list — `servers.toml` text, or the same schema as JSON — into the SDK's
/// `ServerConfig`s: the one format the CLI, the SDK and the demos share. A relative
/// `token_file` is resolved against `base` (a file's folder; the current directory for text).
pub fn parse_server_configs(
    text: &str,
    base: &std::path::Path,
) -> Result<Vec<ServerConfig>, VeilError> {
    let specs =
        crate::transport::parse_server_list(text, base, std::path::Path::new("server list"))
            .map_err(|e| VeilError::config(e.to_string()))?;
    Ok(specs
        .into_iter()
        .map(|s| ServerConfig {
            address: s.address,
            fingerprint: s.fingerprint.to_string(),
            token: s.token,
            tenant: s.tenant,
        })
        .collect())
}

/// `parse_server_configs` of a file (`servers.toml` or its JSON form).
pub fn read_server_configs(path: &std::path::Path) -> Result<Vec<ServerConfig>, VeilError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| VeilError::config(format!("cannot read {}: {e}", path.display())))?;
    parse_server_configs(&text, path.parent().unwrap_or(std::path::Path::new(".")))
}

fn check_address(i: usize, address: &str) -> Result<(), VeilError> {
    let a = address.trim();
    let port = a.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
    match port {
        Some((host, Ok(p))) if !host.is_empty() && p != 0 => Ok(()),
        _ => Err(VeilError::config(format!(
            "server {i}: address `{address}` is not host:port"
        ))),
    }
}

impl VeilConfig {
    /// Every check that needs no file and no network. Messages name the field and the server.
    pub(crate) fn validate(&self) -> Result<Validated, VeilError> {
        let policy = parse_policy(&self.policy)?;
        if policy.needs_backends() && self.servers.is_empty() {
            return Err(VeilError::config(format!(
                "policy {} needs at least one shard server; the server list is empty",
                policy.name()
            )));
        }
        let mut servers = Vec::with_capacity(self.servers.len());
        for (i, s) in self.servers.iter().enumerate() {
            check_address(i, &s.address)?;
            let fingerprint: Fingerprint = s
                .fingerprint
                .parse()
                .map_err(|e| VeilError::config(format!("server {i}: {e}")))?;
            if s.token.trim().is_empty() {
                return Err(VeilError::config(format!("server {i}: empty token")));
            }
            servers.push(ServerSpec {
                address: s.address.trim().to_string(),
                fingerprint,
                token: s.token.trim().to_string(),
                tenant: s
                    .tenant
                    .as_deref()
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_string),
            });
        }
        let wire: WireDtype = self
            .wire
            .parse()
            .map_err(|e: crate::vocab::error::Error| VeilError::config(e.to_string()))?;
        if !ZSTD_LEVELS.contains(&self.zstd_level) {
            return Err(VeilError::config(format!(
                "zstd_level {} is outside 0..=22 (0 = off)",
                self.zstd_level
            )));
        }
        let codec: ShardCodec = self
            .compress
            .parse()
            .map_err(|e: crate::vocab::error::Error| VeilError::config(e.to_string()))?;
        if self.stale_sync && !policy.placement().resident() {
            return Err(VeilError::config(format!(
                "stale_sync needs the strict policy, not {}",
                policy.name()
            )));
        }
        let device: DeviceChoice = self
            .device
            .parse()
            .map_err(|e: crate::vocab::error::Error| VeilError::config(e.to_string()))?;
        device
            .check()
            .map_err(|e| VeilError::config(e.to_string()))?;
        let d = &self.defaults;
        check_generation(d.steps, d.guidance)?;
        let scheduler = parse_scheduler(&d.scheduler)?;
        if self
            .obfuscation_key_file
            .as_ref()
            .is_some_and(|p| p.file_name().is_none())
        {
            return Err(VeilError::config(
                "obfuscation_key_file must name a file, not a folder",
            ));
        }
        Ok(Validated {
            model_dir: self.model_dir.clone(),
            servers,
            policy,
            wire,
            zstd_level: self.zstd_level,
            codec,
            exact_steps: self.exact_steps,
            stale_sync: self.stale_sync,
            request_timeout: seconds("request_timeout_seconds", self.request_timeout_seconds)?,
            connect_timeout: seconds("connect_timeout_seconds", self.connect_timeout_seconds)?,
            defaults: d.clone(),
            scheduler,
            obfuscation_key_file: self.obfuscation_key_file.clone(),
            device,
        })
    }
}

/// The largest step count accepted (schedulers have 1000 training timesteps).
pub(crate) const MAX_STEPS: u32 = 1000;

pub(crate) fn check_generation(steps: u32, guidance: f64) -> Result<(), VeilError> {
    if steps == 0 || steps > MAX_STEPS {
        return Err(VeilError::config(format!(
            "steps must be between 1 and {MAX_STEPS}, got {steps}"
        )));
    }
    if !guidance.is_finite() || guidance < 0.0 {
        return Err(VeilError::config(format!(
            "guidance must be a finite number ≥ 0, got {guidance}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> ServerConfig {
        ServerConfig {
            address: "127.0.0.1:4433".into(),
            fingerprint: format!("sha256:{}", "ab".repeat(32)),
            token: "t".into(),
            tenant: None,
        }
    }

    fn message(e: VeilError) -> String {
        match e {
            VeilError::InvalidConfig { message } => message,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn good_config_validates() {
        let c = VeilConfig::new("m", vec![server(), server()]);
        let v = c.validate().unwrap();
        assert_eq!(v.servers.len(), 2);
        assert_eq!(v.policy, Policy::Strict);
        assert_eq!(v.servers[0].fingerprint.hex(), "ab".repeat(32));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let mut c = VeilConfig::new("m", vec![server()]);
        c.policy = "obfuscated-ish".into();
        assert!(message(c.validate().unwrap_err()).contains("unknown policy `obfuscated-ish`"));

        let c = VeilConfig::new("m", vec![]);
        assert!(message(c.validate().unwrap_err()).contains("needs at least one shard server"));
        let mut local = VeilConfig::new("m", vec![]);
        local.policy = "local".into();
        assert!(local.validate().is_ok());

        let mut s = server();
        s.fingerprint = "sha256:abc".into();
        let c = VeilConfig::new("m", vec![server(), s]);
        let m = message(c.validate().unwrap_err());
        assert!(
            m.starts_with("server 1:") && m.contains("fingerprint"),
            "{m}"
        );

        let mut s = server();
        s.address = "no-port".into();
        assert!(
            message(VeilConfig::new("m", vec![s]).validate().unwrap_err()).contains("host:port")
        );
        let mut s = server();
        s.token = "  ".into();
        assert!(
            message(VeilConfig::new("m", vec![s]).validate().unwrap_err()).contains("empty token")
        );

        let mut c = VeilConfig::new("m", vec![server()]);
        c.wire = "f8".into();
        assert!(message(c.validate().unwrap_err()).contains("f8"));
        let mut c = VeilConfig::new("m", vec![server()]);
        c.zstd_level = 40;
        assert!(message(c.validate().unwrap_err()).contains("zstd_level"));
        let mut c = VeilConfig::new("m", vec![server()]);
        c.compress = "int3".into();
        assert!(message(c.validate().unwrap_err()).contains("unknown codec `int3`"));
        c.compress = "residual-sign".into();
        c.stale_sync = true;
        let v = c.validate().expect("strict with a codec and stale sync");
        assert_eq!(v.codec, ShardCodec::ResidualSign);
        c.policy = "ppidm".into();
        assert!(message(c.validate().unwrap_err()).contains("stale_sync needs the strict"));
        let mut c = VeilConfig::new("m", vec![server()]);
        c.defaults.steps = 0;
        assert!(message(c.validate().unwrap_err()).contains("steps"));
        let mut c = VeilConfig::new("m", vec![server()]);
        c.defaults.scheduler = "plms".into();
        assert!(message(c.validate().unwrap_err()).contains("plms"));
        let mut c = VeilConfig::new("m", vec![server()]);
        c.request_timeout_seconds = 0.0;
        assert!(message(c.validate().unwrap_err()).contains("request_timeout_seconds"));
    }

    #[test]
    fn the_key_file_is_checked_before_the_model_loads() {
        let mut c = VeilConfig::new("/nonexistent/veil-model", vec![server()]);
        c.obfuscation_key_file = Some("..".into());
        assert!(message(c.validate().unwrap_err()).contains("obfuscation_key_file"));
        let path = std::env::temp_dir().join(format!("veil-sdk-key-{}", std::process::id()));
        std::fs::write(&path, "not a key").unwrap();
        c.obfuscation_key_file = Some(path.clone());
        let m = message(crate::sdk::Veil::new(c.clone()).unwrap_err());
        assert!(
            m.starts_with("obfuscation_key_file:") && m.contains("first line"),
            "{m}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"not a key");
        // A missing file is created, then the model folder is found missing.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            crate::sdk::Veil::new(c).unwrap_err(),
            VeilError::ModelLoad { .. }
        ));
        let key = crate::sdk::read_obfuscation_key(&path).unwrap();
        assert_eq!(
            crate::sdk::load_or_create_obfuscation_key(&path).unwrap(),
            key
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn debug_redacts_tokens() {
        let s = format!("{:?}", VeilConfig::new("m", vec![server()]));
        assert!(
            s.contains("<redacted>") && !s.contains("token: \"t\""),
            "{s}"
        );
    }
}

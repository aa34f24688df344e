//! What a `Veil` client is built from, and the checks made before anything is loaded or sent.

use std::path::PathBuf;
use std::time::Duration;

use crate::model::device::DeviceChoice;
use crate::placement::engine::WireDtype;
use crate::placement::policy::Policy as PlacementPolicy;
use crate::transport::{group_strips, Fingerprint, ServerSpec};
use crate::vocab::precision::ShardCodec;

use super::error::VeilError;
use super::types::{Device, Policy, Scheduler, WireCodec, WireFormat};

// Paths cross the FFI as strings (UTF-8 on both mobile platforms).
#[cfg(feature = "uniffi")]
uniffi::custom_type!(PathBuf, String, {
    remote,
    lower: |p| p.to_string_lossy().into_owned(),
    try_lift: |s| Ok(PathBuf::from(s)),
});

/// One shard server: the fields of a `[[server]]` table of `servers.toml`.
#[derive(Clone, PartialEq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct ServerConfig {
    /// `host:port`.
    pub address: String,
    /// `sha256:<64 hex digits>`, as `veil-server` prints at start.
    pub fingerprint: String,
    /// The tenant's bearer token.
    pub token: String,
    /// The tenant: servers with the same tenant are replicas of one strip (None: a strip of
    /// its own).
    #[cfg_attr(feature = "uniffi", uniffi(default))]
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
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct GenerationDefaults {
    #[cfg_attr(feature = "uniffi", uniffi(default = 30))]
    pub steps: u32,
    /// Classifier-free guidance scale (≤ 1 turns guidance off and halves the work).
    #[cfg_attr(feature = "uniffi", uniffi(default = 5.0))]
    pub guidance: f64,
    /// Image size in pixels; `None`: the U-Net's `sample_size` × the VAE factor.
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub width: Option<u32>,
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub height: Option<u32>,
    pub scheduler: Scheduler,
    #[cfg_attr(feature = "uniffi", uniffi(default = ""))]
    pub negative_prompt: String,
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        Self {
            steps: 30,
            guidance: 5.0,
            width: None,
            height: None,
            scheduler: Scheduler::Ddim,
            negative_prompt: String::new(),
        }
    }
}

/// Per-call overrides; every `None` takes the client's default (a `None` seed draws a fresh
/// random one, reported back in `GeneratedImage::seed`).
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct GenerationOptions {
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub negative_prompt: Option<String>,
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub steps: Option<u32>,
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub guidance: Option<f64>,
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub seed: Option<u64>,
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub width: Option<u32>,
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub height: Option<u32>,
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub scheduler: Option<Scheduler>,
    /// T-GATE-style reuse of attention outputs from this step on (fewer bytes, slightly
    /// different image); `None`: recompute every step.
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub reuse_attention_from: Option<u32>,
    /// A preview image (the latents projected to RGB on the phone, 1/8 of the image size) with
    /// the progress of every N-th step and of the last; `None` or 0: no previews.
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub preview_every_steps: Option<u32>,
    /// Image-to-image: the init image (PNG or JPEG bytes); its size is the image's. The phone
    /// encodes it; under `strict` each server sees only its strip of the noised latents, under
    /// `obfuscated` the server sees them whole. `None`: text-to-image.
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub init_image: Option<Vec<u8>>,
    /// Image-to-image: how much of the schedule runs, in (0, 1] (diffusers' `strength`; `None`:
    /// 0.8): the last ⌊steps × strength⌋ steps, from the init image noised to the first.
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub strength: Option<f64>,
    /// Inpainting (a model whose U-Net takes the latent, the mask and the masked image): the
    /// mask, a PNG the size of `init_image`, white (≥ 50% gray) where the image is repainted.
    /// Under `strict` each server sees only its strip of the mask and the masked image, under
    /// `obfuscated` the server sees them whole.
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub mask: Option<Vec<u8>>,
}

/// The `obfuscated` policy's settings (ignored by the other policies).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct ObfuscationConfig {
    /// k: the steps the server runs for every candidate prompt (`None`: half of the steps;
    /// 0: all on this device).
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub server_steps: Option<u32>,
    /// K max: the most candidate prompts sent.
    #[cfg_attr(feature = "uniffi", uniffi(default = 8))]
    pub k_max: u32,
    /// The U-Net of the late steps (a diffusers folder or `unet` folder with the same latent
    /// space, e.g. a distilled one); `None`: the model's own.
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub device_model_dir: Option<PathBuf>,
    /// Attribute lexicons (TOML or JSON) added to the built-in one.
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub lexicon_files: Vec<PathBuf>,
    /// Whether the built-in gender/age/ethnicity lexicon is used.
    #[cfg_attr(feature = "uniffi", uniffi(default = true))]
    pub builtin_lexicon: bool,
}

impl Default for ObfuscationConfig {
    fn default() -> Self {
        Self {
            server_steps: None,
            k_max: crate::client::options::DEFAULT_K_MAX as u32,
            device_model_dir: None,
            lexicon_files: Vec::new(),
            builtin_lexicon: true,
        }
    }
}

/// A LoRA adapter merged into the U-Net at load (safetensors, diffusers/peft or kohya naming).
/// Under `strict` the phone merges the attention layers' part; the servers must run with the
/// same adapter (`veil-server --lora`, or the part `veil lora-split` writes for them): the
/// model identity the handshake checks covers it.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct LoraConfig {
    pub path: PathBuf,
    #[cfg_attr(feature = "uniffi", uniffi(default = 1.0))]
    pub scale: f64,
}

/// Everything a client needs.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct VeilConfig {
    /// A diffusers-layout Stable Diffusion folder on the device.
    pub model_dir: PathBuf,
    /// The shard servers, in strip order (empty only for `local`; under `obfuscated`, one
    /// full-model server and its replicas).
    pub servers: Vec<ServerConfig>,
    pub policy: Policy,
    /// Lets `Policy::Ppidm` through: a research placement whose servers recover prompts.
    #[cfg_attr(feature = "uniffi", uniffi(default = false))]
    pub allow_research_policies: bool,
    /// Tensor dtype on the wire.
    pub wire: WireFormat,
    /// Byte-split zstd level for tensors on the wire, 0 = off.
    #[cfg_attr(feature = "uniffi", uniffi(default = 0))]
    pub zstd_level: i32,
    /// Lossy coding of activations on the wire (docs/PROTOCOL.md §8; see docs/BENCHMARKS.md
    /// for each codec's fidelity against `local`).
    pub codec: WireCodec,
    /// Denoising steps, from the first, whose activations travel exact.
    #[cfg_attr(feature = "uniffi", uniffi(default = 1))]
    pub exact_steps: u32,
    /// Stale synchronisation after the exact steps (at least one): GroupNorm moments and halo
    /// rows one step old, so a `strict` step waits only for its attention gathers and output
    /// (fewer round trips; lossy, see docs/BENCHMARKS.md).
    #[cfg_attr(feature = "uniffi", uniffi(default = false))]
    pub stale_sync: bool,
    /// Longest a single request to a server may take.
    #[cfg_attr(feature = "uniffi", uniffi(default = 120.0))]
    pub request_timeout_seconds: f64,
    /// Longest the QUIC + Veil handshake with a server may take.
    #[cfg_attr(feature = "uniffi", uniffi(default = 10.0))]
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
    /// intersect them.
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub obfuscation_key_file: Option<PathBuf>,
    /// The `obfuscated` policy's settings.
    pub obfuscation: ObfuscationConfig,
    /// Where the phone's share runs.
    pub device: Device,
    /// LoRA adapters merged into the U-Net at load, in order.
    #[cfg_attr(feature = "uniffi", uniffi(default))]
    pub lora: Vec<LoraConfig>,
}

impl VeilConfig {
    /// A config with the recommended settings: strict, f32 wire, no lossy codec.
    pub fn new(model_dir: impl Into<PathBuf>, servers: Vec<ServerConfig>) -> Self {
        Self {
            model_dir: model_dir.into(),
            servers,
            policy: Policy::Strict,
            allow_research_policies: false,
            wire: WireFormat::F32,
            zstd_level: 0,
            codec: WireCodec::Exact,
            exact_steps: 1,
            stale_sync: false,
            request_timeout_seconds: 120.0,
            connect_timeout_seconds: 10.0,
            defaults: GenerationDefaults::default(),
            obfuscation_key_file: None,
            obfuscation: ObfuscationConfig::default(),
            device: Device::Auto,
            lora: Vec::new(),
        }
    }
}

/// A config whose every field has been checked and parsed.
#[derive(Debug, Clone)]
pub(crate) struct Validated {
    pub model_dir: PathBuf,
    pub servers: Vec<ServerSpec>,
    pub policy: PlacementPolicy,
    pub wire: WireDtype,
    pub zstd_level: i32,
    pub codec: ShardCodec,
    pub exact_steps: u32,
    pub stale_sync: bool,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub defaults: GenerationDefaults,
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

/// The policy, with the research-only ones behind their opt-in.
fn check_policy(policy: Policy, allow_research: bool) -> Result<PlacementPolicy, VeilError> {
    if policy == Policy::Ppidm && !allow_research {
        return Err(VeilError::config(
            "policy ppidm is research only (its servers recover the prompt through attention \
             keys and values); set allow_research_policies to use it",
        ));
    }
    Ok(policy.placement())
}

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

/// Checks a `host:port` shape without resolving the name (that happens at connect time).
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
        let policy = check_policy(self.policy, self.allow_research_policies)?;
        if policy.needs_backends() && self.servers.is_empty() {
            return Err(VeilError::config(format!(
                "policy {} needs at least one shard server; the server list is empty",
                policy.name()
            )));
        }
        let servers = self.server_specs()?;
        if self.policy == Policy::Obfuscated {
            check_one_strip(&servers)?;
            if self.obfuscation.k_max == 0 {
                return Err(VeilError::config("obfuscation.k_max must be at least 1"));
            }
        }
        if !ZSTD_LEVELS.contains(&self.zstd_level) {
            return Err(VeilError::config(format!(
                "zstd_level {} is outside 0..=22 (0 = off)",
                self.zstd_level
            )));
        }
        if self.stale_sync && !policy.placement().resident() {
            return Err(VeilError::config(format!(
                "stale_sync needs the strict policy, not {}",
                policy.name()
            )));
        }
        let device = DeviceChoice::from(self.device);
        device
            .check()
            .map_err(|e| VeilError::config(e.to_string()))?;
        let d = &self.defaults;
        check_generation(d.steps, d.guidance)?;
        if self
            .obfuscation_key_file
            .as_ref()
            .is_some_and(|p| p.file_name().is_none())
        {
            return Err(VeilError::config(
                "obfuscation_key_file must name a file, not a folder",
            ));
        }
        if let Some((i, l)) = self
            .lora
            .iter()
            .enumerate()
            .find(|(_, l)| !l.scale.is_finite())
        {
            return Err(VeilError::config(format!(
                "lora {i} ({}): scale {} is not a finite number",
                l.path.display(),
                l.scale
            )));
        }
        Ok(Validated {
            model_dir: self.model_dir.clone(),
            servers,
            policy,
            wire: self.wire.into(),
            zstd_level: self.zstd_level,
            codec: self.codec.into(),
            exact_steps: self.exact_steps,
            stale_sync: self.stale_sync,
            request_timeout: seconds("request_timeout_seconds", self.request_timeout_seconds)?,
            connect_timeout: seconds("connect_timeout_seconds", self.connect_timeout_seconds)?,
            defaults: d.clone(),
            obfuscation_key_file: self.obfuscation_key_file.clone(),
            device,
        })
    }

    /// The servers, each checked (address shape, fingerprint, token).
    fn server_specs(&self) -> Result<Vec<ServerSpec>, VeilError> {
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
        Ok(servers)
    }
}

/// `obfuscated` sends everything to one full-model server: the list must be one strip (one
/// server, or replicas sharing one tenant).
fn check_one_strip(servers: &[ServerSpec]) -> Result<(), VeilError> {
    let strips = group_strips(servers).len();
    if strips > 1 {
        return Err(VeilError::config(format!(
            "policy obfuscated uses one full-model server (or replicas sharing one tenant); \
             the list has {strips} strips of different tenants"
        )));
    }
    Ok(())
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
            VeilError::InvalidConfig { detail } => detail,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn good_config_validates() {
        let c = VeilConfig::new("m", vec![server(), server()]);
        let v = c.validate().unwrap();
        assert_eq!(v.servers.len(), 2);
        assert_eq!(v.policy, PlacementPolicy::Strict);
        assert_eq!(v.servers[0].fingerprint.hex(), "ab".repeat(32));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let c = VeilConfig::new("m", vec![]);
        assert!(message(c.validate().unwrap_err()).contains("needs at least one shard server"));
        let mut local = VeilConfig::new("m", vec![]);
        local.policy = Policy::Local;
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
        c.zstd_level = 40;
        assert!(message(c.validate().unwrap_err()).contains("zstd_level"));
        let mut c = VeilConfig::new("m", vec![server()]);
        c.codec = WireCodec::ResidualSign;
        c.stale_sync = true;
        let v = c.validate().expect("strict with a codec and stale sync");
        assert_eq!(v.codec, ShardCodec::ResidualSign);
        c.policy = Policy::Ppidm;
        c.allow_research_policies = true;
        assert!(message(c.validate().unwrap_err()).contains("stale_sync needs the strict"));
        let mut c = VeilConfig::new("m", vec![server()]);
        c.defaults.steps = 0;
        assert!(message(c.validate().unwrap_err()).contains("steps"));
        let mut c = VeilConfig::new("m", vec![server()]);
        c.request_timeout_seconds = 0.0;
        assert!(message(c.validate().unwrap_err()).contains("request_timeout_seconds"));
    }

    #[test]
    fn research_policies_need_the_opt_in() {
        let mut c = VeilConfig::new("m", vec![server()]);
        c.policy = Policy::Ppidm;
        let m = message(c.validate().unwrap_err());
        assert!(
            m.contains("research only") && m.contains("allow_research_policies"),
            "{m}"
        );
        c.allow_research_policies = true;
        assert!(matches!(
            c.validate().unwrap().policy,
            PlacementPolicy::Ppidm { .. }
        ));
    }

    #[test]
    fn obfuscated_takes_one_server_or_one_tenant() {
        let mut c = VeilConfig::new("m", vec![server()]);
        c.policy = Policy::Obfuscated;
        assert_eq!(c.validate().unwrap().policy, PlacementPolicy::Obfuscated);
        c.servers.push(server());
        assert!(message(c.validate().unwrap_err()).contains("one full-model server"));
        for s in &mut c.servers {
            s.tenant = Some("a".into());
        }
        assert!(c.validate().is_ok());
        c.obfuscation.k_max = 0;
        assert!(message(c.validate().unwrap_err()).contains("k_max"));
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

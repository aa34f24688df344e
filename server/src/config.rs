//! Server configuration: a TOML file, overridden by command-line flags.
//!
//! ```toml
//! listen = "0.0.0.0:4433"
//! # metrics_listen = "127.0.0.1:9464" # Prometheus /metrics and /healthz over HTTP (private!)
//! model = "/models/sd15"            # diffusers folder; only unet/ is read
//! data_dir = "/var/lib/veil-server" # keeps cert.pem / key.pem (created on first start)
//! # cert = "cert.pem"               # a given certificate and key instead
//! # key = "key.pem"
//! token_file = "tokens.txt"         # one token per line; or: tokens = ["…", "…"]
//! device = "cpu"                    # or "cuda:0" (built with --features cuda)
//! # lora = ["lcm-lora.safetensors:1.0"] # adapters merged at load (FILE or FILE:SCALE)
//!
//! [limits]
//! max_message_bytes = 536870912
//! max_tensor_bytes = 268435456
//! max_sessions = 64
//! max_concurrent_streams = 4
//! idle_timeout_secs = 60
//! handshake_timeout_secs = 10
//! max_session_bytes = 8589934592   # resident strips per session (strict)
//! max_op_bytes = 4294967296         # one op's output and working memory, checked before it runs
//! memory_budget_bytes = 17179869184 # all sessions' running ops and kept tensors together
//! max_pending_hellos = 64           # connections owing their Hello; the oldest is closed beyond
//! max_pending_hellos_per_ip = 16    # of them from one IP; beyond, that IP's oldest is closed
//! max_sessions_per_token = 16      # one tenant token's sessions at once
//! request_grace_secs = 10           # a request stream may take this long …
//! min_request_rate = 65536          # … plus a second per this many bytes (slower: closed)
//! max_concurrent_work = 0           # requests computing at once (0: one per CPU core)
//! max_queued_work = 64              # requests waiting for a turn; more are answered Busy
//! ```
//!
//! Relative paths in the file are resolved against the file's folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Device;
use serde::Deserialize;
use veil_core::model::lora::parse_lora_arg;

use crate::server::ServerLimits;
use crate::ServerError;

/// The TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    /// HTTP address of the Prometheus metrics and the health check (off when absent).
    pub metrics_listen: Option<String>,
    pub model: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub tokens: Option<Vec<String>>,
    pub token_file: Option<PathBuf>,
    pub device: Option<String>,
    /// Load the whole model (text encoder, tokenizer, U-Net) to serve the `obfuscated`
    /// policy's early steps; without it only the shard layers' weights are read.
    pub full_model: Option<bool>,
    /// LoRA adapters merged into the model at load, each `FILE` or `FILE:SCALE`.
    pub lora: Option<Vec<String>>,
    #[serde(default)]
    pub limits: FileLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    pub max_message_bytes: Option<usize>,
    pub max_tensor_bytes: Option<usize>,
    pub max_sessions: Option<usize>,
    pub max_concurrent_streams: Option<u32>,
    pub idle_timeout_secs: Option<f64>,
    pub handshake_timeout_secs: Option<f64>,
    pub max_session_bytes: Option<u64>,
    pub max_op_bytes: Option<u64>,
    pub memory_budget_bytes: Option<u64>,
    pub max_pending_hellos: Option<usize>,
    pub max_pending_hellos_per_ip: Option<usize>,
    pub max_sessions_per_token: Option<usize>,
    pub request_grace_secs: Option<f64>,
    pub min_request_rate: Option<u64>,
    pub max_concurrent_work: Option<usize>,
    pub max_queued_work: Option<usize>,
}

impl FileConfig {
    /// Reads a config file, resolving its relative paths against its folder.
    pub fn read(path: &Path) -> Result<Self, ServerError> {
        let text = std::fs::read_to_string(path).map_err(|e| ServerError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let mut cfg: FileConfig = toml::from_str(&text)
            .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        for p in [
            &mut cfg.model,
            &mut cfg.data_dir,
            &mut cfg.cert,
            &mut cfg.key,
            &mut cfg.token_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for entry in cfg.lora.iter_mut().flatten() {
            if Path::new(entry.as_str()).is_relative() {
                *entry = base.join(entry.as_str()).to_string_lossy().into_owned();
            }
        }
        Ok(cfg)
    }
}

/// Command-line overrides (all optional; `None` keeps the file's value or the default).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub model: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub device: Option<String>,
    pub full_model: Option<bool>,
    /// Replaces the file's `lora` list when given.
    pub lora: Option<Vec<String>>,
    pub max_message_bytes: Option<usize>,
    pub max_tensor_bytes: Option<usize>,
    pub max_sessions: Option<usize>,
    pub max_concurrent_streams: Option<u32>,
    pub idle_timeout_secs: Option<f64>,
}

/// The resolved configuration of a server process.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub model: PathBuf,
    pub data_dir: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub tokens: Vec<String>,
    /// Where the tokens came from, re-read on SIGHUP (None: inline in the config file).
    pub token_file: Option<PathBuf>,
    pub device: String,
    /// Serve the `obfuscated` policy too (loads the whole model).
    pub full_model: bool,
    /// LoRA adapters merged at load: (file, scale).
    pub lora: Vec<(PathBuf, f64)>,
    pub limits: ServerLimits,
}

/// Shortest tenant token accepted: a token is the only secret between a tenant and the world.
pub const MIN_TOKEN_CHARS: usize = 32;

/// Logs a warning when a secret file (tokens, the TLS key) is readable by its group or others.
pub fn warn_if_shared(path: &Path, what: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            let mode = m.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "the {what} is accessible to its group or others; chmod 600 it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (path, what);
}

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4433";
/// Default data directory (relative to the working directory).
pub const DEFAULT_DATA_DIR: &str = "veil-server-data";

fn secs(what: &str, v: f64) -> Result<Duration, ServerError> {
    veil_core::vocab::positive_seconds(v)
        .ok_or_else(|| ServerError::Config(format!("{what} must be a positive number of seconds")))
}

impl Config {
    /// Merges the file (if any) and the overrides; reads the token file.
    pub fn resolve(file: Option<FileConfig>, o: Overrides) -> Result<Self, ServerError> {
        let f = file.unwrap_or_default();
        let listen_s = o
            .listen
            .or(f.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen_s.parse().map_err(|e| {
            ServerError::Config(format!("listen address `{listen_s}` (ip:port): {e}"))
        })?;
        let metrics_listen = match o.metrics_listen.or(f.metrics_listen) {
            Some(m) => Some(m.parse().map_err(|e| {
                ServerError::Config(format!("metrics address `{m}` (ip:port): {e}"))
            })?),
            None => None,
        };
        let model = o.model.or(f.model).ok_or_else(|| {
            ServerError::Config("no model folder (--model DIR or `model` in the config)".into())
        })?;
        let mut tokens = Vec::new();
        let token_file = o.token_file.or(f.token_file);
        match &token_file {
            Some(tf) => {
                warn_if_shared(tf, "token file");
                tokens.extend(veil_core::transport::read_token_file(tf)?)
            }
            None => tokens.extend(f.tokens.unwrap_or_default()),
        }
        if let Some(short) = tokens.iter().find(|t| t.chars().count() < MIN_TOKEN_CHARS) {
            return Err(ServerError::Config(format!(
                "a tenant token of {} characters: at least {MIN_TOKEN_CHARS} are needed (e.g. \
                 `openssl rand -hex 32`)",
                short.chars().count()
            )));
        }
        if tokens.is_empty() {
            return Err(ServerError::Config(
                "no tenant tokens (--token-file FILE, or `tokens`/`token_file` in the config)"
                    .into(),
            ));
        }
        let d = ServerLimits::default();
        let fl = f.limits;
        let limits = ServerLimits {
            max_message_bytes: o
                .max_message_bytes
                .or(fl.max_message_bytes)
                .unwrap_or(d.max_message_bytes),
            max_tensor_bytes: o
                .max_tensor_bytes
                .or(fl.max_tensor_bytes)
                .unwrap_or(d.max_tensor_bytes),
            max_sessions: o.max_sessions.or(fl.max_sessions).unwrap_or(d.max_sessions),
            max_concurrent_streams: o
                .max_concurrent_streams
                .or(fl.max_concurrent_streams)
                .unwrap_or(d.max_concurrent_streams),
            idle_timeout: match o.idle_timeout_secs.or(fl.idle_timeout_secs) {
                Some(s) => secs("idle_timeout_secs", s)?,
                None => d.idle_timeout,
            },
            handshake_timeout: match fl.handshake_timeout_secs {
                Some(s) => secs("handshake_timeout_secs", s)?,
                None => d.handshake_timeout,
            },
            max_session_bytes: fl.max_session_bytes.unwrap_or(d.max_session_bytes),
            max_op_bytes: fl.max_op_bytes.unwrap_or(d.max_op_bytes),
            memory_budget_bytes: fl.memory_budget_bytes.unwrap_or(d.memory_budget_bytes),
            max_pending_hellos: fl.max_pending_hellos.unwrap_or(d.max_pending_hellos),
            max_pending_hellos_per_ip: fl
                .max_pending_hellos_per_ip
                .unwrap_or(d.max_pending_hellos_per_ip),
            max_sessions_per_token: fl
                .max_sessions_per_token
                .unwrap_or(d.max_sessions_per_token),
            request_grace: match fl.request_grace_secs {
                Some(s) => secs("request_grace_secs", s)?,
                None => d.request_grace,
            },
            min_request_rate: fl.min_request_rate.unwrap_or(d.min_request_rate),
            max_concurrent_work: fl.max_concurrent_work.unwrap_or(d.max_concurrent_work),
            max_queued_work: fl.max_queued_work.unwrap_or(d.max_queued_work),
        };
        if limits.max_sessions == 0
            || limits.max_concurrent_streams == 0
            || limits.max_message_bytes == 0
            || limits.max_tensor_bytes == 0
            || limits.max_session_bytes == 0
            || limits.max_op_bytes == 0
            || limits.memory_budget_bytes == 0
            || limits.max_pending_hellos == 0
            || limits.max_pending_hellos_per_ip == 0
            || limits.max_sessions_per_token == 0
            || limits.min_request_rate == 0
        {
            return Err(ServerError::Config("limits must be positive".into()));
        }
        Ok(Self {
            listen,
            metrics_listen,
            model,
            data_dir: o
                .data_dir
                .or(f.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            cert: o.cert.or(f.cert),
            key: o.key.or(f.key),
            full_model: o.full_model.or(f.full_model).unwrap_or(false),
            lora: o
                .lora
                .or(f.lora)
                .unwrap_or_default()
                .iter()
                .map(|s| parse_lora_arg(s).map_err(|e| ServerError::Config(format!("lora: {e}"))))
                .collect::<Result<_, _>>()?,
            tokens,
            token_file,
            device: o.device.or(f.device).unwrap_or_else(|| "cpu".to_string()),
            limits,
        })
    }
}

/// `cpu`, `cuda` or `cuda:N` (CUDA only in builds with the `cuda` feature).
pub fn parse_device(s: &str) -> Result<Device, ServerError> {
    let s = s.trim();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| ServerError::Config(format!("device `{s}`: expected cpu or cuda:N")))?,
        None => {
            return Err(ServerError::Config(format!(
                "device `{s}`: expected cpu or cuda:N"
            )))
        }
    };
    cuda_device(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device, ServerError> {
    Device::new_cuda(ordinal).map_err(|e| ServerError::Config(format!("cuda:{ordinal}: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<Device, ServerError> {
    Err(ServerError::Config(format!(
        "cuda:{ordinal}: this veil-server was built without the `cuda` feature"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("veil-server-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("tokens.txt"), "# tenants\nt1-0123456789abcdef0123456789abcdef\n\nt2-0123456789abcdef0123456789abcdef\n").expect("tokens");
        let path = dir.join("server.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:5000\"\nmodel = \"m\"\ntoken_file = \"tokens.txt\"\n\
             [limits]\nmax_sessions = 3\nidle_timeout_secs = 2.5\n",
        )
        .expect("config");
        let file = FileConfig::read(&path).expect("read");
        let c = Config::resolve(
            Some(file),
            Overrides {
                listen: Some("127.0.0.1:0".into()),
                max_concurrent_streams: Some(9),
                ..Default::default()
            },
        )
        .expect("resolve");
        assert_eq!(c.listen, "127.0.0.1:0".parse::<SocketAddr>().expect("addr"));
        assert_eq!(c.model, dir.join("m"));
        assert_eq!(
            c.tokens,
            vec![
                "t1-0123456789abcdef0123456789abcdef".to_string(),
                "t2-0123456789abcdef0123456789abcdef".to_string()
            ]
        );
        assert_eq!(c.limits.max_sessions, 3);
        assert_eq!(c.limits.max_concurrent_streams, 9);
        assert_eq!(c.limits.idle_timeout, Duration::from_millis(2500));
        assert_eq!(c.device, "cpu");

        let long = "a".repeat(MIN_TOKEN_CHARS);
        let inline: FileConfig = toml::from_str(&format!("model = \"m\"\ntokens = [\"{long}\"]\n"))
            .expect("inline tokens");
        assert_eq!(
            Config::resolve(Some(inline), Overrides::default())
                .expect("resolve")
                .tokens,
            vec![long.clone()]
        );
        // A token shorter than 32 characters is refused.
        let short: FileConfig =
            toml::from_str("model = \"m\"\ntokens = [\"tenant-a\"]\n").expect("short token");
        let e = Config::resolve(Some(short), Overrides::default());
        assert!(matches!(e, Err(ServerError::Config(m)) if m.contains("8 characters")));
        let none: FileConfig = toml::from_str("model = \"m\"\n").expect("no tokens");
        assert!(Config::resolve(Some(none), Overrides::default()).is_err());
        assert!(toml::from_str::<FileConfig>("modle = \"m\"\n").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The sample under server/deploy/ stays a valid config (unknown keys are refused).
    #[test]
    fn the_deploy_sample_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/server.toml");
        let f = FileConfig::read(&path).expect("server/deploy/server.toml");
        assert_eq!(f.limits.max_pending_hellos, Some(64));
        assert_eq!(f.metrics_listen.as_deref(), Some("127.0.0.1:9464"));
    }

    #[test]
    fn devices_parse() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        assert!(parse_device("gpu").is_err());
        assert!(parse_device("cuda:x").is_err());
        #[cfg(not(feature = "cuda"))]
        assert!(parse_device("cuda:0").is_err());
    }
}

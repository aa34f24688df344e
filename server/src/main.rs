//! `veil-server`: the shard server each cloud tenant runs.
//!
//! ```text
//! veil-server --model DIR --token-file tokens.txt [--listen 0.0.0.0:4433] [--data-dir DIR]
//!             [--config server.toml] [--cert cert.pem --key key.pem] [--device cpu|cuda:N]
//!             [--max-message-bytes N] [--max-sessions N] [--max-concurrent-streams N]
//!             [--idle-timeout SECS]
//! veil-server fingerprint [--data-dir DIR | --cert cert.pem]
//! ```
//!
//! At start it prints `fingerprint sha256:<hex>` on its own line (stdout); clients pin it in
//! `servers.toml`. Logs go to stderr (`RUST_LOG` filters; default `info`), as text or as one
//! JSON object per line (`--log-format json`). Every flag can also be given as an environment
//! variable `VEIL_SERVER_<FLAG>` (e.g. `VEIL_SERVER_TOKEN_FILE`); a flag wins over the
//! variable, both over the TOML file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use veil_server::config::{parse_device, Config, FileConfig, Overrides, DEFAULT_DATA_DIR};
use veil_server::{ServerError, ServerOptions, ShardModel, ShardServer, TlsIdentity};

#[derive(Parser)]
#[command(
    name = "veil-server",
    version,
    about = "Veil shard server: runs U-Net shard layers for phones over QUIC",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Log lines as text or as JSON objects (one per line, for log collectors).
    #[arg(long, global = true, env = "VEIL_SERVER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Print the certificate fingerprint (`fingerprint sha256:<hex>`) without serving; creates
    /// the certificate in the data directory if there is none yet.
    Fingerprint(FingerprintArgs),
}

#[derive(Args)]
struct FingerprintArgs {
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A given certificate (PEM or DER) instead of the data directory's.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// A config file whose `data_dir`/`cert` to use.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file (flags override it).
    #[arg(long, env = "VEIL_SERVER_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, ip:port (default 0.0.0.0:4433).
    #[arg(long, env = "VEIL_SERVER_LISTEN")]
    listen: Option<String>,
    /// Diffusers-layout model folder (only unet/ is read, unless --full-model).
    #[arg(long, env = "VEIL_SERVER_MODEL")]
    model: Option<PathBuf>,
    /// Keeps the self-signed certificate and key (created on first start).
    #[arg(long, env = "VEIL_SERVER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A given certificate (PEM or DER) …
    #[arg(long, env = "VEIL_SERVER_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// … and its private key.
    #[arg(long, env = "VEIL_SERVER_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Tenant tokens, one per line.
    #[arg(long, env = "VEIL_SERVER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// cpu, or cuda:N (builds with the `cuda` feature).
    #[arg(long, env = "VEIL_SERVER_DEVICE")]
    device: Option<String>,
    /// Load the whole model (text encoder, tokenizer, U-Net, scheduler) and serve the
    /// obfuscated policy's early steps as well as the shard ops.
    #[arg(long, env = "VEIL_SERVER_FULL_MODEL")]
    full_model: bool,
    /// A LoRA adapter (safetensors, diffusers or kohya naming) merged into the model at load,
    /// as FILE or FILE:SCALE (scale 1 by default); repeat for several. Clients must merge the
    /// same adapters: the model identity the handshake checks covers them.
    #[arg(long, value_name = "FILE[:SCALE]")]
    lora: Vec<String>,
    /// Serve Prometheus metrics (`/metrics`) and a health check (`/healthz`) over HTTP here,
    /// e.g. 127.0.0.1:9464 (keep it off the public network).
    #[arg(long, env = "VEIL_SERVER_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
    #[arg(long, env = "VEIL_SERVER_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<usize>,
    #[arg(long, env = "VEIL_SERVER_MAX_TENSOR_BYTES")]
    max_tensor_bytes: Option<usize>,
    #[arg(long, env = "VEIL_SERVER_MAX_SESSIONS")]
    max_sessions: Option<usize>,
    #[arg(long, env = "VEIL_SERVER_MAX_CONCURRENT_STREAMS")]
    max_concurrent_streams: Option<u32>,
    /// Seconds without any packet before a connection is dropped.
    #[arg(long, env = "VEIL_SERVER_IDLE_TIMEOUT")]
    idle_timeout: Option<f64>,
    /// On SIGTERM or Ctrl-C: seconds the open sessions may go on (new ones are refused)
    /// before the server closes them.
    #[arg(long, env = "VEIL_SERVER_DRAIN_SECONDS", default_value_t = 30.0)]
    drain_seconds: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let result = match cli.command {
        Some(Command::Fingerprint(a)) => fingerprint(a),
        None => serve(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veil-server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn fingerprint(a: FingerprintArgs) -> Result<(), ServerError> {
    let file = a.config.as_deref().map(FileConfig::read).transpose()?;
    let (file_dir, file_cert) = file.map(|f| (f.data_dir, f.cert)).unwrap_or_default();
    let fp = match a.cert.or(file_cert) {
        Some(cert) => {
            let bytes = std::fs::read(&cert).map_err(|e| ServerError::Io {
                path: cert.clone(),
                source: e,
            })?;
            use rustls::pki_types::pem::PemObject;
            let der = rustls::pki_types::CertificateDer::from_pem_slice(&bytes)
                .map(|c| c.to_vec())
                .unwrap_or(bytes);
            veil_core::transport::Fingerprint::of_der(&der)
        }
        None => {
            let dir = a
                .data_dir
                .or(file_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
            TlsIdentity::load_or_create(&dir)?.fingerprint()
        }
    };
    println!("fingerprint {fp}");
    Ok(())
}

fn serve(a: ServeArgs) -> Result<(), ServerError> {
    let drain = veil_core::vocab::positive_seconds(a.drain_seconds)
        .or((a.drain_seconds == 0.0).then_some(Duration::ZERO))
        .ok_or_else(|| ServerError::Config("--drain-seconds must be 0 or more".into()))?;
    let file = a.config.as_deref().map(FileConfig::read).transpose()?;
    let cfg = Config::resolve(
        file,
        Overrides {
            listen: a.listen,
            metrics_listen: a.metrics_listen,
            model: a.model,
            data_dir: a.data_dir,
            cert: a.cert,
            key: a.key,
            token_file: a.token_file,
            device: a.device,
            full_model: a.full_model.then_some(true),
            lora: (!a.lora.is_empty()).then_some(a.lora),
            max_message_bytes: a.max_message_bytes,
            max_tensor_bytes: a.max_tensor_bytes,
            max_sessions: a.max_sessions,
            max_concurrent_streams: a.max_concurrent_streams,
            idle_timeout_secs: a.idle_timeout,
        },
    )?;
    let identity = TlsIdentity::from_paths(cfg.cert.as_ref(), cfg.key.as_ref(), &cfg.data_dir)?;
    // The one line operators copy into the clients' servers.toml.
    println!("fingerprint {}", identity.fingerprint());
    let device = parse_device(&cfg.device)?;
    let started = Instant::now();
    let model = ShardModel::load_adapted(&cfg.model, &device, cfg.full_model, &cfg.lora)?;
    let (layers, values) = model.size();
    tracing::info!(
        model = %cfg.model.display(),
        identity = %hex::encode(model.id()),
        layers,
        parameters = values,
        seconds = started.elapsed().as_secs_f64(),
        full_model = model.serves_early_steps(),
        "loaded the model"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ServerError::Config(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async move {
        let server = ShardServer::start(
            ServerOptions {
                listen: cfg.listen,
                tokens: cfg.tokens,
                limits: cfg.limits,
                identity,
                metrics_listen: cfg.metrics_listen,
            },
            Arc::new(model),
        )?;
        // The bound address on stdout too, for `--listen 127.0.0.1:0` (tests, local clusters).
        println!("listening {}", server.local_addr());
        if let Some(m) = server.metrics_addr() {
            println!("metrics {m}");
        }
        tracing::info!(
            addr = %server.local_addr(),
            tokens = "configured",
            max_sessions = cfg.limits.max_sessions,
            "listening"
        );
        let token_file = cfg.token_file.clone();
        loop {
            tokio::select! {
                _ = shutdown_signal() => break,
                _ = reload_signal() => reload_tokens(&server, token_file.as_deref()),
            }
        }
        server.drain(drain).await;
        tracing::info!("shutting down");
        server.shutdown(Duration::from_secs(5)).await;
        Ok(())
    })
}

/// SIGHUP (never on other platforms).
async fn reload_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                hup.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP: {e}");
                std::future::pending::<()>().await
            }
        }
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await
}

/// Re-reads the token file and swaps the accepted tokens; a bad file keeps the old ones.
fn reload_tokens(server: &ShardServer, file: Option<&std::path::Path>) {
    let Some(file) = file else {
        tracing::warn!("SIGHUP: the tokens are inline in the config; restart to change them");
        return;
    };
    veil_server::config::warn_if_shared(file, "token file");
    let result = veil_core::transport::read_token_file(file)
        .map_err(ServerError::from)
        .and_then(|t| {
            let n = t.len();
            server.set_tokens(t).map(|()| n)
        });
    match result {
        Ok(n) => tracing::info!(tokens = n, file = %file.display(), "tenant tokens reloaded"),
        Err(e) => tracing::error!("tenant tokens not reloaded, the old ones stay: {e}"),
    }
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

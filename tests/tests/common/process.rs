//! A `veil-server` process for the tests that need a real one (the abuse suite, the load
//! tests): the binary named by `VEIL_SERVER_BIN` (CI: the release build) or the workspace's
//! debug build, on loopback with the tiny model, a memory budget and (optionally) a metrics
//! endpoint; its resident memory read from /proc.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use veil_core::transport::ServerSpec;
use veil_core::wire::manifest::resolve_full_model_identity;
use veil_core::wire::ModelId;

/// The identity the server process presents (it runs `--full-model`): the phone's side of it,
/// from the tiny model's manifest.
pub fn identity() -> ModelId {
    resolve_full_model_identity(&veil_tests::tiny_model()).expect("full-model identity")
}

pub const MIB: u64 = 1 << 20;
/// What the server under test may hold for all sessions together, and one op's peak.
pub const BUDGET: u64 = 256 * MIB;
pub const MAX_OP: u64 = 128 * MIB;
/// Its largest message (the zstd bomb decodes past it).
pub const MAX_MESSAGE: u64 = 8 * MIB;
pub const TOKEN: &str = "abuse-suite-0123456789abcdef0123456789abcdef";

fn server_bin() -> PathBuf {
    let bin = match std::env::var_os("VEIL_SERVER_BIN") {
        // A relative path is taken from the repository root (tests run in tests/).
        Some(b) => veil_tests::repo_root().join(b),
        None => veil_tests::repo_root().join("target/debug/veil-server"),
    };
    assert!(
        bin.is_file(),
        "{} is missing: build veil-server (cargo build -p veil-server) or set VEIL_SERVER_BIN",
        bin.display()
    );
    bin
}

pub struct Server {
    pub child: Child,
    pub spec: ServerSpec,
    /// The metrics endpoint, when asked for.
    pub metrics: Option<std::net::SocketAddr>,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Server {
    /// Starts the binary on loopback with the tiny model (`--full-model`: the obfuscated
    /// policy's early steps too) and the limits above; `metrics`: with the metrics endpoint.
    pub fn start(name: &str, metrics: bool) -> Self {
        let dir = std::env::temp_dir().join(format!("veil-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let tokens = dir.join("tokens.txt");
        std::fs::write(&tokens, format!("{TOKEN}\n")).expect("tokens");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600));
        }
        std::fs::write(
            dir.join("server.toml"),
            format!(
                "[limits]\nmemory_budget_bytes = {BUDGET}\nmax_op_bytes = {MAX_OP}\n\
                 max_session_bytes = {BUDGET}\nmax_message_bytes = {MAX_MESSAGE}\n"
            ),
        )
        .expect("config");
        let mut child = Command::new(server_bin())
            .arg("--config")
            .arg(dir.join("server.toml"))
            .arg("--model")
            .arg(veil_tests::tiny_model())
            .arg("--token-file")
            .arg(&tokens)
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen", "127.0.0.1:0", "--full-model"])
            .args(if metrics {
                &["--metrics-listen", "127.0.0.1:0"][..]
            } else {
                &[]
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start veil-server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let (mut fingerprint, mut address, mut metrics_at) = (None, None, None);
        while fingerprint.is_none() || address.is_none() || (metrics && metrics_at.is_none()) {
            let l = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the server printed its fingerprint and address");
            if let Some(f) = l.strip_prefix("fingerprint ") {
                fingerprint = Some(f.parse().expect("fingerprint"));
            } else if let Some(a) = l.strip_prefix("listening ") {
                address = Some(a.trim().to_string());
            } else if let Some(m) = l.strip_prefix("metrics ") {
                metrics_at = Some(m.trim().parse().expect("metrics address"));
            }
        }
        let spec = ServerSpec {
            address: address.expect("address"),
            fingerprint: fingerprint.expect("fingerprint"),
            token: TOKEN.into(),
            tenant: None,
        };
        Server {
            child,
            spec,
            metrics: metrics_at,
            dir,
        }
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The value of metric `name` (a counter or gauge without labels) at the metrics endpoint.
    pub async fn metric(&self, name: &str) -> u64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics.expect("started with metrics");
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).await.expect("response");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no metric {name}")) as u64
    }

    /// Resident memory (VmRSS) of the process.
    pub fn rss(&self) -> u64 {
        rss_of(self.child.id()).expect("VmRSS of a live server")
    }
}

pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// The highest resident memory of `pid`, sampled every 5 ms until `stop` is set.
pub fn sample_peak(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(rss_of(pid).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(5));
        }
        peak
    })
}

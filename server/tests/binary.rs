//! The `veil-server` binary: `fingerprint` prints the pinned line and keeps the certificate;
//! serving prints the same line, loads the tiny model's shard layers, answers a client's
//! request over QUIC exactly like the local engine, and shuts down cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use veil_core::client::pipeline::{load_unet_weights, seeded_normal};
use veil_core::model::config::ModelPaths;
use veil_core::model::unet::UNet;
use veil_core::placement::backend::{Operand, ShardCall, ShardOp, ShardRequest};
use veil_core::placement::engine::{CandleEngine, Engine, Pad};
use veil_core::transport::{connect_all, ClientOptions, ServerSpec};
use veil_core::wire::identity::model_identity;

const BIN: &str = env!("CARGO_BIN_EXE_veil-server");

fn tiny_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-random")
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("veil-server-bin-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn fingerprint_line(data_dir: &std::path::Path) -> String {
    let out = Command::new(BIN)
        .args(["fingerprint", "--data-dir"])
        .arg(data_dir)
        .output()
        .expect("run veil-server fingerprint");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).expect("utf8");
    line.trim_end().to_string()
}

fn is_fingerprint_line(l: &str) -> bool {
    l.strip_prefix("fingerprint sha256:")
        .is_some_and(|h| h.len() == 64 && h.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')))
}

#[test]
fn fingerprint_subcommand_is_stable() {
    let dir = temp_dir("fp");
    let a = fingerprint_line(&dir);
    assert!(is_fingerprint_line(&a), "{a}");
    assert_eq!(a, fingerprint_line(&dir), "the certificate is kept");
    assert!(dir.join("cert.pem").is_file() && dir.join("key.pem").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_client_and_stops_on_sigterm() {
    let dir = temp_dir("serve");
    let expected_line = fingerprint_line(&dir);
    std::fs::write(dir.join("tokens.txt"), "# tenants\ntenant-a-0123456789abcdef0123456789abcdef\ntenant-b-0123456789abcdef0123456789abcdef\n").expect("tokens");
    let mut child = Command::new(BIN)
        .arg("--model")
        .arg(tiny_model())
        .arg("--token-file")
        .arg(dir.join("tokens.txt"))
        .arg("--data-dir")
        .arg(&dir)
        .args(["--listen", "127.0.0.1:0", "--max-sessions", "4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start veil-server");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel::<String>();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(format!("out {l}"));
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("err {l}"));
        }
    });
    let mut fingerprint = None;
    let mut addr = None;
    let mut log = Vec::new();
    while fingerprint.is_none() || addr.is_none() {
        let l = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("server did not start: {log:?}"));
        if let Some(bound) = l.strip_prefix("out listening ") {
            // stdout's second line: the bound address, for `--listen …:0`.
            addr = Some(bound.trim().to_string());
        } else if let Some(out) = l.strip_prefix("out ") {
            assert!(is_fingerprint_line(out), "stdout line {out}");
            fingerprint = Some(out.to_string());
        } else if l.contains("listening") {
            addr = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .map(str::to_string);
        }
        log.push(l);
    }
    assert_eq!(fingerprint.as_deref(), Some(expected_line.as_str()));
    let fp = expected_line
        .trim_start_matches("fingerprint ")
        .parse()
        .expect("fingerprint");

    // The client's model identity from its full U-Net weights.
    let paths = ModelPaths::new(tiny_model()).expect("paths");
    let unet = UNet::new(&paths.unet_config().expect("config")).expect("unet");
    let weights = load_unet_weights(&paths.component("unet"), &unet, &Device::Cpu).expect("w");
    let id = model_identity(&unet, &weights);
    let spec = ServerSpec {
        address: addr.expect("address"),
        fingerprint: fp,
        token: "tenant-b-0123456789abcdef0123456789abcdef".into(),
        tenant: None,
    };
    let backends = connect_all(&[spec], id, &ClientOptions::default())
        .await
        .expect("connect");
    let conv = unet.convolutions()[0].clone();
    let x = seeded_normal(3, &[2, conv.in_channels, 5, 8], &Device::Cpu).expect("x");
    let pad = Pad {
        top: 1,
        bottom: 0,
        left: 1,
        right: 1,
    };
    let reply = backends[0]
        .execute(ShardRequest {
            calls: vec![ShardCall::reply(ShardOp::Conv2d {
                layer: conv.name.clone(),
                input: Operand::Inline(x.clone()),
                pad,
            })],
        })
        .await
        .expect("request");
    let local = CandleEngine::new(weights, Device::Cpu)
        .conv2d(&conv, &x, pad)
        .expect("local conv");
    let diff: f32 = (&reply.outputs[0] - &local)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d: Tensor| d.to_scalar())
        .expect("diff");
    assert_eq!(diff, 0.0);
    drop(backends);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
        log.push(l);
    }
    assert!(exit.success(), "exit {exit:?}: {log:?}");
    assert!(log.iter().any(|l| l.contains("stopped")), "{log:?}");
    assert!(
        log.iter().any(|l| l.contains(&hex_of(&id))),
        "the model identity is logged: {log:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn hex_of(id: &[u8; 32]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Configured from environment variables alone (`VEIL_SERVER_*`), with JSON logs: it starts,
/// prints its two stdout lines, and every stderr line is a JSON object; a short token in the
/// token file is refused with a clear error.
#[test]
fn environment_configuration_and_json_logs() {
    let dir = temp_dir("env");
    let tokens = dir.join("tokens.txt");
    std::fs::write(&tokens, "tenant-env-0123456789abcdef0123456789abcdef\n").expect("tokens");
    let mut child = Command::new(BIN)
        .env("VEIL_SERVER_MODEL", tiny_model())
        .env("VEIL_SERVER_TOKEN_FILE", &tokens)
        .env("VEIL_SERVER_DATA_DIR", &dir)
        .env("VEIL_SERVER_LISTEN", "127.0.0.1:0")
        .env("VEIL_SERVER_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start veil-server");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
    let first = lines.next().expect("fingerprint line");
    assert!(is_fingerprint_line(&first), "{first}");
    let second = lines.next().expect("listening line");
    assert!(second.starts_with("listening 127.0.0.1:"), "{second}");
    let _ = child.kill();
    let out = child.wait_with_output().expect("stderr");
    let err = String::from_utf8_lossy(&out.stderr);
    let logs: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!logs.is_empty(), "no log lines");
    for l in logs {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.get("level").is_some(), "{l}");
    }

    std::fs::write(&tokens, "tenant-a\n").expect("short token");
    let out = Command::new(BIN)
        .env("VEIL_SERVER_MODEL", tiny_model())
        .env("VEIL_SERVER_TOKEN_FILE", &tokens)
        .env("VEIL_SERVER_DATA_DIR", &dir)
        .env("VEIL_SERVER_LISTEN", "127.0.0.1:0")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 32"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGHUP re-reads the token file: the new token is accepted, the old one refused, and a token
/// file that became invalid (too short a token) keeps the tokens in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_tenant_tokens() {
    let dir = temp_dir("hup");
    let tokens = dir.join("tokens.txt");
    let (old, new) = (
        "tenant-old-0123456789abcdef0123456789abcdef",
        "tenant-new-0123456789abcdef0123456789abcdef",
    );
    std::fs::write(&tokens, format!("{old}\n")).expect("tokens");
    let mut child = Command::new(BIN)
        .arg("--model")
        .arg(tiny_model())
        .arg("--token-file")
        .arg(&tokens)
        .arg("--data-dir")
        .arg(&dir)
        .args(["--listen", "127.0.0.1:0", "--drain-seconds", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start veil-server");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
    let fp = lines
        .next()
        .and_then(|l| l.strip_prefix("fingerprint ").map(str::to_string))
        .expect("fingerprint line")
        .parse()
        .expect("fingerprint");
    let address = lines
        .next()
        .and_then(|l| l.strip_prefix("listening ").map(str::to_string))
        .expect("listening line");
    let paths = ModelPaths::new(tiny_model()).expect("paths");
    let unet = UNet::new(&paths.unet_config().expect("config")).expect("unet");
    let weights = load_unet_weights(&paths.component("unet"), &unet, &Device::Cpu).expect("w");
    let id = model_identity(&unet, &weights);
    let with = |token: &str| ServerSpec {
        address: address.clone(),
        fingerprint: fp,
        token: token.to_string(),
        tenant: None,
    };
    let connects = |token: &'static str| {
        let spec = with(token);
        async move {
            connect_all(&[spec], id, &ClientOptions::default())
                .await
                .is_ok()
        }
    };
    assert!(connects(old).await);
    assert!(!connects(new).await);
    let hup = |pid: u32| {
        let st = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill -HUP");
        assert!(st.success());
    };
    std::fs::write(&tokens, format!("{new}\n")).expect("new tokens");
    hup(child.id());
    let t = std::time::Instant::now();
    while !connects(new).await {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the new token was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!connects(old).await, "the old token still works");
    // A file with a short token is refused; the tokens in force stay.
    std::fs::write(&tokens, "short\n").expect("bad tokens");
    hup(child.id());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(connects(new).await);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

//! The SDK keeps its sessions between generations: two images from one `Veil` cost each server
//! one handshake, not two, and equal the image a fresh client makes; a server restarted in
//! between (same address and certificate) is reconnected, that strip only; kept sessions hold
//! no tensors on the servers between generations.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use veil_core::sdk::{CancelHandle, GenerationOptions, ServerConfig, Veil, VeilConfig};
use veil_server::{ServerLimits, ServerOptions, ShardModel, ShardServer, TlsIdentity};
use veil_tests::tiny_model;

mod common;

const TOKEN: &str = "session-reuse-0123456789abcdef0123456789abcdef";

fn options(listen: SocketAddr, identity: &TlsIdentity) -> ServerOptions {
    ServerOptions {
        listen,
        tokens: vec![TOKEN.into()],
        limits: ServerLimits::default(),
        identity: identity.clone(),
        metrics_listen: None,
    }
}

fn start(listen: SocketAddr, identity: &TlsIdentity, model: &Arc<ShardModel>) -> ShardServer {
    ShardServer::start(options(listen, identity), model.clone()).expect("server")
}

fn veil(servers: &[ShardServer]) -> Veil {
    let configs = servers
        .iter()
        .map(|s| ServerConfig {
            address: s.local_addr().to_string(),
            fingerprint: s.fingerprint().to_string(),
            token: TOKEN.into(),
            tenant: None,
        })
        .collect();
    let mut cfg = VeilConfig::new(tiny_model(), configs);
    cfg.defaults.steps = 3;
    cfg.defaults.scheduler = veil_core::sdk::Scheduler::Ddim;
    Veil::new(cfg).expect("veil")
}

async fn png(veil: &Veil) -> Vec<u8> {
    let o = GenerationOptions {
        seed: Some(5),
        ..Default::default()
    };
    veil.generate("a small red circle", &o, None, &CancelHandle::new())
        .await
        .expect("generate")
        .png
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_reuse_their_sessions_and_a_restarted_server_is_reconnected() {
    let model = Arc::new(ShardModel::load(&tiny_model(), &Device::Cpu).expect("shard model"));
    let ids: Vec<TlsIdentity> = (0..2)
        .map(|_| TlsIdentity::generate().expect("certificate"))
        .collect();
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut servers: Vec<ShardServer> = ids.iter().map(|id| start(any, id, &model)).collect();
    let client = veil(&servers);
    let first = png(&client).await;
    let second = png(&client).await;
    assert_eq!(first, second, "the same seed over kept sessions");
    for (i, s) in servers.iter().enumerate() {
        let st = s.stats();
        assert_eq!(st.sessions, 1, "server {i}: one handshake for two images");
        assert!(st.requests > 0);
        assert_eq!(
            s.memory_in_use(),
            0,
            "server {i}: a kept session holds no tensors between generations"
        );
    }
    // A fresh client makes the same image.
    let fresh = veil(&servers);
    assert_eq!(png(&fresh).await, first);
    drop(fresh);

    // Server 1 restarts on its address with its certificate: the kept session is dead.
    let addr = servers[1].local_addr();
    servers.remove(1).shutdown(Duration::from_secs(1)).await;
    // The old endpoint's socket goes with its driver task, a moment after the shutdown.
    let mut restarted = None;
    for _ in 0..100 {
        match ShardServer::start(options(addr, &ids[1]), model.clone()) {
            Ok(s) => {
                restarted = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    servers.push(restarted.expect("the restarted server binds its old address"));
    let third = png(&client).await;
    assert_eq!(third, first);
    assert_eq!(
        servers[1].stats().sessions,
        1,
        "the restarted server got a new session"
    );
    assert_eq!(
        servers[0].stats().sessions,
        2,
        "server 0: its session was kept for the client's three images (plus the fresh client's)"
    );
    client.disconnect().await;
    for s in servers {
        s.shutdown(Duration::from_secs(1)).await;
    }
}

/// A kept session whose server died silently (no close frame: the session looks open) is found
/// by the next generation's first request, which times out; the strip then connects again to a
/// live replica of its tenant and the image is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_session_to_a_silently_dead_server_is_replaced() {
    let sd = common::load();
    let model = common::shard_model(&sd);
    let replicas = [
        common::spawn_killable(model.clone()),
        common::spawn_killable(model),
    ];
    let servers = replicas
        .iter()
        .map(|k| ServerConfig {
            address: k.spec.address.clone(),
            fingerprint: k.spec.fingerprint.to_string(),
            token: k.spec.token.clone(),
            tenant: Some("a".into()),
        })
        .collect();
    let mut cfg = VeilConfig::new(tiny_model(), servers);
    cfg.defaults.steps = 3;
    cfg.defaults.scheduler = veil_core::sdk::Scheduler::Ddim;
    cfg.request_timeout_seconds = 2.0;
    cfg.connect_timeout_seconds = 2.0;
    let client = Veil::new(cfg).expect("veil");
    let first = client
        .generate("a small red circle", &seed5(), None, &CancelHandle::new())
        .await
        .expect("first");
    // Kill whichever replica serves: its session stays "open" on the phone.
    let serving = first.stats.per_server[0].address.clone();
    for k in &replicas {
        if k.spec.address == serving {
            let _ = k.kill.send(());
        }
    }
    let t = std::time::Instant::now();
    let second = client
        .generate("a small red circle", &seed5(), None, &CancelHandle::new())
        .await
        .expect("the second generation goes on on the live replica");
    println!("replaced the dead kept session in {:?}", t.elapsed());
    assert_eq!(second.png, first.png);
    assert_ne!(second.stats.per_server[0].address, serving);
}

fn seed5() -> GenerationOptions {
    GenerationOptions {
        seed: Some(5),
        ..Default::default()
    }
}

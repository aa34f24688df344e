//! veil-server: the shard server each cloud tenant runs. It holds only the U-Net's shard layers
//! (convolutions and GroupNorms) and answers the phone's requests over QUIC (TLS 1.3 with a
//! self-signed, pinned certificate; a tenant token; the model identity in the handshake). The
//! protocol is in docs/PROTOCOL.md.
//!
//! - `ShardServer::start` binds and serves on the current tokio runtime (the binary, tests,
//!   `veil generate --local-servers N`).
//! - `ShardModel` loads the shard weights of a diffusers folder (or takes them from memory).
//! - `TlsIdentity` creates and keeps the certificate; `config` reads the TOML config.
//! - `spawn_local` starts N servers on loopback with fresh certificates and tokens.

mod answer;
pub mod config;
pub mod limits;
mod metrics;
pub mod model;
pub mod server;
pub mod stats;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use veil_core::transport::ServerSpec;

pub use model::ShardModel;
pub use server::{ServerLimits, ServerOptions, ServerStats, ShardServer, StatsSnapshot};
pub use tls::TlsIdentity;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] veil_core::Error),
}

/// A fresh random tenant token (256 bits, hex).
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    hex::encode(bytes)
}

/// Servers running in this process, with the specs a client needs to reach them.
#[derive(Debug)]
pub struct LocalCluster {
    pub servers: Vec<ShardServer>,
    pub specs: Vec<ServerSpec>,
}

impl LocalCluster {
    /// Shuts every server down.
    pub async fn shutdown(self) {
        for s in self.servers {
            s.shutdown(Duration::from_secs(2)).await;
        }
    }
}

/// Starts `n` shard servers on 127.0.0.1 (ephemeral ports) on the current tokio runtime, each
/// with its own fresh self-signed certificate and random token, all sharing `model`'s weights.
pub fn spawn_local(
    n: usize,
    model: Arc<ShardModel>,
    limits: ServerLimits,
) -> Result<LocalCluster, ServerError> {
    let mut servers = Vec::with_capacity(n);
    let mut specs = Vec::with_capacity(n);
    for _ in 0..n {
        let token = random_token();
        let server = ShardServer::start(
            ServerOptions {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                tokens: vec![token.clone()],
                limits,
                identity: TlsIdentity::generate()?,
                metrics_listen: None,
            },
            model.clone(),
        )?;
        specs.push(ServerSpec {
            address: server.local_addr().to_string(),
            fingerprint: server.fingerprint(),
            token,
            tenant: None,
        });
        servers.push(server);
    }
    Ok(LocalCluster { servers, specs })
}

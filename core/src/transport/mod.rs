//! The client side of the wire: QUIC connections to shard servers with pinned certificates and
//! tenant tokens, exposed to the placement runtime as `ShardBackend`s.
//!
//! - `servers`: `servers.toml` and `ServerSpec` (address, pinned fingerprint, token).
//! - `tls`: the pinned-certificate verifier, rustls/QUIC configs of both ends, transport tuning.
//! - `quic`: `QuicBackend` (one connection = one session) and `connect_all`.

pub mod link;
pub mod quic;
pub mod servers;
pub mod tls;

use std::sync::Arc;

use candle_core::Tensor;

pub use quic::{compression_for, connect_backends, ClientOptions, QuicBackend};
pub use servers::{load_server_list, parse_server_list, read_token_file, ServerSpec};
pub use tls::{Fingerprint, TransportTuning};

use crate::placement::backend::ShardBackend;
use crate::wire::ModelId;

/// Why talking to a shard server failed. Each variant names the server (its index in the
/// server list, i.e. its strip) so a user knows which tenant to look at.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("server {server} ({address}) unreachable: {message}")]
    Unreachable {
        server: usize,
        address: String,
        message: String,
    },
    #[error("server {server} ({address}) refused the tenant token")]
    AuthFailed { server: usize, address: String },
    #[error("server {server} ({address}) presented certificate sha256:{actual}, pinned sha256:{expected}")]
    CertificateMismatch {
        server: usize,
        address: String,
        expected: String,
        actual: String,
    },
    #[error(
        "server {server} ({address}) holds different weights (model {actual}, expected {expected})"
    )]
    ModelMismatch {
        server: usize,
        address: String,
        expected: String,
        actual: String,
    },
    #[error("server {server} ({address}) protocol error: {message}")]
    Protocol {
        server: usize,
        address: String,
        message: String,
    },
    #[error("server {server} ({address}) timed out after {seconds:.1} s")]
    Timeout {
        server: usize,
        address: String,
        seconds: f64,
    },
    #[error("server {server} ({address}) failed the request: {message}")]
    ServerError {
        server: usize,
        address: String,
        message: String,
    },
    /// An established session ended (the server closed it, crashed, or the link went silent
    /// past the idle timeout); its handles are gone.
    #[error("server {server} ({address}) connection lost: {message}")]
    ConnectionLost {
        server: usize,
        address: String,
        message: String,
    },
}

impl TransportError {
    /// The index of the server (strip) this error is about.
    pub fn server(&self) -> usize {
        match self {
            TransportError::Unreachable { server, .. }
            | TransportError::AuthFailed { server, .. }
            | TransportError::CertificateMismatch { server, .. }
            | TransportError::ModelMismatch { server, .. }
            | TransportError::Protocol { server, .. }
            | TransportError::Timeout { server, .. }
            | TransportError::ServerError { server, .. }
            | TransportError::ConnectionLost { server, .. } => *server,
        }
    }
}

/// Connects to every server in `specs` (concurrently; the order is the strip order), checks
/// each pinned certificate, presents each token and the expected model identity, and returns
/// one shard backend per server. Fails with the first error in strip order — `CertificateMismatch`
/// before anything but the TLS handshake was sent, `AuthFailed`, `ModelMismatch`, `Unreachable`,
/// `Timeout` or `Protocol` — and then closes the connections already made.
pub async fn connect_all(
    specs: &[ServerSpec],
    model_id: ModelId,
    options: &ClientOptions,
) -> Result<Vec<Arc<dyn ShardBackend<Tensor>>>, TransportError> {
    Ok(connect_backends(specs, model_id, options)
        .await?
        .into_iter()
        .map(|b| b as Arc<dyn ShardBackend<Tensor>>)
        .collect())
}

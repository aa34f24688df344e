//! The client side of the wire: QUIC connections to shard servers with pinned certificates and
//! tenant tokens, exposed to the placement runtime as `ShardBackend`s.
//!
//! - `servers`: `servers.toml` and `ServerSpec` (address, pinned fingerprint, token).
//! - `tls`: the pinned-certificate verifier, rustls/QUIC configs of both ends, transport tuning.
//! - `quic`: `QuicBackend` (one connection = one session) and `connect_all`.
//! - `replicas`: `ReplicaSet`, one strip's replicas of one tenant as one backend, with failover
//!   (`connect_strips`).

mod handshake;
pub mod quic;
pub mod replicas;
pub mod servers;
pub mod tls;

use std::sync::Arc;

use candle_core::Tensor;

pub use handshake::client_endpoint;
pub use quic::{compression_for, connect_backends, ClientOptions, QuicBackend, SentObserver};
pub use replicas::{connect_strips, group_strips, ReplicaSet, TrafficTotals};
pub use servers::{load_server_list, parse_server_list, read_token_file, ServerSpec};
pub use tls::{Fingerprint, TransportTuning};

pub use crate::vocab::error::TransportError;
use crate::vocab::ops::ShardBackend;
use crate::wire::ModelId;

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

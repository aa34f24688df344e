//! Reaching a shard server: resolving its address, the QUIC handshake with the pinned
//! certificate (and its typed failures), and the Hello → Welcome exchange that presents the
//! tenant token and the model identity.

use std::net::SocketAddr;
use std::time::Duration;

use quinn::{Connection, ConnectionError, Endpoint, ReadToEndError, WriteError};

use crate::transport::tls::{client_config, Fingerprint, PinnedVerifier, TransportTuning};
use crate::transport::TransportError;
use crate::wire::codec::{decode, encode, WireError};
use crate::wire::{Compression, ErrorCode, Limits, Message, ModelId, PROTOCOL_VERSION};

/// Largest handshake answer the client reads.
const MAX_HANDSHAKE_BYTES: usize = 64 << 10;

/// Identifies a server in errors.
#[derive(Debug, Clone)]
pub(crate) struct Who {
    pub(crate) server: usize,
    pub(crate) address: String,
}

impl Who {
    pub(crate) fn unreachable(&self, message: impl Into<String>) -> TransportError {
        TransportError::Unreachable {
            server: self.server,
            address: self.address.clone(),
            message: message.into(),
        }
    }
    pub(crate) fn protocol(&self, message: impl Into<String>) -> TransportError {
        TransportError::Protocol {
            server: self.server,
            address: self.address.clone(),
            message: message.into(),
        }
    }
    pub(crate) fn timeout(&self, d: Duration) -> TransportError {
        TransportError::Timeout {
            server: self.server,
            address: self.address.clone(),
            seconds: d.as_secs_f64(),
        }
    }
    pub(crate) fn lost(&self, e: &ConnectionError) -> TransportError {
        match e {
            ConnectionError::ApplicationClosed(c) => TransportError::ConnectionLost {
                server: self.server,
                address: self.address.clone(),
                message: format!(
                    "closed by the server (code {}: {})",
                    c.error_code,
                    String::from_utf8_lossy(&c.reason)
                ),
            },
            ConnectionError::TimedOut => TransportError::ConnectionLost {
                server: self.server,
                address: self.address.clone(),
                message: "no packet from the server within the idle timeout".into(),
            },
            other => TransportError::ConnectionLost {
                server: self.server,
                address: self.address.clone(),
                message: other.to_string(),
            },
        }
    }
    /// An `Error` message from the server.
    pub(crate) fn server_error(&self, code: ErrorCode, message: String) -> TransportError {
        match code {
            ErrorCode::AuthFailed => TransportError::AuthFailed {
                server: self.server,
                address: self.address.clone(),
            },
            ErrorCode::ModelMismatch => TransportError::ModelMismatch {
                server: self.server,
                address: self.address.clone(),
                expected: String::new(),
                actual: first_hex64(&message).unwrap_or_else(|| "unknown".into()),
            },
            ErrorCode::VersionMismatch | ErrorCode::Malformed | ErrorCode::WrongState => {
                self.protocol(format!("server answered {code:?}: {message}"))
            }
            ErrorCode::BadRequest | ErrorCode::Busy | ErrorCode::Internal => {
                TransportError::ServerError {
                    server: self.server,
                    address: self.address.clone(),
                    message: format!("{code:?}: {message}"),
                }
            }
        }
    }
}

/// The first run of exactly 64 hex digits in `s` (a model id in a server's message).
fn first_hex64(s: &str) -> Option<String> {
    s.split(|c: char| !c.is_ascii_hexdigit())
        .find(|w| w.len() == 64)
        .map(str::to_ascii_lowercase)
}

/// Resolves `host:port`.
async fn resolve(who: &Who) -> Result<SocketAddr, TransportError> {
    let mut addrs = tokio::net::lookup_host(who.address.as_str())
        .await
        .map_err(|e| who.unreachable(format!("cannot resolve: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| who.unreachable("the name resolves to no address"))
}

/// The host part of `host:port` (for SNI; the pinned verifier ignores it).
fn host_of(address: &str) -> &str {
    let host = match address.rsplit_once(':') {
        Some((h, _)) => h,
        None => address,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A QUIC connection with a verified, pinned certificate (no Veil handshake yet). Also what a
/// test needs to speak raw frames to a server.
pub async fn connect_quic(
    index: usize,
    address: &str,
    pin: Fingerprint,
    tuning: &TransportTuning,
) -> Result<(Endpoint, Connection), TransportError> {
    let who = Who {
        server: index,
        address: address.to_string(),
    };
    open_connection(&who, pin, tuning, None)
        .await
        .map(|(e, c, _)| (e, c))
}

/// A client endpoint (a UDP socket on an ephemeral port) for IPv4 or IPv6 servers; one can
/// carry every connection of a client (`ClientOptions::endpoint`).
pub fn client_endpoint(ipv4: bool) -> Result<Endpoint, String> {
    let bind: SocketAddr = if ipv4 {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    Endpoint::client(bind).map_err(|e| format!("cannot open a UDP socket: {e}"))
}

/// A pinned QUIC connection to `who`, on `shared` when given and of the server's address
/// family (else on an endpoint of its own); also says whether the endpoint is the shared one.
pub(crate) async fn open_connection(
    who: &Who,
    pin: Fingerprint,
    tuning: &TransportTuning,
    shared: Option<&Endpoint>,
) -> Result<(Endpoint, Connection, bool), TransportError> {
    let addr = resolve(who).await?;
    let family_of = |e: &Endpoint| e.local_addr().map(|a| a.is_ipv4() == addr.is_ipv4());
    let (endpoint, is_shared) = match shared {
        Some(e) if family_of(e).unwrap_or(false) => (e.clone(), true),
        _ => (
            client_endpoint(addr.is_ipv4()).map_err(|e| who.unreachable(e))?,
            false,
        ),
    };
    let (config, verifier) = client_config(pin, tuning).map_err(|e| who.protocol(e.to_string()))?;
    // SNI: the host when it is a valid name or address (the pinned verifier ignores it).
    let host = host_of(&who.address);
    let sni = match rustls::pki_types::ServerName::try_from(host) {
        Ok(_) => host,
        Err(_) => "veil-shard",
    };
    let connecting = endpoint
        .connect_with(config, addr, sni)
        .map_err(|e| who.unreachable(e.to_string()))?;
    match connecting.await {
        Ok(conn) => Ok((endpoint, conn, is_shared)),
        Err(e) => Err(handshake_error(who, &verifier, pin, e)),
    }
}

fn handshake_error(
    who: &Who,
    verifier: &PinnedVerifier,
    pin: Fingerprint,
    e: ConnectionError,
) -> TransportError {
    if let Some(actual) = verifier.mismatch() {
        return TransportError::CertificateMismatch {
            server: who.server,
            address: who.address.clone(),
            expected: pin.hex(),
            actual: actual.hex(),
        };
    }
    match e {
        ConnectionError::TimedOut => who.unreachable("no answer to the QUIC handshake"),
        ConnectionError::TransportError(t) => {
            who.protocol(format!("QUIC/TLS handshake failed: {t}"))
        }
        ConnectionError::ConnectionClosed(c) => {
            who.protocol(format!("handshake aborted by the server: {c}"))
        }
        other => who.unreachable(other.to_string()),
    }
}

/// Hello → Welcome on the first stream; returns the server's model identity.
pub(crate) async fn hello(
    who: &Who,
    conn: &Connection,
    token: &str,
    model_id: ModelId,
    limits: &Limits,
) -> Result<ModelId, TransportError> {
    let msg = Message::Hello {
        version: PROTOCOL_VERSION,
        token: token.to_string(),
        model_id,
    };
    let bytes = encode(&msg, Compression::None)
        .map_err(|e| who.protocol(format!("cannot encode the handshake: {e}")))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| who.lost(&e))?;
    send.write_all(&bytes).await.map_err(|e| match e {
        WriteError::ConnectionLost(c) => who.lost(&c),
        other => who.protocol(other.to_string()),
    })?;
    let _ = send.finish();
    let buf = match recv.read_to_end(MAX_HANDSHAKE_BYTES).await {
        Ok(b) => b,
        Err(ReadToEndError::Read(quinn::ReadError::ConnectionLost(c))) => return Err(who.lost(&c)),
        Err(e) => return Err(who.protocol(format!("handshake answer: {e}"))),
    };
    let small = Limits {
        max_message_bytes: MAX_HANDSHAKE_BYTES,
        ..*limits
    };
    match decode(&buf, &small) {
        Ok(Message::Welcome { version, model_id }) => {
            if version != PROTOCOL_VERSION {
                return Err(who.protocol(format!(
                    "server speaks protocol {version}, this client {PROTOCOL_VERSION}"
                )));
            }
            Ok(model_id)
        }
        Ok(Message::Error { code, message }) => Err(who.server_error(code, message)),
        Ok(other) => Err(who.protocol(format!("expected Welcome, got {}", kind_name(&other)))),
        Err(WireError::UnsupportedVersion(v)) => Err(who.protocol(format!(
            "server speaks protocol {v}, this client {PROTOCOL_VERSION}"
        ))),
        Err(e) => Err(who.protocol(format!("undecodable handshake answer: {e}"))),
    }
}

pub(crate) fn kind_name(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "Hello",
        Message::Welcome { .. } => "Welcome",
        Message::Request { .. } => "Request",
        Message::EarlySteps { .. } => "EarlySteps",
        Message::Reply { .. } => "Reply",
        Message::Error { .. } => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(host_of("127.0.0.1:4433"), "127.0.0.1");
        assert_eq!(host_of("[::1]:4433"), "::1");
        assert_eq!(host_of("shard.example:1"), "shard.example");
        let id = "ab".repeat(32);
        assert_eq!(
            first_hex64(&format!("server holds model {id}, not yours")),
            Some(id)
        );
        assert_eq!(first_hex64("no id here"), None);
    }
}

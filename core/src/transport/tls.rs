//! TLS 1.3 for the wire (rustls with the ring provider only): server certificates are
//! self-signed and the client pins the SHA-256 of the end-entity certificate (DER). The pinned
//! verifier still checks the handshake signature, so a server must hold the certificate's key.
//! Also the QUIC transport settings both ends use.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::wire::ALPN;

/// SHA-256 of a certificate's DER encoding, written `sha256:<64 lowercase hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// The 64 hex digits, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    fn matches(&self, other: &Fingerprint) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A fingerprint that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid fingerprint `{0}`: expected sha256: followed by 64 hex digits")]
pub struct BadFingerprint(pub String);

impl FromStr for Fingerprint {
    type Err = BadFingerprint;
    fn from_str(s: &str) -> Result<Self, BadFingerprint> {
        let t = s.trim();
        let digits = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .ok_or_else(|| BadFingerprint(s.to_string()))?;
        // Accept the colon-separated form some tools print (ab:cd:…) as well.
        let digits: String = digits.chars().filter(|c| *c != ':').collect();
        let mut out = [0u8; 32];
        if digits.len() != 64 {
            return Err(BadFingerprint(s.to_string()));
        }
        hex::decode_to_slice(digits.to_ascii_lowercase(), &mut out)
            .map_err(|_| BadFingerprint(s.to_string()))?;
        Ok(Self(out))
    }
}

/// The crypto provider of the wire: ring, TLS 1.3 only (set per config, never process-wide).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly the server certificate whose fingerprint is pinned, and verifies the TLS 1.3
/// handshake signature with that certificate's key. Records what the server presented so a
/// mismatch can be reported with both fingerprints.
#[derive(Debug)]
pub struct PinnedVerifier {
    pin: Fingerprint,
    presented: Mutex<Option<Fingerprint>>,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    pub fn new(pin: Fingerprint) -> Arc<Self> {
        Arc::new(Self {
            pin,
            presented: Mutex::new(None),
            provider: provider(),
        })
    }

    /// The fingerprint the server presented, once the handshake got that far.
    pub fn presented(&self) -> Option<Fingerprint> {
        self.presented.lock().ok().and_then(|g| *g)
    }

    /// Whether the server presented a certificate other than the pinned one.
    pub fn mismatch(&self) -> Option<Fingerprint> {
        self.presented().filter(|p| !p.matches(&self.pin))
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = Fingerprint::of_der(end_entity.as_ref());
        if let Ok(mut g) = self.presented.lock() {
            *g = Some(actual);
        }
        if actual.matches(&self.pin) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs below allow TLS 1.3 only; a TLS 1.2 signature is never acceptable.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// QUIC transport settings for bulk tensors.
#[derive(Debug, Clone, Copy)]
pub struct TransportTuning {
    /// Connection closes after this long without any packet.
    pub idle_timeout: Duration,
    /// Ping interval (client side) so a long server computation does not idle the link out.
    pub keep_alive: Option<Duration>,
    /// Concurrent bidirectional streams the peer may open to us.
    pub max_incoming_streams: u32,
    /// Per-stream receive window in bytes.
    pub stream_window: u32,
    /// Connection-wide receive window and send window in bytes.
    pub connection_window: u32,
}

impl Default for TransportTuning {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            keep_alive: Some(Duration::from_secs(4)),
            max_incoming_streams: 0,
            // A 5G link at 340 Mbit/s and 30 ms RTT holds ~1.3 MB in flight; loopback far more.
            // Windows of tens of MiB keep one bulk tensor stream from stalling on flow control.
            stream_window: 16 << 20,
            connection_window: 64 << 20,
        }
    }
}

impl TransportTuning {
    pub fn config(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_incoming_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok())
            .keep_alive_interval(self.keep_alive)
            .stream_receive_window(VarInt::from_u32(self.stream_window))
            .receive_window(VarInt::from_u32(self.connection_window))
            .send_window(u64::from(self.connection_window))
            .datagram_receive_buffer_size(None);
        t
    }
}

/// A rustls/QUIC configuration failure (not a network error).
#[derive(Debug, thiserror::Error)]
#[error("TLS configuration: {0}")]
pub struct TlsConfigError(pub String);

/// A QUIC client config that pins `pin`; returns the verifier to inspect after a failure.
pub fn client_config(
    pin: Fingerprint,
    tuning: &TransportTuning,
) -> Result<(quinn::ClientConfig, Arc<PinnedVerifier>), TlsConfigError> {
    let verifier = PinnedVerifier::new(pin);
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsConfigError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsConfigError(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(tuning.config()));
    Ok((cfg, verifier))
}

/// A QUIC server config presenting `cert` (DER) with `key`.
pub fn server_config(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    tuning: &TransportTuning,
) -> Result<quinn::ServerConfig, TlsConfigError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsConfigError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| TlsConfigError(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsConfigError(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(tuning.config()));
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_and_print() {
        let f = Fingerprint::of_der(b"certificate");
        let s = f.to_string();
        assert!(s.starts_with("sha256:") && s.len() == 7 + 64);
        assert_eq!(s.parse::<Fingerprint>().ok(), Some(f));
        assert_eq!(
            s.to_uppercase()
                .replacen("SHA256", "sha256", 1)
                .parse::<Fingerprint>()
                .ok(),
            Some(f)
        );
        for bad in [
            "",
            "sha256:",
            "md5:00",
            &s[..s.len() - 1],
            &format!("{s}0"),
            "sha256:zz",
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad}");
        }
    }
}

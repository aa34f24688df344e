//! The server's TLS identity: a self-signed certificate (rcgen, ECDSA P-256) created on first
//! start in the data directory and kept there, or a given certificate and key (PEM or DER).
//! Clients pin the certificate's SHA-256 fingerprint.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use veil_core::transport::Fingerprint;

use crate::ServerError;

/// File names inside a data directory.
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

/// A certificate and its private key.
#[derive(Debug)]
pub struct TlsIdentity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn io_err(path: &Path, e: std::io::Error) -> ServerError {
    ServerError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

impl TlsIdentity {
    /// A fresh self-signed certificate for `veil-shard` and `localhost` (names are not checked by
    /// Veil clients, which pin the fingerprint).
    pub fn generate() -> Result<Self, ServerError> {
        let ck = rcgen::generate_simple_self_signed(vec![
            "veil-shard".to_string(),
            "localhost".to_string(),
        ])
        .map_err(|e| ServerError::Tls(format!("cannot create a certificate: {e}")))?;
        Ok(Self {
            cert: ck.cert.der().clone(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der())),
        })
    }

    /// The certificate's SHA-256 fingerprint (what clients pin).
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_der(self.cert.as_ref())
    }

    /// Loads `cert` and `key` (PEM, or DER when the file is not PEM).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, ServerError> {
        let cert_bytes = fs::read(cert).map_err(|e| io_err(cert, e))?;
        let key_bytes = fs::read(key).map_err(|e| io_err(key, e))?;
        let cert_der = match CertificateDer::from_pem_slice(&cert_bytes) {
            Ok(c) => c,
            Err(_) if !cert_bytes.starts_with(b"-----") => CertificateDer::from(cert_bytes),
            Err(e) => {
                return Err(ServerError::Tls(format!(
                    "{}: not a PEM certificate: {e}",
                    cert.display()
                )))
            }
        };
        let key_der = match PrivateKeyDer::from_pem_slice(&key_bytes) {
            Ok(k) => k,
            Err(_) => PrivateKeyDer::try_from(key_bytes).map_err(|e| {
                ServerError::Tls(format!(
                    "{}: not a PEM or DER private key: {e}",
                    key.display()
                ))
            })?,
        };
        Ok(Self {
            cert: cert_der,
            key: key_der,
        })
    }

    /// The identity kept in `dir` (`cert.pem`, `key.pem`), created there on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, ServerError> {
        let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        if cert.is_file() && key.is_file() {
            return Self::load(&cert, &key);
        }
        if cert.exists() || key.exists() {
            return Err(ServerError::Tls(format!(
                "{} holds only one of {CERT_FILE} and {KEY_FILE}; remove it or restore the other",
                dir.display()
            )));
        }
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let ck = rcgen::generate_simple_self_signed(vec![
            "veil-shard".to_string(),
            "localhost".to_string(),
        ])
        .map_err(|e| ServerError::Tls(format!("cannot create a certificate: {e}")))?;
        write_private(&key, ck.signing_key.serialize_pem().as_bytes())?;
        fs::write(&cert, ck.cert.pem()).map_err(|e| io_err(&cert, e))?;
        tracing::info!(cert = %cert.display(), "created a self-signed certificate");
        Self::load(&cert, &key)
    }

    /// The identity a config asks for: the given files when both are set, else the data
    /// directory's (created on first use).
    pub fn from_paths(
        cert: Option<&PathBuf>,
        key: Option<&PathBuf>,
        data_dir: &Path,
    ) -> Result<Self, ServerError> {
        match (cert, key) {
            (Some(c), Some(k)) => {
                crate::config::warn_if_shared(k, "TLS private key");
                Self::load(c, k)
            }
            (None, None) => Self::load_or_create(data_dir),
            _ => Err(ServerError::Config(
                "give both a certificate and a key, or neither".into(),
            )),
        }
    }
}

/// Writes a file readable by its owner only (on Unix).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ServerError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| io_err(path, e))?;
    f.write_all(bytes).map_err(|e| io_err(path, e))?;
    f.sync_all().map_err(|e| io_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("veil-server-tls-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let a = TlsIdentity::load_or_create(&dir).expect("create");
        let b = TlsIdentity::load_or_create(&dir).expect("load");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.cert, b.cert);
        let c = TlsIdentity::from_paths(
            Some(&dir.join(CERT_FILE)),
            Some(&dir.join(KEY_FILE)),
            Path::new("/nonexistent"),
        )
        .expect("given files");
        assert_eq!(a.fingerprint(), c.fingerprint());
        assert_ne!(
            a.fingerprint(),
            TlsIdentity::generate().expect("gen").fingerprint()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.join(KEY_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
        }
        fs::remove_file(dir.join(CERT_FILE)).expect("rm");
        assert!(
            TlsIdentity::load_or_create(&dir).is_err(),
            "half an identity"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}

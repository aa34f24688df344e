//! The public error of the SDK. Internal errors (`crate::Error`, `TransportError`) are rich and
//! change with the code; apps get this small, stable set, one variant per thing they can act
//! on (fix the config, ship the model, talk to tenant N, retry, show "cancelled").

use crate::transport::TransportError;
use crate::vocab::error::Error;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Error))]
pub enum VeilError {
    /// The configuration is wrong (unknown policy, no servers, malformed fingerprint, …);
    /// nothing was loaded or sent.
    #[error("invalid configuration: {detail}")]
    InvalidConfig { detail: String },
    /// The model folder is missing, incomplete or not a diffusers Stable Diffusion folder.
    #[error("cannot load the model: {detail}")]
    ModelLoad { detail: String },
    /// The request cannot be served as asked (size not a multiple of 8, zero steps, …).
    #[error("invalid request: {detail}")]
    InvalidRequest { detail: String },
    /// No answer from the server at all.
    #[error("server {server} ({address}) unreachable: {detail}")]
    Unreachable {
        server: u32,
        address: String,
        detail: String,
    },
    /// The server refused the tenant token.
    #[error("server {server} ({address}) refused the token")]
    AuthFailed { server: u32, address: String },
    /// The server's certificate is not the pinned one: possibly someone in the middle.
    #[error("server {server} ({address}) presented certificate sha256:{actual}, pinned sha256:{expected}")]
    CertificateMismatch {
        server: u32,
        address: String,
        expected: String,
        actual: String,
    },
    /// The server holds different weights than this app's model.
    #[error("server {server} ({address}) holds a different model")]
    ModelMismatch { server: u32, address: String },
    /// The server answered with an error, or speaks another protocol version.
    #[error("server {server} ({address}) failed: {detail}")]
    ServerFailed {
        server: u32,
        address: String,
        detail: String,
    },
    /// An established connection ended mid-generation (server crashed or link lost).
    #[error("server {server} ({address}) connection lost: {detail}")]
    ConnectionLost {
        server: u32,
        address: String,
        detail: String,
    },
    /// A request to the server took longer than the configured timeout.
    #[error("server {server} ({address}) timed out after {seconds:.1} s")]
    Timeout {
        server: u32,
        address: String,
        seconds: f64,
    },
    /// The caller cancelled (through its `CancelHandle`).
    #[error("cancelled")]
    Cancelled,
    /// A bug or an impossible state inside Veil; the detail is for a bug report.
    #[error("internal error: {detail}")]
    Internal { detail: String },
}

#[cfg_attr(feature = "uniffi", uniffi::export)]
impl VeilError {
    /// A sentence for the user (the same text as `Display`).
    pub fn describe(&self) -> String {
        self.to_string()
    }

    /// Whether trying the same generation again may succeed (a server unreachable, busy, lost
    /// or slow); false for what needs a change first (config, token, certificate, model).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. }
                | Self::ServerFailed { .. }
                | Self::ConnectionLost { .. }
                | Self::Timeout { .. }
        )
    }
}

impl VeilError {
    pub(crate) fn config(detail: impl Into<String>) -> Self {
        VeilError::InvalidConfig {
            detail: detail.into(),
        }
    }

    pub(crate) fn internal(detail: impl Into<String>) -> Self {
        VeilError::Internal {
            detail: detail.into(),
        }
    }

    /// Maps an error of a generation whose server `i` is at `addresses[i]`: a server's failure
    /// names that server's address, not a placeholder.
    pub(crate) fn from_generation(e: Error, addresses: &[String]) -> Self {
        match e {
            Error::Backend {
                backend,
                message: detail,
            } => VeilError::ServerFailed {
                server: index(backend),
                address: addresses
                    .get(backend)
                    .cloned()
                    .unwrap_or_else(|| "in-process".into()),
                detail,
            },
            other => other.into(),
        }
    }

    /// Maps an error met while loading the model folder.
    pub(crate) fn from_load(e: Error) -> Self {
        tracing::debug!(error = %e, "model load failed");
        match e {
            Error::MissingFile { .. }
            | Error::Io { .. }
            | Error::Config { .. }
            | Error::MissingTensor { .. }
            | Error::TensorShape { .. }
            | Error::Tokenizer(_)
            | Error::Unsupported(_)
            | Error::Tensor(_) => VeilError::ModelLoad {
                detail: e.to_string(),
            },
            other => VeilError::from(other),
        }
    }
}

fn index(server: usize) -> u32 {
    u32::try_from(server).unwrap_or(u32::MAX)
}

impl From<TransportError> for VeilError {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Unreachable {
                server,
                address,
                message: detail,
            } => VeilError::Unreachable {
                server: index(server),
                address,
                detail,
            },
            TransportError::AuthFailed { server, address } => VeilError::AuthFailed {
                server: index(server),
                address,
            },
            TransportError::CertificateMismatch {
                server,
                address,
                expected,
                actual,
            } => VeilError::CertificateMismatch {
                server: index(server),
                address,
                expected,
                actual,
            },
            TransportError::ModelMismatch {
                server, address, ..
            } => VeilError::ModelMismatch {
                server: index(server),
                address,
            },
            TransportError::Protocol {
                server,
                address,
                message: detail,
            }
            | TransportError::ServerError {
                server,
                address,
                message: detail,
            } => VeilError::ServerFailed {
                server: index(server),
                address,
                detail,
            },
            TransportError::Timeout {
                server,
                address,
                seconds,
            } => VeilError::Timeout {
                server: index(server),
                address,
                seconds,
            },
            TransportError::ConnectionLost {
                server,
                address,
                message: detail,
            } => VeilError::ConnectionLost {
                server: index(server),
                address,
                detail,
            },
        }
    }
}

impl From<super::key::KeyFileError> for VeilError {
    /// A key file that cannot be read or created is a configuration error naming the field.
    fn from(e: super::key::KeyFileError) -> Self {
        VeilError::config(format!("obfuscation_key_file: {e}"))
    }
}

impl From<Error> for VeilError {
    fn from(e: Error) -> Self {
        match e {
            Error::Cancelled => VeilError::Cancelled,
            Error::Transport(t) => t.into(),
            Error::Resolution { .. } | Error::InvalidArgument(_) => VeilError::InvalidRequest {
                detail: e.to_string(),
            },
            Error::TooManyBackends { .. } => VeilError::InvalidConfig {
                detail: e.to_string(),
            },
            Error::Backend {
                backend,
                message: detail,
            } => VeilError::ServerFailed {
                server: index(backend),
                address: "in-process".into(),
                detail,
            },
            other => {
                tracing::warn!(error = %other, "internal error");
                VeilError::Internal {
                    detail: other.to_string(),
                }
            }
        }
    }
}

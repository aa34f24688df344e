//! The public error of the SDK. Internal errors (`crate::Error`, `TransportError`) are rich and
//! change with the code; apps get this small, stable set, one variant per thing they can act
//! on (fix the config, ship the model, talk to tenant N, retry, show "cancelled").

use crate::transport::TransportError;
use crate::vocab::error::Error;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VeilError {
    /// The configuration is wrong (unknown policy, no servers, malformed fingerprint, …);
    /// nothing was loaded or sent.
    #[error("invalid configuration: {message}")]
    InvalidConfig { message: String },
    /// The model folder is missing, incomplete or not a diffusers Stable Diffusion folder.
    #[error("cannot load the model: {message}")]
    ModelLoad { message: String },
    /// The request cannot be served as asked (size not a multiple of 8, zero steps, …).
    #[error("invalid request: {message}")]
    InvalidRequest { message: String },
    /// No answer from the server at all.
    #[error("server {server} ({address}) unreachable: {message}")]
    Unreachable {
        server: u32,
        address: String,
        message: String,
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
    #[error("server {server} ({address}) failed: {message}")]
    ServerFailed {
        server: u32,
        address: String,
        message: String,
    },
    /// An established connection ended mid-generation (server crashed or link lost).
    #[error("server {server} ({address}) connection lost: {message}")]
    ConnectionLost {
        server: u32,
        address: String,
        message: String,
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
    /// A bug or an impossible state inside Veil; the message is for a bug report.
    #[error("internal error: {message}")]
    Internal { message: String },
}

impl VeilError {
    pub(crate) fn config(message: impl Into<String>) -> Self {
        VeilError::InvalidConfig {
            message: message.into(),
        }
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        VeilError::Internal {
            message: message.into(),
        }
    }

    /// Maps an error of a generation whose server `i` is at `addresses[i]`: a server's failure
    /// names that server's address, not a placeholder.
    pub(crate) fn from_generation(e: Error, addresses: &[String]) -> Self {
        match e {
            Error::Backend { backend, message } => VeilError::ServerFailed {
                server: index(backend),
                address: addresses
                    .get(backend)
                    .cloned()
                    .unwrap_or_else(|| "in-process".into()),
                message,
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
                message: e.to_string(),
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
                message,
            } => VeilError::Unreachable {
                server: index(server),
                address,
                message,
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
                message,
            }
            | TransportError::ServerError {
                server,
                address,
                message,
            } => VeilError::ServerFailed {
                server: index(server),
                address,
                message,
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
                message,
            } => VeilError::ConnectionLost {
                server: index(server),
                address,
                message,
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
                message: e.to_string(),
            },
            Error::TooManyBackends { .. } => VeilError::InvalidConfig {
                message: e.to_string(),
            },
            Error::Backend { backend, message } => VeilError::ServerFailed {
                server: index(backend),
                address: "in-process".into(),
                message,
            },
            other => {
                tracing::warn!(error = %other, "internal error");
                VeilError::Internal {
                    message: other.to_string(),
                }
            }
        }
    }
}

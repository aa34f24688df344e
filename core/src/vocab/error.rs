//! The internal errors of veil-core: `Error` (every layer's), and the wire's and transport's own
//! (`WireError`, `TransportError`), which `Error` carries. They live at the bottom so that every
//! layer can return them; the SDK maps them to its small public `VeilError`. Every failure names
//! what went wrong in terms a user can act on (which file, which tensor, which server).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("missing file {path}: {what}")]
    MissingFile { path: PathBuf, what: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("missing tensor `{name}` in {location}")]
    MissingTensor { name: String, location: String },
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("resolution {width}x{height} is not a multiple of {multiple}")]
    Resolution {
        width: usize,
        height: usize,
        multiple: usize,
    },
    #[error("cannot split {rows} rows of layer `{layer}` over {backends} backends: more backends than rows")]
    TooManyBackends {
        layer: String,
        rows: usize,
        backends: usize,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("shard backend {backend}: {message}")]
    Backend { backend: usize, message: String },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A broken invariant of veil-core itself (a bug, not the caller's input).
    #[error("internal error: {0}")]
    Internal(String),
    /// The caller cancelled the generation (checked between denoising steps).
    #[error("cancelled")]
    Cancelled,
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a message could not be decoded (or encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message truncated")]
    Truncated,
    #[error("not a Veil message (bad magic)")]
    BadMagic,
    #[error("unsupported protocol version {0} (this build speaks {v})", v = crate::vocab::PROTOCOL_VERSION)]
    UnsupportedVersion(u16),
    #[error("unknown {what} tag {tag}")]
    UnknownTag { what: &'static str, tag: u8 },
    #[error("unknown tensor dtype {0}")]
    UnknownDtype(u8),
    #[error("{what} is {len}, the limit is {limit}")]
    TooLarge {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("tensor shape product overflows")]
    ShapeOverflow,
    #[error("{what}: expected {expected} bytes, got {actual}")]
    LengthMismatch {
        what: &'static str,
        expected: u64,
        actual: u64,
    },
    #[error("{0} is not valid UTF-8")]
    Utf8(&'static str),
    #[error("invalid {what}: {value}")]
    InvalidValue { what: &'static str, value: i64 },
    #[error("zstd decompression failed: {0}")]
    Decompress(String),
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    #[error("zstd compression failed: {0}")]
    Compress(String),
    #[error("malformed call: {0}")]
    BadCall(String),
    /// A coded tensor its receiver cannot decode against what it holds (a residual without a
    /// reference, a reference store over its budget).
    #[error("shard codec: {0}")]
    Codec(String),
}

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

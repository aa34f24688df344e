//! The internal error type of veil-core. Every failure names what went wrong in terms a user can
//! act on (which file, which tensor, which shape), not just that something failed.

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
    Transport(#[from] crate::transport::TransportError),
    #[error(transparent)]
    Wire(#[from] crate::wire::codec::WireError),
    /// The caller cancelled the generation (checked between denoising steps).
    #[error("cancelled")]
    Cancelled,
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

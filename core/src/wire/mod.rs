//! The wire between the phone and a shard server (documented in docs/PROTOCOL.md). Every QUIC
//! bidirectional stream carries one message each way: the client writes a request and finishes
//! the stream, the server answers and finishes. The first stream of a connection is the
//! handshake (version, tenant token, model identity); the connection is the session, so tensor
//! handles live exactly as long as it does.
//!
//! This module holds the message types and their binary codec (`codec`). Decoding checks every
//! length, count and shape product against `Limits` before it allocates.

pub mod codec;
pub mod convert;
pub mod entropy;
pub mod identity;
pub mod manifest;
pub mod quant;
pub mod references;

use crate::vocab::precision::{Pad, ShardCodec, WireDtype};
pub use crate::vocab::PROTOCOL_VERSION;

/// ALPN of the Veil protocol over QUIC.
pub const ALPN: &[u8] = b"veil/1";

/// A model identity: SHA-256 over the U-Net weights a server holds (see `model_identity`).
pub type ModelId = [u8; 32];

/// Tensor compression on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    /// zstd at the given level over the raw little-endian bytes.
    Zstd(i32),
    /// Byte planes split (all low bytes, then all high bytes, …) before zstd: activations'
    /// high bytes are highly redundant, the low bytes are noise.
    ZstdByteSplit(i32),
}

/// Limits a decoder enforces before allocating (configured per server; clients use the same
/// defaults for replies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message (request or reply) in bytes, compressed payloads included.
    pub max_message_bytes: usize,
    /// Largest decoded tensor in bytes (after decompression).
    pub max_tensor_bytes: usize,
    /// Most calls in one request.
    pub max_calls: usize,
    /// Highest tensor rank.
    pub max_rank: usize,
    /// Longest layer name.
    pub max_name_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 512 << 20,
            max_tensor_bytes: 256 << 20,
            max_calls: 1024,
            max_rank: 6,
            max_name_len: 256,
        }
    }
}

/// A tensor as it travels: dtype, shape, little-endian payload (decompressed).
#[derive(Debug, Clone, PartialEq)]
pub struct WireTensor {
    pub dtype: WireDtype,
    pub shape: Vec<usize>,
    /// Raw: little-endian element bytes, `shape.product() * dtype.size()` long. Quantized: the
    /// block scales and codes (`quant::Quant`), and `dtype` is F32, what they decode to.
    pub data: Vec<u8>,
    pub coding: Coding,
}

impl WireTensor {
    /// A raw tensor (`data` holds its elements).
    pub fn raw(dtype: WireDtype, shape: Vec<usize>, data: Vec<u8>) -> Self {
        Self {
            dtype,
            shape,
            data,
            coding: Coding::default(),
        }
    }
}

/// How a tensor's payload is coded by the shard codecs (`references::CodecEnd`; docs/PROTOCOL.md
/// §8). The default is raw, with no reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Coding {
    /// The quantizer of the payload, or None for raw elements.
    pub quant: Option<quant::Quant>,
    pub reference: RefMode,
}

/// How the server codes a request's replies (docs/PROTOCOL.md §8). GroupNorm statistics always
/// travel raw in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplyCoding {
    pub codec: ShardCodec,
    /// An exact (warm-up) step: raw replies, kept as references under a residual codec.
    pub exact: bool,
    /// The slot of the request's first reply; the j-th reply's slot is `first_slot + j`.
    pub first_slot: u32,
}

/// What the receiver does with its reference of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RefMode {
    /// Nothing: the tensor stands alone.
    #[default]
    None,
    /// The decoded tensor becomes the slot's reference.
    Keep(u32),
    /// The payload is the change against the slot's reference; the sum is the tensor and the
    /// new reference.
    Residual(u32),
}

/// An operand on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum WireOperand {
    Inline(WireTensor),
    Handle(u64),
}

/// The ops of `vocab::ops::ShardOp`, on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum WireOp {
    Conv2d {
        layer: String,
        input: WireOperand,
        pad: Pad,
    },
    GroupNormStats {
        layer: String,
        input: WireOperand,
    },
    Attention {
        q: WireOperand,
        k: WireOperand,
        v: WireOperand,
        heads: u32,
    },
    Identity {
        input: WireOperand,
    },
    Release {
        handle: u64,
    },
    /// The strip ops (see `convert::apply_kind`): a kind byte, an optional layer name (empty
    /// when the op has none), operands, integer and float parameters.
    Apply {
        kind: u8,
        layer: String,
        operands: Vec<WireOperand>,
        ints: Vec<u64>,
        floats: Vec<f64>,
    },
}

/// The `obfuscated` policy's early steps (`vocab::job::EarlySteps`) as they travel: K candidate
/// prompts and the shared starting tensor (always f32: the noise, or under image-to-image the
/// noised init latents) up, the K latents back in a `Reply`.
#[derive(Debug, Clone, PartialEq)]
pub struct WireEarlySteps {
    pub candidates: Vec<String>,
    pub negative_prompt: String,
    pub noise: WireTensor,
    pub steps: u32,
    pub server_steps: u32,
    pub guidance: f64,
    /// 0 ddim, 1 dpm++2m, 2 euler, 3 euler-a, 4 lcm.
    pub scheduler: u8,
    /// 0 off, 1 exact, 2 shared.
    pub batch_redundancy: u8,
    /// The attention gate step; 0 for none.
    pub attention_gate: u32,
    /// Image-to-image: the schedule step the run starts at, `noise` then holding the noised
    /// init latents (`vocab::job::EarlySteps::start_step`); None for text-to-image.
    pub start_step: Option<u32>,
    /// Inpainting's extra U-Net input channels (`vocab::job::EarlySteps::condition`), f32.
    pub condition: Option<WireTensor>,
}

/// Most operands, integer and float parameters of an `Apply` call.
pub const MAX_APPLY_OPERANDS: usize = 8;
pub const MAX_APPLY_INTS: usize = 8;
pub const MAX_APPLY_FLOATS: usize = 4;

#[derive(Debug, Clone, PartialEq)]
pub struct WireCall {
    pub op: WireOp,
    pub keep_as: Option<u64>,
    pub reply: bool,
}

/// Error codes a server may answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The tenant token was not accepted.
    AuthFailed = 1,
    /// The server holds different weights than the client expects.
    ModelMismatch = 2,
    /// Unsupported protocol version.
    VersionMismatch = 3,
    /// The message could not be decoded or broke a limit.
    Malformed = 4,
    /// A well-formed request the server cannot execute (unknown layer, unknown handle, shapes).
    BadRequest = 5,
    /// A request before the handshake, or a second handshake.
    WrongState = 6,
    /// The server is at its session limit.
    Busy = 7,
    Internal = 8,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Client → server, first stream of a connection.
    Hello {
        version: u16,
        token: String,
        model_id: ModelId,
    },
    /// Server → client: the handshake succeeded.
    Welcome { version: u16, model_id: ModelId },
    /// Client → server: calls executed in order. Replies use `reply_dtype`, `compression` and
    /// `reply_coding`.
    Request {
        calls: Vec<WireCall>,
        reply_dtype: WireDtype,
        compression: Compression,
        reply_coding: ReplyCoding,
    },
    /// Client → server: the `obfuscated` policy's job, on a server that holds the whole model.
    /// The reply is a `Reply` with one tensor, the K latents, in `reply_dtype`.
    EarlySteps {
        job: WireEarlySteps,
        reply_dtype: WireDtype,
        compression: Compression,
    },
    /// Server → client: the outputs of the calls that asked for a reply.
    Reply { outputs: Vec<WireTensor> },
    /// Server → client: the request failed.
    Error { code: ErrorCode, message: String },
}

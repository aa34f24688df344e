//! Binary codec of `Message` (the byte layout is in docs/PROTOCOL.md).
//!
//! Everything is little-endian. A message is a 7-byte header (`VEIL`, u16 version, u8 kind)
//! followed by the kind's body. Decoding works on a whole in-memory buffer (the transport has
//! already read the stream under `Limits::max_message_bytes`) and checks every count, length,
//! rank, name length and shape product against `Limits` and against the bytes that remain before
//! it allocates anything. zstd payloads are decompressed in one shot into a buffer of exactly the
//! size the shape implies, never with an unbounded reader. Trailing bytes, unknown tags and
//! unknown dtypes are errors; no input makes the decoder panic.
//!
//! This file holds the entry points (`encode`, `decode`), the tag bytes and the small mappings
//! both directions share; the encoder is in `writer`, the decoder in `reader`, and the byte
//! planes of `Compression::ZstdByteSplit` in `planes`.

mod planes;
mod reader;
mod writer;

use super::{Compression, ErrorCode, Limits, Message};
use crate::placement::engine::WireDtype;
use crate::vocab::precision::ShardCodec;
use reader::Reader;
use writer::Writer;

/// The first four bytes of every message.
pub const MAGIC: [u8; 4] = *b"VEIL";
/// Magic, version, kind.
pub const HEADER_LEN: usize = 7;

/// Message kinds (header byte 6).
pub mod kind {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const REQUEST: u8 = 3;
    pub const REPLY: u8 = 4;
    pub const ERROR: u8 = 5;
    pub const EARLY_STEPS: u8 = 6;
}

/// Op tags of a call.
pub mod op {
    pub const CONV2D: u8 = 1;
    pub const GROUP_NORM_STATS: u8 = 2;
    pub const ATTENTION: u8 = 3;
    pub const IDENTITY: u8 = 4;
    pub const RELEASE: u8 = 5;
    pub const APPLY: u8 = 6;
}

/// Operand tags.
pub mod operand {
    pub const INLINE: u8 = 0;
    pub const HANDLE: u8 = 1;
}

/// Tensor dtype bytes.
pub mod dtype {
    pub const F32: u8 = 0;
    pub const F16: u8 = 1;
    pub const BF16: u8 = 2;
}

/// Tensor (and reply) compression bytes.
pub mod compression {
    pub const NONE: u8 = 0;
    pub const ZSTD: u8 = 1;
    pub const ZSTD_BYTE_SPLIT: u8 = 2;
}

/// The smallest encoded call: an `Apply` with no name, operands or parameters (tag, kind,
/// u16 name length, three u8 counts, keep flag, reply flag).
const MIN_CALL_BYTES: usize = 1 + 1 + 2 + 3 + 1 + 1;
/// Tensor codings (the quantizer tag, 0 for raw) and reference modes.
pub mod coding {
    pub const RAW: u8 = 0;
    pub const REF_NONE: u8 = 0;
    pub const REF_KEEP: u8 = 1;
    pub const REF_RESIDUAL: u8 = 2;
}

/// The smallest encoded tensor: dtype, compression, rank 0, coding, reference mode, u64
/// payload length.
const MIN_TENSOR_BYTES: usize = 1 + 1 + 1 + 1 + 1 + 8;

/// The codec byte of a request's reply coding.
pub fn codec_to_u8(c: ShardCodec) -> u8 {
    match c {
        ShardCodec::None => 0,
        ShardCodec::Int8 => 1,
        ShardCodec::Int4 => 2,
        ShardCodec::ResidualInt4 => 3,
        ShardCodec::ResidualInt2 => 4,
        ShardCodec::ResidualSign => 5,
        ShardCodec::ResidualEntropy => 6,
    }
}

pub fn codec_from_u8(b: u8) -> Result<ShardCodec> {
    ShardCodec::ALL
        .into_iter()
        .find(|&c| codec_to_u8(c) == b)
        .ok_or(WireError::UnknownTag {
            what: "reply codec",
            tag: b,
        })
}

pub use crate::vocab::error::WireError;

type Result<T> = std::result::Result<T, WireError>;

// ---------------------------------------------------------------------------------------------
// Small mappings
// ---------------------------------------------------------------------------------------------

pub fn dtype_to_u8(d: WireDtype) -> u8 {
    match d {
        WireDtype::F32 => dtype::F32,
        WireDtype::F16 => dtype::F16,
        WireDtype::Bf16 => dtype::BF16,
    }
}

pub fn dtype_from_u8(b: u8) -> Result<WireDtype> {
    match b {
        dtype::F32 => Ok(WireDtype::F32),
        dtype::F16 => Ok(WireDtype::F16),
        dtype::BF16 => Ok(WireDtype::Bf16),
        other => Err(WireError::UnknownDtype(other)),
    }
}

pub fn error_code_to_u8(c: ErrorCode) -> u8 {
    c as u8
}

pub fn error_code_from_u8(b: u8) -> Result<ErrorCode> {
    Ok(match b {
        1 => ErrorCode::AuthFailed,
        2 => ErrorCode::ModelMismatch,
        3 => ErrorCode::VersionMismatch,
        4 => ErrorCode::Malformed,
        5 => ErrorCode::BadRequest,
        6 => ErrorCode::WrongState,
        7 => ErrorCode::Busy,
        8 => ErrorCode::Internal,
        tag => {
            return Err(WireError::UnknownTag {
                what: "error code",
                tag,
            })
        }
    })
}

fn check_level(level: i32) -> Result<()> {
    if zstd::compression_level_range().contains(&level) {
        Ok(())
    } else {
        Err(WireError::InvalidValue {
            what: "zstd level",
            value: i64::from(level),
        })
    }
}

/// Bytes of a tensor of this shape and dtype, or `ShapeOverflow`.
pub fn tensor_bytes(shape: &[usize], dtype: WireDtype) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.size()))
        .ok_or(WireError::ShapeOverflow)
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

/// Encodes a message. `compression` applies to every tensor the message carries (a request's
/// inline operands, a reply's outputs); a request's own `compression` field is what it asks the
/// server to use for the reply. Quantized payloads are zstd-compressed only where that makes
/// them smaller.
pub fn encode(msg: &Message, compression: Compression) -> Result<Vec<u8>> {
    encode_counted(msg, compression).map(|(b, _)| b)
}

/// `encode`, and the tensor payload bytes in the message (after quantization and compression).
pub fn encode_counted(msg: &Message, compression: Compression) -> Result<(Vec<u8>, u64)> {
    check_level(match compression {
        Compression::None => 0,
        Compression::Zstd(l) | Compression::ZstdByteSplit(l) => l,
    })?;
    let hint = match compression {
        Compression::None => writer::payload_hint(msg),
        _ => 4096,
    };
    Writer::new(compression, HEADER_LEN + hint.min(1 << 30)).message(msg)
}

/// Decodes one whole message, enforcing `limits`.
pub fn decode(buf: &[u8], limits: &Limits) -> Result<Message> {
    decode_counted(buf, limits).map(|(m, _)| m)
}

/// `decode`, and the tensor payload bytes the message carried (as they travelled).
pub fn decode_counted(buf: &[u8], limits: &Limits) -> Result<(Message, u64)> {
    if buf.len() > limits.max_message_bytes {
        return Err(WireError::TooLarge {
            what: "message bytes",
            len: to_u64(buf.len()),
            limit: to_u64(limits.max_message_bytes),
        });
    }
    let mut r = Reader::new(buf, limits);
    let msg = r.message()?;
    if r.remaining() != 0 {
        return Err(WireError::TrailingBytes(r.remaining()));
    }
    Ok((msg, r.payload_bytes()))
}

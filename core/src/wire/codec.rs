//! Binary codec of `Message` (the byte layout is in docs/PROTOCOL.md).
//!
//! Everything is little-endian. A message is a 7-byte header (`VEIL`, u16 version, u8 kind)
//! followed by the kind's body. Decoding works on a whole in-memory buffer (the transport has
//! already read the stream under `Limits::max_message_bytes`) and checks every count, length,
//! rank, name length and shape product against `Limits` and against the bytes that remain before
//! it allocates anything. zstd payloads are decompressed in one shot into a buffer of exactly the
//! size the shape implies, never with an unbounded reader. Trailing bytes, unknown tags and
//! unknown dtypes are errors; no input makes the decoder panic.

use std::io::Cursor;

use super::{
    Compression, ErrorCode, Limits, Message, WireCall, WireEarlySteps, WireOp, WireOperand,
    WireTensor, MAX_APPLY_FLOATS, MAX_APPLY_INTS, MAX_APPLY_OPERANDS, PROTOCOL_VERSION,
};
use crate::placement::engine::{Pad, WireDtype};
use crate::vocab::job::{MAX_CANDIDATES, MAX_PROMPT_BYTES};

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
/// The smallest encoded tensor: dtype, compression, rank 0, u64 payload length.
const MIN_TENSOR_BYTES: usize = 1 + 1 + 1 + 8;

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
// Byte planes
// ---------------------------------------------------------------------------------------------

/// Splits `width`-byte elements into `width` planes (all byte 0s, then all byte 1s, …) into
/// `out` (cleared first). Callers pass whole elements; anything else is copied as it is.
fn split_planes(data: &[u8], width: usize, out: &mut Vec<u8>) {
    out.clear();
    let n = data.len() / width.max(1);
    if width <= 1 || n == 0 || n * width != data.len() {
        out.extend_from_slice(data);
        return;
    }
    out.resize(data.len(), 0);
    match width {
        2 => {
            let (p0, p1) = out.split_at_mut(n);
            for ((el, a), b) in data.chunks_exact(2).zip(p0).zip(p1) {
                *a = el[0];
                *b = el[1];
            }
        }
        4 => {
            let (p01, p23) = out.split_at_mut(2 * n);
            let (p0, p1) = p01.split_at_mut(n);
            let (p2, p3) = p23.split_at_mut(n);
            for ((((el, a), b), c), d) in data.chunks_exact(4).zip(p0).zip(p1).zip(p2).zip(p3) {
                *a = el[0];
                *b = el[1];
                *c = el[2];
                *d = el[3];
            }
        }
        _ => {
            for (b, plane) in out.chunks_exact_mut(n).enumerate() {
                for (dst, el) in plane.iter_mut().zip(data.chunks_exact(width)) {
                    if let Some(&byte) = el.get(b) {
                        *dst = byte;
                    }
                }
            }
        }
    }
}

/// Inverse of `split_planes`.
fn join_planes(planes: &[u8], width: usize) -> Vec<u8> {
    let n = planes.len() / width.max(1);
    if width <= 1 || n == 0 || n * width != planes.len() {
        return planes.to_vec();
    }
    let mut out = vec![0u8; planes.len()];
    match width {
        2 => {
            let (p0, p1) = planes.split_at(n);
            for ((el, a), b) in out.chunks_exact_mut(2).zip(p0).zip(p1) {
                el[0] = *a;
                el[1] = *b;
            }
        }
        4 => {
            let (p01, p23) = planes.split_at(2 * n);
            let (p0, p1) = p01.split_at(n);
            let (p2, p3) = p23.split_at(n);
            for ((((el, a), b), c), d) in out.chunks_exact_mut(4).zip(p0).zip(p1).zip(p2).zip(p3) {
                el[0] = *a;
                el[1] = *b;
                el[2] = *c;
                el[3] = *d;
            }
        }
        _ => {
            for (b, plane) in planes.chunks_exact(n).enumerate() {
                for (el, &byte) in out.chunks_exact_mut(width).zip(plane) {
                    if let Some(dst) = el.get_mut(b) {
                        *dst = byte;
                    }
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

struct Writer {
    buf: Vec<u8>,
    compression: Compression,
    cctx: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
}

impl Writer {
    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    fn usize_u32(&mut self, v: usize, what: &'static str) -> Result<()> {
        let v = u32::try_from(v).map_err(|_| WireError::TooLarge {
            what,
            len: to_u64(v),
            limit: u64::from(u32::MAX),
        })?;
        self.u32(v);
        Ok(())
    }

    fn string(&mut self, s: &str, what: &'static str) -> Result<()> {
        let len = u16::try_from(s.len()).map_err(|_| WireError::TooLarge {
            what,
            len: to_u64(s.len()),
            limit: u64::from(u16::MAX),
        })?;
        self.u16(len);
        self.buf.extend_from_slice(s.as_bytes());
        Ok(())
    }

    fn compression(&mut self, c: Compression) -> Result<()> {
        let (tag, level) = match c {
            Compression::None => (compression::NONE, 0),
            Compression::Zstd(l) => (compression::ZSTD, l),
            Compression::ZstdByteSplit(l) => (compression::ZSTD_BYTE_SPLIT, l),
        };
        check_level(level)?;
        self.u8(tag);
        self.i32(level);
        Ok(())
    }

    fn compressor(&mut self, level: i32) -> Result<&mut zstd::bulk::Compressor<'static>> {
        if self.cctx.is_none() {
            self.cctx = Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| WireError::Compress(e.to_string()))?,
            );
        }
        self.cctx
            .as_mut()
            .ok_or_else(|| WireError::Compress("no compression context".into()))
    }

    /// Compresses `src` (the scratch buffer or the tensor data) straight into `buf` after a
    /// u64 length.
    fn zstd_payload(&mut self, level: i32, split: bool, data: &[u8], width: usize) -> Result<()> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let src: &[u8] = if split {
            split_planes(data, width, &mut scratch);
            &scratch
        } else {
            data
        };
        let len_at = self.buf.len();
        self.u64(0);
        let start = self.buf.len();
        self.buf.reserve(zstd::zstd_safe::compress_bound(src.len()));
        let mut buf = std::mem::take(&mut self.buf);
        let written = {
            let cctx = self.compressor(level)?;
            let mut cursor = Cursor::new(&mut buf);
            cursor.set_position(to_u64(start));
            cctx.compress_to_buffer(src, &mut cursor)
                .map_err(|e| WireError::Compress(e.to_string()))
        };
        self.buf = buf;
        self.scratch = scratch;
        let written = written?;
        self.buf.truncate(start + written);
        self.buf[len_at..start].copy_from_slice(&to_u64(written).to_le_bytes());
        Ok(())
    }

    fn tensor(&mut self, t: &WireTensor) -> Result<()> {
        let expected = tensor_bytes(&t.shape, t.dtype)?;
        if t.data.len() != expected {
            return Err(WireError::LengthMismatch {
                what: "tensor data",
                expected: to_u64(expected),
                actual: to_u64(t.data.len()),
            });
        }
        let rank = u8::try_from(t.shape.len()).map_err(|_| WireError::TooLarge {
            what: "tensor rank",
            len: to_u64(t.shape.len()),
            limit: u64::from(u8::MAX),
        })?;
        self.u8(dtype_to_u8(t.dtype));
        let c = self.compression;
        self.u8(match c {
            Compression::None => compression::NONE,
            Compression::Zstd(_) => compression::ZSTD,
            Compression::ZstdByteSplit(_) => compression::ZSTD_BYTE_SPLIT,
        });
        self.u8(rank);
        for &d in &t.shape {
            self.usize_u32(d, "tensor dimension")?;
        }
        match c {
            Compression::None => {
                self.u64(to_u64(t.data.len()));
                self.buf.extend_from_slice(&t.data);
                Ok(())
            }
            Compression::Zstd(level) => self.zstd_payload(level, false, &t.data, t.dtype.size()),
            Compression::ZstdByteSplit(level) => {
                self.zstd_payload(level, true, &t.data, t.dtype.size())
            }
        }
    }

    fn operand(&mut self, o: &WireOperand) -> Result<()> {
        match o {
            WireOperand::Inline(t) => {
                self.u8(operand::INLINE);
                self.tensor(t)
            }
            WireOperand::Handle(h) => {
                self.u8(operand::HANDLE);
                self.u64(*h);
                Ok(())
            }
        }
    }

    fn early_steps(&mut self, job: &WireEarlySteps) -> Result<()> {
        if job.candidates.len() > MAX_CANDIDATES {
            return Err(WireError::TooLarge {
                what: "candidate prompts",
                len: to_u64(job.candidates.len()),
                limit: to_u64(MAX_CANDIDATES),
            });
        }
        self.u8(job.candidates.len() as u8);
        for c in &job.candidates {
            self.string(c, "candidate prompt")?;
        }
        self.string(&job.negative_prompt, "negative prompt")?;
        self.tensor(&job.noise)?;
        self.u32(job.steps);
        self.u32(job.server_steps);
        self.u64(job.guidance.to_bits());
        self.u8(job.scheduler);
        self.u8(job.batch_redundancy);
        self.u32(job.attention_gate);
        Ok(())
    }

    fn call(&mut self, c: &WireCall) -> Result<()> {
        match &c.op {
            WireOp::Conv2d { layer, input, pad } => {
                self.u8(op::CONV2D);
                self.string(layer, "layer name")?;
                self.operand(input)?;
                for v in [pad.top, pad.bottom, pad.left, pad.right] {
                    self.usize_u32(v, "padding")?;
                }
            }
            WireOp::GroupNormStats { layer, input } => {
                self.u8(op::GROUP_NORM_STATS);
                self.string(layer, "layer name")?;
                self.operand(input)?;
            }
            WireOp::Attention { q, k, v, heads } => {
                self.u8(op::ATTENTION);
                self.operand(q)?;
                self.operand(k)?;
                self.operand(v)?;
                self.u32(*heads);
            }
            WireOp::Identity { input } => {
                self.u8(op::IDENTITY);
                self.operand(input)?;
            }
            WireOp::Release { handle } => {
                self.u8(op::RELEASE);
                self.u64(*handle);
            }
            WireOp::Apply {
                kind,
                layer,
                operands,
                ints,
                floats,
            } => {
                if operands.len() > MAX_APPLY_OPERANDS
                    || ints.len() > MAX_APPLY_INTS
                    || floats.len() > MAX_APPLY_FLOATS
                {
                    let (what, len, limit) = if operands.len() > MAX_APPLY_OPERANDS {
                        ("apply operands", operands.len(), MAX_APPLY_OPERANDS)
                    } else if ints.len() > MAX_APPLY_INTS {
                        ("apply integers", ints.len(), MAX_APPLY_INTS)
                    } else {
                        ("apply floats", floats.len(), MAX_APPLY_FLOATS)
                    };
                    return Err(WireError::TooLarge {
                        what,
                        len: to_u64(len),
                        limit: to_u64(limit),
                    });
                }
                self.u8(op::APPLY);
                self.u8(*kind);
                self.string(layer, "layer name")?;
                self.u8(operands.len() as u8);
                for o in operands {
                    self.operand(o)?;
                }
                self.u8(ints.len() as u8);
                for v in ints {
                    self.u64(*v);
                }
                self.u8(floats.len() as u8);
                for v in floats {
                    self.u64(v.to_bits());
                }
            }
        }
        match c.keep_as {
            Some(h) => {
                self.bool(true);
                self.u64(h);
            }
            None => self.bool(false),
        }
        self.bool(c.reply);
        Ok(())
    }
}

/// Inline tensor bytes of a message (a capacity hint for the encoder).
fn payload_hint(msg: &Message) -> usize {
    fn operand(o: &WireOperand) -> usize {
        match o {
            WireOperand::Inline(t) => t.data.len() + 64,
            WireOperand::Handle(_) => 16,
        }
    }
    match msg {
        Message::Request { calls, .. } => calls
            .iter()
            .map(|c| {
                64 + match &c.op {
                    WireOp::Conv2d { input, .. }
                    | WireOp::GroupNormStats { input, .. }
                    | WireOp::Identity { input } => operand(input),
                    WireOp::Attention { q, k, v, .. } => operand(q) + operand(k) + operand(v),
                    WireOp::Release { .. } => 0,
                    WireOp::Apply { operands, .. } => operands.iter().map(operand).sum(),
                }
            })
            .fold(0usize, usize::saturating_add),
        Message::EarlySteps { job, .. } => {
            job.noise.data.len() + 64 + job.candidates.iter().map(|c| c.len() + 4).sum::<usize>()
        }
        Message::Reply { outputs } => outputs
            .iter()
            .map(|t| t.data.len() + 64)
            .fold(0usize, usize::saturating_add),
        _ => 128,
    }
}

/// Encodes a message. `compression` applies to every tensor the message carries (a request's
/// inline operands, a reply's outputs); a request's own `compression` field is what it asks the
/// server to use for the reply.
pub fn encode(msg: &Message, compression: Compression) -> Result<Vec<u8>> {
    check_level(match compression {
        Compression::None => 0,
        Compression::Zstd(l) | Compression::ZstdByteSplit(l) => l,
    })?;
    let hint = match compression {
        Compression::None => payload_hint(msg),
        _ => 4096,
    };
    let mut w = Writer {
        buf: Vec::with_capacity(HEADER_LEN + hint.min(1 << 30)),
        compression,
        cctx: None,
        scratch: Vec::new(),
    };
    w.buf.extend_from_slice(&MAGIC);
    w.u16(PROTOCOL_VERSION);
    match msg {
        Message::Hello {
            version,
            token,
            model_id,
        } => {
            w.u8(kind::HELLO);
            w.u16(*version);
            w.string(token, "token")?;
            w.buf.extend_from_slice(model_id);
        }
        Message::Welcome { version, model_id } => {
            w.u8(kind::WELCOME);
            w.u16(*version);
            w.buf.extend_from_slice(model_id);
        }
        Message::Request {
            calls,
            reply_dtype,
            compression: reply_compression,
        } => {
            w.u8(kind::REQUEST);
            w.u8(dtype_to_u8(*reply_dtype));
            w.compression(*reply_compression)?;
            w.usize_u32(calls.len(), "call count")?;
            for c in calls {
                w.call(c)?;
            }
        }
        Message::EarlySteps {
            job,
            reply_dtype,
            compression: reply_compression,
        } => {
            w.u8(kind::EARLY_STEPS);
            w.u8(dtype_to_u8(*reply_dtype));
            w.compression(*reply_compression)?;
            w.early_steps(job)?;
        }
        Message::Reply { outputs } => {
            w.u8(kind::REPLY);
            w.usize_u32(outputs.len(), "output count")?;
            for t in outputs {
                w.tensor(t)?;
            }
        }
        Message::Error { code, message } => {
            w.u8(kind::ERROR);
            w.u8(error_code_to_u8(*code));
            w.string(message, "error message")?;
        }
    }
    Ok(w.buf)
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    limits: &'a Limits,
    /// Decoded tensor bytes so far (bounded by `max_message_bytes`).
    decoded: usize,
    dctx: Option<zstd::bulk::Decompressor<'static>>,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(WireError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn i32(&mut self) -> Result<i32> {
        self.array().map(i32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_le_bytes)
    }
    fn usize32(&mut self) -> Result<usize> {
        let v = self.u32()?;
        usize::try_from(v).map_err(|_| WireError::TooLarge {
            what: "u32 value",
            len: u64::from(v),
            limit: to_u64(usize::MAX),
        })
    }

    fn bool(&mut self, what: &'static str) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::InvalidValue {
                what,
                value: i64::from(v),
            }),
        }
    }

    /// A u16-length UTF-8 string of at most `limit` bytes.
    fn string(&mut self, what: &'static str, limit: usize) -> Result<String> {
        let len = usize::from(self.u16()?);
        if len > limit {
            return Err(WireError::TooLarge {
                what,
                len: to_u64(len),
                limit: to_u64(limit),
            });
        }
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| WireError::Utf8(what))
    }

    /// A count no larger than `limit` of items at least `min_bytes` long each.
    fn count(&mut self, what: &'static str, limit: usize, min_bytes: usize) -> Result<usize> {
        let n = self.usize32()?;
        if n > limit {
            return Err(WireError::TooLarge {
                what,
                len: to_u64(n),
                limit: to_u64(limit),
            });
        }
        if n.checked_mul(min_bytes)
            .is_none_or(|b| b > self.remaining())
        {
            return Err(WireError::Truncated);
        }
        Ok(n)
    }

    fn compression(&mut self) -> Result<Compression> {
        let tag = self.u8()?;
        let level = self.i32()?;
        let c = match tag {
            compression::NONE => {
                if level != 0 {
                    return Err(WireError::InvalidValue {
                        what: "level of no compression",
                        value: i64::from(level),
                    });
                }
                Compression::None
            }
            compression::ZSTD => Compression::Zstd(level),
            compression::ZSTD_BYTE_SPLIT => Compression::ZstdByteSplit(level),
            tag => {
                return Err(WireError::UnknownTag {
                    what: "compression",
                    tag,
                })
            }
        };
        check_level(level)?;
        Ok(c)
    }

    fn tensor(&mut self) -> Result<WireTensor> {
        let dtype = dtype_from_u8(self.u8()?)?;
        let comp = self.u8()?;
        if comp > compression::ZSTD_BYTE_SPLIT {
            return Err(WireError::UnknownTag {
                what: "tensor compression",
                tag: comp,
            });
        }
        let rank = usize::from(self.u8()?);
        if rank > self.limits.max_rank {
            return Err(WireError::TooLarge {
                what: "tensor rank",
                len: to_u64(rank),
                limit: to_u64(self.limits.max_rank),
            });
        }
        if rank * 4 > self.remaining() {
            return Err(WireError::Truncated);
        }
        let mut shape = Vec::with_capacity(rank);
        for _ in 0..rank {
            shape.push(self.usize32()?);
        }
        let bytes = tensor_bytes(&shape, dtype)?;
        if bytes > self.limits.max_tensor_bytes {
            return Err(WireError::TooLarge {
                what: "tensor bytes",
                len: to_u64(bytes),
                limit: to_u64(self.limits.max_tensor_bytes),
            });
        }
        let decoded = self
            .decoded
            .checked_add(bytes)
            .ok_or(WireError::ShapeOverflow)?;
        if decoded > self.limits.max_message_bytes {
            return Err(WireError::TooLarge {
                what: "decoded tensor bytes of the message",
                len: to_u64(decoded),
                limit: to_u64(self.limits.max_message_bytes),
            });
        }
        self.decoded = decoded;
        let len = self.u64()?;
        if len > to_u64(self.remaining()) {
            return Err(WireError::Truncated);
        }
        let payload = self.take(usize::try_from(len).map_err(|_| WireError::Truncated)?)?;
        let data = match comp {
            compression::NONE => {
                if payload.len() != bytes {
                    return Err(WireError::LengthMismatch {
                        what: "tensor payload",
                        expected: to_u64(bytes),
                        actual: len,
                    });
                }
                payload.to_vec()
            }
            _ => {
                let raw = self.decompress(payload, bytes)?;
                if comp == compression::ZSTD_BYTE_SPLIT {
                    join_planes(&raw, dtype.size())
                } else {
                    raw
                }
            }
        };
        Ok(WireTensor { dtype, shape, data })
    }

    /// One-shot zstd decompression into a buffer of exactly `expected` bytes.
    fn decompress(&mut self, payload: &[u8], expected: usize) -> Result<Vec<u8>> {
        match zstd::zstd_safe::get_frame_content_size(payload) {
            Ok(Some(n)) if n != to_u64(expected) => {
                return Err(WireError::LengthMismatch {
                    what: "zstd frame content size",
                    expected: to_u64(expected),
                    actual: n,
                })
            }
            Ok(_) => {}
            Err(_) => return Err(WireError::Decompress("not a zstd frame".into())),
        }
        if self.dctx.is_none() {
            self.dctx = Some(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| WireError::Decompress(e.to_string()))?,
            );
        }
        let dctx = self
            .dctx
            .as_mut()
            .ok_or_else(|| WireError::Decompress("no decompression context".into()))?;
        let mut out = Vec::with_capacity(expected);
        dctx.decompress_to_buffer(payload, &mut out)
            .map_err(|e| WireError::Decompress(e.to_string()))?;
        if out.len() != expected {
            return Err(WireError::LengthMismatch {
                what: "decompressed tensor",
                expected: to_u64(expected),
                actual: to_u64(out.len()),
            });
        }
        Ok(out)
    }

    fn operand(&mut self) -> Result<WireOperand> {
        match self.u8()? {
            operand::INLINE => Ok(WireOperand::Inline(self.tensor()?)),
            operand::HANDLE => Ok(WireOperand::Handle(self.u64()?)),
            tag => Err(WireError::UnknownTag {
                what: "operand",
                tag,
            }),
        }
    }

    fn small_count(&mut self, what: &'static str, limit: usize) -> Result<usize> {
        let n = self.u8()? as usize;
        if n > limit {
            return Err(WireError::TooLarge {
                what,
                len: n as u64,
                limit: limit as u64,
            });
        }
        Ok(n)
    }

    fn layer(&mut self) -> Result<String> {
        self.string("layer name", self.limits.max_name_len)
    }

    fn early_steps(&mut self) -> Result<WireEarlySteps> {
        let n = self.small_count("candidate prompts", MAX_CANDIDATES)?;
        let candidates = (0..n)
            .map(|_| self.string("candidate prompt", MAX_PROMPT_BYTES))
            .collect::<Result<Vec<_>>>()?;
        Ok(WireEarlySteps {
            candidates,
            negative_prompt: self.string("negative prompt", MAX_PROMPT_BYTES)?,
            noise: self.tensor()?,
            steps: self.u32()?,
            server_steps: self.u32()?,
            guidance: f64::from_bits(self.u64()?),
            scheduler: self.u8()?,
            batch_redundancy: self.u8()?,
            attention_gate: self.u32()?,
        })
    }

    fn call(&mut self) -> Result<WireCall> {
        let op = match self.u8()? {
            op::CONV2D => {
                let layer = self.layer()?;
                let input = self.operand()?;
                let pad = Pad {
                    top: self.usize32()?,
                    bottom: self.usize32()?,
                    left: self.usize32()?,
                    right: self.usize32()?,
                };
                WireOp::Conv2d { layer, input, pad }
            }
            op::GROUP_NORM_STATS => WireOp::GroupNormStats {
                layer: self.layer()?,
                input: self.operand()?,
            },
            op::ATTENTION => WireOp::Attention {
                q: self.operand()?,
                k: self.operand()?,
                v: self.operand()?,
                heads: self.u32()?,
            },
            op::IDENTITY => WireOp::Identity {
                input: self.operand()?,
            },
            op::RELEASE => WireOp::Release {
                handle: self.u64()?,
            },
            op::APPLY => {
                let kind = self.u8()?;
                let layer = self.string("layer name", self.limits.max_name_len)?;
                let n = self.small_count("apply operands", MAX_APPLY_OPERANDS)?;
                let operands = (0..n).map(|_| self.operand()).collect::<Result<Vec<_>>>()?;
                let n = self.small_count("apply integers", MAX_APPLY_INTS)?;
                let ints = (0..n).map(|_| self.u64()).collect::<Result<Vec<_>>>()?;
                let n = self.small_count("apply floats", MAX_APPLY_FLOATS)?;
                let floats = (0..n)
                    .map(|_| self.u64().map(f64::from_bits))
                    .collect::<Result<Vec<_>>>()?;
                WireOp::Apply {
                    kind,
                    layer,
                    operands,
                    ints,
                    floats,
                }
            }
            tag => return Err(WireError::UnknownTag { what: "op", tag }),
        };
        let keep_as = if self.bool("keep flag")? {
            Some(self.u64()?)
        } else {
            None
        };
        let reply = self.bool("reply flag")?;
        Ok(WireCall { op, keep_as, reply })
    }
}

/// Decodes one whole message, enforcing `limits`.
pub fn decode(buf: &[u8], limits: &Limits) -> Result<Message> {
    if buf.len() > limits.max_message_bytes {
        return Err(WireError::TooLarge {
            what: "message bytes",
            len: to_u64(buf.len()),
            limit: to_u64(limits.max_message_bytes),
        });
    }
    let mut r = Reader {
        buf,
        pos: 0,
        limits,
        decoded: 0,
        dctx: None,
    };
    if r.array::<4>()? != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = r.u16()?;
    if version != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let msg = match r.u8()? {
        kind::HELLO => Message::Hello {
            version: r.u16()?,
            token: r.string("token", usize::from(u16::MAX))?,
            model_id: r.array::<32>()?,
        },
        kind::WELCOME => Message::Welcome {
            version: r.u16()?,
            model_id: r.array::<32>()?,
        },
        kind::REQUEST => {
            let reply_dtype = dtype_from_u8(r.u8()?)?;
            let compression = r.compression()?;
            let n = r.count("call count", limits.max_calls, MIN_CALL_BYTES)?;
            let mut calls = Vec::with_capacity(n);
            for _ in 0..n {
                calls.push(r.call()?);
            }
            Message::Request {
                calls,
                reply_dtype,
                compression,
            }
        }
        kind::EARLY_STEPS => Message::EarlySteps {
            reply_dtype: dtype_from_u8(r.u8()?)?,
            compression: r.compression()?,
            job: r.early_steps()?,
        },
        kind::REPLY => {
            let n = r.count("output count", limits.max_calls, MIN_TENSOR_BYTES)?;
            let mut outputs = Vec::with_capacity(n);
            for _ in 0..n {
                outputs.push(r.tensor()?);
            }
            Message::Reply { outputs }
        }
        kind::ERROR => Message::Error {
            code: error_code_from_u8(r.u8()?)?,
            message: r.string("error message", usize::from(u16::MAX))?,
        },
        tag => {
            return Err(WireError::UnknownTag {
                what: "message kind",
                tag,
            })
        }
    };
    if r.remaining() != 0 {
        return Err(WireError::TrailingBytes(r.remaining()));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planes_round_trip() {
        let data: Vec<u8> = (0..=255u8).cycle().take(12 * 37).collect();
        for width in [1, 2, 3, 4] {
            let mut split = Vec::new();
            split_planes(&data, width, &mut split);
            assert_eq!(join_planes(&split, width), data);
            for b in 0..width {
                let n = data.len() / width;
                assert!((0..n).all(|i| split[b * n + i] == data[i * width + b]));
            }
        }
        let mut split = Vec::new();
        split_planes(&[1, 2, 3], 2, &mut split);
        assert_eq!(split, vec![1, 2, 3], "not whole elements: copied as is");
        let mut split = Vec::new();
        split_planes(&[1, 2, 3, 4], 2, &mut split);
        assert_eq!(split, vec![1, 3, 2, 4]);
        split_planes(&[], 4, &mut split);
        assert!(split.is_empty());
    }
}

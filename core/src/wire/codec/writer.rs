//! The encoder: `Writer` appends a message's fields to one buffer, compressing tensor payloads
//! straight into it.

use std::io::Cursor;

use super::planes::split_planes;
use super::{
    check_level, codec_to_u8, coding, compression, dtype_to_u8, error_code_to_u8, kind, op,
    operand, tensor_bytes, to_u64, Result, WireError, MAGIC,
};
use crate::placement::engine::WireDtype;
use crate::vocab::job::MAX_CANDIDATES;
use crate::wire::quant::Quant;
use crate::wire::{
    Compression, Message, RefMode, WireCall, WireEarlySteps, WireOp, WireOperand, WireTensor,
    MAX_APPLY_FLOATS, MAX_APPLY_INTS, MAX_APPLY_OPERANDS, PROTOCOL_VERSION,
};

/// A message being encoded; `compression` applies to every tensor it carries.
pub(super) struct Writer {
    buf: Vec<u8>,
    compression: Compression,
    /// zstd context, created at the first compressed tensor and reused for the others.
    cctx: Option<zstd::bulk::Compressor<'static>>,
    /// Byte-plane buffer, reused across tensors.
    scratch: Vec<u8>,
    /// Tensor payload bytes written so far.
    payload: u64,
}

impl Writer {
    pub(super) fn new(compression: Compression, capacity: usize) -> Self {
        Writer {
            buf: Vec::with_capacity(capacity),
            compression,
            cctx: None,
            scratch: Vec::new(),
            payload: 0,
        }
    }

    /// The header (magic, version, kind) and the body of `msg`; returns the encoded bytes and
    /// the tensor payload bytes among them.
    pub(super) fn message(mut self, msg: &Message) -> Result<(Vec<u8>, u64)> {
        self.buf.extend_from_slice(&MAGIC);
        self.u16(PROTOCOL_VERSION);
        match msg {
            Message::Hello {
                version,
                token,
                model_id,
            } => {
                self.u8(kind::HELLO);
                self.u16(*version);
                self.string(token, "token")?;
                self.buf.extend_from_slice(model_id);
            }
            Message::Welcome { version, model_id } => {
                self.u8(kind::WELCOME);
                self.u16(*version);
                self.buf.extend_from_slice(model_id);
            }
            Message::Request {
                calls,
                reply_dtype,
                compression: reply_compression,
                reply_coding,
            } => {
                self.u8(kind::REQUEST);
                self.u8(dtype_to_u8(*reply_dtype));
                self.compression(*reply_compression)?;
                self.u8(codec_to_u8(reply_coding.codec));
                self.bool(reply_coding.exact);
                self.u32(reply_coding.first_slot);
                self.usize_u32(calls.len(), "call count")?;
                for c in calls {
                    self.call(c)?;
                }
            }
            Message::EarlySteps {
                job,
                reply_dtype,
                compression: reply_compression,
            } => {
                self.u8(kind::EARLY_STEPS);
                self.u8(dtype_to_u8(*reply_dtype));
                self.compression(*reply_compression)?;
                self.early_steps(job)?;
            }
            Message::Reply { outputs } => {
                self.u8(kind::REPLY);
                self.usize_u32(outputs.len(), "output count")?;
                for t in outputs {
                    self.tensor(t)?;
                }
            }
            Message::Error { code, message } => {
                self.u8(kind::ERROR);
                self.u8(error_code_to_u8(*code));
                self.string(message, "error message")?;
            }
        }
        Ok((self.buf, self.payload))
    }

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
        let (expected, what) = match t.coding.quant {
            None => (tensor_bytes(&t.shape, t.dtype)?, "tensor data"),
            Some(q) => {
                if t.dtype != WireDtype::F32 {
                    return Err(WireError::Codec("quantized tensors decode to f32".into()));
                }
                let n = tensor_bytes(&t.shape, WireDtype::F32)? / 4;
                let len = q.payload_len(n).ok_or(WireError::ShapeOverflow)?;
                (len, "quantized payload")
            }
        };
        if !Quant::payload_fits(t.coding.quant, t.data.len(), expected) {
            return Err(WireError::LengthMismatch {
                what,
                expected: to_u64(expected),
                actual: to_u64(t.data.len()),
            });
        }
        let rank = u8::try_from(t.shape.len()).map_err(|_| WireError::TooLarge {
            what: "tensor rank",
            len: to_u64(t.shape.len()),
            limit: u64::from(u8::MAX),
        })?;
        // A quantized payload is zstd-compressed (never byte-split) only where that pays.
        let packed = match (t.coding.quant, self.compression) {
            (Some(q), Compression::Zstd(level) | Compression::ZstdByteSplit(level))
                if q.fixed_len() =>
            {
                let z = self
                    .compressor(level)?
                    .compress(&t.data)
                    .map_err(|e| WireError::Compress(e.to_string()))?;
                (z.len() < t.data.len()).then_some(z)
            }
            _ => None,
        };
        self.u8(dtype_to_u8(t.dtype));
        let c = match (t.coding.quant, &packed) {
            (None, _) => self.compression,
            (Some(_), Some(_)) => Compression::Zstd(0),
            (Some(_), None) => Compression::None,
        };
        self.u8(match c {
            Compression::None => compression::NONE,
            Compression::Zstd(_) => compression::ZSTD,
            Compression::ZstdByteSplit(_) => compression::ZSTD_BYTE_SPLIT,
        });
        self.u8(rank);
        for &d in &t.shape {
            self.usize_u32(d, "tensor dimension")?;
        }
        self.u8(t.coding.quant.map_or(coding::RAW, |q| q.tag()));
        match t.coding.reference {
            RefMode::None => self.u8(coding::REF_NONE),
            RefMode::Keep(slot) => {
                self.u8(coding::REF_KEEP);
                self.u32(slot);
            }
            RefMode::Residual(slot) => {
                self.u8(coding::REF_RESIDUAL);
                self.u32(slot);
            }
        }
        let before = self.buf.len();
        match (c, packed) {
            (_, Some(z)) => {
                self.u64(to_u64(z.len()));
                self.buf.extend_from_slice(&z);
            }
            (Compression::None, None) => {
                self.u64(to_u64(t.data.len()));
                self.buf.extend_from_slice(&t.data);
            }
            (Compression::Zstd(level), None) => {
                self.zstd_payload(level, false, &t.data, t.dtype.size())?
            }
            (Compression::ZstdByteSplit(level), None) => {
                self.zstd_payload(level, true, &t.data, t.dtype.size())?
            }
        }
        self.payload += to_u64(self.buf.len() - before - 8);
        Ok(())
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
        match job.start_step {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.u32(s);
            }
        }
        match &job.condition {
            None => self.u8(0),
            Some(c) => {
                self.u8(1);
                self.tensor(c)?;
            }
        }
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
pub(super) fn payload_hint(msg: &Message) -> usize {
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

//! The decoder: `Reader` walks one whole in-memory message, checking every count, length and
//! shape against `Limits` and the bytes left before it allocates.

use super::planes::join_planes;
use super::{
    check_level, codec_from_u8, coding, compression, dtype_from_u8, error_code_from_u8, kind, op,
    operand, tensor_bytes, to_u64, Result, WireError, MAGIC, MIN_CALL_BYTES, MIN_TENSOR_BYTES,
};
use crate::placement::engine::Pad;
use crate::placement::engine::WireDtype;
use crate::vocab::job::{MAX_CANDIDATES, MAX_PROMPT_BYTES};
use crate::wire::quant::Quant;
use crate::wire::{
    Coding, Compression, Limits, Message, RefMode, ReplyCoding, WireCall, WireEarlySteps, WireOp,
    WireOperand, WireTensor, MAX_APPLY_FLOATS, MAX_APPLY_INTS, MAX_APPLY_OPERANDS,
    PROTOCOL_VERSION,
};

/// A message being decoded: the whole buffer and the position read up to.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    limits: &'a Limits,
    /// Decoded tensor bytes so far (bounded by `max_message_bytes`).
    decoded: usize,
    /// Tensor payload bytes read so far (as they travelled).
    payload: u64,
    dctx: Option<zstd::bulk::Decompressor<'static>>,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8], limits: &'a Limits) -> Self {
        Reader {
            buf,
            pos: 0,
            limits,
            decoded: 0,
            payload: 0,
            dctx: None,
        }
    }

    /// The header (magic, version, kind) and the body of one message. Bytes after it are left
    /// for the caller to refuse.
    pub(super) fn message(&mut self) -> Result<Message> {
        if self.array::<4>()? != MAGIC {
            return Err(WireError::BadMagic);
        }
        let version = self.u16()?;
        if version != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let max_calls = self.limits.max_calls;
        Ok(match self.u8()? {
            kind::HELLO => Message::Hello {
                version: self.u16()?,
                token: self.string("token", usize::from(u16::MAX))?,
                model_id: self.array::<32>()?,
            },
            kind::WELCOME => Message::Welcome {
                version: self.u16()?,
                model_id: self.array::<32>()?,
            },
            kind::REQUEST => {
                let reply_dtype = dtype_from_u8(self.u8()?)?;
                let compression = self.compression()?;
                let reply_coding = ReplyCoding {
                    codec: codec_from_u8(self.u8()?)?,
                    exact: self.bool("exact step flag")?,
                    first_slot: self.u32()?,
                };
                let n = self.count("call count", max_calls, MIN_CALL_BYTES)?;
                let mut calls = Vec::with_capacity(n);
                for _ in 0..n {
                    calls.push(self.call()?);
                }
                Message::Request {
                    calls,
                    reply_dtype,
                    compression,
                    reply_coding,
                }
            }
            kind::EARLY_STEPS => Message::EarlySteps {
                reply_dtype: dtype_from_u8(self.u8()?)?,
                compression: self.compression()?,
                job: self.early_steps()?,
            },
            kind::REPLY => {
                let n = self.count("output count", max_calls, MIN_TENSOR_BYTES)?;
                let mut outputs = Vec::with_capacity(n);
                for _ in 0..n {
                    outputs.push(self.tensor()?);
                }
                Message::Reply { outputs }
            }
            kind::ERROR => Message::Error {
                code: error_code_from_u8(self.u8()?)?,
                message: self.string("error message", usize::from(u16::MAX))?,
            },
            tag => {
                return Err(WireError::UnknownTag {
                    what: "message kind",
                    tag,
                })
            }
        })
    }

    /// Tensor payload bytes of the message so far.
    pub(super) fn payload_bytes(&self) -> u64 {
        self.payload
    }

    pub(super) fn remaining(&self) -> usize {
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
        let coding = self.coding()?;
        // What the tensor decodes to (bounded here, before anything is allocated), and what its
        // payload must be after decompression.
        let bytes = tensor_bytes(&shape, dtype)?;
        let expected = match coding.quant {
            None => bytes,
            Some(q) => {
                if dtype != WireDtype::F32 {
                    return Err(WireError::Codec("quantized tensors decode to f32".into()));
                }
                if comp == compression::ZSTD_BYTE_SPLIT {
                    return Err(WireError::Codec(
                        "quantized payloads are not byte-split".into(),
                    ));
                }
                if !q.fixed_len() && comp != compression::NONE {
                    return Err(WireError::Codec(
                        "entropy-coded payloads are not compressed again".into(),
                    ));
                }
                q.payload_len(bytes / 4).ok_or(WireError::ShapeOverflow)?
            }
        };
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
        self.payload += len;
        let data = match comp {
            compression::NONE => {
                // An entropy-coded payload may be shorter than its bound, never longer.
                if !Quant::payload_fits(coding.quant, payload.len(), expected) {
                    return Err(WireError::LengthMismatch {
                        what: "tensor payload",
                        expected: to_u64(expected),
                        actual: len,
                    });
                }
                payload.to_vec()
            }
            _ => {
                let raw = self.decompress(payload, expected)?;
                if comp == compression::ZSTD_BYTE_SPLIT {
                    join_planes(&raw, dtype.size())
                } else {
                    raw
                }
            }
        };
        Ok(WireTensor {
            dtype,
            shape,
            data,
            coding,
        })
    }

    /// A tensor's coding: the quantizer tag (0 raw) and the reference mode with its slot.
    fn coding(&mut self) -> Result<Coding> {
        let tag = self.u8()?;
        let quant = match tag {
            coding::RAW => None,
            t => Some(Quant::from_tag(t).ok_or(WireError::UnknownTag {
                what: "tensor coding",
                tag: t,
            })?),
        };
        let reference = match self.u8()? {
            coding::REF_NONE => RefMode::None,
            coding::REF_KEEP => RefMode::Keep(self.u32()?),
            coding::REF_RESIDUAL => {
                if quant.is_none() {
                    return Err(WireError::Codec("a residual must be quantized".into()));
                }
                RefMode::Residual(self.u32()?)
            }
            t => {
                return Err(WireError::UnknownTag {
                    what: "reference mode",
                    tag: t,
                })
            }
        };
        Ok(Coding { quant, reference })
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
            start_step: match self.bool("image-to-image flag")? {
                true => Some(self.u32()?),
                false => None,
            },
            condition: match self.bool("inpainting flag")? {
                true => Some(self.tensor()?),
                false => None,
            },
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

//! Conversions between the placement runtime's candle values (`ShardRequest<Tensor>`,
//! `ShardReply<Tensor>`) and the wire types. Tensors go out in the wire dtype as little-endian
//! bytes and always come back as f32 (compute is f32: candle's CPU matmul has no bf16).

use candle_core::{DType, Device, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::codec::{tensor_bytes, WireError};
use super::{WireCall, WireOp, WireOperand, WireTensor};
use crate::error::{Error, Result};
use crate::placement::backend::{Operand, ShardCall, ShardOp, ShardReply, ShardRequest};
use crate::placement::engine::WireDtype;

fn le_bytes<T, const N: usize>(v: &[T], f: impl Fn(&T) -> [u8; N]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * N];
    for (dst, x) in out.chunks_exact_mut(N).zip(v) {
        dst.copy_from_slice(&f(x));
    }
    out
}

impl WireTensor {
    /// The tensor converted to `dtype`, as little-endian bytes.
    pub fn from_tensor(t: &Tensor, dtype: WireDtype) -> Result<WireTensor> {
        let shape = t.dims().to_vec();
        let flat = t.flatten_all()?;
        let data = match dtype {
            WireDtype::F32 => le_bytes(&flat.to_dtype(DType::F32)?.to_vec1::<f32>()?, |x| {
                x.to_le_bytes()
            }),
            // half's slice conversions use the CPU's f16 instructions where it has them (same
            // round-to-nearest-even as candle's element-wise cast).
            WireDtype::F16 => {
                let v = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let mut h = vec![f16::ZERO; v.len()];
                h.convert_from_f32_slice(&v);
                le_bytes(&h, |x| x.to_le_bytes())
            }
            WireDtype::Bf16 => {
                let v = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let mut h = vec![bf16::ZERO; v.len()];
                h.convert_from_f32_slice(&v);
                le_bytes(&h, |x| x.to_le_bytes())
            }
        };
        Ok(WireTensor { dtype, shape, data })
    }

    /// The tensor as f32 on `device` (f32 payloads bit-exact).
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let expected = tensor_bytes(&self.shape, self.dtype)?;
        if self.data.len() != expected {
            return Err(Error::Wire(WireError::LengthMismatch {
                what: "tensor data",
                expected: u64::try_from(expected).unwrap_or(u64::MAX),
                actual: u64::try_from(self.data.len()).unwrap_or(u64::MAX),
            }));
        }
        let values: Vec<f32> = match self.dtype {
            WireDtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            WireDtype::F16 => self
                .data
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect::<Vec<_>>()
                .to_f32_vec(),
            WireDtype::Bf16 => self
                .data
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                .collect::<Vec<_>>()
                .to_f32_vec(),
        };
        Ok(Tensor::from_vec(values, self.shape.as_slice(), device)?)
    }
}

fn operand_to_wire(o: &Operand<Tensor>, dtype: WireDtype) -> Result<WireOperand> {
    Ok(match o {
        Operand::Inline(t) => WireOperand::Inline(WireTensor::from_tensor(t, dtype)?),
        Operand::Handle(h) => WireOperand::Handle(*h),
    })
}

fn operand_from_wire(o: WireOperand, device: &Device) -> Result<Operand<Tensor>> {
    Ok(match o {
        WireOperand::Inline(t) => Operand::Inline(t.to_tensor(device)?),
        WireOperand::Handle(h) => Operand::Handle(h),
    })
}

/// A request's calls for the wire, inline tensors in `dtype`.
pub fn request_to_wire(req: &ShardRequest<Tensor>, dtype: WireDtype) -> Result<Vec<WireCall>> {
    req.calls
        .iter()
        .map(|c| {
            let op = match &c.op {
                ShardOp::Conv2d { layer, input, pad } => WireOp::Conv2d {
                    layer: layer.clone(),
                    input: operand_to_wire(input, dtype)?,
                    pad: *pad,
                },
                ShardOp::GroupNormStats { layer, input } => WireOp::GroupNormStats {
                    layer: layer.clone(),
                    input: operand_to_wire(input, dtype)?,
                },
                ShardOp::Attention { q, k, v, heads } => WireOp::Attention {
                    q: operand_to_wire(q, dtype)?,
                    k: operand_to_wire(k, dtype)?,
                    v: operand_to_wire(v, dtype)?,
                    heads: u32::try_from(*heads).map_err(|_| {
                        Error::InvalidArgument(format!("{heads} attention heads do not fit u32"))
                    })?,
                },
                ShardOp::Identity { input } => WireOp::Identity {
                    input: operand_to_wire(input, dtype)?,
                },
                ShardOp::Release { handle } => WireOp::Release { handle: *handle },
            };
            Ok(WireCall {
                op,
                keep_as: c.keep_as,
                reply: c.reply,
            })
        })
        .collect()
}

/// The calls of a decoded request, inline tensors as f32 on `device`.
pub fn calls_from_wire(calls: Vec<WireCall>, device: &Device) -> Result<ShardRequest<Tensor>> {
    let calls = calls
        .into_iter()
        .map(|c| {
            let op = match c.op {
                WireOp::Conv2d { layer, input, pad } => ShardOp::Conv2d {
                    layer,
                    input: operand_from_wire(input, device)?,
                    pad,
                },
                WireOp::GroupNormStats { layer, input } => ShardOp::GroupNormStats {
                    layer,
                    input: operand_from_wire(input, device)?,
                },
                WireOp::Attention { q, k, v, heads } => ShardOp::Attention {
                    q: operand_from_wire(q, device)?,
                    k: operand_from_wire(k, device)?,
                    v: operand_from_wire(v, device)?,
                    heads: usize::try_from(heads).map_err(|_| {
                        Error::InvalidArgument(format!("{heads} attention heads do not fit usize"))
                    })?,
                },
                WireOp::Identity { input } => ShardOp::Identity {
                    input: operand_from_wire(input, device)?,
                },
                WireOp::Release { handle } => ShardOp::Release { handle },
            };
            Ok(ShardCall {
                op,
                keep_as: c.keep_as,
                reply: c.reply,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ShardRequest { calls })
}

/// A reply's outputs for the wire in `dtype`.
pub fn reply_to_wire(reply: &ShardReply<Tensor>, dtype: WireDtype) -> Result<Vec<WireTensor>> {
    reply
        .outputs
        .iter()
        .map(|t| WireTensor::from_tensor(t, dtype))
        .collect()
}

/// A decoded reply's outputs as f32 tensors on `device`.
pub fn reply_from_wire(outputs: Vec<WireTensor>, device: &Device) -> Result<ShardReply<Tensor>> {
    let outputs = outputs
        .iter()
        .map(|t| t.to_tensor(device))
        .collect::<Result<Vec<_>>>()?;
    Ok(ShardReply { outputs })
}

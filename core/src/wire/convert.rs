//! Conversions between the placement runtime's candle values (`ShardRequest<Tensor>`,
//! `ShardReply<Tensor>`) and the wire types. Tensors go out in the wire dtype as little-endian
//! bytes and always come back as f32 (compute is f32: candle's CPU matmul has no bf16).

use candle_core::{DType, Device, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::codec::{tensor_bytes, WireError};
use super::{WireCall, WireEarlySteps, WireOp, WireOperand, WireTensor};
use crate::placement::backend::{Operand, ShardCall, ShardOp, ShardReply, ShardRequest};
use crate::placement::engine::WireDtype;
use crate::vocab::error::{Error, Result};
use crate::vocab::job::{Accelerations, BatchRedundancy, EarlySteps, SchedulerKind};
use crate::vocab::layers::GeluKind;

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
        Ok(WireTensor {
            dtype,
            shape,
            data,
            coding: Default::default(),
        })
    }

    /// The tensor as f32 on `device` (f32 payloads bit-exact).
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        if self.coding.quant.is_some() {
            return Err(Error::Wire(WireError::Codec(
                "a quantized tensor is decoded by its session's codec first".into(),
            )));
        }
        Ok(Tensor::from_vec(
            self.values()?,
            self.shape.as_slice(),
            device,
        )?)
    }

    /// The elements of a raw tensor as f32 (f32 payloads bit-exact, f16/bf16 widened exactly).
    pub fn values(&self) -> std::result::Result<Vec<f32>, WireError> {
        let expected = tensor_bytes(&self.shape, self.dtype)?;
        if self.data.len() != expected || self.coding.quant.is_some() {
            return Err(WireError::LengthMismatch {
                what: "tensor data",
                expected: u64::try_from(expected).unwrap_or(u64::MAX),
                actual: u64::try_from(self.data.len()).unwrap_or(u64::MAX),
            });
        }
        Ok(match self.dtype {
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
        })
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

/// Kind bytes of `WireOp::Apply` (the strip ops).
pub mod apply_kind {
    pub const NARROW: u8 = 1;
    pub const CAT: u8 = 2;
    pub const GROUP_NORM_APPLY: u8 = 3;
    pub const LAYER_NORM: u8 = 4;
    pub const LINEAR: u8 = 5;
    pub const SILU: u8 = 6;
    pub const GEGLU: u8 = 7;
    pub const ADD: u8 = 8;
    pub const SCALE: u8 = 9;
    pub const ADD_CHANNEL_BIAS: u8 = 10;
    pub const UPSAMPLE_ROWS: u8 = 11;
    pub const TO_TOKENS: u8 = 12;
    pub const TO_SPATIAL: u8 = 13;
    pub const TIMESTEP_EMBEDDING: u8 = 14;
}

type ApplyParts<'a, T> = (u8, String, Vec<&'a Operand<T>>, Vec<u64>, Vec<f64>);

fn u(v: usize) -> u64 {
    v as u64
}

/// A strip op without a layer name or float parameters, as (kind, layer, operands, integers,
/// floats).
fn unnamed<T>(kind: u8, operands: Vec<&Operand<T>>, ints: Vec<u64>) -> ApplyParts<'_, T> {
    (kind, String::new(), operands, ints, vec![])
}

/// A strip op that names its layer and has no integer or float parameters.
fn named<'a, T>(kind: u8, layer: &str, operands: Vec<&'a Operand<T>>) -> ApplyParts<'a, T> {
    (kind, layer.to_owned(), operands, vec![], vec![])
}

/// A strip op as (kind, layer, operands, integers, floats).
pub fn apply_parts<T>(op: &ShardOp<T>) -> Result<ApplyParts<'_, T>> {
    use apply_kind as k;
    Ok(match op {
        ShardOp::Narrow {
            input,
            dim,
            start,
            len,
        } => unnamed(k::NARROW, vec![input], vec![u(*dim), u(*start), u(*len)]),
        ShardOp::Cat { inputs, dim } => unnamed(k::CAT, inputs.iter().collect(), vec![u(*dim)]),
        ShardOp::GroupNormApply {
            layer,
            input,
            moments,
        } => named(k::GROUP_NORM_APPLY, layer, vec![input, moments]),
        ShardOp::LayerNorm { layer, input } => named(k::LAYER_NORM, layer, vec![input]),
        ShardOp::Linear { layer, input } => named(k::LINEAR, layer, vec![input]),
        ShardOp::Silu { input } => unnamed(k::SILU, vec![input], vec![]),
        ShardOp::Geglu { input, kind } => {
            let gelu = match kind {
                GeluKind::Erf => 0,
                GeluKind::Tanh => 1,
            };
            unnamed(k::GEGLU, vec![input], vec![gelu])
        }
        ShardOp::Add { a, b } => unnamed(k::ADD, vec![a, b], vec![]),
        ShardOp::Scale { input, factor } => {
            (k::SCALE, String::new(), vec![input], vec![], vec![*factor])
        }
        ShardOp::AddChannelBias { input, bias } => {
            unnamed(k::ADD_CHANNEL_BIAS, vec![input, bias], vec![])
        }
        ShardOp::UpsampleRows {
            input,
            src_first,
            src_h,
            dst_h,
            dst_first,
            dst_len,
            dst_w,
        } => {
            let ints = [src_first, src_h, dst_h, dst_first, dst_len, dst_w];
            unnamed(
                k::UPSAMPLE_ROWS,
                vec![input],
                ints.iter().map(|v| u(**v)).collect(),
            )
        }
        ShardOp::ToTokens { input } => unnamed(k::TO_TOKENS, vec![input], vec![]),
        ShardOp::ToSpatial { input, h, w } => {
            unnamed(k::TO_SPATIAL, vec![input], vec![u(*h), u(*w)])
        }
        ShardOp::TimestepEmbedding {
            timestep,
            batch,
            dim,
            flip_sin_to_cos,
            shift,
        } => (
            k::TIMESTEP_EMBEDDING,
            String::new(),
            vec![],
            vec![u(*batch), u(*dim), u64::from(*flip_sin_to_cos)],
            vec![*timestep, *shift],
        ),
        ShardOp::Conv2d { .. }
        | ShardOp::GroupNormStats { .. }
        | ShardOp::Attention { .. }
        | ShardOp::Identity { .. }
        | ShardOp::Release { .. } => {
            return Err(Error::Internal(
                "this op has its own wire form, not Apply".into(),
            ))
        }
    })
}

fn malformed(kind: u8, what: &str) -> Error {
    Error::Wire(WireError::BadCall(format!("apply kind {kind}: {what}")))
}

/// Checks that an `Apply` of `kind` carries as many operands, integers and floats as that
/// kind takes (one or more operands for `Cat`).
fn check_apply_counts(kind: u8, operands: usize, ints: usize, floats: usize) -> Result<()> {
    use apply_kind as k;
    let (n_ops, n_ints, n_floats) = match kind {
        k::NARROW => (1, 3, 0),
        k::CAT => (usize::MAX, 1, 0),
        k::GROUP_NORM_APPLY | k::ADD | k::ADD_CHANNEL_BIAS => (2, 0, 0),
        k::LAYER_NORM | k::LINEAR | k::SILU | k::TO_TOKENS => (1, 0, 0),
        k::GEGLU => (1, 1, 0),
        k::SCALE => (1, 0, 1),
        k::UPSAMPLE_ROWS => (1, 6, 0),
        k::TO_SPATIAL => (1, 2, 0),
        k::TIMESTEP_EMBEDDING => (0, 3, 2),
        _ => return Err(malformed(kind, "unknown kind")),
    };
    let ops_ok = if n_ops == usize::MAX {
        operands > 0
    } else {
        operands == n_ops
    };
    if !ops_ok || ints != n_ints || floats != n_floats {
        return Err(malformed(kind, "wrong number of operands or parameters"));
    }
    Ok(())
}

/// The fields of a decoded `Apply` whose counts match its kind, read one by one into a
/// `ShardOp`; every accessor names the kind in its error.
struct ApplyArgs<'a, T> {
    kind: u8,
    operands: std::vec::IntoIter<Operand<T>>,
    ints: &'a [u64],
}

impl<T> ApplyArgs<'_, T> {
    fn next(&mut self) -> Result<Operand<T>> {
        self.operands
            .next()
            .ok_or_else(|| malformed(self.kind, "missing operand"))
    }

    fn int(&self, i: usize) -> Result<usize> {
        usize::try_from(self.ints[i]).map_err(|_| malformed(self.kind, "integer out of range"))
    }

    fn layer_name(&self, layer: String) -> Result<String> {
        if layer.is_empty() {
            Err(malformed(self.kind, "missing layer name"))
        } else {
            Ok(layer)
        }
    }
}

/// The strip op of a decoded `Apply` call (arity and parameter counts checked).
pub fn apply_from_parts<T>(
    kind: u8,
    layer: String,
    operands: Vec<Operand<T>>,
    ints: &[u64],
    floats: &[f64],
) -> Result<ShardOp<T>> {
    use apply_kind as k;
    check_apply_counts(kind, operands.len(), ints.len(), floats.len())?;
    let mut a = ApplyArgs {
        kind,
        operands: operands.into_iter(),
        ints,
    };
    Ok(match kind {
        k::NARROW => ShardOp::Narrow {
            input: a.next()?,
            dim: a.int(0)?,
            start: a.int(1)?,
            len: a.int(2)?,
        },
        k::CAT => {
            let dim = a.int(0)?;
            ShardOp::Cat {
                inputs: a.operands.collect(),
                dim,
            }
        }
        k::GROUP_NORM_APPLY => ShardOp::GroupNormApply {
            layer: a.layer_name(layer)?,
            input: a.next()?,
            moments: a.next()?,
        },
        k::LAYER_NORM => ShardOp::LayerNorm {
            layer: a.layer_name(layer)?,
            input: a.next()?,
        },
        k::LINEAR => ShardOp::Linear {
            layer: a.layer_name(layer)?,
            input: a.next()?,
        },
        k::SILU => ShardOp::Silu { input: a.next()? },
        k::GEGLU => ShardOp::Geglu {
            input: a.next()?,
            kind: match ints[0] {
                0 => GeluKind::Erf,
                1 => GeluKind::Tanh,
                _ => return Err(malformed(kind, "unknown GELU")),
            },
        },
        k::ADD => ShardOp::Add {
            a: a.next()?,
            b: a.next()?,
        },
        k::SCALE => {
            if !floats[0].is_finite() {
                return Err(malformed(kind, "non-finite factor"));
            }
            ShardOp::Scale {
                input: a.next()?,
                factor: floats[0],
            }
        }
        k::ADD_CHANNEL_BIAS => ShardOp::AddChannelBias {
            input: a.next()?,
            bias: a.next()?,
        },
        k::UPSAMPLE_ROWS => ShardOp::UpsampleRows {
            input: a.next()?,
            src_first: a.int(0)?,
            src_h: a.int(1)?,
            dst_h: a.int(2)?,
            dst_first: a.int(3)?,
            dst_len: a.int(4)?,
            dst_w: a.int(5)?,
        },
        k::TO_TOKENS => ShardOp::ToTokens { input: a.next()? },
        k::TO_SPATIAL => ShardOp::ToSpatial {
            input: a.next()?,
            h: a.int(0)?,
            w: a.int(1)?,
        },
        _ => {
            if !floats.iter().all(|f| f.is_finite()) || ints[2] > 1 {
                return Err(malformed(kind, "bad timestep parameters"));
            }
            ShardOp::TimestepEmbedding {
                timestep: floats[0],
                batch: a.int(0)?,
                dim: a.int(1)?,
                flip_sin_to_cos: ints[2] == 1,
                shift: floats[1],
            }
        }
    })
}

/// An early-steps job for the wire (its noise always in f32: the starting point of every
/// candidate must be exact).
pub fn early_steps_to_wire(job: &EarlySteps<Tensor>) -> Result<WireEarlySteps> {
    job.validate()?;
    let u32_of = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{what} {v} out of range")))
    };
    Ok(WireEarlySteps {
        candidates: job.candidates.clone(),
        negative_prompt: job.negative_prompt.clone(),
        noise: WireTensor::from_tensor(&job.noise, WireDtype::F32)?,
        steps: u32_of(job.steps, "steps")?,
        server_steps: u32_of(job.server_steps, "server steps")?,
        guidance: job.guidance,
        scheduler: match job.scheduler {
            SchedulerKind::Ddim => 0,
            SchedulerKind::DpmSolverMultistep => 1,
            SchedulerKind::EulerDiscrete => 2,
            SchedulerKind::EulerAncestral => 3,
            SchedulerKind::Lcm => 4,
        },
        batch_redundancy: match job.accel.batch_redundancy {
            BatchRedundancy::Off => 0,
            BatchRedundancy::Exact => 1,
            BatchRedundancy::Shared => 2,
        },
        attention_gate: u32_of(job.accel.attention_gate.unwrap_or(0), "attention gate")?,
        start_step: job
            .start_step
            .map(|s| u32_of(s, "start step"))
            .transpose()?,
        condition: job
            .condition
            .as_ref()
            .map(|c| WireTensor::from_tensor(c, WireDtype::F32))
            .transpose()?,
    })
}

/// A decoded early-steps job, its noise as f32 on `device`, checked against every bound a
/// server relies on.
pub fn early_steps_from_wire(w: WireEarlySteps, device: &Device) -> Result<EarlySteps<Tensor>> {
    let bad = |m: &str| Error::Wire(WireError::BadCall(format!("early steps: {m}")));
    let scheduler = match w.scheduler {
        0 => SchedulerKind::Ddim,
        1 => SchedulerKind::DpmSolverMultistep,
        2 => SchedulerKind::EulerDiscrete,
        3 => SchedulerKind::EulerAncestral,
        4 => SchedulerKind::Lcm,
        _ => return Err(bad("unknown scheduler")),
    };
    let batch_redundancy = match w.batch_redundancy {
        0 => BatchRedundancy::Off,
        1 => BatchRedundancy::Exact,
        2 => BatchRedundancy::Shared,
        _ => return Err(bad("unknown batch redundancy")),
    };
    let job = EarlySteps {
        candidates: w.candidates,
        negative_prompt: w.negative_prompt,
        noise: w.noise.to_tensor(device)?,
        steps: w.steps as usize,
        start_step: w.start_step.map(|s| s as usize),
        server_steps: w.server_steps as usize,
        condition: w.condition.map(|c| c.to_tensor(device)).transpose()?,
        guidance: w.guidance,
        scheduler,
        accel: Accelerations {
            batch_redundancy,
            attention_gate: (w.attention_gate > 0).then_some(w.attention_gate as usize),
        },
    };
    job.validate()?;
    Ok(job)
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
                other => {
                    let (kind, layer, operands, ints, floats) = apply_parts(other)?;
                    WireOp::Apply {
                        kind,
                        layer,
                        operands: operands
                            .into_iter()
                            .map(|o| operand_to_wire(o, dtype))
                            .collect::<Result<_>>()?,
                        ints,
                        floats,
                    }
                }
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
                WireOp::Apply {
                    kind,
                    layer,
                    operands,
                    ints,
                    floats,
                } => {
                    let operands = operands
                        .into_iter()
                        .map(|o| operand_from_wire(o, device))
                        .collect::<Result<Vec<_>>>()?;
                    apply_from_parts(kind, layer, operands, &ints, &floats)?
                }
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
pub fn reply_to_wire(
    reply: &ShardReply<Tensor>,
    request: &ShardRequest<Tensor>,
    dtype: WireDtype,
) -> Result<Vec<WireTensor>> {
    let dtypes = request
        .calls
        .iter()
        .filter(|c| c.reply)
        .map(|c| c.op.reply_dtype(dtype));
    reply
        .outputs
        .iter()
        .zip(dtypes)
        .map(|(t, d)| WireTensor::from_tensor(t, d))
        .collect()
}

/// A decoded reply's outputs as f32 tensors on `device`.
pub fn reply_from_wire(outputs: Vec<WireTensor>, device: &Device) -> Result<ShardReply<Tensor>> {
    let outputs = outputs
        .iter()
        .map(|t| t.to_tensor(device))
        .collect::<Result<Vec<_>>>()?;
    Ok(ShardReply::in_process(outputs))
}

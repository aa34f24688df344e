//! The shard codecs' state at one end of a session (`CodecEnd`): the references of the residual
//! codecs, one per slot and direction, and the coding of a raw tensor into what travels and
//! back.
//!
//! A slot names "the n-th coded tensor of a step" in one direction; the client numbers them
//! (docs/PROTOCOL.md §8), so step t's slot n is step t−1's slot n. The reference of a slot is
//! what the *receiver* reconstructed last time, which the sender also computes (both ends
//! dequantize with `Quant::dequantize`). Sending x against reference ref means sending
//! Q(x − ref) and both ends setting ref ← ref + Q(x − ref): the compression error of one step is
//! part of the next step's residual (error feedback), so it never accumulates.
//!
//! A residual needs a reference of the same shape; without one the sender sends a key frame
//! (int8, or the entropy codec's own coding of the tensor, kept as the reference). During exact
//! steps tensors travel raw and are kept.

use std::collections::HashMap;

use super::codec::WireError;
use super::convert::apply_kind;
use super::entropy;
use super::quant::Quant;
use super::{Coding, RefMode, ReplyCoding, WireCall, WireOp, WireOperand, WireTensor};
use crate::vocab::precision::{ShardCodec, WireDtype};

type Result<T> = std::result::Result<T, WireError>;

/// The quantizer of a codec's coded steps (None for `ShardCodec::None`).
pub fn codec_quant(codec: ShardCodec) -> Option<Quant> {
    match codec {
        ShardCodec::None => None,
        ShardCodec::Int8 => Some(Quant::Int8),
        ShardCodec::Int4 | ShardCodec::ResidualInt4 => Some(Quant::Int4),
        ShardCodec::ResidualInt2 => Some(Quant::Int2),
        ShardCodec::ResidualSign => Some(Quant::Sign),
        ShardCodec::ResidualEntropy => Some(Quant::Entropy),
    }
}

/// The quantizer of a residual codec's key frames (a slot's first tensor after the exact steps);
/// the entropy codec codes its key frames itself.
pub const KEY_FRAME: Quant = Quant::Int8;

/// Which way a tensor goes: the client's requests (up the phone's narrow link) or the server's
/// replies. Only the entropy codec quantizes them differently (`entropy::REQUESTS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Request,
    Reply,
}

impl Side {
    /// `x`'s payload under `quant` and the values the receiver decodes into `recon`; `of` is the
    /// tensor whose RMS sets an entropy step (the tensor itself, also when `x` is its change).
    fn quantize(self, quant: Quant, x: &[f32], of: &[f32], recon: &mut [f32]) -> Result<Vec<u8>> {
        if quant == Quant::Entropy {
            let f = match self {
                Side::Request => entropy::REQUESTS,
                Side::Reply => entropy::REPLIES,
            };
            let step = entropy::step_for(x, entropy::rms(of), f);
            return Ok(entropy::encode(x, step, f.dead_zone, recon));
        }
        let payload = quant.quantize(x);
        quant
            .dequantize(&payload, recon)
            .map_err(|_| WireError::Codec("quantizer length".into()))?;
        Ok(payload)
    }
}

/// How to send one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendAs {
    pub codec: ShardCodec,
    /// An exact (warm-up) step: raw, and kept as the reference by residual codecs.
    pub exact: bool,
    pub slot: u32,
}

/// References of one direction, bounded in bytes and count.
#[derive(Debug, Default)]
struct References {
    map: HashMap<u32, (Vec<usize>, Vec<f32>)>,
    bytes: usize,
}

impl References {
    /// Makes room for a reference of `elements` f32 at `slot`, refusing before any allocation
    /// when the store would pass `max_bytes` or `max_slots`.
    fn admit(&self, slot: u32, elements: usize, max_bytes: usize, max_slots: usize) -> Result<()> {
        let new = elements.checked_mul(4).ok_or(WireError::ShapeOverflow)?;
        let old = self.map.get(&slot).map_or(0, |(_, v)| v.len() * 4);
        let total = self.bytes - old + new;
        if total > max_bytes {
            return Err(WireError::Codec(format!(
                "references would hold {total} bytes, the budget is {max_bytes}"
            )));
        }
        if old == 0 && !self.map.contains_key(&slot) && self.map.len() >= max_slots {
            return Err(WireError::Codec(format!(
                "more than {max_slots} reference slots"
            )));
        }
        Ok(())
    }

    fn put(&mut self, slot: u32, shape: Vec<usize>, values: Vec<f32>) {
        let new = values.len() * 4;
        if let Some((_, old)) = self.map.insert(slot, (shape, values)) {
            self.bytes -= old.len() * 4;
        }
        self.bytes += new;
    }

    fn get_mut(&mut self, slot: u32, shape: &[usize]) -> Option<&mut Vec<f32>> {
        self.map
            .get_mut(&slot)
            .filter(|(s, _)| s == shape)
            .map(|(_, v)| v)
    }
}

/// One end of a session: what it sent (and the peer reconstructed) and what it received.
#[derive(Debug)]
pub struct CodecEnd {
    sent: References,
    received: References,
    max_bytes: usize,
    max_slots: usize,
}

impl CodecEnd {
    /// An end whose references (each direction) hold at most `max_bytes` in `max_slots` slots.
    pub fn new(max_bytes: usize, max_slots: usize) -> Self {
        Self {
            sent: References::default(),
            received: References::default(),
            max_bytes,
            max_slots,
        }
    }

    /// Bytes held in references, both directions.
    pub fn reference_bytes(&self) -> usize {
        self.sent.bytes + self.received.bytes
    }

    /// `t` (raw) as it travels under `how`.
    pub fn encode(&mut self, t: WireTensor, how: SendAs) -> Result<WireTensor> {
        self.encode_as(t, how, Side::Request)
    }

    fn encode_as(&mut self, t: WireTensor, how: SendAs, side: Side) -> Result<WireTensor> {
        let Some(quant) = codec_quant(how.codec) else {
            return Ok(t);
        };
        if t.coding != Coding::default() {
            return Err(WireError::Codec("only raw tensors are coded".into()));
        }
        let residual = how.codec.residual();
        if how.exact {
            if residual {
                let x = t.values()?;
                self.sent
                    .admit(how.slot, x.len(), self.max_bytes, self.max_slots)?;
                self.sent.put(how.slot, t.shape.clone(), x);
                return Ok(WireTensor {
                    coding: Coding {
                        quant: None,
                        reference: RefMode::Keep(how.slot),
                    },
                    ..t
                });
            }
            return Ok(t);
        }
        let x = t.values()?;
        let shape = t.shape;
        if !residual {
            return Ok(coded(shape, quant.quantize(&x), quant, RefMode::None));
        }
        if let Some(reference) = self.sent.get_mut(how.slot, &shape) {
            let r: Vec<f32> = x.iter().zip(reference.iter()).map(|(a, b)| a - b).collect();
            let mut step = vec![0f32; r.len()];
            let payload = side.quantize(quant, &r, &x, &mut step)?;
            for (v, d) in reference.iter_mut().zip(&step) {
                *v += d;
            }
            return Ok(coded(shape, payload, quant, RefMode::Residual(how.slot)));
        }
        self.sent
            .admit(how.slot, x.len(), self.max_bytes, self.max_slots)?;
        let key = if quant == Quant::Entropy {
            Quant::Entropy
        } else {
            KEY_FRAME
        };
        let mut kept = vec![0f32; x.len()];
        let payload = side.quantize(key, &x, &x, &mut kept)?;
        self.sent.put(how.slot, shape.clone(), kept);
        Ok(coded(shape, payload, key, RefMode::Keep(how.slot)))
    }

    /// A received tensor as raw values (quantized ones decode to f32), its reference kept or
    /// applied.
    pub fn decode(&mut self, t: WireTensor) -> Result<WireTensor> {
        let n = elements(&t.shape)?;
        match (t.coding.quant, t.coding.reference) {
            (None, RefMode::None) => Ok(t),
            (None, RefMode::Keep(slot)) => {
                self.received
                    .admit(slot, n, self.max_bytes, self.max_slots)?;
                let x = t.values()?;
                self.received.put(slot, t.shape.clone(), x);
                Ok(WireTensor {
                    coding: Coding::default(),
                    ..t
                })
            }
            (None, RefMode::Residual(_)) => {
                Err(WireError::Codec("a residual must be quantized".into()))
            }
            (Some(q), RefMode::Residual(slot)) => {
                let reference = self.received.get_mut(slot, &t.shape).ok_or_else(|| {
                    WireError::Codec(format!(
                        "a residual for slot {slot} has no reference of shape {:?}",
                        t.shape
                    ))
                })?;
                let mut step = vec![0f32; n];
                dequantize(q, &t.data, &mut step)?;
                for (v, d) in reference.iter_mut().zip(&step) {
                    *v += d;
                }
                let data = f32_bytes(reference);
                Ok(WireTensor::raw(WireDtype::F32, t.shape, data))
            }
            (Some(q), mode) => {
                if let RefMode::Keep(slot) = mode {
                    self.received
                        .admit(slot, n, self.max_bytes, self.max_slots)?;
                }
                let mut x = vec![0f32; n];
                dequantize(q, &t.data, &mut x)?;
                let data = f32_bytes(&x);
                if let RefMode::Keep(slot) = mode {
                    self.received.put(slot, t.shape.clone(), x);
                }
                Ok(WireTensor::raw(WireDtype::F32, t.shape, data))
            }
        }
    }
}

impl CodecEnd {
    /// Decodes every inline tensor of a received request in place (the server's side).
    pub fn decode_calls(&mut self, calls: &mut [WireCall]) -> Result<()> {
        for t in inline_tensors(calls, true) {
            let coded = std::mem::replace(t, WireTensor::raw(WireDtype::F32, vec![], vec![]));
            *t = self.decode(coded)?;
        }
        Ok(())
    }

    /// Codes a request's raw replies as `coding` asks; `exact[j]` marks the replies that travel
    /// exact whatever the codec (GroupNorm statistics; `exact_reply`).
    pub fn encode_replies(
        &mut self,
        outputs: Vec<WireTensor>,
        exact: &[bool],
        coding: ReplyCoding,
    ) -> Result<Vec<WireTensor>> {
        outputs
            .into_iter()
            .enumerate()
            .map(|(j, t)| {
                if coding.codec == ShardCodec::None || exact.get(j).copied().unwrap_or(true) {
                    return Ok(t);
                }
                let slot = u32::try_from(j)
                    .ok()
                    .and_then(|j| coding.first_slot.checked_add(j))
                    .ok_or(WireError::Codec("reply slot overflows u32".into()))?;
                self.encode_as(
                    t,
                    SendAs {
                        codec: coding.codec,
                        exact: coding.exact,
                        slot,
                    },
                    Side::Reply,
                )
            })
            .collect()
    }
}

/// The inline tensors of `calls` a shard codec codes, in order: all but the GroupNorm moments,
/// which travel exact.
pub fn coded_inputs(calls: &mut [WireCall]) -> Vec<&mut WireTensor> {
    inline_tensors(calls, false)
}

/// The inline tensors of `calls`, in order, with or without the GroupNorm moments.
fn inline_tensors(calls: &mut [WireCall], with_moments: bool) -> Vec<&mut WireTensor> {
    let mut out = Vec::new();
    for c in calls {
        let operands: Vec<&mut WireOperand> = match &mut c.op {
            WireOp::Conv2d { input, .. }
            | WireOp::GroupNormStats { input, .. }
            | WireOp::Identity { input } => vec![input],
            WireOp::Attention { q, k, v, .. } => vec![q, k, v],
            WireOp::Release { .. } => vec![],
            WireOp::Apply { kind, operands, .. } => {
                let moments = !with_moments && *kind == apply_kind::GROUP_NORM_APPLY;
                operands
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| !(moments && *i == 1))
                    .map(|(_, o)| o)
                    .collect()
            }
        };
        out.extend(operands.into_iter().filter_map(|o| match o {
            WireOperand::Inline(t) => Some(t),
            WireOperand::Handle(_) => None,
        }));
    }
    out
}

/// Whether the reply of `op` travels exact whatever the codec (GroupNorm statistics).
pub fn exact_reply(op: &WireOp) -> bool {
    matches!(op, WireOp::GroupNormStats { .. })
}

fn coded(shape: Vec<usize>, data: Vec<u8>, quant: Quant, reference: RefMode) -> WireTensor {
    WireTensor {
        dtype: WireDtype::F32,
        shape,
        data,
        coding: Coding {
            quant: Some(quant),
            reference,
        },
    }
}

fn elements(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or(WireError::ShapeOverflow)
}

fn dequantize(q: Quant, payload: &[u8], out: &mut [f32]) -> Result<()> {
    if q == Quant::Entropy {
        return entropy::decode(payload, out).map_err(|e| WireError::Codec(e.0.into()));
    }
    q.dequantize(payload, out)
        .map_err(|_| WireError::LengthMismatch {
            what: "quantized payload",
            expected: q.payload_len(out.len()).unwrap_or(0) as u64,
            actual: payload.len() as u64,
        })
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

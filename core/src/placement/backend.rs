//! Shard execution: what a shard server does with a request (`ShardExecutor`, over any engine,
//! with the session's tensor handles), and the in-process backend built on it. The ops and the
//! backend trait are vocabulary (`vocab::ops`); the QUIC backend carries the same requests over
//! the wire.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::vocab::engine::Engine;
use crate::vocab::error::{Error, Result};
use crate::vocab::job::{EarlySteps, EarlyStepsRunner};
use crate::vocab::layers::ShardLayer;
pub use crate::vocab::ops::{
    upsample_source_row, HandleId, Operand, ShardBackend, ShardCall, ShardOp, ShardReply,
    ShardRequest,
};

/// What a shard server does with a request, over any engine. Holds the layer table (which
/// layers this server may run, with their hyper-parameters) and the session's handles.
pub struct ShardExecutor<E: Engine> {
    engine: E,
    layers: HashMap<String, ShardLayer>,
    handles: Mutex<HashMap<HandleId, E::T>>,
    max_handles: usize,
    max_handle_bytes: u64,
    attention_chunk: usize,
    /// Runs `EarlySteps` where this server holds the whole model.
    denoiser: Option<Arc<dyn EarlyStepsRunner<E::T>>>,
}

/// Default cap on the f32 bytes a session may keep under handles.
pub const DEFAULT_MAX_HANDLE_BYTES: u64 = 8 << 30;

fn held_bytes<E: Engine>(engine: &E, t: &E::T) -> u64 {
    engine.dims(t).iter().map(|&d| d as u64).product::<u64>() * 4
}

fn bad(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

impl<E: Engine> ShardExecutor<E> {
    pub fn new(engine: E, layers: HashMap<String, ShardLayer>) -> Self {
        Self {
            engine,
            layers,
            handles: Mutex::new(HashMap::new()),
            max_handles: 4096,
            max_handle_bytes: DEFAULT_MAX_HANDLE_BYTES,
            attention_chunk: 4096,
            denoiser: None,
        }
    }

    /// Lets this executor run the `obfuscated` policy's early steps with `runner`.
    pub fn with_denoiser(mut self, runner: Arc<dyn EarlyStepsRunner<E::T>>) -> Self {
        self.denoiser = Some(runner);
        self
    }

    /// Caps the bytes (as f32) a session keeps under handles; a call that would exceed it fails.
    pub fn with_max_handle_bytes(mut self, bytes: u64) -> Self {
        self.max_handle_bytes = bytes;
        self
    }

    /// Runs the `obfuscated` policy's early steps where this executor holds a runner for them;
    /// refuses on a shard-only server.
    pub fn early_steps(&self, job: &EarlySteps<E::T>) -> Result<E::T> {
        match &self.denoiser {
            Some(d) => d.run_early_steps(job),
            None => Err(crate::vocab::ops::shard_only()),
        }
    }

    /// Bytes held under handles now.
    pub fn held_bytes(&self) -> u64 {
        self.handles
            .lock()
            .map(|h| h.values().map(|t| held_bytes(&self.engine, t)).sum())
            .unwrap_or(0)
    }

    fn operand(&self, o: &Operand<E::T>) -> Result<E::T> {
        match o {
            Operand::Inline(t) => Ok(t.clone()),
            Operand::Handle(h) => self
                .handles
                .lock()
                .map_err(|_| Error::Internal("handle table poisoned".into()))?
                .get(h)
                .cloned()
                .ok_or_else(|| Error::InvalidArgument(format!("unknown tensor handle {h}"))),
        }
    }

    fn layer(&self, name: &str) -> Result<&ShardLayer> {
        self.layers
            .get(name)
            .ok_or_else(|| Error::InvalidArgument(format!("this shard holds no layer `{name}`")))
    }

    /// Runs one call's op.
    pub fn run(&self, op: &ShardOp<E::T>) -> Result<Option<E::T>> {
        Ok(Some(match op {
            ShardOp::Conv2d { .. }
            | ShardOp::GroupNormStats { .. }
            | ShardOp::GroupNormApply { .. }
            | ShardOp::LayerNorm { .. }
            | ShardOp::Linear { .. } => self.run_layer_op(op)?,
            ShardOp::Narrow { .. }
            | ShardOp::Cat { .. }
            | ShardOp::UpsampleRows { .. }
            | ShardOp::ToTokens { .. }
            | ShardOp::ToSpatial { .. } => self.run_shape_op(op)?,
            ShardOp::Attention { q, k, v, heads } => self.engine.attention(
                &self.operand(q)?,
                &self.operand(k)?,
                &self.operand(v)?,
                *heads,
                self.attention_chunk,
            )?,
            ShardOp::Identity { input } => self.operand(input)?,
            ShardOp::Release { handle } => {
                if let Ok(mut h) = self.handles.lock() {
                    h.remove(handle);
                }
                return Ok(None);
            }
            ShardOp::Silu { input } => self.engine.silu(&self.operand(input)?)?,
            ShardOp::Geglu { input, kind } => {
                let x = self.operand(input)?;
                if self.engine.dims(&x).last().is_none_or(|l| l % 2 != 0) {
                    return Err(bad("GEGLU needs an even last dimension".into()));
                }
                self.engine.geglu(&x, *kind)?
            }
            ShardOp::Add { a, b } => {
                let (a, b) = (self.operand(a)?, self.operand(b)?);
                if self.engine.dims(&a) != self.engine.dims(&b) {
                    return Err(bad(format!(
                        "add of {:?} and {:?}",
                        self.engine.dims(&a),
                        self.engine.dims(&b)
                    )));
                }
                self.engine.add(&a, &b)?
            }
            ShardOp::Scale { input, factor } => {
                self.engine.scale(&self.operand(input)?, *factor)?
            }
            ShardOp::AddChannelBias { input, bias } => {
                let (x, e) = (self.operand(input)?, self.operand(bias)?);
                let (xd, ed) = (self.engine.dims(&x), self.engine.dims(&e));
                if xd.len() != 4 || ed != [xd[0], xd[1]] {
                    return Err(bad(format!("channel bias {ed:?} on {xd:?}")));
                }
                self.engine.add_channel_bias(&x, &e)?
            }
            ShardOp::TimestepEmbedding {
                timestep,
                batch,
                dim,
                flip_sin_to_cos,
                shift,
            } => {
                if *batch == 0 || *batch > 4096 || *dim == 0 || *dim > (1 << 16) {
                    return Err(bad(format!("timestep embedding {batch}x{dim}")));
                }
                self.engine
                    .timestep_embedding(*timestep, *batch, *dim, *flip_sin_to_cos, *shift)?
            }
        }))
    }

    /// The ops that name a layer this server holds: the layer must exist, be of the op's kind,
    /// and fit the operand's shape.
    fn run_layer_op(&self, op: &ShardOp<E::T>) -> Result<E::T> {
        Ok(match op {
            ShardOp::Conv2d { layer, input, pad } => match self.layer(layer)? {
                ShardLayer::Conv2d(c) => self.engine.conv2d(c, &self.operand(input)?, *pad)?,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "`{layer}` is not a convolution"
                    )))
                }
            },
            ShardOp::GroupNormStats { layer, input } => match self.layer(layer)? {
                ShardLayer::GroupNorm(g) => {
                    self.engine.group_norm_stats(g, &self.operand(input)?)?
                }
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "`{layer}` is not a GroupNorm"
                    )))
                }
            },
            ShardOp::GroupNormApply {
                layer,
                input,
                moments,
            } => match self.layer(layer)? {
                ShardLayer::GroupNorm(g) => {
                    let x = self.operand(input)?;
                    let m = self.operand(moments)?;
                    let (xd, md) = (self.engine.dims(&x), self.engine.dims(&m));
                    if xd.len() != 4 || xd[1] != g.channels || md != [xd[0], g.groups, 2] {
                        return Err(bad(format!(
                            "`{layer}` cannot normalise {xd:?} with moments {md:?}"
                        )));
                    }
                    self.engine.group_norm_apply(g, &x, &m)?
                }
                _ => return Err(bad(format!("`{layer}` is not a GroupNorm"))),
            },
            ShardOp::LayerNorm { layer, input } => match self.layer(layer)? {
                ShardLayer::LayerNorm(l) => {
                    let x = self.operand(input)?;
                    if self.engine.dims(&x).last() != Some(&l.dim) {
                        return Err(bad(format!("`{layer}` on {:?}", self.engine.dims(&x))));
                    }
                    self.engine.layer_norm(l, &x)?
                }
                _ => return Err(bad(format!("`{layer}` is not a LayerNorm"))),
            },
            ShardOp::Linear { layer, input } => match self.layer(layer)? {
                ShardLayer::Linear(l) => {
                    let x = self.operand(input)?;
                    if self.engine.dims(&x).last() != Some(&l.in_features) {
                        return Err(bad(format!("`{layer}` on {:?}", self.engine.dims(&x))));
                    }
                    self.engine.linear(l, &x)?
                }
                _ => return Err(bad(format!("`{layer}` is not a linear layer"))),
            },
            _ => return Err(Error::Internal("not a layer op".into())),
        })
    }

    /// The ops that move rows and tokens around: every index is checked against the operand.
    fn run_shape_op(&self, op: &ShardOp<E::T>) -> Result<E::T> {
        Ok(match op {
            ShardOp::Narrow {
                input,
                dim,
                start,
                len,
            } => {
                let x = self.operand(input)?;
                let d = self.engine.dims(&x);
                let size = d
                    .get(*dim)
                    .ok_or_else(|| bad(format!("narrow on dim {dim} of {d:?}")))?;
                if start.checked_add(*len).is_none_or(|e| e > *size) || *len == 0 {
                    return Err(bad(format!("narrow {start}+{len} of dim {dim} of {d:?}")));
                }
                self.engine.narrow(&x, *dim, *start, *len)?
            }
            ShardOp::Cat { inputs, dim } => {
                let xs = inputs
                    .iter()
                    .map(|o| self.operand(o))
                    .collect::<Result<Vec<_>>>()?;
                self.check_cat(&xs, *dim)?;
                self.engine.cat(&xs, *dim)?
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
                let x = self.operand(input)?;
                let d = self.engine.dims(&x);
                if d.len() != 4
                    || *dst_len == 0
                    || *dst_w == 0
                    || dst_first.checked_add(*dst_len).is_none_or(|e| e > *dst_h)
                    || *dst_h > (1 << 16)
                    || *dst_w > (1 << 16)
                {
                    return Err(bad(format!(
                        "up-sampling {d:?} to rows {dst_first}+{dst_len} of {dst_h}"
                    )));
                }
                let rows = (*dst_first..dst_first + dst_len)
                    .map(|r| {
                        upsample_source_row(r, *src_h, *dst_h)
                            .checked_sub(*src_first)
                            .filter(|&i| i < d[2])
                            .ok_or_else(|| {
                                bad(format!(
                                    "up-sampled row {r} needs a source row this strip does not hold"
                                ))
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                self.engine.upsample_rows(&x, &rows, *dst_w)?
            }
            ShardOp::ToTokens { input } => {
                let x = self.operand(input)?;
                if self.engine.dims(&x).len() != 4 {
                    return Err(bad("to_tokens needs [B, C, H, W]".into()));
                }
                self.engine.to_tokens(&x)?
            }
            ShardOp::ToSpatial { input, h, w } => {
                let x = self.operand(input)?;
                let d = self.engine.dims(&x);
                if d.len() != 3 || h.checked_mul(*w) != Some(d[1]) {
                    return Err(bad(format!("to_spatial {h}x{w} of {d:?}")));
                }
                self.engine.to_spatial(&x, *h, *w)?
            }
            _ => return Err(Error::Internal("not a shape op".into())),
        })
    }

    fn check_cat(&self, xs: &[E::T], dim: usize) -> Result<()> {
        let first = xs
            .first()
            .map(|x| self.engine.dims(x))
            .ok_or_else(|| bad("empty concatenation".into()))?;
        if dim >= first.len() {
            return Err(bad(format!("cat on dim {dim} of {first:?}")));
        }
        for x in xs {
            let d = self.engine.dims(x);
            let same = d.len() == first.len()
                && d.iter()
                    .zip(&first)
                    .enumerate()
                    .all(|(i, (a, b))| i == dim || a == b);
            if !same {
                return Err(bad(format!("cat of {first:?} and {d:?} on dim {dim}")));
            }
        }
        Ok(())
    }

    /// Executes a whole request.
    pub fn execute(&self, request: &ShardRequest<E::T>) -> Result<ShardReply<E::T>> {
        let mut outputs = Vec::new();
        for call in &request.calls {
            let out = self.run(&call.op)?;
            if let (Some(h), Some(t)) = (call.keep_as, out.as_ref()) {
                let mut table = self
                    .handles
                    .lock()
                    .map_err(|_| Error::Internal("handle table poisoned".into()))?;
                if table.len() >= self.max_handles && !table.contains_key(&h) {
                    return Err(Error::InvalidArgument(format!(
                        "session holds {} tensors, the limit",
                        self.max_handles
                    )));
                }
                let held: u64 = table
                    .iter()
                    .filter(|(k, _)| **k != h)
                    .map(|(_, v)| held_bytes(&self.engine, v))
                    .sum();
                let add = held_bytes(&self.engine, t);
                if held + add > self.max_handle_bytes {
                    return Err(Error::InvalidArgument(format!(
                        "session would hold {} bytes under handles, over its limit of {}",
                        held + add,
                        self.max_handle_bytes
                    )));
                }
                table.insert(h, t.clone());
            }
            if call.reply {
                outputs.push(out.ok_or_else(|| {
                    Error::InvalidArgument("a release has no result to reply with".into())
                })?);
            }
        }
        Ok(ShardReply { outputs })
    }

    pub fn held_handles(&self) -> usize {
        self.handles.lock().map(|h| h.len()).unwrap_or(0)
    }
}

/// A shard backend that runs in this process (tests, plans, and the in-process demo).
pub struct InProcessBackend<E: Engine> {
    pub executor: ShardExecutor<E>,
}

impl<E: Engine> InProcessBackend<E> {
    pub fn new(engine: E, layers: HashMap<String, ShardLayer>) -> Self {
        Self {
            executor: ShardExecutor::new(engine, layers),
        }
    }
}

#[async_trait]
impl<E: Engine> ShardBackend<E::T> for InProcessBackend<E> {
    async fn execute(&self, request: ShardRequest<E::T>) -> Result<ShardReply<E::T>> {
        self.executor.execute(&request)
    }

    async fn early_steps(&self, job: EarlySteps<E::T>) -> Result<E::T> {
        self.executor.early_steps(&job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::engine::CandleEngine;
    use crate::vocab::layers::Conv2dSpec;
    use crate::vocab::precision::Pad;
    use candle_core::{Device, Tensor};

    fn executor() -> (ShardExecutor<CandleEngine>, Tensor) {
        let dev = Device::Cpu;
        let conv = Conv2dSpec::new("c".into(), 2, 3, 3, 1, 1);
        let mut w = HashMap::new();
        w.insert(
            "c.weight".to_string(),
            Tensor::arange(0f32, 54., &dev)
                .and_then(|t| t.reshape((3, 2, 3, 3)))
                .expect("w"),
        );
        w.insert(
            "c.bias".to_string(),
            Tensor::new(&[0.5f32, -1.0, 2.0], &dev).expect("b"),
        );
        let mut layers = HashMap::new();
        layers.insert("c".to_string(), ShardLayer::Conv2d(conv));
        let x = Tensor::arange(0f32, 2. * 5. * 4., &dev)
            .and_then(|t| t.reshape((1, 2, 5, 4)))
            .expect("x");
        (ShardExecutor::new(CandleEngine::new(w, dev), layers), x)
    }

    fn conv(input: Operand<Tensor>) -> ShardOp<Tensor> {
        ShardOp::Conv2d {
            layer: "c".into(),
            input,
            pad: Pad {
                top: 1,
                bottom: 1,
                left: 1,
                right: 1,
            },
        }
    }

    #[test]
    fn handles_keep_tensors_between_requests() {
        let (ex, x) = executor();
        let inline = ex
            .execute(&ShardRequest {
                calls: vec![ShardCall::reply(conv(Operand::Inline(x.clone())))],
            })
            .expect("inline");
        // Upload into handle 7 without a reply, then convolve the held tensor and keep the result.
        let up = ShardCall {
            op: ShardOp::Identity {
                input: Operand::Inline(x),
            },
            keep_as: Some(7),
            reply: false,
        };
        let held = ShardCall {
            op: conv(Operand::Handle(7)),
            keep_as: Some(8),
            reply: true,
        };
        let r = ex
            .execute(&ShardRequest {
                calls: vec![up, held],
            })
            .expect("handles");
        assert_eq!(r.outputs.len(), 1);
        let diff = (&r.outputs[0] - &inline.outputs[0])
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        assert_eq!(diff, 0.0);
        assert_eq!(ex.held_handles(), 2);
        let rel = ShardCall {
            op: ShardOp::Release { handle: 7 },
            keep_as: None,
            reply: false,
        };
        ex.execute(&ShardRequest { calls: vec![rel] })
            .expect("release");
        assert_eq!(ex.held_handles(), 1);
        let err = ex.execute(&ShardRequest {
            calls: vec![ShardCall::reply(conv(Operand::Handle(7)))],
        });
        assert!(
            matches!(err, Err(Error::InvalidArgument(m)) if m.contains("unknown tensor handle 7"))
        );
    }

    #[test]
    fn unknown_layers_are_refused() {
        let (ex, x) = executor();
        let op = ShardOp::GroupNormStats {
            layer: "c".into(),
            input: Operand::Inline(x.clone()),
        };
        assert!(
            ex.execute(&ShardRequest {
                calls: vec![ShardCall::reply(op)]
            })
            .is_err(),
            "c is a conv, not a GroupNorm"
        );
        let op = ShardOp::Conv2d {
            layer: "nope".into(),
            input: Operand::Inline(x),
            pad: Pad::default(),
        };
        let e = ex.execute(&ShardRequest {
            calls: vec![ShardCall::reply(op)],
        });
        assert!(matches!(e, Err(Error::InvalidArgument(m)) if m.contains("no layer `nope`")));
    }
}

//! Shard execution: what a shard server does with a request (`ShardExecutor`, over any engine,
//! with the session's tensor handles), and the in-process backend built on it. The ops and the
//! backend trait are vocabulary (`vocab::ops`); the QUIC backend carries the same requests over
//! the wire.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::placement::admission::{admit, f32_bytes, MemoryBudget, Reservation};
use crate::vocab::engine::Engine;
use crate::vocab::error::{Error, Result};
use crate::vocab::job::{EarlySteps, EarlyStepsRunner};
use crate::vocab::layers::ShardLayer;
pub use crate::vocab::ops::{
    upsample_source_row, HandleId, Operand, PayloadBytes, ShardBackend, ShardCall, ShardOp,
    ShardReply, ShardRequest,
};

/// What a shard server does with a request, over any engine. Holds the layer table (which
/// layers this server may run, with their hyper-parameters) and the session's handles. Every
/// op is admitted (`admission::admit`) from its operands' shapes before it runs: its output and
/// working memory are bounded by `max_op_bytes` and reserved from the process-wide budget.
pub struct ShardExecutor<E: Engine> {
    engine: E,
    layers: HashMap<String, ShardLayer>,
    handles: Mutex<HashMap<HandleId, Held<E::T>>>,
    max_handles: usize,
    max_handle_bytes: u64,
    max_op_bytes: u64,
    max_reply_bytes: u64,
    budget: Arc<MemoryBudget>,
    attention_chunk: usize,
    /// Runs `EarlySteps` where this server holds the whole model.
    denoiser: Option<Arc<dyn EarlyStepsRunner<E::T>>>,
}

/// A tensor kept under a handle, with its bytes held from the budget.
struct Held<T> {
    tensor: T,
    bytes: u64,
    _reservation: Reservation,
}

/// Default cap on the f32 bytes a session may keep under handles.
pub const DEFAULT_MAX_HANDLE_BYTES: u64 = 8 << 30;
/// Default cap on one op's admitted peak (SD1.5's 4,096-token self-attention over a CFG batch
/// in one query chunk needs about 2.2 GB).
pub const DEFAULT_MAX_OP_BYTES: u64 = 4 << 30;

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
            max_op_bytes: DEFAULT_MAX_OP_BYTES,
            max_reply_bytes: u64::MAX,
            budget: MemoryBudget::new(u64::MAX),
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

    /// Caps one op's admitted peak memory and one replied tensor's bytes (as f32), and draws
    /// every op's peak and every kept tensor from `budget` (shared by the process's sessions).
    pub fn with_limits(
        mut self,
        max_op_bytes: u64,
        max_reply_bytes: u64,
        budget: Arc<MemoryBudget>,
    ) -> Self {
        self.max_op_bytes = max_op_bytes;
        self.max_reply_bytes = max_reply_bytes;
        self.budget = budget;
        self
    }

    /// Runs the `obfuscated` policy's early steps where this executor holds a runner for them;
    /// refuses on a shard-only server.
    /// Its working memory (`EarlyStepsRunner::working_bytes`) is reserved from the process-wide
    /// budget first: a job the budget cannot hold now is refused before it runs.
    pub fn early_steps(&self, job: &EarlySteps<E::T>) -> Result<E::T> {
        match &self.denoiser {
            Some(d) => {
                let bytes = d.working_bytes(job)?;
                let _working = self.budget.reserve(bytes, "the early steps job")?;
                d.run_early_steps(job)
            }
            None => Err(crate::vocab::ops::shard_only()),
        }
    }

    /// Bytes held under handles now.
    pub fn held_bytes(&self) -> u64 {
        self.handles
            .lock()
            .map(|h| h.values().map(|t| t.bytes).sum())
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
                .map(|held| held.tensor.clone())
                .ok_or_else(|| Error::InvalidArgument(format!("unknown tensor handle {h}"))),
        }
    }

    fn operand_dims(&self, o: &Operand<E::T>) -> Result<Vec<usize>> {
        self.operand(o).map(|t| self.engine.dims(&t))
    }

    fn layer(&self, name: &str) -> Result<&ShardLayer> {
        self.layers
            .get(name)
            .ok_or_else(|| Error::InvalidArgument(format!("this shard holds no layer `{name}`")))
    }

    /// Admits `op` (shapes checked, peak bounded and reserved), then runs it. `reply`: its
    /// result goes back over the wire, so it must also fit a reply.
    fn run_admitted(&self, op: &ShardOp<E::T>, reply: bool) -> Result<Option<E::T>> {
        let Some(a) = admit(
            op,
            &self.layers,
            &|o| self.operand_dims(o),
            self.attention_chunk,
        )?
        else {
            return self.run(op);
        };
        if a.peak_bytes > self.max_op_bytes {
            return Err(bad(format!(
                "refused before running: the op would need {} bytes, over the limit of {}",
                a.peak_bytes, self.max_op_bytes
            )));
        }
        if reply && f32_bytes(&a.out)? > self.max_reply_bytes {
            return Err(bad(format!(
                "refused before running: a reply of {:?} is over the limit of {} bytes",
                a.out, self.max_reply_bytes
            )));
        }
        let _working = self.budget.reserve(a.peak_bytes, "the op")?;
        self.run(op)
    }

    /// Runs one call's op. Its shapes must have been admitted (`admission::admit`): this only
    /// dispatches.
    fn run(&self, op: &ShardOp<E::T>) -> Result<Option<E::T>> {
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
            ShardOp::Geglu { input, kind } => self.engine.geglu(&self.operand(input)?, *kind)?,
            ShardOp::Add { a, b } => self.engine.add(&self.operand(a)?, &self.operand(b)?)?,
            ShardOp::Scale { input, factor } => {
                self.engine.scale(&self.operand(input)?, *factor)?
            }
            ShardOp::AddChannelBias { input, bias } => self
                .engine
                .add_channel_bias(&self.operand(input)?, &self.operand(bias)?)?,
            ShardOp::TimestepEmbedding {
                timestep,
                batch,
                dim,
                flip_sin_to_cos,
                shift,
            } => {
                self.engine
                    .timestep_embedding(*timestep, *batch, *dim, *flip_sin_to_cos, *shift)?
            }
        }))
    }

    /// The ops that name a layer this server holds (kind and shapes admitted already).
    fn run_layer_op(&self, op: &ShardOp<E::T>) -> Result<E::T> {
        let kind = |l: &str| bad(format!("`{l}` is not the layer kind the op needs"));
        Ok(match op {
            ShardOp::Conv2d { layer, input, pad } => match self.layer(layer)? {
                ShardLayer::Conv2d(c) => self.engine.conv2d(c, &self.operand(input)?, *pad)?,
                _ => return Err(kind(layer)),
            },
            ShardOp::GroupNormStats { layer, input } => match self.layer(layer)? {
                ShardLayer::GroupNorm(g) => {
                    self.engine.group_norm_stats(g, &self.operand(input)?)?
                }
                _ => return Err(kind(layer)),
            },
            ShardOp::GroupNormApply {
                layer,
                input,
                moments,
            } => match self.layer(layer)? {
                ShardLayer::GroupNorm(g) => self.engine.group_norm_apply(
                    g,
                    &self.operand(input)?,
                    &self.operand(moments)?,
                )?,
                _ => return Err(kind(layer)),
            },
            ShardOp::LayerNorm { layer, input } => match self.layer(layer)? {
                ShardLayer::LayerNorm(l) => self.engine.layer_norm(l, &self.operand(input)?)?,
                _ => return Err(kind(layer)),
            },
            ShardOp::Linear { layer, input } => match self.layer(layer)? {
                ShardLayer::Linear(l) => self.engine.linear(l, &self.operand(input)?)?,
                _ => return Err(kind(layer)),
            },
            _ => return Err(Error::Internal("not a layer op".into())),
        })
    }

    /// The ops that move rows and tokens around (shapes admitted already; the up-sampling's
    /// source rows are checked against the strip it holds).
    fn run_shape_op(&self, op: &ShardOp<E::T>) -> Result<E::T> {
        Ok(match op {
            ShardOp::Narrow {
                input,
                dim,
                start,
                len,
            } => self
                .engine
                .narrow(&self.operand(input)?, *dim, *start, *len)?,
            ShardOp::Cat { inputs, dim } => {
                let xs = inputs
                    .iter()
                    .map(|o| self.operand(o))
                    .collect::<Result<Vec<_>>>()?;
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
                let held = self.engine.dims(&x).get(2).copied().unwrap_or(0);
                let rows = (*dst_first..dst_first + dst_len)
                    .map(|r| {
                        upsample_source_row(r, *src_h, *dst_h)
                            .checked_sub(*src_first)
                            .filter(|&i| i < held)
                            .ok_or_else(|| {
                                bad(format!(
                                    "up-sampled row {r} needs a source row this strip does not hold"
                                ))
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                self.engine.upsample_rows(&x, &rows, *dst_w)?
            }
            ShardOp::ToTokens { input } => self.engine.to_tokens(&self.operand(input)?)?,
            ShardOp::ToSpatial { input, h, w } => {
                self.engine.to_spatial(&self.operand(input)?, *h, *w)?
            }
            _ => return Err(Error::Internal("not a shape op".into())),
        })
    }

    /// Executes a whole request.
    pub fn execute(&self, request: &ShardRequest<E::T>) -> Result<ShardReply<E::T>> {
        self.execute_until(request, &|| false)
    }

    /// Executes a whole request, asking `cancelled` before every call: once it answers true the
    /// request stops there with `Error::Cancelled` (its connection is gone: nobody waits).
    pub fn execute_until(
        &self,
        request: &ShardRequest<E::T>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<ShardReply<E::T>> {
        let mut outputs = Vec::new();
        for call in &request.calls {
            if cancelled() {
                return Err(Error::Cancelled);
            }
            let out = self.run_admitted(&call.op, call.reply)?;
            if let (Some(h), Some(t)) = (call.keep_as, out.as_ref()) {
                self.keep(h, t)?;
            }
            if call.reply {
                outputs.push(out.ok_or_else(|| {
                    Error::InvalidArgument("a release has no result to reply with".into())
                })?);
            }
        }
        Ok(ShardReply::in_process(outputs))
    }

    /// Keeps `t` under handle `h`, within the session's caps and the process budget.
    fn keep(&self, h: HandleId, t: &E::T) -> Result<()> {
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
            .map(|(_, v)| v.bytes)
            .sum();
        let add = f32_bytes(&self.engine.dims(t))?;
        if held.saturating_add(add) > self.max_handle_bytes {
            return Err(Error::InvalidArgument(format!(
                "session would hold {} bytes under handles, over its limit of {}",
                held.saturating_add(add),
                self.max_handle_bytes
            )));
        }
        // The old tensor under `h` (if any) gives its bytes back before the new one takes them.
        table.remove(&h);
        let reservation = self.budget.reserve(add, "a kept tensor")?;
        table.insert(
            h,
            Held {
                tensor: t.clone(),
                bytes: add,
                _reservation: reservation,
            },
        );
        Ok(())
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

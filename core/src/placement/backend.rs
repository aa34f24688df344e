//! Shard backends: where server-side work runs. A request is a list of calls; each call names a
//! layer the server holds weights for (by diffusers name, never by weight values) and operands
//! that are either sent inline or refer to a tensor the server keeps in this session by handle.
//! Handles let a later policy keep feature strips resident on a server between ops. The
//! in-process backend executes calls here; the QUIC backend (server issue) carries the same
//! requests over the wire.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::model::layers::ShardLayer;
use crate::placement::engine::{Engine, Pad};

/// A session-scoped tensor id chosen by the client.
pub type HandleId = u64;

/// An op's input: sent with the request, or already held by the server.
#[derive(Debug, Clone)]
pub enum Operand<T> {
    Inline(T),
    Handle(HandleId),
}

/// The work a shard server can be asked to do.
#[derive(Debug, Clone)]
pub enum ShardOp<T> {
    /// Convolution of a row block; `pad` is the zero padding where the block meets the border.
    Conv2d {
        layer: String,
        input: Operand<T>,
        pad: Pad,
    },
    /// Per-group partial statistics [B, G, 3] = (count, mean, M2) of a block.
    GroupNormStats { layer: String, input: Operand<T> },
    /// softmax(q kᵀ/√d) v for a block of query rows.
    Attention {
        q: Operand<T>,
        k: Operand<T>,
        v: Operand<T>,
        heads: usize,
    },
    /// Returns (or keeps) the operand itself: uploads a tensor into a handle, or fetches one.
    Identity { input: Operand<T> },
    /// Forgets a handle.
    Release { handle: HandleId },
}

impl<T> ShardOp<T> {
    /// Inline operands, i.e. what this op carries over the wire.
    pub fn inline_operands(&self) -> Vec<&T> {
        let operands: Vec<&Operand<T>> = match self {
            ShardOp::Conv2d { input, .. }
            | ShardOp::GroupNormStats { input, .. }
            | ShardOp::Identity { input } => vec![input],
            ShardOp::Attention { q, k, v, .. } => vec![q, k, v],
            ShardOp::Release { .. } => vec![],
        };
        operands
            .into_iter()
            .filter_map(|o| match o {
                Operand::Inline(t) => Some(t),
                Operand::Handle(_) => None,
            })
            .collect()
    }
}

/// One call: the op, whether to keep its result under a handle, whether to send it back.
#[derive(Debug, Clone)]
pub struct ShardCall<T> {
    pub op: ShardOp<T>,
    pub keep_as: Option<HandleId>,
    pub reply: bool,
}

impl<T> ShardCall<T> {
    /// A call whose result comes straight back (the `ppidm` pattern).
    pub fn reply(op: ShardOp<T>) -> Self {
        Self {
            op,
            keep_as: None,
            reply: true,
        }
    }
}

/// Calls executed in order; one round trip.
#[derive(Debug, Clone)]
pub struct ShardRequest<T> {
    pub calls: Vec<ShardCall<T>>,
}

/// The results of the calls that asked for a reply, in order.
#[derive(Debug, Clone)]
pub struct ShardReply<T> {
    pub outputs: Vec<T>,
}

/// Something that executes shard requests: an in-process executor now, a QUIC connection to a
/// `veil-server` later.
#[async_trait]
pub trait ShardBackend<T: Send + Sync + 'static>: Send + Sync {
    async fn execute(&self, request: ShardRequest<T>) -> Result<ShardReply<T>>;
}

/// What a shard server does with a request, over any engine. Holds the layer table (which
/// layers this server may run, with their hyper-parameters) and the session's handles.
pub struct ShardExecutor<E: Engine> {
    engine: E,
    layers: HashMap<String, ShardLayer>,
    handles: Mutex<HashMap<HandleId, E::T>>,
    max_handles: usize,
    attention_chunk: usize,
}

impl<E: Engine> ShardExecutor<E> {
    pub fn new(engine: E, layers: HashMap<String, ShardLayer>) -> Self {
        Self {
            engine,
            layers,
            handles: Mutex::new(HashMap::new()),
            max_handles: 4096,
            attention_chunk: 4096,
        }
    }

    fn operand(&self, o: &Operand<E::T>) -> Result<E::T> {
        match o {
            Operand::Inline(t) => Ok(t.clone()),
            Operand::Handle(h) => self
                .handles
                .lock()
                .map_err(|_| Error::InvalidArgument("handle table poisoned".into()))?
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
        }))
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
                    .map_err(|_| Error::InvalidArgument("handle table poisoned".into()))?;
                if table.len() >= self.max_handles && !table.contains_key(&h) {
                    return Err(Error::InvalidArgument(format!(
                        "session holds {} tensors, the limit",
                        self.max_handles
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::Conv2dSpec;
    use crate::placement::engine::CandleEngine;
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

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

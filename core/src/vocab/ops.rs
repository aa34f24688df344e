//! Shard ops: the work a shard server can be asked to do, the requests that carry them, and the
//! backend trait every server handle implements (in-process executor, QUIC connection). A
//! request is a list of calls; each call names a layer the server holds weights for (by
//! diffusers name, never by weight values) and operands that are either sent inline or refer to
//! a tensor the server keeps in this session by handle.

use async_trait::async_trait;

use crate::vocab::error::{Error, Result};
use crate::vocab::job::EarlySteps;
use crate::vocab::layers::GeluKind;
use crate::vocab::precision::{Pad, WireDtype};

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
    GroupNormStats {
        layer: String,
        input: Operand<T>,
    },
    /// softmax(q kᵀ/√d) v for a block of query rows.
    Attention {
        q: Operand<T>,
        k: Operand<T>,
        v: Operand<T>,
        heads: usize,
    },
    /// Returns (or keeps) the operand itself: uploads a tensor into a handle, or fetches one.
    Identity {
        input: Operand<T>,
    },
    /// Forgets a handle.
    Release {
        handle: HandleId,
    },

    // Strip ops (the `strict` policy): the elementwise and per-token work on resident strips.
    /// `len` entries of dimension `dim` from `start` (e.g. a strip's boundary rows).
    Narrow {
        input: Operand<T>,
        dim: usize,
        start: usize,
        len: usize,
    },
    /// Concatenation along `dim` (halo rows around a strip; skip connections on channels).
    Cat {
        inputs: Vec<Operand<T>>,
        dim: usize,
    },
    /// Normalises with global moments [B, G, 2] and applies the affine parameters.
    GroupNormApply {
        layer: String,
        input: Operand<T>,
        moments: Operand<T>,
    },
    LayerNorm {
        layer: String,
        input: Operand<T>,
    },
    Linear {
        layer: String,
        input: Operand<T>,
    },
    Silu {
        input: Operand<T>,
    },
    Geglu {
        input: Operand<T>,
        kind: GeluKind,
    },
    Add {
        a: Operand<T>,
        b: Operand<T>,
    },
    Scale {
        input: Operand<T>,
        factor: f64,
    },
    /// x [B, C, h, w] + e [B, C].
    AddChannelBias {
        input: Operand<T>,
        bias: Operand<T>,
    },
    /// Nearest up-sampling of a strip: output rows `dst_first..dst_first + dst_len` of a
    /// `dst_h`-row map taken from a `src_h`-row map whose rows from `src_first` the input holds
    /// (the same row choice as a whole-map up-sampling), columns to `dst_w`.
    UpsampleRows {
        input: Operand<T>,
        src_first: usize,
        src_h: usize,
        dst_h: usize,
        dst_first: usize,
        dst_len: usize,
        dst_w: usize,
    },
    ToTokens {
        input: Operand<T>,
    },
    ToSpatial {
        input: Operand<T>,
        h: usize,
        w: usize,
    },
    /// The sinusoidal embedding of a (public) timestep, [batch, dim].
    TimestepEmbedding {
        timestep: f64,
        batch: usize,
        dim: usize,
        flip_sin_to_cos: bool,
        shift: f64,
    },
}

/// Source rows of a nearest up-sampling from `src_h` to `dst_h` rows, as candle computes them
/// for the whole map (so a strip-wise up-sampling is bit-identical to the whole one).
pub fn upsample_source_row(dst_row: usize, src_h: usize, dst_h: usize) -> usize {
    let scale = src_h as f64 / dst_h as f64;
    ((dst_row as f64 * scale) as usize).min(src_h.saturating_sub(1))
}

impl<T> ShardOp<T> {
    /// The dtype this op's result travels back in under wire dtype `wire`. GroupNorm statistics
    /// always travel in f32: their sums of squared deviations overflow f16 (largest 65,504) on
    /// ordinary activations — an honest f16 reply held ∞ — and the moments must stay exact.
    pub fn reply_dtype(&self, wire: WireDtype) -> WireDtype {
        match self {
            ShardOp::GroupNormStats { .. } => WireDtype::F32,
            _ => wire,
        }
    }

    /// Inline operands, i.e. what this op carries over the wire.
    pub fn inline_operands(&self) -> Vec<&T> {
        let operands: Vec<&Operand<T>> = match self {
            ShardOp::Conv2d { input, .. }
            | ShardOp::GroupNormStats { input, .. }
            | ShardOp::Identity { input } => vec![input],
            ShardOp::Attention { q, k, v, .. } => vec![q, k, v],
            ShardOp::Release { .. } | ShardOp::TimestepEmbedding { .. } => vec![],
            ShardOp::Narrow { input, .. }
            | ShardOp::LayerNorm { input, .. }
            | ShardOp::Linear { input, .. }
            | ShardOp::Silu { input }
            | ShardOp::Geglu { input, .. }
            | ShardOp::Scale { input, .. }
            | ShardOp::UpsampleRows { input, .. }
            | ShardOp::ToTokens { input }
            | ShardOp::ToSpatial { input, .. } => vec![input],
            ShardOp::Cat { inputs, .. } => inputs.iter().collect(),
            ShardOp::GroupNormApply { input, moments, .. } => vec![input, moments],
            ShardOp::Add { a, b } => vec![a, b],
            ShardOp::AddChannelBias { input, bias } => vec![input, bias],
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
    /// The tensor payload bytes that actually travelled (after the codec and compression), where
    /// the backend has a wire; None in-process.
    pub payload: Option<PayloadBytes>,
}

impl<T> ShardReply<T> {
    /// A reply that did not cross a wire.
    pub fn in_process(outputs: Vec<T>) -> Self {
        Self {
            outputs,
            payload: None,
        }
    }
}

/// Tensor payload bytes of one round trip with one server, as they travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PayloadBytes {
    pub up: u64,
    pub down: u64,
}

/// Something that executes shard requests: an in-process executor now, a QUIC connection to a
/// `veil-server` later.
#[async_trait]
pub trait ShardBackend<T: Send + Sync + 'static>: Send + Sync {
    async fn execute(&self, request: ShardRequest<T>) -> Result<ShardReply<T>>;

    /// The runtime starts U-Net call `step` (a denoising step) on this backend; the requests
    /// that follow belong to it. Backends with step-to-step state (the residual shard codecs)
    /// number their tensors from here.
    fn begin_step(&self, step: u64) {
        let _ = step;
    }

    /// Told before `begin_step`: handles the runtime has dropped whose `Release` has not been
    /// sent yet (it goes out with a later request). A backend that can rebuild a session on
    /// another server (replicas) need not rebuild these.
    fn dropped(&self, handles: &[HandleId]) {
        let _ = handles;
    }

    /// The `obfuscated` policy's job (its own message, not a shard op): the first k denoising
    /// steps of K candidate prompts, answered with the K latents. Only a server that holds the
    /// whole model runs it; a shard-only one refuses.
    async fn early_steps(&self, job: EarlySteps<T>) -> Result<T> {
        let _ = job;
        Err(shard_only())
    }
}

/// The refusal of a server that holds shard layers only.
pub fn shard_only() -> Error {
    Error::Unsupported(
        "this server holds shard layers only; the obfuscated policy needs a server started with \
         --full-model"
            .into(),
    )
}

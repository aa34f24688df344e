//! The ops the U-Net is written over. The U-Net calls these for every op and never asks where
//! they run: the placement runtime implements them on real tensors, on strips held by shard
//! servers, or on shapes only (`veil plan`).

use std::future::Future;

use crate::vocab::error::Result;
use crate::vocab::layers::{Conv2dSpec, GeluKind, GroupNormSpec, LayerNormSpec, LinearSpec, Role};

/// What the U-Net needs from whoever runs it. `T` is a tensor the caller holds (the sample and
/// the text states in, the prediction out); `Val` is a value between ops, which may live on the
/// phone, on the servers, or nowhere but as a shape.
pub trait UNetOps: Send {
    type T: Clone + Send + Sync;
    type Val: Clone + Send + Sync;

    /// Wraps a caller's tensor as a value.
    fn input(&self, t: Self::T) -> Self::Val;
    /// The value as a tensor the caller holds (gathering it from the servers if needed).
    fn local(&mut self, v: &Self::Val) -> impl Future<Output = Result<Self::T>> + Send;
    fn dims(&self, v: &Self::Val) -> Vec<usize>;
    /// Marks the start of one U-Net evaluation (for accounting, and for attention reuse).
    fn note_unet_call(&mut self);
    /// The spatial sizes (h, w) of every resolution level of this call, finest first.
    fn set_pyramid(&mut self, levels: &[(usize, usize)]) -> Result<()>;

    /// The sinusoidal embedding of `t`, for the first layer of role `role` that reads it.
    #[allow(clippy::too_many_arguments)]
    fn timestep_embedding(
        &mut self,
        t: f64,
        batch: usize,
        dim: usize,
        flip: bool,
        shift: f64,
        role: Role,
    ) -> Result<Self::Val>;
    fn conv2d(
        &mut self,
        c: &Conv2dSpec,
        x: &Self::Val,
    ) -> impl Future<Output = Result<Self::Val>> + Send;
    fn group_norm(
        &mut self,
        g: &GroupNormSpec,
        x: &Self::Val,
    ) -> impl Future<Output = Result<Self::Val>> + Send;
    fn linear(
        &mut self,
        l: &LinearSpec,
        x: &Self::Val,
    ) -> impl Future<Output = Result<Self::Val>> + Send;
    fn layer_norm(
        &mut self,
        l: &LayerNormSpec,
        x: &Self::Val,
    ) -> impl Future<Output = Result<Self::Val>> + Send;
    /// softmax(q kᵀ/√d) v over `heads` heads; `layer` names the attention for the audit.
    fn attention(
        &mut self,
        layer: &str,
        q: &Self::Val,
        k: &Self::Val,
        v: &Self::Val,
        heads: usize,
    ) -> impl Future<Output = Result<Self::Val>> + Send;
    fn silu(&mut self, x: &Self::Val) -> impl Future<Output = Result<Self::Val>> + Send;
    fn geglu(
        &mut self,
        x: &Self::Val,
        kind: GeluKind,
    ) -> impl Future<Output = Result<Self::Val>> + Send;
    fn scale(&mut self, x: &Self::Val, f: f64) -> impl Future<Output = Result<Self::Val>> + Send;
    fn add(
        &mut self,
        a: &Self::Val,
        b: &Self::Val,
    ) -> impl Future<Output = Result<Self::Val>> + Send;
    /// x [B, C, H, W] + e [B, C].
    fn add_channel_bias(
        &mut self,
        x: &Self::Val,
        e: &Self::Val,
    ) -> impl Future<Output = Result<Self::Val>> + Send;
    fn cat(
        &mut self,
        xs: &[Self::Val],
        dim: usize,
    ) -> impl Future<Output = Result<Self::Val>> + Send;
    fn upsample_nearest(
        &mut self,
        x: &Self::Val,
        h: usize,
        w: usize,
    ) -> impl Future<Output = Result<Self::Val>> + Send;
    /// [B, C, H, W] → [B, H·W, C].
    fn to_tokens(&mut self, x: &Self::Val) -> impl Future<Output = Result<Self::Val>> + Send;
    /// [B, H·W, C] → [B, C, H, W].
    fn to_spatial(
        &mut self,
        x: &Self::Val,
        h: usize,
        w: usize,
    ) -> impl Future<Output = Result<Self::Val>> + Send;

    /// Attention reuse (T-GATE): the cached attention delta of transformer block `block`, when
    /// this call reuses it.
    fn reused_attention(&self, block: &str) -> Option<Self::Val>;
    /// Offers a block's values before and after its attention sub-layers, for a later reuse.
    fn offer_attention(
        &mut self,
        block: &str,
        before: &Self::Val,
        after: &Self::Val,
    ) -> impl Future<Output = Result<()>> + Send;
}

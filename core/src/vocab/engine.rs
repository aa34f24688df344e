//! The engine trait: the arithmetic of every U-Net op over some value type (real tensors, or
//! shapes only for `veil plan`). Implementations live in `placement::engine`.

use crate::vocab::error::Result;
use crate::vocab::layers::{Conv2dSpec, GeluKind, GroupNormSpec, LayerNormSpec, LinearSpec};
use crate::vocab::precision::{Pad, WireDtype};

/// The arithmetic of U-Net ops over a value type `T`.
pub trait Engine: Send + Sync {
    type T: Clone + Send + Sync + 'static;

    fn dims(&self, t: &Self::T) -> Vec<usize>;
    fn conv2d(&self, c: &Conv2dSpec, x: &Self::T, pad: Pad) -> Result<Self::T>;
    fn linear(&self, l: &LinearSpec, x: &Self::T) -> Result<Self::T>;
    /// Per (batch, group) partial statistics of a block: [B, G, 3] = (count, mean, M2), the
    /// form that merges exactly across blocks (Chan et al.), unlike raw Σx, Σx².
    fn group_norm_stats(&self, g: &GroupNormSpec, x: &Self::T) -> Result<Self::T>;
    /// Merges blocks' partial statistics into [B, G, 2] = (mean, variance).
    fn merge_group_stats(&self, parts: &[Self::T]) -> Result<Self::T>;
    /// Normalises with the given [B, G, 2] moments and applies the affine parameters.
    fn group_norm_apply(
        &self,
        g: &GroupNormSpec,
        x: &Self::T,
        moments: &Self::T,
    ) -> Result<Self::T>;
    fn layer_norm(&self, l: &LayerNormSpec, x: &Self::T) -> Result<Self::T>;
    /// softmax(q kᵀ / √d) v over `heads` heads; q [B, Tq, C], k/v [B, Tk, C]; computed in
    /// chunks of at most `chunk` query rows so peak memory is bounded on a phone.
    fn attention(
        &self,
        q: &Self::T,
        k: &Self::T,
        v: &Self::T,
        heads: usize,
        chunk: usize,
    ) -> Result<Self::T>;
    fn silu(&self, x: &Self::T) -> Result<Self::T>;
    /// GEGLU: split the last dimension in halves (h, g) and return h · gelu(g).
    fn geglu(&self, x: &Self::T, kind: GeluKind) -> Result<Self::T>;
    fn add(&self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    fn scale(&self, x: &Self::T, factor: f64) -> Result<Self::T>;
    /// x [B, C, H, W] + e [B, C] broadcast over H, W.
    fn add_channel_bias(&self, x: &Self::T, e: &Self::T) -> Result<Self::T>;
    fn cat(&self, xs: &[Self::T], dim: usize) -> Result<Self::T>;
    fn narrow(&self, x: &Self::T, dim: usize, start: usize, len: usize) -> Result<Self::T>;
    fn upsample_nearest(&self, x: &Self::T, h: usize, w: usize) -> Result<Self::T>;
    /// Nearest up-sampling of a strip: output row i is input row `rows[i]`, columns as
    /// `upsample_nearest` maps them to `w`.
    fn upsample_rows(&self, x: &Self::T, rows: &[usize], w: usize) -> Result<Self::T>;
    /// [B, C, H, W] → [B, H·W, C].
    fn to_tokens(&self, x: &Self::T) -> Result<Self::T>;
    /// [B, H·W, C] → [B, C, H, W].
    fn to_spatial(&self, x: &Self::T, h: usize, w: usize) -> Result<Self::T>;
    /// Sinusoidal timestep embedding [batch, dim] as diffusers' `get_timestep_embedding`.
    fn timestep_embedding(
        &self,
        t: f64,
        batch: usize,
        dim: usize,
        flip_sin_to_cos: bool,
        shift: f64,
    ) -> Result<Self::T>;
    /// The value after a trip over the wire in `dtype` (rounding included).
    fn through_wire(&self, x: &Self::T, dtype: WireDtype) -> Result<Self::T>;
    /// Whether every element is finite (a reply with NaN or ∞ is refused).
    fn all_finite(&self, x: &Self::T) -> Result<bool>;
}

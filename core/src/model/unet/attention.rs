//! diffusers' `Attention` and `BasicTransformerBlock` (self-attention, cross-attention and the
//! GEGLU feed-forward), the per-token layers inside a `Transformer2D`.

use super::LayerRef;
use crate::model::ops::UNetOps;
use crate::vocab::error::Result;
use crate::vocab::layers::{GeluKind, LayerNormSpec, LinearSpec, Role};

/// diffusers' `Attention` (no bias on q/k/v, bias on `to_out.0`).
#[derive(Debug, Clone)]
struct Attention {
    name: String,
    to_q: LinearSpec,
    to_k: LinearSpec,
    to_v: LinearSpec,
    to_out: LinearSpec,
    heads: usize,
}

impl Attention {
    /// Queries from `dim` channels, keys and values from `ctx` channels.
    fn new(name: String, dim: usize, ctx: usize, heads: usize) -> Self {
        let a = Role::Attention;
        Attention {
            to_q: LinearSpec::new(format!("{name}.to_q"), dim, dim, false).with_role(a),
            to_k: LinearSpec::new(format!("{name}.to_k"), ctx, dim, false).with_role(a),
            to_v: LinearSpec::new(format!("{name}.to_v"), ctx, dim, false).with_role(a),
            to_out: LinearSpec::new(format!("{name}.to_out.0"), dim, dim, true).with_role(a),
            name,
            heads,
        }
    }

    fn specs<'a>(&'a self, out: &mut Vec<LayerRef<'a>>) {
        out.extend([&self.to_q, &self.to_k, &self.to_v, &self.to_out].map(LayerRef::Linear));
    }

    async fn forward<R: UNetOps>(&self, rt: &mut R, x: &R::Val, ctx: &R::Val) -> Result<R::Val> {
        let q = rt.linear(&self.to_q, x).await?;
        let k = rt.linear(&self.to_k, ctx).await?;
        let v = rt.linear(&self.to_v, ctx).await?;
        let o = rt.attention(&self.name, &q, &k, &v, self.heads).await?;
        rt.linear(&self.to_out, &o).await
    }
}

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward.
#[derive(Debug, Clone)]
pub(super) struct TransformerBlock {
    name: String,
    norm1: LayerNormSpec,
    attn1: Attention,
    norm2: LayerNormSpec,
    attn2: Attention,
    norm3: LayerNormSpec,
    ff_in: LinearSpec,
    ff_out: LinearSpec,
}

impl TransformerBlock {
    /// The block `name` over `ch` channels, cross-attending to `ctx`-wide text states.
    pub(super) fn new(name: String, ch: usize, heads: usize, ctx: usize) -> Self {
        let b = name;
        let (a, f) = (Role::Attention, Role::FeedForward);
        TransformerBlock {
            norm1: LayerNormSpec::new(format!("{b}.norm1"), ch, 1e-5).with_role(a),
            attn1: Attention::new(format!("{b}.attn1"), ch, ch, heads),
            norm2: LayerNormSpec::new(format!("{b}.norm2"), ch, 1e-5).with_role(a),
            attn2: Attention::new(format!("{b}.attn2"), ch, ctx, heads),
            norm3: LayerNormSpec::new(format!("{b}.norm3"), ch, 1e-5).with_role(f),
            ff_in: LinearSpec::new(format!("{b}.ff.net.0.proj"), ch, ch * 8, true).with_role(f),
            ff_out: LinearSpec::new(format!("{b}.ff.net.2"), ch * 4, ch, true).with_role(f),
            name: b,
        }
    }

    /// Appends this block's layers to the U-Net's walk: the LayerNorms, then the linear layers
    /// (attn1, attn2, feed-forward).
    pub(super) fn specs<'a>(&'a self, out: &mut Vec<LayerRef<'a>>) {
        out.extend([&self.norm1, &self.norm2, &self.norm3].map(LayerRef::LayerNorm));
        self.attn1.specs(out);
        self.attn2.specs(out);
        out.extend([&self.ff_in, &self.ff_out].map(LayerRef::Linear));
    }

    /// One block over tokens `t`. The attention sub-layers are skipped when the runtime reuses
    /// their cached contribution (T-GATE), and offered for reuse when they run.
    pub(super) async fn forward<R: UNetOps>(
        &self,
        rt: &mut R,
        t: R::Val,
        context: &R::Val,
        gelu: GeluKind,
    ) -> Result<R::Val> {
        let mut t = t;
        if let Some(delta) = rt.reused_attention(&self.name) {
            t = rt.add(&delta, &t).await?;
        } else {
            let before = t.clone();
            let a = rt.layer_norm(&self.norm1, &t).await?;
            let a = self.attn1.forward(rt, &a, &a).await?;
            t = rt.add(&a, &t).await?;
            let a = rt.layer_norm(&self.norm2, &t).await?;
            let a = self.attn2.forward(rt, &a, context).await?;
            t = rt.add(&a, &t).await?;
            rt.offer_attention(&self.name, &before, &t).await?;
        }
        let a = rt.layer_norm(&self.norm3, &t).await?;
        let a = rt.linear(&self.ff_in, &a).await?;
        let a = rt.geglu(&a, gelu).await?;
        let a = rt.linear(&self.ff_out, &a).await?;
        rt.add(&a, &t).await
    }
}

//! diffusers' `Transformer2DModel` (continuous input): GroupNorm, a projection to tokens, the
//! transformer blocks, and a projection back to the feature map plus the residual.

use super::attention::TransformerBlock;
use super::{BlockSettings, LayerRef, Level};
use crate::model::ops::UNetOps;
use crate::vocab::error::Result;
use crate::vocab::layers::{Conv2dSpec, GeluKind, GroupNormSpec, LinearSpec, Role};

/// proj_in / proj_out: a 1×1 convolution (SD 1.x) or a per-token linear layer
/// (`use_linear_projection`, SD 2.x).
#[derive(Debug, Clone)]
enum Proj {
    Linear(LinearSpec),
    Conv(Conv2dSpec),
}

impl Proj {
    fn spec(&self) -> LayerRef<'_> {
        match self {
            Proj::Linear(l) => LayerRef::Linear(l),
            Proj::Conv(c) => LayerRef::Conv2d(c),
        }
    }
}

/// diffusers' `Transformer2DModel` (continuous input).
#[derive(Debug, Clone)]
pub(super) struct Transformer2D {
    norm: GroupNormSpec,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    /// The transformer `name` over `ch` channels with the heads, text width and depth of
    /// `level`.
    pub(super) fn new(s: &BlockSettings, name: String, ch: usize, level: &Level) -> Self {
        let proj = |p: &str| {
            if s.linear_projection {
                Proj::Linear(
                    LinearSpec::new(format!("{name}.{p}"), ch, ch, true)
                        .with_role(Role::Projection),
                )
            } else {
                Proj::Conv(Conv2dSpec::new(format!("{name}.{p}"), ch, ch, 1, 1, 0))
            }
        };
        let blocks = (0..level.transformer_layers)
            .map(|k| {
                let b = format!("{name}.transformer_blocks.{k}");
                TransformerBlock::new(b, ch, level.heads, level.cross_attention_dim)
            })
            .collect();
        Transformer2D {
            // proj_in (1×1 or per-token) follows: no halo rows needed.
            norm: GroupNormSpec::new(format!("{name}.norm"), s.groups, ch, 1e-6)
                .with_consumer_halo(0),
            proj_in: proj("proj_in"),
            blocks,
            proj_out: proj("proj_out"),
        }
    }

    /// Appends this transformer's layers to the U-Net's walk: norm, projections, then each
    /// block's.
    pub(super) fn specs<'a>(&'a self, out: &mut Vec<LayerRef<'a>>) {
        out.extend([
            LayerRef::GroupNorm(&self.norm),
            self.proj_in.spec(),
            self.proj_out.spec(),
        ]);
        for b in &self.blocks {
            b.specs(out);
        }
    }

    pub(super) async fn forward<R: UNetOps>(
        &self,
        rt: &mut R,
        x: &R::Val,
        context: &R::Val,
        gelu: GeluKind,
    ) -> Result<R::Val> {
        let d = rt.dims(x);
        let (h, w) = (d[2], d[3]);
        let n = rt.group_norm(&self.norm, x).await?;
        let mut t = match &self.proj_in {
            Proj::Conv(c) => {
                let p = rt.conv2d(c, &n).await?;
                rt.to_tokens(&p).await?
            }
            Proj::Linear(l) => {
                let tok = rt.to_tokens(&n).await?;
                rt.linear(l, &tok).await?
            }
        };
        for b in &self.blocks {
            t = b.forward(rt, t, context, gelu).await?;
        }
        let y = match &self.proj_out {
            Proj::Conv(c) => {
                let s = rt.to_spatial(&t, h, w).await?;
                rt.conv2d(c, &s).await?
            }
            Proj::Linear(l) => {
                let p = rt.linear(l, &t).await?;
                rt.to_spatial(&p, h, w).await?
            }
        };
        rt.add(&y, x).await
    }
}

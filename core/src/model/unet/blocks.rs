//! diffusers' `CrossAttnDownBlock2D`/`DownBlock2D`, `UNetMidBlock2DCrossAttn` and
//! `CrossAttnUpBlock2D`/`UpBlock2D`, with what building and running them shares.

use super::resnet::ResnetBlock;
use super::transformer::Transformer2D;
use crate::model::config::UNetConfig;
use crate::model::ops::UNetOps;
use crate::vocab::error::{Error, Result};
use crate::vocab::layers::{Conv2dSpec, GeluKind, Role};

/// Settings every block of one U-Net is built with (read once from the config).
pub(super) struct BlockSettings<'a> {
    pub(super) config: &'a UNetConfig,
    /// Number of resolution levels (`block_out_channels.len()`).
    pub(super) levels: usize,
    /// Width of the time embedding each resnet projects.
    pub(super) temb: usize,
    /// The role of the layers reading the time embedding (`PooledText` under SDXL).
    pub(super) time_role: Role,
    pub(super) groups: usize,
    pub(super) eps: f64,
    /// Transformers project with linear layers instead of 1×1 convolutions.
    pub(super) linear_projection: bool,
}

/// The per-level settings of down block `i`; up blocks and the mid block read those of the
/// down block at their resolution.
pub(super) struct Level {
    /// Resnets of the down block (its up block has one more).
    pub(super) layers: usize,
    pub(super) heads: usize,
    pub(super) cross_attention_dim: usize,
    pub(super) transformer_layers: usize,
}

impl BlockSettings<'_> {
    /// Level `i`'s settings (already checked by `UNetConfig::validate`).
    pub(super) fn level(&self, i: usize) -> Result<Level> {
        let (c, n) = (self.config, self.levels);
        Ok(Level {
            layers: c.layers_per_block.get(i, n, "layers_per_block")?,
            heads: c.heads(i)?,
            cross_attention_dim: c.cross_attention_dim.get(i, n, "cross_attention_dim")?,
            transformer_layers: c.transformer_layers_per_block.get(
                i,
                n,
                "transformer_layers_per_block",
            )?,
        })
    }

    /// The 3×3 `{prefix}.{kind}.0.conv` (`downsamplers`/`upsamplers`) of block `i`, which
    /// every block but the last has.
    fn sampler(
        &self,
        i: usize,
        prefix: &str,
        kind: &str,
        ch: usize,
        stride: usize,
    ) -> Option<Conv2dSpec> {
        (i + 1 < self.levels)
            .then(|| Conv2dSpec::new(format!("{prefix}.{kind}.0.conv"), ch, ch, 3, stride, 1))
    }
}

/// What each block's forward reads besides its input: the time embedding after its SiLU, the
/// text states and the feed-forward's GELU.
pub(super) struct Conditioning<'a, V> {
    pub(super) emb_act: &'a V,
    pub(super) context: &'a V,
    pub(super) gelu: GeluKind,
}

/// Resnets, each followed by its transformer in cross-attention blocks: the body that down
/// and up blocks share.
#[derive(Debug, Clone)]
pub(super) struct Layers {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
}

impl Layers {
    /// `count` resnets `{prefix}.resnets.{j}` from `resnet_in(j)` to `out` channels, and in a
    /// cross-attention block a transformer `{prefix}.attentions.{j}` after each.
    fn new(
        s: &BlockSettings,
        prefix: &str,
        cross: bool,
        level: &Level,
        count: usize,
        out: usize,
        resnet_in: impl Fn(usize) -> usize,
    ) -> Self {
        let resnets = (0..count)
            .map(|j| ResnetBlock::new(s, format!("{prefix}.resnets.{j}"), resnet_in(j), out, 1.0))
            .collect();
        let attentions = if cross {
            (0..count)
                .map(|j| Transformer2D::new(s, format!("{prefix}.attentions.{j}"), out, level))
                .collect()
        } else {
            Vec::new()
        };
        Layers {
            resnets,
            attentions,
        }
    }

    /// Resnet `j` and, where there is one, transformer `j`.
    async fn forward<R: UNetOps>(
        &self,
        j: usize,
        rt: &mut R,
        x: &R::Val,
        cond: &Conditioning<'_, R::Val>,
    ) -> Result<R::Val> {
        let mut x = self.resnets[j].forward(rt, x, cond.emb_act).await?;
        if let Some(a) = self.attentions.get(j) {
            x = a.forward(rt, &x, cond.context, cond.gelu).await?;
        }
        Ok(x)
    }

    pub(super) fn resnets(&self) -> impl Iterator<Item = &ResnetBlock> {
        self.resnets.iter()
    }

    pub(super) fn transformers(&self) -> impl Iterator<Item = &Transformer2D> {
        self.attentions.iter()
    }
}

/// diffusers' `CrossAttnDownBlock2D` / `DownBlock2D`.
#[derive(Debug, Clone)]
pub(super) struct DownBlock {
    pub(super) layers: Layers,
    pub(super) downsampler: Option<Conv2dSpec>,
}

impl DownBlock {
    /// Down block `i`, from `input` to `out` channels.
    pub(super) fn new(s: &BlockSettings, i: usize, input: usize, out: usize) -> Result<Self> {
        let cross = s.config.down_block_types[i] == "CrossAttnDownBlock2D";
        let level = s.level(i)?;
        let p = format!("down_blocks.{i}");
        let resnet_in = |j| if j == 0 { input } else { out };
        Ok(DownBlock {
            layers: Layers::new(s, &p, cross, &level, level.layers, out, resnet_in),
            downsampler: s.sampler(i, &p, "downsamplers", out, 2),
        })
    }

    /// Runs the block, pushing every output the up blocks take as a skip connection.
    pub(super) async fn forward<R: UNetOps>(
        &self,
        rt: &mut R,
        x: R::Val,
        cond: &Conditioning<'_, R::Val>,
        skips: &mut Vec<R::Val>,
    ) -> Result<R::Val> {
        let mut x = x;
        for j in 0..self.layers.resnets.len() {
            x = self.layers.forward(j, rt, &x, cond).await?;
            skips.push(x.clone());
        }
        if let Some(ds) = &self.downsampler {
            x = rt.conv2d(ds, &x).await?;
            skips.push(x.clone());
        }
        Ok(x)
    }
}

/// diffusers' `UNetMidBlock2DCrossAttn`.
#[derive(Debug, Clone)]
pub(super) struct MidBlock {
    pub(super) resnet0: ResnetBlock,
    pub(super) attention: Transformer2D,
    pub(super) resnet1: ResnetBlock,
}

impl MidBlock {
    /// The mid block at the coarsest level.
    pub(super) fn new(s: &BlockSettings) -> Result<Self> {
        let last = s.levels - 1;
        let ch = s.config.block_out_channels[last];
        let level = s.level(last)?;
        let scale = s.config.mid_block_scale_factor;
        Ok(MidBlock {
            resnet0: ResnetBlock::new(s, "mid_block.resnets.0".into(), ch, ch, scale),
            attention: Transformer2D::new(s, "mid_block.attentions.0".into(), ch, &level),
            resnet1: ResnetBlock::new(s, "mid_block.resnets.1".into(), ch, ch, scale),
        })
    }

    pub(super) async fn forward<R: UNetOps>(
        &self,
        rt: &mut R,
        x: &R::Val,
        cond: &Conditioning<'_, R::Val>,
    ) -> Result<R::Val> {
        let x = self.resnet0.forward(rt, x, cond.emb_act).await?;
        let x = self
            .attention
            .forward(rt, &x, cond.context, cond.gelu)
            .await?;
        self.resnet1.forward(rt, &x, cond.emb_act).await
    }
}

/// diffusers' `CrossAttnUpBlock2D` / `UpBlock2D`.
#[derive(Debug, Clone)]
pub(super) struct UpBlock {
    pub(super) layers: Layers,
    pub(super) upsampler: Option<Conv2dSpec>,
}

/// Channel counts of up block `i`.
pub(super) struct UpChannels {
    /// Output channels of the block below (the first resnet's input).
    pub(super) prev: usize,
    /// This block's output channels.
    pub(super) out: usize,
    /// Channels of the skip the last resnet concatenates (the next finer level's).
    pub(super) input: usize,
}

impl UpBlock {
    /// Up block `i`; its per-level settings are those of the mirrored down block.
    pub(super) fn new(s: &BlockSettings, i: usize, ch: UpChannels) -> Result<Self> {
        let UpChannels { prev, out, input } = ch;
        let cross = s.config.up_block_types[i] == "CrossAttnUpBlock2D";
        let level = s.level(s.levels - 1 - i)?;
        // One resnet more than the down block: it also takes the downsampler's skip.
        let layers = level.layers + 1;
        let p = format!("up_blocks.{i}");
        // The running features plus the skip this resnet concatenates.
        let resnet_in = |j| {
            let skip = if j == layers - 1 { input } else { out };
            let rin = if j == 0 { prev } else { out };
            rin + skip
        };
        Ok(UpBlock {
            layers: Layers::new(s, &p, cross, &level, layers, out, resnet_in),
            upsampler: s.sampler(i, &p, "upsamplers", out, 1),
        })
    }

    /// Runs the block, concatenating one skip from `skips` before each resnet.
    pub(super) async fn forward<R: UNetOps>(
        &self,
        rt: &mut R,
        x: R::Val,
        cond: &Conditioning<'_, R::Val>,
        skips: &mut Vec<R::Val>,
    ) -> Result<R::Val> {
        let exhausted = || Error::InvalidArgument("U-Net skip stack exhausted".into());
        let mut x = x;
        for j in 0..self.layers.resnets.len() {
            let skip = skips.pop().ok_or_else(exhausted)?;
            x = rt.cat(&[x, skip], 1).await?;
            x = self.layers.forward(j, rt, &x, cond).await?;
        }
        if let Some(us) = &self.upsampler {
            // Up-sample to the size of the next skip (diffusers' forward_upsample_size),
            // which is exactly 2x unless an odd size was rounded up on the way down.
            let target = skips.last().map(|s| rt.dims(s)).ok_or_else(exhausted)?;
            x = rt.upsample_nearest(&x, target[2], target[3]).await?;
            x = rt.conv2d(us, &x).await?;
        }
        Ok(x)
    }
}

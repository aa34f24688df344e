//! `UNet2DConditionModel`, written once. The struct is the layer tree (names as in diffusers, so
//! `down_blocks.0.resnets.1.conv1` is both our path and the checkpoint's key); `forward` runs it
//! over `UNetOps`, which the placement runtime implements: it decides per op whether the phone
//! or the shard backends compute it. No weights live here: engines look them up by name.
//!
//! This file holds `UNet` itself (building, the walk over its layer specs, the forward pass);
//! the blocks live in files named after diffusers' modules: `resnet` (`ResnetBlock2D`),
//! `attention` (`Attention`, `BasicTransformerBlock`), `transformer` (`Transformer2DModel`) and
//! `blocks` (down, mid and up blocks).

mod attention;
mod blocks;
mod embeddings;
mod resnet;
mod transformer;

pub use embeddings::{default_time_ids, sinusoidal_embedding, text_time_input};

use std::collections::HashMap;

use crate::model::config::{TextTime, UNetConfig};
use crate::model::ops::UNetOps;
use crate::vocab::error::{Error, Result};
use crate::vocab::layers::{
    Conv2dSpec, GeluKind, GroupNormSpec, LayerNormSpec, LinearSpec, Role, ShardLayer,
};
use blocks::{BlockSettings, Conditioning, DownBlock, Level, MidBlock, UpBlock, UpChannels};
use resnet::ResnetBlock;
use transformer::Transformer2D;

/// One layer spec of the U-Net, borrowed. `UNet::layers` yields every layer once as one of
/// these; parameters, convolutions, GroupNorms and shard layers are all read from that walk.
#[derive(Debug, Clone, Copy)]
enum LayerRef<'a> {
    Conv2d(&'a Conv2dSpec),
    GroupNorm(&'a GroupNormSpec),
    Linear(&'a LinearSpec),
    LayerNorm(&'a LayerNormSpec),
}

impl<'a> LayerRef<'a> {
    fn conv2d(self) -> Option<&'a Conv2dSpec> {
        match self {
            LayerRef::Conv2d(c) => Some(c),
            _ => None,
        }
    }

    fn group_norm(self) -> Option<&'a GroupNormSpec> {
        match self {
            LayerRef::GroupNorm(g) => Some(g),
            _ => None,
        }
    }

    fn params(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            LayerRef::Conv2d(c) => c.params(),
            LayerRef::GroupNorm(g) => g.params(),
            LayerRef::Linear(l) => l.params(),
            LayerRef::LayerNorm(l) => l.params(),
        }
    }

    /// The layer as a shard server may run it: every convolution and GroupNorm, and the
    /// per-token layers outside attention (attention's own layers, and the layers that read
    /// SDXL's pooled text embedding, never leave the phone).
    fn shard_layer(&self) -> Option<ShardLayer> {
        match *self {
            LayerRef::Conv2d(c) => Some(ShardLayer::Conv2d(c.clone())),
            LayerRef::GroupNorm(g) => Some(ShardLayer::GroupNorm(g.clone())),
            LayerRef::Linear(l) => (!matches!(l.role, Role::Attention | Role::PooledText))
                .then(|| ShardLayer::Linear(l.clone())),
            LayerRef::LayerNorm(l) => {
                (l.role != Role::Attention).then(|| ShardLayer::LayerNorm(l.clone()))
            }
        }
    }
}

/// The U-Net layer tree built from a diffusers `unet/config.json`.
#[derive(Debug, Clone)]
pub struct UNet {
    pub config: UNetConfig,
    conv_in: Conv2dSpec,
    time_linear_1: LinearSpec,
    time_linear_2: LinearSpec,
    /// SDXL's `add_embedding` (linear_1, linear_2) and its `text_time` settings.
    added: Option<(LinearSpec, LinearSpec, TextTime)>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNormSpec,
    conv_out: Conv2dSpec,
    gelu: GeluKind,
}

impl UNet {
    /// Builds the layer tree; fails with a message for configs we do not implement.
    pub fn new(config: &UNetConfig) -> Result<Self> {
        config.validate()?;
        let c = config;
        let n = c.block_out_channels.len();
        let ch = &c.block_out_channels;
        let temb = c.time_embedding_dim.unwrap_or(ch[0] * 4);
        if c.downsample_padding != 1 {
            return Err(Error::Unsupported(
                "unet config: downsample_padding other than 1".into(),
            ));
        }
        let text_time = c.text_time()?;
        // With SDXL's added conditioning the embedding every resnet reads carries the pooled
        // text embedding: name its layers for what they read (`Role::PooledText`).
        let time_role = match text_time {
            Some(_) => Role::PooledText,
            None => Role::TimeEmbedding,
        };
        let s = BlockSettings {
            config: c,
            levels: n,
            temb,
            time_role,
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            linear_projection: c.use_linear_projection,
        };
        let mut down_blocks = Vec::with_capacity(n);
        let mut out = ch[0];
        for (i, &block_channels) in ch.iter().enumerate() {
            let input = out;
            out = block_channels;
            down_blocks.push(DownBlock::new(&s, i, input, out)?);
        }
        let mid_block = MidBlock::new(&s)?;
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out = rev[0];
        for i in 0..n {
            let prev = out;
            out = rev[i];
            let input = rev[(i + 1).min(n - 1)];
            up_blocks.push(UpBlock::new(&s, i, UpChannels { prev, out, input })?);
        }
        let (ki, ko) = (c.conv_in_kernel, c.conv_out_kernel);
        Ok(Self {
            config: c.clone(),
            conv_in: Conv2dSpec::new("conv_in".into(), c.in_channels, ch[0], ki, 1, ki / 2),
            time_linear_1: LinearSpec::new("time_embedding.linear_1".into(), ch[0], temb, true)
                .with_role(time_role),
            time_linear_2: LinearSpec::new("time_embedding.linear_2".into(), temb, temb, true)
                .with_role(time_role),
            added: text_time.map(|tt| {
                let l1 = LinearSpec::new("add_embedding.linear_1".into(), tt.input_dim, temb, true);
                let l2 = LinearSpec::new("add_embedding.linear_2".into(), temb, temb, true);
                let role = Role::PooledText;
                (l1.with_role(role), l2.with_role(role), tt)
            }),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNormSpec::new("conv_norm_out".into(), s.groups, ch[0], s.eps),
            conv_out: Conv2dSpec::new("conv_out".into(), ch[0], c.out_channels, ko, 1, ko / 2),
            gelu: GeluKind::Erf,
        })
    }

    /// Selects the GELU of the feed-forward (diffusers: erf; candle-transformers: tanh).
    pub fn with_gelu(mut self, gelu: GeluKind) -> Self {
        self.gelu = gelu;
        self
    }

    fn resnets(&self) -> impl Iterator<Item = &ResnetBlock> {
        self.down_blocks
            .iter()
            .flat_map(|b| b.layers.resnets())
            .chain([&self.mid_block.resnet0, &self.mid_block.resnet1])
            .chain(self.up_blocks.iter().flat_map(|b| b.layers.resnets()))
    }

    fn transformers(&self) -> impl Iterator<Item = &Transformer2D> {
        self.down_blocks
            .iter()
            .flat_map(|b| b.layers.transformers())
            .chain([&self.mid_block.attention])
            .chain(self.up_blocks.iter().flat_map(|b| b.layers.transformers()))
    }

    /// Every layer spec, once. Grouped by kind of block (the top-level layers, every resnet,
    /// every transformer, then the down- and up-samplers), so that each filtered view keeps a
    /// fixed order: `convolutions()` starts with `conv_in`, `group_norms()` with
    /// `conv_norm_out`.
    fn layers(&self) -> Vec<LayerRef<'_>> {
        let mut v = vec![
            LayerRef::Conv2d(&self.conv_in),
            LayerRef::Conv2d(&self.conv_out),
            LayerRef::GroupNorm(&self.conv_norm_out),
            LayerRef::Linear(&self.time_linear_1),
            LayerRef::Linear(&self.time_linear_2),
        ];
        if let Some((l1, l2, _)) = &self.added {
            v.extend([LayerRef::Linear(l1), LayerRef::Linear(l2)]);
        }
        for r in self.resnets() {
            r.specs(&mut v);
        }
        for t in self.transformers() {
            t.specs(&mut v);
        }
        let downsamplers = self
            .down_blocks
            .iter()
            .filter_map(|b| b.downsampler.as_ref());
        let upsamplers = self.up_blocks.iter().filter_map(|b| b.upsampler.as_ref());
        v.extend(downsamplers.chain(upsamplers).map(LayerRef::Conv2d));
        v
    }

    /// Every convolution of the U-Net (a fixed order; callers key by name).
    pub fn convolutions(&self) -> Vec<&Conv2dSpec> {
        self.layers()
            .into_iter()
            .filter_map(LayerRef::conv2d)
            .collect()
    }

    /// The GroupNorms that normalise a map with SDXL's text-derived channel bias added (every
    /// resnet's `norm2`, on a U-Net with added conditioning; none otherwise). A placement that
    /// keeps that bias on the phone normalises these maps there, so the phone needs their
    /// weights even where GroupNorm runs on the servers' strips.
    pub fn text_biased_norms(&self) -> Vec<&GroupNormSpec> {
        match self.added {
            Some(_) => self.resnets().map(ResnetBlock::norm2).collect(),
            None => Vec::new(),
        }
    }

    /// Every GroupNorm of the U-Net (a fixed order; callers key by name).
    pub fn group_norms(&self) -> Vec<&GroupNormSpec> {
        self.layers()
            .into_iter()
            .filter_map(LayerRef::group_norm)
            .collect()
    }

    /// The layers a shard server may be asked to run, by name: every convolution and
    /// GroupNorm, and the per-token layers outside attention (feed-forward, projections, time
    /// embedding). Attention's own layers never run on a server.
    pub fn shard_layers(&self) -> HashMap<String, ShardLayer> {
        self.layers()
            .iter()
            .filter_map(LayerRef::shard_layer)
            .map(|l| (l.name().to_owned(), l))
            .collect()
    }

    /// Every layer, attention's own included, as a layer spec.
    pub fn all_layers(&self) -> Vec<ShardLayer> {
        self.layers()
            .iter()
            .map(|l| match *l {
                LayerRef::Conv2d(c) => ShardLayer::Conv2d(c.clone()),
                LayerRef::GroupNorm(g) => ShardLayer::GroupNorm(g.clone()),
                LayerRef::Linear(l) => ShardLayer::Linear(l.clone()),
                LayerRef::LayerNorm(l) => ShardLayer::LayerNorm(l.clone()),
            })
            .collect()
    }

    /// Every parameter (name, shape) this U-Net needs, sorted by name.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<_> = self.layers().iter().flat_map(LayerRef::params).collect();
        v.sort();
        v
    }

    /// Checks a latent's spatial size; the U-Net halves it n-1 times (odd sizes round up).
    pub fn check_input(&self, dims: &[usize]) -> Result<()> {
        if dims.len() != 4 || dims[1] != self.config.in_channels {
            return Err(Error::InvalidArgument(format!(
                "U-Net input must be [batch, {}, h, w], got {dims:?}",
                self.config.in_channels
            )));
        }
        if dims[2] == 0 || dims[3] == 0 {
            return Err(Error::InvalidArgument("empty latent".into()));
        }
        Ok(())
    }

    /// The (rows, columns) of each level: the input size, halved (rounding up) per downsampler.
    pub fn pyramid(&self, h: usize, w: usize) -> Vec<(usize, usize)> {
        let mut v = vec![(h, w)];
        for _ in 1..self.config.block_out_channels.len() {
            let (ph, pw) = v[v.len() - 1];
            v.push((ph.div_ceil(2), pw.div_ceil(2)));
        }
        v
    }

    /// SDXL's added conditioning settings, when this U-Net has them: a forward then needs the
    /// added embedding's input (`text_time_input`).
    pub fn text_time(&self) -> Option<TextTime> {
        self.added.as_ref().map(|(_, _, tt)| *tt)
    }

    /// One U-Net evaluation: ε (or v) prediction for `sample` [B, C, h, w] at `timestep`, with
    /// text states `context` [B, T, D]. A U-Net with added conditioning (SDXL) needs
    /// `forward_added`.
    pub async fn forward<R: UNetOps>(
        &self,
        rt: &mut R,
        sample: &R::T,
        timestep: f64,
        context: &R::T,
    ) -> Result<R::T> {
        self.forward_added(rt, sample, timestep, context, None)
            .await
    }

    /// `forward` with SDXL's added conditioning input `added` [B, input_dim]
    /// (`text_time_input`: pooled text embeddings and the size-and-crop ids), which a U-Net
    /// with `text_time` conditioning requires and any other refuses.
    pub async fn forward_added<R: UNetOps>(
        &self,
        rt: &mut R,
        sample: &R::T,
        timestep: f64,
        context: &R::T,
        added: Option<&R::T>,
    ) -> Result<R::T> {
        let sample = rt.input(sample.clone());
        let context = rt.input(context.clone());
        let added = added.map(|a| rt.input(a.clone()));
        let out = self
            .forward_values(rt, &sample, timestep, &context, added.as_ref())
            .await?;
        rt.local(&out).await
    }

    async fn forward_values<R: UNetOps>(
        &self,
        rt: &mut R,
        sample: &R::Val,
        timestep: f64,
        context: &R::Val,
        added: Option<&R::Val>,
    ) -> Result<R::Val> {
        let d = rt.dims(sample);
        self.check_input(&d)?;
        rt.note_unet_call();
        rt.set_pyramid(&self.pyramid(d[2], d[3]))?;
        let c = &self.config;
        let t = rt.timestep_embedding(
            timestep,
            d[0],
            c.block_out_channels[0],
            c.flip_sin_to_cos,
            c.freq_shift,
            self.time_linear_1.role,
        )?;
        let emb = rt.linear(&self.time_linear_1, &t).await?;
        let emb = rt.silu(&emb).await?;
        let mut emb = rt.linear(&self.time_linear_2, &emb).await?;
        match (&self.added, added) {
            (Some((l1, l2, tt)), Some(a)) => {
                let ad = rt.dims(a);
                if ad != [d[0], tt.input_dim] {
                    return Err(Error::InvalidArgument(format!(
                        "added conditioning must be [{}, {}], got {ad:?}",
                        d[0], tt.input_dim
                    )));
                }
                let aug = rt.linear(l1, a).await?;
                let aug = rt.silu(&aug).await?;
                let aug = rt.linear(l2, &aug).await?;
                emb = rt.add(&emb, &aug).await?;
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(Error::InvalidArgument(
                    "this U-Net (addition_embed_type `text_time`, SDXL) needs the added \
                     conditioning: pooled text embeddings and size ids"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "added conditioning given to a U-Net without addition_embed_type".into(),
                ))
            }
        }
        // Every resnet applies SiLU to the embedding first: do it once.
        let emb_act = rt.silu(&emb).await?;
        let cond = Conditioning {
            emb_act: &emb_act,
            context,
            gelu: self.gelu,
        };

        let mut x = rt.conv2d(&self.conv_in, sample).await?;
        let mut skips = vec![x.clone()];
        for b in &self.down_blocks {
            x = b.forward(rt, x, &cond, &mut skips).await?;
        }
        x = self.mid_block.forward(rt, &x, &cond).await?;
        for b in &self.up_blocks {
            x = b.forward(rt, x, &cond, &mut skips).await?;
        }
        let x = rt.group_norm(&self.conv_norm_out, &x).await?;
        let x = rt.silu(&x).await?;
        rt.conv2d(&self.conv_out, &x).await
    }
}

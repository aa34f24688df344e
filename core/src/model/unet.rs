//! `UNet2DConditionModel`, written once. The struct is the layer tree (names as in diffusers, so
//! `down_blocks.0.resnets.1.conv1` is both our path and the checkpoint's key); `forward` runs it
//! over `UNetOps`, which the placement runtime implements: it decides per op whether the phone
//! or the shard backends compute it. No weights live here: engines look them up by name.

use std::collections::HashMap;

use crate::model::config::UNetConfig;
use crate::model::ops::UNetOps;
use crate::vocab::error::{Error, Result};
use crate::vocab::layers::{
    Conv2dSpec, GeluKind, GroupNormSpec, LayerNormSpec, LinearSpec, Role, ShardLayer,
};

/// diffusers' `ResnetBlock2D`.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNormSpec,
    conv1: Conv2dSpec,
    time_emb_proj: LinearSpec,
    norm2: GroupNormSpec,
    conv2: Conv2dSpec,
    conv_shortcut: Option<Conv2dSpec>,
    output_scale_factor: f64,
}

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

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward.
#[derive(Debug, Clone)]
struct TransformerBlock {
    name: String,
    norm1: LayerNormSpec,
    attn1: Attention,
    norm2: LayerNormSpec,
    attn2: Attention,
    norm3: LayerNormSpec,
    ff_in: LinearSpec,
    ff_out: LinearSpec,
}

#[derive(Debug, Clone)]
enum Proj {
    Linear(LinearSpec),
    Conv(Conv2dSpec),
}

/// diffusers' `Transformer2DModel` (continuous input).
#[derive(Debug, Clone)]
struct Transformer2D {
    norm: GroupNormSpec,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Conv2dSpec>,
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Conv2dSpec>,
}

#[derive(Debug, Clone)]
struct MidBlock {
    resnet0: ResnetBlock,
    attention: Transformer2D,
    resnet1: ResnetBlock,
}

/// The U-Net layer tree built from a diffusers `unet/config.json`.
#[derive(Debug, Clone)]
pub struct UNet {
    pub config: UNetConfig,
    conv_in: Conv2dSpec,
    time_linear_1: LinearSpec,
    time_linear_2: LinearSpec,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNormSpec,
    conv_out: Conv2dSpec,
    gelu: GeluKind,
}

fn resnet(
    name: String,
    cin: usize,
    cout: usize,
    temb: usize,
    groups: usize,
    eps: f64,
    scale: f64,
) -> ResnetBlock {
    ResnetBlock {
        norm1: GroupNormSpec::new(format!("{name}.norm1"), groups, cin, eps),
        conv1: Conv2dSpec::new(format!("{name}.conv1"), cin, cout, 3, 1, 1),
        time_emb_proj: LinearSpec::new(format!("{name}.time_emb_proj"), temb, cout, true)
            .with_role(Role::TimeEmbedding),
        norm2: GroupNormSpec::new(format!("{name}.norm2"), groups, cout, eps),
        conv2: Conv2dSpec::new(format!("{name}.conv2"), cout, cout, 3, 1, 1),
        conv_shortcut: (cin != cout)
            .then(|| Conv2dSpec::new(format!("{name}.conv_shortcut"), cin, cout, 1, 1, 0)),
        output_scale_factor: scale,
    }
}

fn attention(name: String, dim: usize, ctx: usize, heads: usize) -> Attention {
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

fn transformer(
    name: String,
    ch: usize,
    heads: usize,
    ctx: usize,
    layers: usize,
    groups: usize,
    linear: bool,
) -> Transformer2D {
    let proj = |p: &str| {
        if linear {
            Proj::Linear(
                LinearSpec::new(format!("{name}.{p}"), ch, ch, true).with_role(Role::Projection),
            )
        } else {
            Proj::Conv(Conv2dSpec::new(format!("{name}.{p}"), ch, ch, 1, 1, 0))
        }
    };
    let blocks = (0..layers)
        .map(|k| {
            let b = format!("{name}.transformer_blocks.{k}");
            let (a, f) = (Role::Attention, Role::FeedForward);
            TransformerBlock {
                norm1: LayerNormSpec::new(format!("{b}.norm1"), ch, 1e-5).with_role(a),
                attn1: attention(format!("{b}.attn1"), ch, ch, heads),
                norm2: LayerNormSpec::new(format!("{b}.norm2"), ch, 1e-5).with_role(a),
                attn2: attention(format!("{b}.attn2"), ch, ctx, heads),
                norm3: LayerNormSpec::new(format!("{b}.norm3"), ch, 1e-5).with_role(f),
                ff_in: LinearSpec::new(format!("{b}.ff.net.0.proj"), ch, ch * 8, true).with_role(f),
                ff_out: LinearSpec::new(format!("{b}.ff.net.2"), ch * 4, ch, true).with_role(f),
                name: b,
            }
        })
        .collect();
    Transformer2D {
        // proj_in (1×1 or per-token) follows: no halo rows needed.
        norm: GroupNormSpec::new(format!("{name}.norm"), groups, ch, 1e-6).with_consumer_halo(0),
        proj_in: proj("proj_in"),
        blocks,
        proj_out: proj("proj_out"),
    }
}

impl UNet {
    /// Builds the layer tree; fails with a message for configs we do not implement.
    pub fn new(config: &UNetConfig) -> Result<Self> {
        config.validate()?;
        let c = config;
        let n = c.block_out_channels.len();
        let ch = &c.block_out_channels;
        let (g, eps) = (c.norm_num_groups, c.norm_eps);
        let temb = c.time_embedding_dim.unwrap_or(ch[0] * 4);
        let linear = c.use_linear_projection;
        if c.downsample_padding != 1 {
            return Err(Error::Unsupported(
                "unet config: downsample_padding other than 1".into(),
            ));
        }
        let mut down_blocks = Vec::with_capacity(n);
        let mut out = ch[0];
        for (i, &block_channels) in ch.iter().enumerate() {
            let input = out;
            out = block_channels;
            let cross = c.down_block_types[i] == "CrossAttnDownBlock2D";
            let layers = c.layers_per_block.get(i, n, "layers_per_block")?;
            let heads = c.heads(i)?;
            let ctx = c.cross_attention_dim.get(i, n, "cross_attention_dim")?;
            let tl = c
                .transformer_layers_per_block
                .get(i, n, "transformer_layers_per_block")?;
            let p = format!("down_blocks.{i}");
            down_blocks.push(DownBlock {
                resnets: (0..layers)
                    .map(|j| {
                        resnet(
                            format!("{p}.resnets.{j}"),
                            if j == 0 { input } else { out },
                            out,
                            temb,
                            g,
                            eps,
                            1.0,
                        )
                    })
                    .collect(),
                attentions: if cross {
                    (0..layers)
                        .map(|j| {
                            transformer(
                                format!("{p}.attentions.{j}"),
                                out,
                                heads,
                                ctx,
                                tl,
                                g,
                                linear,
                            )
                        })
                        .collect()
                } else {
                    vec![]
                },
                downsampler: (i + 1 < n).then(|| {
                    Conv2dSpec::new(format!("{p}.downsamplers.0.conv"), out, out, 3, 2, 1)
                }),
            });
        }
        let last = ch[n - 1];
        let mid_heads = c.heads(n - 1)?;
        let mid_ctx = c.cross_attention_dim.get(n - 1, n, "cross_attention_dim")?;
        let mid_tl =
            c.transformer_layers_per_block
                .get(n - 1, n, "transformer_layers_per_block")?;
        let ms = c.mid_block_scale_factor;
        let mid_block = MidBlock {
            resnet0: resnet("mid_block.resnets.0".into(), last, last, temb, g, eps, ms),
            attention: transformer(
                "mid_block.attentions.0".into(),
                last,
                mid_heads,
                mid_ctx,
                mid_tl,
                g,
                linear,
            ),
            resnet1: resnet("mid_block.resnets.1".into(), last, last, temb, g, eps, ms),
        };
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out = rev[0];
        for i in 0..n {
            let prev = out;
            out = rev[i];
            let input = rev[(i + 1).min(n - 1)];
            let bi = n - 1 - i; // the matching down block, for per-block settings
            let cross = c.up_block_types[i] == "CrossAttnUpBlock2D";
            let layers = c.layers_per_block.get(bi, n, "layers_per_block")? + 1;
            let heads = c.heads(bi)?;
            let ctx = c.cross_attention_dim.get(bi, n, "cross_attention_dim")?;
            let tl = c
                .transformer_layers_per_block
                .get(bi, n, "transformer_layers_per_block")?;
            let p = format!("up_blocks.{i}");
            up_blocks.push(UpBlock {
                resnets: (0..layers)
                    .map(|j| {
                        let skip = if j == layers - 1 { input } else { out };
                        let rin = if j == 0 { prev } else { out };
                        resnet(
                            format!("{p}.resnets.{j}"),
                            rin + skip,
                            out,
                            temb,
                            g,
                            eps,
                            1.0,
                        )
                    })
                    .collect(),
                attentions: if cross {
                    (0..layers)
                        .map(|j| {
                            transformer(
                                format!("{p}.attentions.{j}"),
                                out,
                                heads,
                                ctx,
                                tl,
                                g,
                                linear,
                            )
                        })
                        .collect()
                } else {
                    vec![]
                },
                upsampler: (i + 1 < n)
                    .then(|| Conv2dSpec::new(format!("{p}.upsamplers.0.conv"), out, out, 3, 1, 1)),
            });
        }
        let (ki, ko) = (c.conv_in_kernel, c.conv_out_kernel);
        Ok(Self {
            config: c.clone(),
            conv_in: Conv2dSpec::new("conv_in".into(), c.in_channels, ch[0], ki, 1, ki / 2),
            time_linear_1: LinearSpec::new("time_embedding.linear_1".into(), ch[0], temb, true)
                .with_role(Role::TimeEmbedding),
            time_linear_2: LinearSpec::new("time_embedding.linear_2".into(), temb, temb, true)
                .with_role(Role::TimeEmbedding),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNormSpec::new("conv_norm_out".into(), g, ch[0], eps),
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
            .flat_map(|b| &b.resnets)
            .chain([&self.mid_block.resnet0, &self.mid_block.resnet1])
            .chain(self.up_blocks.iter().flat_map(|b| &b.resnets))
    }

    fn transformers(&self) -> impl Iterator<Item = &Transformer2D> {
        self.down_blocks
            .iter()
            .flat_map(|b| &b.attentions)
            .chain([&self.mid_block.attention])
            .chain(self.up_blocks.iter().flat_map(|b| &b.attentions))
    }

    /// Every convolution of the U-Net (a fixed order; callers key by name).
    pub fn convolutions(&self) -> Vec<&Conv2dSpec> {
        let mut v = vec![&self.conv_in, &self.conv_out];
        for r in self.resnets() {
            v.extend([&r.conv1, &r.conv2]);
            v.extend(r.conv_shortcut.as_ref());
        }
        for t in self.transformers() {
            for p in [&t.proj_in, &t.proj_out] {
                if let Proj::Conv(c) = p {
                    v.push(c);
                }
            }
        }
        v.extend(
            self.down_blocks
                .iter()
                .filter_map(|b| b.downsampler.as_ref()),
        );
        v.extend(self.up_blocks.iter().filter_map(|b| b.upsampler.as_ref()));
        v
    }

    pub fn group_norms(&self) -> Vec<&GroupNormSpec> {
        let mut v = vec![&self.conv_norm_out];
        for r in self.resnets() {
            v.extend([&r.norm1, &r.norm2]);
        }
        v.extend(self.transformers().map(|t| &t.norm));
        v
    }

    /// Every linear layer and LayerNorm (a fixed order).
    fn token_layers(&self) -> (Vec<&LinearSpec>, Vec<&LayerNormSpec>) {
        let mut lin = vec![&self.time_linear_1, &self.time_linear_2];
        let mut ln = Vec::new();
        lin.extend(self.resnets().map(|r| &r.time_emb_proj));
        for t in self.transformers() {
            for p in [&t.proj_in, &t.proj_out] {
                if let Proj::Linear(l) = p {
                    lin.push(l);
                }
            }
            for b in &t.blocks {
                ln.extend([&b.norm1, &b.norm2, &b.norm3]);
                for a in [&b.attn1, &b.attn2] {
                    lin.extend([&a.to_q, &a.to_k, &a.to_v, &a.to_out]);
                }
                lin.extend([&b.ff_in, &b.ff_out]);
            }
        }
        (lin, ln)
    }

    /// The layers a shard server may be asked to run, by name: every convolution and
    /// GroupNorm, and the per-token layers outside attention (feed-forward, projections, time
    /// embedding). Attention's own layers never run on a server.
    pub fn shard_layers(&self) -> HashMap<String, ShardLayer> {
        let mut m = HashMap::new();
        for c in self.convolutions() {
            m.insert(c.name.clone(), ShardLayer::Conv2d(c.clone()));
        }
        for g in self.group_norms() {
            m.insert(g.name.clone(), ShardLayer::GroupNorm(g.clone()));
        }
        let (lin, ln) = self.token_layers();
        for l in lin.into_iter().filter(|l| l.role != Role::Attention) {
            m.insert(l.name.clone(), ShardLayer::Linear(l.clone()));
        }
        for l in ln.into_iter().filter(|l| l.role != Role::Attention) {
            m.insert(l.name.clone(), ShardLayer::LayerNorm(l.clone()));
        }
        m
    }

    /// Every parameter (name, shape) this U-Net needs, sorted by name.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = Vec::new();
        v.extend(self.time_linear_1.params());
        v.extend(self.time_linear_2.params());
        for c in self.convolutions() {
            v.extend(c.params());
        }
        for g in self.group_norms() {
            v.extend(g.params());
        }
        for r in self.resnets() {
            v.extend(r.time_emb_proj.params());
        }
        for t in self.transformers() {
            for p in [&t.proj_in, &t.proj_out] {
                if let Proj::Linear(l) = p {
                    v.extend(l.params());
                }
            }
            for b in &t.blocks {
                for ln in [&b.norm1, &b.norm2, &b.norm3] {
                    v.extend(ln.params());
                }
                for a in [&b.attn1, &b.attn2] {
                    for l in [&a.to_q, &a.to_k, &a.to_v, &a.to_out] {
                        v.extend(l.params());
                    }
                }
                v.extend(b.ff_in.params());
                v.extend(b.ff_out.params());
            }
        }
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

    /// One U-Net evaluation: ε (or v) prediction for `sample` [B, C, h, w] at `timestep`, with
    /// text states `context` [B, T, D].
    pub async fn forward<R: UNetOps>(
        &self,
        rt: &mut R,
        sample: &R::T,
        timestep: f64,
        context: &R::T,
    ) -> Result<R::T> {
        let sample = rt.input(sample.clone());
        let context = rt.input(context.clone());
        let out = self.forward_values(rt, &sample, timestep, &context).await?;
        rt.local(&out).await
    }

    async fn forward_values<R: UNetOps>(
        &self,
        rt: &mut R,
        sample: &R::Val,
        timestep: f64,
        context: &R::Val,
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
        )?;
        let emb = rt.linear(&self.time_linear_1, &t).await?;
        let emb = rt.silu(&emb).await?;
        let emb = rt.linear(&self.time_linear_2, &emb).await?;
        // Every resnet applies SiLU to the embedding first: do it once.
        let emb_act = rt.silu(&emb).await?;

        let mut x = rt.conv2d(&self.conv_in, sample).await?;
        let mut skips = vec![x.clone()];
        for b in &self.down_blocks {
            for (j, r) in b.resnets.iter().enumerate() {
                x = r.forward(rt, &x, &emb_act).await?;
                if let Some(a) = b.attentions.get(j) {
                    x = a.forward(rt, &x, context, self.gelu).await?;
                }
                skips.push(x.clone());
            }
            if let Some(ds) = &b.downsampler {
                x = rt.conv2d(ds, &x).await?;
                skips.push(x.clone());
            }
        }
        x = self.mid_block.resnet0.forward(rt, &x, &emb_act).await?;
        x = self
            .mid_block
            .attention
            .forward(rt, &x, context, self.gelu)
            .await?;
        x = self.mid_block.resnet1.forward(rt, &x, &emb_act).await?;
        for b in &self.up_blocks {
            for (j, r) in b.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::InvalidArgument("U-Net skip stack exhausted".into()))?;
                x = rt.cat(&[x, skip], 1).await?;
                x = r.forward(rt, &x, &emb_act).await?;
                if let Some(a) = b.attentions.get(j) {
                    x = a.forward(rt, &x, context, self.gelu).await?;
                }
            }
            if let Some(us) = &b.upsampler {
                // Up-sample to the size of the next skip (diffusers' forward_upsample_size),
                // which is exactly 2x unless an odd size was rounded up on the way down.
                let target = skips
                    .last()
                    .map(|s| rt.dims(s))
                    .ok_or_else(|| Error::InvalidArgument("U-Net skip stack exhausted".into()))?;
                x = rt.upsample_nearest(&x, target[2], target[3]).await?;
                x = rt.conv2d(us, &x).await?;
            }
        }
        let x = rt.group_norm(&self.conv_norm_out, &x).await?;
        let x = rt.silu(&x).await?;
        rt.conv2d(&self.conv_out, &x).await
    }
}

impl ResnetBlock {
    async fn forward<R: UNetOps>(
        &self,
        rt: &mut R,
        x: &R::Val,
        emb_act: &R::Val,
    ) -> Result<R::Val> {
        let h = rt.group_norm(&self.norm1, x).await?;
        let h = rt.silu(&h).await?;
        let h = rt.conv2d(&self.conv1, &h).await?;
        let t = rt.linear(&self.time_emb_proj, emb_act).await?;
        let h = rt.add_channel_bias(&h, &t).await?;
        let h = rt.group_norm(&self.norm2, &h).await?;
        let h = rt.silu(&h).await?;
        let h = rt.conv2d(&self.conv2, &h).await?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => rt.conv2d(c, x).await?,
            None => x.clone(),
        };
        let y = rt.add(&shortcut, &h).await?;
        if self.output_scale_factor != 1.0 {
            rt.scale(&y, 1.0 / self.output_scale_factor).await
        } else {
            Ok(y)
        }
    }
}

impl Attention {
    async fn forward<R: UNetOps>(&self, rt: &mut R, x: &R::Val, ctx: &R::Val) -> Result<R::Val> {
        let q = rt.linear(&self.to_q, x).await?;
        let k = rt.linear(&self.to_k, ctx).await?;
        let v = rt.linear(&self.to_v, ctx).await?;
        let o = rt.attention(&self.name, &q, &k, &v, self.heads).await?;
        rt.linear(&self.to_out, &o).await
    }
}

impl Transformer2D {
    async fn forward<R: UNetOps>(
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
            if let Some(delta) = rt.reused_attention(&b.name) {
                t = rt.add(&delta, &t).await?;
            } else {
                let before = t.clone();
                let a = rt.layer_norm(&b.norm1, &t).await?;
                let a = b.attn1.forward(rt, &a, &a).await?;
                t = rt.add(&a, &t).await?;
                let a = rt.layer_norm(&b.norm2, &t).await?;
                let a = b.attn2.forward(rt, &a, context).await?;
                t = rt.add(&a, &t).await?;
                rt.offer_attention(&b.name, &before, &t).await?;
            }
            let a = rt.layer_norm(&b.norm3, &t).await?;
            let a = rt.linear(&b.ff_in, &a).await?;
            let a = rt.geglu(&a, gelu).await?;
            let a = rt.linear(&b.ff_out, &a).await?;
            t = rt.add(&a, &t).await?;
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

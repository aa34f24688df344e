//! diffusers' `AutoencoderKL`, configured by `vae/config.json`: the encoder (image to latent
//! posterior mean, for img2img) and the decoder (latents to pixels). Both run on the phone, so
//! the image never leaves it. Parameter names are those diffusers saves; the legacy attention
//! names (`query`/`key`/`value`/`proj_attn`) and 1x1-conv-shaped attention weights of older
//! published checkpoints load too.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::model::stored::{conv2d, group_norm, Conv2d, GroupNorm, Linear};

use crate::model::config::{read_json, VaeConfig};
use crate::model::weights::WeightFile;
use crate::vocab::error::{Error, Result};

/// diffusers builds every VAE norm (resnets, attention, `conv_norm_out`) with eps 1e-6.
const EPS: f64 = 1e-6;

/// Upper bound on attention scores held at once (query rows × keys), so large images do not
/// need a full HW×HW matrix: 2^22 f32 = 16 MiB.
const MAX_SCORES: usize = 1 << 22;

fn conv(cin: usize, cout: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: if stride == 1 { k / 2 } else { 0 },
        stride,
        ..Default::default()
    };
    Ok(conv2d(cin, cout, k, cfg, vb)?)
}

/// `ResnetBlock2D` without a time embedding (`temb_channels=None` in the VAE).
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        let shortcut = if cin != cout {
            Some(conv(cin, cout, 1, 1, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(groups, cin, EPS, vb.pp("norm1"))?,
            conv1: conv(cin, cout, 3, 1, vb.pp("conv1"))?,
            norm2: group_norm(groups, cout, EPS, vb.pp("norm2"))?,
            conv2: conv(cout, cout, 3, 1, vb.pp("conv2"))?,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_act(x, true)?)?;
        let h = self.conv2.forward(&self.norm2.forward_act(&h, true)?)?;
        match &self.shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// A `c → c` attention projection. Old checkpoints store it as a 1x1 conv `[c, c, 1, 1]`;
/// that shape is detected through unchecked access and reshaped, anything else goes through
/// the checked path so a wrong shape is reported with its name.
fn attn_linear(vb: VarBuilder, c: usize) -> Result<Linear> {
    let stored = if vb.contains_tensor("weight") {
        vb.get_unchecked("weight").ok()
    } else {
        None
    };
    let weight = match stored {
        Some(w) if w.dims() == [c, c] => w,
        Some(w) if w.dims() == [c, c, 1, 1] => w.reshape((c, c))?,
        _ => vb.get((c, c), "weight")?,
    };
    let bias = vb.get(c, "bias")?;
    Ok(Linear::new(weight, Some(bias))?)
}

/// The single-head self-attention of the VAE mid block (diffusers `Attention` with
/// `attention_head_dim = channels`, residual connection, rescale factor 1).
struct Attention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    channels: usize,
}

impl Attention {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let [q, k, v, out] = if legacy {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        Ok(Self {
            norm: group_norm(groups, c, EPS, vb.pp("group_norm"))?,
            q: attn_linear(vb.pp(q), c)?,
            k: attn_linear(vb.pp(k), c)?,
            v: attn_linear(vb.pp(v), c)?,
            out: attn_linear(vb.pp(out), c)?,
            channels: c,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = h * w;
        let hs = self
            .norm
            .forward(x)?
            .reshape((b, c, n))?
            .transpose(1, 2)?
            .contiguous()?;
        if hs.device().is_cpu() && hs.dtype() == DType::F32 {
            // One head of all the channels: the fused kernel's scale 1/√d is 1/√channels.
            let (q, k, v) = (
                self.q.forward(&hs)?,
                self.k.forward(&hs)?,
                self.v.forward(&hs)?,
            );
            let o = super::flash_attention::attention(&q, &k, &v, 1)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let o = self
                .out
                .forward(&o)?
                .transpose(1, 2)?
                .reshape((b, c, h, w))?;
            return o + x;
        }
        let scale = 1.0 / (self.channels as f64).sqrt();
        let q = (self.q.forward(&hs)? * scale)?;
        let k_t = self.k.forward(&hs)?.transpose(1, 2)?.contiguous()?;
        let v = self.v.forward(&hs)?;
        // Query rows are independent, so chunking them bounds memory without changing results.
        let rows = (MAX_SCORES / n.max(1)).clamp(1, n.max(1));
        let mut parts = Vec::with_capacity(n.div_ceil(rows));
        let mut start = 0;
        while start < n {
            let len = rows.min(n - start);
            let s = q.narrow(1, start, len)?.matmul(&k_t)?;
            let p = candle_nn::ops::softmax_last_dim(&s)?;
            parts.push(p.matmul(&v)?);
            start += len;
        }
        let o = Tensor::cat(&parts, 1)?;
        let o = self
            .out
            .forward(&o)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        o + x
    }
}

/// `UNetMidBlock2D` of the VAE: resnet, attention, resnet.
struct MidBlock {
    resnet0: ResnetBlock,
    attn: Attention,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            resnet0: ResnetBlock::new(vb.pp("resnets.0"), c, c, groups)?,
            attn: Attention::new(vb.pp("attentions.0"), c, groups)?,
            resnet1: ResnetBlock::new(vb.pp("resnets.1"), c, c, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.resnet0.forward(x)?;
        let x = self.attn.forward(&x)?;
        self.resnet1.forward(&x)
    }
}

/// `DownEncoderBlock2D`: resnets, then (except the last block) a stride-2 conv.
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Conv2d>,
}

impl DownBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        match &self.downsample {
            // The VAE's `Downsample2D` has padding 0: it pads right and bottom by one zero,
            // then convolves unpadded, so the sampling grid starts at the top-left pixel.
            Some(d) => d.forward(&x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?),
            None => Ok(x),
        }
    }
}

/// `UpDecoderBlock2D`: resnets, then (except the last block) nearest 2x and a 3x3 conv.
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        match &self.upsample {
            Some(u) => {
                let (_, _, h, w) = x.dims4()?;
                u.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
            }
            None => Ok(x),
        }
    }
}

struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let conv_in = conv(cfg.in_channels, ch[0], 3, 1, vb.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let b = vb.pp(format!("down_blocks.{i}"));
            let mut resnets = Vec::with_capacity(cfg.layers_per_block);
            for j in 0..cfg.layers_per_block {
                let c = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock::new(b.pp(format!("resnets.{j}")), c, cout, g)?);
            }
            let downsample = if i + 1 < ch.len() {
                Some(conv(cout, cout, 3, 2, b.pp("downsamplers.0.conv"))?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                downsample,
            });
            cin = cout;
        }
        Ok(Self {
            conv_in,
            down_blocks,
            mid: MidBlock::new(vb.pp("mid_block"), cin, g)?,
            norm_out: group_norm(g, cin, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv(cin, 2 * cfg.latent_channels, 3, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            x = b.forward(&x)?;
        }
        let x = self.mid.forward(&x)?;
        self.conv_out.forward(&self.norm_out.forward_act(&x, true)?)
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let ch: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let conv_in = conv(cfg.latent_channels, ch[0], 3, 1, vb.pp("conv_in"))?;
        let mid = MidBlock::new(vb.pp("mid_block"), ch[0], g)?;
        let mut up_blocks = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let b = vb.pp(format!("up_blocks.{i}"));
            let mut resnets = Vec::with_capacity(cfg.layers_per_block + 1);
            for j in 0..=cfg.layers_per_block {
                let c = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock::new(b.pp(format!("resnets.{j}")), c, cout, g)?);
            }
            let upsample = if i + 1 < ch.len() {
                Some(conv(cout, cout, 3, 1, b.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            cin = cout;
        }
        Ok(Self {
            conv_in,
            mid,
            up_blocks,
            norm_out: group_norm(g, cin, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv(cin, cfg.out_channels, 3, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.conv_in.forward(z)?;
        let mut x = self.mid.forward(&x)?;
        for b in &self.up_blocks {
            x = b.forward(&x)?;
        }
        self.conv_out.forward(&self.norm_out.forward_act(&x, true)?)
    }
}

/// diffusers' `AutoencoderKL`.
pub struct Vae {
    pub config: VaeConfig,
    /// None where only the decoder was loaded (`Vae::load_decoder`: the phone, which loads the
    /// encoder on its own for an image-to-image generation, `VaeEncoder::load`).
    encoder: Option<VaeEncoder>,
    decoder: Decoder,
    post_quant_conv: Option<Conv2d>,
}

/// The encoder half of an `AutoencoderKL` (with its `quant_conv`): image to latent posterior.
/// Loadable alone, so a phone that decodes with a decoder-only `Vae` can read the encoder's
/// weights for one image-to-image generation and drop them after.
pub struct VaeEncoder {
    pub config: VaeConfig,
    encoder: Encoder,
    quant_conv: Option<Conv2d>,
}

impl VaeEncoder {
    fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        validate(config)?;
        let lc = config.latent_channels;
        Ok(Self {
            config: config.clone(),
            encoder: Encoder::new(vb.pp("encoder"), config)?,
            quant_conv: match config.use_quant_conv {
                true => Some(conv(2 * lc, 2 * lc, 1, 1, vb.pp("quant_conv"))?),
                false => None,
            },
        })
    }

    /// Loads the encoder of `vae/` (`config.json` + `diffusion_pytorch_model.safetensors`):
    /// no decoder parameter is read.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config: VaeConfig = read_json(&dir.join("config.json"))?;
        let file = Arc::new(WeightFile::open_component(dir, "diffusion_pytorch_model")?);
        let stored = file.storage_dtype();
        let (vb, slot) = file.var_builder(stored, device);
        Self::new(vb, &config).map_err(|e| match e {
            Error::Tensor(t) => slot.resolve(t),
            other => other,
        })
    }

    /// Posterior mean [B, latent, h, w] of an image in [-1, 1] (diffusers
    /// `vae.encode(x).latent_dist.mean`), before any scaling.
    pub fn encode_mean(&self, image: &Tensor) -> Result<Tensor> {
        check_input(image, self.config.in_channels, "image")?;
        let moments = self.encoder.forward(image)?;
        let moments = match &self.quant_conv {
            Some(c) => c.forward(&moments)?,
            None => moments,
        };
        Ok(moments
            .narrow(1, 0, self.config.latent_channels)?
            .contiguous()?)
    }
}

impl std::fmt::Debug for Vae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vae").field("config", &self.config).finish()
    }
}

/// Rejects configs the network cannot be built from, before any weight is asked for.
fn validate(cfg: &VaeConfig) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidArgument(format!("vae config: {m}")));
    if cfg.block_out_channels.is_empty() {
        return bad("empty block_out_channels".into());
    }
    if cfg.norm_num_groups == 0 {
        return bad("norm_num_groups is 0".into());
    }
    if cfg.in_channels == 0 || cfg.out_channels == 0 || cfg.latent_channels == 0 {
        return bad("zero in/out/latent channels".into());
    }
    if cfg.layers_per_block == 0 {
        return bad("layers_per_block is 0".into());
    }
    for (i, &c) in cfg.block_out_channels.iter().enumerate() {
        if c == 0 || c % cfg.norm_num_groups != 0 {
            return bad(format!(
                "block {i} has {c} channels, not a positive multiple of norm_num_groups {}",
                cfg.norm_num_groups
            ));
        }
    }
    Ok(())
}

/// Checks a [B, C, H, W] input has the expected channel count, naming the argument.
fn check_input(x: &Tensor, channels: usize, what: &str) -> Result<()> {
    match x.dims() {
        [_, c, _, _] if *c == channels => Ok(()),
        d => Err(Error::InvalidArgument(format!(
            "{what} must be [B, {channels}, H, W], got {d:?}"
        ))),
    }
}

impl Vae {
    /// Builds from a `VarBuilder` holding diffusers' `AutoencoderKL` parameter names.
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        Self::build(vb, config, true)
    }

    /// Builds the decoder half only: no encoder parameter is read.
    pub fn new_decoder(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        Self::build(vb, config, false)
    }

    fn build(vb: VarBuilder, config: &VaeConfig, with_encoder: bool) -> Result<Self> {
        validate(config)?;
        let lc = config.latent_channels;
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv(lc, lc, 1, 1, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            encoder: match with_encoder {
                true => Some(VaeEncoder::new(vb.clone(), config)?),
                false => None,
            },
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            post_quant_conv,
        })
    }

    /// Loads `vae/` of a model folder (`config.json` + `diffusion_pytorch_model.safetensors`),
    /// with missing files, tensors and shape mismatches reported by name.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_parts(dir, device, true)
    }

    /// `load`, the decoder only (what text-to-image needs on the phone).
    pub fn load_decoder(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_parts(dir, device, false)
    }

    fn load_parts(dir: &Path, device: &Device, with_encoder: bool) -> Result<Self> {
        let config: VaeConfig = read_json(&dir.join("config.json"))?;
        let file = Arc::new(WeightFile::open_component(dir, "diffusion_pytorch_model")?);
        let stored = file.storage_dtype();
        let (vb, slot) = file.var_builder(stored, device);
        Self::build(vb, &config, with_encoder).map_err(|e| match e {
            Error::Tensor(t) => slot.resolve(t),
            other => other,
        })
    }

    /// Raw decoder output [B, out, f·h, f·w] (f = `downsample_factor`, 8 for SD) for latents
    /// [B, latent, h, w] already divided by `scaling_factor` (diffusers `vae.decode(z).sample`:
    /// no clamp, no rescale).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        check_input(latents, self.config.latent_channels, "latents")?;
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(latents)?,
            None => latents.clone(),
        };
        Ok(self.decoder.forward(&z)?)
    }

    /// Posterior mean [B, latent, h, w] of an image in [-1, 1] (diffusers
    /// `vae.encode(x).latent_dist.mean`), before any scaling.
    pub fn encode_mean(&self, image: &Tensor) -> Result<Tensor> {
        self.encoder
            .as_ref()
            .ok_or_else(|| {
                Error::Unsupported("this VAE was loaded without its encoder (load_decoder)".into())
            })?
            .encode_mean(image)
    }

    /// The encoder, where it was loaded (`Vae::load`).
    pub fn encoder(&self) -> Option<&VaeEncoder> {
        self.encoder.as_ref()
    }
}

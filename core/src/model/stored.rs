//! Layers of the text encoder and the VAE whose large weights (matrices, kernels, embedding
//! tables) stay in the checkpoint's precision and are widened to the input's dtype per use:
//! f16 and bf16 widen to f32 exactly, so an f16 checkpoint gives the same numbers as converting
//! it on load, at half the resident memory. Norm parameters and biases are small and become f32
//! on load. Build them from a `VarBuilder` whose dtype is the file's `storage_dtype`.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2dConfig, LayerNorm, VarBuilder};

/// `t` in `dtype`: shared when it already is, widened (one temporary) when not.
fn widened(t: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        t.to_dtype(dtype)
    }
}

fn small(t: Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F32)
}

/// `y = x Wᵀ + b`, W in its stored precision.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// From a weight `[out, in]` (any float dtype) and an optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        Ok(Self {
            weight,
            bias: bias.map(small).transpose()?,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = widened(&self.weight, x.dtype())?;
        let fits = x.dims().last() == Some(&w.dim(1)?) && w.dim(1)? > 0;
        if fits && x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 2 {
            // Our GEMM with the bias as its starting destination (`cpu_linear`).
            let mut dims = x.dims().to_vec();
            let rows = x.elem_count() / w.dim(1)?;
            let x2 = x.contiguous()?.reshape((rows, w.dim(1)?))?;
            let y = super::cpu_linear::linear(&x2, &w, self.bias.as_ref())
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            if let Some(last) = dims.last_mut() {
                *last = w.dim(0)?;
            }
            return y.reshape(dims);
        }
        candle_nn::Linear::new(w, self.bias.clone()).forward(x)
    }
}

/// `name.weight` [out, in] and `name.bias` [out].
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Linear::new(weight, Some(bias))
}

/// A linear layer without bias (CLIP's `text_projection`), weight in its stored precision.
pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    Linear::new(weight, None)
}

/// A 2-D convolution, kernel in its stored precision.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: Conv2dConfig,
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = widened(&self.weight, x.dtype())?;
        let c = self.config;
        if x.device().is_cpu() && x.dtype() == DType::F32 && c.groups == 1 && c.dilation == 1 {
            // Our im2col convolution (`cpu_conv`): no per-call kernel re-layout.
            let bias = match &self.bias {
                Some(b) => b.clone(),
                None => Tensor::zeros(w.dim(0)?, DType::F32, x.device())?,
            };
            let p = c.padding;
            let pad = crate::vocab::precision::Pad {
                top: p,
                bottom: p,
                left: p,
                right: p,
            };
            return super::cpu_conv::conv2d(x, &w, &bias, pad, c.stride)
                .map_err(|e| candle_core::Error::Msg(e.to_string()));
        }
        candle_nn::Conv2d::new(w, self.bias.clone(), c).forward(x)
    }
}

/// `name.weight` [out, in, k, k] and `name.bias` [out].
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    config: Conv2dConfig,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    let weight = vb.get(
        (
            out_channels,
            in_channels / config.groups.max(1),
            kernel,
            kernel,
        ),
        "weight",
    )?;
    let bias = small(vb.get(out_channels, "bias")?)?;
    Ok(Conv2d {
        weight,
        bias: Some(bias),
        config,
    })
}

/// A lookup table in its stored precision; looked-up rows come out in f32.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Tensor,
    hidden: usize,
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(self.hidden);
        let rows = self.table.index_select(&ids.flatten_all()?, 0)?;
        small(rows)?.reshape(dims)
    }
}

/// `name.weight` [entries, hidden].
pub fn embedding(entries: usize, hidden: usize, vb: VarBuilder) -> candle_core::Result<Embedding> {
    Ok(Embedding {
        table: vb.get((entries, hidden), "weight")?,
        hidden,
    })
}

/// candle's LayerNorm with its parameters in f32.
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    candle_nn::layer_norm(size, eps, vb.to_dtype(DType::F32))
}

/// GroupNorm with its affine in f32: our fused CPU kernel on f32 CPU maps
/// (`cpu_ops::group_norm`, with the SiLU that follows it where there is one), candle's
/// otherwise.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    gamma: Tensor,
    beta: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// GroupNorm, then SiLU when `silu`.
    pub fn forward_act(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 3 {
            return super::cpu_ops::group_norm(
                x,
                &self.gamma,
                &self.beta,
                self.groups,
                self.eps,
                silu,
            )
            .map_err(|e| candle_core::Error::Msg(e.to_string()));
        }
        let y = self.inner.forward(x)?;
        match silu {
            true => y.silu(),
            false => Ok(y),
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_act(x, false)
    }
}

/// `name.weight` and `name.bias` [channels] of a GroupNorm, in f32.
pub fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> candle_core::Result<GroupNorm> {
    let vb = vb.to_dtype(DType::F32);
    let gamma = vb.get(channels, "weight")?;
    let beta = vb.get(channels, "bias")?;
    let inner = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), channels, groups, eps)?;
    Ok(GroupNorm {
        inner,
        gamma,
        beta,
        groups,
        eps,
    })
}

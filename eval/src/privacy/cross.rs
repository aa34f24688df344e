//! The CFG-difference attack on `strict`: after the first transformer block's attention the
//! phone scatters `t' = y + CrossAttn(LN2 y, text)` to each server's strip, where `y` (the
//! residual stream after self-attention) is the same for both guidance halves at the first
//! block (both start from the same x_t and no text has entered yet). A server holding both
//! halves solves `y` from the unconditional half (the empty prompt is public) by a fixed point
//! per token, then scores every caption of a dictionary by how well `y + CrossAttn(LN2 y, c)`
//! reproduces the conditional half — an exact test of a candidate prompt.
//!
//! A server holding only the conditional half lacks `y`: the best it can do here is estimate
//! `y` from what it computed itself — its own tokens before the block plus self-attention over
//! the tokens it holds (exact when it holds the whole map, N = 1) — and score the dictionary
//! with that estimate.

use candle_core::{Device, Tensor, D};
use veil_core::client::pipeline::StableDiffusion;

use crate::attacker::{public_tensor, AttackError, Result};

/// The first transformer block of the tiny model (level 0).
pub const FIRST_BLOCK: &str = "down_blocks.0.attentions.0.transformer_blocks.0";

/// One attention layer's public weights.
struct AttnWeights {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out_w: Tensor,
    out_b: Tensor,
    heads: usize,
}

impl AttnWeights {
    fn load(sd: &StableDiffusion, name: &str, heads: usize) -> Result<Self> {
        Ok(Self {
            q: public_tensor(sd, &format!("{name}.to_q.weight"))?,
            k: public_tensor(sd, &format!("{name}.to_k.weight"))?,
            v: public_tensor(sd, &format!("{name}.to_v.weight"))?,
            out_w: public_tensor(sd, &format!("{name}.to_out.0.weight"))?,
            out_b: public_tensor(sd, &format!("{name}.to_out.0.bias"))?,
            heads,
        })
    }

    /// Keys and values [M, heads, T, dh] of `ctx` [M, T, D].
    fn kv(&self, ctx: &Tensor) -> Result<(Tensor, Tensor)> {
        let (m, t, _) = ctx.dims3()?;
        let c = self.k.dim(0)?;
        let dh = c / self.heads;
        let split = |x: Tensor| -> Result<Tensor> {
            Ok(x.reshape((m, t, self.heads, dh))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let k = split(ctx.broadcast_matmul(&self.k.t()?)?)?;
        let v = split(ctx.broadcast_matmul(&self.v.t()?)?)?;
        Ok((k, v))
    }

    /// Attention of queries from `x` [M, N, C] (already normalised) against keys/values
    /// [M, heads, T, dh], projected out: [M, N, C].
    fn attend(&self, x: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (m, n, c) = x.dims3()?;
        let dh = c / self.heads;
        let q = x
            .broadcast_matmul(&self.q.t()?)?
            .reshape((m, n, self.heads, dh))?
            .transpose(1, 2)?
            .contiguous()?;
        let s = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / (dh as f64).sqrt())?;
        let p = candle_nn_softmax(&s)?;
        let o = p.matmul(v)?.transpose(1, 2)?.reshape((m, n, c))?;
        Ok(o.broadcast_matmul(&self.out_w.t()?)?
            .broadcast_add(&self.out_b)?)
    }
}

fn candle_nn_softmax(s: &Tensor) -> Result<Tensor> {
    let max = s.max_keepdim(D::Minus1)?;
    let e = s.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// LayerNorm over the last dimension with public affine weights.
struct Norm {
    w: Tensor,
    b: Tensor,
}

impl Norm {
    fn load(sd: &StableDiffusion, name: &str) -> Result<Self> {
        Ok(Self {
            w: public_tensor(sd, &format!("{name}.weight"))?,
            b: public_tensor(sd, &format!("{name}.bias"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let n = xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        Ok(n.broadcast_mul(&self.w)?.broadcast_add(&self.b)?)
    }
}

/// The attacker's copy of the first block's attention sub-layers, and a dictionary of
/// captions with their cross-attention keys and values.
pub struct CfgAttack {
    norm1: Norm,
    attn1: AttnWeights,
    norm2: Norm,
    attn2: AttnWeights,
    captions: Vec<String>,
    /// [M, heads, 77, dh] per dictionary caption.
    keys: Tensor,
    values: Tensor,
    /// The empty prompt's.
    empty: (Tensor, Tensor),
}

/// Captions scored per batch against one picture (bounds the score tensor).
const DICT_CHUNK: usize = 256;

impl CfgAttack {
    pub fn new(sd: &StableDiffusion, dictionary: Vec<String>) -> Result<Self> {
        let heads = sd.unet.config.heads(0)?;
        let attn2 = AttnWeights::load(sd, &format!("{FIRST_BLOCK}.attn2"), heads)?;
        let states = dictionary
            .iter()
            .map(|c| sd.encode_prompt(c))
            .collect::<veil_core::Result<Vec<_>>>()?;
        let (keys, values) = attn2.kv(&Tensor::cat(&states, 0)?)?;
        let empty = attn2.kv(&sd.encode_prompt("")?)?;
        Ok(Self {
            norm1: Norm::load(sd, &format!("{FIRST_BLOCK}.norm1"))?,
            attn1: AttnWeights::load(sd, &format!("{FIRST_BLOCK}.attn1"), heads)?,
            norm2: Norm::load(sd, &format!("{FIRST_BLOCK}.norm2"))?,
            attn2,
            captions: dictionary,
            keys,
            values,
            empty,
        })
    }

    pub fn captions(&self) -> &[String] {
        &self.captions
    }

    /// `CrossAttn(LN2 y)` against the empty prompt, [1, N, C].
    fn cross_empty(&self, y: &Tensor) -> Result<Tensor> {
        self.attn2
            .attend(&self.norm2.forward(y)?, &self.empty.0, &self.empty.1)
    }

    /// Solves `y` from the unconditional half `t' = y + CrossAttn(LN2 y, empty)` (tokens × C
    /// flattened), by fixed-point iteration; returns `y` [1, N, C] and its relative residual.
    pub fn solve_shared(&self, t_uncond: &[f32], channels: usize) -> Result<(Tensor, f64)> {
        let n = t_uncond.len() / channels;
        let t = Tensor::from_slice(t_uncond, (1, n, channels), &Device::Cpu)?;
        let mut y = t.clone();
        for _ in 0..60 {
            y = (&t - self.cross_empty(&y)?)?;
        }
        let r = ((&y + self.cross_empty(&y)?)? - &t)?;
        let rel = r.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt()
            / t.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt().max(1e-12);
        Ok((y, rel as f64))
    }

    /// Estimates `y` from the tokens a server held before the block (`before`, its own tokens
    /// × C): its tokens plus self-attention over them alone.
    pub fn estimate_shared(&self, before: &[f32], channels: usize) -> Result<Tensor> {
        let n = before.len() / channels;
        let b = Tensor::from_slice(before, (1, n, channels), &Device::Cpu)?;
        let a = self.norm1.forward(&b)?;
        let (k, v) = self.kv_self(&a)?;
        Ok((&b + self.attn1.attend(&a, &k, &v)?)?)
    }

    fn kv_self(&self, a: &Tensor) -> Result<(Tensor, Tensor)> {
        self.attn1.kv(a)
    }

    /// Index of the dictionary caption whose cross-attention best explains the conditional
    /// half `t_cond` given the shared stream `y`, and the scores (squared error) of all.
    pub fn best_caption(&self, y: &Tensor, t_cond: &[f32]) -> Result<(usize, Vec<f32>)> {
        let (_, n, c) = y.dims3()?;
        let target = Tensor::from_slice(t_cond, (1, n, c), &Device::Cpu)?;
        let x = self.norm2.forward(y)?;
        let m = self.captions.len();
        let mut scores = Vec::with_capacity(m);
        let mut start = 0;
        while start < m {
            let len = DICT_CHUNK.min(m - start);
            let k = self.keys.narrow(0, start, len)?;
            let v = self.values.narrow(0, start, len)?;
            let xs = x.repeat((len, 1, 1))?;
            let pred = y.broadcast_add(&self.attn2.attend(&xs, &k, &v)?)?;
            let err = pred.broadcast_sub(&target)?.sqr()?.sum((1, 2))?;
            scores.extend(err.to_vec1::<f32>()?);
            start += len;
        }
        let best = scores
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .ok_or_else(|| AttackError::Setup("empty dictionary".into()))?;
        Ok((best, scores))
    }
}

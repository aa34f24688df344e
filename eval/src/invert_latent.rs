//! Optimisation-based inversion of the U-Net input from what a `ppidm` server receives.
//!
//! Under `ppidm` every server receives the self-attention keys and values of every transformer
//! block for every position of the map; `attacker::invert_key_values` solves them back to the
//! block's self-attention input `F = LN1(tokens)` exactly. The first transformer block's `F` is
//! a function of the U-Net input `x_t` and the timestep alone (no text has entered yet):
//!
//! ```text
//! conv_in → down_blocks.0.resnets.0 (norm1 → SiLU → conv1 → + time_emb_proj(SiLU(temb))
//!          → norm2 → SiLU → conv2 → + shortcut) → down_blocks.0.attentions.0.norm
//!          → proj_in → tokens → transformer_blocks.0.norm1
//! ```
//!
//! `first_block_features` writes that path with plain differentiable candle ops (convolutions
//! as matrix products over shifted copies, GroupNorm and LayerNorm from reductions; candle's
//! autograd runs through it). `invert_latent` recovers `x_t` by minimising
//! `‖first_block_features(x) − F‖² / ‖F‖²` over the rows the server does not hold (its own
//! strip at `conv_in` pins those) with Adam, using a hand-written reverse pass of the same
//! forward (the tests check it against autograd; it takes half the time: ≈1.0 ms against
//! ≈2.3 ms per step at 16×16 on one core). The paper's GroupNorm variant (each server's row
//! block normalised with its own statistics) is modelled by `FirstBlock::with_paper_group_norm`.
//!
//! What the features do not pin down:
//! - The timestep, where GroupNorm has one channel per group (the tiny model: 32 groups of 32
//!   channels): `norm2` then removes the per-channel time-embedding bias whole, so `F` does
//!   not depend on it (with several channels per group, SD 1.5's 320 / 32, it does).
//! - Nothing of the latent that we could find: a per-channel shift of `conv_in`'s output would
//!   pass through every GroupNorm unseen, but the zero padding at the borders breaks it, and on
//!   the tiny model every inversion we ran (exact and paper GroupNorm, with the top quarter of
//!   rows known or none) ended at the true `x_t` (relative error ≤ 6e-5).
//! - An exactly constant start is a degenerate point (every GroupNorm over it sees zero
//!   variance); `Schedule::jitter` perturbs the start, so a zero prior works.

use std::ops::Range;

use candle_core::{DType, Tensor, Var};
use veil_core::client::pipeline::{seeded_normal, StableDiffusion};
use veil_core::placement::policy::partition;

use crate::attacker::{AttackError, Result};

fn setup(msg: impl Into<String>) -> AttackError {
    AttackError::Setup(msg.into())
}

/// A public U-Net weight by diffusers name, as f32.
fn param(sd: &StableDiffusion, name: &str) -> Result<Tensor> {
    let t = sd
        .unet_engine
        .weights()
        .get(name)
        .ok_or_else(|| setup(format!("public weight {name} not found")))?;
    Ok(t.to_dtype(DType::F32)?)
}

/// A stride-1 "same" convolution (or a per-token linear layer, a 1×1 convolution) written as a
/// matrix product over shifted copies of its zero-padded input (differentiable by candle's
/// autograd; its input gradient is the same construction with the adjoint kernel).
struct Conv {
    /// [out, k·k·in], columns ordered (ky, kx, in).
    weight: Tensor,
    /// The adjoint (gradient with respect to the input) as a convolution: [in, k·k·out], the
    /// kernel flipped and its channel axes swapped.
    adjoint: Tensor,
    /// [1, out, 1].
    bias: Tensor,
    kernel: usize,
}

impl Conv {
    fn load(sd: &StableDiffusion, name: &str) -> Result<Self> {
        let w = param(sd, &format!("{name}.weight"))?;
        let w = match *w.dims() {
            [o, i] => w.reshape((o, i, 1, 1))?,
            [_, _, kh, kw] if kh == kw && kh % 2 == 1 => w,
            ref d => return Err(setup(format!("{name}: unsupported weight shape {d:?}"))),
        };
        let (o, i, k, _) = w.dims4()?;
        // Columns ordered (ky, kx, channel), as `forward` stacks the shifted copies.
        let as_matrix = |w: &Tensor, rows: usize, cols: usize| -> Result<Tensor> {
            Ok(w.permute((0, 2, 3, 1))?
                .reshape((rows, k * k * cols))?
                .contiguous()?)
        };
        let flipped = w.flip(&[2, 3])?.transpose(0, 1)?;
        Ok(Self {
            weight: as_matrix(&w, o, i)?,
            adjoint: as_matrix(&flipped, i, o)?,
            bias: param(sd, &format!("{name}.bias"))?.reshape((1, o, 1))?,
            kernel: k,
        })
    }

    /// `x` [B, in, H, W] → [B, out, H·W].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self
            .weight
            .broadcast_matmul(&self.columns(x)?)?
            .broadcast_add(&self.bias)?)
    }

    /// The gradient with respect to the input of the gradient `dy` [B, out, H, W] of the
    /// output: [B, in, H·W].
    fn backward(&self, dy: &Tensor) -> Result<Tensor> {
        Ok(self.adjoint.broadcast_matmul(&self.columns(dy)?)?)
    }

    /// The k·k shifted copies of the zero-padded `x` [B, c, H, W], stacked: [B, k·k·c, H·W].
    fn columns(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let k = self.kernel;
        let cols = if k == 1 {
            x.reshape((b, c, h * w))?
        } else {
            let p = k / 2;
            let xp = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
            let mut shifted = Vec::with_capacity(k * k);
            for ky in 0..k {
                for kx in 0..k {
                    shifted.push(xp.narrow(2, ky, h)?.narrow(3, kx, w)?);
                }
            }
            Tensor::cat(&shifted, 1)?.reshape((b, k * k * c, h * w))?
        };
        Ok(cols)
    }
}

/// GroupNorm (`groups` < channels) or LayerNorm over the channels (`groups == 0`) of a
/// [B, C, N] tensor, with its affine parameters as [1, C, 1].
struct Norm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl Norm {
    fn load(sd: &StableDiffusion, name: &str, groups: usize, eps: f64) -> Result<Self> {
        let weight = param(sd, &format!("{name}.weight"))?;
        let c = weight.elem_count();
        if groups > 0 && c % groups != 0 {
            return Err(setup(format!("{name}: {c} channels in {groups} groups")));
        }
        Ok(Self {
            weight: weight.reshape((1, c, 1))?,
            bias: param(sd, &format!("{name}.bias"))?.reshape((1, c, 1))?,
            groups,
            eps,
        })
    }

    /// `x` [B, C, N] grouped for the statistics: [B, groups, C/groups·N] (GroupNorm) or itself
    /// (LayerNorm), and the axis the statistics reduce.
    fn grouped(&self, x: &Tensor) -> Result<(Tensor, usize)> {
        if self.groups == 0 {
            return Ok((x.clone(), 1));
        }
        let (b, c, n) = x.dims3()?;
        Ok((x.reshape((b, self.groups, (c / self.groups) * n))?, 2))
    }

    /// The output and what `backward` needs. Statistics are taken over each token block of
    /// `blocks` separately (one block of every token: the exact norm).
    fn forward_cached(&self, x: &Tensor, blocks: &[Range<usize>]) -> Result<(Tensor, NormCache)> {
        let mut normalised = Vec::with_capacity(blocks.len());
        let mut cache = Vec::with_capacity(blocks.len());
        for r in blocks {
            let xb = x.narrow(2, r.start, r.len())?;
            let (g, dim) = self.grouped(&xb)?;
            let centred = g.broadcast_sub(&g.mean_keepdim(dim)?)?;
            let inv = (centred.sqr()?.mean_keepdim(dim)? + self.eps)?
                .sqrt()?
                .recip()?;
            let xhat = centred.broadcast_mul(&inv)?;
            normalised.push(xhat.reshape(xb.dims())?);
            cache.push((xhat, inv));
        }
        let y = Tensor::cat(&normalised, 2)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?;
        Ok((y, cache))
    }

    /// The gradient with respect to the input, from the output's `dy` [B, C, N].
    fn backward(&self, dy: &Tensor, blocks: &[Range<usize>], cache: &NormCache) -> Result<Tensor> {
        let dyw = dy.broadcast_mul(&self.weight)?;
        let mut parts = Vec::with_capacity(blocks.len());
        for (r, (xhat, inv)) in blocks.iter().zip(cache) {
            let part = dyw.narrow(2, r.start, r.len())?;
            let (g, dim) = self.grouped(&part)?;
            let mean = g.mean_keepdim(dim)?;
            let proj = (&g * xhat)?.mean_keepdim(dim)?;
            let dx = g
                .broadcast_sub(&mean)?
                .sub(&xhat.broadcast_mul(&proj)?)?
                .broadcast_mul(inv)?;
            parts.push(dx.reshape(part.dims())?);
        }
        Ok(Tensor::cat(&parts, 2)?)
    }
}

/// A norm's per-block (normalised input, grouped; 1/σ), for its reverse pass.
type NormCache = Vec<(Tensor, Tensor)>;

/// SiLU's derivative: σ(u)·(1 + u·(1 − σ(u))).
fn silu_grad(u: &Tensor) -> Result<Tensor> {
    let s = (u.neg()?.exp()? + 1.0)?.recip()?;
    let one_minus = s.affine(-1.0, 1.0)?;
    Ok((&s * ((u * one_minus)? + 1.0)?)?)
}

/// What the reverse pass reads from the forward: the features, the inputs of the two SiLUs,
/// the GroupNorms' token blocks and the four norms' caches (norm1, norm2, the transformer's
/// norm, LN1).
struct Trace {
    features: Tensor,
    n1: Tensor,
    n2: Tensor,
    blocks: Vec<Range<usize>>,
    caches: [NormCache; 4],
}

/// `x · Wᵀ + b` for a [B, in] row.
fn linear(sd: &StableDiffusion, name: &str, x: &Tensor) -> Result<Tensor> {
    let w = param(sd, &format!("{name}.weight"))?;
    let b = param(sd, &format!("{name}.bias"))?;
    Ok(x.matmul(&w.t()?)?.broadcast_add(&b)?)
}

/// The sinusoidal timestep embedding [1, dim], with diffusers' f32 rounding (as the engine).
fn timestep_embedding(sd: &StableDiffusion, t: f64, dim: usize) -> Result<Tensor> {
    let c = &sd.unet.config;
    let half = dim / 2;
    let args: Vec<f32> = (0..half)
        .map(|i| {
            let exponent = (-(10000f32.ln()) * i as f32) / (half as f32 - c.freq_shift as f32);
            t as f32 * exponent.exp()
        })
        .collect();
    let sin = args.iter().map(|a| a.sin());
    let cos = args.iter().map(|a| a.cos());
    let mut row: Vec<f32> = if c.flip_sin_to_cos {
        cos.chain(sin).collect()
    } else {
        sin.chain(cos).collect()
    };
    row.resize(dim, 0.0);
    Ok(Tensor::from_vec(row, (1, dim), &sd.device)?)
}

/// The path from the U-Net input to the first transformer block's self-attention input, with
/// its weights prepared once (and the time-embedding bias of the resnet, which does not depend
/// on the input, computed once).
pub struct FirstBlock {
    conv_in: Conv,
    norm1: Norm,
    conv1: Conv,
    /// `time_emb_proj(SiLU(temb))` as [1, C, 1].
    time_bias: Tensor,
    norm2: Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
    attn_norm: Norm,
    proj_in: Conv,
    ln1: Norm,
    /// `Some(n)`: GroupNorm statistics per row block of `n` servers (`ppidm`'s paper variant).
    paper_group_norm: Option<usize>,
}

const RESNET: &str = "down_blocks.0.resnets.0";
const ATTENTION: &str = "down_blocks.0.attentions.0";

impl FirstBlock {
    /// Reads the public weights of `sd` for `timestep`.
    pub fn new(sd: &StableDiffusion, timestep: f64) -> Result<Self> {
        let c = &sd.unet.config;
        if c.down_block_types.first().map(String::as_str) != Some("CrossAttnDownBlock2D") {
            return Err(setup("the first down block has no transformer"));
        }
        let ch0 = c.block_out_channels[0];
        let (groups, eps) = (c.norm_num_groups, c.norm_eps);
        let emb = timestep_embedding(sd, timestep, ch0)?;
        let emb = linear(sd, "time_embedding.linear_1", &emb)?.silu()?;
        let emb = linear(sd, "time_embedding.linear_2", &emb)?.silu()?;
        let time_bias = linear(sd, &format!("{RESNET}.time_emb_proj"), &emb)?;
        let cout = time_bias.dim(1)?;
        let shortcut_name = format!("{RESNET}.conv_shortcut");
        let has_shortcut = sd
            .unet_engine
            .weights()
            .contains_key(&format!("{shortcut_name}.weight"));
        Ok(Self {
            conv_in: Conv::load(sd, "conv_in")?,
            norm1: Norm::load(sd, &format!("{RESNET}.norm1"), groups, eps)?,
            conv1: Conv::load(sd, &format!("{RESNET}.conv1"))?,
            time_bias: time_bias.reshape((1, cout, 1))?,
            norm2: Norm::load(sd, &format!("{RESNET}.norm2"), groups, eps)?,
            conv2: Conv::load(sd, &format!("{RESNET}.conv2"))?,
            shortcut: if has_shortcut {
                Some(Conv::load(sd, &shortcut_name)?)
            } else {
                None
            },
            // Transformer2D's GroupNorm uses eps 1e-6 (diffusers), the block's LayerNorm 1e-5.
            attn_norm: Norm::load(sd, &format!("{ATTENTION}.norm"), groups, 1e-6)?,
            proj_in: Conv::load(sd, &format!("{ATTENTION}.proj_in"))?,
            ln1: Norm::load(
                sd,
                &format!("{ATTENTION}.transformer_blocks.0.norm1"),
                0,
                1e-5,
            )?,
            paper_group_norm: None,
        })
    }

    /// The forward pass, keeping what the reverse pass needs.
    fn trace(&self, x: &Tensor) -> Result<Trace> {
        let (b, _, h, w) = x.dims4()?;
        let spatial = |t: &Tensor| -> Result<Tensor> { Ok(t.reshape((b, t.dim(1)?, h, w))?) };
        let all = 0..h * w;
        let blocks: Vec<Range<usize>> = match self.paper_group_norm {
            Some(n) => partition(h, n)
                .into_iter()
                .filter(|r| !r.is_empty())
                .map(|r| r.start * w..r.end * w)
                .collect(),
            None => vec![all.clone()],
        };
        let a0 = self.conv_in.forward(x)?;
        let (n1, norm1) = self.norm1.forward_cached(&a0, &blocks)?;
        let a1 = self.conv1.forward(&spatial(&n1.silu()?)?)?;
        let a1 = a1.broadcast_add(&self.time_bias)?;
        let (n2, norm2) = self.norm2.forward_cached(&a1, &blocks)?;
        let a2 = self.conv2.forward(&spatial(&n2.silu()?)?)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(&spatial(&a0)?)?,
            None => a0,
        };
        // Down blocks' resnets have output scale 1.
        let (n3, attn_norm) = self.attn_norm.forward_cached(&(skip + a2)?, &blocks)?;
        let z = self.proj_in.forward(&spatial(&n3)?)?;
        // LN1 runs on the phone, over each token's channels.
        let (features, ln1) = self.ln1.forward_cached(&z, std::slice::from_ref(&all))?;
        Ok(Trace {
            features,
            n1,
            n2,
            blocks,
            caches: [norm1, norm2, attn_norm, ln1],
        })
    }

    /// Models `ppidm` with the paper's GroupNorm (`GnVariant::Paper`) over `servers` servers:
    /// every GroupNorm normalises each server's row block with that block's own statistics.
    pub fn with_paper_group_norm(mut self, servers: usize) -> Self {
        self.paper_group_norm = Some(servers.max(1));
        self
    }

    /// The features channels-first: `x` [B, 4, H, W] → [B, C, H·W].
    pub fn features_channels_first(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.trace(x)?.features)
    }

    /// `scale · ‖F(x) − target‖²` (`target` [B, C, H·W], channels-first) and its gradient with
    /// respect to `x` [B, 4, H, W], by a hand-written reverse pass: the transposed
    /// convolutions and the norms' backward formulas (checked against candle's autograd in
    /// the tests; about twice as fast here).
    pub fn loss_and_gradient(
        &self,
        x: &Tensor,
        target: &Tensor,
        scale: f64,
    ) -> Result<(f64, Tensor)> {
        let (b, _, h, w) = x.dims4()?;
        let spatial = |t: &Tensor| -> Result<Tensor> { Ok(t.reshape((b, t.dim(1)?, h, w))?) };
        let tr = self.trace(x)?;
        let [norm1, norm2, attn_norm, ln1] = &tr.caches;
        let d = (&tr.features - target)?;
        let loss = f64::from(d.sqr()?.sum_all()?.to_scalar::<f32>()?) * scale;
        let blocks = &tr.blocks;
        let all = 0..h * w;
        let dz = self
            .ln1
            .backward(&(d * (2.0 * scale))?, std::slice::from_ref(&all), ln1)?;
        let dn3 = self.proj_in.backward(&spatial(&dz)?)?;
        let dh = self.attn_norm.backward(&dn3, blocks, attn_norm)?;
        let ds2 = self.conv2.backward(&spatial(&dh)?)?;
        let da1 = self
            .norm2
            .backward(&(ds2 * silu_grad(&tr.n2)?)?, blocks, norm2)?;
        let ds1 = self.conv1.backward(&spatial(&da1)?)?;
        let da0 = self
            .norm1
            .backward(&(ds1 * silu_grad(&tr.n1)?)?, blocks, norm1)?;
        let da0 = match &self.shortcut {
            Some(s) => (da0 + s.backward(&spatial(&dh)?)?)?,
            None => (da0 + dh)?,
        };
        let dx = self.conv_in.backward(&spatial(&da0)?)?;
        Ok((loss, dx.reshape(x.dims())?))
    }

    /// The features as the block reads them: `x` [B, 4, H, W] → [B, H·W, C].
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self
            .features_channels_first(x)?
            .transpose(1, 2)?
            .contiguous()?)
    }
}

/// The first transformer block's self-attention input `LN1(tokens)` [B, H·W, C] for the U-Net
/// input `x` [B, 4, H, W] at `timestep`, written with differentiable candle ops.
pub fn first_block_features(sd: &StableDiffusion, x: &Tensor, timestep: f64) -> Result<Tensor> {
    FirstBlock::new(sd, timestep)?.features(x)
}

/// A recovered latent.
#[derive(Debug, Clone)]
pub struct Inversion {
    /// The estimate of `x_t` [4, H, W] (the known rows exactly as given).
    pub latent: Tensor,
    /// `‖first_block_features(latent) − F‖ / ‖F‖`.
    pub residual: f64,
    /// Adam steps taken, over all attempts (an attempt stops early once the residual falls
    /// below `Schedule::tolerance`).
    pub iterations: usize,
    /// Starts tried (1 unless an attempt ended in a local minimum; see `Schedule::restarts`).
    pub attempts: usize,
}

/// Seed of the starting perturbation (`Schedule::jitter`).
const JITTER_SEED: u64 = 0x5EED;

/// Adam's settings for `invert_latent_with`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Learning rate of the first step; it decays along a cosine to `lr * final_fraction`.
    pub lr: f64,
    pub final_fraction: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Stop once the relative feature residual is below this.
    pub tolerance: f64,
    /// Standard deviation of a fixed (seeded) Gaussian perturbation added to the starting
    /// latent on the unknown rows. An exactly constant region (a zero prior) makes every
    /// GroupNorm over it see zero variance, where the gradient carries no direction; a little
    /// noise breaks that tie.
    pub jitter: f64,
    /// Start again from another perturbation when an attempt ends above this residual (a
    /// local minimum: a wrong fit leaves a residual of order 0.1–1)…
    pub restart_above: f64,
    /// … at most this many times.
    pub restarts: usize,
    /// Gradients by candle's autograd instead of the hand-written reverse pass (slower; the
    /// same numbers up to rounding).
    pub autograd: bool,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            lr: 0.3,
            final_fraction: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-12,
            tolerance: 1e-5,
            jitter: 0.1,
            restart_above: 1e-3,
            restarts: 1,
            autograd: false,
        }
    }
}

impl Schedule {
    fn lr_at(&self, step: usize, total: usize) -> f64 {
        let progress = step as f64 / total.max(1) as f64;
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.final_fraction + (1.0 - self.final_fraction) * cos)
    }
}

/// Recovers `x_t` [4, H, W] from the first transformer block's features `features`
/// [H·W, C] (one batch row, e.g. from `attacker::invert_key_values`): Adam on
/// `‖first_block_features(x) − F‖² / ‖F‖²` over the rows outside `known_rows`, which are
/// fixed to `known` [4, rows, W]; the other rows start from `init` [4, H, W] (zeros do).
/// `iterations` is the budget per start (the learning rate decays over it); an attempt stops
/// at a relative residual of 1e-5 — 220–550 steps on the tiny model, so 1000 is ample.
/// Exact GroupNorm (`ppidm`'s default); see `invert_latent_with` for the paper's variant.
pub fn invert_latent(
    sd: &StableDiffusion,
    features: &Tensor,
    timestep: f64,
    known_rows: Range<usize>,
    known: &Tensor,
    init: &Tensor,
    iterations: usize,
) -> Result<Inversion> {
    let block = FirstBlock::new(sd, timestep)?;
    let schedule = Schedule::default();
    let start = Start::new(features, known_rows, known, init)?;
    invert_with(&block, &start, iterations, &schedule)
}

/// `invert_latent` with a prepared `FirstBlock` (reuse it across many inversions at one
/// timestep; `with_paper_group_norm` for the paper's GroupNorm) and an explicit schedule.
pub fn invert_latent_with(
    block: &FirstBlock,
    features: &Tensor,
    known_rows: Range<usize>,
    known: &Tensor,
    init: &Tensor,
    iterations: usize,
    schedule: &Schedule,
) -> Result<Inversion> {
    let start = Start::new(features, known_rows, known, init)?;
    invert_with(block, &start, iterations, schedule)
}

/// The problem, checked and laid out: the target channels-first, the starting latent with the
/// known rows in place, and the mask of the rows to optimise.
struct Start {
    /// [1, C, H·W].
    target: Tensor,
    target_norm2: f64,
    /// [1, 4, H, W].
    x0: Tensor,
    /// [1, 4, H, W]: 1 on unknown rows, 0 on known ones.
    free: Tensor,
}

impl Start {
    fn new(
        features: &Tensor,
        known_rows: Range<usize>,
        known: &Tensor,
        init: &Tensor,
    ) -> Result<Self> {
        let (c, h, w) = init.dims3()?;
        let (tokens, _) = features.dims2()?;
        if tokens != h * w {
            return Err(setup(format!(
                "features have {tokens} tokens, the latent {h}×{w}"
            )));
        }
        let bad_range = known_rows.start > known_rows.end || known_rows.end > h;
        if bad_range || known.dims() != [c, known_rows.len(), w] {
            return Err(setup(format!(
                "known rows {known_rows:?} with values {:?} for a latent {c}×{h}×{w}",
                known.dims()
            )));
        }
        let device = init.device();
        let free: Vec<f32> = (0..c * h * w)
            .map(|i| f32::from(u8::from(!known_rows.contains(&((i / w) % h)))))
            .collect();
        let free = Tensor::from_vec(free, (c, h, w), device)?;
        let known =
            known
                .to_dtype(DType::F32)?
                .pad_with_zeros(1, known_rows.start, h - known_rows.end)?;
        let x0 = (init.to_dtype(DType::F32)? * &free)?.add(&known)?;
        let target = features
            .to_dtype(DType::F32)?
            .t()?
            .contiguous()?
            .unsqueeze(0)?;
        let target_norm2 = f64::from(target.sqr()?.sum_all()?.to_scalar::<f32>()?);
        if target_norm2 <= 0.0 {
            return Err(setup("all-zero features"));
        }
        Ok(Self {
            target,
            target_norm2,
            x0: x0.unsqueeze(0)?,
            free: free.unsqueeze(0)?,
        })
    }

    /// `‖F(x) − target‖² / ‖target‖²` and its gradient with respect to `x`.
    fn loss_and_gradient(
        &self,
        block: &FirstBlock,
        x: &Tensor,
        autograd: bool,
    ) -> Result<(f64, Tensor)> {
        let scale = 1.0 / self.target_norm2;
        if !autograd {
            return block.loss_and_gradient(x, &self.target, scale);
        }
        let var = Var::from_tensor(x)?;
        let d = (block.features_channels_first(var.as_tensor())? - &self.target)?;
        let loss = (d.sqr()?.sum_all()? * scale)?;
        let grads = loss.backward()?;
        let g = grads
            .get(var.as_tensor())
            .ok_or_else(|| setup("no gradient reached the latent"))?;
        Ok((f64::from(loss.to_scalar::<f32>()?), g.clone()))
    }
}

/// Adam from `start` perturbed by `Schedule::jitter` (seeded by `attempt`), and, while the
/// residual stays above `Schedule::restart_above`, again from other perturbations (up to
/// `Schedule::restarts` more): the best attempt, with the steps of all.
fn invert_with(
    block: &FirstBlock,
    start: &Start,
    iterations: usize,
    s: &Schedule,
) -> Result<Inversion> {
    let mut best: Option<Inversion> = None;
    let (mut steps, mut attempts) = (0, 0);
    for attempt in 0..=s.restarts as u64 {
        attempts += 1;
        let noise = seeded_normal(JITTER_SEED + attempt, start.x0.dims(), start.x0.device())?;
        let x = (&start.x0 + ((noise * s.jitter)? * &start.free)?)?;
        let inv = adam(block, start, x, iterations, s)?;
        steps += inv.iterations;
        let done = inv.residual <= s.restart_above;
        if best.as_ref().is_none_or(|b| inv.residual < b.residual) {
            best = Some(inv);
        }
        if done {
            break;
        }
    }
    let best = best.ok_or_else(|| setup("no attempt ran"))?;
    Ok(Inversion {
        iterations: steps,
        attempts,
        ..best
    })
}

/// One Adam run from `x` [1, 4, H, W] with the gradient masked to the unknown rows.
fn adam(
    block: &FirstBlock,
    start: &Start,
    mut x: Tensor,
    iterations: usize,
    s: &Schedule,
) -> Result<Inversion> {
    let mut m = x.zeros_like()?;
    let mut v = x.zeros_like()?;
    let mut steps = 0;
    let mut residual = f64::INFINITY;
    while steps < iterations {
        let (loss, g) = start.loss_and_gradient(block, &x, s.autograd)?;
        residual = loss.sqrt();
        if residual < s.tolerance {
            break;
        }
        let g = (g * &start.free)?;
        steps += 1;
        m = ((m * s.beta1)? + (&g * (1.0 - s.beta1))?)?;
        v = ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
        let m_hat = (&m / (1.0 - s.beta1.powi(steps as i32)))?;
        let v_hat = (&v / (1.0 - s.beta2.powi(steps as i32)))?;
        let step = (m_hat / (v_hat.sqrt()? + s.eps)?)?;
        x = (x - (step * s.lr_at(steps - 1, iterations))?)?;
    }
    if steps == iterations {
        let d = (block.features_channels_first(&x)? - &start.target)?;
        let loss = f64::from(d.sqr()?.sum_all()?.to_scalar::<f32>()?) / start.target_norm2;
        residual = loss.sqrt();
    }
    Ok(Inversion {
        latent: x.squeeze(0)?,
        residual,
        iterations: steps,
        attempts: 1,
    })
}

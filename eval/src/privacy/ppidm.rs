//! The attacks on a `ppidm` server, which receives every transformer block's self-attention
//! keys and values for the whole map and the cross-attention keys and values of the prompt:
//! - the first block's keys and values give its input features exactly (least squares); the
//!   latent x_t is recovered from them by optimisation through the public weights with the
//!   server's own rows fixed (`invert_latent`);
//! - the cross-attention keys and values give the prompt's text states (least squares), and
//!   the prompt itself by greedy token-by-token inversion over the vocabulary
//!   (`invert_text`);
//! - the attacker then finishes the picture itself: one U-Net call on the recovered x_t with
//!   the recovered text states predicts the noise, hence the clean latent.
//!
//! Also here: the latent's per-channel means from the first GroupNorm's moments (the closed
//! form `strict`'s moments allow).

use candle_core::{DType, Device, Tensor};
use nalgebra::DMatrix;
use veil_core::client::pipeline::StableDiffusion;
use veil_core::placement::runtime::Runtime;
use veil_core::placement::{Policy, ViewKind, WireDtype};

use crate::attacker::{public_tensor, AttackError, Result};
use crate::invert_latent::invert_latent;
use crate::invert_text::{invert_prompt, text_states_from_kv};
use crate::linalg::solve_rows;

use super::calls::{decode, Item, ServerSight};
use super::cross::FIRST_BLOCK;
use super::Shared;

/// The cross-attention whose keys and values the prompt attack reads (64 channels: keys alone
/// pin the 64-wide text states down).
pub const TEXT_LAYER: &str = "mid_block.attentions.0.transformer_blocks.0.attn2";
/// Adam iterations of the latent inversion.
const INVERSION_STEPS: usize = 1000;

/// What the `ppidm` attacks recovered of one picture.
pub struct PpidmGuess {
    pub picture: Option<crate::metrics::Picture>,
    pub caption: Option<String>,
}

fn matrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let (r, c) = t.dims2()?;
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(DMatrix::from_fn(r, c, |i, j| v[i * c + j] as f64))
}

/// The first block's self-attention input features [H·W, C] from its keys and values.
fn first_features(sd: &StableDiffusion, sight: &ServerSight) -> Result<Option<Tensor>> {
    let kv: Vec<&Vec<f32>> = sight
        .all(ViewKind::KeyValue)
        .filter(|v| v.view.layer.starts_with(FIRST_BLOCK))
        .filter_map(|v| v.cond.as_ref().or(v.uncond.as_ref()))
        .take(2)
        .collect();
    let [k, v] = kv.as_slice() else {
        return Ok(None);
    };
    let wk = matrix(&public_tensor(
        sd,
        &format!("{FIRST_BLOCK}.attn1.to_k.weight"),
    )?)?;
    let wv = matrix(&public_tensor(
        sd,
        &format!("{FIRST_BLOCK}.attn1.to_v.weight"),
    )?)?;
    let (dk, c) = wk.shape();
    let tokens = k.len() / dk;
    let a = DMatrix::from_fn(c, 2 * dk, |r, o| match o < dk {
        true => wk[(o, r)],
        false => wv[(o - dk, r)],
    });
    let b = DMatrix::from_fn(tokens, 2 * dk, |t, o| match o < dk {
        true => k[t * dk + o] as f64,
        false => v[t * dk + o - dk] as f64,
    });
    let (x, _) = solve_rows(&a, &b)?;
    let flat: Vec<f32> = (0..tokens)
        .flat_map(|t| (0..c).map(move |ch| (t, ch)))
        .map(|(t, ch)| x[(t, ch)] as f32)
        .collect();
    Ok(Some(Tensor::from_vec(flat, (tokens, c), &Device::Cpu)?))
}

/// The prompt's text states [1, 77, D] from the cross-attention keys and values.
fn text_states(sd: &StableDiffusion, sight: &ServerSight) -> Result<Option<Tensor>> {
    let kv: Vec<&Vec<f32>> = sight
        .all(ViewKind::TextKeyValue)
        .filter(|v| v.view.layer.starts_with(TEXT_LAYER))
        .filter_map(|v| v.cond.as_ref())
        .take(2)
        .collect();
    let Some(k) = kv.first() else {
        return Ok(None);
    };
    let tokens = sd.text_encoder.config.max_position_embeddings;
    let (s, _) = text_states_from_kv(sd, TEXT_LAYER, k, kv.get(1).map(|v| v.as_slice()), tokens)?;
    let d = s.len() / tokens;
    Ok(Some(Tensor::from_vec(s, (1, tokens, d), &Device::Cpu)?))
}

/// Every `ppidm` attack on one server's sight of one picture.
pub fn attack(shared: &Shared<'_>, item: &Item, sight: &ServerSight) -> Result<PpidmGuess> {
    let sd = shared.sd;
    let states = text_states(sd, sight)?;
    let caption = match &states {
        Some(s) => Some(shared.prompt_inversion(&item.caption, s)?),
        None => None,
    };
    let picture = match (first_features(sd, sight)?, &states) {
        (Some(f), Some(s)) => Some(finish(shared, item, sight, &f, s)?),
        _ => None,
    };
    Ok(PpidmGuess { picture, caption })
}

impl Shared<'_> {
    /// The greedy inversion of a prompt's text states, once per caption (every `ppidm`
    /// server receives the same keys and values of it).
    fn prompt_inversion(&self, caption: &str, states: &Tensor) -> Result<String> {
        if let Some(c) = self.inverted_prompts.borrow().get(caption) {
            return Ok(c.clone());
        }
        let tokens = states.dim(1)?;
        let flat = states.flatten_all()?.to_vec1::<f32>()?;
        let guess = invert_prompt(self.sd, &self.vocabulary, &flat, tokens)?;
        let text = guess.text.trim().to_string();
        self.inverted_prompts
            .borrow_mut()
            .insert(caption.to_string(), text.clone());
        Ok(text)
    }
}

/// x_t inverted from the features (own rows fixed), the noise predicted with the recovered
/// text states, the clean latent, decoded.
fn finish(
    shared: &Shared<'_>,
    item: &Item,
    sight: &ServerSight,
    features: &Tensor,
    states: &Tensor,
) -> Result<crate::metrics::Picture> {
    let sd = shared.sd;
    let (c, h, w) = item.latent;
    let (lat, rows) = sight.latent_rows();
    let first = rows.iter().position(|&r| r).unwrap_or(0);
    let last = rows.iter().rposition(|&r| r).map_or(first, |l| l + 1);
    let all = Tensor::from_vec(lat, (c, h, w), &Device::Cpu)?;
    let known = all.narrow(1, first, last - first)?;
    let init = Tensor::zeros((c, h, w), DType::F32, &Device::Cpu)?;
    let xt = match last - first == h {
        true => all,
        false => {
            invert_latent(
                sd,
                features,
                item.t as f64,
                first..last,
                &known,
                &init,
                INVERSION_STEPS,
            )?
            .latent
        }
    };
    let x = xt.reshape((1, c, h, w))?;
    let mut rt = Runtime::new(
        &sd.unet_engine,
        Policy::Local.placement(),
        &[],
        WireDtype::F32,
    )?;
    let eps = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| AttackError::Setup(e.to_string()))?
        .block_on(sd.unet.forward(&mut rt, &x, item.t as f64, states))?;
    let a = super::server::item_alpha(shared, item)? as f64;
    let x0 = ((x - (eps * (1.0 - a * a).sqrt())?)? / a)?;
    decode(sd, &x0.flatten_all()?.to_vec1::<f32>()?)
}

/// The latent's per-channel means from the moments [G, 2] of GroupNorm on conv_in's output
/// (one group per channel): mean(conv_in(x))_c ≈ Σ_k (Σ kernel W_ck) mean(x)_k + b_c, borders
/// ignored; least squares over the output channels.
pub fn latent_means_from_conv_in(sd: &StableDiffusion, stats: &[f32]) -> Result<Option<Vec<f32>>> {
    let wt = public_tensor(sd, "conv_in.weight")?;
    let bias = public_tensor(sd, "conv_in.bias")?.to_vec1::<f32>()?;
    let (o, i, _, _) = wt.dims4()?;
    if stats.len() != 2 * o {
        return Ok(None);
    }
    let wsum = matrix(&wt.sum((2, 3))?)?;
    let a = DMatrix::from_fn(i, o, |k, c| wsum[(c, k)]);
    let b = DMatrix::from_fn(1, o, |_, c| stats[2 * c] as f64 - bias[c] as f64);
    let (x, _) = solve_rows(&a, &b)?;
    Ok(Some((0..i).map(|k| x[(0, k)] as f32).collect()))
}

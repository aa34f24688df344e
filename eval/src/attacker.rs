//! The white-box attacker's shared primitives: its error type, the public weights it reads, the
//! K/V least-squares inversion. The attacks themselves live in `privacy` (one attacker per
//! shard server), `invert_latent`, `invert_text` and `obf_prior`.

use candle_core::{DType, Tensor};
use veil_core::client::pipeline::StableDiffusion;
use veil_core::placement::{View, ViewKind};

use crate::linalg::{solve_rows, LinalgError};
use crate::metrics::MetricError;

/// What an attack can fail on.
#[derive(Debug, thiserror::Error)]
pub enum AttackError {
    #[error(transparent)]
    Model(#[from] veil_core::Error),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Linalg(#[from] LinalgError),
    #[error(transparent)]
    Metric(#[from] MetricError),
    #[error("{0}")]
    Setup(String),
}

pub type Result<T> = std::result::Result<T, AttackError>;

/// One tensor a server received: its view and its values.
#[derive(Debug, Clone)]
pub struct Seen {
    pub view: View,
    pub dims: Vec<usize>,
    pub data: Vec<f32>,
}

impl Seen {
    pub fn new(view: View, t: &Tensor) -> Result<Self> {
        Ok(Self {
            view,
            dims: t.dims().to_vec(),
            data: t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        })
    }

    /// The last batch element (the conditional half under classifier-free guidance).
    fn last_batch(&self) -> &[f32] {
        let b = self.dims.first().copied().unwrap_or(1).max(1);
        let per = self.data.len() / b;
        &self.data[(b - 1) * per..]
    }
}

/// The U-Net input rows a server received at `conv_in` (`latent` = (C, H, W)): the values of
/// the last batch element, zero elsewhere, and which rows were seen.
pub fn latent_rows(seen: &[Seen], latent: (usize, usize, usize)) -> (Vec<f32>, Vec<bool>) {
    let (c, h, w) = latent;
    let mut values = vec![0f32; c * h * w];
    let mut rows = vec![false; h];
    for s in seen.iter().filter(|s| {
        s.view.layer == "conv_in"
            && matches!(s.view.kind, ViewKind::Latent | ViewKind::Block)
            && s.view.resolution == Some((h, w))
    }) {
        let Some(r) = s.view.rows.clone() else {
            continue;
        };
        if s.dims.len() != 4 || s.dims[1] != c || s.dims[2] != r.len() || s.dims[3] != w {
            continue;
        }
        let part = s.last_batch();
        for ch in 0..c {
            for (i, y) in r.clone().enumerate() {
                let src = &part[(ch * r.len() + i) * w..(ch * r.len() + i + 1) * w];
                values[(ch * h + y) * w..(ch * h + y + 1) * w].copy_from_slice(src);
                rows[y] = true;
            }
        }
    }
    (values, rows)
}

/// Self-attention keys and values a server received for one layer.
#[derive(Debug, Clone)]
pub struct KeyValues<'a> {
    pub layer: String,
    pub resolution: (usize, usize),
    pub k: &'a Seen,
    pub v: Option<&'a Seen>,
}

/// Every self-attention layer whose keys (and values) the server received, in send order.
pub fn key_values(seen: &[Seen]) -> Vec<KeyValues<'_>> {
    let mut out: Vec<KeyValues<'_>> = Vec::new();
    for s in seen.iter().filter(|s| s.view.kind == ViewKind::KeyValue) {
        let Some(res) = s.view.resolution else {
            continue;
        };
        match out.last_mut() {
            Some(kv) if kv.layer == s.view.layer && kv.v.is_none() => kv.v = Some(s),
            _ => out.push(KeyValues {
                layer: s.view.layer.clone(),
                resolution: res,
                k: s,
                v: None,
            }),
        }
    }
    out
}

/// A public U-Net weight (the attacker holds the model), in f32.
pub fn public_tensor(sd: &StableDiffusion, name: &str) -> Result<Tensor> {
    Ok(sd
        .unet_engine
        .weights()
        .get(name)
        .ok_or_else(|| AttackError::Setup(format!("public weight {name} not found")))?
        .to_dtype(DType::F32)?)
}

/// A public 2-D weight as f64, `[rows, cols]` as stored (diffusers: `[out, in]`).
pub fn public_weight(sd: &StableDiffusion, name: &str) -> Result<nalgebra::DMatrix<f64>> {
    let t = public_tensor(sd, name)?;
    let (o, i) = t.dims2()?;
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(nalgebra::DMatrix::from_fn(o, i, |r, c| v[r * i + c] as f64))
}

/// Solves `[K V] = LN(h) · [W_kᵀ W_vᵀ]` for the normalised features of the last batch
/// element: `[tokens, channels]` row-major, and the relative residual of the fit.
pub fn invert_key_values(
    sd: &StableDiffusion,
    kv: &KeyValues<'_>,
) -> Result<(Vec<f32>, usize, f64)> {
    let wk = public_weight(sd, &format!("{}.to_k.weight", kv.layer))?;
    let (dk, c) = wk.shape();
    let mut blocks = vec![(wk, kv.k)];
    if let Some(v) = kv.v {
        blocks.push((public_weight(sd, &format!("{}.to_v.weight", kv.layer))?, v));
    }
    let tokens = kv.resolution.0 * kv.resolution.1;
    let m = dk * blocks.len();
    // A = [W_kᵀ W_vᵀ] (c × m), B = [K V] (tokens × m).
    let mut a = nalgebra::DMatrix::<f64>::zeros(c, m);
    let mut b = nalgebra::DMatrix::<f64>::zeros(tokens, m);
    for (j, (w, s)) in blocks.iter().enumerate() {
        let part = s.last_batch();
        if part.len() != tokens * dk {
            return Err(AttackError::Setup(format!(
                "{}: {} values, expected {tokens}×{dk}",
                kv.layer,
                part.len()
            )));
        }
        for r in 0..c {
            for o in 0..dk {
                a[(r, j * dk + o)] = w[(o, r)];
            }
        }
        for t in 0..tokens {
            for o in 0..dk {
                b[(t, j * dk + o)] = part[t * dk + o] as f64;
            }
        }
    }
    let (x, residual) = solve_rows(&a, &b)?;
    let features = (0..tokens)
        .flat_map(|t| (0..c).map(move |ch| (t, ch)))
        .map(|(t, ch)| x[(t, ch)] as f32)
        .collect();
    Ok((features, c, residual))
}

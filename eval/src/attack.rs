//! The attack suite: one white-box attacker per shard server. It knows the public weights, the
//! scheduler and the code, and everything its server received (the tensors the view audit
//! describes, captured at the last denoising step). Four attacks:
//!
//! - **strip decode**: the U-Net input rows it received (at the last step ≈ the final latent)
//!   are placed into the mean latent of other generations and VAE-decoded;
//! - **K/V inversion**: where self-attention keys or values arrive, `K = LN(h)·W_kᵀ` and
//!   `V = LN(h)·W_vᵀ` are solved for the normalised features `LN(h)` by least squares, then a
//!   per-position ridge probe (trained on other generations) maps them to the final latent;
//! - **linear probe**: ridge regression from the server's whole view to the final latent,
//!   trained on other generations (dual form, regularisation by leave-one-out);
//! - **prompt recovery**: where text-indexed tensors (cross-attention keys) arrive, the nearest
//!   caption of a pool, by the keys each candidate would produce.
//!
//! Every reconstruction is scored against the true final image (PSNR/SSIM), over all rows and
//! over the rows outside the server's own strip.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use veil_core::client::pipeline::{GenerateOptions, StableDiffusion};
use veil_core::placement::{Policy, View, ViewKind};

use crate::dataset::Dataset;
use crate::linalg::{solve_rows, LinalgError, Ridge};
use crate::metrics::{mean_picture, psnr, ssim, MetricError, Picture};

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

/// The strip-decode estimate of the final latent: rows seen, the prior elsewhere.
pub fn fill_rows(seen: &[f32], rows: &[bool], prior: &[f32], c: usize, w: usize) -> Vec<f32> {
    let h = rows.len();
    let mut out = prior.to_vec();
    for ch in 0..c {
        for (y, _) in rows.iter().enumerate().filter(|(_, &r)| r) {
            let at = (ch * h + y) * w;
            out[at..at + w].copy_from_slice(&seen[at..at + w]);
        }
    }
    out
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

/// The first cross-attention keys a server received (text-indexed): (layer, keys of the last
/// batch element [tokens × dk]).
pub fn text_keys(seen: &[Seen]) -> Option<(String, Vec<f32>)> {
    seen.iter()
        .find(|s| s.view.kind == ViewKind::TextKeyValue)
        .map(|s| (s.view.layer.clone(), s.last_batch().to_vec()))
}

/// The keys `layer`'s `to_k` would produce from `prompt` (what the attacker compares with).
pub fn candidate_keys(sd: &StableDiffusion, layer: &str, prompt: &str) -> Result<Vec<f32>> {
    let states = sd.encode_prompt(prompt)?.squeeze(0)?;
    let name = format!("{layer}.to_k.weight");
    let w = sd
        .unet_engine
        .weights()
        .get(&name)
        .ok_or_else(|| AttackError::Setup(format!("public weight {name} not found")))?;
    Ok(states.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?)
}

/// What one run of the suite is.
#[derive(Debug, Clone)]
pub struct AttackConfig {
    pub policy: Policy,
    pub servers: usize,
    /// Generations the attacker trains its probes on (training captions).
    pub train: usize,
    /// Generations attacked (held-out captions).
    pub test: usize,
    pub steps: usize,
    pub guidance: f64,
    /// Picture side in pixels.
    pub side: usize,
    /// Dataset seed for the captions.
    pub seed: u64,
    /// Extra training captions in the prompt-recovery pool (besides the attacked ones).
    pub pool_extra: usize,
}

/// PSNR/SSIM means over the attacked generations.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Fidelity {
    pub psnr: f64,
    pub ssim: f64,
    /// Over the rows outside the server's own strip (None where the strip is everything).
    pub psnr_outside: Option<f64>,
    pub ssim_outside: Option<f64>,
}

/// One server's attack results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerAttack {
    pub server: usize,
    /// Its strip at the latent resolution, half-open rows.
    pub strip: [usize; 2],
    /// Latent rows it received at the last step.
    pub latent_rows_seen: usize,
    pub strip_decode: Fidelity,
    /// None where no self-attention key/value arrived.
    pub kv_inversion: Option<Fidelity>,
    /// Largest relative residual of the K/V least-squares fits (≈0: the features are exactly
    /// determined).
    pub kv_residual: Option<f64>,
    /// Self-attention layers whose keys/values arrived at the last step.
    pub kv_layers: usize,
    pub linear_probe: Fidelity,
    /// Dimension of the flattened view the probe reads.
    pub view_values: usize,
    /// Fraction of attacked prompts recovered exactly; None where no text-indexed tensor
    /// arrived (the attacker can only guess: 1 / pool).
    pub prompt_recovery: Option<f64>,
}

/// A run's report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttackReport {
    pub policy: String,
    pub servers: usize,
    pub train: usize,
    pub test: usize,
    pub steps: usize,
    pub prompt_pool: usize,
    /// Baseline "fully on device": the attacker's best guess is the dataset mean picture.
    pub device_baseline: Fidelity,
    pub per_server: Vec<ServerAttack>,
    /// Picture examples for a grid: (truth, strip decode, K/V, probe) of the first attacked
    /// generations, per server.
    #[serde(skip)]
    pub examples: Vec<Vec<[Option<Picture>; 4]>>,
    #[serde(skip)]
    pub truths: Vec<Picture>,
}

/// What the attacker keeps from one generation for one server.
struct ServerRecord {
    latent_rows: Vec<f32>,
    rows_seen: Vec<bool>,
    kv_features: Option<Vec<f32>>,
    kv_channels: usize,
    kv_residual: f64,
    kv_layers: usize,
    view: Vec<f32>,
    text: Option<(String, Vec<f32>)>,
}

struct Record {
    caption: String,
    latent: Vec<f32>,
    picture: Picture,
    servers: Vec<ServerRecord>,
}

fn picture_of(t: &Tensor) -> Result<Picture> {
    let (_, h, w) = t.dims3()?;
    Ok(Picture::new(h, w, t.flatten_all()?.to_vec1::<f32>()?)?)
}

fn decode(sd: &StableDiffusion, latent: &[f32], dims: (usize, usize, usize)) -> Result<Picture> {
    let t = Tensor::from_vec(latent.to_vec(), (1, dims.0, dims.1, dims.2), &sd.device)?;
    picture_of(&sd.decode(&t)?)
}

fn score(truth: &Picture, guess: &Picture, outside: &[bool]) -> Result<[Option<f64>; 4]> {
    Ok([
        psnr(truth, guess, None)?,
        ssim(truth, guess, None)?,
        psnr(truth, guess, Some(outside))?,
        ssim(truth, guess, Some(outside))?,
    ])
}

fn mean_fidelity(scores: &[[Option<f64>; 4]]) -> Fidelity {
    let mean = |i: usize| {
        let v: Vec<f64> = scores.iter().filter_map(|s| s[i]).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    Fidelity {
        psnr: mean(0).unwrap_or(f64::NAN),
        ssim: mean(1).unwrap_or(f64::NAN),
        psnr_outside: mean(2),
        ssim_outside: mean(3),
    }
}

/// Runs `cfg.train + cfg.test` generations under the policy (in-process servers, captured at
/// the last step), then every attack for every server. `progress(done, total)` after each
/// generation.
pub fn run(
    sd: &StableDiffusion,
    cfg: &AttackConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<AttackReport> {
    check_config(cfg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| AttackError::Setup(e.to_string()))?;
    let (lh, lw) = sd.latent_size(cfg.side, cfg.side)?;
    let dims = (sd.unet.config.in_channels, lh, lw);
    let data = Dataset::new(cfg.seed, cfg.side);
    let (records, strips) = generate_records(sd, cfg, &rt, &data, dims, progress)?;
    let (train, test) = records.split_at(cfg.train);
    let train_latents: Vec<Vec<f32>> = train.iter().map(|r| r.latent.clone()).collect();
    let n = train_latents.len() as f32;
    let prior: Vec<f32> = (0..train_latents[0].len())
        .map(|j| train_latents.iter().map(|l| l[j]).sum::<f32>() / n)
        .collect();
    let train_pictures: Vec<Picture> = train.iter().map(|r| r.picture.clone()).collect();
    let mean = mean_picture(&train_pictures)
        .ok_or_else(|| AttackError::Setup("no training pictures".into()))?;
    let everywhere = vec![true; cfg.side];
    let device_scores: Vec<_> = test
        .iter()
        .map(|r| score(&r.picture, &mean, &everywhere))
        .collect::<Result<_>>()?;
    let pool = prompt_pool(&data, test, cfg.pool_extra);
    let attacker = Attacker {
        sd,
        dims,
        train,
        test,
        train_latents,
        prior,
        examples_wanted: test.len().min(4),
        pool,
        pool_keys: BTreeMap::new(),
    };
    attacker.finish(cfg, &strips, mean_fidelity(&device_scores))
}

/// Refuses configurations the attacks cannot run on (no shard servers, too few generations).
fn check_config(cfg: &AttackConfig) -> Result<()> {
    if !cfg.policy.needs_backends() || cfg.servers == 0 {
        return Err(AttackError::Setup(
            "attacks need a policy with shard servers".into(),
        ));
    }
    if cfg.train < 2 || cfg.test == 0 || cfg.steps == 0 {
        return Err(AttackError::Setup(
            "need at least 2 training and 1 attacked generation".into(),
        ));
    }
    Ok(())
}

/// Runs the training then the attacked generations, keeping what each server saw; also the
/// servers' strips at the latent resolution (as last reported by the audit).
fn generate_records(
    sd: &StableDiffusion,
    cfg: &AttackConfig,
    rt: &tokio::runtime::Runtime,
    data: &Dataset,
    dims: (usize, usize, usize),
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<Record>, Vec<[usize; 2]>)> {
    let (_, lh, lw) = dims;
    let total = cfg.train + cfg.test;
    let backends = sd.in_process_backends(cfg.servers);
    let mut records = Vec::with_capacity(total);
    let mut strips: Vec<[usize; 2]> = vec![[0, lh]; cfg.servers];
    for i in 0..total {
        let caption = if i < cfg.train {
            data.sample(i as u64).1
        } else {
            data.held_out((i - cfg.train) as u64).1
        };
        let opts = GenerateOptions {
            prompt: caption.clone(),
            steps: cfg.steps,
            guidance: cfg.guidance,
            seed: 1000 + i as u64,
            width: cfg.side,
            height: cfg.side,
            policy: cfg.policy,
            capture_from_step: Some(cfg.steps - 1),
            ..Default::default()
        };
        let g = rt.block_on(sd.generate(&opts, &backends, &mut |_| {}))?;
        for (s, strip) in strips.iter_mut().enumerate() {
            if let Some(r) = g.audit.strips.get(s).and_then(|m| m.get(&(lh, lw))) {
                *strip = [r.start, r.end];
            }
        }
        let mut per_server: Vec<Vec<Seen>> = vec![Vec::new(); cfg.servers];
        for (view, t) in &g.captured {
            if let Some(list) = per_server.get_mut(view.server) {
                list.push(Seen::new(view.clone(), t)?);
            }
        }
        let servers = per_server
            .iter()
            .map(|seen| server_record(sd, seen, dims))
            .collect::<Result<Vec<_>>>()?;
        records.push(Record {
            caption,
            latent: g.latents.flatten_all()?.to_vec1::<f32>()?,
            picture: picture_of(&g.image)?,
            servers,
        });
        progress(i + 1, total);
    }
    Ok((records, strips))
}

/// What the attacker keeps from one server's view of one generation: the latent rows, the
/// inverted self-attention features, the flattened view and the text keys.
fn server_record(
    sd: &StableDiffusion,
    seen: &[Seen],
    dims: (usize, usize, usize),
) -> Result<ServerRecord> {
    let (_, lh, lw) = dims;
    let (latent_rows, rows_seen) = latent_rows(seen, dims);
    let kvs = key_values(seen);
    let inverted = kvs
        .iter()
        .map(|kv| invert_key_values(sd, kv))
        .collect::<Result<Vec<_>>>()?;
    let kv_residual = inverted.iter().map(|r| r.2).fold(0f64, f64::max);
    // The probe reads the self-attention nearest the output at the latent resolution.
    let (kv_features, kv_channels) = match kvs
        .iter()
        .zip(inverted)
        .rev()
        .find(|(kv, _)| kv.resolution == (lh, lw))
    {
        Some((_, (f, c, _))) => (Some(f), c),
        None => (None, 0),
    };
    Ok(ServerRecord {
        latent_rows,
        rows_seen,
        kv_features,
        kv_channels,
        kv_residual,
        kv_layers: kvs.len(),
        view: seen.iter().flat_map(|s| s.data.iter().copied()).collect(),
        text: text_keys(seen),
    })
}

/// Prompt-recovery pool: the attacked captions and other training captions.
fn prompt_pool(data: &Dataset, test: &[Record], extra: usize) -> Vec<String> {
    let mut pool: Vec<String> = test.iter().map(|r| r.caption.clone()).collect();
    let mut j = 0u64;
    while pool.len() < test.len() + extra {
        let c = data.sample(100_000 + j).1;
        if !pool.contains(&c) {
            pool.push(c);
        }
        j += 1;
    }
    pool
}

/// Everything the per-server attacks share: the model, the generations split into training
/// and attacked ones, the attacker's prior latent, and the prompt pool (with the candidate
/// keys computed so far, per layer, so servers seeing the same layer reuse them).
struct Attacker<'a> {
    sd: &'a StableDiffusion,
    dims: (usize, usize, usize),
    train: &'a [Record],
    test: &'a [Record],
    train_latents: Vec<Vec<f32>>,
    prior: Vec<f32>,
    examples_wanted: usize,
    pool: Vec<String>,
    pool_keys: BTreeMap<String, Vec<Vec<f32>>>,
}

/// A server's example pictures: (truth, strip decode, K/V, probe) per attacked generation.
type Examples = Vec<[Option<Picture>; 4]>;

impl Attacker<'_> {
    /// Runs every attack for every server and assembles the report.
    fn finish(
        mut self,
        cfg: &AttackConfig,
        strips: &[[usize; 2]],
        device_baseline: Fidelity,
    ) -> Result<AttackReport> {
        let mut examples = vec![vec![[None, None, None, None]; self.examples_wanted]; cfg.servers];
        let mut per_server = Vec::with_capacity(cfg.servers);
        for s in 0..cfg.servers {
            per_server.push(self.attack_server(cfg, s, strips[s], &mut examples[s])?);
        }
        Ok(AttackReport {
            policy: cfg.policy.name().to_string(),
            servers: cfg.servers,
            train: cfg.train,
            test: cfg.test,
            steps: cfg.steps,
            prompt_pool: self.pool.len(),
            device_baseline,
            per_server,
            examples,
            truths: self
                .test
                .iter()
                .take(self.examples_wanted)
                .map(|r| r.picture.clone())
                .collect(),
        })
    }

    /// Every attack of server `s` (whose strip is `strip`), scored outside its strip too.
    fn attack_server(
        &mut self,
        cfg: &AttackConfig,
        s: usize,
        strip: [usize; 2],
        examples: &mut Examples,
    ) -> Result<ServerAttack> {
        let f = cfg.side / self.dims.1;
        let outside: Vec<bool> = (0..cfg.side)
            .map(|y| !(strip[0] * f..strip[1] * f).contains(&y))
            .collect();
        let strip_decode = self.strip_decode(s, &outside, examples)?;
        let kv_inversion = self.kv_inversion(s, &outside, examples)?;
        let linear_probe = self.linear_probe(s, &outside, examples)?;
        let prompt_recovery = self.prompt_recovery(s)?;
        let test = self.test;
        let rec0 = &test[0].servers[s];
        Ok(ServerAttack {
            server: s,
            strip,
            latent_rows_seen: rec0.rows_seen.iter().filter(|&&r| r).count(),
            strip_decode,
            kv_inversion,
            kv_residual: (rec0.kv_layers > 0).then(|| {
                test.iter()
                    .map(|r| r.servers[s].kv_residual)
                    .fold(0f64, f64::max)
            }),
            kv_layers: rec0.kv_layers,
            linear_probe,
            view_values: rec0.view.len(),
            prompt_recovery,
        })
    }

    /// Strip decode: the rows the server saw, the training mean latent elsewhere.
    fn strip_decode(
        &self,
        s: usize,
        outside: &[bool],
        examples: &mut Examples,
    ) -> Result<Fidelity> {
        let (lc, _, lw) = self.dims;
        let mut scores = Vec::new();
        for (t, r) in self.test.iter().enumerate() {
            let rec = &r.servers[s];
            let guess = decode(
                self.sd,
                &fill_rows(&rec.latent_rows, &rec.rows_seen, &self.prior, lc, lw),
                self.dims,
            )?;
            scores.push(score(&r.picture, &guess, outside)?);
            if t < self.examples_wanted {
                examples[t][0] = Some(r.picture.clone());
                examples[t][1] = Some(guess);
            }
        }
        Ok(mean_fidelity(&scores))
    }

    /// K/V inversion → per-position probe; None where no self-attention keys/values at the
    /// latent resolution arrived.
    fn kv_inversion(
        &self,
        s: usize,
        outside: &[bool],
        examples: &mut Examples,
    ) -> Result<Option<Fidelity>> {
        if self.train[0].servers[s].kv_features.is_none() {
            return Ok(None);
        }
        let (lc, lh, lw) = self.dims;
        let c = self.train[0].servers[s].kv_channels;
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for r in self.train {
            let Some(feat) = &r.servers[s].kv_features else {
                continue;
            };
            for p in 0..lh * lw {
                xs.push(feat[p * c..(p + 1) * c].to_vec());
                ys.push((0..lc).map(|ch| r.latent[ch * lh * lw + p]).collect());
            }
        }
        let ridge = Ridge::fit(&xs, &ys, Some(1e-4))?;
        let mut scores = Vec::new();
        for (t, r) in self.test.iter().enumerate() {
            let Some(feat) = &r.servers[s].kv_features else {
                continue;
            };
            let mut latent = vec![0f32; lc * lh * lw];
            for p in 0..lh * lw {
                let y = ridge.predict(&feat[p * c..(p + 1) * c])?;
                for ch in 0..lc {
                    latent[ch * lh * lw + p] = y[ch];
                }
            }
            let guess = decode(self.sd, &latent, self.dims)?;
            scores.push(score(&r.picture, &guess, outside)?);
            if t < self.examples_wanted {
                examples[t][2] = Some(guess);
            }
        }
        Ok(Some(mean_fidelity(&scores)))
    }

    /// Linear probe on the server's whole view.
    fn linear_probe(
        &self,
        s: usize,
        outside: &[bool],
        examples: &mut Examples,
    ) -> Result<Fidelity> {
        let xs: Vec<Vec<f32>> = self
            .train
            .iter()
            .map(|r| r.servers[s].view.clone())
            .collect();
        let ridge = Ridge::fit(&xs, &self.train_latents, None)?;
        let mut scores = Vec::new();
        for (t, r) in self.test.iter().enumerate() {
            let guess = decode(self.sd, &ridge.predict(&r.servers[s].view)?, self.dims)?;
            scores.push(score(&r.picture, &guess, outside)?);
            if t < self.examples_wanted {
                examples[t][3] = Some(guess);
            }
        }
        Ok(mean_fidelity(&scores))
    }

    /// Prompt recovery: the pool caption whose keys are nearest the text keys the server
    /// received; None where it received none.
    fn prompt_recovery(&mut self, s: usize) -> Result<Option<f64>> {
        let test = self.test;
        let Some((layer, _)) = &test[0].servers[s].text else {
            return Ok(None);
        };
        let keys = match self.pool_keys.get(layer) {
            Some(k) => k.clone(),
            None => {
                let k = self
                    .pool
                    .iter()
                    .map(|c| candidate_keys(self.sd, layer, c))
                    .collect::<Result<Vec<_>>>()?;
                self.pool_keys.insert(layer.clone(), k.clone());
                k
            }
        };
        let mut hits = 0usize;
        for r in test {
            let Some((_, seen)) = &r.servers[s].text else {
                continue;
            };
            let best = keys
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    let d: f64 = k
                        .iter()
                        .zip(seen)
                        .map(|(a, b)| ((a - b) as f64).powi(2))
                        .sum();
                    (d, i)
                })
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, i)| i);
            if best.is_some_and(|i| self.pool[i] == r.caption) {
                hits += 1;
            }
        }
        Ok(Some(hits as f64 / test.len() as f64))
    }
}

// ---- the `obfuscated` policy's attacker ----------------------------------------------------

/// What the attacker on an `obfuscated` server achieves: `obf_prior::ObfuscatedRow` (from
/// `obf_prior::obfuscated_row`) and the older columns beside it.
#[derive(Debug, Clone)]
pub struct ObfuscatedReport {
    pub prompts: usize,
    /// Mean K (candidates per request).
    pub mean_k: f64,
    /// Mean 1/K: a uniform guess of the real candidate.
    pub chance: f64,
    /// Accuracy of guessing the first candidate in send order.
    pub guess_first: f64,
    /// Accuracy of the slot-aware prior attacker (`obf_prior::SlotPrior`): the candidate whose
    /// slot values the training captions make most likely (`ObfuscatedRow::prior_accuracy`).
    pub guess_prior: f64,
    /// The server can finish every candidate itself: PSNR (dB) of a uniform pick among those
    /// K pictures against the true final picture, averaged over the picks and the prompts…
    pub pick_psnr: f64,
    /// … and of the best of the K (an oracle that knew which one to pick).
    pub best_psnr: f64,
    /// Everything the run measured (the prior's picked picture, its per-slot accuracy).
    pub row: crate::obf_prior::ObfuscatedRow,
}

/// Attacks `prompts` `obfuscated` generations of held-out captions (T `steps`, the server
/// running `server_steps`, at most `k_max` candidates from `lex`), finishing all K pictures,
/// with the prior estimated from `obf_prior::DEFAULT_PRIOR_SAMPLES` training captions.
#[allow(clippy::too_many_arguments)]
pub fn obfuscated_attack(
    sd: &std::sync::Arc<StableDiffusion>,
    lex: std::sync::Arc<veil_core::obfuscation::Lexicon>,
    prompts: usize,
    steps: usize,
    server_steps: usize,
    k_max: usize,
    guidance: f64,
    side: usize,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ObfuscatedReport> {
    use crate::obf_prior::{run_attack, ObfuscatedAttack, DEFAULT_PRIOR_SAMPLES};
    let cfg = ObfuscatedAttack {
        prompts,
        steps,
        server_steps,
        k_max,
        guidance,
        side,
        seed,
        prior_samples: DEFAULT_PRIOR_SAMPLES,
        finish_all: true,
    };
    let tally = run_attack(sd, &lex, &cfg, progress)?;
    let row = tally.row(&cfg);
    let n = prompts.max(1) as f64;
    Ok(ObfuscatedReport {
        prompts,
        mean_k: row.k_mean,
        chance: row.chance,
        guess_first: tally.first / n,
        guess_prior: row.prior_accuracy,
        pick_psnr: tally.uniform / n,
        best_psnr: row.best_of_k_psnr.unwrap_or(0.0),
        row,
    })
}

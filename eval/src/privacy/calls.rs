//! The attacker's data: single U-Net calls on forward-noised dataset latents with their real
//! captions, run under a placement setting with in-process servers, and what each server saw
//! of each picture. Calls are batched (many pictures share one U-Net call at one timestep) so
//! thousands of them fit in minutes; a server's view of one picture is its batch rows of every
//! captured tensor.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use veil_core::client::denoise::Runners;
use veil_core::client::guidance::{half_groups, merge_captured, GuidanceHalves};
use veil_core::client::pipeline::{seeded_normal, StableDiffusion};
use veil_core::placement::engine::CandleEngine;
use veil_core::placement::runtime::CapturedReply;
use veil_core::placement::runtime::Runtime;
use veil_core::placement::{OpKind, Policy, ShardBackend, View, ViewKind, WireDtype};
use veil_core::vocab::job::StepRows;

use crate::attacker::{AttackError, Result};
use crate::dataset::{Dataset, Scene};
use crate::metrics::Picture;

/// Side of the dataset's pictures.
pub const SIDE: usize = 64;

/// Latent channels, rows and columns of the model's U-Net input for a picture.
pub fn latent_dims(sd: &StableDiffusion) -> (usize, usize, usize) {
    let f = sd.vae.config.downsample_factor().max(1);
    (sd.unet.config.in_channels, SIDE / f, SIDE / f)
}

/// A placement under attack: the policy, its server count and where the guidance halves go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setting {
    pub policy: Policy,
    pub servers: usize,
    pub halves: GuidanceHalves,
}

impl Setting {
    pub fn new(policy: Policy, servers: usize) -> Self {
        Self {
            policy,
            servers,
            halves: GuidanceHalves::default_for(policy),
        }
    }

    pub fn label(&self) -> String {
        let halves = match (self.policy, self.halves) {
            (Policy::Strict, GuidanceHalves::Together) => " (halves together)",
            _ => "",
        };
        format!("{} N = {}{halves}", self.policy.name(), self.servers)
    }

    /// Whether the halves run on disjoint groups (or the unconditional one on the phone).
    pub fn apart(&self) -> bool {
        self.halves == GuidanceHalves::Apart && self.policy == Policy::Strict
    }

    /// Which halves server `s` holds: (unconditional, conditional).
    pub fn halves_of(&self, s: usize) -> (bool, bool) {
        if !self.apart() {
            return (true, true);
        }
        let (cond, _) = half_groups(self.servers);
        (!cond.contains(&s), cond.contains(&s))
    }
}

/// One picture the attacker is scored on, or trains with.
pub struct Item {
    pub caption: String,
    pub scene: Scene,
    /// The clean latent [C·H·W] (VAE posterior mean × scaling factor).
    pub x0: Vec<f32>,
    /// The picture the model's latent stands for: the VAE decode of `x0`.
    pub truth: Picture,
    /// Pixels of the dataset render that belong to an object.
    pub object_pixels: Vec<bool>,
    /// The timestep of its U-Net call and the noised latent there.
    pub t: usize,
    pub xt: Vec<f32>,
    /// (channels, rows, columns) of the latent.
    pub latent: (usize, usize, usize),
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// A picture [3, H, W] in [0, 1] of a decoded latent [C·H·W].
pub fn decode(sd: &StableDiffusion, latent: &[f32]) -> Result<Picture> {
    let (c, h, w) = latent_dims(sd);
    let z = Tensor::from_slice(latent, (1, c, h, w), &Device::Cpu)?;
    let img = sd.decode(&z)?;
    let (_, ph, pw) = img.dims3()?;
    Ok(Picture::new(ph, pw, to_vec(&img)?)?)
}

/// Builds items from dataset samples `indices` (held-out ones when `held_out`), each noised
/// at the timestep `t_of(index)` with noise seeded by the index.
pub fn make_items(
    sd: &StableDiffusion,
    data: &Dataset,
    indices: Range<u64>,
    held_out: bool,
    t_of: &dyn Fn(u64) -> usize,
) -> Result<Vec<Item>> {
    let alphas = sd.scheduler_config.alphas_cumprod()?;
    let scale = sd.vae.config.scaling_factor;
    let mut out = Vec::with_capacity(indices.clone().count());
    for i in indices {
        let (scene, caption, img) = if held_out {
            data.held_out(i)
        } else {
            data.sample(i)
        };
        let pic = Picture::from_rgb(&img);
        let bg = scene.background.rgb();
        let object_pixels = img
            .pixels()
            .map(|p| (0..3).any(|k| (p.0[k] as i32 - bg[k] as i32).abs() > 24))
            .collect();
        let x = Tensor::from_slice(&pic.data, (1, 3, pic.height, pic.width), &Device::Cpu)?;
        let x = ((x * 2.0)? - 1.0)?;
        let x0 = (sd.vae.encode_mean(&x)? * scale)?;
        let t = t_of(i);
        let a = *alphas
            .get(t)
            .ok_or_else(|| AttackError::Setup(format!("timestep {t} outside the schedule")))?;
        let noise = seeded_normal(0x5eed ^ (i << 1) ^ held_out as u64, x0.dims(), &Device::Cpu)?;
        let xt = ((&x0 * a.sqrt())? + (noise * (1.0 - a).sqrt())?)?;
        let x0 = to_vec(&x0)?;
        out.push(Item {
            truth: decode(sd, &x0)?,
            caption,
            scene,
            x0,
            object_pixels,
            t,
            xt: to_vec(&xt)?,
            latent: latent_dims(sd),
        });
    }
    Ok(out)
}

/// Random training timesteps in `range`, by index (deterministic).
pub fn random_t(seed: u64, range: Range<usize>) -> impl Fn(u64) -> usize {
    move |i| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ i.wrapping_mul(0x9E37_79B9));
        rng.random_range(range.clone())
    }
}

/// One tensor a server received in a call, restricted to one picture's batch rows: the
/// unconditional row and the conditional row where the server holds them.
#[derive(Debug, Clone)]
pub struct SeenRows {
    pub view: View,
    /// Dimensions of one row (batch dimension dropped).
    pub dims: Vec<usize>,
    pub uncond: Option<Vec<f32>>,
    pub cond: Option<Vec<f32>>,
}

/// One tensor a server returned in a call (what it computed), restricted to one picture.
#[derive(Debug, Clone)]
pub struct Returned {
    pub kind: OpKind,
    pub layer: String,
    pub dims: Vec<usize>,
    pub uncond: Option<Vec<f32>>,
    pub cond: Option<Vec<f32>>,
}

/// Everything server `s` saw of one picture in one call.
#[derive(Debug, Clone, Default)]
pub struct ServerSight {
    pub seen: Vec<SeenRows>,
    /// What it returned, in order (it computed it, so it knows it).
    pub returned: Vec<Returned>,
    /// Its own rows at the latent resolution.
    pub strip: Range<usize>,
    /// (channels, rows, columns) of the latent.
    pub latent: (usize, usize, usize),
}

impl ServerSight {
    /// The first tensor of `kind` at a layer whose name contains `layer`.
    pub fn find(&self, kind: ViewKind, layer: &str) -> Option<&SeenRows> {
        self.seen
            .iter()
            .find(|s| s.view.kind == kind && s.view.layer.contains(layer))
    }

    pub fn all(&self, kind: ViewKind) -> impl Iterator<Item = &SeenRows> {
        self.seen.iter().filter(move |s| s.view.kind == kind)
    }

    /// The latent rows received at `conv_in` (the conditional row if held, else the
    /// unconditional one: both are x_t), zero elsewhere, and which rows were seen.
    pub fn latent_rows(&self) -> (Vec<f32>, Vec<bool>) {
        let (c, h, w) = self.latent;
        let mut lat = vec![0f32; c * h * w];
        let mut rows = vec![false; h];
        for s in self.seen.iter().filter(|s| {
            s.view.layer == "conv_in"
                && matches!(s.view.kind, ViewKind::Latent | ViewKind::Block)
                && s.view.resolution == Some((h, w))
        }) {
            let (Some(r), Some(data)) =
                (s.view.rows.clone(), s.cond.as_ref().or(s.uncond.as_ref()))
            else {
                continue;
            };
            let n = r.len();
            for ch in 0..c {
                for (k, row) in r.clone().enumerate() {
                    for x in 0..w {
                        if let (Some(dst), Some(v)) = (
                            lat.get_mut((ch * h + row) * w + x),
                            data.get((ch * n + k) * w + x),
                        ) {
                            *dst = *v;
                        }
                    }
                    rows[row] = true;
                }
            }
        }
        (lat, rows)
    }
}

/// What `setting` shows its servers of `items` (all at one timestep `t`), from one batched
/// U-Net call with classifier-free guidance (the empty negative prompt). Returns, per item,
/// per server, what that server saw.
pub async fn observe(
    sd: &StableDiffusion,
    setting: &Setting,
    backends: &[Arc<dyn ShardBackend<Tensor>>],
    items: &[&Item],
    t: usize,
) -> Result<Vec<Vec<ServerSight>>> {
    let b = items.len();
    let (c, h, w) = latent_dims(sd);
    let mut xt = Vec::with_capacity(b * c * h * w);
    let mut ctx = Vec::with_capacity(b);
    for it in items {
        xt.extend_from_slice(&it.xt);
        ctx.push(sd.encode_prompt(&it.caption)?);
    }
    let xt = Tensor::from_vec(xt, (b, c, h, w), &Device::Cpu)?;
    let uncond = sd.encode_prompt("")?.repeat((b, 1, 1))?;
    let x = Tensor::cat(&[&xt, &xt], 0)?;
    let context = Tensor::cat(&[uncond, Tensor::cat(&ctx, 0)?], 0)?;
    let unet = &sd.unet;
    let ((), all) = run_captured(sd, setting, backends, async |mut runners| {
        runners
            .forward(unet, &x, t as f64, (&context, None), StepRows::Full, b)
            .await?;
        Ok(())
    })
    .await?;
    let Captured {
        sent: captured,
        replies,
        strips,
    } = all;
    let captured: Vec<&(View, Tensor)> = captured.iter().collect();
    let replies: Vec<&CapturedReply<Tensor>> = replies.iter().collect();
    let seen = Seen {
        captured: &captured,
        replies: &replies,
        strips: &strips,
    };
    sights(setting, &seen, backends.len(), b, (c, h, w))
}

/// What the servers were sent and returned in one U-Net call, and their strips.
pub struct Seen<'a> {
    pub captured: &'a [&'a (View, Tensor)],
    pub replies: &'a [&'a CapturedReply<Tensor>],
    /// Each server's strip per resolution (the audit's `strips`).
    pub strips: &'a [std::collections::BTreeMap<(usize, usize), Range<usize>>],
}

/// Per picture (of `b` in the call), per server (of `n`), what that server saw of it.
pub fn sights(
    setting: &Setting,
    seen: &Seen<'_>,
    n: usize,
    b: usize,
    (c, h, w): (usize, usize, usize),
) -> Result<Vec<Vec<ServerSight>>> {
    let mut out = vec![vec![ServerSight::default(); n]; b];
    for (s, m) in seen.strips.iter().enumerate() {
        let strip = m.get(&(h, w)).cloned().unwrap_or(0..h);
        for per_item in out.iter_mut() {
            if let Some(sight) = per_item.get_mut(s) {
                sight.strip = strip.clone();
                sight.latent = (c, h, w);
            }
        }
    }
    for (view, tensor) in seen.captured {
        split_rows(setting, view, tensor, b, &mut out)?;
    }
    for r in seen.replies {
        split_returned(setting, r, b, &mut out)?;
    }
    Ok(out)
}

/// Everything the servers were sent and returned in a run, and their strips.
pub struct Captured {
    pub sent: Vec<(View, Tensor)>,
    pub replies: Vec<CapturedReply<Tensor>>,
    /// Each server's strip per resolution (the audit's `strips`).
    pub strips: Vec<std::collections::BTreeMap<(usize, usize), Range<usize>>>,
}

/// Runs `run` on the runtimes of `setting` over `backends` — one, or the guidance halves' two
/// (the unconditional one on the phone when the group is empty) — capturing from the first
/// call, and returns its result with what the servers saw, numbered as the caller numbers them.
pub async fn run_captured<R>(
    sd: &StableDiffusion,
    setting: &Setting,
    backends: &[Arc<dyn ShardBackend<Tensor>>],
    run: impl for<'r, 'a> AsyncFnOnce(Runners<'r, 'a, CandleEngine>) -> Result<R>,
) -> Result<(R, Captured)> {
    let placement = setting.policy.placement();
    let engine = &sd.unet_engine;
    if !setting.apart() {
        let mut rt =
            Runtime::new(engine, placement, backends, WireDtype::F32)?.with_capture(Some(0));
        let out = run(Runners::One(&mut rt)).await?;
        let replies = rt.take_captured_replies();
        let sent = rt.take_captured();
        let strips = rt.take_audit().strips;
        return Ok((
            out,
            Captured {
                sent,
                replies,
                strips,
            },
        ));
    }
    let (cg, ug) = half_groups(backends.len());
    let up = match ug.is_empty() {
        true => Policy::Local.placement(),
        false => placement,
    };
    let mut rc =
        Runtime::new(engine, placement, &backends[cg], WireDtype::F32)?.with_capture(Some(0));
    let mut ru =
        Runtime::new(engine, up, &backends[ug.clone()], WireDtype::F32)?.with_capture(Some(0));
    let out = run(Runners::Apart {
        cond: &mut rc,
        uncond: &mut ru,
        uncond_offset: ug.start,
    })
    .await?;
    let audit =
        veil_core::client::guidance::merge_audit(rc.take_audit(), ru.take_audit(), ug.start);
    let sent = merge_captured(rc.take_captured(), ru.take_captured(), ug.start);
    let mut replies = rc.take_captured_replies();
    replies.extend(ru.take_captured_replies().into_iter().map(|mut r| {
        r.server += ug.start;
        r
    }));
    Ok((
        out,
        Captured {
            sent,
            replies,
            strips: audit.strips,
        },
    ))
}

/// Which rows of a tensor of `rows` batch rows sent to or by `server` are each picture's:
/// (offset of the unconditional rows, offset of the conditional rows).
fn layout(
    setting: &Setting,
    server: usize,
    rows: usize,
    b: usize,
) -> Option<(Option<usize>, Option<usize>)> {
    match (rows, setting.halves_of(server)) {
        (r, (true, true)) if r == 2 * b => Some((Some(0), Some(b))),
        (r, (true, false)) if r == b => Some((Some(0), None)),
        (r, (false, true)) if r == b => Some((None, Some(0))),
        _ => None,
    }
}

fn split_returned(
    setting: &Setting,
    r: &CapturedReply<Tensor>,
    b: usize,
    out: &mut [Vec<ServerSight>],
) -> Result<()> {
    let dims = r.tensor.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    let Some((u, c)) = layout(setting, r.server, rows, b) else {
        return Ok(());
    };
    let data = to_vec(&r.tensor)?;
    let per = data.len() / rows.max(1);
    let row = |start: usize| {
        data.get(start * per..(start + 1) * per)
            .map(<[f32]>::to_vec)
    };
    for (i, per_item) in out.iter_mut().enumerate() {
        if let Some(sight) = per_item.get_mut(r.server) {
            sight.returned.push(Returned {
                kind: r.kind,
                layer: r.layer.clone(),
                dims: dims[1..].to_vec(),
                uncond: u.and_then(|o| row(o + i)),
                cond: c.and_then(|o| row(o + i)),
            });
        }
    }
    Ok(())
}

/// Hands each picture its rows of one captured tensor: a server holding both halves received
/// 2B rows (B unconditional, then B conditional), one holding one half B rows.
fn split_rows(
    setting: &Setting,
    view: &View,
    tensor: &Tensor,
    b: usize,
    out: &mut [Vec<ServerSight>],
) -> Result<()> {
    let dims = tensor.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    // Replicated vectors (the timestep embedding) and other batch-free tensors are skipped.
    let Some(layout) = layout(setting, view.server, rows, b) else {
        return Ok(());
    };
    let data = to_vec(tensor)?;
    let per = data.len() / rows.max(1);
    let row = |start: usize| {
        data.get(start * per..(start + 1) * per)
            .map(<[f32]>::to_vec)
    };
    for (i, per_item) in out.iter_mut().enumerate() {
        let Some(sight) = per_item.get_mut(view.server) else {
            continue;
        };
        sight.seen.push(SeenRows {
            view: view.clone(),
            dims: dims[1..].to_vec(),
            uncond: layout.0.and_then(|o| row(o + i)),
            cond: layout.1.and_then(|o| row(o + i)),
        });
    }
    Ok(())
}

/// Runs `observe` over `items` in batches of `batch` sharing a timestep (items must be grouped
/// by timestep: consecutive items with equal `t` are batched together), calling `each` with
/// every item's index and sight.
pub fn observe_all(
    sd: &StableDiffusion,
    setting: &Setting,
    items: &[Item],
    batch: usize,
    each: &mut dyn FnMut(usize, Vec<ServerSight>) -> Result<()>,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| AttackError::Setup(e.to_string()))?;
    let backends = sd.in_process_backends(setting.servers);
    let mut start = 0;
    while start < items.len() {
        let t = items[start].t;
        let mut end = start + 1;
        while end < items.len() && end - start < batch.max(1) && items[end].t == t {
            end += 1;
        }
        let group: Vec<&Item> = items[start..end].iter().collect();
        let sights = rt.block_on(observe(sd, setting, &backends, &group, t))?;
        for (k, s) in sights.into_iter().enumerate() {
            each(start + k, s)?;
        }
        start = end;
    }
    Ok(())
}

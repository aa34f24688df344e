//! `veil bench unet`: times one `UNet::forward` on CPU with seeded random weights, so that any
//! diffusers `unet/config.json` (SD1.5 included) can be measured without downloading a model.
//!
//! Weights: fan-in-scaled normals for matrices and convolution kernels (std = 1/√fan_in),
//! ≈ 1 for norm scales, small normals for biases; generated here from `--seed` with a
//! xorshift64* + Box–Muller generator, in fixed-size chunks spread over the cores (the values
//! depend only on the seed, not on the thread count). Inputs: standard-normal latents
//! [batch, in_channels, h, w] and context [batch, context_len, cross_attention_dim].
//!
//! Reported: median and min seconds per call over `--runs` timed calls (after `--warmup`
//! untimed ones), the process's peak resident memory (VmHWM), and with `--profile` the time
//! per op kind (the engine is wrapped in a timing layer; candle's CPU ops are eager, so the
//! wall time of each engine call is that op's cost).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use veil_core::model::config::{read_json, UNetConfig};
use veil_core::model::layers::{Conv2dSpec, GeluKind, GroupNormSpec, LayerNormSpec, LinearSpec};
use veil_core::model::unet::UNet;
use veil_core::placement::engine::Pad;
use veil_core::placement::{
    CandleEngine, Engine, GnVariant, InProcessBackend, Policy, Runtime, ShardBackend, WireDtype,
};

/// `veil bench vae` and `veil bench clip` (declared here so that main.rs is unchanged).

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    target: BenchTarget,
}

#[derive(Subcommand)]
enum BenchTarget {
    /// Time one U-Net forward pass (random weights from a config; CPU, f32).
    Unet(UnetArgs),
    /// A generation (or tensor transfers) over local QUIC servers behind the link emulator.
    Link(crate::link_bench::LinkBenchArgs),
    /// The obfuscated policy: server cost against K, phone traffic per switch point, utility.
    Obfuscated(crate::obf_bench::ObfBenchArgs),
    /// The phone's peak memory, weights, start-up and CPU per step, servers in other processes.
    Phone(crate::phone_bench::PhoneBenchArgs),
    /// One shard server process of `bench phone` (internal).
    #[command(hide = true)]
    PhoneServer(crate::phone_bench::PhoneServerArgs),
    /// The phone process of `bench phone` (internal).
    #[command(hide = true)]
    PhoneRun(crate::phone_bench::PhoneRunArgs),
    /// Time the VAE decoder (random weights from a config's parameter list; CPU, f32).
    Vae(crate::model_bench::VaeBenchArgs),
    /// Time the CLIP text encoder (random weights from a config's parameter list; CPU, f32).
    Clip(crate::model_bench::ClipBenchArgs),
}

#[derive(Args)]
struct UnetArgs {
    /// A diffusers `unet/config.json`.
    #[arg(long)]
    config: PathBuf,
    /// Latent height (and width unless --latent-width); 64 = a 512 px image for SD.
    #[arg(long, default_value_t = 32)]
    latent: usize,
    /// Latent width (default: --latent).
    #[arg(long)]
    latent_width: Option<usize>,
    /// U-Net batch (2 = classifier-free guidance).
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Text tokens per prompt.
    #[arg(long, default_value_t = 77)]
    context_len: usize,
    /// Timed calls.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Untimed calls before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Placement policy: local or ppidm (with in-process shard backends).
    #[arg(long, default_value = "local")]
    policy: String,
    /// Number of in-process shard backends (ppidm).
    #[arg(long, default_value_t = 2)]
    servers: usize,
    /// GroupNorm under ppidm: exact or paper.
    #[arg(long, default_value = "exact")]
    gn: String,
    /// Seed of the weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Diffusion timestep fed to the U-Net.
    #[arg(long, default_value_t = 500.0)]
    timestep: f64,
    /// Query rows per attention chunk on the device (default: the runtime's; the unfused
    /// attention only).
    #[arg(long)]
    attention_chunk: Option<usize>,
    /// candle's chunked attention (scores in memory) and convolution instead of our fused
    /// attention and im2col convolution (the state before issue 18, compared in one run).
    #[arg(long)]
    candle_kernels: bool,
    /// Also report time per op kind (timed runs only).
    #[arg(long)]
    profile: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.target {
        BenchTarget::Unet(u) => bench_unet(u),
        BenchTarget::Link(l) => crate::link_bench::run(l),
        BenchTarget::Obfuscated(o) => crate::obf_bench::run(o),
        BenchTarget::Phone(p) => crate::phone_bench::run(p),
        BenchTarget::PhoneServer(p) => crate::phone_bench::server(p),
        BenchTarget::PhoneRun(p) => crate::phone_bench::phone(p),
        BenchTarget::Vae(v) => crate::model_bench::bench_vae(v),
        BenchTarget::Clip(c) => crate::model_bench::bench_clip(c),
    }
}

// ---------------------------------------------------------------------------------------------
// Random weights

/// xorshift64* seeded through splitmix64 (never zero).
struct Rng(u64);

pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    fn new(seed: u64) -> Self {
        Self(splitmix64(seed) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Two independent standard normals (Box–Muller on two 24-bit uniforms in (0, 1)).
    fn normal_pair(&mut self) -> (f32, f32) {
        const SCALE: f32 = 1.0 / (1u32 << 24) as f32;
        let x = self.next();
        let u1 = ((x >> 40) as f32 + 0.5) * SCALE;
        let u2 = (((x >> 16) & 0xFF_FFFF) as f32 + 0.5) * SCALE;
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
        (r * c, r * s)
    }
}

const CHUNK: usize = 1 << 16;

fn fill_chunk(out: &mut [f32], seed: u64, mean: f32, std: f32) {
    let mut rng = Rng::new(seed);
    let mut pairs = out.chunks_exact_mut(2);
    for p in &mut pairs {
        let (a, b) = rng.normal_pair();
        p[0] = mean + std * a;
        p[1] = mean + std * b;
    }
    if let [last] = pairs.into_remainder() {
        *last = mean + std * rng.normal_pair().0;
    }
}

/// Fills `out` with N(mean, std²); chunk k uses seed (seed, k), so the result does not depend
/// on how chunks are spread over threads.
pub(crate) fn fill_normal(out: &mut [f32], seed: u64, mean: f32, std: f32, threads: usize) {
    let mut chunks: Vec<(usize, &mut [f32])> = out.chunks_mut(CHUNK).enumerate().collect();
    let chunk_seed = |k: usize| splitmix64(seed ^ splitmix64(k as u64));
    if threads <= 1 || chunks.len() < 2 {
        for (k, c) in chunks {
            fill_chunk(c, chunk_seed(k), mean, std);
        }
        return;
    }
    let per = chunks.len().div_ceil(threads);
    std::thread::scope(|s| {
        for group in chunks.chunks_mut(per) {
            s.spawn(move || {
                for (k, c) in group.iter_mut() {
                    fill_chunk(c, chunk_seed(*k), mean, std);
                }
            });
        }
    });
}

pub(crate) fn normal_tensor(
    shape: &[usize],
    seed: u64,
    mean: f32,
    std: f32,
    threads: usize,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut v = vec![0f32; n];
    fill_normal(&mut v, seed, mean, std, threads);
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// Every parameter of `unet`: (fan-in-scaled normal | ≈1 norm scale | small bias).
fn random_weights(
    unet: &UNet,
    seed: u64,
    threads: usize,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, usize)> {
    let mut weights = HashMap::new();
    let mut count = 0usize;
    for (i, (name, shape)) in unet.parameters().into_iter().enumerate() {
        let (mean, std) = if shape.len() >= 2 {
            let fan_in: usize = shape[1..].iter().product();
            (0.0, 1.0 / (fan_in.max(1) as f32).sqrt())
        } else if name.ends_with(".weight") {
            (1.0, 0.02) // GroupNorm / LayerNorm scale
        } else {
            (0.0, 0.01) // bias
        };
        count += shape.iter().product::<usize>();
        let t = normal_tensor(
            &shape,
            splitmix64(seed.wrapping_add(i as u64 + 1)),
            mean,
            std,
            threads,
            device,
        )?;
        weights.insert(name, t);
    }
    Ok((weights, count))
}

// ---------------------------------------------------------------------------------------------
// Memory

/// A `Vm*` line of /proc/self/status in MiB (Linux; None elsewhere).
pub(crate) fn proc_status_mib(key: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// Per-op timing

#[derive(Default, Clone, Copy)]
struct OpStat {
    total: Duration,
    calls: u64,
}

/// A `CandleEngine` that adds the wall time of every op to a shared table.
#[derive(Clone)]
struct Profiled {
    inner: CandleEngine,
    stats: Arc<Mutex<HashMap<String, OpStat>>>,
}

impl Profiled {
    fn time<R>(
        &self,
        key: impl FnOnce() -> String,
        f: impl FnOnce() -> veil_core::Result<R>,
    ) -> veil_core::Result<R> {
        let t = Instant::now();
        let r = f();
        let el = t.elapsed();
        if let Ok(mut m) = self.stats.lock() {
            let e = m.entry(key()).or_default();
            e.total += el;
            e.calls += 1;
        }
        r
    }
}

fn hw(t: &Tensor) -> String {
    match t.dims() {
        [_, _, h, w] => format!("{h}x{w}"),
        d => format!("{d:?}"),
    }
}

fn linear_kind(name: &str) -> &'static str {
    if name.contains(".attn1.") {
        "linear attn1 q/k/v/out"
    } else if name.contains(".attn2.") {
        "linear attn2 q/k/v/out"
    } else if name.contains(".ff.net.0") {
        "linear ff in (GEGLU)"
    } else if name.contains(".ff.net.2") {
        "linear ff out"
    } else if name.contains("proj_in") || name.contains("proj_out") {
        "linear proj_in/out"
    } else {
        "linear time embedding"
    }
}

impl Engine for Profiled {
    type T = Tensor;

    fn dims(&self, t: &Tensor) -> Vec<usize> {
        self.inner.dims(t)
    }
    fn conv2d(&self, c: &Conv2dSpec, x: &Tensor, pad: Pad) -> veil_core::Result<Tensor> {
        let k = || {
            let s = if c.stride == 1 {
                String::new()
            } else {
                format!(" s{}", c.stride)
            };
            format!("conv2d {0}x{0}{s} @{1}", c.kernel, hw(x))
        };
        self.time(k, || self.inner.conv2d(c, x, pad))
    }
    fn linear(&self, l: &LinearSpec, x: &Tensor) -> veil_core::Result<Tensor> {
        let k = || {
            let rows = x
                .dims()
                .get(x.rank().saturating_sub(2))
                .copied()
                .unwrap_or(1);
            let kind = linear_kind(&l.name);
            if kind == "linear time embedding" {
                kind.to_string()
            } else {
                format!("{kind} @{rows} tokens")
            }
        };
        self.time(k, || self.inner.linear(l, x))
    }
    fn group_norm_stats(&self, g: &GroupNormSpec, x: &Tensor) -> veil_core::Result<Tensor> {
        self.time(
            || "group_norm stats".into(),
            || self.inner.group_norm_stats(g, x),
        )
    }
    fn merge_group_stats(&self, parts: &[Tensor]) -> veil_core::Result<Tensor> {
        self.time(
            || "group_norm merge (host)".into(),
            || self.inner.merge_group_stats(parts),
        )
    }
    fn group_norm_apply(
        &self,
        g: &GroupNormSpec,
        x: &Tensor,
        moments: &Tensor,
    ) -> veil_core::Result<Tensor> {
        self.time(
            || "group_norm apply".into(),
            || self.inner.group_norm_apply(g, x, moments),
        )
    }
    fn layer_norm(&self, l: &LayerNormSpec, x: &Tensor) -> veil_core::Result<Tensor> {
        self.time(|| "layer_norm".into(), || self.inner.layer_norm(l, x))
    }
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        chunk: usize,
    ) -> veil_core::Result<Tensor> {
        let key = || {
            let tq = q.dims().get(1).copied().unwrap_or(0);
            let tk = k.dims().get(1).copied().unwrap_or(0);
            format!("attention core tq={tq} tk={tk}")
        };
        self.time(key, || self.inner.attention(q, k, v, heads, chunk))
    }
    fn silu(&self, x: &Tensor) -> veil_core::Result<Tensor> {
        self.time(|| "silu".into(), || self.inner.silu(x))
    }
    fn geglu(&self, x: &Tensor, kind: GeluKind) -> veil_core::Result<Tensor> {
        self.time(|| "geglu".into(), || self.inner.geglu(x, kind))
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> veil_core::Result<Tensor> {
        self.time(|| "add (residual)".into(), || self.inner.add(a, b))
    }
    fn scale(&self, x: &Tensor, factor: f64) -> veil_core::Result<Tensor> {
        self.time(|| "scale".into(), || self.inner.scale(x, factor))
    }
    fn add_channel_bias(&self, x: &Tensor, e: &Tensor) -> veil_core::Result<Tensor> {
        self.time(
            || "add time embedding".into(),
            || self.inner.add_channel_bias(x, e),
        )
    }
    fn cat(&self, xs: &[Tensor], dim: usize) -> veil_core::Result<Tensor> {
        self.time(|| "cat".into(), || self.inner.cat(xs, dim))
    }
    fn narrow(
        &self,
        x: &Tensor,
        dim: usize,
        start: usize,
        len: usize,
    ) -> veil_core::Result<Tensor> {
        self.time(
            || "narrow (row blocks)".into(),
            || self.inner.narrow(x, dim, start, len),
        )
    }
    fn upsample_nearest(&self, x: &Tensor, h: usize, w: usize) -> veil_core::Result<Tensor> {
        self.time(
            || "upsample_nearest".into(),
            || self.inner.upsample_nearest(x, h, w),
        )
    }
    fn upsample_rows(&self, x: &Tensor, rows: &[usize], w: usize) -> veil_core::Result<Tensor> {
        self.time(
            || "upsample_rows".into(),
            || self.inner.upsample_rows(x, rows, w),
        )
    }
    fn to_tokens(&self, x: &Tensor) -> veil_core::Result<Tensor> {
        self.time(|| "to_tokens".into(), || self.inner.to_tokens(x))
    }
    fn to_spatial(&self, x: &Tensor, h: usize, w: usize) -> veil_core::Result<Tensor> {
        self.time(|| "to_spatial".into(), || self.inner.to_spatial(x, h, w))
    }
    fn timestep_embedding(
        &self,
        t: f64,
        batch: usize,
        dim: usize,
        flip: bool,
        shift: f64,
    ) -> veil_core::Result<Tensor> {
        self.time(
            || "timestep_embedding".into(),
            || self.inner.timestep_embedding(t, batch, dim, flip, shift),
        )
    }
    fn through_wire(&self, x: &Tensor, dtype: WireDtype) -> veil_core::Result<Tensor> {
        self.time(
            || "through_wire".into(),
            || self.inner.through_wire(x, dtype),
        )
    }
    fn all_finite(&self, x: &Tensor) -> veil_core::Result<bool> {
        self.inner.all_finite(x)
    }
}

// ---------------------------------------------------------------------------------------------
// The benchmark

struct Timings {
    seconds: Vec<f64>,
    gflop_per_call: f64,
    round_trips_per_call: u64,
    out_std: f64,
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => s[n / 2],
        _ => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

#[allow(clippy::too_many_arguments)]
fn time_forward<E: Engine<T = Tensor>>(
    unet: &UNet,
    engine: &E,
    policy: Policy,
    backends: &[Arc<dyn ShardBackend<Tensor>>],
    sample: &Tensor,
    context: &Tensor,
    a: &UnetArgs,
    on_warm: &dyn Fn(),
) -> Result<Timings> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let bar = ProgressBar::new((a.warmup + a.runs) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} bench unet [{bar:30}] {pos}/{len} calls {msg} {elapsed_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message("(warm-up)");
    let mut seconds = Vec::with_capacity(a.runs);
    let mut last = None;
    let mut acct = None;
    for i in 0..a.warmup + a.runs {
        if i == a.warmup {
            on_warm();
            bar.set_message("");
        }
        let mut runtime = Runtime::new(engine, policy.placement(), backends, WireDtype::F32)?;
        if let Some(c) = a.attention_chunk {
            runtime = runtime.with_attention_chunk(c);
        }
        let t0 = Instant::now();
        let out = rt.block_on(unet.forward(&mut runtime, sample, a.timestep, context))?;
        let el = t0.elapsed().as_secs_f64();
        if i >= a.warmup {
            seconds.push(el);
            bar.set_message(format!("(last {el:.3} s)"));
        }
        acct = Some(runtime.take_accounting());
        last = Some(out);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let out = last.context("no U-Net call was made")?;
    let acct = acct.context("no U-Net call was made")?;
    let flop = acct.device_flops + acct.server_flops.iter().sum::<u64>();
    let out_std = out
        .flatten_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?;
    let n = out_std.len().max(1) as f64;
    let mean = out_std.iter().sum::<f64>() / n;
    let var = out_std.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    Ok(Timings {
        seconds,
        gflop_per_call: flop as f64 / 1e9,
        round_trips_per_call: acct.round_trips,
        out_std: var.sqrt(),
    })
}

fn bench_unet(a: UnetArgs) -> Result<()> {
    let policy = unet_policy(&a)?;
    let (m, engine) = UnetModel::prepare(&a)?;
    let backend_count = if policy.needs_backends() {
        a.servers
    } else {
        0
    };
    let stats: Arc<Mutex<HashMap<String, OpStat>>> = Arc::default();
    let timings = time_unet(&a, &m, engine, policy, backend_count, &stats)?;
    let r = UnetReport::new(&a, &m, policy, backend_count, timings, &stats);
    if a.json {
        return r.print_json();
    }
    r.print_table();
    Ok(())
}

/// Checks `--runs` and parses the policy (and its server count) of `veil bench unet`.
fn unet_policy(a: &UnetArgs) -> Result<Policy> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let gn: GnVariant = a.gn.parse()?;
    let policy = Policy::parse(&a.policy, gn)?;
    if policy.needs_backends() && a.servers == 0 {
        bail!(
            "policy {} needs at least one server (--servers N)",
            policy.name()
        );
    }
    Ok(policy)
}

/// The U-Net under test, its seeded inputs, and what generating its weights cost.
struct UnetModel {
    unet: UNet,
    sample: Tensor,
    context: Tensor,
    lh: usize,
    lw: usize,
    ctx_dim: usize,
    params: usize,
    weights_seconds: f64,
    rss_after_weights: Option<f64>,
}

impl UnetModel {
    /// Reads the config, generates the random weights (timed, with the RSS after them) and
    /// the seeded sample and context; the weights come back as the engine to time.
    fn prepare(a: &UnetArgs) -> Result<(Self, CandleEngine)> {
        let cfg: UNetConfig =
            read_json(&a.config).with_context(|| format!("reading {}", a.config.display()))?;
        let unet = UNet::new(&cfg)?;
        let (lh, lw) = (a.latent, a.latent_width.unwrap_or(a.latent));
        let n_blocks = cfg.block_out_channels.len();
        let ctx_dim = cfg
            .cross_attention_dim
            .get(0, n_blocks, "cross_attention_dim")?;
        let device = Device::Cpu;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

        let t0 = Instant::now();
        let (weights, params) = random_weights(&unet, a.seed, threads, &device)?;
        let weights_seconds = t0.elapsed().as_secs_f64();
        let rss_after_weights = proc_status_mib("VmRSS:");
        let sample = normal_tensor(
            &[a.batch, cfg.in_channels, lh, lw],
            splitmix64(a.seed ^ 0x5A5A),
            0.0,
            1.0,
            1,
            &device,
        )?;
        let context = normal_tensor(
            &[a.batch, a.context_len, ctx_dim],
            splitmix64(a.seed ^ 0xC0C0),
            0.0,
            1.0,
            1,
            &device,
        )?;
        let mut engine = CandleEngine::new(weights, device);
        if a.candle_kernels {
            engine = engine.with_candle_kernels();
        }
        let m = Self {
            unet,
            sample,
            context,
            lh,
            lw,
            ctx_dim,
            params,
            weights_seconds,
            rss_after_weights,
        };
        Ok((m, engine))
    }
}

/// Times the forward passes on `engine` (wrapped in the per-op timing layer under
/// `--profile`, its table cleared after the warm-up), with `backend_count` in-process shard
/// backends over the same engine.
fn time_unet(
    a: &UnetArgs,
    m: &UnetModel,
    engine: CandleEngine,
    policy: Policy,
    backend_count: usize,
    stats: &Arc<Mutex<HashMap<String, OpStat>>>,
) -> Result<Timings> {
    let unet = &m.unet;
    if a.profile {
        let p = Profiled {
            inner: engine,
            stats: stats.clone(),
        };
        let backends: Vec<Arc<dyn ShardBackend<Tensor>>> = (0..backend_count)
            .map(|_| {
                Arc::new(InProcessBackend::new(p.clone(), unet.shard_layers()))
                    as Arc<dyn ShardBackend<Tensor>>
            })
            .collect();
        let reset = || {
            if let Ok(mut m) = stats.lock() {
                m.clear();
            }
        };
        time_forward(
            unet, &p, policy, &backends, &m.sample, &m.context, a, &reset,
        )
    } else {
        let backends: Vec<Arc<dyn ShardBackend<Tensor>>> = (0..backend_count)
            .map(|_| {
                Arc::new(InProcessBackend::new(engine.clone(), unet.shard_layers()))
                    as Arc<dyn ShardBackend<Tensor>>
            })
            .collect();
        time_forward(
            unet,
            &engine,
            policy,
            &backends,
            &m.sample,
            &m.context,
            a,
            &|| {},
        )
    }
}

/// Everything `veil bench unet` prints: the run's settings, the timings and their summary
/// (median, min, GFLOP/s, peak RSS) and the per-op profile (empty without `--profile`).
struct UnetReport<'a> {
    a: &'a UnetArgs,
    m: &'a UnetModel,
    policy: Policy,
    backend_count: usize,
    timings: Timings,
    peak: Option<f64>,
    med: f64,
    min: f64,
    gflops: f64,
    profile: Vec<(String, OpStat)>,
    profiled_total: f64,
}

impl<'a> UnetReport<'a> {
    /// Summarises the timings; reads the peak RSS first, right after the timed calls.
    fn new(
        a: &'a UnetArgs,
        m: &'a UnetModel,
        policy: Policy,
        backend_count: usize,
        timings: Timings,
        stats: &Mutex<HashMap<String, OpStat>>,
    ) -> Self {
        let peak = proc_status_mib("VmHWM:");
        let med = median(&timings.seconds);
        let min = timings
            .seconds
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let gflops = timings.gflop_per_call / med;

        let mut profile: Vec<(String, OpStat)> = stats
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        profile.sort_by_key(|p| std::cmp::Reverse(p.1.total));
        let profiled_total: f64 = profile.iter().map(|(_, s)| s.total.as_secs_f64()).sum();
        Self {
            a,
            m,
            policy,
            backend_count,
            timings,
            peak,
            med,
            min,
            gflops,
            profile,
            profiled_total,
        }
    }

    /// `--json`: one pretty-printed object.
    fn print_json(&self) -> Result<()> {
        let (a, m, timings) = (self.a, self.m, &self.timings);
        let runs = a.runs as f64;
        let ops: Vec<serde_json::Value> = self
            .profile
            .iter()
            .map(|(k, s)| {
                serde_json::json!({
                    "op": k,
                    "seconds_per_call": s.total.as_secs_f64() / runs,
                    "calls_per_forward": s.calls as f64 / runs,
                })
            })
            .collect();
        let v = serde_json::json!({
            "config": a.config.display().to_string(),
            "policy": self.policy.name(),
            "servers": self.backend_count,
            "batch": a.batch,
            "latent": [m.lh, m.lw],
            "context": [a.batch, a.context_len, m.ctx_dim],
            "timestep": a.timestep,
            "params": m.params,
            "runs": a.runs,
            "warmup": a.warmup,
            "seconds_median": self.med,
            "seconds_min": self.min,
            "seconds_all": timings.seconds,
            "gflop_per_call": timings.gflop_per_call,
            "gflop_per_second": self.gflops,
            "round_trips_per_call": timings.round_trips_per_call,
            "peak_rss_mib": self.peak,
            "rss_after_weights_mib": m.rss_after_weights,
            "weights_mib": m.params as f64 * 4.0 / 1048576.0,
            "weights_seconds": m.weights_seconds,
            "out_std": timings.out_std,
            "candle_threads": candle_core::utils::get_num_threads(),
            "dtype": "f32",
            "profile": ops,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        Ok(())
    }

    /// The default output: a one-row table, a line of details, and the per-op table under
    /// `--profile`.
    fn print_table(&self) {
        let (a, m, timings) = (self.a, self.m, &self.timings);
        let (lh, lw, params, weights_seconds) = (m.lh, m.lw, m.params, m.weights_seconds);
        let fmt_mib = |m: Option<f64>| m.map_or_else(|| "n/a".to_string(), |m| format!("{m:.0}"));
        println!(
            "{:<40} {:>6} {:>3} {:>5} {:>9} {:>10} {:>10} {:>9} {:>12}",
            "config",
            "policy",
            "srv",
            "batch",
            "latent",
            "median_s",
            "min_s",
            "GFLOP/s",
            "peak_rss_MiB"
        );
        println!(
            "{:<40} {:>6} {:>3} {:>5} {:>9} {:>10.3} {:>10.3} {:>9.1} {:>12}",
            a.config.display().to_string(),
            self.policy.name(),
            self.backend_count,
            a.batch,
            format!("{lh}x{lw}"),
            self.med,
            self.min,
            self.gflops,
            fmt_mib(self.peak)
        );
        println!(
            "params {params} ({:.0} MiB f32, generated in {weights_seconds:.1} s, RSS after weights {} MiB); \
             {:.1} GFLOP/call; {} round trips/call; out std {:.4}; {} runs after {} warm-up; candle threads {}",
            params as f64 * 4.0 / 1048576.0,
            fmt_mib(m.rss_after_weights),
            timings.gflop_per_call,
            timings.round_trips_per_call,
            timings.out_std,
            a.runs,
            a.warmup,
            candle_core::utils::get_num_threads()
        );
        if a.profile {
            self.print_profile();
        }
    }

    /// `--profile`: seconds, share and calls per op kind, per forward pass.
    fn print_profile(&self) {
        let runs = self.a.runs as f64;
        let profiled_total = self.profiled_total;
        println!();
        println!(
            "{:<44} {:>12} {:>7} {:>10}",
            "op (per forward)", "seconds", "share", "calls"
        );
        for (k, s) in &self.profile {
            let sec = s.total.as_secs_f64() / runs;
            println!(
                "{:<44} {:>12.4} {:>6.1}% {:>10.1}",
                k,
                sec,
                100.0 * s.total.as_secs_f64() / profiled_total.max(f64::MIN_POSITIVE),
                s.calls as f64 / runs
            );
        }
        println!("{:<44} {:>12.4}", "sum of ops", profiled_total / runs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normals_do_not_depend_on_threads() {
        let mut a = vec![0f32; 3 * CHUNK + 17];
        let mut b = a.clone();
        fill_normal(&mut a, 7, 0.0, 1.0, 1);
        fill_normal(&mut b, 7, 0.0, 1.0, 3);
        assert_eq!(a, b);
        let n = a.len() as f64;
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

    #[test]
    fn median_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}

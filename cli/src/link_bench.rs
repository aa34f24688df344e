//! `veil bench link`: a generation (or bulk tensor transfers) over real QUIC shard servers on
//! loopback, behind the link emulator (`veil_devtools::link`).
//!
//! N `veil-server`s are spawned in this process (fresh certificates and tokens), one *shared*
//! emulator fronts all of them (the phone's single uplink and downlink), and the client connects
//! through the emulator's ports with the servers' pinned fingerprints and tokens.
//!
//! - Default: a generation. Reported per denoising step: wall time, UDP bytes up/down that
//!   crossed the emulated link (QUIC headers, acks and retransmissions included), datagrams the
//!   bottleneck dropped, QUIC stream bytes (encoded tensors, compression included), requests; and
//!   for the run the tensor payload bytes and round trips from the runtime's accounting, beside
//!   the serialization lower bound of that traffic on this profile.
//! - `--throughput`: times Identity requests carrying one tensor (`--tensor 2,320,64,64`, split
//!   in row strips over the N servers, all at once): a round trip (tensor up, same tensor back),
//!   an upload only (kept by handle, empty reply), and a download only (fetched by handle).
//!   Rates are tensor payload bytes at the wire dtype per second (MB = 10^6 bytes).
//!
//! `--profile none` bypasses the emulator (plain loopback).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use veil_core::client::pipeline::{seeded_normal, GenerateOptions, StableDiffusion};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::placement::backend::{Operand, ShardCall, ShardOp, ShardRequest};
use veil_core::placement::{GnVariant, Policy, ShardBackend, WireDtype};
use veil_core::transport::{connect_backends, ClientOptions, QuicBackend};
use veil_core::wire::identity::model_identity;
use veil_devtools::link::{Direction, LinkEmulator, LinkProfile, LinkStats};
use veil_server::{spawn_local, ServerLimits, ShardModel};

#[derive(Args, Debug, Clone)]
pub struct LinkBenchArgs {
    /// Link profile: `5g` (81.14 Mbit/s up, 340.56 Mbit/s down, 30 ms RTT),
    /// `up=100mbit,down=300mbit,rtt=20ms[,queue=512kb]`, or `none` (plain loopback).
    #[arg(long, default_value = "5g")]
    pub profile: String,
    /// Diffusers-layout model folder (its U-Net shard layers are served).
    #[arg(long, default_value = "models/tiny-random")]
    pub model: PathBuf,
    /// Number of local QUIC shard servers (all behind one shared link).
    #[arg(long, default_value_t = 4)]
    pub servers: usize,
    /// Placement policy (ppidm; local runs without servers).
    #[arg(long, default_value = "ppidm")]
    pub policy: String,
    /// GroupNorm under ppidm: exact or paper.
    #[arg(long, default_value = "exact")]
    pub gn: String,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Tensor dtype on the wire: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub wire: String,
    /// zstd level for tensors on the wire (byte-split); 0 = off.
    #[arg(long, default_value_t = 0)]
    pub zstd: i32,
    #[command(flatten)]
    pub codec: crate::codec_args::CodecArgs,
    /// Image width in pixels (default: the U-Net's sample_size × the VAE factor).
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(
        long,
        default_value = "a small red circle at the top left on a white background"
    )]
    pub prompt: String,
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// ddim, dpm++2m, euler, euler-a (Euler Ancestral) or lcm.
    #[arg(long, default_value = "ddim")]
    pub scheduler: String,
    /// Seconds one shard request may take.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Time bulk tensor transfers (Identity requests) instead of a generation.
    #[arg(long)]
    pub throughput: bool,
    /// Shape of the tensor for --throughput (split in row strips, dim 2, over the servers).
    #[arg(long, default_value = "2,320,64,64")]
    pub tensor: String,
    /// Timed transfers per phase for --throughput (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

const MB: f64 = 1e6;

pub fn run(a: LinkBenchArgs) -> Result<()> {
    let report = measure(&a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let profile = if a.profile.trim().eq_ignore_ascii_case("none") {
            None
        } else {
            Some(LinkProfile::parse(&a.profile)?)
        };
        if a.throughput {
            print_throughput(&a, profile.as_ref(), &report);
        } else {
            print_generation(&a, profile.as_ref(), &report);
        }
    }
    Ok(())
}

/// Runs the benchmark `a` describes (local QUIC servers behind the emulated link) and returns
/// its report; `veil eval` reads the same report.
pub fn measure(a: &LinkBenchArgs) -> Result<Value> {
    let profile = if a.profile.trim().eq_ignore_ascii_case("none") {
        None
    } else {
        Some(LinkProfile::parse(&a.profile)?)
    };
    let wire: WireDtype = a.wire.parse()?;
    let gn: GnVariant = a.gn.parse()?;
    let policy = Policy::parse(&a.policy, gn)?;
    if a.servers == 0 {
        bail!("--servers must be at least 1");
    }
    if !policy.needs_backends() && !a.throughput {
        bail!(
            "policy {} uses no shard server; nothing crosses the link",
            policy.name()
        );
    }
    let timeout = veil_core::vocab::positive_seconds(a.request_timeout)
        .context("--request-timeout must be a positive number of seconds")?;
    let device = Device::Cpu;
    let sd = StableDiffusion::load(&a.model, &device)
        .with_context(|| format!("loading model folder {}", a.model.display()))?;
    // The servers get their own runtime, as they would their own machines: their tasks never
    // queue in front of the client's (whose QUIC endpoints must keep draining their sockets).
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("veil-shard")
        .enable_all()
        .build()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("veil-phone")
        .enable_all()
        .build()?;
    let options = ClientOptions {
        request_timeout: timeout,
        device: device.clone(),
        ..a.codec.client_options(wire, a.zstd)
    };
    let cluster = {
        let _servers = server_rt.enter();
        let model = Arc::new(ShardModel::from_engine(&sd.unet, &sd.unet_engine));
        spawn_local(a.servers, model, ServerLimits::default())
            .context("starting local shard servers")?
    };
    let report = rt.block_on(async {
        let (link, specs) = match profile {
            Some(p) => {
                let (link, specs) = LinkEmulator::front_servers(&cluster.specs, p).await?;
                (Some(link), specs)
            }
            None => (None, cluster.specs.clone()),
        };
        let connect_started = Instant::now();
        let model_id = model_identity(&sd.unet, sd.unet_engine.weights());
        let backends = connect_backends(&specs, model_id, &options).await;
        let connect_seconds = connect_started.elapsed().as_secs_f64();
        let result = match backends {
            Ok(backends) => {
                let r = if a.throughput {
                    throughput(a, wire, &backends, link.as_ref()).await
                } else {
                    generation(a, &sd, policy, wire, &backends, link.as_ref()).await
                };
                for b in &backends {
                    b.close().await;
                }
                r
            }
            Err(e) => Err(e.into()),
        };
        drop(link);
        result.map(|mut v: Value| {
            v["connect_seconds"] = connect_seconds.into();
            v
        })
    });
    server_rt.block_on(cluster.shutdown());
    let mut report = report?;
    report["profile"] = match &profile {
        Some(p) => json!({
            "name": a.profile,
            "up_bps": p.up_bps,
            "down_bps": p.down_bps,
            "rtt_ms": p.rtt.as_secs_f64() * 1e3,
            "queue_up_bytes": finite_queue(p.queue_limit(Direction::Up)),
            "queue_down_bytes": finite_queue(p.queue_limit(Direction::Down)),
            "shared_bottleneck": true,
        }),
        None => json!({ "name": "none" }),
    };
    report["servers"] = a.servers.into();
    report["wire"] = wire.to_string().into();
    report["zstd"] = a.zstd.into();
    Ok(report)
}

fn finite_queue(q: usize) -> Value {
    if q == usize::MAX {
        Value::Null
    } else {
        q.into()
    }
}

fn link_stats(link: Option<&LinkEmulator>) -> LinkStats {
    link.map(LinkEmulator::stats).unwrap_or_default()
}

/// (QUIC stream bytes sent, received, requests) summed over the backends.
fn quic_totals(backends: &[Arc<QuicBackend>]) -> (u64, u64, u64) {
    backends.iter().fold((0, 0, 0), |(s, r, q), b| {
        let t = b.traffic();
        (
            s + t.bytes_sent.load(Ordering::Relaxed),
            r + t.bytes_received.load(Ordering::Relaxed),
            q + t.requests.load(Ordering::Relaxed),
        )
    })
}

/// The kernel's count of UDP datagrams dropped at full socket receive buffers (Linux,
/// system-wide: `RcvbufErrors` in /proc/net/snmp); `None` elsewhere. Drops there are losses the
/// emulator did not decide (the relay or a QUIC endpoint fell behind).
fn kernel_udp_rcvbuf_errors() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (header, values) = (udp.next()?, udp.next()?);
    let col = header
        .split_whitespace()
        .position(|h| h == "RcvbufErrors")?;
    values.split_whitespace().nth(col)?.parse().ok()
}

fn kernel_drops_since(before: Option<u64>) -> Value {
    match (before, kernel_udp_rcvbuf_errors()) {
        (Some(b), Some(a)) => a.saturating_sub(b).into(),
        _ => Value::Null,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

// ---------------------------------------------------------------------------------------------
// Generation

async fn generation(
    a: &LinkBenchArgs,
    sd: &StableDiffusion,
    policy: Policy,
    wire: WireDtype,
    quic: &[Arc<QuicBackend>],
    link: Option<&LinkEmulator>,
) -> Result<Value> {
    let scheduler: SchedulerKind = a.scheduler.parse()?;
    let f = sd.vae.config.downsample_factor();
    let side = sd.unet.config.sample_size.unwrap_or(64) * f;
    let opts = GenerateOptions {
        prompt: a.prompt.clone(),
        steps: a.steps,
        guidance: a.guidance,
        seed: a.seed,
        width: a.width.unwrap_or(side),
        height: a.height.unwrap_or(side),
        scheduler,
        policy,
        wire,
        stale_sync_from: a.codec.stale_sync_from(),
        ..Default::default()
    };
    let backends: Vec<Arc<dyn ShardBackend<Tensor>>> = quic
        .iter()
        .map(|b| b.clone() as Arc<dyn ShardBackend<Tensor>>)
        .collect();
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(a.steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} denoising through the link [{bar:30}] {pos}/{len} steps {elapsed_precise} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut meter = StepMeter::new(a.steps, quic, link);
    let kernel_before = kernel_udp_rcvbuf_errors();
    let started = meter.last_t;
    let generation = sd
        .generate(&opts, &backends, &mut |p| meter.step(p.step, &bar))
        .await;
    bar.finish_and_clear();
    let generation = generation?;
    let total_seconds = started.elapsed().as_secs_f64();
    let run = GenerationRun {
        opts: &opts,
        generation: &generation,
        rows: meter.rows,
        total_seconds,
        kernel_before,
    };
    Ok(generation_report(a, policy, link, run))
}

/// Per-step measurements during a generation: the wall time, link and QUIC counters since the
/// previous step, one JSON row per step.
struct StepMeter<'a> {
    quic: &'a [Arc<QuicBackend>],
    link: Option<&'a LinkEmulator>,
    rows: Vec<Value>,
    last_t: Instant,
    last_link: LinkStats,
    last_quic: (u64, u64, u64),
}

impl<'a> StepMeter<'a> {
    fn new(steps: usize, quic: &'a [Arc<QuicBackend>], link: Option<&'a LinkEmulator>) -> Self {
        let rows: Vec<Value> = Vec::with_capacity(steps);
        let last_t = Instant::now();
        let last_link = link_stats(link);
        let last_quic = quic_totals(quic);
        Self {
            quic,
            link,
            rows,
            last_t,
            last_link,
            last_quic,
        }
    }

    /// Records step `step` (just finished) and shows its numbers on the bar.
    fn step(&mut self, step: usize, bar: &ProgressBar) {
        let now = Instant::now();
        let l = link_stats(self.link);
        let q = quic_totals(self.quic);
        let d = l.since(&self.last_link);
        let wall = now.duration_since(self.last_t).as_secs_f64();
        let last_quic = self.last_quic;
        self.rows.push(json!({
            "step": step,
            "wall_seconds": wall,
            "link_bytes_up": d.up.bytes,
            "link_bytes_down": d.down.bytes,
            "link_packets_up": d.up.packets,
            "link_packets_down": d.down.packets,
            "link_dropped_up": d.up.dropped_packets,
            "link_dropped_down": d.down.dropped_packets,
            "quic_bytes_sent": q.0 - last_quic.0,
            "quic_bytes_received": q.1 - last_quic.1,
            "requests": q.2 - last_quic.2,
        }));
        bar.set_message(format!(
            "{:.2} s/step, up {:.2} MB, down {:.2} MB",
            wall,
            d.up.bytes as f64 / MB,
            d.down.bytes as f64 / MB
        ));
        bar.set_position(step as u64);
        self.last_t = now;
        self.last_link = l;
        self.last_quic = q;
    }
}

/// What a measured generation left for its report.
struct GenerationRun<'a> {
    opts: &'a GenerateOptions,
    generation: &'a veil_core::client::pipeline::Generation,
    rows: Vec<Value>,
    total_seconds: f64,
    kernel_before: Option<u64>,
}

/// The generation report: per-step rows, step medians, payload per step beside its
/// serialization lower bound on the link, and the link's totals.
fn generation_report(
    a: &LinkBenchArgs,
    policy: Policy,
    link: Option<&LinkEmulator>,
    run: GenerationRun<'_>,
) -> Value {
    let GenerationRun {
        opts,
        generation,
        rows,
        total_seconds,
        kernel_before,
    } = run;
    let s = &generation.stats;
    let steps = s.steps.max(1) as u64;
    let walls: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["wall_seconds"].as_f64())
        .collect();
    // Step 1 also encodes the prompt and sets up the runtime; report the rest on its own.
    let steady: Vec<f64> = walls.iter().skip(1).copied().collect();
    let up = s.bytes_up / steps;
    let down = s.bytes_down / steps;
    let rtts = s.round_trips / steps;
    let lower_bound = link.map(|l| {
        let p = l.profile();
        p.serialization_seconds(Direction::Up, up)
            + p.serialization_seconds(Direction::Down, down)
            + rtts as f64 * p.rtt.as_secs_f64()
    });
    let totals = link_stats(link);
    json!({
        "mode": "generation",
        "model": a.model.display().to_string(),
        "policy": policy.name(),
        "width": opts.width,
        "height": opts.height,
        "steps": s.steps,
        "per_step": rows,
        "wall_seconds": total_seconds,
        "generate_wall_seconds": s.wall_seconds,
        "step_seconds_median": median(&walls),
        "step_seconds_median_after_first": if steady.is_empty() { Value::Null } else { median(&steady).into() },
        "tensor_bytes_up_per_step": up,
        "tensor_bytes_down_per_step": down,
        "round_trips_per_step": rtts,
        "serialization_lower_bound_seconds_per_step": lower_bound,
        "link_bytes_up": totals.up.bytes,
        "link_bytes_down": totals.down.bytes,
        "link_dropped_packets_up": totals.up.dropped_packets,
        "link_dropped_packets_down": totals.down.dropped_packets,
        "kernel_udp_rcvbuf_drops": kernel_drops_since(kernel_before),
    })
}

fn print_generation(a: &LinkBenchArgs, profile: Option<&LinkProfile>, r: &Value) {
    let link = profile.map_or_else(|| "none (loopback)".to_string(), |p| p.to_string());
    println!(
        "veil bench link: {} {}x{} px, policy {}, {} servers (shared link: {link}), wire {}, zstd {}",
        a.model.display(),
        r["width"],
        r["height"],
        r["policy"].as_str().unwrap_or("?"),
        a.servers,
        r["wire"].as_str().unwrap_or("?"),
        a.zstd,
    );
    println!(
        "connect (QUIC + TLS + Hello, {} servers at once): {:.3} s",
        a.servers,
        r["connect_seconds"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "{:>4} {:>9} {:>12} {:>12} {:>7} {:>12} {:>12} {:>8}",
        "step",
        "wall s",
        "link up MB",
        "link down MB",
        "drops",
        "QUIC sent MB",
        "QUIC recv MB",
        "requests"
    );
    let empty = Vec::new();
    for row in r["per_step"].as_array().unwrap_or(&empty) {
        let u = |k: &str| row[k].as_u64().unwrap_or(0);
        println!(
            "{:>4} {:>9.3} {:>12.3} {:>12.3} {:>7} {:>12.3} {:>12.3} {:>8}",
            u("step"),
            row["wall_seconds"].as_f64().unwrap_or(f64::NAN),
            u("link_bytes_up") as f64 / MB,
            u("link_bytes_down") as f64 / MB,
            u("link_dropped_up") + u("link_dropped_down"),
            u("quic_bytes_sent") as f64 / MB,
            u("quic_bytes_received") as f64 / MB,
            u("requests"),
        );
    }
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "median step {:.3} s (after step 1: {:.3} s); tensor payload per step up {:.3} MB, down {:.3} MB, {} round trips",
        f("step_seconds_median"),
        f("step_seconds_median_after_first"),
        f("tensor_bytes_up_per_step") / MB,
        f("tensor_bytes_down_per_step") / MB,
        r["round_trips_per_step"],
    );
    println!(
        "link drops (bottleneck queue) up {}, down {}; kernel UDP receive-buffer drops (system-wide) {}",
        r["link_dropped_packets_up"], r["link_dropped_packets_down"], r["kernel_udp_rcvbuf_drops"]
    );
    if let Some(lb) = r["serialization_lower_bound_seconds_per_step"].as_f64() {
        println!("serialization lower bound on this link (payload / rate + round trips × RTT): {lb:.3} s/step");
    }
}

// ---------------------------------------------------------------------------------------------
// Throughput

async fn throughput(
    a: &LinkBenchArgs,
    wire: WireDtype,
    quic: &[Arc<QuicBackend>],
    link: Option<&LinkEmulator>,
) -> Result<Value> {
    let shape = tensor_shape(a, quic.len())?;
    let tensor = seeded_normal(a.seed, &shape, &Device::Cpu)?;
    // Row strips, one per server (the ppidm pattern).
    let n = quic.len();
    let mut strips = Vec::with_capacity(n);
    let mut start = 0;
    for i in 0..n {
        let rows = shape[2] / n + usize::from(i < shape[2] % n);
        strips.push(tensor.narrow(2, start, rows)?.contiguous()?);
        start += rows;
    }
    let elements: usize = shape.iter().product();
    let payload = (elements * wire.size()) as u64;
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((3 * (a.repeats + 1)) as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} transfers [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let transfers = Transfers {
        a,
        wire,
        quic,
        link,
        strips: &strips,
        payload,
        bar: &bar,
    };
    let mut phases = Vec::new();
    let kernel_before = kernel_udp_rcvbuf_errors();
    for phase in [Phase::RoundTrip, Phase::Up, Phase::Down] {
        phases.push(transfers.time_phase(phase).await?);
    }
    exchange_all(quic, &|_| ShardRequest {
        calls: vec![ShardCall {
            op: ShardOp::Release { handle: HANDLE },
            keep_as: None,
            reply: false,
        }],
    })
    .await?;
    bar.finish_and_clear();
    Ok(json!({
        "mode": "throughput",
        "tensor": shape,
        "elements": elements,
        "payload_bytes": payload,
        "repeats": a.repeats,
        "phases": phases,
        "kernel_udp_rcvbuf_drops": kernel_drops_since(kernel_before),
    }))
}

/// The handle under which the servers keep their strip between the up and down phases.
const HANDLE: u64 = 1;

/// Parses `--tensor`: four positive sizes [B, C, H, W], at least one row per server.
fn tensor_shape(a: &LinkBenchArgs, servers: usize) -> Result<Vec<usize>> {
    let shape: Vec<usize> = a
        .tensor
        .split(',')
        .map(|d| d.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--tensor `{}`: expected comma-separated sizes", a.tensor))?;
    if shape.len() != 4 || shape.contains(&0) {
        bail!("--tensor needs four positive sizes [B, C, H, W]");
    }
    if shape[2] < servers {
        bail!("--tensor has {} rows, fewer than the servers", shape[2]);
    }
    Ok(shape)
}

/// The timed transfers of `--throughput`: every server's row strip, the payload per transfer
/// at the wire dtype, and where the counters are read.
struct Transfers<'a> {
    a: &'a LinkBenchArgs,
    wire: WireDtype,
    quic: &'a [Arc<QuicBackend>],
    link: Option<&'a LinkEmulator>,
    strips: &'a [Tensor],
    payload: u64,
    bar: &'a ProgressBar,
}

impl Transfers<'_> {
    /// Server `i`'s request of `phase`: its strip inline (echoed, or kept under `HANDLE`), or
    /// the kept strip fetched back.
    fn request(&self, i: usize, phase: Phase) -> ShardRequest<Tensor> {
        let call = match phase {
            Phase::RoundTrip => ShardCall::reply(ShardOp::Identity {
                input: Operand::Inline(self.strips[i].clone()),
            }),
            Phase::Up => ShardCall {
                op: ShardOp::Identity {
                    input: Operand::Inline(self.strips[i].clone()),
                },
                keep_as: Some(HANDLE),
                reply: false,
            },
            Phase::Down => ShardCall::reply(ShardOp::Identity {
                input: Operand::Handle(HANDLE),
            }),
        };
        ShardRequest { calls: vec![call] }
    }

    /// One untimed warm-up transfer of `phase` (congestion window, allocations), then
    /// `--repeats` timed ones; their times, rates and byte counts.
    async fn time_phase(&self, phase: Phase) -> Result<Value> {
        let (a, quic, link) = (self.a, self.quic, self.link);
        let mut times = Vec::new();
        let mut quic_bytes = (0u64, 0u64);
        let mut link_delta = LinkStats::default();
        for rep in 0..=a.repeats {
            if phase == Phase::Down {
                // Make sure the handle holds the tensor (the Up phase left it there).
                exchange_all(quic, &|i| self.request(i, Phase::Up)).await?;
            }
            let l0 = link_stats(link);
            let q0 = quic_totals(quic);
            let t = Instant::now();
            let outputs = exchange_all(quic, &|i| self.request(i, phase)).await?;
            let secs = t.elapsed().as_secs_f64();
            if phase != Phase::Up {
                check_echo(self.strips, &outputs, self.wire)?;
            }
            self.bar.inc(1);
            self.bar
                .set_message(format!("{} {:.3} s", phase.name(), secs));
            if rep == 0 {
                continue;
            }
            let q1 = quic_totals(quic);
            let d = link_stats(link).since(&l0);
            times.push(secs);
            quic_bytes.0 += q1.0 - q0.0;
            quic_bytes.1 += q1.1 - q0.1;
            link_delta.up.bytes += d.up.bytes;
            link_delta.down.bytes += d.down.bytes;
            link_delta.up.dropped_packets += d.up.dropped_packets;
            link_delta.down.dropped_packets += d.down.dropped_packets;
        }
        let payload = self.payload;
        let (up, down) = match phase {
            Phase::RoundTrip => (payload, payload),
            Phase::Up => (payload, 0),
            Phase::Down => (0, payload),
        };
        let med = median(&times);
        let reps = a.repeats.max(1) as u64;
        Ok(json!({
            "phase": phase.name(),
            "seconds_median": med,
            "seconds_min": times.iter().copied().fold(f64::INFINITY, f64::min),
            "seconds_all": times,
            "payload_bytes_up": up,
            "payload_bytes_down": down,
            "mb_per_s": (up + down) as f64 / MB / med,
            "quic_bytes_sent_per_transfer": quic_bytes.0 / reps,
            "quic_bytes_received_per_transfer": quic_bytes.1 / reps,
            "link_bytes_up_per_transfer": link_delta.up.bytes / reps,
            "link_bytes_down_per_transfer": link_delta.down.bytes / reps,
            "link_dropped_packets_up": link_delta.up.dropped_packets,
            "link_dropped_packets_down": link_delta.down.dropped_packets,
        }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    RoundTrip,
    Up,
    Down,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::RoundTrip => "round_trip",
            Phase::Up => "up",
            Phase::Down => "down",
        }
    }
}

/// Sends request `make(i)` to every server at once; the outputs of each, in server order.
async fn exchange_all(
    quic: &[Arc<QuicBackend>],
    make: &(dyn Fn(usize) -> ShardRequest<Tensor> + Sync),
) -> Result<Vec<Vec<Tensor>>> {
    let tasks: Vec<_> = quic
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let (b, r) = (b.clone(), make(i));
            tokio::spawn(async move { b.execute(r).await })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.context("transfer task failed")??.outputs);
    }
    Ok(out)
}

/// The echoed strips equal what was sent (exactly for f32; after the wire dtype's rounding
/// otherwise).
fn check_echo(strips: &[Tensor], outputs: &[Vec<Tensor>], wire: WireDtype) -> Result<()> {
    for (i, (s, o)) in strips.iter().zip(outputs).enumerate() {
        let [t] = o.as_slice() else {
            bail!("server {i} answered {} tensors, expected 1", o.len());
        };
        if t.dims() != s.dims() {
            bail!(
                "server {i} echoed shape {:?}, sent {:?}",
                t.dims(),
                s.dims()
            );
        }
        let diff = (t - s)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let tolerance = match wire {
            WireDtype::F32 => 0.0,
            // |x| < ~5 for N(0, 1) data: half an ulp of f16 (2^-8 there) or bf16 (2^-5).
            WireDtype::F16 => 1.0 / 128.0,
            WireDtype::Bf16 => 1.0 / 16.0,
        };
        if diff > tolerance {
            bail!("server {i} echoed a different tensor (max |diff| {diff})");
        }
    }
    Ok(())
}

fn print_throughput(a: &LinkBenchArgs, profile: Option<&LinkProfile>, r: &Value) {
    let link = profile.map_or_else(|| "none (loopback)".to_string(), |p| p.to_string());
    println!(
        "veil bench link --throughput: tensor {} ({:.2} MB at {}), zstd {}, {} server(s), link: {link}",
        r["tensor"],
        r["payload_bytes"].as_f64().unwrap_or(f64::NAN) / MB,
        r["wire"].as_str().unwrap_or("?"),
        a.zstd,
        a.servers,
    );
    println!(
        "{:>10} {:>10} {:>10} {:>14} {:>14} {:>10}",
        "phase", "median s", "MB/s", "QUIC sent MB", "QUIC recv MB", "drops"
    );
    let empty = Vec::new();
    for p in r["phases"].as_array().unwrap_or(&empty) {
        let f = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>10} {:>10.3} {:>10.1} {:>14.3} {:>14.3} {:>10}",
            p["phase"].as_str().unwrap_or("?"),
            f("seconds_median"),
            f("mb_per_s"),
            f("quic_bytes_sent_per_transfer") / MB,
            f("quic_bytes_received_per_transfer") / MB,
            p["link_dropped_packets_up"].as_u64().unwrap_or(0)
                + p["link_dropped_packets_down"].as_u64().unwrap_or(0),
        );
    }
    println!(
        "MB/s = tensor payload bytes at the wire dtype (up + down) / median seconds; MB = 10^6 B"
    );
    println!(
        "kernel UDP receive-buffer drops (system-wide) during the transfers: {}",
        r["kernel_udp_rcvbuf_drops"]
    );
}

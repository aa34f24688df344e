//! `veil bench phone`: what the phone pays for its share of a private generation — peak
//! resident memory, the bytes of weights it reads, the start-up time and the seconds of its own
//! CPU per denoising step — with the shard servers in separate processes, so that the phone
//! process's memory and CPU time are its own.
//!
//! `--config-dir models/configs/sd15` writes seeded random weights for that config (f16 by
//! default, from the `<component>.params.json` lists next to the configs) and a manifest to a
//! temporary folder; `--model DIR` takes a folder as it is. The servers (`bench phone-server`)
//! and the phone (`bench phone-run`) are this executable again, started as child processes;
//! the phone prints one JSON line, which this process completes and prints.
//!
//! `--load phone` is the SDK's start (`Veil::new`: the role's weights, stored precision, the
//! identity from the manifest). `--load full` is how the phone loaded before issue 18: every
//! weight, the U-Net in f32, the identity hashed from the loaded weights (run it on `--dtype
//! f32` weights for the f32 CLIP and VAE of that time).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use veil_core::client::pipeline::{GenerateOptions, LoadRole, StableDiffusion};
use veil_core::model::config::{read_json, ModelPaths};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::model::unet::UNet;
use veil_core::model::weights::WeightFile;
use veil_core::placement::{GnVariant, Policy};
use veil_core::sdk::{
    CancelHandle, GenerationOptions, ProgressListener, ServerConfig, Veil, VeilConfig,
};
use veil_core::transport::{connect_backends, ClientOptions, ServerSpec};
use veil_core::wire::identity::model_identity;
use veil_core::wire::manifest::Manifest;
use veil_server::{spawn_local, ServerLimits, ShardModel};

use crate::bench::{fill_normal, proc_status_mib, splitmix64};

/// The tiny model's CLIP tokenizer: token ids only index the embedding table, so the text
/// encoder's cost does not depend on which vocabulary made them.
const TOKENIZER_JSON: &str = include_str!("../../models/tiny-shapes/tokenizer/tokenizer.json");
const TOKENIZER_CONFIG: &str =
    include_str!("../../models/tiny-shapes/tokenizer/tokenizer_config.json");
const MODEL_INDEX: &str = include_str!("../../models/tiny-shapes/model_index.json");

/// Components with weights, and the file each is written to.
const COMPONENTS: [(&str, &str); 3] = [
    ("text_encoder", "model.safetensors"),
    ("unet", "diffusion_pytorch_model.safetensors"),
    ("vae", "diffusion_pytorch_model.safetensors"),
];

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoredDtype {
    F16,
    F32,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoadArg {
    /// `Veil::new`: the role's weights in their stored precision, identity from the manifest.
    Phone,
    /// Every weight, the U-Net in f32, identity hashed at start (the loading before issue 18).
    Full,
}

#[derive(Args)]
pub struct PhoneBenchArgs {
    /// A folder of diffusers configs with `<component>.params.json` lists beside them
    /// (models/configs/sd15): random weights for it are written to a temporary folder.
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    config_dir: Option<PathBuf>,
    /// A model folder to use as it is instead.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Placement policy of the phone: strict, ppidm or local.
    #[arg(long, default_value = "strict")]
    policy: String,
    /// Shard servers (separate processes; none under `local`).
    #[arg(long, default_value_t = 4)]
    servers: usize,
    /// Latent side; the image side is this times the VAE's factor (32 = 256 px for SD).
    #[arg(long, default_value_t = 32)]
    latent: usize,
    /// Denoising steps of the measured generation (the last one is timed; at least 2, so the
    /// timed step holds no text encoding).
    #[arg(long, default_value_t = 2)]
    steps: u32,
    /// Precision of the random weights.
    #[arg(long, value_enum, default_value_t = StoredDtype::F16)]
    dtype: StoredDtype,
    /// How the phone loads (see the module documentation).
    #[arg(long, value_enum, default_value_t = LoadArg::Phone)]
    load: LoadArg,
    /// T-GATE-style attention reuse from this step on (0-based; at most --steps − 1, so the
    /// timed last step reuses): what the phone still does in a reused step.
    #[arg(long)]
    reuse_attention_from: Option<u32>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep the random model folder (its path is printed) for later runs with `--model`.
    #[arg(long)]
    keep: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// `bench phone-server`: one shard server over a model folder; prints its address,
/// fingerprint and token as one JSON line and serves until killed.
#[derive(Args)]
pub struct PhoneServerArgs {
    #[arg(long)]
    model: PathBuf,
}

/// `bench phone-run`: the phone process.
#[derive(Args)]
pub struct PhoneRunArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    policy: String,
    /// JSON list of {address, fingerprint, token}.
    #[arg(long)]
    servers_json: Option<PathBuf>,
    #[arg(long)]
    side: usize,
    #[arg(long)]
    steps: u32,
    #[arg(long, value_enum)]
    load: LoadArg,
    #[arg(long)]
    reuse_attention_from: Option<u32>,
}

pub fn run(a: PhoneBenchArgs) -> Result<()> {
    if a.steps < 2 {
        bail!("--steps must be at least 2 (the last step is timed)");
    }
    if a.reuse_attention_from
        .is_some_and(|r| r == 0 || r >= a.steps)
    {
        bail!("--reuse-attention-from must be a step after the first and before --steps");
    }
    let policy = Policy::parse(&a.policy, GnVariant::Exact)?;
    let (dir, temporary) = match (&a.model, &a.config_dir) {
        (Some(m), _) => (m.clone(), false),
        (None, Some(c)) => {
            let dir = std::env::temp_dir().join(format!("veil-bench-phone-{}", std::process::id()));
            write_random_model(c, &dir, a.dtype, a.seed)?;
            (dir, !a.keep)
        }
        (None, None) => bail!("give --config-dir or --model"),
    };
    let result = measure(&a, policy, &dir);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    } else if a.model.is_none() {
        eprintln!("kept the random model in {}", dir.display());
    }
    let mut report = result?;
    report["model"] = json!(a.model.as_ref().map(|m| m.display().to_string()));
    report["config_dir"] = json!(a.config_dir.as_ref().map(|c| c.display().to_string()));
    report["weights_dtype"] = json!(match (&a.model, a.dtype) {
        (Some(_), _) => "as stored",
        (None, StoredDtype::F16) => "f16",
        (None, StoredDtype::F32) => "f32",
    });
    if a.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(())
}

fn measure(a: &PhoneBenchArgs, policy: Policy, dir: &Path) -> Result<Value> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let paths = ModelPaths::new(dir)?;
    let factor = paths.vae_config()?.downsample_factor();
    let n = if policy.needs_backends() {
        a.servers
    } else {
        0
    };
    let mut servers = Servers(Vec::new());
    let mut configs = Vec::new();
    let bar = spinner(&format!("starting {n} shard server processes"));
    for _ in 0..n {
        let (child, cfg) = start_server(&exe, dir)?;
        servers.0.push(child);
        configs.push(cfg);
    }
    bar.finish_and_clear();
    let list = dir.join(format!(".bench-servers-{}.json", std::process::id()));
    std::fs::write(&list, Value::Array(configs).to_string())?;
    let bar = spinner("phone: load and generate");
    let out = Command::new(&exe)
        .args(["bench", "phone-run", "--model"])
        .arg(dir)
        .args(["--policy", &a.policy, "--servers-json"])
        .arg(&list)
        .args(["--side", &(a.latent * factor).to_string()])
        .args(["--steps", &a.steps.to_string()])
        .args(
            a.reuse_attention_from
                .map(|r| ["--reuse-attention-from".to_string(), r.to_string()])
                .into_iter()
                .flatten(),
        )
        .args([
            "--load",
            if a.load == LoadArg::Full {
                "full"
            } else {
                "phone"
            },
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running the phone process")?;
    bar.finish_and_clear();
    let _ = std::fs::remove_file(&list);
    drop(servers);
    if !out.status.success() {
        bail!("the phone process failed ({})", out.status);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let mut report: Value = serde_json::from_str(line.trim()).context("the phone's report")?;
    report["servers"] = json!(n);
    report["latent"] = json!(a.latent);
    report["host_cpus"] = json!(std::thread::available_parallelism().map_or(0, |p| p.get()));
    report["host_load_1min"] = json!(load_average());
    Ok(report)
}

/// Kills the server processes when dropped (also on an early return).
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_server(exe: &Path, dir: &Path) -> Result<(Child, Value)> {
    let mut child = Command::new(exe)
        .args(["bench", "phone-server", "--model"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a server process")?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    match serde_json::from_str::<Value>(line.trim()) {
        Ok(v) => Ok((child, v)),
        Err(_) => {
            let _ = child.kill();
            bail!("a server process did not start: {:?}", line.trim())
        }
    }
}

fn spinner(msg: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(msg.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

fn load_average() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Random model

/// Writes a diffusers folder for the configs in `config_dir`: seeded random weights (as
/// `veil bench unet` draws them) in `dtype`, the tiny model's tokenizer, and a manifest.
fn write_random_model(config_dir: &Path, dir: &Path, dtype: StoredDtype, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("model_index.json"), MODEL_INDEX)?;
    let tok = dir.join("tokenizer");
    std::fs::create_dir_all(&tok)?;
    std::fs::write(tok.join("tokenizer.json"), TOKENIZER_JSON)?;
    std::fs::write(tok.join("tokenizer_config.json"), TOKENIZER_CONFIG)?;
    let sched = dir.join("scheduler");
    std::fs::create_dir_all(&sched)?;
    std::fs::copy(
        config_dir.join("scheduler/scheduler_config.json"),
        sched.join("scheduler_config.json"),
    )
    .context("copying scheduler/scheduler_config.json")?;
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let dt = match dtype {
        StoredDtype::F16 => DType::F16,
        StoredDtype::F32 => DType::F32,
    };
    for (c, (component, file)) in COMPONENTS.iter().enumerate() {
        let out = dir.join(component);
        std::fs::create_dir_all(&out)?;
        std::fs::copy(
            config_dir.join(component).join("config.json"),
            out.join("config.json"),
        )
        .with_context(|| format!("copying {component}/config.json"))?;
        let list = config_dir.join(format!("{component}.params.json"));
        let params: Vec<(String, Vec<usize>)> = read_json(&list)?;
        let bar = ProgressBar::new(params.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(format!("random {component}"));
        let mut tensors = HashMap::new();
        for (i, (name, shape)) in params.into_iter().enumerate() {
            let s = splitmix64(seed ^ splitmix64(((c as u64) << 32) | i as u64));
            let t = random_parameter(&name, &shape, s, threads)?.to_dtype(dt)?;
            tensors.insert(name, t);
            bar.inc(1);
        }
        bar.finish_and_clear();
        candle_core::safetensors::save(&tensors, out.join(file))?;
    }
    let bar = spinner("hashing the manifest");
    Manifest::build(dir, &mut |_, _, _| {})?.write(dir)?;
    bar.finish_and_clear();
    Ok(())
}

/// Fan-in-scaled normals for matrices and kernels, ≈ 1 for norm scales, small biases.
fn random_parameter(name: &str, shape: &[usize], seed: u64, threads: usize) -> Result<Tensor> {
    let (mean, std) = if shape.len() >= 2 {
        let fan_in: usize = shape[1..].iter().product();
        (0.0, 1.0 / (fan_in.max(1) as f32).sqrt())
    } else if name.ends_with(".weight") {
        (1.0, 0.02)
    } else {
        (0.0, 0.01)
    };
    let mut v = vec![0f32; shape.iter().product()];
    fill_normal(&mut v, seed, mean, std, threads);
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

// ---------------------------------------------------------------------------------------------
// The server process

pub fn server(a: PhoneServerArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let model = ShardModel::load(&a.model, &Device::Cpu)?;
        let cluster = spawn_local(1, Arc::new(model), ServerLimits::default())?;
        let s = cluster.specs.first().context("no server")?;
        let line = json!({
            "address": s.address,
            "fingerprint": s.fingerprint.to_string(),
            "token": s.token,
        });
        let mut out = std::io::stdout();
        writeln!(out, "{line}")?;
        out.flush()?;
        std::future::pending::<()>().await;
        anyhow::Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// The phone process

/// CPU seconds (user + system, all threads) this process has used so far (Linux).
fn cpu_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // USER_HZ is 100 on Linux for every architecture's /proc interface.
    (ticks(11) + ticks(12)) / 100.0
}

fn mib_bytes(key: &str) -> Option<u64> {
    proc_status_mib(key).map(|m| (m * 1024.0 * 1024.0) as u64)
}

/// (step, CPU seconds, wall instant) at the end of every step.
#[derive(Default)]
struct StepClock(Mutex<Vec<(u32, f64, Instant)>>);

impl StepClock {
    fn mark(&self, step: u32) {
        if let Ok(mut v) = self.0.lock() {
            v.push((step, cpu_seconds(), Instant::now()));
        }
    }
    /// CPU and wall seconds of the last step.
    fn last_step(&self) -> Option<(f64, f64)> {
        let v = self.0.lock().ok()?;
        let [.., a, b] = v.as_slice() else {
            return None;
        };
        Some((b.1 - a.1, b.2.duration_since(a.2).as_secs_f64()))
    }
}

impl ProgressListener for StepClock {
    fn on_progress(&self, step: u32, _total: u32, _preview: Option<veil_core::sdk::StepPreview>) {
        self.mark(step);
    }
}

pub fn phone(a: PhoneRunArgs) -> Result<()> {
    let configs: Vec<ServerConfig> = match &a.servers_json {
        Some(p) => {
            let v: Vec<Value> = read_json(p)?;
            v.iter()
                .map(|s| ServerConfig {
                    address: s["address"].as_str().unwrap_or_default().into(),
                    fingerprint: s["fingerprint"].as_str().unwrap_or_default().into(),
                    token: s["token"].as_str().unwrap_or_default().into(),
                    tenant: None,
                })
                .collect()
        }
        None => vec![],
    };
    let policy = Policy::parse(&a.policy, GnVariant::Exact)?;
    let role = match a.load {
        LoadArg::Phone => LoadRole::Phone {
            policy,
            servers: configs.len(),
        },
        LoadArg::Full => LoadRole::Full,
    };
    let weight_bytes = role_weight_bytes(&a.model, role)?;
    let rt = tokio::runtime::Runtime::new()?;
    let clock = Arc::new(StepClock::default());
    let started = Instant::now();
    let (load_seconds, rss_after_load, gen_seconds) = match a.load {
        LoadArg::Phone => rt.block_on(run_sdk(&a, configs, clock.clone(), started))?,
        LoadArg::Full => rt.block_on(run_full(&a, policy, &configs, clock.clone(), started))?,
    };
    let (step_cpu, step_wall) = clock.last_step().context("no step was reported")?;
    let report = json!({
        "policy": a.policy,
        "load": if a.load == LoadArg::Full { "full" } else { "phone" },
        "image_side": a.side,
        "steps": a.steps,
        "reuse_attention_from": a.reuse_attention_from,
        "phone_peak_rss_bytes": mib_bytes("VmHWM"),
        "phone_rss_after_load_bytes": rss_after_load,
        "phone_weight_bytes": weight_bytes,
        "load_seconds": load_seconds,
        "phone_seconds_per_step": step_cpu,
        "step_wall_seconds": step_wall,
        "generation_wall_seconds": gen_seconds,
        "phone_threads": candle_core::utils::get_num_threads(),
    });
    println!("{report}");
    Ok(())
}

async fn run_sdk(
    a: &PhoneRunArgs,
    servers: Vec<ServerConfig>,
    clock: Arc<StepClock>,
    started: Instant,
) -> Result<(f64, Option<u64>, f64)> {
    let mut cfg = VeilConfig::new(&a.model, servers);
    cfg.policy = a.policy.parse()?;
    // A benchmark may measure the research placement too.
    cfg.allow_research_policies = true;
    cfg.device = veil_core::sdk::Device::Cpu;
    let veil = Veil::new(cfg)?;
    let load = started.elapsed().as_secs_f64();
    let rss = mib_bytes("VmRSS");
    let o = GenerationOptions {
        steps: Some(a.steps),
        seed: Some(1),
        width: Some(a.side as u32),
        height: Some(a.side as u32),
        scheduler: Some(veil_core::sdk::Scheduler::Ddim),
        reuse_attention_from: a.reuse_attention_from,
        ..Default::default()
    };
    let t = Instant::now();
    clock.mark(0);
    let listener: Arc<dyn ProgressListener> = clock;
    veil.generate("a photo of a cat", &o, Some(listener), &CancelHandle::new())
        .await?;
    Ok((load, rss, t.elapsed().as_secs_f64()))
}

async fn run_full(
    a: &PhoneRunArgs,
    policy: Policy,
    servers: &[ServerConfig],
    clock: Arc<StepClock>,
    started: Instant,
) -> Result<(f64, Option<u64>, f64)> {
    let sd = StableDiffusion::load(&a.model, &Device::Cpu)?;
    let id = model_identity(&sd.unet, sd.unet_engine.weights());
    let specs = servers
        .iter()
        .map(|s| {
            Ok(ServerSpec {
                address: s.address.clone(),
                fingerprint: s.fingerprint.parse()?,
                token: s.token.clone(),
                tenant: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let quic = connect_backends(&specs, id, &ClientOptions::default()).await?;
    let load = started.elapsed().as_secs_f64();
    let rss = mib_bytes("VmRSS");
    let backends: Vec<Arc<dyn veil_core::placement::ShardBackend<Tensor>>> = quic
        .iter()
        .map(|b| b.clone() as Arc<dyn veil_core::placement::ShardBackend<Tensor>>)
        .collect();
    let opts = GenerateOptions {
        prompt: "a photo of a cat".into(),
        steps: a.steps as usize,
        seed: 1,
        width: a.side,
        height: a.side,
        scheduler: SchedulerKind::Ddim,
        policy,
        attention_reuse_from: a.reuse_attention_from.map(|r| r as usize),
        ..Default::default()
    };
    let t = Instant::now();
    clock.mark(0);
    sd.generate(&opts, &backends, &mut |p| clock.mark(p.step as u32))
        .await?;
    for b in &quic {
        b.close().await;
    }
    Ok((load, rss, t.elapsed().as_secs_f64()))
}

/// Bytes of weights `role` holds after loading `dir`: a matrix or kernel stored in f16/bf16 at
/// 2 bytes, everything else at 4 (as `WeightFile::load_stored`); the U-Net of `Full` in f32.
fn role_weight_bytes(dir: &Path, role: LoadRole) -> Result<u64> {
    let paths = ModelPaths::new(dir)?;
    let stored = |file: &WeightFile, keep: &dyn Fn(&str) -> bool| -> u64 {
        let half = file.storage_dtype() != DType::F32;
        file.names_and_shapes()
            .iter()
            .filter(|(n, _)| keep(n))
            .map(|(_, s)| {
                let width = if half && s.len() >= 2 { 2 } else { 4 };
                s.iter().product::<usize>() as u64 * width
            })
            .sum()
    };
    let clip = WeightFile::open_component(&paths.component("text_encoder"), "model")?;
    let vae = WeightFile::open_component(&paths.component("vae"), "diffusion_pytorch_model")?;
    let unet_file =
        WeightFile::open_component(&paths.component("unet"), "diffusion_pytorch_model")?;
    let unet = UNet::new(&paths.unet_config()?)?;
    let mut total = stored(&clip, &|_| true);
    match role {
        LoadRole::Full => {
            total += stored(&vae, &|_| true);
            total += unet
                .parameters()
                .iter()
                .map(|(_, s)| s.iter().product::<usize>() as u64 * 4)
                .sum::<u64>();
        }
        LoadRole::Phone { .. } => {
            total += stored(&vae, &|n| {
                n.starts_with("decoder.") || n.starts_with("post_quant_conv.")
            });
            let keep: std::collections::HashSet<String> = role
                .unet_parameters(&unet)
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            total += stored(&unet_file, &|n| keep.contains(n));
        }
    }
    Ok(total)
}

fn print_table(r: &Value) {
    let gb = |k: &str| {
        r[k].as_u64()
            .map_or("-".into(), |b| format!("{:.3} GB", b as f64 / 1e9))
    };
    let s = |k: &str| r[k].as_f64().map_or("-".into(), |v| format!("{v:.2} s"));
    println!(
        "phone under {} ({} load), {} servers, {} px:",
        r["policy"].as_str().unwrap_or("?"),
        r["load"].as_str().unwrap_or("?"),
        r["servers"],
        r["image_side"]
    );
    println!("  peak RSS             {}", gb("phone_peak_rss_bytes"));
    println!(
        "  RSS after load       {}",
        gb("phone_rss_after_load_bytes")
    );
    println!("  weights held         {}", gb("phone_weight_bytes"));
    println!("  load                 {}", s("load_seconds"));
    println!("  phone CPU per step   {}", s("phone_seconds_per_step"));
    println!("  wall per step        {}", s("step_wall_seconds"));
}

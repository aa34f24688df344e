//! `veil`: private text-to-image generation from the command line.
//!
//! - `veil generate "<prompt>" --model DIR --policy local|ppidm --servers N …` writes a PNG and,
//!   with `--stats`, a JSON of time and traffic per shard backend.
//! - `veil plan --config unet/config.json --width 512 --height 512 --servers 4 --policy ppidm`
//!   prints PPIDM-style traffic tables and the offloaded FLOP share from the config alone.

mod bench;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use veil_core::model::config::{read_json, UNetConfig};
use veil_core::model::pipeline::{GenerateOptions, StableDiffusion};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::model::unet::UNet;
use veil_core::placement::plan::{plan, PlanInput};
use veil_core::placement::{GnVariant, Policy, WireDtype};

#[derive(Parser)]
#[command(
    name = "veil",
    version,
    about = "Private text-to-image generation over non-colluding shard servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an image from a prompt.
    Generate(GenerateArgs),
    /// Account bytes, round trips and FLOPs per step for a U-Net config (no weights needed).
    Plan(PlanArgs),
    /// Time one U-Net forward pass with random weights (CPU).
    Bench(bench::BenchArgs),
}

#[derive(Args)]
struct PolicyArgs {
    /// Placement policy: local (everything on the device) or ppidm (the paper's split).
    #[arg(long, default_value = "local")]
    policy: String,
    /// Number of shard backends (in-process for now).
    #[arg(long, default_value_t = 2)]
    servers: usize,
    /// GroupNorm under ppidm: exact (global statistics) or paper (block-local, lossy).
    #[arg(long, default_value = "exact")]
    gn: String,
    /// Tensor dtype on the wire: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    wire: String,
}

impl PolicyArgs {
    fn policy(&self) -> Result<Policy> {
        let gn: GnVariant = self.gn.parse()?;
        Ok(Policy::parse(&self.policy, gn)?)
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// The prompt (stays on this device).
    prompt: String,
    /// Diffusers-layout model folder.
    #[arg(long, default_value = "models/tiny-random")]
    model: PathBuf,
    #[command(flatten)]
    placement: PolicyArgs,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale (≤ 1 disables guidance).
    #[arg(long, default_value_t = 5.0)]
    guidance: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Image width in pixels (default: the U-Net's sample_size × the VAE factor).
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// ddim, dpm++2m or euler.
    #[arg(long, default_value = "ddim")]
    scheduler: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Initial latents: a safetensors file with one tensor `latents` [1, 4, H/8, W/8].
    #[arg(long)]
    latents: Option<PathBuf>,
    #[arg(long, default_value = "out.png")]
    out: PathBuf,
    /// Write time and traffic (per backend) as JSON.
    #[arg(long)]
    stats: Option<PathBuf>,
}

#[derive(Args)]
struct PlanArgs {
    /// A diffusers `unet/config.json`.
    #[arg(long)]
    config: PathBuf,
    #[arg(long, default_value_t = 512)]
    width: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    #[command(flatten)]
    placement: PolicyArgs,
    /// U-Net batch per step (2 = classifier-free guidance).
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Text tokens per prompt.
    #[arg(long, default_value_t = 77)]
    context_len: usize,
    /// Pixels per latent cell (8 for SD's VAE).
    #[arg(long, default_value_t = 8)]
    vae_factor: usize,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(a) => generate(a),
        Command::Plan(a) => plan_cmd(a),
        Command::Bench(a) => bench::run(a),
    }
}

fn generate(a: GenerateArgs) -> Result<()> {
    let policy = a.placement.policy()?;
    let wire: WireDtype = a.placement.wire.parse()?;
    let scheduler: SchedulerKind = a.scheduler.parse()?;
    let device = Device::Cpu;
    let sd = StableDiffusion::load(&a.model, &device)
        .with_context(|| format!("loading model folder {}", a.model.display()))?;
    let f = sd.vae.config.downsample_factor();
    let default_side = sd.unet.config.sample_size.unwrap_or(64) * f;
    let latents = match &a.latents {
        Some(p) => {
            let mut m = candle_core::safetensors::load(p, &device)
                .with_context(|| format!("reading latents {}", p.display()))?;
            Some(
                m.remove("latents")
                    .with_context(|| format!("{} has no tensor `latents`", p.display()))?,
            )
        }
        None => None,
    };
    let opts = GenerateOptions {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        steps: a.steps,
        guidance: a.guidance,
        seed: a.seed,
        width: a.width.unwrap_or(default_side),
        height: a.height.unwrap_or(default_side),
        scheduler,
        latents,
        policy,
        wire,
    };
    if a.placement.servers == 0 && policy.needs_backends() {
        bail!(
            "policy {} needs at least one server (--servers N)",
            policy.name()
        );
    }
    let backends = if policy.needs_backends() {
        sd.in_process_backends(a.placement.servers)
    } else {
        vec![]
    };
    let bar = ProgressBar::new(opts.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} denoising [{bar:30}] {pos}/{len} steps {elapsed_precise} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let generation =
        rt.block_on(sd.generate(&opts, &backends, &mut |p| bar.set_position(p.step as u64)))?;
    bar.finish_and_clear();
    std::fs::write(&a.out, generation.png()?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let s = &generation.stats;
    eprintln!(
        "wrote {} ({}x{}, {} steps, policy {}, {} s, up {:.2} MB, down {:.2} MB, {} round trips)",
        a.out.display(),
        opts.width,
        opts.height,
        s.steps,
        policy.name(),
        format_args!("{:.2}", s.wall_seconds),
        s.bytes_up as f64 / 1048576.0,
        s.bytes_down as f64 / 1048576.0,
        s.round_trips
    );
    if let Some(p) = &a.stats {
        std::fs::write(p, serde_json::to_string_pretty(s)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn plan_cmd(a: PlanArgs) -> Result<()> {
    let policy = a.placement.policy()?;
    let wire: WireDtype = a.placement.wire.parse()?;
    let cfg: UNetConfig = read_json(&a.config)?;
    let unet = UNet::new(&cfg)?;
    if a.vae_factor == 0
        || !a.width.is_multiple_of(a.vae_factor)
        || !a.height.is_multiple_of(a.vae_factor)
    {
        bail!(
            "{}x{} is not a multiple of {}",
            a.width,
            a.height,
            a.vae_factor
        );
    }
    let p = plan(
        &unet,
        &PlanInput {
            latent_height: a.height / a.vae_factor,
            latent_width: a.width / a.vae_factor,
            batch: a.batch,
            context_len: a.context_len,
            servers: a.placement.servers,
            policy,
            wire,
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{}", p.to_table());
    }
    Ok(())
}

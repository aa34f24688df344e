//! `veil`: private text-to-image (and image-to-image) generation from the command line.
//!
//! - `veil generate "<prompt>" --model DIR --policy local|ppidm --servers N …` writes a PNG and,
//!   with `--stats`, a JSON of time and traffic per shard backend. The shard backends run
//!   in-process (`--servers N`), on N real QUIC servers spawned on loopback
//!   (`--local-servers N`), or on remote `veil-server`s (`--server-list servers.toml`).
//!   `--init-image PNG --strength S [--noise FILE]` starts from an image (image-to-image).
//! - `veil plan --config unet/config.json --width 512 --height 512 --servers 4 --policy ppidm`
//!   prints PPIDM-style traffic tables and the offloaded FLOP share from the config alone.
//! - `veil dataset`, `veil score` and `veil eval`: the shapes dataset, the adherence scorer and
//!   the evaluation report (docs/EVAL.md: utility, fidelity, traffic, FLOPs, attacks).

mod bench;
mod codec_args;
mod dataset_cmd;
mod eval;
mod eval_adherence;
mod eval_attacks;
mod eval_generations;
mod eval_report;
mod img2img_args;
mod link_bench;
mod model_bench;
mod model_cmd;
mod obf_bench;
mod obfuscation_args;
mod phone_bench;
mod preview_cmd;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use obfuscation_args::{obfuscation_key, ObfuscationArgs};
use veil_core::client::guidance::GuidanceHalves;
use veil_core::client::pipeline::{GenerateOptions, LoadRole, StableDiffusion};
use veil_core::client::plan::{plan, PlanInput};
use veil_core::model::config::{read_json, UNetConfig};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::model::unet::UNet;
use veil_core::placement::{GnVariant, Policy, WireDtype};
use veil_core::transport::{connect_strips, load_server_list, ClientOptions, ReplicaSet};
use veil_core::wire::identity::model_identity;
use veil_core::wire::manifest::{component_hashes, full_model_identity, resolve_unet_identity};
use veil_server::{spawn_local, LocalCluster, ServerLimits, ShardModel};

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
    Generate(Box<GenerateArgs>),
    /// Account bytes, round trips and FLOPs per step for a U-Net config (no weights needed).
    Plan(PlanArgs),
    /// Time one U-Net forward pass with random weights (CPU).
    Bench(bench::BenchArgs),
    /// Write the procedural shapes dataset (PNGs + captions.jsonl), deterministic by seed.
    Dataset(dataset_cmd::DatasetArgs),
    /// Score pictures against their captions (colour, shape, position, size of the main object).
    Score(dataset_cmd::ScoreArgs),
    /// Evaluate every policy on a trained model: adherence, fidelity, link traffic, FLOPs and
    /// the attack suite; writes docs/EVAL.md and PNG grids.
    Eval(eval::EvalArgs),
    /// Detect sensitive attributes in a prompt and print the candidate prompts the obfuscated
    /// policy would send (order shuffled as it would be sent).
    Obfuscate(ObfuscateArgs),
    /// Write `veil-manifest.json` into a model folder: every file's SHA-256 and the U-Net
    /// shard identity, so phones start without reading the servers' weights.
    Manifest(model_cmd::ManifestArgs),
    /// Re-hash a model folder against its manifest.
    Verify(model_cmd::VerifyArgs),
    /// PSNR (capped at 100 dB for identical pictures) and the largest pixel difference between two
    /// pictures of the same size.
    Compare(model_cmd::CompareArgs),
    /// Fit the progress preview on real latents; write MODEL/vae/latent_preview.json.
    PreviewFit(preview_cmd::PreviewFitArgs),
    /// Split a LoRA adapter into the shard servers' part and the phone's (hand operators only
    /// theirs: under `strict` the attention layers' adaptation stays on the phone).
    LoraSplit(model_cmd::LoraSplitArgs),
}

#[derive(Args)]
struct ObfuscateArgs {
    /// The prompt.
    prompt: String,
    /// Extra lexicon files (TOML or JSON, same shape as the built-in one); repeatable.
    #[arg(long)]
    lexicon: Vec<PathBuf>,
    /// Use only the given lexicons, not the built-in gender/age/ethnicity one.
    #[arg(long)]
    no_builtin: bool,
    /// Most candidates sent (K_max).
    #[arg(long, default_value_t = 8)]
    k_max: usize,
    /// The user's key file (as `veil generate --key-file`); default: a key for this run only.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Print one JSON object: {"spans": [{category, text, start, end}…], "candidates": […]}.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PolicyArgs {
    /// Placement policy: local (everything on the device), ppidm (the paper's split), strict
    /// (each server confined to its own strip; the prompt never leaves the device) or
    /// obfuscated (one server runs the early steps of K candidate prompts; see --server-steps).
    #[arg(long, default_value = "local")]
    policy: String,
    /// Number of in-process shard backends (see --local-servers / --server-list for QUIC).
    #[arg(long, default_value_t = 2)]
    servers: usize,
    /// GroupNorm under ppidm: exact (global statistics) or paper (block-local, lossy).
    #[arg(long, default_value = "exact")]
    gn: String,
    /// Tensor dtype on the wire: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    wire: String,
    /// Which servers a guided step's two halves go to (default: the policy's own — apart
    /// under strict). `together` puts both halves of a strip on one server, which lets it
    /// test candidate prompts exactly: for measurements only.
    #[arg(long, value_enum)]
    guidance_halves: Option<HalvesArg>,
}

/// `--guidance-halves`.
#[derive(Clone, Copy, ValueEnum)]
enum HalvesArg {
    /// Conditional and unconditional halves on disjoint server groups (the phone runs the
    /// unconditional half when there are fewer than 4 servers).
    Apart,
    /// Both halves of a strip on the same server (research only).
    Together,
}

impl PolicyArgs {
    fn policy(&self) -> Result<Policy> {
        let gn: GnVariant = self.gn.parse()?;
        Ok(Policy::parse(&self.policy, gn)?)
    }

    fn guidance_halves(&self) -> Option<GuidanceHalves> {
        self.guidance_halves.map(|h| match h {
            HalvesArg::Apart => GuidanceHalves::Apart,
            HalvesArg::Together => GuidanceHalves::Together,
        })
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
    /// ddim, dpm++2m, euler, euler-a (Euler Ancestral) or lcm.
    #[arg(long, default_value = "ddim")]
    scheduler: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Text-to-image's initial latents (diffusers' `latents=`): a safetensors file with one
    /// tensor `latents` [1, 4, H/8, W/8].
    #[arg(long)]
    latents: Option<PathBuf>,
    /// A LoRA adapter for the U-Net (safetensors, diffusers/peft or kohya naming) merged at load,
    /// as FILE or FILE:SCALE (scale 1 by default); repeat for several. Under `strict` the
    /// phone merges the attention layers' part, the servers (started with the same `--lora`)
    /// the rest; the handshake's model identity covers the adapters.
    #[arg(long, value_name = "FILE[:SCALE]")]
    lora: Vec<String>,
    #[command(flatten)]
    img2img: img2img_args::Img2ImgArgs,
    #[arg(long, default_value = "out.png")]
    out: PathBuf,
    /// Where this device's share runs.
    #[arg(long, value_enum, default_value_t)]
    device: model_cmd::DeviceArg,
    /// Write time and traffic (per backend) as JSON.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Shard servers to use, in strip order (`[[server]]` tables with address, fingerprint,
    /// token or token_file); overrides --servers.
    #[arg(long, conflicts_with = "local_servers")]
    server_list: Option<PathBuf>,
    /// Spawn N real QUIC shard servers on 127.0.0.1 in this process (fresh certificates and
    /// tokens) and drive them over the wire; overrides --servers.
    #[arg(long)]
    local_servers: Option<usize>,
    /// zstd level for tensors on the wire (byte planes split before zstd); 0 = off. QUIC
    /// servers only.
    #[arg(long, default_value_t = 0)]
    zstd: i32,
    #[command(flatten)]
    codec: codec_args::CodecArgs,
    /// Seconds a QUIC shard request may take before the generation fails.
    #[arg(long, default_value_t = 120.0)]
    request_timeout: f64,
    /// Write the view audit (what every server received, per resolution; docs/AUDIT.md).
    #[arg(long)]
    audit: Option<PathBuf>,
    /// T-GATE-style reducer: from this step on, reuse each transformer block's attention
    /// output from the step before instead of recomputing it (saves strict's gathers).
    #[arg(long)]
    reuse_attention_from: Option<usize>,
    #[command(flatten)]
    obfuscation: ObfuscationArgs,
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
    /// Account a late step of the attention-reuse reducer (no gathers for attention).
    #[arg(long)]
    reuse_attention: bool,
    #[command(flatten)]
    codec: codec_args::CodecArgs,
    #[command(flatten)]
    projection: codec_args::ProjectionArgs,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(a) => generate(*a),
        Command::Plan(a) => plan_cmd(a),
        Command::Bench(a) => bench::run(a),
        Command::Dataset(a) => dataset_cmd::dataset(a),
        Command::Score(a) => dataset_cmd::score(a),
        Command::Eval(a) => eval::run(a),
        Command::Obfuscate(a) => obfuscate_cmd(a),
        Command::Manifest(a) => model_cmd::manifest(a),
        Command::Verify(a) => model_cmd::verify(a),
        Command::Compare(a) => model_cmd::compare(a),
        Command::PreviewFit(a) => preview_cmd::run(a),
        Command::LoraSplit(a) => model_cmd::lora_split(a),
    }
}

fn obfuscate_cmd(a: ObfuscateArgs) -> Result<()> {
    use veil_core::obfuscation::{candidates_with_key, Lexicon, ObfuscationKey};
    let mut lex = if a.no_builtin {
        Lexicon::default()
    } else {
        Lexicon::builtin()?
    };
    for path in &a.lexicon {
        lex.extend(Lexicon::from_file(path)?);
    }
    let spans = lex.detect(&a.prompt);
    let key = obfuscation_key(a.key_file.as_ref())?;
    let key = key.as_deref().unwrap_or_else(|| ObfuscationKey::process());
    let set = candidates_with_key(&a.prompt, &spans, &lex, a.k_max, key, &mut rand::rng())?;
    if a.json {
        let spans: Vec<serde_json::Value> = spans
            .iter()
            .map(|s| {
                serde_json::json!({
                    "category": s.category,
                    "text": s.text,
                    "start": s.start,
                    "end": s.end,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"spans": spans, "candidates": set.prompts})
        );
        return Ok(());
    }
    if spans.is_empty() {
        println!("no sensitive attribute found: the prompt is its only candidate");
    }
    for s in &spans {
        println!(
            "{:<10} {:<14} bytes {}..{}  \"{}\"",
            s.category, s.value, s.start, s.end, s.text
        );
    }
    println!(
        "{} candidates of {} combinations (K_max {}), in send order:",
        set.prompts.len(),
        set.combinations,
        a.k_max
    );
    for p in &set.prompts {
        println!("  {p}");
    }
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    let policy = a.placement.policy()?;
    let wire: WireDtype = a.placement.wire.parse()?;
    let scheduler: SchedulerKind = a.scheduler.parse()?;
    let device = a.device.select()?;
    // With remote servers this process is the phone: it reads only its own layers.
    let role = match &a.server_list {
        Some(path) if policy.needs_backends() => LoadRole::Phone {
            policy,
            servers: load_server_list(path)
                .with_context(|| format!("reading server list {}", path.display()))?
                .len(),
        },
        _ => LoadRole::Full,
    };
    let mut sd = StableDiffusion::load_for(&a.model, &device, role)
        .with_context(|| format!("loading model folder {}", a.model.display()))?;
    for arg in &a.lora {
        let (path, scale) = veil_core::model::lora::parse_lora_arg(arg)?;
        sd = sd
            .with_lora(&path, scale)
            .with_context(|| format!("merging LoRA adapter {}", path.display()))?;
    }
    let sd = Arc::new(sd);
    let opts = generate_options(&a, &sd, &device, policy, wire, scheduler)?;
    let quic = check_servers(&a, policy)?;
    let bar = ProgressBar::new(opts.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} denoising [{bar:30}] {pos}/{len} steps {elapsed_precise} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let rt = if quic {
        // Real servers (and their request tasks) share this process: use worker threads.
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    };
    let generation = rt.block_on(run_generation(&a, &sd, &opts, quic, &device, &bar));
    let (generation, wire_bytes) = generation?;
    bar.finish_and_clear();
    print_generation(&a, &opts, &generation)?;
    write_generation_reports(&a, policy, &generation, wire_bytes)
}

/// The generation's options from the arguments (initial latents read from `--latents`, the
/// obfuscation settings only under `obfuscated`).
fn generate_options(
    a: &GenerateArgs,
    sd: &StableDiffusion,
    device: &Device,
    policy: Policy,
    wire: WireDtype,
    scheduler: SchedulerKind,
) -> Result<GenerateOptions> {
    let f = sd.vae.config.downsample_factor();
    let default_side = sd.unet.config.sample_size.unwrap_or(64) * f;
    let latents = match &a.latents {
        Some(p) => Some(img2img_args::read_tensor(p, "latents", device)?),
        None => None,
    };
    let img2img = a.img2img.load(device)?;
    let (width, height) = img2img.size(a.width, a.height, default_side)?;
    Ok(GenerateOptions {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        steps: a.steps,
        guidance: a.guidance,
        seed: a.seed,
        width,
        height,
        scheduler,
        latents,
        init_image: img2img.image,
        strength: img2img.strength,
        noise: img2img.noise,
        mask: img2img.mask,
        policy,
        wire,
        attention_reuse_from: a.reuse_attention_from,
        stale_sync_from: a.codec.stale_sync_from(),
        guidance_halves: a.placement.guidance_halves(),
        capture_from_step: None,
        obfuscation: if policy == Policy::Obfuscated {
            a.obfuscation.options(device)?
        } else {
            Default::default()
        },
    })
}

/// Notes server flags the policy ignores and refuses server counts it cannot run with;
/// returns whether the shard backends are QUIC servers (listed or spawned locally).
fn check_servers(a: &GenerateArgs, policy: Policy) -> Result<bool> {
    let obfuscated = policy == Policy::Obfuscated;
    if obfuscated && (a.local_servers.is_some_and(|n| n > 1) || a.placement.servers > 1) {
        eprintln!("note: policy obfuscated uses one server (the first)");
    }
    let quic = policy.needs_backends() && (a.server_list.is_some() || a.local_servers.is_some());
    if !policy.needs_backends() && (a.server_list.is_some() || a.local_servers.is_some()) {
        eprintln!(
            "note: policy {} runs everything on this device; no shard server is used",
            policy.name()
        );
    }
    if a.placement.servers == 0 && policy.needs_backends() && !quic {
        bail!(
            "policy {} needs at least one server (--servers N)",
            policy.name()
        );
    }
    if a.local_servers == Some(0) {
        bail!("--local-servers needs at least one server");
    }
    Ok(quic)
}

/// Sets up the shard backends the policy needs, generates, then closes the QUIC connections
/// and stops any local servers. Also returns the bytes sent and received on the QUIC streams
/// (None without QUIC).
async fn run_generation(
    a: &GenerateArgs,
    sd: &Arc<StableDiffusion>,
    opts: &GenerateOptions,
    quic: bool,
    device: &Device,
    bar: &ProgressBar,
) -> Result<(veil_core::client::pipeline::Generation, Option<(u64, u64)>)> {
    let policy = opts.policy;
    let obfuscated = policy == Policy::Obfuscated;
    let mut cluster: Option<LocalCluster> = None;
    let mut quic_backends: Vec<Arc<ReplicaSet>> = Vec::new();
    let backends = if !policy.needs_backends() {
        vec![]
    } else if quic {
        (cluster, quic_backends) = connect_quic(a, sd, opts.wire, device, obfuscated).await?;
        quic_backends
            .iter()
            .map(|b| b.clone() as Arc<dyn veil_core::placement::ShardBackend<candle_core::Tensor>>)
            .collect()
    } else if obfuscated {
        vec![sd.in_process_full_server()]
    } else {
        sd.in_process_backends(a.placement.servers)
    };
    let result = sd
        .generate(opts, &backends, &mut |p| {
            // Image-to-image runs fewer steps than --steps.
            bar.set_length(p.total as u64);
            bar.set_position(p.step as u64)
        })
        .await;
    let wire_bytes = quic_backends.iter().fold((0u64, 0u64), |(s, r), b| {
        let t = b.traffic();
        (s + t.bytes_sent, r + t.bytes_received)
    });
    for b in &quic_backends {
        b.close().await;
    }
    if let Some(c) = cluster {
        c.shutdown().await;
    }
    anyhow::Ok((result?, quic.then_some(wire_bytes)))
}

/// Connects to the `--server-list` servers, or spawns `--local-servers` on loopback (one
/// under `obfuscated`, which also serves its early steps) and connects to those.
async fn connect_quic(
    a: &GenerateArgs,
    sd: &Arc<StableDiffusion>,
    wire: WireDtype,
    device: &Device,
    obfuscated: bool,
) -> Result<(Option<LocalCluster>, Vec<Arc<ReplicaSet>>)> {
    // A full-model server's identity covers these files: hashed (without a manifest) once.
    let components = if obfuscated {
        component_hashes(&a.model)?
    } else {
        Vec::new()
    };
    let mut cluster: Option<LocalCluster> = None;
    let specs = match (&a.server_list, a.local_servers) {
        (Some(path), _) => load_server_list(path)
            .with_context(|| format!("reading server list {}", path.display()))?,
        (None, Some(n)) => {
            let mut model = ShardModel::from_engine(&sd.unet, &sd.unet_engine);
            if obfuscated {
                model = model
                    .with_denoiser(sd.clone())
                    .with_full_identity(&components);
            }
            let n = if obfuscated { 1 } else { n };
            let c = spawn_local(n, Arc::new(model), ServerLimits::default())
                .context("starting local shard servers")?;
            let specs = c.specs.clone();
            cluster = Some(c);
            specs
        }
        (None, None) => vec![],
    };
    let timeout = veil_core::vocab::positive_seconds(a.request_timeout)
        .context("--request-timeout must be a positive number of seconds")?;
    let options = ClientOptions {
        request_timeout: timeout,
        device: device.clone(),
        ..a.codec.client_options(wire, a.zstd)
    };
    // Remote servers merged the same adapters into their base weights: the base identity (from
    // the manifest), adapted (over every layer for a full-model server, which answers for the
    // text encoder, tokenizer and scheduler too). In-process servers share this process's
    // merged weights.
    let model_id = match (&a.server_list, obfuscated) {
        (Some(_), false) => sd.adapted_identity(&resolve_unet_identity(&a.model)?.0),
        (Some(_), true) => sd.full_identity(&resolve_unet_identity(&a.model)?.0, &components),
        (None, false) => model_identity(&sd.unet, sd.unet_engine.weights()),
        (None, true) => full_model_identity(
            &model_identity(&sd.unet, sd.unet_engine.weights()),
            &components,
        ),
    };
    let quic_backends = connect_strips(&specs, model_id, &options).await?;
    eprintln!(
        "connected to {} strip{} of shard servers over QUIC{}",
        quic_backends.len(),
        if quic_backends.len() == 1 { "" } else { "s" },
        if cluster.is_some() { " (local)" } else { "" }
    );
    Ok((cluster, quic_backends))
}

/// Writes the PNG and prints the one-line summary (and what `obfuscated` sent).
fn print_generation(
    a: &GenerateArgs,
    opts: &GenerateOptions,
    generation: &veil_core::client::pipeline::Generation,
) -> Result<()> {
    std::fs::write(&a.out, generation.png()?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let s = &generation.stats;
    eprintln!(
        "wrote {} ({}x{}, {} steps, policy {}, {} s, up {:.2} MB, down {:.2} MB, {} round trips)",
        a.out.display(),
        opts.width,
        opts.height,
        s.steps,
        opts.policy.name(),
        format_args!("{:.2}", s.wall_seconds),
        s.bytes_up as f64 / 1048576.0,
        s.bytes_down as f64 / 1048576.0,
        s.round_trips
    );
    if let Some(o) = &generation.obfuscation {
        let spans: Vec<String> = o
            .spans
            .iter()
            .map(|s| format!("{} `{}`", s.category, s.text))
            .collect();
        eprintln!(
            "obfuscated: {} candidate prompt{} sent ({} combinations; spans: {}); server ran {} of {} steps ({} U-Net rows), this device {}",
            o.candidates,
            if o.candidates == 1 { "" } else { "s" },
            o.combinations,
            if spans.is_empty() { "none".to_string() } else { spans.join(", ") },
            o.server_steps,
            o.server_steps + o.device_steps,
            o.server_unet_rows,
            o.device_steps
        );
    }
    Ok(())
}

/// The QUIC byte counts, the audit summary, and the `--stats` and `--audit` files.
fn write_generation_reports(
    a: &GenerateArgs,
    policy: Policy,
    generation: &veil_core::client::pipeline::Generation,
    wire_bytes: Option<(u64, u64)>,
) -> Result<()> {
    let s = &generation.stats;
    let mut json = serde_json::to_value(s)?;
    if let Some(o) = &generation.obfuscation {
        json["obfuscation"] = serde_json::to_value(o)?;
    }
    if let Some((sent, received)) = wire_bytes {
        eprintln!(
            "QUIC streams: sent {:.2} MB, received {:.2} MB (encoded, compression included)",
            sent as f64 / 1048576.0,
            received as f64 / 1048576.0
        );
        json["wire_bytes_sent"] = sent.into();
        json["wire_bytes_received"] = received.into();
    }
    let report = generation
        .audit
        .report(policy.name(), s.unet_calls, policy.halo_bound());
    if a.stats.is_some() || a.audit.is_some() {
        print_audit_summary(&report);
    }
    if let Some(p) = &a.stats {
        std::fs::write(p, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.audit {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// One line per server: its strips, the rows it received, and its text-indexed bytes.
fn print_audit_summary(r: &veil_core::placement::AuditReport) {
    if r.servers.is_empty() {
        eprintln!(
            "view audit: no server received anything (policy {})",
            r.policy
        );
        return;
    }
    eprintln!(
        "view audit ({}; halo bound {}):",
        r.policy,
        r.halo_bound
            .map_or("none claimed".to_string(), |h| format!("{h} row")),
    );
    for s in &r.servers {
        let rows: Vec<String> = s
            .received_rows
            .iter()
            .map(|(res, rs)| {
                let strip = s
                    .strip
                    .get(res)
                    .map_or("-".to_string(), |st| format!("{}..{}", st[0], st[1]));
                let got: Vec<String> = rs.iter().map(|x| format!("{}..{}", x[0], x[1])).collect();
                format!("{res}: strip {strip} got {}", got.join(","))
            })
            .collect();
        eprintln!(
            "  server {}: {:.2} MB in {} tensors, text-indexed {} B; {}",
            s.server,
            s.bytes as f64 / 1048576.0,
            s.tensors,
            s.text_indexed_bytes,
            rows.join("; ")
        );
    }
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
    let input = PlanInput {
        latent_height: a.height / a.vae_factor,
        latent_width: a.width / a.vae_factor,
        batch: a.batch,
        context_len: a.context_len,
        servers: a.placement.servers,
        policy,
        wire,
        reuse_attention: a.reuse_attention,
        stale_sync: a.codec.stale_sync,
        guidance_halves: a.placement.guidance_halves(),
    };
    let p = plan(&unet, &input)?;
    // Under stale sync the plan is of a stale step; its warm-up steps are exact ones.
    let exact_trips = if a.codec.stale_sync {
        let mut exact = input.clone();
        exact.stale_sync = false;
        plan(&unet, &exact)?.round_trips_per_step
    } else {
        p.round_trips_per_step
    };
    let projection = codec_args::projection(
        &a.codec,
        &a.projection,
        (p.bytes_up_per_step, p.bytes_down_per_step),
        exact_trips,
        a.codec.stale_sync.then_some(p.round_trips_per_step),
    )?;
    if a.json {
        let mut v = serde_json::to_value(&p)?;
        v["projection"] = projection;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", p.to_table());
        let f = |k: &str| projection[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "link ({}, {}, {} raw of {} steps{}, ratio up {:.2} down {:.2}): {:.2} s per steady \
             step, {:.1} s per image (bytes ÷ rate + round trips × RTT)",
            a.projection.profile,
            a.codec.compress,
            projection["exact_steps"],
            a.projection.steps,
            if a.codec.stale_sync {
                format!(", stale from step {}", projection["stale_from_step"])
            } else {
                String::new()
            },
            f("assumed_ratio_up"),
            f("assumed_ratio_down"),
            f("link_seconds_per_steady_step"),
            f("link_seconds_per_image"),
        );
    }
    Ok(())
}

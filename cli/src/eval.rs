//! `veil eval`: scores every placement policy on a trained model and writes docs/EVAL.md with
//! PNG grids — utility (prompt adherence), fidelity against `local` (PSNR/SSIM over servers and
//! steps), traffic and time per step on the emulated 5g link, FLOPs per party, and the attack
//! suite's reconstructions per server.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use veil_core::client::pipeline::{GenerateOptions, Generation, StableDiffusion};
use veil_core::placement::{GnVariant, Policy};
use veil_eval::metrics::{psnr, ssim, Picture};
use veil_eval::Dataset;

use crate::link_bench::{self, LinkBenchArgs};

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Diffusers-layout model folder (trained on the shapes dataset).
    #[arg(long, default_value = "models/tiny-shapes")]
    pub model: PathBuf,
    /// The report to write.
    #[arg(long, default_value = "docs/EVAL.md")]
    pub out: PathBuf,
    /// Folder for the PNG grids (linked from the report by relative path).
    #[arg(long, default_value = "docs/eval")]
    pub figures: PathBuf,
    /// Held-out prompts scored for adherence under `local`.
    #[arg(long, default_value_t = 200)]
    pub prompts: usize,
    /// Held-out prompts scored for adherence under `ppidm` and `strict` (the first of the above).
    #[arg(long, default_value_t = 30)]
    pub policy_prompts: usize,
    /// Denoising steps for the adherence runs and the grid.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f64,
    /// Prompts per fidelity cell.
    #[arg(long, default_value_t = 1)]
    pub fidelity_prompts: usize,
    /// Server counts of the fidelity table.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    pub fidelity_servers: Vec<usize>,
    /// Step counts of the fidelity table.
    #[arg(long, value_delimiter = ',', default_value = "30,50,70")]
    pub fidelity_steps: Vec<usize>,
    /// Single U-Net calls each `strict` attacker (and every strip-only control) trains on.
    #[arg(long, default_value_t = 5000)]
    pub attack_train: usize,
    /// Held-out pictures attacked.
    #[arg(long, default_value_t = 100)]
    pub attack_test: usize,
    /// Pictures per batched U-Net call of the attacker's data.
    #[arg(long, default_value_t = 100)]
    pub attack_batch: usize,
    /// Training captions added to the test captions in the CFG-difference dictionary.
    #[arg(long, default_value_t = 1000)]
    pub attack_dictionary: usize,
    /// Settings attacked, as POLICY:N (policy ppidm, strict, or strict-together for strict with
    /// the guidance halves together), comma-separated (default: ppidm and strict at N = 1, 2
    /// and 4, and strict-together at N = 4).
    #[arg(long, value_delimiter = ',')]
    pub attack_settings: Vec<String>,
    /// Whole generations the attacker trains on, per setting of the whole-generation section.
    #[arg(long, default_value_t = 500)]
    pub generation_train: usize,
    /// Held-out whole generations attacked, per setting.
    #[arg(long, default_value_t = 100)]
    pub generation_test: usize,
    /// Denoising steps of those generations (every step is captured).
    #[arg(long, default_value_t = 20)]
    pub generation_steps: usize,
    /// Settings of the whole-generation section, as POLICY:N (default: strict at N = 1, 2, 4).
    #[arg(long, value_delimiter = ',')]
    pub generation_settings: Vec<String>,
    /// Steps timed through the emulated 5g link (0 skips the link section).
    #[arg(long, default_value_t = 3)]
    pub link_steps: usize,
    /// Denoising steps of the `obfuscated` attacker's generations (the server runs half).
    #[arg(long, default_value_t = 10)]
    pub obfuscated_steps: usize,
    /// Requests attacked under `obfuscated` with every candidate's picture finished (0 skips
    /// them; the slot-aware prior over many requests always runs).
    #[arg(long, default_value_t = 16)]
    pub obfuscated_prompts: usize,
    /// The sensitive category of the `obfuscated` attacks (the shapes' colours).
    #[arg(long, default_value = "eval/lexicons/colours.toml")]
    pub lexicon: PathBuf,
    /// Dataset seed of the captions.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// The smaller device U-Net scored alone in the utility section (default:
    /// MODEL/device_unet when that folder exists).
    #[arg(long)]
    pub device_model: Option<PathBuf>,
    /// A small, fast configuration (tests and CI): few prompts, small attack sets.
    #[arg(long)]
    pub quick: bool,
    /// Regenerate only these sections of an existing report, in place (comma-separated;
    /// default: the whole report).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub sections: Vec<Section>,
}

impl EvalArgs {
    fn shrink(&mut self) {
        self.prompts = self.prompts.min(6);
        self.policy_prompts = self.policy_prompts.min(3);
        self.steps = self.steps.min(6);
        self.fidelity_prompts = 1;
        self.fidelity_servers = vec![2];
        self.fidelity_steps = vec![4];
        self.attack_train = self.attack_train.min(60);
        self.attack_test = self.attack_test.min(6);
        self.attack_batch = self.attack_batch.min(30);
        self.attack_dictionary = self.attack_dictionary.min(30);
        self.generation_train = self.generation_train.min(24);
        self.generation_test = self.generation_test.min(4);
        self.generation_steps = self.generation_steps.min(3);
        self.link_steps = self.link_steps.min(2);
        self.obfuscated_prompts = self.obfuscated_prompts.min(2);
        self.obfuscated_steps = self.obfuscated_steps.min(3);
    }
}

/// A progress bar for a long CLI stage.
pub(crate) fn bar(len: usize, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len as u64);
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{bar:30}}] {{pos}}/{{len}} {{elapsed_precise}} eta {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b
}

pub(crate) fn picture(t: &Tensor) -> Result<Picture> {
    let (_, h, w) = t.dims3()?;
    Ok(Picture::new(h, w, t.flatten_all()?.to_vec1::<f32>()?)?)
}

pub(crate) struct Runner<'a> {
    pub(crate) sd: &'a StableDiffusion,
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) side: usize,
    pub(crate) guidance: f64,
}

impl Runner<'_> {
    pub(crate) fn generate(
        &self,
        prompt: &str,
        steps: usize,
        seed: u64,
        policy: Policy,
        servers: usize,
    ) -> Result<Generation> {
        let opts = GenerateOptions {
            prompt: prompt.to_string(),
            steps,
            guidance: self.guidance,
            seed,
            width: self.side,
            height: self.side,
            policy,
            ..Default::default()
        };
        let backends = if policy.needs_backends() {
            self.sd.in_process_backends(servers)
        } else {
            Vec::new()
        };
        Ok(self
            .rt
            .block_on(self.sd.generate(&opts, &backends, &mut |_| {}))?)
    }
}

/// Tiles pictures into one PNG: `rows[r][c]`, a 2-pixel gap, missing tiles grey.
pub(crate) fn grid(rows: &[Vec<Option<Picture>>]) -> image::RgbImage {
    let side = rows
        .iter()
        .flatten()
        .flatten()
        .map(|p| p.height.max(p.width))
        .max()
        .unwrap_or(64);
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let gap = 2u32;
    let s = side as u32;
    let mut img = image::RgbImage::from_pixel(
        cols as u32 * (s + gap) + gap,
        rows.len() as u32 * (s + gap) + gap,
        image::Rgb([255, 255, 255]),
    );
    for (r, row) in rows.iter().enumerate() {
        for (c, tile) in row.iter().enumerate() {
            let (x0, y0) = (gap + c as u32 * (s + gap), gap + r as u32 * (s + gap));
            match tile {
                Some(p) => {
                    let t = p.to_rgb();
                    for (x, y, px) in t.enumerate_pixels() {
                        img.put_pixel(x0 + x, y0 + y, *px);
                    }
                }
                None => {
                    for y in 0..s {
                        for x in 0..s {
                            img.put_pixel(x0 + x, y0 + y, image::Rgb([200, 200, 200]));
                        }
                    }
                }
            }
        }
    }
    img
}

pub(crate) fn rel(path: &Path, from: &Path) -> String {
    // Figures are linked relative to the report's folder when they live under it.
    let base = from.parent().unwrap_or(Path::new(""));
    path.strip_prefix(base)
        .unwrap_or(path)
        .display()
        .to_string()
}

pub use crate::eval_report::Section;
use crate::eval_report::{model_fingerprint, model_tag, splice, whole_report};

pub fn run(mut a: EvalArgs) -> Result<()> {
    if a.quick {
        a.shrink();
    }
    if a.prompts == 0 || a.steps == 0 {
        bail!("--prompts and --steps must be at least 1");
    }
    let started = Instant::now();
    let device = Device::Cpu;
    let sd = std::sync::Arc::new(
        StableDiffusion::load(&a.model, &device)
            .with_context(|| format!("loading model folder {}", a.model.display()))?,
    );
    let f = sd.vae.config.downsample_factor();
    let side = sd.unet.config.sample_size.unwrap_or(16) * f;
    let runner = Runner {
        sd: &sd,
        rt: tokio::runtime::Builder::new_current_thread().build()?,
        side,
        guidance: a.guidance,
    };
    std::fs::create_dir_all(&a.figures)
        .with_context(|| format!("creating {}", a.figures.display()))?;
    let data = Dataset::new(a.seed, side);
    let held: Vec<String> = (0..a.prompts as u64).map(|i| data.held_out(i).1).collect();
    let want = |s: Section| a.sections.is_empty() || a.sections.contains(&s);
    let fingerprint = model_fingerprint(&a.model)?;
    let mut parts: Vec<(Section, String)> = Vec::new();
    for s in Section::ALL.into_iter().filter(|&s| want(s)) {
        let mut md = String::new();
        match s {
            Section::Training => training_section(&mut md, &a.model)?,
            Section::Adherence => crate::eval_adherence::adherence_section(
                &mut md,
                &a,
                &runner,
                &data,
                &held,
                side / f,
            )?,
            Section::Fidelity => fidelity_section(&mut md, &a, &runner, &held, side / f)?,
            Section::Link if a.link_steps > 0 => link_section(&mut md, &a, &held[0])?,
            Section::Attacks => crate::eval_attacks::attack_section(&mut md, &a, &sd)?,
            Section::Generations => crate::eval_generations::generations_section(&mut md, &a, &sd)?,
            Section::Link => {}
        }
        parts.push((s, format!("{}{md}", model_tag(&fingerprint))));
    }
    let report = if a.sections.is_empty() {
        whole_report(&a, side, &parts, started.elapsed().as_secs_f64())?
    } else {
        let old = std::fs::read_to_string(&a.out)
            .with_context(|| format!("reading {} to replace its sections", a.out.display()))?;
        splice(&old, &parts, &fingerprint)?
    };
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.out, report).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote {} and figures in {} ({:.0} s)",
        a.out.display(),
        a.figures.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn training_section(md: &mut String, model: &Path) -> Result<()> {
    let path = model.join("training_log.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        writeln!(md, "(No `training_log.json` in the model folder.)\n")?;
        return Ok(());
    };
    let log: serde_json::Value = serde_json::from_str(&text).context("training_log.json")?;
    writeln!(md, "## The model\n")?;
    let logged: f64 = log["stages"]
        .as_object()
        .map(|st| st.values().filter_map(|s| s["seconds"].as_f64()).sum())
        .unwrap_or(0.0);
    writeln!(
        md,
        "Trained by `tools/train_tiny.py` on {} pictures ({}; {}). Loss curves \
         (every 200 steps) are in `training_log.json` beside the weights.\n",
        log["data"]["pictures"],
        log["device"].as_str().unwrap_or("?"),
        match log["seconds"].as_f64() {
            Some(t) => format!("{t:.0} s in all"),
            None => format!("{logged:.0} s in the stages that logged their time"),
        }
    )?;
    if let Some(cmds) = log["commands"].as_array() {
        writeln!(md, "```sh")?;
        for c in cmds.iter().filter_map(|c| c.as_str()) {
            writeln!(md, "{c}")?;
        }
        writeln!(md, "```\n")?;
    }
    writeln!(
        md,
        "| stage | steps | parameters | seconds | first loss | last loss |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    if let Some(stages) = log["stages"].as_object() {
        for (name, s) in stages {
            let curve = s["curve"].as_array().cloned().unwrap_or_default();
            let at = |i: Option<&serde_json::Value>| {
                i.and_then(|p| p.get(1))
                    .and_then(|v| v.as_f64())
                    .map(|v| format!("{v:.4}"))
                    .unwrap_or_else(|| "—".into())
            };
            writeln!(
                md,
                "| {name} | {} | {} | {} | {} | {} |",
                s["steps"],
                s.get("parameters")
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "—".into()),
                s["seconds"]
                    .as_f64()
                    .map_or_else(|| "—".to_string(), |t| format!("{t:.0}")),
                at(curve.first()),
                at(curve.last())
            )?;
        }
        if let Some(v) = stages.get("vae") {
            writeln!(
                md,
                "\nVAE reconstruction PSNR on 512 pictures of the data (see the note): {:.1} dB \
                 ({} dB on object pixels); latent scaling factor {:.4}.",
                v["reconstruction_psnr_db"].as_f64().unwrap_or(f64::NAN),
                v["object_psnr_db"]
                    .as_f64()
                    .map_or_else(|| "—".to_string(), |x| format!("{x:.1}")),
                v["scaling_factor"].as_f64().unwrap_or(f64::NAN)
            )?;
            if let Some(n) = v["note"].as_str() {
                writeln!(md, "VAE note: {n}.")?;
            }
        }
    }
    md.push('\n');
    Ok(())
}

fn fidelity_section(
    md: &mut String,
    a: &EvalArgs,
    runner: &Runner<'_>,
    held: &[String],
    latent_rows: usize,
) -> Result<()> {
    let policies = [
        (
            "ppidm, paper GN (PPIGN)",
            Policy::Ppidm {
                gn: GnVariant::Paper,
            },
        ),
        (
            "ppidm, exact GN",
            Policy::Ppidm {
                gn: GnVariant::Exact,
            },
        ),
        ("strict", Policy::Strict),
    ];
    let servers: Vec<usize> = a
        .fidelity_servers
        .iter()
        .copied()
        .filter(|&n| n >= 1 && latent_rows / 2 >= n)
        .collect();
    let prompts: Vec<&String> = held.iter().take(a.fidelity_prompts.max(1)).collect();
    let runs = measure_fidelity(a, runner, &prompts, &policies, &servers)?;
    write_fidelity(md, a, &policies, &servers, prompts.len(), &runs)
}

/// The fidelity runs: `cells[policy][servers][steps]` = (PSNR sum, SSIM sum, count) against
/// `local`; `flops[policy][servers]` = (device FLOPs, busiest server's FLOPs, upload bytes,
/// round trips) per step, of the last prompt and step count; `local_flops` per step likewise.
struct FidelityRuns {
    cells: Vec<Vec<Vec<(f64, f64, usize)>>>,
    flops: Vec<Vec<(u64, u64, u64, u64)>>,
    local_flops: u64,
}

/// Generates every prompt × step count under `local`, then under every policy × server
/// count, comparing each picture with `local`'s.
fn measure_fidelity(
    a: &EvalArgs,
    runner: &Runner<'_>,
    prompts: &[&String],
    policies: &[(&str, Policy)],
    servers: &[usize],
) -> Result<FidelityRuns> {
    let total = prompts.len() * a.fidelity_steps.len() * (1 + policies.len() * servers.len());
    let b = bar(total, "fidelity");
    let mut cells = vec![
        vec![vec![(0f64, 0f64, 0usize); a.fidelity_steps.len()]; servers.len()];
        policies.len()
    ];
    let mut flops = vec![vec![(0u64, 0u64, 0u64, 0u64); servers.len()]; policies.len()];
    let mut local_flops = 0u64;
    for (pi, prompt) in prompts.iter().enumerate() {
        for (si, &steps) in a.fidelity_steps.iter().enumerate() {
            let seed = 100 + pi as u64;
            let local = runner.generate(prompt, steps, seed, Policy::Local, 0)?;
            local_flops = local.stats.device_flops / steps as u64;
            let lp = picture(&local.image)?;
            b.inc(1);
            for (k, (_, policy)) in policies.iter().enumerate() {
                for (ni, &n) in servers.iter().enumerate() {
                    let g = runner.generate(prompt, steps, seed, *policy, n)?;
                    let p = picture(&g.image)?;
                    let c = &mut cells[k][ni][si];
                    c.0 += psnr(&lp, &p, None)?.unwrap_or(f64::NAN);
                    c.1 += ssim(&lp, &p, None)?.unwrap_or(f64::NAN);
                    c.2 += 1;
                    let st = &g.stats;
                    let per = steps as u64;
                    let max_server = st
                        .per_server
                        .iter()
                        .map(|s| s.server_flops)
                        .max()
                        .unwrap_or(0);
                    flops[k][ni] = (
                        st.device_flops / per,
                        max_server / per,
                        st.bytes_up / per,
                        st.round_trips / per,
                    );
                    b.inc(1);
                }
            }
        }
    }
    b.finish_and_clear();
    Ok(FidelityRuns {
        cells,
        flops,
        local_flops,
    })
}

/// The fidelity table (PSNR / SSIM per policy, server count and step count) and the FLOPs
/// and traffic table.
fn write_fidelity(
    md: &mut String,
    a: &EvalArgs,
    policies: &[(&str, Policy)],
    servers: &[usize],
    prompts: usize,
    runs: &FidelityRuns,
) -> Result<()> {
    writeln!(md, "## Fidelity against `local`\n")?;
    writeln!(
        md,
        "PSNR (dB, capped at 100 = bit-identical) / SSIM of each policy's picture against the \
         `local` picture of the same prompt, seed and steps, mean over {} held-out prompt(s) — \
         the shape of PPIDM's Tables IV–VII (quality over server count and step count). \
         In-process servers, f32 wire.\n",
        prompts
    )?;
    write!(md, "| policy | servers |")?;
    for s in &a.fidelity_steps {
        write!(md, " {s} steps |")?;
    }
    writeln!(md)?;
    writeln!(md, "|---|---|{}", "---|".repeat(a.fidelity_steps.len()))?;
    for (k, (name, _)) in policies.iter().enumerate() {
        for (ni, n) in servers.iter().enumerate() {
            write!(md, "| {name} | {n} |")?;
            for c in &runs.cells[k][ni] {
                let d = c.2.max(1) as f64;
                write!(md, " {:.2} / {:.4} |", c.0 / d, c.1 / d)?;
            }
            writeln!(md)?;
        }
    }
    writeln!(md, "\n### FLOPs and traffic per step, per party\n")?;
    writeln!(
        md,
        "From the runtime's accounting (one U-Net call per step, CFG batch 2). `local` runs \
         {:.1} MFLOP per step on the device.\n",
        runs.local_flops as f64 / 1e6
    )?;
    writeln!(md, "| policy | servers | device MFLOP/step | busiest server MFLOP/step | upload MB/step | round trips/step |")?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for (k, (name, _)) in policies.iter().enumerate() {
        for (ni, n) in servers.iter().enumerate() {
            let (d, s, up, rt) = runs.flops[k][ni];
            writeln!(
                md,
                "| {name} | {n} | {:.1} | {:.1} | {:.3} | {rt} |",
                d as f64 / 1e6,
                s as f64 / 1e6,
                up as f64 / 1e6
            )?;
        }
    }
    md.push('\n');
    Ok(())
}

fn link_section(md: &mut String, a: &EvalArgs, prompt: &str) -> Result<()> {
    writeln!(md, "## Traffic and time per step on the emulated 5g link\n")?;
    writeln!(
        md,
        "Real QUIC shard servers on loopback behind the link emulator's `5g` profile \
         (81.14 Mbit/s up, 340.56 Mbit/s down, 30 ms RTT, one shared bottleneck), f32 wire, \
         no compression, {} steps; the median step after the first. Same as \
         `veil bench link --profile 5g --model {} --policy P --servers N --steps {}`.\n",
        a.link_steps,
        a.model.display(),
        a.link_steps
    )?;
    writeln!(md, "| policy | servers | s/step | up MB/step | down MB/step | round trips/step | serialisation + RTT bound s/step |")?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    let configs = [("ppidm", 2), ("ppidm", 4), ("strict", 2), ("strict", 4)];
    let b = bar(configs.len(), "5g link");
    for (policy, servers) in configs {
        let args = LinkBenchArgs {
            profile: "5g".into(),
            model: a.model.clone(),
            servers,
            policy: policy.into(),
            gn: "exact".into(),
            steps: a.link_steps,
            wire: "f32".into(),
            zstd: 0,
            codec: crate::codec_args::CodecArgs {
                compress: Default::default(),
                exact_steps: 0,
                stale_sync: false,
            },
            width: None,
            height: None,
            prompt: prompt.to_string(),
            guidance: a.guidance,
            seed: 1,
            scheduler: "ddim".into(),
            request_timeout: 600.0,
            throughput: false,
            tensor: String::new(),
            repeats: 1,
            json: true,
        };
        let r = link_bench::measure(&args)?;
        let num = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let step = r["step_seconds_median_after_first"]
            .as_f64()
            .unwrap_or(num("step_seconds_median"));
        writeln!(
            md,
            "| {policy} | {servers} | {step:.2} | {:.3} | {:.3} | {} | {:.2} |",
            num("tensor_bytes_up_per_step") / 1e6,
            num("tensor_bytes_down_per_step") / 1e6,
            r["round_trips_per_step"],
            num("serialization_lower_bound_seconds_per_step")
        )?;
        b.inc(1);
    }
    b.finish_and_clear();
    md.push('\n');
    Ok(())
}

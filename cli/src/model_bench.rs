//! `veil bench vae` and `veil bench clip`: time the VAE decoder (`Vae::decode`) and the CLIP
//! text encoder (`ClipTextEncoder::forward`) on CPU in f32 with seeded random weights, for the
//! parameters a real checkpoint has (`<config-dir>/<component>.params.json`, as
//! `tools/dump_names_shapes.py` wrote them), so that they can be compared with PyTorch
//! (`tools/bench_torch_vae.py`) without downloading a model.
//!
//! Weights are drawn as `veil bench unet` draws them (fan-in-scaled normals for matrices and
//! kernels, ≈ 1 for norm scales, small normals for biases), written to a temporary
//! safetensors file and loaded through the ordinary loaders (`Vae::load_decoder`,
//! `ClipTextEncoder::load`), then the file is removed: veil-cli does not depend on candle-nn,
//! whose `VarBuilder::from_tensors` would skip the file. The VAE gets only what its decoder
//! reads (`decoder.*`, `post_quant_conv.*`). The peak resident memory is reset after loading
//! (Linux `clear_refs`), so it is that of the model and its calls (warm-up included), not of
//! the file round trip.
//!
//! Reported: median and min seconds per call over `--runs` timed calls after `--warmup`
//! untimed ones, the output's shape and standard deviation (a degenerate network shows as a
//! std near 0 or NaN), the parameter count, GFLOP per call counted from the architecture
//! (convolutions, linears and attention products; norms and activations left out), the peak
//! RSS and the thread counts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use veil_core::model::clip::ClipTextEncoder;
use veil_core::model::config::{read_json, ClipTextConfig, VaeConfig};
use veil_core::model::vae::Vae;

use crate::bench::{median, normal_tensor, proc_status_mib, splitmix64};

#[derive(Args)]
pub struct VaeBenchArgs {
    /// A folder with `vae/config.json` and `vae.params.json` (models/configs/sd15).
    #[arg(long)]
    config_dir: PathBuf,
    /// Latent height and width; 64 = a 512 px image for SD.
    #[arg(long, default_value_t = 64)]
    latent: usize,
    /// Latents decoded per call.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed calls.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Untimed calls before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Seed of the weights and inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ClipBenchArgs {
    /// A folder with `text_encoder/config.json` and `text_encoder.params.json`
    /// (models/configs/sd15).
    #[arg(long)]
    config_dir: PathBuf,
    /// Prompts per call (2 = classifier-free guidance).
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Timed calls.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Untimed calls before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Seed of the weights and token ids.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

// ---------------------------------------------------------------------------------------------
// Weights

type ParamList = Vec<(String, Vec<usize>)>;

/// The parameters the VAE decoder reads (`Vae::new_decoder`).
fn is_decoder_param(name: &str) -> bool {
    name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
}

/// The `[name, shape]` entries of `<config_dir>/<component>.params.json` that `keep` accepts.
fn listed_params(config_dir: &Path, component: &str, keep: fn(&str) -> bool) -> Result<ParamList> {
    let path = config_dir.join(format!("{component}.params.json"));
    let all: ParamList = read_json(&path).with_context(|| format!("reading {}", path.display()))?;
    let kept: ParamList = all.into_iter().filter(|(n, _)| keep(n)).collect();
    if kept.is_empty() {
        bail!("{} lists no parameter to use", path.display());
    }
    Ok(kept)
}

/// Seeded random values for `params`: fan-in-scaled normals for ≥ 2-D, ≈ 1 for norm scales,
/// small biases (as `veil bench unet` draws them).
fn random_tensors(params: &[(String, Vec<usize>)], seed: u64) -> Result<HashMap<String, Tensor>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bar = ProgressBar::new(params.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("random weights [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut out = HashMap::with_capacity(params.len());
    for (i, (name, shape)) in params.iter().enumerate() {
        let (mean, std) = if shape.len() >= 2 {
            let fan_in: usize = shape[1..].iter().product();
            (0.0, 1.0 / (fan_in.max(1) as f32).sqrt())
        } else if name.ends_with(".weight") {
            (1.0, 0.02) // GroupNorm / LayerNorm scale
        } else {
            (0.0, 0.01) // bias
        };
        let s = splitmix64(seed.wrapping_add(i as u64 + 1));
        let t = normal_tensor(shape, s, mean, std, threads, &Device::Cpu)
            .with_context(|| format!("random {name} {shape:?}"))?;
        out.insert(name.clone(), t);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// A scratch folder, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(tag: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(format!("veil-bench-{tag}-{}", std::process::id()));
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Random weights for `params` in a temporary `<component>/` folder (its `config.json` copied
/// from `config_dir`), handed to `load`; the folder is removed afterwards.
fn load_random<M>(
    config_dir: &Path,
    component: &str,
    file: &str,
    params: &[(String, Vec<usize>)],
    seed: u64,
    load: impl FnOnce(&Path) -> veil_core::Result<M>,
) -> Result<M> {
    let dir = ScratchDir::new(component)?;
    let config = config_dir.join(component).join("config.json");
    std::fs::copy(&config, dir.0.join("config.json"))
        .with_context(|| format!("copying {}", config.display()))?;
    {
        let tensors = random_tensors(params, seed)?;
        let path = dir.0.join(file);
        candle_core::safetensors::save(&tensors, &path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let bar = spinner(&format!("loading {component}"));
    let m = load(&dir.0).with_context(|| format!("loading the random {component}"))?;
    bar.finish_and_clear();
    Ok(m)
}

fn spinner(msg: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_message(msg.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// Resets the process's peak RSS (VmHWM) to its current RSS (Linux ≥ 4.0); false elsewhere.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

// ---------------------------------------------------------------------------------------------
// Timing

struct Timings {
    seconds: Vec<f64>,
    out_shape: Vec<usize>,
    out_std: f64,
}

/// `warmup` untimed then `runs` timed calls of `call`, with a progress bar (or, where stderr
/// is not a terminal, a line per call on stderr); the last output's shape and std.
fn time_calls(
    label: &str,
    warmup: usize,
    runs: usize,
    mut call: impl FnMut() -> Result<Tensor>,
) -> Result<Timings> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let bar = ProgressBar::new((warmup + runs) as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} bench {label} [{{bar:30}}] {{pos}}/{{len}} calls {{msg}} {{elapsed_precise}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(250));
    let lines = bar.is_hidden();
    let mut seconds = Vec::with_capacity(runs);
    let mut last = None;
    for i in 0..warmup + runs {
        let warm = i < warmup;
        bar.set_message(if warm {
            "(warm-up)".to_string()
        } else {
            String::new()
        });
        let t0 = Instant::now();
        let out = call()?;
        let el = t0.elapsed().as_secs_f64();
        if lines {
            let (what, k, of) = match warm {
                true => ("warm-up", i + 1, warmup),
                false => ("run", i + 1 - warmup, runs),
            };
            eprintln!("bench {label}: {what} {k}/{of} {el:.3} s");
        }
        if !warm {
            seconds.push(el);
            bar.set_message(format!("(last {el:.3} s)"));
        }
        last = Some(out);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let out = last.context("no call was made")?;
    let v = out.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    Ok(Timings {
        seconds,
        out_shape: out.dims().to_vec(),
        out_std: var.sqrt(),
    })
}

// ---------------------------------------------------------------------------------------------
// FLOP counts (multiply-adds × 2; norms, activations and the softmax left out)

fn conv_flop(cin: usize, cout: usize, k: usize, pixels: usize) -> f64 {
    2.0 * (cin * k * k * cout) as f64 * pixels as f64
}

fn resnet_flop(cin: usize, cout: usize, pixels: usize) -> f64 {
    let shortcut = if cin == cout {
        0.0
    } else {
        conv_flop(cin, cout, 1, pixels)
    };
    conv_flop(cin, cout, 3, pixels) + conv_flop(cout, cout, 3, pixels) + shortcut
}

/// One decode of a [1, latent, h, w] latent: post_quant_conv, conv_in, the mid block (two
/// resnets and single-head attention over h·w tokens), the up blocks (nearest 2x then a 3×3
/// conv between them) and conv_out.
fn vae_decoder_gflop(cfg: &VaeConfig, h: usize, w: usize) -> f64 {
    let ch: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
    let Some(&c0) = ch.first() else {
        return 0.0;
    };
    let lc = cfg.latent_channels;
    let mut px = h * w;
    let mut f = 0.0;
    if cfg.use_post_quant_conv {
        f += conv_flop(lc, lc, 1, px);
    }
    f += conv_flop(lc, c0, 3, px);
    let n = px as f64;
    let attention = 4.0 * 2.0 * n * (c0 * c0) as f64 + 2.0 * 2.0 * n * n * c0 as f64;
    f += 2.0 * resnet_flop(c0, c0, px) + attention;
    let mut cin = c0;
    for (i, &cout) in ch.iter().enumerate() {
        for j in 0..=cfg.layers_per_block {
            f += resnet_flop(if j == 0 { cin } else { cout }, cout, px);
        }
        if i + 1 < ch.len() {
            px *= 4;
            f += conv_flop(cout, cout, 3, px);
        }
        cin = cout;
    }
    f += conv_flop(cin, cfg.out_channels, 3, px);
    f / 1e9
}

/// One forward of [1, tokens] ids: per layer q/k/v/out, the two MLP matrices and the
/// attention products (the final projection, if any, is not part of `forward`).
fn clip_gflop(cfg: &ClipTextConfig, tokens: usize) -> f64 {
    let (t, d, ff) = (
        tokens as f64,
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
    );
    let layer = 4.0 * 2.0 * t * d * d + 2.0 * 2.0 * t * d * ff + 2.0 * 2.0 * t * t * d;
    cfg.num_hidden_layers as f64 * layer / 1e9
}

// ---------------------------------------------------------------------------------------------
// Reports

/// What both benchmarks print.
struct Report {
    what: &'static str,
    config_dir: PathBuf,
    input: Vec<usize>,
    params: usize,
    gflop_per_call: f64,
    warmup: usize,
    runs: usize,
    prepare_seconds: f64,
    peak_reset: bool,
    timings: Timings,
}

impl Report {
    fn print(&self, json: bool) -> Result<()> {
        let med = median(&self.timings.seconds);
        let min = self
            .timings
            .seconds
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let peak = proc_status_mib("VmHWM:");
        let rss = proc_status_mib("VmRSS:");
        let candle_threads = candle_core::utils::get_num_threads();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let gflops = self.gflop_per_call / med;
        if json {
            let v = serde_json::json!({
                "bench": self.what,
                "config_dir": self.config_dir.display().to_string(),
                "input_shape": self.input,
                "out_shape": self.timings.out_shape,
                "params": self.params,
                "weights_mib": self.params as f64 * 4.0 / 1048576.0,
                "runs": self.runs,
                "warmup": self.warmup,
                "seconds_median": med,
                "seconds_min": min,
                "seconds_all": self.timings.seconds,
                "gflop_per_call": self.gflop_per_call,
                "gflop_per_second": gflops,
                "out_std": self.timings.out_std,
                "peak_rss_mib": peak,
                "peak_rss_since_load": self.peak_reset,
                "rss_mib": rss,
                "prepare_seconds": self.prepare_seconds,
                "candle_threads": candle_threads,
                "available_parallelism": cores,
                "dtype": "f32",
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        let fmt_mib = |m: Option<f64>| m.map_or_else(|| "n/a".to_string(), |m| format!("{m:.0}"));
        let dims = |d: &[usize]| {
            d.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join("x")
        };
        println!(
            "{:<12} {:>14} {:>16} {:>10} {:>10} {:>9} {:>12}",
            "bench", "input", "output", "median_s", "min_s", "GFLOP/s", "peak_rss_MiB"
        );
        println!(
            "{:<12} {:>14} {:>16} {:>10.3} {:>10.3} {:>9.1} {:>12}",
            self.what,
            dims(&self.input),
            dims(&self.timings.out_shape),
            med,
            min,
            gflops,
            fmt_mib(peak)
        );
        println!(
            "params {} ({:.0} MiB f32, random weights written and loaded in {:.1} s); {:.2} GFLOP/call; \
             out std {:.4}; {} runs after {} warm-up; candle threads {candle_threads}, {cores} cores; \
             peak RSS {}",
            self.params,
            self.params as f64 * 4.0 / 1048576.0,
            self.prepare_seconds,
            self.gflop_per_call,
            self.timings.out_std,
            self.runs,
            self.warmup,
            if self.peak_reset {
                "since loading (the calls)"
            } else {
                "of the process"
            }
        );
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The benchmarks

pub fn bench_vae(a: VaeBenchArgs) -> Result<()> {
    if a.runs == 0 || a.batch == 0 || a.latent == 0 {
        bail!("--runs, --batch and --latent must be at least 1");
    }
    let cfg_path = a.config_dir.join("vae/config.json");
    let cfg: VaeConfig =
        read_json(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let params = listed_params(&a.config_dir, "vae", is_decoder_param)?;
    let count: usize = params
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();

    let t0 = Instant::now();
    let vae = load_random(
        &a.config_dir,
        "vae",
        "diffusion_pytorch_model.safetensors",
        &params,
        a.seed,
        |dir| Vae::load_decoder(dir, &Device::Cpu),
    )?;
    let prepare_seconds = t0.elapsed().as_secs_f64();
    let input = vec![a.batch, cfg.latent_channels, a.latent, a.latent];
    let latents = normal_tensor(
        &input,
        splitmix64(a.seed ^ 0x5A5A),
        0.0,
        1.0,
        1,
        &Device::Cpu,
    )?;
    let peak_reset = reset_peak_rss();
    let timings = time_calls("vae", a.warmup, a.runs, || {
        vae.decode(&latents).context("decoding")
    })?;
    Report {
        what: "vae-decode",
        config_dir: a.config_dir.clone(),
        input,
        params: count,
        gflop_per_call: a.batch as f64 * vae_decoder_gflop(&cfg, a.latent, a.latent),
        warmup: a.warmup,
        runs: a.runs,
        prepare_seconds,
        peak_reset,
        timings,
    }
    .print(a.json)
}

/// Seeded token ids in [0, vocab) for `batch` prompts of `tokens` tokens.
fn token_ids(batch: usize, tokens: usize, vocab: usize, seed: u64) -> Result<Tensor> {
    if vocab == 0 {
        bail!("the text encoder has an empty vocabulary");
    }
    let mut s = splitmix64(seed ^ 0x1D5);
    let ids: Vec<u32> = (0..batch * tokens)
        .map(|_| {
            s = splitmix64(s);
            u32::try_from(s % vocab as u64).unwrap_or(0)
        })
        .collect();
    Ok(Tensor::from_vec(ids, (batch, tokens), &Device::Cpu)?)
}

pub fn bench_clip(a: ClipBenchArgs) -> Result<()> {
    if a.runs == 0 || a.batch == 0 {
        bail!("--runs and --batch must be at least 1");
    }
    let cfg_path = a.config_dir.join("text_encoder/config.json");
    let cfg: ClipTextConfig =
        read_json(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let params = listed_params(&a.config_dir, "text_encoder", |_| true)?;
    let count: usize = params
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();

    let t0 = Instant::now();
    let clip = load_random(
        &a.config_dir,
        "text_encoder",
        "model.safetensors",
        &params,
        a.seed,
        |dir| ClipTextEncoder::load(dir, &Device::Cpu),
    )?;
    let prepare_seconds = t0.elapsed().as_secs_f64();
    let tokens = cfg.max_position_embeddings;
    let ids = token_ids(a.batch, tokens, cfg.vocab_size, a.seed)?;
    let peak_reset = reset_peak_rss();
    let timings = time_calls("clip", a.warmup, a.runs, || {
        clip.forward(&ids).context("encoding")
    })?;
    Report {
        what: "clip-text",
        config_dir: a.config_dir.clone(),
        input: vec![a.batch, tokens],
        params: count,
        gflop_per_call: a.batch as f64 * clip_gflop(&cfg, tokens),
        warmup: a.warmup,
        runs: a.runs,
        prepare_seconds,
        peak_reset,
        timings,
    }
    .print(a.json)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use veil_core::model::weights::RecordingBackend;

    use super::*;

    fn sd15() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/configs/sd15")
    }

    /// Builds with a `RecordingBackend` over `listed` and checks that exactly `listed` (names
    /// and shapes) was asked for.
    fn check_requested(
        listed: ParamList,
        build: impl FnOnce(&RecordingBackend) -> veil_core::Result<()>,
    ) -> Result<()> {
        let listed: BTreeSet<(String, Vec<usize>)> = listed.into_iter().collect();
        let rec = RecordingBackend::new(Some(listed.iter().cloned().collect()));
        build(&rec)?;
        let requested: BTreeSet<(String, Vec<usize>)> = rec.requested().into_iter().collect();
        let extra: Vec<_> = requested.difference(&listed).collect();
        let unused: Vec<_> = listed.difference(&requested).collect();
        if !extra.is_empty() || !unused.is_empty() {
            bail!("asked for {extra:?} not listed; listed but never asked for {unused:?}");
        }
        Ok(())
    }

    #[test]
    fn decoder_params_are_exactly_what_the_decoder_reads() -> Result<()> {
        let cfg: VaeConfig = read_json(&sd15().join("vae/config.json"))?;
        let listed = listed_params(&sd15(), "vae", is_decoder_param)?;
        let all = listed_params(&sd15(), "vae", |_| true)?;
        assert!(
            listed.len() < all.len(),
            "the encoder's parameters are left out"
        );
        check_requested(listed, |rec| {
            Vae::new_decoder(rec.var_builder(), &cfg).map(|_| ())
        })
    }

    #[test]
    fn clip_params_are_exactly_what_the_encoder_reads() -> Result<()> {
        let cfg: ClipTextConfig = read_json(&sd15().join("text_encoder/config.json"))?;
        let listed = listed_params(&sd15(), "text_encoder", |_| true)?;
        check_requested(listed, |rec| {
            ClipTextEncoder::new(rec.var_builder(), &cfg).map(|_| ())
        })
    }

    #[test]
    fn token_ids_are_seeded_and_in_the_vocabulary() -> Result<()> {
        let a = token_ids(2, 77, 1000, 3)?.flatten_all()?.to_vec1::<u32>()?;
        let b = token_ids(2, 77, 1000, 3)?.flatten_all()?.to_vec1::<u32>()?;
        let c = token_ids(2, 77, 1000, 4)?.flatten_all()?.to_vec1::<u32>()?;
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|&i| i < 1000));
        assert!(a.iter().collect::<BTreeSet<_>>().len() > 100);
        Ok(())
    }

    #[test]
    fn sd15_flop_counts() -> Result<()> {
        // The SD1.5 VAE decoder at 64×64 latents: ≈ 1.26 T multiply-adds (2515 GFLOP), 34 of
        // them the mid-block attention's products; CLIP ViT-L/14's text tower at 77 tokens:
        // ≈ 6.6 G multiply-adds.
        let vae: VaeConfig = read_json(&sd15().join("vae/config.json"))?;
        let clip: ClipTextConfig = read_json(&sd15().join("text_encoder/config.json"))?;
        let v = vae_decoder_gflop(&vae, 64, 64);
        let c = clip_gflop(&clip, 77);
        assert!((2400.0..2600.0).contains(&v), "vae {v}");
        assert!((12.0..14.0).contains(&c), "clip {c}");
        // Attention is quadratic, the rest linear in the pixels.
        assert!(vae_decoder_gflop(&vae, 32, 32) < v / 4.0);
        Ok(())
    }
}

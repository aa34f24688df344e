//! `veil bench obfuscated`: the numbers of the `obfuscated` policy (docs/BENCHMARKS.md) — the
//! server's FLOPs and time against K with and without each acceleration, the phone's traffic and
//! compute per switch point k, and prompt adherence per k and per acceleration against the
//! non-private baseline (`local` with the model's own U-Net). Prints Markdown tables.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use veil_core::client::hybrid::{
    Accelerations, BatchRedundancy, DeviceUNet, EarlySteps, ObfuscationOptions,
};
use veil_core::client::pipeline::{seeded_normal, GenerateOptions, StableDiffusion};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::obfuscation::{candidates, Lexicon};
use veil_core::placement::Policy;
use veil_eval::{score, Dataset};

use crate::eval::bar;

#[derive(Args)]
pub struct ObfBenchArgs {
    #[arg(long, default_value = "models/tiny-shapes")]
    model: PathBuf,
    /// The attribute lexicon; the default makes the shapes' colours the sensitive category.
    #[arg(long, default_value = "eval/lexicons/colours.toml")]
    lexicon: PathBuf,
    /// T, the whole schedule.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 5.0)]
    guidance: f64,
    /// Candidate counts of the server-cost table.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    k: Vec<usize>,
    /// K of the traffic and utility tables.
    #[arg(long, default_value_t = 8)]
    k_max: usize,
    /// Held-out prompts scored per utility row.
    #[arg(long, default_value_t = 30)]
    prompts: usize,
    /// Timed repetitions per server-cost cell (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// The device U-Net of the late steps (default: the model's own).
    #[arg(long)]
    device_model: Option<PathBuf>,
    /// Dataset seed of the held-out captions.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The accelerations compared: name and settings (the gate at half the server's steps).
fn accelerations(server_steps: usize) -> Vec<(&'static str, Accelerations)> {
    let gate = Some((server_steps / 2).max(1));
    vec![
        ("none", Accelerations::default()),
        (
            "exact batch redundancy",
            Accelerations {
                batch_redundancy: BatchRedundancy::Exact,
                attention_gate: None,
            },
        ),
        (
            "shared uncond (ObCLIP-style)",
            Accelerations {
                batch_redundancy: BatchRedundancy::Shared,
                attention_gate: None,
            },
        ),
        (
            "attention gate",
            Accelerations {
                batch_redundancy: BatchRedundancy::Exact,
                attention_gate: gate,
            },
        ),
        (
            "shared uncond + gate",
            Accelerations {
                batch_redundancy: BatchRedundancy::Shared,
                attention_gate: gate,
            },
        ),
    ]
}

pub fn run(a: ObfBenchArgs) -> Result<()> {
    let bench = Bench::load(a)?;
    let mut md = String::new();
    bench.header(&mut md)?;
    bench.server_cost(&mut md)?;
    let gen = Generator::new(&bench)?;
    let t_all = bench.a.steps;
    let points = [0, t_all / 4, bench.half, 3 * t_all / 4, t_all];
    gen.traffic(&mut md, &points)?;
    gen.utility(&mut md, &points)?;
    print!("{md}");
    Ok(())
}

/// What every table shares: the arguments, the model and lexicon, the picture side, the
/// server's share of the schedule (half of it) and the probe prompt of the cost tables.
struct Bench {
    a: ObfBenchArgs,
    sd: Arc<StableDiffusion>,
    lex: Arc<Lexicon>,
    device_unet: Option<Arc<DeviceUNet>>,
    side: usize,
    half: usize,
    data: Dataset,
    probe: String,
}

/// One timed server-cost cell: K, acceleration, server FLOPs, median seconds, U-Net rows.
type CostRow<'a> = (usize, &'a str, u64, f64, u64);

impl Bench {
    /// Loads the model, the lexicon and the optional device U-Net named by the arguments.
    fn load(a: ObfBenchArgs) -> Result<Self> {
        let device = Device::Cpu;
        let sd = Arc::new(
            StableDiffusion::load(&a.model, &device)
                .with_context(|| format!("loading model folder {}", a.model.display()))?,
        );
        let lex = Arc::new(
            Lexicon::from_file(&a.lexicon)
                .with_context(|| format!("reading lexicon {}", a.lexicon.display()))?,
        );
        let device_unet = match &a.device_model {
            Some(d) => Some(Arc::new(DeviceUNet::load(d, &device)?)),
            None => None,
        };
        let f = sd.vae.config.downsample_factor();
        let side = sd.unet.config.sample_size.unwrap_or(8) * f;
        let data = Dataset::new(a.seed, side);
        let probe = data.held_out(0).1;
        Ok(Self {
            half: a.steps / 2,
            a,
            sd,
            lex,
            device_unet,
            side,
            data,
            probe,
        })
    }

    /// The report's first line: model, size, schedule, guidance and lexicon.
    fn header(&self, md: &mut String) -> Result<()> {
        let (a, side) = (&self.a, self.side);
        writeln!(
            md,
            "`veil bench obfuscated` — model `{}` ({side}×{side}), T = {} DDIM steps, guidance {}, lexicon `{}`, one CPU thread pool on this machine.\n",
            a.model.display(),
            a.steps,
            a.guidance,
            a.lexicon.display()
        )?;
        Ok(())
    }

    /// Server cost against K: times `early_steps` for every K and acceleration, then writes
    /// the table.
    fn server_cost(&self, md: &mut String) -> Result<()> {
        let accels = accelerations(self.half);
        let rows = self.measure_server_cost(&accels)?;
        self.write_server_cost(md, &rows)
    }

    /// The median time, FLOPs and U-Net rows of the first `half` steps of the probe prompt's
    /// K candidates, per K and acceleration.
    fn measure_server_cost<'a>(
        &self,
        accels: &'a [(&'static str, Accelerations)],
    ) -> Result<Vec<CostRow<'a>>> {
        let (a, sd, lex, probe) = (&self.a, &self.sd, &self.lex, &self.probe);
        let (lh, lw) = sd.latent_size(self.side, self.side)?;
        let spans = lex.detect(probe);
        let cells = a.k.len() * accels.len() * a.repeats;
        let b = bar(cells, "server cost");
        let noise = seeded_normal(3, &[1, sd.unet.config.in_channels, lh, lw], &Device::Cpu)?;
        let mut rows: Vec<CostRow<'a>> = Vec::new();
        for &k in &a.k {
            let set = candidates(probe, &spans, lex, k, &mut rand::rng())?;
            anyhow::ensure!(
                set.prompts.len() == k,
                "the probe prompt `{probe}` has only {} candidate prompts under this lexicon, not {k}",
                set.prompts.len()
            );
            for (name, accel) in accels {
                let job = EarlySteps {
                    candidates: set.prompts.clone(),
                    negative_prompt: String::new(),
                    noise: noise.clone(),
                    steps: a.steps,
                    server_steps: self.half,
                    start_step: None,
                    condition: None,
                    guidance: a.guidance,
                    scheduler: SchedulerKind::Ddim,
                    accel: *accel,
                };
                let mut times = Vec::new();
                let mut flops = 0;
                let mut unet_rows = 0;
                for _ in 0..a.repeats {
                    let t0 = Instant::now();
                    let r = sd.early_steps(&job, &mut |_, _| {})?;
                    times.push(t0.elapsed().as_secs_f64());
                    flops = r.accounting.device_flops;
                    unet_rows = r.unet_rows;
                    b.inc(1);
                }
                rows.push((k, name, flops, median(times), unet_rows));
            }
        }
        b.finish_and_clear();
        Ok(rows)
    }

    /// The server-cost table, each cell also against K = 1 without acceleration.
    fn write_server_cost(&self, md: &mut String, rows: &[CostRow<'_>]) -> Result<()> {
        let (half, t_all) = (self.half, self.a.steps);
        let single = rows
            .iter()
            .find(|r| r.0 == 1 && r.1 == "none")
            .map(|r| (r.2, r.3));
        writeln!(
            md,
            "### Server cost of the first k = {half} of {t_all} steps against K\n\n\
             FLOPs are the runtime's own count; time is the median of {} runs of `early_steps` on this machine. \
             \"× one\" divides by the same k steps of one ordinary generation (K = 1, no acceleration: \
             2 U-Net rows per step). The gate is at server step {}.\n",
            self.a.repeats,
            (half / 2).max(1)
        )?;
        writeln!(
            md,
            "| K | acceleration | U-Net rows | server GFLOPs | × one | time (s) | × one |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|")?;
        for (k, name, flops, secs, unet_rows) in rows {
            let (f1, t1) = single.unwrap_or((*flops, *secs));
            writeln!(
                md,
                "| {k} | {name} | {unet_rows} | {:.3} | {:.2} | {:.3} | {:.2} |",
                *flops as f64 / 1e9,
                *flops as f64 / f1.max(1) as f64,
                secs,
                secs / t1.max(1e-9)
            )?;
        }
        Ok(())
    }
}

/// Whole `obfuscated` generations on one in-process full server (the traffic and utility
/// tables).
struct Generator<'a> {
    b: &'a Bench,
    rt: tokio::runtime::Runtime,
    server: Arc<dyn veil_core::placement::ShardBackend<Tensor>>,
}

/// Exact batch redundancy, no attention gate: the setting of the traffic table.
const EXACT: Accelerations = Accelerations {
    batch_redundancy: BatchRedundancy::Exact,
    attention_gate: None,
};

impl<'a> Generator<'a> {
    fn new(b: &'a Bench) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        let server = b.sd.in_process_full_server();
        Ok(Self { b, rt, server })
    }

    /// The options every generation of the bench shares: `caption`, `seed`, the schedule.
    fn options(&self, caption: &str, seed: u64, policy: Policy) -> GenerateOptions {
        let (a, side) = (&self.b.a, self.b.side);
        GenerateOptions {
            prompt: caption.to_string(),
            steps: a.steps,
            guidance: a.guidance,
            seed,
            width: side,
            height: side,
            policy,
            ..Default::default()
        }
    }

    /// One generation of `caption`, the server running the first `k` steps.
    fn gen(
        &self,
        caption: &str,
        seed: u64,
        k: usize,
        accel: Accelerations,
    ) -> Result<veil_core::client::pipeline::Generation> {
        let opts = GenerateOptions {
            obfuscation: ObfuscationOptions {
                server_steps: Some(k),
                k_max: Some(self.b.a.k_max),
                lexicon: Some(self.b.lex.clone()),
                accel,
                device_unet: self.b.device_unet.clone(),
                ..Default::default()
            },
            ..self.options(caption, seed, Policy::Obfuscated)
        };
        let server = std::slice::from_ref(&self.server);
        Ok(self
            .rt
            .block_on(self.b.sd.generate(&opts, server, &mut |_| {}))?)
    }

    /// The non-private baseline: `caption` under `local` with the model's own U-Net.
    fn local(&self, caption: &str, seed: u64) -> Result<veil_core::client::pipeline::Generation> {
        let opts = self.options(caption, seed, Policy::Local);
        Ok(self
            .rt
            .block_on(self.b.sd.generate(&opts, &[], &mut |_| {}))?)
    }

    /// Phone traffic and compute per switch point: one generation of the probe prompt per k.
    fn traffic(&self, md: &mut String, points: &[usize]) -> Result<()> {
        let t_all = self.b.a.steps;
        writeln!(
            md,
            "\n### Phone traffic and compute per switch point (K = {}, exact batch redundancy)\n\n\
             Up: the candidate prompts, the negative prompt and the f32 noise; down: K f32 latents. \
             Phone FLOPs are its T − k U-Net steps (text encoding and VAE decoding are the same at every k).\n",
            self.b.a.k_max
        )?;
        writeln!(
            md,
            "| k (server steps) | up (bytes) | down (bytes) | round trips | phone GFLOPs | server GFLOPs | phone share |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|")?;
        for &k in points {
            let g = self.gen(&self.b.probe, 1, k, EXACT)?;
            let s = &g.stats;
            writeln!(
                md,
                "| {k} of {t_all} | {} | {} | {} | {:.3} | {:.3} | {:.1}% |",
                s.bytes_up,
                s.bytes_down,
                s.round_trips,
                s.device_flops as f64 / 1e9,
                s.server_flops as f64 / 1e9,
                100.0 * s.device_flops as f64 / (s.device_flops + s.server_flops).max(1) as f64
            )?;
        }
        Ok(())
    }

    /// Prompt adherence per k (exact batch redundancy) and per acceleration at k = T/2, over
    /// held-out captions; the first setting (k = 0) is the `local` baseline.
    fn utility(&self, md: &mut String, points: &[usize]) -> Result<()> {
        let (a, half) = (&self.b.a, self.b.half);
        let held: Vec<String> = (0..a.prompts as u64)
            .map(|i| self.b.data.held_out(i).1)
            .collect();
        let device = self.b.device_unet.is_some();
        // None: `local` with the model's own U-Net, the baseline every row is compared with.
        let mut configs: Vec<(String, Option<usize>, Accelerations)> =
            vec![("`local` (the model's own U-Net)".into(), None, EXACT)];
        configs.extend(points.iter().map(|&k| {
            let name = if k == 0 && device {
                "k = 0 (the device U-Net alone)".to_string()
            } else {
                format!("k = {k}, exact")
            };
            (name, Some(k), EXACT)
        }));
        for (name, accel) in accelerations(half).into_iter().skip(2) {
            configs.push((format!("k = {half}, {name}"), Some(half), accel));
        }
        let b = bar(configs.len() * held.len(), "utility");
        writeln!(
            md,
            "\n### Prompt adherence per k and acceleration ({} held-out captions, K = {})\n\n\
             Scored from the pixels by `veil_eval::score` (the evaluation's scorer). `local` is the \
             non-private baseline with the model's own U-Net; \"same as local\" counts captions \
             whose four scores all equal its. {}\n",
            held.len(),
            a.k_max,
            if device {
                "The phone runs the last T − k steps with the smaller device U-Net."
            } else {
                "The phone runs the last T − k steps with the model's own U-Net, so k = 0 equals \
                 `local`."
            }
        )?;
        writeln!(
            md,
            "| setting | colour | shape | position | size | same as local | mean K |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|")?;
        let mut baseline: Vec<[bool; 4]> = Vec::new();
        for (ci, (name, k, accel)) in configs.iter().enumerate() {
            let mut c = [0usize; 4];
            let mut same = 0;
            let mut ks = 0;
            for (i, caption) in held.iter().enumerate() {
                let g = match k {
                    Some(k) => self.gen(caption, 1 + i as u64, *k, *accel)?,
                    None => self.local(caption, 1 + i as u64)?,
                };
                ks += g.obfuscation.as_ref().map_or(0, |o| o.candidates);
                let img = to_rgb(&g.image)?;
                let s = score(&img, caption)?;
                let v = [s.colour, s.shape, s.position, s.size];
                for (n, hit) in c.iter_mut().zip(v) {
                    *n += usize::from(hit);
                }
                if ci == 0 {
                    baseline.push(v);
                }
                same += usize::from(baseline.get(i) == Some(&v));
                b.inc(1);
            }
            let pct = |n: usize| 100.0 * n as f64 / held.len().max(1) as f64;
            writeln!(
                md,
                "| {name} | {:.0}% | {:.0}% | {:.0}% | {:.0}% | {same}/{} | {:.1} |",
                pct(c[0]),
                pct(c[1]),
                pct(c[2]),
                pct(c[3]),
                held.len(),
                ks as f64 / held.len().max(1) as f64
            )?;
        }
        b.finish_and_clear();
        Ok(())
    }
}

fn to_rgb(t: &Tensor) -> Result<image::RgbImage> {
    let (_, h, w) = t.dims3()?;
    let bytes = (t.permute((1, 2, 0))? * 255.0)?
        .round()?
        .clamp(0f32, 255f32)?
        .to_dtype(candle_core::DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    image::RgbImage::from_raw(w as u32, h as u32, bytes).context("image buffer size")
}

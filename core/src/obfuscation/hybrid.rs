//! The `obfuscated` policy's split of one generation (ObCLIP): a server runs the first `k` of
//! `T` denoising steps for all K candidate prompts in one classifier-free-guidance batch and
//! returns K latents; the phone keeps the real candidate's latent and finishes the remaining
//! `T − k` steps with its own (possibly smaller) device U-Net, then decodes.
//!
//! - `EarlySteps`: the server's job, as it travels (`ShardOp::EarlySteps`, `WireOp::EarlySteps`).
//! - `EarlyStepsRunner`: what a server that holds the whole model implements
//!   (`StableDiffusion::early_steps` does the work).
//! - `Accelerations`: the server-side levers — batch redundancy across the candidates' shared
//!   unconditional branch, and T-GATE-style reuse of attention outputs after a gate step.

use std::str::FromStr;
use std::sync::Arc;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::pipeline::StableDiffusion;
use crate::model::scheduler::{new_scheduler, SchedulerKind};
use crate::model::unet::UNet;
use crate::obfuscation::Lexicon;
use crate::placement::accounting::Accounting;
use crate::placement::engine::{CandleEngine, WireDtype};
use crate::placement::policy::Policy;
use crate::placement::runtime::Runtime;

/// Most candidate prompts one job may carry (the server's batch is up to twice this).
pub const MAX_CANDIDATES: usize = 64;
/// Longest candidate or negative prompt, in bytes (CLIP reads 77 tokens anyway).
pub const MAX_PROMPT_BYTES: usize = 4096;
/// Most denoising steps a job may name.
pub const MAX_STEPS: usize = 1000;

/// How the server shares the unconditional (CFG) branch across the K candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchRedundancy {
    /// 2K U-Net rows per step.
    #[default]
    Off,
    /// The unconditional branch is computed once whenever the K latents are bit-identical (the
    /// first step, where they all start from the same noise): K + 1 rows there, 2K after. Exact.
    Exact,
    /// ObCLIP-style: one unconditional row per step, at the mean of the K latents (K + 1 rows
    /// every step). Approximate: the candidates' latents drift apart after the first step.
    Shared,
}

impl BatchRedundancy {
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Exact => "exact",
            Self::Shared => "shared",
        }
    }
}

impl FromStr for BatchRedundancy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Self::Off),
            "exact" => Ok(Self::Exact),
            "shared" => Ok(Self::Shared),
            o => Err(Error::InvalidArgument(format!(
                "unknown batch redundancy `{o}` (expected off, exact or shared)"
            ))),
        }
    }
}

/// The server-side accelerations of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Accelerations {
    pub batch_redundancy: BatchRedundancy,
    /// T-GATE: from this server step on, every transformer block adds the attention output
    /// (self- and cross-attention) it computed at the step before instead of recomputing it.
    pub attention_gate: Option<usize>,
}

/// The server's part of an `obfuscated` generation.
#[derive(Debug, Clone)]
pub struct EarlySteps<T> {
    /// The K candidate prompts, in the order the phone sent them.
    pub candidates: Vec<String>,
    pub negative_prompt: String,
    /// The initial noise [1, C, h, w], before the scheduler's `init_noise_sigma` (shared by all
    /// candidates, so the server's view does not depend on which one is real).
    pub noise: T,
    /// T: the whole schedule's length.
    pub steps: usize,
    /// k: how many of the T steps the server runs (0..=T).
    pub server_steps: usize,
    pub guidance: f64,
    pub scheduler: SchedulerKind,
    pub accel: Accelerations,
}

impl<T> EarlySteps<T> {
    /// Checks every count and bound a server relies on before it allocates anything.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.candidates.is_empty() || self.candidates.len() > MAX_CANDIDATES {
            return bad(format!(
                "{} candidate prompts (1..={MAX_CANDIDATES} allowed)",
                self.candidates.len()
            ));
        }
        if let Some(p) = self
            .candidates
            .iter()
            .chain(std::iter::once(&self.negative_prompt))
            .find(|p| p.len() > MAX_PROMPT_BYTES)
        {
            return bad(format!(
                "a prompt of {} bytes (at most {MAX_PROMPT_BYTES})",
                p.len()
            ));
        }
        if self.steps == 0 || self.steps > MAX_STEPS {
            return bad(format!("{} steps (1..={MAX_STEPS} allowed)", self.steps));
        }
        if self.server_steps > self.steps {
            return bad(format!(
                "{} server steps of {} in all",
                self.server_steps, self.steps
            ));
        }
        if !self.guidance.is_finite() {
            return bad("guidance is not a finite number".into());
        }
        if self.accel.attention_gate == Some(0) {
            return bad("attention gate 0: the gate step reuses the step before it".into());
        }
        Ok(())
    }
}

/// A server that can run early steps: it holds the whole model (text encoder and U-Net).
pub trait EarlyStepsRunner<T>: Send + Sync {
    /// Returns the K candidates' latents [K, C, h, w] after `job.server_steps` steps.
    fn run_early_steps(&self, job: &EarlySteps<T>) -> Result<T>;
}

/// What a run of early steps cost the server.
#[derive(Debug, Clone)]
pub struct EarlyReport {
    /// [K, C, h, w] after the server's steps.
    pub latents: Tensor,
    /// The server's FLOPs (as `device_flops`: the server runs the whole U-Net locally).
    pub accounting: Accounting,
    /// U-Net batch rows summed over the steps (2K per step without batch redundancy).
    pub unet_rows: u64,
}

/// Rows of `x` [K, …] are all bit-identical.
fn rows_identical(x: &Tensor) -> Result<bool> {
    let k = x.dim(0)?;
    if k <= 1 {
        return Ok(true);
    }
    let first = x.narrow(0, 0, 1)?.flatten_all()?.to_vec1::<f32>()?;
    let all = x.flatten_all()?.to_vec1::<f32>()?;
    Ok(all.chunks(first.len().max(1)).all(|row| {
        row.iter()
            .zip(&first)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    }))
}

impl StableDiffusion {
    /// Runs a job's early steps here (the server side of `obfuscated`). `observe` sees the K
    /// latents after every step.
    pub fn early_steps(
        &self,
        job: &EarlySteps<Tensor>,
        observe: &mut dyn FnMut(usize, &Tensor),
    ) -> Result<EarlyReport> {
        job.validate()?;
        let k = job.candidates.len();
        let (one, c, h, w) = job.noise.dims4()?;
        if one != 1 || c != self.unet.config.in_channels || h == 0 || w == 0 {
            return Err(Error::InvalidArgument(format!(
                "noise of shape {:?}, expected [1, {}, h, w]",
                job.noise.dims(),
                self.unet.config.in_channels
            )));
        }
        let noise = job.noise.to_dtype(candle_core::DType::F32)?;
        let mut sched = new_scheduler(job.scheduler, &self.scheduler_config, job.steps)?;
        let mut latents = (noise * sched.init_noise_sigma())?.repeat((k, 1, 1, 1))?;
        let cfg = job.guidance > 1.0;
        let conds = job
            .candidates
            .iter()
            .map(|p| self.encode_prompt(p))
            .collect::<Result<Vec<_>>>()?;
        let cond = Tensor::cat(&conds, 0)?;
        let uncond = if cfg {
            Some(self.encode_prompt(&job.negative_prompt)?)
        } else {
            None
        };
        let gate = job.accel.attention_gate;
        let mut rt = Runtime::new(
            &self.unet_engine,
            Policy::Local.placement(),
            &[],
            WireDtype::F32,
        )?
        .with_attention_reuse(gate.map(|g| g as u64));
        let timesteps = sched.timesteps().to_vec();
        let mut rows = 0u64;
        let mut acct = Accounting::new(0);
        for (i, &t) in timesteps.iter().enumerate().take(job.server_steps) {
            let eps = match &uncond {
                None => {
                    let x = sched.scale_model_input(&latents, i)?;
                    rows += k as u64;
                    futures::executor::block_on(self.unet.forward(&mut rt, &x, t, &cond))?
                }
                Some(u) => {
                    // A cache taken at this step is reused with the next step's layout, so the
                    // exact mode keeps the full layout on the step before the gate.
                    let shared_row = match job.accel.batch_redundancy {
                        BatchRedundancy::Off => None,
                        BatchRedundancy::Exact => {
                            if gate != Some(i + 1) && rows_identical(&latents)? {
                                Some(latents.narrow(0, 0, 1)?)
                            } else {
                                None
                            }
                        }
                        BatchRedundancy::Shared => Some(latents.mean_keepdim(0)?),
                    };
                    match shared_row {
                        None => {
                            let x = Tensor::cat(&[&latents, &latents], 0)?;
                            let x = sched.scale_model_input(&x, i)?;
                            let ctx = Tensor::cat(&[&u.repeat((k, 1, 1))?, &cond], 0)?;
                            rows += 2 * k as u64;
                            let out = futures::executor::block_on(
                                self.unet.forward(&mut rt, &x, t, &ctx),
                            )?;
                            let eu = out.narrow(0, 0, k)?;
                            let ec = out.narrow(0, k, k)?;
                            (&eu + ((ec - &eu)? * job.guidance)?)?
                        }
                        Some(row) => {
                            let x = Tensor::cat(&[&row, &latents], 0)?;
                            let x = sched.scale_model_input(&x, i)?;
                            let ctx = Tensor::cat(&[u, &cond], 0)?;
                            rows += 1 + k as u64;
                            let out = futures::executor::block_on(
                                self.unet.forward(&mut rt, &x, t, &ctx),
                            )?;
                            let eu = out.narrow(0, 0, 1)?;
                            let ec = out.narrow(0, 1, k)?;
                            eu.broadcast_add(&(ec.broadcast_sub(&eu)? * job.guidance)?)?
                        }
                    }
                }
            };
            latents = sched.step(&eps, i, &latents)?;
            acct.absorb(rt.take_accounting());
            observe(i, &latents);
        }
        Ok(EarlyReport {
            latents,
            accounting: acct,
            unet_rows: rows,
        })
    }
}

impl EarlyStepsRunner<Tensor> for StableDiffusion {
    fn run_early_steps(&self, job: &EarlySteps<Tensor>) -> Result<Tensor> {
        Ok(self.early_steps(job, &mut |_, _| {})?.latents)
    }
}

/// A device U-Net for the late steps: any diffusers U-Net with the same latent space.
pub struct DeviceUNet {
    pub unet: UNet,
    pub engine: CandleEngine,
}

impl DeviceUNet {
    /// Loads `dir/unet` (a diffusers model folder) or `dir` itself when it holds the U-Net's
    /// `config.json` directly.
    pub fn load(dir: &std::path::Path, device: &candle_core::Device) -> Result<Self> {
        let unet_dir = if dir.join("unet").join("config.json").is_file() {
            dir.join("unet")
        } else {
            dir.to_path_buf()
        };
        let cfg: crate::model::config::UNetConfig =
            crate::model::config::read_json(&unet_dir.join("config.json"))?;
        cfg.validate()?;
        let unet = UNet::new(&cfg)?;
        let weights = crate::model::pipeline::load_unet_weights(&unet_dir, &unet, device)?;
        Ok(Self {
            unet,
            engine: CandleEngine::new(weights, device.clone()),
        })
    }
}

/// The phone's settings of an `obfuscated` generation.
#[derive(Clone, Default)]
pub struct ObfuscationOptions {
    /// k: steps run on the server (default: half of T).
    pub server_steps: Option<usize>,
    /// Most candidates sent (default 8).
    pub k_max: Option<usize>,
    /// The attribute lexicon (default: the built-in one).
    pub lexicon: Option<Arc<Lexicon>>,
    /// What the server is asked to accelerate.
    pub accel: Accelerations,
    /// The U-Net of the late steps (default: the model's own).
    pub device_unet: Option<Arc<DeviceUNet>>,
}

impl std::fmt::Debug for ObfuscationOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObfuscationOptions")
            .field("server_steps", &self.server_steps)
            .field("k_max", &self.k_max)
            .field("custom_lexicon", &self.lexicon.is_some())
            .field("accel", &self.accel)
            .field("device_unet", &self.device_unet.is_some())
            .finish()
    }
}

/// Default K_max.
pub const DEFAULT_K_MAX: usize = 8;

/// What an `obfuscated` generation sent, for its caller (the real index is not in it).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ObfuscationReport {
    /// The sensitive spans found in the prompt.
    pub spans: Vec<crate::obfuscation::Span>,
    /// K: candidate prompts sent (0 when k = 0: nothing leaves the phone).
    pub candidates: usize,
    /// Every combination of the detected values (before the K_max cut).
    pub combinations: usize,
    /// k: steps the server ran.
    pub server_steps: usize,
    /// T − k: steps this device ran.
    pub device_steps: usize,
    /// U-Net batch rows the server ran (summed over its steps).
    pub server_unet_rows: u64,
}

/// U-Net rows the server runs at step `i` of a job with K candidates (the same rule as
/// `StableDiffusion::early_steps`; under exact redundancy the K latents are identical exactly at
/// the first step, where they are all the same noise).
fn rows_at(i: usize, k: usize, cfg: bool, accel: &Accelerations) -> u64 {
    let k = k as u64;
    if !cfg {
        return k;
    }
    match accel.batch_redundancy {
        BatchRedundancy::Off => 2 * k,
        BatchRedundancy::Shared => k + 1,
        BatchRedundancy::Exact => {
            if (i == 0 || k == 1) && accel.attention_gate != Some(i + 1) {
                k + 1
            } else {
                2 * k
            }
        }
    }
}

/// The server's FLOPs for a job, from shapes alone: FLOPs are linear in the batch, so one
/// shape-only U-Net call per row (an ordinary one and, with a gate, one that reuses attention)
/// times the rows of each step.
pub fn early_steps_flops(
    unet: &UNet,
    latent: (usize, usize),
    context_len: usize,
    k: usize,
    server_steps: usize,
    cfg: bool,
    accel: &Accelerations,
) -> Result<u64> {
    use crate::placement::plan::{account_step, PlanInput};
    let per_row = |reuse: bool| {
        account_step(
            unet,
            &PlanInput {
                latent_height: latent.0,
                latent_width: latent.1,
                batch: 1,
                context_len,
                servers: 0,
                policy: Policy::Local,
                wire: WireDtype::F32,
                reuse_attention: reuse,
            },
        )
        .map(|a| a.device_flops)
    };
    let full = per_row(false)?;
    let reused = if accel.attention_gate.is_some() {
        per_row(true)?
    } else {
        full
    };
    Ok((0..server_steps)
        .map(|i| {
            let f = if accel.attention_gate.is_some_and(|g| i >= g) {
                reused
            } else {
                full
            };
            rows_at(i, k, cfg, accel) * f
        })
        .sum())
}

impl StableDiffusion {
    /// The phone's side of `obfuscated`: detect, build the candidates, have `server` run the
    /// first k steps of all of them, keep the real latent, finish with the device U-Net.
    pub(crate) async fn generate_obfuscated(
        &self,
        opts: &crate::model::pipeline::GenerateOptions,
        backends: &[Arc<dyn crate::placement::backend::ShardBackend<Tensor>>],
        progress: &mut (dyn FnMut(crate::model::pipeline::Progress<'_>) + Send),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<crate::model::pipeline::Generation> {
        use crate::model::pipeline::{seeded_normal, Generation, Progress, RunStats};
        use crate::placement::accounting::{OpKind, Transfer};
        use crate::placement::audit::{Audit, TextView, View, ViewKind};
        use crate::placement::backend::{ShardCall, ShardOp, ShardRequest};

        let start = std::time::Instant::now();
        let o = &opts.obfuscation;
        let total = opts.steps;
        let k_steps = o.server_steps.unwrap_or(total / 2);
        if k_steps > total {
            return Err(Error::InvalidArgument(format!(
                "{k_steps} server steps of {total} in all"
            )));
        }
        if k_steps > 0 && k_steps < total && opts.scheduler == SchedulerKind::DpmSolverMultistep {
            return Err(Error::Unsupported(
                "the obfuscated policy hands the latents over mid-schedule, which the multistep \
                 DPM-Solver++ cannot do (its history stays on the server); use ddim or euler"
                    .into(),
            ));
        }
        let (h, w) = self.latent_size(opts.width, opts.height)?;
        let lc = self.unet.config.in_channels;
        let noise = match &opts.latents {
            Some(l) if l.dims() == [1, lc, h, w] => l
                .to_dtype(candle_core::DType::F32)?
                .to_device(&self.device)?,
            Some(l) => {
                return Err(Error::InvalidArgument(format!(
                    "initial latents have shape {:?}, expected {:?}",
                    l.dims(),
                    [1, lc, h, w]
                )))
            }
            None => seeded_normal(opts.seed, &[1, lc, h, w], &self.device)?,
        };
        let builtin;
        let lex = match &o.lexicon {
            Some(l) => l.as_ref(),
            None => {
                builtin = Lexicon::builtin()?;
                &builtin
            }
        };
        let spans = lex.detect(&opts.prompt);
        let set = crate::obfuscation::candidates(
            &opts.prompt,
            &spans,
            lex,
            o.k_max.unwrap_or(DEFAULT_K_MAX),
            &mut rand::rng(),
        )?;
        let kk = set.prompts.len();
        let cfg = opts.guidance > 1.0;
        let mut scheduler = new_scheduler(opts.scheduler, &self.scheduler_config, total)?;
        let mut latents = (&noise * scheduler.init_noise_sigma())?;
        let mut audit = Audit::new(usize::from(k_steps > 0));
        let mut acct = Accounting::new(usize::from(k_steps > 0));
        let mut server_rows = 0;
        if k_steps > 0 {
            let server = backends.first().ok_or_else(|| {
                Error::InvalidArgument("the obfuscated policy needs one server".into())
            })?;
            if cancelled() {
                return Err(Error::Cancelled);
            }
            let job = EarlySteps {
                candidates: set.prompts.clone(),
                negative_prompt: opts.negative_prompt.clone(),
                noise: noise.clone(),
                steps: total,
                server_steps: k_steps,
                guidance: opts.guidance,
                scheduler: opts.scheduler,
                accel: o.accel,
            };
            job.validate()?;
            // The audit records what leaves the phone: every candidate as text, and the noise.
            let noise_bytes = (lc * h * w) as u64 * 4;
            let mut up = noise_bytes;
            for p in &set.prompts {
                audit.texts.push(TextView {
                    server: 0,
                    call: 0,
                    text: p.clone(),
                });
                audit.views.push(View {
                    server: 0,
                    call: 0,
                    layer: "early_steps".into(),
                    kind: ViewKind::Prompt,
                    resolution: None,
                    rows: None,
                    text_indexed: true,
                    bytes: p.len() as u64,
                });
                up += p.len() as u64;
            }
            if cfg {
                audit.texts.push(TextView {
                    server: 0,
                    call: 0,
                    text: opts.negative_prompt.clone(),
                });
                up += opts.negative_prompt.len() as u64;
            }
            audit.views.push(View {
                server: 0,
                call: 0,
                layer: "early_steps".into(),
                kind: ViewKind::Latent,
                resolution: Some((h, w)),
                rows: Some(0..h),
                text_indexed: false,
                bytes: noise_bytes,
            });
            let reply = server
                .execute(ShardRequest {
                    calls: vec![ShardCall::reply(ShardOp::EarlySteps(Box::new(job)))],
                })
                .await?;
            let all = reply
                .outputs
                .into_iter()
                .next()
                .ok_or_else(|| Error::Backend {
                    backend: 0,
                    message: "the early-steps reply carried no latents".into(),
                })?;
            if all.dims() != [kk, lc, h, w] {
                return Err(Error::Backend {
                    backend: 0,
                    message: format!(
                        "early-steps reply of shape {:?}, expected {:?}",
                        all.dims(),
                        [kk, lc, h, w]
                    ),
                });
            }
            latents = all
                .narrow(0, set.real_index(), 1)?
                .to_dtype(candle_core::DType::F32)?;
            server_rows = (0..k_steps).map(|i| rows_at(i, kk, cfg, &o.accel)).sum();
            acct.transfers.push(Transfer {
                kind: OpKind::EarlySteps,
                layer: "early_steps".into(),
                up: vec![up],
                down: vec![(kk * lc * h * w) as u64 * opts.wire.size() as u64],
            });
            acct.round_trips += 1;
            acct.unet_calls += k_steps as u64;
            acct.server_flops[0] = early_steps_flops(
                &self.unet,
                (h, w),
                self.tokenizer.max_len(),
                kk,
                k_steps,
                cfg,
                &o.accel,
            )?;
            progress(Progress {
                step: k_steps,
                total,
                latents: &latents,
            });
        }
        // The late steps, on the device, exactly as a local generation runs them.
        let (unet, engine) = match &o.device_unet {
            Some(d) => {
                if d.unet.config.in_channels != lc {
                    return Err(Error::InvalidArgument(format!(
                        "the device U-Net takes {} latent channels, the model's VAE {lc}",
                        d.unet.config.in_channels
                    )));
                }
                (&d.unet, &d.engine)
            }
            None => (&self.unet, &self.unet_engine),
        };
        if k_steps < total {
            let cond = self.encode_prompt(&opts.prompt)?;
            let context = if cfg {
                let uncond = self.encode_prompt(&opts.negative_prompt)?;
                Tensor::cat(&[uncond, cond], 0)?
            } else {
                cond
            };
            let mut rt = Runtime::new(engine, Policy::Local.placement(), &[], opts.wire)?;
            let timesteps = scheduler.timesteps().to_vec();
            for (i, &t) in timesteps.iter().enumerate().skip(k_steps) {
                if cancelled() {
                    return Err(Error::Cancelled);
                }
                let x = if cfg {
                    Tensor::cat(&[&latents, &latents], 0)?
                } else {
                    latents.clone()
                };
                let x = scheduler.scale_model_input(&x, i)?;
                let out = unet.forward(&mut rt, &x, t, &context).await?;
                let eps = if cfg {
                    let u = out.narrow(0, 0, 1)?;
                    let c = out.narrow(0, 1, 1)?;
                    (&u + ((c - &u)? * opts.guidance)?)?
                } else {
                    out
                };
                latents = scheduler.step(&eps, i, &latents)?;
                acct.absorb(rt.take_accounting());
                progress(Progress {
                    step: i + 1,
                    total,
                    latents: &latents,
                });
            }
        }
        let image = self.decode(&latents)?;
        let stats = RunStats::new(&acct, total, start.elapsed().as_secs_f64());
        Ok(Generation {
            image,
            latents,
            accounting: acct,
            audit,
            captured: Vec::new(),
            stats,
            obfuscation: Some(ObfuscationReport {
                spans,
                candidates: if k_steps > 0 { kk } else { 0 },
                combinations: set.combinations,
                server_steps: k_steps,
                device_steps: total - k_steps,
                server_unet_rows: server_rows,
            }),
        })
    }
}

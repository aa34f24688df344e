//! The `obfuscated` strategy (ObCLIP), the phone's side: detect the sensitive attributes,
//! build K candidate prompts, have one server that holds the whole model run the first k of T
//! steps for all of them (`EarlySteps`, its own message), keep the real candidate's latent, and
//! finish the remaining T − k steps on the phone with the device U-Net, through the same denoise
//! loop as every generation. The server's side is `early_steps`.
//!
//! Image-to-image runs the same way over the steps the strength keeps (`img2img`): the server's
//! k steps start from the init image's latents, noised on the phone, which the job carries in
//! place of the noise. The server therefore sees the noised image latent: `obfuscated` hides
//! which of the K candidate prompts is real (the prompt's attributes), not an init image.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::client::denoise::{denoise, LoopHooks, Runners};
pub use crate::client::early_steps::{early_steps_flops, EarlyReport};
pub use crate::client::options::{
    DeviceUNet, ObfuscationOptions, ObfuscationReport, DEFAULT_K_MAX,
};
use crate::client::options::{GenerateOptions, Generation, RunStats};
use crate::client::pipeline::{Progress, StableDiffusion};
use crate::model::scheduler::{Scheduler, SchedulerKind};
use crate::obfuscation::{candidates_with_key, CandidateSet, Lexicon, ObfuscationKey};
use crate::placement::accounting::{Accounting, OpKind, Transfer};
use crate::placement::audit::{Audit, TextView, View, ViewKind};
use crate::placement::policy::Policy;
use crate::placement::runtime::Runtime;
use crate::vocab::error::{Error, Result};
pub use crate::vocab::job::{
    Accelerations, BatchRedundancy, EarlySteps, EarlyStepsRunner, MAX_CANDIDATES, MAX_PROMPT_BYTES,
    MAX_STEPS,
};
use crate::vocab::ops::ShardBackend;

/// What the phone asks the server: the candidates, the tensor every candidate starts from (the
/// noise, or the noised init latents), where in the schedule, and how many steps.
struct Job<'a> {
    set: &'a CandidateSet,
    start: &'a Tensor,
    /// Image-to-image: the schedule step `start` enters.
    start_step: Option<usize>,
    /// Inpainting's extra U-Net input channels [1, Cc, h, w].
    condition: Option<&'a Tensor>,
    k_steps: usize,
}

/// What the phone sent for one `obfuscated` generation, and what came back.
struct EarlyExchange {
    /// The real candidate's latent [1, C, h, w] after the server's steps.
    latents: Tensor,
    audit: Audit,
    accounting: Accounting,
    server_rows: u64,
}

impl StableDiffusion {
    /// The phone's side of `obfuscated`: detect, build the candidates, have `backends[0]` run
    /// the first k steps of all of them, keep the real latent, finish with the device U-Net.
    pub(crate) async fn generate_hybrid(
        &self,
        opts: &GenerateOptions,
        backends: &[Arc<dyn ShardBackend<Tensor>>],
        progress: &mut (dyn FnMut(Progress<'_>) + Send),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<Generation> {
        let clock = Instant::now();
        let o = &opts.obfuscation;
        let mut start = self.start(opts)?;
        let (first, run) = (start.first(), start.steps_run());
        let total = start.scheduler.timesteps().len();
        // k counts the steps that run (all T for text-to-image).
        let k_steps = o.server_steps.unwrap_or(run / 2);
        check_split(k_steps, run, opts.scheduler)?;
        let builtin;
        let lex = match &o.lexicon {
            Some(l) => l.as_ref(),
            None => {
                builtin = Lexicon::builtin()?;
                &builtin
            }
        };
        let spans = lex.detect(&opts.prompt);
        let k_max = o.k_max.unwrap_or(DEFAULT_K_MAX);
        // The user's key, else this process's (weaker: `ObfuscationOptions::key`).
        let key = o
            .key
            .as_deref()
            .unwrap_or_else(|| ObfuscationKey::process());
        let set = candidates_with_key(&opts.prompt, &spans, lex, k_max, key, &mut rand::rng())?;
        let mut latents = start.latents.clone();
        let mut progress = start.shifted(progress);
        let mut exchange = EarlyExchange {
            latents: latents.clone(),
            audit: Audit::new(usize::from(k_steps > 0)),
            accounting: Accounting::new(usize::from(k_steps > 0)),
            server_rows: 0,
        };
        if k_steps > 0 {
            let server = backends.first().ok_or_else(|| {
                Error::InvalidArgument("the obfuscated policy needs one server".into())
            })?;
            if cancelled() {
                return Err(Error::Cancelled);
            }
            let job = Job {
                set: &set,
                start: &start.sent,
                start_step: start.start_step,
                condition: start.condition.as_ref(),
                k_steps,
            };
            exchange = self.send_early_steps(server.as_ref(), opts, job).await?;
            latents = exchange.latents.clone();
            progress(Progress {
                step: first + k_steps,
                total,
                latents: &latents,
            });
        }
        if k_steps < run {
            let late = self
                .late_steps(
                    opts,
                    start.scheduler.as_mut(),
                    (latents, start.condition.clone()),
                    first + k_steps..total,
                    &mut progress,
                    cancelled,
                )
                .await?;
            latents = late.latents;
            exchange.accounting.absorb(late.accounting);
        }
        let image = self.decode(&latents)?;
        let acct = exchange.accounting;
        let stats = RunStats::new(&acct, run, clock.elapsed().as_secs_f64());
        Ok(Generation {
            image,
            latents,
            accounting: acct,
            audit: exchange.audit,
            #[cfg(feature = "eval-capture")]
            captured: Vec::new(),
            stats,
            obfuscation: Some(ObfuscationReport {
                spans,
                candidates: if k_steps > 0 { set.prompts.len() } else { 0 },
                combinations: set.combinations,
                server_steps: k_steps,
                device_steps: run - k_steps,
                server_unet_rows: exchange.server_rows,
            }),
        })
    }

    /// Sends the job, records what left the phone (every candidate as text, and the starting
    /// tensor) in the audit and the accounting, and keeps the real candidate's latent of the
    /// reply.
    async fn send_early_steps(
        &self,
        server: &dyn ShardBackend<Tensor>,
        opts: &GenerateOptions,
        job: Job<'_>,
    ) -> Result<EarlyExchange> {
        let Job {
            set,
            start,
            start_step,
            condition,
            k_steps,
        } = job;
        let accel = opts.obfuscation.accel;
        let kk = set.prompts.len();
        let (_, lc, h, w) = start.dims4()?;
        let cfg = opts.guidance > 1.0;
        let job = EarlySteps {
            candidates: set.prompts.clone(),
            negative_prompt: opts.negative_prompt.clone(),
            noise: start.clone(),
            steps: opts.steps,
            start_step,
            server_steps: k_steps,
            condition: condition.cloned(),
            guidance: opts.guidance,
            scheduler: opts.scheduler,
            accel,
        };
        job.validate()?;
        let noise_bytes = (lc * h * w) as u64 * 4;
        let mut audit = Audit::new(1);
        let up = record_texts(
            &mut audit,
            &set.prompts,
            cfg.then_some(opts.negative_prompt.as_str()),
        );
        let noise_view = View {
            server: 0,
            call: 0,
            layer: "early_steps".into(),
            kind: ViewKind::Latent,
            resolution: Some((h, w)),
            rows: Some(0..h),
            text_indexed: false,
            // The U-Net's input: seeded noise (no prompt, no image), or under image-to-image
            // the noised init latents, the image itself at that noise level.
            class: crate::placement::audit::DepClass::Raw,
            bytes: noise_bytes,
        };
        audit.views.push(noise_view.clone());
        // Inpainting: the mask and the masked image's latents, image content, whole.
        let condition_bytes = condition.map_or(0, |c| c.elem_count() as u64 * 4);
        if condition.is_some() {
            audit.views.push(View {
                layer: "early_steps condition".into(),
                bytes: condition_bytes,
                ..noise_view
            });
        }
        let all = server.early_steps(job).await?;
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
        let latents = all.narrow(0, set.real_index(), 1)?.to_dtype(DType::F32)?;
        let mut acct = Accounting::new(1);
        acct.transfers.push(Transfer::uncoded(
            OpKind::EarlySteps,
            "early_steps".into(),
            vec![noise_bytes + condition_bytes + up],
            vec![(kk * lc * h * w) as u64 * opts.wire.size() as u64],
        ));
        acct.round_trips += 1;
        acct.unet_calls += k_steps as u64;
        acct.server_flops[0] = early_steps_flops(
            &self.unet,
            (h, w),
            self.tokenizer.max_len(),
            kk,
            k_steps,
            cfg,
            &accel,
        )?;
        Ok(EarlyExchange {
            latents,
            audit,
            accounting: acct,
            server_rows: (0..k_steps)
                .map(|i| accel.rows_at(i, kk, cfg).count(kk))
                .sum(),
        })
    }

    /// The late steps (k..T of the schedule, after the server's) on the device, with the device
    /// U-Net (default: the model's own).
    async fn late_steps(
        &self,
        opts: &GenerateOptions,
        scheduler: &mut dyn Scheduler,
        (latents, condition): (Tensor, Option<Tensor>),
        steps: std::ops::Range<usize>,
        progress: &mut (dyn FnMut(Progress<'_>) + Send),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<crate::client::denoise::LoopReport> {
        let lc = self.unet.config.in_channels;
        let (unet, engine) = match &opts.obfuscation.device_unet {
            Some(d) => {
                if d.unet.config.in_channels != lc {
                    return Err(Error::InvalidArgument(format!(
                        "the device U-Net takes {} input channels, the model's {lc}",
                        d.unet.config.in_channels
                    )));
                }
                (&d.unet, &d.engine)
            }
            None => (&self.unet, &self.unet_engine),
        };
        let conditioning = self
            .text_conditioning(opts)?
            .with_image_condition(condition);
        let mut rt = Runtime::new(engine, Policy::Local.placement(), &[], opts.wire)?;
        denoise(
            unet,
            Runners::One(&mut rt),
            scheduler,
            latents,
            steps,
            &conditioning,
            LoopHooks {
                cancelled,
                progress,
            },
        )
        .await
    }
}

/// The split point must lie in the schedule, and a multistep sampler cannot change hands. The
/// stochastic samplers (euler-a, lcm) can: they carry no state between steps, and their step
/// noise is keyed by the job's initial noise (`new_seeded_scheduler`), which the server and the
/// phone both hold, so each side draws what a one-party run would.
fn check_split(k_steps: usize, total: usize, scheduler: SchedulerKind) -> Result<()> {
    if k_steps > total {
        return Err(Error::InvalidArgument(format!(
            "{k_steps} server steps of {total} in all"
        )));
    }
    if k_steps > 0 && k_steps < total && scheduler == SchedulerKind::DpmSolverMultistep {
        return Err(Error::Unsupported(
            "the obfuscated policy hands the latents over mid-schedule, which the multistep \
             DPM-Solver++ cannot do (its history stays on the server); use ddim, euler, \
             euler-a or lcm"
                .into(),
        ));
    }
    Ok(())
}

/// Records every candidate (and the negative prompt, under guidance) as text the server
/// received; returns their bytes.
fn record_texts(audit: &mut Audit, prompts: &[String], negative: Option<&str>) -> u64 {
    let mut up = 0;
    for p in prompts {
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
            class: crate::placement::audit::DepClass::Text,
            bytes: p.len() as u64,
        });
        up += p.len() as u64;
    }
    if let Some(n) = negative {
        audit.texts.push(TextView {
            server: 0,
            call: 0,
            text: n.to_string(),
        });
        up += n.len() as u64;
    }
    up
}

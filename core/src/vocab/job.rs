//! The `obfuscated` policy's server job (ObCLIP), as vocabulary every layer shares: what the
//! phone asks (`EarlySteps`), the accelerations a server may apply and the one rule for how a
//! step is batched, and the trait a server that holds the whole model implements. The job is
//! its own message on the wire, not a shard op.

use std::fmt;
use std::str::FromStr;

use crate::vocab::error::{Error, Result};

/// Which sampler to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    DpmSolverMultistep,
    EulerDiscrete,
    /// Euler Ancestral: stochastic, fresh noise every step (SD-Turbo with `trailing` spacing).
    EulerAncestral,
    /// The Latent Consistency Model sampler: few steps, fresh noise between steps.
    Lcm,
}

impl FromStr for SchedulerKind {
    type Err = Error;

    /// "ddim", "dpm++2m" (also "dpmsolver++", "dpm"), "euler", "euler-a" (also
    /// "euler_ancestral"), "lcm", case-insensitive; the diffusers class names are accepted too,
    /// so a config's `_class_name` can be passed straight in.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ddim" | "ddimscheduler" => Ok(Self::Ddim),
            "dpm++2m" | "dpmsolver++" | "dpm" | "dpmsolvermultistepscheduler" => {
                Ok(Self::DpmSolverMultistep)
            }
            "euler" | "eulerdiscretescheduler" => Ok(Self::EulerDiscrete),
            "euler-a" | "euler_ancestral" | "eulerancestraldiscretescheduler" => {
                Ok(Self::EulerAncestral)
            }
            "lcm" | "lcmscheduler" => Ok(Self::Lcm),
            _ => Err(Error::InvalidArgument(format!(
                "unknown scheduler {s:?}; expected one of ddim, dpm++2m (dpmsolver++, dpm), \
                 euler, euler-a (euler_ancestral), lcm"
            ))),
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ddim => "ddim",
            Self::DpmSolverMultistep => "dpm++2m",
            Self::EulerDiscrete => "euler",
            Self::EulerAncestral => "euler-a",
            Self::Lcm => "lcm",
        })
    }
}

/// Most candidate prompts one job may carry (the server's batch is up to twice this).
pub const MAX_CANDIDATES: usize = 64;
/// Longest candidate or negative prompt, in bytes (CLIP reads 77 tokens anyway).
pub const MAX_PROMPT_BYTES: usize = 4096;
/// Most denoising steps a job may name.
pub const MAX_STEPS: usize = 1000;
/// Most U-Net FLOPs one job may ask of a server (priced from shapes before it runs: about a
/// 20-step SD1.5 512 px guided batch of 32 candidates; K = 64, T = k = 1000 asks ~10¹⁷).
pub const MAX_EARLY_STEPS_FLOPS: u64 = 1_000_000_000_000_000;
/// Most bytes one attention query chunk of a job's batch may hold (scores and probabilities):
/// the server narrows its query chunks to fit, and refuses a batch that cannot.
pub const EARLY_STEPS_ATTENTION_BYTES: u64 = 1 << 30;

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
    /// Where every candidate starts, [1, C, h, w] (shared by all candidates, so the server's view
    /// does not depend on which one is real): text-to-image (`start_step` None), the initial
    /// noise before the scheduler's `init_noise_sigma`; image-to-image, the latents entering
    /// step `start_step`: the init image's latents noised to that step's level, taken as they
    /// are. A stochastic sampler's step noise is keyed by this tensor either way.
    pub noise: T,
    /// T: the whole schedule's length.
    pub steps: usize,
    /// Image-to-image: the schedule step the run starts at (diffusers' `t_start`, from the
    /// strength), with `noise` the noised init latents; the server runs steps
    /// `start_step..start_step + server_steps`. None: text-to-image, steps `0..server_steps`.
    pub start_step: Option<usize>,
    /// k: how many of the steps run the server runs (0..=T − start_step).
    pub server_steps: usize,
    /// Inpainting: [1, Cc, h, w] appended to every U-Net input (the mask on the latent grid and
    /// the masked image's latents: image content, sent whole like `noise`). None otherwise.
    pub condition: Option<T>,
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
        let first = self.first_step();
        if first >= self.steps {
            return bad(format!(
                "image-to-image start at step {first} of a {}-step schedule",
                self.steps
            ));
        }
        if self.server_steps > self.steps - first {
            return bad(format!(
                "{} server steps of {} in all",
                self.server_steps,
                self.steps - first
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

impl<T> EarlySteps<T> {
    /// The schedule step the run starts at: `start_step` (image-to-image), else 0.
    pub fn first_step(&self) -> usize {
        self.start_step.unwrap_or(0)
    }
}

/// A server that can run early steps: it holds the whole model (text encoder and U-Net).
pub trait EarlyStepsRunner<T>: Send + Sync {
    /// Returns the K candidates' latents [K, C, h, w] after `job.server_steps` steps.
    fn run_early_steps(&self, job: &EarlySteps<T>) -> Result<T>;

    /// The memory a job's U-Net calls hold at their peak (activations kept for the skip
    /// connections, working tensors, an attention chunk), from its shapes: what a server
    /// reserves from its memory budget before running it.
    fn working_bytes(&self, job: &EarlySteps<T>) -> Result<u64> {
        let _ = job;
        Ok(0)
    }
}

impl Accelerations {
    /// U-Net batch rows a server runs at step `i` of a job with `k` candidates — the one rule
    /// both the server (what it batches) and the phone (what it accounts) follow. Under exact
    /// redundancy the K latents are identical exactly at the first step (all the same noise) or
    /// when there is one candidate; the step before the gate keeps the full layout, because a
    /// cache taken there is reused with the next step's layout.
    pub fn rows_at(&self, i: usize, k: usize, cfg: bool) -> StepRows {
        if !cfg {
            return StepRows::Cond;
        }
        match self.batch_redundancy {
            BatchRedundancy::Off => StepRows::Full,
            BatchRedundancy::Shared => StepRows::SharedUncond,
            BatchRedundancy::Exact => {
                if (i == 0 || k == 1) && self.attention_gate != Some(i + 1) {
                    StepRows::SharedUncond
                } else {
                    StepRows::Full
                }
            }
        }
    }
}

/// How one guided step of K candidates is batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepRows {
    /// No guidance: the K conditional rows.
    Cond,
    /// One unconditional row per candidate: 2K rows.
    Full,
    /// One unconditional row shared by all K: K + 1 rows.
    SharedUncond,
}

impl StepRows {
    /// U-Net batch rows for `k` candidates.
    pub fn count(self, k: usize) -> u64 {
        let k = k as u64;
        match self {
            StepRows::Cond => k,
            StepRows::Full => 2 * k,
            StepRows::SharedUncond => k + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_parsing() -> Result<()> {
        assert_eq!("ddim".parse::<SchedulerKind>()?, SchedulerKind::Ddim);
        assert_eq!(
            "DPM++2M".parse::<SchedulerKind>()?,
            SchedulerKind::DpmSolverMultistep
        );
        assert_eq!(
            "dpmsolver++".parse::<SchedulerKind>()?,
            SchedulerKind::DpmSolverMultistep
        );
        assert_eq!(
            "dpm".parse::<SchedulerKind>()?,
            SchedulerKind::DpmSolverMultistep
        );
        assert_eq!(
            "euler".parse::<SchedulerKind>()?,
            SchedulerKind::EulerDiscrete
        );
        for name in [
            "euler-a",
            "Euler_Ancestral",
            "EulerAncestralDiscreteScheduler",
        ] {
            assert_eq!(
                name.parse::<SchedulerKind>()?,
                SchedulerKind::EulerAncestral
            );
        }
        for name in ["lcm", "LCMScheduler"] {
            assert_eq!(name.parse::<SchedulerKind>()?, SchedulerKind::Lcm);
        }
        assert!(matches!(
            "pndm".parse::<SchedulerKind>(),
            Err(Error::InvalidArgument(_))
        ));
        for k in [
            SchedulerKind::Ddim,
            SchedulerKind::DpmSolverMultistep,
            SchedulerKind::EulerDiscrete,
            SchedulerKind::EulerAncestral,
            SchedulerKind::Lcm,
        ] {
            assert_eq!(k.to_string().parse::<SchedulerKind>()?, k);
        }
        Ok(())
    }
}

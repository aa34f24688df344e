//! Classifier-free guidance with its two halves on different servers — `strict`'s default.
//!
//! Why: both halves of a guided step start from the same x_t, so up to the first
//! cross-attention they are identical, and after it they differ only by the text's effect.
//! A server that holds both halves of the same rows can solve the unconditional half (the
//! empty prompt is public) for the shared state and then test any candidate prompt exactly
//! against the conditional half (DESIGN.md §2.5). A server holding one half of a strip has no
//! such test: the shared state it would need depends on rows it never sees.
//!
//! How: a guided step runs as two U-Net calls over two runtimes with disjoint backends — the
//! conditional rows on the first ⌈N/2⌉ servers, the unconditional rows on the other ⌊N/2⌋ —
//! concurrently, so a step waits for as many round trips as before. Every group must hold at
//! least two strips (a single server holding a whole half could compute the self-attention
//! itself, and the test is exact again), so with N = 2 or 3 the unconditional half runs on
//! the phone instead. What it costs: with N ≥ 4 each server holds a strip 2/N of the map tall
//! instead of 1/N; with N < 4 the phone computes the whole unconditional U-Net call.
//!
//! The accounting, the audit and the evaluation's capture of the two runtimes are merged here
//! with the unconditional group's servers numbered after the conditional group's.

use std::ops::Range;
use std::str::FromStr;

use candle_core::Tensor;

use crate::model::unet::UNet;
use crate::placement::accounting::{Accounting, Transfer};
use crate::placement::audit::Audit;
use crate::placement::policy::Policy;
use crate::placement::runtime::Runtime;
use crate::vocab::engine::Engine;
use crate::vocab::error::{Error, Result};
use crate::vocab::job::StepRows;

/// Which servers a guided step's two halves go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuidanceHalves {
    /// Both halves of a strip on the same server (PPIDM's batch; `strict` as first built).
    /// Research only: a server can then test candidate prompts exactly.
    Together,
    /// The conditional and unconditional halves on disjoint server groups (or the
    /// unconditional half on the phone when there are fewer than 4 servers).
    Apart,
}

impl GuidanceHalves {
    /// The policy's own choice: `Apart` for `strict`, `Together` for the others.
    pub fn default_for(policy: Policy) -> Self {
        match policy {
            Policy::Strict => Self::Apart,
            _ => Self::Together,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Together => "together",
            Self::Apart => "apart",
        }
    }
}

impl FromStr for GuidanceHalves {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "together" => Ok(Self::Together),
            "apart" => Ok(Self::Apart),
            o => Err(Error::InvalidArgument(format!(
                "unknown guidance halves `{o}` (expected apart or together)"
            ))),
        }
    }
}

/// Whether a step of `policy` with guidance (`guided`) runs its halves apart, given the
/// caller's choice (None: the policy's own). Only placements that offload a U-Net call split it;
/// `obfuscated` runs each call whole on one party.
pub fn halves_apart(policy: Policy, choice: Option<GuidanceHalves>, guided: bool) -> bool {
    let halves = choice.unwrap_or(GuidanceHalves::default_for(policy));
    halves == GuidanceHalves::Apart
        && guided
        && policy.placement().offloads()
        && policy != Policy::Obfuscated
}

/// Fewest servers per half when the halves are apart: one server holding a whole half could
/// compute that half's self-attention itself.
pub const MIN_SERVERS_PER_HALF: usize = 2;

/// The servers of each half, out of `n`: the conditional half first (it gets the larger
/// group when `n` is odd); an empty unconditional range means the phone runs that half.
pub fn half_groups(n: usize) -> (Range<usize>, Range<usize>) {
    if n >= 2 * MIN_SERVERS_PER_HALF {
        let c = n.div_ceil(2);
        (0..c, c..n)
    } else {
        (0..n, n..n)
    }
}

/// Where a step's U-Net calls run.
pub enum Runners<'r, 'a, E: Engine> {
    /// The whole batch on one runtime.
    One(&'r mut Runtime<'a, E>),
    /// Guided steps split: unconditional rows on `uncond` (whose servers are numbered from
    /// `uncond_offset` in the merged accounting and audit), conditional rows on `cond`.
    Apart {
        cond: &'r mut Runtime<'a, E>,
        uncond: &'r mut Runtime<'a, E>,
        uncond_offset: usize,
    },
}

impl<'a, E: Engine<T = Tensor>> Runners<'_, 'a, E> {
    /// The U-Net's output for a step batched as `rows` over `k` candidates: `x` and the
    /// conditioning (text states, and SDXL's added conditioning where the U-Net has it) hold
    /// the unconditional rows first, as `Conditioning::batch` lays them out.
    pub async fn forward(
        &mut self,
        unet: &UNet,
        x: &Tensor,
        t: f64,
        (context, added): (&Tensor, Option<&Tensor>),
        rows: StepRows,
        k: usize,
    ) -> Result<Tensor> {
        match (self, rows) {
            (Runners::One(rt), _) => unet.forward_added(&mut **rt, x, t, context, added).await,
            (Runners::Apart { cond, .. }, StepRows::Cond) => {
                unet.forward_added(&mut **cond, x, t, context, added).await
            }
            (
                Runners::Apart {
                    cond,
                    uncond,
                    uncond_offset,
                },
                StepRows::Full,
            ) => {
                let (xu, xc) = (x.narrow(0, 0, k)?, x.narrow(0, k, k)?);
                let (cu, cc) = (context.narrow(0, 0, k)?, context.narrow(0, k, k)?);
                let (au, ac) = match added {
                    Some(a) => (Some(a.narrow(0, 0, k)?), Some(a.narrow(0, k, k)?)),
                    None => (None, None),
                };
                let offset = *uncond_offset;
                // The unconditional runtime numbers its servers from 0: name them as the
                // caller does.
                let uncond = async move {
                    unet.forward_added(&mut **uncond, &xu, t, &cu, au.as_ref())
                        .await
                        .map_err(|e| match e {
                            Error::Backend { backend, message } => Error::Backend {
                                backend: backend + offset,
                                message,
                            },
                            other => other,
                        })
                };
                let cond = unet.forward_added(&mut **cond, &xc, t, &cc, ac.as_ref());
                let (eu, ec) = futures::future::try_join(uncond, cond).await?;
                Ok(Tensor::cat(&[&eu, &ec], 0)?)
            }
            (Runners::Apart { .. }, StepRows::SharedUncond) => Err(Error::InvalidArgument(
                "a shared unconditional row cannot run with the guidance halves apart".into(),
            )),
        }
    }

    /// What the runtimes accounted since the last call, merged.
    pub fn take_accounting(&mut self) -> Accounting {
        match self {
            Runners::One(rt) => rt.take_accounting(),
            Runners::Apart {
                cond,
                uncond,
                uncond_offset,
            } => merge_accounting(
                cond.take_accounting(),
                uncond.take_accounting(),
                *uncond_offset,
            ),
        }
    }
}

/// Widens per-backend vectors of `a` to `n` backends, placing its own at `offset`.
fn place_accounting(a: Accounting, offset: usize, n: usize) -> Accounting {
    let widen = |v: Vec<u64>| {
        let mut out = vec![0; n];
        for (i, x) in v.into_iter().enumerate() {
            if let Some(slot) = out.get_mut(offset + i) {
                *slot = x;
            }
        }
        out
    };
    Accounting {
        backends: n,
        transfers: a
            .transfers
            .into_iter()
            .map(|t| Transfer {
                kind: t.kind,
                layer: t.layer,
                up: widen(t.up),
                down: widen(t.down),
                sent_up: widen(t.sent_up),
                sent_down: widen(t.sent_down),
            })
            .collect(),
        round_trips: a.round_trips,
        device_flops: a.device_flops,
        server_flops: widen(a.server_flops),
        unet_calls: a.unet_calls,
    }
}

/// One step's accounting from the two halves' runtimes. The halves run concurrently, so the
/// step waits for the longer chain of round trips (not their sum), and it is one U-Net call.
pub fn merge_accounting(cond: Accounting, uncond: Accounting, uncond_offset: usize) -> Accounting {
    let n = uncond_offset + uncond.backends;
    let round_trips = cond.round_trips.max(uncond.round_trips);
    let unet_calls = cond.unet_calls.max(uncond.unet_calls);
    let mut m = place_accounting(cond, 0, n);
    let u = place_accounting(uncond, uncond_offset, n);
    m.transfers.extend(u.transfers);
    m.device_flops += u.device_flops;
    for (a, b) in m.server_flops.iter_mut().zip(u.server_flops) {
        *a += b;
    }
    m.round_trips = round_trips;
    m.unet_calls = unet_calls;
    m
}

/// One audit from the two halves' runtimes (the unconditional group's servers renumbered).
pub fn merge_audit(cond: Audit, uncond: Audit, uncond_offset: usize) -> Audit {
    let n = uncond_offset + uncond.strips.len();
    let mut m = Audit::new(n);
    for (i, s) in cond.strips.into_iter().enumerate() {
        m.strips[i] = s;
        m.halves[i] = "conditional";
    }
    for (j, s) in uncond.strips.into_iter().enumerate() {
        m.strips[uncond_offset + j] = s;
        m.halves[uncond_offset + j] = "unconditional";
    }
    m.views = cond.views;
    m.views.extend(uncond.views.into_iter().map(|mut v| {
        v.server += uncond_offset;
        v
    }));
    m.texts = cond.texts;
    m.texts.extend(uncond.texts.into_iter().map(|mut t| {
        t.server += uncond_offset;
        t
    }));
    m
}

/// The evaluation's captures of the two halves' runtimes, the unconditional group renumbered.
#[cfg(feature = "eval-capture")]
pub fn merge_captured<T>(
    cond: Vec<(crate::placement::audit::View, T)>,
    uncond: Vec<(crate::placement::audit::View, T)>,
    uncond_offset: usize,
) -> Vec<(crate::placement::audit::View, T)> {
    let mut m = cond;
    m.extend(uncond.into_iter().map(|(mut v, t)| {
        v.server += uncond_offset;
        (v, t)
    }));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_hold_two_strips_or_leave_the_half_to_the_phone() {
        assert_eq!(half_groups(1), (0..1, 1..1));
        assert_eq!(half_groups(2), (0..2, 2..2));
        assert_eq!(half_groups(3), (0..3, 3..3));
        assert_eq!(half_groups(4), (0..2, 2..4));
        assert_eq!(half_groups(5), (0..3, 3..5));
        assert_eq!(half_groups(8), (0..4, 4..8));
        for n in 4..=16 {
            let (c, u) = half_groups(n);
            assert!(c.len() >= MIN_SERVERS_PER_HALF && u.len() >= MIN_SERVERS_PER_HALF);
            assert_eq!(c.end, u.start);
            assert_eq!(u.end, n);
        }
    }

    #[test]
    fn merged_accounting_renumbers_the_unconditional_group() {
        let mut c = Accounting::new(2);
        c.server_flops = vec![1, 2];
        c.round_trips = 5;
        c.unet_calls = 1;
        c.transfers.push(Transfer::uncoded(
            crate::placement::accounting::OpKind::Gather,
            "a".into(),
            vec![10, 20],
            vec![1, 2],
        ));
        let mut u = Accounting::new(2);
        u.server_flops = vec![3, 4];
        u.round_trips = 4;
        u.unet_calls = 1;
        u.device_flops = 7;
        u.transfers.push(Transfer::uncoded(
            crate::placement::accounting::OpKind::Gather,
            "a".into(),
            vec![30, 40],
            vec![3, 4],
        ));
        let m = merge_accounting(c, u, 2);
        assert_eq!(m.backends, 4);
        assert_eq!(m.server_flops, vec![1, 2, 3, 4]);
        assert_eq!(m.round_trips, 5);
        assert_eq!(m.unet_calls, 1);
        assert_eq!(m.device_flops, 7);
        assert_eq!(
            (0..4).map(|i| m.bytes_up_of(i)).collect::<Vec<_>>(),
            vec![10, 20, 30, 40]
        );
        assert_eq!(m.bytes_down(), 10);
    }
}

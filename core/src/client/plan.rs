//! `veil plan`: the traffic, round trips and FLOPs of one denoising step, from a U-Net config
//! alone. It runs the real U-Net forward on the shape engine with shape-only shard backends,
//! so the numbers are the runtime's own accounting, not a separate model of it.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::client::guidance::{half_groups, merge_accounting, GuidanceHalves};
use crate::model::unet::UNet;
use crate::placement::accounting::{Accounting, OpKind};
use crate::placement::backend::{InProcessBackend, ShardBackend};
use crate::placement::engine::{ShapeEngine, WireDtype};
use crate::placement::policy::Policy;
use crate::placement::runtime::Runtime;
use crate::vocab::error::Result;

/// What one step looks like.
#[derive(Debug, Clone)]
pub struct PlanInput {
    /// Latent rows and columns (image size / 8 for SD's VAE).
    pub latent_height: usize,
    pub latent_width: usize,
    /// U-Net batch: 2 with classifier-free guidance.
    pub batch: usize,
    /// Text tokens (77 for CLIP).
    pub context_len: usize,
    pub servers: usize,
    pub policy: Policy,
    pub wire: WireDtype,
    /// Account a step that reuses every transformer block's attention output (the T-GATE
    /// reducer's late steps) instead of an ordinary step.
    pub reuse_attention: bool,
    /// Account a step under stale synchronisation (GroupNorm moments and halo rows one step
    /// old) instead of an exact one.
    pub stale_sync: bool,
    /// Which servers a guided step's halves go to (None: the policy's own choice).
    pub guidance_halves: Option<GuidanceHalves>,
}

impl PlanInput {
    /// Whether a guided step's halves run on disjoint server groups (as `GenerateOptions`).
    pub fn halves_apart(&self) -> bool {
        crate::client::guidance::halves_apart(self.policy, self.guidance_halves, self.batch == 2)
    }
}

/// Per-device min / max / total bytes over the layers of one kind, as PPIDM's Tables VIII–X.
#[derive(Debug, Clone, Serialize)]
pub struct KindRow {
    pub kind: OpKind,
    pub layers: usize,
    pub up_min: u64,
    pub up_max: u64,
    pub up_total: u64,
    pub down_min: u64,
    pub down_max: u64,
    pub down_total: u64,
}

/// The plan of one denoising step (one U-Net call over the whole batch).
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub policy: String,
    pub servers: usize,
    pub wire: String,
    pub batch: usize,
    pub latent_height: usize,
    pub latent_width: usize,
    pub bytes_up_per_step: u64,
    pub bytes_down_per_step: u64,
    pub round_trips_per_step: u64,
    pub phone_flops_per_step: u64,
    pub server_flops_per_step: u64,
    pub offloaded_flop_fraction: f64,
    /// The phone's share of the U-Net FLOPs.
    pub phone_flop_fraction: f64,
    pub reuse_attention: bool,
    /// The accounted step is a stale-synchronised one.
    pub stale_sync: bool,
    /// The guidance halves on disjoint server groups (`strict`'s default).
    pub guidance_halves: String,
    /// Servers running the conditional half (all of them when the halves are together).
    pub cond_servers: usize,
    /// Servers running the unconditional half apart (0: the phone runs it, or the halves are
    /// together).
    pub uncond_servers: usize,
    /// Rows for the busiest device (backend 0 holds the largest block when splits are uneven).
    pub per_kind_per_device: Vec<KindRow>,
    pub per_server_bytes_up: Vec<u64>,
    pub per_server_bytes_down: Vec<u64>,
}

/// Runs the shape-only forward and returns the accounting of one step: with the guidance
/// halves apart, one call per half on its own group (or the phone), merged as a real run
/// merges them.
pub fn account_step(unet: &UNet, input: &PlanInput) -> Result<Accounting> {
    let n = if input.policy.needs_backends() {
        input.servers
    } else {
        0
    };
    if !input.halves_apart() {
        return account_group(unet, input, input.policy, n, input.batch);
    }
    let (c, u) = half_groups(n);
    let cond = account_group(unet, input, input.policy, c.len(), 1)?;
    let uncond_policy = match u.is_empty() {
        true => Policy::Local,
        false => input.policy,
    };
    let uncond = account_group(unet, input, uncond_policy, u.len(), 1)?;
    Ok(merge_accounting(cond, uncond, u.start))
}

/// One U-Net call of `batch` rows under `policy` on `n` shape-only servers.
fn account_group(
    unet: &UNet,
    input: &PlanInput,
    policy: Policy,
    n: usize,
    batch: usize,
) -> Result<Accounting> {
    let engine = ShapeEngine;
    let backends: Vec<Arc<dyn ShardBackend<Vec<usize>>>> = (0..n)
        .map(|_| {
            Arc::new(InProcessBackend::new(ShapeEngine, unet.shard_layers()))
                as Arc<dyn ShardBackend<Vec<usize>>>
        })
        .collect();
    let mut rt = Runtime::new(&engine, policy.placement(), &backends, input.wire)?
        .with_attention_reuse(input.reuse_attention.then_some(1))
        .with_stale_sync(input.stale_sync.then_some(1));
    let sample = vec![
        batch,
        unet.config.in_channels,
        input.latent_height,
        input.latent_width,
    ];
    let n_blocks = unet.config.block_out_channels.len();
    let ctx_dim = unet
        .config
        .cross_attention_dim
        .get(0, n_blocks, "cross_attention_dim")?;
    let context = vec![batch, input.context_len, ctx_dim];
    // SDXL: the added conditioning's input (pooled text embeddings and size ids).
    let added = unet.text_time().map(|tt| vec![batch, tt.input_dim]);
    let added = added.as_ref();
    // Shape-only backends complete immediately, so a trivial executor suffices.
    let call = |rt: &mut Runtime<'_, ShapeEngine>, t: f64| {
        futures::executor::block_on(unet.forward_added(rt, &sample, t, &context, added))
    };
    call(&mut rt, 500.0)?;
    if input.reuse_attention {
        // Call 0 caches the attention outputs; call 1 reuses them and scatters them once; call 2
        // is a steady-state late step, the one accounted.
        for t in [480.0, 460.0] {
            rt.take_accounting();
            call(&mut rt, t)?;
        }
    } else if input.stale_sync {
        // Call 0 is exact and leaves the moments and halo rows; call 1 is stale, the one
        // accounted.
        rt.take_accounting();
        call(&mut rt, 480.0)?;
    }
    Ok(rt.take_accounting())
}

/// The plan of one step.
pub fn plan(unet: &UNet, input: &PlanInput) -> Result<Plan> {
    let a = account_step(unet, input)?;
    let mut rows: BTreeMap<OpKind, Vec<(u64, u64)>> = BTreeMap::new();
    // Backend 0 is in the conditional group; the other group's round trips are not its own.
    let cond = match input.halves_apart() {
        true => half_groups(a.backends).0.len(),
        false => a.backends,
    };
    let own = |t: &&crate::placement::accounting::Transfer| {
        t.up.iter()
            .take(cond)
            .chain(t.down.iter().take(cond))
            .any(|&b| b > 0)
    };
    for t in a.transfers.iter().filter(own) {
        rows.entry(t.kind).or_default().push((
            t.up.first().copied().unwrap_or(0),
            t.down.first().copied().unwrap_or(0),
        ));
    }
    let per_kind_per_device = OpKind::ALL
        .iter()
        .filter_map(|k| {
            let r = rows.get(k)?;
            Some(KindRow {
                kind: *k,
                layers: r.len(),
                up_min: r.iter().map(|x| x.0).min().unwrap_or(0),
                up_max: r.iter().map(|x| x.0).max().unwrap_or(0),
                up_total: r.iter().map(|x| x.0).sum(),
                down_min: r.iter().map(|x| x.1).min().unwrap_or(0),
                down_max: r.iter().map(|x| x.1).max().unwrap_or(0),
                down_total: r.iter().map(|x| x.1).sum(),
            })
        })
        .collect();
    let server = a.server_flops_total();
    let total = (server + a.device_flops).max(1);
    Ok(Plan {
        policy: input.policy.name().to_string(),
        servers: a.backends,
        wire: input.wire.to_string(),
        batch: input.batch,
        latent_height: input.latent_height,
        latent_width: input.latent_width,
        bytes_up_per_step: a.bytes_up(),
        bytes_down_per_step: a.bytes_down(),
        round_trips_per_step: a.round_trips,
        phone_flops_per_step: a.device_flops,
        server_flops_per_step: server,
        offloaded_flop_fraction: server as f64 / total as f64,
        phone_flop_fraction: a.device_flops as f64 / total as f64,
        reuse_attention: input.reuse_attention,
        stale_sync: input.stale_sync,
        guidance_halves: match input.halves_apart() {
            true => GuidanceHalves::Apart.name(),
            false => GuidanceHalves::Together.name(),
        }
        .to_string(),
        cond_servers: match input.halves_apart() {
            true => half_groups(a.backends).0.len(),
            false => a.backends,
        },
        uncond_servers: match input.halves_apart() {
            true => half_groups(a.backends).1.len(),
            false => 0,
        },
        per_kind_per_device,
        per_server_bytes_up: (0..a.backends).map(|i| a.bytes_up_of(i)).collect(),
        per_server_bytes_down: (0..a.backends).map(|i| a.bytes_down_of(i)).collect(),
    })
}

const MIB: f64 = 1024.0 * 1024.0;

impl Plan {
    /// PPIDM-style tables (MB = 2^20 bytes, the unit PPIDM's tables turn out to use).
    pub fn to_table(&self) -> String {
        let mut s = format!(
            "policy {} | servers {} | wire {} | batch {} | latent {}x{}{}\n\n",
            self.policy,
            self.servers,
            self.wire,
            self.batch,
            self.latent_height,
            self.latent_width,
            match (self.reuse_attention, self.stale_sync) {
                (true, _) => " | a step reusing attention outputs",
                (false, true) => " | a stale-synchronised step",
                (false, false) => "",
            }
        );
        s += "per device, one denoising step (MB = 2^20 bytes)\n";
        s += &format!(
            "{:<6}{:>7} | {:>9}{:>9}{:>10} | {:>9}{:>9}{:>10}\n",
            "kind", "layers", "up min", "up max", "up total", "dn min", "dn max", "dn total"
        );
        for r in &self.per_kind_per_device {
            s += &format!(
                "{:<6}{:>7} | {:>9.3}{:>9.3}{:>10.2} | {:>9.4}{:>9.3}{:>10.2}\n",
                r.kind.label(),
                r.layers,
                r.up_min as f64 / MIB,
                r.up_max as f64 / MIB,
                r.up_total as f64 / MIB,
                r.down_min as f64 / MIB,
                r.down_max as f64 / MIB,
                r.down_total as f64 / MIB
            );
        }
        s += &format!(
            "\nall devices per step: up {:.2} MB, down {:.2} MB, {} round trips\n",
            self.bytes_up_per_step as f64 / MIB,
            self.bytes_down_per_step as f64 / MIB,
            self.round_trips_per_step
        );
        s += &format!(
            "FLOPs per step: phone {:.1} G ({:.1}%), servers {:.1} G, offloaded {:.1}%\n",
            self.phone_flops_per_step as f64 / 1e9,
            100.0 * self.phone_flop_fraction,
            self.server_flops_per_step as f64 / 1e9,
            100.0 * self.offloaded_flop_fraction
        );
        s
    }
}

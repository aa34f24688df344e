//! The shard codec flags `veil generate`, `veil bench link` and `veil plan` share
//! (docs/PROTOCOL.md §8).

use clap::Args;
use veil_core::placement::WireDtype;
use veil_core::transport::{compression_for, ClientOptions};
use veil_core::vocab::precision::ShardCodec;

#[derive(Args, Debug, Clone)]
pub struct CodecArgs {
    /// Lossy coding of the activations on the wire: none, int8, int4, residual-int4,
    /// residual-int2, residual-sign or residual-entropy (the residual codecs send each step's
    /// change with error feedback; residual-entropy range-codes it at one step per tensor,
    /// coarse up and fine down). GroupNorm statistics and moments always travel exact. QUIC
    /// servers only.
    #[arg(long, default_value = "none")]
    pub compress: ShardCodec,
    /// Denoising steps, from the first, whose activations travel exact in the wire dtype (the
    /// residual codecs keep them as their first references). Later steps are coded.
    #[arg(long, default_value_t = 1)]
    pub exact_steps: u64,
    /// Stale synchronisation (DistriFusion) after the exact steps (at least one): GroupNorm
    /// moments and halo rows on the strips are the previous step's, so a step waits only for
    /// the attention gathers and the output. Strict only.
    #[arg(long)]
    pub stale_sync: bool,
}

impl CodecArgs {
    /// The first stale step, if stale synchronisation is on.
    pub fn stale_sync_from(&self) -> Option<usize> {
        self.stale_sync
            .then(|| usize::try_from(self.exact_steps.max(1)).unwrap_or(usize::MAX))
    }

    /// Client options carrying these codec flags, the wire dtype and zstd level.
    pub fn client_options(&self, wire: WireDtype, zstd: i32) -> ClientOptions {
        ClientOptions {
            wire,
            compression: compression_for(wire, zstd),
            codec: self.compress,
            exact_steps: self.exact_steps,
            ..ClientOptions::default()
        }
    }
}

/// `veil plan`'s projection of a codec: the plan counts raw bytes from shapes; a lossy codec's
/// bytes are not computable from shapes, so they are the raw bytes divided by a compression
/// ratio the user measured (`veil bench link`, docs/BENCHMARKS.md), and the report says so.
#[derive(Args, Debug, Clone)]
pub struct ProjectionArgs {
    /// Raw-to-sent ratio of the coded steps' bytes up (and down, unless --assume-ratio-down),
    /// from a measurement. Needed with a lossy --compress.
    #[arg(long)]
    pub assume_ratio: Option<f64>,
    /// The same ratio for the bytes down.
    #[arg(long)]
    pub assume_ratio_down: Option<f64>,
    /// Denoising steps of the image the projection covers.
    #[arg(long, default_value_t = 20)]
    pub steps: u64,
    /// Link the time is projected on: `5g` or `up=…,down=…,rtt=…`.
    #[arg(long, default_value = "5g")]
    pub profile: String,
}

/// The projection of a plan's step under `codec`: `raw_up`/`raw_down` are one step's raw bytes,
/// `round_trips` an exact step's, `stale_round_trips` a stale-synchronised step's (with
/// `--stale-sync`; the warm-up steps before it are exact).
pub fn projection(
    codec: &CodecArgs,
    p: &ProjectionArgs,
    (raw_up, raw_down): (u64, u64),
    round_trips: u64,
    stale_round_trips: Option<u64>,
) -> anyhow::Result<serde_json::Value> {
    use anyhow::bail;
    let lossy = codec.compress != veil_core::vocab::precision::ShardCodec::None;
    let up_ratio = match (lossy, p.assume_ratio) {
        (false, _) => 1.0,
        (true, Some(r)) if r.is_finite() && r >= 1.0 => r,
        (true, Some(r)) => bail!("--assume-ratio {r} must be a finite number ≥ 1"),
        (true, None) => bail!(
            "--compress {} is lossy: its bytes depend on the activations, so give the ratio you \
             measured with --assume-ratio (veil bench link reports it)",
            codec.compress
        ),
    };
    let down_ratio = match p.assume_ratio_down {
        Some(r) if lossy && r.is_finite() && r >= 1.0 => r,
        Some(r) if lossy => bail!("--assume-ratio-down {r} must be a finite number ≥ 1"),
        _ => up_ratio,
    };
    let link = veil_devtools::link::LinkProfile::parse(&p.profile)?;
    let rtt = link.rtt.as_secs_f64();
    let seconds = |up: f64, down: f64, trips: u64| {
        up * 8.0 / link.up_bps + down * 8.0 / link.down_bps + trips as f64 * rtt
    };
    let (coded_up, coded_down) = (raw_up as f64 / up_ratio, raw_down as f64 / down_ratio);
    // Steps travelling raw, and steps synchronising exactly (the stale warm-up).
    let raw_steps = if lossy { codec.exact_steps } else { 0 };
    let warm_up = match stale_round_trips {
        Some(_) => codec.exact_steps.max(1),
        None => p.steps,
    };
    let step_seconds = |t: u64| {
        let (up, down) = if t < raw_steps {
            (raw_up as f64, raw_down as f64)
        } else {
            (coded_up, coded_down)
        };
        let trips = match stale_round_trips {
            Some(stale) if t >= warm_up => stale,
            _ => round_trips,
        };
        seconds(up, down, trips)
    };
    let image: f64 = (0..p.steps).map(step_seconds).sum();
    let steady = step_seconds(p.steps.saturating_sub(1));
    Ok(serde_json::json!({
        "codec": codec.compress.name(),
        "exact_steps": raw_steps.min(p.steps),
        "stale_sync": stale_round_trips.is_some(),
        "stale_from_step": stale_round_trips.map(|_| warm_up),
        "steps": p.steps,
        "assumed_ratio_up": up_ratio,
        "assumed_ratio_down": down_ratio,
        "raw_bytes_up_per_step": raw_up,
        "raw_bytes_down_per_step": raw_down,
        "coded_bytes_up_per_step": coded_up.round() as u64,
        "coded_bytes_down_per_step": coded_down.round() as u64,
        "round_trips_per_exact_step": round_trips,
        "round_trips_per_stale_step": stale_round_trips,
        "profile": p.profile,
        "link_seconds_per_steady_step": steady,
        "link_seconds_per_image": image,
        "derivation": "per step: bytes up × 8 / up rate + bytes down × 8 / down rate + round trips \
                       × RTT (a lower bound: no compute, no QUIC overhead); coded bytes = raw bytes \
                       from the plan's shapes ÷ the assumed (measured) ratio; the exact steps \
                       travel raw; under stale sync the warm-up steps take the exact step's round \
                       trips",
    }))
}

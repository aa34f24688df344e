//! `strict` placement: every U-Net call equals `local` (per call, several U-Net shapes including
//! odd sizes and both projection kinds, N = 2, 3, 4, 8), and the view audit shows each server
//! confined to its strip plus one halo row, with nothing text-indexed; the same audit on
//! `ppidm` reports the full K/V and text exposure.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde_json::json;
use veil_core::model::config::UNetConfig;
use veil_core::model::unet::UNet;
use veil_core::placement::audit::{Audit, ViewKind};
use veil_core::placement::{
    CandleEngine, GnVariant, InProcessBackend, Policy, Runtime, ShardBackend, WireDtype,
};
use veil_tests::{randn, random_weights, rel_l2};

struct Case {
    name: &'static str,
    unet: UNet,
    engine: CandleEngine,
    x: Tensor,
    ctx: Tensor,
    servers: Vec<usize>,
}

fn case(name: &'static str, cfg: serde_json::Value, x: &[usize], servers: Vec<usize>) -> Case {
    let cfg: UNetConfig = serde_json::from_value(cfg).expect("config");
    let unet = UNet::new(&cfg).expect("unet");
    let engine = CandleEngine::new(random_weights(&unet.parameters(), 21), Device::Cpu);
    Case {
        name,
        unet,
        engine,
        x: randn(x, 22),
        ctx: randn(&[x[0], 7, 16], 23),
        servers,
    }
}

fn cases() -> Vec<Case> {
    vec![
        // Two levels, conv projections: the 8-row level splits over 8 servers.
        case(
            "2 levels, conv proj, 16x12",
            json!({
                "block_out_channels": [32, 64],
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "layers_per_block": 1, "attention_head_dim": 4, "norm_num_groups": 8,
                "cross_attention_dim": 16
            }),
            &[2, 4, 16, 12],
            vec![2, 3, 4, 8],
        ),
        // Three levels, odd sizes (19 -> 10 -> 5: the way back up is not an exact 2x),
        // linear projections, two transformer layers per block, attention in the middle.
        case(
            "3 levels, linear proj, odd 19x10",
            json!({
                "block_out_channels": [16, 32, 32],
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "layers_per_block": 2, "attention_head_dim": 4, "norm_num_groups": 8,
                "cross_attention_dim": 16, "use_linear_projection": true,
                "transformer_layers_per_block": 2
            }),
            &[2, 4, 19, 10],
            vec![2, 3, 4],
        ),
    ]
}

fn backends(c: &Case, n: usize) -> Vec<Arc<dyn ShardBackend<Tensor>>> {
    (0..n)
        .map(|_| {
            Arc::new(InProcessBackend::new(
                c.engine
                    .subset(&c.unet.shard_layers().into_keys().collect::<Vec<_>>()),
                c.unet.shard_layers(),
            )) as Arc<dyn ShardBackend<Tensor>>
        })
        .collect()
}

async fn run(c: &Case, policy: Policy, n: usize) -> (Tensor, Audit, u64) {
    let b = backends(c, n);
    let mut rt = Runtime::new(&c.engine, policy.placement(), &b, WireDtype::F32).expect("runtime");
    let out = c
        .unet
        .forward(&mut rt, &c.x, 421.0, &c.ctx)
        .await
        .expect("forward");
    let rts = rt.accounting().round_trips;
    (out, rt.take_audit(), rts)
}

#[tokio::test]
async fn strict_equals_local_per_unet_call() {
    for c in cases() {
        let (local, _, _) = run(&c, Policy::Local, 0).await;
        for &n in &c.servers {
            let (got, _, rts) = run(&c, Policy::Strict, n).await;
            let err = rel_l2(&got, &local);
            println!(
                "{}: strict N = {n}: rel L2 vs local = {err:.3e}, {rts} round trips",
                c.name
            );
            assert!(err <= 1e-5, "{} N = {n}: rel L2 {err}", c.name);
        }
    }
}

/// Checks the confinement claim on an audit and returns a description of any violation.
fn violations(audit: &Audit, halo: usize) -> Vec<String> {
    let mut bad = Vec::new();
    for (i, strips) in audit.strips.iter().enumerate() {
        for (res, rows) in audit.received_rows(i) {
            let Some(own) = strips.get(&res) else {
                bad.push(format!(
                    "server {i} got rows at {res:?}, which has no strip"
                ));
                continue;
            };
            let lo = own.start.saturating_sub(halo);
            let hi = (own.end + halo).min(res.0);
            for r in &rows {
                if r.start < lo || r.end > hi {
                    bad.push(format!(
                        "server {i} at {}x{}: rows {r:?} outside strip {own:?} ± {halo}",
                        res.0, res.1
                    ));
                }
                // No tensor covers another strip's interior.
                for (j, other) in audit.strips.iter().enumerate() {
                    if j == i {
                        continue;
                    }
                    if let Some(o) = other.get(&res) {
                        let interior = (o.start + 1)..o.end.saturating_sub(1);
                        if !interior.is_empty() && r.start < interior.end && interior.start < r.end
                        {
                            bad.push(format!(
                                "server {i} at {}x{}: rows {r:?} cover server {j}'s interior {interior:?}",
                                res.0, res.1
                            ));
                        }
                    }
                }
            }
        }
        let text = audit.text_indexed_bytes(i);
        if text > 0 {
            bad.push(format!("server {i} received {text} text-indexed bytes"));
        }
    }
    bad
}

#[tokio::test]
async fn strict_audit_confines_every_server_and_ppidm_fails_it() {
    for c in cases() {
        for &n in &c.servers {
            let (_, audit, _) = run(&c, Policy::Strict, n).await;
            assert!(!audit.views.is_empty());
            let v = violations(&audit, 1);
            assert!(v.is_empty(), "{} strict N = {n}: {v:#?}", c.name);
            // Every server got work at every level, and nothing text-indexed at all.
            for i in 0..n {
                assert!(audit.bytes(i) > 0);
                assert_eq!(
                    audit.strips[i].len(),
                    c.unet.pyramid(c.x.dims()[2], c.x.dims()[3]).len()
                );
            }
            assert!(audit.views.iter().all(|v| !matches!(
                v.kind,
                ViewKind::KeyValue | ViewKind::TextKeyValue | ViewKind::Query
            )));
        }
        let n = c.servers[0];
        let (_, audit, _) = run(
            &c,
            Policy::Ppidm {
                gn: GnVariant::Exact,
            },
            n,
        )
        .await;
        let v = violations(&audit, 1);
        assert!(
            v.iter().any(|s| s.contains("text-indexed")),
            "{}: ppidm must report text exposure: {v:#?}",
            c.name
        );
        assert!(
            v.iter().any(|s| s.contains("outside strip")),
            "{}: ppidm must report full-map K/V: {v:#?}",
            c.name
        );
        // Whole-map K/V: some server received every row of some map.
        let full = (0..n).any(|i| {
            audit
                .received_rows(i)
                .iter()
                .any(|(res, rows)| rows.len() == 1 && rows[0] == (0..res.0))
        });
        assert!(full, "{}: ppidm K/V cover whole maps", c.name);
    }
}

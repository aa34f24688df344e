//! The audit's dependency classes on a tiny random U-Net with a guided (CFG batch 2) call:
//! what each tensor a server receives depends on, under `strict`, `ppidm` and `local`. The
//! assertions name exact classes at exact layers, so a class that is lost (or raised where it
//! should not be) fails them.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::model::config::UNetConfig;
use crate::model::ops::UNetOps;
use crate::model::unet::UNet;
use crate::placement::audit::{Audit, DepClass, View, ViewKind};
use crate::placement::backend::{InProcessBackend, ShardBackend};
use crate::placement::engine::{CandleEngine, ShapeEngine, WireDtype};
use crate::placement::policy::{GnVariant, Policy};
use crate::placement::runtime::Runtime;
use crate::vocab::error::Result;
use crate::vocab::layers::{GroupNormSpec, Role};

/// The first GroupNorm of the U-Net (conv_in's output goes straight into it).
const FIRST_GN: &str = "down_blocks.0.resnets.0.norm1";
/// The first transformer block's self- and cross-attention.
const FIRST_ATTN1: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1";
const FIRST_ATTN2: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn2";
/// Where strict scatters the first transformer block's `h + SelfAttn + CrossAttn` back to the
/// strips (its feed-forward LayerNorm runs on them).
const FIRST_NORM3: &str = "down_blocks.0.attentions.0.transformer_blocks.0.norm3";

struct Tiny {
    unet: UNet,
    engine: CandleEngine,
    /// CFG batch 2: the same latent twice.
    x: Tensor,
    /// Unconditional then conditional text states.
    ctx: Tensor,
}

/// Seeded values of roughly unit variance, scaled by `scale`.
fn noise(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * 1.7 * scale)
        .collect()
}

fn tiny() -> candle_core::Result<Tiny> {
    let cfg: UNetConfig = serde_json::from_value(json!({
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1, "attention_head_dim": 4, "norm_num_groups": 8,
        "cross_attention_dim": 16
    }))
    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let unet = UNet::new(&cfg).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let mut rng = StdRng::seed_from_u64(31);
    let mut weights = HashMap::new();
    for (name, shape) in unet.parameters() {
        let n: usize = shape.iter().product();
        let data = if shape.len() >= 2 {
            let fan_in: usize = shape[1..].iter().product();
            noise(&mut rng, n, 1.0 / (fan_in as f32).sqrt())
        } else if name.ends_with(".weight") {
            noise(&mut rng, n, 0.1)
                .into_iter()
                .map(|v| 1.0 + v)
                .collect()
        } else {
            noise(&mut rng, n, 0.1)
        };
        weights.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    let latent = Tensor::from_vec(
        noise(&mut rng, 4 * 16 * 12, 1.0),
        (1, 4, 16, 12),
        &Device::Cpu,
    )?;
    let x = Tensor::cat(&[&latent, &latent], 0)?;
    let ctx = Tensor::from_vec(noise(&mut rng, 2 * 7 * 16, 1.0), (2, 7, 16), &Device::Cpu)?;
    Ok(Tiny {
        unet,
        engine: CandleEngine::new(weights, Device::Cpu),
        x,
        ctx,
    })
}

/// One guided U-Net call under `policy` on `n` in-process servers; its audit.
async fn audit_of(policy: Policy, n: usize) -> Audit {
    let t = tiny().unwrap_or_else(|e| panic!("tiny model: {e}"));
    let layers = t.unet.shard_layers();
    let names: Vec<String> = layers.keys().cloned().collect();
    let backends: Vec<Arc<dyn ShardBackend<Tensor>>> = (0..n)
        .map(|_| {
            Arc::new(InProcessBackend::new(
                t.engine.subset(&names),
                layers.clone(),
            )) as Arc<dyn ShardBackend<Tensor>>
        })
        .collect();
    let mut rt = Runtime::new(&t.engine, policy.placement(), &backends, WireDtype::F32)
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    t.unet
        .forward(&mut rt, &t.x, 421.0, &t.ctx)
        .await
        .unwrap_or_else(|e| panic!("forward: {e}"));
    rt.take_audit()
}

/// The classes of the views of `kind` at `layer` (every server), in send order.
fn classes(audit: &Audit, layer: &str, kind: ViewKind) -> Vec<DepClass> {
    audit
        .views
        .iter()
        .filter(|v| v.layer == layer && v.kind == kind)
        .map(|v| v.class)
        .collect()
}

fn first(audit: &Audit, kind: ViewKind) -> &View {
    audit
        .views
        .iter()
        .find(|v| v.kind == kind)
        .unwrap_or_else(|| panic!("no {kind:?} view"))
}

#[tokio::test]
async fn strict_classes_latent_raw_moments_whole_map_scattered_strips_text() {
    use DepClass::{Raw, Text, WholeMap};
    let n = 2;
    let audit = audit_of(Policy::Strict, n).await;
    // The latent rows (with their halo row) at conv_in: raw, one per server.
    assert_eq!(classes(&audit, "conv_in", ViewKind::Latent), vec![Raw; n]);
    // The first GroupNorm: the halo rows it prefetches are rows of conv_in's output (raw);
    // the moments it sends back are statistics of the whole map.
    assert_eq!(first(&audit, ViewKind::Moments).layer, FIRST_GN);
    assert_eq!(
        classes(&audit, FIRST_GN, ViewKind::Moments),
        vec![WholeMap; n]
    );
    assert_eq!(classes(&audit, FIRST_GN, ViewKind::Halo), vec![Raw; n]);
    // The first resnet's second GroupNorm prefetches halo rows of conv1's output, which was
    // computed from a map normalised with whole-map moments.
    assert_eq!(
        classes(&audit, "down_blocks.0.resnets.0.norm2", ViewKind::Halo),
        vec![WholeMap; n]
    );
    // After the first transformer block's attention sub-layers the phone scatters
    // h + SelfAttn + CrossAttn(text) back to the strips: text.
    assert_eq!(first(&audit, ViewKind::Strip).layer, FIRST_NORM3);
    assert_eq!(classes(&audit, FIRST_NORM3, ViewKind::Strip), vec![Text; n]);
    // Every scattered strip is downstream of a cross-attention; every moment is at least
    // whole-map; nothing a server receives is text-indexed, yet it receives text bytes.
    assert!(audit
        .views
        .iter()
        .filter(|v| v.kind == ViewKind::Strip)
        .all(|v| v.class == Text));
    assert!(audit
        .views
        .iter()
        .filter(|v| v.kind == ViewKind::Moments)
        .all(|v| v.class >= WholeMap));
    for i in 0..n {
        let b = audit.bytes_by_class(i);
        assert!(
            b.raw > 0 && b.whole_map > 0 && b.text > 0,
            "server {i}: {b:?}"
        );
        assert_eq!(b.raw + b.whole_map + b.text, audit.bytes(i));
        assert_eq!(audit.text_conditioned_bytes(i), b.text);
        assert_eq!(audit.text_indexed_bytes(i), 0);
    }
    let r = audit.report("strict", 1, Policy::Strict.halo_bound());
    assert_eq!(r.format, "veil-audit/2");
    assert!(r.servers.iter().all(|s| s.text_conditioned_bytes > 0));
}

#[tokio::test]
async fn ppidm_classes_self_attention_kv_whole_map_and_cross_attention_kv_text() {
    use DepClass::{Raw, Text, WholeMap};
    let n = 2;
    let audit = audit_of(
        Policy::Ppidm {
            gn: GnVariant::Exact,
        },
        n,
    )
    .await;
    // Row blocks of the latent and of conv_in's output (the first GroupNorm's input): raw.
    assert_eq!(classes(&audit, "conv_in", ViewKind::Block), vec![Raw; n]);
    assert_eq!(classes(&audit, FIRST_GN, ViewKind::Block), vec![Raw; n]);
    // The first self-attention comes after GroupNorms: its queries, keys and values depend
    // on the whole map, not on the text.
    assert_eq!(
        classes(&audit, FIRST_ATTN1, ViewKind::Query),
        vec![WholeMap; n]
    );
    assert_eq!(
        classes(&audit, FIRST_ATTN1, ViewKind::KeyValue),
        vec![WholeMap; 2 * n]
    );
    // Cross-attention keys and values are the text's; its queries follow a self-attention.
    assert_eq!(
        classes(&audit, FIRST_ATTN2, ViewKind::TextKeyValue),
        vec![Text; 2 * n]
    );
    assert_eq!(
        classes(&audit, FIRST_ATTN2, ViewKind::Query),
        vec![WholeMap; n]
    );
    // Every later self-attention is downstream of that cross-attention.
    let later: Vec<&View> = audit
        .views
        .iter()
        .filter(|v| v.kind == ViewKind::KeyValue && v.layer != FIRST_ATTN1)
        .collect();
    assert!(!later.is_empty() && later.iter().all(|v| v.class == Text));
    assert!(audit
        .views
        .iter()
        .filter(|v| v.kind == ViewKind::TextKeyValue)
        .all(|v| v.class == Text && v.text_indexed));
    for i in 0..n {
        assert!(audit.text_conditioned_bytes(i) > audit.text_indexed_bytes(i));
    }
}

#[tokio::test]
async fn local_records_nothing() {
    let audit = audit_of(Policy::Local, 0).await;
    assert!(audit.views.is_empty());
    assert!(audit.strips.is_empty());
}

/// Each op's own rule, on shapes: the sample and the timestep are raw, the text states are
/// text; GroupNorm and self-attention raise to whole-map; attention over keys that are not the
/// map's tokens (a cross-attention) is text; per-element ops take the maximum of their inputs.
#[tokio::test]
async fn ops_propagate_and_raise_classes() -> Result<()> {
    use DepClass::{Raw, Text, WholeMap};
    let engine = ShapeEngine;
    let mut rt = Runtime::new(&engine, Policy::Local.placement(), &[], WireDtype::F32)?;
    let x = rt.input(vec![2, 8, 4, 4]);
    let ctx = rt.input(vec![2, 7, 8]);
    let emb = rt.timestep_embedding(421.0, 2, 8, true, 0.0, Role::TimeEmbedding)?;
    assert_eq!((x.class(), ctx.class(), emb.class()), (Raw, Text, Raw));
    assert_eq!(rt.add_channel_bias(&x, &emb).await?.class(), Raw);
    assert_eq!(rt.silu(&x).await?.class(), Raw);
    let gn = GroupNormSpec::new("gn".into(), 2, 8, 1e-5);
    let n = rt.group_norm(&gn, &x).await?;
    assert_eq!(n.class(), WholeMap);
    assert_eq!(rt.add(&x, &n).await?.class(), WholeMap);
    assert_eq!(rt.cat(&[x.clone(), n.clone()], 1).await?.class(), WholeMap);
    let tokens = rt.to_tokens(&x).await?;
    assert_eq!(tokens.class(), Raw);
    let self_attn = rt.attention("attn1", &tokens, &tokens, &tokens, 2).await?;
    assert_eq!(self_attn.class(), WholeMap);
    let cross = rt.attention("attn2", &tokens, &ctx, &ctx, 2).await?;
    assert_eq!(cross.class(), Text);
    // Keys of another length are not the map's tokens: read as text even if unclassed.
    let coarse = rt.to_tokens(&rt.input(vec![2, 8, 2, 2])).await?;
    assert_eq!(coarse.class(), Raw);
    let other = rt.attention("attn2", &tokens, &coarse, &coarse, 2).await?;
    assert_eq!(other.class(), Text);
    let t = rt.add(&self_attn, &cross).await?;
    assert_eq!(rt.to_spatial(&t, 4, 4).await?.class(), Text);
    assert!(rt.audit().views.is_empty());
    Ok(())
}

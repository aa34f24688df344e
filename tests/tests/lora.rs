//! LoRA adapters merged at load against diffusers 0.42.1 + peft (`tools/make_lora_golden.py`:
//! one adapter on every linear and convolution of the tiny model's U-Net, per-module α, in
//! diffusers/peft naming with its header metadata and in kohya naming): the merged weights,
//! the U-Net output at scale 1 and 0.5, and a 3-step pipeline at 0.8. Then the adapter under
//! `strict`: the phone merges the attention layers it holds, real QUIC servers started with the
//! same adapter merge the rest, and the handshake refuses a server without it.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use veil_core::client::pipeline::{GenerateOptions, LoadRole, StableDiffusion};
use veil_core::model::lora::LoraAdapter;
use veil_core::model::scheduler::SchedulerKind;
use veil_core::placement::engine::WireDtype;
use veil_core::placement::runtime::Runtime;
use veil_core::placement::{Policy, ShardBackend};
use veil_core::transport::{connect_backends, ClientOptions};
use veil_core::wire::manifest::resolve_unet_identity;
use veil_server::{spawn_local, ServerLimits, ShardModel};
use veil_tests::{max_abs, psnr, rel_l2, repo_root, tiny_model};

fn fixture(name: &str) -> std::path::PathBuf {
    repo_root().join("tests/fixtures/lora").join(name)
}

fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("golden.safetensors"), &Device::Cpu).expect("golden")
}

fn adapted(file: &str, scale: f64) -> StableDiffusion {
    StableDiffusion::load(&tiny_model(), &Device::Cpu)
        .expect("tiny model")
        .with_lora(&fixture(file), scale)
        .expect("merge")
}

#[tokio::test]
async fn merged_unet_matches_diffusers_in_both_namings() {
    let g = golden();
    for scale in [1.0, 0.5] {
        let mut weights = Vec::new();
        for file in ["diffusers.safetensors", "kohya.safetensors"] {
            let sd = adapted(file, scale);
            let mut rt = Runtime::new(
                &sd.unet_engine,
                Policy::Local.placement(),
                &[],
                WireDtype::F32,
            )
            .expect("runtime");
            let out = sd
                .unet
                .forward(&mut rt, &g["unet_sample"], 501.0, &g["unet_context"])
                .await
                .expect("forward");
            let want = &g[&format!("unet_out_scale_{scale:.1}")];
            let (err, abs) = (rel_l2(&out, want), max_abs(&out, want));
            let change = rel_l2(want, &g["unet_out_base"]);
            println!(
                "{file} at scale {scale}: U-Net rel L2 {err:.2e} (max |Δ| {abs:.1e}) vs \
                 diffusers; the adapter changes the output by {change:.3}"
            );
            assert!(err <= 1e-5 && abs <= 1e-5, "{file} {scale}: {err} {abs}");
            weights.push(sd.unet_engine.weights().clone());
        }
        // The two namings merge to the same weights.
        for (k, v) in &weights[0] {
            assert!(max_abs(v, &weights[1][k]) <= 1e-6, "{k}");
        }
        if scale == 1.0 {
            for (k, want) in g.iter().filter(|(k, _)| k.starts_with("merged/")) {
                let name = k.trim_start_matches("merged/");
                let d = max_abs(&weights[0][name], want);
                assert!(d <= 1e-6, "{name}: {d}");
            }
        }
    }
}

#[tokio::test]
async fn adapted_pipeline_matches_diffusers() {
    let g = golden();
    let sd = adapted("diffusers.safetensors", 0.8);
    let o = GenerateOptions {
        prompt: "a small red circle at the top left on a white background".into(),
        steps: 3,
        guidance: 5.0,
        width: 64,
        height: 64,
        scheduler: SchedulerKind::Ddim,
        latents: Some(g["pipe/latents"].clone()),
        ..Default::default()
    };
    let mut seen = Vec::new();
    let out = sd
        .generate(&o, &[], &mut |p| seen.push(p.latents.clone()))
        .await
        .expect("generate");
    for (i, got) in seen.iter().enumerate() {
        let want = g["pipe/latents_steps"].narrow(0, i, 1).expect("step");
        let err = rel_l2(got, &want);
        assert!(err <= 1e-4, "step {}: {err}", i + 1);
    }
    let db = psnr(
        &out.image,
        &g["pipe/image"].permute((2, 0, 1)).expect("chw"),
    );
    println!("adapted pipeline, 3 DDIM steps at scale 0.8: image {db:.1} dB vs diffusers");
    assert!(db >= 40.0, "{db}");
}

#[test]
fn text_encoder_adapters_are_refused() {
    let sd = StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("tiny");
    let e = LoraAdapter::load(&fixture("text_encoder_only_key.safetensors"), &sd.unet)
        .expect_err("text encoder keys");
    assert!(matches!(e, veil_core::Error::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("text encoder"), "{e}");
}

/// Under `strict` the phone loads only its own layers and merges the adapter's part of them;
/// veil-server processes started with `--lora` merge the rest. The identity the phone derives
/// from the manifest and the adapter matches theirs; a server without the adapter is refused.
#[tokio::test]
async fn strict_with_an_adapter_over_quic() {
    let lora = fixture("diffusers.safetensors");
    let full = adapted("diffusers.safetensors", 0.8);
    // Four servers: both guided halves go to server pairs, so the phone keeps only its own
    // layers (no half of its own) and merges only the adapter's attention part.
    let role = LoadRole::Phone {
        policy: Policy::Strict,
        servers: 4,
    };
    let phone = StableDiffusion::load_for(&tiny_model(), &Device::Cpu, role)
        .expect("phone")
        .with_lora(&lora, 0.8)
        .expect("merge");
    // The attention sub-layers: the projections and the LayerNorms before them.
    let attention = |k: &&String| {
        k.contains(".attn1.")
            || k.contains(".attn2.")
            || (k.contains(".transformer_blocks.")
                && (k.contains(".norm1.") || k.contains(".norm2.")))
    };
    let other: Vec<_> = phone
        .unet_engine
        .weights()
        .keys()
        .filter(|k| !attention(k))
        .collect();
    assert!(
        other.is_empty(),
        "the phone holds attention sub-layers only: {other:?}"
    );
    let o = GenerateOptions {
        prompt: "a small red circle".into(),
        steps: 3,
        width: 64,
        height: 64,
        policy: Policy::Strict,
        ..Default::default()
    };
    let local = full
        .generate(
            &GenerateOptions {
                policy: Policy::Local,
                ..o.clone()
            },
            &[],
            &mut |_| {},
        )
        .await
        .expect("local");
    let base = resolve_unet_identity(&tiny_model()).expect("manifest").0;
    let id = phone.adapted_identity(&base);
    assert_ne!(id, base);
    let model = ShardModel::load_adapted(&tiny_model(), &Device::Cpu, false, &[(lora, 0.8)])
        .expect("server model");
    assert_eq!(
        model.id(),
        id,
        "server and phone agree on the adapted identity"
    );
    let cluster = spawn_local(4, Arc::new(model), ServerLimits::default()).expect("servers");
    let b = connect_backends(&cluster.specs, id, &ClientOptions::default())
        .await
        .expect("connect");
    let backends: Vec<Arc<dyn ShardBackend<Tensor>>> = b
        .iter()
        .map(|q| q.clone() as Arc<dyn ShardBackend<Tensor>>)
        .collect();
    let out = phone
        .generate(&o, &backends, &mut |_| {})
        .await
        .expect("strict");
    for q in &b {
        q.close().await;
    }
    cluster.shutdown().await;
    let db = psnr(&out.image, &local.image);
    println!("strict over QUIC with the adapter at 0.8: {db:.1} dB vs local");
    assert!(db >= 60.0, "{db}");
    // Servers without the adapter present the base identity: the handshake refuses them.
    let plain = ShardModel::load(&tiny_model(), &Device::Cpu).expect("plain");
    assert_eq!(plain.id(), base);
    let cluster = spawn_local(4, Arc::new(plain), ServerLimits::default()).expect("servers");
    assert!(
        connect_backends(&cluster.specs, id, &ClientOptions::default())
            .await
            .is_err()
    );
    cluster.shutdown().await;
}

/// `veil lora-split`'s parts: the servers' part digests as the whole adapter does over the
/// shard layers (so the phone with the whole file and a server with its part agree), and an
/// adapter of attention layers only leaves a shard server's identity as it is.
#[test]
fn split_parts_keep_the_identity() {
    let sd = StableDiffusion::load(&tiny_model(), &Device::Cpu).expect("tiny");
    let whole = LoraAdapter::load(&fixture("diffusers.safetensors"), &sd.unet).expect("load");
    let shard = sd.unet.shard_layers();
    let is_shard = |m: &str| shard.contains_key(m);
    let dir = std::env::temp_dir().join(format!("veil-lora-split-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (servers, phone) = (
        dir.join("servers.safetensors"),
        dir.join("phone.safetensors"),
    );
    whole
        .part(&is_shard)
        .expect("servers' part")
        .save(&servers)
        .expect("save");
    whole
        .part(&|m| !is_shard(m))
        .expect("phone's part")
        .save(&phone)
        .expect("save");
    let part = LoraAdapter::load(&servers, &sd.unet).expect("reload");
    for scale in [1.0, 0.8] {
        assert_eq!(
            part.digest(&is_shard, scale).expect("digest"),
            whole.digest(&is_shard, scale).expect("digest")
        );
    }
    // The phone's part adapts no shard layer: the base identity stands.
    let base = [9u8; 32];
    let attention_only = StableDiffusion::load(&tiny_model(), &Device::Cpu)
        .expect("tiny")
        .with_lora(&phone, 1.0)
        .expect("merge");
    assert!(attention_only.lora_digests.is_empty());
    assert_eq!(attention_only.adapted_identity(&base), base);
    // A full-model server's identity still covers it.
    assert_eq!(attention_only.lora_full_digests.len(), 1);
    assert_ne!(
        attention_only.full_identity(&base, &[]),
        sd.full_identity(&base, &[])
    );
    let _ = std::fs::remove_dir_all(&dir);
}

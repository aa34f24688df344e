//! The phone's side of a model folder: it reads only the U-Net layers its placement runs on the
//! device (under `strict`, no convolution, GroupNorm or other shard layer at all), keeps f16
//! weights in f16, and learns the model identity from the manifest. Each claim is checked by
//! what would fail if it were false: a phone folder whose U-Net file lacks every shard weight
//! must still start and generate the same image over real QUIC servers.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use veil_core::client::pipeline::{GenerateOptions, LoadRole, StableDiffusion};
use veil_core::model::scheduler::SchedulerKind;
use veil_core::model::unet::UNet;
use veil_core::placement::{GnVariant, Policy};
use veil_core::sdk::{CancelHandle, GenerationOptions, ServerConfig, Veil, VeilConfig, VeilError};
use veil_core::wire::identity::{model_id_hex, shard_parameters};
use veil_core::wire::manifest::{resolve_unet_identity, IdentitySource, Manifest, CACHE_FILE};
use veil_server::{spawn_local, LocalCluster, ServerLimits, ShardModel};
use veil_tests::{psnr, repo_root};

fn shapes() -> PathBuf {
    repo_root().join("models/tiny-shapes")
}

fn names(v: &[(String, Vec<usize>)]) -> BTreeSet<String> {
    v.iter().map(|(n, _)| n.clone()).collect()
}

fn opts(policy: Policy) -> GenerateOptions {
    GenerateOptions {
        prompt: "a big blue square at the bottom right".into(),
        steps: 3,
        guidance: 5.0,
        seed: 11,
        width: 64,
        height: 64,
        scheduler: SchedulerKind::Ddim,
        policy,
        ..Default::default()
    }
}

#[test]
fn strict_phone_reads_no_shard_layer() {
    let sd = StableDiffusion::load(&shapes(), &Device::Cpu).expect("load");
    let unet: &UNet = &sd.unet;
    let all = names(&unet.parameters());
    let shard = names(&shard_parameters(unet));
    let convs: BTreeSet<String> = unet
        .convolutions()
        .iter()
        .map(|c| format!("{}.weight", c.name))
        .collect();
    let phone = |policy, servers| names(&LoadRole::Phone { policy, servers }.unet_parameters(unet));

    let strict = phone(Policy::Strict, 4);
    assert!(!strict.is_empty());
    assert!(
        strict.is_disjoint(&shard),
        "strict phone reads a shard weight"
    );
    assert_eq!(
        strict.len() + shard.len(),
        all.len(),
        "phone ∪ servers = the U-Net"
    );
    let ppidm = phone(
        Policy::Ppidm {
            gn: GnVariant::Exact,
        },
        4,
    );
    assert!(
        ppidm.is_disjoint(&convs),
        "ppidm's convolutions are split over the servers"
    );
    assert!(
        ppidm.len() > strict.len(),
        "ppidm applies GroupNorm on the phone"
    );
    // The phone runs whole U-Net calls here, so it needs everything.
    assert_eq!(phone(Policy::Local, 0), all);
    assert_eq!(
        phone(Policy::Strict, 2),
        all,
        "too few servers: the phone keeps a half"
    );
    println!(
        "U-Net parameters read by the phone: strict {} of {}, ppidm {}",
        strict.len(),
        all.len(),
        ppidm.len()
    );
}

#[tokio::test]
async fn phone_role_gives_the_same_images() {
    let full = StableDiffusion::load(&shapes(), &Device::Cpu).expect("full");
    let cases = [
        (Policy::Strict, 4),
        (Policy::Strict, 2),
        (
            Policy::Ppidm {
                gn: GnVariant::Exact,
            },
            3,
        ),
        (Policy::Local, 0),
    ];
    for (policy, n) in cases {
        let role = LoadRole::Phone { policy, servers: n };
        let phone = StableDiffusion::load_for(&shapes(), &Device::Cpu, role).expect("phone");
        let backends = full.in_process_backends(n);
        let a = full.generate(&opts(policy), &backends, &mut |_| {}).await;
        let b = phone.generate(&opts(policy), &backends, &mut |_| {}).await;
        let (a, b) = (a.expect("full"), b.expect("phone"));
        let diff = (&a.image - &b.image)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        assert_eq!(diff, 0.0, "{} with {n} servers", policy.name());
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let p = e.expect("entry").path();
        let dst = to.join(p.file_name().expect("name"));
        if p.is_dir() {
            copy_dir(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).expect("copy");
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("veil-phone-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Rewrites every safetensors file under `dir` through `f`.
fn rewrite(dir: &Path, f: &dyn Fn(&str, Tensor) -> Option<Tensor>) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rewrite(&p, f);
        } else if p.extension().is_some_and(|x| x == "safetensors") {
            let ts = candle_core::safetensors::load(&p, &Device::Cpu).expect("load");
            let out: HashMap<String, Tensor> = ts
                .into_iter()
                .filter_map(|(n, t)| f(&n, t).map(|t| (n, t)))
                .collect();
            candle_core::safetensors::save(&out, &p).expect("save");
        }
    }
}

#[tokio::test]
async fn f16_checkpoints_stay_f16_and_give_the_images_of_their_values() {
    // One folder stored in f16, one in f32 holding the same (f16-rounded) values.
    let half = scratch("f16");
    let rounded = scratch("rounded");
    copy_dir(&shapes(), &half);
    copy_dir(&shapes(), &rounded);
    rewrite(&half, &|_, t| t.to_dtype(DType::F16).ok());
    rewrite(&rounded, &|_, t| {
        t.to_dtype(DType::F16)
            .and_then(|t| t.to_dtype(DType::F32))
            .ok()
    });
    let role = LoadRole::Phone {
        policy: Policy::Strict,
        servers: 4,
    };
    let phone16 = StableDiffusion::load_for(&half, &Device::Cpu, role).expect("f16 phone");
    let kept = phone16
        .unet_engine
        .weights()
        .values()
        .filter(|t| t.rank() >= 2)
        .all(|t| t.dtype() == DType::F16);
    assert!(kept, "matrices of an f16 checkpoint stay f16 on the phone");
    let reference = StableDiffusion::load(&rounded, &Device::Cpu).expect("rounded");
    let backends = reference.in_process_backends(4);
    let a = phone16
        .generate(&opts(Policy::Strict), &backends, &mut |_| {})
        .await;
    let b = reference
        .generate(&opts(Policy::Strict), &backends, &mut |_| {})
        .await;
    let (a, b) = (a.expect("f16"), b.expect("rounded"));
    // Widening f16 to f32 is exact, so per-use conversion is bit-identical to converting on load.
    assert_eq!(a.image.to_vec3::<f32>().ok(), b.image.to_vec3::<f32>().ok());
    let original = StableDiffusion::load(&shapes(), &Device::Cpu).expect("f32");
    let o = original
        .generate(
            &opts(Policy::Strict),
            &original.in_process_backends(4),
            &mut |_| {},
        )
        .await
        .expect("f32");
    let db = psnr(&a.image, &o.image);
    println!("f16 checkpoint vs the f32 one: {db:.1} dB");
    assert!(db >= 40.0, "rounding the weights to f16 costs {db:.1} dB");
    for d in [half, rounded] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn identity_comes_from_the_manifest_else_a_cache() {
    let m = Manifest::read(&shapes())
        .expect("read")
        .expect("committed manifest");
    let v = m.verify(&shapes(), &mut |_, _, _| {}).expect("verify");
    assert!(
        v.ok(),
        "the committed manifest is stale: {:?}",
        v.mismatches
    );
    let (id, src) = resolve_unet_identity(&shapes()).expect("resolve");
    assert_eq!(src, IdentitySource::Manifest);
    let full = StableDiffusion::load(&shapes(), &Device::Cpu).expect("load");
    let computed =
        veil_core::wire::identity::model_identity(&full.unet, full.unet_engine.weights());
    assert_eq!(id, computed, "the manifest holds the weights' identity");

    // Without a manifest: computed, then cached; a changed weight file invalidates the cache.
    let dir = scratch("nomanifest");
    copy_dir(&shapes(), &dir);
    std::fs::remove_file(dir.join("veil-manifest.json")).expect("rm");
    assert_eq!(
        resolve_unet_identity(&dir).expect("1st"),
        (id, IdentitySource::Computed)
    );
    assert!(dir.join(CACHE_FILE).is_file());
    assert_eq!(
        resolve_unet_identity(&dir).expect("2nd"),
        (id, IdentitySource::Cache)
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    rewrite(&dir.join("unet"), &|n, t| {
        if n == "conv_in.bias" {
            (t + 1.0).ok()
        } else {
            Some(t)
        }
    });
    let (changed, src) = resolve_unet_identity(&dir).expect("3rd");
    assert_eq!(
        src,
        IdentitySource::Computed,
        "a rewritten weight file is hashed again"
    );
    assert_ne!(model_id_hex(&changed), model_id_hex(&id));
    // And `verify` finds a changed file against a manifest.
    let m2 = Manifest::build(&dir, &mut |_, _, _| {}).expect("build");
    m2.write(&dir).expect("write");
    rewrite(&dir.join("vae"), &|_, t| (t * 1.5).ok());
    let v = m2.verify(&dir, &mut |_, _, _| {}).expect("verify");
    assert!(
        !v.ok() && v.mismatches.iter().all(|l| l.starts_with("vae/")),
        "{:?}",
        v.mismatches
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn servers(c: &LocalCluster) -> Vec<ServerConfig> {
    c.specs
        .iter()
        .map(|s| ServerConfig {
            address: s.address.clone(),
            fingerprint: s.fingerprint.to_string(),
            token: s.token.clone(),
            tenant: None,
        })
        .collect()
}

async fn png(dir: &Path, servers: Vec<ServerConfig>) -> Result<Vec<u8>, VeilError> {
    let mut cfg = VeilConfig::new(dir, servers);
    cfg.defaults.steps = 3;
    cfg.defaults.scheduler = veil_core::sdk::Scheduler::Ddim;
    let veil = Veil::new(cfg)?;
    let o = GenerationOptions {
        seed: Some(5),
        ..Default::default()
    };
    let img = veil
        .generate("a small red circle", &o, None, &CancelHandle::new())
        .await?;
    Ok(img.png)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_phone_starts_and_generates_without_any_server_weight() {
    let model = ShardModel::load(&shapes(), &Device::Cpu).expect("shard model");
    let cluster = spawn_local(4, Arc::new(model), ServerLimits::default()).expect("servers");
    // The phone's folder: the manifest, and a U-Net file without a single shard weight.
    let dir = scratch("stripped");
    copy_dir(&shapes(), &dir);
    let shard = names(&shard_parameters(
        &StableDiffusion::load(&shapes(), &Device::Cpu)
            .expect("load")
            .unet,
    ));
    rewrite(&dir.join("unet"), &|n, t| (!shard.contains(n)).then_some(t));
    let stripped = png(&dir, servers(&cluster)).await.expect("stripped phone");
    let whole = png(&shapes(), servers(&cluster))
        .await
        .expect("whole folder");
    assert_eq!(stripped, whole, "the same image from the stripped folder");
    // Without the manifest the identity must be hashed from the shard weights, which this
    // folder lacks: the start fails, naming a missing tensor (so the start above read none).
    std::fs::remove_file(dir.join("veil-manifest.json")).expect("rm");
    let e = png(&dir, servers(&cluster)).await.expect_err("no manifest");
    assert!(
        matches!(&e, VeilError::ModelLoad { detail } if detail.contains("no tensor") || detail.contains("missing")),
        "{e:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

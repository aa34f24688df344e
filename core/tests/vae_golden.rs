//! Checks the VAE against outputs recorded from diffusers by `tools/make_golden.py` on the tiny
//! random model `models/tiny-random/vae` (fixture: tests/fixtures/golden/golden.{safetensors,json}),
//! its typed load errors, and that it asks for exactly the parameters of the real SD1.5, SD2.1
//! and SDXL base 1.0 VAE checkpoints (`models/configs/*/vae.params.json`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use veil_core::model::config::{read_json, VaeConfig};
use veil_core::model::vae::Vae;
use veil_core::model::weights::RecordingBackend;
use veil_core::Error;

const TOL: f64 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tiny_vae_dir() -> PathBuf {
    root().join("models/tiny-random/vae")
}

fn golden() -> Result<HashMap<String, Tensor>> {
    let path = root().join("tests/fixtures/golden/golden.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("load {}", path.display()))
}

fn golden_tensor(g: &HashMap<String, Tensor>, key: &str) -> Result<Tensor> {
    g.get(key)
        .cloned()
        .ok_or_else(|| anyhow!("fixture lacks tensor {key}"))
}

fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        bail!("shape {:?} vs golden {:?}", a.dims(), b.dims());
    }
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(diff / norm.max(1e-30))
}

fn check_decode(vae: &Vae, g: &HashMap<String, Tensor>, label: &str) -> Result<()> {
    let out = vae.decode(&golden_tensor(g, "vae_latents")?)?;
    let err = rel_l2(&out, &golden_tensor(g, "vae_decoded")?)?;
    println!("{label}: decode rel L2 = {err:.3e}");
    if err > TOL {
        bail!("{label}: decode differs from diffusers by {err:.3e} relative L2 (> {TOL})");
    }
    Ok(())
}

/// A scratch folder removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(format!("veil-vae-test-{}-{tag}", std::process::id()));
        if p.exists() {
            std::fs::remove_dir_all(&p)?;
        }
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tiny_weights() -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        tiny_vae_dir().join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )?)
}

/// A copy of the tiny VAE folder with its weights replaced by `weights`.
fn vae_dir_with(tag: &str, weights: &HashMap<String, Tensor>) -> Result<TempDir> {
    let dir = TempDir::new(tag)?;
    std::fs::copy(
        tiny_vae_dir().join("config.json"),
        dir.0.join("config.json"),
    )?;
    candle_core::safetensors::save(weights, dir.0.join("diffusion_pytorch_model.safetensors"))?;
    Ok(dir)
}

#[test]
fn vae_decoded() -> Result<()> {
    let g = golden()?;
    let vae = Vae::load(&tiny_vae_dir(), &Device::Cpu)?;
    check_decode(&vae, &g, "tiny-random")
}

#[test]
fn vae_posterior_mean() -> Result<()> {
    let g = golden()?;
    let vae = Vae::load(&tiny_vae_dir(), &Device::Cpu)?;
    let mean = vae.encode_mean(&golden_tensor(&g, "vae_image")?)?;
    let err = rel_l2(&mean, &golden_tensor(&g, "vae_posterior_mean")?)?;
    println!("encode_mean rel L2 = {err:.3e}");
    if err > TOL {
        bail!("posterior mean differs from diffusers by {err:.3e} relative L2 (> {TOL})");
    }
    Ok(())
}

/// Older checkpoints (runwayml SD1.5) name the mid-block attention `query/key/value/proj_attn`,
/// and some store its projections as 1x1 convs: both must load to the same network.
#[test]
fn legacy_attention_names_and_conv_shaped_weights() -> Result<()> {
    let g = golden()?;
    let renames = [
        ("to_q", "query"),
        ("to_k", "key"),
        ("to_v", "value"),
        ("to_out.0", "proj_attn"),
    ];
    for conv_shaped in [false, true] {
        let mut w = HashMap::new();
        for (name, mut t) in tiny_weights()? {
            let mut new_name = name.clone();
            if name.contains(".attentions.0.") {
                for (new, old) in renames {
                    let from = format!(".attentions.0.{new}.");
                    if name.contains(&from) {
                        new_name = name.replace(&from, &format!(".attentions.0.{old}."));
                        if conv_shaped && t.rank() == 2 {
                            let (o, i) = t.dims2()?;
                            t = t.reshape((o, i, 1, 1))?;
                        }
                    }
                }
            }
            w.insert(new_name, t);
        }
        if w.keys().any(|k| k.contains(".to_q.")) || !w.keys().any(|k| k.contains(".proj_attn.")) {
            bail!("rename did not produce a legacy-named checkpoint");
        }
        let dir = vae_dir_with(&format!("legacy-{conv_shaped}"), &w)?;
        let vae = Vae::load(&dir.0, &Device::Cpu)?;
        check_decode(
            &vae,
            &g,
            &format!("legacy names, conv-shaped={conv_shaped}"),
        )?;
    }
    Ok(())
}

#[test]
fn missing_weight_file_is_missing_file() -> Result<()> {
    let dir = TempDir::new("missing")?;
    std::fs::copy(
        tiny_vae_dir().join("config.json"),
        dir.0.join("config.json"),
    )?;
    match Vae::load(&dir.0, &Device::Cpu) {
        Err(Error::MissingFile { path, .. }) => {
            if path.file_name().and_then(|n| n.to_str())
                != Some("diffusion_pytorch_model.safetensors")
            {
                bail!("MissingFile names {}", path.display());
            }
            Ok(())
        }
        Err(e) => bail!("expected MissingFile, got {e}"),
        Ok(_) => bail!("loaded a VAE without weights"),
    }
}

#[test]
fn missing_config_is_missing_file() -> Result<()> {
    let dir = TempDir::new("noconfig")?;
    match Vae::load(&dir.0, &Device::Cpu) {
        Err(Error::MissingFile { path, .. }) if path.ends_with("config.json") => Ok(()),
        Err(e) => bail!("expected MissingFile for config.json, got {e}"),
        Ok(_) => bail!("loaded a VAE without config"),
    }
}

#[test]
fn wrong_shape_is_named() -> Result<()> {
    // A conv weight, and an attention weight (which goes through the 1x1-conv detection first).
    for name in [
        "decoder.up_blocks.1.resnets.0.conv1.weight",
        "encoder.mid_block.attentions.0.to_k.weight",
    ] {
        let mut w = tiny_weights()?;
        let t = w
            .get(name)
            .ok_or_else(|| anyhow!("tiny VAE lacks {name}"))?;
        let expected = t.dims().to_vec();
        let mut bad_shape = expected.clone();
        bad_shape[0] += 1;
        w.insert(
            name.to_string(),
            Tensor::zeros(bad_shape.clone(), DType::F32, &Device::Cpu)?,
        );
        let dir = vae_dir_with("shape", &w)?;
        match Vae::load(&dir.0, &Device::Cpu) {
            Err(Error::TensorShape {
                name: n,
                expected: e,
                actual: a,
            }) => {
                if n != name || e != expected || a != bad_shape {
                    bail!("TensorShape names {n} {e:?} {a:?}, expected {name} {expected:?} {bad_shape:?}");
                }
            }
            Err(e) => bail!("{name}: expected TensorShape, got {e}"),
            Ok(_) => bail!("{name}: loaded a VAE with a wrong-shaped tensor"),
        }
    }
    Ok(())
}

#[test]
fn missing_tensor_is_named() -> Result<()> {
    let name = "decoder.conv_norm_out.bias";
    let mut w = tiny_weights()?;
    w.remove(name);
    let dir = vae_dir_with("tensor", &w)?;
    match Vae::load(&dir.0, &Device::Cpu) {
        Err(Error::MissingTensor { name: n, .. }) if n == name => Ok(()),
        Err(e) => bail!("expected MissingTensor {name}, got {e}"),
        Ok(_) => bail!("loaded a VAE without {name}"),
    }
}

type NameSet = BTreeSet<(String, Vec<usize>)>;

fn reference_params(path: &Path) -> Result<NameSet> {
    let list: Vec<(String, Vec<usize>)> = serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?,
    )?;
    Ok(list.into_iter().collect())
}

fn check_names(model: &str) -> Result<()> {
    let dir = root().join("models/configs").join(model);
    let reference = reference_params(&dir.join("vae.params.json"))?;
    let config: VaeConfig = read_json(&dir.join("vae/config.json"))?;
    let rec = RecordingBackend::new(Some(reference.iter().cloned().collect()));
    Vae::new(rec.var_builder(), &config).with_context(|| format!("{model}: build VAE"))?;
    let requested: NameSet = rec.requested().into_iter().collect();
    let extra: Vec<_> = requested.difference(&reference).collect();
    let missing: Vec<_> = reference.difference(&requested).collect();
    if !extra.is_empty() || !missing.is_empty() {
        bail!("{model}: asked for {extra:?} not in the checkpoint; never asked for {missing:?}");
    }
    println!("{model}: {} parameters, all matched", requested.len());
    Ok(())
}

#[test]
fn sd15_names_match_checkpoint() -> Result<()> {
    check_names("sd15")
}

#[test]
fn sd21_names_match_checkpoint() -> Result<()> {
    check_names("sd21")
}

/// SDXL base 1.0's VAE (the SD layout with its own scaling factor and `force_upcast`: we
/// decode in f32 whatever the stored precision).
#[test]
fn sdxl_names_match_checkpoint() -> Result<()> {
    check_names("sdxl")
}

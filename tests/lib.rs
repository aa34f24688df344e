//! Shared helpers for Veil's end-to-end tests (`tests/tests/*.rs`): the repository root,
//! relative-L2 and PSNR metrics, seeded random weights, fixture loading.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The committed tiny random diffusers model.
pub fn tiny_model() -> PathBuf {
    repo_root().join("models/tiny-random")
}

/// The diffusers/PyTorch golden tensors.
pub fn golden() -> HashMap<String, Tensor> {
    let p = repo_root().join("tests/fixtures/golden/golden.safetensors");
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// ‖a − b‖ / ‖b‖ over all elements.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a: Vec<f32> = a.flatten_all().and_then(|t| t.to_vec1()).expect("a");
    let b: Vec<f32> = b.flatten_all().and_then(|t| t.to_vec1()).expect("b");
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        num += ((*x as f64) - (*y as f64)).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// The largest |a − b| over all elements.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("max |a - b|")
}

/// PSNR in dB of `a` against `b` for values in [0, 1].
pub fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().and_then(|t| t.to_vec1()).expect("a");
    let b: Vec<f32> = b.flatten_all().and_then(|t| t.to_vec1()).expect("b");
    let mse = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (1.0 / mse).log10()
    }
}

/// Seeded random weights for a parameter list: fan-in scaled matrices, norm scales near 1,
/// small biases, so activations stay O(1) through a deep random network.
pub fn random_weights(params: &[(String, Vec<usize>)], seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut normal = move || -> f32 {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    };
    params
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if shape.len() >= 2 {
                let fan_in: usize = shape[1..].iter().product();
                let s = 1.0 / (fan_in as f32).sqrt();
                (0..n).map(|_| normal() * s).collect()
            } else if name.ends_with(".weight") {
                (0..n).map(|_| 1.0 + 0.1 * normal()).collect()
            } else {
                (0..n).map(|_| 0.1 * normal()).collect()
            };
            let t = Tensor::from_vec(data, shape.as_slice(), &Device::Cpu).expect("tensor");
            (name.clone(), t)
        })
        .collect()
}

/// A seeded standard-normal tensor.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    veil_core::client::pipeline::seeded_normal(seed, shape, &Device::Cpu).expect("randn")
}

/// Reads a committed `*.params.json` list of [name, shape].
pub fn reference_params(rel: &str) -> Vec<(String, Vec<usize>)> {
    let p = repo_root().join(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut v: Vec<(String, Vec<usize>)> = serde_json::from_str(&text).expect("params json");
    v.sort();
    v
}

/// Runs a generation, keeping the latents after every step (as the progress callback sees them).
pub async fn generate_seen(
    sd: &veil_core::client::pipeline::StableDiffusion,
    o: &veil_core::client::pipeline::GenerateOptions,
    backends: &[std::sync::Arc<dyn veil_core::placement::ShardBackend<Tensor>>],
) -> (veil_core::client::pipeline::Generation, Vec<Tensor>) {
    let mut seen = Vec::new();
    let out = sd
        .generate(o, backends, &mut |p| seen.push(p.latents.clone()))
        .await
        .expect("generate");
    (out, seen)
}

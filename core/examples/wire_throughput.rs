//! Wire codec measurements (no criterion): compression ratios of activations in each wire
//! format, and encode/decode throughput for a [2, 320, 64, 64] activation-like tensor.
//!
//! ```sh
//! cargo run --release -p veil-core --example wire_throughput
//! ```
//!
//! Activations: a seeded smooth field (per-channel sums of low-frequency sinusoids with a little
//! noise, the texture of mid-U-Net feature maps), and real convolution outputs of
//! `models/tiny-random` (conv_in, then down_blocks.0.resnets.0.conv1 after SiLU) on a Gaussian
//! latent (an early, noisy step) and on a smooth latent (a late step). MB are 10^6 bytes of the
//! f32 activation, so every format is measured against the same work.

use std::time::Instant;

use candle_core::{Device, Tensor};
use veil_core::placement::engine::WireDtype;
use veil_core::wire::codec::{decode, encode};
use veil_core::wire::{Compression, Limits, Message, WireTensor};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

/// [b, c, h, w]: per channel a sum of three random low-frequency plane waves, a channel scale,
/// and 5 % noise.
fn smooth_field(b: usize, c: usize, h: usize, w: usize, seed: u64) -> Res<Tensor> {
    let mut rng = Rng(seed);
    let mut v = Vec::with_capacity(b * c * h * w);
    for _ in 0..b {
        for _ in 0..c {
            let scale = (rng.normal() * 0.7).exp();
            let waves: Vec<(f32, f32, f32)> = (0..3)
                .map(|_| {
                    (
                        (rng.uniform() - 0.5) * 0.4,
                        (rng.uniform() - 0.5) * 0.4,
                        rng.uniform() * std::f32::consts::TAU,
                    )
                })
                .collect();
            for y in 0..h {
                for x in 0..w {
                    let s: f32 = waves
                        .iter()
                        .map(|(fy, fx, p)| (fy * y as f32 + fx * x as f32 + p).sin())
                        .sum();
                    v.push(scale * (s + 0.05 * rng.normal()));
                }
            }
        }
    }
    Ok(Tensor::from_vec(v, (b, c, h, w), &Device::Cpu)?)
}

fn gaussian(shape: (usize, usize, usize, usize), seed: u64) -> Res<Tensor> {
    let mut rng = Rng(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// conv1(silu(conv_in(latent))) of models/tiny-random, or None when the model is absent.
fn tiny_unet_activation(latent: &Tensor) -> Res<Option<(Tensor, Tensor)>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/tiny-random/unet/diffusion_pytorch_model.safetensors"
    );
    if !std::path::Path::new(path).exists() {
        return Ok(None);
    }
    let w = candle_core::safetensors::load(path, &Device::Cpu)?;
    let get = |k: &str| w.get(k).cloned().ok_or(format!("missing {k}"));
    let conv = |x: &Tensor, name: &str| -> Res<Tensor> {
        let wt = get(&format!("{name}.weight"))?;
        let b = get(&format!("{name}.bias"))?;
        let c = b.dims1()?;
        Ok(x.conv2d(&wt, 1, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, c, 1, 1))?)?)
    };
    let a = conv(latent, "conv_in")?;
    let b = conv(&candle_nn::ops::silu(&a)?, "down_blocks.0.resnets.0.conv1")?;
    Ok(Some((a, b)))
}

fn formats() -> Vec<(&'static str, WireDtype, Compression)> {
    vec![
        ("f32", WireDtype::F32, Compression::None),
        ("f32 + zstd(3)", WireDtype::F32, Compression::Zstd(3)),
        (
            "f32 + zstd(3) byte-split",
            WireDtype::F32,
            Compression::ZstdByteSplit(3),
        ),
        ("f16", WireDtype::F16, Compression::None),
        ("f16 + zstd(3)", WireDtype::F16, Compression::Zstd(3)),
        (
            "f16 + zstd(3) byte-split",
            WireDtype::F16,
            Compression::ZstdByteSplit(3),
        ),
        ("bf16", WireDtype::Bf16, Compression::None),
        ("bf16 + zstd(3)", WireDtype::Bf16, Compression::Zstd(3)),
        (
            "bf16 + zstd(3) byte-split",
            WireDtype::Bf16,
            Compression::ZstdByteSplit(3),
        ),
    ]
}

fn ratios(name: &str, t: &Tensor) -> Res<()> {
    let f32_bytes = t.elem_count() * 4;
    println!("\n{name} {:?} ({} f32 bytes)", t.dims(), f32_bytes);
    println!(
        "  {:<26} {:>12} {:>10} {:>12}",
        "format", "bytes", "vs f32", "vs raw dtype"
    );
    for (label, dtype, c) in formats() {
        let wt = WireTensor::from_tensor(t, dtype)?;
        let raw = wt.data.len();
        let bytes = encode(&Message::Reply { outputs: vec![wt] }, c)?.len();
        println!(
            "  {:<26} {:>12} {:>9.3}x {:>11.3}x",
            label,
            bytes,
            f32_bytes as f64 / bytes as f64,
            raw as f64 / bytes as f64
        );
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn throughput(t: &Tensor, runs: usize) -> Res<()> {
    let mb = (t.elem_count() * 4) as f64 / 1e6;
    let limits = Limits::default();
    println!(
        "\nthroughput, {:?} smooth field ({mb:.1} MB as f32), median of {runs} runs, MB/s of f32 activation",
        t.dims()
    );
    println!(
        "  {:<26} {:>10} {:>10} {:>12} {:>16} {:>12}",
        "format", "encode", "decode", "enc+dec", "tensor→bytes→f32", "wire bytes"
    );
    for (label, dtype, c) in formats() {
        let wt = WireTensor::from_tensor(t, dtype)?;
        let msg = Message::Reply {
            outputs: vec![wt.clone()],
        };
        let (mut enc, mut dec, mut full) = (Vec::new(), Vec::new(), Vec::new());
        let mut size = 0;
        for _ in 0..runs {
            let t0 = Instant::now();
            let bytes = encode(&msg, c)?;
            let t1 = Instant::now();
            let back = decode(&bytes, &limits)?;
            let t2 = Instant::now();
            if back != msg {
                return Err("round trip differs".into());
            }
            size = bytes.len();
            enc.push((t1 - t0).as_secs_f64());
            dec.push((t2 - t1).as_secs_f64());
            // End to end: candle f32 tensor → wire bytes → candle f32 tensor.
            let t3 = Instant::now();
            let w = WireTensor::from_tensor(t, dtype)?;
            let bytes = encode(&Message::Reply { outputs: vec![w] }, c)?;
            if let Message::Reply { outputs } = decode(&bytes, &limits)? {
                for o in &outputs {
                    o.to_tensor(&Device::Cpu)?;
                }
            }
            full.push(t3.elapsed().as_secs_f64());
        }
        let (e, d, f) = (median(enc), median(dec), median(full));
        println!(
            "  {:<26} {:>10.0} {:>10.0} {:>12.0} {:>16.0} {:>12}",
            label,
            mb / e,
            mb / d,
            mb / (e + d),
            mb / f,
            size
        );
    }
    Ok(())
}

fn main() -> Res<()> {
    let runs = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5usize);
    let big = smooth_field(2, 320, 64, 64, 7)?;
    ratios("smooth field", &big)?;
    let noisy = gaussian((2, 4, 64, 64), 11)?;
    let smooth_latent = smooth_field(2, 4, 64, 64, 13)?;
    for (name, latent) in [
        ("Gaussian latent", &noisy),
        ("smooth latent", &smooth_latent),
    ] {
        match tiny_unet_activation(latent)? {
            Some((a, b)) => {
                ratios(&format!("tiny-random conv_in, {name}"), &a)?;
                ratios(
                    &format!("tiny-random down_blocks.0.resnets.0.conv1, {name}"),
                    &b,
                )?;
            }
            None => println!("models/tiny-random absent: skipping U-Net activations"),
        }
    }
    throughput(&big, runs)?;
    Ok(())
}

//! Element-wise CPU kernels in f32 written as branch-free loops the compiler vectorises: the
//! exponential of the fused attention's softmax, GEGLU (candle's erf is a scalar call per
//! element, and its GEGLU is three passes: two narrows and a product), and GroupNorm fused with
//! the SiLU that follows it (candle's GroupNorm is several single-threaded passes over the map,
//! its SiLU one more: at the VAE decoder's 512 × 512 maps they cost more than the convolutions'
//! arithmetic leaves to spare).

use candle_core::{DType, Device, Layout, Storage, Tensor, D};
use rayon::prelude::*;

use crate::vocab::error::{Error, Result};

/// Values per parallel work item of the element-wise kernels.
const CHUNK: usize = 1 << 14;

/// The contiguous f32 values of a CPU tensor (the kernels read their operands in place).
pub(crate) fn f32s<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        return Err(Error::Unsupported(
            "a CPU kernel on a non-CPU tensor".into(),
        ));
    };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::InvalidArgument("a CPU kernel on a strided tensor".into()))?;
    data.get(start..end)
        .ok_or_else(|| Error::InvalidArgument("a tensor's layout beyond its storage".into()))
}

/// Refuses `kernel` on operands that are not f32 tensors on the CPU (what every kernel here
/// reads in place).
pub(crate) fn require_cpu_f32(operands: &[&Tensor], kernel: &str) -> Result<()> {
    if operands
        .iter()
        .any(|t| t.dtype() != DType::F32 || !t.device().is_cpu())
    {
        return Err(Error::Unsupported(format!(
            "{kernel} runs on f32 CPU tensors"
        )));
    }
    Ok(())
}

/// h · gelu(g) for x = [h | g] split on the last dimension (diffusers' GEGLU with the exact,
/// erf-based GELU): x [.., 2n] (f32, CPU) gives [.., n].
pub fn geglu_erf(x: &Tensor) -> Result<Tensor> {
    require_cpu_f32(&[x], "the CPU GEGLU")?;
    let two_n = x.dim(D::Minus1)?;
    if two_n % 2 != 0 {
        return Err(Error::InvalidArgument(format!(
            "GEGLU of an odd width {two_n}"
        )));
    }
    let n = two_n / 2;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let xs = f32s(&storage, layout)?;
    let mut out = vec![0f32; xs.len() / 2];
    let rows_per_item = (CHUNK / n.max(1)).max(1);
    let wide = Wide::detect();
    out.par_chunks_mut(rows_per_item * n.max(1))
        .zip(xs.par_chunks(rows_per_item * two_n.max(1)))
        .for_each(|(o, x)| {
            for (orow, xrow) in o.chunks_mut(n).zip(x.chunks(two_n)) {
                let (h, g) = xrow.split_at(n);
                wide.geglu_row(orow, h, g);
            }
        });
    Ok(Tensor::from_vec(out, dims, &Device::Cpu)?)
}

/// The vector width the element-wise loops are compiled for, detected at run time: the same
/// Rust loop built for AVX-512 or AVX2 where the CPU has them (the default x86-64 target only
/// promises SSE2's 4 lanes). The arithmetic is the same in every build (no FMA contraction),
/// so the results are too.
#[derive(Debug, Clone, Copy)]
enum Wide {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Baseline,
}

impl Wide {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Wide::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Wide::Avx2;
            }
        }
        Wide::Baseline
    }

    /// y = h · gelu(g), element-wise.
    fn geglu_row(self, y: &mut [f32], h: &[f32], g: &[f32]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Wide::Avx512` comes from `detect` after the CPU reported AVX-512F; the
            // function differs from the baseline only in the instructions it may use.
            Wide::Avx512 => unsafe { geglu_row_avx512(y, h, g) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, for AVX2.
            Wide::Avx2 => unsafe { geglu_row_avx2(y, h, g) },
            Wide::Baseline => geglu_row(y, h, g),
        }
    }
}

#[inline(always)]
fn geglu_row(y: &mut [f32], h: &[f32], g: &[f32]) {
    for ((y, h), g) in y.iter_mut().zip(h).zip(g) {
        *y = h * gelu_erf(*g);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn geglu_row_avx512(y: &mut [f32], h: &[f32], g: &[f32]) {
    geglu_row(y, h, g);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn geglu_row_avx2(y: &mut [f32], h: &[f32], g: &[f32]) {
    geglu_row(y, h, g);
}

/// GroupNorm of x [B, C, ...] (f32, CPU) over `groups` groups of channels with the affine
/// `gamma`, `beta` [C], then SiLU when `silu`. Statistics per (image, group) in f64 (mean, then
/// the mean squared deviation: no cancellation), each group in parallel.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    require_cpu_f32(&[x, gamma, beta], "the CPU GroupNorm")?;
    let dims = x.dims().to_vec();
    let c = match dims.as_slice() {
        [_, c, ..] => *c,
        _ => return Err(Error::InvalidArgument(format!("GroupNorm of {dims:?}"))),
    };
    if groups == 0 || c % groups != 0 || gamma.dims() != [c] || beta.dims() != [c] {
        return Err(Error::InvalidArgument(format!(
            "GroupNorm of {dims:?} in {groups} groups with affine {:?}",
            gamma.dims()
        )));
    }
    let spatial: usize = dims[2..].iter().product();
    let per_group = (c / groups) * spatial;
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let xs = f32s(&storage, layout)?;
    let (gs, bs) = (gamma.to_vec1::<f32>()?, beta.to_vec1::<f32>()?);
    let mut out = vec![0f32; xs.len()];
    if per_group == 0 {
        return Ok(Tensor::from_vec(out, dims, &Device::Cpu)?);
    }
    out.par_chunks_mut(per_group)
        .zip(xs.par_chunks(per_group))
        .enumerate()
        .for_each(|(i, (o, xg))| {
            let n = xg.len() as f64;
            let mean = xg.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = xg
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n;
            let inv = 1.0 / (var + eps).sqrt();
            let first = (i % groups) * (c / groups);
            for (k, (orow, xrow)) in o.chunks_mut(spatial).zip(xg.chunks(spatial)).enumerate() {
                // y = x · a + d with a = γ/σ and d = β − μ·γ/σ, per channel.
                let a = (f64::from(gs[first + k]) * inv) as f32;
                let d = (f64::from(bs[first + k]) - mean * inv * f64::from(gs[first + k])) as f32;
                if silu {
                    for (y, &v) in orow.iter_mut().zip(xrow) {
                        let t = v * a + d;
                        *y = t * sigmoid(t);
                    }
                } else {
                    for (y, &v) in orow.iter_mut().zip(xrow) {
                        *y = v * a + d;
                    }
                }
            }
        });
    Ok(Tensor::from_vec(out, dims, &Device::Cpu)?)
}

/// 1 / (1 + e^(−t)) over `fast_exp` (whose argument must be ≤ 0).
#[inline(always)]
fn sigmoid(t: f32) -> f32 {
    let e = fast_exp(-t.abs());
    if t >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

/// x · Φ(x) = x/2 · (1 + erf(x/√2)), erf by Abramowitz & Stegun 7.1.26 (absolute error below
/// 1.5e-7) over `fast_exp`.
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152,
        1.061_405_4,
    ];
    let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let erf_abs = 1.0 - poly * fast_exp(-z * z);
    let erf = erf_abs.copysign(x);
    0.5 * x * (1.0 + erf)
}

/// eˣ for x ≤ 0 to about 2 ulp (Cody–Waite reduction to r ∈ [−ln2/2, ln2/2], a degree-6
/// polynomial, and 2ⁿ built from the exponent bits); exactly 1 at 0, about 1e-38 below −87
/// (a softmax weight that small is zero for every sum it enters). −∞ gives 0's stand-in too.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round-to-nearest by the 1.5·2²³ trick (exact for |t| < 2²²).
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let n = (x * LOG2E + SHIFTER) - SHIFTER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_close_to_exp() {
        let (mut worst, mut at) = (0f32, 0f32);
        for i in 0..87_000 {
            let x = -(i as f32) * 1e-3; // down to −86.999, inside the clamp
            let rel = (fast_exp(x) - x.exp()).abs() / x.exp();
            if rel > worst {
                worst = rel;
                at = x;
            }
        }
        assert!(worst < 5e-7, "relative error {worst} at {at}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn group_norm_matches_candle() {
        let v: Vec<f32> = (0..2 * 8 * 5 * 3)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.13)
            .collect();
        let x = Tensor::from_vec(v, (2, 8, 5, 3), &Device::Cpu).expect("x");
        let g = Tensor::from_vec(
            (0..8).map(|i| 0.5 + i as f32 * 0.1).collect(),
            8,
            &Device::Cpu,
        )
        .expect("g");
        let b = Tensor::from_vec(
            (0..8).map(|i| i as f32 * 0.05 - 0.2).collect(),
            8,
            &Device::Cpu,
        )
        .expect("b");
        let gn = candle_nn::GroupNorm::new(g.clone(), b.clone(), 8, 4, 1e-5).expect("gn");
        let want = candle_core::Module::forward(&gn, &x).expect("candle");
        for silu in [false, true] {
            let got = group_norm(&x, &g, &b, 4, 1e-5, silu).expect("ours");
            let want = if silu {
                want.silu().expect("silu")
            } else {
                want.clone()
            };
            let err = (got - want)
                .and_then(|e| e.abs())
                .and_then(|e| e.max_all())
                .and_then(|e| e.to_scalar::<f32>())
                .expect("err");
            assert!(err < 2e-5, "silu {silu}: max error {err}");
        }
        assert!(group_norm(&x, &g, &b, 3, 1e-5, false).is_err());
    }

    #[test]
    fn geglu_matches_candle() {
        let v: Vec<f32> = (0..2 * 3 * 10).map(|i| (i as f32 - 30.0) * 0.37).collect();
        let x = Tensor::from_vec(v, (2, 3, 10), &Device::Cpu).expect("x");
        let got = geglu_erf(&x).expect("geglu");
        let h = x.narrow(2, 0, 5).expect("h");
        let g = x.narrow(2, 5, 5).and_then(|g| g.gelu_erf()).expect("g");
        let want = (h * g).expect("want");
        let err = (got - want)
            .and_then(|e| e.abs())
            .and_then(|e| e.max_all())
            .and_then(|e| e.to_scalar::<f32>())
            .expect("err");
        assert!(err < 2e-5, "max error {err}");
    }

    #[test]
    fn every_vector_width_gives_the_baseline_bits() {
        let g: Vec<f32> = (0..1003).map(|i| (i as f32 - 501.0) * 0.0173).collect();
        let h: Vec<f32> = (0..1003).map(|i| 1.0 + i as f32 * 1e-3).collect();
        let mut want = vec![0f32; g.len()];
        Wide::Baseline.geglu_row(&mut want, &h, &g);
        let mut widths = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                widths.push(Wide::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                widths.push(Wide::Avx512);
            }
        }
        for w in widths {
            let mut got = vec![0f32; g.len()];
            w.geglu_row(&mut got, &h, &g);
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{w:?} differs from the baseline build");
        }
    }
}

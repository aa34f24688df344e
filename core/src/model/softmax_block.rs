//! The online softmax's per-row step on the CPU: a row of scores becomes its exponentials
//! against the running maximum, and the row's new maximum and sum come back.
//!
//! The fused attention runs this on every score it computes (4096 × 4096 per head at SD1.5's
//! 512 px level), so it is written in AVX-512 and AVX2 intrinsics where the CPU has them: the
//! portable loop (`f32::max` folds and sums the compiler may not reorder) took longer than the
//! two GEMMs around it. All three use the polynomial of [`fast_exp`], so they agree to rounding.

use super::cpu_ops::fast_exp;

/// What one row's step returns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoftmaxRow {
    /// max(previous maximum, the row's maximum).
    pub max: f32,
    /// Σ exp(score − max) over the row.
    pub sum: f32,
}

/// Which instructions the step uses; detected once per attention call. The instruction set is
/// private, so a value naming AVX-512 or AVX2 exists only where the CPU was found to have it
/// (`detect`, `available`): calling `exp_shifted` is safe on any value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel(Isa);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Isa {
    /// 16 lanes, with `vscalefps` for 2ⁿ.
    Avx512,
    /// 8 lanes with FMA.
    Avx2,
    /// Plain Rust (ARM phones and older x86; the compiler vectorises what it can).
    Portable,
}

impl Kernel {
    /// The widest kernel this CPU runs.
    pub fn detect() -> Self {
        Self::available()
            .last()
            .copied()
            .unwrap_or(Kernel(Isa::Portable))
    }

    /// Every kernel this CPU runs, narrowest first (the portable one is always there).
    pub fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut k = vec![Kernel(Isa::Portable)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                k.push(Kernel(Isa::Avx2));
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                k.push(Kernel(Isa::Avx512));
            }
        }
        k
    }

    /// row ← exp(row − m) with m = max(`prev_max`, max(row)); returns m and the new row's sum.
    pub fn exp_shifted(self, row: &mut [f32], prev_max: f32) -> SoftmaxRow {
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: an `Isa::Avx512` value is only made by `available` after the CPU reported
            // AVX-512F (the field is private to this module); the function needs nothing else.
            Isa::Avx512 => unsafe { x86::exp_shifted_avx512(row, prev_max) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, for AVX2 and FMA.
            Isa::Avx2 => unsafe { x86::exp_shifted_avx2(row, prev_max) },
            _ => exp_shifted_portable(row, prev_max),
        }
    }
}

fn exp_shifted_portable(row: &mut [f32], prev_max: f32) -> SoftmaxRow {
    const LANES: usize = 8;
    let mut m = [prev_max; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for ch in &mut chunks {
        for (a, x) in m.iter_mut().zip(ch) {
            *a = a.max(*x);
        }
    }
    let tail = chunks.remainder().iter().copied().fold(prev_max, f32::max);
    let max = m.into_iter().fold(tail, f32::max);
    let mut s = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for ch in &mut chunks {
        for (a, x) in s.iter_mut().zip(ch) {
            *x = fast_exp(*x - max);
            *a += *x;
        }
    }
    let mut sum = s.iter().sum::<f32>();
    for x in chunks.into_remainder() {
        *x = fast_exp(*x - max);
        sum += *x;
    }
    SoftmaxRow { max, sum }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{fast_exp, SoftmaxRow};
    use std::arch::x86_64::*;

    // fast_exp's constants: x = n·ln2 + r with n = round(x·log₂e), r by a two-part ln2, then
    // eʳ by its degree-6 Taylor polynomial.
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const POLY: [f32; 7] = [
        1.0,
        1.0,
        0.5,
        0.166_666_67,
        0.041_666_668,
        0.008_333_334,
        0.001_388_889,
    ];
    const FLOOR: f32 = -87.0;

    /// The scalar tail after the vector body, shared by both kernels.
    fn tail(row: &mut [f32], max: f32, sum: &mut f32) {
        for x in row {
            *x = fast_exp(*x - max);
            *sum += *x;
        }
    }

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_shifted_avx512(row: &mut [f32], prev_max: f32) -> SoftmaxRow {
        let mut vm = _mm512_set1_ps(prev_max);
        let mut chunks = row.chunks_exact(16);
        for ch in &mut chunks {
            // SAFETY: `ch` is 16 f32s; the load is unaligned.
            vm = _mm512_max_ps(vm, unsafe { _mm512_loadu_ps(ch.as_ptr()) });
        }
        let tail_max = chunks.remainder().iter().copied().fold(prev_max, f32::max);
        let max = _mm512_reduce_max_ps(vm).max(tail_max);
        let (vmax, log2e, hi, lo, floor) = (
            _mm512_set1_ps(max),
            _mm512_set1_ps(LOG2E),
            _mm512_set1_ps(LN2_HI),
            _mm512_set1_ps(LN2_LO),
            _mm512_set1_ps(FLOOR),
        );
        let c = POLY.map(|v| _mm512_set1_ps(v));
        let mut vs = _mm512_setzero_ps();
        let mut chunks = row.chunks_exact_mut(16);
        for ch in &mut chunks {
            // SAFETY: `ch` is 16 f32s, read then written back unaligned.
            let x = unsafe { _mm512_loadu_ps(ch.as_ptr()) };
            let x = _mm512_max_ps(_mm512_sub_ps(x, vmax), floor);
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(x, log2e),
            );
            let r = _mm512_fnmadd_ps(n, lo, _mm512_fnmadd_ps(n, hi, x));
            let mut p = c[6];
            for k in (0..6).rev() {
                p = _mm512_fmadd_ps(p, r, c[k]);
            }
            let e = _mm512_scalef_ps(p, n);
            // SAFETY: as the load above.
            unsafe { _mm512_storeu_ps(ch.as_mut_ptr(), e) };
            vs = _mm512_add_ps(vs, e);
        }
        let mut sum = _mm512_reduce_add_ps(vs);
        tail(chunks.into_remainder(), max, &mut sum);
        SoftmaxRow { max, sum }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted_avx2(row: &mut [f32], prev_max: f32) -> SoftmaxRow {
        let mut vm = _mm256_set1_ps(prev_max);
        let mut chunks = row.chunks_exact(8);
        for ch in &mut chunks {
            // SAFETY: `ch` is 8 f32s; the load is unaligned.
            vm = _mm256_max_ps(vm, unsafe { _mm256_loadu_ps(ch.as_ptr()) });
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 f32s.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), vm) };
        let tail_max = chunks.remainder().iter().copied().fold(prev_max, f32::max);
        let max = lanes.into_iter().fold(tail_max, f32::max);
        let (vmax, log2e, hi, lo, floor) = (
            _mm256_set1_ps(max),
            _mm256_set1_ps(LOG2E),
            _mm256_set1_ps(LN2_HI),
            _mm256_set1_ps(LN2_LO),
            _mm256_set1_ps(FLOOR),
        );
        let c = POLY.map(|v| _mm256_set1_ps(v));
        let bias = _mm256_set1_epi32(127);
        let mut vs = _mm256_setzero_ps();
        let mut chunks = row.chunks_exact_mut(8);
        for ch in &mut chunks {
            // SAFETY: `ch` is 8 f32s, read then written back unaligned.
            let x = unsafe { _mm256_loadu_ps(ch.as_ptr()) };
            let x = _mm256_max_ps(_mm256_sub_ps(x, vmax), floor);
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x, log2e),
            );
            let r = _mm256_fnmadd_ps(n, lo, _mm256_fnmadd_ps(n, hi, x));
            let mut p = c[6];
            for k in (0..6).rev() {
                p = _mm256_fmadd_ps(p, r, c[k]);
            }
            // 2ⁿ from the exponent bits; n ≥ −126 after the floor, so it is a normal float.
            let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                bias,
            )));
            let e = _mm256_mul_ps(p, two_n);
            // SAFETY: as the load above.
            unsafe { _mm256_storeu_ps(ch.as_mut_ptr(), e) };
            vs = _mm256_add_ps(vs, e);
        }
        // SAFETY: `lanes` holds 8 f32s.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), vs) };
        let mut sum = lanes.iter().sum::<f32>();
        tail(chunks.into_remainder(), max, &mut sum);
        SoftmaxRow { max, sum }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_matches_exp_in_f64() {
        let mut s = 7u64;
        for len in [0usize, 1, 7, 8, 15, 16, 17, 77, 256, 300] {
            let row: Vec<f32> = (0..len)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 60.0
                })
                .collect();
            for prev in [f32::NEG_INFINITY, 3.0, 40.0] {
                let max = row.iter().copied().fold(prev, f32::max);
                // The shift is an f32 subtraction in every kernel; its rounding is not the exp's error.
                let want: Vec<f64> = row.iter().map(|&x| ((x - max) as f64).exp()).collect();
                let want_sum: f64 = want.iter().sum();
                for k in Kernel::available() {
                    let mut got = row.clone();
                    let r = k.exp_shifted(&mut got, prev);
                    assert_eq!(r.max, max, "{k:?} len {len}");
                    for (g, w) in got.iter().zip(&want) {
                        let err = (*g as f64 - w).abs();
                        assert!(err <= 1e-6 * w.max(1e-30) + 1e-37, "{k:?}: {g} vs {w}");
                    }
                    let err = (r.sum as f64 - want_sum).abs();
                    assert!(
                        err <= 1e-5 * want_sum.max(1e-30),
                        "{k:?} sum {} vs {want_sum}",
                        r.sum
                    );
                }
            }
        }
    }
}

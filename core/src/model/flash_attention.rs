//! Fused CPU attention: softmax(q kᵀ/√d) v without the score matrix in memory — FlashAttention's
//! online softmax over key blocks, on the CPU, in f32.
//!
//! The work splits over (batch, block of 256 queries) on rayon's pool; each item loops over the
//! heads and, per head, over blocks of 256 keys: two small GEMMs (the `gemm` crate, whose
//! kernels candle's CPU matmul also uses) — the 256×256 scores, which stay in L2, then their
//! exponentials times the values into a 256×d accumulator — with a running maximum and sum per
//! query row (the accumulator is rescaled when the maximum grows). Between the two GEMMs, each
//! score row's maximum, exponentials and sum take two passes in AVX-512 or AVX2 where the CPU
//! has them: written portably, that step cost more than both GEMMs together. q, k and v are read in place
//! from [B, T, C] (head h is columns h·d..(h+1)·d), so neither the heads' transposes nor the
//! scores are ever written out, and each item writes its own rows of the [B, Tq, C] output.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::cpu_ops::{f32s, fast_exp, require_cpu_f32};
use super::softmax_block::{Kernel, SoftmaxRow};
use crate::vocab::error::{Error, Result};

/// Queries per work item.
const Q_BLOCK: usize = 256;
/// Keys per block of the online softmax.
const K_BLOCK: usize = 256;

/// softmax(q kᵀ/√d) v with q [B, Tq, C] and k, v [B, Tk, C] (f32 on the CPU), `heads` dividing
/// C; returns [B, Tq, C] with the heads side by side, as the U-Net's attention block wants.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, tq, c) = q.dims3()?;
    let (bk, tk, ck) = k.dims3()?;
    if bk != b || ck != c || v.dims() != k.dims() || heads == 0 || c % heads != 0 || tk == 0 {
        return Err(Error::InvalidArgument(format!(
            "attention of q {:?}, k {:?}, v {:?} over {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    require_cpu_f32(&[q, k, v], "fused attention")?;
    if b == 0 || tq == 0 || c == 0 {
        // No output value to compute (and the work split below needs rows of C values).
        return Ok(Tensor::zeros(
            (b, tq, c),
            candle_core::DType::F32,
            &Device::Cpu,
        )?);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (qg, ql) = q.storage_and_layout();
    let (kg, kl) = k.storage_and_layout();
    let (vg, vl) = v.storage_and_layout();
    let shape = Shape {
        tq,
        tk,
        c,
        d: c / heads,
        kernel: Kernel::detect(),
    };
    let (qs, ks, vs) = (f32s(&qg, ql)?, f32s(&kg, kl)?, f32s(&vg, vl)?);
    let mut out = vec![0f32; b * tq * c];
    let scale = 1.0 / (shape.d as f32).sqrt();
    out.par_chunks_mut(tq * c)
        .enumerate()
        .for_each(|(batch, out_b)| {
            let (qb, kb, vb) = (
                &qs[batch * tq * c..(batch + 1) * tq * c],
                &ks[batch * tk * c..(batch + 1) * tk * c],
                &vs[batch * tk * c..(batch + 1) * tk * c],
            );
            out_b.par_chunks_mut(Q_BLOCK * c).enumerate().for_each_init(
                Scratch::default,
                |s, (block, rows)| {
                    let q_rows = &qb[block * Q_BLOCK * c..][..rows.len()];
                    query_block(&shape, scale, q_rows, kb, vb, rows, s);
                },
            );
        });
    drop((qg, kg, vg));
    Ok(Tensor::from_vec(out, (b, tq, c), &Device::Cpu)?)
}

struct Shape {
    tq: usize,
    tk: usize,
    c: usize,
    d: usize,
    /// The softmax step's instruction set, detected once per call.
    kernel: Kernel,
}

/// One work item's buffers, reused across the items a rayon thread runs.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// Attention of `q_rows` (nr rows of C) against all keys of one batch, every head, into `out`.
fn query_block(
    s: &Shape,
    scale: f32,
    q_rows: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    w: &mut Scratch,
) {
    let (c, d, tk) = (s.c, s.d, s.tk);
    let nr = out.len() / c;
    debug_assert!(nr <= Q_BLOCK && q_rows.len() == out.len() && s.tq > 0);
    w.scores.resize(Q_BLOCK * K_BLOCK, 0.0);
    w.acc.resize(Q_BLOCK * d, 0.0);
    w.max.resize(Q_BLOCK, 0.0);
    w.sum.resize(Q_BLOCK, 0.0);
    for h in 0..c / d {
        let col = h * d;
        w.acc[..nr * d].fill(0.0);
        w.max[..nr].fill(f32::NEG_INFINITY);
        w.sum[..nr].fill(0.0);
        let mut start = 0;
        while start < tk {
            let nk = K_BLOCK.min(tk - start);
            // SAFETY: the lhs is rows 0..nr (stride c) by columns col..col+d (stride 1) of
            // `q_rows`, whose length is nr·c ≥ (nr−1)·c + col + d since col + d ≤ c; the rhs
            // (d × nk) is element (e, j) at (start + j)·c + col + e of `k`, in bounds since
            // start + nk ≤ tk and `k` holds tk·c values; the destination (nr × nk, row stride
            // K_BLOCK) lies in `scores`, sized Q_BLOCK·K_BLOCK with nr ≤ Q_BLOCK, nk ≤ K_BLOCK.
            // The three regions belong to different allocations, so nothing aliases.
            unsafe {
                gemm::gemm(
                    nr,
                    nk,
                    d,
                    w.scores.as_mut_ptr(),
                    1,
                    K_BLOCK as isize,
                    false,
                    q_rows.as_ptr().add(col),
                    1,
                    c as isize,
                    k.as_ptr().add(start * c + col),
                    c as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for i in 0..nr {
                let row = &mut w.scores[i * K_BLOCK..i * K_BLOCK + nk];
                let SoftmaxRow { max, sum } = s.kernel.exp_shifted(row, w.max[i]);
                let rescale = fast_exp(w.max[i] - max);
                w.sum[i] = w.sum[i] * rescale + sum;
                w.max[i] = max;
                if rescale != 1.0 {
                    for a in &mut w.acc[i * d..(i + 1) * d] {
                        *a *= rescale;
                    }
                }
            }
            // SAFETY: the lhs (nr × nk, row stride K_BLOCK) lies in `scores` as above; the rhs
            // (nk × d) is element (j, e) at (start + j)·c + col + e of `v`, which holds tk·c
            // values; the destination (nr × d, row stride d) lies in `acc`, sized Q_BLOCK·d.
            // Different allocations: no aliasing.
            unsafe {
                gemm::gemm(
                    nr,
                    d,
                    nk,
                    w.acc.as_mut_ptr(),
                    1,
                    d as isize,
                    true,
                    w.scores.as_ptr(),
                    1,
                    K_BLOCK as isize,
                    v.as_ptr().add(start * c + col),
                    1,
                    c as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            start += nk;
        }
        for i in 0..nr {
            let inv = 1.0 / w.sum[i];
            let dst = &mut out[i * c + col..i * c + col + d];
            for (o, a) in dst.iter_mut().zip(&w.acc[i * d..(i + 1) * d]) {
                *o = a * inv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn randn(shape: (usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        let mut s = seed | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    /// The unfused reference: per-head scores, softmax, values (candle ops, f64).
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Tensor {
        let f = |t: &Tensor| t.to_dtype(DType::F64).expect("f64");
        let (q, k, v) = (f(q), f(k), f(v));
        let (b, tq, c) = q.dims3().expect("q");
        let tk = k.dim(1).expect("k");
        let d = c / heads;
        let split = |t: &Tensor, n: usize| {
            t.reshape((b, n, heads, d))
                .and_then(|t| t.transpose(1, 2))
                .and_then(|t| t.contiguous())
                .expect("split")
        };
        let (qh, kh, vh) = (split(&q, tq), split(&k, tk), split(&v, tk));
        let kt = kh.transpose(2, 3).expect("kt");
        let s = (qh.matmul(&kt).expect("qk") / (d as f64).sqrt()).expect("scale");
        let p = candle_nn::ops::softmax_last_dim(&s).expect("softmax");
        p.matmul(&vh)
            .and_then(|o| o.transpose(1, 2))
            .and_then(|o| o.reshape((b, tq, c)))
            .and_then(|o| o.to_dtype(DType::F32))
            .expect("out")
    }

    #[test]
    fn matches_unfused_attention_across_block_edges() {
        // Tq and Tk off the block sizes (a partial last block of each), and Tk < K_BLOCK.
        for (b, tq, tk, heads, d) in [(2, 130, 600, 3, 8), (1, 64, 77, 8, 5), (2, 5, 513, 1, 40)] {
            let c = heads * d;
            let q = randn((b, tq, c), 1);
            let k = randn((b, tk, c), 2);
            let v = randn((b, tk, c), 3);
            let got = attention(&q, &k, &v, heads).expect("fused");
            let want = reference(&q, &k, &v, heads);
            let err = (got - want)
                .and_then(|e| e.abs())
                .and_then(|e| e.max_all())
                .and_then(|e| e.to_scalar::<f32>())
                .expect("err");
            assert!(
                err < 2e-5,
                "b {b} tq {tq} tk {tk} heads {heads}: max error {err}"
            );
        }
    }

    #[test]
    fn refuses_mismatched_shapes() {
        let q = randn((1, 4, 6), 1);
        let k = randn((1, 5, 6), 2);
        assert!(attention(&q, &k, &randn((1, 4, 6), 3), 2).is_err());
        assert!(attention(&q, &k, &k, 4).is_err());
        let none = attention(&randn((1, 0, 6), 1), &k, &k, 2).expect("no queries");
        assert_eq!(none.dims(), [1, 0, 6]);
        let empty = Tensor::zeros((1, 5, 0), DType::F32, &Device::Cpu).expect("empty");
        let none = attention(&empty.narrow(1, 0, 2).expect("q"), &empty, &empty, 2).expect("c 0");
        assert_eq!(none.dims(), [1, 2, 0]);
    }
}

//! A linear layer on the CPU in f32: y = x wᵀ + b as one GEMM whose destination starts as the
//! bias rows, so the bias costs no pass of its own over the output (candle's `Linear` adds it
//! with a broadcast after the product: at the U-Net's 8192 × 2560 GEGLU input, 84 MB more
//! written and read per call).

use candle_core::{Device, Tensor};

use super::cpu_ops::{f32s, require_cpu_f32};
use crate::vocab::error::{Error, Result};

/// y [rows, out] = x [rows, in] · w [out, in]ᵀ + bias [out] (f32, CPU).
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (rows, k) = x.dims2()?;
    let (n, k_w) = w.dims2()?;
    if k_w != k || bias.is_some_and(|b| b.dims() != [n]) {
        return Err(Error::InvalidArgument(format!(
            "linear of {:?} by {:?} (bias {:?})",
            x.dims(),
            w.dims(),
            bias.map(|b| b.dims().to_vec())
        )));
    }
    let mut operands = vec![x, w];
    operands.extend(bias);
    require_cpu_f32(&operands, "the CPU linear")?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (xg, xl) = x.storage_and_layout();
    let (wg, wl) = w.storage_and_layout();
    let (xs, ws) = (f32s(&xg, xl)?, f32s(&wg, wl)?);
    let mut out = match bias {
        Some(b) => {
            let b = b.to_vec1::<f32>()?;
            let mut out = Vec::with_capacity(rows * n);
            for _ in 0..rows {
                out.extend_from_slice(&b);
            }
            out
        }
        None => vec![0f32; rows * n],
    };
    if rows > 0 && n > 0 && k > 0 {
        // SAFETY: the destination is `out`, rows·n values as [rows × n] row-major; the lhs is
        // `xs`, rows·k values as [rows × k] row-major (x is contiguous [rows, in]); the rhs is
        // wᵀ, element (e, j) at j·k + e of `ws`, which holds n·k values (w contiguous [out, in]).
        // Three allocations: nothing aliases.
        unsafe {
            gemm::gemm(
                rows,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                bias.is_some(),
                xs.as_ptr(),
                1,
                k as isize,
                ws.as_ptr(),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(candle_core::utils::get_num_threads()),
            );
        }
    }
    drop((xg, wg));
    Ok(Tensor::from_vec(out, (rows, n), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(dims: (usize, usize), seed: u64) -> Tensor {
        let mut s = seed | 1;
        let v: Vec<f32> = (0..dims.0 * dims.1)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).expect("tensor")
    }

    #[test]
    fn matches_candle_with_and_without_bias() {
        let x = seeded((37, 19), 1);
        let w = seeded((23, 19), 2);
        let b = seeded((1, 23), 3).reshape(23).expect("bias");
        for bias in [Some(&b), None] {
            let got = linear(&x, &w, bias).expect("linear");
            let want = candle_nn::Linear::new(w.clone(), bias.cloned());
            let want = candle_core::Module::forward(&want, &x).expect("candle");
            let err = (got - want)
                .and_then(|e| e.abs())
                .and_then(|e| e.max_all())
                .and_then(|e| e.to_scalar::<f32>())
                .expect("err");
            assert!(err < 1e-5, "bias {}: max error {err}", bias.is_some());
        }
        assert!(linear(&x, &seeded((23, 18), 4), None).is_err());
        // An empty inner dimension: the product is zero, the bias is the result.
        let empty = Tensor::zeros((37, 0), candle_core::DType::F32, &Device::Cpu).expect("x");
        let w0 = Tensor::zeros((23, 0), candle_core::DType::F32, &Device::Cpu).expect("w");
        let y = linear(&empty, &w0, Some(&b)).expect("k 0");
        let first = y.get(0).and_then(|r| r.to_vec1::<f32>()).expect("row");
        assert_eq!(first, b.to_vec1::<f32>().expect("bias"));
        assert!(linear(&x, &w, Some(&seeded((1, 22), 5).reshape(22).expect("b"))).is_err());
    }
}

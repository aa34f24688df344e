//! 2-D convolution on the CPU in f32: im2col in the kernel's own (c_in, ky, kx) order and one
//! GEMM over every image of the batch.
//!
//! candle's CPU convolution re-lays the kernel out as (ky, kx, c_in) on every call and runs one
//! GEMM per image; for the U-Net's wide, small-map convolutions (1280 channels at 8×8 or 4×4)
//! that copy and the second pass over the kernel cost more than the arithmetic. Here the
//! [c_out, c_in, kh, kw] kernel is already the left-hand [c_out, K] matrix, the columns are
//! every output pixel of every image (in tiles that bound the im2col buffer), and the bias is
//! the GEMM's initial destination.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::cpu_ops::{f32s, require_cpu_f32};
use crate::vocab::error::{Error, Result};
use crate::vocab::precision::Pad;

/// Most im2col values held at once (8 MB of f32: a phone decodes the VAE under a memory budget).
const COL_LIMIT: usize = 2 << 20;

/// y = conv(x, w) + bias with x [B, Ci, H, W], w [Co, Ci, KH, KW], bias [Co] (f32, CPU),
/// zero padding `pad` and `stride`; y is [B, Co, Ho, Wo].
pub fn conv2d(x: &Tensor, w: &Tensor, bias: &Tensor, pad: Pad, stride: usize) -> Result<Tensor> {
    let (b, ci, h, wd) = x.dims4()?;
    let (co, ci_k, kh, kw) = w.dims4()?;
    let padded_h = h + pad.top + pad.bottom;
    let padded_w = wd + pad.left + pad.right;
    if ci_k != ci || bias.dims() != [co] || stride == 0 || padded_h < kh || padded_w < kw {
        return Err(Error::InvalidArgument(format!(
            "conv2d of {:?} by {:?} (bias {:?}, stride {stride}, {pad:?})",
            x.dims(),
            w.dims(),
            bias.dims()
        )));
    }
    require_cpu_f32(&[x, w, bias], "the CPU conv2d")?;
    let g = Geometry {
        ci,
        h,
        w: wd,
        kh,
        kw,
        pad,
        stride,
        ho: (padded_h - kh) / stride + 1,
        wo: (padded_w - kw) / stride + 1,
    };
    let (x, w, bias) = (x.contiguous()?, w.contiguous()?, bias.contiguous()?);
    let (xg, xl) = x.storage_and_layout();
    let (wg, wl) = w.storage_and_layout();
    let (bg, bl) = bias.storage_and_layout();
    let (xs, ws, bs) = (f32s(&xg, xl)?, f32s(&wg, wl)?, f32s(&bg, bl)?);
    let p = g.ho * g.wo;
    let n = b * p;
    let k = ci * kh * kw;
    // [Co, B·P], each row starting as its bias.
    let mut out: Vec<f32> = bs.iter().flat_map(|&v| std::iter::repeat_n(v, n)).collect();
    let tile = (COL_LIMIT / k.max(1)).clamp(1, n.max(1));
    let mut col = vec![0f32; k * tile];
    let threads = candle_core::utils::get_num_threads();
    let mut n0 = 0;
    while n0 < n {
        let t = tile.min(n - n0);
        let col = &mut col[..k * t];
        col.par_chunks_mut(t)
            .enumerate()
            .for_each(|(row, dst)| g.fill_row(xs, row, n0, dst));
        // SAFETY: the destination is rows 0..co (stride n) by columns n0..n0+t (stride 1) of
        // `out`, which holds co·n values, with n0 + t ≤ n; the lhs is `ws`, co·k values read as
        // [co × k] row-major (w is contiguous [Co, Ci, KH, KW]); the rhs is `col`, k·t values
        // as [k × t] row-major. The three are different allocations, so nothing aliases.
        unsafe {
            gemm::gemm(
                co,
                t,
                k,
                out.as_mut_ptr().add(n0),
                1,
                n as isize,
                true,
                ws.as_ptr(),
                1,
                k as isize,
                col.as_ptr(),
                1,
                t as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
        n0 += t;
    }
    drop((xg, wg, bg));
    let y = Tensor::from_vec(out, (co, b, g.ho, g.wo), &Device::Cpu)?;
    Ok(if b == 1 {
        y.reshape((1, co, g.ho, g.wo))?
    } else {
        y.transpose(0, 1)?.contiguous()?
    })
}

struct Geometry {
    ci: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    pad: Pad,
    stride: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    /// Row `row` = (c, ky, kx) of the im2col matrix for output pixels n0.. (all images in
    /// turn): the input value each of them multiplies by that kernel tap, 0 in the padding.
    fn fill_row(&self, x: &[f32], row: usize, n0: usize, dst: &mut [f32]) {
        let (c, ky, kx) = (
            row / (self.kh * self.kw),
            (row / self.kw) % self.kh,
            row % self.kw,
        );
        let p = self.ho * self.wo;
        let mut j = 0;
        while j < dst.len() {
            let n = n0 + j;
            let (img, q) = (n / p, n % p);
            let (oy, ox0) = (q / self.wo, q % self.wo);
            // One output row (or what is left of it in this tile) at a time.
            let run = (self.wo - ox0).min(dst.len() - j);
            let seg = &mut dst[j..j + run];
            let iy = (oy * self.stride + ky) as isize - self.pad.top as isize;
            if iy < 0 || iy >= self.h as isize {
                seg.fill(0.0);
            } else {
                let base = (img * self.ci + c) * self.h * self.w + iy as usize * self.w;
                let line = &x[base..base + self.w];
                for (i, d) in seg.iter_mut().enumerate() {
                    let ix = ((ox0 + i) * self.stride + kx) as isize - self.pad.left as isize;
                    *d = if ix >= 0 && (ix as usize) < self.w {
                        line[ix as usize]
                    } else {
                        0.0
                    };
                }
            }
            j += run;
        }
        debug_assert!(c < self.ci);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn randn(dims: &[usize], seed: u64) -> Tensor {
        let n: usize = dims.iter().product();
        let mut s = seed | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).expect("tensor")
    }

    fn pad(top: usize, bottom: usize, left: usize, right: usize) -> Pad {
        Pad {
            top,
            bottom,
            left,
            right,
        }
    }

    /// candle's convolution in f64 on the explicitly padded input, plus the bias.
    fn reference(x: &Tensor, w: &Tensor, bias: &Tensor, p: Pad, stride: usize) -> Tensor {
        let f = |t: &Tensor| t.to_dtype(DType::F64).expect("f64");
        let xp = f(x)
            .pad_with_zeros(2, p.top, p.bottom)
            .and_then(|t| t.pad_with_zeros(3, p.left, p.right))
            .expect("pad");
        let co = w.dim(0).expect("co");
        xp.conv2d(&f(w), 0, stride, 1, 1)
            .and_then(|y| y.broadcast_add(&f(bias).reshape((1, co, 1, 1))?))
            .and_then(|y| y.to_dtype(DType::F32))
            .expect("reference")
    }

    #[test]
    fn matches_candle_over_kernels_strides_and_padding() {
        let cases = [
            // (b, ci, h, w, co, k, pad, stride)
            (2, 5, 7, 9, 6, 3, pad(1, 1, 1, 1), 1),
            (1, 3, 8, 8, 4, 3, pad(0, 1, 0, 1), 2),
            (2, 4, 6, 5, 3, 1, pad(0, 0, 0, 0), 1),
            (3, 2, 5, 6, 2, 3, pad(2, 0, 1, 1), 1), // a strip's halo: asymmetric
            (2, 16, 4, 4, 8, 3, pad(1, 1, 1, 1), 1),
        ];
        for (i, (b, ci, h, w, co, k, p, s)) in cases.into_iter().enumerate() {
            let x = randn(&[b, ci, h, w], 1 + i as u64);
            let wt = randn(&[co, ci, k, k], 100 + i as u64);
            let bias = randn(&[co], 200 + i as u64);
            let got = conv2d(&x, &wt, &bias, p, s).expect("conv");
            let want = reference(&x, &wt, &bias, p, s);
            assert_eq!(got.dims(), want.dims(), "case {i}");
            let err = (got - want)
                .and_then(|e| e.abs())
                .and_then(|e| e.max_all())
                .and_then(|e| e.to_scalar::<f32>())
                .expect("err");
            assert!(err < 1e-5, "case {i}: max error {err}");
        }
    }

    #[test]
    fn tiles_give_the_same_values_as_one_pass() {
        // K·N above the im2col limit forces several column tiles.
        let x = randn(&[2, 64, 96, 96], 7);
        let wt = randn(&[4, 64, 3, 3], 8);
        let bias = randn(&[4], 9);
        let got = conv2d(&x, &wt, &bias, pad(1, 1, 1, 1), 1).expect("conv");
        let want = reference(&x, &wt, &bias, pad(1, 1, 1, 1), 1);
        let err = (got - want)
            .and_then(|e| e.abs())
            .and_then(|e| e.max_all())
            .and_then(|e| e.to_scalar::<f32>())
            .expect("err");
        assert!(
            2 * 96 * 96 * 64 * 9 > COL_LIMIT && err < 1e-4,
            "max error {err}"
        );
    }

    #[test]
    fn refuses_mismatched_shapes() {
        let x = randn(&[1, 3, 4, 4], 1);
        let b = randn(&[2], 2);
        assert!(conv2d(&x, &randn(&[2, 4, 3, 3], 3), &b, pad(1, 1, 1, 1), 1).is_err());
        assert!(conv2d(&x, &randn(&[2, 3, 3, 3], 3), &b, pad(0, 0, 0, 0), 0).is_err());
        assert!(conv2d(&x, &randn(&[2, 3, 5, 5], 3), &b, pad(0, 0, 0, 0), 1).is_err());
    }
}

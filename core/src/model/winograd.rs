//! 3×3 stride-1 convolution on the CPU by Winograd's minimal filtering F(2×2, 3×3) (Lavin &
//! Gray, "Fast Algorithms for Convolutional Neural Networks", 2016), in f32.
//!
//! Each 2×2 block of outputs ("tile") is computed from the 4×4 input patch around it with 16
//! multiplications per (output, input) channel pair instead of 36: the patch is transformed
//! (V = Bᵀ d B), the kernel too (U = G g Gᵀ, once per call), and the 16 element-wise products
//! summed over input channels are 16 independent GEMMs, U_ξ [c_out × c_in] · V_ξ [c_in × tiles];
//! the output transform (Y = Aᵀ M A) gives the 2×2 tile. The transforms only add, subtract and
//! halve, so the result stays within a few ulp of the direct sum (checked against candle in f64).
//! Tiles are processed in blocks whose V and M buffers are bounded, with the batch's images in
//! one tile sequence.

use rayon::prelude::*;

use crate::vocab::precision::Pad;

/// Values each of the V and M buffers may hold before the block is made smaller
/// (8 MB of f32: the phone decodes the VAE under a memory budget) …
pub(crate) const BLOCK_LIMIT: usize = 2 << 20;
/// … unless that leaves fewer tiles than this per GEMM (the U-Net's 1280–1920-channel layers:
/// narrower GEMMs lose more than the larger buffers cost on a server).
pub(crate) const MIN_BLOCK_TILES: usize = 256;

/// The convolution's shape: x [b, ci, h, w], kernel [co, ci, 3, 3], zero padding `pad`.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub b: usize,
    pub ci: usize,
    pub h: usize,
    pub w: usize,
    pub co: usize,
    pub pad: Pad,
}

impl Shape {
    fn ho(&self) -> usize {
        (self.h + self.pad.top + self.pad.bottom).saturating_sub(2)
    }
    fn wo(&self) -> usize {
        (self.w + self.pad.left + self.pad.right).saturating_sub(2)
    }
}

/// y [b, co, ho, wo] = conv3x3(x, w) + bias; `x`, `w`, `bias` are the contiguous values of
/// [b, ci, h, w], [co, ci, 3, 3] and [co]; the caller has checked the lengths.
pub fn conv3x3(s: &Shape, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
    let (ho, wo) = (s.ho(), s.wo());
    let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
    let total = s.b * th * tw;
    let mut y = vec![0f32; s.b * s.co * ho * wo];
    if total == 0 || s.co == 0 {
        return y;
    }
    if s.ci == 0 {
        // No input channel: every output is its bias (and no GEMM runs over empty operands).
        for (p, plane) in y.chunks_mut(ho * wo).enumerate() {
            plane.fill(bias[p % s.co]);
        }
        return y;
    }
    let u = kernel_transform(w, s.co, s.ci);
    let block = (BLOCK_LIMIT / (16 * s.ci.max(s.co)))
        .max(MIN_BLOCK_TILES)
        .min(total);
    let mut v = vec![0f32; s.ci * 16 * block];
    let mut m = vec![0f32; s.co * 16 * block];
    let threads = candle_core::utils::get_num_threads();
    let mut t0 = 0;
    while t0 < total {
        let nt = block.min(total - t0);
        v.par_chunks_mut(16 * block)
            .enumerate()
            .for_each(|(c, dst)| input_transform(s, x, c, t0, nt, block, dst));
        for xi in 0..16 {
            // SAFETY: the destination is [co × nt] at M[o][ξ][t] = o·16·block + ξ·block + t,
            // largest index (co−1)·16·block + 15·block + nt − 1 < co·16·block = m.len(); the lhs
            // is U_ξ, [co × ci] at U[o][ξ][c] = o·16·ci + ξ·ci + c < co·16·ci = u.len(); the rhs is
            // [ci × nt] at V[c][ξ][t], largest index < ci·16·block = v.len(). Three allocations.
            unsafe {
                gemm::gemm(
                    s.co,
                    nt,
                    s.ci,
                    m.as_mut_ptr().add(xi * block),
                    1,
                    (16 * block) as isize,
                    false,
                    u.as_ptr().add(xi * s.ci),
                    1,
                    (16 * s.ci) as isize,
                    v.as_ptr().add(xi * block),
                    1,
                    (16 * block) as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                );
            }
        }
        let plane = ho * wo;
        y.par_chunks_mut(plane).enumerate().for_each(|(p, dst)| {
            let (img, o) = (p / s.co, p % s.co);
            let mo = &m[o * 16 * block..(o + 1) * 16 * block];
            output_transform(s, mo, bias[o], img, t0, nt, block, dst);
        });
        t0 += nt;
    }
    y
}

/// U = G g Gᵀ for every (co, ci), as [co][16][ci]: G = [[1, 0, 0], [½, ½, ½], [½, −½, ½],
/// [0, 0, 1]].
fn kernel_transform(w: &[f32], co: usize, ci: usize) -> Vec<f32> {
    let mut u = vec![0f32; co * 16 * ci];
    u.par_chunks_mut(16 * ci).enumerate().for_each(|(o, uo)| {
        for c in 0..ci {
            let g = &w[(o * ci + c) * 9..][..9];
            // t = G g (4×3), then t Gᵀ (4×4).
            let mut t = [[0f32; 3]; 4];
            for k in 0..3 {
                let (g0, g1, g2) = (g[k], g[3 + k], g[6 + k]);
                t[0][k] = g0;
                t[1][k] = 0.5 * (g0 + g1 + g2);
                t[2][k] = 0.5 * (g0 - g1 + g2);
                t[3][k] = g2;
            }
            for (r, row) in t.iter().enumerate() {
                let (a, b, cc) = (row[0], row[1], row[2]);
                uo[(r * 4) * ci + c] = a;
                uo[(r * 4 + 1) * ci + c] = 0.5 * (a + b + cc);
                uo[(r * 4 + 2) * ci + c] = 0.5 * (a - b + cc);
                uo[(r * 4 + 3) * ci + c] = cc;
            }
        }
    });
    u
}

/// Channel c's V = Bᵀ d B for tiles t0 .. t0 + nt into `dst` = V[c] ([16][block]), with
/// Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]].
fn input_transform(
    s: &Shape,
    x: &[f32],
    c: usize,
    t0: usize,
    nt: usize,
    block: usize,
    dst: &mut [f32],
) {
    let (th, tw) = (s.ho().div_ceil(2), s.wo().div_ceil(2));
    for i in 0..nt {
        let t = t0 + i;
        let (img, ty, tx) = (t / (th * tw), (t / tw) % th, t % tw);
        let plane = &x[(img * s.ci + c) * s.h * s.w..][..s.h * s.w];
        // The 4×4 patch at padded (2ty, 2tx), zero outside the input.
        let mut d = [[0f32; 4]; 4];
        for (r, row) in d.iter_mut().enumerate() {
            let Some(iy) = (2 * ty + r).checked_sub(s.pad.top).filter(|&iy| iy < s.h) else {
                continue;
            };
            for (q, val) in row.iter_mut().enumerate() {
                if let Some(ix) = (2 * tx + q).checked_sub(s.pad.left).filter(|&ix| ix < s.w) {
                    *val = plane[iy * s.w + ix];
                }
            }
        }
        let mut t4 = [[0f32; 4]; 4];
        for q in 0..4 {
            let (d0, d1, d2, d3) = (d[0][q], d[1][q], d[2][q], d[3][q]);
            t4[0][q] = d0 - d2;
            t4[1][q] = d1 + d2;
            t4[2][q] = d2 - d1;
            t4[3][q] = d1 - d3;
        }
        for (r, row) in t4.iter().enumerate() {
            let (a, b, cc, e) = (row[0], row[1], row[2], row[3]);
            dst[(r * 4) * block + i] = a - cc;
            dst[(r * 4 + 1) * block + i] = b + cc;
            dst[(r * 4 + 2) * block + i] = cc - b;
            dst[(r * 4 + 3) * block + i] = b - e;
        }
    }
}

/// Output channel o's 2×2 tiles of image `img` among t0 .. t0 + nt, Y = Aᵀ M A + bias with
/// Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]], into its plane `dst` (ho × wo; odd edges cropped).
#[allow(clippy::too_many_arguments)]
fn output_transform(
    s: &Shape,
    mo: &[f32],
    bias: f32,
    img: usize,
    t0: usize,
    nt: usize,
    block: usize,
    dst: &mut [f32],
) {
    let (ho, wo) = (s.ho(), s.wo());
    let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
    let per_image = th * tw;
    // The block's tiles that belong to this image.
    let first = t0.max(img * per_image);
    let last = (t0 + nt).min((img + 1) * per_image);
    for t in first..last {
        let i = t - t0;
        let (ty, tx) = ((t / tw) % th, t % tw);
        let mut r2 = [[0f32; 4]; 2];
        for q in 0..4 {
            let col = |r: usize| mo[(r * 4 + q) * block + i];
            let (m0, m1, m2, m3) = (col(0), col(1), col(2), col(3));
            r2[0][q] = m0 + m1 + m2;
            r2[1][q] = m1 - m2 - m3;
        }
        for (r, row) in r2.iter().enumerate() {
            let oy = 2 * ty + r;
            if oy >= ho {
                continue;
            }
            let out = [row[0] + row[1] + row[2], row[1] - row[2] - row[3]];
            for (q, v) in out.iter().enumerate() {
                let ox = 2 * tx + q;
                if ox < wo {
                    dst[oy * wo + ox] = v + bias;
                }
            }
        }
    }
}

//! 2-D convolution on the CPU in f32, by one of three paths that give the same values to
//! rounding (`Path::choose` picks by shape; each is tested against candle on the same cases):
//!
//! - **Winograd** F(2×2, 3×3) (`model::winograd`) for 3×3 stride-1 kernels with at least
//!   `WINOGRAD_MIN_TILES` 2×2 output tiles over the batch: 16 multiplications per output pair
//!   instead of 36.
//! - **Shifted taps** for other stride-1 kernels on maps of 32×32 and more (`conv2d_taps`): a
//!   band of zero-padded input rows is copied once, with the batch's images stacked as one tall
//!   image, and each kernel tap is one GEMM whose right-hand side is that band read at the tap's
//!   offset — tap (ky, kx) is the band shifted by ky rows and kx columns, so nothing is written
//!   k² times as im2col does. Outputs are computed at the padded width (and at the seams between
//!   images), and those few columns and rows are dropped. On 3×3 kernels at 64×64 it was 1.5×
//!   faster than im2col, on the VAE's 512 px level 2× (before Winograd took those); on small maps
//!   the waste and the k² calls per band cost more than im2col's copy.
//! - **im2col** in the kernel's own (c_in, ky, kx) order and one GEMM over every image of the
//!   batch, for everything else (strided kernels, small maps).
//!
//! candle's CPU convolution re-lays the kernel out as (ky, kx, c_in) on every call and runs one
//! GEMM per image; for the U-Net's wide, small-map convolutions (1280 channels at 8×8 or 4×4)
//! that copy and the second pass over the kernel cost more than the arithmetic. Here the
//! [c_out, c_in, kh, kw] kernel is already the left-hand [c_out, K] matrix, and the bias is the
//! GEMMs' initial destination (Winograd adds it in its output transform).

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::cpu_ops::{f32s, require_cpu_f32};
use super::winograd;
use crate::vocab::error::{Error, Result};
use crate::vocab::precision::Pad;

/// Most im2col values held at once (8 MB of f32: a phone decodes the VAE under a memory budget);
/// also what sizes the tap path's two band buffers (at least one output row each, so a single
/// row wider than this — 2M values — takes more).
const COL_LIMIT: usize = 2 << 20;

/// Fewest 2×2 output tiles (over the batch) that take the Winograd path.
const WINOGRAD_MIN_TILES: usize = 128;

/// Smallest output map (pixels per image) that takes the tap path.
const TAP_MIN_PIXELS: usize = 32 * 32;

/// y = conv(x, w) + bias with x [B, Ci, H, W], w [Co, Ci, KH, KW], bias [Co] (f32, CPU),
/// zero padding `pad` and `stride`; y is [B, Co, Ho, Wo].
pub fn conv2d(x: &Tensor, w: &Tensor, bias: &Tensor, pad: Pad, stride: usize) -> Result<Tensor> {
    conv2d_by(x, w, bias, pad, stride, None)
}

/// How a convolution is computed (all give the same values to rounding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Winograd F(2×2, 3×3): 3×3, stride 1, many tiles.
    Winograd,
    /// Shifted-tap GEMMs over row bands: stride 1, maps of 32×32 and more.
    Taps,
    /// im2col tiles and one GEMM: everything.
    Im2col,
}

impl Path {
    fn choose(g: &Geometry, b: usize) -> Self {
        if g.stride == 1 && g.kh == 3 && g.kw == 3 && winograd_pays(g, b) {
            Path::Winograd
        } else if g.stride == 1 && g.ho * g.wo >= TAP_MIN_PIXELS {
            Path::Taps
        } else {
            Path::Im2col
        }
    }

    fn applies(self, g: &Geometry) -> bool {
        match self {
            Path::Winograd => g.stride == 1 && g.kh == 3 && g.kw == 3,
            Path::Taps => g.stride == 1,
            Path::Im2col => true,
        }
    }
}

/// `conv2d` by the given path (tests), or the one `Path::choose` picks.
fn conv2d_by(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    pad: Pad,
    stride: usize,
    path: Option<Path>,
) -> Result<Tensor> {
    let (b, ci, h, wd) = x.dims4()?;
    let (co, ci_k, kh, kw) = w.dims4()?;
    let padded_h = h + pad.top + pad.bottom;
    let padded_w = wd + pad.left + pad.right;
    if ci_k != ci
        || bias.dims() != [co]
        || stride == 0
        || kh == 0
        || kw == 0
        || padded_h < kh
        || padded_w < kw
    {
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
    let path = path.unwrap_or_else(|| Path::choose(&g, b));
    if !path.applies(&g) {
        return Err(Error::InvalidArgument(format!(
            "{path:?} convolution with a {kh}x{kw} kernel at stride {stride}"
        )));
    }
    if b == 0 || co == 0 {
        // Nothing to compute (and the paths' band and tile arithmetic assumes an image).
        return Ok(Tensor::zeros(
            (b, co, g.ho, g.wo),
            DType::F32,
            &Device::Cpu,
        )?);
    }
    if ci == 0 {
        // No input channel: every output is its bias (no GEMM over an empty kernel).
        let bias = bias.reshape((1, co, 1, 1))?;
        return Ok(bias.broadcast_as((b, co, g.ho, g.wo))?.contiguous()?);
    }
    let (x, w, bias) = (x.contiguous()?, w.contiguous()?, bias.contiguous()?);
    let (xg, xl) = x.storage_and_layout();
    let (wg, wl) = w.storage_and_layout();
    let (bg, bl) = bias.storage_and_layout();
    let (xs, ws, bs) = (f32s(&xg, xl)?, f32s(&wg, wl)?, f32s(&bg, bl)?);
    let y = match path {
        Path::Winograd => {
            let shape = winograd::Shape {
                b,
                ci,
                h,
                w: wd,
                co,
                pad,
            };
            winograd::conv3x3(&shape, xs, ws, bs)
        }
        Path::Taps => conv2d_taps(xs, ws, bs, b, co, &g),
        Path::Im2col => conv2d_im2col(xs, ws, bs, b, co, &g),
    };
    drop((xg, wg, bg));
    if path == Path::Im2col && b > 1 {
        // im2col's output is [Co, B, Ho, Wo] (one GEMM over every image).
        let y = Tensor::from_vec(y, (co, b, g.ho, g.wo), &Device::Cpu)?;
        return Ok(y.transpose(0, 1)?.contiguous()?);
    }
    Ok(Tensor::from_vec(y, (b, co, g.ho, g.wo), &Device::Cpu)?)
}

/// The im2col path: see the module docs. Returns [Co, B, Ho, Wo].
fn conv2d_im2col(
    xs: &[f32],
    ws: &[f32],
    bs: &[f32],
    b: usize,
    co: usize,
    g: &Geometry,
) -> Vec<f32> {
    let ci = g.ci;
    let (kh, kw) = (g.kh, g.kw);
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
    out
}

/// Whether Winograd's F(2×2, 3×3) beats the other paths for this 3×3 stride-1 convolution:
/// enough tiles for its 16 GEMMs to be wide enough (measured on SD1.5's U-Net: faster from its
/// 16×16 maps of 1280 channels, 128 tiles at CFG batch 2, up; slower at 8×8).
fn winograd_pays(g: &Geometry, b: usize) -> bool {
    let tiles = b * g.ho.div_ceil(2) * g.wo.div_ceil(2);
    tiles >= WINOGRAD_MIN_TILES
}

/// The tap path (stride 1): see the module docs. Returns [B, Co, Ho, Wo].
fn conv2d_taps(xs: &[f32], ws: &[f32], bs: &[f32], b: usize, co: usize, g: &Geometry) -> Vec<f32> {
    let band = Band::new(g, b, co);
    let (ci, taps) = (g.ci, g.kh * g.kw);
    let mut input = vec![0f32; ci * band.chan];
    let mut acc = vec![0f32; co * band.rows * band.pitch];
    let mut y = vec![0f32; b * co * g.ho * g.wo];
    let threads = candle_core::utils::get_num_threads();
    let mut v0 = 0;
    while v0 < band.total {
        let r = band.rows.min(band.total - v0);
        input
            .par_chunks_mut(band.chan)
            .enumerate()
            .for_each(|(c, dst)| band.fill(g, xs, c, v0, r, dst));
        let n = r * band.pitch;
        for (row, &v) in acc.chunks_mut(band.rows * band.pitch).zip(bs) {
            row[..n].fill(v);
        }
        for tap in 0..taps {
            let offset = (tap / g.kw) * band.pitch + tap % g.kw;
            // SAFETY: the destination is [co × n] with row stride rows·pitch ≥ n inside `acc`
            // (co·rows·pitch values). The lhs is w[:, :, ky, kx] as [co × ci]: element
            // (o, c) at o·ci·taps + c·taps + tap < co·ci·taps = ws.len(). The rhs is [ci × n]
            // with element (c, j) at c·chan + offset + j; its largest index is
            // (ci−1)·chan + (kh−1)·pitch + kw−1 + r·pitch − 1 < ci·chan, since chan =
            // (rows + kh − 1)·pitch + kw − 1 and r ≤ rows. Three allocations: no aliasing.
            unsafe {
                gemm::gemm(
                    co,
                    n,
                    ci,
                    acc.as_mut_ptr(),
                    1,
                    (band.rows * band.pitch) as isize,
                    true,
                    ws.as_ptr().add(tap),
                    taps as isize,
                    (ci * taps) as isize,
                    input.as_ptr().add(offset),
                    1,
                    band.chan as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                );
            }
        }
        band.crop(g, &acc, v0, r, &mut y);
        v0 += r;
    }
    y
}

/// The tap path's bands: the batch as one tall zero-padded image of b·hp rows of `pitch`
/// values; output ("virtual") row v reads padded rows v..v+kh and is image v / hp's row
/// v % hp when that is < ho (the rest straddle two images and are dropped).
struct Band {
    /// Padded row length: w + left + right.
    pitch: usize,
    /// Padded rows per image: h + top + bottom.
    hp: usize,
    /// Virtual output rows: b·hp − (kh − 1).
    total: usize,
    /// Output rows per band.
    rows: usize,
    /// One channel's span in the input band: its rows plus the halo, and kw − 1 values of
    /// slack for the last tap's shift.
    chan: usize,
}

impl Band {
    fn new(g: &Geometry, b: usize, co: usize) -> Self {
        let pitch = g.w + g.pad.left + g.pad.right;
        let hp = g.h + g.pad.top + g.pad.bottom;
        let total = b * hp - (g.kh - 1);
        let by_input = (COL_LIMIT / (g.ci * pitch).max(1)).saturating_sub(g.kh - 1);
        let by_output = COL_LIMIT / (co * pitch).max(1);
        let rows = by_input.min(by_output).clamp(1, total);
        let chan = (rows + g.kh - 1) * pitch + g.kw - 1;
        Band {
            pitch,
            hp,
            total,
            rows,
            chan,
        }
    }

    /// Channel `c`'s padded rows v0 .. v0 + r + kh − 1 into `dst` (its `chan` values).
    fn fill(&self, g: &Geometry, x: &[f32], c: usize, v0: usize, r: usize, dst: &mut [f32]) {
        let span = r + g.kh - 1;
        for (i, line) in dst.chunks_exact_mut(self.pitch).take(span).enumerate() {
            let (img, pr) = ((v0 + i) / self.hp, (v0 + i) % self.hp);
            match pr.checked_sub(g.pad.top).filter(|&iy| iy < g.h) {
                None => line.fill(0.0),
                Some(iy) => {
                    let src = &x[((img * g.ci + c) * g.h + iy) * g.w..][..g.w];
                    line[..g.pad.left].fill(0.0);
                    line[g.pad.left..g.pad.left + g.w].copy_from_slice(src);
                    line[g.pad.left + g.w..].fill(0.0);
                }
            }
        }
        dst[span * self.pitch..].fill(0.0);
    }

    /// The band's valid outputs (the first wo columns of rows that belong to an image) into y.
    fn crop(&self, g: &Geometry, acc: &[f32], v0: usize, r: usize, y: &mut [f32]) {
        let plane = g.ho * g.wo;
        let co = acc.len() / (self.rows * self.pitch);
        // y as [b·co] planes; each plane gathers its rows from channel o's band rows.
        y.par_chunks_mut(plane).enumerate().for_each(|(p, dst)| {
            let (img, o) = (p / co, p % co);
            let src = &acc[o * self.rows * self.pitch..];
            for i in 0..r {
                let (vi, oy) = ((v0 + i) / self.hp, (v0 + i) % self.hp);
                if vi == img && oy < g.ho {
                    dst[oy * g.wo..(oy + 1) * g.wo]
                        .copy_from_slice(&src[i * self.pitch..i * self.pitch + g.wo]);
                }
            }
        });
    }
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

    /// Every path that applies, on small maps with odd sizes, strides, asymmetric padding.
    #[test]
    fn every_path_matches_candle_over_kernels_strides_and_padding() {
        let cases = [
            // (b, ci, h, w, co, k, pad, stride)
            (2, 5, 7, 9, 6, 3, pad(1, 1, 1, 1), 1),
            (1, 3, 8, 8, 4, 3, pad(0, 1, 0, 1), 2),
            (2, 4, 6, 5, 3, 1, pad(0, 0, 0, 0), 1),
            (3, 2, 5, 6, 2, 3, pad(2, 0, 1, 1), 1), // a strip's halo: asymmetric
            (2, 16, 4, 4, 8, 3, pad(1, 1, 1, 1), 1),
            (1, 3, 3, 3, 2, 3, pad(0, 0, 0, 0), 1), // one output: a tile cropped to 1×1
            (2, 7, 9, 8, 5, 3, pad(0, 1, 1, 0), 1), // odd output height: cropped tiles
        ];
        let mut runs = 0;
        for (i, (b, ci, h, w, co, k, p, s)) in cases.into_iter().enumerate() {
            let x = randn(&[b, ci, h, w], 1 + i as u64);
            let wt = randn(&[co, ci, k, k], 100 + i as u64);
            let bias = randn(&[co], 200 + i as u64);
            let want = reference(&x, &wt, &bias, p, s);
            for path in [
                None,
                Some(Path::Winograd),
                Some(Path::Taps),
                Some(Path::Im2col),
            ] {
                let got = conv2d_by(&x, &wt, &bias, p, s, path);
                let applies = path.is_none_or(|path| {
                    (path != Path::Winograd || k == 3) && (path == Path::Im2col || s == 1)
                });
                let Ok(got) = got else {
                    assert!(!applies, "case {i} {path:?} refused");
                    continue;
                };
                assert!(applies, "case {i} {path:?} ran where it does not apply");
                assert_eq!(got.dims(), want.dims(), "case {i} {path:?}");
                let err = max_error(got, want.clone());
                assert!(err < 1e-5, "case {i} {path:?}: max error {err}");
                runs += 1;
            }
        }
        // Four runs of each stride-1 3×3 case, two of the stride-2 one, three of the 1×1 one.
        assert_eq!(runs, 5 * 4 + 2 + 3, "a path skipped a case");
    }

    #[test]
    fn paths_are_chosen_by_shape() {
        let geometry = |ci, h, k, stride| Geometry {
            ci,
            h,
            w: h,
            kh: k,
            kw: k,
            pad: pad(k / 2, k / 2, k / 2, k / 2),
            stride,
            ho: h / stride,
            wo: h / stride,
        };
        // SD1.5's U-Net at 512 px: 64×64 and 32×32 maps, and 16×16 of 1280 channels.
        assert_eq!(Path::choose(&geometry(320, 64, 3, 1), 2), Path::Winograd);
        assert_eq!(Path::choose(&geometry(1920, 32, 3, 1), 2), Path::Winograd);
        assert_eq!(Path::choose(&geometry(1280, 16, 3, 1), 2), Path::Winograd);
        assert_eq!(Path::choose(&geometry(1280, 8, 3, 1), 2), Path::Im2col);
        assert_eq!(Path::choose(&geometry(320, 64, 1, 1), 2), Path::Taps);
        assert_eq!(Path::choose(&geometry(320, 64, 3, 2), 2), Path::Im2col);
    }

    #[test]
    fn winograd_matches_candle_on_a_large_map_across_tile_blocks() {
        // 2 × 20 × 20 = 800 tiles; 200 input channels bound a block at 655 of them, so the
        // second block holds the rest of image 1 and the first straddles both images.
        let (b, ci, h, co) = (2, 200, 40, 8);
        let block = winograd::BLOCK_LIMIT / (16 * ci);
        assert!((400..800).contains(&block) && block >= winograd::MIN_BLOCK_TILES);
        let x = randn(&[b, ci, h, h], 31);
        let wt = randn(&[co, ci, 3, 3], 32);
        let bias = randn(&[co], 33);
        let got = conv2d_by(&x, &wt, &bias, pad(1, 1, 1, 1), 1, Some(Path::Winograd)).expect("w");
        let want = reference(&x, &wt, &bias, pad(1, 1, 1, 1), 1);
        let err = max_error(got, want);
        assert!(err < 1e-4, "max error {err}");
    }

    fn max_error(got: Tensor, want: Tensor) -> f32 {
        (got - want)
            .and_then(|e| e.abs())
            .and_then(|e| e.max_all())
            .and_then(|e| e.to_scalar::<f32>())
            .expect("err")
    }

    #[test]
    fn im2col_tiles_give_the_same_values_as_one_pass() {
        // Stride 2 keeps the im2col path; K·N above its limit forces several column tiles.
        let x = randn(&[2, 64, 96, 96], 7);
        let wt = randn(&[4, 64, 3, 3], 8);
        let bias = randn(&[4], 9);
        let got = conv2d(&x, &wt, &bias, pad(1, 1, 1, 1), 2).expect("conv");
        let want = reference(&x, &wt, &bias, pad(1, 1, 1, 1), 2);
        let err = max_error(got, want);
        assert!(
            2 * 48 * 48 * 64 * 9 > COL_LIMIT && err < 1e-4,
            "max error {err}"
        );
    }

    #[test]
    fn tap_path_matches_candle_across_bands_seams_and_padding() {
        let cases = [
            // (b, ci, h, w, co, kh, kw, pad): every map ≥ TAP_MIN_PIXELS, stride 1.
            (2, 5, 32, 33, 6, 3, 3, pad(1, 1, 1, 1)),
            (3, 4, 34, 32, 3, 3, 3, pad(2, 0, 1, 1)), // a strip's halo: asymmetric
            (1, 6, 40, 36, 5, 1, 1, pad(0, 0, 0, 0)),
            (2, 3, 36, 35, 4, 3, 2, pad(0, 1, 0, 0)),
            // Several bands: 256 channels × 66 values per padded row leave 122 rows a band
            // of the 130 the two stacked images need.
            (2, 256, 64, 64, 4, 3, 3, pad(1, 1, 1, 1)),
        ];
        for (i, (b, ci, h, w, co, kh, kw, p)) in cases.into_iter().enumerate() {
            let x = randn(&[b, ci, h, w], 11 + i as u64);
            let wt = randn(&[co, ci, kh, kw], 110 + i as u64);
            let bias = randn(&[co], 210 + i as u64);
            let got = conv2d_by(&x, &wt, &bias, p, 1, Some(Path::Taps)).expect("conv");
            let want = reference(&x, &wt, &bias, p, 1);
            assert_eq!(got.dims(), want.dims(), "case {i}");
            let err = max_error(got, want);
            assert!(err < 1e-4, "case {i}: max error {err}");
        }
        let g = Geometry {
            ci: 256,
            h: 64,
            w: 64,
            kh: 3,
            kw: 3,
            pad: pad(1, 1, 1, 1),
            stride: 1,
            ho: 64,
            wo: 64,
        };
        let band = Band::new(&g, 2, 4);
        assert!(band.rows < band.total, "the last case fits one band");
    }

    #[test]
    fn an_empty_batch_or_no_output_channel_is_an_empty_result_on_every_path() {
        for path in [
            None,
            Some(Path::Winograd),
            Some(Path::Taps),
            Some(Path::Im2col),
        ] {
            for (b, ci, co) in [(0, 3, 4), (2, 3, 0), (2, 0, 4)] {
                let x = randn(&[b, ci, 40, 40], 1);
                let bias = randn(&[co], 3);
                let w = randn(&[co, ci, 3, 3], 2);
                let y = conv2d_by(&x, &w, &bias, pad(1, 1, 1, 1), 1, path).expect("empty conv");
                assert_eq!(y.dims(), [b, co, 40, 40], "{path:?}");
                if ci == 0 {
                    // Over no input channel, each output is its bias.
                    let v = y.get(1).and_then(|y| y.get(3)).and_then(|y| y.get(39));
                    let v = v.and_then(|y| y.get(39)).and_then(|v| v.to_scalar::<f32>());
                    let want = bias.get(3).and_then(|v| v.to_scalar::<f32>());
                    assert_eq!(v.expect("y"), want.expect("bias"), "{path:?}");
                }
            }
        }
    }

    #[test]
    fn refuses_mismatched_shapes() {
        let x = randn(&[1, 3, 4, 4], 1);
        let b = randn(&[2], 2);
        assert!(conv2d(&x, &randn(&[2, 4, 3, 3], 3), &b, pad(1, 1, 1, 1), 1).is_err());
        assert!(conv2d(&x, &randn(&[2, 3, 3, 3], 3), &b, pad(0, 0, 0, 0), 0).is_err());
        assert!(conv2d(&x, &randn(&[2, 3, 5, 5], 3), &b, pad(0, 0, 0, 0), 1).is_err());
        let empty_kernel = Tensor::zeros((2, 3, 0, 0), DType::F32, &Device::Cpu).expect("w");
        let big = randn(&[1, 3, 40, 40], 1);
        assert!(conv2d(&big, &empty_kernel, &b, pad(0, 0, 0, 0), 1).is_err());
    }
}

//! A cheap preview of a generation in progress: `LatentPreview`, a linear map from the latent
//! channels to RGB, fitted by least squares to the model's own VAE decoder, and the
//! `PreviewImage` it renders. The SDK's progress callback can then show a small image every few
//! steps without running the decoder: one multiply-add per channel per latent pixel, on the
//! phone, from the latents the denoise loop holds (`Progress::latents`, the scaled latent space).

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::vae::Vae;
use crate::vocab::error::{Error, Result};

/// Side of the square latents the fit decodes (a 96x96 image for an 8x VAE).
const FIT_SIZE: usize = 12;
/// Latent samples the fit decodes, in one batch.
const FIT_SAMPLES: usize = 2;
const FIT_SEED: u64 = 0x05EE_DF17;
/// Ridge on the weights (not the bias), relative to the number of equations.
const RIDGE: f64 = 1e-6;

/// A linear map from the latent channels to RGB in [0, 1], applied per latent pixel.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentPreview {
    /// Per output channel (r, g, b): one weight per latent channel, then the bias.
    rows: [Vec<f32>; 3],
}

/// An 8-bit RGB preview, row-major, the size of the latents (1/f of the image's side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewImage {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl PreviewImage {
    /// The preview as PNG bytes.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let buf = image::RgbImage::from_raw(self.width, self.height, self.rgb.clone())
            .ok_or_else(|| Error::InvalidArgument("preview buffer size mismatch".into()))?;
        let mut out = Vec::new();
        buf.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .map_err(|e| Error::InvalidArgument(format!("PNG encoding: {e}")))?;
        Ok(out)
    }
}

impl LatentPreview {
    /// Fits the map to `vae`'s decoder: decodes a few seeded, spatially smooth latents, pools
    /// each decoded image over every latent pixel's block, and solves the least squares.
    pub fn fit(vae: &Vae, device: &Device) -> Result<Self> {
        let c = vae.config.latent_channels;
        let latents = smooth_latents(FIT_SEED, FIT_SAMPLES, c, FIT_SIZE, device)?;
        Self::fit_to(vae, &latents)
    }

    fn fit_to(vae: &Vae, latents: &Tensor) -> Result<Self> {
        let (samples, c, h, w) = latents.dims4()?;
        let target = pooled_decode(vae, latents)?;
        if target.dims() != [samples, 3, h, w] {
            return Err(Error::Unsupported(format!(
                "latent preview of a VAE decoding {:?} from {:?}, not RGB at 1/f",
                target.dims(),
                latents.dims()
            )));
        }
        let x = latents.flatten_all()?.to_vec1::<f32>()?;
        let y = target.flatten_all()?.to_vec1::<f32>()?;
        let hw = h * w;
        // Normal equations [A | B] with x̃ = [x; 1]: A = Σ x̃x̃ᵀ, B = Σ x̃yᵀ (r, g, b at once).
        let mut m = vec![vec![0f64; c + 4]; c + 1];
        for s in 0..samples {
            for p in 0..hw {
                let at = |v: &[f32], ch: usize, chs: usize| f64::from(v[(s * chs + ch) * hw + p]);
                let feat: Vec<f64> = (0..c).map(|ch| at(&x, ch, c)).chain([1.0]).collect();
                let rgb = (0..3).map(|k| at(&y, k, 3));
                let row_of: Vec<f64> = feat.iter().copied().chain(rgb).collect();
                for (fi, row) in feat.iter().zip(&mut m) {
                    for (v, r) in row_of.iter().zip(row.iter_mut()) {
                        *r += fi * v;
                    }
                }
            }
        }
        let ridge = RIDGE * (samples * hw) as f64;
        for (i, row) in m.iter_mut().enumerate().take(c) {
            row[i] += ridge;
        }
        let sol = solve(m)?;
        let rows = [0, 1, 2].map(|k| sol.iter().map(|r| r[k] as f32).collect());
        Ok(Self { rows })
    }

    /// The latent channels this map reads.
    pub fn channels(&self) -> usize {
        self.rows[0].len().saturating_sub(1)
    }

    /// Renders latents [B, C, h, w] (the first sample; scaled, as the denoise loop holds
    /// them) as an h×w RGB preview.
    pub fn render(&self, latents: &Tensor) -> Result<PreviewImage> {
        let c = self.channels();
        let (h, w) = match latents.dims() {
            [b, ch, h, w] if *b > 0 && *ch == c && *h > 0 && *w > 0 => (*h, *w),
            d => {
                return Err(Error::InvalidArgument(format!(
                    "preview latents must be [B, {c}, h, w] with B, h, w > 0, got {d:?}"
                )))
            }
        };
        let (Ok(width), Ok(height)) = (u32::try_from(w), u32::try_from(h)) else {
            return Err(Error::InvalidArgument(format!(
                "preview of {w}x{h} is too large"
            )));
        };
        let x = latents
            .get(0)?
            .to_dtype(DType::F32)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let hw = h * w;
        let mut rgb = Vec::with_capacity(3 * hw);
        for p in 0..hw {
            for row in &self.rows {
                let v = (0..c).fold(row[c], |acc, ch| acc + row[ch] * x[ch * hw + p]);
                // `as` saturates (NaN to 0), so no latent value can panic here.
                rgb.push((v * 255.0).round().clamp(0.0, 255.0) as u8);
            }
        }
        Ok(PreviewImage { width, height, rgb })
    }
}

/// Decodes scaled latents [B, C, h, w] as `StableDiffusion::decode` does (unscale, shift,
/// decode, map to [0, 1] and clamp), then averages each f×f block: [B, 3, h, w].
fn pooled_decode(vae: &Vae, latents: &Tensor) -> Result<Tensor> {
    let z = (latents / vae.config.scaling_factor)?;
    let z = match vae.config.shift_factor {
        Some(s) => (z + s)?,
        None => z,
    };
    let x = vae.decode(&z)?.to_dtype(DType::F32)?;
    let x = ((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let f = vae.config.downsample_factor();
    Ok(x.avg_pool2d(f)?.to_device(&Device::Cpu)?)
}

/// Seeded latents [n, c, size, size] like real scaled ones: smooth (a coarse normal grid,
/// bilinearly upsampled) and of unit RMS per channel.
fn smooth_latents(seed: u64, n: usize, c: usize, size: usize, device: &Device) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n * c * size * size);
    for s in 0..n {
        // Broad and local structure alternate: grid cells of 8, 3, 5 and 2 latent pixels.
        let g = (size / [8, 3, 5, 2][s % 4] + 1).clamp(2, size.max(2));
        for _ in 0..c {
            let grid: Vec<f32> = (0..g * g).map(|_| normal(&mut rng)).collect();
            let plane = bilinear(&grid, g, size);
            let rms = (plane.iter().map(|v| v * v).sum::<f32>() / plane.len() as f32).sqrt();
            out.extend(plane.iter().map(|v| v / rms.max(1e-6)));
        }
    }
    Ok(Tensor::from_vec(out, (n, c, size, size), device)?)
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// A g×g grid (g ≥ 2) bilinearly resampled to size×size, corners on corners.
fn bilinear(grid: &[f32], g: usize, size: usize) -> Vec<f32> {
    let coord = |i: usize| {
        let u = i as f32 * (g - 1) as f32 / (size.max(2) - 1) as f32;
        let i0 = (u.floor() as usize).min(g - 2);
        (i0, u - i0 as f32)
    };
    let mut out = Vec::with_capacity(size * size);
    for r in 0..size {
        let (y0, ty) = coord(r);
        for col in 0..size {
            let (x0, tx) = coord(col);
            let at = |y: usize, x: usize| grid[y * g + x];
            let top = at(y0, x0) * (1.0 - tx) + at(y0, x0 + 1) * tx;
            let bottom = at(y0 + 1, x0) * (1.0 - tx) + at(y0 + 1, x0 + 1) * tx;
            out.push(top * (1.0 - ty) + bottom * ty);
        }
    }
    out
}

/// Solves the augmented system [A | B] (n rows) by Gaussian elimination with partial pivoting.
fn solve(mut m: Vec<Vec<f64>>) -> Result<Vec<Vec<f64>>> {
    let n = m.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))
            .unwrap_or(col);
        let p = m[pivot][col].abs();
        if p.is_nan() || p <= 1e-12 {
            return Err(Error::Internal(
                "latent preview fit: singular normal equations".into(),
            ));
        }
        m.swap(col, pivot);
        for r in col + 1..n {
            let k = m[r][col] / m[col][col];
            for j in col..m[r].len() {
                m[r][j] -= k * m[col][j];
            }
        }
    }
    let rhs = m.first().map_or(0, |r| r.len().saturating_sub(n));
    let mut sol = vec![vec![0f64; rhs]; n];
    for i in (0..n).rev() {
        for k in 0..rhs {
            let s: f64 = (i + 1..n).map(|j| m[i][j] * sol[j][k]).sum();
            sol[i][k] = (m[i][n + k] - s) / m[i][i];
        }
    }
    Ok(sol)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Instant;

    /// Measured on tiny-shapes (4 held-out 24x24 latents): preview 16.85 dB, the image's own
    /// mean colour 14.38 dB, grey 13.10 dB; the margin leaves ~1 dB of slack.
    const MARGIN_DB: f64 = 1.5;

    fn tiny_shapes_vae() -> Result<Vae> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-shapes/vae");
        Vae::load_decoder(&dir, &Device::Cpu)
    }

    /// PSNRs (dB) against one sample's pooled decode of: the preview, the image's own mean
    /// colour, mid-grey.
    fn sample_psnrs(vae: &Vae, preview: &LatentPreview, latents: &Tensor) -> Result<[f64; 3]> {
        // Target as [h, w, 3], the preview's layout.
        let target = pooled_decode(vae, latents)?.get(0)?.permute((1, 2, 0))?;
        let target = target.flatten_all()?.to_vec1::<f32>()?;
        let rgb = preview.render(latents)?.rgb;
        let mut mean = [0f32; 3];
        for (i, v) in target.iter().enumerate() {
            mean[i % 3] += v * 3.0 / target.len() as f32;
        }
        let psnr = |f: &dyn Fn(usize) -> f32| {
            let se = target
                .iter()
                .enumerate()
                .map(|(i, t)| f64::from(f(i) - t).powi(2));
            10.0 * (target.len() as f64 / se.sum::<f64>().max(1e-12)).log10()
        };
        let got = |i: usize| f32::from(rgb[i]) / 255.0;
        Ok([psnr(&got), psnr(&|i| mean[i % 3]), psnr(&|_| 0.5)])
    }

    #[test]
    fn preview_approximates_the_pooled_decode() -> Result<()> {
        let vae = tiny_shapes_vae()?;
        let start = Instant::now();
        let preview = LatentPreview::fit(&vae, &Device::Cpu)?;
        let fit_ms = start.elapsed().as_secs_f64() * 1e3;
        assert_eq!(preview.channels(), vae.config.latent_channels);
        // Held-out latents: another seed, another size than the fit's.
        let (n, c) = (4, preview.channels());
        let latents = smooth_latents(FIT_SEED ^ 0xD1FF, n, c, 24, &Device::Cpu)?;
        let mut avg = [0f64; 3];
        for i in 0..n {
            let p = sample_psnrs(&vae, &preview, &latents.narrow(0, i, 1)?)?;
            println!("sample {i}: PSNR preview / mean colour / grey {p:.2?} dB");
            for (a, v) in avg.iter_mut().zip(p) {
                *a += v / n as f64;
            }
        }
        let [p, p_mean, p_grey] = avg;
        println!("fit {fit_ms:.0} ms; mean PSNR {p:.2} / {p_mean:.2} / {p_grey:.2} dB");
        assert!(p > p_grey + MARGIN_DB && p > p_mean + MARGIN_DB);
        Ok(())
    }

    #[test]
    fn render_is_latent_sized_and_encodes() -> Result<()> {
        let preview = LatentPreview::fit(&tiny_shapes_vae()?, &Device::Cpu)?;
        let latents = smooth_latents(7, 2, preview.channels(), 10, &Device::Cpu)?;
        let latents = latents.narrow(3, 0, 7)?; // 10 high, 7 wide
        let img = preview.render(&latents)?;
        assert_eq!((img.width, img.height, img.rgb.len()), (7, 10, 3 * 7 * 10));
        let png = image::load_from_memory(&img.to_png()?)
            .map_err(|e| Error::InvalidArgument(format!("PNG decoding: {e}")))?;
        assert_eq!((png.width(), png.height()), (7, 10));
        Ok(())
    }

    #[test]
    fn odd_shapes_are_errors() -> Result<()> {
        let preview = LatentPreview {
            rows: [vec![0.1, 0.0, 0.0, 0.0, 0.5], vec![0.0; 5], vec![0.0; 5]],
        };
        let dev = Device::Cpu;
        for shape in [&[4, 8, 8][..], &[0, 4, 8, 8], &[1, 3, 8, 8], &[1, 4, 0, 8]] {
            let t = Tensor::zeros(shape, DType::F32, &dev)?;
            assert!(matches!(preview.render(&t), Err(Error::InvalidArgument(_))));
        }
        let bad = PreviewImage {
            width: 2,
            height: 2,
            rgb: vec![0; 5],
        };
        assert!(bad.to_png().is_err());
        Ok(())
    }
}

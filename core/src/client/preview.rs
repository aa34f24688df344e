//! A cheap preview of a generation in progress: `LatentPreview`, a linear map from the latent
//! channels to RGB, and the `PreviewImage` it renders. The SDK's progress callback can then show
//! a small image every few steps without running the decoder: one multiply-add per channel per
//! latent pixel, on the phone, from the latents the denoise loop holds (`Progress::latents`, the
//! scaled latent space).
//!
//! The map is fitted by least squares (`client::preview_fit`): offline on real latents, the VAE
//! encoder's of pictures (`veil preview-fit`, stored with the model as `vae/latent_preview.json`:
//! `save`, `load`), else at the first preview on the decodes of seeded random latents.
//! `load_or_fit` takes the file when the model folder has a valid one, else fits.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::model::vae::Vae;
use crate::vocab::error::{Error, Result};

/// Where a model folder keeps its fitted preview (`veil preview-fit`), relative to the folder.
pub const PREVIEW_FILE: &str = "vae/latent_preview.json";
/// The format tag of that file.
pub const PREVIEW_FORMAT: &str = "veil-latent-preview/1";

/// A linear map from the latent channels to RGB in [0, 1], applied per latent pixel.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentPreview {
    /// Per output channel (r, g, b): one weight per latent channel, then the bias.
    rows: [Vec<f32>; 3],
    /// What the map was fitted on, in words (the file's `fitted_on`).
    fitted_on: String,
}

/// `vae/latent_preview.json`, as read.
#[derive(Deserialize)]
struct PreviewFile {
    format: String,
    channels: usize,
    /// [r, g, b], each: C weights, then the bias.
    rows: Vec<Vec<f32>>,
    #[serde(default)]
    fitted_on: String,
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
        crate::client::options::rgb8_to_png(self.width, self.height, self.rgb.clone())
    }
}

impl LatentPreview {
    /// A map from its rows (r, g, b: C weights, then the bias; finite, of one length ≥ 2).
    pub(crate) fn from_rows(rows: [Vec<f32>; 3], fitted_on: String) -> Self {
        Self { rows, fitted_on }
    }

    /// The latent channels this map reads.
    pub fn channels(&self) -> usize {
        self.rows[0].len().saturating_sub(1)
    }

    /// What the map was fitted on, in words.
    pub fn fitted_on(&self) -> &str {
        &self.fitted_on
    }

    /// The same map, described as fitted on `what`.
    pub fn with_fitted_on(mut self, what: impl Into<String>) -> Self {
        self.fitted_on = what.into();
        self
    }

    /// The folder's `vae/latent_preview.json` when it has a valid one for `vae`'s channels,
    /// else the fit to `vae`'s decoder on random latents (`fit`; a file that is present but
    /// invalid is logged and passed over).
    pub fn load_or_fit(model_dir: &Path, vae: &Vae, device: &Device) -> Result<Self> {
        let path = model_dir.join(PREVIEW_FILE);
        if path.is_file() {
            match Self::load(&path, vae.config.latent_channels) {
                Ok(p) => {
                    tracing::debug!(
                        "latent preview from {} (fitted on {})",
                        path.display(),
                        p.fitted_on
                    );
                    return Ok(p);
                }
                Err(e) => tracing::warn!("{e}; fitting the latent preview to random latents"),
            }
        } else {
            tracing::debug!(
                "no {}: fitting the latent preview to random latents",
                path.display()
            );
        }
        Self::fit(vae, device)
    }

    /// Writes the map as JSON (`PREVIEW_FORMAT`), through a temporary file and a rename.
    pub fn save(&self, path: &Path) -> Result<()> {
        if self.rows.iter().flatten().any(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(
                "latent preview with a non-finite weight".into(),
            ));
        }
        // Pretty, one row a line.
        let json = |e: serde_json::Error| Error::Internal(format!("latent preview JSON: {e}"));
        let rows = self
            .rows
            .iter()
            .map(|r| Ok(format!("    {}", serde_json::to_string(r).map_err(json)?)))
            .collect::<Result<Vec<_>>>()?;
        let text = format!(
            "{{\n  \"format\": {},\n  \"channels\": {},\n  \"rows\": [\n{}\n  ],\n  \"fitted_on\": {}\n}}",
            serde_json::to_string(PREVIEW_FORMAT).map_err(json)?,
            self.channels(),
            rows.join(",\n"),
            serde_json::to_string(&self.fitted_on).map_err(json)?
        );
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n").map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads a map `save` wrote, for a VAE of `channels` latent channels. A file of another
    /// format, channel count or shape, or with a number that is not finite, is an
    /// `Error::Config` naming the file.
    pub fn load(path: &Path, channels: usize) -> Result<Self> {
        let bad = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::MissingFile {
                path: path.to_path_buf(),
                what: "latent preview (`veil preview-fit` writes it)".into(),
            },
            _ => Error::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let f: PreviewFile =
            serde_json::from_str(&text).map_err(|e| bad(format!("latent preview: {e}")))?;
        if f.format != PREVIEW_FORMAT {
            return Err(bad(format!(
                "latent preview format {:?}, this build reads {PREVIEW_FORMAT:?}",
                f.format
            )));
        }
        if f.channels != channels || channels == 0 {
            return Err(bad(format!(
                "latent preview of {} latent channels, the VAE has {channels}",
                f.channels
            )));
        }
        if f.rows.len() != 3 || f.rows.iter().any(|r| r.len() != channels + 1) {
            return Err(bad(format!(
                "latent preview rows must be 3 of {channels} weights and a bias"
            )));
        }
        if f.rows.iter().flatten().any(|v| !v.is_finite()) {
            return Err(bad("latent preview with a non-finite number".into()));
        }
        let rows: [Vec<f32>; 3] = f
            .rows
            .try_into()
            .map_err(|_| bad("latent preview rows must be 3 (r, g, b)".into()))?;
        Ok(Self::from_rows(rows, f.fitted_on))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tiny_shapes() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-shapes")
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("veil-preview-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn example() -> LatentPreview {
        LatentPreview::from_rows(
            [
                vec![0.1, -0.25, 0.0, 1e-7, 0.5],
                vec![-0.3, 0.0, 0.125, 0.2, 0.25],
                vec![0.0, 0.4, -0.05, 0.0, 0.75],
            ],
            "a test".into(),
        )
    }

    fn is_config_error(r: Result<LatentPreview>) -> bool {
        matches!(r, Err(Error::Config { .. }))
    }

    #[test]
    fn save_load_round_trips_and_bad_files_are_typed_errors() -> Result<()> {
        let dir = scratch("file");
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let path = dir.join("latent_preview.json");
        let p = example();
        p.save(&path)?;
        assert_eq!(LatentPreview::load(&path, 4)?, p);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        assert!(text.contains(PREVIEW_FORMAT) && text.contains("\"fitted_on\": \"a test\""));
        // The VAE has another channel count.
        assert!(is_config_error(LatentPreview::load(&path, 3)));
        assert!(matches!(
            LatentPreview::load(&dir.join("absent.json"), 4),
            Err(Error::MissingFile { .. })
        ));
        let row = "[0.1, 0.2, 0.3, 0.4, 0.5]";
        let file = |format: &str, channels: usize, rows: &str| {
            format!(
                r#"{{"format": "{format}", "channels": {channels}, "rows": {rows}, "fitted_on": "x"}}"#
            )
        };
        let bad = [
            file(
                "veil-latent-preview/2",
                4,
                &format!("[{row}, {row}, {row}]"),
            ),
            file(PREVIEW_FORMAT, 3, &format!("[{row}, {row}, {row}]")),
            file(PREVIEW_FORMAT, 4, &format!("[{row}, {row}]")),
            file(PREVIEW_FORMAT, 4, &format!("[{row}, {row}, [0.1, 0.2]]")),
            // JSON has no NaN: a parse error; 1e39 overflows f32 to infinity.
            file(
                PREVIEW_FORMAT,
                4,
                &format!("[{row}, {row}, [NaN, 0, 0, 0, 0]]"),
            ),
            file(
                PREVIEW_FORMAT,
                4,
                &format!("[{row}, {row}, [1e39, 0, 0, 0, 0]]"),
            ),
            file(
                PREVIEW_FORMAT,
                4,
                &format!("[{row}, {row}, [null, 0, 0, 0, 0]]"),
            ),
            "{\"format\": \"veil-latent-preview/1\"".into(),
        ];
        for text in bad {
            std::fs::write(&path, &text).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            assert!(is_config_error(LatentPreview::load(&path, 4)), "{text}");
        }
        let nan =
            LatentPreview::from_rows([vec![f32::NAN, 0.0], vec![0.0; 2], vec![0.0; 2]], "".into());
        assert!(matches!(nan.save(&path), Err(Error::InvalidArgument(_))));
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }

    #[test]
    fn load_or_fit_takes_a_valid_file_else_fits() -> Result<()> {
        let vae = Vae::load_decoder(&tiny_shapes().join("vae"), &Device::Cpu)?;
        let fitted = LatentPreview::fit(&vae, &Device::Cpu)?;
        let dir = scratch("model");
        let vae_dir = dir.join("vae");
        std::fs::create_dir_all(&vae_dir).map_err(|source| Error::Io {
            path: vae_dir.clone(),
            source,
        })?;
        assert_eq!(
            LatentPreview::load_or_fit(&dir, &vae, &Device::Cpu)?,
            fitted
        );
        let p = example();
        p.save(&dir.join(PREVIEW_FILE))?;
        assert_eq!(LatentPreview::load_or_fit(&dir, &vae, &Device::Cpu)?, p);
        // A file for another VAE is passed over.
        let three = LatentPreview::from_rows([vec![0.5; 4], vec![0.5; 4], vec![0.5; 4]], "".into());
        three.save(&dir.join(PREVIEW_FILE))?;
        assert_eq!(
            LatentPreview::load_or_fit(&dir, &vae, &Device::Cpu)?,
            fitted
        );
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }

    #[test]
    fn render_is_latent_sized_and_encodes() -> Result<()> {
        let preview = example();
        let latents = Tensor::arange(0f32, 2.0 * 4.0 * 70.0, &Device::Cpu)?
            .affine(0.01, -1.0)?
            .reshape((2, 4, 10, 7))?; // 10 high, 7 wide
        let img = preview.render(&latents)?;
        assert_eq!((img.width, img.height, img.rgb.len()), (7, 10, 3 * 7 * 10));
        // The first pixel: channels -1, -0.3, 0.4, 1.1 (one plane of 70 apart).
        let x = [-1.0f32, -0.3, 0.4, 1.1];
        let want = |r: &[f32]| (0..4).fold(r[4], |a, c| a + r[c] * x[c]);
        for (k, row) in preview.rows.iter().enumerate() {
            let v = (want(row) * 255.0).round().clamp(0.0, 255.0) as u8;
            assert_eq!(img.rgb[k], v);
        }
        let png = image::load_from_memory(&img.to_png()?)
            .map_err(|e| Error::InvalidArgument(format!("PNG decoding: {e}")))?;
        assert_eq!((png.width(), png.height()), (7, 10));
        Ok(())
    }

    #[test]
    fn odd_shapes_are_errors() -> Result<()> {
        let preview = example();
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

//! `veil preview-fit`: fits a model's latent preview on real latents
//! (`LatentPreview::fit_on_images`), writes it into the model folder
//! (`vae/latent_preview.json`, which the SDK reads at the first preview), and prints how it and
//! the fallbacks score on held-out pictures, so the numbers are reproducible from the command.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use image::RgbImage;
use veil_core::client::preview::{LatentPreview, PREVIEW_FILE};
use veil_core::client::preview_fit::{held_out_scores, FitTarget, PreviewScores};
use veil_core::model::config::ModelPaths;
use veil_core::model::vae::Vae;

use crate::eval::bar;
use crate::model_cmd::DeviceArg;

#[derive(Args)]
pub struct PreviewFitArgs {
    /// Diffusers-layout model folder (its `vae/`, encoder included, and `unet/config.json`).
    #[arg(long)]
    model: PathBuf,
    /// A folder of PNG pictures, taken in name order: the first --count are fitted on, the
    /// next --held-out scored; each is centre-cropped to a square and resized to the model's
    /// native size. Default: the procedural shapes dataset (`veil dataset`) at that size.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Pictures to fit on.
    #[arg(long, default_value_t = 64)]
    count: usize,
    /// Held-out pictures to score on.
    #[arg(long, default_value_t = 32)]
    held_out: usize,
    /// The shapes dataset's seed for the fit; the held-out pictures are the dataset's held-out
    /// split at seed + 1.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// What each latent pixel's colour is regressed on.
    #[arg(long, value_enum, default_value_t)]
    target: TargetArg,
    /// Where to write the JSON (default: MODEL/vae/latent_preview.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the VAE runs.
    #[arg(long, value_enum, default_value_t)]
    device: DeviceArg,
}

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum TargetArg {
    /// The VAE's reconstruction of each picture (its latents decoded): what the final decode
    /// shows, which the preview stands in for.
    #[default]
    Reconstruction,
    /// The picture itself.
    Image,
}

pub fn run(a: PreviewFitArgs) -> Result<()> {
    let device = a.device.select()?;
    let paths = ModelPaths::new(&a.model)?;
    let vae = Vae::load(&paths.component("vae"), &device).with_context(|| {
        format!(
            "loading the VAE (with its encoder) of {}",
            a.model.display()
        )
    })?;
    let f = vae.config.downsample_factor();
    let side = paths.unet_config()?.sample_size.unwrap_or(64) * f;
    if a.count == 0 || a.held_out == 0 {
        bail!("--count and --held-out must be at least 1");
    }
    let (fit_set, held_set, fit_what, held_what) = match &a.images {
        Some(dir) => {
            let (fit, held) = folder_pictures(dir, a.count, a.held_out, side)?;
            let name = dir.display();
            (
                fit,
                held,
                format!("{} PNG pictures of {name} (first in name order)", a.count),
                format!("the next {} of {name}", a.held_out),
            )
        }
        None => {
            let train = veil_eval::Dataset::new(a.seed, side);
            let held = veil_eval::Dataset::new(a.seed.wrapping_add(1), side);
            (
                (0..a.count as u64).map(|i| train.sample(i).2).collect(),
                (0..a.held_out as u64).map(|i| held.held_out(i).2).collect(),
                format!(
                    "{} shapes pictures (veil dataset --seed {} --side {side})",
                    a.count, a.seed
                ),
                format!(
                    "veil dataset --held-out --seed {} --side {side}",
                    a.seed.wrapping_add(1)
                ),
            )
        }
    };
    let target = match a.target {
        TargetArg::Reconstruction => FitTarget::Reconstruction,
        TargetArg::Image => FitTarget::Image,
    };

    let start = Instant::now();
    let b = bar(fit_set.len(), "fitting");
    let fitted = LatentPreview::fit_on_images_with(&vae, &device, &fit_set, target, &mut |done| {
        b.set_position(done as u64)
    })?
    .with_fitted_on(format!(
        "veil preview-fit: {fit_what}, {side}x{side}, against {}",
        target.name()
    ));
    b.finish_and_clear();
    let fit_s = start.elapsed().as_secs_f64();
    let random = LatentPreview::fit(&vae, &device)?;

    let out = a.out.clone().unwrap_or_else(|| a.model.join(PREVIEW_FILE));
    fitted
        .save(&out)
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "fitted on {fit_what} against {} in {fit_s:.2} s; wrote {}",
        target.name(),
        out.display()
    );

    let b = bar(held_set.len(), "scoring");
    let s = held_out_scores(&vae, &device, &[&fitted, &random], &held_set, &mut |done| {
        b.set_position(done as u64)
    })?;
    b.finish_and_clear();
    println!(
        "held-out PSNR (dB, mean over {} pictures: {held_what}, {side}x{side}, latents {}x{}):",
        s.pictures,
        side / f,
        side / f
    );
    println!(
        "  {:<34} {:>18} {:>12}",
        "", "vs reconstruction", "vs picture"
    );
    let row = |name: &str, get: &dyn Fn(&PreviewScores) -> f64| {
        println!(
            "  {name:<34} {:>18.2} {:>12.2}",
            get(&s.reconstruction),
            get(&s.image)
        )
    };
    row("fitted on pictures (this file)", &|p| p.previews[0]);
    row("fitted on random latents", &|p| p.previews[1]);
    row("each picture's mean colour", &|p| p.mean_colour);
    row("grey", &|p| p.grey);
    Ok(())
}

/// The PNG files of `dir` in name order: the first `count`, then the next `held_out`, each
/// centre-cropped to a square and resized to side×side.
fn folder_pictures(
    dir: &Path,
    count: usize,
    held_out: usize,
    side: usize,
) -> Result<(Vec<RgbImage>, Vec<RgbImage>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| Ok(e?.path()))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
        .collect();
    files.sort();
    if files.len() < count + held_out {
        bail!(
            "{} has {} PNG pictures; --count {count} and --held-out {held_out} need {}",
            dir.display(),
            files.len(),
            count + held_out
        );
    }
    let side = u32::try_from(side).context("native size")?;
    let b = bar(count + held_out, "reading pictures");
    let mut pics = Vec::with_capacity(count + held_out);
    for p in &files[..count + held_out] {
        let img = image::open(p)
            .with_context(|| format!("reading {}", p.display()))?
            .to_rgb8();
        let s = img.width().min(img.height());
        if s == 0 {
            bail!("{} is empty", p.display());
        }
        let crop =
            image::imageops::crop_imm(&img, (img.width() - s) / 2, (img.height() - s) / 2, s, s)
                .to_image();
        pics.push(image::imageops::resize(
            &crop,
            side,
            side,
            image::imageops::FilterType::Triangle,
        ));
        b.inc(1);
    }
    b.finish_and_clear();
    let held = pics.split_off(count);
    Ok((pics, held))
}

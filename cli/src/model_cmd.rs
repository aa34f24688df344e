//! `veil manifest DIR` and `veil verify DIR` (the model manifest, `veil_core::wire::manifest`),
//! `veil compare A.png B.png`, `veil lora-split`, and the `--device` flag.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use veil_core::model::device::DeviceChoice;
use veil_core::wire::manifest::{Manifest, MANIFEST_FILE};

use crate::eval::bar;

#[derive(Args)]
pub struct ManifestArgs {
    /// Diffusers-layout model folder; `veil-manifest.json` is written into it.
    dir: PathBuf,
    /// Print the manifest instead of writing it.
    #[arg(long)]
    print: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// A model folder with a `veil-manifest.json`.
    dir: PathBuf,
}

#[derive(Args)]
pub struct LoraSplitArgs {
    /// The LoRA adapter (safetensors, diffusers/peft or kohya naming).
    lora: PathBuf,
    /// The diffusers-layout model folder it adapts (only `unet/config.json` is read).
    #[arg(long)]
    model: PathBuf,
    /// Where to write the shard servers' part: the layers they run under `strict`
    /// (convolutions, feed-forward, projections, and the time embedding except SDXL's, which
    /// stays on the phone).
    #[arg(long)]
    servers: PathBuf,
    /// Where to write the phone's part (attention layers), if wanted.
    #[arg(long)]
    phone: Option<PathBuf>,
}

/// Splits an adapter into the shard servers' part and the phone's, so an operator is handed
/// only the layers its server runs: the attention layers' adaptation never leaves the phone.
pub fn lora_split(a: LoraSplitArgs) -> Result<()> {
    use veil_core::model::config::ModelPaths;
    use veil_core::model::lora::LoraAdapter;
    use veil_core::model::unet::UNet;
    let unet = UNet::new(&ModelPaths::new(&a.model)?.unet_config()?)?;
    let adapter = LoraAdapter::load(&a.lora, &unet)
        .with_context(|| format!("reading {}", a.lora.display()))?;
    let shard = unet.shard_layers();
    match adapter.part(&|m| shard.contains_key(m)) {
        Ok(servers) => {
            servers.save(&a.servers)?;
            println!(
                "{}: {} of {} adapted layers (the servers' part)",
                a.servers.display(),
                servers.modules.len(),
                adapter.modules.len()
            );
        }
        // Nothing written: an adapter of attention layers only leaves the servers' model as
        // it is (their identity too).
        Err(_) => println!(
            "no layer of this adapter runs on a shard server: start the servers without --lora \
             ({} not written)",
            a.servers.display()
        ),
    }
    if let Some(p) = &a.phone {
        let phone = adapter.part(&|m| !shard.contains_key(m))?;
        phone.save(p)?;
        println!(
            "{}: {} adapted layers (the phone's part)",
            p.display(),
            phone.modules.len()
        );
    }
    Ok(())
}

/// Where the phone's share runs.
#[derive(Clone, Copy, Debug, ValueEnum, Default)]
pub enum DeviceArg {
    /// Metal on Apple targets in a build with the `metal` feature, else the CPU.
    #[default]
    Auto,
    Cpu,
    Metal,
}

impl DeviceArg {
    /// The device to load onto (a Metal device that cannot be created falls back to the CPU,
    /// said on stderr).
    pub fn select(self) -> Result<candle_core::Device> {
        let choice = match self {
            DeviceArg::Auto => DeviceChoice::Auto,
            DeviceArg::Cpu => DeviceChoice::Cpu,
            DeviceArg::Metal => DeviceChoice::Metal,
        };
        let (device, fallback) = choice.select()?;
        if let Some(why) = fallback {
            eprintln!("note: {why}");
        }
        Ok(device)
    }
}

pub fn manifest(a: ManifestArgs) -> Result<()> {
    let b = bar(0, "hashing");
    let m = Manifest::build(&a.dir, &mut |i, n, path| {
        b.set_length(n as u64);
        b.set_position(i as u64);
        b.set_message(path.to_string());
    })
    .with_context(|| format!("building the manifest of {}", a.dir.display()))?;
    b.finish_and_clear();
    if a.print {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    let path = m.write(&a.dir)?;
    let bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
    println!(
        "wrote {}: {} files, {bytes} bytes; unet shard identity {} ({} parameters)",
        path.display(),
        m.files.len(),
        m.unet.shard_identity,
        m.unet.shard_parameters
    );
    Ok(())
}

pub fn verify(a: VerifyArgs) -> Result<()> {
    let Some(m) = Manifest::read(&a.dir)? else {
        bail!(
            "{} has no {MANIFEST_FILE}; write one with `veil manifest {}`",
            a.dir.display(),
            a.dir.display()
        );
    };
    let b = bar(m.files.len(), "verifying");
    let v = m.verify(&a.dir, &mut |i, _, _| b.set_position(i as u64))?;
    b.finish_and_clear();
    if v.ok() {
        println!(
            "{}: {} files and the unet shard identity {} match the manifest",
            a.dir.display(),
            v.files_checked,
            m.unet.shard_identity
        );
        return Ok(());
    }
    for line in &v.mismatches {
        println!("mismatch: {line}");
    }
    bail!(
        "{}: {} difference(s) from the manifest",
        a.dir.display(),
        v.mismatches.len()
    )
}

#[derive(Args)]
pub struct CompareArgs {
    /// The reference picture (PNG).
    pub reference: PathBuf,
    /// The picture compared with it (same size).
    pub other: PathBuf,
    /// Fail (exit 1) when the PSNR is below this many dB.
    #[arg(long)]
    pub min_psnr: Option<f64>,
}

/// `veil compare A.png B.png`: PSNR (and the largest pixel difference) between two pictures,
/// e.g. the same generation with servers on a GPU and on the CPU (scripts/check-cuda.sh).
pub fn compare(a: CompareArgs) -> Result<()> {
    let open = |p: &PathBuf| -> Result<image::RgbImage> {
        Ok(image::open(p)
            .with_context(|| format!("reading {}", p.display()))?
            .to_rgb8())
    };
    let (x, y) = (open(&a.reference)?, open(&a.other)?);
    if x.dimensions() != y.dimensions() {
        bail!(
            "sizes differ: {:?} and {:?}",
            x.dimensions(),
            y.dimensions()
        );
    }
    let max_diff = x
        .as_raw()
        .iter()
        .zip(y.as_raw())
        .map(|(p, q)| p.abs_diff(*q))
        .max()
        .unwrap_or(0);
    let psnr = veil_eval::metrics::psnr(
        &veil_eval::metrics::Picture::from_rgb(&x),
        &veil_eval::metrics::Picture::from_rgb(&y),
        None,
    )?;
    let db = psnr.unwrap_or(f64::INFINITY);
    println!("psnr_db {db:.2} max_pixel_difference {max_diff}");
    if let Some(min) = a.min_psnr {
        if db < min {
            bail!("PSNR {db:.2} dB is below {min} dB");
        }
    }
    Ok(())
}

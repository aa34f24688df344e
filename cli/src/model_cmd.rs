//! `veil manifest DIR` and `veil verify DIR` (the model manifest, `veil_core::wire::manifest`),
//! and the `--device` flag.

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

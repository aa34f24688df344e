//! One generation through the FFI surface, as an app would make it, reporting the process's
//! peak resident memory (VmHWM) afterwards: the number docs/BENCHMARKS.md records for the phone
//! side. Servers come from a `servers.toml` (start them with `veil-server`), or none for
//! `--policy local`.
//!
//!   cargo run --release -p veil-ffi --example ffi_generate -- \
//!       --model models/tiny-random --servers servers.toml --policy strict --steps 20

use std::sync::Arc;

use veil_ffi::{GenerationOptions, Policy, ServerConfig, VeilClient, VeilConfig};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let model = arg(&args, "--model").unwrap_or_else(|| "models/tiny-random".into());
    let policy: Policy = arg(&args, "--policy").map_or(Ok(Policy::Strict), |p| p.parse())?;
    let steps: u32 = arg(&args, "--steps").map_or(Ok(20), |s| s.parse())?;
    let servers = match arg(&args, "--servers") {
        Some(p) => veil_core::transport::load_server_list(std::path::Path::new(&p))?
            .into_iter()
            .map(|s| ServerConfig {
                address: s.address,
                fingerprint: s.fingerprint.to_string(),
                token: s.token,
                tenant: None,
            })
            .collect(),
        None => Vec::new(),
    };
    let before = peak_rss_kib();
    let mut config = VeilConfig::new(model, servers);
    config.policy = policy;
    config.allow_research_policies = true;
    config.defaults.steps = steps;
    let client = VeilClient::new(config)?;
    let loaded = peak_rss_kib();
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let client2 = Arc::clone(&client);
    let image = rt.block_on(client2.generate(
        "a small red circle at the top left on a white background".into(),
        GenerationOptions {
            seed: Some(1),
            ..GenerationOptions::default()
        },
        None,
        None,
    ))?;
    println!(
        "{}x{} png {} bytes, {} steps in {:.2} s, up {} B, down {} B; peak RSS KiB: start {:?}, after load {:?}, after generate {:?}",
        image.width,
        image.height,
        image.png.len(),
        image.stats.steps,
        image.stats.wall_seconds,
        image.stats.bytes_up,
        image.stats.bytes_down,
        before,
        loaded,
        peak_rss_kib()
    );
    Ok(())
}

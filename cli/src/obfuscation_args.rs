//! The `obfuscated` policy's command-line settings (`veil generate --policy obfuscated`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;

/// The `obfuscated` policy's settings.
#[derive(Args)]
pub struct ObfuscationArgs {
    /// obfuscated: k, the steps the server runs for every candidate (default: half of --steps;
    /// 0 = all on this device, --steps = all on the server).
    #[arg(long)]
    server_steps: Option<usize>,
    /// obfuscated: most candidate prompts sent.
    #[arg(long, default_value_t = 8)]
    k_max: usize,
    /// obfuscated: the U-Net of the late steps (a diffusers folder or unet folder with the
    /// same latent space; default: the model's own).
    #[arg(long)]
    device_model: Option<PathBuf>,
    /// obfuscated: extra attribute lexicons (TOML or JSON), added to the built-in one.
    #[arg(long)]
    lexicon: Vec<PathBuf>,
    /// obfuscated: use only the --lexicon files, not the built-in gender/age/ethnicity one.
    #[arg(long)]
    no_builtin: bool,
    /// obfuscated, server side: off, exact (share the unconditional branch while the
    /// candidates' latents are identical) or shared (ObCLIP-style, approximate).
    #[arg(long, default_value = "exact")]
    batch_redundancy: String,
    /// obfuscated, server side: from this server step on, reuse each transformer block's
    /// attention output (T-GATE).
    #[arg(long)]
    attention_gate: Option<usize>,
    /// obfuscated: the user's key file (created with a fresh key, mode 0600, if missing): the
    /// same key sends the same K candidates for a prompt at every run. Default: a key for this
    /// run only, weaker (a server may intersect the sets of two runs).
    #[arg(long)]
    key_file: Option<PathBuf>,
}

/// The key of `--key-file` (read, or created if missing); None without one, with a note.
pub fn obfuscation_key(
    path: Option<&PathBuf>,
) -> Result<Option<Arc<veil_core::obfuscation::ObfuscationKey>>> {
    let Some(path) = path else {
        eprintln!("note: no --key-file: candidates are chosen with a key for this run only");
        return Ok(None);
    };
    let key = veil_core::sdk::load_or_create_obfuscation_key(path)?;
    Ok(Some(Arc::new(key)))
}

impl ObfuscationArgs {
    pub fn options(
        &self,
        device: &Device,
    ) -> Result<veil_core::client::hybrid::ObfuscationOptions> {
        use veil_core::client::hybrid::{Accelerations, DeviceUNet, ObfuscationOptions};
        use veil_core::obfuscation::Lexicon;
        let custom = !self.lexicon.is_empty() || self.no_builtin;
        let lexicon = if custom {
            let mut lex = if self.no_builtin {
                Lexicon::default()
            } else {
                Lexicon::builtin()?
            };
            for p in &self.lexicon {
                lex.extend(
                    Lexicon::from_file(p)
                        .with_context(|| format!("reading lexicon {}", p.display()))?,
                );
            }
            Some(Arc::new(lex))
        } else {
            None
        };
        let device_unet = match &self.device_model {
            Some(d) => Some(Arc::new(
                DeviceUNet::load(d, device)
                    .with_context(|| format!("loading the device model {}", d.display()))?,
            )),
            None => None,
        };
        Ok(ObfuscationOptions {
            server_steps: self.server_steps,
            k_max: Some(self.k_max),
            lexicon,
            accel: Accelerations {
                batch_redundancy: self.batch_redundancy.parse()?,
                attention_gate: self.attention_gate,
            },
            device_unet,
            key: obfuscation_key(self.key_file.as_ref())?,
        })
    }
}

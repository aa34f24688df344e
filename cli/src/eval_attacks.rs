//! `veil eval`'s privacy section: runs `veil_eval::privacy` (a capable white-box attacker per
//! server, against the strip-only control and the one-server ceiling), writes
//! docs/eval/attacks.json and the section's tables.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use veil_core::client::guidance::GuidanceHalves;
use veil_core::client::pipeline::StableDiffusion;
use veil_core::placement::Policy;
use veil_eval::obf_prior::{obfuscated_row, ObfuscatedAttack, DEFAULT_PRIOR_SAMPLES};
use veil_eval::privacy::calls::Setting;
use veil_eval::privacy::report::{AttacksFile, ObfuscatedRows, SettingRow};
use veil_eval::privacy::{run, PrivacyConfig};

use crate::eval::{bar, rel, EvalArgs};

pub(crate) fn db(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.2}"))
}

pub(crate) fn pct(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{:.1}%", 100.0 * v))
}

pub(crate) fn margin(a: Option<f64>, b: Option<f64>, scale: f64, unit: &str) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:+.1}{unit}", scale * (a - b)),
        _ => "—".into(),
    }
}

/// The configuration `EvalArgs` asks for.
fn config(a: &EvalArgs) -> Result<PrivacyConfig> {
    let mut c = PrivacyConfig::full();
    c.train = a.attack_train;
    c.test = a.attack_test;
    c.batch = a.attack_batch;
    c.dictionary_extra = a.attack_dictionary;
    if !a.attack_settings.is_empty() {
        c.settings = a
            .attack_settings
            .iter()
            .map(|s| setting(s))
            .collect::<Result<_>>()?;
    }
    Ok(c)
}

/// One `--attack-settings` entry: POLICY:N.
pub fn setting(s: &str) -> Result<Setting> {
    let (policy, n) = s
        .split_once(':')
        .with_context(|| format!("attack setting `{s}` is not POLICY:N"))?;
    let n: usize = n
        .trim()
        .parse()
        .with_context(|| format!("attack setting `{s}`: N is not a number"))?;
    let (name, halves) = match policy.trim() {
        "strict-together" => ("strict", Some(GuidanceHalves::Together)),
        p => (p, None),
    };
    let policy = Policy::parse(name, Default::default())?;
    if !matches!(policy, Policy::Strict | Policy::Ppidm { .. }) || n == 0 {
        anyhow::bail!("attack setting `{s}`: the attacks run on ppidm or strict with N ≥ 1");
    }
    let mut setting = Setting::new(policy, n);
    if let Some(h) = halves {
        setting.halves = h;
    }
    Ok(setting)
}

/// Runs the attacks and writes the section and attacks.json.
pub fn attack_section(
    md: &mut String,
    a: &EvalArgs,
    sd: &std::sync::Arc<StableDiffusion>,
) -> Result<()> {
    let cfg = config(a)?;
    let mut current: Option<(String, indicatif::ProgressBar)> = None;
    let file = run(sd.as_ref(), &a.model, &cfg, &mut |stage, done, total| {
        let fresh = current.as_ref().is_none_or(|(s, _)| s != stage);
        if fresh {
            if let Some((_, b)) = current.take() {
                b.finish_and_clear();
            }
            current = Some((stage.to_string(), bar(total, &format!("attacks: {stage}"))));
        }
        if let Some((_, b)) = &current {
            b.set_position(done as u64);
        }
    })?;
    if let Some((_, b)) = current.take() {
        b.finish_and_clear();
    }
    let mut file = file;
    file.obfuscated = Some(obfuscated_rows(a, sd)?);
    let path = a.figures.join("attacks.json");
    std::fs::write(&path, serde_json::to_string_pretty(&file)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    write_section(md, a, &file, &rel(&path, &a.out))
}

/// The `obfuscated` server's slot-aware prior over many requests (no pictures), and over a
/// few with every candidate finished.
fn obfuscated_rows(a: &EvalArgs, sd: &std::sync::Arc<StableDiffusion>) -> Result<ObfuscatedRows> {
    let lex = std::sync::Arc::new(
        veil_core::obfuscation::Lexicon::from_file(&a.lexicon)
            .with_context(|| format!("reading lexicon {}", a.lexicon.display()))?,
    );
    let steps = a.obfuscated_steps.max(2);
    let mut cfg = ObfuscatedAttack {
        prompts: if a.quick { 50 } else { 1000 },
        steps,
        server_steps: steps / 2,
        k_max: 8,
        guidance: a.guidance,
        side: 64,
        seed: a.seed,
        prior_samples: DEFAULT_PRIOR_SAMPLES,
        finish_all: false,
    };
    let b = bar(cfg.prompts, "attacks: obfuscated prior");
    let prior = obfuscated_row(sd, &lex, &cfg, &mut |d, _| b.set_position(d as u64))?;
    b.finish_and_clear();
    let finished = match a.obfuscated_prompts {
        0 => None,
        n => {
            cfg.prompts = n;
            cfg.finish_all = true;
            let b = bar(n, "attacks: obfuscated, every candidate finished");
            let r = obfuscated_row(sd, &lex, &cfg, &mut |d, _| b.set_position(d as u64))?;
            b.finish_and_clear();
            Some(r)
        }
    };
    Ok(ObfuscatedRows { prior, finished })
}

fn write_obfuscated(md: &mut String, o: &ObfuscatedRows) -> Result<()> {
    writeln!(
        md,
        "**`obfuscated`** (one server runs the first steps of K candidate captions that differ \
         only in their colour words): over {} requests (mean K = {:.1}) the slot-aware prior \
         names the real candidate {} of the time against 1/K = {}, and the real value of a \
         sensitive slot {} against {} by chance.{}\n",
        o.prior.prompts,
        o.prior.k_mean,
        pct(Some(o.prior.prior_accuracy)),
        pct(Some(o.prior.chance)),
        pct(Some(o.prior.sensitive_slot_accuracy)),
        pct(Some(o.prior.slot_chance)),
        match &o.finished {
            Some(f) => format!(
                " Finishing every candidate itself ({} requests), the picture of its guess \
                 reaches {} dB against the true one, the best of the K {} dB: obfuscation \
                 hides the attribute, not the rest of the picture.",
                f.prompts,
                db(f.picked_psnr),
                db(f.best_of_k_psnr)
            ),
            None => String::new(),
        }
    )?;
    Ok(())
}

fn write_section(md: &mut String, a: &EvalArgs, f: &AttacksFile, json: &str) -> Result<()> {
    writeln!(md, "## Attacks: what each server learns\n")?;
    writeln!(
        md,
        "A white-box attacker per server holds the public model, scheduler and code. It makes \
         its own training data: {} single U-Net calls at timesteps {}–{} on VAE-encoded \
         training pictures with their real captions, run under the same placement (with \
         classifier-free guidance, empty negative prompt). It is scored on {} held-out pictures \
         (held-out captions), each attacked in the U-Net call at timestep {} — the last call of \
         a 20-step DDIM generation, whose input is nearly the finished picture. The truth is the \
         VAE decode of the clean latent. All numbers: [{json}]({json}), written by `veil eval \
         --sections attacks{}`.\n",
        f.attacker_training_samples,
        f.train_timesteps[0],
        f.train_timesteps[1],
        f.test_pictures,
        f.test_timestep,
        if a.quick { " --quick" } else { "" },
    )?;
    writeln!(
        md,
        "- **image**: PSNR of the mean squared error pooled over the object pixels outside the \
         server's strip and its halo rows (all object pixels when one server holds everything); \
         **objects**: colour, shape, position and size read back by the adherence scorer for \
         the objects lying wholly outside the strip; **prompt**: the main object's size, \
         colour, shape and position and the background (5 slots) recovered, and whole captions \
         recovered exactly.\n\
         - **control** (strip-only): the same learned decoder and probe given only the server's \
         own latent rows (strip + halo) — what any strip split reveals. Baselines beside it: the \
         mean picture, and the own strip's background colour filled outside.\n\
         - **attack families**: `ppidm` — the latent inverted from the first block's \
         self-attention keys and values by optimisation through the public weights (own rows \
         fixed), finished with the prompt's text states recovered from the cross-attention \
         keys and values; the prompt itself by greedy token-by-token inversion of those states. \
         `strict` — a learned decoder and probe over the whole view (own rows, GroupNorm \
         moments, scattered streams), the closed form from the first GroupNorm's moments, and \
         the CFG-difference test of every caption of a {}-caption dictionary (exact where a \
         server holds both guidance halves; with the conditional half alone, estimated from the \
         server's own tokens).\n",
        f.test_pictures + a.attack_dictionary,
    )?;
    let g = &f.gate;
    writeln!(
        md,
        "**Gate** (an attack counts only if it reaches the ceiling when one server sees \
         everything: ≥ {:.0} dB, ≥ {:.0}% of prompt slots): worst policy at N = 1 reaches {} dB \
         and {} — {}.\n",
        g.image_bound_db,
        100.0 * g.prompt_bound,
        db(g.one_server_psnr_outside),
        pct(g.one_server_prompt_word_accuracy),
        if g.met { "met" } else { "**not met**" }
    )?;
    write_tables(md, &f.settings)?;
    write_summary(md, &f.settings)?;
    if let Some(o) = &f.obfuscated {
        write_obfuscated(md, o)?;
    }
    Ok(())
}

fn write_tables(md: &mut String, rows: &[SettingRow]) -> Result<()> {
    writeln!(
        md,
        "| policy | N | server | halves held | strip | image: attack | control | margin | \
         background fill | objects: attack | control | prompt: attack | control | margin | \
         exact | best families |"
    )?;
    writeln!(md, "|{}", "---|".repeat(16))?;
    for r in rows {
        let fam = |m: &std::collections::BTreeMap<String, Option<f64>>| {
            m.iter()
                .filter_map(|(k, v)| v.map(|v| (k, v)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map_or("—".to_string(), |(k, _)| k.clone())
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {}–{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            r.policy,
            r.servers,
            r.server,
            r.holds,
            r.strip[0],
            r.strip[1],
            db(r.image.attack_psnr_outside),
            db(r.image.control_psnr_outside),
            margin(r.image.attack_psnr_outside, r.image.control_psnr_outside, 1.0, " dB"),
            db(r.image.background_fill_psnr_outside),
            pct(r.objects_outside.attack_accuracy),
            pct(r.objects_outside.control_accuracy),
            pct(r.prompt.attack_word_accuracy),
            pct(r.prompt.control_word_accuracy),
            margin(r.prompt.attack_word_accuracy, r.prompt.control_word_accuracy, 100.0, " pt"),
            pct(r.prompt.attack_exact),
            fam(&r.image.families),
            fam(&r.prompt.families),
        )?;
    }
    writeln!(md)?;
    Ok(())
}

/// Per policy and layout, the largest margin any server has over its control.
fn write_summary(md: &mut String, rows: &[SettingRow]) -> Result<()> {
    let mut keys: Vec<(String, usize, String)> = Vec::new();
    for r in rows {
        let k = (r.policy.clone(), r.servers, r.guidance_halves.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    writeln!(
        md,
        "Largest margin of any server over its strip-only control, per setting:\n"
    )?;
    writeln!(
        md,
        "| setting | image dB | objects pt | prompt pt | exact captions |"
    )?;
    writeln!(md, "|---|---|---|---|---|")?;
    for (p, n, h) in keys {
        let of = rows
            .iter()
            .filter(|r| r.policy == p && r.servers == n && r.guidance_halves == h);
        let max = |f: &dyn Fn(&SettingRow) -> Option<f64>| {
            of.clone()
                .filter_map(f)
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
        };
        let img = max(&|r| Some(r.image.attack_psnr_outside? - r.image.control_psnr_outside?));
        let obj = max(&|r| {
            Some(r.objects_outside.attack_accuracy? - r.objects_outside.control_accuracy?)
        });
        let pr = max(&|r| Some(r.prompt.attack_word_accuracy? - r.prompt.control_word_accuracy?));
        let ex = max(&|r| r.prompt.attack_exact);
        writeln!(
            md,
            "| {p} N = {n} (guidance halves {h}) | {} | {} | {} | {} |",
            img.map_or("—".into(), |v| format!("{v:+.1}")),
            obj.map_or("—".into(), |v| format!("{:+.1}", 100.0 * v)),
            pr.map_or("—".into(), |v| format!("{:+.1}", 100.0 * v)),
            pct(ex),
        )?;
    }
    writeln!(md)?;
    Ok(())
}

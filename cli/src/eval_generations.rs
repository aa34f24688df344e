//! `veil eval`'s whole-generation section: runs `veil_eval::privacy::generations` (the
//! attacker's own whole generations captured at every step, a learned decoder over all of
//! them), writes docs/eval/attacks_generations.json and the section's table.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use veil_core::client::pipeline::StableDiffusion;
use veil_eval::privacy::generations::{run, GenerationsConfig, GenerationsFile};

use crate::eval::{bar, rel, EvalArgs};
use crate::eval_attacks::{db, margin, pct};

fn config(a: &EvalArgs) -> Result<GenerationsConfig> {
    let mut c = GenerationsConfig::full();
    c.train = a.generation_train;
    c.test = a.generation_test;
    c.steps = a.generation_steps;
    c.batch = a.attack_batch.clamp(1, 50);
    c.guidance = a.guidance;
    if !a.generation_settings.is_empty() {
        c.settings = a
            .generation_settings
            .iter()
            .map(|s| crate::eval_attacks::setting(s))
            .collect::<Result<_>>()?;
    }
    Ok(c)
}

/// Runs the whole-generation attacks and writes the section and its JSON.
pub fn generations_section(
    md: &mut String,
    a: &EvalArgs,
    sd: &std::sync::Arc<StableDiffusion>,
) -> Result<()> {
    let cfg = config(a)?;
    let mut current: Option<(String, indicatif::ProgressBar)> = None;
    let file = run(sd.as_ref(), &cfg, &mut |stage, done, total| {
        if current.as_ref().is_none_or(|(s, _)| s != stage) {
            if let Some((_, b)) = current.take() {
                b.finish_and_clear();
            }
            let label = format!("whole generations: {stage}");
            current = Some((stage.to_string(), bar(total, &label)));
        }
        if let Some((_, b)) = &current {
            b.set_position(done as u64);
        }
    })?;
    if let Some((_, b)) = current.take() {
        b.finish_and_clear();
    }
    let path = a.figures.join("attacks_generations.json");
    std::fs::write(&path, serde_json::to_string_pretty(&file)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    write_section(md, a, &file, &rel(&path, &a.out))
}

fn write_section(md: &mut String, a: &EvalArgs, f: &GenerationsFile, json: &str) -> Result<()> {
    writeln!(md, "## Attacks on whole generations\n")?;
    writeln!(
        md,
        "The same white-box attacker runs {} whole generations of its own ({} steps, guidance \
         {}, training captions, seeded noise) under each placement, captures what every server \
         sees at **every step**, and fits one ridge map per server from all of it to the final \
         latent and to the prompt's 5 attribute slots. It is scored on {} held-out generations \
         (held-out captions and noise). The truth is the picture the phone shows; the image \
         score is PSNR over every pixel outside the server's strip and halo (a generated \
         picture has no object mask). **control**: the server's own latent rows at every step; \
         **attack**: those plus, at every step, the first layers' GroupNorm moments and the \
         first scattered streams. Features are standardised on the training generations. All \
         numbers: [{json}]({json}), written by `veil eval --sections generations{}`.\n",
        f.training_generations,
        f.steps,
        f.guidance,
        f.test_generations,
        if a.quick { " --quick" } else { "" },
    )?;
    writeln!(
        md,
        "| policy | N | server | halves held | strip | features (attack / control) | mean \
         picture | image: control | attack | margin | prompt slots: control | attack | margin |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for r in &f.settings {
        writeln!(
            md,
            "| {} | {} | {} | {} | {}..{} | {} / {} | {} | {} | {} | {} | {} | {} | {} |",
            r.policy,
            r.servers,
            r.server,
            r.holds,
            r.strip[0],
            r.strip[1],
            r.view_features,
            r.control_features,
            db(r.mean_picture_psnr_outside),
            db(r.control_psnr_outside),
            db(r.attack_psnr_outside),
            margin(r.attack_psnr_outside, r.control_psnr_outside, 1.0, " dB"),
            pct(r.control_word_accuracy),
            pct(r.attack_word_accuracy),
            margin(
                r.attack_word_accuracy,
                r.control_word_accuracy,
                100.0,
                " pt"
            ),
        )?;
    }
    writeln!(md)?;
    Ok(())
}

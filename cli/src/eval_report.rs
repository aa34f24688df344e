//! `veil eval`'s report as sections between markers: the whole report, or some sections
//! regenerated in place (`--sections`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use sha2::{Digest, Sha256};

use crate::eval::EvalArgs;

/// A section of the report; `--sections` regenerates some of them in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Section {
    Training,
    Adherence,
    Fidelity,
    Link,
    Attacks,
    Generations,
}

impl Section {
    pub const ALL: [Section; 6] = [
        Section::Training,
        Section::Adherence,
        Section::Fidelity,
        Section::Link,
        Section::Attacks,
        Section::Generations,
    ];

    fn markers(self) -> (String, String) {
        let name = format!("{self:?}").to_lowercase();
        (
            format!("<!-- veil-eval:{name} -->"),
            format!("<!-- /veil-eval:{name} -->"),
        )
    }
}

/// The whole report: the header, every section between its markers, the total time.
pub fn whole_report(
    a: &EvalArgs,
    side: usize,
    parts: &[(Section, String)],
    seconds: f64,
) -> Result<String> {
    let mut md = String::new();
    writeln!(
        md,
        "# Evaluation: the tiny shapes model under every placement policy\n"
    )?;
    writeln!(
        md,
        "Written by `veil eval{}` (model `{}`, {side}×{side} pictures, guidance {}, DDIM). \
         Every number below is measured by that command; nothing is typed in by hand. A section \
         can be regenerated alone (`--sections NAME`), which says so. Held-out captions come \
         from the dataset's held-out split (seed {}): none of them was a training caption.\n",
        if a.quick { " --quick" } else { "" },
        a.model.display(),
        a.guidance,
        a.seed
    )?;
    for (s, body) in parts {
        let (open, close) = s.markers();
        writeln!(md, "{open}\n{body}{close}\n")?;
    }
    writeln!(
        md,
        "---\nTotal time of this `veil eval`: {seconds:.0} s on {} CPU threads.",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    )?;
    Ok(md)
}

/// A short fingerprint of a model folder: SHA-256 over the relative path and bytes of every
/// file in it except those no measured number depends on — its Markdown, `training_log.json`,
/// the manifest (hashes of the other files, so it changes only with them) and the progress
/// preview's projection (it draws the previews, not the pictures) — in path order (12 hex
/// digits).
pub fn model_fingerprint(root: &Path) -> Result<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            if p.is_dir() {
                walk(&p, out)?;
            } else {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(root, &mut files)?;
    let skipped = [
        root.join(veil_core::wire::manifest::MANIFEST_FILE),
        root.join(veil_core::client::preview::PREVIEW_FILE),
    ];
    files.retain(|p| {
        p.extension().is_none_or(|e| e != "md")
            && p.file_name().is_none_or(|n| n != "training_log.json")
            && !skipped.contains(p)
    });
    files.sort();
    let mut h = Sha256::new();
    for f in &files {
        h.update(
            f.strip_prefix(root)
                .unwrap_or(f)
                .to_string_lossy()
                .as_bytes(),
        );
        h.update(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?);
    }
    Ok(h.finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The hidden line that says which model a section was measured on.
pub fn model_tag(fingerprint: &str) -> String {
    format!("<!-- model {fingerprint} -->\n")
}

const STALE: &str = "<!-- stale -->";

/// `body` with its stale warning set when it was not measured on `fingerprint`, removed when
/// it was.
fn mark_stale(s: Section, body: &str, fingerprint: &str) -> String {
    let kept: String = body
        .lines()
        .filter(|l| !l.ends_with(STALE) && !l.starts_with(STALE))
        .map(|l| format!("{l}\n"))
        .collect();
    let kept = kept.trim_start_matches('\n');
    if kept.contains(&model_tag(fingerprint)) {
        return kept.to_string();
    }
    let name = format!("{s:?}").to_lowercase();
    format!(
        "> **Stale:** measured on another model than the folder now holds (its fingerprint is now \
         {fingerprint}); `veil eval --sections {name}` measures it again. {STALE}\n\n{kept}"
    )
}

/// `old` with each of `parts` replaced between its markers, and every other section marked
/// stale unless it was measured on the model of `fingerprint`.
pub fn splice(old: &str, parts: &[(Section, String)], fingerprint: &str) -> Result<String> {
    let mut md = old.to_string();
    for s in Section::ALL {
        if parts.iter().any(|(p, _)| *p == s) {
            continue;
        }
        let (open, close) = s.markers();
        if let (Some(i), Some(j)) = (md.find(&open), md.find(&close)) {
            if i + open.len() < j {
                let body = md[i + open.len()..j].trim_start_matches('\n').to_string();
                md.replace_range(
                    i + open.len()..j,
                    &format!("\n{}", mark_stale(s, &body, fingerprint)),
                );
            }
        }
    }
    for (s, body) in parts {
        let (open, close) = s.markers();
        let (Some(i), Some(j)) = (md.find(&open), md.find(&close)) else {
            bail!("the report has no {open} … {close} section to replace: run the whole `veil eval` once");
        };
        if j < i {
            bail!("the report's {open} section is malformed");
        }
        md.replace_range(i + open.len()..j, &format!("\n{body}"));
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(attacks: &str) -> String {
        let mut md = String::from("# head\n");
        for s in Section::ALL {
            let (open, close) = s.markers();
            let body = if s == Section::Attacks {
                attacks.to_string()
            } else {
                format!("{}{s:?} body\n", model_tag("old"))
            };
            md.push_str(&format!("{open}\n{body}{close}\n"));
        }
        md
    }

    #[test]
    fn sections_of_another_model_are_marked_stale_and_unmarked_when_measured_again() {
        let old = report(&format!("{}numbers\n", model_tag("old")));
        let parts = [(Section::Adherence, format!("{}new\n", model_tag("new")))];
        let md = splice(&old, &parts, "new").unwrap();
        assert!(md.contains(&format!("{}new\n", model_tag("new"))));
        // Every section but the regenerated one now says it is stale, once.
        assert_eq!(md.matches(STALE).count(), Section::ALL.len() - 1);
        assert!(md.contains("`veil eval --sections attacks` measures it again"));
        // Splicing again does not stack warnings.
        let again = splice(&md, &parts, "new").unwrap();
        assert_eq!(again, md);
        // Measuring the attacks again on the new model removes its warning.
        let parts = [(Section::Attacks, format!("{}fresh\n", model_tag("new")))];
        let md = splice(&md, &parts, "new").unwrap();
        let (open, close) = Section::Attacks.markers();
        let body = &md[md.find(&open).unwrap()..md.find(&close).unwrap()];
        assert!(!body.contains(STALE) && body.contains("fresh"));
        // A section without any model tag (written before tags existed) is stale too.
        let md = splice(&report("untagged\n"), &[], "new").unwrap();
        let body = &md[md.find(&open).unwrap()..md.find(&close).unwrap()];
        assert!(body.contains(STALE) && body.contains("untagged"));
    }

    #[test]
    fn the_fingerprint_follows_the_weights_not_the_model_card() {
        let dir = std::env::temp_dir().join(format!("veil-fp-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("unet")).unwrap();
        std::fs::write(dir.join("unet/w.safetensors"), b"1").unwrap();
        std::fs::write(dir.join("README.md"), b"card").unwrap();
        let a = model_fingerprint(&dir).unwrap();
        std::fs::write(dir.join("README.md"), b"another card").unwrap();
        assert_eq!(model_fingerprint(&dir).unwrap(), a);
        // Neither the manifest nor the preview's projection changes a measured number.
        std::fs::create_dir_all(dir.join("vae")).unwrap();
        std::fs::write(dir.join("veil-manifest.json"), b"{}").unwrap();
        std::fs::write(dir.join("vae/latent_preview.json"), b"{}").unwrap();
        assert_eq!(model_fingerprint(&dir).unwrap(), a);
        std::fs::write(dir.join("vae/config.json"), b"{}").unwrap();
        assert_ne!(model_fingerprint(&dir).unwrap(), a);
        std::fs::remove_file(dir.join("vae/config.json")).unwrap();
        std::fs::write(dir.join("unet/w.safetensors"), b"2").unwrap();
        assert_ne!(model_fingerprint(&dir).unwrap(), a);
        assert_eq!(a.len(), 12);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

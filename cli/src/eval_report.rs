//! `veil eval`'s report as sections between markers: the whole report, or some sections
//! regenerated in place (`--sections`).

use std::fmt::Write as _;

use anyhow::{bail, Result};
use clap::ValueEnum;

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

/// `old` with each of `parts` replaced between its markers.
pub fn splice(old: &str, parts: &[(Section, String)]) -> Result<String> {
    let mut md = old.to_string();
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

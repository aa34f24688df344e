//! `veil dataset` and `veil score`: the procedural shapes dataset and the adherence scorer
//! (`veil-eval`) from the command line.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::ProgressBar;

#[derive(Args)]
pub struct DatasetArgs {
    /// Output folder (created): 000000.png … and captions.jsonl.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Picture side in pixels.
    #[arg(long, default_value_t = 64)]
    pub side: usize,
    /// Write the held-out evaluation split instead of training samples.
    #[arg(long)]
    pub held_out: bool,
}

#[derive(Args)]
pub struct ScoreArgs {
    /// PNG files to score.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// The caption every image is scored against.
    #[arg(long)]
    pub caption: String,
}

pub fn dataset(a: DatasetArgs) -> Result<()> {
    use std::io::Write;
    if a.side < 16 {
        bail!("--side must be at least 16 pixels");
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let d = veil_eval::Dataset::new(a.seed, a.side);
    let jsonl = a.out.join("captions.jsonl");
    let mut captions = std::io::BufWriter::new(
        std::fs::File::create(&jsonl).with_context(|| format!("creating {}", jsonl.display()))?,
    );
    let bar = ProgressBar::new(a.count);
    for i in 0..a.count {
        let (_, caption, img) = if a.held_out {
            d.held_out(i)
        } else {
            d.sample(i)
        };
        let file = format!("{i:06}.png");
        img.save(a.out.join(&file))
            .with_context(|| format!("writing {file}"))?;
        writeln!(
            captions,
            "{}",
            serde_json::json!({"file": file, "caption": caption})
        )?;
        bar.inc(1);
    }
    captions.flush()?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} {} pictures ({}x{}, seed {}) and {}",
        a.count,
        if a.held_out { "held-out" } else { "training" },
        a.side,
        a.side,
        a.seed,
        jsonl.display()
    );
    Ok(())
}

pub fn score(a: ScoreArgs) -> Result<()> {
    for p in &a.images {
        let img = image::open(p)
            .with_context(|| format!("reading {}", p.display()))?
            .to_rgb8();
        let s = veil_eval::score(&img, &a.caption)?;
        let found = veil_eval::detect(&img);
        println!(
            "{}",
            serde_json::json!({
                "image": p.display().to_string(),
                "colour": s.colour, "shape": s.shape, "position": s.position, "size": s.size,
                "detected": found.iter().map(|d| format!("{} {} {} {}",
                    d.size.name(), d.colour.name(), d.shape.name(), d.position.phrase())).collect::<Vec<_>>(),
            })
        );
    }
    Ok(())
}

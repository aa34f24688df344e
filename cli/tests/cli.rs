//! The `veil` command as users and scripts call it: flags, files written, JSON fields.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn veil() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_veil"));
    c.current_dir(root());
    c
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("veil-cli-{}-{name}", std::process::id()))
}

#[test]
fn generate_writes_png_and_stats_with_given_latents() {
    let latents = root().join("tests/fixtures/golden/latents_64px.safetensors");
    let (out, stats) = (tmp("a.png"), tmp("stats.json"));
    let st = veil()
        .args([
            "generate",
            "a small red circle",
            "--model",
            "models/tiny-random",
            "--policy",
            "ppidm",
            "--servers",
            "3",
            "--gn",
            "exact",
        ])
        .args([
            "--steps",
            "3",
            "--guidance",
            "5",
            "--seed",
            "1",
            "--width",
            "64",
            "--height",
            "64",
            "--scheduler",
            "ddim",
        ])
        .arg("--latents")
        .arg(&latents)
        .arg("--out")
        .arg(&out)
        .arg("--stats")
        .arg(&stats)
        .status()
        .expect("run veil");
    assert!(st.success());
    let png = std::fs::read(&out).expect("png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).expect("stats")).expect("json");
    for k in [
        "wall_seconds",
        "steps",
        "bytes_up",
        "bytes_down",
        "round_trips",
    ] {
        assert!(s[k].is_number(), "stats lacks {k}");
    }
    assert_eq!(s["steps"], 3);
    let per = s["per_server"].as_array().expect("per_server");
    assert_eq!(per.len(), 3);
    assert!(per
        .iter()
        .all(|p| p["bytes_up"].as_u64() > Some(0) && p["bytes_down"].as_u64() > Some(0)));

    // The same latents under `local` give the same picture (ppidm exact is lossless).
    let out2 = tmp("b.png");
    let st = veil()
        .args([
            "generate",
            "a small red circle",
            "--policy",
            "local",
            "--steps",
            "3",
            "--width",
            "64",
            "--height",
            "64",
        ])
        .arg("--latents")
        .arg(&latents)
        .arg("--out")
        .arg(&out2)
        .status()
        .expect("run veil");
    assert!(st.success());
    let a = image::open(&out).expect("a").to_rgb8();
    let b = image::open(&out2).expect("b").to_rgb8();
    let max_diff = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0);
    assert!(
        max_diff <= 1,
        "local and ppidm-exact PNGs differ by {max_diff}"
    );
    for p in [out, out2, stats] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn bad_resolution_is_a_clear_error() {
    let o = veil()
        .args([
            "generate", "x", "--width", "60", "--height", "64", "--steps", "1", "--out",
        ])
        .arg(tmp("never.png"))
        .output()
        .expect("run veil");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("60x64 is not a multiple of 8"), "{err}");
}

#[test]
fn unknown_policy_is_a_clear_error() {
    let o = veil()
        .args(["generate", "x", "--policy", "magic"])
        .output()
        .expect("run veil");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown policy `magic`"));
}

#[test]
fn plan_json_has_the_documented_fields() {
    let o = veil()
        .args([
            "plan",
            "--config",
            "models/configs/sd15/unet/config.json",
            "--width",
            "512",
            "--height",
            "512",
        ])
        .args([
            "--servers",
            "4",
            "--policy",
            "ppidm",
            "--wire",
            "f32",
            "--json",
        ])
        .output()
        .expect("run veil");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    for k in [
        "bytes_up_per_step",
        "bytes_down_per_step",
        "round_trips_per_step",
        "phone_flops_per_step",
        "server_flops_per_step",
    ] {
        assert!(p[k].as_u64().is_some_and(|v| v > 0), "{k}");
    }
    // 98 convolutions + 32 attention cores + 61 GroupNorms, one round trip each.
    assert_eq!(p["round_trips_per_step"], 191);
    let table = veil()
        .args([
            "plan",
            "--config",
            "models/configs/sd15/unet/config.json",
            "--servers",
            "4",
            "--policy",
            "ppidm",
        ])
        .output()
        .expect("run veil");
    let t = String::from_utf8_lossy(&table.stdout);
    assert!(
        t.contains("Conv") && t.contains("GN") && t.contains("offloaded"),
        "{t}"
    );
}

#[test]
fn obfuscated_generation_over_a_local_full_model_server() {
    let out = tmp("obf.png");
    let stats = tmp("obf-stats.json");
    let audit = tmp("obf-audit.json");
    let o = veil()
        .args([
            "generate",
            "a photo of an old woman reading",
            "--policy",
            "obfuscated",
            "--local-servers",
            "1",
            "--steps",
            "4",
            "--server-steps",
            "2",
            "--batch-redundancy",
            "shared",
            "--attention-gate",
            "1",
            "--device-model",
            "models/tiny-random",
        ])
        .arg("--out")
        .arg(&out)
        .arg("--stats")
        .arg(&stats)
        .arg("--audit")
        .arg(&audit)
        .output()
        .expect("run veil");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("obfuscated: 6 candidate prompts sent (6 combinations; spans: age `old`, gender `woman`); server ran 2 of 4 steps"),
        "{stderr}"
    );
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats).expect("stats")).expect("json");
    assert_eq!(s["obfuscation"]["candidates"], 6);
    assert_eq!(s["obfuscation"]["device_steps"], 2);
    // Shared uncond: K + 1 rows per server step.
    assert_eq!(s["obfuscation"]["server_unet_rows"], 14);
    assert_eq!(s["round_trips"], 1);
    let a: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&audit).expect("audit")).expect("json");
    assert_eq!(a["policy"], "obfuscated");
    let prompts = a["servers"][0]["prompts"].as_array().expect("prompts");
    assert_eq!(prompts.len(), 7);
    assert!(prompts
        .iter()
        .any(|p| p == "a photo of an old woman reading"));
    assert!(prompts
        .iter()
        .any(|p| p == "a photo of a young man reading"));
    for f in [&out, &stats, &audit] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn strict_generation_writes_the_documented_audit() {
    let out = tmp("strict.png");
    let audit = tmp("strict-audit.json");
    let o = veil()
        .args([
            "generate",
            "a small red circle",
            "--policy",
            "strict",
            "--local-servers",
            "2",
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
        ])
        .arg("--out")
        .arg(&out)
        .arg("--audit")
        .arg(&audit)
        .output()
        .expect("run veil");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("view audit (strict; halo bound 1 row)"),
        "{stderr}"
    );
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&audit).expect("audit")).expect("json");
    assert_eq!(j["format"], "veil-audit/2");
    assert_eq!(j["policy"], "strict");
    assert_eq!(j["unet_calls"], 2);
    let servers = j["servers"].as_array().expect("servers");
    assert_eq!(servers.len(), 2);
    // 64 px: latent 8x8; the strips are the halves, each widened by one halo row.
    assert_eq!(servers[0]["strip"]["8x8"], serde_json::json!([0, 4]));
    assert_eq!(
        servers[0]["received_rows"]["8x8"],
        serde_json::json!([[0, 5]])
    );
    assert_eq!(servers[1]["strip"]["8x8"], serde_json::json!([4, 8]));
    assert_eq!(
        servers[1]["received_rows"]["8x8"],
        serde_json::json!([[3, 8]])
    );
    for s in servers {
        assert_eq!(s["text_indexed_bytes"], 0);
        assert!(s["bytes"].as_u64().is_some_and(|b| b > 0));
    }
    for p in [out, audit] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn eval_quick_writes_every_section_and_its_grids() {
    let dir = tmp("eval");
    let md = dir.join("EVAL.md");
    let figures = dir.join("figures");
    let st = veil()
        .args([
            "eval",
            "--quick",
            "--model",
            "models/tiny-random",
            "--link-steps",
            "0",
        ])
        .arg("--out")
        .arg(&md)
        .arg("--figures")
        .arg(&figures)
        .status()
        .expect("run veil eval");
    assert!(st.success());
    let text = std::fs::read_to_string(&md).expect("EVAL.md");
    for section in [
        "## Utility: prompt adherence",
        "| local | 6 |",
        "## Fidelity against `local`",
        "| strict | 2 | 100.00 / 1.0000 |",
        "### FLOPs and traffic per step",
        "## Attacks: what each server learns",
        "| ppidm | 1 | 0 | both halves |",
        "| strict | 4 | 3 | unconditional half |",
        "| strict | 4 | 0 | both halves |",
        "**`obfuscated`** (one server runs the first steps of K candidate captions",
        "Finishing every candidate itself (2 requests)",
        "## Attacks on whole generations",
        "| strict | 2 | 1 | conditional half |",
    ] {
        assert!(text.contains(section), "missing `{section}` in:\n{text}");
    }
    // The by-scene rows split the same 6 local pictures between one- and two-object captions.
    let prompts_of = |row: &str| -> usize {
        let line = text
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("missing `{row}` in:\n{text}"));
        line[row.len()..]
            .split('|')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no prompt count in `{line}`"))
    };
    assert_eq!(
        prompts_of("| local, one object |") + prompts_of("| local, two objects |"),
        6
    );
    // The link section was skipped on request.
    assert!(!text.contains("5g link"));
    let img = image::open(figures.join("heldout_grid.png")).expect("heldout_grid.png");
    assert!(img.width() > 64 && img.height() > 64);
    let attacks: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(figures.join("attacks.json")).expect("attacks.json"),
    )
    .expect("attacks.json is JSON");
    assert_eq!(attacks["test_pictures"], 6);
    assert!(attacks["settings"]
        .as_array()
        .is_some_and(|s| s.len() == 18));
    let gens: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(figures.join("attacks_generations.json"))
            .expect("attacks_generations.json"),
    )
    .expect("attacks_generations.json is JSON");
    assert_eq!(gens["training_generations"], 24);
    // strict at N = 1, 2 and 4: one row per server.
    assert!(gens["settings"].as_array().is_some_and(|s| s.len() == 7));
    // One section regenerated in place: the others are kept byte for byte. The training
    // section is made stale first, so the rerun has to write it back.
    let (open, close) = (
        "<!-- veil-eval:training -->",
        "<!-- /veil-eval:training -->",
    );
    let (Some(i), Some(j)) = (text.find(open), text.find(close)) else {
        panic!("no training section in:\n{text}");
    };
    let mut stale = text.clone();
    stale.replace_range(i + open.len()..j, "\nstale\n");
    std::fs::write(&md, &stale).expect("write a stale EVAL.md");
    let st = veil()
        .args([
            "eval",
            "--quick",
            "--model",
            "models/tiny-random",
            "--sections",
            "training",
        ])
        .arg("--out")
        .arg(&md)
        .arg("--figures")
        .arg(&figures)
        .status()
        .expect("run veil eval --sections");
    assert!(st.success());
    let again = std::fs::read_to_string(&md).expect("EVAL.md");
    assert_eq!(again, text);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn obfuscate_json_lists_spans_and_candidates() {
    let prompt = "a 25-year-old woman reading";
    let out = veil()
        .args(["obfuscate", prompt, "--json"])
        .output()
        .expect("run veil obfuscate");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let spans = v["spans"].as_array().expect("spans");
    assert_eq!(spans.len(), 2);
    assert_eq!(spans[0]["category"], "age");
    assert_eq!(spans[0]["text"], "25-year-old");
    assert_eq!(spans[0]["start"], 2);
    assert_eq!(spans[0]["end"], 13);
    assert_eq!(spans[1]["category"], "gender");
    let c: Vec<&str> = v["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .map(|c| c.as_str().expect("string"))
        .collect();
    assert_eq!(c.len(), 6, "3 ages × 2 genders");
    assert!(c.contains(&"a young woman reading"));
    assert!(c.contains(&"an old man reading"), "{c:?}");

    // A colour lexicon for the shapes model, without the built-in one.
    let lex = tmp("colours.toml");
    std::fs::write(
        &lex,
        "[[category]]\nname = \"colour\"\n[[category.value]]\nname = \"red\"\ncanonical = \"red\"\nphrases = [\"red\"]\n[[category.value]]\nname = \"blue\"\ncanonical = \"blue\"\nphrases = [\"blue\"]\n",
    )
    .expect("write lexicon");
    let out = veil()
        .args([
            "obfuscate",
            "a red circle",
            "--json",
            "--no-builtin",
            "--lexicon",
        ])
        .arg(&lex)
        .output()
        .expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["candidates"].as_array().map(|a| a.len()), Some(2));
    let _ = std::fs::remove_file(lex);
}

/// `veil obfuscate --json` with a key file: the candidates as a sorted list.
fn candidate_set(prompt: &str, key: &std::path::Path) -> Vec<String> {
    let out = veil()
        .args(["obfuscate", prompt, "--json", "--k-max", "4", "--key-file"])
        .arg(key)
        .output()
        .expect("run veil obfuscate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let mut c: Vec<String> = v["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .map(|c| c.as_str().expect("string").to_string())
        .collect();
    c.sort();
    c
}

#[test]
fn a_key_file_keeps_the_candidate_set_across_runs() {
    // 2 genders × 3 ages × 5 ethnicities = 30 combinations, 4 sent.
    let prompt = "a portrait of a young asian woman";
    let key = tmp("user.key");
    let _ = std::fs::remove_file(&key);
    // The first run creates the key file (0600), the second reads it: the same four.
    let first = candidate_set(prompt, &key);
    assert_eq!(first.len(), 4);
    assert!(first.contains(&"a portrait of a young Asian woman".to_string()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key)
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(candidate_set(prompt, &key), first);
    // Two other users' keys send other sets for the same prompt.
    let (a, b) = (tmp("a.key"), tmp("b.key"));
    for (path, byte) in [(&a, "01"), (&b, "02")] {
        let text = format!("veil-obfuscation-key-v1\n{}\n", byte.repeat(32));
        std::fs::write(path, text).expect("write key");
    }
    let (set_a, set_b) = (candidate_set(prompt, &a), candidate_set(prompt, &b));
    assert_eq!(set_a, candidate_set(prompt, &a));
    assert_ne!(set_a, set_b, "two keys chose the same set");
    // `generate --key-file` sends the set `obfuscate --key-file` prints.
    let audit = tmp("key-audit.json");
    let o = veil()
        .args(["generate", prompt, "--policy", "obfuscated", "--steps", "2"])
        .args(["--k-max", "4", "--out"])
        .arg(tmp("key.png"))
        .arg("--audit")
        .arg(&audit)
        .arg("--key-file")
        .arg(&a)
        .output()
        .expect("run veil generate");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&audit).expect("audit")).expect("json");
    let mut sent: Vec<String> = v["servers"][0]["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .filter_map(|p| p.as_str().filter(|p| !p.is_empty()).map(String::from))
        .collect();
    sent.sort();
    assert_eq!(sent, set_a);
    // A file that is not a key is refused and left as it was.
    std::fs::write(&a, "veil-obfuscation-key-v1\nabcd\n").expect("write");
    let out = veil()
        .args(["obfuscate", prompt, "--key-file"])
        .arg(&a)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("4 hex digits"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&a).expect("read"),
        "veil-obfuscation-key-v1\nabcd\n"
    );
    for p in [key, a, b, audit, tmp("key.png")] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn compare_prints_the_psnr_and_enforces_a_floor() {
    let (a, b) = (tmp("cmp-a.png"), tmp("cmp-b.png"));
    let mut x = image::RgbImage::new(8, 8);
    x.put_pixel(1, 1, image::Rgb([200, 10, 10]));
    x.save(&a).expect("a");
    let mut y = x.clone();
    y.put_pixel(2, 2, image::Rgb([20, 0, 0]));
    y.save(&b).expect("b");
    let same = veil()
        .args(["compare"])
        .arg(&a)
        .arg(&a)
        .output()
        .expect("run");
    assert!(same.status.success());
    assert_eq!(
        String::from_utf8_lossy(&same.stdout).trim(),
        "psnr_db 100.00 max_pixel_difference 0"
    );
    let differ = veil()
        .args(["compare"])
        .arg(&a)
        .arg(&b)
        .output()
        .expect("run");
    let out = String::from_utf8_lossy(&differ.stdout).to_string();
    // One channel of one of 64 pixels off by 20: MSE = 400 / 192, PSNR = 10·log10(255² / MSE).
    assert!(out.contains("max_pixel_difference 20"), "{out}");
    assert!(out.contains("psnr_db 44.94"), "{out}");
    let floor = veil()
        .args(["compare", "--min-psnr", "50"])
        .arg(&a)
        .arg(&b)
        .output()
        .expect("run");
    assert!(!floor.status.success(), "a PSNR under the floor fails");
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
}

//! The layering of veil-core, checked on its source: each top-level module imports only modules
//! of lower layers (docs/ARCHITECTURE.md), so there is no import cycle between them; and no
//! source file grows past the size a reader can hold. `cargo test` (and so CI) fails on a
//! violation, naming the file and line.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The layers, bottom first. A module may import modules of lower layers only; modules of the
/// same layer are independent of each other.
const LAYERS: &[&[&str]] = &[
    &["vocab"],
    &["model", "obfuscation"],
    &["placement"],
    &["wire"],
    &["transport"],
    &["client"],
    &["sdk"],
];

/// Longest source file, in lines.
const MAX_FILE_LINES: usize = 800;

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .expect("read core/src")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            source_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The line without its `//` comment (a `//` inside a string literal is rare in `use` paths and
/// only makes this check stricter).
fn code_of(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// The top-level modules a line names through `crate::`, including `crate::{a, b::c}` groups.
fn crate_refs(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let preceded_by_ident = rest[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[i + "crate::".len()..];
        if preceded_by_ident {
            continue; // e.g. `veil_crate::`, not this crate
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

#[test]
fn each_module_imports_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut edges: BTreeMap<(String, String), usize> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or_default();
        let module = first.trim_end_matches(".rs");
        if module == "lib" {
            continue;
        }
        let Some(own) = layer_of(module) else {
            violations.push(format!(
                "{}: module `{module}` is in no layer of tests/layers.rs",
                rel.display()
            ));
            continue;
        };
        let text = fs::read_to_string(file).expect("read source");
        for (n, line) in text.lines().enumerate() {
            for target in crate_refs(code_of(line)) {
                if target == module {
                    continue;
                }
                *edges
                    .entry((module.to_string(), target.clone()))
                    .or_default() += 1;
                match layer_of(&target) {
                    Some(l) if l < own => {}
                    Some(l) => violations.push(format!(
                        "{}:{}: `{module}` (layer {own}) imports `{target}` (layer {l})",
                        rel.display(),
                        n + 1
                    )),
                    None => violations.push(format!(
                        "{}:{}: `crate::{target}` is in no layer",
                        rel.display(),
                        n + 1
                    )),
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layer violations (a module may import only lower layers):\n{}",
        violations.join("\n")
    );
    // The check must have seen the imports it guards (a parser that finds nothing passes
    // everything): the U-Net's runtime imports the model, the client imports the runtime.
    for (from, to) in [
        ("placement", "model"),
        ("client", "placement"),
        ("sdk", "client"),
    ] {
        assert!(
            edges.contains_key(&(from.to_string(), to.to_string())),
            "expected `{from}` to import `{to}`; seen: {edges:?}"
        );
    }
}

/// The module path of a source file (`placement/runtime/mod.rs` → `placement::runtime`).
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .components()
        .filter_map(|c| c.as_os_str().to_str().map(str::to_string))
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs");
        if stem != "mod" && stem != "lib" {
            parts.push(stem.to_string());
        }
    }
    parts
}

/// The full `crate::` paths a line names (groups expanded one level), and `super::` paths
/// resolved against `module`.
fn full_paths(code: &str, module: &[String]) -> Vec<Vec<String>> {
    let ident = |s: &str| -> Vec<String> {
        s.split("::")
            .map(|p| {
                p.trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|p| !p.is_empty())
            .collect()
    };
    let mut out = Vec::new();
    // `super` is the parent module (of `a/b/mod.rs`, which is `a::b`, and of `a/b.rs` alike).
    let parent = module[..module.len().saturating_sub(1)].to_vec();
    for (prefix, base) in [("crate::", Vec::new()), ("super::", parent)] {
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().next_back();
            rest = &rest[i + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let (head, group) = match rest.find("::{") {
                Some(g) if !rest[..g].contains([';', ' ', '(']) => {
                    let end = rest[g + 3..].find('}').map_or(rest.len(), |e| g + 3 + e);
                    (&rest[..g], Some(&rest[g + 3..end]))
                }
                _ => (rest, None),
            };
            let mut p = base.clone();
            p.extend(ident(head));
            match group {
                Some(items) => {
                    for item in items.split(',') {
                        let mut q = p.clone();
                        q.extend(ident(item));
                        out.push(q);
                    }
                }
                None => out.push(p),
            }
        }
    }
    out
}

#[test]
fn no_import_cycle_between_any_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let modules: Vec<Vec<String>> = files
        .iter()
        .map(|f| module_path(f.strip_prefix(&src).expect("under src")))
        .collect();
    // An edge from each file's module to the deepest module a path it names lies in.
    let mut edges: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for (file, module) in files.iter().zip(&modules) {
        let text = fs::read_to_string(file).expect("read source");
        let from = module.join("::");
        for line in text.lines() {
            for path in full_paths(code_of(line), module) {
                let target = (1..=path.len())
                    .rev()
                    .map(|n| &path[..n])
                    .find(|p| modules.iter().any(|m| m.as_slice() == *p));
                if let Some(t) = target {
                    let to = t.join("::");
                    // A child naming its ancestors' items (`use super::*`, a facade's
                    // re-exports) is how Rust modules nest, not a cycle; every other edge
                    // between two modules counts.
                    let ancestor = to.is_empty() || from.starts_with(&format!("{to}::"));
                    if to != from && !ancestor {
                        edges.entry(from.clone()).or_default().insert(to);
                    }
                }
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, std::collections::BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for n in edges.get(m).into_iter().flatten() {
            match state.get(n.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == n).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(n.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(n, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in edges.keys() {
        if state.get(m.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(cycle) = visit(m, &edges, &mut state, &mut Vec::new()) {
                panic!("import cycle: {}", cycle.join(" → "));
            }
        }
    }
    // The walk saw the imports it guards.
    assert!(edges
        .get("client::hybrid")
        .is_some_and(|t| t.contains("client::pipeline")));
}

#[test]
fn the_import_parser_sees_every_form() {
    assert_eq!(crate_refs("use crate::model::unet::UNet;"), ["model"]);
    assert_eq!(
        crate_refs("use crate::{vocab::error::Error, placement};"),
        ["vocab", "placement"]
    );
    assert_eq!(
        crate_refs("let x = crate::client::plan::account_step(a, crate::wire::ALPN);"),
        ["client", "wire"]
    );
    assert!(crate_refs("use veil_crate::x;").is_empty());
    assert_eq!(code_of("use a; // crate::sdk"), "use a; ");
    let m = vec![
        "placement".to_string(),
        "runtime".to_string(),
        "strips".to_string(),
    ];
    assert_eq!(
        full_paths("use super::*;", &m),
        vec![vec!["placement".to_string(), "runtime".to_string()]]
    );
    assert_eq!(
        full_paths("use crate::client::{pipeline::X, plan};", &m),
        vec![
            vec![
                "client".to_string(),
                "pipeline".to_string(),
                "X".to_string()
            ],
            vec!["client".to_string(), "plan".to_string()],
        ]
    );
}

#[test]
fn no_source_file_is_longer_than_its_reader_can_hold() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = fs::read_to_string(f).expect("read").lines().count();
            (n > MAX_FILE_LINES).then(|| format!("{}: {n} lines", f.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "files over {MAX_FILE_LINES} lines:\n{}",
        long.join("\n")
    );
}

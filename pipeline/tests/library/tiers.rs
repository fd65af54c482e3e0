//! The library's tiers (docs/design.md): every `crate::` path in `pipeline/src` points to the
//! same or a lower tier, and the modules form no import cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Tier of each top-level module, lowest first.
const TIERS: &[(&str, u32)] = &[
    ("infra", 0),
    ("dataset", 1),
    ("text", 1),
    ("formats", 2),
    ("models", 3),
    ("networks", 4),
    ("stages", 5),
    ("cli", 6),
];

fn tier(module: &str) -> u32 {
    let top = module.split("::").next().unwrap_or_default();
    TIERS
        .iter()
        .find(|(name, _)| *name == top)
        .map(|(_, rank)| *rank)
        .unwrap_or_else(|| panic!("module {top} is in no tier: add it to TIERS and docs/design.md"))
}

fn source_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The module a file belongs to, at most two levels deep (`stages/lint_dataset/stale.rs` ->
/// `stages::lint_dataset`, `dataset/mod.rs` -> `dataset`).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.truncate(2);
    parts.join("::")
}

/// Every path named after `crate::`, with `use crate::{a, b::c}` groups expanded (first two
/// segments of each).
fn crate_paths(text: &str) -> Vec<String> {
    let code: String = text
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut paths = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map(|(i, _)| i)
                .unwrap_or(group.len());
            let mut item = String::new();
            let mut nesting = 0;
            for c in group[..end].chars().chain([',']) {
                match c {
                    '{' => nesting += 1,
                    '}' => nesting -= 1,
                    ',' if nesting == 0 => {
                        paths.push(std::mem::take(&mut item).trim().to_string());
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
        } else {
            let path: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            paths.push(path);
        }
    }
    paths
        .into_iter()
        .filter(|p| p.starts_with(|c: char| c.is_ascii_lowercase()))
        .map(|p| {
            let segments: Vec<&str> = p
                .split("::")
                .take(2)
                .take_while(|s| s.starts_with(|c: char| c.is_ascii_lowercase()) && s != &"self")
                .collect();
            segments.join("::")
        })
        .filter(|p| !p.is_empty())
        .collect()
}

#[test]
fn imports_point_only_downward_and_modules_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .filter(|f| !f.ends_with("lib.rs"))
        .map(|f| module_of(&src, f))
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut upward = Vec::new();
    for file in files.iter().filter(|f| !f.ends_with("lib.rs")) {
        let from = module_of(&src, file);
        let text = std::fs::read_to_string(file).unwrap();
        for path in crate_paths(&text) {
            let to = if modules.contains(&path) {
                path.clone()
            } else {
                path.split("::").next().unwrap().to_string()
            };
            if tier(&to) > tier(&from) {
                upward.push(format!(
                    "{} uses crate::{path} (tier {} above tier {})",
                    file.strip_prefix(&src).unwrap().display(),
                    tier(&to),
                    tier(&from)
                ));
            }
            if to != from {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));

    // Depth-first search for a back edge; reports the cycle it closes.
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, bool>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(node) {
            Some(true) => return None,
            Some(false) => {
                let start = stack.iter().position(|n| n == node).unwrap();
                let mut cycle = stack[start..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            None => {}
        }
        state.insert(node.to_string(), false);
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, state, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        state.insert(node.to_string(), true);
        None
    }
    let mut state = BTreeMap::new();
    for module in &modules {
        let cycle = visit(module, &edges, &mut state, &mut Vec::new());
        assert!(
            cycle.is_none(),
            "import cycle: {}",
            cycle.unwrap().join(" -> ")
        );
    }
}

#[test]
fn the_checker_sees_grouped_and_inline_paths() {
    let text = "use crate::{infra::fsio, dataset, Error};\n// crate::stages in a comment\nlet x = crate::formats::npz::read();";
    assert_eq!(
        crate_paths(text),
        ["infra::fsio", "dataset", "formats::npz"]
    );
}

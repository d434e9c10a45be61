//! The API's modules must not import each other in a cycle (a handler module importing the
//! startup that imports every handler is how the 13-module knot of issue 26 grew). This test
//! reads the sources, takes an edge for every `crate::…` and `super::…` path outside test
//! modules, and fails on any strongly connected group of two or more modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every module of `src` (by path, `crate` for lib.rs) with its code: no comments, no test modules.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("readable source directory") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                if !path.ends_with("bin") {
                    dirs.push(path);
                }
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src").with_extension("");
            let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            let name = if parts == ["lib"] { "crate".to_owned() } else { parts.join("::") };
            let text = std::fs::read_to_string(&path).expect("readable source");
            // Comments name modules without importing them.
            let code = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
            let text = code.split("#[cfg(test)]").next().unwrap_or_default().to_owned();
            found.insert(name, text);
        }
    }
    found
}

/// The paths that follow each `marker` in `text`: `a::b::c`, and each item of `{a, b::c}`.
fn paths_after(text: &str, marker: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for (at, _) in text.match_indices(marker) {
        let rest = &text[at + marker.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            paths.extend(inner.split(',').map(|item| item.trim().split([' ', '{']).next().unwrap_or_default().trim_end_matches(':').to_owned()));
        } else {
            let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
            paths.push(rest[..end].trim_end_matches(':').to_owned());
        }
    }
    paths
}

/// The longest module named by a prefix of `path`.
fn resolve<'a>(names: &'a BTreeSet<String>, path: &str) -> Option<&'a String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len()).rev().find_map(|n| names.get(&parts[..n].join("::")))
}

#[test]
fn the_api_modules_import_each_other_without_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    let names: BTreeSet<String> = modules.keys().filter(|m| *m != "crate").cloned().collect();
    assert!(names.len() > 20, "found only {names:?}");
    let mut edges: BTreeMap<&String, BTreeSet<&String>> = BTreeMap::new();
    for (module, text) in &modules {
        if module == "crate" {
            continue;
        }
        let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
        let targets = paths_after(text, "crate::")
            .into_iter()
            .chain(paths_after(text, "super::").into_iter().map(|p| if parent.is_empty() { p } else { format!("{parent}::{p}") }));
        let entry = edges.entry(module).or_default();
        for target in targets.filter_map(|p| resolve(&names, &p)) {
            if target != module {
                entry.insert(target);
            }
        }
    }
    // A cycle exists exactly when some module reaches itself again.
    for start in edges.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(&String, Vec<&String>)> = vec![(start, vec![start])];
        while let Some((at, path)) = stack.pop() {
            for next in edges.get(at).into_iter().flatten() {
                assert!(next != start, "import cycle: {}", path.iter().chain([next]).map(|m| m.as_str()).collect::<Vec<_>>().join(" -> "));
                if seen.insert(*next) {
                    stack.push((next, [path.clone(), vec![next]].concat()));
                }
            }
        }
    }
}

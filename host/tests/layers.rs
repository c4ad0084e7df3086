//! The host crate's folders are layers: each imports only the ones below it, so there is no
//! import cycle between them, and the two engines never name each other or the control plane.
//! Inside a folder, files import each other without a cycle too. This reads `host/src` as
//! text, so a new upward `crate::` path fails here with its file and line, before a reviewer
//! has to spot it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module's layer, lowest first. A module may import modules of lower layers
/// only; modules that share a layer (the two engines, store and telemetry) never import each
/// other.
const LAYERS: &[&[&str]] = &[
    &["util", "sdk"],
    &["proto"],
    &["store", "telemetry"],
    &["function"],
    &["wasm", "native"],
    &["control", "sandboxes"],
    &["api"],
    &["serve"],
    &["cli"],
    &["bench"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// Every `.rs` file below `dir`.
fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The top-level module a file belongs to: `wasm/http.rs` -> `wasm`, `util.rs` -> `util`.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap();
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_string()
}

/// The top-level modules a line names through `crate::`, outside comments.
fn named_modules(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or_default();
    code.match_indices("crate::")
        .map(|(at, prefix)| {
            code[at + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

#[test]
fn every_module_imports_only_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut upward = Vec::new();
    let mut edges: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = module_of(&src, file);
        if from == "main" || from == "lib" {
            continue;
        }
        let from_layer = layer_of(&from).unwrap_or_else(|| {
            panic!(
                "{} is in no layer: add its module to LAYERS",
                file.display()
            )
        });
        let text = std::fs::read_to_string(file).unwrap();
        for (number, line) in text.lines().enumerate() {
            for to in named_modules(line) {
                if to == from {
                    continue;
                }
                let to_layer = layer_of(&to)
                    .unwrap_or_else(|| panic!("{}: crate::{to} is in no layer", file.display()));
                edges.entry(from.clone()).or_default().insert(to.clone());
                if to_layer >= from_layer {
                    upward.push(format!(
                        "{}:{}: {from} imports {to}",
                        file.strip_prefix(&src).unwrap().display(),
                        number + 1
                    ));
                }
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that do not point down a layer:\n  {}",
        upward.join("\n  ")
    );
    // What the picture in lib.rs and the README promises, spelled out.
    for engine in ["wasm", "native"] {
        let named = edges.get(engine).cloned().unwrap_or_default();
        for forbidden in [
            "wasm",
            "native",
            "control",
            "sandboxes",
            "api",
            "serve",
            "cli",
            "bench",
        ] {
            assert!(
                forbidden == engine || !named.contains(forbidden),
                "{engine} imports {forbidden}"
            );
        }
    }
}

/// A file's module path: `wasm/http.rs` -> `wasm::http`, `wasm/mod.rs` -> `wasm`.
fn module_path(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|last| last == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// The modules a file's code names, each with the first line that does: `crate::` paths
/// resolved to the longest module they start with, `super::` (outside tests) as the parent,
/// and a `mod.rs` file's `use child::...` as the child.
fn file_edges(module: &str, text: &str, modules: &BTreeSet<String>) -> BTreeMap<String, usize> {
    let mut edges = BTreeMap::new();
    let parent = module
        .rsplit_once("::")
        .map(|(parent, _)| parent.to_string());
    let mut in_tests = false;
    for (number, line) in text.lines().enumerate() {
        if line.starts_with("#[cfg(test)]") {
            in_tests = true;
        }
        let code = line.split("//").next().unwrap_or_default();
        let mut named = Vec::new();
        for (at, prefix) in code.match_indices("crate::") {
            let path: String = code[at + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
            let longest = (1..=parts.len())
                .rev()
                .map(|n| parts[..n].join("::"))
                .find(|candidate| modules.contains(candidate));
            named.extend(longest);
        }
        if !in_tests
            && code.contains("super::")
            && let Some(parent) = &parent
        {
            named.push(parent.clone());
        }
        if let Some(child) = code.trim_start().strip_prefix("use ") {
            let first = child.split("::").next().unwrap_or_default();
            let child = format!("{module}::{first}");
            if !module.is_empty() && modules.contains(&child) {
                named.push(child);
            }
        }
        for to in named {
            if to != module {
                edges.entry(to).or_insert(number + 1);
            }
        }
    }
    edges
}

#[test]
fn no_two_files_import_each_other_even_through_others() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let paths: BTreeMap<String, PathBuf> = files
        .iter()
        .filter(|f| !f.ends_with("main.rs") && !f.ends_with("lib.rs"))
        .map(|f| (module_path(&src, f), f.clone()))
        .collect();
    let modules: BTreeSet<String> = paths.keys().cloned().collect();
    let graph: BTreeMap<String, BTreeMap<String, usize>> = paths
        .iter()
        .map(|(module, file)| {
            let text = std::fs::read_to_string(file).unwrap();
            (module.clone(), file_edges(module, &text, &modules))
        })
        .collect();
    // A cycle exists where a module reaches itself; report each one with the lines that close it.
    let mut cycles = Vec::new();
    for start in graph.keys() {
        let mut seen = BTreeSet::new();
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        while let Some((at, trail)) = stack.pop() {
            for next in graph[&at].keys() {
                if next == start {
                    let steps: Vec<String> = trail
                        .iter()
                        .zip(trail.iter().skip(1).chain([start]))
                        .map(|(a, b)| {
                            format!("{a} -> {b} ({}:{})", paths[a].display(), graph[a][b])
                        })
                        .collect();
                    cycles.push(steps.join(", "));
                } else if seen.insert(next.clone()) {
                    let mut longer = trail.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles:\n  {}",
        cycles.join("\n  ")
    );
}

#[test]
fn lines_name_modules_through_crate_paths_only_in_code() {
    assert_eq!(
        named_modules("use crate::wasm::engine::GuestState; // crate::control"),
        ["wasm"]
    );
    assert_eq!(
        named_modules("let a = crate::util::now_ms() + crate::proto::x;"),
        ["util", "proto"]
    );
    assert!(named_modules("/// See [`crate::control`].").is_empty());
}

#[test]
fn files_name_modules_by_crate_paths_super_and_child_uses() {
    let modules: BTreeSet<String> = ["api", "api::error", "control", "wasm", "wasm::guest"]
        .map(String::from)
        .into();
    let text = "use error::ApiError;\nuse crate::wasm::guest::GuestState;\n// crate::control\n";
    let edges = file_edges("api", text, &modules);
    assert_eq!(
        edges.into_iter().collect::<Vec<_>>(),
        [
            ("api::error".to_string(), 1),
            ("wasm::guest".to_string(), 2)
        ]
    );
    let text = "use super::*;\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n";
    let edges = file_edges("wasm::guest", text, &modules);
    assert_eq!(
        edges.into_iter().collect::<Vec<_>>(),
        [("wasm".to_string(), 1)]
    );
}

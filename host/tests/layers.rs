//! The host crate's folders are layers: each imports only the ones below it, so there is no
//! import cycle between them, and the two engines never name each other or the control plane.
//! This reads `host/src` as text, so a new upward `crate::` path fails here with its file and
//! line, before a reviewer has to spot it.

use std::collections::BTreeMap;
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
    &["control"],
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
        for forbidden in ["wasm", "native", "control", "api", "serve", "cli", "bench"] {
            assert!(
                forbidden == engine || !named.contains(forbidden),
                "{engine} imports {forbidden}"
            );
        }
    }
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

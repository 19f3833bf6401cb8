//! The layout tour in `src/lib.rs` is true of the code: every module sits in one layer, uses only
//! its own layer and the layers below, no modules form an import cycle, only the server wiring
//! uses the proxy glue, and no module below the glue touches Pingora's proxy crate.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers of the tour, bottom first: (layer title, modules).
fn tour_layers(lib_rs: &str) -> Vec<(String, Vec<String>)> {
    let mut layers: Vec<(String, Vec<String>)> = Vec::new();
    let mut in_item = false;
    for line in lib_rs.lines() {
        let Some(text) = line.strip_prefix("//!") else {
            continue;
        };
        let text = text.trim();
        let starts_layer = text
            .split_once(". ")
            .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if starts_layer {
            let title = text.split("**").nth(1).unwrap_or(text).to_string();
            layers.push((title, Vec::new()));
            in_item = true;
        } else if text.is_empty() {
            in_item = false;
        }
        if in_item {
            if let Some((_, mods)) = layers.last_mut() {
                mods.extend(linked_modules(text));
            }
        }
    }
    layers
}

/// Module names in intra-doc links such as [`keys`] or [`keys::KeyPool`] (first segment).
fn linked_modules(text: &str) -> Vec<String> {
    text.split("[`")
        .skip(1)
        .filter_map(|rest| rest.split_once("`]").map(|(inner, _)| inner))
        .map(|inner| inner.split("::").next().unwrap_or(inner).to_string())
        .filter(|m| m.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect()
}

/// `pub mod` declarations of `src/lib.rs`.
fn declared_modules(lib_rs: &str) -> BTreeSet<String> {
    lib_rs
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect()
}

/// Source text with comments and string literals removed, so that prose never counts as an
/// import.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("//") {
            rest = after.find('\n').map_or("", |i| &after[i..]);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |i| &after[i + 2..]);
        } else if rest.starts_with("'\"'") {
            rest = &rest[3..]; // the quote character itself
        } else if rest.starts_with("'\\\"'") {
            rest = &rest[4..];
        } else if let Some(len) = raw_string_len(rest) {
            out.push_str("\"\"");
            rest = &rest[len..];
        } else if rest.starts_with('"') {
            // Skip a string literal whole: it may contain `//` (URLs) or `crate::` (messages).
            let bytes = rest.as_bytes();
            let mut i = 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            out.push_str("\"\"");
            rest = rest.get(i + 1..).unwrap_or("");
        } else {
            let ch = rest.chars().next().unwrap();
            out.push(ch);
            rest = &rest[ch.len_utf8()..];
        }
    }
    out
}

/// The length of a raw string literal (`r"…"`, `r#"…"#`, `br##"…"##`) at the start of `text`.
fn raw_string_len(text: &str) -> Option<usize> {
    let body = text.strip_prefix("br").or_else(|| text.strip_prefix('r'))?;
    let hashes = body.len() - body.trim_start_matches('#').len();
    let open = &body[hashes..];
    let inner = open.strip_prefix('"')?;
    let close = format!("\"{}", "#".repeat(hashes));
    let end = inner.find(&close)?;
    Some(text.len() - inner.len() + end + close.len())
}

/// Top-level keygate modules a file's code names through `crate::`.
fn crate_references(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let after = &code[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            // `use crate::{a, b::c}`: the first segment of each item.
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            for item in inner.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

struct Module {
    uses: BTreeSet<String>,
    uses_pingora_proxy: bool,
}

/// Every top-level module of the library with what its files use.
fn modules(src: &Path, declared: &BTreeSet<String>) -> BTreeMap<String, Module> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut mods: BTreeMap<String, Module> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let name = first.trim_end_matches(".rs").to_string();
        if !declared.contains(&name) {
            continue; // lib.rs, main.rs
        }
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        let m = mods.entry(name.clone()).or_insert(Module {
            uses: BTreeSet::new(),
            uses_pingora_proxy: false,
        });
        m.uses.extend(
            crate_references(&code)
                .into_iter()
                .filter(|d| d != &name && declared.contains(d)),
        );
        m.uses_pingora_proxy |= code.contains("pingora_proxy");
    }
    mods
}

/// A cycle through `start`, if the graph has one.
fn find_cycle(graph: &BTreeMap<String, Module>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, Module>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = path.iter().position(|p| p == node) {
            let mut cycle = path[pos..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).map(|m| &m.uses).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

struct Layout {
    layers: Vec<(String, Vec<String>)>,
    modules: BTreeMap<String, Module>,
    declared: BTreeSet<String>,
}

fn layout() -> Layout {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib_rs = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let declared = declared_modules(&lib_rs);
    Layout {
        layers: tour_layers(&lib_rs),
        modules: modules(&root.join("src"), &declared),
        declared,
    }
}

impl Layout {
    fn layer_of(&self, module: &str) -> Option<usize> {
        self.layers
            .iter()
            .position(|(_, m)| m.iter().any(|x| x == module))
    }
}

#[test]
fn every_module_sits_in_exactly_one_layer_of_the_tour() {
    let l = layout();
    assert!(
        l.layers.len() >= 3,
        "the tour lists its layers: {:?}",
        l.layers
    );
    for m in &l.declared {
        let count = l.layers.iter().filter(|(_, ms)| ms.contains(m)).count();
        assert_eq!(
            count, 1,
            "module `{m}` appears in {count} layers of the tour"
        );
    }
    for (title, ms) in &l.layers {
        for m in ms {
            assert!(
                l.declared.contains(m),
                "layer {title} names `{m}`, which is not a module"
            );
        }
    }
}

#[test]
fn modules_use_only_their_own_layer_and_the_layers_below() {
    let l = layout();
    let mut wrong = Vec::new();
    for (name, m) in &l.modules {
        let own = l.layer_of(name).unwrap();
        for used in &m.uses {
            let theirs = l.layer_of(used).unwrap();
            if theirs > own {
                wrong.push(format!(
                    "`{name}` ({}) uses `{used}` ({})",
                    l.layers[own].0, l.layers[theirs].0
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layout:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_modules_import_each_other_in_a_cycle() {
    let l = layout();
    if let Some(cycle) = find_cycle(&l.modules) {
        panic!("import cycle: {}", cycle.join(" → "));
    }
}

#[test]
fn only_the_server_wiring_uses_the_proxy_glue() {
    let l = layout();
    let users: Vec<&String> = l
        .modules
        .iter()
        .filter(|(_, m)| m.uses.contains("proxy"))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(users, vec!["server"], "modules that use `proxy`");
}

#[test]
fn modules_below_the_glue_never_touch_pingoras_proxy_crate() {
    let l = layout();
    let glue = l.layer_of("proxy").unwrap();
    let offenders: Vec<&String> = l
        .modules
        .iter()
        .filter(|(n, m)| m.uses_pingora_proxy && l.layer_of(n).unwrap() < glue)
        .map(|(n, _)| n)
        .collect();
    assert!(
        offenders.is_empty(),
        "decision modules that use pingora_proxy: {offenders:?}"
    );
}

#[test]
fn the_checker_sees_imports_cycles_and_ignores_prose() {
    let code = code_only(
        "use crate::{keys::KeyPool, clock};\n// crate::proxy in a comment\nlet s = \"crate::server\";\nlet q = '\"'; let r = r#\"crate::cli \"quoted\"\"#;\nfn f() { crate::routes::x(); }",
    );
    let refs = crate_references(&code);
    let want: BTreeSet<String> = ["keys", "clock", "routes"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(refs, want);
    let mut graph = BTreeMap::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a")] {
        graph.insert(
            a.to_string(),
            Module {
                uses: [b.to_string()].into(),
                uses_pingora_proxy: false,
            },
        );
    }
    assert!(find_cycle(&graph).is_some());
    graph.get_mut("c").unwrap().uses.clear();
    assert!(find_cycle(&graph).is_none());
    let layers = tour_layers("//! 1. **Low**: [`clock`] and\n//!    [`glob`].\n//!\n//! 2. **High**: [`keys::KeyPool`].\n");
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[0].1, vec!["clock", "glob"]);
    assert_eq!(layers[1].1, vec!["keys"]);
}

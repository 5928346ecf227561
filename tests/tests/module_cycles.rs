//! No crate's modules form a cycle, and neither do the domain's services
//! (`core/src/domain`: `Domain` in mod.rs, extended by one module per
//! service, may name only modules that do not name it back). Crates cannot
//! depend on each other in a cycle, but modules of one crate can; this test
//! refuses it, from the sources' paths (tests modules left out).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The module in `dir` that `path` belongs to: its first component there.
fn node_of(dir: &Path, path: &Path) -> String {
    let relative = path.strip_prefix(dir).unwrap();
    let first = relative.components().next().unwrap().as_os_str();
    first.to_string_lossy().trim_end_matches(".rs").to_owned()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// Lower-case path segments that follow `prefix` in `code`.
fn named_after<'a>(code: &'a str, prefix: &'a str) -> impl Iterator<Item = String> + 'a {
    code.match_indices(prefix).filter_map(move |(at, _)| {
        let before = code[..at].chars().next_back();
        if prefix.ends_with("::")
            && before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
        {
            return None;
        }
        let name: String = code[at + prefix.len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        Some(name)
    })
}

fn non_test_code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap()
        .to_owned()
}

/// A crate's top-level modules → the top-level modules each names.
fn crate_graph(src: &Path) -> Graph {
    let mut graph = Graph::new();
    for path in rust_files(src) {
        let node = node_of(src, &path);
        if node == "lib" || node == "main" {
            continue;
        }
        let code = non_test_code(&path);
        let names = graph.entry(node.clone()).or_default();
        names
            .extend(named_after(&code, "crate::").filter(|name| *name != node && !name.is_empty()));
    }
    graph
}

/// The modules of one module directory (its mod.rs as "mod") → the
/// siblings each names; naming the parent's items counts as naming "mod".
fn module_dir_graph(dir: &Path, crate_path: &str) -> Graph {
    let files = rust_files(dir);
    let siblings: BTreeSet<String> = files.iter().map(|path| node_of(dir, path)).collect();
    let mut graph = Graph::new();
    for path in &files {
        let node = node_of(dir, path);
        let code = non_test_code(path);
        let sibling_or_parent = |name: String| {
            if siblings.contains(&name) {
                name
            } else {
                "mod".to_owned()
            }
        };
        let mut names: BTreeSet<String> = named_after(&code, "super::")
            .chain(named_after(&code, crate_path))
            .map(sibling_or_parent)
            .collect();
        if node == "mod" {
            // The parent names its children by their bare names.
            names.extend(
                siblings
                    .iter()
                    .filter(|s| code.contains(&format!(" {s}::")))
                    .cloned(),
            );
        }
        names.remove(&node);
        graph.entry(node).or_default().extend(names);
    }
    graph
}

/// A cycle through `start`, as the path that closes it, if there is one.
fn cycle_from(graph: &Graph, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![vec![start.to_owned()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().unwrap();
        for next in graph.get(last).into_iter().flatten() {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(next.clone());
                return Some(cycle);
            }
            if graph.contains_key(next) && seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push(longer);
            }
        }
    }
    None
}

fn cycles(graph: &Graph) -> Vec<String> {
    graph
        .keys()
        .filter_map(|module| cycle_from(graph, module))
        .map(|cycle| cycle.join(" -> "))
        .collect()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn no_crate_has_a_module_cycle() {
    for krate in [
        "core",
        "server",
        "agent",
        "store-sled",
        "store-postgres",
        "store-tests",
    ] {
        let graph = crate_graph(&workspace().join(krate).join("src"));
        assert!(
            graph.len() > 1,
            "{krate}: the module graph was not read: {graph:?}"
        );
        let found = cycles(&graph);
        assert!(found.is_empty(), "{krate}: module cycles: {found:#?}");
    }
    let server = crate_graph(&workspace().join("server/src"));
    assert!(
        server["api"].contains("app"),
        "server graph misread: {server:?}"
    );
}

#[test]
fn the_domain_services_form_no_cycle() {
    let graph = module_dir_graph(&workspace().join("core/src/domain"), "crate::domain::");
    assert!(
        graph["commands"].contains("mod") && graph["mod"].contains("failed_attempts"),
        "the domain's module graph was not read: {graph:?}"
    );
    let found = cycles(&graph);
    assert!(found.is_empty(), "domain module cycles: {found:#?}");
}

/// The domain crate stays below every edge and backend: none of these is
/// among its dependencies, direct or not.
#[test]
fn the_domain_depends_on_no_edge_or_backend_crate() {
    let output = std::process::Command::new(env!("CARGO"))
        .args([
            "tree", "--frozen", "-p", "mdm-core", "-e", "normal", "--prefix", "none",
        ])
        .current_dir(workspace())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8(output.stdout).unwrap();
    let crates: BTreeSet<&str> = tree
        .lines()
        .filter_map(|line| line.split(' ').next())
        .collect();
    assert!(
        crates.contains("rcgen") && crates.contains("tokio"),
        "cargo tree misread: {crates:?}"
    );
    let forbidden = [
        "tonic",
        "prost",
        "sled",
        "tokio-postgres",
        "postgres-protocol",
        "clap",
        "lettre",
        "hyper",
        "axum",
        "h2",
    ];
    let found: Vec<&&str> = forbidden
        .iter()
        .filter(|name| crates.contains(**name))
        .collect();
    assert!(found.is_empty(), "mdm-core depends on {found:?}");
}

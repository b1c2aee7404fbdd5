//! The one-way layout of the engine's modules: readers (`io`) know nothing of destinations
//! (`sink`) or of measurements (`baseline`); memory and device types sit below both
//! (`memory`), and `memory` uses neither.

use std::path::{Path, PathBuf};

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// Lines of code (not comments) under `dir` that name any of `modules`.
fn uses(dir: &str, modules: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(dir);
    let mut found = Vec::new();
    for file in sources(&root) {
        for (n, line) in std::fs::read_to_string(&file).unwrap().lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            if modules.iter().any(|m| code.contains(&format!("crate::{m}"))) {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn readers_know_no_destinations_and_no_measurements() {
    let found = uses("io", &["sink", "baseline", "pipeline", "loader"]);
    assert!(found.is_empty(), "io reaches up:\n{}", found.join("\n"));
}

#[test]
fn memory_sits_below_readers_and_sinks() {
    let found = uses("memory", &["sink", "io", "baseline", "pipeline", "loader"]);
    assert!(found.is_empty(), "memory reaches up:\n{}", found.join("\n"));
}

//! The one-way layout of the engine's folders, which follow the data path: `api` (where a
//! load starts), `source` (where bytes come from), `plan` (what to read, pure), `engine`
//! (readers, staging, pipeline, sinks), `cuda` (memory and the driver) below them all, and
//! `coop` (ranks cooperating) on top. Readers (`engine/read`, `source`) know nothing of
//! destinations (`engine/sink`) or of measurements (`tools`); memory and device types sit
//! below both (`cuda`), and `cuda` uses neither.
//!
//! Below that, the import graph between files: no new circles among the engine's files (the
//! ones still there are listed, to shrink), none among the CLI's, the circles broken once stay
//! one-way, `source` and `engine` never reach `coop`, and only `cuda/` calls the CUDA driver
//! (streams, events, copies, contexts and peer access included). The bindings (CLI, C ABI, Python) name
//! none of the engine's internal modules and no `#[doc(hidden)]` item: the public API only.

use std::collections::{BTreeMap, BTreeSet};
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
    let above = ["engine::sink", "tools", "engine::pipeline", "api"];
    let mut found = uses("engine/read", &above);
    found.extend(uses("source", &above));
    assert!(found.is_empty(), "readers reach up:\n{}", found.join("\n"));
}

#[test]
fn cuda_sits_below_readers_and_sinks() {
    let above = ["engine::sink", "engine::read", "source", "tools", "engine::pipeline", "api"];
    let found = uses("cuda", &above);
    assert!(found.is_empty(), "cuda reaches up:\n{}", found.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// The import graph between the engine's files.
//
// Each file under `src/` is a node, named by its module path (`coop/load.rs` is `coop::load`,
// `coop/mod.rs` is `coop`, `lib.rs` is the crate root ""). Each `use crate::...`,
// `use super::...`, `use child::...` and each `crate::...`/`super::...` path in code is an
// edge to the file that defines what it names: the longest module prefix of the path, and
// when the next segment is a name that module re-exports (`pub use load::Loader;`), the file
// that re-export points at. Comments, `#[cfg(test)] mod tests` blocks and `tests.rs` files
// are left out: tests may reach anywhere. Method calls on a type defined elsewhere are not
// seen; the rules are about imports.

/// A module path from the crate root, segments joined with `::` ("" for the root).
type Module = String;

/// Every engine source file (not `tests.rs`) by module path.
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    for file in sources(src) {
        let relative = file.strip_prefix(src).unwrap().with_extension("");
        let mut parts: Vec<String> =
            relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        if parts.last().is_some_and(|p| p == "tests") {
            continue;
        }
        if parts.last().is_some_and(|p| p == "mod" || p == "lib" || p == "main") {
            parts.pop();
        }
        out.insert(parts.join("::"), file);
    }
    out
}

/// A file's code: no comment lines, and nothing from its `#[cfg(test)] mod tests` on (in-file
/// test modules come last).
fn code_of(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let tests_next = lines.peek().is_some_and(|l| l.trim_start().starts_with("mod tests"));
        if trimmed.starts_with("#[cfg(test)]") && tests_next {
            break;
        }
        if !trimmed.starts_with("//") {
            code.push_str(line);
            code.push('\n');
        }
    }
    code
}

/// The `use` trees of `code` (with `pub`, `pub(crate)` or `pub(super)` before them, and
/// whether they re-export), each as the text between `use` and `;`, and the code without them.
fn use_statements(code: &str) -> (Vec<(bool, String)>, String) {
    let mut uses = Vec::new();
    let mut rest = String::new();
    let mut lines = code.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let starts = ["use ", "pub use ", "pub(crate) use ", "pub(super) use "];
        let found =
            starts.iter().find_map(|p| Some((p.starts_with("pub"), trimmed.strip_prefix(p)?)));
        let Some((public, after)) = found else {
            rest.push_str(line);
            rest.push('\n');
            continue;
        };
        let mut statement = after.to_owned();
        while !statement.contains(';') {
            match lines.next() {
                Some(more) => statement.push_str(more.trim()),
                None => break,
            }
        }
        let tree = statement.split(';').next().unwrap_or_default();
        let tree = tree.replace(" as ", "@");
        uses.push((public, tree.chars().filter(|c| !c.is_whitespace()).collect()));
    }
    (uses, rest)
}

/// The paths a `use` tree names (spaces removed, ` as ` written `@`), each with the name it
/// binds: `a::{b,c::{d,e@f}}` is `a::b` (b), `a::c::d` (d), `a::c::e` (f).
fn expand(tree: &str) -> Vec<(String, String)> {
    let Some(open) = tree.find('{') else {
        let (path, alias) = match tree.split_once('@') {
            Some((path, alias)) => (path.to_owned(), alias.to_owned()),
            None => (tree.to_owned(), tree.rsplit("::").next().unwrap_or_default().to_owned()),
        };
        return vec![(path.trim_end_matches("::self").to_owned(), alias)];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.len() - 1];
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.extend(expand(&format!("{prefix}{}", &inner[start..i])));
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < inner.len() {
        out.extend(expand(&format!("{prefix}{}", &inner[start..])));
    }
    out
}

/// `path` as written in `module`'s file, from the crate root; `None` outside the crate.
fn absolute(module: &str, path: &str, modules: &BTreeMap<Module, PathBuf>) -> Option<Vec<String>> {
    let mut segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: Vec<String> =
        module.split("::").filter(|s| !s.is_empty()).map(String::from).collect();
    match *segments.first()? {
        "crate" => {
            base.clear();
            segments.remove(0);
        }
        "super" => {
            while segments.first() == Some(&"super") {
                base.pop();
                segments.remove(0);
            }
        }
        "self" => {
            segments.remove(0);
        }
        child => {
            let mut child_path = base.clone();
            child_path.push(child.to_owned());
            if !modules.contains_key(&child_path.join("::")) {
                return None; // std, another crate, or a name in scope
            }
        }
    }
    base.extend(segments.iter().map(|s| s.to_string()));
    Some(base)
}

/// `crate::...` and `super::...` paths in code outside `use` statements.
fn inline_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for start in ["crate::", "super::"] {
        for (at, _) in code.match_indices(start) {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':' || c == '$') {
                continue;
            }
            let path: String = code[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            out.push(path.trim_end_matches(':').to_owned());
        }
    }
    out
}

/// The import graph of the crate whose sources are under `src`: per file, the files it
/// imports from.
struct Graph {
    edges: BTreeMap<Module, BTreeSet<Module>>,
}

impl Graph {
    fn of(src: &Path) -> Graph {
        let modules = modules(src);
        let mut paths: BTreeMap<Module, Vec<Vec<String>>> = BTreeMap::new();
        let mut exports: BTreeMap<Module, BTreeMap<String, Vec<String>>> = BTreeMap::new();
        for (module, file) in &modules {
            let (uses, rest) = use_statements(&code_of(file));
            let mut named = Vec::new();
            for (public, tree) in uses {
                for (path, alias) in expand(&tree) {
                    let Some(abs) = absolute(module, &path, &modules) else { continue };
                    if public {
                        exports.entry(module.clone()).or_default().insert(alias, abs);
                    } else {
                        named.push(abs);
                    }
                }
            }
            let inline = inline_paths(&rest);
            named.extend(inline.iter().filter_map(|p| absolute(module, p, &modules)));
            paths.insert(module.clone(), named);
        }
        let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
        for (module, named) in &paths {
            let to = edges.entry(module.clone()).or_default();
            for path in named {
                let target = resolve(path, &modules, &exports, 0);
                if target != *module {
                    to.insert(target);
                }
            }
        }
        Graph { edges }
    }

    /// Files reachable from `from` by imports (not `from` itself unless on a circle).
    fn reachable(&self, from: &str) -> BTreeSet<Module> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&Module> = self.edges.get(from).into_iter().flatten().collect();
        while let Some(m) = stack.pop() {
            if seen.insert(m.clone()) {
                stack.extend(self.edges.get(m).into_iter().flatten());
            }
        }
        seen
    }

    /// Every import circle: each group of files that reach one another, as sorted lists.
    fn circles(&self) -> BTreeSet<Vec<Module>> {
        let reach: BTreeMap<&Module, BTreeSet<Module>> =
            self.edges.keys().map(|m| (m, self.reachable(m))).collect();
        let mut out = BTreeSet::new();
        for (m, from_m) in &reach {
            if !from_m.contains(*m) {
                continue;
            }
            let group: Vec<Module> = from_m
                .iter()
                .filter(|o| reach.get(o).is_some_and(|r| r.contains(*m)))
                .cloned()
                .collect();
            out.insert(group);
        }
        out
    }
}

/// The file `path` (from the crate root) names: the longest module prefix of it, or, when
/// the segment after that prefix is a name the module re-exports, where that points (for a
/// glob re-export, `pub use extents::*;`, the same name in the module it names).
fn resolve(
    path: &[String],
    modules: &BTreeMap<Module, PathBuf>,
    exports: &BTreeMap<Module, BTreeMap<String, Vec<String>>>,
    depth: usize,
) -> Module {
    for n in (0..=path.len()).rev() {
        let module = path[..n].join("::");
        if !modules.contains_key(&module) {
            continue;
        }
        let exported = exports.get(&module);
        let named = path.get(n).and_then(|name| exported?.get(name)).cloned();
        let globbed = || {
            let glob = exported?.get("*")?;
            path.get(n)?;
            Some(glob[..glob.len() - 1].iter().chain(&path[n..]).cloned().collect::<Vec<_>>())
        };
        return match named.or_else(globbed) {
            Some(target) if depth < 8 && target.as_slice() != path => {
                resolve(&target, modules, exports, depth + 1)
            }
            _ => module,
        };
    }
    String::new()
}

/// The import circles there were when this rule came, to be broken by the redesign of issue
/// 26: each circle found must lie inside one of these. A circle may shrink or go (then shrink
/// the list with it), never grow or appear.
const KNOWN_CIRCLES: &[&[&str]] = &[
    &[
        "config",
        "integrity",
        "integrity::files",
        "integrity::states",
        "integrity::worker",
        "engine::read",
        "source::cache",
        "source::object::client",
        "source::object::settings",
        "source::object::source",
        "plan::schedule",
        "engine::staging",
        "trace",
    ],
    &["coop::comm", "coop::comm::poll"],
    &["api::loader", "engine::open"],
];

/// Circles of `graph` that lie inside none of `known`, one line each.
fn new_circles(graph: &Graph, known: &[&[&str]]) -> Vec<String> {
    let circles = graph.circles();
    let inside = |c: &Vec<Module>| known.iter().any(|k| c.iter().all(|m| k.contains(&m.as_str())));
    circles.iter().filter(|c| !inside(c)).map(|c| c.join(" <-> ")).collect()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn no_new_import_circles_among_engine_files() {
    let graph = Graph::of(&workspace().join("crates/gantry/src"));
    let found = new_circles(&graph, KNOWN_CIRCLES);
    assert!(found.is_empty(), "files that import one another:\n{}", found.join("\n"));
}

#[test]
fn no_import_circles_among_cli_files() {
    let graph = Graph::of(&workspace().join("crates/gantry-cli/src"));
    let found = new_circles(&graph, &[]);
    assert!(found.is_empty(), "CLI files that import one another:\n{}", found.join("\n"));
}

/// The circles issue 26 broke, as the one direction each pair may import in.
#[test]
fn the_broken_circles_stay_one_way() {
    let engine = Graph::of(&workspace().join("crates/gantry/src"));
    let cli = Graph::of(&workspace().join("crates/gantry-cli/src"));
    let rules: [(&Graph, &str, &[&str]); 5] = [
        (&engine, "coop::contract", &["coop::load", "coop::placed"]),
        (&engine, "coop::load", &["coop::placed"]),
        (&engine, "engine::sink::gpus", &["engine::sink::cuda"]),
        (&cli, "ranks", &["load"]),
        (&cli, "load_args", &["load", "ranks"]),
    ];
    let mut found = Vec::new();
    for (graph, from, never) in rules {
        let reached = graph.reachable(from);
        found.extend(
            never.iter().filter(|m| reached.contains(**m)).map(|m| format!("{from} -> {m}")),
        );
    }
    assert!(found.is_empty(), "imports against the layout:\n{}", found.join("\n"));
}

/// Engine modules the bindings must not reach: declared without `pub`, and named by no
/// binding (the CLI, the C ABI, the Python module).
const INTERNAL: &[&str] = &[
    "api",
    "api::device",
    "api::loader",
    "api::placed",
    "coop::agree",
    "coop::contract",
    "coop::load",
    "coop::placed",
    "coop::rounds",
    "coop::split",
    "cuda::copy",
    "engine",
    "engine::open",
    "engine::pipeline",
    "engine::read",
    "engine::read::buffered",
    "engine::read::uring",
    "engine::sink",
    "engine::staging",
    "engine::topology",
    "error",
    "integrity::files",
    "integrity::sums",
    "integrity::worker",
    "plan::extents",
    "plan::interleave",
    "plan::placement::rows",
    "plan::placement::spec",
    "plan::placement::tp",
    "plan::schedule",
    "tools",
    "trace::json",
    "trace::verdict",
];

/// The line of `module`'s parent file that declares it (`mod NAME;` with its visibility).
fn declaration(module: &str) -> Option<String> {
    let src = workspace().join("crates/gantry/src");
    let (parent, name) = module.rsplit_once("::").unwrap_or(("", module));
    let candidates = if parent.is_empty() {
        vec![src.join("lib.rs")]
    } else {
        let dir = src.join(parent.replace("::", "/"));
        vec![dir.join("mod.rs"), dir.with_extension("rs")]
    };
    let text = candidates.iter().find_map(|f| std::fs::read_to_string(f).ok())?;
    let line = text.lines().find(|l| l.trim().ends_with(&format!("mod {name};")))?;
    Some(line.trim().to_owned())
}

/// Paths a binding's file names under `gantry::`, in `use` trees and in code.
fn gantry_paths(file: &Path) -> Vec<String> {
    let (uses, rest) = use_statements(&code_of(file));
    let mut paths: Vec<String> =
        uses.iter().flat_map(|(_, tree)| expand(tree)).map(|(p, _)| p).collect();
    for (at, _) in rest.match_indices("gantry::") {
        let before = rest[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let path = rest[at..].chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':');
        paths.push(path.collect());
    }
    paths.into_iter().filter_map(|p| p.strip_prefix("gantry::").map(str::to_owned)).collect()
}

#[test]
fn bindings_reach_no_engine_internals() {
    let mut found = Vec::new();
    for module in INTERNAL {
        match declaration(module) {
            Some(line) if !line.starts_with("pub mod") => {}
            other => found.push(format!("{module} is declared {other:?}: keep it crate-private")),
        }
    }
    for binding in ["gantry-cli", "gantry-capi", "gantry-py"] {
        for file in sources(&workspace().join("crates").join(binding).join("src")) {
            for path in gantry_paths(&file) {
                let names = |m: &&str| path == *m || path.starts_with(&format!("{m}::"));
                if let Some(m) = INTERNAL.iter().copied().find(names) {
                    found.push(format!("{}: gantry::{path} (engine internal {m})", file.display()));
                }
            }
        }
    }
    assert!(found.is_empty(), "bindings reaching engine internals:\n{}", found.join("\n"));
}

/// Names the engine declares `#[doc(hidden)]` (public for its own tests, not API), by the
/// file that declares them.
fn hidden_names() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for file in sources(&workspace().join("crates/gantry/src")) {
        let code = code_of(&file);
        let mut lines = code.lines();
        while let Some(line) = lines.next() {
            if line.trim() != "#[doc(hidden)]" {
                continue;
            }
            let item = lines.by_ref().map(str::trim).find(|l| !l.starts_with("#["));
            let kinds = ["fn ", "struct ", "enum ", "trait ", "type ", "const ", "static ", "mod "];
            let name = item.and_then(|l| kinds.iter().find_map(|k| Some(l.split_once(k)?.1)));
            let name = name.map(|n| n.chars().take_while(|c| c.is_alphanumeric() || *c == '_'));
            if let Some(name) = name {
                out.push((file.clone(), name.collect()));
            }
        }
    }
    out
}

/// Whether `code` names `name` as a whole word.
fn names(code: &str, name: &str) -> bool {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    code.match_indices(name).any(|(at, _)| {
        let before = code[..at].chars().next_back();
        let after = code[at + name.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

/// Bindings' uses of `#[doc(hidden)]` engine items, as (binding, name), there when this rule
/// came. The list may only shrink: an entry no longer true fails the test, to be removed.
const KNOWN_HIDDEN_USES: &[(&str, &str)] = &[
    // `_read_delay_ms`, the Python tests' slow reader.
    ("gantry-py", "fault_injector"),
];

/// The bindings (CLI, C ABI, Python) use the engine's public API only: no `#[doc(hidden)]`
/// item (a test hook) but those listed, to go.
#[test]
fn bindings_use_no_hidden_items() {
    let hidden = hidden_names();
    assert!(!hidden.is_empty(), "no #[doc(hidden)] item found: is the parser still right?");
    let mut used = BTreeSet::new();
    let mut found = Vec::new();
    for binding in ["gantry-cli", "gantry-capi", "gantry-py"] {
        for file in sources(&workspace().join("crates").join(binding).join("src")) {
            let code = code_of(&file);
            for (declared, name) in hidden.iter().filter(|(_, n)| names(&code, n)) {
                if KNOWN_HIDDEN_USES.contains(&(binding, name.as_str())) {
                    used.insert((binding, name.as_str()));
                    continue;
                }
                let (file, declared) = (file.display(), declared.display());
                found.push(format!("{file}: {name} (#[doc(hidden)] in {declared})"));
            }
        }
    }
    for known in KNOWN_HIDDEN_USES.iter().filter(|k| !used.contains(k)) {
        found.push(format!("{known:?} is listed in KNOWN_HIDDEN_USES but no longer used"));
    }
    assert!(found.is_empty(), "bindings past the public API:\n{}", found.join("\n"));
}

/// Sources and the engine's moving parts know nothing of cooperation between ranks: `coop`
/// builds on them, never the other way, so a load of one process stays whole without it.
#[test]
fn sources_and_the_engine_never_reach_coop() {
    let graph = Graph::of(&workspace().join("crates/gantry/src"));
    let under = |m: &str, folder: &str| m == folder || m.starts_with(&format!("{folder}::"));
    let mut found = Vec::new();
    for from in graph.edges.keys().filter(|m| under(m, "source") || under(m, "engine")) {
        let reached = graph.reachable(from);
        found.extend(reached.iter().filter(|m| under(m, "coop")).map(|m| format!("{from} -> {m}")));
    }
    assert!(found.is_empty(), "imports against the layout:\n{}", found.join("\n"));
}

/// Whether `file`'s code calls the CUDA driver: a `use` of `cudarc::driver::sys` or
/// `cudarc::driver::result` (in any tree), or a path to either in code.
fn calls_driver(file: &Path) -> bool {
    let (uses, rest) = use_statements(&code_of(file));
    let driver = ["cudarc::driver::sys", "cudarc::driver::result"];
    let named = |p: &str| driver.iter().any(|d| p == *d || p.starts_with(&format!("{d}::")));
    uses.iter().flat_map(|(_, tree)| expand(tree)).any(|(path, _)| named(&path))
        || driver.iter().any(|d| rest.contains(&format!("{d}::")))
}

/// Only `cuda/` calls the CUDA driver: one place owns its errors, contexts, streams, events
/// and copies.
#[test]
fn only_cuda_calls_the_driver() {
    let src = workspace().join("crates/gantry/src");
    let mut found = Vec::new();
    for file in sources(&src).into_iter().filter(|f| !f.starts_with(src.join("cuda"))) {
        if file.file_name().is_some_and(|n| n == "tests.rs") || !calls_driver(&file) {
            continue;
        }
        let name = file.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        found.push(format!("{name} calls the CUDA driver"));
    }
    let cuda = sources(&src.join("cuda"));
    assert!(cuda.iter().any(|f| calls_driver(f)), "cuda/ calls no driver: is the check right?");
    assert!(found.is_empty(), "CUDA driver calls outside cuda/:\n{}", found.join("\n"));
}

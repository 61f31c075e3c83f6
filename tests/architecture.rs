//! The shape of the code: no circles between the top-level modules of `src/`, no
//! command module (one per subcommand) importing another (shared parts live in library
//! modules: `data/`, `evaluation.rs`, `report/`, `runtime.rs`, ...), and rustfmt's formatting.

mod common;
use common::{repo, run_bounded, LIMIT};
use std::collections::{BTreeMap, BTreeSet};

const COMMANDS: [&str; 7] = ["train", "eval", "bench", "info", "generate", "export", "doctor"];

/// Top-level module → the top-level modules its non-test code names as `crate::x`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let src = repo().join("src");
    let mut files = vec![];
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()) {
            if e.is_dir() {
                stack.push(e);
            } else if e.extension().is_some_and(|x| x == "rs") {
                files.push(e);
            }
        }
    }
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        if top == "main" || top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        // Unit tests may reach anywhere; only the shipped code counts.
        let code = text.split("#[cfg(test)]").next().unwrap();
        for part in code.split("crate::").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() && name != top {
                graph.entry(top.clone()).or_default().insert(name);
            }
        }
    }
    graph
}

#[test]
fn no_command_imports_another() {
    for (module, uses) in imports() {
        if COMMANDS.contains(&module.as_str()) {
            let commands: Vec<&String> = uses.iter().filter(|u| COMMANDS.contains(&u.as_str())).collect();
            assert!(commands.is_empty(), "the {module} command imports the command(s) {commands:?}");
        }
    }
}

/// Panics naming the first import circle of `graph`, if any.
fn assert_no_circles(graph: &BTreeMap<String, BTreeSet<String>>, place: &str) {
    fn visit(n: &str, graph: &BTreeMap<String, BTreeSet<String>>, path: &mut Vec<String>, done: &mut BTreeSet<String>, place: &str) {
        if let Some(at) = path.iter().position(|p| p == n) {
            panic!("import circle in {place}: {} -> {n}", path[at..].join(" -> "));
        }
        if done.contains(n) {
            return;
        }
        path.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            visit(m, graph, path, done, place);
        }
        path.pop();
        done.insert(n.to_string());
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        visit(n, graph, &mut vec![], &mut done, place);
    }
}

#[test]
fn the_module_graph_has_no_circles() {
    let graph = imports();
    assert_no_circles(&graph, "src/");
    assert!(graph.len() > 15, "{graph:?}");
}

/// Inside a module directory too (`data/` above all, where the stages of preparation
/// live): no file's shipped code reaches a sibling that reaches back to it.
#[test]
fn no_circles_between_the_files_of_a_module_directory() {
    let src = repo().join("src");
    let mut dirs = vec![];
    for e in std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().path()) {
        if e.is_dir() {
            dirs.push(e);
        }
    }
    assert!(dirs.iter().any(|d| d.ends_with("data")));
    for dir in dirs {
        let module = dir.file_name().unwrap().to_string_lossy().into_owned();
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let files: Vec<_> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "rs")).collect();
        let names: BTreeSet<String> = files.iter().map(|f| f.file_stem().unwrap().to_string_lossy().into_owned()).collect();
        for file in &files {
            let me = file.file_stem().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(file).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap();
            for prefix in ["super::".to_string(), format!("crate::{module}::")] {
                for part in code.split(prefix.as_str()).skip(1) {
                    let name: String = part.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if name != me && name != "mod" && names.contains(&name) {
                        graph.entry(me.clone()).or_default().insert(name);
                    }
                }
            }
        }
        assert_no_circles(&graph, &format!("src/{module}/"));
    }
}

/// Formatting is rustfmt's, with `rustfmt.toml`'s width: `cargo fmt --all` before a
/// commit keeps diffs to what changed.
#[test]
fn the_code_is_formatted() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = run_bounded(std::process::Command::new(cargo).args(["fmt", "--all", "--check"]).current_dir(repo()), LIMIT);
    assert!(
        out.status.success(),
        "`cargo fmt --all --check` failed; run `cargo fmt --all`:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

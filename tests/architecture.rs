//! The shape of the code: no circles between the top-level modules of `src/`, no
//! command module (one per subcommand) importing another (shared parts live in library
//! modules: `data/`, `perplexity.rs`, `report/`, `runtime.rs`, ...), no module that only
//! tests reach, rustfmt's formatting, and torch and NCCL versions named in the sources
//! that match what we pin.

mod common;
use common::{repo, run_bounded, LIMIT};
use std::collections::{BTreeMap, BTreeSet};

const COMMANDS: [&str; 8] = ["train", "eval", "bench", "info", "generate", "export", "doctor", "supervise"];

/// Top-level module → the top-level modules its non-test code names as `crate::x`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let src = repo().join("src");
    for file in module_files().into_values() {
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

/// A version as written: major, minor and, where given, patch.
type Version = (u32, u32, Option<u32>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    /// torch, PyTorch or libtorch: pinned by launch/requirements.txt's `torch==X.Y.Z`.
    Torch,
    /// NCCL, or cudarc's `nccl-0XXYY` feature: pinned by that feature in Cargo.toml.
    Nccl,
}

/// The versions we build against: torch from launch/requirements.txt, NCCL from
/// cudarc's `nccl-0XXYY` feature in Cargo.toml.
fn pinned() -> [(Tool, Version); 2] {
    let requirements = std::fs::read_to_string(repo().join("launch/requirements.txt")).unwrap();
    let torch = requirements.lines().find_map(|l| l.trim().strip_prefix("torch==")).expect("launch/requirements.txt pins torch==X.Y.Z");
    let torch = parse_version(torch).expect("torch==X.Y.Z").0;
    let cargo = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let cudarc = cargo.lines().find(|l| l.starts_with("cudarc")).expect("Cargo.toml depends on cudarc");
    let at = cudarc.find("\"nccl-0").expect("cudarc has an nccl-0XXYY feature");
    let nccl = nccl_feature(&cudarc[at + 6..]).expect("nccl-0XXYY");
    [(Tool::Torch, torch), (Tool::Nccl, nccl)]
}

/// `X.Y` or `X.Y.Z` at the start of `text` (anything may follow), and its length.
fn parse_version(text: &str) -> Option<(Version, usize)> {
    let number = |from: usize| -> Option<(u32, usize)> {
        let digits = text[from..].bytes().take_while(u8::is_ascii_digit).count();
        (digits > 0).then(|| (text[from..from + digits].parse().unwrap(), from + digits))
    };
    let (major, end) = number(0)?;
    let (minor, end) = text[end..].starts_with('.').then(|| number(end + 1)).flatten()?;
    match text[end..].starts_with('.').then(|| number(end + 1)).flatten() {
        Some((patch, end)) => Some(((major, minor, Some(patch)), end)),
        None => Some(((major, minor, None), end)),
    }
}

/// The digits of cudarc's `nccl-0XXYY` after `nccl-`: NCCL X.YY (02028 is 2.28).
fn nccl_feature(text: &str) -> Option<Version> {
    let digits = text.get(..5).filter(|d| d.bytes().all(|b| b.is_ascii_digit()))?;
    let n: u32 = digits.parse().ok()?;
    Some((n / 1000, n % 1000, None))
}

/// The versions of torch and NCCL that `line` names: `torch X.Y`, `PyTorch X.Y`,
/// `libtorch X.Y`, `torch==X.Y.Z`, `NCCL X.Y[.Z]`, `NCCL ✓ X.Y.Z`, `nccl-0XXYY`.
fn mentions(line: &str) -> Vec<(Tool, Version)> {
    let lower = line.to_ascii_lowercase();
    let mut found = vec![];
    for (keyword, tool) in [("torch", Tool::Torch), ("nccl", Tool::Nccl)] {
        for (at, _) in lower.match_indices(keyword) {
            let rest = &lower[at + keyword.len()..];
            if tool == Tool::Nccl && rest.starts_with("-0") {
                found.extend(nccl_feature(&rest[1..]).map(|v| (tool, v)));
                continue;
            }
            let version = rest.trim_start_matches([' ', '\t', '=', '✓', 'v']);
            if version.len() < rest.len() {
                found.extend(parse_version(version).map(|(v, _)| (tool, v)));
            }
        }
    }
    found
}

/// Words that make an older version a statement of history or of a lower bound ("NCCL
/// 2.10 introduced ncclAvg", "any NCCL 2.14 or later", "the oldest NCCL with ...").
const HISTORY: [&str; 9] = ["introduced", "appeared", "added", "since", "or later", "or newer", "older", "oldest", "until"];

/// Whether a mention of `tool` at `said` is wrong, given the pin and the text around it.
/// The rule: the pinned version is right (compared to the pin's precision: `2.11` and
/// `2.11.0` both match torch==2.11.0, `2.28.9` matches nccl-02028); a newer one is always
/// wrong (we do not build against it, so a comment naming it is stale or a promise); an
/// older one is right only where `context` (the line and its neighbours) marks it as
/// history or a lower bound with one of `HISTORY`'s words, so a pin moved forward flags
/// every mention of the old version that reads as current.
fn stale(said: Version, pin: Version, context: &str) -> bool {
    let at_pin_precision = |v: Version| (v.0, v.1, pin.2.and(v.2));
    let (said, pinned) = (at_pin_precision(said), (pin.0, pin.1, said.2.and(pin.2)));
    match said.cmp(&pinned) {
        std::cmp::Ordering::Equal => false,
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => {
            let context = context.to_ascii_lowercase();
            !HISTORY.iter().any(|w| context.contains(w))
        }
    }
}

/// Every source we write prose in: src/ (Rust, C, C++), kernels/, build.rs, and the
/// launch scripts.
fn prose_files() -> Vec<std::path::PathBuf> {
    let mut files = vec![repo().join("build.rs")];
    let mut stack = vec![repo().join("src"), repo().join("kernels")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()) {
            if e.is_dir() {
                stack.push(e);
            } else {
                files.push(e);
            }
        }
    }
    for e in std::fs::read_dir(repo().join("launch")).unwrap().map(|e| e.unwrap().path()) {
        if e.extension().is_some_and(|x| x == "sh" || x == "sbatch") {
            files.push(e);
        }
    }
    files
}

/// `file:line: what` for each stale version mention in `text`.
fn stale_mentions(file: &str, text: &str, pins: &[(Tool, Version)]) -> (Vec<String>, usize) {
    let lines: Vec<&str> = text.lines().collect();
    let (mut problems, mut checked) = (vec![], 0);
    for (i, line) in lines.iter().enumerate() {
        let context = lines[i.saturating_sub(1)..(i + 2).min(lines.len())].join("\n");
        for (tool, said) in mentions(line) {
            checked += 1;
            let pin = pins.iter().find(|(t, _)| *t == tool).unwrap().1;
            if stale(said, pin, &context) {
                problems.push(format!("{file}:{}: {tool:?} {said:?} against the pinned {pin:?}: {}", i + 1, line.trim()));
            }
        }
    }
    (problems, checked)
}

/// Versions named in comments, docs and messages stay true: every torch, PyTorch,
/// libtorch and NCCL version and cudarc `nccl-0XXYY` feature named in src/, kernels/,
/// build.rs and launch/*.sh is the pinned one (launch/requirements.txt's torch,
/// Cargo.toml's cudarc NCCL feature), or an older one its sentence marks as history
/// (`stale` says the rule). CUDA versions are not checked.
#[test]
fn version_words_match_what_we_pin() {
    let pins = pinned();
    let (mut problems, mut checked) = (vec![], 0);
    for file in prose_files() {
        let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap()).into_owned();
        let name = file.strip_prefix(repo()).unwrap().display().to_string();
        let (found, n) = stale_mentions(&name, &text, &pins);
        problems.extend(found);
        checked += n;
    }
    assert!(checked >= 4, "only {checked} version mentions found: is the scan reading the sources?");
    assert!(
        problems.is_empty(),
        "version words that disagree with Cargo.toml's nccl feature / launch/requirements.txt's torch pin:\n{}",
        problems.join("\n")
    );
}

/// The rule itself, on lines written for it.
#[test]
fn the_version_rule_flags_newer_and_unmarked_older_versions() {
    let pins = [(Tool::Torch, (2, 11, Some(0))), (Tool::Nccl, (2, 28, None))];
    let check = |text: &str| stale_mentions("x", text, &pins).0.len();
    for right in [
        "// libtorch (PyPI torch 2.11.0)",
        "# needs PyTorch 2.11.x",
        "/// Built against NCCL 2.28 (cudarc feature `nccl-02028`)",
        "// the GPU host's NCCL 2.28.9",
        "// NCCL 2.10 introduced ncclAvg",
        "// any NCCL 2.14 or later works",
        "// torch.optim.AdamW and ncclAllReduce, cuda 13",
    ] {
        assert_eq!(check(right), 0, "{right}");
    }
    for wrong in [
        "// built with torch 2.13", "// PyTorch 2.10 is what we run", "//! Built against NCCL 2.29", "// cudarc's nccl-02029",
        "// torch==2.11.1", "// \"NCCL ✓ 2.29.7, 8 GPUs\"",
    ] {
        assert_eq!(check(wrong), 1, "{wrong}");
    }
    assert_eq!(mentions("torchvision 0.26, ncclAvg 2.1"), vec![]);
}

/// Every module of `src/` as its path (`dist/ring`, `dist` for `dist/mod.rs`) → its file.
fn module_files() -> BTreeMap<String, std::path::PathBuf> {
    let src = repo().join("src");
    let mut modules = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()) {
            if e.is_dir() {
                stack.push(e);
            } else if e.extension().is_some_and(|x| x == "rs") {
                let rel = e.strip_prefix(&src).unwrap().with_extension("");
                let path = rel.to_string_lossy().trim_end_matches("/mod").to_string();
                modules.insert(path, e);
            }
        }
    }
    modules
}

/// The paths written in `code`: words joined by `::`, a use-tree's braces expanded
/// (`a::{b, c::d}` is `a::b` and `a::c::d`).
fn paths(code: &str) -> Vec<Vec<String>> {
    fn word_at(code: &str, at: usize) -> String {
        code[at..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
    }
    /// The group's text from just after `{` up to its matching `}`.
    fn group(code: &str, open: usize) -> &str {
        let mut depth = 0;
        for (i, c) in code[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => return &code[open..open + i],
                '}' => depth -= 1,
                _ => {}
            }
        }
        &code[open..]
    }
    fn walk(code: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let bytes = code.as_bytes();
        let mut at = 0;
        while at < bytes.len() {
            let after_path_char = at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_' || bytes[at - 1] == b':');
            if after_path_char || !(bytes[at].is_ascii_alphabetic() || bytes[at] == b'_') {
                at += 1;
                continue;
            }
            let mut segments: Vec<String> = prefix.to_vec();
            let mut end = at;
            loop {
                let word = word_at(code, end);
                if word.is_empty() {
                    break;
                }
                end += word.len();
                segments.push(word);
                if !code[end..].starts_with("::") {
                    break;
                }
                end += 2;
                if code[end..].starts_with('{') {
                    let inner = group(code, end + 1);
                    walk(inner, &segments, out);
                    end += inner.len() + 1;
                    break;
                }
            }
            if segments.last().is_some_and(|w| w == "self") {
                segments.pop();
            }
            out.push(segments);
            at = end.max(at + 1);
        }
    }
    let mut out = vec![];
    walk(code, &[], &mut out);
    out
}

/// The modules that `code`, in module `me`, names: `crate::a::b` and `algpt2_ddp::a::b`
/// from the root, `super::x` from the parent, and a bare `x::` for a child of `me` or,
/// in `main`, for a top-level module. Each path counts as its longest module prefix.
fn named_modules(me: &str, code: &str, modules: &BTreeMap<String, std::path::PathBuf>) -> BTreeSet<String> {
    let longest = |segments: &[String]| -> Option<String> {
        (1..=segments.len()).rev().map(|n| segments[..n].join("/")).find(|p| modules.contains_key(p))
    };
    let parent: Vec<String> = me.split('/').map(String::from).collect::<Vec<_>>().split_last().map_or(vec![], |(_, p)| p.to_vec());
    let here: Vec<String> = me.split('/').map(String::from).collect();
    let mut found = BTreeSet::new();
    for segments in paths(code) {
        let Some(head) = segments.first() else { continue };
        let rooted: Vec<String> = match head.as_str() {
            "crate" | "algpt2_ddp" => segments[1..].to_vec(),
            "super" => parent.iter().chain(&segments[1..]).cloned().collect(),
            "self" => here.iter().chain(&segments[1..]).cloned().collect(),
            // A bare name: a child of this module or, in main, a top-level module; else
            // a type, a local or an outside crate.
            _ if me == "main" => segments.clone(),
            _ if segments.len() >= 2 => here.iter().chain(&segments).cloned().collect(),
            _ => continue,
        };
        if let Some(module) = longest(&rooted).filter(|m| m != me) {
            found.insert(module);
        }
    }
    found
}

/// Modules declared only under `#[cfg(test)]` (`#[cfg(test)] mod tests;`): test code.
fn test_only_modules(modules: &BTreeMap<String, std::path::PathBuf>) -> BTreeSet<String> {
    let mut test_only = BTreeSet::new();
    for (me, file) in modules {
        let text = std::fs::read_to_string(file).unwrap();
        for part in text.split("#[cfg(test)]").skip(1) {
            let decl = part.trim_start().trim_start_matches("pub ").trim_start();
            if let Some(rest) = decl.strip_prefix("mod ") {
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if rest[name.len()..].trim_start().starts_with(';') {
                    let path = if me == "lib" || me == "main" { name } else { format!("{me}/{name}") };
                    test_only.insert(path);
                }
            }
        }
    }
    test_only
}

/// The binary reaches every shipped module: one that only tests reach is test code in
/// the shipped library (move it under `#[cfg(test)]` or `tests/`) or dead code.
#[test]
fn every_shipped_module_is_reachable_from_the_binary() {
    let modules = module_files();
    let test_only = test_only_modules(&modules);
    let mut reached = BTreeSet::from(["main".to_string(), "lib".to_string()]);
    let mut todo = vec!["main".to_string()];
    while let Some(me) = todo.pop() {
        let text = std::fs::read_to_string(&modules[&me]).unwrap();
        // Unit tests may reach anywhere; only the shipped code counts.
        let code = text.split("#[cfg(test)]").next().unwrap();
        for module in named_modules(&me, code, &modules) {
            // Naming `a/b` reaches `a` too: its file holds `a/b`'s declaration.
            let mut path = module.as_str();
            loop {
                if reached.insert(path.to_string()) {
                    todo.push(path.to_string());
                }
                match path.rsplit_once('/') {
                    Some((parent, _)) => path = parent,
                    None => break,
                }
            }
        }
    }
    let unreached: Vec<&String> = modules.keys().filter(|m| !reached.contains(*m) && !test_only.contains(*m)).collect();
    assert!(modules.len() > 60 && reached.len() > 60, "{} modules, {} reached", modules.len(), reached.len());
    assert!(unreached.is_empty(), "modules of src/ that the binary never reaches (only tests do, or nothing): {unreached:?}");
}

/// The reachability rule itself, on a made-up crate.
#[test]
fn the_reachability_rule_follows_crate_super_self_and_child_paths() {
    let modules: BTreeMap<String, std::path::PathBuf> =
        ["main", "a", "a/b", "a/c", "d", "d/e"].iter().map(|m| (m.to_string(), std::path::PathBuf::new())).collect();
    let names = |me, code| named_modules(me, code, &modules).into_iter().collect::<Vec<_>>();
    assert_eq!(names("main", "use algpt2_ddp::{a, d};\nfn f() { a::b::go() }"), ["a", "a/b", "d"]);
    assert_eq!(names("main", "use algpt2_ddp::a::{self, b::{Q, R}};"), ["a", "a/b"]);
    assert_eq!(names("a", "pub use b::Thing; use crate::d::e::X;"), ["a/b", "d/e"]);
    assert_eq!(names("a/b", "use super::c::Y; let d = x::y;"), ["a/c"]);
    assert_eq!(names("a", "use self::c::*;"), ["a/c"]);
    // A bare name that is no child of the module is a type or an outside crate.
    assert_eq!(names("a/b", "d::e::f(); tch::Tensor::zeros()"), Vec::<String>::new());
}

/// The sabotage patches (`launch/sabotage.sh`: each breaks bf16 or the lean step in one
/// way, and a named test must catch it) still apply to the code they break: a patch that
/// no longer applies proves nothing.
#[test]
fn every_sabotage_patch_still_applies() {
    let dir = repo().join("tests/sabotage");
    let patches: Vec<_> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "patch")).collect();
    assert!(patches.len() >= 4, "{patches:?}");
    for patch in patches {
        let out = run_bounded(std::process::Command::new("git").args(["apply", "--check"]).arg(&patch).current_dir(repo()), LIMIT);
        assert!(out.status.success(), "{} no longer applies: {}", patch.display(), String::from_utf8_lossy(&out.stderr));
    }
}

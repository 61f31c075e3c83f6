//! docs/configuration.md is generated from src/config/schema.rs (each key's `///` comment)
//! and `Config::default()` (each default), so it cannot drift from the code. After
//! changing the schema: `ALGPT2_WRITE_DOCS=1 cargo test --test docs` rewrites it.

mod common;
use algpt2_ddp::config::Config;
use common::*;
use serde_json::Value;

const INTRO: &str = "# Configuration reference

Generated from `src/config/schema.rs` by `tests/docs.rs` (`ALGPT2_WRITE_DOCS=1 cargo test
--test docs`); do not edit by hand.

YAML, one section per part of the program. A file holds only what differs from the
defaults below (which are the ALGPT2 WikiText-103 study's). Loading is strict: an unknown
key, a wrong type or an out-of-range value stops the program with exit code 2 before any
work starts, naming the file, the line and the key path, e.g.

```
error: invalid configuration
  configs/my.yaml, line 3: model.n_hed: unknown key, did you mean model.n_head?
```

`--set key.path=value` (repeatable, later wins) overrides one key; the value is a YAML
scalar (`null`, `true`, `6e-4`, `[a, b]`) and is checked like the file. The resolved config
is printed at start and saved as `config.yaml` in the run directory.
";

/// (field name, type, doc comment) of each `pub` field of `pub struct NAME {`.
fn fields(schema: &str, name: &str) -> Vec<(String, String, String)> {
    let start = schema.find(&format!("pub struct {name} {{")).unwrap_or_else(|| panic!("no struct {name} in schema.rs"));
    let body = &schema[start..];
    let body = &body[body.find('{').unwrap() + 1..body.find("\n}").unwrap()];
    let mut out = Vec::new();
    let mut doc: Vec<String> = Vec::new();
    for line in body.lines().map(str::trim) {
        if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim().to_string());
        } else if let Some(field) = line.strip_prefix("pub ") {
            let (field, ty) = field.split_once(':').unwrap();
            out.push((field.trim().to_string(), ty.trim().trim_end_matches(',').to_string(), doc.join(" ")));
            doc.clear();
        } else if !line.starts_with("#[") {
            doc.clear();
        }
    }
    out
}

fn shown(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::String(s) => format!("`{s}`"),
        Value::Array(a) if a.is_empty() => "`[]`".into(),
        other => format!("`{other}`"),
    }
}

fn generate() -> String {
    let schema = std::fs::read_to_string(repo().join("src/config/schema.rs")).unwrap();
    let defaults = serde_json::to_value(Config::default()).unwrap();
    let mut out = String::from(INTRO);
    let mut top = Vec::new();
    let mut sections = Vec::new();
    for (field, ty, doc) in fields(&schema, "Config") {
        if ty.ends_with("Config") {
            sections.push((field, ty, doc));
        } else {
            top.push((field, doc));
        }
    }
    out.push_str("\n## Top level\n\n| key | default | meaning |\n|---|---|---|\n");
    for (field, doc) in top {
        assert!(!doc.is_empty(), "schema.rs: `{field}` has no /// comment (it is this key's documentation)");
        out.push_str(&format!("| `{field}` | {} | {doc} |\n", shown(&defaults[&field])));
    }
    for (section, ty, doc) in sections {
        out.push_str(&format!("\n## `{section}`\n\n"));
        if !doc.is_empty() {
            out.push_str(&format!("{doc}\n\n"));
        }
        out.push_str("| key | default | meaning |\n|---|---|---|\n");
        for (field, _, doc) in fields(&schema, &ty) {
            assert!(!doc.is_empty(), "schema.rs: `{section}.{field}` has no /// comment (it is this key's documentation)");
            out.push_str(&format!("| `{section}.{field}` | {} | {} |\n", shown(&defaults[&section][&field]), doc.replace('|', "\\|")));
        }
    }
    out
}

#[test]
fn the_configuration_reference_is_generated_from_the_schema() {
    let path = repo().join("docs/configuration.md");
    let generated = generate();
    if std::env::var_os("ALGPT2_WRITE_DOCS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "docs/configuration.md is out of date with src/config/schema.rs: run `ALGPT2_WRITE_DOCS=1 cargo test --test docs`"
    );
}

/// Every key of the default config appears in the reference.
#[test]
fn every_key_is_documented() {
    let generated = generate();
    let defaults = serde_json::to_value(Config::default()).unwrap();
    for (key, value) in defaults.as_object().unwrap() {
        match value.as_object() {
            Some(section) => {
                for sub in section.keys() {
                    assert!(generated.contains(&format!("| `{key}.{sub}` |")), "{key}.{sub} is missing");
                }
            }
            None => assert!(generated.contains(&format!("| `{key}` |")), "{key} is missing"),
        }
    }
}

/// Relative links between README.md and docs/ point at files that exist.
#[test]
fn links_in_the_readme_and_docs_resolve() {
    let mut files = vec![repo().join("README.md")];
    files.extend(
        std::fs::read_dir(repo().join("docs")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "md")),
    );
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for part in text.split("](").skip(1) {
            let target = part.split(')').next().unwrap().split('#').next().unwrap();
            if target.is_empty() || target.starts_with("http") {
                continue;
            }
            let resolved = file.parent().unwrap().join(target);
            assert!(resolved.exists(), "{}: link to {target}, which does not exist", file.display());
        }
    }
}

//! Strict loading: the YAML file, then `--set` overrides, each checked the same way, then
//! the range rules. Every problem is reported with where it came from (file and line, or
//! the `--set` argument) and the dotted key path.

use super::lines::index_keys;
use super::schema::Config;
use super::validate::violations;
use serde_yaml_ng::{Mapping, Value};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// Where a bad value came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// The config file, at a 1-based line when known.
    File { file: String, line: Option<usize> },
    /// A `--set key=value` argument, quoted as given.
    Set(String),
    /// A default that conflicts with other keys.
    Default { file: String },
}

/// One problem with the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub origin: Origin,
    /// Dotted key path, e.g. `model.n_head` (empty for the document as a whole).
    pub path: String,
    pub message: String,
}

/// All problems found; loading stops before any work starts.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File { file, line: Some(line) } => write!(f, "{file}, line {line}: ")?,
            Origin::File { file, line: None } => write!(f, "{file}: ")?,
            Origin::Set(arg) => write!(f, "--set {arg}: ")?,
            Origin::Default { file } => write!(f, "{file} (default value): ")?,
        }
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration")?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn one(origin: Origin, path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { problems: vec![Problem { origin, path: path.into(), message: message.into() }] }
    }
}

/// Reads `file`, applies `sets` (`key.path=value`, values parsed as YAML) in order, and
/// checks the result. `run_name` left null becomes the file's stem, when that is a good
/// run name; when it is not (`..yaml` gives `.`, the out_dir itself), the config is
/// refused: any name made up in its place would be one the user never chose.
pub fn load(file: &Path, sets: &[String]) -> Result<Config, ConfigError> {
    let name = file.display().to_string();
    let text = super::read::config_text(file)
        .map_err(|e| ConfigError::one(Origin::File { file: name.clone(), line: None }, "", format!("cannot read: {e}")))?;
    let mut cfg = parse(&text, &name, sets)?;
    if cfg.run_name.is_none() {
        let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(problem) = super::validate::run_name_problems(&stem).first() {
            return Err(ConfigError::one(
                Origin::File { file: name.clone(), line: None },
                "run_name",
                format!("not set, so it would be the file's name without its extension, {stem:?}, which {problem}: set run_name in the file, or pass --set run_name=NAME"),
            ));
        }
        cfg.run_name = Some(stem);
    }
    Ok(cfg)
}

/// [`load`] on text already in memory; `name` is what errors call the file.
pub fn parse(text: &str, name: &str, sets: &[String]) -> Result<Config, ConfigError> {
    let index = index_keys(text);
    let lines = index.lines;
    let at = |path: &str| Origin::File { file: name.to_string(), line: lines.get(path).copied() };
    if !index.duplicates.is_empty() {
        let problems = index
            .duplicates
            .into_iter()
            .map(|d| Problem {
                origin: Origin::File { file: name.to_string(), line: Some(d.line) },
                message: format!("duplicate key (first given at line {}); give each key once", d.first_line),
                path: d.path,
            })
            .collect();
        return Err(ConfigError { problems });
    }

    let mut doc: Value = serde_yaml_ng::from_str(text).map_err(|e| {
        let line = e.location().map(|l| l.line());
        ConfigError::one(Origin::File { file: name.to_string(), line }, "", strip_location(&e.to_string()))
    })?;
    if doc.is_null() {
        doc = Value::Mapping(Mapping::new());
    }
    let schema = schema_tree();

    let unknown: Vec<Problem> =
        unknown_keys(&doc, &schema, "").into_iter().map(|(path, message)| Problem { origin: at(&path), path, message }).collect();
    if !unknown.is_empty() {
        return Err(ConfigError { problems: unknown });
    }
    let mut cfg = typed(&doc).map_err(|(path, message)| {
        let origin = Origin::File { file: name.to_string(), line: message.1.or(lines.get(&path).copied()) };
        ConfigError::one(origin, path, message.0)
    })?;

    // Later --set arguments win; remember which one last wrote each key for blame.
    let mut set_by: HashMap<String, String> = HashMap::new();
    for arg in sets {
        let (path, value) = parse_set(arg, &schema)?;
        insert(&mut doc, &path, value);
        cfg = typed(&doc).map_err(|(p, m)| ConfigError::one(Origin::Set(arg.clone()), p, m.0))?;
        set_by.insert(path, arg.clone());
    }

    let problems: Vec<Problem> = violations(&cfg)
        .into_iter()
        .map(|v| {
            let origin = match set_by.get(v.path) {
                Some(arg) => Origin::Set(arg.clone()),
                None if lines.contains_key(v.path) => at(v.path),
                None => Origin::Default { file: name.to_string() },
            };
            Problem { origin, path: v.path.to_string(), message: v.message }
        })
        .collect();
    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    if cfg.optim.warmup_steps > cfg.train.max_steps {
        // A short smoke run (`--set train.max_steps=50`) of a config with a long warmup is
        // common; it warms up over the whole run rather than refusing to start.
        if algpt2_launch::launcher_rank(&|key| std::env::var(key).ok()) == 0 {
            eprintln!(
                "warning: optim.warmup_steps = {} exceeds train.max_steps = {}: warming up over the whole run ({} steps)",
                cfg.optim.warmup_steps, cfg.train.max_steps, cfg.train.max_steps
            );
        }
        cfg.optim.warmup_steps = cfg.train.max_steps;
    }
    Ok(cfg)
}

/// The default config as a YAML tree: the set of keys that exist, section by section.
fn schema_tree() -> Value {
    serde_yaml_ng::to_value(Config::default()).expect("the default config serializes")
}

/// Deserializes the tree, on failure giving the key path, message and line if serde knew it.
fn typed(doc: &Value) -> Result<Config, (String, (String, Option<usize>))> {
    serde_path_to_error::deserialize(doc.clone()).map_err(|e| {
        let path = e.path().to_string();
        let line = e.inner().location().map(|l| l.line());
        let path = if path == "." { String::new() } else { path };
        (path, (strip_location(&e.inner().to_string()), line))
    })
}

/// serde_yaml appends "at line L column C" and prefixes its own path; we report both
/// ourselves, in one format for file and `--set` errors alike.
fn strip_location(message: &str) -> String {
    let base = message.split(" at line ").next().unwrap_or(message);
    match base.split_once(": ") {
        Some((head, rest)) if !head.contains(' ') => rest.to_string(),
        _ => base.to_string(),
    }
}

/// Keys of `doc` that the schema lacks, each with a did-you-mean message.
fn unknown_keys(doc: &Value, schema: &Value, prefix: &str) -> Vec<(String, String)> {
    let (Value::Mapping(doc_map), Value::Mapping(schema_map)) = (doc, schema) else {
        return Vec::new(); // wrong shapes are type errors, reported by serde
    };
    let mut out = Vec::new();
    for (key, value) in doc_map {
        let key_text = scalar_text(key);
        let path = join(prefix, &key_text);
        match schema_map.get(key) {
            Some(sub) => out.extend(unknown_keys(value, sub, &path)),
            None => out.push((path, unknown_key_message(prefix, &key_text))),
        }
    }
    out
}

fn unknown_key_message(prefix: &str, key: &str) -> String {
    match suggest(prefix, key) {
        Some(s) => format!("unknown key, did you mean {s}?"),
        None => {
            let here = if prefix.is_empty() { "the top level".to_string() } else { prefix.to_string() };
            let known: Vec<String> = keys_at(prefix).into_iter().collect();
            format!("unknown key; {here} has: {}", known.join(", "))
        }
    }
}

/// The closest existing key beside `key`, else the same name in another section.
fn suggest(prefix: &str, key: &str) -> Option<String> {
    let siblings = keys_at(prefix);
    let best = siblings
        .iter()
        .map(|k| (strsim::damerau_levenshtein(k, key), k))
        .min_by_key(|(d, _)| *d)
        .filter(|(d, k)| *d <= (k.len().max(key.len()) / 3).max(1))
        .map(|(_, k)| join(prefix, k));
    best.or_else(|| {
        let Value::Mapping(top) = schema_tree() else { return None };
        top.iter().find_map(|(section, sub)| {
            let section = scalar_text(section);
            let Value::Mapping(m) = sub else { return None };
            m.keys().any(|k| scalar_text(k) == key).then(|| join(&section, key))
        })
    })
}

fn keys_at(prefix: &str) -> Vec<String> {
    let mut node = schema_tree();
    for part in prefix.split('.').filter(|p| !p.is_empty()) {
        node = node.get(part).cloned().unwrap_or(Value::Null);
    }
    match node {
        Value::Mapping(m) => m.keys().map(scalar_text).collect(),
        _ => Vec::new(),
    }
}

/// Splits `key.path=value`, checks the key exists and parses the value as YAML.
fn parse_set(arg: &str, schema: &Value) -> Result<(String, Value), ConfigError> {
    let origin = Origin::Set(arg.to_string());
    let Some((path, raw)) = arg.split_once('=') else {
        return Err(ConfigError::one(origin, "", "expected key.path=value"));
    };
    let path = path.trim().to_string();
    let mut node = schema;
    let mut walked = String::new();
    for part in path.split('.') {
        let next = match node {
            Value::Mapping(m) => m.get(part),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => {
                let message = if matches!(node, Value::Mapping(_)) {
                    unknown_key_message(&walked, part)
                } else {
                    format!("{walked} is a value, not a section")
                };
                return Err(ConfigError::one(origin, join(&walked, part), message));
            }
        }
        walked = join(&walked, part);
    }
    let value = if raw.trim().is_empty() {
        Value::Null
    } else {
        serde_yaml_ng::from_str(raw)
            .map_err(|e| ConfigError::one(origin, &path, format!("bad value: {}", strip_location(&e.to_string()))))?
    };
    Ok((path, value))
}

/// Writes `value` at dotted `path`, creating sections the file left out.
fn insert(doc: &mut Value, path: &str, value: Value) {
    let mut node = doc;
    let parts: Vec<&str> = path.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        let map = node.as_mapping_mut().expect("schema-checked path runs through mappings");
        node = map.entry(Value::from(*part)).or_insert_with(|| Value::Mapping(Mapping::new()));
        if node.is_null() {
            *node = Value::Mapping(Mapping::new());
        }
    }
    let map = node.as_mapping_mut().expect("schema-checked path runs through mappings");
    map.insert(Value::from(parts[parts.len() - 1]), value);
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => serde_yaml_ng::to_string(other).unwrap_or_default().trim().to_string(),
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str, sets: &[&str]) -> Vec<Problem> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        parse(text, "c.yaml", &sets).expect_err("config should be refused").problems
    }

    #[test]
    fn control_characters_and_wide_embeddings_are_refused() {
        let p = err("run_name: \"a\\nb\"\n", &[]);
        assert_eq!(p[0].path, "run_name");
        assert!(p[0].message.contains("control characters"), "{}", p[0].message);
        let p = err("model: { n_embd: 64, n_head: 4, embedding_size: 128 }\n", &[]);
        assert_eq!(p[0].path, "model.embedding_size");
        assert!(p[0].message.contains("exceeds model.n_embd = 64"), "{}", p[0].message);
        assert!(parse("model: { n_embd: 64, n_head: 4, embedding_size: 64 }\n", "c.yaml", &[]).is_ok());
    }

    #[test]
    fn a_warmup_longer_than_the_run_warms_up_over_the_whole_run() {
        let cfg = parse("train: { max_steps: 50 }\noptim: { warmup_steps: 1000 }\n", "c.yaml", &[]).unwrap();
        assert_eq!(cfg.optim.warmup_steps, 50);
        let cfg = parse("train: { max_steps: 50 }\noptim: { warmup_steps: 20 }\n", "c.yaml", &[]).unwrap();
        assert_eq!(cfg.optim.warmup_steps, 20);
    }

    #[test]
    fn empty_file_means_all_defaults() {
        let cfg = parse("", "c.yaml", &[]).unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn unknown_key_names_path_line_and_suggestion() {
        let p = err("model:\n  n_layer: 2\n  n_hed: 4\n", &[]);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].to_string(), "c.yaml, line 3: model.n_hed: unknown key, did you mean model.n_head?");
    }

    #[test]
    fn key_in_the_wrong_section_points_to_the_right_one() {
        let p = err("train:\n  n_head: 4\n", &[]);
        assert_eq!(p[0].message, "unknown key, did you mean model.n_head?");
    }

    #[test]
    fn all_unknown_keys_are_reported_at_once() {
        let p = err("modle:\n  x: 1\ntrain:\n  sequence_length: 2\n", &[]);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].path, "modle");
        assert!(p[0].message.contains("did you mean model?"), "{}", p[0].message);
        assert_eq!(p[1].path, "train.sequence_length");
        assert!(p[1].message.contains("train has: seq_len"), "{}", p[1].message);
    }

    #[test]
    fn wrong_type_names_path_and_line() {
        let p = err("run_name: x\ntrain:\n  seq_len: 64\n  max_steps: many\n", &[]);
        assert_eq!(p[0].path, "train.max_steps");
        assert_eq!(p[0].origin, Origin::File { file: "c.yaml".into(), line: Some(4) });
        assert!(p[0].message.contains("invalid type"), "{}", p[0].message);
    }

    #[test]
    fn negative_count_is_a_type_error() {
        let p = err("train:\n  micro_batch_size: -1\n", &[]);
        assert_eq!(p[0].path, "train.micro_batch_size");
        assert!(p[0].message.contains("-1"), "{}", p[0].message);
    }

    #[test]
    fn bad_enum_value_lists_the_choices() {
        let p = err("optim:\n  schedule: wsd\n", &[]);
        assert_eq!(p[0].path, "optim.schedule");
        assert!(p[0].message.contains("cosine"), "{}", p[0].message);
        assert_eq!(p[0].origin, Origin::File { file: "c.yaml".into(), line: Some(2) });
    }

    #[test]
    fn out_of_range_value_names_path_and_line() {
        let p = err("model:\n  n_layer: 2\n  dropout: 1.5\n", &[]);
        assert_eq!(p[0].to_string(), "c.yaml, line 3: model.dropout: 1.5 is out of range [0, 1)");
    }

    #[test]
    fn set_overrides_file_and_parses_yaml_scalars() {
        let sets: Vec<String> = ["model.embedding_size=null", "optim.lr=6e-4", "model.share_layers=false", "wandb.tags=[a, b]"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let cfg = parse("model:\n  embedding_size: 64\noptim:\n  lr: 1.0e-3\n", "c.yaml", &sets).unwrap();
        assert_eq!(cfg.model.embedding_size, None);
        assert_eq!(cfg.optim.lr, 6e-4);
        assert!(!cfg.model.share_layers);
        assert_eq!(cfg.wandb.tags, vec!["a", "b"]);
    }

    #[test]
    fn set_errors_blame_the_argument() {
        let p = err("", &["model.n_hed=4"]);
        assert_eq!(p[0].to_string(), "--set model.n_hed=4: model.n_hed: unknown key, did you mean model.n_head?");
        let p = err("", &["train.seq_len=long"]);
        assert_eq!(p[0].origin, Origin::Set("train.seq_len=long".into()));
        assert_eq!(p[0].path, "train.seq_len");
        let p = err("", &["model.dropout=2"]);
        assert_eq!(p[0].origin, Origin::Set("model.dropout=2".into()));
        let p = err("", &["model.n_head.x=1"]);
        assert!(p[0].message.contains("is a value, not a section"), "{}", p[0].message);
        let p = err("", &["model.n_head"]);
        assert!(p[0].message.contains("key.path=value"));
    }

    #[test]
    fn cross_key_rule_blames_the_key_that_was_written() {
        let p = err("train:\n  seq_len: 2048\n", &[]);
        assert_eq!(p[0].to_string(), "c.yaml, line 2: train.seq_len: 2048 exceeds model.n_positions = 1024");
        let p = err("", &["model.n_head=7"]);
        assert_eq!(p[0].origin, Origin::Set("model.n_head=7".into()));
        let p = err("model:\n  n_embd: 100\n", &[]);
        assert_eq!(p[0].path, "model.n_head");
        assert_eq!(p[0].origin, Origin::Default { file: "c.yaml".into() });
    }

    #[test]
    fn yaml_syntax_error_has_a_line() {
        let p = err("model:\n  n_layer: [1,\n", &[]);
        assert!(matches!(p[0].origin, Origin::File { line: Some(_), .. }), "{:?}", p[0]);
    }

    #[test]
    fn a_repeated_key_names_its_second_line() {
        let p = err("train:\n  lr: 1\n  max_steps: 5\n  lr: 2\n", &[]);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].to_string(), "c.yaml, line 4: train.lr: duplicate key (first given at line 2); give each key once");
        let p = err("train:\n  max_steps: 5\nmodel:\n  n_layer: 2\ntrain:\n  seed: 1\n", &[]);
        assert_eq!(p[0].origin, Origin::File { file: "c.yaml".into(), line: Some(5) });
        assert_eq!(p[0].path, "train");
    }

    #[test]
    fn section_that_is_not_a_mapping_is_a_type_error() {
        let p = err("model: 3\n", &[]);
        assert_eq!(p[0].path, "model");
        assert!(p[0].message.contains("invalid type"), "{}", p[0].message);
    }

    /// Random mutations of the shipped configs (characters dropped, inserted or swapped,
    /// lines duplicated or removed, values replaced): every outcome is a valid config or
    /// an error naming the file, never a panic.
    #[test]
    fn mutated_configs_never_panic() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let junk = [
            "null", "-1", "1e309", "\"x\"", "[1, 2]", "{a: 1}", "~", "true", "0", "99999999999999999999", ":", "- a", "&x", "*x",
            "!!binary AAA", "\t",
        ];
        let mut rng = crate::rng::SplitMix64::new(2024);
        let mut outcomes = (0usize, 0usize);
        for entry in std::fs::read_dir(dir).unwrap() {
            let original = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for _ in 0..400 {
                let mut lines: Vec<String> = original.lines().map(String::from).collect();
                for _ in 0..1 + rng.below(3) {
                    let i = rng.index_below(lines.len());
                    match rng.below(6) {
                        0 => {
                            let line = &mut lines[i];
                            if !line.is_empty() {
                                let at = line.char_indices().nth(rng.index_below(line.chars().count())).unwrap().0;
                                line.remove(at);
                            }
                        }
                        1 => lines[i].insert(0, [' ', ':', '-', '#', '\t', '{'][rng.index_below(6)]),
                        2 => {
                            let copy = lines[i].clone();
                            lines.insert(i, copy);
                        }
                        3 => {
                            lines.remove(i);
                            if lines.is_empty() {
                                lines.push(String::new());
                            }
                        }
                        4 => {
                            if let Some((key, _)) = lines[i].split_once(':') {
                                lines[i] = format!("{key}: {}", junk[rng.index_below(junk.len())]);
                            }
                        }
                        _ => {
                            let j = rng.index_below(lines.len());
                            lines.swap(i, j);
                        }
                    }
                }
                let text = lines.join("\n");
                let result = std::panic::catch_unwind(|| parse(&text, "mutated.yaml", &[]));
                match result {
                    Err(_) => panic!("parse panicked on:\n{text}"),
                    Ok(Ok(_)) => outcomes.0 += 1,
                    Ok(Err(e)) => {
                        outcomes.1 += 1;
                        assert!(!e.problems.is_empty());
                        for p in &e.problems {
                            let shown = p.to_string();
                            assert!(shown.starts_with("mutated.yaml"), "{shown}");
                        }
                    }
                }
            }
        }
        // Both kinds of outcome occur, so the mutations are neither all harmless nor all fatal.
        assert!(outcomes.0 > 50 && outcomes.1 > 50, "{outcomes:?}");
    }
}

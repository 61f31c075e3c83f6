//! Where each key of a YAML document sits, so that errors found after parsing (ranges,
//! cross-key rules) can still point at a line, and which keys are repeated. serde_yaml
//! only locates its own errors.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, Parser};

/// Where the keys of a document are.
#[derive(Debug, Default)]
pub struct KeyIndex {
    /// Dotted key path (`model.n_head`) → 1-based line of its first occurrence.
    pub lines: HashMap<String, usize>,
    /// Keys given twice in the same mapping, in document order. serde_yaml refuses them
    /// too, but places the error at the mapping rather than at the repeated key.
    pub duplicates: Vec<Duplicate>,
}

/// A key repeated within one mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct Duplicate {
    pub path: String,
    /// 1-based line of the repetition.
    pub line: usize,
    /// 1-based line of the first occurrence.
    pub first_line: usize,
}

/// Indexes the keys of `text`. Keys inside sequences are not indexed by path (they are
/// checked for repeats); a document that does not parse yields an empty index (the parse
/// error itself is reported by serde_yaml with its own location).
pub fn index_keys(text: &str) -> KeyIndex {
    enum Frame {
        /// `seen`: this mapping's keys so far, with their lines.
        Map {
            key: Option<String>,
            expecting_key: bool,
            seen: HashMap<String, usize>,
        },
        Seq,
    }
    fn prefix(stack: &[Frame]) -> String {
        let keys: Vec<&str> = stack
            .iter()
            .filter_map(|f| match f {
                Frame::Map { key: Some(k), expecting_key: false, .. } => Some(k.as_str()),
                _ => None,
            })
            .collect();
        keys.join(".")
    }
    // A finished value lets its enclosing mapping expect the next key.
    fn value_done(stack: &mut [Frame]) {
        if let Some(Frame::Map { expecting_key, .. }) = stack.last_mut() {
            *expecting_key = true;
        }
    }

    let mut index = KeyIndex::default();
    let mut stack: Vec<Frame> = Vec::new();
    let mut parser = Parser::new_from_str(text);
    loop {
        let Ok((event, marker)) = parser.next_token() else { return KeyIndex::default() };
        match event {
            Event::StreamEnd => break,
            Event::MappingStart(..) => stack.push(Frame::Map { key: None, expecting_key: true, seen: HashMap::new() }),
            Event::SequenceStart(..) => stack.push(Frame::Seq),
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                value_done(&mut stack);
            }
            Event::Scalar(s, ..) => match stack.last() {
                Some(Frame::Map { expecting_key: true, .. }) => {
                    let parent = prefix(&stack);
                    let path = if parent.is_empty() { s.clone() } else { format!("{parent}.{s}") };
                    let line = marker.line();
                    index.lines.entry(path.clone()).or_insert(line);
                    if let Some(Frame::Map { key, expecting_key, seen }) = stack.last_mut() {
                        match seen.get(&s) {
                            Some(&first_line) => index.duplicates.push(Duplicate { path, line, first_line }),
                            None => {
                                seen.insert(s.clone(), line);
                            }
                        }
                        *key = Some(s);
                        *expecting_key = false;
                    }
                }
                _ => value_done(&mut stack),
            },
            Event::Alias(_) => value_done(&mut stack),
            _ => {}
        }
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_nested_keys_by_line() {
        let text =
            "# comment\nrun_name: x\nmodel:\n  n_layer: 2\n  n_head: 4\ntrain:\n  seq_len: 64\nwandb:\n  tags: [a, b]\n  project: p\n";
        let lines = index_keys(text).lines;
        assert_eq!(lines["run_name"], 2);
        assert_eq!(lines["model"], 3);
        assert_eq!(lines["model.n_layer"], 4);
        assert_eq!(lines["model.n_head"], 5);
        assert_eq!(lines["train.seq_len"], 7);
        assert_eq!(lines["wandb.project"], 10);
        assert!(!lines.contains_key("n_head"));
    }

    #[test]
    fn flow_mappings_are_indexed_too() {
        let lines = index_keys("model: {n_layer: 2,\n  n_head: 4}\n").lines;
        assert_eq!(lines["model.n_layer"], 1);
        assert_eq!(lines["model.n_head"], 2);
    }

    #[test]
    fn broken_yaml_gives_empty_index() {
        let index = index_keys("model: [\n");
        assert!(index.lines.is_empty() && index.duplicates.is_empty());
    }

    #[test]
    fn repeated_keys_are_found_at_their_second_line() {
        let text = "train:\n  lr: 1\n  max_steps: 5\n  lr: 2\nmodel:\n  n_layer: 2\ntrain:\n  seed: 1\n";
        let d = index_keys(text).duplicates;
        assert_eq!(
            d,
            vec![Duplicate { path: "train.lr".into(), line: 4, first_line: 2 }, Duplicate { path: "train".into(), line: 7, first_line: 1 },]
        );
        // The same key in two sections, or in two items of a list, is no repeat.
        let text = "model:\n  seed: 1\ntrain:\n  seed: 1\nx:\n  - {a: 1}\n  - {a: 2}\n";
        assert!(index_keys(text).duplicates.is_empty());
        assert_eq!(index_keys("model: {n_layer: 2,\n  n_layer: 3}\n").duplicates[0].line, 2);
    }
}

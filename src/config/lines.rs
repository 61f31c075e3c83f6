//! Where each key of a YAML document sits, so that errors found after parsing (ranges,
//! cross-key rules) can still point at a line. serde_yaml only locates its own errors.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, Parser};

/// Dotted key path (`model.n_head`) → 1-based line of the key. Keys inside sequences are
/// not indexed; a document that does not parse yields an empty index (the parse error
/// itself is reported by serde_yaml with its own location).
pub fn key_lines(text: &str) -> HashMap<String, usize> {
    enum Frame {
        Map { key: Option<String>, expecting_key: bool },
        Seq,
    }
    fn prefix(stack: &[Frame]) -> String {
        let keys: Vec<&str> = stack
            .iter()
            .filter_map(|f| match f {
                Frame::Map { key: Some(k), expecting_key: false } => Some(k.as_str()),
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

    let mut lines = HashMap::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut parser = Parser::new_from_str(text);
    loop {
        let Ok((event, marker)) = parser.next_token() else { return HashMap::new() };
        match event {
            Event::StreamEnd => break,
            Event::MappingStart(..) => stack.push(Frame::Map { key: None, expecting_key: true }),
            Event::SequenceStart(..) => stack.push(Frame::Seq),
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                value_done(&mut stack);
            }
            Event::Scalar(s, ..) => match stack.last() {
                Some(Frame::Map { expecting_key: true, .. }) => {
                    let parent = prefix(&stack);
                    let path = if parent.is_empty() { s.clone() } else { format!("{parent}.{s}") };
                    lines.entry(path).or_insert(marker.line());
                    if let Some(Frame::Map { key, expecting_key }) = stack.last_mut() {
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
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_nested_keys_by_line() {
        let text =
            "# comment\nrun_name: x\nmodel:\n  n_layer: 2\n  n_head: 4\ntrain:\n  seq_len: 64\nwandb:\n  tags: [a, b]\n  project: p\n";
        let lines = key_lines(text);
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
        let lines = key_lines("model: {n_layer: 2,\n  n_head: 4}\n");
        assert_eq!(lines["model.n_layer"], 1);
        assert_eq!(lines["model.n_head"], 2);
    }

    #[test]
    fn broken_yaml_gives_empty_index() {
        assert!(key_lines("model: [\n").is_empty());
    }
}

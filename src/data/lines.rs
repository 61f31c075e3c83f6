//! Reading text with a bound on memory whatever the input: a file's lines, none longer
//! than a limit, and long texts cut into pieces. A cut falls just before a space that
//! starts a word, where GPT-2's byte-level pre-tokenizer cuts anyway, so the tokens are
//! the same as those of the uncut text.

use super::split::Piece;
use anyhow::anyhow;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// What a line longer than its limit means for a layout.
#[derive(Debug, Clone, Copy)]
pub enum LongLines {
    /// Text: the line is handed on in pieces of at most this many bytes (with a warning).
    Cut(usize),
    /// A line that must be parsed whole (a JSON document): longer is an error.
    Refuse(usize),
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// A file's lines with their line ends, numbered from 1; a line longer than the limit
/// arrives as several items with the same number. Invalid UTF-8 is an error naming the
/// file, line and byte offset, never replaced silently.
pub fn lines(path: &Path, long: LongLines) -> Box<dyn Iterator<Item = anyhow::Result<(usize, String)>> + Send> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => {
            let err = anyhow!("cannot open {}: {e}", path.display());
            return Box::new(std::iter::once(Err(err)));
        }
    };
    let path = path.to_path_buf();
    let limit = match long {
        LongLines::Cut(n) | LongLines::Refuse(n) => n.max(8),
    };
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut number = 0usize;
    let mut offset = 0u64;
    // The part of a cut line not handed on yet, and whether the next item continues a line.
    let mut carry: Vec<u8> = Vec::new();
    let mut continuing = false;
    let mut warned = false;
    let mut failed = false;
    Box::new(std::iter::from_fn(move || {
        if failed {
            return None;
        }
        let mut bytes = std::mem::take(&mut carry);
        let ended = match read_line_bounded(&mut reader, &mut bytes, limit) {
            Ok(ended) => ended,
            Err(e) => {
                failed = true;
                return Some(Err(anyhow!("cannot read {}: {e}", path.display())));
            }
        };
        if bytes.is_empty() {
            return None;
        }
        if !continuing {
            number += 1;
        }
        if !ended {
            if let LongLines::Refuse(n) = long {
                failed = true;
                return Some(Err(anyhow!(
                    "{}, line {number}: longer than {} MiB; each line must be one JSON document of at most that size",
                    path.display(),
                    n >> 20
                )));
            }
            let at = cut_point(&bytes);
            carry = bytes.split_off(at);
            if !std::mem::replace(&mut warned, true) && first_warning_for(&path) {
                tracing::warn!(
                    "{}, line {number}: longer than {} KiB without a line end; long lines are cut before a word into pieces of at most that size (the tokens are the same)",
                    path.display(),
                    limit >> 10
                );
            }
        }
        continuing = !ended;
        let start = offset;
        offset += bytes.len() as u64;
        // A UTF-8 byte order mark (Windows editors write one) is not text.
        if start == 0 && bytes.starts_with(UTF8_BOM) {
            bytes.drain(..UTF8_BOM.len());
        }
        match String::from_utf8(bytes) {
            Ok(line) => Some(Ok((number, line))),
            Err(e) => {
                failed = true;
                // A compressed or UTF-16 file fails at its first bytes: say what it is
                // rather than suggest a conversion from Latin-1.
                if let Ok(Some(not_text)) = super::sniff::not_text(&path) {
                    return Some(Err(anyhow!("{}", not_text.why)));
                }
                let at = start + e.utf8_error().valid_up_to() as u64;
                Some(Err(anyhow!(
                    "{}, line {number}: not valid UTF-8 (byte offset {at}); convert the file to UTF-8 first (e.g. iconv -f latin1 -t utf-8)",
                    path.display()
                )))
            }
        }
    }))
}

/// True the first time a file's long lines are reported: the train split is read twice
/// (tokenizer training, then encoding), and once is enough to say so.
fn first_warning_for(path: &Path) -> bool {
    static WARNED: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.iter().any(|p| p == path) {
        return false;
    }
    warned.push(path.to_path_buf());
    true
}

/// Appends to `out` up to and including the next line end, stopping once `out` holds
/// `limit` bytes. True when the line ended (or the file did).
fn read_line_bounded(reader: &mut impl BufRead, out: &mut Vec<u8>, limit: usize) -> std::io::Result<bool> {
    while out.len() < limit {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(true);
        }
        let room = limit - out.len();
        let window = &buf[..buf.len().min(room)];
        if let Some(i) = window.iter().position(|&b| b == b'\n') {
            out.extend_from_slice(&window[..=i]);
            reader.consume(i + 1);
            return Ok(true);
        }
        let n = window.len();
        out.extend_from_slice(window);
        reader.consume(n);
    }
    // Exactly at the limit: a line end right after it still ends this line.
    let buf = reader.fill_buf()?;
    if buf.first() == Some(&b'\n') {
        out.push(b'\n');
        reader.consume(1);
        return Ok(true);
    }
    Ok(buf.is_empty())
}

/// Where to cut an over-long run of text: before the last space that starts a word (in
/// the second half), else after the last whole UTF-8 character.
fn cut_point(bytes: &[u8]) -> usize {
    let half = bytes.len() / 2;
    let word_start = (half.max(1)..bytes.len().saturating_sub(1))
        .rev()
        .find(|&i| bytes[i] == b' ' && !bytes[i + 1].is_ascii_whitespace() && !bytes[i - 1].is_ascii_whitespace());
    if let Some(i) = word_start {
        return i;
    }
    last_char_end(bytes)
}

/// The end of the last whole UTF-8 character in `bytes` (all of it when it ends on one).
fn last_char_end(bytes: &[u8]) -> usize {
    let len = bytes.len();
    // The last character starts after at most 3 continuation bytes (10xxxxxx).
    let mut start = len;
    while start > 0 && len - start < 3 && bytes[start - 1] & 0xC0 == 0x80 {
        start -= 1;
    }
    if start == 0 {
        return len;
    }
    let lead = bytes[start - 1];
    let width = match lead {
        0xF0.. => 4,
        0xE0.. => 3,
        0xC0.. => 2,
        _ => 1,
    };
    if start - 1 + width <= len || start == 1 {
        len
    } else {
        start - 1
    }
}

/// A piece longer than `limit` bytes, as pieces of at most `limit` (only the first
/// keeping `starts_document`); shorter pieces pass unchanged.
pub fn cut_long(piece: Piece, limit: usize) -> Vec<Piece> {
    if piece.text.len() <= limit {
        return vec![piece];
    }
    let mut out = Vec::new();
    let mut rest = piece.text.as_str();
    let mut starts_document = piece.starts_document;
    while rest.len() > limit {
        let window = &rest.as_bytes()[..limit];
        let mut at = cut_point(window);
        while !rest.is_char_boundary(at) {
            at -= 1;
        }
        if at == 0 {
            at = limit;
            while !rest.is_char_boundary(at) {
                at += 1;
            }
        }
        out.push(Piece { text: rest[..at].to_string(), starts_document });
        starts_document = false;
        rest = &rest[at..];
    }
    out.push(Piece { text: rest.to_string(), starts_document });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(path: &Path, long: LongLines) -> anyhow::Result<Vec<(usize, String)>> {
        lines(path, long).collect()
    }

    #[test]
    fn a_long_line_comes_in_bounded_pieces_before_words_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one-line.txt");
        let words = ["alpha", "béta", "γάμμα", "delta", "東京"];
        let text: String = (0..20_000).map(|i| format!(" {}", words[i % words.len()])).collect::<String>() + "\nlast line\n";
        std::fs::write(&path, &text).unwrap();
        let got = read_all(&path, LongLines::Cut(4096)).unwrap();
        assert!(got.len() > 20, "{}", got.len());
        assert!(got.iter().all(|(_, s)| s.len() <= 4096));
        // Every cut of line 1 falls before a word: each continuation starts with a space and a letter.
        assert!(got[1..].iter().filter(|(n, _)| *n == 1).all(|(_, s)| s.starts_with(' ') && !s[1..].starts_with(' ')));
        assert_eq!(got.last().unwrap(), &(2, "last line\n".to_string()));
        assert_eq!(got.iter().map(|(_, s)| s.as_str()).collect::<String>(), text);
    }

    #[test]
    fn text_without_spaces_is_cut_between_characters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dense.txt");
        let text = "東京".repeat(5000);
        std::fs::write(&path, &text).unwrap();
        let got = read_all(&path, LongLines::Cut(1000)).unwrap();
        assert!(got.iter().all(|(n, s)| *n == 1 && s.len() <= 1000));
        assert_eq!(got.iter().map(|(_, s)| s.as_str()).collect::<String>(), text);
    }

    #[test]
    fn a_line_that_must_be_whole_is_refused_when_too_long() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, format!("{{\"text\": \"short\"}}\n{{\"text\": \"{}\"}}\n", "x".repeat(3 << 20))).unwrap();
        let err = read_all(&path, LongLines::Refuse(1 << 20)).unwrap_err().to_string();
        assert!(err.contains("d.jsonl, line 2: longer than 1 MiB"), "{err}");
    }

    #[test]
    fn a_line_exactly_at_the_limit_keeps_its_line_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exact.txt");
        std::fs::write(&path, format!("{}\nnext\n", "y".repeat(64))).unwrap();
        let got = read_all(&path, LongLines::Cut(64)).unwrap();
        assert_eq!(got, vec![(1, format!("{}\n", "y".repeat(64))), (2, "next\n".to_string())]);
    }

    #[test]
    fn long_pieces_are_cut_and_keep_the_document_start_once() {
        let text: String = (0..3000).map(|i| format!(" w{i}")).collect();
        let pieces = cut_long(Piece { text: text.clone(), starts_document: true }, 1000);
        assert!(pieces.len() > 10);
        assert!(pieces[0].starts_document && pieces[1..].iter().all(|p| !p.starts_document));
        assert!(pieces.iter().all(|p| p.text.len() <= 1000));
        assert_eq!(pieces.iter().map(|p| p.text.as_str()).collect::<String>(), text);
    }

    /// The claim the cut rests on: encoding the pieces gives the tokens of the whole text.
    #[test]
    fn cutting_before_words_keeps_the_tokens() {
        let sample: String = (0..400).map(|i| format!(" word{} and  more,\tpunct. {}", i % 37, i * 13)).collect();
        let tok = crate::data::tokenizer::TextTokenizer::train(std::iter::once(sample.clone()), 400).unwrap();
        let pieces = cut_long(Piece { text: sample.clone(), starts_document: true }, 700);
        assert!(pieces.len() > 5);
        let cut: Vec<u32> = pieces.iter().flat_map(|p| tok.encode(&p.text).unwrap()).collect();
        assert_eq!(cut, tok.encode(&sample).unwrap());
    }
}

//! From configured paths to a stream of text: which files make each split, in which
//! layout, and how they divide into documents.

use super::lines::{cut_long, lines, LongLines};
use super::sniff::not_text;
use super::split::{Piece, Split};
use crate::config::{file_kind, DataConfig, DataFormat};
use anyhow::{anyhow, bail, Context};
use std::path::{Path, PathBuf};

/// The files of one split and the layout they are read in.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitFiles {
    pub split: Split,
    pub format: DataFormat,
    pub files: Vec<PathBuf>,
}

/// Documents reach the tokenizer in pieces of at most about this many bytes: at line
/// ends where lines are short, before a word where they are not.
const TEXT_PIECE_BYTES: usize = 1 << 20;
/// A JSON line is parsed whole, so it has a bound of its own.
const JSON_LINE_BYTES: usize = 256 << 20;

/// The files of every split the config names, resolved once (globs expanded, layouts
/// detected, sizes and times taken): the cache's location, the tokenizer's training, the
/// encoding and the opening all take this value instead of asking the config again.
#[derive(Debug, Clone, PartialEq)]
pub struct Sources {
    /// In `Split::ALL` order; train is always first.
    splits: Vec<SplitFiles>,
    /// Per split: each file's path, size and modification time.
    fingerprints: Vec<Vec<(String, u64, u128)>>,
}

impl Sources {
    pub fn resolve(cfg: &DataConfig) -> anyhow::Result<Sources> {
        let mut splits = Vec::new();
        let mut fingerprints = Vec::new();
        for split in Split::ALL {
            if let Some(files) = split_files(cfg, split)? {
                fingerprints.push(fingerprint(&files)?);
                splits.push(files);
            }
        }
        Ok(Sources { splits, fingerprints })
    }

    pub fn train(&self) -> &SplitFiles {
        &self.splits[0]
    }

    pub fn iter(&self) -> impl Iterator<Item = &SplitFiles> {
        self.splits.iter()
    }

    /// Split name → its files' (path, size, mtime): what names the token cache.
    pub fn fingerprints(&self) -> std::collections::BTreeMap<&'static str, &[(String, u64, u128)]> {
        self.splits.iter().zip(&self.fingerprints).map(|(s, f)| (s.split.name(), f.as_slice())).collect()
    }

    /// The files of the eval splits that are also train files: the same file (by device
    /// and inode, so through links and other spellings of its path too) or the same
    /// bytes. Each leaks the split into training: it is measured on text trained on.
    pub fn shared_with_train(&self) -> Vec<SharedWithTrain> {
        use std::os::unix::fs::MetadataExt;
        let stat = |f: &PathBuf| std::fs::metadata(f).ok().map(|m| (m.dev(), m.ino(), m.len()));
        let train: Vec<(&PathBuf, (u64, u64, u64))> = self.train().files.iter().filter_map(|f| Some((f, stat(f)?))).collect();
        let mut shared = Vec::new();
        for files in &self.splits[1..] {
            for file in &files.files {
                let Some((dev, ino, len)) = stat(file) else { continue };
                let same_file = train.iter().find(|(_, (d, i, _))| (*d, *i) == (dev, ino));
                let found = match same_file {
                    Some((train_file, _)) => Some(((*train_file).clone(), true)),
                    None => {
                        train.iter().find(|(t, (_, _, l))| *l == len && len > 0 && same_bytes(file, t)).map(|(t, _)| ((*t).clone(), false))
                    }
                };
                if let Some((train_file, same_file)) = found {
                    shared.push(SharedWithTrain { split: files.split, file: file.clone(), train_file, same_file });
                }
            }
        }
        shared
    }

    /// A readable name for the data: the directory of the first train file.
    pub fn label(&self) -> String {
        match self.train().format {
            DataFormat::Synthetic => "synthetic".to_string(),
            _ => self.train().files[0]
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "data".to_string()),
        }
    }
}

/// An eval split's file that is also in the train split (see [`Sources::shared_with_train`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedWithTrain {
    pub split: Split,
    pub file: PathBuf,
    pub train_file: PathBuf,
    /// The same file; otherwise another file with the same bytes.
    pub same_file: bool,
}

impl std::fmt::Display for SharedWithTrain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let split = self.split.name();
        let (file, train_file) = (self.file.display(), self.train_file.display());
        if self.same_file && self.file == self.train_file {
            write!(f, "data.{split} {file} is also in data.train")?;
        } else if self.same_file {
            write!(f, "data.{split} {file} is also in data.train (as {train_file})")?;
        } else {
            write!(f, "data.{split} {file} holds the same bytes as the data.train file {train_file}")?;
        }
        write!(
            f,
            ": the {split} split leaks into training, so its loss and perplexity are measured on text the model trains on and look better than they are. Name {split} files that data.train (or its glob) does not take in"
        )
    }
}

/// Whether two files of the same length hold the same bytes; read until the first
/// difference, which for different files comes early.
fn same_bytes(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (Ok(mut a), Ok(mut b)) = (std::fs::File::open(a), std::fs::File::open(b)) else { return false };
    let (mut x, mut y) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = match a.read(&mut x) {
            Ok(n) => n,
            Err(_) => return false,
        };
        if n == 0 {
            return true;
        }
        if b.read_exact(&mut y[..n]).is_err() || x[..n] != y[..n] {
            return false;
        }
    }
}

/// The files of `split`, or None when the config names none (valid and test may be
/// absent; train may not, except for the synthetic corpus, which has no files).
fn split_files(cfg: &DataConfig, split: Split) -> anyhow::Result<Option<SplitFiles>> {
    if cfg.format == DataFormat::Synthetic {
        return Ok(Some(SplitFiles { split, format: DataFormat::Synthetic, files: Vec::new() }));
    }
    let pattern = match split {
        Split::Train => cfg.train.as_ref(),
        Split::Valid => cfg.valid.as_ref(),
        Split::Test => cfg.test.as_ref(),
    };
    let key = format!("data.{}", split.name());
    let Some(pattern) = pattern else {
        if split == Split::Train {
            bail!("{key} is not set: name the training files (a path or glob), or use data.format: synthetic");
        }
        return Ok(None);
    };
    let files = expand(pattern).with_context(|| format!("{key}: {pattern}"))?;
    let format = match cfg.format {
        DataFormat::Auto => layout_from_extension(&files[0]),
        f => Some(f),
    };
    // Said before the tokenizer reads a byte, and of every shard, not just when reached.
    // Under an extension `auto` cannot place (`train.txt.gz`), what the file is (gzip) is
    // the better answer, unless only NUL bytes tell it (it may be a binary layout).
    if format.is_none_or(|f| matches!(f, DataFormat::Wikitext | DataFormat::Text | DataFormat::Jsonl)) {
        for file in &files {
            if let Some(not_text) = not_text(file).with_context(|| format!("{key}: cannot read {}", file.display()))? {
                if format.is_some() || !not_text.binary {
                    bail!("{key}: {}", not_text.why);
                }
            }
        }
    }
    let Some(format) = format else {
        let name = files[0].file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        bail!("{key}: {pattern}: cannot tell the layout of {name} from its extension: set data.format (wikitext, parquet, text or jsonl)");
    };
    Ok(Some(SplitFiles { split, format, files }))
}

/// A path, or a glob matching at least one file, sorted so that shard order is stable.
fn expand(pattern: &str) -> anyhow::Result<Vec<PathBuf>> {
    let is_glob = pattern.contains(['*', '?', '[']);
    // Asked of the file system, never by opening the file: opening a FIFO blocks.
    if !is_glob {
        let path = PathBuf::from(pattern);
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("file not found (run `algpt2-ddp download`, or fix the path)"),
            Err(e) => bail!("cannot read it: {e}"),
        };
        if meta.is_dir() {
            bail!("is a directory, not a file: name the file in it, or a glob such as {}/*.parquet", pattern.trim_end_matches('/'));
        }
        if !meta.is_file() {
            bail!("not a regular file ({}): name a file that holds the data", file_kind(meta.file_type()));
        }
        return Ok(vec![path]);
    }
    let mut files = Vec::new();
    for path in glob::glob(pattern).map_err(|e| anyhow!("bad glob pattern: {e}"))?.filter_map(Result::ok) {
        // Directories a glob takes in are passed over; anything else that is no file is named.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => files.push(path),
            Ok(meta) if !meta.is_dir() => bail!("matches {}, not a regular file ({})", path.display(), file_kind(meta.file_type())),
            _ => {}
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("the glob matches no files");
    }
    Ok(files)
}

/// The layout `auto` reads a file in, from its extension; None when it cannot tell.
fn layout_from_extension(path: &Path) -> Option<DataFormat> {
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "tokens" | "raw" => Some(DataFormat::Wikitext),
        "parquet" => Some(DataFormat::Parquet),
        "jsonl" => Some(DataFormat::Jsonl),
        "txt" | "text" => Some(DataFormat::Text),
        _ => None,
    }
}

/// Size and modification time of each file: a changed file invalidates its token cache.
fn fingerprint(files: &SplitFiles) -> anyhow::Result<Vec<(String, u64, u128)>> {
    files
        .files
        .iter()
        .map(|f| {
            let meta = std::fs::metadata(f).with_context(|| format!("cannot stat {}", f.display()))?;
            let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            Ok((f.display().to_string(), meta.len(), modified.map_or(0, |d| d.as_nanos())))
        })
        .collect()
}

/// The split's text, piece by piece, in file order.
pub fn pieces(files: &SplitFiles) -> Box<dyn Iterator<Item = anyhow::Result<Piece>> + Send> {
    let format = files.format;
    if format == DataFormat::Synthetic {
        return Box::new(super::synthetic_source::pieces(files.split).map(Ok));
    }
    let paths = files.files.clone();
    let text_lines = LongLines::Cut(TEXT_PIECE_BYTES);
    let pieces = paths.into_iter().flat_map(move |path| -> Box<dyn Iterator<Item = anyhow::Result<Piece>> + Send> {
        match format {
            DataFormat::Wikitext => Box::new(wikitext_articles(lines(&path, text_lines))),
            DataFormat::Text => Box::new(text_pieces(lines(&path, text_lines))),
            DataFormat::Jsonl => Box::new(jsonl_documents(path.clone(), lines(&path, LongLines::Refuse(JSON_LINE_BYTES)))),
            DataFormat::Parquet => parquet_pieces(&path),
            DataFormat::Auto | DataFormat::Synthetic => unreachable!("resolved in split_files"),
        }
    });
    // Whatever the layout, no piece handed to the tokenizer exceeds the bound: its memory
    // grows with the piece (a 100 MB piece took 18 GB).
    Box::new(pieces.flat_map(|piece| -> Vec<anyhow::Result<Piece>> {
        match piece {
            Ok(piece) => cut_long(piece, TEXT_PIECE_BYTES).into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        }
    }))
}

/// Rows of a parquet shard's `text` column. HF's WikiText shards hold one line per row
/// (recognised by `wikitext` in the path), grouped into articles like the text files;
/// any other shard holds one document per row.
fn parquet_pieces(path: &Path) -> Box<dyn Iterator<Item = anyhow::Result<Piece>> + Send> {
    let rows = match super::parquet::open_text_column(path) {
        Ok(rows) => rows,
        Err(e) => return Box::new(std::iter::once(Err(e))),
    };
    if path.to_string_lossy().to_lowercase().contains("wikitext") {
        Box::new(wikitext_articles(rows.enumerate().map(|(i, row)| row.map(|text| (i + 1, text)))))
    } else {
        Box::new(rows.map(|row| row.map(|text| Piece { text, starts_document: true })))
    }
}

/// WikiText marks each article with a top-level heading line ` = Title = `
/// (sections are ` = = Section = = `); an article runs until the next such heading.
pub fn is_article_heading(line: &str) -> bool {
    let t = line.trim_end();
    t.starts_with(" = ") && !t.starts_with(" = = ") && t.ends_with(" =") && t.len() > 4
}

/// Groups WikiText lines into articles, one document each.
pub fn wikitext_articles<I>(lines: I) -> impl Iterator<Item = anyhow::Result<Piece>> + Send
where
    I: Iterator<Item = anyhow::Result<(usize, String)>> + Send,
{
    let mut lines = lines.peekable();
    // Set once part of the current article has been handed on (it was longer than a piece).
    let mut continuing = false;
    std::iter::from_fn(move || {
        let mut article = String::new();
        loop {
            match lines.peek() {
                None => break,
                Some(Ok((_, line))) if is_article_heading(line) => {
                    if !article.trim().is_empty() || (continuing && !article.is_empty()) {
                        break;
                    }
                    // The heading starts the next article (the previous one is all handed on).
                    continuing = false;
                }
                _ => {}
            }
            if article.len() >= TEXT_PIECE_BYTES {
                let starts_document = !std::mem::replace(&mut continuing, true);
                return Some(Ok(Piece { text: article, starts_document }));
            }
            match lines.next()? {
                Ok((_, line)) => article.push_str(&line),
                Err(e) => return Some(Err(e)),
            }
        }
        // Blank lines before the first heading are not an article.
        if article.is_empty() || (article.trim().is_empty() && !continuing) {
            return None;
        }
        let starts_document = !std::mem::replace(&mut continuing, false);
        Some(Ok(Piece { text: article, starts_document }))
    })
}

/// A plain-text file is one document, handed on in pieces that end at line ends.
fn text_pieces<I>(lines: I) -> impl Iterator<Item = anyhow::Result<Piece>> + Send
where
    I: Iterator<Item = anyhow::Result<(usize, String)>> + Send,
{
    let mut lines = lines;
    let mut first = true;
    std::iter::from_fn(move || {
        let mut text = String::new();
        while text.len() < TEXT_PIECE_BYTES {
            match lines.next() {
                None => break,
                Some(Ok((_, line))) => text.push_str(&line),
                Some(Err(e)) => return Some(Err(e)),
            }
        }
        if text.is_empty() {
            return None;
        }
        let starts_document = std::mem::replace(&mut first, false);
        Some(Ok(Piece { text, starts_document }))
    })
}

/// JSON lines: each non-blank line an object whose `text` string is one document.
fn jsonl_documents<I>(path: PathBuf, lines: I) -> impl Iterator<Item = anyhow::Result<Piece>> + Send
where
    I: Iterator<Item = anyhow::Result<(usize, String)>> + Send,
{
    lines.filter_map(move |line| {
        let (number, line) = match line {
            Ok(l) => l,
            Err(e) => return Some(Err(e)),
        };
        if line.trim().is_empty() {
            return None;
        }
        let where_ = || format!("{}, line {number}", path.display());
        let value: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => return Some(Err(anyhow!("{}: not a JSON object: {e}", where_()))),
        };
        match value.get("text").and_then(|t| t.as_str()) {
            Some(text) => Some(Ok(Piece { text: text.to_string(), starts_document: true })),
            None => Some(Err(anyhow!("{}: no string field \"text\" (each line must be {{\"text\": \"...\"}})", where_()))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(text: &str) -> Vec<anyhow::Result<(usize, String)>> {
        text.split_inclusive('\n').enumerate().map(|(i, l)| Ok((i + 1, l.to_string()))).collect()
    }

    #[test]
    fn wikitext_splits_at_top_level_headings_only() {
        let text = " \n = Alpha = \n \n Alpha text . \n = = Section = = \n more . \n = Beta = \n Beta text . \n";
        let docs: Vec<String> = wikitext_articles(numbered(text).into_iter()).map(|p| p.unwrap().text).collect();
        assert_eq!(docs.len(), 2);
        assert!(docs[0].starts_with(" \n = Alpha = \n"), "{:?}", docs[0]);
        assert!(docs[0].contains(" = = Section = = \n more . \n"));
        assert_eq!(docs[1], " = Beta = \n Beta text . \n");
        // Nothing is lost: the articles concatenate back to the file.
        assert_eq!(docs.concat(), text);
    }

    #[test]
    fn a_long_article_comes_in_bounded_pieces_and_the_next_starts_a_document() {
        let body = " some words of a very long article .\n".repeat(80_000); // ~3 MB, no heading inside
        let text = format!(" = Long = \n{body} = Next = \n short .\n");
        let pieces: Vec<Piece> = wikitext_articles(numbered(&text).into_iter()).map(|p| p.unwrap()).collect();
        assert!(pieces.len() >= 4, "{}", pieces.len());
        assert!(pieces.iter().all(|p| p.text.len() <= TEXT_PIECE_BYTES + 64));
        let starts: Vec<bool> = pieces.iter().map(|p| p.starts_document).collect();
        assert_eq!(starts.iter().filter(|&&s| s).count(), 2, "{starts:?}");
        assert!(starts[0] && *starts.last().unwrap());
        assert_eq!(pieces.last().unwrap().text, " = Next = \n short .\n");
        assert_eq!(pieces.iter().map(|p| p.text.as_str()).collect::<String>(), text);
    }

    #[test]
    fn a_byte_order_mark_is_not_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bom.txt");
        std::fs::write(&path, b"\xEF\xBB\xBFfirst line\nsecond \xEF\xBB\xBF kept\n").unwrap();
        let got: Vec<String> = lines(&path, LongLines::Cut(TEXT_PIECE_BYTES)).map(|l| l.unwrap().1).collect();
        // Only the mark at the very start goes; one inside the text is the user's.
        assert_eq!(got, ["first line\n", "second \u{FEFF} kept\n"]);
    }

    #[test]
    fn a_directory_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let e = expand(dir.path().to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("is a directory") && e.contains("/*.parquet"), "{e}");
        let e = expand(dir.path().join("missing.txt").to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("file not found"), "{e}");
    }

    #[test]
    fn headings_are_recognised() {
        assert!(is_article_heading(" = Valkyria Chronicles III = \n"));
        assert!(!is_article_heading(" = = Gameplay = = \n"));
        assert!(!is_article_heading(" The = sign = \n"));
        assert!(!is_article_heading(" \n"));
    }

    #[test]
    fn non_utf8_is_an_error_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.txt");
        std::fs::write(&path, b"good line\nbad \xff byte\n").unwrap();
        let err = lines(&path, LongLines::Cut(TEXT_PIECE_BYTES)).collect::<anyhow::Result<Vec<_>>>().unwrap_err().to_string();
        assert!(err.contains("bad.txt, line 2: not valid UTF-8 (byte offset 14)"), "{err}");
    }

    #[test]
    fn jsonl_takes_the_text_field_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"text\": \"one\"}\n\n{\"text\": \"two\\nlines\", \"id\": 3}\n").unwrap();
        let docs: Vec<_> =
            jsonl_documents(path.clone(), lines(&path, LongLines::Refuse(JSON_LINE_BYTES))).map(|p| p.unwrap().text).collect();
        assert_eq!(docs, vec!["one", "two\nlines"]);
        std::fs::write(&path, "{\"text\": \"one\"}\n{\"body\": 1}\n").unwrap();
        let err = jsonl_documents(path.clone(), lines(&path, LongLines::Refuse(JSON_LINE_BYTES)))
            .collect::<anyhow::Result<Vec<_>>>()
            .unwrap_err();
        assert!(err.to_string().contains("d.jsonl, line 2: no string field \"text\""), "{err}");
    }

    #[test]
    fn text_file_is_one_document_in_bounded_pieces() {
        let line = "x".repeat(1000) + "\n";
        let text = line.repeat(3000); // ~3 MB
        let pieces: Vec<Piece> = text_pieces(numbered(&text).into_iter()).map(|p| p.unwrap()).collect();
        assert!(pieces.len() >= 3, "{}", pieces.len());
        assert!(pieces[0].starts_document && pieces[1..].iter().all(|p| !p.starts_document));
        assert!(pieces.iter().all(|p| p.text.len() <= TEXT_PIECE_BYTES + line.len()));
        assert_eq!(pieces.iter().map(|p| p.text.as_str()).collect::<String>(), text);
    }

    #[test]
    fn split_files_resolves_globs_formats_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.jsonl", "a.jsonl"] {
            std::fs::write(dir.path().join(name), "{\"text\":\"x\"}\n").unwrap();
        }
        let cfg = DataConfig {
            format: DataFormat::Auto,
            train: Some(format!("{}/*.jsonl", dir.path().display())),
            valid: Some(format!("{}/missing.tokens", dir.path().display())),
            ..DataConfig::default()
        };
        let train = split_files(&cfg, Split::Train).unwrap().unwrap();
        assert_eq!(train.format, DataFormat::Jsonl);
        assert!(train.files[0].ends_with("a.jsonl") && train.files[1].ends_with("b.jsonl"));
        let err = format!("{:#}", split_files(&cfg, Split::Valid).unwrap_err());
        assert!(err.contains("data.valid") && err.contains("missing.tokens") && err.contains("file not found"), "{err}");
        assert_eq!(split_files(&cfg, Split::Test).unwrap(), None);
        let no_train = DataConfig { format: DataFormat::Text, ..DataConfig::default() };
        assert!(split_files(&no_train, Split::Train).unwrap_err().to_string().contains("data.train is not set"));
    }
}

#[cfg(test)]
mod real_data_tests {
    use super::*;

    /// WikiText-2 valid (tests/data): 60 top-level headings, so 60 articles, and the
    /// articles put back together are the file.
    #[test]
    fn wikitext2_valid_has_its_60_articles() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/wikitext-2/wiki.valid.tokens");
        let files = SplitFiles { split: Split::Train, format: DataFormat::Wikitext, files: vec![path.clone()] };
        let docs: Vec<Piece> = pieces(&files).map(|p| p.unwrap()).collect();
        assert_eq!(docs.len(), 60);
        assert!(docs.iter().all(|d| d.starts_document));
        assert!(docs[1].text.starts_with(" = "), "{:?}", &docs[1].text[..40]);
        let joined: String = docs.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(joined, std::fs::read_to_string(&path).unwrap());
    }
}

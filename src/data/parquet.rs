//! The `text` column of a parquet shard as laid out by HuggingFace datasets
//! (`wikitext-103-raw-v1/train-00000-of-00002.parquet`: one row per line, a string
//! column named `text`), streamed row by row in file order.
//!
//! Memory stays bounded whatever the file's size: the column is read one row group at a
//! time, and within it one page at a time (the parquet crate reads each page's bytes
//! from the file when the decoder reaches it), and rows are decoded [`BATCH_ROWS`] at a
//! time. What is held at once is one compressed and one decompressed data page, the
//! column chunk's dictionary page if it has one, and one batch of values: a few MB for
//! files written by pyarrow (1 MiB pages), never the shard's text.
//!
//! Every row must hold valid UTF-8; a row that does not is an error naming the file and
//! the row, never replaced. A null row is an error too (see [`TextRows`]).

use ::parquet::basic::{Compression, ConvertedType, LogicalType, Type as PhysicalType};
use ::parquet::column::reader::{ColumnReader, ColumnReaderImpl};
use ::parquet::data_type::{ByteArray, ByteArrayType};
use ::parquet::file::reader::FileReader;
use ::parquet::file::serialized_reader::SerializedFileReader;
use ::parquet::schema::types::{SchemaDescriptor, Type as SchemaType};
use anyhow::{anyhow, bail, Context};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The column read from every shard.
pub const TEXT_COLUMN: &str = "text";

/// Rows decoded at once. Values are slices of the decoded page (or of the dictionary),
/// so a batch costs little beyond the page it points into.
const BATCH_ROWS: usize = 1024;

/// The four bytes that begin and end every unencrypted parquet file.
const MAGIC: &[u8; 4] = b"PAR1";
/// The trailing magic of a file whose footer is encrypted.
const MAGIC_ENCRYPTED: &[u8; 4] = b"PARE";

/// Opens `path` and checks, before any row is read, that it is a parquet file with a
/// top-level string column named `text` compressed with a codec this build reads.
pub fn open_text_column(path: &Path) -> anyhow::Result<TextRows> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    check_magic(path, &mut file)?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| anyhow!("{}: the parquet footer cannot be read ({e}): the file is damaged; download it again", path.display()))?;
    let metadata = reader.metadata();
    let (column, max_def_level) = find_text_column(path, metadata.file_metadata().schema_descr())?;
    for (g, group) in metadata.row_groups().iter().enumerate() {
        if let Some(codec) = unsupported_codec(group.column(column).compression()) {
            bail!(
                "{}: row group {g} of the `text` column is compressed with {codec}, which this \
                 build does not read (it reads snappy, gzip, lz4 and zstd): rewrite the file with \
                 one of those, e.g. pyarrow.parquet.write_table(table, path, compression=\"zstd\")",
                path.display()
            );
        }
    }
    Ok(TextRows {
        path: path.to_path_buf(),
        file: reader,
        column,
        max_def_level,
        next_group: 0,
        group: None,
        batch: Batch::default(),
        next_row: 0,
        ended: false,
        peak_batch_rows: 0,
    })
}

/// The rows of the `text` column, in file order. Made by [`open_text_column`].
///
/// The first error ends the iteration: the caller stops at it, and what follows a
/// damaged page cannot be trusted anyway.
///
/// A null row is an error naming the row rather than an empty line or a skipped row: an
/// empty string is a real WikiText line (a paragraph break), so reading null as one would
/// put breaks into the text that the data does not have, and skipping would drop rows
/// unnoticed. HuggingFace's text datasets never hold nulls, so one means the file is not
/// what the config says it is.
pub struct TextRows {
    path: PathBuf,
    file: SerializedFileReader<File>,
    /// Index of `text` among the file's leaf columns.
    column: usize,
    /// 1 for an optional column (a row is null below it), 0 for a required one.
    max_def_level: i16,
    /// The row group to open when the current one is done.
    next_group: usize,
    group: Option<GroupCursor>,
    batch: Batch,
    /// File-wide index (from 0) of the next row handed out.
    next_row: u64,
    ended: bool,
    /// The most rows ever decoded at once; the tests hold it to [`BATCH_ROWS`].
    peak_batch_rows: usize,
}

/// The open column chunk of one row group.
struct GroupCursor {
    index: usize,
    reader: ColumnReaderImpl<ByteArrayType>,
    rows: usize,
    rows_left: usize,
}

/// Rows decoded from the current row group but not yet handed out.
#[derive(Default)]
struct Batch {
    group: usize,
    /// Non-null values, in row order.
    values: Vec<ByteArray>,
    /// One level per row when the column is optional; below the maximum means null.
    def_levels: Vec<i16>,
    rows: usize,
    next: usize,
    next_value: usize,
}

impl TextRows {
    /// Rows in the file, as its footer records them.
    pub fn num_rows(&self) -> u64 {
        u64::try_from(self.file.metadata().file_metadata().num_rows()).unwrap_or(0)
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Decodes the next batch, opening row groups as needed; false at the end of the file.
    fn fill_batch(&mut self) -> anyhow::Result<bool> {
        loop {
            let group = match &mut self.group {
                Some(g) if g.rows_left > 0 => g,
                _ => {
                    if self.next_group == self.file.num_row_groups() {
                        return Ok(false);
                    }
                    self.group = Some(self.open_group(self.next_group)?);
                    self.next_group += 1;
                    continue; // an empty row group is skipped by the guard above
                }
            };
            let b = &mut self.batch;
            b.values.clear();
            b.def_levels.clear();
            let want = group.rows_left.min(BATCH_ROWS);
            let def_levels = (self.max_def_level > 0).then_some(&mut b.def_levels);
            let reader = &mut group.reader;
            let read = guarded(|| reader.read_records(want, def_levels, None, &mut b.values));
            let (rows, values, _levels) =
                read.map_err(|e| corrupt(&self.path, group.index, self.file.num_row_groups(), self.next_row, &e))?;
            let rows_read = group.rows - group.rows_left;
            if rows == 0 {
                bail!(
                    "{}: row group {} ends after {rows_read} of the {} rows its footer promises: \
                     the file is damaged; download it again",
                    self.path.display(),
                    group.index,
                    group.rows
                );
            }
            let levels_ok = self.max_def_level == 0 || b.def_levels.len() == rows;
            if values != b.values.len() || !levels_ok || rows > want {
                bail!(
                    "{}: row group {} decoded inconsistently at row {}: the file is damaged; \
                     download it again",
                    self.path.display(),
                    group.index,
                    self.next_row
                );
            }
            group.rows_left -= rows;
            b.group = group.index;
            b.rows = rows;
            b.next = 0;
            b.next_value = 0;
            self.peak_batch_rows = self.peak_batch_rows.max(rows);
            return Ok(true);
        }
    }

    fn open_group(&self, index: usize) -> anyhow::Result<GroupCursor> {
        let n = self.file.num_row_groups();
        let fail = |e: &dyn std::fmt::Display| corrupt(&self.path, index, n, self.next_row, e);
        let opened = guarded(|| {
            let group = self.file.get_row_group(index)?;
            Ok((group.metadata().num_rows(), group.get_column_reader(self.column)?))
        });
        let (rows, reader) = opened.map_err(|e| fail(&e))?;
        let rows = usize::try_from(rows).map_err(|e| fail(&e))?;
        let ColumnReader::ByteArrayColumnReader(reader) = reader else {
            return Err(fail(&"the column chunk is not of the BYTE_ARRAY type the schema says"));
        };
        Ok(GroupCursor { index, reader, rows, rows_left: rows })
    }

    /// Hands out the next decoded row; the batch must hold one.
    fn take_row(&mut self) -> anyhow::Result<String> {
        let b = &mut self.batch;
        let row = self.next_row;
        let i = b.next;
        b.next += 1;
        self.next_row += 1;
        // fill_batch checked that an optional column has one level per row.
        if self.max_def_level > 0 && b.def_levels[i] < self.max_def_level {
            bail!(
                "{}: row {row} (from 0; in row group {}) of the `text` column is null: every row \
                 must hold a string (an empty line is \"\"); drop the null rows, e.g. \
                 table.filter(pyarrow.compute.is_valid(table[\"text\"])), and write the file again",
                self.path.display(),
                b.group
            );
        }
        let Some(value) = b.values.get(b.next_value) else {
            bail!(
                "{}: row group {} has fewer values than its levels say, at row {row}: the file is \
                 damaged; download it again",
                self.path.display(),
                b.group
            );
        };
        b.next_value += 1;
        match std::str::from_utf8(value.data()) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => bail!(
                "{}: row {row} (from 0; in row group {}) of the `text` column is not valid UTF-8 \
                 (bad byte at offset {} of the row): the text must be UTF-8; decode the source \
                 with its real encoding and write the file again",
                self.path.display(),
                b.group,
                e.valid_up_to()
            ),
        }
    }
}

impl Iterator for TextRows {
    type Item = anyhow::Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ended {
            return None;
        }
        if self.batch.next == self.batch.rows {
            match self.fill_batch() {
                Ok(true) => {}
                Ok(false) => {
                    self.ended = true;
                    return None;
                }
                Err(e) => {
                    self.ended = true;
                    return Some(Err(e));
                }
            }
        }
        let row = self.take_row();
        self.ended = row.is_err();
        Some(row)
    }
}

impl std::iter::FusedIterator for TextRows {}

impl std::fmt::Debug for TextRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextRows")
            .field("path", &self.path)
            .field("row_groups", &self.file.num_row_groups())
            .field("next_group", &self.next_group)
            .field("next_row", &self.next_row)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

/// Runs one call into the parquet decoder, a panic in it becoming an error. Some malformed
/// pages make the crate panic instead of returning an error (upstream keeps turning these
/// into errors; in 60.1 a PLAIN byte-array page whose lengths overrun it panics in
/// `read_num_bytes`), and a damaged download must end in a message naming the row group,
/// not a crash. The reader is not used again after a panic: the first error ends the rows.
fn guarded<T>(call: impl FnOnce() -> ::parquet::errors::Result<T>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(panic) => {
            let message =
                panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
            Err(format!("the parquet decoder failed ({message})"))
        }
    }
}

/// A failure to decode row group `group`, met at file-wide row `row`.
fn corrupt(path: &Path, group: usize, groups: usize, row: u64, e: &dyn std::fmt::Display) -> anyhow::Error {
    anyhow!(
        "{}: row group {group} (of {groups}) is damaged, reading from row {row}: {e}; download the \
         file again",
        path.display()
    )
}

/// Tells a file that is not parquet at all from one cut short, before the parquet crate's
/// less specific footer errors.
fn check_magic(path: &Path, file: &mut File) -> anyhow::Result<()> {
    let cannot_read = || format!("cannot read {}", path.display());
    let len = file.metadata().with_context(cannot_read)?.len();
    let mut head = [0u8; 4];
    let mut tail = [0u8; 4];
    if len >= 4 {
        file.read_exact(&mut head).with_context(cannot_read)?;
    }
    if head != *MAGIC {
        bail!(
            "{} is not a parquet file (it does not begin with the bytes `PAR1`): check the path, \
             or set data.format to the layout the file has",
            path.display()
        );
    }
    if len >= 12 {
        file.seek(SeekFrom::End(-4)).with_context(cannot_read)?;
        file.read_exact(&mut tail).with_context(cannot_read)?;
        file.seek(SeekFrom::Start(0)).with_context(cannot_read)?;
    }
    if tail == *MAGIC_ENCRYPTED {
        bail!("{}: the parquet footer is encrypted, which is not supported: decrypt the file first", path.display());
    }
    if tail != *MAGIC {
        bail!(
            "{} is cut short: it begins like a parquet file but its {len} bytes lack the footer \
             (an interrupted download?): download it again",
            path.display()
        );
    }
    Ok(())
}

/// The leaf index and maximum definition level of the top-level column `text`, checked
/// to hold strings.
fn find_text_column(path: &Path, schema: &SchemaDescriptor) -> anyhow::Result<(usize, i16)> {
    let fields = schema.root_schema().get_fields();
    let Some(field) = fields.iter().find(|f| f.name() == TEXT_COLUMN) else {
        let names: Vec<String> = fields.iter().map(|f| format!("`{}`", f.name())).collect();
        let names = if names.is_empty() { "none".to_string() } else { names.join(", ") };
        bail!(
            "{} has no column named `text` (its columns: {names}): the text must be in a string \
             column named `text`, as in HuggingFace's text datasets; rename the column (e.g. \
             table.rename_columns) and write the file again",
            path.display()
        );
    };
    let not_strings = |what: String| {
        anyhow!(
            "{}: the column `text` holds {what}, not strings: it must be a string column \
             (parquet BYTE_ARRAY annotated STRING; arrow string or large_string)",
            path.display()
        )
    };
    if field.is_group() {
        return Err(not_strings("a nested group (a list, struct or map)".into()));
    }
    let column = schema
        .columns()
        .iter()
        .position(|c| c.path().parts() == [TEXT_COLUMN])
        .ok_or_else(|| anyhow!("{}: the schema lists `text` but no leaf column for it", path.display()))?;
    let descr = schema.column(column);
    if descr.max_rep_level() > 0 {
        return Err(not_strings("repeated values (a list per row)".into()));
    }
    let physical = descr.physical_type();
    // Unannotated BYTE_ARRAY is how older writers (Hive, Impala) stored strings; every row
    // is checked to be UTF-8 as it is read, so accepting it lets nothing through.
    let is_text = physical == PhysicalType::BYTE_ARRAY
        && match descr.logical_type_ref() {
            Some(LogicalType::String | LogicalType::Enum | LogicalType::Json) => true,
            Some(_) => false,
            None => matches!(descr.converted_type(), ConvertedType::NONE | ConvertedType::UTF8),
        };
    if !is_text {
        return Err(not_strings(describe_type(field)));
    }
    Ok((column, descr.max_def_level()))
}

/// A primitive column's type for an error message: `INT64`, `BYTE_ARRAY (Json)`.
fn describe_type(field: &SchemaType) -> String {
    let info = field.get_basic_info();
    let physical = format!("{:?}", field.get_physical_type());
    match (info.logical_type_ref(), info.converted_type()) {
        (Some(logical), _) => format!("{physical} ({logical:?})"),
        (None, ConvertedType::NONE) => physical,
        (None, converted) => format!("{physical} ({converted})"),
    }
}

/// The name of a codec not compiled in through the parquet crate's features (see
/// Cargo.toml), or None for one that is.
fn unsupported_codec(codec: Compression) -> Option<&'static str> {
    match codec {
        Compression::UNCOMPRESSED
        | Compression::SNAPPY
        | Compression::GZIP(_)
        | Compression::LZ4
        | Compression::LZ4_RAW
        | Compression::ZSTD(_) => None,
        Compression::BROTLI(_) => Some("brotli"),
        Compression::LZO => Some("lzo"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::parquet::basic::{BrotliLevel, GzipLevel, ZstdLevel};
    use ::parquet::data_type::Int64Type;
    use ::parquet::file::properties::WriterProperties;
    use ::parquet::file::writer::SerializedFileWriter;
    use ::parquet::schema::parser::parse_message_type;
    use std::sync::Arc;

    const STRING_SCHEMA: &str = "message schema { optional binary text (STRING); }";

    fn props(codec: Compression) -> Arc<WriterProperties> {
        Arc::new(
            WriterProperties::builder()
                .set_compression(codec)
                // Several pages per row group, so that batches cross page boundaries.
                .set_data_page_row_count_limit(300)
                .set_write_batch_size(100)
                .build(),
        )
    }

    /// Writes `rows` into the optional string column `text` (None is a null), starting a
    /// new row group every `group_rows` rows.
    fn write_rows(path: &Path, rows: &[Option<Vec<u8>>], group_rows: usize, codec: Compression) {
        write_rows_with(path, rows, group_rows, props(codec));
    }

    fn write_rows_with(path: &Path, rows: &[Option<Vec<u8>>], group_rows: usize, props: Arc<WriterProperties>) {
        let schema = Arc::new(parse_message_type(STRING_SCHEMA).unwrap());
        let file = File::create(path).unwrap();
        let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
        for chunk in rows.chunks(group_rows) {
            let values: Vec<ByteArray> = chunk.iter().flatten().map(|v| ByteArray::from(v.clone())).collect();
            let def_levels: Vec<i16> = chunk.iter().map(|v| i16::from(v.is_some())).collect();
            let mut group = writer.next_row_group().unwrap();
            let mut column = group.next_column().unwrap().unwrap();
            column.typed::<ByteArrayType>().write_batch(&values, Some(&def_levels), None).unwrap();
            column.close().unwrap();
            group.close().unwrap();
        }
        writer.close().unwrap();
    }

    fn write_strings(path: &Path, rows: &[String], group_rows: usize) {
        let rows: Vec<Option<Vec<u8>>> = rows.iter().map(|r| Some(r.clone().into_bytes())).collect();
        write_rows(path, &rows, group_rows, Compression::SNAPPY);
    }

    /// A file with the given schema and no rows: enough for the checks made at open.
    fn write_schema_only(path: &Path, schema: &str) {
        let schema = Arc::new(parse_message_type(schema).unwrap());
        let file = File::create(path).unwrap();
        let writer = SerializedFileWriter::new(file, schema, props(Compression::SNAPPY)).unwrap();
        writer.close().unwrap();
    }

    /// WikiText-like lines: headings, empty lines, multi-byte characters.
    fn line(i: usize) -> String {
        match i % 7 {
            0 => String::new(),
            1 => format!(" = Section {i} = "),
            2 => format!(" Zürich – 東京 – Ελλάδα 🚀 line {i} "),
            3 => " @-@ ".to_string(), // a repeat, so the dictionary is used
            _ => format!(" The {i}th line of text , with some words in it . "),
        }
    }

    fn read_all(path: &Path) -> anyhow::Result<Vec<String>> {
        open_text_column(path)?.collect()
    }

    fn err_text<T>(r: anyhow::Result<T>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn rows_come_back_exactly_in_order_across_row_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train-00000-of-00002.parquet");
        let rows: Vec<String> = (0..3000).map(line).collect();
        write_strings(&path, &rows, 700); // 5 row groups, the last partial
        let reader = open_text_column(&path).unwrap();
        assert_eq!(reader.file.num_row_groups(), 5);
        assert_eq!(reader.num_rows(), 3000);
        assert_eq!(read_all(&path).unwrap(), rows);
    }

    #[test]
    fn every_compiled_codec_reads() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<Option<Vec<u8>>> = (0..500).map(|i| Some(line(i).into_bytes())).collect();
        let codecs = [
            Compression::UNCOMPRESSED,
            Compression::SNAPPY,
            Compression::GZIP(GzipLevel::default()),
            Compression::LZ4,
            Compression::LZ4_RAW,
            Compression::ZSTD(ZstdLevel::default()),
        ];
        for codec in codecs {
            let path = dir.path().join(format!("{codec:?}.parquet"));
            write_rows(&path, &rows, 200, codec);
            let got = read_all(&path).unwrap_or_else(|e| panic!("{codec:?}: {e:#}"));
            assert_eq!(got.len(), 500, "{codec:?}");
            assert_eq!(got[499], line(499), "{codec:?}");
        }
        assert_eq!(unsupported_codec(Compression::BROTLI(BrotliLevel::default())), Some("brotli"));
    }

    #[test]
    fn a_file_without_text_lists_its_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.parquet");
        write_schema_only(&path, "message schema { optional binary content (STRING); required int64 id; }");
        let e = err_text(open_text_column(&path));
        assert!(e.contains("other.parquet"), "{e}");
        assert!(e.contains("no column named `text`"), "{e}");
        assert!(e.contains("`content`, `id`"), "{e}");
    }

    #[test]
    fn an_int64_text_column_is_a_type_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ints.parquet");
        let schema = Arc::new(parse_message_type("message schema { required int64 text; }").unwrap());
        let file = File::create(&path).unwrap();
        let mut writer = SerializedFileWriter::new(file, schema, props(Compression::SNAPPY)).unwrap();
        let mut group = writer.next_row_group().unwrap();
        let mut column = group.next_column().unwrap().unwrap();
        column.typed::<Int64Type>().write_batch(&[1, 2, 3], None, None).unwrap();
        column.close().unwrap();
        group.close().unwrap();
        writer.close().unwrap();
        let e = err_text(open_text_column(&path));
        assert!(e.contains("ints.parquet"), "{e}");
        assert!(e.contains("holds INT64, not strings"), "{e}");
    }

    #[test]
    fn a_nested_text_column_is_a_type_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lists.parquet");
        write_schema_only(
            &path,
            "message schema { optional group text (LIST) { \
             repeated group list { optional binary element (STRING); } } }",
        );
        let e = err_text(open_text_column(&path));
        assert!(e.contains("a nested group"), "{e}");
    }

    #[test]
    fn a_non_parquet_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wiki.train.raw");
        std::fs::write(&path, " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 ...\n").unwrap();
        let e = err_text(open_text_column(&path));
        assert!(e.contains("wiki.train.raw is not a parquet file"), "{e}");
        let empty = dir.path().join("empty.parquet");
        std::fs::write(&empty, b"").unwrap();
        assert!(err_text(open_text_column(&empty)).contains("empty.parquet is not a parquet file"));
    }

    #[test]
    fn a_truncated_file_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.parquet");
        write_strings(&path, &(0..100).map(line).collect::<Vec<_>>(), 50);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = err_text(open_text_column(&path));
        assert!(e.contains("cut.parquet is cut short"), "{e}");
    }

    #[test]
    fn invalid_utf8_names_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latin1.parquet");
        let mut rows: Vec<Option<Vec<u8>>> = (0..10).map(|i| Some(line(i).into_bytes())).collect();
        rows[7] = Some(b"caf\xe9 au lait".to_vec()); // Latin-1, as a mis-decoded scrape would hold
        write_rows(&path, &rows, 4, Compression::SNAPPY);
        let mut reader = open_text_column(&path).unwrap();
        for i in 0..7 {
            assert_eq!(reader.next().unwrap().unwrap(), line(i));
        }
        let e = err_text(reader.next().unwrap());
        assert!(e.contains("latin1.parquet"), "{e}");
        assert!(e.contains("row 7 (from 0; in row group 1)"), "{e}");
        assert!(e.contains("not valid UTF-8 (bad byte at offset 3"), "{e}");
        assert!(reader.next().is_none(), "the first error ends the rows");
    }

    #[test]
    fn a_null_row_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nulls.parquet");
        let mut rows: Vec<Option<Vec<u8>>> = (0..10).map(|i| Some(line(i).into_bytes())).collect();
        rows[5] = None;
        write_rows(&path, &rows, 4, Compression::SNAPPY);
        let got: Vec<_> = open_text_column(&path).unwrap().collect();
        assert_eq!(got.len(), 6);
        assert_eq!(got[4].as_ref().unwrap(), &line(4));
        let e = err_text(got.into_iter().nth(5).unwrap());
        let expected = "nulls.parquet: row 5 (from 0; in row group 1) of the `text` column is null";
        assert!(e.contains(expected), "{e}");
    }

    #[test]
    fn damage_mid_file_names_the_row_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("damaged.parquet");
        let rows: Vec<String> = (0..4000).map(line).collect();
        write_strings(&path, &rows, 1000);
        // Overwrite row group 2's column chunk, page headers included, with 0xFF.
        let (start, len) = {
            let reader = SerializedFileReader::new(File::open(&path).unwrap()).unwrap();
            reader.metadata().row_group(2).column(0).byte_range()
        };
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[start as usize..(start + len) as usize].fill(0xFF);
        std::fs::write(&path, bytes).unwrap();

        let mut reader = open_text_column(&path).unwrap();
        for (i, expected) in rows.iter().take(2000).enumerate() {
            assert_eq!(&reader.next().unwrap().unwrap(), expected, "row {i}");
        }
        let e = err_text(reader.next().unwrap());
        assert!(e.contains("damaged.parquet: row group 2 (of 4) is damaged, reading from row 2000"), "{e}");
        assert!(reader.next().is_none());
    }

    /// A page the parquet crate panics on (a PLAIN value length that leaves the next
    /// length prefix cut short) still ends in an error naming the row group.
    #[test]
    fn a_page_the_decoder_panics_on_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("overrun.parquet");
        let rows: Vec<Option<Vec<u8>>> =
            ["a", "b", "c", "first value", "second value"].iter().map(|r| Some(r.as_bytes().to_vec())).collect();
        let plain = WriterProperties::builder().set_compression(Compression::UNCOMPRESSED).set_dictionary_enabled(false).build();
        write_rows_with(&path, &rows, 3, Arc::new(plain));
        // In the page the values are laid out as 4-byte little-endian length, bytes.
        let mut bytes = std::fs::read(&path).unwrap();
        let needle = b"\x0b\x00\x00\x00first value";
        let at = bytes.windows(needle.len()).position(|w| w == needle).expect("a PLAIN page");
        let values_len = (4 + 11 + 4 + 12) as u32;
        bytes[at..at + 4].copy_from_slice(&(values_len - 4 - 2).to_le_bytes());
        std::fs::write(&path, bytes).unwrap();

        let got: Vec<_> = open_text_column(&path).unwrap().collect();
        assert_eq!(got.len(), 4, "three good rows, then the error");
        let e = err_text(got.into_iter().nth(3).unwrap());
        assert!(e.contains("overrun.parquet: row group 1 (of 2) is damaged, reading from row 3"), "{e}");
    }

    /// 200k rows in 4 row groups, read while checking the design's bound: rows are decoded
    /// at most BATCH_ROWS at a time, and a row group is opened only when the one before it
    /// is done, so nothing ever holds the file's rows. The heap peak itself is measured
    /// in a test binary of its own with a counting allocator (tests/bounded_memory.rs):
    /// about 5 MB while streaming 50 MB of text, whether in 1 row group or 20.
    #[test]
    fn a_large_file_streams_in_bounded_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("large.parquet");
        let rows: Vec<String> = (0..200_000).map(line).collect();
        write_strings(&path, &rows, 50_000);
        drop(rows);

        let mut reader = open_text_column(&path).unwrap();
        assert_eq!(reader.num_rows(), 200_000);
        let mut n = 0;
        while let Some(row) = reader.next() {
            assert_eq!(row.unwrap(), line(n), "row {n}");
            n += 1;
            assert_eq!(reader.next_group, n.div_ceil(50_000), "row groups open one at a time");
            assert!(reader.batch.rows <= BATCH_ROWS && reader.batch.values.capacity() <= 2 * BATCH_ROWS);
        }
        assert_eq!(n, 200_000);
        assert_eq!(reader.peak_batch_rows, BATCH_ROWS);
    }

    #[test]
    fn rows_can_move_to_another_thread() {
        fn is_send<T: Send>() {}
        is_send::<TextRows>();
    }
}

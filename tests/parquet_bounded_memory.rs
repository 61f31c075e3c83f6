//! Measures the heap the reader holds while streaming a 50 MB-of-text file: a counting
//! allocator tracks this thread's live bytes (per thread, so other tests do not disturb
//! it), and the peak during the read must stay far below the text's size.
use ::parquet::basic::Compression;
use ::parquet::data_type::{ByteArray, ByteArrayType};
use ::parquet::file::properties::WriterProperties;
use ::parquet::file::writer::SerializedFileWriter;
use ::parquet::schema::parser::parse_message_type;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fs::File;
use std::sync::Arc;

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = LIVE.try_with(|live| {
        live.set(live.get() + delta);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// ~250 bytes of pseudo-random letters: distinct and hardly compressible, so the file is
/// as large as its text and pages fall back from the dictionary to PLAIN.
fn line(i: usize) -> String {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..250)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(6) { ' ' } else { char::from(b'a' + (x % 26) as u8) }
        })
        .collect()
}

#[test]
fn peak_heap_while_streaming_is_small() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("large.parquet");
    let n = 200_000;
    let group_rows: usize = std::env::var("GROUP_ROWS").map_or(50_000, |v| v.parse().unwrap());
    let schema = Arc::new(parse_message_type("message schema { optional binary text (STRING); }").unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
    let mut writer = SerializedFileWriter::new(File::create(&path).unwrap(), schema, props).unwrap();
    let mut text_bytes = 0usize;
    for g in 0..n / group_rows {
        let values: Vec<ByteArray> = (g * group_rows..(g + 1) * group_rows).map(|i| ByteArray::from(line(i).as_str())).collect();
        text_bytes += values.iter().map(|v| v.len()).sum::<usize>();
        let mut group = writer.next_row_group().unwrap();
        let mut column = group.next_column().unwrap().unwrap();
        column.typed::<ByteArrayType>().write_batch(&values, Some(&vec![1; values.len()]), None).unwrap();
        column.close().unwrap();
        group.close().unwrap();
    }
    writer.close().unwrap();
    let file_bytes = std::fs::metadata(&path).unwrap().len();

    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let mut rows = 0;
    for (i, row) in algpt2_ddp::data::parquet::open_text_column(&path).unwrap().enumerate() {
        assert_eq!(row.unwrap(), line(i));
        rows += 1;
    }
    let peak = PEAK.with(Cell::get) - base;
    eprintln!("text {text_bytes} B in {rows} rows, file {file_bytes} B, peak heap while reading {peak} B");
    assert_eq!(rows, n);
    assert!(peak < 8 << 20, "peak {peak} B");
    assert!((peak as usize) < text_bytes / 5);
}

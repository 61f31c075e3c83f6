//! Measures the heap the reader holds while streaming a 50 MB-of-text file: a counting
//! allocator tracks this thread's live bytes (per thread, so other tests do not disturb
//! it), and the peak during the read must stay far below the text's size.
mod common;
use common::write_parquet;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

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
            if x.is_multiple_of(6) {
                ' '
            } else {
                char::from(b'a' + (x % 26) as u8)
            }
        })
        .collect()
}

#[test]
fn peak_heap_while_streaming_is_small() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("large.parquet");
    let n = 200_000;
    let group_rows: usize = std::env::var("GROUP_ROWS").map_or(50_000, |v| v.parse().unwrap());
    let rows: Vec<String> = (0..n).map(line).collect();
    let text_bytes: usize = rows.iter().map(String::len).sum();
    write_parquet(&path, &rows, group_rows);
    drop(rows);
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

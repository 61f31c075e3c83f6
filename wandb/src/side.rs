//! The two streams beside history: system metrics (`wandb-events.jsonl`, the System
//! panels) and the console (`output.log`, the Logs tab). Each is an append-only journal
//! in the spool, written by the writer thread and sent in order by the uploader at
//! file_stream line offsets, in the same paced requests as history. Unlike history they
//! have no step: a line is never dropped on a resume, and which lines the server holds
//! is settled by its line counts (see `SideState::reconcile`).

use super::spool::{self, InFlight, SideState, Spool, UploadState};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Events,
    Console,
}

pub(super) const SIDES: [Side; 2] = [Side::Events, Side::Console];

impl Side {
    /// The file's name on the server.
    pub fn file_name(self) -> &'static str {
        match self {
            Side::Events => "wandb-events.jsonl",
            Side::Console => "output.log",
        }
    }

    pub fn journal(self, spool: &Spool) -> PathBuf {
        spool.dir.join(match self {
            Side::Events => "events.jsonl",
            Side::Console => "output.log",
        })
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn state_of(self, upload: &UploadState) -> &SideState {
        match self {
            Side::Events => &upload.events,
            Side::Console => &upload.console,
        }
    }

    pub fn state(self, upload: &mut UploadState) -> &mut SideState {
        match self {
            Side::Events => &mut upload.events,
            Side::Console => &mut upload.console,
        }
    }
}

/// Complete lines and bytes written to one journal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Written {
    pub lines: u64,
    pub bytes: u64,
}

/// The next lines of one stream for a request.
#[derive(Debug, Default)]
pub(super) struct SideBatch {
    pub lines: Vec<String>,
    pub consumed: InFlight,
    /// Nothing written is left after it.
    pub exhausted: bool,
}

/// Lines `[acked, written)` of `journal`, at most `budget` bytes of them (at least one
/// line); lines over `max_line` bytes are consumed but not sent, as the server would
/// refuse them.
pub(super) fn take(
    journal: &Path,
    state: &SideState,
    written: Written,
    budget: usize,
    max_line: usize,
) -> anyhow::Result<(SideBatch, u64)> {
    let mut batch = SideBatch::default();
    let mut oversize = 0;
    if written.bytes > state.acked_bytes {
        for (line, bytes) in spool::read_lines(journal, state.acked_bytes, written.bytes, budget)? {
            batch.consumed.lines += 1;
            batch.consumed.bytes += bytes;
            if line.text.len() > max_line {
                oversize += 1;
                continue;
            }
            batch.lines.push(line.text);
        }
    }
    batch.consumed.sent = batch.lines.len() as u64;
    batch.exhausted = state.acked_lines + batch.consumed.lines >= written.lines;
    Ok((batch, oversize))
}

/// `2026-11-23T10:37:55.084774`: UTC, microseconds, no zone, as the official client
/// stamps console lines.
pub fn console_timestamp(epoch_seconds: f64) -> String {
    let micros_total = (epoch_seconds.max(0.0) * 1e6).round() as u64;
    let (secs, micros) = (micros_total / 1_000_000, micros_total % 1_000_000);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date of a day count since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{micros:06}")
}

/// The `output.log` lines of one console message in the official client's legacy
/// format: one line per line of text, each `<timestamp> <text>`, and `ERROR <timestamp>
/// <text>` for what went to stderr as an error (recorded from wandb 0.31).
pub(super) fn console_lines(text: &str, is_error: bool, epoch_seconds: f64) -> Vec<String> {
    let stamp = console_timestamp(epoch_seconds);
    let prefix = if is_error { "ERROR " } else { "" };
    text.trim_end_matches(['\n', '\r'])
        .split('\n')
        .map(|line| {
            // A carriage return redraws a terminal line: what stays is its last part.
            let shown = line.rsplit('\r').next().unwrap_or(line);
            format!("{prefix}{stamp} {shown}")
        })
        .collect()
}

/// The console as plain text (no timestamps, no marks), as the official client uploads
/// `output.log` at finish: here of every attempt of the run, the last `max_bytes` of it.
pub(super) fn plain_console(journal: &Path, max_bytes: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(journal).ok()?;
    let len = file.metadata().ok()?.len();
    if len == 0 {
        return None;
    }
    file.seek(SeekFrom::Start(len.saturating_sub(max_bytes))).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines = text.lines();
    if len > max_bytes {
        lines.next(); // cut mid-line
    }
    let mut out = String::new();
    for line in lines {
        let line = line.strip_prefix("ERROR ").unwrap_or(line);
        out.push_str(line.split_once(' ').map_or("", |(_, text)| text));
        out.push('\n');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_have_the_legacy_format() {
        assert_eq!(console_timestamp(0.0), "1970-01-01T00:00:00.000000");
        // 2026-11-23T10:37:55.084774 UTC
        assert_eq!(console_timestamp(1_795_430_275.084774), "2026-11-23T10:37:55.084774");
        assert_eq!(console_timestamp(951_782_400.5), "2000-02-29T00:00:00.500000");
        assert_eq!(
            console_lines("resolved config:\n  a: 1\n", false, 0.0),
            vec!["1970-01-01T00:00:00.000000 resolved config:", "1970-01-01T00:00:00.000000   a: 1"]
        );
        assert_eq!(console_lines("bad\r", true, 0.0), vec!["ERROR 1970-01-01T00:00:00.000000 bad"]);
        assert_eq!(console_lines("10%\r50%\r100%", false, 0.0), vec!["1970-01-01T00:00:00.000000 100%"]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        let mut text = console_lines("one\ntwo", false, 0.0).join("\n");
        text.push('\n');
        text.push_str(&console_lines("three", true, 0.0)[0]);
        text.push('\n');
        std::fs::write(&path, &text).unwrap();
        assert_eq!(plain_console(&path, 1 << 20).unwrap(), "one\ntwo\nthree\n");
        assert_eq!(plain_console(&path, 40).unwrap(), "three\n", "the last bytes, whole lines only");
    }

    #[test]
    fn a_request_left_in_flight_is_settled_by_the_servers_line_count() {
        let sent = InFlight { lines: 3, bytes: 30, sent: 3 };
        let base = SideState { acked_lines: 5, acked_bytes: 50, server_lines: 5, in_flight: Some(sent) };
        // The server applied it: those lines are done.
        let mut s = base.clone();
        s.reconcile(8);
        assert_eq!((s.acked_lines, s.acked_bytes, s.server_lines, s.in_flight), (8, 80, 8, None));
        // It did not: they go again at the same offset.
        let mut s = base.clone();
        s.reconcile(5);
        assert_eq!((s.acked_lines, s.server_lines), (5, 5));
        // Another client appended meanwhile: ours follow its lines.
        let mut s = base.clone();
        s.reconcile(20);
        assert_eq!((s.acked_lines, s.server_lines), (5, 20));
        let mut s = SideState { in_flight: None, ..base };
        s.reconcile(9);
        assert_eq!((s.acked_lines, s.server_lines), (5, 9));
    }
}

//! The spool: everything about one W&B run, kept in `<run dir>/wandb/run-<id>/` so that
//! rows survive a slow or absent server, a crash, or offline mode.
//!
//! | file | written by | content |
//! |---|---|---|
//! | `settings.json` | `start` | where and as what the run reports (never the key) |
//! | `config.json` | `start` | the run's config, as given |
//! | `history.jsonl` | writer thread | every row, one history line each, as sent |
//! | `summary.json` | writer thread | keys set with `set_summary` |
//! | `events.jsonl` | writer thread | system metrics, one `wandb-events.jsonl` line each, as sent |
//! | `output.log` | writer thread | console lines, one `output.log` line each, as sent |
//! | `metadata.json` | writer thread | `wandb-metadata.json`, uploaded at finish |
//! | `upload.json` | uploader | how far uploads got: lines/bytes of `history.jsonl` done, the server's line count and last step, the same for events and console (and a request in flight), whether `complete` was sent |
//! | `finish.json` | `finish` | the exit code; absent while the run is live or after a crash |
//! | `lock` | `start`, `sync` | held (flock) while a process reports the run |

use anyhow::{bail, Context};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub(super) const FORMAT: u32 = 1;

/// One history line and its step.
#[derive(Debug, Clone)]
pub(super) struct Line {
    pub step: Option<u64>,
    pub text: String,
}

/// Paths of one run's spool.
#[derive(Debug, Clone)]
pub(super) struct Spool {
    pub dir: PathBuf,
}

impl Spool {
    pub fn for_run(run_dir: &Path, run_id: &str) -> Spool {
        Spool { dir: run_dir.join("wandb").join(format!("run-{run_id}")) }
    }
    pub fn settings(&self) -> PathBuf {
        self.dir.join("settings.json")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn history(&self) -> PathBuf {
        self.dir.join("history.jsonl")
    }
    pub fn summary(&self) -> PathBuf {
        self.dir.join("summary.json")
    }
    pub fn upload(&self) -> PathBuf {
        self.dir.join("upload.json")
    }
    pub fn finish(&self) -> PathBuf {
        self.dir.join("finish.json")
    }
    pub fn metadata(&self) -> PathBuf {
        self.dir.join("metadata.json")
    }

    /// The spools under `path`: `path` itself, `path/run-*`, or `path/wandb/run-*`.
    pub fn find(path: &Path) -> anyhow::Result<Vec<Spool>> {
        if path.join("settings.json").is_file() {
            return Ok(vec![Spool { dir: path.to_path_buf() }]);
        }
        for root in [path.join("wandb"), path.to_path_buf()] {
            let Ok(entries) = std::fs::read_dir(&root) else { continue };
            let mut found: Vec<Spool> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("run-")))
                .filter(|p| p.join("settings.json").is_file())
                .map(|dir| Spool { dir })
                .collect();
            if !found.is_empty() {
                found.sort_by(|a, b| a.dir.cmp(&b.dir));
                return Ok(found);
            }
        }
        bail!("no W&B run under {} (expected {}/wandb/run-<id>/settings.json)", path.display(), path.display())
    }

    /// Holds the spool for this process (released when the file closes, also on a crash).
    pub fn lock(&self, wait: Duration) -> anyhow::Result<File> {
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let until = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
                Err(std::fs::TryLockError::WouldBlock) => {
                    bail!("another process is reporting this W&B run ({} is locked)", self.dir.display())
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
            }
        }
    }
}

/// `settings.json`: the run as it reports, without the API key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RunRecord {
    pub format: u32,
    pub run_id: String,
    pub mode: String,
    /// Never with a password: one in WANDB_BASE_URL stays in the environment.
    pub base_url: String,
    /// WANDB_BASE_URL had a password, left out of `base_url`: sync needs it again.
    #[serde(default)]
    pub base_url_password_removed: bool,
    pub entity: Option<String>,
    pub project: String,
    pub name: Option<String>,
    pub group: Option<String>,
    pub tags: Vec<String>,
    pub job_type: Option<String>,
    pub notes: Option<String>,
    pub host: Option<String>,
    pub program: Option<String>,
}

/// `upload.json`: how far uploads got. Advisory: after a crash between a server's
/// answer and this file's update, the server's own last step (RunResumeStatus) decides
/// which rows it already has.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub(super) struct UploadState {
    /// Lines (and bytes) at the start of `history.jsonl` that are done: sent and
    /// acknowledged, or skipped because the server already had their step.
    pub acked_lines: u64,
    pub acked_bytes: u64,
    /// The server's `wandb-history.jsonl` line count: the next offset.
    pub server_lines: u64,
    /// The last `_step` the server holds.
    pub last_step: Option<u64>,
    pub entity: Option<String>,
    pub project: Option<String>,
    pub storage_id: Option<String>,
    /// UpsertBucket succeeded at least once.
    pub created: bool,
    /// The final request (`complete`, `exitcode`) was acknowledged.
    pub complete_sent: bool,
    pub exit_code: Option<i32>,
    /// How far `events.jsonl` and `output.log` got.
    pub events: SideState,
    pub console: SideState,
}

/// How far one of the streams beside history (events, console) got.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub(super) struct SideState {
    /// Lines (and bytes) at the start of the journal that are done.
    pub acked_lines: u64,
    pub acked_bytes: u64,
    /// The server's line count of the file as far as this spool knows: the next offset.
    pub server_lines: u64,
    /// A request with lines of this stream was sent at `server_lines` and not yet
    /// answered. Recorded before sending: after a crash, the server's line count says
    /// whether it applied them, so they are neither lost nor appended twice.
    pub in_flight: Option<InFlight>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub(super) struct InFlight {
    /// Journal lines and bytes the request consumed.
    pub lines: u64,
    pub bytes: u64,
    /// Lines it sent (oversize ones are consumed but not sent).
    pub sent: u64,
}

impl SideState {
    /// A request's lines were applied by the server.
    pub fn applied(&mut self, f: InFlight) {
        self.acked_lines += f.lines;
        self.acked_bytes += f.bytes;
        self.server_lines += f.sent;
        self.in_flight = None;
    }

    /// The server holds `count` lines of the file (RunResumeStatus): settles a request
    /// left in flight by an interrupted process, and appends from the server's end when
    /// another writer (the official client resuming the run) added lines meanwhile.
    pub fn reconcile(&mut self, count: u64) {
        match self.in_flight.take() {
            Some(f) if f.sent > 0 && count == self.server_lines + f.sent => self.applied(f),
            _ => {}
        }
        self.server_lines = count;
    }
}

/// `finish.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct FinishRecord {
    pub exit_code: i32,
    pub timestamp: f64,
}

/// Writes a sibling file and renames it over `path`; `sync_data` also fsyncs it.
pub(super) fn write_atomic(path: &Path, bytes: &[u8], sync_data: bool) -> anyhow::Result<()> {
    write_atomic_mode(path, bytes, sync_data, 0o666)
}

/// [`write_atomic`] with the new file's permission bits (`mode`, less the umask): 0600
/// for files only the owner may read.
fn write_atomic_mode(path: &Path, bytes: &[u8], sync_data: bool, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    // A leftover temporary keeps its old mode when truncated: start from a new file.
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    if sync_data {
        f.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// As [`write_json`], readable by the owner only (mode 0600): files that name the user
/// and the server.
pub(super) fn write_private_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic_mode(path, &bytes, false, 0o600)
}

pub(super) fn write_json<T: Serialize>(path: &Path, value: &T, sync_data: bool) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes, sync_data)
}

/// `None` when the file does not exist.
pub(super) fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).with_context(|| format!("cannot parse {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

pub(super) fn step_of_line(text: &str) -> Option<u64> {
    let v: Value = serde_json::from_str(text).ok()?;
    v.get("_step")?.as_u64()
}

/// What a journal holds after `prepare_journal`.
#[derive(Debug, Clone, Default)]
pub(super) struct JournalInfo {
    pub lines: u64,
    pub bytes: u64,
    /// The largest `_runtime` in it: a resumed run's runtime continues from there.
    pub runtime: f64,
    /// The last value of every key over all lines (the derived summary).
    pub last_values: Map<String, Value>,
    /// Lines dropped because they came after the resume step and were never uploaded.
    pub dropped: u64,
}

/// Reads `history.jsonl`: drops a torn last line (a crash mid-write) and, when resuming
/// from `resume_step`, the rows after it that were never uploaded (the resumed run
/// computes those steps again). Rows already uploaded stay: the server has them.
pub(super) fn prepare_journal(path: &Path, acked_bytes: u64, resume_step: Option<u64>) -> anyhow::Result<JournalInfo> {
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(JournalInfo::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let complete_len = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut kept = Vec::with_capacity(complete_len);
    let mut info = JournalInfo::default();
    let mut start = 0usize;
    for line in text[..complete_len].split_inclusive(|&b| b == b'\n') {
        let is_pending = start as u64 >= acked_bytes;
        start += line.len();
        let parsed: Option<Value> = serde_json::from_slice(&line[..line.len() - 1]).ok();
        let step = parsed.as_ref().and_then(|v| v.get("_step")).and_then(Value::as_u64);
        if is_pending && resume_step.is_some_and(|s| step.is_none_or(|step| step > s)) {
            info.dropped += 1;
            continue;
        }
        if let Some(Value::Object(row)) = parsed {
            if let Some(r) = row.get("_runtime").and_then(Value::as_f64) {
                info.runtime = info.runtime.max(r);
            }
            for (k, v) in row {
                info.last_values.insert(k, v);
            }
        }
        kept.extend_from_slice(line);
        info.lines += 1;
    }
    info.bytes = kept.len() as u64;
    if kept.len() != text.len() {
        write_atomic(path, &kept, true)?;
    }
    Ok(info)
}

/// Complete lines and bytes of an append-only journal (`events.jsonl`, `output.log`),
/// cutting a torn last line (a crash mid-write).
pub(super) fn prepare_side_journal(path: &Path) -> anyhow::Result<(u64, u64)> {
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let complete_len = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete_len != text.len() {
        write_atomic(path, &text[..complete_len], true)?;
    }
    let lines = text[..complete_len].iter().filter(|&&b| b == b'\n').count() as u64;
    Ok((lines, complete_len as u64))
}

/// Reads lines of `history.jsonl` from byte `from` (a line start) up to byte `until`,
/// taking lines while their lengths sum to at most `budget` (always at least one line). Returns
/// each line with its length including the newline.
pub(super) fn read_lines(path: &Path, from: u64, until: u64, budget: usize) -> anyhow::Result<Vec<(Line, u64)>> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    file.seek(SeekFrom::Start(from))?;
    let mut reader = BufReader::new(file.take(until.saturating_sub(from)));
    let mut out = Vec::new();
    let mut used = 0usize;
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = reader.read_line(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 || !buf.ends_with('\n') {
            break;
        }
        let text = buf.trim_end_matches('\n').to_string();
        if !out.is_empty() && used + text.len() > budget {
            break;
        }
        used += text.len();
        out.push((Line { step: step_of_line(&text), text }, n as u64));
    }
    Ok(out)
}

/// The host name, for UpsertBucket's `host`.
pub(super) fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
}

/// The program's file name, for UpsertBucket's `program`.
pub(super) fn program_name() -> Option<String> {
    std::env::current_exe().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

pub(super) fn now_epoch() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

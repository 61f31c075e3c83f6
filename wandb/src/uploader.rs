//! The uploader: creates or resumes the run (RunResumeStatus, UpsertBucket), then streams
//! history lines and the summary to file_stream: one request in flight, at most one per
//! transmit interval, batches capped in bytes, a final request with `complete`/`exitcode`.
//!
//! Rows come from the shared queue filled by the writer thread (memory, or the spool file
//! once the memory bound is passed). A row counts as done only after a 2xx; a request
//! that fails is rebuilt and retried at the same offset, so the server sees every line
//! once. Rows whose `_step` the server already holds are skipped, never sent twice.

use super::api::{self, Api, Failure, Op};
use super::run_files;
use super::settings::{random_u64, Tuning};
use super::side::{self, SideBatch, Written, SIDES};
use super::spool::{self, Line, RunRecord, SideState, Spool, UploadState};
use serde_json::{json, Map, Value};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// State shared by `log()`'s writer thread, the uploader and `finish`.
pub(super) struct Shared {
    state: Mutex<Inner>,
    pub cv: Condvar,
    /// The server said the run was stopped from the W&B interface. Outside the mutex:
    /// the training loop reads it every step and must never wait on the uploader.
    pub stopped: AtomicBool,
    /// Console lines dropped because the writer was behind. Counted, never warned about
    /// at the time: a warning is itself a console line, and would come back here.
    pub console_dropped: AtomicU64,
}

impl Shared {
    pub fn new(inner: Inner) -> Arc<Shared> {
        Arc::new(Shared {
            state: Mutex::new(inner),
            cv: Condvar::new(),
            stopped: AtomicBool::new(false),
            console_dropped: AtomicU64::new(0),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn warn_once(&self, key: &str, message: String) {
        self.lock().warn_once(key, message);
    }
}

#[derive(Default)]
pub(super) struct Inner {
    /// Journal lines `[acked, written)` while `!disk_only`; empty while `disk_only`
    /// (then they are read back from `history.jsonl`).
    pub mem: VecDeque<Line>,
    pub mem_bytes: usize,
    pub disk_only: bool,
    /// A journal write failed: rows stay in memory (unbounded) instead of spilling.
    pub journal_failed: bool,
    pub written_lines: u64,
    pub written_bytes: u64,
    /// What the writer appended to the events and console journals (by `Side::index`).
    pub side_written: [Written; 2],
    /// Lines done (mirrors the uploader's `UploadState`, for `finish`'s report).
    pub acked_lines: u64,
    /// The last value of every logged key, and the keys set with `set_summary`.
    pub derived: Map<String, Value>,
    pub explicit: Map<String, Value>,
    /// Bumped on every change of the summary.
    pub summary_version: u64,
    /// Set by the writer when `finish` reached it, with the exit code.
    pub finishing: Option<i32>,
    pub writer_done: bool,
    /// The reporter was dropped without `finish` (a crash): stop, leave it resumable.
    pub shutdown: bool,
    /// `finish`'s bound: no request or wait goes past it.
    pub deadline: Option<Instant>,
    pub uploader_done: bool,
    pub uploaded_rows: u64,
    pub skipped_rows: u64,
    pub warnings: Vec<String>,
    pub warned: HashSet<String>,
}

impl Inner {
    /// Why waiting must end now: the reporter was dropped, or `finish`'s deadline passed.
    fn must_stop(&self, now: Instant) -> Option<Stop> {
        if self.shutdown {
            return Some(Stop::Shutdown);
        }
        if self.deadline.is_some_and(|d| now >= d) {
            return Some(Stop::Deadline);
        }
        None
    }

    /// Logs `message` as a warning the first time `key` is seen; returns whether it did.
    pub fn warn_once(&mut self, key: &str, message: String) -> bool {
        if !self.warned.insert(key.to_string()) {
            return false;
        }
        warn!("{message}");
        self.warnings.push(message);
        true
    }

    /// Appends one journaled line; past the memory bound, rows wait on disk only.
    pub fn push_line(&mut self, line: Line, tuning: &Tuning) {
        self.written_lines += 1;
        self.written_bytes += line.text.len() as u64 + 1;
        if self.disk_only {
            return;
        }
        self.mem_bytes += line.text.len();
        self.mem.push_back(line);
        if !self.journal_failed && (self.mem.len() > tuning.memory_rows || self.mem_bytes > tuning.memory_bytes) {
            let rows = self.mem.len();
            self.mem.clear();
            self.mem_bytes = 0;
            self.disk_only = true;
            self.warn_once(
                "spill",
                format!("W&B: {rows} rows wait for the server; further rows wait in the spool file until it catches up"),
            );
        }
    }
}

/// How an uploader ended.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum End {
    /// Everything sent and the run marked finished.
    Completed,
    /// Stopped for this process (a refused key, a refused run): rows stay in the spool.
    Parked(String),
    /// `finish`'s deadline passed first.
    Deadline,
    /// The reporter was dropped without `finish`.
    Shutdown,
    /// `sync` met too many failures in a row.
    GaveUp(String),
}

/// Why a call stopped retrying.
#[derive(Debug)]
enum Stop {
    Auth(u16),
    Permanent(u16, String),
    Deadline,
    Shutdown,
    GaveUp(String),
}

enum Work {
    Send,
    Heartbeat,
    Final,
}

/// One file_stream batch of history lines.
#[derive(Default)]
struct Batch {
    lines: Vec<String>,
    consumed_lines: u64,
    consumed_bytes: u64,
    skipped: u64,
    last_step: Option<u64>,
    /// Nothing written is left after it.
    exhausted: bool,
}

pub(super) struct Uploader {
    pub api: Api,
    pub shared: Arc<Shared>,
    pub spool: Spool,
    pub record: RunRecord,
    pub config: Value,
    pub tuning: Tuning,
    pub state: UploadState,
    /// A live reporter (paced, retries until `finish`'s deadline) or `sync` (back to
    /// back, gives up after `sync_max_retries` failures in a row).
    pub live: bool,
    /// Ask the server about the run first (a resume, a given id, earlier uploads).
    pub check_existing: bool,
    /// How to upload the spool later, for messages.
    pub hint: String,
    pub server_summary: Map<String, Value>,
    pub summary_sent: u64,
    pub max_batch: usize,
    pub last_request: Option<Instant>,
    pub started: Instant,
    /// The run existed before this process and the server has not yet said it is not
    /// stopped: a `stopped` now may be left from a Stop pressed on an earlier attempt
    /// (wandb/wandb#663: resumed runs once stopped from the website were stopped again
    /// at once), not a request to stop this one.
    pub stop_may_be_stale: bool,
    /// The config as UpsertBucket sent it (a JSON string), for `config.yaml`.
    pub upserted_config: String,
    /// An events or console journal that could not be read back: not sent any more.
    pub side_broken: [bool; 2],
    /// Keeps the spool locked while this thread may still write `upload.json`.
    pub _lock: Option<Arc<std::fs::File>>,
}

impl Uploader {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        api: Api,
        shared: Arc<Shared>,
        spool: Spool,
        record: RunRecord,
        config: Value,
        tuning: Tuning,
        state: UploadState,
        live: bool,
        check_existing: bool,
        hint: String,
        lock: Option<Arc<std::fs::File>>,
    ) -> Uploader {
        let max_batch = tuning.max_request_bytes;
        Uploader {
            api,
            shared,
            spool,
            record,
            config,
            tuning,
            state,
            live,
            check_existing,
            hint,
            server_summary: Map::new(),
            summary_sent: 0,
            max_batch,
            last_request: None,
            started: Instant::now(),
            stop_may_be_stale: false,
            upserted_config: String::new(),
            side_broken: [false; 2],
            _lock: lock,
        }
    }

    /// Runs to the end and tells `finish` so.
    pub fn run(mut self) -> End {
        let end = match self.init().and_then(|()| self.stream()) {
            Ok(end) => end,
            Err(stop) => self.end_of(stop),
        };
        let mut g = self.shared.lock();
        g.uploader_done = true;
        drop(g);
        self.shared.cv.notify_all();
        end
    }

    fn end_of(&mut self, stop: Stop) -> End {
        let spool = self.spool.dir.display().to_string();
        match stop {
            Stop::Auth(status) if !self.live => End::Parked(format!("{} refused the API key (HTTP {status})", self.record.base_url)),
            Stop::Permanent(status, why) if !self.live => End::Parked(format!(
                "{} refused run {}/{} (HTTP {status}: {why})",
                self.record.base_url, self.record.project, self.record.run_id
            )),
            Stop::Auth(status) => {
                let message = format!(
                    "W&B: {} refused the API key (HTTP {status}); training goes on, rows are kept in {spool}: upload them with a valid key using `{}`",
                    self.record.base_url, self.hint
                );
                self.shared.warn_once("auth", message.clone());
                End::Parked(message)
            }
            Stop::Permanent(status, why) => {
                let message = format!(
                    "W&B: {} refused the run {}/{} (HTTP {status}: {why}); training goes on, rows are kept in {spool}: `{}` uploads them once fixed",
                    self.record.base_url,
                    self.record.project,
                    self.record.run_id,
                    self.hint
                );
                self.shared.warn_once("refused", message.clone());
                End::Parked(message)
            }
            Stop::Deadline => End::Deadline,
            Stop::Shutdown => End::Shutdown,
            Stop::GaveUp(why) => End::GaveUp(why),
        }
    }

    fn persist(&self) {
        if let Err(e) = spool::write_json(&self.spool.upload(), &self.state, false) {
            self.shared.warn_once("upload_state", format!("W&B: cannot record upload progress: {e:#}"));
        }
    }

    /// The per-attempt limit: `limit`, cut to what is left before the deadline.
    fn attempt_timeout(&self, limit: Duration) -> Result<Duration, Stop> {
        let g = self.shared.lock();
        let now = Instant::now();
        if let Some(stop) = g.must_stop(now) {
            return Err(stop);
        }
        Ok(g.deadline.map_or(limit, |d| limit.min(d - now)))
    }

    /// Waits `wait`, or less: a shutdown or the deadline ends it with `Err`; with
    /// `cut_on_finish`, `finish` starting meanwhile ends it early (one prompt retry).
    fn pause(&self, wait: Duration, cut_on_finish: bool) -> Result<(), Stop> {
        let until = Instant::now() + wait;
        let mut g = self.shared.lock();
        let finishing_before = g.finishing.is_some();
        loop {
            let now = Instant::now();
            if let Some(stop) = g.must_stop(now) {
                return Err(stop);
            }
            if cut_on_finish && !finishing_before && g.finishing.is_some() {
                return Ok(());
            }
            if now >= until {
                return Ok(());
            }
            let wake = g.deadline.map_or(until, |d| d.min(until));
            g = self.shared.cv.wait_timeout(g, wake - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// One call with retries: transient failures back off (or wait `Retry-After`).
    fn call(&self, op: Op, attempt: &dyn Fn(&Api, Duration) -> Result<Value, Failure>) -> Result<Value, Stop> {
        let limit = if op == Op::FileStream { self.tuning.file_stream_timeout } else { self.tuning.graphql_timeout };
        let mut failures = 0u32;
        loop {
            let timeout = self.attempt_timeout(limit)?;
            match attempt(&self.api, timeout) {
                Ok(value) => return Ok(value),
                Err(Failure::Auth { status }) => return Err(Stop::Auth(status)),
                Err(Failure::Permanent { status, why }) => return Err(Stop::Permanent(status, why)),
                Err(Failure::Transient { why, retry_after }) => {
                    failures += 1;
                    if !self.live && failures > self.tuning.sync_max_retries {
                        return Err(Stop::GaveUp(format!("{}: {why} ({failures} attempts)", op.name())));
                    }
                    let (wait, cut) = match retry_after {
                        Some(wait) => (wait, false),
                        None => {
                            let unit = (random_u64() >> 11) as f64 / (1u64 << 53) as f64;
                            (api::backoff(failures - 1, self.tuning.retry_wait_min, self.tuning.retry_wait_max, unit), true)
                        }
                    };
                    debug!("W&B {} failed ({why}); retry {failures} in {wait:?}", op.name());
                    // Training and `wandb-sync` alike say so once, instead of retrying silently.
                    if failures == 3 {
                        self.shared.warn_once(
                            "outage",
                            format!(
                                "W&B: {} keeps failing ({why}); retrying with backoff, rows are kept (in memory, then in {})",
                                op.name(),
                                self.spool.dir.display()
                            ),
                        );
                    }
                    self.pause(wait, cut)?;
                }
            }
        }
    }

    /// RunResumeStatus when the run may exist, then UpsertBucket.
    fn init(&mut self) -> Result<(), Stop> {
        let r = self.record.clone();
        let mut old_config = Map::new();
        if self.check_existing {
            let vars = json!({"project": r.project, "entity": r.entity, "name": r.run_id});
            let data = self.call(Op::ResumeStatus, &|api, t| api.graphql(Op::ResumeStatus, api::RUN_RESUME_STATUS, vars.clone(), t))?;
            match api::parse_resume_status(&data) {
                Some(existing) => {
                    info!(
                        "W&B: resuming run {} ({} history lines, last step {}{})",
                        r.run_id,
                        existing.history_lines,
                        existing.last_step.map_or("none".to_string(), |s| s.to_string()),
                        if existing.started { "" } else { "; created but never started" }
                    );
                    self.state.server_lines = existing.history_lines;
                    self.state.events.reconcile(existing.events_lines);
                    self.state.console.reconcile(existing.log_lines);
                    self.state.last_step = existing.last_step;
                    self.state.storage_id = existing.storage_id;
                    self.server_summary = existing.summary;
                    old_config = existing.config;
                    self.stop_may_be_stale = true;
                }
                None => {
                    if self.state.acked_lines > 0 {
                        // Rows we sent before are not on this server (another server, or
                        // the run was deleted): send everything again.
                        info!("W&B: run {} is not on {}; uploading all its rows", r.run_id, r.base_url);
                        self.state.acked_lines = 0;
                        self.state.acked_bytes = 0;
                        let mut g = self.shared.lock();
                        g.mem.clear();
                        g.mem_bytes = 0;
                        g.disk_only = g.written_lines > 0;
                        g.acked_lines = 0;
                    }
                    self.state.server_lines = 0;
                    self.state.last_step = None;
                    self.state.storage_id = None;
                    // Events and console lines go up whole, from the start.
                    self.state.events = SideState::default();
                    self.state.console = SideState::default();
                }
            }
        }
        self.upserted_config = api::upsert_config(&self.config, &old_config);
        if let Ok(Some(metadata)) = spool::read_json::<Value>(&self.spool.metadata()) {
            self.upserted_config = api::with_metadata(&self.upserted_config, &metadata);
        }
        let tags = if r.tags.is_empty() { Value::Null } else { json!(r.tags) };
        let vars = json!({
            "id": self.state.storage_id, "name": r.run_id, "project": r.project, "entity": r.entity,
            "groupName": r.group, "description": null, "displayName": r.name, "notes": r.notes,
            "commit": null, "config": self.upserted_config, "host": r.host,
            "debug": null, "program": r.program, "repo": null, "jobType": r.job_type, "state": null,
            "sweep": null, "tags": tags, "summaryMetrics": null,
        });
        let data = self.call(Op::Upsert, &|api, t| api.graphql(Op::Upsert, api::UPSERT_BUCKET, vars.clone(), t))?;
        let up = api::parse_upsert(&data);
        self.state.entity = up.entity.or(r.entity.clone());
        self.state.project = up.project.or(Some(r.project.clone()));
        if up.storage_id.is_some() {
            self.state.storage_id = up.storage_id;
        }
        if up.name.as_deref().is_some_and(|n| n != r.run_id) {
            debug!("W&B: the server calls run {} {:?}", r.run_id, up.name);
        }
        // The server's line count is the next offset, resumed or not (as the SDK does).
        if up.history_lines > 0 {
            self.state.server_lines = up.history_lines;
        }
        self.state.created = true;
        if self.state.entity.is_none() {
            return Err(Stop::Permanent(200, "UpsertBucket named no entity".to_string()));
        }
        if !self.server_summary.is_empty() {
            // The summary is replaced whole: send the merged one first.
            self.shared.lock().summary_version += 1;
        }
        self.persist();
        Ok(())
    }

    fn wait_for_work(&self) -> Result<Work, Stop> {
        let mut g = self.shared.lock();
        loop {
            let now = Instant::now();
            if let Some(stop) = g.must_stop(now) {
                return Err(stop);
            }
            if (g.finishing.is_some() && g.writer_done) || !self.live {
                return Ok(Work::Final);
            }
            let sides_pending = SIDES
                .iter()
                .any(|&side| !self.side_broken[side.index()] && g.side_written[side.index()].lines > self.side_state(side).acked_lines);
            let pending = g.written_lines > self.state.acked_lines || g.summary_version > self.summary_sent || sides_pending;
            let backlog = g.written_bytes.saturating_sub(self.state.acked_bytes) as usize;
            let next_slot = self.last_request.map(|t| t + self.tuning.transmit_interval);
            if pending && (next_slot.is_none_or(|t| now >= t) || backlog >= self.max_batch) {
                return Ok(Work::Send);
            }
            let heartbeat_at = self.last_request.unwrap_or(self.started) + self.tuning.heartbeat_interval;
            if now >= heartbeat_at {
                return Ok(Work::Heartbeat);
            }
            let mut wake = heartbeat_at;
            if let (true, Some(slot)) = (pending, next_slot) {
                wake = wake.min(slot);
            }
            if let Some(d) = g.deadline {
                wake = wake.min(d);
            }
            g = self.shared.cv.wait_timeout(g, wake - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// The next lines, from memory or the spool file, within the byte budget; lines the
    /// server already has (by step) and oversize lines are consumed but not sent.
    fn take_batch(&self) -> Batch {
        let budget = self.max_batch;
        let mut source: Vec<(Line, u64)> = Vec::new();
        let (disk_range, written_lines) = {
            let g = self.shared.lock();
            if g.disk_only {
                (Some((self.state.acked_bytes, g.written_bytes)), g.written_lines)
            } else {
                let mut used = 0usize;
                for line in &g.mem {
                    if !source.is_empty() && used + line.text.len() > budget {
                        break;
                    }
                    used += line.text.len();
                    source.push((line.clone(), line.text.len() as u64 + 1));
                }
                (None, g.written_lines)
            }
        };
        if let Some((from, until)) = disk_range {
            match spool::read_lines(&self.spool.history(), from, until, budget) {
                Ok(lines) => source = lines,
                Err(e) => self.shared.warn_once("read_spool", format!("W&B: cannot read the spool: {e:#}")),
            }
        }
        let mut batch = Batch::default();
        let mut last = self.state.last_step;
        for (line, bytes) in source {
            batch.consumed_lines += 1;
            batch.consumed_bytes += bytes;
            let Some(step) = line.step else {
                batch.skipped += 1;
                self.shared.warn_once("bad_line", "W&B: a spooled row without _step is not sent".to_string());
                continue;
            };
            if line.text.len() > self.tuning.max_line_bytes {
                batch.skipped += 1;
                self.shared.warn_once(
                    "long_line",
                    format!(
                        "W&B: the row of step {step} is {} bytes, over the server's line limit: kept in the spool only",
                        line.text.len()
                    ),
                );
                continue;
            }
            if last.is_some_and(|l| step <= l) {
                batch.skipped += 1;
                continue;
            }
            last = Some(step);
            batch.last_step = Some(step);
            batch.lines.push(line.text);
        }
        batch.exhausted = self.state.acked_lines + batch.consumed_lines >= written_lines;
        batch
    }

    /// Records a batch as done (sent and acknowledged, or skipped).
    fn ack(&mut self, batch: &Batch) {
        if batch.skipped > 0 {
            let steps = self.state.last_step.map_or(String::new(), |s| format!(" (up to step {s})"));
            info!("W&B: {} rows not sent: the server already has their steps{steps}", batch.skipped);
        }
        self.state.acked_lines += batch.consumed_lines;
        self.state.acked_bytes += batch.consumed_bytes;
        self.state.server_lines += batch.lines.len() as u64;
        if batch.last_step.is_some() {
            self.state.last_step = batch.last_step;
        }
        let mut g = self.shared.lock();
        if g.disk_only {
            if self.state.acked_lines >= g.written_lines {
                g.disk_only = false;
            }
        } else {
            for _ in 0..batch.consumed_lines {
                if let Some(line) = g.mem.pop_front() {
                    g.mem_bytes -= line.text.len();
                }
            }
        }
        g.acked_lines = self.state.acked_lines;
        g.uploaded_rows += batch.lines.len() as u64;
        g.skipped_rows += batch.skipped;
    }

    /// The full summary: the server's (on resume), then the last logged values, then
    /// `set_summary`'s keys, with `_wandb.runtime` in whole seconds.
    fn summary_text(&self) -> (String, u64) {
        let g = self.shared.lock();
        let mut summary = self.server_summary.clone();
        for (k, v) in g.derived.iter().chain(g.explicit.iter()) {
            summary.insert(k.clone(), v.clone());
        }
        let version = g.summary_version;
        drop(g);
        let runtime = summary.get("_runtime").and_then(Value::as_f64).unwrap_or(0.0).max(0.0).floor() as u64;
        let wandb = summary.entry("_wandb".to_string()).or_insert_with(|| json!({}));
        if let Some(w) = wandb.as_object_mut() {
            let previous = w.get("runtime").and_then(Value::as_u64).unwrap_or(0);
            w.insert("runtime".to_string(), json!(runtime.max(previous)));
        }
        (Value::Object(summary).to_string(), version)
    }

    /// Records a `{"stopped": true}` answer (the user pressed Stop in the W&B interface)
    /// for [`super::Reporter::stop_requested`]; the caller decides what a stop means.
    fn note_stop(&mut self, response: &Value) {
        let stopped = response.get("stopped").and_then(Value::as_bool) == Some(true);
        if !stopped {
            self.stop_may_be_stale = false;
        } else if self.stop_may_be_stale {
            self.shared.warn_once(
                "stale_stop",
                "W&B: the server still reports this resumed run as stopped (a Stop pressed before the resume): it is not stopped again"
                    .to_string(),
            );
        } else if !self.shared.stopped.swap(true, Ordering::Relaxed) {
            info!("W&B: the server says the run was stopped from the W&B interface");
        }
    }

    fn side_state(&self, side: side::Side) -> &SideState {
        side.state_of(&self.state)
    }

    /// The next events and console lines, each stream within a quarter of the byte
    /// budget (history comes first).
    fn take_sides(&mut self) -> [SideBatch; 2] {
        let written = self.shared.lock().side_written;
        let budget = (self.max_batch / 4).max(1);
        let mut out: [SideBatch; 2] = Default::default();
        for side in SIDES {
            let i = side.index();
            if self.side_broken[i] {
                out[i].exhausted = true;
                continue;
            }
            match side::take(&side.journal(&self.spool), self.side_state(side), written[i], budget, self.tuning.max_line_bytes) {
                Ok((batch, oversize)) => {
                    if oversize > 0 {
                        self.shared.warn_once(
                            &format!("long_{}", side.file_name()),
                            format!("W&B: a line of {} is over the server's line limit: kept in the spool only", side.file_name()),
                        );
                    }
                    out[i] = batch;
                }
                Err(e) => {
                    self.shared.warn_once(
                        &format!("read_{}", side.file_name()),
                        format!("W&B: cannot read back the {} journal ({e:#}); its lines are not uploaded", side.file_name()),
                    );
                    self.side_broken[i] = true;
                    out[i].exhausted = true;
                }
            }
        }
        out
    }

    fn ack_sides(&mut self, sides: &[SideBatch; 2]) {
        for side in SIDES {
            let b = &sides[side.index()];
            if b.consumed.lines > 0 {
                side.state(&mut self.state).applied(b.consumed);
            }
        }
    }

    /// CreateRunFiles, then a PUT of each file to its signed URL, each retried as any
    /// request is. Returns the names uploaded, for the final request's `uploaded`. A file
    /// that cannot be uploaded is a warning: the run's charts and its finish do not
    /// depend on it.
    fn upload_run_files(&mut self, entity: &str, project: &str, run: &str) -> Result<Vec<String>, Stop> {
        let metadata: Option<Value> = spool::read_json(&self.spool.metadata()).unwrap_or_else(|e| {
            self.shared.warn_once("metadata_read", format!("W&B: {e:#}; wandb-metadata.json is not uploaded"));
            None
        });
        let console = side::plain_console(&side::Side::Console.journal(&self.spool), 64 << 20);
        let files = run_files::collect(&self.upserted_config, &self.summary_text().0, metadata.as_ref(), console);
        let names: Vec<&str> = files.iter().map(|f| f.name).collect();
        let vars = json!({"entity": entity, "project": project, "run": run, "files": names});
        let refused = |stop: &Stop| match stop {
            Stop::Auth(status) => Some(format!("HTTP {status}")),
            Stop::Permanent(status, why) => Some(format!("HTTP {status}: {why}")),
            Stop::GaveUp(why) => Some(why.clone()),
            Stop::Deadline | Stop::Shutdown => None,
        };
        let urls = match self.call(Op::CreateRunFiles, &|api, t| api.graphql(Op::CreateRunFiles, api::CREATE_RUN_FILES, vars.clone(), t)) {
            Ok(data) => api::parse_create_run_files(&data),
            Err(stop) => match refused(&stop) {
                Some(why) => {
                    self.shared.warn_once("run_files", format!("W&B: CreateRunFiles failed ({why}); the run's files are not uploaded"));
                    return Ok(Vec::new());
                }
                None => return Err(stop),
            },
        };
        let mut uploaded = Vec::new();
        for file in files {
            let Some((_, url)) = urls.files.iter().find(|(name, _)| name == file.name) else {
                self.shared.warn_once(&format!("no_url_{}", file.name), format!("W&B: the server gave no upload URL for {}", file.name));
                continue;
            };
            match self.call(Op::Upload, &|api, t| api.upload(url, &urls.headers, file.bytes.clone(), t)) {
                Ok(_) => uploaded.push(file.name.to_string()),
                Err(stop) => match refused(&stop) {
                    Some(why) => self.shared.warn_once(
                        &format!("upload_{}", file.name),
                        format!("W&B: could not upload {} ({why}); `{}` tries again", file.name, self.hint),
                    ),
                    None => return Err(stop),
                },
            }
        }
        debug!("W&B: uploaded {uploaded:?}");
        Ok(uploaded)
    }

    fn stream(&mut self) -> Result<End, Stop> {
        let entity = self.state.entity.clone().unwrap_or_default();
        let project = self.state.project.clone().unwrap_or_else(|| self.record.project.clone());
        let run = self.record.run_id.clone();
        let mut uploaded_files: Option<Vec<String>> = None;
        loop {
            let work = self.wait_for_work()?;
            let exit_code = self.shared.lock().finishing;
            if let Work::Heartbeat = work {
                self.last_request = Some(Instant::now());
                match self.call(Op::FileStream, &|api, t| api.file_stream(&entity, &project, &run, b"{}".to_vec(), t)) {
                    Ok(response) => {
                        self.note_stop(&response);
                        continue;
                    }
                    Err(Stop::Permanent(..)) => continue,
                    Err(stop) => return Err(stop),
                }
            }
            let batch = self.take_batch();
            let sides = self.take_sides();
            let sides_empty = sides.iter().all(|b| b.lines.is_empty());
            let is_final = matches!(work, Work::Final) && batch.exhausted && sides.iter().all(|b| b.exhausted);
            let summary_due = self.shared.lock().summary_version > self.summary_sent;
            let summary = if summary_due || is_final {
                let (text, version) = self.summary_text();
                if text.len() > self.tuning.max_line_bytes {
                    self.shared
                        .warn_once("long_summary", format!("W&B: the summary is {} bytes, over the line limit: not sent", text.len()));
                    self.summary_sent = self.summary_sent.max(version);
                    None
                } else {
                    Some((text, version))
                }
            } else {
                None
            };
            if batch.lines.is_empty() && sides_empty && summary.is_none() && !is_final {
                let lines_pending = self.shared.lock().written_lines > self.state.acked_lines;
                let sides_consumed = sides.iter().any(|b| b.consumed.lines > 0);
                if batch.consumed_lines == 0 && !sides_consumed && lines_pending {
                    // Rows are pending but none could be read back (the spool file was
                    // cut short, or a write to it failed): do not spin.
                    let message =
                        format!("W&B: rows waiting in {} cannot be read back; they are not uploaded", self.spool.history().display());
                    if !self.live {
                        return Err(Stop::GaveUp(message));
                    }
                    self.shared.warn_once("unreadable", message);
                    self.pause(self.tuning.retry_wait_max, true)?;
                    continue;
                }
                self.ack(&batch);
                self.ack_sides(&sides);
                self.persist();
                continue;
            }
            if is_final && uploaded_files.is_none() {
                uploaded_files = Some(self.upload_run_files(&entity, &project, &run)?);
            }
            let mut files = Map::new();
            if !batch.lines.is_empty() {
                files.insert("wandb-history.jsonl".into(), json!({"offset": self.state.server_lines, "content": batch.lines}));
            }
            for side in SIDES {
                let b = &sides[side.index()];
                if !b.lines.is_empty() {
                    let offset = self.side_state(side).server_lines;
                    files.insert(side.file_name().into(), json!({"offset": offset, "content": b.lines}));
                    // Before sending: after a crash the server's line count tells whether
                    // these lines arrived (SideState::reconcile).
                    side.state(&mut self.state).in_flight = Some(b.consumed);
                }
            }
            if !sides_empty {
                self.persist();
            }
            if let Some((text, _)) = &summary {
                files.insert("wandb-summary.json".into(), json!({"offset": 0, "content": [text]}));
            }
            let mut body = Map::new();
            if !files.is_empty() {
                body.insert("files".into(), Value::Object(files));
            }
            let code = exit_code.unwrap_or(0);
            if is_final {
                if let Some(names) = uploaded_files.as_ref().filter(|n| !n.is_empty()) {
                    body.insert("uploaded".into(), json!(names));
                }
                body.insert("complete".into(), json!(true));
                body.insert("exitcode".into(), json!(code));
            }
            let bytes = serde_json::to_vec(&Value::Object(body)).expect("JSON values serialize");
            self.last_request = Some(Instant::now());
            match self.call(Op::FileStream, &|api, t| api.file_stream(&entity, &project, &run, bytes.clone(), t)) {
                Ok(response) => {
                    self.ack(&batch);
                    self.ack_sides(&sides);
                    if let Some((_, version)) = summary {
                        self.summary_sent = self.summary_sent.max(version);
                    }
                    self.note_stop(&response);
                    if is_final {
                        self.state.complete_sent = true;
                        self.state.exit_code = Some(code);
                        self.persist();
                        return Ok(End::Completed);
                    }
                    self.persist();
                }
                Err(Stop::Permanent(413, _)) if batch.lines.len() + sides.iter().map(|b| b.lines.len()).sum::<usize>() > 1 => {
                    let sent: usize = batch.lines.iter().chain(sides.iter().flat_map(|b| b.lines.iter())).map(String::len).sum();
                    self.max_batch = (sent / 2).max(1);
                    debug!("W&B: request too large; batches now up to {} bytes", self.max_batch);
                }
                Err(Stop::Permanent(status, why)) => {
                    // The SDK stops streaming for good here; we keep every row and retry
                    // slowly, and `sync` can upload them later.
                    let message = format!(
                        "W&B: file_stream refused a request (HTTP {status}: {why}); rows are kept (in memory, then in {}) and retried every {:?}; `{}` uploads them later",
                        self.spool.dir.display(),
                        self.tuning.retry_wait_max,
                        self.hint
                    );
                    if !self.live {
                        return Err(Stop::GaveUp(message));
                    }
                    self.shared.warn_once("file_stream_refused", message);
                    self.pause(self.tuning.retry_wait_max, true)?;
                }
                Err(stop) => return Err(stop),
            }
        }
    }
}

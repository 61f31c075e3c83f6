//! `Reporter`: what the training loop holds. `log()` hands a row to a bounded channel
//! and returns; a writer thread journals it to the spool; an uploader thread (online
//! mode) owns all network I/O.

use super::api::Api;
use super::settings::{api_key_looks_valid, check_run_id, generate_run_id, netloc_of, random_u64, Mode, Settings, Tuning};
use super::side::{self, Side, Written, SIDES};
use super::spool::{self, FinishRecord, Line, RunRecord, Spool, UploadState};
use super::uploader::{End, Inner, Shared, Uploader};
use super::SYNC_HINT;
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{info, warn};

enum Msg {
    Row {
        step: u64,
        metrics: Map<String, Value>,
        timestamp: f64,
        elapsed: f64,
    },
    Summary(String, Value),
    /// A system metrics sample (`system.*` keys).
    Events {
        metrics: Map<String, Value>,
        timestamp: f64,
        elapsed: f64,
    },
    /// Console text, stamped when it was printed.
    Console {
        text: String,
        is_error: bool,
        timestamp: f64,
    },
    Finish(i32),
}

/// What [`Reporter::finish`] achieved (callers may ignore it; it is also logged).
#[derive(Debug, Clone, Default)]
pub struct FinishReport {
    /// The server acknowledged the final request: the run is marked finished there.
    pub completed: bool,
    /// Rows sent in this process.
    pub uploaded_rows: u64,
    /// Rows only in the spool (for `sync`, or the next resume).
    pub pending_rows: u64,
    /// Every warning given during the run.
    pub warnings: Vec<String>,
    /// `None` when disabled.
    pub spool_dir: Option<PathBuf>,
}

/// Reports one run from rank 0. Dropping it without [`Reporter::finish`] (a crash,
/// an early return) journals what was logged and leaves the run resumable.
pub struct Reporter {
    run_id: String,
    mode: Mode,
    live: Option<Live>,
}

struct Live {
    tx: Option<SyncSender<Msg>>,
    shared: Arc<Shared>,
    started: Instant,
    writer: Option<JoinHandle<()>>,
    uploader: Option<JoinHandle<End>>,
    flush_timeout: Duration,
    spool: Spool,
    hint: String,
}

impl Reporter {
    /// Never waits on the network. `resume` = (run id, step) from a checkpoint.
    ///
    /// The run id is `WANDB_RUN_ID` if set, else the checkpoint's, else a fresh one. On
    /// a resume, rows the spool holds past `step` that were never uploaded are dropped
    /// (the resumed run logs those steps again), and rows the server already holds are
    /// not sent twice. Errors: a bad run id, an unwritable run directory, or another
    /// process reporting the same run.
    pub fn start(settings: Settings, config: Value, resume: Option<(String, u64)>) -> anyhow::Result<Reporter> {
        Reporter::start_with_metadata(settings, config, resume, None)
    }

    /// [`Reporter::start`], with the run's `wandb-metadata.json` (host, program,
    /// hardware, versions: the Overview tab). It gets a `writerId` (new in each process,
    /// as the official client's) and goes to the server in the config, under
    /// `_wandb.e.<writerId>`, and as a file at finish.
    pub fn start_with_metadata(
        settings: Settings,
        config: Value,
        resume: Option<(String, u64)>,
        metadata: Option<Value>,
    ) -> anyhow::Result<Reporter> {
        let mut warnings = Vec::new();
        let run_id = match (&settings.run_id, &resume) {
            (Some(id), Some((saved, _))) if id != saved => {
                warnings.push(format!("W&B: WANDB_RUN_ID={id} replaces the run id {saved} saved in the checkpoint"));
                id.clone()
            }
            (Some(id), _) => id.clone(),
            (None, Some((saved, _))) => saved.clone(),
            (None, None) => generate_run_id(),
        };
        check_run_id(&run_id)?;
        if settings.mode == Mode::Disabled {
            return Ok(Reporter { run_id, mode: Mode::Disabled, live: None });
        }
        let spool = Spool::for_run(&settings.dir, &run_id);
        std::fs::create_dir_all(&spool.dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", spool.dir.display()))?;
        // A reporter of this run dropped in this process may take a moment to let go.
        let lock = Arc::new(spool.lock(Duration::from_secs(2))?);
        let hint = format!("{SYNC_HINT} {}", settings.dir.display());

        let mut mode = settings.mode;
        if mode == Mode::Online {
            let later = format!("reporting offline: rows are kept in {} for `{hint}`", spool.dir.display());
            match &settings.api_key {
                None => {
                    warnings.push(format!(
                        "W&B: no API key (set WANDB_API_KEY, or add `machine {} login user password <key>` to ~/.netrc); {later}",
                        netloc_of(&settings.base_url)
                    ));
                    mode = Mode::Offline;
                }
                Some(key) if !api_key_looks_valid(key) => {
                    warnings.push(format!("W&B: the API key is malformed (expected 40 or more of [A-Za-z0-9_-]); {later}"));
                    mode = Mode::Offline;
                }
                Some(_) => {}
            }
        }

        let (stored_url, password_removed) = super::settings::without_password(&settings.base_url);
        let record = RunRecord {
            format: spool::FORMAT,
            run_id: run_id.clone(),
            mode: mode.as_str().to_string(),
            base_url: stored_url,
            base_url_password_removed: password_removed,
            entity: settings.entity.clone(),
            project: settings.project.clone(),
            name: settings.name.clone(),
            group: settings.group.clone(),
            tags: settings.tags.clone(),
            job_type: settings.job_type.clone(),
            notes: settings.notes.clone(),
            host: spool::host_name(),
            program: spool::program_name(),
        };
        spool::write_private_json(&spool.settings(), &record)?;
        spool::write_json(&spool.config(), &config, false)?;
        match metadata {
            Some(Value::Object(mut m)) => {
                m.insert("writerId".into(), Value::String(format!("{:016x}{:016x}", random_u64(), random_u64())));
                spool::write_json(&spool.metadata(), &Value::Object(m), false)?;
            }
            _ => {
                // Another process's metadata does not describe this one.
                let _ = std::fs::remove_file(spool.metadata());
            }
        }
        // A resumed or restarted run is live again.
        let _ = std::fs::remove_file(spool.finish());
        let mut state: UploadState = spool::read_json(&spool.upload())
            .unwrap_or_else(|e| {
                warnings.push(format!("W&B: {e:#}; the server's own record decides what it has"));
                None
            })
            .unwrap_or_default();
        if state.complete_sent {
            // The run is live again: its finish is still to be sent.
            state.complete_sent = false;
            state.exit_code = None;
            spool::write_json(&spool.upload(), &state, false)?;
        }
        let journal = spool::prepare_journal(&spool.history(), state.acked_bytes, resume.as_ref().map(|r| r.1))?;
        if state.acked_lines > journal.lines || state.acked_bytes > journal.bytes {
            state.acked_lines = 0;
            state.acked_bytes = 0;
        }
        if journal.dropped > 0 {
            info!("W&B: dropped {} spooled rows logged after the checkpoint's step and never uploaded", journal.dropped);
        }
        let mut side_written = [Written::default(); 2];
        for side in SIDES {
            let (lines, bytes) = spool::prepare_side_journal(&side.journal(&spool))?;
            side_written[side.index()] = Written { lines, bytes };
            let s = side.state(&mut state);
            if s.acked_lines > lines || s.acked_bytes > bytes {
                *s = spool::SideState { server_lines: s.server_lines, ..Default::default() };
            }
        }
        let explicit: Map<String, Value> = spool::read_json(&spool.summary()).ok().flatten().unwrap_or_default();
        let check_existing = resume.is_some() || settings.run_id.is_some() || state.created || journal.lines > 0;

        let summary_version = u64::from(!journal.last_values.is_empty() || !explicit.is_empty());
        let shared = Shared::new(Inner {
            disk_only: state.acked_lines < journal.lines,
            written_lines: journal.lines,
            written_bytes: journal.bytes,
            acked_lines: state.acked_lines,
            derived: journal.last_values,
            explicit,
            summary_version,
            side_written,
            ..Inner::default()
        });
        {
            let mut g = shared.lock();
            for (i, w) in warnings.into_iter().enumerate() {
                g.warn_once(&format!("start{i}"), w);
            }
        }

        let (tx, rx) = sync_channel(settings.tuning.channel_capacity.max(1));
        let writer = {
            let (shared, spool, tuning, lock) = (shared.clone(), spool.clone(), settings.tuning.clone(), lock.clone());
            let last_step = resume.as_ref().map(|r| r.1);
            let runtime = journal.runtime;
            std::thread::Builder::new()
                .name("wandb-writer".into())
                .spawn(move || writer(rx, shared, spool, tuning, runtime, last_step, lock))?
        };
        let api = match mode {
            Mode::Online => match Api::new(
                &settings.base_url,
                settings.api_key.as_deref().unwrap_or_default(),
                settings.username.as_deref(),
                settings.user_email.as_deref(),
                settings.tuning.graphql_timeout.min(Duration::from_secs(20)),
            ) {
                Ok(api) => Some(api),
                Err(e) => {
                    shared.warn_once("client", format!("W&B: cannot set up HTTP ({e:#}); reporting offline, upload later with `{hint}`"));
                    mode = Mode::Offline;
                    None
                }
            },
            _ => None,
        };
        let uploader = if let Some(api) = api {
            let uploader = Uploader::new(
                api,
                shared.clone(),
                spool.clone(),
                record,
                config,
                settings.tuning.clone(),
                state,
                true,
                check_existing,
                hint.clone(),
                Some(lock),
            );
            Some(std::thread::Builder::new().name("wandb-uploader".into()).spawn(move || uploader.run())?)
        } else {
            None
        };
        info!("W&B: run {run_id} ({}), spool {}", mode.as_str(), spool.dir.display());
        let live = Live {
            tx: Some(tx),
            shared,
            started: Instant::now(),
            writer: Some(writer),
            uploader,
            flush_timeout: settings.flush_timeout,
            spool,
            hint,
        };
        Ok(Reporter { run_id, mode, live: Some(live) })
    }

    /// Generated (8 lowercase alnum, like wandb) unless given.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// How it reports: `Offline` also when online mode found no usable key.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The spool directory (`None` when disabled).
    pub fn spool_dir(&self) -> Option<&Path> {
        self.live.as_ref().map(|l| l.spool.dir.as_path())
    }

    /// Every warning given so far (each also went to `tracing::warn!`, once).
    pub fn warnings(&self) -> Vec<String> {
        self.live.as_ref().map(|l| l.shared.lock().warnings.clone()).unwrap_or_default()
    }

    /// True once the server answered that the run was stopped from the W&B interface
    /// (the Stop button). One atomic load, never a wait: a training loop can ask every
    /// step. The answer comes with an upload, so it lags the press by up to one transmit
    /// interval plus a round trip. A resumed run that the server still reports stopped
    /// from before its resume is not reported stopped. What a stop means is the caller's
    /// choice; the reporter goes on uploading until [`Reporter::finish`].
    pub fn stop_requested(&self) -> bool {
        self.live.as_ref().is_some_and(|l| l.shared.stopped.load(Ordering::Relaxed))
    }

    /// One history row at `step` (metric names like `train/loss`). Never blocks: the row
    /// goes to a bounded channel. Steps must increase: a row whose step is not above the
    /// previous row's is dropped with a warning, as W&B itself would ignore it.
    pub fn log(&self, step: u64, metrics: &Map<String, Value>) {
        let Some(live) = &self.live else { return };
        let msg = Msg::Row { step, metrics: metrics.clone(), timestamp: spool::now_epoch(), elapsed: live.started.elapsed().as_secs_f64() };
        live.send(msg);
    }

    /// One system metrics sample for the System panels (`system.*` keys, as the official
    /// client names them). Never blocks; `_timestamp`, `_runtime` and `_wandb` are added.
    pub fn log_events(&self, metrics: &Map<String, Value>) {
        let Some(live) = &self.live else { return };
        let msg = Msg::Events { metrics: metrics.clone(), timestamp: spool::now_epoch(), elapsed: live.started.elapsed().as_secs_f64() };
        live.send(msg);
    }

    /// Console text for the Logs tab, printed at `timestamp` (seconds since the epoch);
    /// `is_error` marks it as the official client marks stderr. Never blocks, never takes
    /// a lock and never logs: it may be called from inside a logger (a line is dropped,
    /// and counted, when the writer is behind).
    pub fn console(&self, text: &str, is_error: bool, timestamp: f64) {
        let Some(live) = &self.live else { return };
        let Some(tx) = &live.tx else { return };
        if tx.try_send(Msg::Console { text: text.to_string(), is_error, timestamp }).is_err() {
            live.shared.console_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sets one summary key (e.g. `best/val_loss`); it overrides the last logged value.
    pub fn set_summary(&self, key: &str, value: Value) {
        if let Some(live) = &self.live {
            live.send(Msg::Summary(key.to_string(), value));
        }
    }

    /// Bounded flush (`Settings::flush_timeout`), then marks the run finished with
    /// `exit_code` (0: finished, else failed). What did not go out in time stays in the
    /// spool, with the exit code, for `sync`.
    pub fn finish(mut self, exit_code: i32) -> FinishReport {
        let Some(mut live) = self.live.take() else { return FinishReport::default() };
        let deadline = Instant::now() + live.flush_timeout;
        live.shared.lock().deadline = Some(deadline);
        live.shared.cv.notify_all();
        let mut delivered = false;
        if let Some(tx) = live.tx.take() {
            let mut msg = Msg::Finish(exit_code);
            loop {
                match tx.try_send(msg) {
                    Ok(()) => {
                        delivered = true;
                        break;
                    }
                    Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                        msg = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(_) => break,
                }
            }
        }
        if !delivered {
            // The writer is stalled: record the exit code here, for `sync`.
            let record = FinishRecord { exit_code, timestamp: spool::now_epoch() };
            if let Err(e) = spool::write_json(&live.spool.finish(), &record, true) {
                warn!("W&B: cannot record the finish: {e:#}");
            }
        }
        let dropped = live.shared.console_dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            warn!("W&B: {dropped} console lines were not reported (the spool writer was behind)");
        }
        let has_uploader = live.uploader.is_some();
        let mut g = live.shared.lock();
        loop {
            if g.writer_done && (g.uploader_done || !has_uploader) {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = live.shared.cv.wait_timeout(g, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        let (writer_done, uploader_done) = (g.writer_done, g.uploader_done);
        drop(g);
        if writer_done {
            if let Some(w) = live.writer.take() {
                let _ = w.join();
            }
        }
        let end = if uploader_done { live.uploader.take().and_then(|u| u.join().ok()) } else { None };
        let spool = live.spool.dir.display().to_string();
        if !has_uploader {
            info!("W&B: run {} kept offline in {spool}; upload it with `{}`", self.run_id, live.hint);
        } else {
            match &end {
                Some(End::Completed) => {
                    info!("W&B: run {} finished on the server (exit code {exit_code})", self.run_id)
                }
                Some(End::Parked(_)) => {} // already warned
                _ => {
                    let pending = {
                        let g = live.shared.lock();
                        g.written_lines.saturating_sub(g.acked_lines)
                    };
                    live.shared.warn_once(
                        "flush_timeout",
                        format!(
                            "W&B: uploads did not finish within {:?}: {pending} rows and the finish state are kept in {spool}; `{}` uploads them",
                            live.flush_timeout, live.hint
                        ),
                    );
                }
            }
        }
        let g = live.shared.lock();
        FinishReport {
            completed: end == Some(End::Completed),
            uploaded_rows: g.uploaded_rows,
            pending_rows: g.written_lines.saturating_sub(g.acked_lines),
            warnings: g.warnings.clone(),
            spool_dir: Some(live.spool.dir.clone()),
        }
    }
}

impl Live {
    fn send(&self, msg: Msg) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self
                .shared
                .warn_once("channel_full", "W&B: the spool writer is stalled (disk?); rows logged meanwhile are dropped".to_string()),
            Err(TrySendError::Disconnected(_)) => {
                self.shared.warn_once("writer_gone", "W&B: the spool writer stopped; rows logged from now on are not reported".to_string())
            }
        }
    }
}

impl Drop for Reporter {
    /// Not finished: journal what is queued and stop the uploader (up to 2 s in all),
    /// leave the run resumable.
    fn drop(&mut self) {
        let Some(mut live) = self.live.take() else { return };
        drop(live.tx.take());
        let until = Instant::now() + Duration::from_secs(2);
        let mut g = live.shared.lock();
        while !g.writer_done {
            let now = Instant::now();
            if now >= until {
                break;
            }
            g = live.shared.cv.wait_timeout(g, until - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        g.shutdown = true;
        live.shared.cv.notify_all();
        // The uploader stops at its next check; an in-flight request runs to its timeout.
        while live.uploader.is_some() && !g.uploader_done {
            let now = Instant::now();
            if now >= until {
                break;
            }
            g = live.shared.cv.wait_timeout(g, until - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// The writer thread: journals rows to `history.jsonl`, keeps the summary, hands lines
/// to the uploader; on `Finish` records the exit code.
fn writer(
    rx: Receiver<Msg>,
    shared: Arc<Shared>,
    spool: Spool,
    tuning: Tuning,
    runtime_base: f64,
    mut last_step: Option<u64>,
    _lock: Arc<File>,
) {
    let mut journal = match OpenOptions::new().create(true).append(true).open(spool.history()) {
        Ok(f) => Some(f),
        Err(e) => {
            let mut g = shared.lock();
            g.journal_failed = true;
            g.warn_once("journal", format!("W&B: cannot open {}: {e}; rows are kept in memory only", spool.history().display()));
            None
        }
    };
    let mut sides = SIDES.map(|side| SideJournal::open(side, &spool, &shared));
    let mut finished = None;
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Row { step, mut metrics, timestamp, elapsed } => {
                if let Some(last) = last_step.filter(|&l| step <= l) {
                    shared.warn_once(
                        "step_back",
                        format!("W&B: a row at step {step} after step {last} is dropped (W&B steps must increase)"),
                    );
                    continue;
                }
                last_step = Some(step);
                metrics.insert("_step".into(), step.into());
                metrics.insert("_runtime".into(), (runtime_base + elapsed).into());
                metrics.insert("_timestamp".into(), timestamp.into());
                let text = serde_json::to_string(&metrics).expect("JSON values serialize");
                if let Some(f) = journal.as_mut() {
                    let mut bytes = Vec::with_capacity(text.len() + 1);
                    bytes.extend_from_slice(text.as_bytes());
                    bytes.push(b'\n');
                    if let Err(e) = f.write_all(&bytes) {
                        let mut g = shared.lock();
                        g.journal_failed = true;
                        g.warn_once(
                            "journal_write",
                            format!("W&B: cannot write {}: {e}; rows are kept in memory only", spool.history().display()),
                        );
                        drop(g);
                        journal = None;
                    }
                }
                let mut g = shared.lock();
                for (k, v) in metrics {
                    g.derived.insert(k, v);
                }
                g.summary_version += 1;
                g.push_line(Line { step: Some(step), text }, &tuning);
                drop(g);
                shared.cv.notify_all();
            }
            Msg::Summary(key, value) => {
                let mut g = shared.lock();
                g.explicit.insert(key, value);
                g.summary_version += 1;
                let explicit = g.explicit.clone();
                drop(g);
                shared.cv.notify_all();
                if let Err(e) = spool::write_json(&spool.summary(), &explicit, false) {
                    shared.warn_once("summary_write", format!("W&B: cannot write the summary: {e:#}"));
                }
            }
            Msg::Events { mut metrics, timestamp, elapsed } => {
                metrics.insert("_wandb".into(), true.into());
                metrics.insert("_timestamp".into(), timestamp.into());
                metrics.insert("_runtime".into(), (runtime_base + elapsed).into());
                let text = serde_json::to_string(&metrics).expect("JSON values serialize");
                sides[Side::Events.index()].append(&[text], &shared);
            }
            Msg::Console { text, is_error, timestamp } => {
                sides[Side::Console.index()].append(&side::console_lines(&text, is_error, timestamp), &shared);
            }
            Msg::Finish(code) => {
                finished = Some(code);
                break;
            }
        }
    }
    if let Some(f) = journal.as_mut() {
        let _ = f.sync_all();
    }
    for s in &mut sides {
        s.sync();
    }
    if let Some(code) = finished {
        let record = FinishRecord { exit_code: code, timestamp: spool::now_epoch() };
        if let Err(e) = spool::write_json(&spool.finish(), &record, true) {
            warn!("W&B: cannot record the finish: {e:#}");
        }
    }
    let mut g = shared.lock();
    g.writer_done = true;
    match finished {
        Some(code) => g.finishing = Some(code),
        None => g.shutdown = true,
    }
    drop(g);
    shared.cv.notify_all();
}

/// The writer's end of an events or console journal. A journal that cannot be written
/// gives one warning and its lines are not reported (they are a view of the run, not
/// its record: history and the run directory keep what matters).
struct SideJournal {
    side: Side,
    file: Option<File>,
}

impl SideJournal {
    fn open(side: Side, spool: &Spool, shared: &Shared) -> SideJournal {
        let path = side.journal(spool);
        let file = match OpenOptions::new().create(true).append(true).open(&path) {
            Ok(f) => Some(f),
            Err(e) => {
                shared
                    .warn_once(&format!("journal_{}", side.file_name()), format!("W&B: cannot open {}: {e}; not reported", path.display()));
                None
            }
        };
        SideJournal { side, file }
    }

    fn append(&mut self, lines: &[String], shared: &Shared) {
        let Some(f) = self.file.as_mut() else { return };
        let mut bytes = Vec::new();
        for line in lines {
            bytes.extend_from_slice(line.as_bytes());
            bytes.push(b'\n');
        }
        if let Err(e) = f.write_all(&bytes) {
            shared.warn_once(
                &format!("journal_write_{}", self.side.file_name()),
                format!("W&B: cannot write the {} journal: {e}; its lines are not reported from now on", self.side.file_name()),
            );
            self.file = None;
            return;
        }
        let mut g = shared.lock();
        let w = &mut g.side_written[self.side.index()];
        w.lines += lines.len() as u64;
        w.bytes += bytes.len() as u64;
        drop(g);
        shared.cv.notify_all();
    }

    fn sync(&mut self) {
        if let Some(f) = self.file.as_mut() {
            let _ = f.sync_all();
        }
    }
}

/// The spool directory of `run_id` under a run directory.
pub fn spool_dir(run_dir: &Path, run_id: &str) -> PathBuf {
    Spool::for_run(run_dir, run_id).dir
}

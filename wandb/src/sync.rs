//! `sync`: uploads spooled runs (offline runs, runs whose key was refused, runs cut off
//! by a crash or by `finish`'s timeout) and marks them finished.

use super::api::Api;
use super::settings::{api_key_looks_valid, netloc_of, netrc_api_key, normalize_base_url, without_password, Tuning};
use super::side::{Written, SIDES};
use super::spool::{self, FinishRecord, RunRecord, Spool, UploadState};
use super::uploader::{End, Inner, Shared, Uploader};
use super::SYNC_HINT;
use anyhow::{bail, Context};
use serde_json::{Map, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// The exit code sent for a run whose spool has no finish record (it was cut off).
pub const CRASHED_EXIT_CODE: i32 = 1;

/// Uploads every run spooled under `run_dir` (a run directory, its `wandb/` folder, or
/// one `run-<id>/` spool) and marks each finished: with the exit code `finish`
/// recorded, or as failed ([`CRASHED_EXIT_CODE`]) when the run was cut off. Resumes
/// where earlier uploads stopped; rows the server already holds are not sent again.
/// `WANDB_BASE_URL`, `WANDB_API_KEY` (else netrc), `WANDB_ENTITY` and `WANDB_PROJECT`
/// override what the spool recorded; a malformed `WANDB_BASE_URL` is refused at once (a
/// [`super::BadSetting`]). Refuses a run that a live process still reports. No line
/// it prints holds the password of a base URL.
pub fn sync(run_dir: &Path, env: &dyn Fn(&str) -> Option<String>, home: Option<&Path>) -> anyhow::Result<()> {
    sync_within(run_dir, env, home, DEFAULT_TIMEOUT)
}

/// How long `wandb-sync` keeps retrying an unreachable or failing server by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// [`sync`], giving up after `timeout` in all: what is unsent then stays in the spool for
/// a later sync, and the error says how much.
pub fn sync_within(run_dir: &Path, env: &dyn Fn(&str) -> Option<String>, home: Option<&Path>, timeout: Duration) -> anyhow::Result<()> {
    let base_url = match env("WANDB_BASE_URL").map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
        Some(url) => Some(normalize_base_url(&url, "WANDB_BASE_URL")?),
        None => None,
    };
    let spools = Spool::find(run_dir)?;
    let deadline = std::time::Instant::now() + timeout;
    let mut failed = Vec::new();
    for s in &spools {
        if let Err(e) = sync_one(s, base_url.as_deref(), env, home, deadline, timeout) {
            warn!("W&B sync of {}: {e:#}", s.dir.display());
            failed.push(format!("{}: {e:#}", s.dir.display()));
        }
    }
    if !failed.is_empty() {
        bail!("W&B sync failed for {} of {} runs:\n{}", failed.len(), spools.len(), failed.join("\n"));
    }
    Ok(())
}

/// `base_url`: `WANDB_BASE_URL`, checked; else the URL the spool recorded.
fn sync_one(
    s: &Spool,
    base_url: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
    home: Option<&Path>,
    deadline: std::time::Instant,
    timeout: Duration,
) -> anyhow::Result<()> {
    let var = |key: &str| env(key).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let mut record: RunRecord = spool::read_json(&s.settings())?.context("settings.json is missing")?;
    let lock = Arc::new(s.lock(Duration::from_secs(1))?);
    if record.base_url_password_removed && base_url.is_none() {
        bail!(
            "the run's W&B base URL ({}) had a password, which is never written to disk: set WANDB_BASE_URL to the full URL again to sync",
            record.base_url
        );
    }
    // The full URL goes to the HTTP client only; messages show the record's, which,
    // as training's, has no password.
    let base_url = match base_url {
        Some(url) => url.to_string(),
        None => normalize_base_url(&record.base_url, &format!("the base URL in {}", s.settings().display()))?,
    };
    record.base_url = without_password(&base_url).0;
    if let Some(entity) = var("WANDB_ENTITY") {
        record.entity = Some(entity);
    }
    if let Some(project) = var("WANDB_PROJECT") {
        record.project = project;
    }
    let Some(key) = var("WANDB_API_KEY").or_else(|| netrc_api_key(&base_url, env, home)) else {
        bail!("no API key: set WANDB_API_KEY or add `machine {}` to ~/.netrc", netloc_of(&record.base_url));
    };
    if !api_key_looks_valid(&key) {
        bail!("the API key is malformed (expected 40 or more of [A-Za-z0-9_-])");
    }
    let config: Value = spool::read_json(&s.config())?.unwrap_or(Value::Null);
    let mut state: UploadState = spool::read_json(&s.upload())
        .unwrap_or_else(|e| {
            warn!("W&B: {e:#}; the server's own record decides what it has");
            None
        })
        .unwrap_or_default();
    let finish: Option<FinishRecord> = spool::read_json(&s.finish())?;
    let journal = spool::prepare_journal(&s.history(), state.acked_bytes, None)?;
    if state.acked_lines > journal.lines || state.acked_bytes > journal.bytes {
        state.acked_lines = 0;
        state.acked_bytes = 0;
    }
    let mut side_written = [Written::default(); 2];
    for side in SIDES {
        let (lines, bytes) = spool::prepare_side_journal(&side.journal(s))?;
        side_written[side.index()] = Written { lines, bytes };
        let st = side.state(&mut state);
        if st.acked_lines > lines || st.acked_bytes > bytes {
            *st = spool::SideState::default();
        }
    }
    let sides_done = SIDES.iter().all(|&side| side.state_of(&state).acked_lines >= side_written[side.index()].lines);
    if state.complete_sent && state.acked_lines >= journal.lines && sides_done {
        info!("W&B: run {} is already uploaded and finished", record.run_id);
        return Ok(());
    }
    let exit_code = match &finish {
        Some(f) => f.exit_code,
        None => {
            info!("W&B: run {} has no finish record (cut off): it is marked failed (exit code {CRASHED_EXIT_CODE})", record.run_id);
            CRASHED_EXIT_CODE
        }
    };
    let explicit: Map<String, Value> = spool::read_json(&s.summary())?.unwrap_or_default();
    let tuning = Tuning::from_env(env);
    let shared = Shared::new(Inner {
        disk_only: true,
        written_lines: journal.lines,
        written_bytes: journal.bytes,
        acked_lines: state.acked_lines,
        derived: journal.last_values,
        explicit,
        summary_version: 1,
        side_written,
        finishing: Some(exit_code),
        writer_done: true,
        deadline: Some(deadline),
        ..Inner::default()
    });
    let api = Api::new(
        &base_url,
        &key,
        var("WANDB_USERNAME").as_deref(),
        var("WANDB_USER_EMAIL").as_deref(),
        tuning.graphql_timeout.min(Duration::from_secs(20)),
    )?;
    let run_id = record.run_id.clone();
    let hint = format!("{SYNC_HINT} {}", s.dir.display());
    info!("W&B: syncing run {run_id}: {} rows spooled, {} already done", journal.lines, state.acked_lines);
    let uploader = Uploader::new(api, shared.clone(), s.clone(), record, config, tuning, state, false, true, hint, Some(lock));
    match uploader.run() {
        End::Completed => {
            let g = shared.lock();
            info!(
                "W&B: run {run_id} synced: {} rows sent, {} already on the server; exit code {exit_code}",
                g.uploaded_rows, g.skipped_rows
            );
            Ok(())
        }
        End::Parked(why) | End::GaveUp(why) => bail!("{why}"),
        End::Deadline => {
            let unsent = journal.lines.saturating_sub(shared.lock().acked_lines);
            bail!(
                "gave up after {:.0} s (--timeout): {unsent} of {} rows and the run's finish are still unsent, kept in {} for a later `algpt2-ddp wandb-sync`",
                timeout.as_secs_f64(),
                journal.lines,
                s.dir.display()
            )
        }
        End::Shutdown => bail!("interrupted"),
    }
}

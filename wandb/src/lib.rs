//! Weights & Biases reporting from rank 0, speaking the official client's HTTP protocol
//! (GraphQL `UpsertBucket`/`RunResumeStatus`, then `file_stream`).
//!
//! ```text
//! log() ──bounded channel──▶ writer thread ──▶ <dir>/wandb/run-<id>/history.jsonl (spool)
//!  (never blocks)                 │
//!                                 └─▶ memory queue (bounded; past it rows are read back
//!                                      from the spool) ──▶ uploader thread ──▶ server
//! ```
//!
//! * **Never blocks training.** `log()` clones the row into a bounded channel and
//!   returns; all file and network I/O happens on two background threads.
//! * **Exactly once, in order.** Every row is journaled to the spool first. The uploader
//!   sends lines with file_stream offsets (line indexes) and counts them done only after
//!   a 2xx; a failed request is sent again at the same offset, which the server
//!   treats as a replacement, not an append. `upload.json` records how far it got.
//! * **Resume.** The run id comes from the checkpoint. RunResumeStatus gives the server's
//!   line count (the next offset), its last `_step`, summary and config. History is
//!   never rewound: a row whose `_step` the server already holds is not sent (W&B would
//!   ignore a step going back anyway), so the server keeps, for steps between the
//!   checkpoint and the crash, the rows the interrupted attempt uploaded. Rows in the
//!   spool after the checkpoint's step that never reached the server are dropped (the
//!   resumed run logs those steps again); rows up to it that never reached the server
//!   are uploaded first. The summary is sent whole at offset 0, merged over the old one;
//!   the config is merged over the old one; `_runtime` continues from the spool.
//! * **Pacing** as the official client: one request in flight, the first at once, then
//!   at most one per 15 s (everything in between merged), a request reaching 10 MiB of
//!   lines goes at once, an empty `{}` after 30 s idle, lines over 10 MiB − 100 KiB are
//!   kept in the spool only. `finish` flushes back to back, the last request carrying
//!   `complete` and `exitcode`.
//! * **Failures.** Timeouts, connection errors, 429 (`Retry-After` honoured exactly) and
//!   5xx are retried with `min(60 s, 2 s · 2^n · U[1, 1.25])`, for as long as training
//!   runs. 401/403 or a malformed key: one warning, the run goes on offline, rows stay
//!   in the spool for [`sync`]. Another 4xx on file_stream: one warning, rows kept and
//!   retried every 60 s (the official client gives up on the stream for good); a 413
//!   halves the batch first.
//! * **Offline** (`WANDB_MODE=offline`, or online without a key): the spool only;
//!   [`sync`] uploads it later and marks the run finished. Same for a run cut off by a
//!   crash (marked failed) or by `finish`'s timeout (marked with its exit code).
//! * **Exit.** [`Reporter::finish`] flushes for at most `Settings::flush_timeout`, then
//!   returns a [`FinishReport`]; dropping a `Reporter` unfinished (an error path) only
//!   journals what is queued and leaves the run resumable. One process at a time owns a
//!   spool (an advisory lock); `sync` refuses a run that is still reporting.
//! * **Stop.** A file_stream answer `{"stopped": true}` (the user pressed Stop in the W&B
//!   interface) sets a flag that [`Reporter::stop_requested`] reads without waiting;
//!   the reporter itself goes on uploading. A resumed run ignores a `stopped` until the
//!   server has once answered without it (a Stop left from before the resume).
//! * **Steps** must increase within a process: a row at or below the previous step is
//!   dropped with a warning (put all of a step's metrics in one `log` call).
//!
//! Spool layout: see `spool.rs`. Nothing here depends on the rest of the project.
//! The default server is `https://api.wandb.ai` ([`DEFAULT_BASE_URL`]; the 0.31 SDK's
//! default, `https://api.forge.coreweave.com`, fronts the same service).

mod api;
mod reporter;
mod run_files;
mod settings;
mod side;
mod spool;
mod sync;
mod uploader;

/// The loopback fake server of the test suite (unit tests here, and the end-to-end tests
/// under tests/ that run the binary against it).
#[doc(hidden)]
#[cfg(any(test, feature = "test-support"))]
pub mod fake_server;
#[cfg(test)]
mod tests;

pub use reporter::{spool_dir, FinishReport, Reporter};
pub use settings::{
    api_key_looks_valid, generate_run_id, BadSetting, Mode, Settings, Tuning, DEFAULT_BASE_URL, DEFAULT_FLUSH_TIMEOUT, DEFAULT_PROJECT,
};
pub use side::console_timestamp;
pub use sync::{sync, sync_within, CRASHED_EXIT_CODE, DEFAULT_TIMEOUT as DEFAULT_SYNC_TIMEOUT};

/// The command that uploads a spool, as messages name it.
pub const SYNC_HINT: &str = "algpt2-ddp wandb-sync";

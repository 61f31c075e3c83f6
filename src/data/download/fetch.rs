//! One file over HTTP: streamed to `<dest>.part`, resumed with a Range request after an
//! interruption, retried with backoff on failures that may go away, checked against its
//! sha256 and only then renamed to `<dest>`.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::blocking::{Client, Response};
use reqwest::header::{CONTENT_RANGE, RANGE, RETRY_AFTER};
use reqwest::StatusCode;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Failures a caller may want to tell apart (they travel inside `anyhow::Error`).
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(
        "could not reach {url} ({cause}).\n\
         `algpt2-ddp download` needs internet access. Without it, either\n  \
         - point it at a mirror serving the same files: --base-url URL (or ALGPT2_DOWNLOAD_URL=URL), or\n  \
         - {by_hand}"
    )]
    Unreachable { url: String, cause: String, by_hand: String },
    #[error("{url}: the server answered HTTP {status}; not retried, since retrying does not change that answer")]
    Status { url: String, status: StatusCode },
    #[error(
        "checksum mismatch for {path}: expected sha256 {expected}, got {actual}. The download was \
         deleted; if this repeats, {url} serves a different file than the one published"
    )]
    ChecksumMismatch { path: PathBuf, url: String, expected: String, actual: String },
    #[error("{url}: the server reports a file of {actual} bytes, expected {expected}; is this the right URL?")]
    SizeMismatch { url: String, expected: u64, actual: u64 },
    #[error("{url}: gave up after {attempts} attempts; last error: {last}")]
    GaveUp { url: String, attempts: u32, last: String },
}

/// One file to fetch and what it must turn out to be.
pub(super) struct Target<'a> {
    pub url: &'a str,
    pub dest: &'a Path,
    pub sha256: Option<&'a str>,
    /// Known size, which lets a wrong file be refused before it is downloaded.
    pub size: Option<u64>,
    /// How to put the file in place without this command, for the offline message.
    pub by_hand: &'a str,
}

/// When to try again.
#[derive(Clone, Debug)]
pub(super) struct RetryPolicy {
    /// Retries after the first attempt.
    pub retries: u32,
    /// Delay before the first retry, doubled for each further one (then jittered).
    pub base_delay: Duration,
    /// Ceiling for the backoff and for a server's Retry-After.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// Wait before retry number `retry` (0-based). A server's Retry-After is honoured as
    /// given (up to the ceiling). Otherwise exponential, with the upper half jittered so
    /// that many ranks or users retrying at once do not arrive together.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(wait) = retry_after {
            return wait.min(self.max_delay);
        }
        let ceiling = self.base_delay.saturating_mul(1 << retry.min(20)).min(self.max_delay);
        ceiling / 2 + ceiling.mul_f64(random_fraction() / 2.0)
    }
}

/// A number in [0, 1) that differs between calls; good enough for jitter, no RNG crate needed.
fn random_fraction() -> f64 {
    use std::hash::BuildHasher;
    let bits = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Why one attempt failed, and so whether another may succeed.
enum AttemptError {
    /// Worth another attempt: connection errors, timeouts, 429, 5xx, a body cut short.
    Retry {
        reason: String,
        /// The server's Retry-After, if it sent one.
        wait: Option<Duration>,
        /// The host could not be connected to at all (DNS, refused, unreachable).
        unreachable: bool,
    },
    /// The partial file did not fit what the server has and was deleted; the next attempt
    /// starts from byte 0 at once. Not a failure of the server, so not counted as a retry.
    Restart(String),
    /// Another attempt would fail the same way.
    Fatal(anyhow::Error),
}

impl AttemptError {
    fn retry(reason: String) -> AttemptError {
        AttemptError::Retry { reason, wait: None, unreachable: false }
    }
}

impl From<anyhow::Error> for AttemptError {
    fn from(e: anyhow::Error) -> Self {
        AttemptError::Fatal(e)
    }
}

/// The HTTP client and the policy around it.
pub(super) struct Fetcher {
    pub client: Client,
    pub retry: RetryPolicy,
    /// Draw a bar rather than log a line now and then.
    pub progress: bool,
}

impl Fetcher {
    /// `retries` after the first attempt; `timeout` for connecting, for the headers and
    /// for each read of the body.
    pub fn new(retries: u32, timeout: Duration, progress: bool) -> anyhow::Result<Fetcher> {
        let retry = RetryPolicy { retries, base_delay: Duration::from_secs(1), max_delay: Duration::from_secs(60) };
        Ok(Fetcher { client: build_client(timeout, true)?, retry, progress })
    }

    /// Makes `target.dest` hold the verified file, downloading only what is missing.
    pub fn fetch(&self, target: &Target) -> anyhow::Result<()> {
        let Target { url, dest, .. } = *target;
        if already_present(target)? {
            return Ok(());
        }
        if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }

        let part = part_path(dest);
        let (mut attempts, mut retries_done, mut restarted) = (0, 0, false);
        loop {
            attempts += 1;
            let (reason, wait, unreachable) = match self.attempt(target, &part) {
                Ok(()) => break,
                Err(AttemptError::Fatal(e)) => return Err(e),
                // Once only: a second restart in a row means the server is inconsistent.
                Err(AttemptError::Restart(reason)) if !restarted => {
                    info!("{url}: {reason}");
                    restarted = true;
                    continue;
                }
                Err(AttemptError::Restart(last)) => return Err(DownloadError::GaveUp { url: url.to_string(), attempts, last }.into()),
                Err(AttemptError::Retry { reason, wait, unreachable }) => (reason, wait, unreachable),
            };
            if retries_done >= self.retry.retries {
                let (url, by_hand) = (url.to_string(), target.by_hand.to_string());
                return Err(if unreachable {
                    DownloadError::Unreachable { url, cause: reason, by_hand }
                } else {
                    DownloadError::GaveUp { url, attempts, last: reason }
                }
                .into());
            }
            let delay = self.retry.delay(retries_done, wait);
            retries_done += 1;
            warn!("{url}: {reason}; retry {retries_done} of {} in {:.1} s", self.retry.retries, delay.as_secs_f64());
            std::thread::sleep(delay);
        }

        verify(&part, target)?;
        fs::rename(&part, dest).with_context(|| format!("cannot rename {} to {}", part.display(), dest.display()))?;
        if let Some(dir) = dest.parent() {
            sync_dir(dir);
        }
        info!("{} downloaded{}", dest.display(), if target.sha256.is_some() { " and verified" } else { "" });
        Ok(())
    }

    /// One request: continues `part` from its current length when the server allows it,
    /// otherwise starts it over. Whatever arrived stays in `part` for the next attempt.
    fn attempt(&self, target: &Target, part: &Path) -> Result<(), AttemptError> {
        let url = target.url;
        let mut have = fs::metadata(part).map_or(0, |m| m.len());
        match target.size {
            Some(size) if have == size => return Ok(()), // complete already; verification decides whether it is right
            Some(size) if have > size => {
                warn!("{} is longer than the expected {size} bytes; starting over", part.display());
                have = 0;
            }
            _ => {}
        }

        let mut request = self.client.get(url);
        if have > 0 {
            request = request.header(RANGE, format!("bytes={have}-"));
        }
        let mut response = request.send().map_err(|e| AttemptError::Retry {
            unreachable: e.is_connect(),
            reason: error_chain(&e.without_url()), // the URL is in the message already
            wait: None,
        })?;
        let Some((start, total)) = body_start(&response, have, url, part)? else {
            return Ok(()); // nothing lies beyond `have`: the part is complete
        };
        if let (Some(expected), Some(actual)) = (target.size, total) {
            if expected != actual {
                return Err(AttemptError::Fatal(DownloadError::SizeMismatch { url: url.to_string(), expected, actual }.into()));
            }
        }

        let mut file = if start == 0 { File::create(part) } else { OpenOptions::new().append(true).open(part) }
            .with_context(|| format!("cannot open {} for writing", part.display()))?;
        if start > 0 {
            info!("{url}: resuming at byte {start}");
        } else {
            info!("downloading {url} to {}", target.dest.display());
        }
        let label = target.dest.file_name().map_or_else(|| url.to_string(), |n| n.to_string_lossy().into_owned());
        let mut progress = Progress::start(self.progress, label, start, total.or(target.size));
        let received = copy_body(&mut response, &mut file, part, start, &mut progress);
        file.sync_all().with_context(|| format!("cannot flush {}", part.display()))?;
        progress.finish();
        let written = received?;
        match total {
            // Normally reported as a read error already; checked here so that a lenient
            // transport cannot pass a short body off as a whole one.
            Some(total) if written < total => Err(AttemptError::retry(format!("the body ended at byte {written} of {total}"))),
            Some(total) if written > total => {
                discard(part)?;
                Err(AttemptError::retry(format!("received {written} bytes, more than the announced {total}; starting over")))
            }
            _ => Ok(()),
        }
    }
}

/// Whether `dest` already holds the file (then it is left alone). One that fails its
/// checksum is deleted, to be downloaded again.
fn already_present(target: &Target) -> anyhow::Result<bool> {
    let dest = target.dest;
    if !dest.exists() {
        return Ok(false);
    }
    let Some(expected) = target.sha256 else {
        info!("{} is already present; not downloaded again", dest.display());
        return Ok(true);
    };
    let actual = crate::run_dir::sha256_file(dest)?;
    if actual.eq_ignore_ascii_case(expected) {
        info!("{} is already present and its sha256 matches; not downloaded again", dest.display());
        return Ok(true);
    }
    warn!("{} has sha256 {actual}, expected {expected}; downloading it again", dest.display());
    fs::remove_file(dest).with_context(|| format!("cannot delete {}", dest.display()))?;
    Ok(false)
}

/// Where the answer to a request for the bytes from `have` on puts its body in the file,
/// and the file's whole length if the server says: `(start, total)`. None when the part
/// holds the whole file already (HTTP 416 naming `have` as the length).
fn body_start(response: &Response, have: u64, url: &str, part: &Path) -> Result<Option<(u64, Option<u64>)>, AttemptError> {
    match response.status() {
        StatusCode::OK => {
            if have > 0 {
                info!("{url}: the server does not resume downloads; starting over from byte 0");
            }
            Ok(Some((0, response.content_length())))
        }
        StatusCode::PARTIAL_CONTENT => match content_range(response) {
            (Some(first), total) if first == have => Ok(Some((have, total))),
            (first, _) => {
                discard(part)?;
                let answered = first.map_or_else(|| "an unstated offset".to_string(), |b| format!("byte {b}"));
                Err(AttemptError::Restart(format!("asked to resume at byte {have}, the server answered from {answered}; starting over")))
            }
        },
        StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => {
            // Nothing lies beyond `have`: the part is complete, or longer than the file.
            if content_range(response).1 == Some(have) {
                return Ok(None);
            }
            discard(part)?;
            Err(AttemptError::Restart(format!("the server cannot resume at byte {have} (HTTP 416: the file is shorter); starting over")))
        }
        s if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => {
            let wait = response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()?.trim().parse().ok()).map(Duration::from_secs);
            Err(AttemptError::Retry { reason: format!("HTTP {s}"), wait, unreachable: false })
        }
        status => Err(AttemptError::Fatal(DownloadError::Status { url: url.to_string(), status }.into())),
    }
}

/// The client: system proxies honoured (clusters often reach out only through one); no
/// total deadline, only per-phase ones, since the archive takes minutes on a slow link.
pub(super) fn build_client(timeout: Duration, use_system_proxy: bool) -> anyhow::Result<Client> {
    let mut builder = Client::builder()
        .connect_timeout(timeout)
        .timeout(timeout) // blocking client: applies to the headers and to each body read
        .user_agent(concat!("algpt2-ddp/", env!("CARGO_PKG_VERSION")));
    if !use_system_proxy {
        builder = builder.no_proxy();
    }
    builder.build().context("cannot set up the HTTP client")
}

/// Streams the body into `file`; returns the length `part` then has. A read error is a
/// dropped connection (retry, keeping what arrived); a write error is ours (no retry).
fn copy_body(response: &mut Response, file: &mut File, part: &Path, start: u64, progress: &mut Progress) -> Result<u64, AttemptError> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut written = start;
    loop {
        let n = match response.read(&mut buf) {
            Ok(0) => return Ok(written),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(AttemptError::retry(format!("connection lost at byte {written}: {}", error_chain(&e)))),
        };
        file.write_all(&buf[..n]).with_context(|| format!("cannot write to {}", part.display()))?;
        written += n as u64;
        progress.update(written);
    }
}

/// Checks the finished `part` against the expected sha256; deletes it when it differs,
/// since resuming from a wrong file could never produce the right one.
fn verify(part: &Path, target: &Target) -> anyhow::Result<()> {
    let Some(expected) = target.sha256 else { return Ok(()) };
    info!("verifying sha256 of {}", target.dest.display());
    let actual = crate::run_dir::sha256_file(part)?;
    if actual.eq_ignore_ascii_case(expected) {
        return Ok(());
    }
    discard(part)?;
    Err(DownloadError::ChecksumMismatch {
        path: target.dest.to_path_buf(),
        url: target.url.to_string(),
        expected: expected.to_string(),
        actual,
    }
    .into())
}

/// `<dest>.part`: where an unfinished download lives.
pub(super) fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

fn discard(part: &Path) -> anyhow::Result<()> {
    match fs::remove_file(part) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).with_context(|| format!("cannot delete {}", part.display())),
        _ => Ok(()),
    }
}

/// Makes a rename durable (best effort: not every platform or filesystem supports it).
pub(super) fn sync_dir(dir: &Path) {
    if let Ok(handle) = File::open(dir) {
        let _ = handle.sync_all();
    }
}

/// `Content-Range: bytes <first>-<last>/<total>` (or `bytes */<total>`) as (first, total).
fn content_range(response: &Response) -> (Option<u64>, Option<u64>) {
    let Some(spec) = response.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()?.trim().strip_prefix("bytes ")) else {
        return (None, None);
    };
    let (range, total) = spec.split_once('/').unwrap_or((spec, "*"));
    let first = range.split_once('-').and_then(|(first, _)| first.trim().parse().ok());
    (first, total.trim().parse().ok())
}

/// An error and its causes on one line: reqwest's own message leaves out the useful part
/// ("dns error", "Connection refused").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

// ---------------------------------------------------------------------------------------
// Progress

/// A bar on a terminal; elsewhere (logs, batch jobs) a line every few seconds.
enum Progress {
    Bar(ProgressBar),
    Lines { label: String, total: Option<u64>, last_line: Instant },
}

const LINE_INTERVAL: Duration = Duration::from_secs(10);

impl Progress {
    fn start(bar: bool, label: String, position: u64, total: Option<u64>) -> Progress {
        if !bar {
            return Progress::Lines { label, total, last_line: Instant::now() };
        }
        let bar = match total {
            Some(total) => ProgressBar::new(total).with_style(
                ProgressStyle::with_template("{msg} [{bar:40.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                    .expect("valid progress template")
                    .progress_chars("=> "),
            ),
            None => ProgressBar::new_spinner()
                .with_style(ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}").expect("valid progress template")),
        };
        bar.set_message(label);
        bar.set_position(position);
        Progress::Bar(bar)
    }

    fn update(&mut self, position: u64) {
        match self {
            Progress::Bar(bar) => bar.set_position(position),
            Progress::Lines { label, total, last_line } => {
                if last_line.elapsed() >= LINE_INTERVAL {
                    *last_line = Instant::now();
                    match total {
                        Some(total) if *total > 0 => {
                            info!("{label}: {} of {} MiB ({:.0}%)", position >> 20, *total >> 20, 100.0 * position as f64 / *total as f64)
                        }
                        _ => info!("{label}: {} MiB", position >> 20),
                    }
                }
            }
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

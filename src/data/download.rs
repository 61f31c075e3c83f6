//! `algpt2-ddp download`: fetches WikiText-103 (tokenized or raw), verifies it and unpacks
//! it, for machines with internet access.
//!
//! One file is streamed to `<dest>.part`, resumed with an HTTP Range request after an
//! interruption, retried with backoff on failures that may go away, checked against its
//! published sha256 and only then renamed to `<dest>`: a file under its final name is
//! always complete and verified. The archive is unpacked through a staging directory for
//! the same reason, so a run that was interrupted at any point is simply run again.

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::blocking::{Client, Response};
use reqwest::header::{CONTENT_RANGE, RANGE, RETRY_AFTER};
use reqwest::StatusCode;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Where the authors published WikiText; `--base-url` replaces it with a mirror.
pub const DEFAULT_BASE_URL: &str = "https://s3.amazonaws.com/research.metamind.io/wikitext/";

/// The two published forms of WikiText-103.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wikitext103Variant {
    /// `wiki.*.tokens`: tokenized, rare words replaced by `<unk>` (what the configs expect).
    Tokens,
    /// `wiki.*.raw`: the same text with every word kept (no `<unk>`), for byte-level tokenizers.
    Raw,
}

impl FromStr for Wikitext103Variant {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.trim() {
            "tokens" => Ok(Wikitext103Variant::Tokens),
            "raw" => Ok(Wikitext103Variant::Raw),
            other => bail!("unknown WikiText-103 variant {other:?}: expected `tokens` or `raw`"),
        }
    }
}

impl fmt::Display for Wikitext103Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Wikitext103Variant::Tokens => "tokens",
            Wikitext103Variant::Raw => "raw",
        })
    }
}

/// How and where to download.
#[derive(Clone, Debug)]
pub struct DownloadOptions {
    /// URL of the directory holding the archives (the original host or a mirror).
    pub base_url: String,
    /// Directory the dataset directory (`wikitext-103/` or `wikitext-103-raw/`) is created in.
    pub dest_dir: PathBuf,
    /// Retries per file after the first attempt, for failures that may go away.
    pub retries: u32,
    /// Limit for connecting, for the response headers and for each read of the body; a
    /// slow but moving download is never cut off.
    pub timeout: Duration,
    /// Draw a progress bar (for a terminal) instead of occasional log lines.
    pub progress: bool,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        DownloadOptions {
            base_url: DEFAULT_BASE_URL.to_string(),
            dest_dir: PathBuf::from("data"),
            retries: 5,
            timeout: Duration::from_secs(60),
            progress: io::IsTerminal::is_terminal(&io::stderr()),
        }
    }
}

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

/// Fetches and unpacks one variant; returns the directory holding wiki.{train,valid,test}.*
pub fn download_wikitext103(variant: Wikitext103Variant, opts: &DownloadOptions) -> anyhow::Result<PathBuf> {
    let archive = Archive::published(variant);
    let fetcher = Fetcher::new(opts)?;
    fetch_and_unpack(&archive, opts, &fetcher)
        .with_context(|| format!("downloading WikiText-103 ({variant}) into {}", opts.dest_dir.display()))
}

/// One verified, resumable file download (used by the above; also tested directly).
pub fn download_file(url: &str, dest: &Path, expected_sha256: Option<&str>, opts: &DownloadOptions) -> anyhow::Result<()> {
    let by_hand = format!("place the file by hand at {}", dest.display());
    Fetcher::new(opts)?.fetch(&Target { url, dest, sha256: expected_sha256, size: None, by_hand: &by_hand })
}

// ---------------------------------------------------------------------------------------
// The dataset

/// One variant's archive: where it is, what it must hash to, and what it must contain.
struct Archive {
    variant: Wikitext103Variant,
    /// Name on the server (relative to the base URL) and on disk until it is unpacked.
    file_name: &'static str,
    /// Published sha256 (lower-case hex) and size of the archive.
    sha256: String,
    size: Option<u64>,
    /// The folder inside the archive, which is also the dataset directory we create.
    dir_name: &'static str,
    /// Extension of the split files: `wiki.{train,valid,test}.<ext>`.
    ext: &'static str,
}

const SPLITS: [&str; 3] = ["train", "valid", "test"];

impl Archive {
    /// The archives as published. The sha256 and byte sizes are those recorded for these
    /// exact URLs in huggingface/datasets (datasets/wikitext/dataset_infos.json); the same
    /// sha256 values are registered in Julia's WikiText.jl / CorpusLoaders DataDeps.
    fn published(variant: Wikitext103Variant) -> Archive {
        match variant {
            Wikitext103Variant::Tokens => Archive {
                variant,
                file_name: "wikitext-103-v1.zip",
                sha256: "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590".to_string(),
                size: Some(190_229_076),
                dir_name: "wikitext-103",
                ext: "tokens",
            },
            Wikitext103Variant::Raw => Archive {
                variant,
                file_name: "wikitext-103-raw-v1.zip",
                sha256: "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794".to_string(),
                size: Some(191_984_949),
                dir_name: "wikitext-103-raw",
                ext: "raw",
            },
        }
    }

    fn member_names(&self) -> Vec<String> {
        SPLITS.iter().map(|split| format!("wiki.{split}.{}", self.ext)).collect()
    }
}

/// Downloads, verifies and unpacks `archive` under `opts.dest_dir`, unless the unpacked
/// files are already there. The archive is deleted once unpacked: the dataset directory
/// is what the trainer reads, and the archive would only take another 190 MB.
fn fetch_and_unpack(archive: &Archive, opts: &DownloadOptions, fetcher: &Fetcher) -> anyhow::Result<PathBuf> {
    let data_dir = opts.dest_dir.join(archive.dir_name);
    let members = archive.member_names();
    // Each file reaches its final name only once complete (see `unpack`), so presence is enough.
    if members.iter().all(|m| data_dir.join(m).is_file()) {
        info!(
            "WikiText-103 ({}) is already present in {} ({}); nothing to download",
            archive.variant,
            data_dir.display(),
            members.join(", ")
        );
        return Ok(data_dir);
    }
    fs::create_dir_all(&opts.dest_dir).with_context(|| format!("cannot create {}", opts.dest_dir.display()))?;

    let zip_path = opts.dest_dir.join(archive.file_name);
    let url = join_url(&opts.base_url, archive.file_name);
    let by_hand = format!(
        "download {} elsewhere and place it in {} (it is then verified and unpacked), or place the \
         unpacked {} in {}",
        archive.file_name,
        opts.dest_dir.display(),
        members.join(", "),
        data_dir.display()
    );
    let target = Target { url: &url, dest: &zip_path, sha256: Some(&archive.sha256), size: archive.size, by_hand: &by_hand };
    fetcher.fetch(&target)?;

    unpack(&zip_path, archive, &data_dir)?;
    if let Err(e) = fs::remove_file(&zip_path) {
        warn!("could not delete {} after unpacking it: {e}", zip_path.display());
    }
    info!("WikiText-103 ({}) is ready in {}", archive.variant, data_dir.display());
    Ok(data_dir)
}

/// `base` + `/` + `file`, whether or not `base` ends in a slash.
fn join_url(base: &str, file: &str) -> String {
    format!("{}/{file}", base.trim_end_matches('/'))
}

/// Extracts the archive's three split files into `data_dir` and nothing else. They are
/// written into a staging directory beside it and renamed into place only after each was
/// completely written (the zip reader checks each entry's CRC at its end), so `data_dir`
/// never holds a partial file and an interrupted unpack is redone by the next run.
fn unpack(zip_path: &Path, archive: &Archive, data_dir: &Path) -> anyhow::Result<()> {
    let parent = data_dir.parent().context("dataset directory has no parent")?;
    let staging = parent.join(format!(".{}.unpacking", archive.dir_name));
    info!("unpacking {} into {}", zip_path.display(), data_dir.display());
    if staging.exists() {
        // Left by an interrupted run; its contents are unknown, so start over.
        fs::remove_dir_all(&staging).with_context(|| format!("cannot remove stale {}", staging.display()))?;
    }
    fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let staged = extract_members(zip_path, archive, &staging);
    if staged.is_err() {
        let _ = fs::remove_dir_all(&staging); // also removed by the next run
    }
    let members = staged?;

    fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    for member in &members {
        let (from, to) = (staging.join(member), data_dir.join(member));
        fs::rename(&from, &to).with_context(|| format!("cannot move {} to {}", from.display(), to.display()))?;
    }
    sync_dir(data_dir);
    fs::remove_dir(&staging).with_context(|| format!("cannot remove {}", staging.display()))?;
    Ok(())
}

/// Writes the archive's split files into `staging`; returns their names.
fn extract_members(zip_path: &Path, archive: &Archive, staging: &Path) -> anyhow::Result<Vec<String>> {
    let file = File::open(zip_path).with_context(|| format!("cannot open {}", zip_path.display()))?;
    let mut zip =
        zip::ZipArchive::new(io::BufReader::new(file)).with_context(|| format!("{} is not a readable zip archive", zip_path.display()))?;
    let members = archive.member_names();
    let entries = find_members(&mut zip, zip_path, archive.dir_name, &members)?;

    for (member, index) in members.iter().zip(entries) {
        let mut entry = zip.by_index(index).with_context(|| format!("cannot read {member} in {}", zip_path.display()))?;
        let staged = staging.join(member);
        let mut out = File::create(&staged).with_context(|| format!("cannot create {}", staged.display()))?;
        let written = io::copy(&mut entry, &mut out).with_context(|| {
            format!("extracting {member} from {} failed (a checksum error means the archive is damaged)", zip_path.display())
        })?;
        if written != entry.size() {
            bail!("{member} in {}: extracted {written} bytes, the archive says {}", zip_path.display(), entry.size());
        }
        out.sync_all().with_context(|| format!("cannot flush {}", staged.display()))?;
    }
    Ok(members)
}

/// Index of each wanted member in the archive. Every entry's path is checked first: an
/// archive with a path that would land outside the destination is refused whole, since it
/// is not what the authors published. `<dir>/<member>` is the published layout; a bare
/// `<member>` is accepted too, for mirrors that re-packed the files without the folder.
fn find_members<R: Read + io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    zip_path: &Path,
    dir_name: &str,
    members: &[String],
) -> anyhow::Result<Vec<usize>> {
    let mut found: Vec<Option<usize>> = vec![None; members.len()];
    for index in 0..zip.len() {
        let entry = zip.by_index(index).with_context(|| format!("cannot read entry {index} of {}", zip_path.display()))?;
        let Some(path) = entry.enclosed_name() else {
            bail!(
                "{} holds an entry named {:?}, which would be written outside the destination directory; \
                 refusing to unpack it",
                zip_path.display(),
                entry.name().unwrap_or_default()
            );
        };
        if entry.is_dir() {
            continue;
        }
        for (slot, member) in found.iter_mut().zip(members) {
            if path == Path::new(dir_name).join(member) || path == Path::new(member) {
                *slot = Some(index);
            }
        }
    }
    members
        .iter()
        .zip(found)
        .map(|(member, slot)| {
            slot.with_context(|| format!("{} has no {dir_name}/{member}; it is not the expected WikiText-103 archive", zip_path.display()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// One file: resumable, retried, verified

/// One file to fetch and what it must turn out to be.
struct Target<'a> {
    url: &'a str,
    dest: &'a Path,
    sha256: Option<&'a str>,
    /// Known size, which lets a wrong file be refused before it is downloaded.
    size: Option<u64>,
    /// How to put the file in place without this command, for the offline message.
    by_hand: &'a str,
}

/// When to try again.
#[derive(Clone, Debug)]
struct RetryPolicy {
    /// Retries after the first attempt.
    retries: u32,
    /// Delay before the first retry, doubled for each further one (then jittered).
    base_delay: Duration,
    /// Ceiling for the backoff and for a server's Retry-After.
    max_delay: Duration,
}

impl RetryPolicy {
    /// Wait before retry number `retry` (0-based). A server's Retry-After is honoured as
    /// given (up to the ceiling). Otherwise exponential, with the upper half jittered so
    /// that many ranks or users retrying at once do not arrive together.
    fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
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
struct Fetcher {
    client: Client,
    retry: RetryPolicy,
    progress: bool,
}

impl Fetcher {
    fn new(opts: &DownloadOptions) -> anyhow::Result<Fetcher> {
        let retry = RetryPolicy { retries: opts.retries, base_delay: Duration::from_secs(1), max_delay: Duration::from_secs(60) };
        Ok(Fetcher { client: build_client(opts.timeout, true)?, retry, progress: opts.progress })
    }

    /// Makes `target.dest` hold the verified file, downloading only what is missing.
    fn fetch(&self, target: &Target) -> anyhow::Result<()> {
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
fn build_client(timeout: Duration, use_system_proxy: bool) -> anyhow::Result<Client> {
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
fn part_path(dest: &Path) -> PathBuf {
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
fn sync_dir(dir: &Path) {
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

#[cfg(test)]
mod tests;

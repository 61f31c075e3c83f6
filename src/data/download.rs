//! `algpt2-ddp download`: fetches WikiText-103 (tokenized or raw), verifies it and unpacks
//! it, for machines with internet access.
//!
//! One file is streamed to `<dest>.part`, resumed with an HTTP Range request after an
//! interruption, retried with backoff on failures that may go away, checked against its
//! published sha256 and only then renamed to `<dest>`: a file under its final name is
//! always complete and verified. The archive is unpacked through a staging directory for
//! the same reason, so a run that was interrupted at any point is simply run again.
//! This file knows the dataset and unpacks it; `fetch` moves one file over HTTP.

use anyhow::{bail, Context};
use fetch::{sync_dir, Fetcher, Target};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;
use tracing::{info, warn};

mod fetch;

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

pub use fetch::DownloadError;

/// Fetches and unpacks one variant; returns the directory holding wiki.{train,valid,test}.*
pub fn download_wikitext103(variant: Wikitext103Variant, opts: &DownloadOptions) -> anyhow::Result<PathBuf> {
    let archive = Archive::published(variant);
    let fetcher = Fetcher::new(opts.retries, opts.timeout, opts.progress)?;
    fetch_and_unpack(&archive, opts, &fetcher)
        .with_context(|| format!("downloading WikiText-103 ({variant}) into {}", opts.dest_dir.display()))
}

/// One verified, resumable file download (used by the above; also tested directly).
pub fn download_file(url: &str, dest: &Path, expected_sha256: Option<&str>, opts: &DownloadOptions) -> anyhow::Result<()> {
    let by_hand = format!("place the file by hand at {}", dest.display());
    Fetcher::new(opts.retries, opts.timeout, opts.progress)?.fetch(&Target {
        url,
        dest,
        sha256: expected_sha256,
        size: None,
        by_hand: &by_hand,
    })
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

#[cfg(test)]
mod tests;

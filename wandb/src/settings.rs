//! Settings as W&B users know them: the config section's values, overridden by the
//! `WANDB_*` environment variables, the API key from `WANDB_API_KEY` or `~/.netrc`.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default server. The 0.31 SDK defaults to `https://api.forge.coreweave.com`, a
/// front for `api.wandb.ai`; older SDKs (and every `~/.netrc` that `wandb login` wrote
/// before 0.31) use `api.wandb.ai`, which remains the canonical address. Either works.
pub const DEFAULT_BASE_URL: &str = "https://api.wandb.ai";
/// The SDK's project when none is given.
pub const DEFAULT_PROJECT: &str = "uncategorized";
/// The Forge front; a netrc lookup for it falls back to `api.wandb.ai`, as the SDK does.
const FORGE_HOST: &str = "api.forge.coreweave.com";
const CLOUD_HOST: &str = "api.wandb.ai";

/// A W&B setting that can never work: a malformed `WANDB_BASE_URL` (unparseable, a port
/// out of range, another scheme), an unknown mode, a bad run id or project. It is refused
/// at once, before anything is sent or written, rather than retried as a network failure;
/// commands exit with the code for bad configuration. Its text never holds a password.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadSetting(String);

fn bad_setting(message: String) -> anyhow::Error {
    BadSetting(message).into()
}

/// Where rows go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stream to the server (rows are also spooled in the run directory).
    Online,
    /// Spool to the run directory only, for a later [`super::sync`].
    Offline,
    /// Nothing at all: no threads, no files, no requests.
    Disabled,
}

impl Mode {
    /// `online` (also the SDK's `run` and `shared`), `offline` (also `dryrun`), `disabled`.
    pub fn parse(text: &str) -> anyhow::Result<Mode> {
        match text.trim().to_ascii_lowercase().as_str() {
            "online" | "run" | "shared" => Ok(Mode::Online),
            "offline" | "dryrun" => Ok(Mode::Offline),
            "disabled" => Ok(Mode::Disabled),
            other => Err(bad_setting(format!("unknown W&B mode {other:?}: expected online, offline or disabled"))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Online => "online",
            Mode::Offline => "offline",
            Mode::Disabled => "disabled",
        }
    }
}

/// Timings and limits of the upload path. The defaults are the official client's (see
/// the protocol notes, §5.6 and §7); tests shorten them.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// At most one file_stream request per interval (the first goes out at once).
    pub transmit_interval: Duration,
    /// An empty file_stream request (`{}`) after this long without one.
    pub heartbeat_interval: Duration,
    /// Backoff: `min(max, min · 2^attempt · U[1, 1.25])`; `Retry-After` replaces it.
    pub retry_wait_min: Duration,
    pub retry_wait_max: Duration,
    /// Per-attempt limit of a GraphQL request (`WANDB_HTTP_TIMEOUT`).
    pub graphql_timeout: Duration,
    /// Per-attempt limit of a file_stream request.
    pub file_stream_timeout: Duration,
    /// Largest file_stream request, as the sum of its line lengths.
    pub max_request_bytes: usize,
    /// Longer history lines (or summaries) are not sent (they stay in the spool).
    pub max_line_bytes: usize,
    /// Rows waiting for the server are kept in memory up to these bounds; beyond them
    /// they wait in the spool file only and are read back from it.
    pub memory_rows: usize,
    pub memory_bytes: usize,
    /// Messages between `log()` and the background thread.
    pub channel_capacity: usize,
    /// `sync` gives up after this many failed attempts of one request in a row (a live
    /// run never does: it keeps its rows and retries until `finish`'s deadline).
    pub sync_max_retries: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            transmit_interval: Duration::from_secs(15),
            heartbeat_interval: Duration::from_secs(30),
            retry_wait_min: Duration::from_secs(2),
            retry_wait_max: Duration::from_secs(60),
            graphql_timeout: Duration::from_secs(30),
            file_stream_timeout: Duration::from_secs(180),
            max_request_bytes: 10 << 20,
            max_line_bytes: (10 << 20) - (100 << 10),
            memory_rows: 10_000,
            memory_bytes: 16 << 20,
            channel_capacity: 65_536,
            sync_max_retries: 20,
        }
    }
}

impl Tuning {
    /// The defaults, changed by the SDK's knobs where set: `WANDB_HTTP_TIMEOUT` and
    /// `WANDB_X_FILE_STREAM_{TRANSMIT_INTERVAL, RETRY_WAIT_MIN_SECONDS,
    /// RETRY_WAIT_MAX_SECONDS, TIMEOUT_SECONDS, MAX_BYTES, MAX_LINE_BYTES}` (also spelled
    /// `WANDB__FILE_STREAM_...`). Seconds may be fractional; `MAX_BYTES` can only raise
    /// the limit, as in the SDK.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Tuning {
        let mut t = Tuning::default();
        let knob = |name: &str| -> Option<f64> {
            let value = env(&format!("WANDB_X_FILE_STREAM_{name}")).or_else(|| env(&format!("WANDB__FILE_STREAM_{name}")))?;
            value.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0)
        };
        let secs = |v: f64| Duration::from_secs_f64(v);
        if let Some(v) = knob("TRANSMIT_INTERVAL") {
            t.transmit_interval = secs(v);
        }
        if let Some(v) = knob("RETRY_WAIT_MIN_SECONDS") {
            t.retry_wait_min = secs(v);
        }
        if let Some(v) = knob("RETRY_WAIT_MAX_SECONDS") {
            t.retry_wait_max = secs(v);
        }
        if let Some(v) = knob("TIMEOUT_SECONDS").filter(|v| *v > 0.0) {
            t.file_stream_timeout = secs(v);
        }
        if let Some(v) = knob("MAX_BYTES") {
            t.max_request_bytes = t.max_request_bytes.max(v as usize);
        }
        if let Some(v) = knob("MAX_LINE_BYTES").filter(|v| *v > 0.0) {
            t.max_line_bytes = v as usize;
        }
        if let Some(v) = env("WANDB_HTTP_TIMEOUT").and_then(|v| v.trim().parse::<f64>().ok()).filter(|v| v.is_finite() && *v > 0.0) {
            t.graphql_timeout = secs(v);
        }
        t
    }
}

/// Everything a [`super::Reporter`] needs. `Debug` never prints the API key.
#[derive(Clone)]
pub struct Settings {
    pub mode: Mode,
    /// Without a trailing `/`.
    pub base_url: String,
    pub api_key: Option<String>,
    /// User or team; `None` lets the server pick the key's default entity.
    pub entity: Option<String>,
    pub project: String,
    /// The run id (the URL slug); `None`: the checkpoint's, else a fresh one.
    pub run_id: Option<String>,
    /// Display name.
    pub name: Option<String>,
    pub group: Option<String>,
    pub tags: Vec<String>,
    /// The run directory: the spool is `<dir>/wandb/run-<id>/`.
    pub dir: PathBuf,
    /// How long `finish` may wait for the last uploads.
    pub flush_timeout: Duration,
    /// `WANDB_JOB_TYPE`.
    pub job_type: Option<String>,
    /// `WANDB_NOTES`.
    pub notes: Option<String>,
    /// `WANDB_USERNAME` / `WANDB_USER_EMAIL`: the `X-Wandb-Username` / `X-Wandb-User-Email`
    /// headers (service accounts).
    pub username: Option<String>,
    pub user_email: Option<String>,
    pub tuning: Tuning,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("mode", &self.mode)
            .field("base_url", &without_password(&self.base_url).0)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("entity", &self.entity)
            .field("project", &self.project)
            .field("run_id", &self.run_id)
            .field("name", &self.name)
            .field("group", &self.group)
            .field("tags", &self.tags)
            .field("dir", &self.dir)
            .field("flush_timeout", &self.flush_timeout)
            .field("job_type", &self.job_type)
            .field("notes", &self.notes)
            .field("tuning", &self.tuning)
            .finish()
    }
}

/// `finish` waits this long by default: short enough for a preemption's grace period.
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

impl Settings {
    /// From the config section's values, then the environment (env wins); `home` for ~/.netrc.
    ///
    /// `WANDB_MODE`, `WANDB_BASE_URL`, `WANDB_API_KEY` (else the netrc entry for the
    /// base URL's `host[:port]`), `WANDB_PROJECT`, `WANDB_ENTITY`, `WANDB_RUN_ID`,
    /// `WANDB_NAME`, `WANDB_RUN_GROUP`, `WANDB_TAGS` (comma-separated), `WANDB_DIR`,
    /// `WANDB_JOB_TYPE`, `WANDB_NOTES`, `WANDB_USERNAME`, `WANDB_USER_EMAIL`, and the
    /// tuning knobs of [`Tuning::from_env`]. Empty variables count as unset. A missing
    /// key is not an error here: [`super::Reporter::start`] warns and keeps rows locally.
    #[allow(clippy::too_many_arguments)]
    pub fn resolve(
        mode: &str,
        project: &str,
        entity: Option<&str>,
        name: Option<&str>,
        group: Option<&str>,
        tags: &[String],
        run_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        home: Option<&Path>,
    ) -> anyhow::Result<Settings> {
        let var = |key: &str| env(key).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let given = |v: Option<&str>| v.map(str::trim).filter(|v| !v.is_empty()).map(str::to_string);
        let mode = match var("WANDB_MODE") {
            Some(m) => Mode::parse(&m).context("WANDB_MODE")?,
            None => Mode::parse(mode).context("wandb.mode")?,
        };
        let base_url = match var("WANDB_BASE_URL") {
            Some(url) => normalize_base_url(&url, "WANDB_BASE_URL")?,
            None => DEFAULT_BASE_URL.to_string(),
        };
        let api_key = match var("WANDB_API_KEY") {
            Some(key) => Some(key),
            None => netrc_api_key(&base_url, env, home),
        };
        let run_id = var("WANDB_RUN_ID");
        if let Some(id) = &run_id {
            check_run_id(id).context("WANDB_RUN_ID")?;
        }
        let tags = match var("WANDB_TAGS") {
            Some(list) => split_tags(&list),
            None => tags.iter().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect(),
        };
        let project = var("WANDB_PROJECT").or_else(|| given(Some(project))).unwrap_or_else(|| DEFAULT_PROJECT.to_string());
        if project.contains('/') {
            return Err(bad_setting(format!("W&B project {project:?} must not contain '/'")));
        }
        Ok(Settings {
            mode,
            base_url,
            api_key,
            entity: var("WANDB_ENTITY").or_else(|| given(entity)),
            project,
            run_id,
            name: var("WANDB_NAME").or_else(|| given(name)),
            group: var("WANDB_RUN_GROUP").or_else(|| given(group)),
            tags,
            dir: var("WANDB_DIR").map(PathBuf::from).unwrap_or_else(|| run_dir.to_path_buf()),
            flush_timeout: DEFAULT_FLUSH_TIMEOUT,
            job_type: var("WANDB_JOB_TYPE"),
            notes: var("WANDB_NOTES"),
            username: var("WANDB_USERNAME"),
            user_email: var("WANDB_USER_EMAIL"),
            tuning: Tuning::from_env(env),
        })
    }
}

/// `"a, b,,c"` → `["a", "b", "c"]`.
pub(super) fn split_tags(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_string).collect()
}

/// Trims, drops trailing `/`, requires a well-formed `http(s)://host[:port][/path]`,
/// refuses `http://` to `*.wandb.ai` (as the SDK does: the key would travel in clear).
/// `from` names where the URL came from (`WANDB_BASE_URL`) for the error, a
/// [`BadSetting`], which shows the URL without its password.
pub(super) fn normalize_base_url(url: &str, from: &str) -> anyhow::Result<String> {
    let url = url.trim().trim_end_matches('/').to_string();
    let bad = |why: &str| bad_setting(format!("{from} {:?} {why}", without_password(&url).0));
    let expected = "expected http(s)://host[:port][/path]";
    let Some((scheme, _)) = url.split_once("://") else { return Err(bad(&format!("must start with https:// or http:// ({expected})"))) };
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "https" && scheme != "http" {
        return Err(bad(&format!("must start with https:// or http:// ({expected})")));
    }
    let host = host_of(&url);
    if host.is_empty() {
        return Err(bad(&format!("has no host ({expected})")));
    }
    // What every request would fail on (an unclosed `[`, a port past 65535, a space in
    // the host): refused now, not retried as a network failure until a timeout.
    if let Err(e) = reqwest::Url::parse(&url) {
        return Err(bad(&format!("is malformed: {e} ({expected})")));
    }
    if scheme == "http" && (host == "wandb.ai" || host.ends_with(".wandb.ai")) {
        return Err(bad("is refused: http:// to *.wandb.ai hosts would send the API key in clear, use https://"));
    }
    Ok(url)
}

/// The URL without the password of its user part (`http://user:pw@host` →
/// `http://user@host`), and whether there was one: what may be written to disk.
pub(super) fn without_password(url: &str) -> (String, bool) {
    let Some((scheme, rest)) = url.split_once("://") else { return (url.to_string(), false) };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (netloc, tail) = rest.split_at(end);
    match netloc.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            let at = if user.is_empty() { String::new() } else { format!("{user}@") };
            (format!("{scheme}://{at}{host}{tail}"), true)
        }
        _ => (url.to_string(), false),
    }
}

/// `https://user@Host:8080/path` → `Host:8080` (the netrc machine name the SDK uses).
pub(super) fn netloc_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let netloc = rest.split(['/', '?', '#']).next().unwrap_or("");
    netloc.rsplit_once('@').map_or(netloc, |(_, h)| h)
}

/// The host without port, lower-cased.
pub(super) fn host_of(url: &str) -> String {
    let netloc = netloc_of(url);
    let host = if let Some(rest) = netloc.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        netloc.split(':').next().unwrap_or("")
    };
    host.to_ascii_lowercase()
}

/// The password of the netrc entry for the base URL's `host[:port]` (for the Forge
/// front, then `api.wandb.ai`), else of a `default` entry. The file is `$NETRC`, else
/// `~/.netrc`, else `~/_netrc`. Unreadable files count as absent.
pub(super) fn netrc_api_key(base_url: &str, env: &dyn Fn(&str) -> Option<String>, home: Option<&Path>) -> Option<String> {
    let path = match env("NETRC").filter(|p| !p.trim().is_empty()) {
        Some(p) => PathBuf::from(p.trim()),
        None => {
            let home = home?;
            let dot = home.join(".netrc");
            if dot.exists() {
                dot
            } else {
                home.join("_netrc")
            }
        }
    };
    let text = std::fs::read_to_string(&path).ok()?;
    let mut machines = vec![netloc_of(base_url).to_string()];
    if host_of(base_url) == FORGE_HOST {
        machines.push(CLOUD_HOST.to_string());
    }
    netrc_password(&text, &machines)
}

/// The password of the first of `machines` found in a netrc text, else of `default`.
pub(super) fn netrc_password(text: &str, machines: &[String]) -> Option<String> {
    // (machine or None for `default`, password)
    let mut entries: Vec<(Option<String>, Option<String>)> = Vec::new();
    let mut in_macdef = false;
    let mut expect: Option<&str> = None;
    for line in text.lines() {
        if in_macdef {
            if line.trim().is_empty() {
                in_macdef = false;
            }
            continue;
        }
        for token in line.split_whitespace() {
            if let Some(what) = expect.take() {
                match what {
                    "machine" => entries.push((Some(token.to_string()), None)),
                    "password" => {
                        if let Some(e) = entries.last_mut() {
                            e.1 = Some(token.to_string());
                        }
                    }
                    _ => {}
                }
                continue;
            }
            match token {
                "machine" | "login" | "password" | "account" => expect = Some(token),
                "default" => entries.push((None, None)),
                "macdef" => {
                    in_macdef = true;
                    break;
                }
                t if t.starts_with('#') => break,
                _ => {}
            }
        }
    }
    for wanted in machines {
        if let Some((_, Some(pw))) = entries.iter().find(|(m, _)| m.as_deref() == Some(wanted.as_str())) {
            return Some(pw.clone());
        }
    }
    entries.iter().find(|(m, _)| m.is_none()).and_then(|(_, pw)| pw.clone())
}

/// The SDK's check (`wbauth/validation.py`): an optional on-prem prefix ending in `-`,
/// then at least 40 characters of `[A-Za-z0-9_-]`; or a JWT-shaped `a.b.c`.
pub fn api_key_looks_valid(key: &str) -> bool {
    let key_chars = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if key.len() >= 40 && key_chars(key) {
        return true;
    }
    let prefixed = key.match_indices('-').any(|(i, _)| {
        let (prefix, rest) = (&key[..i], &key[i + 1..]);
        !prefix.is_empty() && !prefix.chars().any(char::is_whitespace) && rest.len() >= 40 && key_chars(rest)
    });
    if prefixed {
        return true;
    }
    let parts: Vec<&str> = key.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "_-=".contains(c)))
}

/// A run id goes into URLs and a directory name: 1 to 128 of `[A-Za-z0-9_.-]`, not `.`/`..`.
pub(super) fn check_run_id(id: &str) -> anyhow::Result<()> {
    let ok =
        !id.is_empty() && id.len() <= 128 && id != "." && id != ".." && id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !ok {
        return Err(bad_setting(format!("W&B run id {id:?}: use 1 to 128 letters, digits, '_', '.' or '-'")));
    }
    Ok(())
}

/// A random u64 from the standard library's per-process random keys and the clock.
pub(super) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    h.write_u128(nanos);
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.finish()
}

/// 8 characters of `[a-z0-9]`, like the SDK's run ids.
pub fn generate_run_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..8).map(|_| ALPHABET[(random_u64() % ALPHABET.len() as u64) as usize] as char).collect()
}

//! HTTP: the two GraphQL operations a run needs, file_stream, and how a failed request
//! is classified (retry, wrong key, or a permanent refusal) and backed off.

use serde_json::{json, Map, Value};
use std::io::Read;
use std::time::{Duration, SystemTime};

/// Sent on every request.
pub(super) const USER_AGENT: &str = concat!("algpt2-ddp-wandb/", env!("CARGO_PKG_VERSION"));

/// The longest answer read from the server, GraphQL and file_stream alike; a longer one
/// (a proxy's page, a broken server) is a failed request, retried, and is read no further
/// than one byte past this. Real answers are far smaller: file_stream answers
/// `{"exitcode": null, "limits": {}}`, and the largest, RunResumeStatus, holds a summary
/// and a few history lines, each at most the line limit (10 MiB − 100 KiB, which our
/// uploads and the official client's keep to) and in practice a few KB. 16 MiB leaves a
/// whole line-limit summary room for its JSON-in-JSON escaping, and is what an answer can
/// cost rank 0's memory.
pub(super) const MAX_ANSWER_BYTES: u64 = 16 << 20;

/// The official client's text (protocol notes §4.2).
pub(super) const UPSERT_BUCKET: &str = "mutation UpsertBucket($id: String, $name: String, $project: String, $entity: String, \
$groupName: String, $description: String, $displayName: String, $notes: String, $commit: String, $config: JSONString, \
$host: String, $debug: Boolean, $program: String, $repo: String, $jobType: String, $state: String, $sweep: String, \
$tags: [String!], $summaryMetrics: JSONString) {
  upsertBucket(input: {id: $id, name: $name, groupName: $groupName, modelName: $project, entityName: $entity, \
description: $description, displayName: $displayName, notes: $notes, config: $config, commit: $commit, host: $host, \
debug: $debug, jobProgram: $program, jobRepo: $repo, jobType: $jobType, state: $state, sweep: $sweep, tags: $tags, \
summaryMetrics: $summaryMetrics}) {
    bucket { id name displayName description config sweepName project { id name entity { id name } } historyLineCount }
    inserted
  }
}";

/// The official client's text (protocol notes §4.1).
pub(super) const RUN_RESUME_STATUS: &str = "query RunResumeStatus($project: String, $entity: String, $name: String!) {
  model(name: $project, entityName: $entity) {
    id name entity { id name }
    bucket(name: $name, missingOk: true) {
      id name summaryMetrics displayName logLineCount historyLineCount
      eventsLineCount historyTail eventsTail config tags notes
      wandbConfig(keys: [\"t\"])
    }
  }
}";

/// The official client's text (protocol notes §4.3).
pub(super) const CREATE_RUN_FILES: &str =
    "mutation CreateRunFiles($entity: String!, $project: String!, $run: String!, $files: [String!]!) {
  createRunFiles(input: {entityName: $entity, projectName: $project, runName: $run, files: $files}) {
    runID uploadHeaders files { name uploadUrl }
  }
}";

/// Which call failed: UpsertBucket retries 409, the others do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Upsert,
    ResumeStatus,
    FileStream,
    CreateRunFiles,
    /// A PUT of a run file to its signed URL.
    Upload,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Upsert => "UpsertBucket",
            Op::ResumeStatus => "RunResumeStatus",
            Op::FileStream => "file_stream",
            Op::CreateRunFiles => "CreateRunFiles",
            Op::Upload => "upload",
        }
    }
}

/// Why a request did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum Failure {
    /// Worth retrying: connection errors, timeouts, 429, 5xx (but 501), other 4xx not below.
    #[error("{why}")]
    Transient { why: String, retry_after: Option<Duration> },
    /// 401/403: the key is wrong; retrying will not help.
    #[error("HTTP {status}: the API key was refused")]
    Auth { status: u16 },
    /// 400, 404, 409 (but for UpsertBucket), 410, 413, 422, 501, a redirect, GraphQL errors.
    #[error("HTTP {status}: {why}")]
    Permanent { status: u16, why: String },
}

/// What a status means for `op` (protocol notes §7).
pub(super) fn classify(status: u16, op: Op) -> Option<Failure> {
    match status {
        200..=299 => None,
        401 | 403 => Some(Failure::Auth { status }),
        409 if op == Op::Upsert => Some(Failure::Transient { why: format!("HTTP {status}"), retry_after: None }),
        300..=399 | 400 | 404 | 409 | 410 | 413 | 422 | 501 => Some(Failure::Permanent { status, why: reason(status).to_string() }),
        _ => Some(Failure::Transient { why: format!("HTTP {status}"), retry_after: None }),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        300..=399 => "redirected (set WANDB_BASE_URL to the final address)",
        400 => "bad request",
        404 => "not found",
        409 => "conflict",
        410 => "gone",
        413 => "request too large",
        422 => "unprocessable",
        501 => "not implemented",
        _ => "refused",
    }
}

/// `min(max, min · 2^attempt · U[1, 1.25])`, attempt counting from 0.
pub(super) fn backoff(attempt: u32, min: Duration, max: Duration, unit_random: f64) -> Duration {
    let factor = 2f64.powi(attempt.min(40) as i32) * (1.0 + 0.25 * unit_random.clamp(0.0, 1.0));
    Duration::from_secs_f64((min.as_secs_f64() * factor).min(max.as_secs_f64()))
}

/// A `Retry-After` value: seconds (fractional allowed) or an HTTP date.
pub(super) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = parse_http_date(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 1123, the only form servers send today).
pub(super) fn parse_http_date(text: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [_, day, month, year, time, zone] = parts.as_slice() else { return None };
    if *zone != "GMT" && *zone != "UTC" {
        return None;
    }
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month = MONTHS.iter().position(|m| m.eq_ignore_ascii_case(month))? as i64 + 1;
    let (day, year): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let hms: Vec<i64> = time.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let [h, m, s] = hms.as_slice() else { return None };
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + m * 60 + s;
    (secs >= 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64))
}

/// Percent-encodes one URL path segment.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One authenticated connection to one server.
pub(super) struct Api {
    client: reqwest::blocking::Client,
    base_url: String,
    api_key: String,
    username: String,
    user_email: String,
}

impl Api {
    pub fn new(
        base_url: &str,
        api_key: &str,
        username: Option<&str>,
        user_email: Option<&str>,
        connect_timeout: Duration,
    ) -> anyhow::Result<Api> {
        let client = reqwest::blocking::Client::builder()
            .user_agent(USER_AGENT)
            // Credentials go to the base URL only: never follow a redirect with them.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        Ok(Api {
            client,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
            username: username.unwrap_or("").to_string(),
            user_email: user_email.unwrap_or("").to_string(),
        })
    }

    /// POSTs a JSON body; returns the 2xx response body as JSON (`Null` when it is not).
    fn post(&self, url: &str, body: Vec<u8>, timeout: Duration, op: Op) -> Result<Value, Failure> {
        let mut request = self
            .client
            .post(url)
            .timeout(timeout)
            .basic_auth("api", Some(&self.api_key))
            .header("Content-Type", "application/json")
            .body(body);
        if op != Op::FileStream {
            request = request.header("X-Wandb-Username", &self.username).header("X-Wandb-User-Email", &self.user_email);
        }
        let response = request.send().map_err(|e| Failure::Transient { why: describe(&e), retry_after: None })?;
        let status = response.status().as_u16();
        let retry_after =
            response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| parse_retry_after(v, SystemTime::now()));
        match classify(status, op) {
            None => {}
            Some(Failure::Transient { why, .. }) => return Err(Failure::Transient { why, retry_after }),
            Some(other) => return Err(other),
        }
        let bytes = read_bounded(response, MAX_ANSWER_BYTES)?;
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// One GraphQL operation; `Ok` is the `data` object. A response with `errors` is a
    /// permanent failure; one that is not JSON at all (a proxy page) is retried.
    pub fn graphql(&self, op: Op, query: &str, variables: Value, timeout: Duration) -> Result<Value, Failure> {
        let body = json!({"query": query, "variables": variables, "operationName": op.name()});
        let url = format!("{}/graphql", self.base_url);
        let response = self.post(&url, serde_json::to_vec(&body).expect("JSON values serialize"), timeout, op)?;
        if let Some(errors) = response.get("errors").and_then(Value::as_array).filter(|e| !e.is_empty()) {
            let message = errors[0].get("message").and_then(Value::as_str).unwrap_or("GraphQL error").to_string();
            return Err(Failure::Permanent { status: 200, why: message });
        }
        match response.get("data") {
            Some(data) if data.is_object() => Ok(data.clone()),
            _ => Err(Failure::Transient { why: format!("{}: response without data", op.name()), retry_after: None }),
        }
    }

    /// PUTs a run file to a signed URL from CreateRunFiles. Such a URL carries its own
    /// authorization (and may point at another host): the API key is never sent with it.
    /// Only the status counts: the answer's body is never read.
    pub fn upload(&self, url: &str, headers: &[(String, String)], bytes: Vec<u8>, timeout: Duration) -> Result<Value, Failure> {
        let mut request = self.client.put(url).timeout(timeout).body(bytes);
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let response = request.send().map_err(|e| Failure::Transient { why: describe(&e), retry_after: None })?;
        let status = response.status().as_u16();
        let retry_after =
            response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| parse_retry_after(v, SystemTime::now()));
        match classify(status, Op::Upload) {
            None => Ok(Value::Null),
            Some(Failure::Transient { why, .. }) => Err(Failure::Transient { why, retry_after }),
            // A signed URL that refuses is expired or wrong: retrying it will not help.
            Some(Failure::Auth { status }) => Err(Failure::Permanent { status, why: "the upload URL was refused".to_string() }),
            Some(other) => Err(other),
        }
    }

    /// One file_stream request (`body` is already JSON).
    pub fn file_stream(&self, entity: &str, project: &str, run: &str, body: Vec<u8>, timeout: Duration) -> Result<Value, Failure> {
        let url = format!("{}/files/{}/{}/{}/file_stream", self.base_url, path_segment(entity), path_segment(project), path_segment(run));
        self.post(&url, body, timeout, Op::FileStream)
    }
}

/// The body of an answer, if it is at most `limit` bytes; a longer one is a transient
/// failure, found from its `Content-Length` without reading it, else after reading
/// `limit + 1` bytes of it (a chunked answer says no length). What is left unread is
/// dropped with the connection.
fn read_bounded(response: reqwest::blocking::Response, limit: u64) -> Result<Vec<u8>, Failure> {
    let too_long = || Failure::Transient { why: format!("an answer over {} MiB, the most read", limit >> 20), retry_after: None };
    let declared = response.content_length();
    if declared.is_some_and(|n| n > limit) {
        return Err(too_long());
    }
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0) as usize);
    response
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Failure::Transient { why: format!("connection error: reading the answer: {e}"), retry_after: None })?;
    if bytes.len() as u64 > limit {
        return Err(too_long());
    }
    Ok(bytes)
}

fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "connection error"
    };
    let mut text = format!("{kind}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// What RunResumeStatus says about an existing run.
#[derive(Debug, Clone, Default)]
pub(super) struct Existing {
    /// `bucket.id`, sent back as `id` in UpsertBucket.
    pub storage_id: Option<String>,
    pub history_lines: u64,
    /// `eventsLineCount`, `logLineCount`: where events and console lines continue.
    pub events_lines: u64,
    pub log_lines: u64,
    /// The last `_step` the server holds (from `summaryMetrics` and `historyTail`).
    pub last_step: Option<u64>,
    pub summary: Map<String, Value>,
    /// `{key: {"value": v}}`.
    pub config: Map<String, Value>,
    /// The SDK's resume check: `wandbConfig` holds `"t"`.
    pub started: bool,
}

fn step_of(v: &Value) -> Option<u64> {
    match v.get("_step")? {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        _ => None,
    }
}

fn json_object(s: Option<&Value>) -> Map<String, Value> {
    let parsed = match s {
        Some(Value::String(text)) => serde_json::from_str(text).ok(),
        Some(Value::Object(m)) => Some(Value::Object(m.clone())),
        _ => None,
    };
    match parsed {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// `None` when the run does not exist (no project, or `bucket: null`).
pub(super) fn parse_resume_status(data: &Value) -> Option<Existing> {
    let bucket = data.get("model")?.get("bucket")?;
    if !bucket.is_object() {
        return None;
    }
    let history_lines = bucket.get("historyLineCount").and_then(Value::as_u64).unwrap_or(0);
    let summary = json_object(bucket.get("summaryMetrics"));
    let tail: Vec<String> = match bucket.get("historyTail") {
        Some(Value::String(text)) => serde_json::from_str(text).unwrap_or_default(),
        _ => Vec::new(),
    };
    let tail_step = tail.iter().filter_map(|line| serde_json::from_str::<Value>(line).ok()).filter_map(|v| step_of(&v)).max();
    let summary_step = step_of(&Value::Object(summary.clone()));
    let last_step = if history_lines > 0 { tail_step.max(summary_step) } else { None };
    Some(Existing {
        storage_id: bucket.get("id").and_then(Value::as_str).map(str::to_string),
        history_lines,
        events_lines: bucket.get("eventsLineCount").and_then(Value::as_u64).unwrap_or(0),
        log_lines: bucket.get("logLineCount").and_then(Value::as_u64).unwrap_or(0),
        last_step,
        summary,
        config: json_object(bucket.get("config")),
        started: json_object(bucket.get("wandbConfig")).contains_key("t"),
    })
}

/// The config as UpsertBucket wants it: a JSON string of `{key: {"value": v}}`, the old
/// run's keys under the new ones, with the `_wandb` entry the SDK's resume check needs.
pub(super) fn upsert_config(config: &Value, old: &Map<String, Value>) -> String {
    let mut out = old.clone();
    match config {
        Value::Object(map) => {
            for (k, v) in map {
                if k != "_wandb" {
                    out.insert(k.clone(), json!({ "value": v }));
                }
            }
        }
        Value::Null => {}
        other => {
            out.insert("config".to_string(), json!({ "value": other }));
        }
    }
    let entry = out.entry("_wandb".to_string()).or_insert_with(|| json!({ "value": {} }));
    if !entry.get("value").is_some_and(Value::is_object) {
        *entry = json!({ "value": {} });
    }
    let value = entry.get_mut("value").and_then(Value::as_object_mut).expect("made an object above");
    // Telemetry keyed by proto field number: 13 is the platform. Its presence is what
    // makes the official SDK treat the run as started (resumable).
    value.entry("t").or_insert_with(|| json!({ "13": format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH) }));
    value.entry("m").or_insert_with(|| json!([]));
    Value::Object(out).to_string()
}

/// Where CreateRunFiles says to PUT each file, with the headers to add.
#[derive(Debug, Clone, Default)]
pub(super) struct UploadUrls {
    pub files: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
}

pub(super) fn parse_create_run_files(data: &Value) -> UploadUrls {
    let Some(answer) = data.get("createRunFiles") else { return UploadUrls::default() };
    let files = answer
        .get("files")
        .and_then(Value::as_array)
        .map(|files| {
            files.iter().filter_map(|f| Some((f.get("name")?.as_str()?.to_string(), f.get("uploadUrl")?.as_str()?.to_string()))).collect()
        })
        .unwrap_or_default();
    // `uploadHeaders` are "Name:Value" strings.
    let headers = answer
        .get("uploadHeaders")
        .and_then(Value::as_array)
        .map(|hs| {
            hs.iter()
                .filter_map(Value::as_str)
                .filter_map(|h| h.split_once(':'))
                .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
                .collect()
        })
        .unwrap_or_default();
    UploadUrls { files, headers }
}

/// `config` (an upsert config string) with the run's metadata under `_wandb.e.<writerId>`,
/// where the official client puts it for the Overview tab. It replaces an earlier
/// writer's entry, as the official client's resume does.
pub(super) fn with_metadata(config: &str, metadata: &Value) -> String {
    let (Ok(Value::Object(mut out)), Some(writer)) =
        (serde_json::from_str::<Value>(config), metadata.get("writerId").and_then(Value::as_str))
    else {
        return config.to_string();
    };
    if let Some(value) = out.get_mut("_wandb").and_then(|w| w.get_mut("value")).and_then(Value::as_object_mut) {
        value.insert("e".to_string(), json!({ writer: metadata }));
    }
    Value::Object(out).to_string()
}

/// What UpsertBucket answered.
#[derive(Debug, Clone)]
pub(super) struct Upserted {
    pub storage_id: Option<String>,
    pub name: Option<String>,
    pub project: Option<String>,
    pub entity: Option<String>,
    pub history_lines: u64,
}

pub(super) fn parse_upsert(data: &Value) -> Upserted {
    let bucket = data.pointer("/upsertBucket/bucket").cloned().unwrap_or(Value::Null);
    let text = |p: &str| bucket.pointer(p).and_then(Value::as_str).map(str::to_string);
    Upserted {
        storage_id: text("/id"),
        name: text("/name"),
        project: text("/project/name"),
        entity: text("/project/entity/name"),
        history_lines: bucket.get("historyLineCount").and_then(Value::as_u64).unwrap_or(0),
    }
}

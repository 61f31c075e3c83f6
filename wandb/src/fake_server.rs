//! A loopback fake W&B server for tests: HTTP/1.1 on 127.0.0.1, a thread per
//! connection, keep-alive. It records every request, emulates the run protocol (runs,
//! history offsets, summary, completion) and checks it: an offset past the end, or a
//! line rewritten with different content, is recorded in `errors`. Faults can be queued
//! for the next matching requests or set for all of them. A user pressing Stop in the W&B
//! interface can be played ([`FakeServer::press_stop_at`]). It accepts connections until
//! it is dropped, however long the test takes (a test on a loaded machine can take
//! minutes between two requests), and stops answering after `MAX_REQUESTS`.

use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MAX_REQUESTS: usize = 20_000;
pub const DEFAULT_ENTITY: &str = "fake-entity";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Graphql,
    FileStream,
    /// PUTs to the upload URLs CreateRunFiles hands out.
    Upload,
    Any,
}

#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status (and `Retry-After`), changing nothing.
    Status(u16, Option<&'static str>),
    /// Apply the request, answer only after this long (the client may have given up).
    SlowReply(Duration),
    /// Wait this long, then close without applying or answering.
    Hang(Duration),
    /// Close the connection at once, without applying.
    DropBefore,
    /// Apply, then close without answering.
    DropAfter,
    /// Answer 200 with a JSON object of this many bytes, made as it is sent (the server
    /// never holds it), changing nothing: with its `Content-Length`, or chunked with no
    /// length, as a proxy streams. The client may read part of it and hang up.
    HugeReply { bytes: u64, chunked: bool },
}

/// How long a Stop pressed in the interface keeps being answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopHolds {
    /// Until the run is marked finished: a resumed run is not stopped.
    UntilFinished,
    /// For good, a resumed run included (as servers did in wandb/wandb#663).
    Forever,
}

#[derive(Clone, Debug)]
pub struct Request {
    pub at: Instant,
    pub method: String,
    pub path: String,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Value,
    /// GraphQL `operationName`, `file_stream`, or the path.
    pub op: String,
    pub fault: Option<String>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Debug, Default)]
pub struct FakeRun {
    pub storage_id: String,
    pub entity: String,
    pub project: String,
    pub name: String,
    pub display_name: Option<String>,
    pub group: Option<String>,
    pub tags: Vec<String>,
    pub config: String,
    pub history: Vec<String>,
    /// `wandb-events.jsonl` (system metrics) and `output.log` (console), line by line.
    pub events: Vec<String>,
    pub logs: Vec<String>,
    pub summary: Option<String>,
    /// Every name a file_stream request listed in `uploaded`, in order.
    pub uploaded: Vec<String>,
    pub complete: bool,
    pub exit_code: Option<i64>,
    pub upserts: usize,
    /// Its file_stream answers say `stopped: true` (see [`FakeServer::press_stop_at`]).
    pub stopped: Option<StopHolds>,
    /// The last step the run's history held when the first `stopped` answer went out.
    pub stop_answered_at_step: Option<u64>,
    /// When that answer went out, in seconds since the epoch (as rows' `_timestamp`).
    pub stop_answered_epoch: Option<f64>,
}

#[derive(Default)]
pub struct State {
    pub requests: Vec<Request>,
    faults: VecDeque<(Target, Fault)>,
    always: Option<(Target, Fault)>,
    good_key: Option<String>,
    pub runs: HashMap<String, FakeRun>,
    pub errors: Vec<String>,
    next_id: u64,
    /// This server's base URL, for the upload URLs CreateRunFiles hands out.
    base_url: String,
    /// Files PUT to those URLs: (run name, file name, bytes), in order.
    pub uploaded_files: Vec<(String, String, Vec<u8>)>,
    /// The Stop still to be pressed: at this step, held this long.
    stop_at: Option<(u64, StopHolds)>,
}

pub struct FakeServer {
    pub url: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl FakeServer {
    pub fn start() -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let url = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(State { base_url: url.clone(), ..State::default() }));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                // Until the server is dropped, and no longer: the listener closes when
                // this loop ends, and a client then gets "Connection refused". (It once
                // ended after a fixed 120 s; a test on a loaded machine outlived that.)
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            // Blocking, whatever the platform passes on from the listener.
                            let _ = stream.set_nonblocking(false);
                            let (state, stop) = (state.clone(), stop.clone());
                            // A thread that cannot start (a crowded machine) loses this
                            // connection, which the client retries, not the listener:
                            // `thread::spawn` would panic and end this loop.
                            let _ = std::thread::Builder::new().spawn(move || serve(stream, state, stop));
                        }
                        // WouldBlock (nothing pending), or a failed accept (a connection
                        // reset before it was taken, out of file descriptors): the listener
                        // stays open and the next try may succeed.
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        FakeServer { url, state, stop, accept: Some(accept) }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next request matching `target` gets `fault` (queued in order).
    pub fn fail_next(&self, target: Target, fault: Fault) {
        self.state().faults.push_back((target, fault));
    }

    /// Every request matching `target` gets `fault` (after queued ones), until cleared.
    pub fn set_always(&self, fault: Option<(Target, Fault)>) {
        self.state().always = fault;
    }

    /// The user presses Stop once a run's history holds a row at `step` or later: the
    /// answer to the request that brought that row, and every file_stream answer of that
    /// run after it, says `stopped: true`, for as long as `holds` says. Pressed once.
    pub fn press_stop_at(&self, step: u64, holds: StopHolds) {
        self.state().stop_at = Some((step, holds));
    }

    /// Requests without this key get 401.
    pub fn require_key(&self, key: &str) {
        self.state().good_key = Some(key.to_string());
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state().requests.clone()
    }

    pub fn ops(&self, op: &str) -> Vec<Request> {
        self.requests().into_iter().filter(|r| r.op == op).collect()
    }

    pub fn run(&self, name: &str) -> Option<FakeRun> {
        self.state().runs.get(name).cloned()
    }

    pub fn steps(&self, name: &str) -> Vec<u64> {
        self.run(name)
            .map(|r| r.history.iter().map(|l| serde_json::from_str::<Value>(l).unwrap()["_step"].as_u64().unwrap()).collect())
            .unwrap_or_default()
    }

    pub fn errors(&self) -> Vec<String> {
        self.state().errors.clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

struct Raw {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Raw> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    assert!(!headers.iter().any(|(n, _)| n == "transfer-encoding"), "the fake server reads Content-Length bodies only");
    let len: usize = headers.iter().find(|(n, _)| n == "content-length").map_or(0, |(_, v)| v.parse().unwrap_or(0));
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    Some(Raw { method, path, headers, body })
}

fn respond(stream: &mut TcpStream, status: u16, body: &Value, retry_after: Option<&str>) {
    let text = body.to_string();
    let extra = retry_after.map_or(String::new(), |r| format!("Retry-After: {r}\r\n"));
    let head = format!("HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n", text.len());
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(text.as_bytes());
    let _ = stream.flush();
}

/// `{"pad":"xxx…"}` of `bytes` bytes (at least 10), made 64 KiB at a time.
fn respond_huge(stream: &mut TcpStream, bytes: u64, chunked: bool) -> std::io::Result<()> {
    // A client that stops reading without closing must not hold this thread for ever.
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let (head, tail) = (b"{\"pad\":\"", b"\"}");
    let bytes = bytes.max((head.len() + tail.len()) as u64);
    let length = if chunked { "Transfer-Encoding: chunked".to_string() } else { format!("Content-Length: {bytes}") };
    // Whole chunks per write: small writes would wait on delayed ACKs.
    let mut out = std::io::BufWriter::with_capacity(256 << 10, &mut *stream);
    out.write_all(format!("HTTP/1.1 200 X\r\nContent-Type: application/json\r\n{length}\r\n\r\n").as_bytes())?;
    let mut send = |part: &[u8]| -> std::io::Result<()> {
        if chunked {
            out.write_all(format!("{:x}\r\n", part.len()).as_bytes())?;
            out.write_all(part)?;
            out.write_all(b"\r\n")
        } else {
            out.write_all(part)
        }
    };
    let pad = vec![b'x'; 64 << 10];
    let mut pad_left = bytes - (head.len() + tail.len()) as u64;
    send(head)?;
    while pad_left > 0 {
        let n = pad_left.min(pad.len() as u64) as usize;
        send(&pad[..n])?;
        pad_left -= n as u64;
    }
    send(tail)?;
    if chunked {
        out.write_all(b"0\r\n\r\n")?;
    }
    out.flush()
}

fn serve(stream: TcpStream, state: Arc<Mutex<State>>, stop: Arc<AtomicBool>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    while let Some(raw) = read_request(&mut reader) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let body: Value = serde_json::from_slice(&raw.body).unwrap_or(Value::Null);
        let kind = if raw.path == "/graphql" {
            Target::Graphql
        } else if raw.path.ends_with("/file_stream") {
            Target::FileStream
        } else if raw.method == "PUT" && raw.path.starts_with("/upload/") {
            Target::Upload
        } else {
            Target::Any
        };
        let op = match kind {
            Target::Graphql => body["operationName"].as_str().unwrap_or("?").to_string(),
            Target::FileStream => "file_stream".to_string(),
            Target::Upload | Target::Any => raw.path.clone(),
        };
        let fault = {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            if s.requests.len() >= MAX_REQUESTS {
                return;
            }
            let matches = |t: Target| t == Target::Any || t == kind;
            let fault = match s.faults.iter().position(|(t, _)| matches(*t)) {
                Some(i) => s.faults.remove(i).map(|(_, f)| f),
                None => s.always.clone().filter(|(t, _)| matches(*t)).map(|(_, f)| f),
            };
            s.requests.push(Request {
                at: Instant::now(),
                method: raw.method.clone(),
                path: raw.path.clone(),
                headers: raw.headers.clone(),
                body: body.clone(),
                op,
                fault: fault.as_ref().map(|f| format!("{f:?}")),
            });
            fault
        };
        let apply = || {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            s.handle(&raw, &body)
        };
        match fault {
            Some(Fault::Status(code, retry_after)) => respond(&mut writer, code, &json!({"error": "injected"}), retry_after),
            Some(Fault::Hang(d)) => {
                std::thread::sleep(d);
                return;
            }
            Some(Fault::DropBefore) => return,
            Some(Fault::DropAfter) => {
                apply();
                return;
            }
            Some(Fault::HugeReply { bytes, chunked }) => {
                if respond_huge(&mut writer, bytes, chunked).is_err() {
                    // The client hung up part way.
                    return;
                }
            }
            Some(Fault::SlowReply(d)) => {
                let (status, reply) = apply();
                std::thread::sleep(d);
                respond(&mut writer, status, &reply, None);
            }
            None => {
                let (status, reply) = apply();
                respond(&mut writer, status, &reply, None);
            }
        }
    }
}

impl State {
    fn handle(&mut self, raw: &Raw, body: &Value) -> (u16, Value) {
        // Signed upload URLs carry no credentials (the official client's run files).
        if raw.method == "PUT" {
            if let ["upload", run, file] = raw.path.trim_start_matches('/').split('/').collect::<Vec<_>>().as_slice() {
                self.uploaded_files.push((run.to_string(), file.to_string(), raw.body.clone()));
                return (200, json!({}));
            }
        }
        if let Some(key) = &self.good_key {
            let expected = format!("Basic {}", base64(format!("api:{key}").as_bytes()));
            let given = raw.headers.iter().find(|(n, _)| n == "authorization").map(|(_, v)| v.as_str());
            if given != Some(expected.as_str()) {
                return (401, json!({"error": "unauthorized"}));
            }
        }
        if raw.method != "POST" {
            return (405, json!({}));
        }
        if raw.path == "/graphql" {
            return self.graphql(body);
        }
        let parts: Vec<&str> = raw.path.trim_start_matches('/').split('/').collect();
        if let ["files", _entity, _project, run, "file_stream"] = parts.as_slice() {
            return self.file_stream(run, body);
        }
        (404, json!({"error": "no such endpoint"}))
    }

    fn graphql(&mut self, body: &Value) -> (u16, Value) {
        let vars = &body["variables"];
        let text = |k: &str| vars[k].as_str().map(str::to_string);
        match body["operationName"].as_str() {
            Some("UpsertBucket") => {
                let name = text("name").expect("the client always names its run");
                let project = text("project").unwrap_or_else(|| "uncategorized".into());
                let entity = text("entity").unwrap_or_else(|| DEFAULT_ENTITY.into());
                self.next_id += 1;
                let fresh_id = format!("UnVuOnYx{}", self.next_id);
                let inserted = !self.runs.contains_key(&name);
                let mut errors = Vec::new();
                let run = self.runs.entry(name.clone()).or_insert_with(|| FakeRun {
                    storage_id: fresh_id,
                    entity: entity.clone(),
                    project: project.clone(),
                    name: name.clone(),
                    ..FakeRun::default()
                });
                if let Some(id) = text("id") {
                    if id != run.storage_id {
                        errors.push(format!("UpsertBucket id {id} is not {}", run.storage_id));
                    }
                }
                if let Some(v) = text("displayName") {
                    run.display_name = Some(v);
                }
                if let Some(v) = text("groupName") {
                    run.group = Some(v);
                }
                if let Some(tags) = vars["tags"].as_array() {
                    run.tags = tags.iter().filter_map(|t| t.as_str().map(str::to_string)).collect();
                }
                if let Some(c) = text("config") {
                    run.config = c;
                }
                run.upserts += 1;
                let reply = json!({"data": {"upsertBucket": {"bucket": {
                    "id": run.storage_id, "name": run.name, "displayName": run.display_name, "description": null,
                    "config": run.config, "sweepName": null,
                    "project": {"id": "UHJvamVjdDox", "name": run.project, "entity": {"id": "RW50aXR5OjE=", "name": run.entity}},
                    "historyLineCount": run.history.len(),
                }, "inserted": inserted}}});
                self.errors.extend(errors);
                (200, reply)
            }
            Some("RunResumeStatus") => {
                let name = text("name").unwrap_or_default();
                let project = text("project").unwrap_or_else(|| "uncategorized".into());
                let entity = text("entity").unwrap_or_else(|| DEFAULT_ENTITY.into());
                let bucket = self.runs.get(&name).filter(|r| r.project == project).map(|r| {
                    let tail: Vec<&String> = r.history.iter().rev().take(10).rev().collect();
                    let events_tail: Vec<&String> = r.events.iter().rev().take(10).rev().collect();
                    let config: Value = serde_json::from_str(&r.config).unwrap_or(json!({}));
                    let t = config.pointer("/_wandb/value/t").cloned();
                    json!({
                        "id": r.storage_id, "name": r.name, "displayName": r.display_name,
                        "summaryMetrics": r.summary.clone().unwrap_or_else(|| "{}".into()),
                        "logLineCount": r.logs.len(), "historyLineCount": r.history.len(), "eventsLineCount": r.events.len(),
                        "historyTail": serde_json::to_string(&tail).unwrap(), "eventsTail": serde_json::to_string(&events_tail).unwrap(),
                        "config": r.config, "tags": r.tags, "notes": null,
                        "wandbConfig": t.map_or("{}".to_string(), |t| json!({"t": t}).to_string()),
                    })
                });
                (
                    200,
                    json!({"data": {"model": {"id": "UHJvamVjdDox", "name": project, "entity": {"id": "e", "name": entity}, "bucket": bucket}}}),
                )
            }
            Some("CreateRunFiles") => {
                let run = text("run").unwrap_or_default();
                let files: Vec<Value> = vars["files"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|name| json!({"name": name, "uploadUrl": format!("{}/upload/{run}/{name}", self.base_url)}))
                    .collect();
                let id = self.runs.get(&run).map(|r| r.storage_id.clone());
                (200, json!({"data": {"createRunFiles": {"runID": id, "uploadHeaders": [], "files": files}}}))
            }
            _ => (200, json!({"data": {}})),
        }
    }

    fn file_stream(&mut self, run_name: &str, body: &Value) -> (u16, Value) {
        let Some(run) = self.runs.get_mut(run_name) else { return (404, json!({"error": "run not found"})) };
        if !body.is_object() {
            return (400, json!({"error": "not a JSON object"}));
        }
        for (file, lines) in
            [("wandb-history.jsonl", &mut run.history), ("wandb-events.jsonl", &mut run.events), ("output.log", &mut run.logs)]
        {
            let Some(h) = body.pointer(&format!("/files/{}", file.replace('~', "~0").replace('/', "~1"))) else { continue };
            let offset = h["offset"].as_u64().unwrap_or(0) as usize;
            let content: Vec<String> = h["content"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()).collect();
            if offset > lines.len() {
                let e = format!("{file} offset {offset} past the end ({})", lines.len());
                self.errors.push(e);
                return (400, json!({"error": "offset gap"}));
            }
            for (i, line) in content.into_iter().enumerate() {
                let at = offset + i;
                if at < lines.len() {
                    // Console lines may be rewritten (a progress bar redrawn); others never.
                    if lines[at] != line && file != "output.log" {
                        self.errors.push(format!("{file} line {at} rewritten with other content"));
                    }
                    lines[at] = line;
                } else {
                    lines.push(line);
                }
            }
        }
        if let Some(names) = body["uploaded"].as_array() {
            run.uploaded.extend(names.iter().filter_map(Value::as_str).map(str::to_string));
        }
        if let Some(s) = body.pointer("/files/wandb-summary.json") {
            if s["offset"].as_u64() != Some(0) {
                self.errors.push("summary not at offset 0".into());
            }
            run.summary = s["content"][0].as_str().map(str::to_string);
        }
        let last_step = run.history.last().and_then(|l| serde_json::from_str::<Value>(l).ok()).and_then(|v| v["_step"].as_u64());
        if let Some((_, holds)) = self.stop_at.filter(|(at, _)| last_step.is_some_and(|s| s >= *at)) {
            self.stop_at = None;
            run.stopped = Some(holds);
            run.stop_answered_at_step = last_step;
            run.stop_answered_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs_f64());
        }
        let mut reply = json!({"exitcode": null, "limits": {}});
        if run.stopped.is_some() {
            reply["stopped"] = json!(true);
        }
        if body["complete"].as_bool() == Some(true) {
            run.complete = true;
            run.exit_code = body["exitcode"].as_i64();
            if run.stopped == Some(StopHolds::UntilFinished) {
                run.stopped = None;
            }
        }
        (200, reply)
    }
}

pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

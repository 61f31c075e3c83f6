//! The reporter against the loopback fake server: exactly-once delivery under faults,
//! a non-blocking `log()`, resume, offline spool and `sync`, refused keys, bounded finish,
//! pacing and size caps, and the documented request shapes.

use super::fake_server::{base64, FakeServer, Fault, StopHolds, Target, DEFAULT_ENTITY};
use super::*;
use serde_json::{json, Map, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const KEY: &str = "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk";
const GOOD_KEY: &str = "gggggggggggggggggggggggggggggggggggggggg";

fn fast_tuning() -> Tuning {
    Tuning {
        transmit_interval: Duration::from_millis(20),
        heartbeat_interval: Duration::from_secs(60),
        retry_wait_min: Duration::from_millis(10),
        retry_wait_max: Duration::from_millis(100),
        graphql_timeout: Duration::from_millis(1500),
        file_stream_timeout: Duration::from_millis(1500),
        ..Tuning::default()
    }
}

fn settings(url: &str, dir: &Path) -> Settings {
    Settings {
        mode: Mode::Online,
        base_url: url.to_string(),
        api_key: Some(KEY.to_string()),
        entity: Some("ent".into()),
        project: "proj".into(),
        run_id: None,
        name: Some("my display".into()),
        group: Some("grp".into()),
        tags: vec!["a".into(), "b".into()],
        dir: dir.to_path_buf(),
        flush_timeout: Duration::from_secs(10),
        job_type: None,
        notes: None,
        username: None,
        user_email: None,
        tuning: fast_tuning(),
    }
}

/// A reporter of `settings(url, dir)` in offline mode: its rows wait in the spool for `sync`.
fn offline_reporter(url: &str, dir: &Path) -> Reporter {
    let mut s = settings(url, dir);
    s.mode = Mode::Offline;
    Reporter::start(s, config(), None).unwrap()
}

/// The environment `sync` sees: this server, this key, short waits.
fn sync_env(url: &str, key: &str) -> impl Fn(&str) -> Option<String> {
    let (url, key) = (url.to_string(), key.to_string());
    move |name: &str| match name {
        "WANDB_BASE_URL" => Some(url.clone()),
        "WANDB_API_KEY" => Some(key.clone()),
        "WANDB_X_FILE_STREAM_RETRY_WAIT_MIN_SECONDS" => Some("0.01".into()),
        "WANDB_X_FILE_STREAM_RETRY_WAIT_MAX_SECONDS" => Some("0.1".into()),
        "WANDB_X_FILE_STREAM_TIMEOUT_SECONDS" => Some("1.5".into()),
        "WANDB_HTTP_TIMEOUT" => Some("1.5".into()),
        _ => None,
    }
}

fn row(step: u64) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("train/loss".into(), json!(10.0 / (step as f64 + 1.0)));
    m.insert("train/lr".into(), json!(6e-4));
    m
}

fn tagged(step: u64, attempt: u64) -> Map<String, Value> {
    let mut m = row(step);
    m.insert("attempt".into(), json!(attempt));
    m
}

/// `(step, attempt)` of every history line the server holds.
fn attempts(server: &FakeServer, id: &str) -> Vec<(u64, u64)> {
    server
        .run(id)
        .unwrap()
        .history
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["_step"].as_u64().unwrap(), v["attempt"].as_u64().unwrap())
        })
        .collect()
}

fn config() -> Value {
    json!({"lr": 0.0006, "model": {"n_layer": 12, "share_layers": true}})
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    done()
}

fn range(a: u64, b: u64) -> Vec<u64> {
    (a..=b).collect()
}

/// Offsets of successive history chunks must be contiguous from `start`.
fn history_offsets(server: &FakeServer) -> Vec<(u64, usize)> {
    server
        .ops("file_stream")
        .iter()
        .filter(|r| r.fault.is_none())
        .filter_map(|r| {
            let h = r.body.pointer("/files/wandb-history.jsonl")?;
            Some((h["offset"].as_u64().unwrap(), h["content"].as_array().unwrap().len()))
        })
        .collect()
}

fn normalized(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").replace("{ ", "{").replace(" }", "}").replace(", ", ",").replace(": ", ":")
}

#[test]
fn fresh_run_sends_the_documented_requests() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let reporter = Reporter::start(settings(&server.url, dir.path()), config(), None).unwrap();
    let id = reporter.run_id().to_string();
    assert!(id.len() == 8 && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()), "{id}");
    for step in 1..=5 {
        reporter.log(step, &row(step));
    }
    reporter.set_summary("best/val_loss", json!(1.25));
    let report = reporter.finish(0);
    assert!(report.completed && report.pending_rows == 0 && report.uploaded_rows == 5, "{report:?}");
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);

    // A fresh generated id: no RunResumeStatus, one UpsertBucket first; at the end
    // CreateRunFiles and a PUT of each file.
    assert!(server.requests().iter().all(|r| r.method == "POST" || r.path.starts_with("/upload/")));
    let graphql = server.requests().into_iter().filter(|r| r.path == "/graphql").collect::<Vec<_>>();
    assert_eq!(graphql.iter().map(|r| r.op.as_str()).collect::<Vec<_>>(), ["UpsertBucket", "CreateRunFiles"]);
    let upsert = &graphql[0];
    // The doc's text (§4.2), whitespace aside.
    let doc_text = "mutation UpsertBucket($id: String, $name: String, $project: String, $entity: String,
        $groupName: String, $description: String, $displayName: String, $notes: String,
        $commit: String, $config: JSONString, $host: String, $debug: Boolean,
        $program: String, $repo: String, $jobType: String, $state: String,
        $sweep: String, $tags: [String!], $summaryMetrics: JSONString) {
      upsertBucket(input: {id: $id, name: $name, groupName: $groupName,
          modelName: $project, entityName: $entity, description: $description,
          displayName: $displayName, notes: $notes, config: $config, commit: $commit,
          host: $host, debug: $debug, jobProgram: $program, jobRepo: $repo,
          jobType: $jobType, state: $state, sweep: $sweep, tags: $tags,
          summaryMetrics: $summaryMetrics}) {
        bucket { id name displayName description config sweepName
                 project { id name entity { id name } } historyLineCount }
        inserted
      }
    }";
    assert_eq!(normalized(upsert.body["query"].as_str().unwrap()), normalized(doc_text));
    assert_eq!(upsert.body["operationName"], "UpsertBucket");
    let vars = upsert.body["variables"].as_object().unwrap();
    let mut names: Vec<&str> = vars.keys().map(String::as_str).collect();
    names.sort();
    let mut expected = vec![
        "id", "name", "project", "entity", "groupName", "description", "displayName", "notes", "commit", "config", "host", "debug",
        "program", "repo", "jobType", "state", "sweep", "tags", "summaryMetrics",
    ];
    expected.sort();
    assert_eq!(names, expected, "every variable present");
    assert_eq!(vars["id"], Value::Null);
    assert_eq!(vars["name"], json!(id));
    assert_eq!(vars["project"], "proj");
    assert_eq!(vars["entity"], "ent");
    assert_eq!(vars["displayName"], "my display");
    assert_eq!(vars["groupName"], "grp");
    assert_eq!(vars["tags"], json!(["a", "b"]));
    assert_eq!(vars["state"], Value::Null);
    assert_eq!(vars["summaryMetrics"], Value::Null);
    let cfg: Value = serde_json::from_str(vars["config"].as_str().expect("config is a JSON string")).unwrap();
    assert_eq!(cfg["lr"], json!({"value": 0.0006}));
    assert_eq!(cfg["model"]["value"]["n_layer"], 12);
    assert!(cfg["_wandb"]["value"]["t"].is_object(), "the _wandb.t entry the SDK's resume check needs: {cfg}");
    assert_eq!(cfg["_wandb"]["value"]["m"], json!([]));

    // Headers: Basic api:<key>, JSON, service-account headers present even when empty.
    let auth = format!("Basic {}", base64(format!("api:{KEY}").as_bytes()));
    assert_eq!(upsert.header("authorization"), Some(auth.as_str()));
    assert_eq!(upsert.header("content-type"), Some("application/json"));
    assert_eq!(upsert.header("x-wandb-username"), Some(""));
    assert_eq!(upsert.header("x-wandb-user-email"), Some(""));

    let streams = server.ops("file_stream");
    assert!(!streams.is_empty());
    for r in &streams {
        assert_eq!(r.path, format!("/files/ent/proj/{id}/file_stream"));
        assert_eq!(r.header("authorization"), Some(auth.as_str()));
    }
    let run = server.run(&id).unwrap();
    assert_eq!(server.steps(&id), range(1, 5));
    let line: Value = serde_json::from_str(&run.history[0]).unwrap();
    assert_eq!(line["_step"], 1);
    assert!(line["_runtime"].as_f64().unwrap() >= 0.0);
    assert!(line["_timestamp"].as_f64().unwrap() > 1.7e9);
    assert_eq!(line["train/lr"], 6e-4);
    let summary: Value = serde_json::from_str(run.summary.as_ref().unwrap()).unwrap();
    assert_eq!(summary["best/val_loss"], 1.25);
    assert_eq!(summary["_step"], 5);
    assert!(summary["_wandb"]["runtime"].is_u64());
    assert!(run.complete && run.exit_code == Some(0));
    // complete/exitcode only in the last request.
    let last = streams.last().unwrap();
    assert_eq!(last.body["complete"], true);
    assert_eq!(last.body["exitcode"], 0);
    assert!(streams[..streams.len() - 1].iter().all(|r| r.body.get("complete").is_none()));
    // The run files (§4.3): listed in the final request once PUT, without credentials.
    let create = &graphql[1];
    assert_eq!(
        create.body["variables"],
        json!({"entity": "ent", "project": "proj", "run": id, "files": ["config.yaml", "wandb-summary.json"]})
    );
    assert_eq!(last.body["uploaded"], json!(["config.yaml", "wandb-summary.json"]));
    let puts: Vec<_> = server.requests().into_iter().filter(|r| r.method == "PUT").collect();
    assert_eq!(puts.len(), 2);
    assert!(puts.iter().all(|r| r.header("authorization").is_none()), "signed URLs carry no key");
    let files = server.state().uploaded_files.clone();
    let body = |name: &str| String::from_utf8(files.iter().find(|f| f.1 == name).unwrap().2.clone()).unwrap();
    let yaml: Value = serde_yaml_ng::from_str(&body("config.yaml")).unwrap();
    assert_eq!(yaml["model"]["value"]["n_layer"], 12);
    assert_eq!(serde_json::from_str::<Value>(&body("wandb-summary.json")).unwrap(), summary);
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

#[test]
fn rows_arrive_exactly_once_in_order_despite_faults() {
    let server = FakeServer::start();
    server.fail_next(Target::Graphql, Fault::Status(500, None));
    server.fail_next(Target::Graphql, Fault::DropBefore);
    server.fail_next(Target::FileStream, Fault::Status(500, None));
    server.fail_next(Target::FileStream, Fault::Status(429, Some("0.05")));
    server.fail_next(Target::FileStream, Fault::DropBefore);
    server.fail_next(Target::FileStream, Fault::DropAfter); // applied, answer lost
    server.fail_next(Target::FileStream, Fault::Status(502, None));
    server.fail_next(Target::FileStream, Fault::SlowReply(Duration::from_millis(400))); // applied, client times out
    server.fail_next(Target::FileStream, Fault::Status(503, Some("0")));
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&server.url, dir.path());
    s.tuning.file_stream_timeout = Duration::from_millis(200);
    let reporter = Reporter::start(s, config(), None).unwrap();
    let id = reporter.run_id().to_string();
    for step in 1..=200 {
        reporter.log(step, &row(step));
        if step % 10 == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    reporter.finish(0);
    assert_eq!(server.steps(&id), range(1, 200), "every row once, in order");
    let run = server.run(&id).unwrap();
    assert!(run.complete && run.exit_code == Some(0));
    assert!(server.errors().is_empty(), "{:?}", server.errors());
    // Offsets of the successful requests are contiguous.
    let mut next = 0;
    for (offset, n) in history_offsets(&server) {
        assert!(offset <= next, "gap at {offset}, expected {next}");
        next = next.max(offset + n as u64);
    }
    assert_eq!(next, 200);
    let faults = server.requests().iter().filter(|r| r.fault.is_some()).count();
    assert_eq!(faults, 9, "every injected fault was met");
}

#[test]
fn retry_after_is_honoured() {
    let server = FakeServer::start();
    server.fail_next(Target::FileStream, Fault::Status(429, Some("0.4")));
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&server.url, dir.path());
    s.tuning.retry_wait_max = Duration::from_millis(20);
    let reporter = Reporter::start(s, config(), None).unwrap();
    reporter.log(1, &row(1));
    reporter.finish(0);
    let streams = server.ops("file_stream");
    assert!(streams[0].fault.is_some());
    let gap = streams[1].at - streams[0].at;
    assert!(gap >= Duration::from_millis(400), "waited {gap:?}, Retry-After said 0.4 s (over the 20 ms cap: not capped)");
}

#[test]
fn log_never_blocks_while_the_server_hangs_and_finish_is_bounded() {
    let server = FakeServer::start();
    server.set_always(Some((Target::Any, Fault::Hang(Duration::from_secs(3)))));
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&server.url, dir.path());
    s.tuning.graphql_timeout = Duration::from_millis(300);
    s.tuning.memory_rows = 100; // past 100 waiting rows, they wait on disk only
    s.flush_timeout = Duration::from_millis(500);
    let reporter = Reporter::start(s, config(), None).unwrap();
    let id = reporter.run_id().to_string();
    let mut times = Vec::with_capacity(1000);
    let mut wide = Map::new();
    for k in 0..20 {
        wide.insert(format!("layer{k}/grad_norm"), json!(k as f64 * 0.1));
    }
    for step in 1..=1000u64 {
        let mut r = row(step);
        r.extend(wide.clone());
        let t = Instant::now();
        reporter.log(step, &r);
        times.push(t.elapsed());
    }
    times.sort();
    let p99 = times[989];
    eprintln!("log(): p50 {:?}, p99 {:?}, max {:?}", times[500], p99, times[999]);
    assert!(p99 < Duration::from_millis(1), "p99 {p99:?}");
    assert!(wait_until(Duration::from_secs(2), || reporter.warnings().iter().any(|w| w.contains("wait in the spool file"))));
    let t = Instant::now();
    let report = reporter.finish(0);
    let took = t.elapsed();
    assert!(took < Duration::from_millis(1500), "finish took {took:?} with a 500 ms flush timeout");
    assert!(!report.completed && report.pending_rows == 1000, "{report:?}");
    assert!(report.warnings.iter().any(|w| w.contains("did not finish within")), "{:?}", report.warnings);
    // Every row is in the spool; the run is not marked finished anywhere.
    let spool = spool_dir(dir.path(), &id);
    let lines = std::fs::read_to_string(spool.join("history.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 1000);
    assert!(spool.join("finish.json").exists());
    drop(server);

    // Later, against a healthy server, everything arrives once, and the run is finished.
    let healthy = FakeServer::start();
    let env = sync_env(&healthy.url, KEY);
    sync(dir.path(), &env, None).unwrap();
    assert_eq!(healthy.steps(&id), range(1, 1000));
    let run = healthy.run(&id).unwrap();
    assert!(run.complete && run.exit_code == Some(0));
    assert!(healthy.errors().is_empty(), "{:?}", healthy.errors());
    let requests_before = healthy.requests().len();
    sync(dir.path(), &env, None).unwrap();
    assert_eq!(healthy.requests().len(), requests_before, "a second sync has nothing to do");
}

#[test]
fn finish_respects_its_timeout_when_the_server_is_down() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // closed: connections are refused
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&format!("http://127.0.0.1:{port}"), dir.path());
    s.flush_timeout = Duration::from_millis(300);
    s.tuning.retry_wait_max = Duration::from_secs(60);
    s.tuning.retry_wait_min = Duration::from_secs(2);
    let reporter = Reporter::start(s, config(), None).unwrap();
    for step in 1..=10 {
        reporter.log(step, &row(step));
    }
    let t = Instant::now();
    let report = reporter.finish(3);
    assert!(t.elapsed() < Duration::from_millis(1000), "{:?}", t.elapsed());
    assert!(!report.completed && report.pending_rows == 10, "{report:?}");
    assert!(report.warnings.iter().any(|w| w.contains("did not finish within")), "{:?}", report.warnings);
    let finish: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("wandb").read_dir().unwrap().next().unwrap().unwrap().path().join("finish.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(finish["exit_code"], 3, "the exit code waits in the spool for sync");
}

#[test]
fn resume_after_a_crash_continues_the_run_without_duplicates_or_gaps() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    // Attempt 1: steps 1..5 reach the server, then it goes away; 6..10 stay spooled; crash.
    let reporter = Reporter::start(settings(&server.url, dir.path()), config(), None).unwrap();
    let id = reporter.run_id().to_string();
    for step in 1..=5 {
        reporter.log(step, &tagged(step, 1));
    }
    reporter.set_summary("best/val_loss", json!(2.5));
    assert!(wait_until(Duration::from_secs(5), || server.steps(&id).len() == 5
        && server.run(&id).and_then(|r| r.summary).is_some_and(|s| s.contains("best/val_loss"))));
    server.set_always(Some((Target::Any, Fault::DropBefore)));
    for step in 6..=10 {
        reporter.log(step, &tagged(step, 1));
    }
    std::thread::sleep(Duration::from_millis(50));
    drop(reporter); // a crash: no finish
    assert!(!server.run(&id).unwrap().complete);
    server.set_always(None);

    // Attempt 2 resumes from the checkpoint at step 8: 6..8 (spooled, never sent) go up
    // first, 9..10 of the crashed attempt are dropped, the resumed run logs 9..15.
    let reporter = Reporter::start(settings(&server.url, dir.path()), config(), Some((id.clone(), 8))).unwrap();
    assert_eq!(reporter.run_id(), id);
    for step in 9..=15 {
        reporter.log(step, &tagged(step, 2));
    }
    reporter.finish(0);
    assert_eq!(server.steps(&id), range(1, 15));
    let expected: Vec<(u64, u64)> = (1..=15).map(|s| (s, if s <= 8 { 1 } else { 2 })).collect();
    assert_eq!(attempts(&server, &id), expected, "6..8 from the spool, 9..10 recomputed");
    let run = server.run(&id).unwrap();
    assert!(run.complete && run.exit_code == Some(0));
    let rrs = server.ops("RunResumeStatus");
    assert_eq!(rrs.len(), 1);
    assert_eq!(rrs[0].body["variables"], json!({"project": "proj", "entity": "ent", "name": id}));
    let doc_text = r#"query RunResumeStatus($project: String, $entity: String, $name: String!) {
      model(name: $project, entityName: $entity) {
        id name entity { id name }
        bucket(name: $name, missingOk: true) {
          id name summaryMetrics displayName logLineCount historyLineCount
          eventsLineCount historyTail eventsTail config tags notes
          wandbConfig(keys: ["t"])
        }
      }
    }"#;
    assert_eq!(normalized(rrs[0].body["query"].as_str().unwrap()), normalized(doc_text));
    let upserts = server.ops("UpsertBucket");
    assert_eq!(upserts.len(), 2);
    assert_eq!(upserts[1].body["variables"]["id"], json!(run.storage_id), "the storage id from RunResumeStatus");
    let summary: Value = serde_json::from_str(run.summary.as_ref().unwrap()).unwrap();
    assert_eq!(summary["best/val_loss"], 2.5, "the old summary is merged");
    assert_eq!(summary["_step"], 15);
    assert!(server.errors().is_empty(), "{:?}", server.errors());
    // History lines keep _runtime going forward.
    let runtimes: Vec<f64> = run.history.iter().map(|l| serde_json::from_str::<Value>(l).unwrap()["_runtime"].as_f64().unwrap()).collect();
    assert!(runtimes.windows(2).all(|w| w[1] >= w[0]), "{runtimes:?}");
}

#[test]
fn resume_elsewhere_skips_steps_the_server_already_has() {
    let server = FakeServer::start();
    let first = tempfile::tempdir().unwrap();
    let reporter = Reporter::start(settings(&server.url, first.path()), config(), None).unwrap();
    let id = reporter.run_id().to_string();
    for step in 1..=10 {
        reporter.log(step, &tagged(step, 1));
    }
    assert!(wait_until(Duration::from_secs(5), || server.steps(&id).len() == 10));
    drop(reporter); // crash after step 10 reached the server; the checkpoint is at 6

    // Resumed in another directory (no spool): the server's tail says it has up to 10.
    let second = tempfile::tempdir().unwrap();
    let reporter = Reporter::start(settings(&server.url, second.path()), config(), Some((id.clone(), 6))).unwrap();
    for step in 7..=14 {
        reporter.log(step, &tagged(step, 2));
    }
    reporter.finish(0);
    assert_eq!(server.steps(&id), range(1, 14), "7..10 kept from the first attempt, not duplicated");
    let expected: Vec<(u64, u64)> = (1..=14).map(|s| (s, if s <= 10 { 1 } else { 2 })).collect();
    assert_eq!(attempts(&server, &id), expected);
    let resumed: Vec<(u64, usize)> = history_offsets(&server).into_iter().filter(|(o, _)| *o >= 10).collect();
    assert_eq!(resumed.first().map(|r| r.0), Some(10), "history continues at historyLineCount");
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

#[test]
fn offline_spool_then_sync_uploads_and_finishes() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let reporter = offline_reporter(&server.url, dir.path());
    let id = reporter.run_id().to_string();
    for step in 1..=50 {
        reporter.log(step, &row(step));
    }
    reporter.set_summary("best/val_loss", json!(0.5));
    let report = reporter.finish(0);
    assert!(!report.completed && report.pending_rows == 50 && report.warnings.is_empty(), "{report:?}");
    assert!(server.requests().is_empty(), "offline makes no requests");
    let spool = spool_dir(dir.path(), &id);
    for f in ["settings.json", "config.json", "history.jsonl", "summary.json", "finish.json"] {
        assert!(spool.join(f).exists(), "{f}");
    }
    let recorded = std::fs::read_to_string(spool.join("settings.json")).unwrap();
    assert!(!recorded.contains(KEY), "the key is never written");

    server.require_key(GOOD_KEY);
    sync(dir.path(), &sync_env(&server.url, GOOD_KEY), None).unwrap();
    assert_eq!(server.steps(&id), range(1, 50));
    let run = server.run(&id).unwrap();
    assert!(run.complete && run.exit_code == Some(0));
    assert_eq!(run.display_name.as_deref(), Some("my display"));
    assert_eq!(run.group.as_deref(), Some("grp"));
    let summary: Value = serde_json::from_str(run.summary.as_ref().unwrap()).unwrap();
    assert_eq!(summary["best/val_loss"], 0.5);
    assert_eq!(summary["_step"], 50);
    let cfg: Value = serde_json::from_str(&run.config).unwrap();
    assert_eq!(cfg["model"]["value"]["n_layer"], 12);
    assert!(server.errors().is_empty(), "{:?}", server.errors());
    // Idempotent: nothing more to do.
    let n = server.requests().len();
    sync(&spool, &sync_env(&server.url, GOOD_KEY), None).unwrap();
    assert_eq!(server.requests().len(), n);
}

#[test]
fn sync_finishes_a_run_cut_off_by_a_crash() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let reporter = Reporter::start(settings(&server.url, dir.path()), config(), None).unwrap();
    let id = reporter.run_id().to_string();
    for step in 1..=20 {
        reporter.log(step, &row(step));
    }
    assert!(wait_until(Duration::from_secs(5), || server.steps(&id).len() == 20));
    server.set_always(Some((Target::FileStream, Fault::Status(503, None))));
    for step in 21..=40 {
        reporter.log(step, &row(step));
    }
    std::thread::sleep(Duration::from_millis(50));
    drop(reporter);
    server.set_always(None);
    let upload: Value = serde_json::from_slice(&std::fs::read(spool_dir(dir.path(), &id).join("upload.json")).unwrap()).unwrap();
    assert_eq!(upload["acked_lines"], 20, "the spool says how far uploads got");

    sync(dir.path(), &sync_env(&server.url, KEY), None).unwrap();
    assert_eq!(server.steps(&id), range(1, 40));
    let run = server.run(&id).unwrap();
    assert!(run.complete);
    assert_eq!(run.exit_code, Some(CRASHED_EXIT_CODE as i64), "cut off: marked failed");
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

#[test]
fn a_refused_key_warns_once_keeps_rows_and_sync_uploads_them() {
    let server = FakeServer::start();
    server.require_key(GOOD_KEY);
    let dir = tempfile::tempdir().unwrap();
    let reporter = Reporter::start(settings(&server.url, dir.path()), config(), None).unwrap();
    let id = reporter.run_id().to_string();
    for step in 1..=30 {
        reporter.log(step, &row(step));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(wait_until(Duration::from_secs(5), || !reporter.warnings().is_empty()));
    let t = Instant::now();
    let report = reporter.finish(0);
    let warnings = report.warnings.clone();
    assert!(t.elapsed() < Duration::from_millis(500), "nothing to wait for once parked");
    assert!(!report.completed && report.pending_rows == 30, "{report:?}");
    let auth: Vec<&String> = warnings.iter().filter(|w| w.contains("401")).collect();
    assert_eq!(auth.len(), 1, "{warnings:?}");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(server.requests().len(), 1, "one refused request, no retries");
    assert!(server.ops("file_stream").is_empty());

    sync(dir.path(), &sync_env(&server.url, GOOD_KEY), None).unwrap();
    assert_eq!(server.steps(&id), range(1, 30));
    let run = server.run(&id).unwrap();
    assert!(run.complete && run.exit_code == Some(0));
    // A bad key for sync is an error, not a hang.
    let err = sync(dir.path(), &sync_env(&server.url, KEY), None);
    assert!(err.is_ok(), "already finished: nothing to send");
}

#[test]
fn a_refused_file_stream_request_keeps_rows_and_warns_once() {
    let server = FakeServer::start();
    server.fail_next(Target::FileStream, Fault::Status(400, None));
    server.fail_next(Target::FileStream, Fault::Status(400, None));
    server.fail_next(Target::FileStream, Fault::Status(422, None));
    let dir = tempfile::tempdir().unwrap();
    let reporter = Reporter::start(settings(&server.url, dir.path()), config(), None).unwrap();
    let id = reporter.run_id().to_string();
    for step in 1..=60 {
        reporter.log(step, &row(step));
        std::thread::sleep(Duration::from_millis(2));
    }
    let report = reporter.finish(0);
    let warnings = report.warnings;
    assert_eq!(server.steps(&id), range(1, 60), "no row lost, rows kept coming");
    assert!(server.run(&id).unwrap().complete);
    let refused: Vec<&String> = warnings.iter().filter(|w| w.contains("refused a request")).collect();
    assert_eq!(refused.len(), 1, "{warnings:?}");
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

#[test]
fn requests_are_paced_and_rows_between_them_merged() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&server.url, dir.path());
    s.tuning.transmit_interval = Duration::from_millis(250);
    let reporter = Reporter::start(s, config(), None).unwrap();
    let id = reporter.run_id().to_string();
    let t = Instant::now();
    let mut step = 0;
    while t.elapsed() < Duration::from_millis(1100) {
        step += 1;
        reporter.log(step, &row(step));
        std::thread::sleep(Duration::from_millis(5));
    }
    let during = server.ops("file_stream");
    reporter.finish(0);
    assert_eq!(server.steps(&id), range(1, step));
    // First at once, then at most one per interval: ≤ 1 + 1100/250 requests.
    assert!((2..=5).contains(&during.len()), "{} requests in 1.1 s", during.len());
    for pair in during.windows(2) {
        assert!(pair[1].at - pair[0].at >= Duration::from_millis(240), "{:?}", pair[1].at - pair[0].at);
    }
    assert!(during[0].at - server.ops("UpsertBucket")[0].at < Duration::from_millis(200), "the first goes out at once");
}

#[test]
fn batches_respect_the_byte_cap_and_413_halves_them() {
    let server = FakeServer::start();
    // The run's creation answers late, so that all 300 rows are queued before the first
    // file_stream request: a 413 on a one-row request (a loaded machine could send one)
    // is a refusal, not something halving can fix.
    server.fail_next(Target::Graphql, Fault::SlowReply(Duration::from_millis(500)));
    server.fail_next(Target::FileStream, Fault::Status(413, None));
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&server.url, dir.path());
    s.tuning.max_request_bytes = 4000;
    s.tuning.transmit_interval = Duration::from_secs(30); // only the first request is immediate
    s.mode = Mode::Online;
    let reporter = Reporter::start(s, config(), None).unwrap();
    let id = reporter.run_id().to_string();
    for step in 1..=300 {
        reporter.log(step, &row(step));
    }
    reporter.finish(0);
    assert_eq!(server.steps(&id), range(1, 300));
    let mut sizes = Vec::new();
    for r in server.ops("file_stream").iter().filter(|r| r.fault.is_none()) {
        if let Some(h) = r.body.pointer("/files/wandb-history.jsonl") {
            let bytes: usize = h["content"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().len()).sum();
            assert!(bytes <= 4000, "{bytes}");
            sizes.push(bytes);
        }
    }
    assert!(sizes.len() >= 10, "{sizes:?}");
    assert!(sizes.iter().skip(1).all(|&b| b <= 2000), "halved after the 413: {sizes:?}");
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

#[test]
fn idle_streams_send_a_heartbeat() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&server.url, dir.path());
    s.tuning.heartbeat_interval = Duration::from_millis(100);
    let reporter = Reporter::start(s, config(), None).unwrap();
    reporter.log(1, &row(1));
    assert!(wait_until(Duration::from_secs(3), || server.ops("file_stream").iter().any(|r| r.body == json!({}))));
    reporter.finish(0);
}

#[test]
fn a_stop_pressed_in_the_interface_is_seen_after_the_answer_and_uploads_go_on() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    server.press_stop_at(3, StopHolds::UntilFinished);
    let reporter = Reporter::start(settings(&server.url, dir.path()), config(), None).unwrap();
    let id = reporter.run_id().to_string();
    for step in 1..=2 {
        reporter.log(step, &row(step));
    }
    assert!(wait_until(Duration::from_secs(5), || server.steps(&id).len() == 2));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!reporter.stop_requested(), "no stop before the server says so");
    reporter.log(3, &row(3));
    assert!(wait_until(Duration::from_secs(5), || reporter.stop_requested()), "the stopped answer is seen");
    assert_eq!(server.run(&id).unwrap().stop_answered_at_step, Some(3));
    // The reporter keeps going: later rows and the finish still arrive.
    reporter.log(4, &row(4));
    let report = reporter.finish(0);
    assert!(report.completed);
    assert_eq!(server.steps(&id), range(1, 4));
    assert_eq!(server.run(&id).unwrap().exit_code, Some(0));
}

#[test]
fn a_resumed_run_ignores_a_stop_left_from_before_its_resume() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    server.press_stop_at(2, StopHolds::Forever);
    let reporter = Reporter::start(settings(&server.url, dir.path()), config(), None).unwrap();
    let id = reporter.run_id().to_string();
    for step in 1..=2 {
        reporter.log(step, &row(step));
    }
    assert!(wait_until(Duration::from_secs(5), || reporter.stop_requested()));
    reporter.finish(0);
    // The server still says stopped (an old server's behaviour): the resumed run is not
    // stopped by it, and says why once.
    let reporter = Reporter::start(settings(&server.url, dir.path()), config(), Some((id.clone(), 2))).unwrap();
    for step in 3..=4 {
        reporter.log(step, &row(step));
    }
    assert!(wait_until(Duration::from_secs(5), || server.steps(&id).len() == 4));
    assert!(!reporter.stop_requested());
    let report = reporter.finish(0);
    assert_eq!(
        report.warnings.iter().filter(|w| w.contains("still reports this resumed run as stopped")).count(),
        1,
        "{:?}",
        report.warnings
    );
}

#[test]
fn online_without_a_key_warns_once_and_keeps_rows() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&server.url, dir.path());
    s.api_key = None;
    let reporter = Reporter::start(s, config(), None).unwrap();
    assert_eq!(reporter.mode(), Mode::Offline);
    let warnings = reporter.warnings();
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("no API key"), "{}", warnings[0]);
    let id = reporter.run_id().to_string();
    for step in 1..=5 {
        reporter.log(step, &row(step));
    }
    reporter.finish(0);
    assert!(server.requests().is_empty());
    let lines = std::fs::read_to_string(spool_dir(dir.path(), &id).join("history.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 5);

    let mut s = settings(&server.url, dir.path());
    s.api_key = Some("short".into());
    let reporter = Reporter::start(s, config(), None).unwrap();
    assert_eq!(reporter.mode(), Mode::Offline);
    assert!(reporter.warnings()[0].contains("malformed"));
    reporter.finish(0);
    assert!(server.requests().is_empty());
}

#[test]
fn disabled_mode_does_nothing_and_steps_must_increase() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings("http://127.0.0.1:9", dir.path());
    s.mode = Mode::Disabled;
    let reporter = Reporter::start(s, config(), Some(("keepme".into(), 3))).unwrap();
    assert_eq!(reporter.run_id(), "keepme");
    reporter.log(4, &row(4));
    reporter.finish(0);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    let reporter = offline_reporter("http://127.0.0.1:9", dir.path());
    let id = reporter.run_id().to_string();
    reporter.log(5, &row(5));
    reporter.log(5, &row(5));
    reporter.log(4, &row(4));
    reporter.log(6, &row(6));
    let spool = reporter.spool_dir().unwrap().to_path_buf();
    // A second reporter of the same run in the same directory is refused.
    let mut again = settings("http://127.0.0.1:9", dir.path());
    again.mode = Mode::Offline;
    again.run_id = Some(id.clone());
    assert!(Reporter::start(again, config(), None).is_err());
    std::thread::sleep(Duration::from_millis(50));
    let warnings = reporter.warnings();
    reporter.finish(0);
    let steps: Vec<u64> = std::fs::read_to_string(spool.join("history.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["_step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![5, 6]);
    assert_eq!(warnings.iter().filter(|w| w.contains("steps must increase")).count(), 1);
}

// ---------------------------------------------------------------- settings

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

fn resolve(env: &dyn Fn(&str) -> Option<String>, home: Option<&Path>) -> anyhow::Result<Settings> {
    Settings::resolve("online", "algpt2-ddp", Some("team"), Some("display"), None, &["cfg".to_string()], Path::new("runs/x"), env, home)
}

#[test]
fn settings_come_from_the_config_then_the_environment() {
    let s = resolve(&env_of(&[]), None).unwrap();
    assert_eq!(s.mode, Mode::Online);
    assert_eq!(s.base_url, DEFAULT_BASE_URL);
    assert_eq!(s.api_key, None);
    assert_eq!((s.project.as_str(), s.entity.as_deref(), s.name.as_deref()), ("algpt2-ddp", Some("team"), Some("display")));
    assert_eq!(s.tags, vec!["cfg"]);
    assert_eq!(s.dir, Path::new("runs/x"));
    assert_eq!(s.tuning.transmit_interval, Duration::from_secs(15));

    let env = env_of(&[
        ("WANDB_MODE", "dryrun"),
        ("WANDB_BASE_URL", "http://localhost:8080/"),
        ("WANDB_API_KEY", KEY),
        ("WANDB_PROJECT", "p2"),
        ("WANDB_ENTITY", "me"),
        ("WANDB_RUN_ID", "abc123"),
        ("WANDB_NAME", "n2"),
        ("WANDB_RUN_GROUP", "g2"),
        ("WANDB_TAGS", "x, y,,z"),
        ("WANDB_DIR", "/tmp/elsewhere"),
        ("WANDB_X_FILE_STREAM_TRANSMIT_INTERVAL", "0.5"),
        ("WANDB_HTTP_TIMEOUT", "7"),
    ]);
    let s = resolve(&env, None).unwrap();
    assert_eq!(s.mode, Mode::Offline);
    assert_eq!(s.base_url, "http://localhost:8080");
    assert_eq!(s.api_key.as_deref(), Some(KEY));
    assert_eq!(s.project, "p2");
    assert_eq!(s.entity.as_deref(), Some("me"));
    assert_eq!(s.run_id.as_deref(), Some("abc123"));
    assert_eq!(s.name.as_deref(), Some("n2"));
    assert_eq!(s.group.as_deref(), Some("g2"));
    assert_eq!(s.tags, vec!["x", "y", "z"]);
    assert_eq!(s.dir, Path::new("/tmp/elsewhere"));
    assert_eq!(s.tuning.transmit_interval, Duration::from_millis(500));
    assert_eq!(s.tuning.graphql_timeout, Duration::from_secs(7));
    assert!(!format!("{s:?}").contains(KEY), "Debug hides the key");

    assert!(resolve(&env_of(&[("WANDB_MODE", "sometimes")]), None).is_err());
    assert!(resolve(&env_of(&[("WANDB_BASE_URL", "http://api.wandb.ai")]), None).is_err(), "no http:// to wandb.ai");
    assert!(resolve(&env_of(&[("WANDB_BASE_URL", "api.wandb.ai")]), None).is_err());
    assert!(resolve(&env_of(&[("WANDB_RUN_ID", "a/b")]), None).is_err());
    assert_eq!(resolve(&env_of(&[("WANDB_MODE", "disabled")]), None).unwrap().mode, Mode::Disabled);
    let s = Settings::resolve("offline", "", None, None, None, &[], Path::new("r"), &env_of(&[]), None).unwrap();
    assert_eq!(s.project, DEFAULT_PROJECT);
}

#[test]
fn the_key_comes_from_netrc_by_host_and_port() {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join(".netrc"),
        "machine 127.0.0.1\n  login user\n  password wrongwrongwrongwrongwrongwrongwrongwrong\n\
         machine 127.0.0.1:8080 login user password portportportportportportportportportport\n\
         machine api.wandb.ai login user password cloudcloudcloudcloudcloudcloudcloudcloud\n",
    )
    .unwrap();
    let with_url = |url: &str| resolve(&env_of(&[("WANDB_BASE_URL", url)]), Some(home.path())).unwrap().api_key;
    assert_eq!(with_url("http://127.0.0.1:8080").as_deref(), Some("portportportportportportportportportport"));
    assert_eq!(with_url("http://127.0.0.1").as_deref(), Some("wrongwrongwrongwrongwrongwrongwrongwrong"));
    assert_eq!(with_url("https://api.wandb.ai").as_deref(), Some("cloudcloudcloudcloudcloudcloudcloudcloud"));
    assert_eq!(with_url("https://api.forge.coreweave.com").as_deref(), Some("cloudcloudcloudcloudcloudcloudcloudcloud"));
    assert_eq!(with_url("http://127.0.0.1:9999"), None);
    // The env key wins over netrc.
    let s = resolve(&env_of(&[("WANDB_BASE_URL", "http://127.0.0.1:8080"), ("WANDB_API_KEY", KEY)]), Some(home.path())).unwrap();
    assert_eq!(s.api_key.as_deref(), Some(KEY));
    // $NETRC names another file; `default` applies when no machine matches.
    let other = home.path().join("other-netrc");
    std::fs::write(&other, "default login x password defaultdefaultdefaultdefaultdefaultdefau\n").unwrap();
    let s = resolve(&env_of(&[("NETRC", other.to_str().unwrap())]), Some(home.path())).unwrap();
    assert_eq!(s.api_key.as_deref(), Some("defaultdefaultdefaultdefaultdefaultdefau"));
}

#[test]
fn api_keys_are_checked_like_the_sdk_does() {
    assert!(api_key_looks_valid(KEY));
    assert!(api_key_looks_valid(&format!("local-{KEY}")));
    assert!(api_key_looks_valid("aaa.bbb.ccc"));
    assert!(!api_key_looks_valid("short"));
    assert!(!api_key_looks_valid(&format!("{} x", &KEY[..39])));
    assert!(!api_key_looks_valid(""));
}

#[test]
fn backoff_and_retry_after() {
    use super::api::{backoff, parse_http_date, parse_retry_after};
    let (min, max) = (Duration::from_secs(2), Duration::from_secs(60));
    assert_eq!(backoff(0, min, max, 0.0), Duration::from_secs(2));
    assert_eq!(backoff(0, min, max, 1.0), Duration::from_millis(2500));
    assert_eq!(backoff(3, min, max, 0.0), Duration::from_secs(16));
    assert_eq!(backoff(10, min, max, 0.5), max);
    let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_770);
    assert_eq!(parse_retry_after("4", now), Some(Duration::from_secs(4)));
    assert_eq!(parse_retry_after("0.25", now), Some(Duration::from_millis(250)));
    assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(std::time::UNIX_EPOCH + Duration::from_secs(784_111_777)));
    assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now), Some(Duration::from_secs(7)));
    assert_eq!(parse_retry_after("soon", now), None);
}

#[test]
fn status_classes_follow_the_official_client() {
    use super::api::{classify, Failure, Op};
    let class = |s, op| match classify(s, op) {
        None => "ok",
        Some(Failure::Transient { .. }) => "retry",
        Some(Failure::Auth { .. }) => "auth",
        Some(Failure::Permanent { .. }) => "permanent",
    };
    assert_eq!(class(200, Op::FileStream), "ok");
    for s in [408, 429, 500, 502, 503, 504, 0, 600] {
        assert_eq!(class(s, Op::FileStream), "retry", "{s}");
    }
    for s in [401, 403] {
        assert_eq!(class(s, Op::Upsert), "auth");
    }
    for s in [400, 404, 409, 410, 413, 422, 501] {
        assert_eq!(class(s, Op::FileStream), "permanent", "{s}");
    }
    assert_eq!(class(409, Op::Upsert), "retry");
    assert_eq!(class(400, Op::Upsert), "permanent");
}

#[test]
fn resume_status_reads_tails_of_json_strings() {
    use super::api::parse_resume_status;
    let data = json!({"model": {"bucket": {
        "id": "UnVu", "historyLineCount": 5,
        "historyTail": serde_json::to_string(&vec![r#"{"_step":3,"x":1}"#, r#"{"_step":4,"_runtime":2.5}"#]).unwrap(),
        "summaryMetrics": r#"{"_step":4,"best":1}"#,
        "config": r#"{"lr":{"value":0.1}}"#,
        "wandbConfig": r#"{"t":{"13":"linux"}}"#,
    }}});
    let e = parse_resume_status(&data).unwrap();
    assert_eq!((e.history_lines, e.last_step, e.storage_id.as_deref(), e.started), (5, Some(4), Some("UnVu"), true));
    assert_eq!(e.summary["best"], 1);
    assert_eq!(e.config["lr"]["value"], 0.1);
    assert!(parse_resume_status(&json!({"model": {"bucket": null}})).is_none());
    assert!(parse_resume_status(&json!({"model": null})).is_none());
}

#[test]
fn upsert_config_keeps_old_keys_and_an_existing_wandb_entry() {
    use super::api::upsert_config;
    let old: Map<String, Value> =
        serde_json::from_str(r#"{"old":{"value":1},"lr":{"value":9},"_wandb":{"value":{"t":{"5":"0.31.0"},"e":{}}}}"#).unwrap();
    let cfg: Value = serde_json::from_str(&upsert_config(&json!({"lr": 0.1}), &old)).unwrap();
    assert_eq!(cfg["old"]["value"], 1);
    assert_eq!(cfg["lr"]["value"], 0.1);
    assert_eq!(cfg["_wandb"]["value"]["t"], json!({"5": "0.31.0"}), "the SDK's own telemetry is kept");
    assert!(cfg["_wandb"]["value"]["e"].is_object());
    let _ = DEFAULT_ENTITY;
}

#[test]
fn no_entity_lets_the_server_choose_one() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&server.url, dir.path());
    s.entity = None;
    let reporter = Reporter::start(s, config(), None).unwrap();
    let id = reporter.run_id().to_string();
    reporter.log(1, &row(1));
    reporter.finish(0);
    assert_eq!(server.ops("UpsertBucket")[0].body["variables"]["entity"], Value::Null);
    assert!(server.ops("file_stream").iter().all(|r| r.path == format!("/files/{DEFAULT_ENTITY}/proj/{id}/file_stream")));
    assert_eq!(server.steps(&id), vec![1]);
}

#[test]
fn the_reporter_can_be_shared_across_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Reporter>();
}

#[test]
fn rows_spilled_to_disk_during_an_outage_go_up_in_order_when_it_ends() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&server.url, dir.path());
    s.tuning.memory_rows = 20;
    s.tuning.max_request_bytes = 3000; // several reads back from the spool
    let reporter = Reporter::start(s, config(), None).unwrap();
    let id = reporter.run_id().to_string();
    reporter.log(1, &row(1));
    assert!(wait_until(Duration::from_secs(5), || server.steps(&id).len() == 1));
    server.set_always(Some((Target::FileStream, Fault::Status(503, None))));
    for step in 2..=100 {
        reporter.log(step, &row(step));
    }
    assert!(wait_until(Duration::from_secs(2), || reporter.warnings().iter().any(|w| w.contains("wait in the spool file"))));
    server.set_always(None);
    // Rows keep coming while the backlog drains from disk, then from memory again.
    for step in 101..=250 {
        reporter.log(step, &row(step));
        if step % 25 == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(wait_until(Duration::from_secs(5), || server.steps(&id).len() == 250));
    for step in 251..=260 {
        reporter.log(step, &row(step)); // back in memory mode
    }
    let report = reporter.finish(0);
    assert!(report.completed, "{report:?}");
    assert_eq!(server.steps(&id), range(1, 260));
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

#[test]
fn sync_refuses_a_run_that_is_still_reporting() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let reporter = offline_reporter(&server.url, dir.path());
    reporter.log(1, &row(1));
    let err = sync(dir.path(), &sync_env(&server.url, KEY), None).unwrap_err();
    assert!(format!("{err:#}").contains("another process is reporting"), "{err:#}");
    assert!(server.requests().is_empty());
    reporter.finish(0);
    sync(dir.path(), &sync_env(&server.url, KEY), None).unwrap();
    let id = server.requests()[0].body["variables"]["name"].as_str().unwrap().to_string();
    assert!(server.run(&id).unwrap().complete);
}

#[test]
fn oversize_lines_and_summaries_stay_in_the_spool_without_stalling_the_stream() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&server.url, dir.path());
    s.tuning.max_line_bytes = 400;
    let reporter = Reporter::start(s, config(), None).unwrap();
    let id = reporter.run_id().to_string();
    reporter.log(1, &row(1));
    let mut big = row(2);
    big.insert("text".into(), json!("x".repeat(500)));
    reporter.log(2, &big);
    reporter.log(3, &row(3));
    let report = reporter.finish(0);
    assert!(report.completed, "{report:?}");
    assert_eq!(server.steps(&id), vec![1, 3], "the oversize row is not sent");
    assert!(report.warnings.iter().any(|w| w.contains("over the server's line limit")), "{:?}", report.warnings);
    assert!(report.warnings.iter().any(|w| w.contains("summary is")), "{:?}", report.warnings);
    assert!(!report.warnings.iter().any(|w| w.contains("cannot be read back")), "{:?}", report.warnings);
    let spooled = std::fs::read_to_string(report.spool_dir.unwrap().join("history.jsonl")).unwrap();
    assert_eq!(spooled.lines().count(), 3, "kept locally");
}

#[test]
fn passwords_in_the_base_url_are_stripped_for_disk() {
    use super::settings::without_password;
    assert_eq!(without_password("http://user:PASSWORD@host:8080/x"), ("http://user@host:8080/x".to_string(), true));
    assert_eq!(without_password("https://:PASSWORD@host"), ("https://host".to_string(), true));
    assert_eq!(without_password("https://user@host"), ("https://user@host".to_string(), false));
    assert_eq!(without_password("https://host/a@b"), ("https://host/a@b".to_string(), false));
}

/// WANDB_BASE_URL=http://user:PASSWORD@host: the password never reaches the run
/// directory, settings.json is the owner's only, and a later sync asks for the URL again.
#[test]
fn a_password_in_the_base_url_is_never_written_to_disk() {
    use std::os::unix::fs::PermissionsExt;
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let with_password = server.url.replacen("://", "://alice:PASSWORD@", 1);
    let reporter = offline_reporter(&with_password, dir.path());
    let id = reporter.run_id().to_string();
    for step in 1..=3 {
        reporter.log(step, &row(step));
    }
    reporter.finish(0);
    let spool = spool_dir(dir.path(), &id);
    for entry in std::fs::read_dir(&spool).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("PASSWORD"), "{} holds the password", path.display());
    }
    let settings_file = spool.join("settings.json");
    assert_eq!(std::fs::metadata(&settings_file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(std::fs::read_to_string(&settings_file).unwrap().contains("alice@"));

    let no_url = |name: &str| if name == "WANDB_BASE_URL" { None } else { sync_env(&server.url, GOOD_KEY)(name) };
    let e = sync(dir.path(), &no_url, None).unwrap_err();
    assert!(format!("{e:#}").contains("set WANDB_BASE_URL"), "{e:#}");
    server.require_key(GOOD_KEY);
    sync(dir.path(), &sync_env(&server.url, GOOD_KEY), None).unwrap();
    assert_eq!(server.steps(&id), range(1, 3));
}

fn sample(cpu: f64) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("system.cpu".into(), json!(cpu));
    m.insert("system.rank.1.cpu".into(), json!(cpu / 2.0));
    m
}

/// The `system.cpu` of every events line the server holds, in order.
fn event_cpus(server: &FakeServer, id: &str) -> Vec<f64> {
    server.run(id).unwrap().events.iter().map(|l| serde_json::from_str::<Value>(l).unwrap()["system.cpu"].as_f64().unwrap()).collect()
}

/// The text of every console line the server holds, without its timestamp.
fn console_texts(server: &FakeServer, id: &str) -> Vec<String> {
    let without_stamp = |l: &str| match l.strip_prefix("ERROR ") {
        Some(rest) => format!("ERROR {}", rest.split_once(' ').unwrap().1),
        None => l.split_once(' ').unwrap().1.to_string(),
    };
    server.run(id).unwrap().logs.iter().map(|l| without_stamp(l)).collect()
}

#[test]
fn events_console_and_run_files_arrive_in_the_official_shapes() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let metadata = json!({"host": "node-a", "gpu_count": 0});
    let reporter = Reporter::start_with_metadata(settings(&server.url, dir.path()), config(), None, Some(metadata)).unwrap();
    let id = reporter.run_id().to_string();
    reporter.console("resolved config:\n  lr: 0.0006", false, 1_795_430_275.084774);
    for step in 1..=3 {
        reporter.log(step, &row(step));
        reporter.log_events(&sample(step as f64));
    }
    reporter.console("a rank failed", true, 1_795_430_276.0);
    let report = reporter.finish(0);
    assert!(report.completed && report.warnings.is_empty(), "{report:?}");
    let run = server.run(&id).unwrap();
    assert_eq!(event_cpus(&server, &id), [1.0, 2.0, 3.0]);
    let line: Value = serde_json::from_str(&run.events[0]).unwrap();
    assert_eq!(line["_wandb"], true);
    assert!(line["_timestamp"].as_f64().unwrap() > 1.7e9 && line["_runtime"].as_f64().unwrap() >= 0.0);
    assert_eq!(line["system.rank.1.cpu"], 0.5);
    assert_eq!(
        run.logs,
        [
            "2026-11-23T10:37:55.084774 resolved config:",
            "2026-11-23T10:37:55.084774   lr: 0.0006",
            "ERROR 2026-11-23T10:37:56.000000 a rank failed"
        ]
    );
    assert_eq!(run.uploaded, ["config.yaml", "wandb-summary.json", "wandb-metadata.json", "output.log"]);
    let files = server.state().uploaded_files.clone();
    let console = &files.iter().find(|f| f.1 == "output.log").unwrap().2;
    assert_eq!(String::from_utf8_lossy(console), "resolved config:\n  lr: 0.0006\na rank failed\n");
    let metadata = &files.iter().find(|f| f.1 == "wandb-metadata.json").unwrap().2;
    let metadata: Value = serde_json::from_slice(metadata).unwrap();
    assert_eq!(metadata["host"], "node-a");
    let writer = metadata["writerId"].as_str().unwrap();
    assert_eq!(writer.len(), 32);
    // Also in the config, where the Overview tab reads it.
    let cfg: Value = serde_json::from_str(&run.config).unwrap();
    assert_eq!(cfg["_wandb"]["value"]["e"][writer]["host"], "node-a");
    // Offsets start at 0 and are contiguous.
    let offsets: Vec<u64> = server
        .ops("file_stream")
        .iter()
        .filter_map(|r| r.body.pointer("/files/wandb-events.jsonl").map(|e| e["offset"].as_u64().unwrap()))
        .collect();
    assert_eq!(offsets.first(), Some(&0));
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

#[test]
fn a_resume_continues_events_and_console_with_no_line_lost_or_twice() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let reporter = Reporter::start(settings(&server.url, dir.path()), config(), None).unwrap();
    let id = reporter.run_id().to_string();
    for step in 1..=3 {
        reporter.log(step, &row(step));
        reporter.log_events(&sample(step as f64));
        reporter.console(&format!("line {step}"), false, 1.8e9);
    }
    assert!(wait_until(Duration::from_secs(5), || server.run(&id).is_some_and(|r| r.events.len() == 3 && r.logs.len() == 3)));
    // The next request is applied but its answer never comes: the process dies with
    // those lines in flight.
    server.set_always(Some((Target::FileStream, Fault::DropAfter)));
    reporter.log(4, &row(4));
    reporter.log_events(&sample(4.0));
    reporter.console("line 4", false, 1.8e9);
    assert!(wait_until(Duration::from_secs(5), || server.run(&id).is_some_and(|r| r.events.len() == 4)));
    reporter.log_events(&sample(5.0));
    reporter.console("line 5", false, 1.8e9);
    std::thread::sleep(Duration::from_millis(50));
    drop(reporter);
    server.set_always(None);

    let reporter = Reporter::start(settings(&server.url, dir.path()), config(), Some((id.clone(), 4))).unwrap();
    reporter.log(5, &row(5));
    reporter.log_events(&sample(6.0));
    reporter.console("line 6", false, 1.8e9);
    assert!(reporter.finish(0).completed);
    assert_eq!(event_cpus(&server, &id), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(console_texts(&server, &id), (1..=6).map(|i| format!("line {i}")).collect::<Vec<_>>());
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

#[test]
fn offline_events_console_and_files_arrive_through_sync() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&server.url, dir.path());
    s.mode = Mode::Offline;
    let reporter = Reporter::start_with_metadata(s, config(), None, Some(json!({"host": "node-a"}))).unwrap();
    let id = reporter.run_id().to_string();
    for step in 1..=4 {
        reporter.log(step, &row(step));
        reporter.log_events(&sample(step as f64));
        reporter.console(&format!("line {step}"), step == 4, 1.8e9);
    }
    reporter.finish(0);
    assert!(server.requests().is_empty());
    sync(dir.path(), &sync_env(&server.url, KEY), None).unwrap();
    assert_eq!(event_cpus(&server, &id), [1.0, 2.0, 3.0, 4.0]);
    assert_eq!(console_texts(&server, &id), ["line 1", "line 2", "line 3", "ERROR line 4"]);
    let run = server.run(&id).unwrap();
    assert!(run.complete);
    assert_eq!(run.uploaded, ["config.yaml", "wandb-summary.json", "wandb-metadata.json", "output.log"]);
    // Nothing twice on a second sync.
    let n = server.requests().len();
    sync(dir.path(), &sync_env(&server.url, KEY), None).unwrap();
    assert_eq!(server.requests().len(), n);
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

#[test]
fn a_failed_upload_is_retried_and_a_refused_one_never_stops_the_finish() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    server.fail_next(Target::Upload, Fault::Status(503, None));
    let reporter = Reporter::start(settings(&server.url, dir.path()), config(), None).unwrap();
    let id = reporter.run_id().to_string();
    reporter.log(1, &row(1));
    let report = reporter.finish(0);
    assert!(report.completed && report.warnings.is_empty(), "{report:?}");
    assert_eq!(server.run(&id).unwrap().uploaded, ["config.yaml", "wandb-summary.json"], "retried after the 503");

    let server = FakeServer::start();
    server.set_always(Some((Target::Upload, Fault::Status(403, None))));
    let reporter = Reporter::start(settings(&server.url, dir.path()), config(), None).unwrap();
    let id = reporter.run_id().to_string();
    reporter.log(1, &row(1));
    let report = reporter.finish(0);
    assert!(report.completed, "{report:?}");
    assert!(report.warnings.iter().any(|w| w.contains("could not upload config.yaml")), "{:?}", report.warnings);
    let run = server.run(&id).unwrap();
    assert!(run.complete && run.exit_code == Some(0) && run.uploaded.is_empty());
}

// ---------------------------------------------------------------- bounded answers

/// 1 GiB: what a server, or a proxy before it, answered during training in issue 29.
const GIB: u64 = 1 << 30;

#[test]
fn answers_are_read_up_to_the_cap_and_no_further() {
    use super::api::{Api, Failure, Op, MAX_ANSWER_BYTES};
    let server = FakeServer::start();
    let api = Api::new(&server.url, KEY, None, None, Duration::from_secs(5)).unwrap();
    let limit = Duration::from_secs(60);
    // An answer of exactly the cap is read whole; a byte more, with its length or chunked
    // (no length, as a proxy streams), is a transient failure: retried, like a 5xx.
    for (bytes, chunked, accepted) in [
        (MAX_ANSWER_BYTES, false, true),
        (MAX_ANSWER_BYTES, true, true),
        (MAX_ANSWER_BYTES + 1, false, false),
        (MAX_ANSWER_BYTES + 1, true, false),
        (GIB, false, false),
        (GIB, true, false),
    ] {
        let what = format!("{bytes} bytes, chunked {chunked}");
        server.fail_next(Target::FileStream, Fault::HugeReply { bytes, chunked });
        let started = Instant::now();
        match api.file_stream("e", "p", "r", b"{}".to_vec(), limit) {
            Ok(answer) => {
                assert!(accepted, "{what}: read whole");
                assert_eq!(answer["pad"].as_str().map(str::len), Some(bytes as usize - 10), "{what}");
            }
            Err(Failure::Transient { why, retry_after: None }) => {
                assert!(!accepted, "{what}: {why}");
                assert_eq!(why, "an answer over 16 MiB, the most read", "{what}");
            }
            Err(other) => panic!("{what}: {other:?}"),
        }
        // Reading a gigabyte over loopback would take seconds more.
        assert!(started.elapsed() < Duration::from_secs(20), "{what}: {:?}", started.elapsed());
    }
    server.fail_next(Target::Graphql, Fault::HugeReply { bytes: GIB, chunked: true });
    let answer = api.graphql(Op::Upsert, "query", json!({}), limit);
    assert!(matches!(&answer, Err(Failure::Transient { why, .. }) if why.contains("over 16 MiB")), "{answer:?}");
}

#[test]
fn an_overlong_answer_is_retried_like_a_failed_request_and_loses_nothing() {
    let server = FakeServer::start();
    server.fail_next(Target::Graphql, Fault::HugeReply { bytes: GIB, chunked: true });
    for chunked in [true, false, true] {
        server.fail_next(Target::FileStream, Fault::HugeReply { bytes: GIB, chunked });
    }
    let dir = tempfile::tempdir().unwrap();
    let reporter = Reporter::start(settings(&server.url, dir.path()), config(), None).unwrap();
    let id = reporter.run_id().to_string();
    for step in 1..=5 {
        reporter.log(step, &row(step));
    }
    let report = reporter.finish(0);
    assert!(report.completed && report.pending_rows == 0, "{report:?}");
    assert_eq!(server.steps(&id), range(1, 5));
    assert!(server.errors().is_empty(), "{:?}", server.errors());
    let huge = server.requests().iter().filter(|r| r.fault.as_deref().is_some_and(|f| f.starts_with("HugeReply"))).count();
    assert_eq!(huge, 4, "every huge answer was asked for again");
    // Three failures in a row of one request: said once, as any outage.
    let said: Vec<&String> = report.warnings.iter().filter(|w| w.contains("an answer over 16 MiB")).collect();
    assert_eq!(said.len(), 1, "{:?}", report.warnings);
    assert!(said[0].contains("file_stream keeps failing") && said[0].contains("rows are kept"), "{}", said[0]);
}

// ---------------------------------------------------------------- malformed URLs, passwords

#[test]
fn a_malformed_base_url_is_refused_at_once_naming_the_variable_without_its_password() {
    for url in [
        "http://[::1", "http://127.0.0.1:99999", "http://alice:PASSWORD@127.0.0.1:99999", "https://alice:PASSWORD@[::1/x",
        "ftp://alice:PASSWORD@host", "http://", "http://exa mple.com", "127.0.0.1:8080",
    ] {
        let env = env_of(&[("WANDB_BASE_URL", url), ("WANDB_API_KEY", KEY)]);
        let e = resolve(&env, None).unwrap_err();
        let started = Instant::now();
        // sync refuses before it looks at the run directory or the network.
        let e_sync = sync(Path::new("/nonexistent/run"), &env, None).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        for e in [e, e_sync] {
            let text = format!("{e:#}");
            assert!(e.downcast_ref::<BadSetting>().is_some(), "{url}: {text}");
            assert!(text.starts_with("WANDB_BASE_URL \"") && !text.contains("PASSWORD"), "{url}: {text}");
        }
    }
    let e = resolve(&env_of(&[("WANDB_BASE_URL", "http://alice:PASSWORD@127.0.0.1:99999")]), None).unwrap_err();
    assert_eq!(
        format!("{e:#}"),
        "WANDB_BASE_URL \"http://alice@127.0.0.1:99999\" is malformed: invalid port number (expected http(s)://host[:port][/path])"
    );
    for url in ["http://[::1]:8080", "https://host:65535/path/", "http://alice:PASSWORD@host:1"] {
        assert!(resolve(&env_of(&[("WANDB_BASE_URL", url)]), None).is_ok(), "{url}");
    }
    // The other settings that can never work are refused the same way.
    for (k, v) in [("WANDB_MODE", "sometimes"), ("WANDB_RUN_ID", "a/b"), ("WANDB_PROJECT", "a/b")] {
        let e = resolve(&env_of(&[(k, v)]), None).unwrap_err();
        assert!(e.downcast_ref::<BadSetting>().is_some(), "{k}: {e:#}");
    }
    let s = settings("http://alice:PASSWORD@host", Path::new("x"));
    assert!(!format!("{s:?}").contains("PASSWORD"), "Debug hides the password: {s:?}");
}

/// sync with WANDB_BASE_URL=http://alice:PASSWORD@host: its errors name the server
/// without the password, as training's warnings do.
#[test]
fn sync_never_says_the_password_of_the_base_url() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let reporter = offline_reporter(&server.url, dir.path());
    reporter.log(1, &row(1));
    reporter.finish(0);
    let with_password = server.url.replacen("://", "://alice:PASSWORD@", 1);
    // A refused key, then a refused run: each error names the server.
    server.require_key(GOOD_KEY);
    let e = format!("{:#}", sync(dir.path(), &sync_env(&with_password, KEY), None).unwrap_err());
    assert!(e.contains("refused the API key") && e.contains("://alice@127.0.0.1") && !e.contains("PASSWORD"), "{e}");
    server.set_always(Some((Target::Graphql, Fault::Status(404, None))));
    let e = format!("{:#}", sync(dir.path(), &sync_env(&with_password, KEY), None).unwrap_err());
    assert!(e.contains("refused run") && e.contains("://alice@127.0.0.1") && !e.contains("PASSWORD"), "{e}");
}

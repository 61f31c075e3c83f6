//! W&B reporting end to end: the real binary against the loopback fake server
//! (wandb/src/fake_server.rs). Rows arrive once, in order, from rank 0 only; a
//! resumed run continues the same W&B run; a hanging server does not hold training up;
//! an offline run syncs later; Stop on the dashboard stops every rank with a checkpoint
//! (or only warns, with `wandb.honor_stop: false`).

mod common;
use algpt2_ddp::checkpoint;
use algpt2_ddp::report::wandb::fake_server::{FakeServer, Fault, StopHolds, Target};
use common::*;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A tiny run named `run` that logs every step to W&B, under `dir`.
fn args(dir: &Path, run: &str, extra: &[&str]) -> Vec<String> {
    let sets = [
        "--set", "wandb.mode=online", "--set", "train.micro_batch_size=4", "--set", "train.max_steps=8", "--set", "train.log_interval=1",
        "--set", "train.eval_interval=4", "--set", "train.eval_steps=1", "--set", "train.save_interval=4", "--set", "optim.warmup_steps=2",
        "--set", "wandb.flush_timeout_s=20",
    ];
    tiny_run_args(&sets, dir, run, extra)
}

/// The environment a user with a W&B key and a self-hosted server would have.
fn with_wandb(cmd: &mut Command, server: &FakeServer, dir: &Path, fault: Option<&str>) {
    with_wandb_env(cmd, Some(&server.url), dir);
    if let Some(f) = fault {
        cmd.env("ALGPT2_FAULT", f);
    }
}

fn train(a: &[String], server: &FakeServer, dir: &Path, fault: Option<&str>) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(a).current_dir(repo());
    with_wandb(&mut cmd, server, dir, fault);
    cmd.output().unwrap()
}

/// The one run the server holds.
fn only_run(server: &FakeServer) -> String {
    let runs: Vec<String> = server.state().runs.keys().cloned().collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs[0].clone()
}

#[test]
fn a_run_reports_every_row_once_config_summary_and_finish() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let out = train(&args(dir.path(), "quickstart", &[]), &server, dir.path(), None);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = only_run(&server);
    assert_eq!(server.steps(&id), (1..=8).collect::<Vec<u64>>());
    let run = server.run(&id).unwrap();
    assert!(run.complete, "the run is marked finished");
    assert_eq!(run.exit_code, Some(0));
    assert!(run.config.contains("\"parameters\"") && run.config.contains("git_revision"), "{}", run.config);
    assert!(run.summary.as_deref().unwrap_or("").contains("val/best_ppl"), "{:?}", run.summary);
    assert!(run.history[0].contains("train/loss") && run.history[0].contains("\"_step\":1"), "{}", run.history[0]);
    assert!(server.errors().is_empty(), "{:?}", server.errors());
    // The checkpoint keeps the run id for resume.
    let trainer = std::fs::read_to_string(dir.path().join("runs/quickstart/checkpoints/step_00000008/trainer.json")).unwrap();
    assert!(trainer.contains(&format!("\"wandb_run_id\": \"{id}\"")), "{trainer}");
}

#[test]
fn only_rank_0_reports_under_mpirun() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = mpirun(2);
    for var in ["WANDB_API_KEY", "WANDB_BASE_URL", "HOME"] {
        cmd.args(["-x", var]);
    }
    cmd.arg(bin()).args(args(dir.path(), "quickstart", &[])).current_dir(repo());
    with_wandb(&mut cmd, &server, dir.path(), None);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let id = only_run(&server);
    assert_eq!(server.steps(&id), (1..=8).collect::<Vec<u64>>());
    assert_eq!(server.ops("UpsertBucket").len(), server.run(&id).unwrap().upserts);
}

#[test]
fn a_resumed_run_continues_the_same_wandb_run() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = args(dir.path(), "quickstart", &[]);
    let killed = train(&a, &server, dir.path(), Some("kill@6"));
    assert!(!killed.status.success());
    let resumed = train(&a, &server, dir.path(), None);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let id = only_run(&server);
    assert_eq!(server.steps(&id), (1..=8).collect::<Vec<u64>>(), "no step lost or repeated");
    assert!(server.run(&id).unwrap().complete);
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

/// Wall time of the whole process and the training time it reported in `summary.json`.
fn timed_run(dir: &Path, run: &str, extra: &[&str], server: &FakeServer) -> (Output, Duration, f64) {
    let started = Instant::now();
    let out = train(&args(dir, run, extra), server, dir, None);
    let elapsed = started.elapsed();
    let summary = std::fs::read_to_string(dir.join("runs").join(run).join("summary.json")).unwrap_or_default();
    let wall = serde_json::from_str::<serde_json::Value>(&summary).ok().and_then(|v| v["wall_seconds"].as_f64()).unwrap_or(f64::NAN);
    (out, elapsed, wall)
}

/// `wandb-sync` of `run_dir` to `server`, which answers.
fn sync(run_dir: &Path, server: &FakeServer, home: &Path) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(["wandb-sync", run_dir.to_str().unwrap()]).current_dir(repo());
    with_wandb(&mut cmd, server, home, None);
    cmd.output().unwrap()
}

#[test]
fn a_hanging_server_does_not_hold_training_up() {
    // Both runs at once, so that they share whatever load the other tests put on the
    // machine: a sequential comparison flaked on a loaded 2-core CI runner.
    let (quiet_dir, slow_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let quiet = FakeServer::start();
    let hanging = FakeServer::start();
    hanging.set_always(Some((Target::Any, Fault::Hang(Duration::from_secs(60)))));
    let ((quiet_out, quiet_elapsed, quiet_train), (slow_out, slow_elapsed, slow_train)) = std::thread::scope(|s| {
        let q = s.spawn(|| timed_run(quiet_dir.path(), "fast", &["--set", "train.max_steps=12"], &quiet));
        let h =
            s.spawn(|| timed_run(slow_dir.path(), "slow", &["--set", "train.max_steps=12", "--set", "wandb.flush_timeout_s=2"], &hanging));
        (q.join().unwrap(), h.join().unwrap())
    });
    assert!(quiet_out.status.success(), "{}", stderr(&quiet_out));
    assert!(slow_out.status.success(), "{}", stderr(&slow_out));
    // A request held up by the server costs its HTTP timeout (20 s here); training that
    // waited on one would show it in its own reported time.
    assert!(
        slow_train < quiet_train + 10.0,
        "training took {slow_train:.1} s against a hanging server, {quiet_train:.1} s against a quiet one"
    );
    // At exit only the bounded flush (2 s) waits.
    let slow_tail = slow_elapsed.as_secs_f64() - slow_train;
    let quiet_tail = quiet_elapsed.as_secs_f64() - quiet_train;
    assert!(
        slow_tail < quiet_tail + 2.0 + 10.0,
        "start-up and exit took {slow_tail:.1} s against a hanging server, {quiet_tail:.1} s against a quiet one"
    );
    // Nothing was lost: the rows wait in the run directory for wandb-sync.
    hanging.set_always(None);
    let out = sync(&slow_dir.path().join("runs/slow"), &hanging, slow_dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let id = only_run(&hanging);
    assert_eq!(hanging.steps(&id), (1..=12).collect::<Vec<u64>>());
    assert!(hanging.run(&id).unwrap().complete);
}

#[test]
fn an_offline_run_syncs_later() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let out = train(&args(dir.path(), "quickstart", &["--set", "wandb.mode=offline"]), &server, dir.path(), None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(server.requests().is_empty(), "offline sends nothing");
    let out = sync(&dir.path().join("runs/quickstart"), &server, dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let id = only_run(&server);
    assert_eq!(server.steps(&id), (1..=8).collect::<Vec<u64>>());
    assert_eq!(server.run(&id).unwrap().exit_code, Some(0));
}

/// `wandb-sync` against a server that is not there: retry warnings, then exit 1 after
/// `--timeout` naming what is unsent; nothing lost, a later sync sends it all.
#[test]
fn wandb_sync_gives_up_after_its_timeout_and_loses_nothing() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let out = train(&args(dir.path(), "quickstart", &["--set", "wandb.mode=offline"]), &server, dir.path(), None);
    assert!(out.status.success(), "{}", stderr(&out));
    let run_dir = dir.path().join("runs/quickstart");
    let mut cmd = Command::new(bin());
    cmd.args(["wandb-sync", run_dir.to_str().unwrap(), "--timeout", "3"]).current_dir(repo());
    with_wandb_env(&mut cmd, Some("http://127.0.0.1:9"), dir.path());
    cmd.env("WANDB_X_FILE_STREAM_RETRY_WAIT_MIN_SECONDS", "0.05").env("WANDB_X_FILE_STREAM_RETRY_WAIT_MAX_SECONDS", "0.2");
    let started = Instant::now();
    let out = cmd.output().unwrap();
    let took = started.elapsed();
    let err = stderr(&out);
    eprintln!("FIGURE wandb-sync to no server, --timeout 3: exit {:?} after {:.1} s", out.status.code(), took.as_secs_f64());
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(took < Duration::from_secs(3 + 10), "took {took:?}");
    assert!(err.contains("keeps failing"), "no retry warning:\n{err}");
    assert!(err.contains("gave up after 3 s") && err.contains("8 of 8 rows") && err.contains("still unsent"), "{err}");
    // A later sync to a server that answers sends every row.
    let out = sync(&run_dir, &server, dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let id = only_run(&server);
    assert_eq!(server.steps(&id), (1..=8).collect::<Vec<u64>>());
    assert!(server.run(&id).unwrap().complete);
}

/// Every row goes up as soon as it is logged (the default is one request per 15 s), so
/// that the server's answer to step N's row comes back within a round trip.
const UPLOAD_AT_ONCE: (&str, &str) = ("WANDB_X_FILE_STREAM_TRANSMIT_INTERVAL", "0");

/// `mpirun -n 2` of the tiny run `args` reporting to `server`.
fn train_2_ranks(a: &[String], server: &FakeServer, dir: &Path) -> Output {
    let mut cmd = mpirun(2);
    for var in ["WANDB_API_KEY", "WANDB_BASE_URL", "HOME", UPLOAD_AT_ONCE.0] {
        cmd.args(["-x", var]);
    }
    cmd.arg(bin()).args(a).current_dir(repo());
    with_wandb(&mut cmd, server, dir, None);
    cmd.env(UPLOAD_AT_ONCE.0, UPLOAD_AT_ONCE.1);
    cmd.output().unwrap()
}

/// The step named by the line `stopped from the W&B dashboard after step S;`.
fn dashboard_stop_step(log: &str) -> Option<u64> {
    let tail = log.split("stopped from the W&B dashboard after step ").nth(1)?;
    tail.split(';').next()?.trim().parse().ok()
}

#[test]
fn stop_on_the_dashboard_stops_every_rank_with_a_checkpoint_and_the_same_command_resumes() {
    const PRESSED_AT: u64 = 4;
    let server = FakeServer::start();
    server.press_stop_at(PRESSED_AT, StopHolds::UntilFinished);
    let dir = tempfile::tempdir().unwrap();
    let sets = ["--set", "train.max_steps=12", "--set", "train.eval_interval=0", "--set", "train.grad_accum_steps=8"];
    let a = args(dir.path(), "quickstart", &sets);
    let started = Instant::now();
    let out = train_2_ranks(&a, &server, dir.path());
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let id = only_run(&server);
    let run = server.run(&id).unwrap();
    let answered = run.stop_answered_at_step.expect("the server answered stopped");
    let stopped = dashboard_stop_step(&err).unwrap_or_else(|| panic!("no dashboard stop line:\n{err}"));
    // Where rank 0 was when the answer went out: the last row it had logged by then.
    let answer_epoch = run.stop_answered_epoch.unwrap();
    let logged: Vec<(u64, f64)> = run
        .history
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["_step"].as_u64().unwrap(), v["_timestamp"].as_f64().unwrap()))
        .collect();
    let at_answer = logged.iter().filter(|(_, t)| *t <= answer_epoch).map(|(s, _)| *s).max().unwrap();
    let stop_logged = logged.iter().find(|(s, _)| *s == stopped).map_or(f64::NAN, |(_, t)| t - answer_epoch);
    let step_ms: Vec<f64> =
        run.history.iter().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["train/step_ms"].as_f64()).collect();
    eprintln!(
        "FIGURE dashboard stop: the server answered stopped holding step {answered}, rank 0 then at step {at_answer}; every rank \
         stopped after step {stopped} ({} steps after the answer; that step's row logged {:+.0} ms from it; steps {:.0?} ms); mpirun exit {:?}; {:.1} s",
        stopped.saturating_sub(at_answer),
        stop_logged * 1000.0,
        step_ms,
        out.status.code(),
        started.elapsed().as_secs_f64()
    );
    // Rank 0 reads the flag at the end of each step, after logging the step's row, and
    // the answer reaches it a loopback round trip after it went out (about 45 ms measured
    // on the 2-core machine: the uploader thread shares it with 2 ranks spinning in MPI).
    // The answer to a row sent at step X is seen at X's own boundary when it arrives
    // before the read, else at X + 1's, or at X + 2's when the round trip outlasts a whole
    // step: at most 2 steps after the answer. grad_accum_steps=8 makes a step longer
    // than that round trip, as real steps are (the tiny model's own take ~7 ms). The row
    // went up during a round trip too, so the answer holds rank 0's step or the one before.
    assert!(answered >= PRESSED_AT, "answered at {answered}");
    assert!((at_answer..=at_answer + 2).contains(&stopped), "the answer went out at step {at_answer}, every rank stopped after {stopped}");
    assert!(stopped <= answered + 3, "answered holding step {answered}, stopped after {stopped}");
    assert!(stopped < 12, "stopped before the end");
    let train_log = std::fs::read_to_string(dir.path().join("runs/quickstart/train.log")).unwrap();
    assert!(
        train_log.contains(&format!(
            "stopped from the W&B dashboard after step {stopped}; the checkpoint is saved: run the same command to resume"
        )),
        "{train_log}"
    );
    let saved = checkpoint::list_valid(&dir.path().join("runs/quickstart/checkpoints"));
    assert_eq!(saved.last().map(|f| f.state.step), Some(stopped), "the newest checkpoint is the stop's");
    assert!(run.complete && run.exit_code == Some(0), "marked finished with exit code 0: {run:?}");
    let last = server.ops("file_stream").pop().unwrap();
    assert_eq!((last.body["complete"].clone(), last.body["exitcode"].clone()), (serde_json::json!(true), serde_json::json!(0)));
    assert_eq!(server.steps(&id), (1..=stopped).collect::<Vec<u64>>());

    // The same command resumes from the stop's checkpoint (the Stop ended with the run
    // it stopped) and trains to the end, continuing the same W&B run.
    let out = train_2_ranks(&a, &server, dir.path());
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains(&format!("at step {stopped}")) && err.contains("resumed from"), "{err}");
    assert!(dashboard_stop_step(&err).is_none(), "{err}");
    assert_eq!(only_run(&server), id);
    assert_eq!(server.steps(&id), (1..=12).collect::<Vec<u64>>(), "no step lost or repeated");
    assert_eq!(server.run(&id).unwrap().exit_code, Some(0));
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

#[test]
fn with_honor_stop_false_a_dashboard_stop_only_warns() {
    let server = FakeServer::start();
    server.press_stop_at(2, StopHolds::UntilFinished);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(args(dir.path(), "quickstart", &["--set", "wandb.honor_stop=false"])).current_dir(repo());
    with_wandb(&mut cmd, &server, dir.path(), None);
    cmd.env(UPLOAD_AT_ONCE.0, UPLOAD_AT_ONCE.1);
    let out = cmd.output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let id = only_run(&server);
    assert!(server.run(&id).unwrap().stop_answered_at_step.is_some_and(|s| s < 8), "the server answered stopped during training");
    assert!(err.contains("stopped from the W&B dashboard; training goes on (wandb.honor_stop is false"), "{err}");
    assert!(dashboard_stop_step(&err).is_none(), "{err}");
    assert_eq!(server.steps(&id), (1..=8).collect::<Vec<u64>>(), "trained to train.max_steps");
    let saved = checkpoint::list_valid(&dir.path().join("runs/quickstart/checkpoints"));
    assert_eq!(saved.last().map(|f| f.state.step), Some(8));
}

//! W&B reporting end to end: the real binary against the loopback fake server
//! (wandb/src/fake_server.rs). Rows arrive once, in order, from rank 0 only; a
//! resumed run continues the same W&B run; a hanging server does not hold training up;
//! an offline run syncs later.

mod common;
use algpt2_ddp::report::wandb::fake_server::{FakeServer, Fault, Target};
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

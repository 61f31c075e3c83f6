//! Interoperability with the official W&B client (PyPI `wandb`, in the project venv),
//! both ways, on the loopback fake server: it resumes a run we created, and we resume a
//! run it created, each continuing the history without a repeated or missing step; with
//! system metrics and consoles on, the events and console lines of all of them follow one
//! another with no line lost, repeated or overwritten.

mod common;
use algpt2_ddp::report::wandb::fake_server::FakeServer;
use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn python() -> std::path::PathBuf {
    std::env::var_os("ALGPT2_WANDB_PYTHON").map_or_else(|| repo().join(".venv/bin/python"), Into::into)
}

fn official_client(server: &FakeServer, home: &Path, run_id: &str, first: u64, last: u64, full: bool) -> Output {
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("reference/wandb_client.py"))
        .args(["algpt2-ddp", run_id, &first.to_string(), &last.to_string()])
        .args(full.then_some("full"))
        .env("WANDB_DIR", home);
    with_wandb_env(&mut cmd, Some(&server.url), home);
    run_bounded(&mut cmd, LIMIT)
}

fn ours(server: &FakeServer, dir: &Path, run_id: Option<&str>, steps: u64) -> Output {
    ours_with(server, dir, run_id, steps, &[])
}

fn ours_with(server: &FakeServer, dir: &Path, run_id: Option<&str>, steps: u64, extra: &[&str]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(["--config", "configs/quickstart.yaml", "--set", "wandb.mode=online"])
        .args(extra)
        .args(TINY_MODEL)
        .args(["--set", "train.micro_batch_size=4", "--set", "train.log_interval=1", "--set", "train.eval_interval=0"])
        .args(["--set", "optim.warmup_steps=1", "--set", &format!("train.max_steps={steps}")])
        .arg(format!("--set=out_dir={}", dir.join("runs").display()))
        .arg(format!("--set=data.cache_dir={}", dir.join("cache").display()))
        .current_dir(repo());
    with_wandb_env(&mut cmd, Some(&server.url), dir);
    if let Some(id) = run_id {
        cmd.env("WANDB_RUN_ID", id);
    }
    run_bounded(&mut cmd, LIMIT)
}

#[test]
fn the_official_client_resumes_our_run_and_we_resume_its_run() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();

    // Ours creates a run (steps 1..4); the official client continues it (5..7).
    let out = ours(&server, &dir.path().join("a"), None, 4);
    assert!(out.status.success(), "{}", stderr(&out));
    let ids: Vec<String> = server.state().runs.keys().cloned().collect();
    assert_eq!(ids.len(), 1);
    let out = official_client(&server, dir.path(), &ids[0], 5, 7, false);
    assert!(out.status.success(), "official client:\n{}{}", stdout(&out), stderr(&out));
    assert_eq!(server.steps(&ids[0]), (1..=7).collect::<Vec<u64>>());
    assert!(server.run(&ids[0]).unwrap().complete);

    // The official client creates a run (1..3); ours continues it (given its id) and
    // appends only the steps the server does not have yet.
    let out = official_client(&server, dir.path(), "pyrun001", 1, 3, false);
    assert!(out.status.success(), "official client:\n{}{}", stdout(&out), stderr(&out));
    let out = ours(&server, &dir.path().join("b"), Some("pyrun001"), 6);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(server.steps("pyrun001"), (1..=6).collect::<Vec<u64>>());
    let run = server.run("pyrun001").unwrap();
    assert!(run.complete);
    assert!(run.config.contains("from_python") && run.config.contains("git_revision"), "{}", run.config);
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

/// The lines of a spool journal of ours (`events.jsonl`, `output.log`) under `run_dir`.
fn journal(run_dir: &Path, name: &str) -> Vec<String> {
    let spool = std::fs::read_dir(run_dir.join("wandb")).unwrap().next().unwrap().unwrap().path();
    std::fs::read_to_string(spool.join(name)).unwrap().lines().map(str::to_string).collect()
}

#[test]
fn events_and_consoles_of_both_clients_follow_one_another_on_one_run() {
    let server = FakeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let fast_stats = ["--set", "wandb.stats_interval_s=0.2"];
    // Ours creates the run (steps 1..4), the official client resumes it (5..7) with its
    // system metrics and console, then ours continues it from another directory (8..10).
    let out = ours_with(&server, &dir.path().join("a"), None, 4, &fast_stats);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = server.state().runs.keys().next().unwrap().clone();
    let after_ours = server.run(&id).unwrap();
    let out = official_client(&server, dir.path(), &id, 5, 7, true);
    assert!(out.status.success(), "official client:\n{}{}", stdout(&out), stderr(&out));
    let after_official = server.run(&id).unwrap();
    let out = ours_with(&server, &dir.path().join("c"), Some(&id), 10, &fast_stats);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = server.run(&id).unwrap();
    assert_eq!(server.steps(&id), (1..=10).collect::<Vec<u64>>());
    assert!(run.complete);

    // Each client's lines, in order, once: ours, then the official client's, then ours.
    let (ours_a, ours_c) =
        (journal(&dir.path().join("a/runs/quickstart"), "events.jsonl"), journal(&dir.path().join("c/runs/quickstart"), "events.jsonl"));
    let official_events = after_official.events.len() - after_ours.events.len();
    assert!(!ours_a.is_empty() && !ours_c.is_empty() && official_events > 0, "{} {} {official_events}", ours_a.len(), ours_c.len());
    assert_eq!(run.events[..ours_a.len()], ours_a[..]);
    assert!(run.events[ours_a.len()..ours_a.len() + official_events].iter().all(|l| l.contains("system.") && !l.contains("system.rank.")));
    assert_eq!(run.events[ours_a.len() + official_events..], ours_c[..]);
    let (logs_a, logs_c) =
        (journal(&dir.path().join("a/runs/quickstart"), "output.log"), journal(&dir.path().join("c/runs/quickstart"), "output.log"));
    let official_logs: Vec<&String> = run.logs[logs_a.len()..run.logs.len() - logs_c.len()].iter().collect();
    assert_eq!(run.logs[..logs_a.len()], logs_a[..]);
    assert_eq!(run.logs[run.logs.len() - logs_c.len()..], logs_c[..]);
    for step in 5..=7 {
        assert_eq!(official_logs.iter().filter(|l| l.ends_with(&format!("python client step {step}"))).count(), 1, "{official_logs:?}");
    }
    assert!(logs_a.iter().any(|l| l.contains(" INFO resolved config:")), "{logs_a:?}");
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

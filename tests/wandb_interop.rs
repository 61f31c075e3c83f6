//! Interoperability with the official W&B client (PyPI `wandb`, in the project venv),
//! both ways, on the loopback fake server: it resumes a run we created, and we resume a
//! run it created, each continuing the history without a repeated or missing step.

mod common;
use algpt2_ddp::report::wandb::fake_server::FakeServer;
use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn python() -> std::path::PathBuf {
    std::env::var_os("ALGPT2_WANDB_PYTHON").map_or_else(|| repo().join(".venv/bin/python"), Into::into)
}

fn official_client(server: &FakeServer, home: &Path, run_id: &str, first: u64, last: u64) -> Output {
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("reference/wandb_client.py"))
        .args(["algpt2-ddp", run_id, &first.to_string(), &last.to_string()])
        .env("WANDB_DIR", home);
    with_wandb_env(&mut cmd, Some(&server.url), home);
    cmd.output().unwrap()
}

fn ours(server: &FakeServer, dir: &Path, run_id: Option<&str>, steps: u64) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(["--config", "configs/quickstart.yaml", "--set", "wandb.mode=online"])
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
    cmd.output().unwrap()
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
    let out = official_client(&server, dir.path(), &ids[0], 5, 7);
    assert!(out.status.success(), "official client:\n{}{}", stdout(&out), stderr(&out));
    assert_eq!(server.steps(&ids[0]), (1..=7).collect::<Vec<u64>>());
    assert!(server.run(&ids[0]).unwrap().complete);

    // The official client creates a run (1..3); ours continues it (given its id) and
    // appends only the steps the server does not have yet.
    let out = official_client(&server, dir.path(), "pyrun001", 1, 3);
    assert!(out.status.success(), "official client:\n{}{}", stdout(&out), stderr(&out));
    let out = ours(&server, &dir.path().join("b"), Some("pyrun001"), 6);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(server.steps("pyrun001"), (1..=6).collect::<Vec<u64>>());
    let run = server.run("pyrun001").unwrap();
    assert!(run.complete);
    assert!(run.config.contains("from_python") && run.config.contains("git_revision"), "{}", run.config);
    assert!(server.errors().is_empty(), "{:?}", server.errors());
}

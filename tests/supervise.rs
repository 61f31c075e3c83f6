//! `algpt2-ddp supervise` under a real `mpirun -n 2`: a rank killed with SIGKILL and a
//! preemption (SIGTERM to every rank) each restart the job from its newest checkpoint,
//! and the run ends byte-identical to an uninterrupted one, every step logged once; a
//! configuration error or ranks that disagree (exit 2) and a stop asked of the supervisor
//! are never restarted; restarts are bounded and said (restarts.jsonl, the log,
//! summary.json).

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

// Long enough that the faults below land on the way on an idle machine too.
const STEPS: u64 = 48;

fn sets() -> Vec<&'static str> {
    vec![
        "--set", "train.micro_batch_size=4", "--set", "train.max_steps=48", "--set", "train.log_interval=1", "--set",
        "train.save_interval=4", "--set", "train.eval_interval=16", "--set", "train.eval_steps=2", "--set", "model.dropout=0.1", "--set",
        "checkpoint.keep_last=10", "--set", "dist.stop_grace_s=3", "--set", "optim.warmup_steps=2", "--set", "wandb.mode=disabled",
    ]
}

/// `supervise [flags] -- mpirun -n 2 algpt2-ddp <run>`.
fn supervised(dir: &Path, run: &str, flags: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("supervise").args(flags).arg("--");
    let mpirun = mpirun(2);
    cmd.arg(mpirun.get_program()).args(mpirun.get_args());
    cmd.arg(bin()).args(tiny_run_args(&sets(), dir, run, &[])).current_dir(repo());
    one_math_thread(&mut cmd);
    cmd
}

fn logged_steps(run_dir: &Path) -> usize {
    std::fs::read_to_string(run_dir.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

fn wait_for_steps(run_dir: &Path, n: usize, job: &mut Running) {
    let deadline = Instant::now() + LIMIT;
    while logged_steps(run_dir) < n {
        assert!(job.is_running(), "the job ended before step {n}: {}", job.stderr_so_far());
        assert!(Instant::now() < deadline, "no step {n} within {LIMIT:?}: {}", job.stderr_so_far());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pids of `parent`'s children.
fn children(parent: u32) -> Vec<u32> {
    let out = run_bounded(Command::new("pgrep").args(["-P", &parent.to_string()]), LIMIT);
    stdout(&out).split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// The two ranks of the supervised job (the supervisor's child is mpirun).
fn ranks(supervisor: u32) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ranks: Vec<u32> = children(supervisor).into_iter().flat_map(children).collect();
        if ranks.len() == 2 {
            return ranks;
        }
        assert!(Instant::now() < deadline, "the job's two ranks not found: {ranks:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kill(pid: u32, signal: i32) {
    // SAFETY: a plain kill.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill {pid}");
}

fn restarts(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("restarts.jsonl"))
        .map_or(vec![], |t| t.lines().map(|l| serde_json::from_str(l).unwrap()).collect())
}

#[test]
fn a_killed_rank_and_a_preemption_restart_the_job_and_it_ends_as_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let whole =
        run_bounded(one_math_thread(&mut mpirun(2)).arg(bin()).args(tiny_run_args(&sets(), d, "whole", &[])).current_dir(repo()), LIMIT);
    assert!(whole.status.success(), "{}", stderr(&whole));

    let run = d.join("runs/s");
    let mut job = spawn(&mut supervised(d, "s", &["--backoff", "0.2"]));
    // A rank killed after the checkpoint of step 4 and before that of step 8.
    wait_for_steps(&run, 6, &mut job);
    kill(ranks(job.id())[1], libc::SIGKILL);
    // Then, once the restarted job trains past the killed one's steps, a preemption as
    // Slurm sends it: SIGTERM to every rank.
    let deadline = Instant::now() + LIMIT;
    // Rows past the killed job's last one are the restarted job's: it trains, its stop
    // signals handled.
    let restarted_and_training = |run: &Path| {
        let records = restarts(run);
        let last = rows_without_machine_metrics(run).last().and_then(|r| r["step"].as_u64()).unwrap_or(0);
        records.len() == 1 && last > records[0]["failed_at_step"].as_u64().unwrap().max(10)
    };
    while !restarted_and_training(&run) {
        assert!(
            Instant::now() < deadline && job.is_running(),
            "no restart trained past the killed job and step 10: {}",
            job.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for rank in ranks(job.id()) {
        kill(rank, libc::SIGTERM);
    }
    let out = finish_bounded(job, LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");

    let records = restarts(&run);
    assert_eq!(records.len(), 2, "{records:?}\n{err}");
    assert!(
        records[0]["reason"].as_str().unwrap().contains("SIGKILL") || records[0]["reason"].as_str().unwrap().contains("exited"),
        "{records:?}"
    );
    for r in &records {
        // From the newest checkpoint (every 4 steps, or the preemption's own) at or before
        // the last logged step, which the restart trains again.
        let (failed, from) = (r["failed_at_step"].as_u64().unwrap(), r["resumes_from_step"].as_u64().unwrap());
        assert!(from <= failed && failed - from < 4 && from >= 4, "{records:?}");
        assert_eq!(r["steps_recomputed"], failed - from, "{records:?}");
    }
    assert!(records[0]["failed_at_step"].as_u64().unwrap() >= 6, "{records:?}");
    assert!(records[1]["reason"].as_str().unwrap().starts_with("preempted"), "{records:?}");
    assert!(
        err.contains("supervise: restart 1 by the supervisor:") && err.contains("supervise: restart 2 by the supervisor: preempted"),
        "{err}"
    );
    // The restarted run's own log names its restart (and so W&B's console would).
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("restart 2 by the supervisor: preempted"), "{log}");
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["restarts"], 2, "{summary}");
    let recomputed: u64 = records.iter().map(|r| r["steps_recomputed"].as_u64().unwrap()).sum();
    assert_eq!(summary["steps_recomputed"], recomputed, "{summary}");

    let (a, b) = (d.join("runs/whole"), &run);
    let last = format!("checkpoints/step_{STEPS:08}");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let x = std::fs::read(a.join(&last).join(file)).unwrap();
        let y = std::fs::read(b.join(&last).join(file)).unwrap();
        assert!(x == y, "{file} differs from the uninterrupted run's");
    }
    // Every step once, with the uninterrupted run's values.
    assert_eq!(rows_without_machine_metrics(&a), rows_without_machine_metrics(b));
}

/// Found by the chaos run (tests/chaos.rs): a rank killed after the final checkpoint and
/// before the summary was restarted, found the run complete and exited 0 without
/// `summary.json` (nor W&B's test/ppl).
#[test]
fn a_rank_killed_after_the_last_checkpoint_is_restarted_and_the_run_gets_its_summary() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = d.join("runs/e");
    let mut cmd = supervised(d, "e", &["--backoff", "0.1"]);
    // Rank 0 dies right after the final checkpoint's rename.
    cmd.env("ALGPT2_FAULT", format!("save_kill_renamed@{STEPS}"));
    let out = run_bounded(&mut cmd, LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let records = restarts(&run);
    assert_eq!(records.len(), 1, "{records:?}\n{err}");
    assert_eq!((records[0]["resumes_from_step"].as_u64(), records[0]["steps_recomputed"].as_u64()), (Some(STEPS), Some(0)));
    assert!(err.contains(&format!("the run is already complete at step {STEPS}")), "{err}");
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!((summary["steps"].as_u64(), summary["restarts"].as_u64()), (Some(STEPS), Some(1)), "{summary}");
    assert!(summary["test_ppl"].as_f64().is_some_and(f64::is_finite), "{summary}");
    assert_eq!(rows_without_machine_metrics(&run).len(), STEPS as usize, "every step once");
}

#[test]
fn ranks_that_disagree_are_not_restarted_and_the_supervisor_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let first = tiny_run_args(&sets(), d, "x", &["--set", "optim.lr=1e-3"]);
    let second = tiny_run_args(&sets(), d, "x", &["--set", "optim.lr=9e-3"]);
    // `mpirun [flags] -n 1 A : -n 1 B`: two programs, each with its own lr.
    let mut mpmd = Command::new(bin());
    mpmd.args(["supervise", "--backoff", "0.1", "--"]);
    let mpirun = mpirun(1);
    mpmd.arg(mpirun.get_program()).args(mpirun.get_args()).arg(bin()).args(&first);
    mpmd.args([":", "-n", "1"]).arg(bin()).args(&second).current_dir(repo());
    let started = Instant::now();
    let out = run_bounded(&mut mpmd, LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("optim.lr: rank 0 has"), "{err}");
    assert!(err.contains("supervise: the job exited 2: a configuration error or ranks launched with different settings"), "{err}");
    assert!(restarts(&d.join("runs/x")).is_empty());
    assert!(started.elapsed() < LIMIT);
}

#[test]
fn a_stop_asked_of_the_supervisor_is_passed_on_saved_and_never_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = d.join("runs/t");
    let mut cmd = supervised(d, "t", &["--backoff", "0.1"]);
    // A run long enough to be stopped on the way.
    cmd.args(["--set", "train.max_steps=100000"]);
    let mut job = spawn(&mut cmd);
    wait_for_steps(&run, 3, &mut job);
    kill(job.id(), libc::SIGTERM);
    let out = finish_bounded(job, LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("stopped by signal after step"), "{err}");
    assert!(restarts(&run).is_empty(), "{err}");
    let last_row = rows_without_machine_metrics(&run).last().unwrap()["step"].as_u64().unwrap();
    assert!(run.join(format!("checkpoints/step_{last_row:08}")).is_dir(), "saved at the last step, {last_row}: {err}");
}

#[test]
fn restarts_are_bounded_and_the_last_failure_is_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A job that fails at once, every time (its algpt2-ddp arguments name the run).
    let mut cmd = Command::new(bin());
    cmd.args(["supervise", "--max-restarts", "2", "--backoff", "0.1", "--", "bash", "-c", "exit 7", "algpt2-ddp"])
        .args(tiny_run_args(&sets(), d, "f", &[]))
        .current_dir(repo());
    let started = Instant::now();
    let out = run_bounded(&mut cmd, LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains("supervise: giving up after 2 restart(s) (--max-restarts): the job exited 7"), "{err}");
    let waits: Vec<f64> = restarts(&d.join("runs/f")).iter().map(|r| r["waited_s"].as_f64().unwrap()).collect();
    assert_eq!(waits, [0.1, 0.2], "the back-off doubles");
    assert!(started.elapsed() < Duration::from_secs(60));
    // Refused before anything starts: a job that is no training.
    let out = run_bounded(Command::new(bin()).args(["supervise", "--", "sleep", "1"]).current_dir(repo()), LIMIT);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("runs no algpt2-ddp"), "{}", stderr(&out));
}

/// `launch/slurm.sbatch` requeues its job when the ranks exit 75 (preempted), and only
/// then: with stand-ins for `srun` and `scontrol` on PATH.
#[test]
fn the_slurm_script_requeues_a_preempted_job_and_only_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fake = |name: &str, body: &str| {
        let path = d.join(name);
        std::fs::write(&path, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    };
    fake("srun", "echo \"srun $*\" >> \"$FAKE_LOG\"; exit \"$FAKE_SRUN_EXIT\"");
    fake("scontrol", "echo \"scontrol $*\" >> \"$FAKE_LOG\"");
    let path = format!("{}:{}", d.display(), std::env::var("PATH").unwrap_or_default());
    for (srun_exit, script_exit, requeued) in [(75, 0, true), (0, 0, false), (1, 1, false)] {
        let log = d.join(format!("log-{srun_exit}"));
        let out = run_bounded(
            Command::new("bash")
                .args(["launch/slurm.sbatch", "configs/quickstart.yaml", "--set", "train.max_steps=4"])
                .env("PATH", &path)
                .env("SLURM_JOB_ID", "4242")
                .env("SLURM_SUBMIT_DIR", repo())
                .env("FAKE_LOG", &log)
                .env("FAKE_SRUN_EXIT", srun_exit.to_string())
                .current_dir(repo()),
            LIMIT,
        );
        assert_eq!(out.status.code(), Some(script_exit), "srun exit {srun_exit}: {}", stderr(&out));
        let calls = std::fs::read_to_string(&log).unwrap();
        assert!(calls.contains("--config") && calls.contains("configs/quickstart.yaml --set train.max_steps=4"), "{calls}");
        assert_eq!(calls.contains("scontrol requeue 4242"), requeued, "srun exit {srun_exit}: {calls}");
    }
}

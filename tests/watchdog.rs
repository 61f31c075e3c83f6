//! The watchdog of one rank (`dist.timeout_s`) counts what is progress and what is a stop:
//! a final evaluation longer than the timeout is progress batch by batch, a checkpoint's
//! save longer than the timeout is progress (on the saving rank and on the ranks waiting
//! for it), the finish after the last collective is not timed, and a machine so loaded
//! that the watchdog's thread waits seconds for a core is not a stopped process.

mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// The tiny model, no W&B.
fn args(dir: &Path, run: &str, extra: &[&str]) -> Vec<String> {
    #[rustfmt::skip]
    let sets = [
        "--set", "wandb.mode=disabled", "--set", "train.log_interval=1", "--set", "train.eval_interval=0",
        "--set", "train.eval_steps=1", "--set", "optim.warmup_steps=2",
    ];
    tiny_run_args(&sets, dir, run, extra)
}

/// Parts of WikiText-2 in `d`, small enough that no rank spends long on the data: 200 kB
/// to train on, and with `valid` 100 kB (about 1,500 windows) to evaluate; no test split.
fn small_text(d: &Path, valid: bool) -> Vec<String> {
    let wikitext = repo().join("tests/data/wikitext-2");
    let (train, valid_file) = (d.join("train.txt"), d.join("valid.txt"));
    std::fs::write(&train, &std::fs::read(wikitext.join("wiki.valid.tokens")).unwrap()[..200_000]).unwrap();
    std::fs::write(&valid_file, &std::fs::read(wikitext.join("wiki.test.tokens")).unwrap()[..100_000]).unwrap();
    let valid = if valid { format!("--set=data.valid={}", valid_file.display()) } else { "--set=data.valid=null".to_string() };
    vec!["--set=data.format=text".to_string(), format!("--set=data.train={}", train.display()), valid, "--set=data.test=null".to_string()]
}

#[test]
fn a_final_evaluation_longer_than_the_timeout_is_progress() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut a = args(d, "e", &["--set", "dist.timeout_s=4", "--set", "train.max_steps=2", "--set", "train.save_interval=2"]);
    a.extend(small_text(d, true));
    // 16 batches of 0.5 s each (ALGPT2_FAULT=slow_eval, in any build): 8 s, twice the
    // timeout, each batch well under it.
    a.extend(["--set", "train.eval_steps=16", "--set", "train.eval_interval=0"].map(String::from));
    let mut cmd = std::process::Command::new(bin());
    cmd.arg("train").args(&a).env("ALGPT2_FAULT", "slow_eval@0").current_dir(repo());
    let started = Instant::now();
    let mut running = spawn(&mut cmd);
    // Step 2's row is written after its evaluation, step 1's before it: the time between
    // them is the evaluation's (a tiny step besides).
    let metrics = d.join("runs/e/metrics.jsonl");
    let rows_now = || std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count());
    let mut seen: Vec<Instant> = Vec::new();
    while running.is_running() && seen.len() < 2 {
        while seen.len() < rows_now().min(2) {
            seen.push(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = finish_bounded(running, LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("no training progress"), "{err}");
    let rows = std::fs::read_to_string(&metrics).unwrap();
    assert!(rows.lines().last().unwrap().contains("\"val/loss\""), "{rows}");
    assert_eq!(seen.len(), 2, "both rows were seen as they were written: {rows}");
    let evaluation = seen[1].duration_since(seen[0]);
    assert!(evaluation > Duration::from_secs(4), "the evaluation took {evaluation:?}, not longer than dist.timeout_s=4");
    eprintln!("trained, evaluated for {:.1} s and saved in {:.1} s", evaluation.as_secs_f64(), started.elapsed().as_secs_f64());
}

#[test]
fn a_save_longer_than_the_timeout_is_progress() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // One rank: step 2's save takes 8 s (ALGPT2_FAULT=slow_save@2), twice dist.timeout_s.
    let a = args(d, "s", &["--set", "dist.timeout_s=4", "--set", "train.max_steps=2", "--set", "train.save_interval=2"]);
    let mut cmd = std::process::Command::new(bin());
    cmd.arg("train").args(&a).env("ALGPT2_FAULT", "slow_save@2").current_dir(repo());
    let started = Instant::now();
    let out = run_bounded(&mut cmd, LIMIT);
    let took = started.elapsed();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("no training progress") && !err.contains("no progress in"), "{err}");
    assert!(d.join("runs/s/checkpoints/step_00000002/model.safetensors").is_file(), "{err}");
    assert!(took >= Duration::from_secs(8), "the save was slow: {took:?}");

    // Two ranks: rank 1 waits for rank 0's slow save (step 2 of 4) and trains on after it.
    // Little data and no evaluation: on a loaded machine, rank 1's check of a large cache
    // or one rank's share of an evaluation may end seconds after the other's, waits this
    // test is not about.
    let mut a = args(d, "s2", &["--set", "dist.timeout_s=4", "--set", "train.max_steps=4", "--set", "train.save_interval=2"]);
    a.extend(small_text(d, false));
    let mut cmd = mpirun(2);
    cmd.args(["-x", "ALGPT2_FAULT=slow_save@2"]).arg(bin()).arg("train").args(&a).current_dir(repo());
    let out = run_bounded(&mut cmd, LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("no training progress") && !err.contains("no progress in"), "{err}");
    assert!(d.join("runs/s2/checkpoints/step_00000004/model.safetensors").is_file(), "{err}");
}

#[test]
fn the_finish_after_the_last_collective_is_not_timed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // W&B unreachable: the finish waits wandb.flush_timeout_s (8 s > dist.timeout_s) for
    // it, then leaves the rows in the spool for `wandb-sync`.
    let mut a = args(d, "f", &["--set", "dist.timeout_s=4", "--set", "train.max_steps=2", "--set", "train.save_interval=2"]);
    a.extend(["--set", "wandb.mode=online", "--set", "wandb.flush_timeout_s=8", "--set", "wandb.stats=false"].map(String::from));
    let mut cmd = std::process::Command::new(bin());
    cmd.arg("train").args(&a).env("WANDB_API_KEY", "k".repeat(40)).env("WANDB_BASE_URL", "http://127.0.0.1:9").current_dir(repo());
    let started = Instant::now();
    let out = run_bounded(&mut cmd, LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("no training progress") && !err.contains("no progress in"), "{err}");
    assert!(started.elapsed() >= Duration::from_secs(8), "the finish waited for W&B");
}

/// A cgroup (v1 `cpu` or v2) that lets its processes run 3 ms of every second: the
/// watchdog's thread then waits seconds for a core, as on a machine with a load of 20.
/// None where cgroups cannot be made (not root, read-only).
struct Throttled {
    dir: std::path::PathBuf,
}

impl Throttled {
    fn new() -> Option<Throttled> {
        let name = format!("algpt2-test-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        if v1.join("cpu.cfs_quota_us").exists() {
            let dir = v1.join(&name);
            std::fs::create_dir(&dir).ok()?;
            let t = Throttled { dir };
            std::fs::write(t.dir.join("cpu.cfs_period_us"), "1000000").ok()?;
            std::fs::write(t.dir.join("cpu.cfs_quota_us"), "3000").ok()?;
            return Some(t);
        }
        let v2 = Path::new("/sys/fs/cgroup");
        if std::fs::read_to_string(v2.join("cgroup.subtree_control")).ok()?.contains("cpu") {
            let dir = v2.join(&name);
            std::fs::create_dir(&dir).ok()?;
            let t = Throttled { dir };
            std::fs::write(t.dir.join("cpu.max"), "3000 1000000").ok()?;
            return Some(t);
        }
        None
    }

    fn take(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).expect("move the process into the cgroup");
    }

    /// Periods in which the cgroup ran out of its quota.
    fn throttled_periods(&self) -> u64 {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
        let line = stat.lines().find(|l| l.starts_with("nr_throttled ")).unwrap_or("nr_throttled 0");
        line[13..].trim().parse().unwrap_or(0)
    }
}

impl Drop for Throttled {
    fn drop(&mut self) {
        // Empty once its process is gone.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_loaded_machine_is_not_taken_for_a_stopped_process() {
    let Some(cgroup) = Throttled::new() else {
        eprintln!("skipped: no cgroup can be made here to throttle the process (needs root and a writable cgroup fs)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = args(d, "l", &["--set", "train.max_steps=100000", "--set", "dist.timeout_s=120"]);
    let mut running = spawn(std::process::Command::new(bin()).arg("train").args(&a).current_dir(repo()));
    let metrics = d.join("runs/l/metrics.jsonl");
    let deadline = Instant::now() + LIMIT;
    while std::fs::read_to_string(&metrics).map_or(true, |t| t.lines().count() < 2) {
        assert!(Instant::now() < deadline, "training did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    cgroup.take(running.id());
    std::thread::sleep(Duration::from_secs(20));
    running.kill();
    let out = finish_bounded(running, LIMIT);
    let err = stderr(&out);
    assert!(cgroup.throttled_periods() >= 10, "the cgroup throttled the process: {}", cgroup.throttled_periods());
    assert!(!err.contains("frozen"), "{err}");
}

//! The watchdog of one rank (`dist.timeout_s`) counts what is progress and what is a stop:
//! a final evaluation longer than the timeout is progress batch by batch, the finish after
//! the last collective is not timed, and a machine so loaded that the watchdog's thread
//! waits seconds for a core is not a stopped process.

mod common;
use common::*;
use std::path::Path;
use std::process::Output;
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

/// One rank, `dist.timeout_s=4`: what comes after the steps must not end a run that
/// trained to its end.
fn one_rank_with_short_timeout(d: &Path, run: &str, extra: &[&str]) -> Output {
    let mut a = args(d, run, &["--set", "dist.timeout_s=4", "--set", "train.max_steps=2", "--set", "train.save_interval=2"]);
    a.extend(extra.iter().map(|s| s.to_string()));
    run_bounded(std::process::Command::new(bin()).arg("train").args(&a).current_dir(repo()), LIMIT)
}

#[test]
fn a_final_evaluation_longer_than_the_timeout_is_progress() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Parts of WikiText-2: 200 kB to train on, 100 kB (about 48k tokens, 95 batches of a
    // debug build's 80 ms) to evaluate, twice the timeout.
    let wikitext = repo().join("tests/data/wikitext-2");
    let (train, valid) = (d.join("train.txt"), d.join("valid.txt"));
    std::fs::write(&train, &std::fs::read(wikitext.join("wiki.valid.tokens")).unwrap()[..200_000]).unwrap();
    std::fs::write(&valid, &std::fs::read(wikitext.join("wiki.test.tokens")).unwrap()[..100_000]).unwrap();
    #[rustfmt::skip]
    let sets = [
        "--set".to_string(), "data.format=text".to_string(), format!("--set=data.train={}", train.display()),
        format!("--set=data.valid={}", valid.display()), "--set".to_string(), "data.test=null".to_string(),
        // The whole valid split: many batches, each well under the timeout.
        "--set".to_string(), "train.eval_steps=0".to_string(), "--set".to_string(), "train.eval_interval=0".to_string(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let started = Instant::now();
    let out = one_rank_with_short_timeout(d, "e", &sets);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("no training progress"), "{err}");
    let rows = std::fs::read_to_string(d.join("runs/e/metrics.jsonl")).unwrap();
    assert!(rows.lines().last().unwrap().contains("\"val/loss\""), "{rows}");
    eprintln!("trained, evaluated the whole valid split and saved in {:.1} s", started.elapsed().as_secs_f64());
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

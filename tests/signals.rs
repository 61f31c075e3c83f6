//! Stopping a run by signal, under a real `mpirun -n 2` and alone: SIGUSR1 (what the
//! launch scripts send on Ctrl-C) stops cleanly with mpirun exiting 0; a second signal,
//! or a launcher that returned and left its ranks behind, ends every rank within
//! `dist.stop_grace_s`; the last good checkpoint always survives and resumes.

mod common;
use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const GRACE_S: u64 = 2;

fn args(dir: &Path, extra: &[&str]) -> Vec<String> {
    #[rustfmt::skip]
    let sets = [
        "--set", "wandb.mode=disabled", "--set", "train.max_steps=100000", "--set", "train.log_interval=1",
        "--set", "train.eval_interval=0", "--set", "train.save_interval=5", "--set", "optim.warmup_steps=2",
        "--set", "train.micro_batch_size=4", "--set", "checkpoint.keep_last=2",
    ];
    let mut a = tiny_run_args(&sets, dir, "sig", extra);
    a.push(format!("--set=dist.stop_grace_s={GRACE_S}"));
    a
}

fn rows(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("runs/sig/metrics.jsonl")).map_or(0, |t| t.lines().count())
}

fn wait_for_rows(dir: &Path, n: usize, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while rows(dir) < n {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before {n} rows");
        assert!(Instant::now() < deadline, "the run did not reach {n} rows");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Processes whose command line names this test's run directory (the ranks).
fn ranks_alive(dir: &Path) -> Vec<String> {
    let out = Command::new("pgrep").args(["-f", &format!("out_dir={}", dir.join("runs").display())]).output().unwrap();
    stdout(&out).split_whitespace().map(String::from).collect()
}

fn wait_until_no_rank(dir: &Path, within: Duration) -> Duration {
    let started = Instant::now();
    while !ranks_alive(dir).is_empty() {
        assert!(started.elapsed() < within, "ranks {:?} still alive {:?} after the launcher returned", ranks_alive(dir), started.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap().success());
}

/// The newest checkpoint resumes: the same command with a nearby max_steps finishes.
fn resumes(dir: &Path) {
    let saved = std::fs::read_dir(dir.join("runs/sig/checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("step_"))
        .count();
    assert!(saved >= 1, "no checkpoint survived");
    let newest = rows(dir) as u64;
    let mut a = args(dir, &[]);
    a.push(format!("--set=train.max_steps={}", newest + 2));
    let out = Command::new(bin()).args(&a).current_dir(repo()).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resumed from"), "{}", stderr(&out));
}

#[test]
fn sigusr1_to_mpirun_stops_every_rank_cleanly_and_mpirun_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut child =
        mpirun(2).arg(bin()).args(args(d, &[])).current_dir(repo()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_rows(d, 3, &mut child);
    signal(child.id(), "USR1");
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "mpirun exit {:?}\n{err}", status.code());
    assert!(err.contains("stopped by signal after step"), "{err}");
    let last_row = rows(d);
    assert!(d.join(format!("runs/sig/checkpoints/step_{last_row:08}")).is_dir(), "no checkpoint at the last step {last_row}");
}

#[test]
fn a_second_signal_to_mpirun_leaves_no_rank_behind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Rank 1 hangs after step 7 (rank 0 then waits for it in a collective): no step
    // boundary comes, so only the grace period can end them.
    let mut child = mpirun(2)
        .args(["-x", "ALGPT2_FAULT=hang@7:1"])
        .arg(bin())
        .args(args(d, &[]))
        .current_dir(repo())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_rows(d, 6, &mut child);
    std::thread::sleep(Duration::from_millis(500));
    // What the issue reported: INT, then TERM half a second later.
    signal(child.id(), "INT");
    std::thread::sleep(Duration::from_millis(500));
    signal(child.id(), "TERM");
    let returned = Instant::now();
    child.wait().unwrap();
    let gone = wait_until_no_rank(d, Duration::from_secs(GRACE_S + 8));
    eprintln!(
        "FIGURE second signal: mpirun returned {:.1} s after the TERM; the last rank ended {:.1} s after mpirun",
        returned.elapsed().as_secs_f64() - gone.as_secs_f64(),
        gone.as_secs_f64()
    );
    resumes(d);
}

#[test]
fn two_signals_to_a_stuck_rank_end_it_within_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Hangs after step 6's update, before its row: 5 rows, then nothing.
    let mut child = Command::new(bin())
        .args(args(d, &[]))
        .env("ALGPT2_FAULT", "hang@6")
        .current_dir(repo())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_rows(d, 5, &mut child);
    std::thread::sleep(Duration::from_millis(500));
    signal(child.id(), "INT");
    std::thread::sleep(Duration::from_millis(300));
    // Stuck: the first signal alone cannot stop it (no step boundary comes).
    assert!(child.try_wait().unwrap().is_none());
    let second = Instant::now();
    signal(child.id(), "INT");
    let status = child.wait().unwrap();
    let took = second.elapsed();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    eprintln!(
        "FIGURE two signals to a stuck rank: exit {:?} {:.1} s after the second (dist.stop_grace_s = {GRACE_S})",
        status.code(),
        took.as_secs_f64()
    );
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(took >= Duration::from_secs(GRACE_S) && took < Duration::from_secs(GRACE_S + 6), "ended {took:?} after the second signal");
    assert!(err.contains("a second stop signal") && err.contains("stop grace period over"), "{err}");
    resumes(d);
}

#[test]
fn the_launch_scripts_turn_ctrl_c_into_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // launch/env.sh's run_job, as single-node.sh and quickstart.sh use it.
    let script = format!(
        "source launch/env.sh; run_job \"${{MPIRUN[@]}}\" -n 2 {} {}",
        bin(),
        args(d, &[]).iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(" ")
    );
    let mut child =
        Command::new("bash").args(["-c", &script]).current_dir(repo()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_rows(d, 3, &mut child);
    signal(child.id(), "INT");
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "exit {:?}\n{err}", status.code());
    assert!(err.contains("[launch] stopping") && err.contains("stopped by signal after step"), "{err}");
    let last_row = rows(d);
    assert!(d.join(format!("runs/sig/checkpoints/step_{last_row:08}")).is_dir(), "no checkpoint at the last step {last_row}");
    assert!(ranks_alive(d).is_empty());
}

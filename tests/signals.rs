//! Stopping a run by signal, under a real `mpirun -n 2` and alone: SIGUSR1 (what the
//! launch scripts send on Ctrl-C) stops cleanly with mpirun exiting 0; a second signal,
//! or a launcher that returned and left its ranks behind, ends every rank within
//! `dist.stop_grace_s`; the last good checkpoint always survives and resumes. The
//! launch scripts' `run_job` turns Ctrl-C into that clean stop, and says so when it
//! cannot (SIGINT ignored, as in a background job).

mod common;
use common::*;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const GRACE_S: u64 = 2;

/// How long a run may take to end once told to stop: a step, a checkpoint and the exit,
/// or the grace period; minutes only on a badly loaded machine.
const STOP_LIMIT: Duration = Duration::from_secs(120);

/// SIGINT, SIGTERM and SIGQUIT set to `disposition` (`SIG_DFL` or `SIG_IGN`) in the
/// process `cmd` starts, whatever this test process has.
fn with_signals(cmd: &mut Command, disposition: libc::sighandler_t) {
    // SAFETY: signal(2) is async-signal-safe, as a pre_exec closure needs.
    unsafe {
        cmd.pre_exec(move || {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGQUIT] {
                libc::signal(sig, disposition);
            }
            Ok(())
        });
    }
}

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

fn wait_for_rows(dir: &Path, n: usize, child: &mut Running) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while rows(dir) < n {
        assert!(child.is_running(), "the run ended before {n} rows:\n{}", child.stderr_so_far());
        assert!(Instant::now() < deadline, "the run did not reach {n} rows:\n{}", child.stderr_so_far());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Processes whose command line names this test's run directory (the ranks).
fn ranks_alive(dir: &Path) -> Vec<String> {
    let out = run_bounded(Command::new("pgrep").args(["-f", &format!("out_dir={}", dir.join("runs").display())]), LIMIT);
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
    let out = run_bounded(Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]), LIMIT);
    assert!(out.status.success(), "kill -{sig} {pid}: {}", stderr(&out));
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
    let out = run_bounded(Command::new(bin()).args(&a).current_dir(repo()), LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resumed from"), "{}", stderr(&out));
}

#[test]
fn sigusr1_to_mpirun_stops_every_rank_cleanly_and_mpirun_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut child = spawn(mpirun(2).arg(bin()).args(args(d, &[])).current_dir(repo()));
    wait_for_rows(d, 3, &mut child);
    signal(child.id(), "USR1");
    let out = finish_bounded(child, STOP_LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "mpirun exit {:?}\n{err}", out.status.code());
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
    let mut child = spawn(mpirun(2).args(["-x", "ALGPT2_FAULT=hang@7:1"]).arg(bin()).args(args(d, &[])).current_dir(repo()));
    wait_for_rows(d, 6, &mut child);
    std::thread::sleep(Duration::from_millis(500));
    // What the issue reported: INT, then TERM half a second later.
    signal(child.id(), "INT");
    std::thread::sleep(Duration::from_millis(500));
    signal(child.id(), "TERM");
    let returned = Instant::now();
    child.wait_bounded(STOP_LIMIT);
    let gone = wait_until_no_rank(d, Duration::from_secs(GRACE_S + 8));
    eprintln!(
        "FIGURE second signal: mpirun returned {:.1} s after the TERM; the last rank ended {:.1} s after mpirun",
        returned.elapsed().as_secs_f64() - gone.as_secs_f64(),
        gone.as_secs_f64()
    );
    // Its output ends once the last rank is gone.
    finish_bounded(child, LIMIT);
    resumes(d);
}

#[test]
fn two_signals_to_a_stuck_rank_end_it_within_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Hangs after step 6's update, before its row: 5 rows, then nothing.
    let mut child = spawn(Command::new(bin()).args(args(d, &[])).env("ALGPT2_FAULT", "hang@6").current_dir(repo()));
    wait_for_rows(d, 5, &mut child);
    std::thread::sleep(Duration::from_millis(500));
    signal(child.id(), "INT");
    std::thread::sleep(Duration::from_millis(300));
    // Stuck: the first signal alone cannot stop it (no step boundary comes).
    assert!(child.is_running(), "{}", child.stderr_so_far());
    let second = Instant::now();
    signal(child.id(), "INT");
    let status = child.wait_bounded(STOP_LIMIT);
    let took = second.elapsed();
    let err = stderr(&finish_bounded(child, LIMIT));
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
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &script]).current_dir(repo());
    // As from a terminal, whatever the shell that started the tests ignores (a `nohup
    // cargo test &` job ignores SIGINT, and a bash started so cannot trap it).
    with_signals(&mut cmd, libc::SIG_DFL);
    let mut child = spawn(&mut cmd);
    wait_for_rows(d, 3, &mut child);
    signal(child.id(), "INT");
    let out = finish_bounded(child, STOP_LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "exit {:?}\n{err}", out.status.code());
    assert!(err.contains("[launch] stopping") && err.contains("stopped by signal after step"), "{err}");
    assert!(!err.contains("Ctrl-C cannot stop"), "{err}");
    let last_row = rows(d);
    assert!(d.join(format!("runs/sig/checkpoints/step_{last_row:08}")).is_dir(), "no checkpoint at the last step {last_row}");
    assert!(ranks_alive(d).is_empty());
}

/// A shell that ignores SIGINT (started in the background) cannot trap it: `run_job` says
/// at once that Ctrl-C cannot stop the job and that `kill -TERM <its pid>` will, and TERM
/// does (here the job is `sleep`, which the stop's SIGUSR1 ends).
#[test]
fn run_job_says_when_ctrl_c_cannot_stop_it_and_term_does() {
    let mut cmd = Command::new("bash");
    cmd.args(["-c", "source launch/env.sh; run_job sleep 300"]).current_dir(repo());
    with_signals(&mut cmd, libc::SIG_DFL);
    // SAFETY: as in with_signals.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child = spawn(&mut cmd);
    let said = format!("Ctrl-C cannot stop this job; kill -TERM {} will", child.id());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !child.stderr_so_far().contains(&said) {
        assert!(child.is_running() && Instant::now() < deadline, "no `{said}` from run_job:\n{}", child.stderr_so_far());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Ctrl-C does nothing; TERM stops the job.
    signal(child.id(), "INT");
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.is_running(), "SIGINT ended it:\n{}", child.stderr_so_far());
    signal(child.id(), "TERM");
    let out = finish_bounded(child, Duration::from_secs(60));
    let err = stderr(&out);
    assert!(err.contains("[launch] stopping"), "{err}");
    assert_eq!(err.matches("[launch] SIGINT is ignored").count(), 1, "{err}");
    // sleep ended by SIGUSR1: 128 + 10.
    assert_eq!(out.status.code(), Some(128 + libc::SIGUSR1), "{err}");
}

/// The tests' own helper (tests/common): a process past its limit is killed with all it
/// started, here a grandchild in a session of its own, and the failure names the
/// command, the limit and what the process said.
#[test]
fn a_process_past_its_limit_is_killed_with_all_it_started() {
    let child = spawn(Command::new("bash").args(["-c", "setsid sleep 300 & echo grandchild $!; sleep 300"]));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !child.stdout_so_far().ends_with('\n') {
        assert!(Instant::now() < deadline, "bash said nothing");
        std::thread::sleep(Duration::from_millis(10));
    }
    let said = child.stdout_so_far();
    let grandchild: u32 = said.trim().strip_prefix("grandchild ").unwrap().parse().unwrap();
    let failure = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| finish_bounded(child, Duration::from_secs(1))));
    let message = *failure.expect_err("it ran past its limit").downcast::<String>().unwrap();
    assert!(message.contains("setsid sleep 300") && message.contains("limit of 1s") && message.contains(said.trim()), "{message}");
    // Gone, or a zombie until its new parent reaps it.
    let gone = Instant::now() + Duration::from_secs(10);
    let alive = || std::fs::read_to_string(format!("/proc/{grandchild}/stat")).is_ok_and(|s| !s.contains(") Z "));
    while alive() {
        assert!(Instant::now() < gone, "the grandchild {grandchild} outlived the time-out");
        std::thread::sleep(Duration::from_millis(10));
    }
}

//! Data-parallel training under a real `mpirun -n 2`: gradient-averaging semantics,
//! distributed evaluation, resume at another world size, a killed rank, a hung rank and a
//! stopped one (each named by the watchdog), a job stopped and continued whole, a stop
//! signal, and divergence detection.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A tiny model on the synthetic corpus; dropout off so that runs at different world
/// sizes compute the same function.
fn args(dir: &Path, run: &str, extra: &[&str]) -> Vec<String> {
    #[rustfmt::skip]
    let sets = [
        "--set", "wandb.mode=disabled", "--set", "model.dropout=0.0",
        "--set", "train.max_steps=8", "--set", "train.log_interval=1",
        "--set", "train.eval_interval=4", "--set", "train.eval_steps=0", "--set", "train.save_interval=4",
        "--set", "optim.warmup_steps=2", "--set", "checkpoint.keep_last=5", "--set", "dist.check_interval=1",
    ];
    tiny_run_args(&sets, dir, run, extra)
}

fn one_rank(a: &[String]) -> Output {
    run_bounded(Command::new(bin()).args(a).current_dir(repo()), LIMIT)
}

fn two_ranks(a: &[String], fault: Option<&str>) -> Output {
    let mut cmd = mpirun(2);
    if let Some(f) = fault {
        cmd.args(["-x", &format!("ALGPT2_FAULT={f}")]);
    }
    cmd.arg(bin()).args(a).current_dir(repo());
    run_bounded(&mut cmd, LIMIT)
}

fn rows(dir: &Path, run: &str) -> Vec<Value> {
    let path = dir.join("runs").join(run).join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    // A run still going may be caught mid-line: only complete lines count.
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn series(rows: &[Value], key: &str) -> Vec<f64> {
    rows.iter().filter_map(|r| r[key].as_f64()).collect()
}

fn assert_close(a: &[f64], b: &[f64], rel: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= rel * y.abs().max(1e-12), "{what}: {a:?} vs {b:?}");
    }
}

fn checkpoint(dir: &Path, run: &str, step: u64) -> PathBuf {
    dir.join("runs").join(run).join(format!("checkpoints/step_{step:08}"))
}

/// Largest relative difference between two checkpoints' model tensors.
fn weight_difference(a: &Path, b: &Path) -> f64 {
    let load = |p: &Path| -> std::collections::BTreeMap<String, tch::Tensor> {
        tch::Tensor::read_safetensors(p.join("model.safetensors")).unwrap().into_iter().collect()
    };
    let (x, y) = (load(a), load(b));
    assert_eq!(x.len(), y.len());
    x.iter()
        .map(|(name, t)| {
            let u = &y[name];
            (t - u).abs().max().double_value(&[]) / u.abs().max().double_value(&[]).max(1e-12)
        })
        .fold(0.0, f64::max)
}

#[test]
fn two_ranks_of_b_follow_one_rank_of_2b() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // fp32, whatever `auto` picks on this CPU: the bounds below are fp32 rounding's (the
    // bf16 test after this one has bf16's).
    let args = |d: &Path, run: &str, extra: &[&str]| {
        let mut a = args(d, run, extra);
        a.extend(["--set".to_string(), "train.precision=fp32".to_string()]);
        a
    };
    let two = two_ranks(&args(d, "two", &["--set", "train.micro_batch_size=4"]), None);
    assert!(two.status.success(), "{}", stderr(&two));
    assert!(stderr(&two).contains("gradient exchange: mpi"), "{}", stderr(&two));
    let one = one_rank(&args(d, "one", &["--set", "train.micro_batch_size=8"]));
    assert!(one.status.success(), "{}", stderr(&one));
    let (r2, r1) = (rows(d, "two"), rows(d, "one"));
    assert_close(&series(&r2, "train/loss"), &series(&r1, "train/loss"), 1e-5, "train/loss");
    assert_close(&series(&r2, "val/loss"), &series(&r1, "val/loss"), 1e-5, "val/loss");
    // Adam is blind to the gradients' scale, so the norm is what shows that the ranks
    // average (summing would double it).
    assert_close(&series(&r2, "train/grad_norm"), &series(&r1, "train/grad_norm"), 1e-4, "train/grad_norm");
    // Adam also magnifies fp32 rounding in near-zero gradient entries into whole-lr steps,
    // so the weights agree to ~1e-4 of their largest magnitude, not to rounding.
    let diff = weight_difference(&checkpoint(d, "two", 8), &checkpoint(d, "one", 8));
    assert!(diff < 1e-3, "final weights differ by {diff}");
    // Gradient accumulation is the same computation again: 1 rank, 2 micro-steps of 4.
    let accum = one_rank(&args(d, "accum", &["--set", "train.micro_batch_size=4", "--set", "train.grad_accum_steps=2"]));
    assert!(accum.status.success(), "{}", stderr(&accum));
    assert_close(&series(&rows(d, "accum"), "train/loss"), &series(&r1, "train/loss"), 1e-5, "accumulated train/loss");
}

/// The same in bf16 compute: the ranks' micro-batches are half as large, so the bf16
/// products round differently than one rank's, and the bounds are bf16's (losses within
/// 1%; the final weights within 1% normwise: measured 0.13%); both runs said bf16.
#[test]
fn two_ranks_of_b_follow_one_rank_of_2b_in_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bf16 = ["--set", "train.precision=bf16"];
    let two = two_ranks(&args(d, "two", &[&bf16[..], &["--set", "train.micro_batch_size=4"]].concat()), None);
    assert!(two.status.success(), "{}", stderr(&two));
    assert!(stderr(&two).contains("precision: bf16"), "{}", stderr(&two));
    let one = one_rank(&args(d, "one", &[&bf16[..], &["--set", "train.micro_batch_size=8"]].concat()));
    assert!(one.status.success(), "{}", stderr(&one));
    let (r2, r1) = (rows(d, "two"), rows(d, "one"));
    assert_close(&series(&r2, "train/loss"), &series(&r1, "train/loss"), 1e-2, "train/loss");
    assert_close(&series(&r2, "val/loss"), &series(&r1, "val/loss"), 1e-2, "val/loss");
    assert_close(&series(&r2, "train/grad_norm"), &series(&r1, "train/grad_norm"), 5e-2, "train/grad_norm");
    // Adam turns bf16 rounding in near-zero gradient entries into whole-lr steps of either
    // sign, so single entries differ; the model as a whole (normwise) stays close.
    let diff = weight_norm_difference(&checkpoint(d, "two", 8), &checkpoint(d, "one", 8));
    eprintln!("bf16, 2 ranks of 4 vs 1 rank of 8: normwise weight difference {diff:.4}");
    assert!(diff < 1e-2, "final weights differ normwise by {diff}");
}

/// Gradient accumulation is the ranks' average, to fp32 rounding, in fp32 and in bf16:
/// one rank accumulating 2 micro-steps of 4 windows and 2 ranks of 4 windows each train
/// on the same windows (micro-step m of rank r is window slice m·world + r). The
/// objective scales each micro-step's loss by 1/(tokens · grad_accum_steps), a power of
/// two apart between the two runs, which changes no rounding. Dropout is off (its masks
/// are keyed by rank and micro-step) and every process has one math thread.
///
/// What differs is the order of fp32 additions: the one rank adds each micro-step's
/// gradients into the accumulating fp32 buffer (in bf16, each micro-step's bf16
/// gradients whole; the tied table's lookup and head parts and, in fp32, each use of the
/// shared block, one by one), the two ranks add a micro-step's whole gradient to the
/// other rank's. A few fp32 roundings (2^-24) per step, which AdamW carries into the
/// weights. Bound: 1e-6 normwise (measured 9.2e-8 in fp32; 0 in bf16, where the weights
/// came out byte-identical and only a few AdamW second moments differed by an ulp).
/// Summing micro-steps' gradients in bf16 (tests/sabotage/bf16-gradient-sum.patch) rounds
/// the one rank's sum to 2^-9: measured 5.0e-4 normwise after 8 steps, 500× the bound.
#[test]
fn accumulated_micro_steps_are_the_ranks_average() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for precision in ["fp32", "bf16"] {
        let precision_set = format!("train.precision={precision}");
        let pin = ["--set", precision_set.as_str()];
        let (two, one) = (format!("two_{precision}"), format!("accum_{precision}"));
        let out = two_ranks(&args(d, &two, &[&pin[..], &["--set", "train.micro_batch_size=4"]].concat()), None);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains(&format!("precision: {precision}")), "{}", stderr(&out));
        let mut cmd = Command::new(bin());
        let a = args(d, &one, &[&pin[..], &["--set", "train.micro_batch_size=4", "--set", "train.grad_accum_steps=2"]].concat());
        one_math_thread(&mut cmd).args(a).current_dir(repo());
        let out = run_bounded(&mut cmd, LIMIT);
        assert!(out.status.success(), "{}", stderr(&out));
        for step in [4, 8] {
            let diff = weight_norm_difference(&checkpoint(d, &two, step), &checkpoint(d, &one, step));
            eprintln!("{precision}, step {step}: 2 ranks of 4 vs 1 rank of 2 micro-steps of 4: normwise weight difference {diff:.3e}");
            assert!(diff < 1e-6, "{precision}: the weights at step {step} differ normwise by {diff:e}");
        }
    }
}

#[test]
fn bf16_gradient_exchange_follows_the_fp32_one_closely() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fp32 = two_ranks(&args(d, "fp32", &["--set", "train.micro_batch_size=4"]), None);
    assert!(fp32.status.success(), "{}", stderr(&fp32));
    let bf16 = two_ranks(&args(d, "bf16", &["--set", "train.micro_batch_size=4", "--set", "dist.grad_dtype=bf16"]), None);
    assert!(bf16.status.success(), "{}", stderr(&bf16));
    assert!(stderr(&bf16).contains("gradient exchange: mpi, bf16 gradients"), "{}", stderr(&bf16));
    let (a, b) = (rows(d, "bf16"), rows(d, "fp32"));
    // bf16 keeps 8 bits of mantissa: the averaged gradients are off by up to 2^-8
    // relative, which the loss barely sees and the norm sees a little.
    assert_close(&series(&a, "train/loss"), &series(&b, "train/loss"), 2e-3, "train/loss");
    assert_close(&series(&a, "train/grad_norm"), &series(&b, "train/grad_norm"), 2e-2, "train/grad_norm");
    // ...and it did round: the runs are not the same computation.
    assert_ne!(series(&a, "train/grad_norm"), series(&b, "train/grad_norm"), "bf16 must change the gradients");
    // Adam turns the rounding of near-zero gradient entries into whole-lr steps, so the
    // weights are compared by what they do: the validation loss. (The ranks stayed
    // identical to each other: dist.check_interval=1 compares them every step.)
    assert_close(&series(&a, "val/loss"), &series(&b, "val/loss"), 2e-3, "val/loss");
}

#[test]
fn distributed_eval_equals_single_rank_eval() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = args(d, "e", &["--set", "train.micro_batch_size=4", "--set", "train.max_steps=4"]);
    assert!(one_rank(&a).status.success());
    let mut eval: Vec<String> = vec!["eval".into()];
    eval.extend(a.iter().cloned());
    eval.extend(["--checkpoint".into(), checkpoint(d, "e", 4).display().to_string()]);
    let single = one_rank(&eval);
    assert!(single.status.success(), "{}", stderr(&single));
    let double = two_ranks(&eval, None);
    assert!(double.status.success(), "{}", stderr(&double));
    let parse = |o: &Output| -> Value { serde_json::from_str(stdout(o).trim()).unwrap() };
    let (s, m) = (parse(&single), parse(&double));
    assert_eq!(s["windows"], m["windows"]);
    assert_eq!(s["tokens"], m["tokens"]);
    // The same windows and per-token losses; only fp32 kernel rounding for another batch
    // shape may differ.
    assert_close(&[m["loss"].as_f64().unwrap()], &[s["loss"].as_f64().unwrap()], 1e-6, "eval loss");
}

#[test]
fn resume_from_two_ranks_on_one_rank_with_the_same_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let whole = two_ranks(&args(d, "whole", &["--set", "train.micro_batch_size=4"]), None);
    assert!(whole.status.success(), "{}", stderr(&whole));
    // The same 8-step run on 2 ranks, killed after step 5 (its last checkpoint: step 4).
    let first = two_ranks(&args(d, "moved", &["--set", "train.micro_batch_size=4"]), Some("kill@5"));
    assert!(!first.status.success());
    assert!(checkpoint(d, "moved", 4).is_dir());
    // Global batch 8 = 4 x 2 ranks before, 4 x 2 micro-steps x 1 rank after.
    let a = args(d, "moved", &["--set", "train.micro_batch_size=4", "--set", "train.grad_accum_steps=2"]);
    let rest = one_rank(&a);
    assert!(rest.status.success(), "{}", stderr(&rest));
    assert!(stderr(&rest).contains("resumed from"), "{}", stderr(&rest));
    assert_close(&series(&rows(d, "moved"), "train/loss"), &series(&rows(d, "whole"), "train/loss"), 1e-5, "train/loss");
    let diff = weight_difference(&checkpoint(d, "moved", 8), &checkpoint(d, "whole", 8));
    assert!(diff < 1e-3, "final weights differ by {diff}");
}

#[test]
fn a_killed_rank_ends_the_job_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = two_ranks(&args(dir.path(), "k", &["--set", "train.micro_batch_size=4", "--set", "train.max_steps=200"]), Some("kill@3:1"));
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    // Rank 0 never finished the run.
    assert!(!checkpoint(dir.path(), "k", 200).exists());
}

#[test]
fn a_hung_rank_is_detected_by_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let a = args(dir.path(), "h", &["--set", "train.micro_batch_size=4", "--set", "train.max_steps=200", "--set", "dist.timeout_s=4"]);
    let out = two_ranks(&a, Some("hang@3:1"));
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    let err = stderr(&out);
    eprintln!(
        "FIGURE hung rank: mpirun returned after {:.1} s\n{}\n{}",
        started.elapsed().as_secs_f64(),
        line_of_rank(&err, 0),
        line_of_rank(&err, 1)
    );
    // Rank 1 stopped after step 3's update: step 2 is its last complete one. Rank 0,
    // waiting for it in a collective, names it; rank 1 knows it stopped on its own.
    let on_0 = line_of_rank(&err, 0);
    assert!(on_0.contains("no training progress for"), "{err}");
    assert!(on_0.contains("rank 1 stopped making progress (last completed step 2, not waiting in a collective"), "{err}");
    assert!(line_of_rank(&err, 1).contains("this rank stopped making progress outside any collective after step 2"), "{err}");
}

/// The watchdog's line of `rank` in the job's stderr ("" when it wrote none).
fn line_of_rank(err: &str, rank: usize) -> String {
    let head = format!("error on rank {rank}: no training progress for");
    err.lines().find(|l| l.contains(&head)).unwrap_or_default().to_string()
}

/// A two-rank job of the tiny model that runs until stopped.
fn endless_two_ranks(dir: &Path, timeout_s: u64) -> Running {
    #[rustfmt::skip]
    let extra = [
        "--set", "train.micro_batch_size=4", "--set", "train.max_steps=100000", "--set", "train.save_interval=0",
        "--set", "train.eval_interval=0", "--set", &format!("dist.timeout_s={timeout_s}"),
    ];
    let a = args(dir, "f", &extra);
    spawn(mpirun(2).arg(bin()).args(&a).current_dir(repo()))
}

fn wait_for_rows(dir: &Path, n: usize, child: &mut Running) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while rows(dir, "f").len() < n {
        assert!(child.is_running(), "the run ended before {n} rows:\n{}", child.stderr_so_far());
        assert!(Instant::now() < deadline, "the run did not reach {n} rows:\n{}", child.stderr_so_far());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The rank processes of an mpirun job (its children), by rank.
fn rank_pids(mpirun: &Running) -> Vec<String> {
    let children = run_bounded(Command::new("pgrep").args(["-P", &mpirun.id().to_string()]), LIMIT);
    let mut ranked: Vec<(usize, String)> = stdout(&children)
        .split_whitespace()
        .filter_map(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let rank = env.split(|b| *b == 0).find_map(|v| v.strip_prefix(b"OMPI_COMM_WORLD_RANK="))?;
            Some((std::str::from_utf8(rank).ok()?.parse().ok()?, pid.to_string()))
        })
        .collect();
    ranked.sort();
    assert_eq!(ranked.len(), 2, "{ranked:?}");
    ranked.into_iter().map(|(_, pid)| pid).collect()
}

fn kill(sig: &str, pids: &[&String]) {
    run_bounded(Command::new("kill").arg(format!("-{sig}")).args(pids), LIMIT);
}

/// The job's end: its exit status and stderr, within `within` (else killed, and a panic).
fn wait_or_kill(child: Running, within: Duration) -> (std::process::ExitStatus, String) {
    let out = finish_bounded(child, within);
    (out.status, stderr(&out))
}

#[test]
fn a_stopped_rank_is_named_as_silent_and_knows_it_was_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut child = endless_two_ranks(d, 4);
    wait_for_rows(d, 3, &mut child);
    // Heartbeats for a while, as in any real run.
    std::thread::sleep(Duration::from_secs(1));
    let pids = rank_pids(&child);
    // As a host that stops answering: rank 1 is stopped (SIGSTOP) mid-run, then continued
    // once rank 0's watchdog gave up on it.
    kill("STOP", &[&pids[1]]);
    let stopped = Instant::now();
    while line_of_rank(&child.stderr_so_far(), 0).is_empty() && stopped.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let named_after = stopped.elapsed();
    kill("CONT", &[&pids[1]]);
    let (status, err) = wait_or_kill(child, Duration::from_secs(30));
    eprintln!(
        "FIGURE stopped rank: rank 0's watchdog named it {:.1} s after the SIGSTOP; mpirun returned after {:.1} s",
        named_after.as_secs_f64(),
        stopped.elapsed().as_secs_f64()
    );
    assert!(!status.success(), "{err}");
    let on_0 = line_of_rank(&err, 0);
    assert!(on_0.contains("rank 1 has sent nothing for"), "{err}");
    assert!(!on_0.contains("stopped making progress"), "{err}");
    // Continued, rank 1 blames its own freeze, not rank 0 (if mpirun let it speak).
    let on_1 = line_of_rank(&err, 1);
    assert!(on_1.is_empty() || on_1.contains("this rank was frozen for"), "{err}");
    eprintln!("rank 0 said: {on_0}\nrank 1 said: {on_1}");
}

#[test]
fn a_job_stopped_and_continued_whole_goes_on_training() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut child = endless_two_ranks(d, 4);
    wait_for_rows(d, 3, &mut child);
    let pids = rank_pids(&child);
    // As Slurm's `scontrol suspend` and `resume` do: every rank stopped, longer than
    // dist.timeout_s, then continued. Nobody hung: the job must go on.
    kill("STOP", &[&pids[0], &pids[1]]);
    std::thread::sleep(Duration::from_secs(6));
    kill("CONT", &[&pids[0], &pids[1]]);
    let (resumed, resumed_at) = (Instant::now(), rows(d, "f").len());
    wait_for_rows(d, resumed_at + 5, &mut child);
    eprintln!("FIGURE whole job stopped 6 s (dist.timeout_s = 4): 5 more steps {:.1} s after the SIGCONT", resumed.elapsed().as_secs_f64());
    kill("USR1", &[&child.id().to_string()]);
    let (status, err) = wait_or_kill(child, Duration::from_secs(30));
    assert!(status.success(), "{err}");
    assert!(!err.contains("no training progress"), "{err}");
    assert!(err.matches("this rank was frozen for").count() >= 2, "{err}");
}

#[test]
fn diverged_ranks_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = two_ranks(&args(dir.path(), "dv", &["--set", "train.micro_batch_size=4"]), Some("diverge@2:1"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("parameters diverged at step 2: rank(s) [1] differ from rank 0"), "{}", stderr(&out));
}

#[test]
fn sigterm_is_a_preemption_every_rank_saves_and_exits_75() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = args(d, "s", &["--set", "train.micro_batch_size=4", "--set", "train.max_steps=100000", "--set", "train.save_interval=0"]);
    let child = spawn(mpirun(2).arg(bin()).args(&a).current_dir(repo()));
    let metrics = d.join("runs/s/metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(Instant::now() < deadline, "the run did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // As Slurm does: SIGTERM to every rank process (mpirun's children).
    let ranks = run_bounded(Command::new("pgrep").args(["-P", &child.id().to_string()]), LIMIT);
    let pids: Vec<String> = stdout(&ranks).split_whitespace().map(String::from).collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    run_bounded(Command::new("kill").arg("-TERM").args(&pids), LIMIT);
    let (status, err) = wait_or_kill(child, Duration::from_secs(120));
    // Preempted: saved, and a distinct exit code so that the job is started again.
    assert_eq!(status.code(), Some(75), "{err}");
    assert!(err.contains("preempted: stopped by signal (SIGTERM) after step"), "{err}");
    assert!(!err.lines().any(|l| l.starts_with("error") || l.contains("ERROR")), "a preemption is no error: {err}");
    let saved: Vec<PathBuf> = std::fs::read_dir(d.join("runs/s/checkpoints")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    let last_row = rows(d, "s").last().unwrap()["step"].as_u64().unwrap();
    assert!(saved[0].ends_with(format!("step_{last_row:08}")), "{saved:?} vs last row {last_row}");
}

#[test]
fn nccl_without_a_gpu_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = one_rank(&args(dir.path(), "n", &["--set", "dist.backend=nccl", "--set", "device=auto"]));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("dist.backend: nccl needs CUDA tensors") && err.contains("use dist.backend: mpi"), "{err}");
    // device: cpu with nccl is refused by the config check itself (exit 2).
    let out = one_rank(&args(dir.path(), "n", &["--set", "dist.backend=nccl", "--set", "device=cpu"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

//! Ranks launched with different settings (MPMD `mpirun -n 1 … : -n 1 …`, as a config
//! file per host or one stale `--set` gives) are refused before the first step, every
//! rank exiting 2 and naming the first differing key with each rank's value; a rank stuck
//! in start-up is named by the watchdog within `dist.timeout_s`; and behind that check
//! the exchanges compare sizes, so that a difference that slips past it is an error
//! naming the rank, never a corrupted heap.

mod common;
use common::*;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

/// The tiny model, 6 steps, no W&B.
fn args(dir: &Path, run: &str, extra: &[&str]) -> Vec<String> {
    #[rustfmt::skip]
    let sets = [
        "--set", "wandb.mode=disabled", "--set", "train.max_steps=6", "--set", "train.log_interval=1",
        "--set", "train.eval_interval=3", "--set", "train.eval_steps=1", "--set", "train.save_interval=3",
        "--set", "dist.timeout_s=60", "--set", "optim.warmup_steps=2",
    ];
    tiny_run_args(&sets, dir, run, extra)
}

/// `mpirun -n 1 BIN train ARGS0 : -n 1 BIN train ARGS1`, with `ALGPT2_FAULT=fault` in
/// both (`-x` is an option of each app context).
fn mpmd(rank0: &[String], rank1: &[String], fault: Option<&str>) -> Output {
    let env: Vec<String> = fault.map(|f| vec!["-x".to_string(), format!("ALGPT2_FAULT={f}")]).unwrap_or_default();
    let mut cmd = mpirun(1);
    cmd.args(&env).arg(bin()).arg("train").args(rank0).args([":", "-n", "1"]).args(&env).arg(bin()).arg("train").args(rank1);
    cmd.current_dir(repo());
    run_bounded(&mut cmd, Duration::from_secs(120))
}

fn metrics_rows(dir: &Path, run: &str) -> usize {
    std::fs::read_to_string(dir.join("runs").join(run).join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

#[test]
fn ranks_with_different_settings_are_refused_before_the_first_step() {
    #[rustfmt::skip]
    let cases = [
        ("optim.lr=0.001", "optim.lr=0.009", "optim.lr: rank 0 has 0.001, rank 1 has 0.009"),
        ("train.seed=1", "train.seed=2", "train.seed: rank 0 has 1, rank 1 has 2"),
        ("train.micro_batch_size=4", "train.micro_batch_size=2", "train.micro_batch_size: rank 0 has 4, rank 1 has 2"),
        ("model.n_layer=2", "model.n_layer=4", "model.n_layer: rank 0 has 2, rank 1 has 4"),
        ("dist.overlap=true", "dist.overlap=false", "dist.overlap: rank 0 has true, rank 1 has false"),
        ("model.n_embd=32", "model.n_embd=64", "model.n_embd: rank 0 has 32, rank 1 has 64"),
        ("model.share_layers=true", "model.share_layers=false", "model.share_layers: rank 0 has true, rank 1 has false"),
        ("train.save_interval=5", "train.save_interval=3", "train.save_interval: rank 0 has 5, rank 1 has 3"),
        ("dist.grad_dtype=fp32", "dist.grad_dtype=bf16", "dist.grad_dtype: rank 0 has fp32, rank 1 has bf16"),
        ("train.eval_interval=5", "train.eval_interval=3", "train.eval_interval: rank 0 has 5, rank 1 has 3"),
        ("train.max_steps=10", "train.max_steps=12", "train.max_steps: rank 0 has 10, rank 1 has 12"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, (on_0, on_1, expected)) in cases.iter().enumerate() {
        let run = format!("r{i}");
        let started = Instant::now();
        let out = mpmd(&args(d, &run, &["--set", on_0]), &args(d, &run, &["--set", on_1]), None);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{on_0} / {on_1}: {err}");
        assert_eq!(err.matches(expected).count(), 2, "{on_0} / {on_1}: each rank names the key and both values: {err}");
        assert!(err.contains("the ranks were launched with different settings (settings)"), "{err}");
        assert!(!d.join("runs").join(&run).exists(), "{on_0} / {on_1}: nothing is written before the ranks agree");
        eprintln!("{on_0} / {on_1}: refused in {:.1} s", started.elapsed().as_secs_f64());
    }
}

#[test]
fn ranks_on_other_data_or_other_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let wikitext = repo().join("tests/data/wikitext-2");
    let text = |file: &str| -> Vec<String> {
        [
            "--set".to_string(),
            "data.format=text".to_string(),
            format!("--set=data.train={}", wikitext.join(file).display()),
            "--set".to_string(),
            "data.valid=null".to_string(),
            "--set".to_string(),
            "data.test=null".to_string(),
        ]
        .to_vec()
    };
    let with = |run: &str, extra: &[String]| {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        args(d, run, &extra)
    };
    // Another corpus (and so another tokenizer) on rank 1, its cache built beforehand:
    // every config key that must agree does.
    let (on_0, on_1) = (with("c", &text("wiki.valid.tokens")), with("c", &text("wiki.test.tokens")));
    let prepared = run_bounded(std::process::Command::new(bin()).arg("prepare").args(&on_1).current_dir(repo()), LIMIT);
    assert!(prepared.status.success(), "{}", stderr(&prepared));
    let out = mpmd(&on_0, &on_1, None);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err.matches("the ranks were launched with different settings (data and checkpoint): token cache (content): rank 0 has ").count(),
        2,
        "{err}"
    );
    assert!(err.contains("(and 1 more: tokenizer (hash))"), "{err}");
    assert_eq!(metrics_rows(d, "c"), 0);

    // Two runs with checkpoints at steps 3 and 2, resumed together: each rank's run_name
    // (a path of its own) names another run.
    for (run, steps) in [("a", "3"), ("b", "2")] {
        let mut cmd = std::process::Command::new(bin());
        cmd.arg("train").args(args(d, run, &["--set", &format!("train.max_steps={steps}"), "--set", "train.save_interval=1"]));
        let out = run_bounded(cmd.current_dir(repo()), LIMIT);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let rows_before = (metrics_rows(d, "a"), metrics_rows(d, "b"));
    let out = mpmd(&args(d, "a", &[]), &args(d, "b", &[]), None);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let named = "(data and checkpoint): checkpoint resumed: rank 0 has step 3 (trainer.json sha256 ";
    assert_eq!(err.matches(named).count(), 2, "{err}");
    assert!(err.contains("rank 1 has step 2 (trainer.json sha256 "), "{err}");
    assert_eq!((metrics_rows(d, "a"), metrics_rows(d, "b")), rows_before, "nothing trained");
}

#[test]
fn a_rank_stuck_in_start_up_is_named_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Every phase from MPI's init to the first step, but preparing the token cache. Before
    // the heartbeat exchange the ranks cannot hear each other: rank 1 names itself.
    #[rustfmt::skip]
    let phases = [
        ("start-up: MPI init (MPI_Init_thread)", "mpi_init", false),
        ("start-up: finding the ranks on this node (MPI_Comm_split_type)", "node_split", false),
        ("start-up: opening the device", "device", false),
        ("start-up: exchanging the watchdogs' addresses", "heartbeat_exchange", false),
        ("start-up: agreeing on the settings", "settings_agreement", true),
        ("start-up: checking the token cache", "cache_check", true),
        ("start-up: agreeing on the data and the checkpoint", "data_agreement", true),
        ("start-up: communicator dup (MPI_Comm_dup)", "comm_dup", true),
        ("start-up: weight broadcast", "weight_broadcast", true),
    ];
    for (phase, slug, heard) in phases {
        let a = args(d, slug, &["--set", "dist.timeout_s=4", "--set", "dist.overlap=true"]);
        let mut cmd = mpirun(2);
        cmd.args(["-x", &format!("ALGPT2_FAULT=hang_in_{slug}@0:1")]).arg(bin()).arg("train").args(&a).current_dir(repo());
        let started = Instant::now();
        let out = run_bounded(&mut cmd, Duration::from_secs(120));
        let took = started.elapsed().as_secs_f64();
        let err = stderr(&out);
        assert!(!out.status.success(), "{err}");
        let on_1 = format!("error on rank 1: no progress in {phase} for ");
        assert!(err.contains(&on_1) && err.contains("this rank stopped making progress outside any collective"), "{err}");
        if heard {
            assert!(
                err.contains("rank 1 stopped making progress") || err.contains("rank 1 has sent nothing"),
                "rank 0 names rank 1: {err}"
            );
        }
        // Preparing the data before it is not timed (and takes most of the time here):
        // the stall the watchdog measured is the phase's own.
        let stalled: f64 = err[err.find(&on_1).unwrap() + on_1.len()..].split(' ').next().unwrap().parse().unwrap();
        assert!((4.0..8.0).contains(&stalled), "{phase}: {stalled} s with dist.timeout_s=4: {err}");
        assert_eq!(metrics_rows(d, slug), 0);
        eprintln!("{slug}: ended after {took:.1} s");
    }
}

#[test]
fn behind_the_settings_check_the_exchanges_compare_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let unchecked = Some("unchecked_ranks@0");
    // Weights of different sizes: the broadcast compares lengths first.
    let out = mpmd(&args(d, "w", &["--set", "model.n_embd=32"]), &args(d, "w", &["--set", "model.n_embd=64"]), unchecked);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the weight broadcast: rank 1 has ") && err.contains(" values where rank 0 has "), "{err}");
    assert!(!err.contains("malloc") && !err.contains("Segmentation"), "{err}");

    // Buckets of different sizes over the same weights: the ring's receives check their
    // sizes (the overlapped exchange).
    let out = mpmd(
        &args(d, "b", &["--set", "dist.overlap=true", "--set", "dist.bucket_mb=0.001"]),
        &args(d, "b", &["--set", "dist.overlap=true", "--set", "dist.bucket_mb=0.004"]),
        unchecked,
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("(the ranks' gradient layouts differ)"), "{err}");
    assert!(!err.contains("malloc") && !err.contains("Segmentation"), "{err}");

    // One rank's system sample one value longer: the gather compares lengths first.
    let stats =
        ["--set", "wandb.mode=offline", "--set", "wandb.stats=true", "--set", "wandb.stats_interval_s=0.1", "--set", "dist.timeout_s=60"];
    let out = mpmd(&args(d, "s", &stats), &args(d, "s", &stats), Some("stats_extra@0:1"));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("system metrics: a gather to rank 0: rank 1 has "), "{err}");

    // The token table (the overlapped exchange keeps it apart): one rank's looked-up flags
    // one value longer, then one rank packing one row more than the rows looked up.
    let overlap = ["--set", "dist.overlap=true", "--set", "train.max_steps=2"];
    for (fault, run, named) in [
        ("table_flags_extra@0:1", "tf", "the token table's looked-up flags: rank 1 has "),
        ("table_rows_extra@0:1", "tr", "(the ranks' gradient layouts differ)"),
    ] {
        let out = mpmd(&args(d, run, &overlap), &args(d, run, &overlap), Some(fault));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{fault}: {err}");
        assert!(err.contains(named), "{fault}: {err}");
        assert!(err.contains("error on rank "), "{fault}: {err}");
        assert!(!err.contains("malloc") && !err.contains("Segmentation"), "{fault}: {err}");
    }
}

#[test]
fn ranks_of_another_build_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = mpmd(&args(d, "o", &[]), &args(d, "o", &[]), Some("other_build@0:1"));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let expected = format!(
        "algpt2-ddp build: rank 0 has {} (commit {}), rank 1 has 0.0.0-other (commit 0000000)",
        env!("CARGO_PKG_VERSION"),
        env!("ALGPT2_GIT_REVISION")
    );
    assert_eq!(err.matches(&expected).count(), 2, "each rank names both builds: {err}");
    assert!(!d.join("runs/o").exists(), "nothing is written before the ranks agree");
}

#[test]
fn per_rank_keys_may_differ_between_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Rank 1 names another out_dir, run_name and data.cache_dir (its host's own places);
    // its cache holds the same tokens, built beforehand as a host would.
    let (other_runs, other_cache) = (d.join("rank1/runs"), d.join("rank1/cache"));
    let on_1 = |base: Vec<String>| -> Vec<String> {
        let mut a: Vec<String> = base
            .into_iter()
            .filter(|s| !s.starts_with("--set=out_dir=") && !s.starts_with("--set=data.cache_dir=") && !s.starts_with("--set=run_name="))
            .collect();
        a.push(format!("--set=out_dir={}", other_runs.display()));
        a.push(format!("--set=data.cache_dir={}", other_cache.display()));
        a.push("--set=run_name=elsewhere".to_string());
        a
    };
    let few = ["--set", "train.max_steps=2", "--set", "train.save_interval=2", "--set", "train.eval_interval=2"];
    let (rank0, rank1) = (args(d, "p", &few), on_1(args(d, "p", &few)));
    let prepared = run_bounded(std::process::Command::new(bin()).arg("prepare").args(&rank1).current_dir(repo()), LIMIT);
    assert!(prepared.status.success(), "{}", stderr(&prepared));
    let out = mpmd(&rank0, &rank1, None);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("different settings"), "{err}");
    assert_eq!(metrics_rows(d, "p"), 2, "rank 0 logged both steps: {err}");
    assert!(d.join("runs/p/checkpoints/step_00000002/model.safetensors").is_file(), "{err}");
    assert!(!other_runs.join("elsewhere").exists(), "only rank 0 writes the run");
}

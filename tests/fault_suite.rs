//! The fault suite behind the README's "What survives what" table: each case injects a
//! real failure into a real run and checks that nothing is lost beyond the steps since
//! the last checkpoint. Lines starting `FIGURE` on stderr are the figures the table
//! quotes (`cargo test --test fault_suite -- --nocapture | grep FIGURE`).
//!
//! Cases covered elsewhere, and named in the table: kill during a save
//! (train_resume.rs), damaged checkpoints (checkpoint.rs unit tests), NaN (train_resume.rs),
//! the config fuzz test (config::load), two trainings on one run directory
//! (train_resume.rs), bad data inputs (data_prepare.rs).

mod common;
use algpt2_ddp::checkpoint;
use algpt2_ddp::report::wandb::fake_server::{FakeServer, Fault, Target};
use algpt2_ddp::rng::SplitMix64;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

/// A tiny model with dropout on, 8 steps, a checkpoint every 2.
fn args(dir: &Path, run: &str, extra: &[&str]) -> Vec<String> {
    #[rustfmt::skip]
    let sets = [
        "--set", "wandb.mode=disabled", "--set", "model.dropout=0.1",
        "--set", "train.micro_batch_size=4", "--set", "train.max_steps=8", "--set", "train.log_interval=1",
        "--set", "train.eval_interval=4", "--set", "train.eval_steps=1", "--set", "train.save_interval=2",
        "--set", "optim.warmup_steps=2", "--set", "checkpoint.keep_last=10", "--set", "dist.check_interval=1",
    ];
    tiny_run_args(&sets, dir, run, extra)
}

fn one_rank(a: &[String], fault: Option<&str>) -> Output {
    let mut cmd = Command::new(bin());
    one_math_thread(&mut cmd).args(a).current_dir(repo());
    if let Some(f) = fault {
        cmd.env("ALGPT2_FAULT", f);
    }
    run_bounded(&mut cmd, LIMIT)
}

fn two_ranks(a: &[String], fault: Option<&str>) -> Output {
    let mut cmd = mpirun(2);
    if let Some(f) = fault {
        cmd.args(["-x", &format!("ALGPT2_FAULT={f}")]);
    }
    run_bounded(cmd.arg(bin()).args(a).current_dir(repo()), LIMIT)
}

fn checkpoints(dir: &Path, run: &str) -> PathBuf {
    dir.join("runs").join(run).join("checkpoints")
}

/// The final model and optimizer files, byte for byte.
fn final_state(dir: &Path, run: &str) -> (Vec<u8>, Vec<u8>) {
    let last = checkpoints(dir, run).join("step_00000008");
    (std::fs::read(last.join("model.safetensors")).unwrap(), std::fs::read(last.join("optimizer.safetensors")).unwrap())
}

/// Steps of the valid checkpoints of a run, and whether a half-written one is left.
fn saved_steps(root: &Path) -> (Vec<u64>, bool) {
    let steps = checkpoint::list_valid(root).iter().map(|f| f.state.step).collect();
    let partial =
        std::fs::read_dir(root).is_ok_and(|d| d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().starts_with(".tmp-")));
    (steps, partial)
}

fn rows(dir: &Path, run: &str) -> Vec<Value> {
    rows_without_machine_metrics(&dir.join("runs").join(run))
}

#[test]
fn killing_one_rank_at_random_steps_loses_only_the_unsaved_steps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let whole = two_ranks(&args(d, "whole", &[]), None);
    assert!(whole.status.success(), "{}", stderr(&whole));
    let reference = final_state(d, "whole");
    for seed in [1u64, 2, 3, 4] {
        // Ranks take turns; the step is drawn from the seed.
        let (step, rank) = (1 + SplitMix64::new(seed).below(7), seed % 2);
        let run = format!("kill-{seed}");
        let a = args(d, &run, &[]);
        let killed = two_ranks(&a, Some(&format!("kill@{step}:{rank}")));
        let ended = SystemTime::now();
        assert!(!killed.status.success(), "seed {seed}: the job must fail when rank {rank} dies");
        // The last sign of life is rank 0's last metrics row (its last step or its last
        // checkpoint); from there to the job's end is how long the survivor lingered.
        let metrics = d.join("runs").join(&run).join("metrics.jsonl");
        let last_row = std::fs::metadata(&metrics).and_then(|m| m.modified()).unwrap();
        let lingered = ended.duration_since(last_row).unwrap_or_default();
        assert!(lingered < Duration::from_secs(30), "seed {seed}: the job took {lingered:?} to end after rank {rank} died");
        let (steps, _) = saved_steps(&checkpoints(d, &run));
        let saved = steps.last().copied().unwrap_or(0);
        assert!(saved <= step, "seed {seed}: checkpoint {saved} after a kill at {step}");

        let resumed = two_ranks(&a, None);
        assert!(resumed.status.success(), "seed {seed}: {}", stderr(&resumed));
        if saved > 0 {
            assert!(stderr(&resumed).contains(&format!("step_{saved:08}")), "seed {seed}: {}", stderr(&resumed));
        }
        assert!(final_state(d, &run) == reference, "seed {seed}: final weights differ from the uninterrupted run's");
        assert_eq!(rows(d, &run), rows(d, "whole"), "seed {seed}: metrics rows");
        eprintln!(
            "FIGURE kill -9: seed {seed}, rank {rank} killed after step {step}; job ended {:.1} s after the last row; resumed from step {saved}, {} step(s) redone; final weights byte-identical",
            lingered.as_secs_f64(),
            step - saved
        );
    }
}

#[test]
fn a_full_disk_while_saving_stops_both_ranks_with_the_previous_checkpoint_intact() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let whole = two_ranks(&args(d, "whole", &[]), None);
    assert!(whole.status.success(), "{}", stderr(&whole));

    let a = args(d, "full", &[]);
    let started = Instant::now();
    let out = two_ranks(&a, Some("save_disk_full@4"));
    let took = started.elapsed();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("cannot save the checkpoint of step 4") && err.contains("No space left on device"), "{err}");
    assert!(err.contains("step_00000002 is intact") && err.contains("stopping at step 4"), "{err}");
    assert!(err.contains("error on rank 1") && err.contains("rank 0 could not save its checkpoint"), "{err}");
    let (steps, partial) = saved_steps(&checkpoints(d, "full"));
    assert_eq!(steps, vec![2]);
    assert!(!partial, "the half-written checkpoint is removed");

    let resumed = two_ranks(&a, None);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(final_state(d, "full") == final_state(d, "whole"), "final weights differ from the uninterrupted run's");
    eprintln!("FIGURE disk full (injected ENOSPC at step 4, stop): both ranks exited in {:.1} s; step_00000002 intact; resume redid 2 steps; final weights byte-identical", took.as_secs_f64());
}

#[test]
fn a_full_disk_with_on_save_error_continue_trains_on_and_saves_later() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let whole = two_ranks(&args(d, "whole", &[]), None);
    assert!(whole.status.success(), "{}", stderr(&whole));

    let out = two_ranks(&args(d, "cont", &["--set", "checkpoint.on_save_error=continue"]), Some("save_disk_full@4"));
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("No space left on device") && err.contains("training on") && err.contains("next try at step 6"), "{err}");
    let (steps, partial) = saved_steps(&checkpoints(d, "cont"));
    assert_eq!(steps, vec![2, 6, 8]);
    assert!(!partial);
    assert!(final_state(d, "cont") == final_state(d, "whole"), "training itself must not be affected");
    eprintln!("FIGURE disk full (injected ENOSPC at step 4, continue): warning, training went on; checkpoints 2, 6, 8; final weights byte-identical");
}

#[test]
fn a_really_full_disk_keeps_the_last_checkpoints_and_the_run_resumes_elsewhere() {
    if let Some(why) = cannot_mount_tmpfs() {
        eprintln!("skipped: no small tmpfs for a real full disk ({why}); the injected ENOSPC tests still run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let whole = one_rank(&args(d, "whole", &[]), None);
    assert!(whole.status.success(), "{}", stderr(&whole));
    let one_checkpoint: u64 =
        std::fs::read_dir(checkpoints(d, "whole").join("step_00000002")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    // Room for two checkpoints and a half: the third save runs out of space.
    let size = one_checkpoint * 5 / 2;

    let a = args(d, "tmpfs", &[]);
    eprintln!("one checkpoint: {one_checkpoint} bytes, tmpfs: {size} bytes");
    let mount_point = checkpoints(d, "tmpfs");
    let rescued = d.join("rescued");
    std::fs::create_dir_all(&mount_point).unwrap();
    std::fs::create_dir_all(&rescued).unwrap();
    // The run's checkpoints go to a tmpfs of `size` bytes in a private mount namespace;
    // what is on it when the run ends is copied out before the namespace goes.
    let script = r#"mount -t tmpfs -o size="$SIZE" tmpfs "$MOUNT" || exit 99; "$@"; rc=$?; cp -a "$MOUNT"/. "$RESCUED"/; exit $rc"#;
    let out = run_bounded(
        one_math_thread(&mut Command::new("unshare"))
            .args(["-rm", "sh", "-c", script, "sh", bin()])
            .args(&a)
            .env("SIZE", size.to_string())
            .env("MOUNT", &mount_point)
            .env("RESCUED", &rescued)
            .current_dir(repo()),
        LIMIT,
    );
    assert_ne!(out.status.code(), Some(99), "mount failed: {}", stderr(&out));
    assert!(!out.status.success(), "the run must stop on a full disk");
    let err = stderr(&out);
    assert!(err.contains("No space left on device") && err.contains("cannot save the checkpoint of step 6"), "{err}");
    assert!(err.contains("step_00000004 is intact"), "{err}");
    let (steps, partial) = saved_steps(&rescued);
    assert_eq!(steps, vec![2, 4], "the checkpoints before the full disk verify");
    assert!(!partial, "the half-written checkpoint was removed, freeing its space");

    // The operator moves the run to a disk with room: it resumes and loses nothing.
    std::fs::remove_dir(&mount_point).unwrap();
    std::fs::rename(&rescued, &mount_point).unwrap();
    let resumed = one_rank(&a, None);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(final_state(d, "tmpfs") == final_state(d, "whole"), "final weights differ from the uninterrupted run's");
    eprintln!("FIGURE disk full (real {size}-byte tmpfs): stopped at step 6 with No space left on device; step_00000004 intact; resume redid 2 steps; final weights byte-identical");
}

/// A training of `steps` logged rows against `url` (or W&B off); returns its loop wall
/// time in seconds and the run directory.
fn wandb_run(d: &Path, run: &str, url: Option<&str>, steps: u64) -> (f64, PathBuf) {
    let mode = if url.is_some() { "wandb.mode=online" } else { "wandb.mode=disabled" };
    let max_steps = format!("train.max_steps={steps}");
    let a = args(
        d,
        run,
        &[
            "--set", mode, "--set", &max_steps, "--set", "train.save_interval=0", "--set", "train.eval_interval=0", "--set",
            "wandb.flush_timeout_s=2",
        ],
    );
    let mut cmd = Command::new(bin());
    cmd.args(&a).current_dir(repo());
    with_wandb_env(&mut cmd, url, d);
    let out = run_bounded(&mut cmd, LIMIT);
    assert!(out.status.success(), "{run}: {}", stderr(&out));
    let run_dir = d.join("runs").join(run);
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    (summary["wall_seconds"].as_f64().unwrap(), run_dir)
}

fn wandb_sync(d: &Path, run_dir: &Path, server: &FakeServer) {
    let mut cmd = Command::new(bin());
    // Its own limit well inside the test's: a server that stopped answering fails fast.
    cmd.args(["wandb-sync", run_dir.to_str().unwrap(), "--timeout", "120"]).current_dir(repo());
    with_wandb_env(&mut cmd, Some(&server.url), d);
    let out = run_bounded(&mut cmd, LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn wandb_faults_for_a_whole_run_cost_no_throughput_and_lose_no_row() {
    const STEPS: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Each case is timed against a run without W&B right before it, so that the load of
    // tests running beside this one falls on both alike.
    let mut runs = 0;
    let mut steps_per_sec_without = || {
        runs += 1;
        STEPS as f64 / wandb_run(d, &format!("off-{runs}"), None, STEPS).0
    };
    let without = steps_per_sec_without();
    let healthy = STEPS as f64 / wandb_run(d, "healthy", Some(&FakeServer::start().url), STEPS).0;
    eprintln!("FIGURE W&B healthy server: {:.2}x the steps/s without W&B ({without:.0} steps/s)", healthy / without);

    type Setup = fn(&FakeServer);
    let cases: [(&str, Setup); 6] = [
        ("down", |_| {}),
        ("slow (every reply 2 s late)", |s| s.set_always(Some((Target::Any, Fault::SlowReply(Duration::from_secs(2)))))),
        ("429 on every request", |s| s.set_always(Some((Target::Any, Fault::Status(429, Some("1")))))),
        ("500 on every request", |s| s.set_always(Some((Target::Any, Fault::Status(500, None))))),
        ("401 (wrong key)", |s| s.require_key("another-key-another-key-another-key-0000")),
        ("every connection dropped after the request", |s| s.set_always(Some((Target::Any, Fault::DropAfter)))),
    ];
    for (i, (case, setup)) in cases.iter().enumerate() {
        let server = FakeServer::start();
        setup(&server);
        let url = if *case == "down" {
            // A port that nothing listens on.
            let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}", closed.local_addr().unwrap());
            drop(closed);
            url
        } else {
            server.url.clone()
        };
        // A W&B call that blocked training would cost seconds per row here (200 rows,
        // replies 2 s late: a ratio below 0.02), every time; the load of neighbouring
        // tests on a 2-core machine comes and goes (ratios of 0.18-0.53 were seen while
        // a build ran beside the test). So a pair (without W&B, with the fault) is timed
        // again, at most 3 times, until the fault's run reaches 0.25x; the README quotes
        // the ratios measured on a quiet machine.
        let mut ratios = Vec::new();
        let mut run_dir = PathBuf::new();
        while ratios.len() < 3 && ratios.last().is_none_or(|&r| r <= 0.25) {
            // Each try is its own W&B run; only the last one's rows are checked.
            server.state().runs.clear();
            let without = steps_per_sec_without();
            let (wall, dir) = wandb_run(d, &format!("fault-{i}-{}", ratios.len()), Some(&url), STEPS);
            ratios.push(STEPS as f64 / wall / without);
            run_dir = dir;
        }
        let ratio = *ratios.last().unwrap();
        assert!(ratio > 0.25, "{case}: steps/s ratios to runs without W&B {ratios:.2?}");

        // The server recovers; whatever it did not take waits in the run directory.
        server.set_always(None);
        server.require_key(WANDB_KEY);
        let during_run = server.state().runs.values().map(|r| r.history.len()).sum::<usize>();
        wandb_sync(d, &run_dir, &server);
        let ids: Vec<String> = server.state().runs.keys().cloned().collect();
        assert_eq!(ids.len(), 1, "{case}: {ids:?}");
        assert_eq!(server.steps(&ids[0]), (1..=STEPS).collect::<Vec<u64>>(), "{case}: every row exactly once, in order");
        assert!(server.run(&ids[0]).unwrap().complete, "{case}");
        assert!(server.errors().is_empty(), "{case}: {:?}", server.errors());
        eprintln!(
            "FIGURE W&B {case}: {ratio:.2}x the steps/s without W&B (tries: {ratios:.2?}); {during_run} of {STEPS} rows arrived during the run, the rest with wandb-sync; each exactly once"
        );
    }
}

#[test]
fn damaged_data_files_and_caches_get_clear_errors_or_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let prepare = |a: &[String]| {
        let mut cmd = Command::new(bin());
        cmd.arg("prepare").args(a).current_dir(repo());
        run_bounded(&mut cmd, LIMIT)
    };

    // Binary garbage as training text.
    let garbage = d.join("garbage.txt");
    let mut rng = SplitMix64::new(7);
    std::fs::write(&garbage, (0..4096).map(|_| rng.below(256) as u8).collect::<Vec<u8>>()).unwrap();
    let set_train = format!("--set=data.train={}", garbage.display());
    let out = prepare(&args(d, "g", &["--set", "data.format=text", &set_train, "--set", "data.valid=null", "--set", "data.test=null"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("garbage.txt") && stderr(&out).contains("not valid UTF-8"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));

    // A token cache truncated (a full disk or a crash outside our atomic rename).
    let a = args(d, "c", &[]);
    assert!(prepare(&a).status.success());
    let cache = std::fs::read_dir(d.join("cache")).unwrap().map(|e| e.unwrap().path()).find(|p| p.is_dir()).unwrap();
    let train_bin = cache.join("train.bin");
    let intact = std::fs::read(&train_bin).unwrap();
    std::fs::write(&train_bin, &intact[..intact.len() - 7]).unwrap();
    let out = one_rank(&args(d, "c", &["--set", "train.max_steps=2"]), None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is damaged") && stderr(&out).contains("train.bin") && stderr(&out).contains("rebuilding"),
        "{}",
        stderr(&out)
    );
    assert!(std::fs::read(&train_bin).unwrap() == intact, "the rebuilt cache equals the first build");

    // A token file from another tokenizer put in its place.
    let other = args(d, "o", &["--set", "tokenizer.vocab_size=300"]);
    assert!(prepare(&other).status.success());
    let other_cache = std::fs::read_dir(d.join("cache")).unwrap().map(|e| e.unwrap().path()).find(|p| p.is_dir() && *p != cache).unwrap();
    std::fs::copy(other_cache.join("train.bin"), &train_bin).unwrap();
    let out = one_rank(&args(d, "c2", &["--set", "train.max_steps=2"]), None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("another tokenizer") || stderr(&out).contains("holds"), "{}", stderr(&out));
    assert!(std::fs::read(&train_bin).unwrap() == intact);
    eprintln!("FIGURE data: garbage text refused naming the file; truncated cache and a cache file of another tokenizer detected and rebuilt identically");
}

#[test]
fn a_truncated_bit_flipped_or_deleted_checkpoint_file_falls_back_to_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let whole = one_rank(&args(d, "whole", &[]), None);
    assert!(whole.status.success(), "{}", stderr(&whole));
    let reference = final_state(d, "whole");
    type Damage = fn(&Path);
    let cases: [(&str, Damage); 4] = [
        ("model.safetensors truncated", |c| {
            let f = c.join("model.safetensors");
            let bytes = std::fs::read(&f).unwrap();
            std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
        }),
        ("one bit of optimizer.safetensors flipped", |c| {
            let f = c.join("optimizer.safetensors");
            let mut bytes = std::fs::read(&f).unwrap();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x10;
            std::fs::write(&f, bytes).unwrap();
        }),
        ("model.safetensors deleted", |c| std::fs::remove_file(c.join("model.safetensors")).unwrap()),
        ("trainer.json deleted", |c| std::fs::remove_file(c.join("trainer.json")).unwrap()),
    ];
    for (i, (case, damage)) in cases.iter().enumerate() {
        // A copy of the finished run whose newest checkpoint is then damaged.
        let run = format!("damaged-{i}");
        let copy = run_bounded(Command::new("cp").arg("-a").arg(d.join("runs/whole")).arg(d.join("runs").join(&run)), LIMIT);
        assert!(copy.status.success(), "{}", stderr(&copy));
        let newest = checkpoints(d, &run).join("step_00000008");
        damage(&newest);
        let out = one_rank(&args(d, &run, &[]), None);
        assert!(out.status.success(), "{case}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("skipping checkpoint") && err.contains("step_00000008"), "{case}: {err}");
        assert!(err.contains("resumed from") && err.contains("step_00000006"), "{case}: {err}");
        assert!(final_state(d, &run) == reference, "{case}: final weights differ from the undamaged run's");
        eprintln!("FIGURE damaged checkpoint ({case}): skipped with a warning naming it, resumed from step 6, 2 steps redone, final weights byte-identical");
    }
}

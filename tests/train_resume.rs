//! Training end to end on CPU: exact resume after a real SIGKILL (byte-identical
//! weights, identical metrics rows), the non-finite policies, resume refusals and what a
//! resume says (changed settings, another run's or a renamed checkpoint), and the cap on
//! math threads.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

/// A small run on the synthetic corpus, with dropout and gradient accumulation on.
fn args(out_dir: &Path, cache: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["--config", "configs/quickstart.yaml"]
        .iter()
        .chain(TINY_MODEL.iter())
        .chain(
            [
                "--set", "model.dropout=0.1", "--set", "train.micro_batch_size=4", "--set", "train.grad_accum_steps=2", "--set",
                "train.max_steps=8", "--set", "train.log_interval=1", "--set", "train.eval_interval=4", "--set", "train.eval_steps=2",
                "--set", "train.save_interval=4", "--set", "optim.warmup_steps=2", "--set", "checkpoint.keep_last=5", "--set",
                "wandb.mode=disabled",
            ]
            .iter(),
        )
        .map(|s| s.to_string())
        .collect();
    a.push("--set".into());
    a.push(format!("out_dir={}", out_dir.display()));
    a.push("--set".into());
    a.push(format!("data.cache_dir={}", cache.display()));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn train(args: &[String], fault: Option<&str>) -> Output {
    let mut cmd = Command::new(bin());
    one_math_thread(&mut cmd).args(args).current_dir(repo());
    if let Some(f) = fault {
        cmd.env("ALGPT2_FAULT", f);
    }
    run_bounded(&mut cmd, LIMIT)
}

fn rows(run_dir: &Path) -> Vec<Value> {
    rows_without_machine_metrics(run_dir)
}

#[test]
fn killed_and_resumed_run_matches_an_uninterrupted_one_exactly() {
    kill_and_resume(&["--set", "train.precision=fp32"]);
}

/// The same in bf16: the compute copies are rebuilt from the fp32 checkpoint on resume.
#[test]
fn killed_and_resumed_bf16_run_matches_an_uninterrupted_one_exactly() {
    kill_and_resume(&["--set", "train.precision=bf16"]);
}

fn kill_and_resume(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let whole = train(&args(&dir.path().join("a"), &cache, extra), None);
    assert!(whole.status.success(), "{}", stderr(&whole));

    // Killed by SIGKILL right after step 6's update: the checkpoint of step 4 is the last
    // good one, and row 5 was already logged past it.
    let b_args = args(&dir.path().join("b"), &cache, extra);
    let killed = train(&b_args, Some("kill@6"));
    assert!(!killed.status.success(), "the fault must kill the run");
    let b = dir.path().join("b/quickstart");
    assert!(b.join("checkpoints/step_00000004").is_dir());
    assert!(!b.join("checkpoints/step_00000008").exists());
    assert_eq!(rows(&b).last().unwrap()["step"], 5);
    let resumed = train(&b_args, None);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(stderr(&resumed).contains("resumed from"), "{}", stderr(&resumed));

    let a = dir.path().join("a/quickstart");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let x = std::fs::read(a.join("checkpoints/step_00000008").join(file)).unwrap();
        let y = std::fs::read(b.join("checkpoints/step_00000008").join(file)).unwrap();
        assert!(x == y, "{file} differs after resume");
    }
    let (ra, rb) = (rows(&a), rows(&b));
    assert_eq!(ra.len(), 8);
    assert_eq!(ra, rb);
    // Dropout was really on: training and evaluation losses differ.
    assert!(ra[3]["val/loss"].as_f64().is_some());
}

#[test]
fn loss_falls_and_a_finished_run_resumes_as_complete() {
    let dir = tempfile::tempdir().unwrap();
    let a = args(
        &dir.path().join("runs"),
        &dir.path().join("cache"),
        &["--set", "train.max_steps=30", "--set", "optim.lr=1e-2", "--set", "train.peak_flops=5e10"],
    );
    let out = train(&a, None);
    assert!(out.status.success(), "{}", stderr(&out));
    // MFU is reported once a peak is known: a fraction, from the FLOPs per token and tokens/s.
    let text = std::fs::read_to_string(dir.path().join("runs/quickstart/metrics.jsonl")).unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let mfu = first["train/mfu"].as_f64().expect("train/mfu logged");
    assert!(mfu > 0.0 && mfu < 1.0, "{mfu}");
    let r = rows(&dir.path().join("runs/quickstart"));
    let first = r[0]["train/loss"].as_f64().unwrap();
    let last = r.last().unwrap()["train/loss"].as_f64().unwrap();
    assert!(last < first - 0.5, "loss {first} -> {last}");
    // The end of the run: a summary block, summary.json with the test split's perplexity,
    // and the charts.
    assert!(stderr(&out).contains("run summary"), "{}", stderr(&out));
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("runs/quickstart/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 30);
    let (test_ppl, best) = (summary["test_ppl"].as_f64().unwrap(), summary["best_achievable_val_ppl"].as_f64().unwrap());
    assert!(test_ppl > best && test_ppl < 512.0, "{summary}");
    assert!(summary["checkpoint"].as_str().unwrap().ends_with("step_00000030"));
    assert!(dir.path().join("runs/quickstart/plots.png").is_file());
    let compare = dir.path().join("compare.png");
    let run_dir = dir.path().join("runs/quickstart");
    let out = run_bounded(
        Command::new(bin()).args(["plot", run_dir.to_str().unwrap(), run_dir.to_str().unwrap(), "--out", compare.to_str().unwrap()]),
        LIMIT,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(&std::fs::read(&compare).unwrap()[..4], b"\x89PNG");
    let again = train(&a, None);
    assert!(again.status.success());
    assert!(stderr(&again).contains("already complete at step 30"), "{}", stderr(&again));
}

#[test]
fn nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let a = args(&dir.path().join("runs"), &dir.path().join("cache"), &[]);
    let out = train(&a, Some("nan_loss@6"));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("non-finite loss (NaN) at step 6"), "{}", stderr(&out));
    let ckpts = dir.path().join("runs/quickstart/checkpoints");
    let names: Vec<String> = std::fs::read_dir(&ckpts).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(names, vec!["step_00000004"]);

    // With skip, the run goes on past the bad step and finishes.
    let dir = tempfile::tempdir().unwrap();
    let a = args(&dir.path().join("runs"), &dir.path().join("cache"), &["--set", "train.nonfinite=skip"]);
    let out = train(&a, Some("nan_loss@6"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("update skipped"), "{}", stderr(&out));
    let r = rows(&dir.path().join("runs/quickstart"));
    assert_eq!(r[5]["train/skipped"], true);
    assert_eq!(r.len(), 8);
}

#[test]
fn resume_refuses_another_model_and_none_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let a = args(&dir.path().join("runs"), &dir.path().join("cache"), &["--set", "train.max_steps=4"]);
    assert!(train(&a, None).status.success());
    let mut other = a.clone();
    other.extend(["--set".to_string(), "model.n_layer=3".to_string(), "--set".to_string(), "train.max_steps=8".to_string()]);
    let out = train(&other, None);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("was made by another model config"), "{}", stderr(&out));
    let mut fresh = a.clone();
    fresh.extend(["--set".to_string(), "checkpoint.resume=none".to_string()]);
    let out = train(&fresh, None);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already holds checkpoints"), "{}", stderr(&out));
}

#[test]
fn eval_command_reproduces_the_logged_validation_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    // eval_steps 0: the last evaluation covers the whole valid split, as `eval` does. In
    // fp32, as `eval` computes: with bf16 compute (`auto` on a CPU with AMX-BF16) the
    // logged loss is bf16's, ~1e-6 off.
    let a = args(&runs, &cache, &["--set", "train.eval_steps=0", "--set", "train.max_steps=4", "--set", "train.precision=fp32"]);
    assert!(train(&a, None).status.success());
    let logged = rows(&runs.join("quickstart")).last().unwrap()["val/loss"].as_f64().unwrap();
    let ckpt = runs.join("quickstart/checkpoints/step_00000004");
    let mut e: Vec<String> = vec!["eval".into()];
    e.extend(a.iter().cloned());
    e.extend(["--checkpoint".into(), ckpt.display().to_string()]);
    let out = run_bounded(Command::new(bin()).args(&e).current_dir(repo()), LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let loss = report["loss"].as_f64().unwrap();
    assert!((loss - logged).abs() < 1e-9, "eval {loss} vs logged {logged}");
    assert!((report["ppl"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);
    assert!(report["best_achievable_ppl"].as_f64().unwrap() < report["ppl"].as_f64().unwrap());
    assert!(runs.join("quickstart/eval-valid-step_00000004.json").is_file());
}

/// GPT-2, sharing-only and ALGPT2 (small widths) on WikiText-2 (tests/data): valid as
/// the training set, test as the held-out set; validation perplexity falls for each.
#[test]
fn three_variants_train_on_wikitext2_with_falling_val_ppl() {
    let dir = tempfile::tempdir().unwrap();
    let shared = repo().join("tests/data/wikitext-2");
    for (name, share, e) in [("gpt2", "false", "null"), ("shared", "true", "null"), ("algpt2", "true", "32")] {
        let a: Vec<String> = [
            "--config",
            "configs/wikitext103.yaml",
            "--set",
            "device=cpu",
            "--set",
            "train.precision=fp32",
            "--set",
            "wandb.mode=disabled",
            "--set",
            "data.format=wikitext",
            "--set",
            "data.test=null",
            "--set",
            "tokenizer.vocab_size=1024",
            "--set",
            "model.vocab_size=1024",
            "--set",
            "model.n_positions=64",
            "--set",
            "model.n_embd=64",
            "--set",
            "model.n_head=4",
            "--set",
            "model.n_layer=2",
            "--set",
            "model.dropout=0.0",
            "--set",
            &format!("model.share_layers={share}"),
            "--set",
            &format!("model.embedding_size={e}"),
            "--set",
            "train.seq_len=64",
            "--set",
            "train.micro_batch_size=8",
            "--set",
            "train.max_steps=60",
            "--set",
            "train.log_interval=10",
            "--set",
            "train.eval_interval=20",
            "--set",
            "train.eval_steps=4",
            "--set",
            "train.save_interval=0",
            "--set",
            "optim.lr=3e-3",
            "--set",
            "optim.warmup_steps=10",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            format!("--set=data.train={}", shared.join("wiki.valid.tokens").display()),
            format!("--set=data.valid={}", shared.join("wiki.test.tokens").display()),
            format!("--set=data.cache_dir={}", dir.path().join("cache").display()),
            format!("--set=out_dir={}", dir.path().join("runs").display()),
            format!("--set=run_name={name}"),
        ])
        .collect();
        let out = train(&a, None);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let ppl: Vec<f64> = rows(&dir.path().join("runs").join(name)).iter().filter_map(|r| r["val/ppl"].as_f64()).collect();
        assert_eq!(ppl.len(), 3, "{name}: {ppl:?}");
        assert!(ppl[2] < ppl[1] && ppl[1] < ppl[0], "{name}: val ppl must fall: {ppl:?}");
        assert!(ppl[0] < 1024.0, "{name}: {ppl:?}");
    }
}

#[test]
fn bench_reports_throughput_mfu_and_memory_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let mut b: Vec<String> = vec!["bench".into()];
    b.extend(args(&dir.path().join("runs"), &dir.path().join("cache"), &["--set", "train.peak_flops=1e11"]));
    b.extend(["--steps".into(), "3".into(), "--json".into()]);
    let out = run_bounded(Command::new(bin()).args(&b).current_dir(repo()), LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    let r: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let tps = r["tokens_per_sec"].as_f64().unwrap();
    // tokens/s, MFU and FLOPs per token agree with each other.
    let mfu = r["mfu"].as_f64().unwrap();
    assert!((mfu - r["training_flops_per_token"].as_f64().unwrap() * tps / 1e11).abs() < 1e-9, "{r}");
    assert_eq!(r["tokens_per_step"].as_f64(), Some(4.0 * 2.0 * 32.0));
    assert!(r["peak_rss_mb"].as_f64().unwrap() > 10.0);
    assert!(!dir.path().join("runs").exists(), "bench writes no run directory");
}

#[test]
fn generate_from_a_checkpoint_with_and_without_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    assert!(train(&args(&runs, &dir.path().join("cache"), &["--set", "train.max_steps=4"]), None).status.success());
    let ckpt = runs.join("quickstart/checkpoints/step_00000004");
    let gen = |extra: &[&str]| {
        let mut a = vec!["generate", "--checkpoint", ckpt.to_str().unwrap(), "--prompt", "Kaiso", "--max-new-tokens", "20"];
        a.extend_from_slice(extra);
        let out = run_bounded(Command::new(bin()).args(&a).current_dir(repo()), LIMIT);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let cached = gen(&["--temperature", "0"]);
    assert!(cached.starts_with("Kaiso") && cached.len() > "Kaiso".len() + 5, "{cached:?}");
    assert_eq!(cached, gen(&["--temperature", "0", "--no-cache"]));
    assert_eq!(gen(&["--seed", "5"]), gen(&["--seed", "5"]));
}

#[test]
fn a_second_training_on_the_same_run_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a =
        args(&dir.path().join("runs"), &dir.path().join("cache"), &["--set", "train.max_steps=100000", "--set", "train.save_interval=0"]);
    let mut first = spawn(Command::new(bin()).args(&a).current_dir(repo()));
    let metrics = dir.path().join("runs/quickstart/metrics.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 2 {
        assert!(first.is_running() && std::time::Instant::now() < deadline, "the first training did not start:\n{}", first.stderr_so_far());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let second = train(&a, None);
    let rows_before = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert_eq!(second.status.code(), Some(1));
    let err = stderr(&second);
    assert!(err.contains("is in use by another training") && err.contains(&format!("pid {}", first.id())), "{err}");
    // The first one goes on undisturbed: it logs another row (within a minute: on a loaded
    // 2-core machine 1.5 s was not always enough for a step).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_to_string(&metrics).unwrap().lines().count() <= rows_before {
        assert!(
            first.is_running() && std::time::Instant::now() < deadline,
            "the first training stopped logging:\n{}",
            first.stderr_so_far()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    first.kill();
    finish_bounded(first, LIMIT);
    // Once it is gone (even killed), the directory can be used again.
    let again = train(&args(&dir.path().join("runs"), &dir.path().join("cache"), &["--set", "train.max_steps=2"]), None);
    assert!(!stderr(&again).contains("in use by another training"), "{}", stderr(&again));
}

/// SIGKILL at each stage of writing a checkpoint: the previous checkpoint stays valid,
/// the half-written one is ignored and removed, and the resumed run ends exactly where an
/// uninterrupted one does.
#[test]
fn a_kill_while_saving_loses_nothing_but_the_unsaved_steps() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let whole = train(&args(&dir.path().join("whole"), &cache, &[]), None);
    assert!(whole.status.success(), "{}", stderr(&whole));
    let reference = std::fs::read(dir.path().join("whole/quickstart/checkpoints/step_00000008/model.safetensors")).unwrap();
    for stage in ["tensors", "state", "renamed"] {
        let out_dir = dir.path().join(stage);
        let a = args(&out_dir, &cache, &[]);
        let killed = train(&a, Some(&format!("save_kill_{stage}@4")));
        assert!(!killed.status.success(), "{stage}: the fault must kill the run");
        let ckpts = out_dir.join("quickstart/checkpoints");
        let partial = ckpts.join(".tmp-step_00000004");
        assert_eq!(partial.exists(), stage != "renamed", "{stage}");
        let resumed = train(&a, None);
        assert!(resumed.status.success(), "{stage}: {}", stderr(&resumed));
        let err = stderr(&resumed);
        if stage == "renamed" {
            assert!(err.contains("resumed from") && err.contains("step_00000004"), "{stage}: {err}");
        } else {
            assert!(err.contains("half-written") && !err.contains("resumed from"), "{stage}: {err}");
        }
        assert!(!partial.exists(), "{stage}: the partial checkpoint is cleaned up");
        let model = std::fs::read(ckpts.join("step_00000008/model.safetensors")).unwrap();
        assert!(model == reference, "{stage}: final weights differ from the uninterrupted run");
    }
}

/// A resume under `mpirun -n 2` that changes the micro-batch (and with it the global
/// batch), the learning rate and the run length: each change is said once, by rank 0,
/// not once per rank, and the changed settings are named in one line.
#[test]
fn a_two_rank_resume_with_changed_settings_says_so_once() {
    let dir = tempfile::tempdir().unwrap();
    let (out_dir, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    let two_ranks = |extra: &[&str]| run_bounded(mpirun(2).arg(bin()).args(args(&out_dir, &cache, extra)).current_dir(repo()), LIMIT);
    let first = two_ranks(&["--set", "train.max_steps=4", "--set", "optim.lr=6e-4"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let log_path = out_dir.join("quickstart/train.log");
    let logged_before = std::fs::read_to_string(&log_path).unwrap().len();
    let second = two_ranks(&["--set", "train.max_steps=6", "--set", "optim.lr=3e-4", "--set", "train.micro_batch_size=2"]);
    let err = stderr(&second);
    assert!(second.status.success(), "{err}");
    let log = std::fs::read_to_string(&log_path).unwrap()[logged_before..].to_string();
    for (text, what) in [(&err, "stderr"), (&log, "train.log")] {
        assert_eq!(text.matches("was trained with a global batch of 16 windows, this run uses 8").count(), 1, "{what}:\n{text}");
        let changed: Vec<&str> = text.lines().filter(|l| l.contains("resuming with changed settings:")).collect();
        assert_eq!(changed.len(), 1, "{what}:\n{text}");
        assert!(
            changed[0].contains("optim.lr 0.0006 -> 0.0003") && changed[0].contains("train.max_steps 4 -> 6"),
            "{what}: {}",
            changed[0]
        );
    }
}

/// A resume that changes the seed, the sequence length and the precision names each in
/// the one "changed settings" line; the data order continues after the same share of its
/// epoch, so `train/epoch` never goes back, with shorter windows (32 → 16: twice as many)
/// or longer ones (16 → 32: the saved offset lies past the end of the shorter epoch).
#[test]
fn a_resume_names_a_changed_seed_seq_len_and_precision_and_the_epoch_never_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (runs, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    let first = train(&args(&runs, &cache, &["--set", "train.max_steps=4"]), None);
    assert!(first.status.success(), "{}", stderr(&first));
    let shorter = ["--set", "train.max_steps=8", "--set", "train.seq_len=16", "--set", "train.seed=7", "--set", "train.precision=bf16"];
    let second = train(&args(&runs, &cache, &shorter), None);
    let err = stderr(&second);
    assert!(second.status.success(), "{err}");
    let changed: Vec<&str> = err.lines().filter(|l| l.contains("resuming with changed settings:")).collect();
    assert_eq!(changed.len(), 1, "{err}");
    for change in [
        "train.seq_len 32 -> 16", "train.seed 1337 -> 7", "train.precision fp32 -> bf16", "precision fp32 -> bf16",
        "train.max_steps 4 -> 8",
    ] {
        assert!(changed[0].contains(change), "{change}: {}", changed[0]);
    }
    assert!(err.contains("continues after the same share of epoch 0"), "{err}");
    let longer = train(&args(&runs, &cache, &["--set", "train.max_steps=12", "--set", "train.seed=7"]), None);
    let err = stderr(&longer);
    assert!(longer.status.success(), "{err}");
    assert!(err.contains("train.seq_len 16 -> 32") && err.contains("precision bf16 -> fp32"), "{err}");

    let epochs: Vec<f64> = rows(&runs.join("quickstart")).iter().map(|r| r["train/epoch"].as_f64().unwrap()).collect();
    assert_eq!(epochs.len(), 12);
    assert!(epochs.windows(2).all(|w| w[1] > w[0]), "train/epoch went back: {epochs:?}");
}

/// Another run's checkpoint copied into this run's checkpoints/ is named once and left
/// where it is, through the resume and every rotation after it. One renamed to another
/// step is skipped with a warning that says what to rename it to (so it is neither
/// resumed nor deleted), and refused when named by path.
#[test]
fn another_runs_checkpoint_is_named_and_kept_and_a_renamed_one_is_never_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, runs) = (dir.path().join("cache"), dir.path().join("runs"));
    let ours = |extra: &[&str]| args(&runs, &cache, extra);
    // Another run of the same model and data, and this run's first 4 steps.
    let other = train(&args(&dir.path().join("other"), &cache, &["--set", "train.max_steps=2"]), None);
    assert!(other.status.success(), "{}", stderr(&other));
    let first = train(&ours(&["--set", "train.max_steps=4"]), None);
    assert!(first.status.success(), "{}", stderr(&first));
    let ckpts = runs.join("quickstart/checkpoints");
    let theirs = ckpts.join("step_00000002");
    std::fs::create_dir(&theirs).unwrap();
    for file in std::fs::read_dir(dir.path().join("other/quickstart/checkpoints/step_00000002")).unwrap() {
        let file = file.unwrap();
        std::fs::copy(file.path(), theirs.join(file.file_name())).unwrap();
    }

    // Rotation (keep 2) at steps 8 and 12 would have deleted it; it is named once instead.
    let resumed = train(&ours(&["--set", "train.max_steps=12", "--set", "checkpoint.keep_last=2"]), None);
    let err = stderr(&resumed);
    assert!(resumed.status.success(), "{err}");
    assert!(err.contains("resumed from") && err.contains("step_00000004 at step 4"), "{err}");
    let named: Vec<&str> = err.lines().filter(|l| l.contains("belongs to another run")).collect();
    assert_eq!(named.len(), 1, "{err}");
    assert!(named[0].contains(&format!("checkpoint {} (step 2) belongs to another run (run id", theirs.display())), "{}", named[0]);
    let names = |dir: &Path| {
        let mut n: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        n.sort();
        n
    };
    assert_eq!(names(&ckpts), ["step_00000002", "step_00000008", "step_00000012"]);

    // Step 12 renamed to step 20: skipped, with its real step, so the run resumes from 8.
    let renamed = ckpts.join("step_00000020");
    std::fs::rename(ckpts.join("step_00000012"), &renamed).unwrap();
    let again = train(&ours(&["--set", "train.max_steps=16", "--set", "checkpoint.keep_last=2"]), None);
    let err = stderr(&again);
    assert!(again.status.success(), "{err}");
    let warning = format!("{} is named for step 20 but its trainer.json holds step 12", renamed.display());
    assert_eq!(err.matches(&warning).count(), 1, "named once, not at every save: {err}");
    assert!(err.contains(&warning) && err.contains("rename it to step_00000012 to resume from it"), "{err}");
    assert!(err.contains("step_00000008 at step 8"), "{err}");
    assert_eq!(names(&ckpts), ["step_00000002", "step_00000012", "step_00000016", "step_00000020"]);
    // Named by path, it is refused.
    let by_path = train(&ours(&["--set", "train.max_steps=24", "--set", &format!("checkpoint.resume={}", renamed.display())]), None);
    assert_eq!(by_path.status.code(), Some(1), "{}", stderr(&by_path));
    assert!(stderr(&by_path).contains(&warning), "{}", stderr(&by_path));
}

/// `OMP_NUM_THREADS` far above the cores this process may use (it once started over a
/// thousand threads and said nothing for minutes): capped at the cores, said first, and
/// the run trains with a handful of threads. The thread count is read from /proc while it
/// runs; a run past the bound is killed at once, not left to load the machine.
#[test]
fn a_thread_count_above_the_cores_is_capped_with_one_warning() {
    let dir = tempfile::tempdir().unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let a = args(&dir.path().join("runs"), &dir.path().join("cache"), &["--set", "train.max_steps=2", "--set", "train.save_interval=0"]);
    let mut run = spawn(Command::new(bin()).args(&a).current_dir(repo()).env("OMP_NUM_THREADS", "100000").env("MKL_NUM_THREADS", "100000"));
    let (bound, started) = (cores + 32, std::time::Instant::now());
    let mut most = 0;
    while run.is_running() {
        let status = std::fs::read_to_string(format!("/proc/{}/status", run.id())).unwrap_or_default();
        let threads = status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse::<usize>().ok());
        most = most.max(threads.unwrap_or(0));
        if most > bound {
            run.kill();
            panic!("{most} threads on {cores} core(s) after {:.1} s:\n{}", started.elapsed().as_secs_f64(), run.stderr_so_far());
        }
        assert!(started.elapsed() < LIMIT, "still running after {LIMIT:?}:\n{}", run.stderr_so_far());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = finish_bounded(run, LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    eprintln!("FIGURE OMP_NUM_THREADS=100000 on {cores} core(s): at most {most} threads, {:.1} s", started.elapsed().as_secs_f64());
    for key in ["OMP_NUM_THREADS", "MKL_NUM_THREADS"] {
        let warning = format!("warning: {key}=100000 asks for more threads than the {cores} core(s) this process may use: using {cores}");
        assert_eq!(err.matches(&warning).count(), 1, "{err}");
    }
    // Before anything else: libtorch sizes its pools later, from the capped values.
    assert!(err.starts_with("warning: OMP_NUM_THREADS=100000"), "{err}");
    assert!(err.contains(&format!("device cpu ({cores} threads)")), "{err}");
}

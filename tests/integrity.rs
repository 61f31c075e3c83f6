//! What a user does with a run's files never loses a checkpoint or pairs it with the
//! wrong tokenizer or config: `export-hf` never writes into a run and is whole or absent,
//! a refused resume leaves the run directory as it was, and `generate` and `export-hf`
//! check the tokenizer against the checkpoint's hash.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[rustfmt::skip]
const SETS: [&str; 12] = [
    "--set", "wandb.mode=disabled", "--set", "train.max_steps=2", "--set", "train.save_interval=2",
    "--set", "train.eval_interval=0", "--set", "optim.warmup_steps=1", "--set", "train.micro_batch_size=2",
];

/// One token cache for every test here (their runs share the data): built once, by
/// whichever test comes first, while the others wait on its lock.
fn shared_cache() -> String {
    static CACHE: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    format!("--set=data.cache_dir={}", CACHE.get_or_init(|| tempfile::tempdir().unwrap()).path().display())
}

fn train(dir: &Path, run: &str, extra: &[&str]) -> Output {
    let mut args = tiny_run_args(&SETS, dir, run, extra);
    args.push(shared_cache());
    run_bounded(Command::new(bin()).args(args).current_dir(repo()), LIMIT)
}

/// A trained tiny run and its checkpoint at step 2.
fn trained(dir: &Path, run: &str, extra: &[&str]) -> PathBuf {
    let out = train(dir, run, extra);
    assert!(out.status.success(), "{}", stderr(&out));
    dir.join(format!("runs/{run}/checkpoints/step_00000002"))
}

fn export(checkpoint: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["export-hf", "--checkpoint", checkpoint.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend(extra);
    run(&args)
}

/// `export` with a fault injected (`ALGPT2_FAULT`).
fn export_with_fault(checkpoint: &Path, out: &Path, extra: &[&str], fault: &str) -> Output {
    let mut args = vec!["export-hf", "--checkpoint", checkpoint.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend(extra);
    run_bounded(Command::new(bin()).args(args).env("ALGPT2_FAULT", fault).current_dir(repo()), LIMIT)
}

/// The entries of `dir` whose names start with `prefix`.
fn named(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect()
}

fn generate(checkpoint: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["generate", "--checkpoint", checkpoint.to_str().unwrap(), "--prompt", "a", "--max-new-tokens", "3"];
    args.extend(extra);
    run(&args)
}

fn refused(out: &Output, says: &str) {
    assert!(!out.status.success(), "should have failed:\n{}", stderr(out));
    assert!(stderr(out).contains(says), "expected {says:?} in:\n{}", stderr(out));
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn export_hf_never_writes_into_a_run_and_is_whole_or_absent() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path(), "r", &[]);
    let run = dir.path().join("runs/r");
    let model = bytes(&ckpt.join("model.safetensors"));

    // Into the checkpoint itself, into the run, or over the directory holding the run.
    refused(&export(&ckpt, &ckpt, &["--force"]), "is a checkpoint");
    refused(&export(&ckpt, &run.join("export"), &[]), "is inside the run directory");
    refused(&export(&ckpt, &run, &["--force"]), "is inside the run directory");
    refused(&export(&ckpt, &dir.path().join("runs"), &["--force"]), "contains the checkpoint");
    assert_eq!(bytes(&ckpt.join("model.safetensors")), model);
    assert!(!run.join("export").exists());
    assert!(algpt2_ddp::checkpoint::verify(&ckpt).is_ok());

    // A new directory; a non-empty one only with --force, and only a previous export.
    let hf = dir.path().join("hf");
    let out = export(&ckpt, &hf, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(hf.join(file).is_file(), "{file}");
    }
    refused(&export(&ckpt, &hf, &[]), "is not empty: pass --force");
    let out = export(&ckpt, &hf, &["--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::create_dir(dir.path().join("notes")).unwrap();
    std::fs::create_dir(dir.path().join("notes/sub")).unwrap();
    refused(&export(&ckpt, &dir.path().join("notes"), &["--force"]), "not replacing it");

    // A broken tokenizer fails the export and leaves nothing: no half-written directory.
    let tokenizer = bytes(&run.join("tokenizer.json"));
    std::fs::write(run.join("tokenizer.json"), "{ broken").unwrap();
    let hf2 = dir.path().join("hf2");
    refused(&export(&ckpt, &hf2, &[]), "tokenizer");
    assert!(!hf2.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Over a previous export: the old one stays whole.
    refused(&export(&ckpt, &hf, &["--force"]), "tokenizer");
    assert_eq!(bytes(&hf.join("tokenizer.json")), tokenizer);
}

#[test]
fn force_replaces_only_a_marked_export_and_the_next_export_cleans_up_after_a_kill() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path(), "r", &[]);
    let exports = dir.path().join("exports");
    std::fs::create_dir(&exports).unwrap();

    // A folder of the user's, files only: refused even with --force, and left as it was.
    let thesis = exports.join("thesis");
    std::fs::create_dir(&thesis).unwrap();
    std::fs::write(thesis.join("thesis.tex"), "\\documentclass{book}").unwrap();
    std::fs::write(thesis.join("data.csv"), "a,b\n1,2\n").unwrap();
    refused(&export(&ckpt, &thesis, &["--force"]), "holds no .algpt2-export.json, so it is not a previous export");
    assert_eq!(bytes(&thesis.join("thesis.tex")), b"\\documentclass{book}");
    assert_eq!(bytes(&thesis.join("data.csv")), b"a,b\n1,2\n");

    // An export is marked with the files it wrote.
    let hf = exports.join("hf");
    let out = export(&ckpt, &hf, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let marker: serde_json::Value = serde_json::from_slice(&bytes(&hf.join(".algpt2-export.json"))).unwrap();
    assert_eq!(marker["files"], serde_json::json!(["config.json", "model.safetensors", "tokenizer.json"]));
    // A file put into it later is never deleted: refused, naming it.
    std::fs::write(hf.join("notes.txt"), "mine").unwrap();
    let out = export(&ckpt, &hf, &["--force"]);
    refused(&out, "notes.txt, which the previous export did not write");
    assert_eq!(bytes(&hf.join("notes.txt")), b"mine");
    std::fs::remove_file(hf.join("notes.txt")).unwrap();
    let out = export(&ckpt, &hf, &["--force"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // An export made before exports were marked: refused, saying what to do.
    let old = exports.join("old");
    std::fs::create_dir(&old).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(hf.join(file), old.join(file)).unwrap();
    }
    refused(&export(&ckpt, &old, &["--force"]), "delete it yourself");
    assert!(old.join("model.safetensors").is_file());

    // Killed once the export is whole in its staging directory: the next export (of
    // another --out in the same directory) removes it, and leaves a live process's alone.
    let killed = export_with_fault(&ckpt, &exports.join("hf2"), &[], "export_kill_staged@0");
    assert_eq!(killed.status.signal(), Some(libc::SIGKILL), "{}", stderr(&killed));
    let left = named(&exports, ".hf2.export-");
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].join("model.safetensors").is_file());
    assert!(!exports.join("hf2").exists());
    let live = exports.join(format!(".other.export-{}", std::process::id()));
    std::fs::create_dir(&live).unwrap();
    std::fs::write(live.join("model.safetensors"), "in progress").unwrap();
    let out = export(&ckpt, &exports.join("hf3"), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("the staging directory of an export that was interrupted"), "{}", stderr(&out));
    assert!(named(&exports, ".hf2.export-").is_empty());
    assert!(live.join("model.safetensors").is_file());

    // Killed with the previous export moved aside and the new one not yet in place: the
    // next export puts the previous one back first (and so finds --out not empty).
    let previous = bytes(&hf.join("model.safetensors"));
    let killed = export_with_fault(&ckpt, &hf, &["--force"], "export_kill_aside@0");
    assert_eq!(killed.status.signal(), Some(libc::SIGKILL), "{}", stderr(&killed));
    assert!(!hf.exists());
    assert_eq!(named(&exports, ".hf.export-").len(), 2);
    let out = export(&ckpt, &hf, &[]);
    refused(&out, "is not empty: pass --force");
    assert!(stderr(&out).contains("put the previous export back into"), "{}", stderr(&out));
    assert_eq!(bytes(&hf.join("model.safetensors")), previous);
    assert!(named(&exports, ".hf.export-").is_empty(), "{:?}", named(&exports, ".hf.export-"));
    let out = export(&ckpt, &hf, &["--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn generate_and_export_refuse_a_tokenizer_the_checkpoint_was_not_trained_with() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path(), "a", &[]);
    trained(dir.path(), "b", &["--set", "tokenizer.vocab_size=400"]);
    let run_a = dir.path().join("runs/a");
    let own = dir.path().join("a-tokenizer.json");
    std::fs::copy(run_a.join("tokenizer.json"), &own).unwrap();
    assert!(generate(&ckpt, &[]).status.success());

    // Another run's tokenizer in its place.
    std::fs::copy(dir.path().join("runs/b/tokenizer.json"), run_a.join("tokenizer.json")).unwrap();
    refused(&generate(&ckpt, &[]), "is not the tokenizer checkpoint");
    refused(&export(&ckpt, &dir.path().join("hf"), &[]), "is not the tokenizer checkpoint");
    assert!(!dir.path().join("hf").exists());
    // --tokenizer chooses one, checked the same way.
    let out = generate(&ckpt, &["--tokenizer", own.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    refused(&generate(&ckpt, &["--tokenizer", dir.path().join("runs/b/tokenizer.json").to_str().unwrap()]), "is not the tokenizer");
    let out = export(&ckpt, &dir.path().join("hf"), &["--tokenizer", own.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(bytes(&dir.path().join("hf/tokenizer.json")), bytes(&own));

    // None at all: refused, naming the way out.
    std::fs::remove_file(run_a.join("tokenizer.json")).unwrap();
    refused(&generate(&ckpt, &[]), "pass --tokenizer PATH");
    refused(&export(&ckpt, &dir.path().join("hf3"), &[]), "pass --tokenizer PATH");
    assert!(!dir.path().join("hf3").exists());
}

#[test]
fn a_refused_resume_leaves_the_run_directory_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path(), "r", &[]);
    let run = dir.path().join("runs/r");
    let config = bytes(&run.join("config.yaml"));
    let tokenizer = bytes(&run.join("tokenizer.json"));
    let metrics = bytes(&run.join("metrics.jsonl"));

    // Another model, then another tokenizer: each resume is refused before anything is written.
    let out = train(dir.path(), "r", &["--set", "model.n_embd=48", "--set", "train.max_steps=4"]);
    refused(&out, "another model config");
    let out = train(dir.path(), "r", &["--set", "tokenizer.vocab_size=400", "--set", "train.max_steps=4"]);
    refused(&out, "another tokenizer");
    assert_eq!(bytes(&run.join("config.yaml")), config, "config.yaml was rewritten by a refused resume");
    assert_eq!(bytes(&run.join("tokenizer.json")), tokenizer, "tokenizer.json was rewritten by a refused resume");
    assert_eq!(bytes(&run.join("metrics.jsonl")), metrics);

    // The run's own files still go with its checkpoints.
    let cfg = run.join("config.yaml");
    let out = run_in(&repo(), &["eval", "--config", cfg.to_str().unwrap(), "--checkpoint", ckpt.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(generate(&ckpt, &[]).status.success());
}

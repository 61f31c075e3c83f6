//! Every subcommand with wrong, extreme and missing argument values, as a user (or a
//! script with a bug) would give them: each ends with exit 0, 1 or 2 and a message, never
//! a panic (101) or an abort (134).

mod common;
use algpt2_ddp::rng::SplitMix64;
use common::*;
use std::process::Command;

/// Values that break assumptions: empty, negative, zero, huge, not a number, a directory,
/// a path that does not exist, a file of the wrong kind, control characters.
const VALUES: [&str; 14] = [
    "", "-1", "0", "18446744073709551616", "1e400", "NaN", "abc", "/", "/no/such/path", "Cargo.toml", "configs", "\n", "1,0,-3", "9999999",
];

/// (subcommand and fixed arguments, flags that take a value).
fn commands() -> Vec<(Vec<&'static str>, Vec<&'static str>)> {
    vec![
        (vec!["info", "--config", "configs/quickstart.yaml"], vec!["--set"]),
        (
            vec!["generate", "--checkpoint", "configs"],
            vec!["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--prompt", "--checkpoint"],
        ),
        (vec!["export-hf", "--checkpoint", "configs"], vec!["--out", "--checkpoint"]),
        (vec!["eval", "--config", "configs/quickstart.yaml", "--checkpoint", "/no/such"], vec!["--split", "--checkpoint", "--config"]),
        // --steps and --retries are left out here: a huge value is a long run, not an error
        // (their bounds are checked in `bounded_counts_are_checked`).
        (vec!["bench", "--config", "configs/quickstart.yaml", "--steps", "1"], vec!["--config"]),
        (vec!["plot", "/no/such/run"], vec!["--out"]),
        (vec!["prepare", "--config", "configs/quickstart.yaml"], vec!["--config"]),
        (vec!["wandb-sync", "/no/such/run"], vec!["--timeout"]),
        (vec!["download", "--base-url", "http://127.0.0.1:9", "--retries", "0"], vec!["--variant", "--dest", "--base-url"]),
        (vec!["doctor", "--sizes-mb", "1"], vec!["--sizes-mb"]),
        (vec!["train", "--config", "configs/quickstart.yaml"], vec!["--config", "--set"]),
    ]
}

#[test]
fn every_subcommand_survives_bad_argument_values() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SplitMix64::new(99);
    let mut runs = 0;
    for (base, flags) in commands() {
        // Each flag with a few of the values; --set gets key=value shapes.
        for flag in flags {
            for _ in 0..3 {
                let value = VALUES[rng.index_below(VALUES.len())];
                let value = if flag == "--set" {
                    let key = ["train.max_steps", "model.vocab_size", "run_name", "data.train", "train.micro_batch_size", "device"]
                        [rng.index_below(6)];
                    format!("{key}={value}")
                } else {
                    value.to_string()
                };
                let mut cmd = Command::new(bin());
                cmd.args(&base).arg(flag).arg(&value).current_dir(repo());
                // Anything a run writes stays in the temporary directory; nothing waits long.
                cmd.args(if base[0] == "train" || base[0] == "bench" || base[0] == "prepare" {
                    vec![
                        format!("--set=out_dir={}", dir.path().join("runs").display()),
                        format!("--set=data.cache_dir={}", dir.path().join("cache").display()),
                        "--set=train.max_steps=1".into(),
                        "--set=wandb.mode=disabled".into(),
                    ]
                } else {
                    vec![]
                });
                if base[0] == "wandb-sync" {
                    cmd.env("WANDB_BASE_URL", "http://127.0.0.1:9").env("WANDB_API_KEY", WANDB_KEY);
                }
                let out = run_bounded(&mut cmd, LIMIT);
                runs += 1;
                let code = out.status.code();
                let err = stderr(&out);
                assert!(matches!(code, Some(0..=2)), "`{} {flag} {value:?}`: exit {code:?}\n{err}", base.join(" "));
                assert!(!err.contains("panicked") && !err.contains("internal failure"), "`{} {flag} {value:?}`:\n{err}", base.join(" "));
                if code != Some(0) {
                    assert!(err.contains("error"), "`{} {flag} {value:?}`: exit {code:?} without a message", base.join(" "));
                }
            }
        }
    }
    assert!(runs > 60, "{runs}");
}

#[test]
fn bounded_counts_are_checked() {
    for (args, says) in [
        (vec!["bench", "--config", "configs/quickstart.yaml", "--steps", "0"], "--steps"),
        (vec!["bench", "--config", "configs/quickstart.yaml", "--steps", "-1"], "--steps"),
        (vec!["doctor", "--sizes-mb", "0"], "--sizes-mb"),
        (vec!["doctor", "--sizes-mb", "1,99999999"], "--sizes-mb"),
        (vec!["wandb-sync", "runs/x", "--timeout", "0"], "--timeout"),
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
}

/// A panic inside the program (what tch does when a libtorch call fails, e.g. out of
/// memory) ends it with one clear line and exit 1, not a backtrace and 101.
#[test]
fn a_panic_is_a_one_line_error_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let a = tiny_run_args(&["--set", "wandb.mode=disabled", "--set", "optim.warmup_steps=1"], dir.path(), "p", &[]);
    let out =
        run_bounded(Command::new(bin()).args(&a).env("ALGPT2_FAULT", "panic@2").env_remove("RUST_BACKTRACE").current_dir(repo()), LIMIT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("error: internal failure: injected failure after step 2") && err.contains("src/faults.rs"), "{err}");
    assert!(!err.contains("panicked") && !err.contains("stack backtrace"), "{err}");
}

/// `plot` that cannot write or read: a sentence naming the file and the reason (the OS's
/// where it has one), exit 1, never the Rust debug text of the image encoder's error.
#[test]
fn plot_errors_are_sentences_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let rows: String = (1..=5).map(|s| format!("{{\"step\": {s}, \"train/loss\": {}}}\n", 6.0 - s as f64)).collect();
    std::fs::write(run_dir.join("metrics.jsonl"), rows).unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (run_s, empty_s) = (run_dir.to_str().unwrap(), empty.to_str().unwrap());
    let missing_parent = dir.path().join("no/such/dir/plots.png");
    let missing_parent = missing_parent.to_str().unwrap();
    for (run_arg, out, says) in [
        (
            run_s,
            missing_parent,
            format!("cannot write {missing_parent}: the directory {} does not exist", dir.path().join("no/such/dir").display()),
        ),
        // /proc takes no new files, even from root: the OS's reason is passed on.
        (run_s, "/proc/plots.png", "cannot write /proc/plots.png: No such file or directory (os error 2)".to_string()),
        (run_s, empty_s, format!("cannot write {empty_s}: plots are PNG images")),
        (empty_s, "x.png", format!("cannot read {empty_s}/metrics.jsonl: {empty_s} is not a run directory (it has no metrics.jsonl)")),
    ] {
        let result = run(&["plot", run_arg, "--out", out]);
        let err = stderr(&result);
        assert_eq!(result.status.code(), Some(1), "plot {run_arg} --out {out}: {err}");
        assert!(err.contains(&says), "plot {run_arg} --out {out}: expected {says:?} in\n{err}");
        assert!(!err.contains("Os {") && !err.contains("Error("), "plot {run_arg} --out {out}: debug text\n{err}");
    }
    // And a writable place still gets its PNG.
    let png = dir.path().join("plots.png");
    let out = run(&["plot", run_s, "--out", png.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
}

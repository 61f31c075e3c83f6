//! The config contract as a user meets it: errors with key path and line (exit 2),
//! `--set` overrides, `info`, and the run directory a `train` start-up writes.

mod common;
use common::*;
use serde_json::Value;

#[test]
fn info_json_gives_the_published_parameter_counts() {
    for (config, expected) in [
        ("configs/wikitext103.yaml", 13_850_880u64),
        ("configs/wikitext103-gpt2.yaml", 124_439_808),
        ("configs/wikitext103-shared.yaml", 46_473_216),
    ] {
        let out = run(&["info", "--config", config, "--json"]);
        assert!(out.status.success(), "{config}: {}", stderr(&out));
        let v: Value = serde_json::from_str(&stdout(&out)).expect("one JSON object");
        assert_eq!(v["parameters"].as_u64(), Some(expected), "{config}");
    }
}

#[test]
fn info_text_and_set_override() {
    let out = run(&["info", "--config", "configs/wikitext103.yaml", "--set", "model.embedding_size=null"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("parameters: 46,473,216"), "{text}");
    assert!(text.contains("sharing-only"), "{text}");
}

#[test]
fn every_shipped_config_is_valid() {
    for entry in std::fs::read_dir(repo().join("configs")).unwrap() {
        let path = entry.unwrap().path();
        let out = run(&["info", "--config", path.to_str().unwrap(), "--json"]);
        assert!(out.status.success(), "{}: {}", path.display(), stderr(&out));
    }
}

#[test]
fn unknown_key_exits_2_naming_path_line_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "bad.yaml", "model:\n  n_layer: 2\n  n_hed: 4\n");
    let out = run(&["info", "--config", &cfg]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("bad.yaml, line 3: model.n_hed: unknown key, did you mean model.n_head?"), "{err}");
}

#[test]
fn wrong_type_and_out_of_range_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "t.yaml", "train:\n  seq_len: lots\n");
    let out = run(&["info", "--config", &cfg]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("t.yaml, line 2: train.seq_len: invalid type"), "{}", stderr(&out));

    let cfg = write_config(dir.path(), "r.yaml", "optim:\n  lr: 1.0e-3\n  beta2: 1.5\n");
    let out = run(&["info", "--config", &cfg]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("r.yaml, line 3: optim.beta2: 1.5 is out of range [0, 1)"), "{}", stderr(&out));
}

#[test]
fn bad_set_exits_2_naming_the_argument() {
    let out = run(&["info", "--config", "configs/quickstart.yaml", "--set", "train.seq_len=4096"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--set train.seq_len=4096: train.seq_len: 4096 exceeds model.n_positions = 128"), "{}", stderr(&out));
}

#[test]
fn missing_config_file_exits_2_naming_it() {
    let out = run(&["info", "--config", "configs/nope.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("configs/nope.yaml: cannot read"), "{}", stderr(&out));
}

#[test]
fn config_is_required_and_help_explains_commands() {
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--config"), "{}", stderr(&out));
    let out = run(&["--help"]);
    assert!(out.status.success());
    for cmd in ["train", "info"] {
        assert!(stdout(&out).contains(cmd), "{}", stdout(&out));
    }
}

#[test]
fn bad_config_starts_no_work() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("runs");
    let cfg = write_config(dir.path(), "bad.yaml", &format!("out_dir: {}\nmodel:\n  dropout: 2.0\n", out_dir.display()));
    let out = run(&["--config", &cfg]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!out_dir.exists(), "a refused config must not create the run directory");
}

#[test]
fn a_config_file_whose_name_is_no_run_name_needs_one() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("runs");
    // `..yaml` would make the run directory out_dir itself, `...yaml` its parent.
    for (file, stem) in [("..yaml", "\".\""), ("...yaml", "\"..\"")] {
        let cfg = write_config(dir.path(), file, &format!("out_dir: {}\ndata:\n  format: synthetic\n", out_dir.display()));
        let out = run(&["--config", &cfg]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(&format!("{file}: run_name: not set")) && err.contains(stem) && err.contains("--set run_name=NAME"), "{err}");
        assert!(!out_dir.exists(), "a refused config must not create the run directory");
        let out = run(&["info", "--config", &cfg, "--set", "run_name=mine"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

#[test]
fn train_writes_the_resolved_config_and_tokenizer_into_the_run_dir() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("runs");
    let out = run(&[
        "train",
        "--config",
        "configs/quickstart.yaml",
        "--set",
        &format!("out_dir={}", out_dir.display()),
        "--set",
        "run_name=startup",
        "--set",
        "model.n_layer=3",
        "--set",
        "train.precision=fp32",
        "--set",
        "device=cpu",
        "--set",
        &format!("data.cache_dir={}", dir.path().join("cache").display()),
        "--set",
        "train.max_steps=2",
        "--set",
        "optim.warmup_steps=1",
        "--set",
        "wandb.mode=disabled",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run_dir = out_dir.join("startup");
    assert!(run_dir.join("checkpoints").is_dir());
    let saved = std::fs::read_to_string(run_dir.join("config.yaml")).unwrap();
    assert!(saved.contains("n_layer: 3"), "{saved}");
    // The saved config is complete: loading it alone gives the same run.
    let again = run(&["info", "--config", run_dir.join("config.yaml").to_str().unwrap(), "--json"]);
    assert!(again.status.success(), "{}", stderr(&again));
    let v: Value = serde_json::from_str(&stdout(&again)).unwrap();
    assert_eq!(v["model"]["n_layer"].as_u64(), Some(3));
    let log = std::fs::read_to_string(run_dir.join("train.log")).unwrap();
    assert!(log.contains("resolved config"), "{log}");
    assert!(log.contains("global batch: 16 windows"), "{log}");
    assert!(run_dir.join("tokenizer.json").is_file());
}

#[test]
fn mpirun_two_ranks_start_together_and_only_rank_0_writes() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("runs");
    let out = run_bounded(
        mpirun(2)
            .arg(bin())
            .args(["--config", "configs/quickstart.yaml", "--set", "device=cpu", "--set", "train.max_steps=3"])
            .args(["--set", "train.precision=fp32"])
            .args(["--set", "optim.warmup_steps=1", "--set", "wandb.mode=disabled"])
            .arg("--set")
            .arg(format!("out_dir={}", out_dir.display()))
            .arg("--set")
            .arg(format!("data.cache_dir={}", dir.path().join("cache").display()))
            .current_dir(repo()),
        LIMIT,
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("world: 2 rank(s), 2 on this node"), "{err}");
    // Rank 1 logs warnings only; the info lines appear once.
    assert_eq!(err.matches("resolved config").count(), 1, "{err}");
    let log = std::fs::read_to_string(out_dir.join("quickstart/train.log")).unwrap();
    assert_eq!(log.matches("world: 2 rank(s)").count(), 1, "{log}");
    // Rank 0 built the cache while rank 1 waited; both trained; only rank 0 saved.
    assert!(log.contains("building token cache"), "{log}");
    assert!(out_dir.join("quickstart/checkpoints/step_00000003").is_dir());
    assert_eq!(std::fs::read_to_string(out_dir.join("quickstart/metrics.jsonl")).unwrap().lines().count(), 1);
}

#[test]
fn device_cuda_without_a_gpu_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&[
        "--config",
        "configs/quickstart.yaml",
        "--set",
        "device=cuda",
        "--set",
        &format!("out_dir={}", dir.path().display()),
        "--set",
        &format!("data.cache_dir={}", dir.path().join("cache").display()),
    ]);
    if tch::Cuda::is_available() {
        eprintln!("skipped: this machine has a CUDA GPU");
        return;
    }
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("device: cuda was asked for but libtorch sees no CUDA GPU"), "{}", stderr(&out));
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing is written");
}

/// Invalid sampling values are refused before anything is loaded, naming the flag.
#[test]
fn generate_rejects_invalid_sampling_values() {
    for (flag, value, says) in [
        ("--temperature", "-1", "finite number >= 0"),
        ("--temperature", "NaN", "finite number >= 0"),
        ("--temperature", "inf", "finite number >= 0"),
        ("--top-p", "1.5", "(0, 1]"),
        ("--top-p", "-0.5", "(0, 1]"),
        ("--top-p", "0", "(0, 1]"),
        ("--top-k", "0", "1.."),
        ("--top-k", "-3", "1.."),
    ] {
        let out = run(&["generate", "--checkpoint", "no/such/checkpoint", flag, value]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(flag) && err.contains(says), "{flag} {value}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // Valid edge values get past the flags (and fail only on the missing checkpoint).
    for (flag, value) in [("--temperature", "0"), ("--top-p", "1"), ("--top-k", "1")] {
        let out = run(&["generate", "--checkpoint", "no/such/checkpoint", flag, value]);
        assert_eq!(out.status.code(), Some(1), "{flag} {value}: {}", stderr(&out));
        assert!(stderr(&out).contains("no/such/checkpoint"), "{}", stderr(&out));
    }
}

/// The common smoke test of a long config: a short run warms up over all of it.
#[test]
fn a_short_smoke_run_of_a_long_config_starts_with_a_warning() {
    for config in ["configs/wikitext103.yaml", "configs/wikitext103-gpt2.yaml", "configs/wikitext103-shared.yaml"] {
        let out = run(&["info", "--config", config, "--set", "train.max_steps=50"]);
        assert!(out.status.success(), "{config}: {}", stderr(&out));
        assert!(stderr(&out).contains("warming up over the whole run (50 steps)"), "{config}: {}", stderr(&out));
    }
}

/// Sizes that cannot fit are refused before anything is written, with the estimate;
/// alone and under mpirun the exit code is 2.
#[test]
fn sizes_that_cannot_fit_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let a = tiny_run_args(&["--set", "wandb.mode=disabled", "--set", "train.micro_batch_size=1000000000"], dir.path(), "huge", &[]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let started = std::time::Instant::now();
    let out = run(&a);
    let err = stderr(&out);
    eprintln!(
        "FIGURE micro_batch_size 1e9: exit {:?} after {:.2} s: {}",
        out.status.code(),
        started.elapsed().as_secs_f64(),
        err.lines().last().unwrap_or("")
    );
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("needs about") && err.contains("activations") && err.contains("reduce train.micro_batch_size"), "{err}");
    assert!(!dir.path().join("runs/huge").exists(), "the run directory was created");
    assert!(!err.contains("panicked"), "{err}");

    let out = run_bounded(mpirun(2).arg(bin()).args(&a).current_dir(repo()), LIMIT);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("needs about"), "{}", stderr(&out));
    assert!(!dir.path().join("runs/huge").exists());

    // A vocabulary no model could hold: the config's own limit.
    let out = run(&["info", "--config", "configs/quickstart.yaml", "--set", "model.vocab_size=1000000000000"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("model.vocab_size") && stderr(&out).contains("exceeds the largest supported"), "{}", stderr(&out));
    // train.memory_check is a key a user can turn off.
    let out = run(&["info", "--config", "configs/quickstart.yaml", "--set", "train.memory_check=false"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Runs `info --config path`, killed after 10 s so that a config read that blocks cannot
/// hang the suite: the exit code (None when killed), stderr and the seconds it took.
fn info_within_10_s(path: &str) -> (Option<i32>, String, f64) {
    let started = std::time::Instant::now();
    let mut child = spawn(std::process::Command::new(bin()).args(["info", "--config", path]).current_dir(repo()));
    while child.is_running() && started.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let killed = child.is_running();
    child.kill();
    let out = finish_bounded(child, LIMIT);
    (if killed { None } else { out.status.code() }, stderr(&out), started.elapsed().as_secs_f64())
}

#[test]
fn a_device_or_fifo_as_config_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("config.fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    for (path, kind) in [("/dev/zero", "a character device"), (fifo.to_str().unwrap(), "a FIFO")] {
        let (code, err, seconds) = info_within_10_s(path);
        eprintln!("FIGURE --config {path}: exit {code:?} after {seconds:.2} s");
        assert_eq!(code, Some(2), "--config {path}: killed after 10 s or wrong exit\n{err}");
        assert!(err.contains(&format!("{path}: cannot read: not a regular file ({kind})")), "{err}");
    }
}

#[test]
fn a_config_over_1_mib_is_refused_naming_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.yaml");
    // One comment line of 2 MiB: valid YAML, so only its size can refuse it.
    std::fs::write(&big, vec![b'#'; 2 << 20]).unwrap();
    let (code, err, _) = info_within_10_s(big.to_str().unwrap());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("{}: cannot read: 2097152 bytes is over the 1 MiB", big.display())), "{err}");
}

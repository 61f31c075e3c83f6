//! launch/bundle.sh: the bundle unpacked elsewhere runs against "the host's" PyTorch (here
//! the project venv's, found through the python3 on PATH, as on a GPU host), with no
//! RPATH to the build machine; a missing or wrong libtorch is a clear error.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The launcher binary cargo built beside the trainer (a workspace default member).
fn launcher() -> PathBuf {
    let path = Path::new(bin()).with_file_name("algpt2-ddp-launch");
    assert!(path.is_file(), "{} is missing: build it with `cargo build -p algpt2-launch`", path.display());
    path
}

/// A PATH whose python3 is the venv's (it has torch 2.11), without cargo's own additions.
fn host_path() -> String {
    format!("{}:/usr/local/bin:/usr/bin:/bin", repo().join(".venv/bin").display())
}

fn bundle(out: &Path) -> PathBuf {
    let made = run_bounded(
        Command::new("bash").arg(repo().join("launch/bundle.sh")).args([
            "--out",
            out.to_str().unwrap(),
            "--trainer",
            bin(),
            "--launcher",
            launcher().to_str().unwrap(),
        ]),
        LIMIT,
    );
    assert!(made.status.success(), "bundle.sh failed:\n{}\n{}", stdout(&made), stderr(&made));
    let tarball = out.join("algpt2-ddp-bundle.tar.gz");
    assert!(tarball.is_file() && out.join("bundle/BUNDLE").is_file());
    tarball
}

#[test]
fn the_unpacked_bundle_trains_with_the_hosts_torch() {
    let tmp = tempfile::tempdir().unwrap();
    let tarball = bundle(&tmp.path().join("dist"));
    // Unpacked somewhere else, as on another machine.
    let host = tmp.path().join("host");
    std::fs::create_dir_all(&host).unwrap();
    let untar = run_bounded(Command::new("tar").arg("xf").arg(&tarball).current_dir(&host), LIMIT);
    assert!(untar.status.success(), "{}", stderr(&untar));
    let root = host.join("bundle");
    for f in [
        "bin/algpt2-ddp", "libexec/algpt2-ddp", "launch/single-node.sh", "launch/env.sh", "launch/gpu-checks.sh", "launch/bench-gpu.sh",
        "launch/gpu-prove.sh", "reference/algpt2.py", "configs/quickstart.yaml", "README.md", "BUNDLE",
    ] {
        assert!(root.join(f).is_file(), "the bundle lacks {f}");
    }
    // Nothing points back at the build machine's venv.
    let dynamic = run_bounded(Command::new("readelf").args(["-d"]).arg(root.join("libexec/algpt2-ddp")), LIMIT);
    let dynamic = stdout(&dynamic);
    assert!(dynamic.contains("libtorch_cpu.so") && !dynamic.contains("RPATH") && !dynamic.contains("RUNPATH"), "{dynamic}");

    // The launcher finds libtorch through python3 and says which one.
    let cache = tmp.path().join("cache");
    let info = run_bounded(
        Command::new(root.join("bin/algpt2-ddp"))
            .args(["info", "--config", "configs/quickstart.yaml", "--json"])
            .current_dir(&root)
            .env("PATH", host_path())
            .env("XDG_CACHE_HOME", &cache)
            .env_remove("LD_LIBRARY_PATH"),
        LIMIT,
    );
    assert!(info.status.success(), "{}", stderr(&info));
    assert!(
        stderr(&info).contains("algpt2-ddp: libtorch 2.11.0") && stderr(&info).contains("the torch package of python3"),
        "{}",
        stderr(&info)
    );
    let parsed: serde_json::Value = serde_json::from_str(stdout(&info).trim()).unwrap();
    assert!(parsed["parameters"].as_u64().unwrap() > 0);
    // cudarc's libnccl.so: the venv has the link setup.sh made; a host's wheel does not,
    // and then the launcher links it under the cache, out of the user's way.
    let site = glob::glob(repo().join(".venv/lib/python3*/site-packages").to_str().unwrap()).unwrap().next().unwrap().unwrap();
    if !site.join("nvidia/nccl/lib/libnccl.so").exists() {
        let links: Vec<_> = std::fs::read_dir(cache.join("algpt2-ddp")).unwrap().collect();
        assert_eq!(links.len(), 1);
    }

    // single-node.sh trains two ranks from the bundle, as on a GPU host without cargo.
    let mut sets = vec![
        "--set", "train.max_steps=3", "--set", "train.log_interval=1", "--set", "train.eval_interval=3", "--set", "train.save_interval=3",
        "--set", "optim.warmup_steps=1", "--set", "wandb.mode=disabled",
    ];
    sets.extend(TINY_MODEL);
    let trained = run_bounded(
        Command::new("bash")
            .arg(root.join("launch/single-node.sh"))
            .arg("configs/quickstart.yaml")
            .arg("2")
            .args(&sets)
            .current_dir(&root)
            .env("PATH", host_path())
            .env("XDG_CACHE_HOME", &cache)
            .env("OMP_NUM_THREADS", "1")
            .env_remove("LD_LIBRARY_PATH"),
        LIMIT,
    );
    assert!(trained.status.success(), "{}\n{}", stdout(&trained), stderr(&trained));
    let run = root.join("runs/quickstart");
    assert!(run.join("checkpoints/step_00000003/model.safetensors").is_file(), "{}", stderr(&trained));
    let log = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(log.lines().count() >= 3, "{log}");

    // gpu-prove.sh (gpu-checks.sh, then bench-gpu.sh) on a machine without a GPU: doctor
    // passes, the GPU checks and the benchmark say why not, and one summary table ends it.
    let proved = run_bounded(
        Command::new("bash")
            .arg(root.join("launch/gpu-prove.sh"))
            .arg(tmp.path().join("gpu-prove"))
            .current_dir(&root)
            .env("PATH", host_path())
            .env("XDG_CACHE_HOME", &cache)
            .env("DOCTOR_SIZES_MB", "1")
            .env("OMP_NUM_THREADS", "1")
            .env_remove("LD_LIBRARY_PATH"),
        LIMIT,
    );
    let said = stdout(&proved);
    if !tch::Cuda::is_available() {
        let checks = std::fs::read_to_string(tmp.path().join("gpu-prove/checks.txt")).unwrap_or_default();
        assert!(proved.status.success(), "{said}\n{}\n{checks}", stderr(&proved));
        assert!(said.contains("| doctor (") && said.contains("0 failed") && said.contains("| PASS |"), "{said}");
        assert_eq!(said.matches("skipped: no GPU | SKIP |").count(), 3, "{said}");
        assert!(said.contains("skipped: needs 2 GPUs (this machine has 0) | SKIP |"), "{said}");
        assert!(said.contains("a rank that never joins NCCL: skipped: no GPU | SKIP |"), "{said}");
        // One table: checks and benchmark rows under one header.
        assert_eq!(said.matches("| check or benchmark row | verdict | figures |").count(), 1, "{said}");
        assert_eq!(said.lines().filter(|l| l.starts_with("|---")).count(), 1, "{said}");
        assert!(said.contains("benchmark: skipped: no GPU"), "{said}");
        assert!(checks.ends_with("gpu-checks: 0 failure(s)\n"), "{checks}");
        assert!(said.contains("gpu-prove: checks exit 0, benchmark exit 0"), "{said}");
    }
}

#[test]
fn a_missing_or_wrong_libtorch_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    bundle(&tmp.path().join("dist"));
    let launcher = tmp.path().join("dist/bundle/bin/algpt2-ddp");
    let start = |envs: &[(&str, String)]| {
        let mut cmd = Command::new(&launcher);
        cmd.args(["info", "--config", "configs/quickstart.yaml"]).current_dir(repo()).env_remove("ALGPT2_TORCH");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        run_bounded(&mut cmd, LIMIT)
    };
    // No python3 with torch on PATH (only the system's directories, whose python3, if
    // any, has no torch), and no ALGPT2_TORCH.
    let no_python = tmp.path().join("empty");
    std::fs::create_dir_all(&no_python).unwrap();
    let out = start(&[("PATH", no_python.display().to_string())]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no libtorch found") && stderr(&out).contains("ALGPT2_TORCH"), "{}", stderr(&out));

    // ALGPT2_TORCH at something that is not torch.
    let out = start(&[("ALGPT2_TORCH", tmp.path().display().to_string())]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("is neither a torch package directory"), "{}", stderr(&out));

    // A torch of another release: refused with both versions named.
    let fake = tmp.path().join("site-packages/torch");
    std::fs::create_dir_all(fake.join("lib")).unwrap();
    std::fs::write(fake.join("lib/libtorch_cpu.so"), b"").unwrap();
    std::fs::write(fake.join("version.py"), "__version__ = '2.13.0+cu130'\n").unwrap();
    let out = start(&[("ALGPT2_TORCH", tmp.path().join("site-packages").display().to_string())]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("is PyTorch 2.13.0+cu130") && stderr(&out).contains("built for PyTorch 2.11.x"), "{}", stderr(&out));

    // ALGPT2_TORCH at the real one (the venv's site-packages) works.
    let site = glob::glob(repo().join(".venv/lib/python3*/site-packages").to_str().unwrap()).unwrap().next().unwrap().unwrap();
    let out = start(&[("ALGPT2_TORCH", site.display().to_string()), ("XDG_CACHE_HOME", tmp.path().join("cache").display().to_string())]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("(ALGPT2_TORCH)"), "{}", stderr(&out));
}

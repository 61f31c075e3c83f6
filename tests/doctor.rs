//! `algpt2-ddp doctor` on a machine without a GPU: the CPU, MPI and NVRTC checks pass,
//! the GPU ones say "skipped" and why, and a failed check means exit code 1.

mod common;
use common::*;

#[test]
fn doctor_passes_without_a_gpu_and_says_what_it_skipped() {
    let out = run(&["doctor", "--sizes-mb", "1"]);
    let text = stdout(&out);
    assert!(out.status.success(), "exit {:?}\n{text}\n{}", out.status.code(), stderr(&out));
    for expected in [
        "libtorch ", "2.11.", "MPI ", "Open MPI", "NCCL ", "[PASS] libtorch version", "[PASS] NVRTC kernels/dropout.cu",
        "[PASS] training step (cpu", "weights equal on all 1 rank(s)", "[SKIP] GPU kernels and AdamW vs CPU", "skipped: no GPU",
        "[SKIP] MPI all-reduce", "[SKIP] NCCL all-reduce", "0 failed",
    ] {
        assert!(text.contains(expected), "no {expected:?} in\n{text}");
    }
    if !tch::Cuda::is_available() {
        assert!(text.contains("GPUs") && text.contains("none"), "{text}");
    }
}

#[test]
fn doctor_under_mpirun_checks_every_rank_and_the_all_reduce() {
    let out = run_bounded(mpirun(2).args([bin(), "doctor", "--sizes-mb", "1,16"]).current_dir(repo()), LIMIT);
    let text = stdout(&out);
    assert!(out.status.success(), "exit {:?}\n{text}\n{}", out.status.code(), stderr(&out));
    assert!(text.contains("== rank 0") && text.contains("== rank 1"), "{text}");
    assert!(text.contains("[PASS] MPI all-reduce") && text.contains("exact sums across 2 ranks for 1/16 MB"), "{text}");
    assert_eq!(text.matches("busbw").count(), 4, "one bandwidth row per size on each rank:\n{text}");
    assert!(text.contains("exchange mpi, fp32 gradients, overlapped with backward, weights equal on all 2 rank(s)"), "{text}");
    assert!(text.contains("on 2 rank(s)"), "{text}");

    let out = run_bounded(mpirun(2).args([bin(), "doctor", "--sizes-mb", "1", "--json"]).current_dir(repo()), LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("one JSON object");
    assert_eq!(report["ok"], true);
    assert_eq!(report["world_size"], 2);
    let ranks = report["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 2);
    for r in ranks {
        let checks = r["checks"].as_array().unwrap();
        assert!(checks.iter().any(|c| c["name"] == "MPI all-reduce" && c["status"] == "pass"), "{r}");
        assert!(checks.iter().all(|c| c["status"] != "fail"), "{r}");
    }
}

#[test]
fn a_failed_check_makes_doctor_exit_1() {
    // A libtorch of another release (as the launcher would report it).
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("torch/lib")).unwrap();
    std::fs::write(tmp.path().join("torch/version.py"), "__version__ = '2.13.0+cpu'\ncuda = None\n").unwrap();
    let out = run_bounded(
        std::process::Command::new(bin())
            .args(["doctor", "--sizes-mb", "1"])
            .env("ALGPT2_TORCH_DIR", tmp.path().join("torch"))
            .current_dir(repo()),
        LIMIT,
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}\n{}", stderr(&out));
    assert!(text.contains("[FAIL] libtorch version") && text.contains("2.13.0+cpu") && text.contains("binds PyTorch 2.11.x"), "{text}");
    assert!(text.contains("1 failed"), "{text}");
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

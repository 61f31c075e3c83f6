//! Damaged and edited checkpoints, the way the config is fuzzed: trainer.json with values
//! replaced, keys removed, bytes flipped or cut (with its checksum left alone, and
//! recomputed as a deliberate editor would), and model.safetensors damaged. `generate`
//! and `export-hf` (in process, hundreds of cases) and the binary's `generate`,
//! `export-hf`, `eval` and resume (a sample) must end with a result or a clear error:
//! never a panic (exit 101) or an abort (134).

mod common;
use algpt2_ddp::rng::SplitMix64;
use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

const JUNK: [&str; 14] =
    ["null", "-1", "0", "1000000000000", "1e300", "\"x\"", "[]", "{}", "true", "18446744073709551615", "-0.5", "3", "1.5", "\"\""];

fn base_args(dir: &Path, extra: &[&str]) -> Vec<String> {
    #[rustfmt::skip]
    let sets = [
        "--set", "wandb.mode=disabled", "--set", "train.max_steps=2", "--set", "train.save_interval=2",
        "--set", "train.eval_interval=0", "--set", "optim.warmup_steps=1", "--set", "train.micro_batch_size=2",
    ];
    tiny_run_args(&sets, dir, "fz", extra)
}

/// A trained tiny run with one checkpoint at step 2.
fn trained(dir: &Path) -> PathBuf {
    let out = run_bounded(Command::new(bin()).args(base_args(dir, &[])).current_dir(repo()), LIMIT);
    assert!(out.status.success(), "{}", stderr(&out));
    dir.join("runs/fz/checkpoints/step_00000002")
}

/// Every path to a leaf of a JSON value, as a list of keys/indices.
fn leaves(v: &Value, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Object(m) if !m.is_empty() => m.iter().for_each(|(k, c)| leaves(c, [prefix.clone(), vec![k.clone()]].concat(), out)),
        Value::Array(a) if !a.is_empty() => {
            a.iter().enumerate().for_each(|(i, c)| leaves(c, [prefix.clone(), vec![i.to_string()]].concat(), out))
        }
        _ => out.push(prefix),
    }
}

fn at<'a>(v: &'a mut Value, path: &[String]) -> &'a mut Value {
    path.iter().fold(v, |v, k| match v {
        Value::Array(a) => &mut a[k.parse::<usize>().unwrap()],
        other => &mut other[k.as_str()],
    })
}

/// One random damage to a copy of the checkpoint in `to`: returns what was done.
fn mutate(original: &Path, to: &Path, rng: &mut SplitMix64) -> String {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(original).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    let trainer = to.join("trainer.json");
    let mut bytes = std::fs::read(&trainer).unwrap();
    let what = match rng.below(6) {
        0..=2 => {
            let mut v: Value = serde_json::from_slice(&bytes).unwrap();
            let mut paths = Vec::new();
            leaves(&v, vec![], &mut paths);
            let path = paths[rng.index_below(paths.len())].clone();
            let junk = JUNK[rng.index_below(JUNK.len())];
            *at(&mut v, &path) = serde_json::from_str(junk).unwrap_or(Value::Null);
            bytes = serde_json::to_vec_pretty(&v).unwrap();
            format!("trainer.json {} = {junk}", path.join("."))
        }
        3 => {
            let mut v: Value = serde_json::from_slice(&bytes).unwrap();
            let keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            let key = &keys[rng.index_below(keys.len())];
            v.as_object_mut().unwrap().remove(key);
            bytes = serde_json::to_vec_pretty(&v).unwrap();
            format!("trainer.json without {key}")
        }
        4 => {
            let i = rng.index_below(bytes.len());
            bytes[i] ^= 1 << rng.below(8);
            format!("trainer.json byte {i} flipped")
        }
        _ => {
            let model = to.join("model.safetensors");
            let mut m = std::fs::read(&model).unwrap();
            let what = if rng.below(2) == 0 {
                let cut = rng.index_below(m.len());
                m.truncate(cut);
                format!("model.safetensors cut to {cut} bytes")
            } else {
                let header = u64::from_le_bytes(m[..8].try_into().unwrap()) as usize + 8;
                let i = rng.index_below(header.min(m.len()));
                m[i] ^= 1 << rng.below(8);
                format!("model.safetensors header byte {i} flipped")
            };
            std::fs::write(&model, &m).unwrap();
            // Its checksum recomputed, so that loading goes past verification.
            let mut v: Value = serde_json::from_slice(&bytes).unwrap();
            v["checksums"]["model.safetensors"] = Value::String(hex::encode(Sha256::digest(&m)));
            bytes = serde_json::to_vec_pretty(&v).unwrap();
            what
        }
    };
    std::fs::write(&trainer, &bytes).unwrap();
    // Half the time as a deliberate editor would: the checksum made to match.
    if rng.below(2) == 0 {
        std::fs::write(to.join("trainer.json.sha256"), format!("{}  trainer.json\n", hex::encode(Sha256::digest(&bytes)))).unwrap();
        format!("{what} (checksum recomputed)")
    } else {
        what
    }
}

#[test]
fn damaged_or_edited_checkpoints_never_panic_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let original = trained(dir.path());
    // Inside the run directory, so that generate finds the run's tokenizer.
    let copy = dir.path().join("runs/fz/checkpoints/step_99999999");
    let mut rng = SplitMix64::new(77);
    let sampling =
        algpt2_ddp::generate::Sampling { max_new_tokens: 3, temperature: 0.0, top_k: None, top_p: None, seed: 1, use_cache: true };
    let (mut ok, mut refused) = (0, 0);
    for case in 0..300 {
        let what = mutate(&original, &copy, &mut rng);
        let out = dir.path().join("hf");
        let result = std::panic::catch_unwind(|| {
            let g = algpt2_ddp::generate::run(&copy, None, "a", &sampling);
            let e = algpt2_ddp::export::export_hf(&copy, &out, &algpt2_ddp::export::ExportOptions { force: true, tokenizer: None });
            (g.map_err(|e| format!("{e:#}")), e.map_err(|e| format!("{e:#}")))
        });
        match result {
            Err(_) => panic!("case {case}: {what}: a panic"),
            Ok((g, e)) => {
                for r in [g, e] {
                    match r {
                        Ok(()) => ok += 1,
                        Err(message) => {
                            assert!(!message.is_empty(), "case {case}: {what}: an empty error");
                            refused += 1;
                        }
                    }
                }
            }
        }
    }
    eprintln!("FIGURE checkpoint fuzz: 300 damaged or edited checkpoints, generate + export-hf: {ok} loaded, {refused} refused with an error, 0 panics");
    // Both outcomes occur: harmless edits load, damaging ones are refused.
    assert!(ok > 20 && refused > 200, "ok {ok}, refused {refused}");
}

#[test]
fn the_binary_gives_exit_1_or_2_on_damaged_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    // The intact checkpoint is kept outside the run: the damaged copy, named for the step
    // it holds, is the run's only one, which resume must refuse or train past.
    let original = dir.path().join("intact");
    std::fs::rename(trained(dir.path()), &original).unwrap();
    let run = dir.path().join("runs/fz/checkpoints");
    let mut rng = SplitMix64::new(5);
    for case in 0..8 {
        let copy = run.join("step_00000002");
        let what = mutate(&original, &copy, &mut rng);
        let copy_s = copy.to_str().unwrap().to_string();
        let hf = dir.path().join("hf").to_str().unwrap().to_string();
        let mut resume = base_args(dir.path(), &[]);
        resume.push("--set=train.max_steps=4".into());
        let mut eval = vec!["eval".to_string(), "--checkpoint".into(), copy_s.clone()];
        eval.extend(base_args(dir.path(), &[]));
        let commands: Vec<Vec<String>> = vec![
            vec!["generate".into(), "--checkpoint".into(), copy_s.clone(), "--max-new-tokens".into(), "3".into()],
            vec!["export-hf".into(), "--checkpoint".into(), copy_s.clone(), "--out".into(), hf],
            eval,
            resume,
        ];
        for args in commands {
            let out = run_bounded(Command::new(bin()).args(&args).current_dir(repo()), LIMIT);
            let code = out.status.code();
            assert!(matches!(code, Some(0..=2)), "case {case}: {what}: `{}` exit {code:?}\n{}", args[0], stderr(&out));
            assert!(!stderr(&out).contains("panicked"), "case {case}: {what}: {}", stderr(&out));
            if code != Some(0) {
                assert!(stderr(&out).contains("error"), "case {case}: {what}: no message\n{}", stderr(&out));
            }
        }
        // Resume ran to step 4 (from the copy when the edit was harmless): reset.
        let _ = std::fs::remove_dir_all(&run);
    }
}

#[test]
fn an_edited_trainer_json_is_caught_by_its_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let path = ckpt.join("trainer.json");
    let text = std::fs::read_to_string(&path).unwrap();
    // The case: vocab_size 1e12 in the model config.
    let edited = text.replacen("\"vocab_size\": 512", "\"vocab_size\": 1000000000000", 1);
    assert_ne!(edited, text);
    std::fs::write(&path, &edited).unwrap();
    let out = run(&["generate", "--checkpoint", ckpt.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("does not match its checksum"), "{}", stderr(&out));
    // Even with the checksum fixed, the model config is checked before any allocation.
    std::fs::write(ckpt.join("trainer.json.sha256"), format!("{}  trainer.json\n", hex::encode(Sha256::digest(edited.as_bytes()))))
        .unwrap();
    let out = run(&["generate", "--checkpoint", ckpt.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("model.vocab_size") && stderr(&out).contains("exceeds the largest supported"), "{}", stderr(&out));
}

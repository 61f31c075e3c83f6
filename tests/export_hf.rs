//! `export-hf` for the three variants, checked by loading each export with HF
//! transformers' GPT2LMHeadModel (offline) and comparing logits with ours (≤ 1e-4 fp32).

mod common;
use algpt2_ddp::checkpoint;
use algpt2_ddp::config::ModelConfig;
use common::*;
use std::process::Command;
use tch::{Device, Kind, Tensor};

#[test]
fn exports_load_in_transformers_with_our_logits() {
    for (name, share, e) in [("gpt2", "false", "null"), ("shared", "true", "null"), ("algpt2", "true", "16")] {
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        let out = run_bounded(
            Command::new(bin())
                .args(["--config", "configs/quickstart.yaml", "--set", "device=cpu", "--set", "wandb.mode=disabled"])
                .args(["--set", "model.n_embd=32", "--set", "model.n_head=2", "--set", "model.n_layer=3"])
                .args(["--set", &format!("model.share_layers={share}"), "--set", &format!("model.embedding_size={e}")])
                .args(["--set", "model.n_positions=32", "--set", "train.seq_len=32", "--set", "train.micro_batch_size=4"])
                .args(["--set", "train.max_steps=3", "--set", "optim.warmup_steps=1", "--set", "optim.lr=1e-2"])
                .args(["--set", "train.precision=fp32"])
                .arg(format!("--set=out_dir={}", runs.display()))
                .arg(format!("--set=data.cache_dir={}", dir.path().join("cache").display()))
                .current_dir(repo()),
            LIMIT,
        );
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let ckpt = runs.join("quickstart/checkpoints/step_00000003");
        let export = dir.path().join("hf");
        let out = run_bounded(
            Command::new(bin()).args(["export-hf", "--checkpoint", ckpt.to_str().unwrap(), "--out", export.to_str().unwrap()]),
            LIMIT,
        );
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert!(export.join("tokenizer.json").is_file());

        // Our logits on a batch, from the same checkpoint.
        let state = checkpoint::verify(&ckpt).unwrap();
        let cfg: ModelConfig = serde_json::from_value(state.model_config).unwrap();
        let model = checkpoint::load_model(&ckpt, &cfg, Device::Cpu).unwrap().model;
        let idx = Tensor::randint(cfg.vocab_size as i64, [2, 32], (Kind::Int64, Device::Cpu));
        let logits = tch::no_grad(|| model.forward(&idx));
        let ours = dir.path().join("ours.safetensors");
        Tensor::write_safetensors(&[("idx", &idx), ("logits", &logits)], &ours).unwrap();

        let check = run_bounded(
            Command::new(repo().join(".venv/bin/python"))
                .args([repo().join("reference/check_hf_export.py").to_str().unwrap(), export.to_str().unwrap(), ours.to_str().unwrap()])
                .env("HF_HUB_OFFLINE", "1")
                .env("TRANSFORMERS_OFFLINE", "1"),
            LIMIT,
        );
        assert!(check.status.success(), "{name}: {}{}", stdout(&check), stderr(&check));
        eprintln!("{name}: {}", stdout(&check).trim());
    }
}

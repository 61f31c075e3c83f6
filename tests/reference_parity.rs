//! Our model and optimizer against the PyTorch reference (reference/algpt2.py), fp32 on
//! CPU: logits, loss and every parameter's gradient for the three variants (relative
//! error ≤ 1e-5), and AdamW over several steps against torch.optim.AdamW (≤ 1e-6).

mod common;
use algpt2_ddp::config::{ModelConfig, OptimConfig, Schedule};
use algpt2_ddp::model::flat::FlatParams;
use algpt2_ddp::model::Algpt2;
use algpt2_ddp::optim::{learning_rate, AdamW};
use common::*;
use std::path::Path;
use std::process::Command;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Runs `reference/algpt2.py COMMAND DIR` with the project venv's python.
fn reference(command: &str, dir: &Path) -> String {
    let python = repo().join(".venv/bin/python");
    assert!(python.exists(), "the project venv is missing: run launch/setup.sh (launch/test.sh does)");
    let out = Command::new(python)
        .arg(repo().join("reference/algpt2.py"))
        .args([command, dir.to_str().unwrap()])
        .output()
        .expect("python starts");
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "reference {command} disagrees:\n{text}");
    text
}

fn tiny(share_layers: bool, embedding_size: Option<usize>) -> ModelConfig {
    ModelConfig { vocab_size: 97, n_positions: 32, n_embd: 32, embedding_size, n_layer: 3, n_head: 4, share_layers, dropout: 0.0 }
}

fn check_variant(cfg: ModelConfig) {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(11);
    let vs = VarStore::new(Device::Cpu);
    let model = Algpt2::new(&vs.root(), &cfg);
    let flat = FlatParams::new(&vs);
    let weights: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    Tensor::write_safetensors(&weights, dir.path().join("weights.safetensors")).unwrap();
    std::fs::write(dir.path().join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();

    let idx = Tensor::randint(cfg.vocab_size as i64, [3, 20], (Kind::Int64, Device::Cpu));
    let targets = Tensor::randint(cfg.vocab_size as i64, [3, 20], (Kind::Int64, Device::Cpu));
    Tensor::write_safetensors(&[("idx", &idx), ("targets", &targets)], dir.path().join("batch.safetensors")).unwrap();

    let logits = model.forward(&idx, false);
    let loss = Algpt2::loss(&logits, &targets);
    loss.backward();
    let mut ours: Vec<(String, Tensor)> = vec![("logits".into(), logits.detach()), ("loss".into(), loss.detach())];
    for slot in &flat.slots {
        let grad = flat.grads.narrow(0, slot.offset, slot.numel).view(slot.shape.as_slice()).copy();
        ours.push((format!("grad.{}", slot.name), grad));
    }
    Tensor::write_safetensors(&ours, dir.path().join("ours.safetensors")).unwrap();
    let report = reference("parity", dir.path());
    assert!(report.contains("\"ok\": true"), "{report}");
    eprintln!("{report}");
}

#[test]
fn gpt2_variant_matches_pytorch() {
    check_variant(tiny(false, None));
}

#[test]
fn sharing_only_variant_matches_pytorch() {
    check_variant(tiny(true, None));
}

#[test]
fn algpt2_variant_matches_pytorch() {
    check_variant(tiny(true, Some(8)));
}

#[test]
fn adamw_matches_torch_optim_adamw() {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(5);
    let vs = VarStore::new(Device::Cpu);
    let _model = Algpt2::new(&vs.root(), &tiny(true, Some(8)));
    let mut flat = FlatParams::new(&vs);
    let o =
        OptimConfig { lr: 1e-2, warmup_steps: 2, schedule: Schedule::Cosine, min_lr: 1e-3, weight_decay: 0.1, ..OptimConfig::default() };
    let mut opt = AdamW::new(&flat, &o);
    let mut inputs: Vec<(String, Tensor)> = vec![("values".into(), flat.values.copy())];
    let steps = 6;
    let lrs: Vec<f64> = (0..steps).map(|s| learning_rate(&o, s, steps)).collect();
    for (step, &lr) in lrs.iter().enumerate() {
        let grads = Tensor::randn([flat.len()], (Kind::Float, Device::Cpu)) * 0.1;
        tch::no_grad(|| flat.grads.copy_(&grads));
        inputs.push((format!("grads.{step}"), grads));
        opt.step(&mut flat, lr);
    }
    Tensor::write_safetensors(&inputs, dir.path().join("adamw_in.safetensors")).unwrap();
    Tensor::write_safetensors(&[("values", &flat.values)], dir.path().join("adamw_out.safetensors")).unwrap();
    let spec = serde_json::json!({
        "decay_len": flat.decay_len, "weight_decay": o.weight_decay, "beta1": o.beta1, "beta2": o.beta2,
        "eps": o.eps, "lrs": lrs,
    });
    std::fs::write(dir.path().join("adamw.json"), spec.to_string()).unwrap();
    let report = reference("adamw", dir.path());
    assert!(report.contains("\"ok\": true"), "{report}");
    eprintln!("{report}");
}

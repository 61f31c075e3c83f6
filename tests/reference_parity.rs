//! Our model and optimizer against the PyTorch reference (reference/algpt2.py) on CPU:
//! logits, loss and every parameter's gradient for the three variants through the
//! training path (fused classifier), fp32 (relative error ≤ 1e-5) and bf16 against
//! PyTorch autocast (≤ 3e-2); the padded vocabulary; AdamW over several steps against
//! torch.optim.AdamW (≤ 1e-6), the fused CPU update the trainer runs.

mod common;
use algpt2_ddp::config::{ModelConfig, OptimConfig, Schedule};
use algpt2_ddp::model::flat::{FlatParams, Padding};
use algpt2_ddp::model::objective::Objective;
use algpt2_ddp::model::precision::Bf16Weights;
use algpt2_ddp::model::Algpt2;
use algpt2_ddp::optim::{learning_rate, AdamW};
use common::*;
use std::path::Path;
use std::process::Command;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Runs `reference/algpt2.py COMMAND DIR` with the project venv's python.
fn reference(command: &str, dir: &Path) -> String {
    reference_with(command, dir, &[])
}

fn reference_with(command: &str, dir: &Path, extra: &[&str]) -> String {
    let python = repo().join(".venv/bin/python");
    assert!(python.exists(), "the project venv is missing: run launch/setup.sh (launch/test.sh does)");
    let out = run_bounded(
        Command::new(python).arg(repo().join("reference/algpt2.py")).args([command, dir.to_str().unwrap()]).args(extra),
        // PyTorch's import and the reference's work on a loaded 2-core machine.
        std::time::Duration::from_secs(600),
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "reference {command} disagrees:\n{text}");
    text
}

fn tiny(share_layers: bool, embedding_size: Option<usize>) -> ModelConfig {
    ModelConfig {
        vocab_size: 97,
        n_positions: 32,
        n_embd: 32,
        embedding_size,
        n_layer: 3,
        n_head: 4,
        share_layers,
        dropout: 0.0,
        ..ModelConfig::default()
    }
}

/// Our training path (the fused classifier, and in bf16 the compute copies) against the
/// reference: logits, loss and every gradient. `precision` is `fp32` or `bf16` (the
/// reference then runs under torch.autocast(bfloat16)); `pad` is the vocabulary padding.
fn check_variant_at(cfg: ModelConfig, precision: &str, pad: i64, tol: f64) {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(11);
    let vs = VarStore::new(Device::Cpu);
    let mut model = Algpt2::new(&vs.root(), &cfg);
    let rows = (cfg.vocab_size as u64).div_ceil(pad as u64) as i64 * pad;
    let mut flat = FlatParams::new_padded(&vs, Some(Padding { name: "wte", rows }));
    let mut bf16 = (precision == "bf16").then(|| Bf16Weights::new(&flat));
    if let Some(w) = &bf16 {
        model.use_compute_weights(&|name| w.get(name));
    }
    let weights: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    Tensor::write_safetensors(&weights, dir.path().join("weights.safetensors")).unwrap();
    std::fs::write(dir.path().join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();

    let idx = Tensor::randint(cfg.vocab_size as i64, [3, 20], (Kind::Int64, Device::Cpu));
    let targets = Tensor::randint(cfg.vocab_size as i64, [3, 20], (Kind::Int64, Device::Cpu));
    Tensor::write_safetensors(&[("idx", &idx), ("targets", &targets)], dir.path().join("batch.safetensors")).unwrap();

    let logits = tch::no_grad(|| model.forward(&idx));
    let objective = Objective { vocab: cfg.vocab_size as i64, chunk_rows: 7, grad_accum_steps: 1 };
    // As the trainer's step runs it: the forward (with the fused classifier), then the
    // backward through the model.
    let forwarded = objective.forward(&model, &flat, bf16.as_ref(), &idx, &targets, None, false).unwrap();
    let loss = forwarded.loss.shallow_clone();
    forwarded.backward(&mut flat, bf16.as_mut(), &mut |_| {});
    let mut ours: Vec<(String, Tensor)> = vec![("logits".into(), logits), ("loss".into(), loss.detach())];
    for slot in &flat.slots {
        let grad = flat.grads.narrow(0, slot.offset, slot.numel).view(slot.shape.as_slice()).copy();
        ours.push((format!("grad.{}", slot.name), grad));
    }
    let padding = flat.padded(&flat.grads, "wte").unwrap().narrow(0, cfg.vocab_size as i64, rows - cfg.vocab_size as i64);
    assert_eq!(padding.abs().sum(Kind::Float).double_value(&[]), 0.0, "padding rows of the head got gradient");
    Tensor::write_safetensors(&ours, dir.path().join("ours.safetensors")).unwrap();
    let report = reference_with("parity", dir.path(), &["--precision", precision, "--tol", &tol.to_string()]);
    assert!(report.contains("\"ok\": true"), "{report}");
    eprintln!("{precision} pad {pad}: {report}");
}

fn check_variant(cfg: ModelConfig) {
    check_variant_at(cfg, "fp32", 1, 1e-5);
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

/// bf16 (matrix products, attention and the head in bf16, fp32 master weights) against
/// PyTorch's bf16 autocast on the same weights and batch: the normwise relative error of
/// logits, loss and every gradient within 3e-2 (bf16 keeps 8 bits of mantissa, 4e-3 per
/// rounding; measured worst errors are printed).
#[test]
fn bf16_matches_pytorch_autocast_for_the_three_variants() {
    for (share, e) in [(false, None), (true, None), (true, Some(8))] {
        check_variant_at(tiny(share, e), "bf16", 64, 3e-2);
    }
}

/// The padded vocabulary is invisible: with the head padded to 64 (97 → 128 rows) the
/// loss, the logits and the gradients of every real parameter match PyTorch at fp32
/// tightness, and the padding rows get no gradient.
#[test]
fn padded_vocabulary_changes_nothing_but_the_buffer() {
    check_variant_at(tiny(true, Some(8)), "fp32", 64, 1e-5);
    check_variant_at(tiny(false, None), "fp32", 64, 1e-5);
}

/// The fused CPU update (one pass, the clip factor applied as gradients are read), as
/// the trainer runs it; and a skipped step changes nothing.
#[test]
fn fused_adamw_matches_torch_optim_adamw_and_skips_when_told() {
    adamw_case();
    let vs = VarStore::new(Device::Cpu);
    let _model = Algpt2::new(&vs.root(), &tiny(true, Some(8)));
    let mut flat = FlatParams::new(&vs);
    let mut opt = AdamW::new(&flat, &OptimConfig::default());
    let before = flat.values.copy();
    let _ = flat.grads.fill_(0.5);
    opt.step_guarded(&mut flat, 1e-2, &Tensor::from(1.0f64), &Tensor::from(1.0f32)).unwrap();
    assert!(flat.values.equal(&before) && opt.steps() == 0, "a skipped step changed the weights");
    opt.step_guarded(&mut flat, 1e-2, &Tensor::from(1.0f64), &Tensor::from(0.0f32)).unwrap();
    assert!(!flat.values.equal(&before) && opt.steps() == 1);
}

fn adamw_case() {
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
        opt.step_guarded(&mut flat, lr, &Tensor::from(1.0f64), &Tensor::from(0.0f32)).unwrap();
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

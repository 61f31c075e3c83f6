//! `algpt2-ddp export-hf`: a checkpoint as a HF transformers GPT-2 (`GPT2LMHeadModel`):
//! `config.json`, `model.safetensors`, `tokenizer.json`.
//!
//! GPT-2 and sharing-only map exactly (a shared block is written once per layer). The
//! factorized model folds exactly into GPT-2's shapes too:
//! - in: x = (wte[t] + wpe[p])·W_inᵀ + b_in, so wte' = wte·W_inᵀ and wpe' = wpe·W_inᵀ + b_in;
//! - out: logits = (ln_f(x)·W_outᵀ + b_out)·wteᵀ = ln_f(x)·(wte·W_out)ᵀ + wte·b_out. The
//!   head becomes an untied lm_head = wte·W_out (V×H). GPT-2's head has no bias, but the
//!   per-token bias wte·b_out equals lm_head·u for any u with W_out·u = b_out (W_out is
//!   E×H with E < H, so such u exists when W_out has full row rank), and adding u to
//!   ln_f's bias adds exactly lm_head·u to every logit.
//!
//! The only error is fp32 rounding of those products and of solving for u.
//!
//! The export is written beside its destination and renamed into place (`destination`),
//! so a failed export leaves nothing half-written, and never into a run or checkpoint.
//! Beside the three files it writes `.algpt2-export.json`, listing them: what marks the
//! directory as an export that `--force` may replace.

mod destination;

use crate::checkpoint::{self, MODEL_FILE};
use crate::config::ModelConfig;
use anyhow::{anyhow, bail, Context};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// What `export-hf` may do beyond writing a new directory.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Replace a non-empty `--out`, when it is a previous export (see `destination`).
    pub force: bool,
    /// The tokenizer to ship instead of the run's `tokenizer.json` (checked all the same).
    pub tokenizer: Option<PathBuf>,
}

/// Writes the HF export of `checkpoint_dir` into `out_dir`.
pub fn export_hf(checkpoint_dir: &Path, out_dir: &Path, options: &ExportOptions) -> anyhow::Result<()> {
    let state = checkpoint::verify(checkpoint_dir)?;
    let target = destination::Destination::check(checkpoint_dir, out_dir, options.force)?;
    let (tokenizer, tokenizer_path) = checkpoint::tokenizer_of(checkpoint_dir, &state, options.tokenizer.as_deref())?;
    let cfg: ModelConfig = checkpoint::model_config(checkpoint_dir, &state)?;
    let ours = checkpoint::load_tensors(checkpoint_dir, MODEL_FILE)?;
    let get = |name: &str| -> anyhow::Result<Tensor> {
        ours.get(name).map(|t| t.to_kind(Kind::Float)).ok_or_else(|| anyhow!("checkpoint lacks {name}"))
    };
    let mut hf: BTreeMap<String, Tensor> = BTreeMap::new();
    let (wte, wpe) = (get("wte")?, get("wpe")?);
    let tied = !cfg.is_factorized();
    if tied {
        hf.insert("transformer.wte.weight".into(), wte.shallow_clone());
        hf.insert("transformer.wpe.weight".into(), wpe);
    } else {
        let (w_in, b_in) = (get("proj_in.weight")?, get("proj_in.bias")?);
        hf.insert("transformer.wte.weight".into(), wte.matmul(&w_in.tr()));
        hf.insert("transformer.wpe.weight".into(), wpe.matmul(&w_in.tr()) + &b_in);
    }
    for layer in 0..cfg.n_layer {
        let ours_block = if cfg.share_layers { 0 } else { layer };
        for (part, transpose) in [
            ("ln_1.weight", false),
            ("ln_1.bias", false),
            ("attn.c_attn.weight", true),
            ("attn.c_attn.bias", false),
            ("attn.c_proj.weight", true),
            ("attn.c_proj.bias", false),
            ("ln_2.weight", false),
            ("ln_2.bias", false),
            ("mlp.c_fc.weight", true),
            ("mlp.c_fc.bias", false),
            ("mlp.c_proj.weight", true),
            ("mlp.c_proj.bias", false),
        ] {
            let t = get(&format!("h.{ours_block}.{part}"))?;
            // HF GPT-2 keeps linear weights as Conv1D [in, out]; ours are [out, in].
            let t = if transpose { t.tr().contiguous() } else { t };
            hf.insert(format!("transformer.h.{layer}.{part}"), t);
        }
    }
    hf.insert("transformer.ln_f.weight".into(), get("ln_f.weight")?);
    if tied {
        hf.insert("transformer.ln_f.bias".into(), get("ln_f.bias")?);
    } else {
        let (w_out, b_out) = (get("proj_out.weight")?, get("proj_out.bias")?);
        // u with W_out·u = b_out: the minimum-norm solution through the pseudo-inverse.
        let u = w_out.to_kind(Kind::Double).pinverse(1e-15).matmul(&b_out.to_kind(Kind::Double).unsqueeze(1)).squeeze_dim(1);
        let residual = (w_out.to_kind(Kind::Double).matmul(&u.unsqueeze(1)).squeeze_dim(1) - b_out.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[]);
        if residual > 1e-4 * (1.0 + b_out.abs().max().double_value(&[])) {
            bail!("cannot fold proj_out.bias into ln_f.bias: proj_out.weight is rank-deficient (residual {residual:.3e})");
        }
        hf.insert("transformer.ln_f.bias".into(), get("ln_f.bias")? + u.to_kind(Kind::Float));
        hf.insert("lm_head.weight".into(), wte.matmul(&w_out));
    }

    let staging = target.staging()?;
    let tensors: Vec<(String, Tensor)> = hf.into_iter().map(|(k, v)| (k, v.contiguous())).collect();
    Tensor::write_safetensors(&tensors, staging.path().join("model.safetensors"))
        .map_err(|e| anyhow!("writing {}: {e}", staging.path().join("model.safetensors").display()))?;
    let tokenizer_copy = staging.path().join("tokenizer.json");
    std::fs::copy(&tokenizer_path, &tokenizer_copy).with_context(|| format!("copying {}", tokenizer_path.display()))?;
    let eot = tokenizer.end_of_text;
    let config = json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "algpt2": {"share_layers": cfg.share_layers, "embedding_size": cfg.embedding_size, "step": state.step},
    });
    crate::run_dir::write_atomic(&staging.path().join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    staging.commit()
}

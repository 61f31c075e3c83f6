//! `algpt2-ddp info`: what model a config describes, without building it.

use crate::config::Config;
use crate::model::size::{param_count, training_flops_per_token};
use crate::report::format::group;
use serde_json::json;

pub fn run(cfg: &Config, as_json: bool) {
    let m = &cfg.model;
    let p = param_count(m);
    let flops = training_flops_per_token(m, cfg.train.seq_len);
    if as_json {
        let out = json!({
            "variant": m.variant(),
            "parameters": p.total,
            "breakdown": p,
            "training_flops_per_token": flops,
            "seq_len": cfg.train.seq_len,
            "model": m,
            "config": cfg,
            "cpu": crate::host_cpu::on_this_cpu(cfg.train.precision).json(),
        });
        println!("{out}");
        return;
    }
    let describe = match m.variant() {
        "gpt2" => "GPT-2 (no sharing, no factorization)".to_string(),
        "shared" => format!("sharing-only (one block applied {} times)", m.n_layer),
        "algpt2" => format!("ALGPT2 (one block applied {} times, embeddings factorized to E={})", m.n_layer, m.embedding_width()),
        _ => format!("factorized-only ({} blocks, embeddings factorized to E={})", m.n_layer, m.embedding_width()),
    };
    println!("model: {describe}");
    println!(
        "  vocab_size {}, n_positions {}, n_embd {}, embedding_size {}, n_layer {}, n_head {}, dropout {}",
        m.vocab_size,
        m.n_positions,
        m.n_embd,
        m.embedding_size.map_or("null".to_string(), |e| e.to_string()),
        m.n_layer,
        m.n_head,
        m.dropout
    );
    println!("parameters: {}", group(p.total));
    let e = m.embedding_width();
    println!("  token embedding     {:>14}  ({}x{}, tied LM head)", group(p.token_embedding), m.vocab_size, e);
    println!("  position embedding  {:>14}  ({}x{})", group(p.position_embedding), m.n_positions, e);
    if p.projections > 0 {
        println!("  projections         {:>14}  ({e}->{h} in, {h}->{e} out)", group(p.projections), h = m.n_embd);
    }
    println!("  blocks              {:>14}  ({} stored x {})", group(p.stored_blocks * p.per_block), p.stored_blocks, group(p.per_block));
    println!("  final LayerNorm     {:>14}", group(p.final_norm));
    println!("training FLOPs per token at seq_len {}: {}", cfg.train.seq_len, group(flops));
    print!("{}", crate::host_cpu::on_this_cpu(cfg.train.precision).text());
}

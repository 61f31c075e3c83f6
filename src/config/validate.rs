//! Range and cross-key rules that types alone cannot express.

use super::schema::{Config, DistBackend, ModelConfig};

/// Largest sizes accepted: far beyond any model this trainer is for, and small enough that
/// parameter and memory arithmetic cannot overflow.
const MAX_VOCAB: usize = 1 << 24;
const MAX_WIDTH: usize = 1 << 16;
const MAX_POSITIONS: usize = 1 << 20;
const MAX_LAYERS: usize = 1 << 12;

/// The rules of the `model` section alone (a checkpoint's recorded model config).
pub fn model_violations(m: &ModelConfig) -> Vec<Violation> {
    let cfg = Config { model: m.clone(), ..Config::default() };
    violations(&cfg).into_iter().filter(|v| v.path.starts_with("model.")).collect()
}

/// One broken rule: the key it is reported against and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub path: &'static str,
    pub message: String,
}

/// What is wrong with `name` as a run name (the directory `<out_dir>/<name>`), as
/// phrases that follow the name: empty when it is a good one.
pub fn run_name_problems(name: &str) -> Vec<&'static str> {
    let mut out = Vec::new();
    // "." or ".." would make the run directory out_dir itself or its parent.
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        out.push("must be a non-empty directory name without '/' (not . or ..)");
    }
    // A newline or other control character breaks the directory name and every log line.
    if name.chars().any(char::is_control) {
        out.push("must not contain control characters (newline, tab, ...)");
    }
    out
}

/// Every rule the config breaks, in schema order (empty when valid).
pub fn violations(cfg: &Config) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut check = |ok: bool, path: &'static str, message: String| {
        if !ok {
            out.push(Violation { path, message });
        }
    };
    let m = &cfg.model;
    let t = &cfg.train;
    let o = &cfg.optim;

    if let Some(name) = &cfg.run_name {
        for problem in run_name_problems(name) {
            check(false, "run_name", format!("{name:?} {problem}"));
        }
    }

    check(m.vocab_size >= 1, "model.vocab_size", "must be at least 1".into());
    check(m.n_positions >= 1, "model.n_positions", "must be at least 1".into());
    check(m.n_layer >= 1, "model.n_layer", "must be at least 1".into());
    check(m.n_head >= 1, "model.n_head", "must be at least 1".into());
    check(m.n_embd >= 1, "model.n_embd", "must be at least 1".into());
    check(m.vocab_size <= MAX_VOCAB, "model.vocab_size", format!("{} exceeds the largest supported, {MAX_VOCAB}", m.vocab_size));
    check(m.n_embd <= MAX_WIDTH, "model.n_embd", format!("{} exceeds the largest supported, {MAX_WIDTH}", m.n_embd));
    check(m.n_positions <= MAX_POSITIONS, "model.n_positions", format!("{} exceeds the largest supported, {MAX_POSITIONS}", m.n_positions));
    check(m.n_layer <= MAX_LAYERS, "model.n_layer", format!("{} exceeds the largest supported, {MAX_LAYERS}", m.n_layer));
    check(
        m.n_head == 0 || m.n_embd.is_multiple_of(m.n_head),
        "model.n_head",
        format!("{} does not divide model.n_embd = {}", m.n_head, m.n_embd),
    );
    check(m.embedding_size != Some(0), "model.embedding_size", "must be at least 1 (or null)".into());
    if let Some(e) = m.embedding_size {
        check(
            e <= m.n_embd,
            "model.embedding_size",
            format!(
                "{e} exceeds model.n_embd = {}: factorized embeddings save parameters only when narrower than the hidden size (null: GPT-2's H-wide embeddings)",
                m.n_embd
            ),
        );
    }
    check((0.0..1.0).contains(&m.dropout), "model.dropout", format!("{} is out of range [0, 1)", m.dropout));

    check(
        cfg.tokenizer.vocab_size >= 257,
        "tokenizer.vocab_size",
        format!("{} is below 257 (256 byte tokens plus <|endoftext|>)", cfg.tokenizer.vocab_size),
    );
    check(
        cfg.tokenizer.vocab_size <= m.vocab_size,
        "tokenizer.vocab_size",
        format!("{} exceeds model.vocab_size = {}", cfg.tokenizer.vocab_size, m.vocab_size),
    );

    check(t.seq_len >= 1, "train.seq_len", "must be at least 1".into());
    check(t.seq_len <= m.n_positions, "train.seq_len", format!("{} exceeds model.n_positions = {}", t.seq_len, m.n_positions));
    check(t.micro_batch_size >= 1, "train.micro_batch_size", "must be at least 1".into());
    check(t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be at least 1".into());
    check(t.max_steps >= 1, "train.max_steps", "must be at least 1".into());
    check(t.log_interval >= 1, "train.log_interval", "must be at least 1".into());
    check(
        (1..=4096).contains(&t.pad_vocab_multiple),
        "train.pad_vocab_multiple",
        format!("{} is out of range [1, 4096] (1: no padding)", t.pad_vocab_multiple),
    );
    check(
        t.classifier_chunk_rows <= 1 << 24,
        "train.classifier_chunk_rows",
        format!("{} exceeds 16777216 (0: chosen from the vocabulary size)", t.classifier_chunk_rows),
    );
    if let Some(peak) = t.peak_flops {
        check(peak > 0.0 && peak.is_finite(), "train.peak_flops", format!("{peak} must be positive (or null)"));
    }

    let lr_ok = o.lr > 0.0 && o.lr.is_finite();
    check(lr_ok, "optim.lr", format!("{} must be positive", o.lr));
    check(
        // a bad lr is reported once, not again through min_lr
        !lr_ok || (o.min_lr >= 0.0 && o.min_lr <= o.lr),
        "optim.min_lr",
        format!("{} is out of range [0, optim.lr = {}]", o.min_lr, o.lr),
    );
    check(o.weight_decay >= 0.0 && o.weight_decay.is_finite(), "optim.weight_decay", format!("{} must be non-negative", o.weight_decay));
    check((0.0..1.0).contains(&o.beta1), "optim.beta1", format!("{} is out of range [0, 1)", o.beta1));
    check((0.0..1.0).contains(&o.beta2), "optim.beta2", format!("{} is out of range [0, 1)", o.beta2));
    check(o.eps > 0.0 && o.eps.is_finite(), "optim.eps", format!("{} must be positive", o.eps));
    check(
        o.grad_clip >= 0.0 && o.grad_clip.is_finite(),
        "optim.grad_clip",
        format!("{} must be non-negative (0 turns clipping off)", o.grad_clip),
    );

    check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be at least 1".into());
    check(!cfg.checkpoint.resume.is_empty(), "checkpoint.resume", "must be auto, none or a path".into());
    check(!cfg.wandb.project.is_empty(), "wandb.project", "must not be empty".into());
    check(
        cfg.wandb.flush_timeout_s >= 0.0 && cfg.wandb.flush_timeout_s.is_finite(),
        "wandb.flush_timeout_s",
        format!("{} must be a non-negative number of seconds", cfg.wandb.flush_timeout_s),
    );
    check(
        cfg.wandb.stats_interval_s >= 0.1 && cfg.wandb.stats_interval_s <= 86_400.0,
        "wandb.stats_interval_s",
        format!("{} must be between 0.1 and 86400 seconds", cfg.wandb.stats_interval_s),
    );

    check(
        cfg.dist.bucket_mb >= 0.001 && cfg.dist.bucket_mb <= 65_536.0,
        "dist.bucket_mb",
        format!("{} must be between 0.001 and 65536 (MB)", cfg.dist.bucket_mb),
    );
    check(cfg.dist.timeout_s >= 1, "dist.timeout_s", "must be at least 1".into());
    check(cfg.dist.stop_grace_s >= 1, "dist.stop_grace_s", "must be at least 1".into());
    if cfg.dist.backend == DistBackend::Nccl {
        check(cfg.device != super::schema::DeviceKind::Cpu, "dist.backend", "nccl needs device cuda (or auto); use mpi on CPU".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(violations(&Config::default()), vec![]);
    }

    #[test]
    fn reports_each_broken_rule_against_its_key() {
        let mut cfg = Config::default();
        cfg.model.n_head = 5;
        cfg.model.dropout = 1.0;
        cfg.train.seq_len = 4096;
        cfg.optim.min_lr = 1.0;
        let paths: Vec<_> = violations(&cfg).into_iter().map(|v| v.path).collect();
        assert_eq!(paths, vec!["model.n_head", "model.dropout", "train.seq_len", "optim.min_lr"]);
    }

    #[test]
    fn tokenizer_vocab_must_fit_the_model() {
        let mut cfg = Config::default();
        cfg.model.vocab_size = 1000;
        cfg.tokenizer.vocab_size = 2000;
        let v = violations(&cfg);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].path, "tokenizer.vocab_size");
        assert!(v[0].message.contains("exceeds model.vocab_size = 1000"), "{}", v[0].message);
    }

    #[test]
    fn nccl_on_cpu_is_refused() {
        let mut cfg = Config { device: super::super::schema::DeviceKind::Cpu, ..Config::default() };
        cfg.dist.backend = DistBackend::Nccl;
        assert_eq!(violations(&cfg)[0].path, "dist.backend");
    }
}

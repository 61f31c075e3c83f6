//! Text generation from a checkpoint, with a KV cache that keeps one entry per layer
//! *application* (shared layers run the same weights n_layer times on different inputs),
//! or without one (full recomputation each token, the reference the cache is tested
//! against).

use crate::checkpoint;
use crate::config::ModelConfig;
use crate::model::{Algpt2, KvCache};
use crate::rng::SplitMix64;
use std::io::Write;
use std::path::Path;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 means greedy (always the most likely token).
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub seed: u64,
    pub use_cache: bool,
}

/// The cache starts this small and doubles as the text grows (up to n_positions).
const INITIAL_CACHE: i64 = 16;

/// The next token from last-position logits [vocab]; random draws come from `rng`, not
/// libtorch's global generator, so a seed gives the same text whatever else runs.
fn pick(logits: &Tensor, s: &Sampling, rng: &mut SplitMix64) -> i64 {
    if s.temperature <= 0.0 {
        return logits.argmax(-1, false).int64_value(&[]);
    }
    let mut logits = logits.to_kind(Kind::Float) / s.temperature;
    if let Some(k) = s.top_k.filter(|&k| k > 0 && k < logits.size()[0]) {
        let kth = logits.topk(k, -1, true, true).0.get(k - 1);
        logits = logits.masked_fill(&logits.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if let Some(p) = s.top_p.filter(|&p| p < 1.0) {
        let (sorted, order) = logits.sort(-1, true);
        let cumulative = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        // Drop a token once the tokens before it already cover p (the first always stays).
        let drop_sorted = (cumulative - sorted.softmax(-1, Kind::Float)).gt(p);
        let drop = drop_sorted.scatter(-1, &order, &drop_sorted);
        logits = logits.masked_fill(&drop, f64::NEG_INFINITY);
    }
    let probs = Vec::<f32>::try_from(logits.softmax(-1, Kind::Float).to_device(Device::Cpu)).expect("f32 probabilities");
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let mut cumulative = 0.0f64;
    for (token, &p) in probs.iter().enumerate() {
        cumulative += p as f64;
        if u < cumulative {
            return token as i64;
        }
    }
    // Rounding left u past the total: the last token with any probability.
    probs.iter().rposition(|&p| p > 0.0).unwrap_or(0) as i64
}

/// Continues `prompt` token by token, calling `on_token` for each new one, until
/// `max_new_tokens`, or `end_of_text`. Past n_positions the window slides: the cache is
/// rebuilt from the last half-context of tokens (without a cache, the last
/// n_positions tokens are recomputed each step).
pub fn generate(model: &Algpt2, prompt: &[i64], end_of_text: i64, s: &Sampling, mut on_token: impl FnMut(i64)) -> Vec<i64> {
    let cfg = model.config().clone();
    let window = cfg.n_positions;
    let device = Device::Cpu;
    let mut rng = SplitMix64::new(s.seed);
    let mut tokens: Vec<i64> = prompt.to_vec();
    let mut cache = KvCache::new(cfg.n_layer, INITIAL_CACHE);
    tch::no_grad(|| {
        let mut pending: Vec<i64> = tokens[tokens.len().saturating_sub(window)..].to_vec();
        for _ in 0..s.max_new_tokens {
            let logits = if s.use_cache {
                if cache.len() as usize + pending.len() > window {
                    // Slide: positions restart, so the cache is rebuilt from recent text.
                    cache = KvCache::new(cfg.n_layer, INITIAL_CACHE);
                    pending = tokens[tokens.len() - (window / 2).max(1)..].to_vec();
                }
                let idx = Tensor::from_slice(&pending).view([1, -1]).to_device(device);
                model.forward_cached(&idx, &mut cache)
            } else {
                let context = &tokens[tokens.len().saturating_sub(window)..];
                model.forward(&Tensor::from_slice(context).view([1, -1]).to_device(device))
            };
            let last = logits.get(0).get(logits.size()[1] - 1);
            let next = pick(&last, s, &mut rng);
            if next == end_of_text {
                break;
            }
            tokens.push(next);
            pending = vec![next];
            on_token(next);
        }
    });
    tokens[prompt.len()..].to_vec()
}

/// `algpt2-ddp generate`: loads the checkpoint (the model config is in it; the tokenizer
/// is the run's or `--tokenizer`, checked against the checkpoint's hash) and prints the continuation of `prompt` as it is produced.
pub fn run(checkpoint_dir: &Path, tokenizer: Option<&Path>, prompt: &str, s: &Sampling) -> anyhow::Result<()> {
    let state = checkpoint::verify(checkpoint_dir)?;
    let cfg: ModelConfig = checkpoint::model_config(checkpoint_dir, &state)?;
    let (tokenizer, _) = checkpoint::tokenizer_of(checkpoint_dir, &state, tokenizer)?;
    let loaded = checkpoint::load_model(checkpoint_dir, &cfg, Device::Cpu)?;
    let model = &loaded.model;

    let mut ids: Vec<i64> = vec![tokenizer.end_of_text as i64];
    ids.extend(tokenizer.encode(prompt)?.into_iter().map(|t| t as i64));
    print!("{prompt}");
    let mut produced: Vec<u32> = Vec::new();
    let mut shown = String::new();
    let out = std::io::stdout();
    generate(model, &ids, tokenizer.end_of_text as i64, s, |token| {
        // Decode everything so far and print what is new: a character can span tokens.
        produced.push(token as u32);
        if let Ok(text) = tokenizer.decode(&produced) {
            if text.len() > shown.len() && text.starts_with(&shown) && !text.ends_with('\u{FFFD}') {
                let mut lock = out.lock();
                let _ = write!(lock, "{}", &text[shown.len()..]);
                let _ = lock.flush();
                shown = text;
            }
        }
    });
    let text = tokenizer.decode(&produced)?;
    if text.len() > shown.len() && text.starts_with(&shown) {
        print!("{}", &text[shown.len()..]);
    }
    println!();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;

    fn model(share_layers: bool, embedding_size: Option<usize>, vs: &VarStore) -> Algpt2 {
        let cfg = ModelConfig {
            vocab_size: 71,
            n_positions: 64,
            n_embd: 32,
            embedding_size,
            n_layer: 3,
            n_head: 4,
            share_layers,
            dropout: 0.1,
            ..ModelConfig::default()
        };
        Algpt2::new(&vs.root(), &cfg)
    }

    fn greedy(use_cache: bool, n: usize) -> Sampling {
        Sampling { max_new_tokens: n, temperature: 0.0, top_k: None, top_p: None, seed: 0, use_cache }
    }

    /// Greedy decoding with the cache gives exactly the tokens of full recomputation, for
    /// all three variants and several prompts, well past the cache's first growth.
    #[test]
    fn cached_greedy_equals_recomputation() {
        for (share, e) in [(false, None), (true, None), (true, Some(8))] {
            tch::manual_seed(21);
            let vs = VarStore::new(Device::Cpu);
            let m = model(share, e, &vs);
            for prompt in [vec![3i64], vec![5, 9, 2, 40, 7], (0..20).map(|i| (i * 7 % 71) as i64).collect::<Vec<_>>()] {
                let n = 60 - prompt.len();
                let with = generate(&m, &prompt, -1, &greedy(true, n), |_| {});
                let without = generate(&m, &prompt, -1, &greedy(false, n), |_| {});
                assert_eq!(with.len(), n);
                assert_eq!(with, without, "share={share} e={e:?} prompt={prompt:?}");
            }
            // The cached logits themselves agree with a full forward pass.
            let ids = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]).view([1, 20]);
            let full = tch::no_grad(|| m.forward(&ids));
            let mut cache = KvCache::new(3, 4);
            let mut parts = Vec::new();
            tch::no_grad(|| {
                parts.push(m.forward_cached(&ids.narrow(1, 0, 7), &mut cache));
                for i in 7..20 {
                    parts.push(m.forward_cached(&ids.narrow(1, i, 1), &mut cache));
                }
            });
            assert!(cache.growths >= 2, "the cache grew {} times", cache.growths);
            let cached = Tensor::cat(&parts, 1);
            let diff = (cached - full).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "share={share} e={e:?}: {diff}");
        }
    }

    #[test]
    fn stops_at_end_of_text_and_slides_past_the_context() {
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let m = model(true, Some(8), &vs);
        let first = generate(&m, &[1, 2, 3], -1, &greedy(true, 1), |_| {})[0];
        // Declaring the first generated token the end of text stops at once.
        assert!(generate(&m, &[1, 2, 3], first, &greedy(true, 10), |_| {}).is_empty());
        // 150 new tokens through a 64-position model: the window slides, nothing breaks.
        let mut seen = 0;
        let long = generate(&m, &[1, 2, 3], -1, &greedy(true, 150), |_| seen += 1);
        assert_eq!((long.len(), seen), (150, 150));
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        tch::manual_seed(4);
        let vs = VarStore::new(Device::Cpu);
        let m = model(false, None, &vs);
        let s = Sampling { max_new_tokens: 30, temperature: 1.0, top_k: Some(1), top_p: None, seed: 7, use_cache: true };
        // top-k 1 is greedy whatever the temperature.
        assert_eq!(generate(&m, &[4, 5], -1, &s, |_| {}), generate(&m, &[4, 5], -1, &greedy(true, 30), |_| {}));
        let s = Sampling { top_k: None, top_p: Some(0.9), ..s };
        let a = generate(&m, &[4, 5], -1, &s, |_| {});
        assert_eq!(a, generate(&m, &[4, 5], -1, &s, |_| {}), "same seed, same text");
        assert_ne!(a, generate(&m, &[4, 5], -1, &Sampling { seed: 8, ..s.clone() }, |_| {}));
    }
}

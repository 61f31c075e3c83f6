//! The ALGPT2 family on libtorch: GPT-2 pre-LN blocks, optionally one block shared by all
//! layers (ALBERT cross-layer sharing), optionally factorized E-wide embeddings with
//! E→H and H→E projections and the LM head tied to the E-wide token table.
//!
//! Variable names (the checkpoint keys) follow HF GPT-2 where the parts match: `wte`,
//! `wpe`, `h.{i}.ln_1`, `h.{i}.attn.c_attn`, `h.{i}.attn.c_proj`, `h.{i}.ln_2`,
//! `h.{i}.mlp.c_fc`, `h.{i}.mlp.c_proj`, `ln_f`; plus `proj_in`, `proj_out`. Linear
//! weights are stored [out, in] (torch.nn.Linear), not HF's Conv1D [in, out].

use crate::config::ModelConfig;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

const LAYER_NORM_EPS: f64 = 1e-5;
const INIT_STD: f64 = 0.02;

struct Block {
    ln_1: nn::LayerNorm,
    c_attn: nn::Linear,
    attn_proj: nn::Linear,
    ln_2: nn::LayerNorm,
    c_fc: nn::Linear,
    mlp_proj: nn::Linear,
}

fn linear(p: nn::Path, inputs: i64, outputs: i64, std: f64) -> nn::Linear {
    let config = nn::LinearConfig { ws_init: nn::Init::Randn { mean: 0.0, stdev: std }, bs_init: Some(nn::Init::Const(0.0)), bias: true };
    nn::linear(p, inputs, outputs, config)
}

fn layer_norm(p: nn::Path, width: i64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![width], nn::LayerNormConfig { eps: LAYER_NORM_EPS, ..Default::default() })
}

/// Keys and values of one block *application* (with shared layers the same weights run
/// n_layer times and each application sees different inputs, so each needs its own).
/// Preallocated and grown by doubling, so appending a token copies nothing.
struct LayerCache {
    keys: Tensor,
    values: Tensor,
}

/// The KV cache of a generation: one entry per layer application, `len` positions filled.
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    len: i64,
    capacity: i64,
    /// Times the buffers were grown (tests reach past the first growth).
    pub growths: usize,
}

impl KvCache {
    /// An empty cache for `n_layer` applications, first sized for `initial` positions.
    pub fn new(n_layer: usize, initial: i64) -> KvCache {
        KvCache { layers: (0..n_layer).map(|_| None).collect(), len: 0, capacity: initial.max(1), growths: 0 }
    }

    /// Positions held.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Block {
    /// `forward` for new positions `[past, past + t)`, attending to the cached keys and
    /// values of this application and appending its own.
    fn forward_cached(&self, x: &Tensor, n_head: i64, cache: &mut Option<LayerCache>, past: i64, capacity: i64) -> Tensor {
        let (b, t, h) = x.size3().expect("activations are [batch, time, hidden]");
        let d = h / n_head;
        let heads = |z: Tensor| z.view([b, t, n_head, d]).transpose(1, 2);
        let qkv = self.c_attn.forward(&self.ln_1.forward(x));
        let parts = qkv.split(h, 2);
        let (q, k, v) = (heads(parts[0].shallow_clone()), heads(parts[1].shallow_clone()), heads(parts[2].shallow_clone()));
        let entry = cache.get_or_insert_with(|| LayerCache {
            keys: Tensor::zeros([b, n_head, capacity, d], (k.kind(), k.device())),
            values: Tensor::zeros([b, n_head, capacity, d], (v.kind(), v.device())),
        });
        if entry.keys.size()[2] < capacity {
            let grow = |old: &Tensor| {
                let bigger = Tensor::zeros([b, n_head, capacity, d], (old.kind(), old.device()));
                bigger.narrow(2, 0, past).copy_(&old.narrow(2, 0, past));
                bigger
            };
            entry.keys = grow(&entry.keys);
            entry.values = grow(&entry.values);
        }
        entry.keys.narrow(2, past, t).copy_(&k);
        entry.values.narrow(2, past, t).copy_(&v);
        let keys = entry.keys.narrow(2, 0, past + t);
        let values = entry.values.narrow(2, 0, past + t);
        // New position i may see cached positions and new ones up to itself.
        let y = if past == 0 {
            Tensor::scaled_dot_product_attention::<Tensor>(&q, &keys, &values, None, 0.0, true, None, false)
        } else {
            let rows = Tensor::arange(t, (Kind::Int64, x.device())).unsqueeze(1) + past;
            let cols = Tensor::arange(past + t, (Kind::Int64, x.device())).unsqueeze(0);
            let mask = cols.le_tensor(&rows);
            Tensor::scaled_dot_product_attention(&q, &keys, &values, Some(mask), 0.0, false, None, false)
        };
        let y = y.transpose(1, 2).contiguous().view([b, t, h]);
        let x = x + self.attn_proj.forward(&y);
        let m = self.c_fc.forward(&self.ln_2.forward(&x)).gelu("tanh");
        &x + self.mlp_proj.forward(&m)
    }

    fn new(p: nn::Path, cfg: &ModelConfig) -> Block {
        let h = cfg.n_embd as i64;
        // GPT-2's scaled init: each residual branch adds into the stream once per layer.
        let residual_std = INIT_STD / (2.0 * cfg.n_layer as f64).sqrt();
        Block {
            ln_1: layer_norm(&p / "ln_1", h),
            c_attn: linear(&p / "attn" / "c_attn", h, 3 * h, INIT_STD),
            attn_proj: linear(&p / "attn" / "c_proj", h, h, residual_std),
            ln_2: layer_norm(&p / "ln_2", h),
            c_fc: linear(&p / "mlp" / "c_fc", h, 4 * h, INIT_STD),
            mlp_proj: linear(&p / "mlp" / "c_proj", 4 * h, h, residual_std),
        }
    }

    fn forward(&self, x: &Tensor, n_head: i64, dropout: f64, train: bool) -> Tensor {
        let (b, t, h) = x.size3().expect("activations are [batch, time, hidden]");
        let heads = |z: Tensor| z.view([b, t, n_head, h / n_head]).transpose(1, 2);
        let qkv = self.c_attn.forward(&self.ln_1.forward(x));
        let parts = qkv.split(h, 2);
        let (q, k, v) = (heads(parts[0].shallow_clone()), heads(parts[1].shallow_clone()), heads(parts[2].shallow_clone()));
        let attn_dropout = if train { dropout } else { 0.0 };
        let y = Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, attn_dropout, true, None, false);
        let y = y.transpose(1, 2).contiguous().view([b, t, h]);
        let x = x + self.attn_proj.forward(&y).dropout(dropout, train);
        let m = self.c_fc.forward(&self.ln_2.forward(&x)).gelu("tanh");
        &x + self.mlp_proj.forward(&m).dropout(dropout, train)
    }
}

/// One model of the family, its variables registered in the given `VarStore` path.
pub struct Algpt2 {
    cfg: ModelConfig,
    wte: Tensor,
    wpe: Tensor,
    proj_in: Option<nn::Linear>,
    proj_out: Option<nn::Linear>,
    blocks: Vec<Block>,
    ln_f: nn::LayerNorm,
}

impl Algpt2 {
    pub fn new(p: &nn::Path, cfg: &ModelConfig) -> Algpt2 {
        let (v, pos, h, e) = (cfg.vocab_size as i64, cfg.n_positions as i64, cfg.n_embd as i64, cfg.embedding_width() as i64);
        let normal = nn::Init::Randn { mean: 0.0, stdev: INIT_STD };
        let wte = p.var("wte", &[v, e], normal);
        let wpe = p.var("wpe", &[pos, e], normal);
        let (proj_in, proj_out) = if cfg.is_factorized() {
            (Some(linear(p / "proj_in", e, h, INIT_STD)), Some(linear(p / "proj_out", h, e, INIT_STD)))
        } else {
            (None, None)
        };
        // Sharing: one block, built once, so its variables exist once.
        let stored = if cfg.share_layers { 1 } else { cfg.n_layer };
        let blocks = (0..stored).map(|i| Block::new(p / "h" / i, cfg)).collect();
        let ln_f = layer_norm(p / "ln_f", h);
        Algpt2 { cfg: cfg.clone(), wte, wpe, proj_in, proj_out, blocks, ln_f }
    }

    /// Logits [batch, time, vocab] for token ids [batch, time].
    pub fn forward(&self, idx: &Tensor, train: bool) -> Tensor {
        let (_, t) = idx.size2().expect("token ids are [batch, time]");
        assert!(t as usize <= self.cfg.n_positions, "sequence of {t} exceeds n_positions {}", self.cfg.n_positions);
        let mut x = self.embed(idx, 0, train);
        for layer in 0..self.cfg.n_layer {
            x = self.block(layer).forward(&x, self.cfg.n_head as i64, self.cfg.dropout, train);
        }
        self.logits(&x)
    }

    /// Logits [batch, t, vocab] of `idx` [batch, t], the tokens after those in `cache`,
    /// without dropout; the cache takes their keys and values. Positions continue from
    /// the cache's length and must stay below `n_positions`.
    pub fn forward_cached(&self, idx: &Tensor, cache: &mut KvCache) -> Tensor {
        let (_, t) = idx.size2().expect("token ids are [batch, time]");
        let past = cache.len;
        assert!((past + t) as usize <= self.cfg.n_positions, "positions {} exceed n_positions {}", past + t, self.cfg.n_positions);
        if past + t > cache.capacity {
            while past + t > cache.capacity {
                cache.capacity *= 2;
            }
            cache.capacity = cache.capacity.min(self.cfg.n_positions as i64);
            cache.growths += 1;
        }
        let mut x = self.embed(idx, past, false);
        for layer in 0..self.cfg.n_layer {
            x = self.block(layer).forward_cached(&x, self.cfg.n_head as i64, &mut cache.layers[layer], past, cache.capacity);
        }
        cache.len = past + t;
        self.logits(&x)
    }

    /// Token plus position embeddings of `idx` at positions `start..`, dropout when
    /// training, projected E→H when factorized.
    fn embed(&self, idx: &Tensor, start: i64, train: bool) -> Tensor {
        let (_, t) = idx.size2().expect("token ids are [batch, time]");
        let positions = Tensor::arange_start(start, start + t, (Kind::Int64, idx.device()));
        let x = self.wte.embedding_at(idx) + self.wpe.embedding_at(&positions);
        let x = if train { x.dropout(self.cfg.dropout, true) } else { x };
        match &self.proj_in {
            Some(proj_in) => proj_in.forward(&x),
            None => x,
        }
    }

    /// The block of layer application `layer`: the one shared block, or the layer's own.
    fn block(&self, layer: usize) -> &Block {
        &self.blocks[if self.cfg.share_layers { 0 } else { layer }]
    }

    /// Final LayerNorm, the H→E projection when factorized, and the tied head.
    fn logits(&self, x: &Tensor) -> Tensor {
        let x = self.ln_f.forward(x);
        let x = match &self.proj_out {
            Some(proj_out) => proj_out.forward(&x),
            None => x,
        };
        x.matmul(&self.wte.tr())
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Mean token cross-entropy of `logits` against `targets` [batch, time].
    pub fn loss(logits: &Tensor, targets: &Tensor) -> Tensor {
        let v = logits.size().last().copied().expect("logits have a vocab dimension");
        logits.view([-1, v]).cross_entropy_for_logits(&targets.reshape([-1]))
    }
}

trait EmbeddingAt {
    fn embedding_at(&self, idx: &Tensor) -> Tensor;
}

impl EmbeddingAt for Tensor {
    /// Rows of a table; a plain gather whose backward is a dense scatter-add.
    fn embedding_at(&self, idx: &Tensor) -> Tensor {
        Tensor::embedding(self, idx, -1, false, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::size::param_count;
    use tch::{nn::VarStore, Device};

    fn tiny(share_layers: bool, embedding_size: Option<usize>) -> ModelConfig {
        ModelConfig { vocab_size: 61, n_positions: 16, n_embd: 24, embedding_size, n_layer: 3, n_head: 4, share_layers, dropout: 0.0 }
    }

    #[test]
    fn variable_count_matches_the_analytic_count() {
        for (share, e) in [(false, None), (true, None), (true, Some(8)), (false, Some(8))] {
            let cfg = tiny(share, e);
            let vs = VarStore::new(Device::Cpu);
            let _model = Algpt2::new(&vs.root(), &cfg);
            let stored: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
            assert_eq!(stored as u64, param_count(&cfg).total, "share={share} e={e:?}");
        }
    }

    #[test]
    fn forward_shapes_and_causality() {
        tch::manual_seed(0);
        let cfg = tiny(true, Some(8));
        let vs = VarStore::new(Device::Cpu);
        let model = Algpt2::new(&vs.root(), &cfg);
        let idx = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 7, 8]).view([2, 4]);
        let logits = model.forward(&idx, false);
        assert_eq!(logits.size(), vec![2, 4, 61]);
        // Changing a later token never changes earlier logits.
        let idx2 = Tensor::from_slice(&[1i64, 2, 3, 9, 5, 6, 7, 8]).view([2, 4]);
        let logits2 = model.forward(&idx2, false);
        let early = (logits.narrow(1, 0, 3) - logits2.narrow(1, 0, 3)).abs().max().double_value(&[]);
        assert_eq!(early, 0.0);
        let late = (logits.narrow(1, 3, 1) - logits2.narrow(1, 3, 1)).abs().max().double_value(&[]);
        assert!(late > 0.0);
    }

    #[test]
    fn initial_loss_is_near_uniform() {
        tch::manual_seed(0);
        let cfg = tiny(false, None);
        let vs = VarStore::new(Device::Cpu);
        let model = Algpt2::new(&vs.root(), &cfg);
        let idx = Tensor::randint(61, [4, 16], (Kind::Int64, Device::Cpu));
        // Independent targets: with a tied head the input token itself scores higher.
        let targets = Tensor::randint(61, [4, 16], (Kind::Int64, Device::Cpu));
        let loss = Algpt2::loss(&model.forward(&idx, false), &targets).double_value(&[]);
        assert!((loss - (61f64).ln()).abs() < 0.2, "{loss}");
    }
}

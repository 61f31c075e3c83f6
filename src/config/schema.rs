//! The configuration schema: every knob, its documented default, and nothing else.
//!
//! Defaults are the ALGPT2 WikiText-103 study (sharing + E=128, 12 layers, H=768); a config
//! file holds only what differs. The README's key table mirrors the doc comments here.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The whole run configuration. Unknown keys anywhere are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Name of the run directory under `out_dir`; null means the config file's stem, and a
    /// stem that is no such name (`..yaml` gives `.`) is refused: set run_name then.
    pub run_name: Option<String>,
    /// Parent directory of run directories.
    pub out_dir: PathBuf,
    /// Where tensors live: `auto` (CUDA when available, else CPU), `cpu` or `cuda`
    /// (each rank binds to GPU `local_rank`).
    pub device: DeviceKind,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub tokenizer: TokenizerConfig,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub checkpoint: CheckpointConfig,
    pub wandb: WandbConfig,
    pub dist: DistConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            run_name: None,
            out_dir: PathBuf::from("runs"),
            device: DeviceKind::Auto,
            model: ModelConfig::default(),
            data: DataConfig::default(),
            tokenizer: TokenizerConfig::default(),
            train: TrainConfig::default(),
            optim: OptimConfig::default(),
            checkpoint: CheckpointConfig::default(),
            wandb: WandbConfig::default(),
            dist: DistConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Auto,
    Cpu,
    Cuda,
}

/// The model: GPT-2, sharing-only or ALGPT2, chosen by `share_layers` and `embedding_size`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Rows of the token embedding table (V).
    pub vocab_size: usize,
    /// Rows of the position embedding table (P): the longest sequence the model accepts.
    pub n_positions: usize,
    /// Hidden width of the transformer block (H).
    pub n_embd: usize,
    /// Width E of the factorized token and position tables; null or equal to `n_embd`
    /// means no factorization (plain GPT-2 embeddings).
    pub embedding_size: Option<usize>,
    /// Number of block applications.
    pub n_layer: usize,
    /// Attention heads; must divide `n_embd`.
    pub n_head: usize,
    /// One block applied `n_layer` times (ALBERT's cross-layer sharing) instead of
    /// `n_layer` blocks.
    pub share_layers: bool,
    /// Dropout probability on embeddings, attention and residual outputs.
    pub dropout: f64,
    /// Where the embedding dropout sits when factorized: `after_projection` (the studies'
    /// ALGPT2: token + position, E→H projection, then dropout) or `before_projection`
    /// (dropout on the E-wide sum, then the projection). Without factorization both are
    /// dropout on the token + position sum.
    pub embedding_dropout: EmbeddingDropout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingDropout {
    AfterProjection,
    BeforeProjection,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            embedding_size: Some(128),
            n_layer: 12,
            n_head: 12,
            share_layers: true,
            dropout: 0.1,
            embedding_dropout: EmbeddingDropout::AfterProjection,
        }
    }
}

impl ModelConfig {
    /// The embedding width E actually used: `n_embd` when not factorized.
    pub fn embedding_width(&self) -> usize {
        self.embedding_size.unwrap_or(self.n_embd)
    }

    /// True when the E↔H projections exist.
    /// Which member of the family the switches select: `gpt2`, `shared`, `algpt2`, or
    /// `factorized` (factorized embeddings without sharing).
    pub fn variant(&self) -> &'static str {
        match (self.share_layers, self.is_factorized()) {
            (false, false) => "gpt2",
            (true, false) => "shared",
            (true, true) => "algpt2",
            (false, true) => "factorized",
        }
    }

    pub fn is_factorized(&self) -> bool {
        self.embedding_width() != self.n_embd
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Decide from the file names of `data.train`.
    Auto,
    /// WikiText `wiki.{train,valid,test}.tokens` or `.raw` files.
    Wikitext,
    /// HF parquet shards with a `text` column.
    Parquet,
    /// Plain text files.
    Text,
    /// JSON lines with a `text` field.
    Jsonl,
    /// The embedded generated corpus (no files needed).
    Synthetic,
}

/// Where the text comes from and where its token cache goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Layout of the source files: `auto` (from the extension), `wikitext`, `parquet`,
    /// `text`, `jsonl`, or `synthetic` (the embedded corpus, no files; see docs/data.md).
    pub format: DataFormat,
    /// Training split: a path or glob (unused for `synthetic`).
    pub train: Option<String>,
    /// Validation split: a path or glob.
    pub valid: Option<String>,
    /// Test split: a path or glob.
    pub test: Option<String>,
    /// Directory of the binary token caches.
    pub cache_dir: PathBuf,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig { format: DataFormat::Synthetic, train: None, valid: None, test: None, cache_dir: PathBuf::from("data_cache") }
    }
}

/// Byte-level BPE: trained on the train split, or loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenizerConfig {
    /// Vocabulary size to train to; at most `model.vocab_size`.
    pub vocab_size: usize,
    /// An existing `tokenizer.json` (or GPT-2 `vocab.json` beside `merges.txt`) to load
    /// instead of training one.
    pub path: Option<PathBuf>,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        TokenizerConfig { vocab_size: 50257, path: None }
    }
}

/// Batch geometry, run length and cadence of logging, evaluation and saving.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Tokens per training window; at most `model.n_positions`. A resume may change it: the data order continues after the same share of its epoch.
    pub seq_len: usize,
    /// Windows per forward pass on each rank.
    pub micro_batch_size: usize,
    /// Micro-batches summed before each optimizer step. Global batch =
    /// micro_batch_size × grad_accum_steps × world size.
    pub grad_accum_steps: usize,
    /// Optimizer steps in the whole run.
    pub max_steps: u64,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_interval: u64,
    /// Validation batches per evaluation (0: the whole split).
    pub eval_steps: u64,
    /// Log training metrics every this many steps.
    pub log_interval: u64,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub save_interval: u64,
    /// Seed of initialization, dropout and data order.
    pub seed: u64,
    /// What a NaN or infinite loss or gradient does: `stop` (exit naming the step; the
    /// last checkpoint stays as it was) or `skip` (drop that update and go on).
    pub nonfinite: NonFinite,
    /// Peak dense FLOP/s of one device (e.g. 989e12), for model FLOPs utilisation;
    /// null means known GPUs only (no MFU is reported on CPU).
    pub peak_flops: Option<f64>,
    /// fp32 matrix products on NVIDIA GPUs use TF32 tensor cores (10-bit mantissa
    /// inputs, fp32 accumulation), as PyTorch's `allow_tf32`; no effect on CPU.
    pub tf32: bool,
    /// Before anything is written, estimate the memory one rank needs (parameters,
    /// gradients, AdamW state, activations, logits) and refuse a config that cannot fit
    /// the device (GPU memory, or this rank's share of the available RAM).
    pub memory_check: bool,
    /// Compute precision: `auto` (bf16 on CUDA GPUs of compute capability 8.0 or newer and
    /// on CPUs with AMX-BF16, else fp32: with AVX512-BF16 alone bf16 measured slower than
    /// fp32), `bf16` (matrix products,
    /// attention and the head in bf16 on fp32 master weights, gradients and optimizer
    /// state; LayerNorm statistics, softmax, the loss and all reductions in fp32) or
    /// `fp32`. Checkpoints are fp32 either way and resume in either precision.
    pub precision: Precision,
    /// The head and token table are padded inside the trainer to a multiple of this many
    /// rows (faster matrix products); padded rows never get probability and are never
    /// saved or exported. 1: no padding.
    pub pad_vocab_multiple: usize,
    /// Rows of the head's logits formed at a time by the fused classifier (0: chosen from
    /// the vocabulary size, about 32 MB of fp32 logits per chunk).
    pub classifier_chunk_rows: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Auto,
    Bf16,
    Fp32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinite {
    Stop,
    Skip,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            seq_len: 256,
            micro_batch_size: 30,
            grad_accum_steps: 1,
            max_steps: 90_000,
            eval_interval: 1000,
            eval_steps: 100,
            log_interval: 10,
            save_interval: 1000,
            seed: 1337,
            nonfinite: NonFinite::Stop,
            peak_flops: None,
            tf32: true,
            memory_check: true,
            precision: Precision::Auto,
            pad_vocab_multiple: 64,
            classifier_chunk_rows: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear warmup, then half a cosine from `lr` down to `min_lr`.
    Cosine,
    /// Linear warmup, then a straight line from `lr` down to `min_lr`.
    Linear,
    /// Linear warmup, then `lr` throughout.
    Constant,
}

/// AdamW and the learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f64,
    /// Learning rate at `train.max_steps`.
    pub min_lr: f64,
    /// Steps of linear warmup from 0 to `lr`; more than `train.max_steps` warms up over the
    /// whole run (with a warning).
    pub warmup_steps: u64,
    /// Decay after warmup: `cosine`, `linear` or `constant`.
    pub schedule: Schedule,
    /// Decoupled weight decay on matrices and embeddings (never biases or LayerNorms).
    pub weight_decay: f64,
    /// AdamW β1, in [0, 1).
    pub beta1: f64,
    /// AdamW β2, in [0, 1).
    pub beta2: f64,
    /// AdamW's ε in the denominator, positive.
    pub eps: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub grad_clip: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 6e-4,
            min_lr: 0.0,
            warmup_steps: 1000,
            schedule: Schedule::Linear,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 1.0,
        }
    }
}

/// Retention and resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Newest checkpoints of this run kept (the best by validation loss is kept as well; another run's checkpoints in its directory are never deleted).
    pub keep_last: usize,
    /// `auto`: continue from the run's newest valid checkpoint, if any; `none`: start
    /// fresh; anything else: the path of a checkpoint directory to resume from.
    pub resume: String,
    /// What a failed save (disk full, I/O error) does: `stop` (every rank exits naming
    /// the error; the previous checkpoints are intact) or `continue` (warn and train on,
    /// trying again at the next save; the final save must succeed).
    pub on_save_error: OnSaveError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnSaveError {
    Stop,
    Continue,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { keep_last: 3, resume: "auto".to_string(), on_save_error: OnSaveError::Stop }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WandbMode {
    /// Report live when credentials are found; otherwise metrics stay local.
    Online,
    /// Write the run to the run directory for a later `wandb-sync`.
    Offline,
    /// No W&B at all.
    Disabled,
}

/// Weights & Biases reporting (rank 0 only). `WANDB_*` environment variables win.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WandbConfig {
    /// `online` (when credentials exist), `offline` (spool for `wandb-sync`), `disabled`.
    pub mode: WandbMode,
    /// W&B project.
    pub project: String,
    /// User or team; null means the API key's default entity.
    pub entity: Option<String>,
    /// Display name; null means `run_name`.
    pub name: Option<String>,
    /// W&B group.
    pub group: Option<String>,
    /// W&B tags.
    pub tags: Vec<String>,
    /// At exit, wait at most this long for unsent rows before marking the run finished
    /// (what is left stays in the run directory for `wandb-sync`).
    pub flush_timeout_s: f64,
    /// Stop on the W&B dashboard's Stop: every rank stops at the next step boundary after
    /// the server says so, saves a checkpoint and exits 0, as on SIGUSR1 (run the same
    /// command to resume). False: a warning only, training goes on.
    pub honor_stop: bool,
    /// System metrics of every rank (CPU, memory, disk, network, and its GPU through
    /// NVML) for the dashboard's System panels, as the official client names them.
    /// `WANDB_X_DISABLE_STATS=true` also turns them off.
    pub stats: bool,
    /// Seconds between two system metrics samples (the official client's default is 15).
    pub stats_interval_s: f64,
    /// Rank 0's log lines for the dashboard's Logs tab (`output.log`).
    pub console: bool,
}

impl Default for WandbConfig {
    fn default() -> Self {
        WandbConfig {
            mode: WandbMode::Online,
            project: "algpt2-ddp".to_string(),
            entity: None,
            name: None,
            group: None,
            tags: Vec::new(),
            flush_timeout_s: 30.0,
            honor_stop: true,
            stats: true,
            stats_interval_s: 15.0,
            console: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DistBackend {
    /// NCCL on CUDA, MPI on CPU.
    Auto,
    Nccl,
    Mpi,
    /// No gradient exchange: only valid for a world of one.
    None,
}

/// How gradients are exchanged between ranks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistConfig {
    /// `auto` (NCCL on CUDA, MPI on CPU), `nccl`, `mpi`, `none` (one rank only).
    pub backend: DistBackend,
    /// Gradients are exchanged in buckets of about this many MB of fp32 values
    /// (fractions allowed), filled in the order backward produces them; with `overlap`
    /// the first is at most 1 MB, as PyTorch DDP's.
    pub bucket_mb: f64,
    /// Start each bucket's all-reduce as soon as backward has produced its gradients
    /// (MPI: on a communication thread; NCCL: on a CUDA stream of its own), while backward
    /// goes on (the last micro-step of a step only; not with shared layers, whose
    /// gradients are complete only at the end). False: the whole exchange after backward.
    /// The averaged gradients are the same either way.
    pub overlap: bool,
    /// A rank with no finished step for this many seconds ends the job (a peer died or
    /// hangs). Start-up (data preparation) is not timed.
    pub timeout_s: u64,
    /// After a second stop signal (or when the launcher is gone), a rank ends within this
    /// many seconds: saving first if its step ends in time, else exiting with code 130.
    pub stop_grace_s: u64,
    /// Compare a checksum of the parameters across ranks every this many steps (0: never);
    /// a difference stops the run naming the ranks.
    pub check_interval: u64,
    /// Type of the gradients on the wire: `fp32`, or `bf16` (half the bytes; every
    /// addition still done in fp32, the averaged result written back into the fp32
    /// gradients).
    pub grad_dtype: GradDtype,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GradDtype {
    Fp32,
    Bf16,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig {
            backend: DistBackend::Auto,
            bucket_mb: 25.0,
            overlap: true,
            timeout_s: 600,
            stop_grace_s: 10,
            check_interval: 100,
            grad_dtype: GradDtype::Fp32,
        }
    }
}

//! Command-line interface. Doc comments here are the `--help` texts.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Train ALGPT2 language models (GPT-2 with ALBERT's cross-layer sharing and factorized
/// embeddings) data-parallel across processes: `mpirun -n 2 algpt2-ddp --config FILE`.
///
/// Without a subcommand, trains (the same as `algpt2-ddp train`).
#[derive(Debug, Parser)]
#[command(name = "algpt2-ddp", version, subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: ConfigArgs,
}

/// The config file and its overrides, taken by every subcommand that reads a config.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// YAML config file; keys it leaves out take their documented defaults.
    #[arg(long, short = 'c', value_name = "FILE", required = true)]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. `--set model.n_layer=6` or `--set model.embedding_size=null`
    /// (values are YAML scalars). Repeatable; later ones win; checked like the file.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model (the default command). Resumes from the run's newest checkpoint when
    /// `checkpoint.resume` is `auto`.
    Train(ConfigArgs),
    /// Print the resolved model: its variant, exact parameter count and training FLOPs per
    /// token. Needs no data and starts no MPI.
    Info {
        #[command(flatten)]
        args: ConfigArgs,
        /// Print one JSON object (with at least `parameters`) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Perplexity of a checkpoint: exp(mean token cross-entropy) over every
    /// non-overlapping window of a split, printed and written as JSON beside the run
    /// (`eval-<split>-step_<N>.json`). Runs under mpirun too (windows split across ranks).
    Eval {
        #[command(flatten)]
        args: ConfigArgs,
        /// Checkpoint directory, e.g. runs/quickstart/checkpoints/step_00000300.
        #[arg(long, value_name = "DIR")]
        checkpoint: std::path::PathBuf,
        /// Which split: valid or test.
        #[arg(long, default_value = "valid", value_parser = ["valid", "test"])]
        split: String,
    },
    /// Training speed on this device for a config, without a run directory: tokens/s,
    /// step time, model FLOPs utilisation (known GPUs, or train.peak_flops) and peak
    /// memory over STEPS steps after 3 warm-up steps; a table, or JSON with --json.
    Bench {
        #[command(flatten)]
        args: ConfigArgs,
        /// Timed steps.
        #[arg(long, default_value_t = 20, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..))]
        steps: u64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Continue a prompt with a trained checkpoint, printing as it goes. The model config
    /// comes from the checkpoint and the tokenizer from its run directory. Stops at
    /// <|endoftext|> or after --max-new-tokens; past the context the window slides.
    Generate {
        /// Checkpoint directory, e.g. runs/quickstart/checkpoints/step_00000300.
        #[arg(long, value_name = "DIR")]
        checkpoint: std::path::PathBuf,
        #[arg(long, default_value = "")]
        prompt: String,
        #[arg(long, default_value_t = 100)]
        max_new_tokens: usize,
        /// Softmax temperature, a finite number >= 0; 0 is greedy (always the most likely token).
        #[arg(long, default_value_t = 0.8, allow_negative_numbers = true, value_parser = parse_temperature)]
        temperature: f64,
        /// Sample only among the K most likely tokens (K >= 1; leave it out for no limit).
        #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(1..))]
        top_k: Option<i64>,
        /// Sample only among the most likely tokens covering probability P, 0 < P <= 1 (1:
        /// no limit).
        #[arg(long, allow_negative_numbers = true, value_parser = parse_top_p)]
        top_p: Option<f64>,
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        /// Recompute the whole context for every token instead of using the KV cache.
        #[arg(long)]
        no_cache: bool,
        /// The tokenizer.json to use instead of the run's (it must be the one the
        /// checkpoint was trained with: its hash is checked).
        #[arg(long, value_name = "FILE")]
        tokenizer: Option<std::path::PathBuf>,
    },
    /// Draw runs' metrics (train and val loss, val perplexity, lr, tokens/s) into one PNG,
    /// several runs overlaid, e.g. the three variants side by side.
    Plot {
        /// Run directories (each with a metrics.jsonl).
        #[arg(required = true)]
        run_dirs: Vec<std::path::PathBuf>,
        #[arg(long, value_name = "FILE.png")]
        out: std::path::PathBuf,
    },
    /// Write a checkpoint as a HF transformers GPT-2 (config.json, model.safetensors,
    /// tokenizer.json) that GPT2LMHeadModel.from_pretrained loads offline. Factorized
    /// embeddings are folded exactly into GPT-2's shapes (untied lm_head). The export is
    /// written beside --out and renamed into place, so a failed one leaves nothing.
    ExportHf {
        #[arg(long, value_name = "DIR")]
        checkpoint: std::path::PathBuf,
        /// A new or empty directory outside any run directory.
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// Replace a non-empty --out, only when it is a previous export: it holds the
        /// .algpt2-export.json an export writes and nothing but the files that lists.
        #[arg(long)]
        force: bool,
        /// The tokenizer.json to ship instead of the run's (it must be the one the
        /// checkpoint was trained with: its hash is checked).
        #[arg(long, value_name = "FILE")]
        tokenizer: Option<std::path::PathBuf>,
    },
    /// Build the token cache of a config: train the tokenizer on the train split (or load
    /// `tokenizer.path`) and encode every split into a memory-mappable token file. `train`
    /// does this by itself when the cache is missing; a complete cache is reused.
    Prepare {
        #[command(flatten)]
        args: ConfigArgs,
        /// Rebuild even when a complete cache exists.
        #[arg(long)]
        force: bool,
    },
    /// Upload a run's W&B data that never reached the server: an offline run
    /// (`wandb.mode: offline`), a run without credentials, or one cut off by a crash or
    /// an outage; finishes the run when its training ended. Credentials and server as for
    /// training (WANDB_API_KEY or ~/.netrc, WANDB_BASE_URL).
    WandbSync {
        /// The run directory, e.g. runs/quickstart.
        run_dir: std::path::PathBuf,
        /// Give up after this many seconds of an unreachable or failing server (exit 1);
        /// what is unsent stays for a later sync.
        #[arg(long, value_name = "SECONDS", default_value_t = 300, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
    },
    /// Check that this host (and, under mpirun, every rank) can train: versions (libtorch,
    /// CUDA, cuDNN, NCCL, MPI, this binary's commit), each GPU, every kernel of kernels/
    /// compiled with NVRTC and run against libtorch, NCCL and MPI all-reduce checked for
    /// exact sums with their bus bandwidth, one training step of a tiny model. Exit code
    /// 0 only when no check failed; what cannot be checked here is reported as skipped.
    Doctor {
        /// All-reduce sizes to check and time, in MiB.
        #[arg(long, value_name = "MB,...", allow_negative_numbers = true, value_delimiter = ',', default_values_t = crate::doctor::DEFAULT_SIZES_MB, value_parser = parse_size_mb)]
        sizes_mb: Vec<usize>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a training job unattended: start it again from its newest checkpoint when it
    /// fails on the way (a rank or mpirun killed, a hang the watchdog ended, a preemption:
    /// exit 75), never after a finished run, a configuration error (exit 2) or a stop
    /// asked of the supervisor (Ctrl-C, SIGTERM: passed on to the job, which saves).
    /// Restarts wait a doubling back-off and are logged in <run>/restarts.jsonl, e.g.
    /// `algpt2-ddp supervise -- mpirun -n 2 algpt2-ddp --config FILE`.
    ///
    /// With --hostfile the supervisor owns the hosts and the rank count: before every
    /// start it checks each host (`AGENT HOST ALGPT2-DDP --version`, AGENT being the job's
    /// `--mca plm_rsh_agent`, OMPI_MCA_plm_rsh_agent or ssh), leaves out those that fail,
    /// and starts mpirun with the rest (<run>/supervise-hosts) and -n their slots, e.g.
    /// `algpt2-ddp supervise --hostfile hosts -- mpirun --bind-to none algpt2-ddp --config
    /// FILE`. On fewer ranks the global batch is kept with more accumulation
    /// (train.grad_accum_steps × all slots / the slots left, refused where that is no
    /// whole number); a host that answers again rejoins at the next restart.
    Supervise {
        /// Restarts allowed; after the last the supervisor exits with the job's code.
        #[arg(long, default_value_t = 10)]
        max_restarts: u32,
        /// Seconds before the first restart; doubled for each next one.
        #[arg(long, value_name = "SECONDS", default_value_t = 2.0, value_parser = parse_seconds)]
        backoff: f64,
        /// The longest wait between restarts, in seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 300.0, value_parser = parse_seconds)]
        max_backoff: f64,
        /// The job's hosts, one `HOST slots=N` per line (Open MPI's hostfile syntax). The
        /// job line then gives neither -n nor --hostfile: the supervisor sets both.
        #[arg(long, value_name = "FILE")]
        hostfile: Option<std::path::PathBuf>,
        /// With --hostfile: the fewest ranks the job may run on; below it the supervisor
        /// does not start the job and exits 1.
        #[arg(long, value_name = "N", default_value_t = 1, requires = "hostfile", value_parser = clap::value_parser!(u64).range(1..))]
        min_ranks: u64,
        /// The job, after `--`: `mpirun … algpt2-ddp --config FILE …` or `algpt2-ddp …`.
        #[arg(last = true, required = true, value_name = "JOB")]
        command: Vec<String>,
    },
    /// Fetch WikiText-103 (needs internet): streaming, resumable, retried and checksum
    /// verified, then unpacked to DEST/wikitext-103 (tokens) or DEST/wikitext-103-raw (raw).
    Download {
        /// Which variant: `tokens` (wiki.*.tokens, as the configs expect) or `raw`.
        #[arg(long, default_value = "tokens")]
        variant: String,
        /// Directory the dataset directory is created in.
        #[arg(long, value_name = "DIR", default_value = "data")]
        dest: std::path::PathBuf,
        /// Where the zips are served from (a mirror, or a local server); also read from
        /// ALGPT2_DOWNLOAD_URL.
        #[arg(long, value_name = "URL", env = "ALGPT2_DOWNLOAD_URL")]
        base_url: Option<String>,
        /// Retries per file after the first attempt (with exponential backoff).
        #[arg(long, default_value_t = 5)]
        retries: u32,
    },
}

fn parse_size_mb(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(mb) if (1..=1 << 16).contains(&mb) => Ok(mb),
        _ => Err("each size must be a whole number of MiB from 1 to 65536".to_string()),
    }
}

fn parse_temperature(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err("must be a finite number >= 0 (0 is greedy)".to_string()),
    }
}

fn parse_top_p(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err("must be a probability in (0, 1] (1 keeps every token)".to_string()),
    }
}

impl ConfigArgs {
    /// The resolved, checked config (errors exit with code 2).
    pub fn load(&self) -> Result<crate::config::Config, crate::config::ConfigError> {
        let file = self.config.as_deref().expect("clap requires --config");
        crate::config::load(file, &self.sets)
    }
}

/// A non-negative, finite number of seconds.
fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Ok(s),
        _ => Err(format!("{text:?} is not a number of seconds (a finite number, 0 or more)")),
    }
}

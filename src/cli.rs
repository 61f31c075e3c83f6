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
}

impl ConfigArgs {
    /// The resolved, checked config (errors exit with code 2).
    pub fn load(&self) -> Result<crate::config::Config, crate::config::ConfigError> {
        let file = self.config.as_deref().expect("clap requires --config");
        crate::config::load(file, &self.sets)
    }
}

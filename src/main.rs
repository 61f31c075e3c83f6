//! `algpt2-ddp`: parse the command line, dispatch, map errors to exit codes
//! (2: bad configuration or usage, 1: anything else).

mod cli;
mod config;
mod device;
mod dist;
mod info;
mod model;
mod report;
mod run_dir;
mod train;

use clap::Parser;
use cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<config::ConfigError>() {
            Some(config_error) => {
                eprintln!("error: {config_error}");
                ExitCode::from(2)
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => train::run(cli.run.load()?),
        Some(Command::Train(args)) => train::run(args.load()?),
        Some(Command::Info { args, json }) => {
            info::run(&args.load()?, json);
            Ok(())
        }
    }
}

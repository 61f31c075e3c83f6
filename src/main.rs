//! `algpt2-ddp`: parse the command line, dispatch, map errors to exit codes
//! (2: bad configuration or usage, 1: anything else).

use algpt2_ddp::cli::{Cli, Command};
use algpt2_ddp::{config, data, eval, exit_code, info, report, train};
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    pin_cpu_math_threads();
    let cli = Cli::parse();
    install_panic_hook();
    let outcome = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dispatch(cli))) {
        Ok(outcome) => outcome,
        Err(_) => {
            let what = MAIN_PANIC.lock().ok().and_then(|m| m.clone()).unwrap_or_else(|| "an internal error".to_string());
            report::log::stderr_line(&format!("error: {what}"));
            return ExitCode::from(1);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // doctor's report, or a preemption's last line, already said what happened.
            let reported = e.downcast_ref::<algpt2_ddp::doctor::ChecksFailed>().is_some()
                || e.downcast_ref::<algpt2_ddp::parallel::signals::Preempted>().is_some();
            // Every rank reads the same config and fails the same way: one copy is enough.
            let repeated = exit_code::same_on_every_rank(&e) && algpt2_launch::launcher_rank(&|key| std::env::var(key).ok()) != 0;
            if !reported && !repeated {
                let text = match e.downcast_ref::<config::ConfigError>() {
                    Some(config_error) => format!("error: {config_error}"),
                    None => format!("error: {e:#}"),
                };
                report::log::stderr_line(&text);
            }
            ExitCode::from(exit_code::of(&e))
        }
    }
}

/// The message of the last panic on the main thread, for the one-line error above.
static MAIN_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// A panic is a bug or a libtorch call that failed inside tch (out of memory, a shape
/// it refused): it ends the command as an error, with one line saying what failed and
/// where, and exit code 1, not a backtrace and 101. Panics that the code catches itself
/// (cudarc's, when a CUDA library is missing) print nothing. RUST_BACKTRACE keeps
/// Rust's own report.
fn install_panic_hook() {
    if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_string());
        let text = text.lines().next().unwrap_or("").to_string();
        let at = info.location().map(|l| format!(" (at {}:{})", l.file(), l.line())).unwrap_or_default();
        let thread = std::thread::current();
        match thread.name() {
            Some("main") => {
                if let Ok(mut last) = MAIN_PANIC.lock() {
                    *last = Some(format!("internal failure: {text}{at}"));
                }
            }
            name => report::log::stderr_line(&format!("error: thread {} failed: {text}{at}", name.unwrap_or("unnamed"))),
        }
    }));
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => run_training(cli.run.load()?),
        Some(Command::Train(args)) => run_training(args.load()?),
        Some(Command::Info { args, json }) => {
            info::run(&args.load()?, json);
            Ok(())
        }
        Some(Command::Generate { checkpoint, prompt, max_new_tokens, temperature, top_k, top_p, seed, no_cache, tokenizer }) => {
            let sampling = algpt2_ddp::generate::Sampling { max_new_tokens, temperature, top_k, top_p, seed, use_cache: !no_cache };
            algpt2_ddp::generate::run(&checkpoint, tokenizer.as_deref(), &prompt, &sampling)
        }
        Some(Command::ExportHf { checkpoint, out, force, tokenizer }) => {
            // For the warnings about what interrupted exports left behind.
            report::log::init(0, None)?;
            algpt2_ddp::export::export_hf(&checkpoint, &out, &algpt2_ddp::export::ExportOptions { force, tokenizer })?;
            println!("{}", out.display());
            Ok(())
        }
        Some(Command::Plot { run_dirs, out }) => {
            algpt2_ddp::report::plots::render(&run_dirs, &out)?;
            println!("{}", out.display());
            Ok(())
        }
        Some(Command::Bench { args, steps, json }) => algpt2_ddp::bench::run(args.load()?, steps, json),
        Some(Command::Doctor { sizes_mb, json }) => {
            if algpt2_ddp::doctor::run(&algpt2_ddp::doctor::Options { sizes_mb, json })? {
                Ok(())
            } else {
                Err(algpt2_ddp::doctor::ChecksFailed.into())
            }
        }
        Some(Command::Eval { args, checkpoint, split }) => eval::run(args.load()?, &checkpoint, &split),
        Some(Command::Prepare { args, force }) => {
            let cfg = args.load()?;
            report::log::init(0, None)?;
            let prepared = data::prepare::prepare(&cfg, force)?;
            data::summary::print(&cfg, &prepared, 1);
            // What bounded reading is for: the figure to compare with the machine's memory.
            tracing::info!("peak memory of prepare: {:.0} MB", report::log::peak_rss_mb());
            Ok(())
        }
        Some(Command::WandbSync { run_dir, timeout }) => {
            report::log::init(0, None)?;
            let env = |key: &str| std::env::var(key).ok();
            let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
            report::wandb::sync_within(&run_dir, &env, home.as_deref(), std::time::Duration::from_secs(timeout))
        }
        Some(Command::Supervise { max_restarts, backoff, max_backoff, hostfile, min_ranks, command }) => {
            report::log::init(0, None)?;
            let seconds = std::time::Duration::from_secs_f64;
            let options = algpt2_ddp::supervise::Options {
                max_restarts,
                backoff: seconds(backoff),
                max_backoff: seconds(max_backoff),
                command,
                hostfile,
                min_ranks: usize::try_from(min_ranks).unwrap_or(usize::MAX),
            };
            algpt2_ddp::supervise::run(&options)
        }
        Some(Command::Download { variant, dest, base_url, retries }) => {
            report::log::init(0, None)?;
            let variant = variant.parse()?;
            let opts = data::download::DownloadOptions {
                base_url: base_url.unwrap_or_else(|| data::download::DEFAULT_BASE_URL.to_string()),
                dest_dir: dest,
                retries,
                timeout: std::time::Duration::from_secs(60),
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let dir = data::download::download_wikitext103(variant, &opts)?;
            println!("{}", dir.display());
            Ok(())
        }
    }
}

/// Training, once the W&B settings that can never work are refused (exit 2, before
/// anything is started or written).
fn run_training(cfg: config::Config) -> anyhow::Result<()> {
    report::wandb_run::WandbRun::check_settings(&cfg)?;
    train::run(cfg)
}

/// Exact resume on CPU needs the same sums in the same order on every run, which MKL
/// and OpenMP promise only when told to (MKL's "reproducibility conditions"):
/// - `MKL_DYNAMIC=FALSE`, `OMP_DYNAMIC=FALSE`: a fixed thread count. With MKL's default
///   dynamic threading, a run resumed next to another job ended a few ulps off the
///   uninterrupted run's in 2 of 16 resumes (none of 64 with it off).
/// - `MKL_CBWR=AUTO,STRICT`: MKL promises the same bits from run to run only in a CNR
///   mode, and in strict mode its GEMMs give the same bits on any thread count. It cost
///   nothing measurable on the quickstart model. (It did not remove a rarer divergence,
///   about one two-thread run in 30 to 100 on a crowded machine; see README.)
///
/// A value the user set is left alone, but for a thread count above the cores this
/// process may use (`OMP_NUM_THREADS=100000` started over a thousand threads that made no
/// progress for minutes): that is set to the cores, with one warning, before MKL or
/// libtorch sizes a thread pool from it (`device::share_cpu_threads` caps the same).
fn pin_cpu_math_threads() {
    for (key, value) in [("MKL_DYNAMIC", "FALSE"), ("OMP_DYNAMIC", "FALSE"), ("MKL_CBWR", "AUTO,STRICT")] {
        if std::env::var_os(key).is_none() {
            // SAFETY: the first statement of main, before any thread exists.
            unsafe { std::env::set_var(key, value) };
        }
    }
    let env = |key: &str| std::env::var(key).ok();
    let cores = algpt2_ddp::device::usable_cores();
    for (key, asked) in algpt2_ddp::device::excess_thread_variables(&env, cores) {
        // SAFETY: as above.
        unsafe { std::env::set_var(key, cores.to_string()) };
        let rank =
            if algpt2_launch::started_by_launcher(&env) { format!("rank {}: ", algpt2_launch::launcher_rank(&env)) } else { String::new() };
        report::log::stderr_line(&format!(
            "warning: {rank}{key}={asked} asks for more threads than the {cores} core(s) this process may use: using {cores}"
        ));
    }
}

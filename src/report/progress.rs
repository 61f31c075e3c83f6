//! Progress on rank 0: a bar (indicatif) when stderr is a terminal, plain log lines
//! otherwise (CI logs, files, mpirun's pipes).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use tracing::info;

pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar from `start` to `end` steps on the main rank at a terminal; else lines only.
    pub fn new(is_main: bool, start: u64, end: u64) -> Progress {
        let bar = (is_main && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(end).with_position(start);
            bar.set_style(
                ProgressStyle::with_template("{bar:40} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
                    .expect("a valid template"),
            );
            bar
        });
        Progress { bar }
    }

    /// The bar at `step`; `loss` when the step was logged (the last logged loss stays).
    pub fn step(&self, step: u64, loss: Option<f64>) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            if let Some(loss) = loss {
                bar.set_message(format!("loss {loss:.4}"));
            }
        }
    }

    /// A log line that does not tear the bar.
    pub fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| info!("{text}")),
            None => info!("{text}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

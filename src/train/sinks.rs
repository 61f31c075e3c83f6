//! Where a logged row goes, each sink on its own terms: `metrics.jsonl`, the progress
//! line, W&B, and the charts (redrawn when a row carries validation, or at the end).

use crate::report::format::group;
use crate::report::metrics_log::MetricsLog;
use crate::report::progress::Progress;
use crate::report::wandb_run::WandbRun;
use serde_json::{Map, Value};
use std::path::Path;

/// Something that takes every logged row of rank 0.
pub trait MetricSink {
    fn record(&self, step: u64, row: &Map<String, Value>) -> anyhow::Result<()>;
}

impl MetricSink for MetricsLog {
    fn record(&self, _step: u64, row: &Map<String, Value>) -> anyhow::Result<()> {
        self.append(row)
    }
}

impl MetricSink for Progress {
    fn record(&self, _step: u64, row: &Map<String, Value>) -> anyhow::Result<()> {
        self.line(&format_row(row));
        Ok(())
    }
}

impl MetricSink for WandbRun {
    /// Never fails: W&B is best effort, and its client spools what it cannot send.
    fn record(&self, step: u64, row: &Map<String, Value>) -> anyhow::Result<()> {
        self.log(step, row);
        Ok(())
    }
}

/// `<run>/plots.png`, redrawn at each evaluation and at the last step.
pub struct Charts<'a> {
    pub run_root: &'a Path,
    pub max_steps: u64,
}

impl MetricSink for Charts<'_> {
    /// Charts are a convenience: a failure to draw is a warning, never a stop.
    fn record(&self, step: u64, row: &Map<String, Value>) -> anyhow::Result<()> {
        if row.contains_key("val/loss") || step == self.max_steps {
            if let Err(e) = crate::report::plots::render_run(self.run_root) {
                tracing::warn!("could not draw {}/plots.png: {e:#}", self.run_root.display());
            }
        }
        Ok(())
    }
}

/// `step 100 | train/loss 2.3456 | val/ppl 12.34` for log lines.
pub fn format_row(row: &Map<String, Value>) -> String {
    let mut parts = vec![format!("step {}", row["step"])];
    for (k, v) in row {
        if k == "step" {
            continue;
        }
        match v.as_f64() {
            Some(x) if k.ends_with("tokens") => parts.push(format!("{k} {}", group(x as u64))),
            Some(x) if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e5) => parts.push(format!("{k} {x:.3e}")),
            Some(x) => parts.push(format!("{k} {x:.4}")),
            None => parts.push(format!("{k} {v}")),
        }
    }
    parts.join(" | ")
}

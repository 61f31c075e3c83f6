//! `metrics.jsonl`: one JSON object per logged step, `step` plus W&B-style metric names
//! (`train/loss`, `val/ppl`, ...). Only rank 0 writes it.

use anyhow::Context;
use serde_json::{Map, Value};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Metric names whose values depend on wall-clock time or the process, not on the
/// computation; they are the only ones that differ between a run and its exact resume.
pub const MACHINE_METRICS: [&str; 6] =
    ["train/tokens_per_sec", "train/step_ms", "train/mfu", "train/rss_mb", "train/comm_ms", "train/comm_exposed_ms"];

pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    pub fn new(path: &Path) -> MetricsLog {
        MetricsLog { path: path.to_path_buf() }
    }

    /// Appends one row and flushes it to the file.
    pub fn append(&self, row: &Map<String, Value>) -> anyhow::Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        writeln!(f, "{}", Value::Object(row.clone())).with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// The step of the last row (0 when there is none); a torn last line is passed over.
    pub fn last_step(&self) -> u64 {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        text.lines().rev().find_map(row_step).unwrap_or(0)
    }

    /// On resume from `step`, drops rows logged after it by the interrupted run, so that
    /// the rows the resumed run writes are not duplicated.
    pub fn truncate_after(&self, step: u64) -> anyhow::Result<()> {
        let Ok(text) = std::fs::read_to_string(&self.path) else { return Ok(()) };
        let kept: String = text.lines().filter(|line| row_step(line).is_some_and(|s| s <= step)).map(|line| format!("{line}\n")).collect();
        crate::run_dir::write_atomic(&self.path, kept.as_bytes())
    }
}

/// A row's `step`, if the line is a whole row.
fn row_step(line: &str) -> Option<u64> {
    serde_json::from_str::<Value>(line).ok().and_then(|v| v["step"].as_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_step_survives_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = MetricsLog::new(&dir.path().join("metrics.jsonl"));
        assert_eq!(log.last_step(), 0);
        std::fs::write(
            dir.path().join("metrics.jsonl"),
            "{\"step\": 4, \"train/loss\": 5.0}\n{\"step\": 8, \"train/loss\": 4.0}\n{\"step\": 1",
        )
        .unwrap();
        assert_eq!(log.last_step(), 8);
    }

    #[test]
    fn rows_append_and_truncate_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let log = MetricsLog::new(&dir.path().join("metrics.jsonl"));
        for step in 1..=5u64 {
            let mut row = Map::new();
            row.insert("step".into(), step.into());
            row.insert("train/loss".into(), (10.0 / step as f64).into());
            log.append(&row).unwrap();
        }
        log.truncate_after(3).unwrap();
        let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let steps: Vec<u64> = text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, vec![1, 2, 3]);
    }
}

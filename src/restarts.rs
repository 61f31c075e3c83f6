//! `<run>/restarts.jsonl`: one line per restart of a supervised job (`algpt2-ddp
//! supervise`), written by the supervisor before it starts the job again and read by the
//! restarted run: its rank 0 names the restart in the log (and so on W&B's console) and
//! adds the totals to `summary.json`.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Set by the supervisor in the environment of a restarted job: the restart's number.
pub const ENV_RESTART: &str = "ALGPT2_RESTART";

/// One restart: why the job ended, where it stood, where it starts again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestartRecord {
    /// 1 for the first restart.
    pub restart: u32,
    /// Why the job ended, e.g. "a rank was killed (mpirun exited 137)".
    pub reason: String,
    /// The last step the ended job logged (0 when none).
    pub failed_at_step: u64,
    /// The step of the checkpoint the job starts again from (0: from the start).
    pub resumes_from_step: u64,
    /// Steps trained again: `failed_at_step - resumes_from_step`.
    pub steps_recomputed: u64,
    /// Wall time lost: from the later of the ended attempt's start and its newest
    /// checkpoint, to the restart (the new attempt's start-up not included).
    pub time_lost_s: f64,
    /// Seconds waited before this restart (the growing back-off).
    pub waited_s: f64,
    /// Under `supervise --hostfile`: the hosts this restart runs on and what changed.
    /// Absent otherwise (and in records from before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<HostsChange>,
}

/// The hosts of a restart under `supervise --hostfile`: those that passed the check
/// before it, those dropped or rejoined since the ended attempt, and the ranks and
/// gradient accumulation that keep the global batch of the whole host list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostsChange {
    pub running: Vec<String>,
    pub dropped: Vec<String>,
    pub rejoined: Vec<String>,
    pub ranks: usize,
    pub grad_accum_steps: usize,
}

/// What `summary.json` says of a supervised run's restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Totals {
    pub restarts: u32,
    pub steps_recomputed: u64,
    pub time_lost_s: f64,
}

pub fn path(run_root: &Path) -> PathBuf {
    run_root.join("restarts.jsonl")
}

/// Appends `record` as one line (written whole, then synced).
pub fn append(run_root: &Path, record: &RestartRecord) -> anyhow::Result<()> {
    let file = path(run_root);
    // A job that failed before its rank 0 made the run directory.
    std::fs::create_dir_all(run_root).with_context(|| format!("cannot create {}", run_root.display()))?;
    let mut line = serde_json::to_string(record)?;
    line.push('\n');
    let mut out =
        std::fs::OpenOptions::new().create(true).append(true).open(&file).with_context(|| format!("cannot open {}", file.display()))?;
    out.write_all(line.as_bytes()).and_then(|()| out.sync_all()).with_context(|| format!("cannot write {}", file.display()))
}

/// Every record of the run, oldest first; a line that does not parse (a torn write) is
/// skipped.
pub fn read_all(run_root: &Path) -> Vec<RestartRecord> {
    let Ok(text) = std::fs::read_to_string(path(run_root)) else { return vec![] };
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The totals over `records`, or None for a run that was never restarted.
pub fn totals(records: &[RestartRecord]) -> Option<Totals> {
    (!records.is_empty()).then(|| Totals {
        restarts: records.len() as u32,
        steps_recomputed: records.iter().map(|r| r.steps_recomputed).sum(),
        time_lost_s: records.iter().map(|r| r.time_lost_s).sum(),
    })
}

/// The restarted run's line about why it runs again.
pub fn announcement(record: &RestartRecord) -> String {
    let mut line = format!(
        "restart {} by the supervisor: {}; resuming from step {} ({} step(s) to train again, {:.1} s lost)",
        record.restart, record.reason, record.resumes_from_step, record.steps_recomputed, record.time_lost_s
    );
    if let Some(hosts) = &record.hosts {
        line += &hosts_said(hosts);
    }
    line
}

/// "; on 2 rank(s) of a, b (dropped c), train.grad_accum_steps 3".
fn hosts_said(hosts: &HostsChange) -> String {
    let mut changed = Vec::new();
    if !hosts.dropped.is_empty() {
        changed.push(format!("dropped {}", hosts.dropped.join(", ")));
    }
    if !hosts.rejoined.is_empty() {
        changed.push(format!("rejoined {}", hosts.rejoined.join(", ")));
    }
    let changed = if changed.is_empty() { String::new() } else { format!(" ({})", changed.join("; ")) };
    format!("; on {} rank(s) of {}{changed}, train.grad_accum_steps {}", hosts.ranks, hosts.running.join(", "), hosts.grad_accum_steps)
}

/// The record of the restart this process is, if the supervisor started it as one.
pub fn this_restart(run_root: &Path, env: &dyn Fn(&str) -> Option<String>) -> Option<RestartRecord> {
    let number: u32 = env(ENV_RESTART)?.parse().ok()?;
    read_all(run_root).into_iter().rev().find(|r| r.restart == number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(restart: u32, steps_recomputed: u64, time_lost_s: f64) -> RestartRecord {
        RestartRecord {
            restart,
            reason: "a rank was killed".into(),
            failed_at_step: 10 + steps_recomputed,
            resumes_from_step: 10,
            steps_recomputed,
            time_lost_s,
            waited_s: 1.0,
            hosts: None,
        }
    }

    #[test]
    fn records_round_trip_and_sum_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(totals(&read_all(dir.path())), None);
        append(dir.path(), &record(1, 3, 2.5)).unwrap();
        std::fs::OpenOptions::new().append(true).open(path(dir.path())).unwrap().write_all(b"{\"restart\": 2, \"rea").unwrap();
        std::fs::OpenOptions::new().append(true).open(path(dir.path())).unwrap().write_all(b"\n").unwrap();
        append(dir.path(), &record(2, 4, 1.5)).unwrap();
        let all = read_all(dir.path());
        assert_eq!(all, [record(1, 3, 2.5), record(2, 4, 1.5)]);
        assert_eq!(totals(&all), Some(Totals { restarts: 2, steps_recomputed: 7, time_lost_s: 4.0 }));
    }

    #[test]
    fn only_a_process_started_as_a_restart_finds_its_record() {
        let dir = tempfile::tempdir().unwrap();
        append(dir.path(), &record(1, 3, 2.5)).unwrap();
        let none = |_: &str| None;
        assert_eq!(this_restart(dir.path(), &none), None);
        let first = |k: &str| (k == ENV_RESTART).then(|| "1".to_string());
        assert_eq!(this_restart(dir.path(), &first), Some(record(1, 3, 2.5)));
        let later = |k: &str| (k == ENV_RESTART).then(|| "2".to_string());
        assert_eq!(this_restart(dir.path(), &later), None);
        assert_eq!(
            announcement(&record(1, 3, 2.5)),
            "restart 1 by the supervisor: a rank was killed; resuming from step 10 (3 step(s) to train again, 2.5 s lost)"
        );
    }

    #[test]
    fn a_restart_on_other_hosts_says_which_and_older_records_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let moved = RestartRecord {
            hosts: Some(HostsChange {
                running: vec!["a".into(), "b".into()],
                dropped: vec!["c".into()],
                rejoined: vec![],
                ranks: 2,
                grad_accum_steps: 3,
            }),
            ..record(1, 3, 2.5)
        };
        append(dir.path(), &moved).unwrap();
        // A record written before hosts existed, and one without them, carry no field.
        let plain = serde_json::to_string(&record(2, 1, 1.0)).unwrap();
        assert!(!plain.contains("hosts"), "{plain}");
        std::fs::OpenOptions::new().append(true).open(path(dir.path())).unwrap().write_all(format!("{plain}\n").as_bytes()).unwrap();
        assert_eq!(read_all(dir.path()), [moved.clone(), record(2, 1, 1.0)]);
        assert_eq!(
            announcement(&moved),
            "restart 1 by the supervisor: a rank was killed; resuming from step 10 (3 step(s) to train again, 2.5 s lost); \
             on 2 rank(s) of a, b (dropped c), train.grad_accum_steps 3"
        );
    }
}

//! `algpt2-ddp doctor`: whether this host (and, under mpirun, every rank) can train, in
//! one command — what `torch.utils.collect_env`, DeepSpeed's `ds_report` and nccl-tests
//! tell their users. Facts (versions, GPUs) are printed; checks pass, fail or are skipped
//! with the reason, and the exit code is 0 only when none failed on any rank.

mod collectives;
mod kernel_checks;
mod train_step;
mod versions;

use crate::config::DeviceKind;
use crate::device;
use serde::{Deserialize, Serialize};

/// The all-reduce sizes whose bandwidth is measured, in MiB (nccl-tests' usual points).
pub const DEFAULT_SIZES_MB: [usize; 4] = [1, 16, 64, 256];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
}

/// One rank's findings.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub rank: usize,
    pub device: String,
    /// (what, value) lines: versions, GPUs, bandwidth tables.
    pub facts: Vec<(String, String)>,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn fact(&mut self, what: impl Into<String>, value: impl Into<String>) {
        self.facts.push((what.into(), value.into()));
    }
    fn check(&mut self, name: impl Into<String>, status: Status, detail: impl Into<String>) {
        self.checks.push(Check { name: name.into(), status, detail: detail.into() });
    }
    pub fn pass(&mut self, name: impl Into<String>, detail: impl Into<String>) {
        self.check(name, Status::Pass, detail);
    }
    pub fn fail(&mut self, name: impl Into<String>, detail: impl Into<String>) {
        self.check(name, Status::Fail, detail);
    }
    pub fn skip(&mut self, name: impl Into<String>, detail: impl Into<String>) {
        self.check(name, Status::Skip, detail);
    }
    /// A check from a result: its detail on success, the error's chain on failure.
    pub fn outcome(&mut self, name: impl Into<String>, result: anyhow::Result<String>) {
        match result {
            Ok(detail) => self.pass(name, detail),
            Err(e) => self.fail(name, format!("{e:#}")),
        }
    }
    fn failures(&self) -> usize {
        self.checks.iter().filter(|c| c.status == Status::Fail).count()
    }
}

/// Some check failed on some rank (the report shows which): exit code 1.
#[derive(Debug, thiserror::Error)]
#[error("doctor: some checks failed")]
pub struct ChecksFailed;

pub struct Options {
    pub sizes_mb: Vec<usize>,
    pub json: bool,
}

/// Runs every check on every rank; rank 0 prints all ranks' reports. Returns whether
/// every check on every rank passed or was skipped.
pub fn run(opts: &Options) -> anyhow::Result<bool> {
    let world = crate::runtime::Runtime::join(true)?;
    crate::report::log::init(world.rank(), None)?;
    device::share_cpu_threads(world.local_size());
    let mut report = Report { rank: world.rank(), ..Report::default() };
    versions::collect(&mut report, &world);
    let device = match device::resolve(DeviceKind::Auto, world.local_rank()) {
        Ok(d) => {
            report.pass("device", format!("rank {} (local rank {}) uses {}", world.rank(), world.local_rank(), device::describe(d)));
            d
        }
        Err(e) => {
            report.fail("device", format!("rank {}: {e}", world.rank()));
            tch::Device::Cpu
        }
    };
    report.device = device::describe(device);
    kernel_checks::run(&mut report, device);
    collectives::run(&mut report, &world, device, &opts.sizes_mb);
    train_step::run(&mut report, &world, device);

    let reports: Vec<Report> =
        world.all_gather_text(&serde_json::to_string(&report)?).iter().map(|text| serde_json::from_str(text)).collect::<Result<_, _>>()?;
    let failures: usize = reports.iter().map(Report::failures).sum();
    if world.is_main() {
        if opts.json {
            println!("{}", serde_json::json!({ "ok": failures == 0, "world_size": world.size(), "ranks": reports }));
        } else {
            print!("{}", render(&reports));
        }
    }
    Ok(failures == 0)
}

/// The text report: rank 0's facts, then each rank's device facts and checks.
pub fn render(reports: &[Report]) -> String {
    let mut out = String::new();
    for (i, r) in reports.iter().enumerate() {
        out.push_str(&format!("== rank {} ({}) ==\n", r.rank, r.device));
        for (what, value) in &r.facts {
            // Host-wide facts once (rank 0); per-rank ones for every rank.
            if i == 0 || what.starts_with("GPU") || what.contains("bandwidth") {
                // A bandwidth table: one size per line.
                for (j, part) in value.split("; ").enumerate() {
                    let label = if j == 0 { what.as_str() } else { "" };
                    out.push_str(&format!("  {label:<24} {part}\n"));
                }
            }
        }
        for c in &r.checks {
            let tag = match c.status {
                Status::Pass => "PASS",
                Status::Fail => "FAIL",
                Status::Skip => "SKIP",
            };
            let detail = if c.status == Status::Skip { format!("skipped: {}", c.detail) } else { c.detail.clone() };
            out.push_str(&format!("  [{tag}] {:<28} {detail}\n", c.name));
        }
    }
    let count = |s: Status| reports.iter().flat_map(|r| &r.checks).filter(|c| c.status == s).count();
    out.push_str(&format!(
        "doctor: {} passed, {} failed, {} skipped on {} rank(s)\n",
        count(Status::Pass),
        count(Status::Fail),
        count(Status::Skip),
        reports.len()
    ));
    out
}

/// nccl-tests' bus bandwidth of an all-reduce: what each link carries, comparable across
/// world sizes (algorithm bandwidth × 2(n-1)/n).
pub fn bus_bandwidth(bytes: usize, seconds: f64, ranks: usize) -> (f64, f64) {
    let algbw = bytes as f64 / seconds / 1e9;
    (algbw, algbw * 2.0 * (ranks as f64 - 1.0) / ranks as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_bandwidth_follows_nccl_tests() {
        let (alg, bus) = bus_bandwidth(1_000_000_000, 1.0, 2);
        assert_eq!((alg, bus), (1.0, 1.0));
        let (alg, bus) = bus_bandwidth(1_000_000_000, 0.5, 8);
        assert_eq!(alg, 2.0);
        assert!((bus - 3.5).abs() < 1e-12);
        assert_eq!(bus_bandwidth(1 << 20, 1.0, 1).1, 0.0);
    }

    #[test]
    fn a_failure_on_any_rank_is_counted_and_shown() {
        let mut a = Report { rank: 0, device: "cpu".into(), ..Report::default() };
        a.fact("libtorch", "2.11.0");
        a.pass("x", "fine");
        a.skip("y", "no GPU");
        let mut b = Report { rank: 1, device: "cpu".into(), ..Report::default() };
        b.outcome("z", Err(anyhow::anyhow!("broken")));
        assert_eq!(a.failures() + b.failures(), 1);
        let text = render(&[a, b]);
        assert!(text.contains("[PASS] x"), "{text}");
        assert!(text.contains("[SKIP] y") && text.contains("skipped: no GPU"), "{text}");
        assert!(text.contains("[FAIL] z") && text.contains("broken"), "{text}");
        assert!(text.ends_with("doctor: 1 passed, 1 failed, 1 skipped on 2 rank(s)\n"), "{text}");
    }
}

//! System metrics for the W&B dashboard's System panels: what one training rank samples
//! (its process, its host, its GPU), the fixed-size vector rank 0 gathers them in, and the
//! row of wandb-events.jsonl made from every rank's sample.
//!
//! - `host.rs`: process and host, through sysinfo, procfs and statvfs(2);
//! - `cgroup.rs`: the cgroup v2 limits that host metrics are a share of;
//! - `gpu.rs`: the rank's GPU, from NVML;
//! - `sampler.rs`: the background thread that samples both every interval.
//!
//! # Key names and units
//!
//! The official client's, sent prefixed with `system.`, as wandb 0.31.0 (the one in the
//! project venv) sent them to a loopback recorder, its system monitor being the
//! wandb-symon binary (xpu/src/host.rs, gpu_nvidia.rs of github.com/wandb/wandb); the
//! definitions where 0.31 agrees with core/internal/monitor/system.go at b6e29505 (with
//! cgroup.go for the cgroup v2 denominators) come from there:
//!
//! - `cpu`: the process's CPU time since the previous sample over the time between them,
//!   in percent of one core, divided by the CPU capacity: the cgroup v2 limit (cpu.max,
//!   or Cpus_allowed_list when it is smaller than the host), else the physical cores; so
//!   100 means every core busy. Absent from a rank's first sample, as official.
//! - `proc.cpu.threads`: the process's threads.
//! - `proc.memory.rssMB`: resident memory, MiB. `proc.memory.percent`: of the cgroup's
//!   memory.max when finite, else of the host's MemTotal, %.
//! - `memory_percent`: the cgroup's memory.current of its memory.max, else the host's
//!   (MemTotal − MemAvailable) of MemTotal, %. `proc.memory.availableMB`: what is left of
//!   the same, MiB.
//! - `disk./.usagePercent`: used of used + available on the file system of "/", %.
//!   `disk./.usageGB`: used, GiB.
//! - `disk.in`, `disk.out`: MiB read and written since the sampler started, summed over the
//!   block devices behind "/" (/proc/diskstats). The official client now sends these per
//!   device as `disk.<dev>.in`/`.out` (since 2025-06, #10080); our gathered layout has
//!   fixed names, so we send their sum under the names it used before (then of one disk).
//! - `network.sent`, `network.recv`: bytes since the sampler started, summed over the
//!   interfaces of /proc/net/dev but loopback. `network.tcpRetransmits`: TCP segments
//!   retransmitted since then (/proc/net/snmp).
//!
//! From xpu/src/gpu_nvidia.rs (the NVML collector, nvml-wrapper 0.12 there), per GPU as
//! `gpu.<i>.<key>`: `gpu` (utilization, %), `memory` (memory-controller utilization, %),
//! `memoryAllocated` (used of total memory, %), `memoryAllocatedBytes` (bytes), `temp`
//! (°C), `powerWatts` (W), `enforcedPowerLimitWatts` (W), `powerPercent` (power of the
//! limit, %), `smClock`, `memoryClock`, `graphicsClock` (MHz), `correctedMemoryErrors`,
//! `uncorrectedMemoryErrors` (volatile ECC counts), `fanSpeed` (%), `pcieLinkGen`,
//! `pcieLinkSpeed` (NVML's MT/s × 10^6, as official), `pcieLinkWidth` (lanes),
//! `maxPcieLinkGen`, `maxPcieLinkWidth`. The first eight are also sent as
//! `gpu.process.<i>.<key>`, as the official collector does for a GPU the monitored process
//! computes on. Not taken: the GPM metrics (`smActive`, ...; Hopper and newer, off by
//! default there) and `encoderUtilization` (off by default there).
//!
//! # Fault injection
//!
//! `ALGPT2_FAULT_STATS`, read once when a sampler starts: a comma list of sources to fail,
//! each optionally for one rank only (`source:R`): `proc` fails every host read (/proc
//! and statvfs) and `nvml` fails NVML's init, as if the read had errored, so that the
//! warning path runs and the rank trains on without those keys. E.g.
//! `ALGPT2_FAULT_STATS=nvml:1,proc`.

mod cgroup;
mod gpu;
mod host;
mod sampler;

pub use gpu::{gpu_keys, GpuReadings, GPU_KEYS, GPU_PROCESS_KEYS};
pub use host::{memory_total_bytes, physical_cores, root_disk_bytes, HOST_KEYS};
pub use sampler::Sampler;

use serde_json::{Map, Value};

/// One rank's sample: host/process metrics and, when it has one, its GPU's. Keys are the
/// official client's names without the `system.` prefix (HOST_KEYS, GPU_KEYS).
///
/// `gpu` is Some for a rank that trains on a GPU even when NVML gave nothing (then empty),
/// so that the GPUs keep their indices in `events_row` when one rank's NVML fails.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RankSample {
    pub host: Vec<(&'static str, f64)>,
    pub gpu: Option<Vec<(&'static str, f64)>>,
}

impl RankSample {
    /// The length of `to_f64s`: HOST_KEYS, GPU_KEYS, then the has-a-GPU flag.
    pub const LEN: usize = HOST_KEYS.len() + GPU_KEYS.len() + 1;

    /// A fixed-length layout, the same on every rank, so that rank 0 can gather
    /// fixed-size vectors: HOST_KEYS then GPU_KEYS (NaN where absent), then 1.0 for a rank
    /// with a GPU, 0.0 without.
    pub fn to_f64s(&self) -> Vec<f64> {
        let value = |pairs: &[(&'static str, f64)], key: &str| pairs.iter().find(|(k, _)| *k == key).map_or(f64::NAN, |(_, v)| *v);
        let gpu = self.gpu.as_deref().unwrap_or(&[]);
        let mut out: Vec<f64> = HOST_KEYS.iter().map(|k| value(&self.host, k)).collect();
        out.extend(GPU_KEYS.iter().map(|k| value(gpu, k)));
        out.push(if self.gpu.is_some() { 1.0 } else { 0.0 });
        out
    }

    /// The inverse of `to_f64s`; a vector of another length gives an empty sample.
    pub fn from_f64s(values: &[f64]) -> RankSample {
        if values.len() != Self::LEN {
            return RankSample::default();
        }
        let (host, rest) = values.split_at(HOST_KEYS.len());
        let (gpu, flag) = rest.split_at(GPU_KEYS.len());
        let pairs = |keys: &[&'static str], values: &[f64]| -> Vec<(&'static str, f64)> {
            keys.iter().zip(values).filter(|(_, v)| !v.is_nan()).map(|(k, v)| (*k, *v)).collect()
        };
        RankSample { host: pairs(&HOST_KEYS, host), gpu: (flag[0] == 1.0).then(|| pairs(&GPU_KEYS, gpu)) }
    }
}

/// The wandb-events.jsonl row of every rank's sample, in rank order: rank 0's host keys as
/// `system.<key>`; every rank's as `system.rank.<r>.<key>`; each GPU as
/// `system.gpu.<i>.<key>` (and GPU_PROCESS_KEYS also as `system.gpu.process.<i>.<key>`),
/// `i` its index across ranks in rank order (ranks without a GPU take none). Values that
/// are not finite are left out.
pub fn events_row(samples: &[RankSample]) -> Map<String, Value> {
    let mut row = Map::new();
    let mut put = |key: String, value: f64| {
        if let Some(v) = json_number(value) {
            row.insert(key, v);
        }
    };
    for (key, value) in samples.first().map_or(&[][..], |s| &s.host[..]) {
        put(format!("system.{key}"), *value);
    }
    let mut gpu_index = 0;
    for (rank, sample) in samples.iter().enumerate() {
        for (key, value) in &sample.host {
            put(format!("system.rank.{rank}.{key}"), *value);
        }
        if let Some(gpu) = &sample.gpu {
            for (key, value) in gpu {
                put(format!("system.gpu.{gpu_index}.{key}"), *value);
                if GPU_PROCESS_KEYS.contains(key) {
                    put(format!("system.gpu.process.{gpu_index}.{key}"), *value);
                }
            }
            gpu_index += 1;
        }
    }
    row
}

/// Whole numbers as JSON integers (byte counts, clocks), others as floats; None for NaN
/// and infinities, which JSON cannot hold.
fn json_number(v: f64) -> Option<Value> {
    if !v.is_finite() {
        return None;
    }
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        return Some(Value::from(v as i64));
    }
    serde_json::Number::from_f64(v).map(Value::Number)
}

/// A source that failed in one sample: its name (what the one warning names) and why.
#[derive(Debug)]
struct Failure {
    source: &'static str,
    error: String,
    /// Normal on some hardware (an NVML query a GPU does not support): logged at debug.
    expected: bool,
}

impl Failure {
    fn new(source: &'static str, error: impl Into<String>) -> Failure {
        Failure { source, error: error.into(), expected: false }
    }

    fn expected(self) -> Failure {
        Failure { expected: true, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu_sample(util: f64) -> Vec<(&'static str, f64)> {
        vec![("gpu", util), ("memoryAllocatedBytes", 1024.0), ("smClock", 1980.0)]
    }

    #[test]
    fn the_layout_round_trips() {
        let with_gpu =
            RankSample { host: vec![("cpu", 12.5), ("proc.memory.rssMB", 800.25), ("network.recv", 0.0)], gpu: Some(gpu_sample(87.0)) };
        let without = RankSample { host: vec![("memory_percent", 40.0)], gpu: None };
        let no_keys = RankSample { host: vec![], gpu: Some(vec![]) };
        for sample in [with_gpu, without, no_keys, RankSample::default()] {
            let values = sample.to_f64s();
            assert_eq!(values.len(), RankSample::LEN);
            let mut back = RankSample::from_f64s(&values);
            // The layout's order is HOST_KEYS', the sample's may differ.
            let order = |pairs: &mut Vec<(&'static str, f64)>| pairs.sort_by(|a, b| a.0.cmp(b.0));
            let mut want = sample.clone();
            order(&mut want.host);
            order(&mut back.host);
            want.gpu.as_mut().map(order);
            back.gpu.as_mut().map(order);
            assert_eq!(back, want);
        }
        let absent = RankSample { host: vec![("cpu", 1.0)], gpu: None }.to_f64s();
        assert_eq!(absent.iter().filter(|v| v.is_nan()).count(), RankSample::LEN - 2);
        assert_eq!(RankSample::from_f64s(&[1.0, 2.0]), RankSample::default());
        assert_eq!(RankSample::from_f64s(&[]), RankSample::default());
    }

    #[test]
    fn the_events_row_numbers_gpus_across_ranks() {
        let samples = vec![
            RankSample { host: vec![("cpu", 10.0), ("memory_percent", 50.5)], gpu: Some(gpu_sample(90.0)) },
            RankSample { host: vec![("cpu", 20.0), ("memory_percent", f64::NAN)], gpu: None },
            RankSample { host: vec![("cpu", 30.0)], gpu: Some(gpu_sample(70.0)) },
        ];
        let row = events_row(&samples);
        assert_eq!(row["system.cpu"], 10);
        assert_eq!(row["system.memory_percent"], 50.5);
        assert_eq!(row["system.rank.0.cpu"], 10);
        assert_eq!(row["system.rank.1.cpu"], 20);
        assert_eq!(row["system.rank.2.cpu"], 30);
        assert!(!row.contains_key("system.rank.1.memory_percent"), "NaN is left out");
        assert_eq!(row["system.gpu.0.gpu"], 90);
        assert_eq!(row["system.gpu.1.gpu"], 70);
        assert_eq!(row["system.gpu.1.smClock"], 1980);
        assert_eq!(row["system.gpu.process.1.memoryAllocatedBytes"], 1024);
        assert!(!row.contains_key("system.gpu.process.1.smClock"));
        assert!(!row.contains_key("system.gpu.2.gpu"));
        let prefixes = ["system.rank.", "system.gpu."];
        let plain: Vec<&String> = row.keys().filter(|k| !prefixes.iter().any(|p| k.starts_with(p))).collect();
        assert_eq!(plain, ["system.cpu", "system.memory_percent"]);
        assert!(events_row(&[]).is_empty());
    }

    #[test]
    fn a_rank_whose_nvml_failed_keeps_the_gpu_indices() {
        let samples = vec![
            RankSample { host: vec![], gpu: Some(gpu_sample(90.0)) },
            RankSample { host: vec![], gpu: Some(vec![]) },
            RankSample { host: vec![], gpu: Some(gpu_sample(70.0)) },
        ];
        let row = events_row(&samples);
        assert_eq!(row["system.gpu.2.gpu"], 70);
        assert!(!row.contains_key("system.gpu.1.gpu"));
    }

    #[test]
    fn json_numbers() {
        assert_eq!(json_number(3.0), Some(Value::from(3)));
        assert_eq!(json_number(2.5), Some(Value::from(2.5)));
        assert_eq!(json_number(f64::NAN), None);
        assert_eq!(json_number(f64::INFINITY), None);
        assert_eq!(json_number(1e300), Some(Value::from(1e300)));
    }
}

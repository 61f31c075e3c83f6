//! The thread that samples this rank every interval, so that reading /proc and NVML never
//! costs the training thread anything but a copy of the newest sample.

use super::gpu::GpuSource;
use super::host::HostSource;
use super::{Failure, RankSample};
use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Shorter intervals are taken as this: a sample reads a dozen files.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// Samples one rank on its own thread; dropping it stops the thread promptly.
pub struct Sampler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    /// The newest sample and how many have been taken.
    latest: Mutex<(u64, RankSample)>,
    stop: Mutex<bool>,
    wake: Condvar,
}

/// Which sources `ALGPT2_FAULT_STATS` makes fail on this rank.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(super) struct FaultPlan {
    pub proc: bool,
    pub nvml: bool,
}

impl FaultPlan {
    /// `spec` as this rank takes it, and the entries it does not know.
    pub(super) fn parse(spec: &str, rank: usize) -> (FaultPlan, Vec<String>) {
        let mut plan = FaultPlan::default();
        let mut unknown = vec![];
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, only) = match entry.split_once(':') {
                Some((name, r)) => match r.trim().parse::<usize>() {
                    Ok(r) => (name.trim(), Some(r)),
                    Err(_) => {
                        unknown.push(entry.to_string());
                        continue;
                    }
                },
                None => (entry, None),
            };
            let mine = only.is_none_or(|r| r == rank);
            match name {
                "proc" => plan.proc |= mine,
                "nvml" => plan.nvml |= mine,
                _ => unknown.push(entry.to_string()),
            }
        }
        (plan, unknown)
    }
}

impl Sampler {
    /// Samples rank `rank` every `interval`, its GPU too when `gpu` (the CUDA ordinal it
    /// trains on) is Some. Never fails: a source that cannot be read is warned about once
    /// and its keys are left out.
    pub fn start(rank: usize, interval: Duration, gpu: Option<usize>) -> Sampler {
        let spec = std::env::var("ALGPT2_FAULT_STATS").unwrap_or_default();
        let (faults, unknown) = FaultPlan::parse(&spec, rank);
        if !unknown.is_empty() {
            tracing::warn!("rank {rank}: ALGPT2_FAULT_STATS={spec:?} has entries that are not proc, nvml or source:rank: {unknown:?}");
        }
        Self::start_with(rank, interval, gpu, faults)
    }

    /// `start` with the fault plan given rather than read from the environment.
    pub(super) fn start_with(rank: usize, interval: Duration, gpu: Option<usize>, faults: FaultPlan) -> Sampler {
        let shared = Arc::new(Shared { latest: Mutex::new((0, RankSample::default())), stop: Mutex::new(false), wake: Condvar::new() });
        let inner = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name(format!("system-metrics-{rank}"))
            .spawn(move || run(&inner, rank, interval.max(MIN_INTERVAL), gpu, faults));
        let thread = spawned.map_err(|e| tracing::warn!("rank {rank}: no system metrics: cannot start their thread: {e}")).ok();
        Sampler { shared, thread }
    }

    /// A copy of the newest sample (empty before the first one); never waits for a
    /// sample being taken.
    pub fn latest(&self) -> RankSample {
        lock(&self.shared.latest).1.clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        *lock(&self.shared.stop) = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A poisoned lock still holds good data here (plain values, written whole).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(shared: &Shared, rank: usize, interval: Duration, gpu: Option<usize>, faults: FaultPlan) {
    let mut warned = Warned { rank, sources: BTreeSet::new() };
    let mut failures = vec![];
    let mut host = HostSource::new(faults.proc);
    let mut gpu = gpu.map(|ordinal| GpuSource::open(ordinal, faults.nvml, &mut failures));
    loop {
        let next = Instant::now() + interval;
        let sample = RankSample { host: host.sample(&mut failures), gpu: gpu.as_mut().map(|g| g.sample(&mut failures)) };
        warned.report(failures.drain(..));
        {
            let mut latest = lock(&shared.latest);
            latest.0 += 1;
            latest.1 = sample;
        }
        // Wait out the interval, waking at once when the sampler is dropped.
        let mut stop = lock(&shared.stop);
        while !*stop {
            let now = Instant::now();
            if now >= next {
                break;
            }
            stop = shared.wake.wait_timeout(stop, next - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        if *stop {
            return;
        }
    }
}

/// One warning per source for the sampler's life: a source that stays broken would
/// otherwise repeat it every interval.
struct Warned {
    rank: usize,
    sources: BTreeSet<&'static str>,
}

impl Warned {
    fn report(&mut self, failures: impl Iterator<Item = Failure>) {
        for f in failures {
            if !self.sources.insert(f.source) {
                continue;
            }
            let rank = self.rank;
            if f.expected {
                tracing::debug!("rank {rank}: system metrics from {} are left out: {}", f.source, f.error);
            } else {
                tracing::warn!("rank {rank}: system metrics from {} are left out (training goes on): {}", f.source, f.error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for_samples(sampler: &Sampler, n: u64) -> RankSample {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (taken, sample) = lock(&sampler.shared.latest).clone();
            if taken >= n || Instant::now() > deadline {
                assert!(taken >= n, "only {taken} samples in 10 s");
                return sample;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_real_sampler_reads_this_machine() {
        let sampler = Sampler::start_with(0, Duration::from_millis(20), None, FaultPlan::default());
        let sample = wait_for_samples(&sampler, 2);
        let get = |k: &str| sample.host.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
        let cpu = get("cpu").expect("cpu after 2 samples");
        assert!(cpu >= 0.0, "{cpu}");
        assert!(get("proc.memory.rssMB").unwrap() > 0.0);
        let memory = get("memory_percent").unwrap();
        assert!(memory > 0.0 && memory <= 100.0, "{memory}");
        assert!(get("disk./.usageGB").unwrap() > 0.0);
        assert!(get("proc.cpu.threads").unwrap() >= 1.0);
        assert!(get("network.sent").is_some() && get("network.recv").is_some());
        assert!(sample.host.iter().all(|(k, v)| super::super::HOST_KEYS.contains(k) && v.is_finite()), "{sample:?}");
        assert_eq!(sample.gpu, None);
        let started = Instant::now();
        drop(sampler);
        assert!(started.elapsed() < Duration::from_millis(100), "drop took {:?}", started.elapsed());
    }

    #[test]
    fn a_failing_source_leaves_its_keys_out_and_sampling_goes_on() {
        let faults = FaultPlan { proc: true, nvml: true };
        let sampler = Sampler::start_with(1, Duration::from_millis(10), Some(0), faults);
        let sample = wait_for_samples(&sampler, 3);
        assert!(sample.host.is_empty(), "{sample:?}");
        // The rank trains on a GPU: it keeps its place among the GPUs, with no keys.
        assert_eq!(sample.gpu, Some(vec![]));
    }

    #[test]
    fn drop_does_not_wait_out_a_long_interval() {
        let sampler = Sampler::start_with(0, Duration::from_secs(3600), None, FaultPlan::default());
        wait_for_samples(&sampler, 1);
        let started = Instant::now();
        drop(sampler);
        assert!(started.elapsed() < Duration::from_millis(100), "drop took {:?}", started.elapsed());
    }

    #[test]
    fn the_fault_plan_names_sources_and_ranks() {
        assert_eq!(FaultPlan::parse("", 0), (FaultPlan::default(), vec![]));
        assert_eq!(FaultPlan::parse("proc, nvml", 3), (FaultPlan { proc: true, nvml: true }, vec![]));
        assert_eq!(FaultPlan::parse("nvml:1,proc:2", 1), (FaultPlan { proc: false, nvml: true }, vec![]));
        assert_eq!(FaultPlan::parse("disk,proc:x", 0), (FaultPlan::default(), vec!["disk".to_string(), "proc:x".to_string()]));
    }

    #[test]
    fn each_failing_source_is_reported_once() {
        let mut warned = Warned { rank: 2, sources: BTreeSet::new() };
        let fail = || vec![Failure::new("/proc/net/dev", "gone"), Failure::new("/proc/net/dev", "gone again")].into_iter();
        warned.report(fail());
        warned.report(fail());
        assert_eq!(warned.sources.len(), 1);
    }
}

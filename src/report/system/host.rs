//! This rank's process and host metrics, read from /proc and statvfs(2) the way the
//! official client's gopsutil calls compute them (see the module doc of `system` for the
//! sources). Parsing is split from reading so that the tests can feed fixed /proc text.

use super::Failure;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The host keys, in the fixed order of the gathered layout (units in `system`'s doc).
pub const HOST_KEYS: [&str; 13] = [
    "cpu", "proc.cpu.threads", "proc.memory.rssMB", "proc.memory.percent", "proc.memory.availableMB", "memory_percent",
    "disk./.usagePercent", "disk./.usageGB", "disk.in", "disk.out", "network.sent", "network.recv", "network.tcpRetransmits",
];

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;
/// /proc/diskstats counts 512-byte sectors whatever the device's sector size.
const SECTOR_BYTES: u64 = 512;

/// Reads the host metrics; keeps what the official client fixes at start (the baselines of
/// the network and disk counters, the CPU capacity, the cgroup limits).
pub(super) struct HostSource {
    /// `ALGPT2_FAULT_STATS=proc`: every read fails, as an unreadable /proc would.
    fail: bool,
    /// Read at the first sample; best-effort and silent, as the official client's.
    fixed: Option<Fixed>,
    /// Bytes (received, sent) at the first good read of /proc/net/dev.
    net_start: Option<(u64, u64)>,
    /// TCP segments retransmitted at the first good read of /proc/net/snmp.
    retransmits_start: Option<u64>,
    /// The process's CPU ticks (user + system) at the previous sample, and when.
    cpu_before: Option<(u64, std::time::Instant)>,
    /// The watched block devices and their bytes (read, written) at the first good read.
    disk_start: Option<BTreeMap<String, (u64, u64)>>,
}

struct Fixed {
    /// CPUs the process may use: the cgroup's limit, else the physical cores (`cpu` is
    /// divided by it); None: `cpu` is left undivided, as the official client does.
    cpu_capacity: Option<f64>,
    /// The cgroup v2 memory.current to read beside its finite memory.max.
    cgroup_memory: Option<(PathBuf, u64)>,
    /// Clock ticks per second, the unit of /proc/self/stat's times.
    ticks_per_second: f64,
}

impl HostSource {
    pub(super) fn new(fail: bool) -> HostSource {
        HostSource { fail, fixed: None, net_start: None, retransmits_start: None, cpu_before: None, disk_start: None }
    }

    /// One reading of every host key; a source that fails adds to `failures` and its keys
    /// are left out.
    pub(super) fn sample(&mut self, failures: &mut Vec<Failure>) -> Vec<(&'static str, f64)> {
        if self.fixed.is_none() {
            self.fixed = Some(self.read_fixed());
        }
        let mut out = vec![];
        let mut note = |result: Result<(), Failure>| {
            if let Err(f) = result {
                failures.push(f);
            }
        };
        let denominator = self.memory(&mut out, &mut note);
        note(self.process(denominator, &mut out));
        note(self.cpu(&mut out));
        note(self.disk_usage(&mut out));
        note(self.disk_io(&mut out));
        note(self.network(&mut out));
        out
    }

    fn read(&self, path: &'static str) -> Result<String, Failure> {
        if self.fail {
            return Err(Failure::new(path, "injected by ALGPT2_FAULT_STATS=proc"));
        }
        std::fs::read_to_string(path).map_err(|e| Failure::new(path, format!("cannot read {path}: {e}")))
    }

    /// memory_percent and proc.memory.availableMB; returns the memory that
    /// proc.memory.percent is a share of (the cgroup limit, else the host's total).
    fn memory(&self, out: &mut Vec<(&'static str, f64)>, note: &mut impl FnMut(Result<(), Failure>)) -> Option<u64> {
        let fixed = self.fixed.as_ref()?;
        if let Some((current_file, limit)) = &fixed.cgroup_memory {
            // As the official client: a limited cgroup's use against its limit, not the host's.
            if let Some(current) = read_u64(current_file) {
                out.push(("memory_percent", current as f64 / *limit as f64 * 100.0));
                out.push(("proc.memory.availableMB", limit.saturating_sub(current) as f64 / MIB));
                return Some(*limit);
            }
        }
        let text = match self.read("/proc/meminfo") {
            Ok(text) => text,
            Err(f) => {
                note(Err(f));
                return None;
            }
        };
        let Some(mem) = parse_meminfo(&text) else {
            note(Err(Failure::new("/proc/meminfo", "no MemTotal line, or MemTotal is 0")));
            return None;
        };
        out.push(("memory_percent", mem.total.saturating_sub(mem.available) as f64 / mem.total as f64 * 100.0));
        out.push(("proc.memory.availableMB", mem.available as f64 / MIB));
        Some(mem.total)
    }

    /// proc.memory.rssMB, proc.memory.percent, proc.cpu.threads.
    fn process(&self, denominator: Option<u64>, out: &mut Vec<(&'static str, f64)>) -> Result<(), Failure> {
        let text = self.read("/proc/self/status")?;
        let status = parse_status(&text);
        if let Some(rss) = status.rss_bytes {
            out.push(("proc.memory.rssMB", rss as f64 / MIB));
            if let Some(total) = denominator.filter(|&t| t > 0) {
                out.push(("proc.memory.percent", rss as f64 / total as f64 * 100.0));
            }
        }
        if let Some(threads) = status.threads {
            out.push(("proc.cpu.threads", threads as f64));
        }
        if status.rss_bytes.is_none() || status.threads.is_none() {
            return Err(Failure::new("/proc/self/status", "no VmRSS or Threads line"));
        }
        Ok(())
    }

    /// cpu: as wandb 0.31's system monitor (wandb-symon, xpu/src/host.rs), the process's
    /// CPU time since the previous sample over the time between them, in percent, divided
    /// by the CPU capacity; absent from the first sample.
    fn cpu(&mut self, out: &mut Vec<(&'static str, f64)>) -> Result<(), Failure> {
        let Some(fixed) = &self.fixed else { return Ok(()) };
        let stat = self.read("/proc/self/stat")?;
        let stat = parse_stat(&stat).ok_or_else(|| Failure::new("/proc/self/stat", "unexpected format"))?;
        let (ticks, now) = (stat.utime + stat.stime, std::time::Instant::now());
        if let Some((before, at)) = self.cpu_before {
            let percent = interval_cpu_percent(ticks.saturating_sub(before), now.duration_since(at).as_secs_f64(), fixed.ticks_per_second);
            out.push(("cpu", fixed.cpu_capacity.map_or(percent, |c| percent / c)));
        }
        self.cpu_before = Some((ticks, now));
        Ok(())
    }

    /// disk./.usagePercent and disk./.usageGB, of the file system that holds "/".
    fn disk_usage(&self, out: &mut Vec<(&'static str, f64)>) -> Result<(), Failure> {
        const SOURCE: &str = "statvfs(\"/\")";
        if self.fail {
            return Err(Failure::new(SOURCE, "injected by ALGPT2_FAULT_STATS=proc"));
        }
        let root = root_file_system().map_err(|e| Failure::new(SOURCE, e.to_string()))?;
        let (percent, used) = disk_usage(root.blocks, root.free, root.available, root.block_bytes);
        out.push(("disk./.usagePercent", percent));
        out.push(("disk./.usageGB", used as f64 / GIB));
        Ok(())
    }

    /// disk.in and disk.out: MB read and written since the first sample, summed over the
    /// block devices the official client watches for "/".
    fn disk_io(&mut self, out: &mut Vec<(&'static str, f64)>) -> Result<(), Failure> {
        let stats = parse_diskstats(&self.read("/proc/diskstats")?);
        if self.disk_start.is_none() {
            let mountinfo = self.read("/proc/self/mountinfo").unwrap_or_default();
            let candidates = root_devices(&mountinfo).iter().map(|d| device_name(d)).collect();
            let names = watched_devices(candidates, &stats, |name| Path::new("/sys/block").join(name).exists());
            let start = stats.iter().filter(|(name, _)| names.contains(name)).map(|(n, c)| (n.clone(), *c)).collect();
            self.disk_start = Some(start);
        }
        // No device to watch: the keys are left out, as the official client's.
        let Some(start) = self.disk_start.as_ref().filter(|s| !s.is_empty()) else { return Ok(()) };
        let (mut read, mut written) = (0u64, 0u64);
        for (name, (r0, w0)) in start {
            if let Some((_, (r, w))) = stats.iter().find(|(n, _)| n == name) {
                read += r.saturating_sub(*r0);
                written += w.saturating_sub(*w0);
            }
        }
        out.push(("disk.in", read as f64 / MIB));
        out.push(("disk.out", written as f64 / MIB));
        Ok(())
    }

    /// network.sent and network.recv: bytes since the first sample, over the interfaces
    /// other than loopback (as wandb 0.31); network.tcpRetransmits: TCP segments sent
    /// again since the first sample (a lossy link between nodes shows here).
    fn network(&mut self, out: &mut Vec<(&'static str, f64)>) -> Result<(), Failure> {
        let (recv, sent) = parse_net_dev(&self.read("/proc/net/dev")?);
        let (recv0, sent0) = *self.net_start.get_or_insert((recv, sent));
        out.push(("network.sent", sent as f64 - sent0 as f64));
        out.push(("network.recv", recv as f64 - recv0 as f64));
        if let Some(retransmits) = self.read("/proc/net/snmp").ok().as_deref().and_then(parse_tcp_retransmits) {
            let start = *self.retransmits_start.get_or_insert(retransmits);
            out.push(("network.tcpRetransmits", retransmits.saturating_sub(start) as f64));
        }
        Ok(())
    }

    fn read_fixed(&self) -> Fixed {
        let ticks = if self.fail { 0 } else { unsafe { libc::sysconf(libc::_SC_CLK_TCK) } };
        let ticks_per_second = if ticks > 0 { ticks as f64 } else { 100.0 };
        let cpuinfo = self.read("/proc/cpuinfo").unwrap_or_default();
        let physical = if self.fail { None } else { physical_cores_from_sysfs() }.or_else(|| physical_cores_from_cpuinfo(&cpuinfo));
        let cgroup = if self.fail { CgroupLimits::default() } else { CgroupLimits::detect(logical_cpus(&cpuinfo)) };
        let cpu_capacity = Some(cgroup.cpus).filter(|&c| c > 0.0).or(physical.map(|p| p as f64)).filter(|&c| c > 0.0);
        Fixed { cpu_capacity, cgroup_memory: cgroup.memory, ticks_per_second }
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    parse_limit(&std::fs::read_to_string(path).ok()?)
}

/// /proc/meminfo's numbers in bytes.
#[derive(Debug, PartialEq)]
pub(super) struct MemInfo {
    pub total: u64,
    pub available: u64,
}

/// MemTotal and MemAvailable (on kernels before 3.14, which lack it: free + cached +
/// reclaimable slab, gopsutil's fallback); None without a positive MemTotal.
pub(super) fn parse_meminfo(text: &str) -> Option<MemInfo> {
    let kb = |key: &str| {
        text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    let total = kb("MemTotal").filter(|&t| t > 0)? * 1024;
    let available = match kb("MemAvailable") {
        Some(a) => a * 1024,
        None => (kb("MemFree").unwrap_or(0) + kb("Cached").unwrap_or(0) + kb("SReclaimable").unwrap_or(0)) * 1024,
    };
    Some(MemInfo { total, available: available.min(total) })
}

/// What we take from /proc/self/status.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Status {
    pub rss_bytes: Option<u64>,
    pub threads: Option<u64>,
    /// How many CPUs Cpus_allowed_list lets this process run on.
    pub cpus_allowed: Option<usize>,
}

pub(super) fn parse_status(text: &str) -> Status {
    let field = |key: &str| text.lines().find_map(|l| Some(l.strip_prefix(key)?.strip_prefix(':')?.trim().to_string()));
    Status {
        rss_bytes: field("VmRSS").and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok()).map(|kb| kb * 1024),
        threads: field("Threads").and_then(|v| v.parse().ok()),
        cpus_allowed: field("Cpus_allowed_list").and_then(|v| count_cpu_list(&v)),
    }
}

/// The CPUs of a list such as "0-3,8,10-11" (6 here); None if it does not parse.
pub(super) fn count_cpu_list(list: &str) -> Option<usize> {
    let mut n = 0;
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.trim().parse::<usize>().ok()?.checked_sub(a.trim().parse::<usize>().ok()?)? + 1,
            None => part.parse::<usize>().map(|_| 1).ok()?,
        };
    }
    Some(n)
}

/// This process's CPU times and start, in clock ticks, from /proc/self/stat.
#[derive(Debug, PartialEq)]
pub(super) struct Stat {
    pub utime: u64,
    pub stime: u64,
}

pub(super) fn parse_stat(text: &str) -> Option<Stat> {
    // The command name (field 2) is in parentheses and may hold spaces and ')': the
    // fields we need are counted from after the last ')'. There field 3 is index 0.
    let rest: Vec<&str> = text.get(text.rfind(')')? + 1..)?.split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
    Some(Stat { utime: field(14)?, stime: field(15)? })
}

/// 100 × CPU seconds / seconds elapsed: the percent of one core the process used. 0 over
/// no measurable time.
pub(super) fn interval_cpu_percent(ticks: u64, seconds: f64, ticks_per_second: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    100.0 * (ticks as f64 / ticks_per_second) / seconds
}

/// `RetransSegs` of the `Tcp:` lines of /proc/net/snmp (a header line, then values).
pub(super) fn parse_tcp_retransmits(text: &str) -> Option<u64> {
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let column = names.split_whitespace().position(|n| n == "RetransSegs")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

/// Bytes (received, sent) summed over the interfaces of /proc/net/dev but loopback.
pub(super) fn parse_net_dev(text: &str) -> (u64, u64) {
    let (mut recv, mut sent) = (0, 0);
    for line in text.lines().skip(2) {
        let Some((name, stats)) = line.rsplit_once(':') else { continue };
        let fields: Vec<u64> = stats.split_whitespace().filter_map(|f| f.parse().ok()).collect();
        if name.trim().is_empty() || name.trim() == "lo" || fields.len() < 13 {
            continue;
        }
        recv += fields[0];
        sent += fields[8];
    }
    (recv, sent)
}

/// Bytes (read, written) of every device of /proc/diskstats, by name.
pub(super) fn parse_diskstats(text: &str) -> Vec<(String, (u64, u64))> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 14 {
                return None;
            }
            let sectors = |i: usize| f[i].parse::<u64>().ok();
            Some((f[2].to_string(), (sectors(5)? * SECTOR_BYTES, sectors(9)? * SECTOR_BYTES)))
        })
        .collect()
}

/// The sources of the mounts that hold "/", from mountinfo: the root mount's device when
/// it is one; otherwise (an overlay root, as in a container) every mounted device, as the
/// official client adopts every partition it sees then.
pub(super) fn root_devices(mountinfo: &str) -> Vec<String> {
    let mounts: Vec<(&str, &str)> = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            let source = right.split_whitespace().nth(1)?;
            Some((mount_point, source))
        })
        .collect();
    let root: Vec<String> = mounts.iter().filter(|(m, s)| *m == "/" && s.starts_with("/dev/")).map(|(_, s)| s.to_string()).collect();
    if !root.is_empty() {
        return root;
    }
    let mut all: Vec<String> = mounts.iter().filter(|(_, s)| s.starts_with("/dev/")).map(|(_, s)| s.to_string()).collect();
    all.sort();
    all.dedup();
    all
}

/// A device's name in /proc/diskstats: the base name of its node, through links such as
/// /dev/mapper/vg-root -> ../dm-0.
fn device_name(source: &str) -> String {
    let path = std::fs::canonicalize(source).unwrap_or_else(|_| PathBuf::from(source));
    path.file_name().map_or_else(|| source.to_string(), |n| n.to_string_lossy().into_owned())
}

fn pseudo_device(name: &str) -> bool {
    name.starts_with("loop") || name.starts_with("ram") || name.starts_with("zram")
}

/// The candidates that /proc/diskstats knows; if none, every real whole disk (whole disks
/// only, unlike the official client, because we add them up and a partition's bytes are
/// also its disk's).
pub(super) fn watched_devices(
    candidates: Vec<String>,
    stats: &[(String, (u64, u64))],
    is_whole_disk: impl Fn(&str) -> bool,
) -> Vec<String> {
    let known = |n: &String| stats.iter().any(|(s, _)| s == n);
    let mut found: Vec<String> = candidates.into_iter().filter(|c| !pseudo_device(c) && known(c)).collect();
    if found.is_empty() {
        found = stats.iter().map(|(n, _)| n.clone()).filter(|n| !pseudo_device(n) && is_whole_disk(n)).collect();
    }
    found.sort();
    found.dedup();
    found
}

/// (percent used, bytes used) as gopsutil's disk.Usage: used = blocks − free, and the
/// percent is of used + available to unprivileged users (not of the total).
pub(super) fn disk_usage(blocks: u64, free: u64, available: u64, block_bytes: u64) -> (f64, u64) {
    let used = blocks.saturating_sub(free).saturating_mul(block_bytes);
    let avail = available.saturating_mul(block_bytes);
    let percent = if used + avail == 0 { 0.0 } else { used as f64 / (used + avail) as f64 * 100.0 };
    (percent, used)
}

/// The file system that holds "/", in blocks of `block_bytes`.
struct RootFileSystem {
    blocks: u64,
    free: u64,
    available: u64,
    block_bytes: u64,
}

fn root_file_system() -> std::io::Result<RootFileSystem> {
    // SAFETY: statvfs only writes the struct it is given; the path is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c"/".as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let block_bytes = if s.f_frsize > 0 { s.f_frsize as u64 } else { s.f_bsize as u64 };
    Ok(RootFileSystem { blocks: s.f_blocks as u64, free: s.f_bfree as u64, available: s.f_bavail as u64, block_bytes })
}

/// Facts of this host that do not change during a run (the W&B metadata): physical
/// cores, total memory in bytes, and the size and use of "/" in bytes.
pub fn physical_cores() -> Option<usize> {
    physical_cores_from_sysfs().or_else(|| physical_cores_from_cpuinfo(&std::fs::read_to_string("/proc/cpuinfo").ok()?))
}

pub fn memory_total_bytes() -> Option<u64> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?).map(|m| m.total)
}

pub fn root_disk_bytes() -> Option<(u64, u64)> {
    let root = root_file_system().ok()?;
    let (_, used) = disk_usage(root.blocks, root.free, root.available, root.block_bytes);
    Some((root.blocks.saturating_mul(root.block_bytes), used))
}

/// Physical cores: the distinct core_cpus_list (or, on older kernels,
/// thread_siblings_list) of the CPUs in sysfs.
fn physical_cores_from_sysfs() -> Option<usize> {
    let cpus: Vec<PathBuf> = std::fs::read_dir("/sys/devices/system/cpu")
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("cpu")).is_some_and(|n| n.parse::<u32>().is_ok()))
        .map(|e| e.path())
        .collect();
    for file in ["core_cpus_list", "thread_siblings_list"] {
        let mut lists: Vec<String> =
            cpus.iter().filter_map(|c| std::fs::read_to_string(c.join("topology").join(file)).ok()).map(|s| s.trim().to_string()).collect();
        lists.sort();
        lists.dedup();
        if !lists.is_empty() {
            return Some(lists.len());
        }
    }
    None
}

/// Physical cores from /proc/cpuinfo: distinct (physical id, core id) pairs.
pub(super) fn physical_cores_from_cpuinfo(text: &str) -> Option<usize> {
    let mut cores = std::collections::BTreeSet::new();
    let (mut physical, mut core) = (None, None);
    for line in text.lines().chain([""]) {
        let value = |key: &str| line.strip_prefix(key).and_then(|r| r.trim_start().strip_prefix(':')).map(|v| v.trim().to_string());
        if line.trim().is_empty() {
            if let (Some(p), Some(c)) = (physical.take(), core.take()) {
                cores.insert((p, c));
            }
        } else if let Some(v) = value("physical id") {
            physical = Some(v);
        } else if let Some(v) = value("core id") {
            core = Some(v);
        }
    }
    Some(cores.len()).filter(|&n| n > 0)
}

/// Logical CPUs: the "processor" entries of /proc/cpuinfo (0 if unknown).
fn logical_cpus(cpuinfo: &str) -> usize {
    cpuinfo.lines().filter(|l| l.strip_prefix("processor").is_some_and(|r| r.trim_start().starts_with(':'))).count()
}

/// The cgroup v2 limits the official client divides by (core/internal/monitor/cgroup.go):
/// of the leaf cgroup only, read once at start.
#[derive(Debug, Default, PartialEq)]
struct CgroupLimits {
    /// memory.current's path and the finite memory.max beside it.
    memory: Option<(PathBuf, u64)>,
    /// The binding CPU limit: cpu.max's quota/period or the CPUs of Cpus_allowed_list
    /// when fewer than the host's; 0 when neither applies.
    cpus: f64,
}

impl CgroupLimits {
    fn detect(logical_cpus: usize) -> CgroupLimits {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let allowed = parse_status(&read("/proc/self/status")).cpus_allowed.unwrap_or(0);
        let affinity = if allowed > 0 && (logical_cpus == 0 || allowed < logical_cpus) { allowed as f64 } else { 0.0 };
        let Some(dir) = cgroup_dir(&read("/proc/self/cgroup"), &read("/proc/self/mountinfo")) else {
            return CgroupLimits::default();
        };
        let memory = read_u64(&dir.join("memory.max")).map(|limit| (dir.join("memory.current"), limit));
        let quota = std::fs::read_to_string(dir.join("cpu.max")).ok().and_then(|t| parse_cpu_max(&t)).unwrap_or(0.0);
        let cpus = min_positive(quota, affinity);
        if memory.is_none() && cpus <= 0.0 {
            return CgroupLimits::default();
        }
        CgroupLimits { memory, cpus }
    }
}

/// The directory of this process's cgroup v2 (the "0::" line of /proc/self/cgroup) under
/// the first cgroup2 mount, the mount's root stripped (a container sees a sub-tree).
pub(super) fn cgroup_dir(cgroup: &str, mountinfo: &str) -> Option<PathBuf> {
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let (root, mount_point) = mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let f: Vec<&str> = left.split_whitespace().collect();
        Some((*f.get(3)?, *f.get(4)?))
    })?;
    let root = root.trim_end_matches('/');
    let rel = if root.is_empty() {
        path
    } else if path == root {
        "/"
    } else {
        path.strip_prefix(root).filter(|r| r.starts_with('/')).unwrap_or(path)
    };
    Some(Path::new(mount_point).join(rel.trim_start_matches('/')))
}

/// A memory.max-like file: None for "max" (no limit), 0, or text that is not a number.
pub(super) fn parse_limit(text: &str) -> Option<u64> {
    text.trim().parse::<u64>().ok().filter(|&v| v > 0)
}

/// cpu.max's "$quota $period" as CPUs; None for "max" (no limit) or a bad file.
pub(super) fn parse_cpu_max(text: &str) -> Option<f64> {
    let f: Vec<&str> = text.split_whitespace().collect();
    let [quota, period] = f[..] else { return None };
    let (quota, period) = (quota.parse::<i64>().ok()?, period.parse::<i64>().ok()?);
    (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
}

/// The smaller positive of two limits, a value ≤ 0 meaning "no limit from that source".
fn min_positive(a: f64, b: f64) -> f64 {
    match (a > 0.0, b > 0.0) {
        (true, true) => a.min(b),
        (true, false) => a,
        (false, true) => b,
        (false, false) => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // Field 2 with a space and a ')' of its own; utime 14 = 250, stime 15 = 50,
        // threads 20 = 7.
        let text = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194304 1500 0 0 0 250 50 0 0 20 0 7 0 1000 123456789 2000 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0";
        assert_eq!(parse_stat(text), Some(Stat { utime: 250, stime: 50 }));
        assert_eq!(parse_stat("4242 (cut short) S 1 2"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
        // 300 ticks (3 s of CPU) in 15 s: 20 % of one core.
        let percent = interval_cpu_percent(300, 15.0, 100.0);
        assert!((percent - 20.0).abs() < 1e-9, "{percent}");
        assert_eq!(interval_cpu_percent(1, 0.0, 100.0), 0.0);
    }

    #[test]
    fn snmp_gives_tcp_retransmits() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm RtoMin ActiveOpens RetransSegs InErrs\nTcp: 1 200 33 17 0\n";
        assert_eq!(parse_tcp_retransmits(text), Some(17));
        assert_eq!(parse_tcp_retransmits("Ip: 1\n"), None);
    }

    #[test]
    fn meminfo_gives_total_and_available_in_bytes() {
        let text = "MemTotal:       16000000 kB\nMemFree:         2000000 kB\nMemAvailable:    4000000 kB\nCached: 100 kB\n";
        assert_eq!(parse_meminfo(text), Some(MemInfo { total: 16_000_000 * 1024, available: 4_000_000 * 1024 }));
        // A kernel without MemAvailable: free + cached + reclaimable slab.
        let old = "MemTotal: 1000 kB\nMemFree: 100 kB\nCached: 200 kB\nSReclaimable: 50 kB\n";
        assert_eq!(parse_meminfo(old), Some(MemInfo { total: 1000 * 1024, available: 350 * 1024 }));
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: 0 kB\n"), None);
    }

    #[test]
    fn status_gives_rss_threads_and_allowed_cpus() {
        let text =
            "Name:\talgpt2-ddp\nVmHWM:\t  9000 kB\nVmRSS:\t    5120 kB\nThreads:\t12\nCpus_allowed:\tff\nCpus_allowed_list:\t0-3,8,10-11\n";
        assert_eq!(parse_status(text), Status { rss_bytes: Some(5120 * 1024), threads: Some(12), cpus_allowed: Some(7) });
        assert_eq!(parse_status("Name: x\n"), Status::default());
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("a-b"), None);
    }

    #[test]
    fn net_dev_sums_every_interface_but_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
            face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
            lo:  1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0\n  \
            eth0: 50000     300    0    0    0     0          0         0    7000      70    0    0    0     0       0          0\n  \
            bad: 1 2 3\n";
        assert_eq!(parse_net_dev(text), (50_000, 7_000));
        assert_eq!(parse_net_dev(""), (0, 0));
    }

    #[test]
    fn diskstats_and_the_watched_devices() {
        let text = "   7       0 loop0 10 0 80 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n   \
                     8       0 sda 100 0 2048 50 10 0 4096 20 0 60 70 0 0 0 0 0 0\n   \
                     8       1 sda1 90 0 1024 40 9 0 2048 10 0 50 60 0 0 0 0 0 0\n   \
                     1       0 short 1 2 3\n";
        let stats = parse_diskstats(text);
        assert_eq!(
            stats,
            vec![
                ("loop0".to_string(), (80 * 512, 0)),
                ("sda".to_string(), (2048 * 512, 4096 * 512)),
                ("sda1".to_string(), (1024 * 512, 2048 * 512)),
            ]
        );
        let whole = |n: &str| n == "sda" || n == "loop0";
        assert_eq!(watched_devices(vec!["sda1".into()], &stats, whole), vec!["sda1".to_string()]);
        // Unknown to diskstats (an overlay's "root", say): the real whole disks.
        assert_eq!(watched_devices(vec!["root".into()], &stats, whole), vec!["sda".to_string()]);
    }

    #[test]
    fn the_devices_that_hold_root() {
        let host = "22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n\
                    23 22 259:1 / /boot rw - vfat /dev/nvme0n1p1 rw\n\
                    24 22 0:21 / /proc rw - proc proc rw\n";
        assert_eq!(root_devices(host), vec!["/dev/nvme0n1p2".to_string()]);
        let container = "500 400 0:50 / / rw - overlay overlay rw,lowerdir=/x\n\
                         501 500 8:1 /var/lib/docker/x/hosts /etc/hosts rw - ext4 /dev/sda1 rw\n\
                         502 500 8:1 /var/lib/docker/x/hostname /etc/hostname rw - ext4 /dev/sda1 rw\n";
        assert_eq!(root_devices(container), vec!["/dev/sda1".to_string()]);
        assert!(root_devices("").is_empty());
    }

    #[test]
    fn disk_usage_is_a_share_of_used_plus_available() {
        // 1000 blocks of 4 KiB, 400 free of which 300 available: 600 used of 900.
        let (percent, used) = disk_usage(1000, 400, 300, 4096);
        assert_eq!(used, 600 * 4096);
        assert!((percent - 600.0 / 900.0 * 100.0).abs() < 1e-9);
        assert_eq!(disk_usage(0, 0, 0, 4096), (0.0, 0));
    }

    #[test]
    fn cpuinfo_counts_physical_and_logical_cpus() {
        let text = "processor\t: 0\nphysical id\t: 0\ncore id\t\t: 0\n\nprocessor\t: 1\nphysical id\t: 0\ncore id\t\t: 0\n\n\
                    processor\t: 2\nphysical id\t: 0\ncore id\t\t: 1\n\nprocessor\t: 3\nphysical id\t: 0\ncore id\t\t: 1\n";
        assert_eq!(physical_cores_from_cpuinfo(text), Some(2));
        assert_eq!(logical_cpus(text), 4);
        assert_eq!(physical_cores_from_cpuinfo("processor : 0\n"), None);
    }

    #[test]
    fn cgroup_v2_directory_and_limits() {
        let mountinfo = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup_dir("0::/user.slice/job1\n", mountinfo), Some(PathBuf::from("/sys/fs/cgroup/user.slice/job1")));
        // A container that sees its own sub-tree mounted at /sys/fs/cgroup.
        let container = "40 35 0:26 /kubepods/pod1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup_dir("0::/kubepods/pod1/c2\n", container), Some(PathBuf::from("/sys/fs/cgroup/c2")));
        assert_eq!(cgroup_dir("0::/kubepods/pod1\n", container), Some(PathBuf::from("/sys/fs/cgroup/")));
        // cgroup v1 only: no "0::" line, or no cgroup2 mount.
        assert_eq!(cgroup_dir("4:memory:/x\n", mountinfo), None);
        assert_eq!(cgroup_dir("0::/\n", "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"), None);
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("1073741824\n"), Some(1 << 30));
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2.0));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(min_positive(0.0, 3.0), 3.0);
        assert_eq!(min_positive(2.0, 3.0), 2.0);
        assert_eq!(min_positive(0.0, 0.0), 0.0);
    }

    #[test]
    fn an_injected_fault_leaves_every_host_key_out() {
        let mut source = HostSource::new(true);
        let mut failures = vec![];
        assert!(source.sample(&mut failures).is_empty());
        let sources: Vec<&str> = failures.iter().map(|f| f.source).collect();
        assert!(sources.contains(&"/proc/self/status") && sources.contains(&"/proc/net/dev"), "{sources:?}");
        assert!(failures.iter().all(|f| f.error.contains("ALGPT2_FAULT_STATS")), "{failures:?}");
    }
}

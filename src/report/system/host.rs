//! This rank's process and host metrics, computed as the official client's system monitor
//! computes them (see the module doc of `system` for the sources): sysinfo gives the host's
//! memory, procfs the /proc counters sysinfo lacks, rustix the statvfs(2) of "/". What is
//! still read by hand says why.

use super::cgroup::{read_limit, CgroupLimits};
use super::Failure;
use procfs::net::DeviceStatus;
use procfs::process::{MountInfo, Process};
use procfs::{Current, DiskStat};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use sysinfo::{MemoryRefreshKind, System};

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
    /// Read when the source is made, just before its first sample; best-effort and silent,
    /// as the official client's.
    fixed: Fixed,
    /// Bytes (received, sent) at the first good read of /proc/net/dev.
    net_start: Option<(u64, u64)>,
    /// TCP segments retransmitted at the first good read of /proc/net/snmp.
    retransmits_start: Option<u64>,
    /// The process's CPU ticks (user + system) at the previous sample, and when.
    cpu_before: Option<(u64, Instant)>,
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

impl Fixed {
    fn read(fail: bool) -> Fixed {
        if fail {
            return Fixed { cpu_capacity: None, cgroup_memory: None, ticks_per_second: 100.0 };
        }
        let ticks = procfs::ticks_per_second();
        let logical = procfs::CpuInfo::current().map_or(0, |c| c.num_cores());
        let cgroup = CgroupLimits::detect(logical);
        let cpu_capacity = Some(cgroup.cpus).filter(|&c| c > 0.0).or(physical_cores().map(|p| p as f64)).filter(|&c| c > 0.0);
        Fixed { cpu_capacity, cgroup_memory: cgroup.memory, ticks_per_second: if ticks > 0 { ticks as f64 } else { 100.0 } }
    }
}

impl HostSource {
    pub(super) fn new(fail: bool) -> HostSource {
        HostSource { fail, fixed: Fixed::read(fail), net_start: None, retransmits_start: None, cpu_before: None, disk_start: None }
    }

    /// One reading of every host key; a source that fails adds to `failures` and its keys
    /// are left out.
    pub(super) fn sample(&mut self, failures: &mut Vec<Failure>) -> Vec<(&'static str, f64)> {
        let mut out = vec![];
        let denominator = self.memory(&mut out).map_err(|f| failures.push(f)).ok();
        let results = [
            self.process(denominator, &mut out),
            self.cpu(&mut out),
            self.disk_usage(&mut out),
            self.disk_io(&mut out),
            self.network(&mut out),
        ];
        failures.extend(results.into_iter().filter_map(Result::err));
        out
    }

    /// `read()`, its error worded as a failure of `source`; fails at once when injected.
    fn read<T, E: std::fmt::Display>(&self, source: &'static str, read: impl FnOnce() -> Result<T, E>) -> Result<T, Failure> {
        if self.fail {
            return Err(Failure::new(source, "injected by ALGPT2_FAULT_STATS=proc"));
        }
        read().map_err(|e| Failure::new(source, format!("cannot read {source}: {e}")))
    }

    /// memory_percent and proc.memory.availableMB; returns the memory that
    /// proc.memory.percent is a share of (the cgroup limit, else the host's total).
    fn memory(&self, out: &mut Vec<(&'static str, f64)>) -> Result<u64, Failure> {
        if let Some((current_file, limit)) = &self.fixed.cgroup_memory {
            // As the official client: a limited cgroup's use against its limit, not the host's.
            if let Some(current) = read_limit(current_file) {
                out.push(("memory_percent", current as f64 / *limit as f64 * 100.0));
                out.push(("proc.memory.availableMB", limit.saturating_sub(current) as f64 / MIB));
                return Ok(*limit);
            }
        }
        let (total, available) = self.read("/proc/meminfo", host_memory)?;
        out.push(("memory_percent", total.saturating_sub(available) as f64 / total as f64 * 100.0));
        out.push(("proc.memory.availableMB", available as f64 / MIB));
        Ok(total)
    }

    /// proc.memory.rssMB, proc.memory.percent, proc.cpu.threads.
    fn process(&self, denominator: Option<u64>, out: &mut Vec<(&'static str, f64)>) -> Result<(), Failure> {
        let status = self.read("/proc/self/status", || Process::myself()?.status())?;
        let rss = status.vmrss.map(|kb| kb * 1024);
        if let Some(rss) = rss {
            out.push(("proc.memory.rssMB", rss as f64 / MIB));
            if let Some(total) = denominator.filter(|&t| t > 0) {
                out.push(("proc.memory.percent", rss as f64 / total as f64 * 100.0));
            }
        }
        out.push(("proc.cpu.threads", status.threads as f64));
        rss.map(|_| ()).ok_or_else(|| Failure::new("/proc/self/status", "no VmRSS line"))
    }

    /// cpu: as wandb 0.31's system monitor (wandb-symon, xpu/src/host.rs), the process's
    /// CPU time since the previous sample over the time between them, in percent, divided
    /// by the CPU capacity; absent from the first sample.
    fn cpu(&mut self, out: &mut Vec<(&'static str, f64)>) -> Result<(), Failure> {
        let stat = self.read("/proc/self/stat", || Process::myself()?.stat())?;
        let (ticks, now) = (stat.utime + stat.stime, Instant::now());
        if let Some((before, at)) = self.cpu_before {
            let seconds = now.duration_since(at).as_secs_f64();
            let percent = interval_cpu_percent(ticks.saturating_sub(before), seconds, self.fixed.ticks_per_second);
            out.push(("cpu", self.fixed.cpu_capacity.map_or(percent, |c| percent / c)));
        }
        self.cpu_before = Some((ticks, now));
        Ok(())
    }

    /// disk./.usagePercent and disk./.usageGB, of the file system that holds "/".
    fn disk_usage(&self, out: &mut Vec<(&'static str, f64)>) -> Result<(), Failure> {
        let root = self.read("statvfs(\"/\")", root_usage)?;
        out.push(("disk./.usagePercent", root.percent));
        out.push(("disk./.usageGB", root.used as f64 / GIB));
        Ok(())
    }

    /// disk.in and disk.out: MB read and written since the first sample, summed over the
    /// block devices the official client watches for "/".
    fn disk_io(&mut self, out: &mut Vec<(&'static str, f64)>) -> Result<(), Failure> {
        let stats = disk_bytes(self.read("/proc/diskstats", procfs::diskstats)?);
        if self.disk_start.is_none() {
            let mounts = Process::myself().and_then(|p| p.mountinfo()).map(|m| m.0).unwrap_or_default();
            let candidates = root_devices(&mounts).iter().map(|d| device_name(d)).collect();
            let names = watched_devices(candidates, &stats, |name| Path::new("/sys/block").join(name).exists());
            self.disk_start = Some(stats.iter().filter(|(name, _)| names.contains(name)).cloned().collect());
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
        let (recv, sent) = bytes_but_loopback(self.read("/proc/net/dev", procfs::net::dev_status)?.values());
        let (recv0, sent0) = *self.net_start.get_or_insert((recv, sent));
        out.push(("network.sent", sent as f64 - sent0 as f64));
        out.push(("network.recv", recv as f64 - recv0 as f64));
        if let Ok(retransmits) = procfs::net::snmp().map(|s| s.tcp_retrans_segs) {
            let start = *self.retransmits_start.get_or_insert(retransmits);
            out.push(("network.tcpRetransmits", retransmits.saturating_sub(start) as f64));
        }
        Ok(())
    }
}

/// The host's memory in bytes (MemTotal, MemAvailable); an error without a positive total.
fn host_memory() -> Result<(u64, u64), String> {
    let mut system = System::new().map_err(|e| e.to_string())?;
    system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
    let total = system.total_memory();
    if total == 0 {
        return Err("no MemTotal, or MemTotal is 0".to_string());
    }
    Ok((total, system.available_memory().min(total)))
}

/// 100 × CPU seconds / seconds elapsed: the percent of one core the process used. 0 over
/// no measurable time.
pub(super) fn interval_cpu_percent(ticks: u64, seconds: f64, ticks_per_second: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    100.0 * (ticks as f64 / ticks_per_second) / seconds
}

/// Bytes (received, sent) summed over the interfaces but loopback.
fn bytes_but_loopback<'a>(devices: impl IntoIterator<Item = &'a DeviceStatus>) -> (u64, u64) {
    devices.into_iter().filter(|d| d.name != "lo").fold((0, 0), |(recv, sent), d| (recv + d.recv_bytes, sent + d.sent_bytes))
}

/// Bytes (read, written) of every device of /proc/diskstats, by name.
fn disk_bytes(stats: Vec<DiskStat>) -> Vec<(String, (u64, u64))> {
    stats.into_iter().map(|d| (d.name, (d.sectors_read * SECTOR_BYTES, d.sectors_written * SECTOR_BYTES))).collect()
}

/// The sources of the mounts that hold "/": the root mount's device when it is one;
/// otherwise (an overlay root, as in a container) every mounted device, as the official
/// client adopts every partition it sees then.
fn root_devices(mounts: &[MountInfo]) -> Vec<String> {
    let devices = |root_only: bool| -> Vec<String> {
        let mounts = mounts.iter().filter(|m| !root_only || m.mount_point == Path::new("/"));
        mounts.filter_map(|m| m.mount_source.clone()).filter(|s| s.starts_with("/dev/")).collect()
    };
    let root = devices(true);
    if !root.is_empty() {
        return root;
    }
    let mut all = devices(false);
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
fn watched_devices(candidates: Vec<String>, stats: &[(String, (u64, u64))], is_whole_disk: impl Fn(&str) -> bool) -> Vec<String> {
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
fn disk_usage(blocks: u64, free: u64, available: u64, block_bytes: u64) -> (f64, u64) {
    let used = blocks.saturating_sub(free).saturating_mul(block_bytes);
    let avail = available.saturating_mul(block_bytes);
    let percent = if used + avail == 0 { 0.0 } else { used as f64 / (used + avail) as f64 * 100.0 };
    (percent, used)
}

/// The file system that holds "/": bytes in all and used, and `disk_usage`'s percent.
struct RootUsage {
    total: u64,
    used: u64,
    percent: f64,
}

// statvfs by hand (through rustix): sysinfo's disks give no free blocks (only available
// ones), and used = blocks − free.
fn root_usage() -> rustix::io::Result<RootUsage> {
    let s = rustix::fs::statvfs("/")?;
    let block_bytes = if s.f_frsize > 0 { s.f_frsize } else { s.f_bsize };
    let (percent, used) = disk_usage(s.f_blocks, s.f_bfree, s.f_bavail, block_bytes);
    Ok(RootUsage { total: s.f_blocks.saturating_mul(block_bytes), used, percent })
}

/// Facts of this host that do not change during a run (the W&B metadata): physical
/// cores, total memory in bytes, and the size and use of "/" in bytes.
pub fn physical_cores() -> Option<usize> {
    physical_cores_from_sysfs().or_else(|| System::physical_core_count().ok())
}

pub fn memory_total_bytes() -> Option<u64> {
    host_memory().ok().map(|(total, _)| total)
}

pub fn root_disk_bytes() -> Option<(u64, u64)> {
    root_usage().ok().map(|root| (root.total, root.used))
}

/// Physical cores: the distinct core_cpus_list (or, on older kernels,
/// thread_siblings_list) of the CPUs in sysfs.
// By hand: sysinfo counts /proc/cpuinfo's core ids, which ARM and POWER kernels leave out
// (it counts threads there); the kernel's topology is exact, and what gopsutil reads.
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

#[cfg(test)]
mod tests {
    use super::*;
    use procfs::net::InterfaceDeviceStatus;
    use procfs::process::MountInfos;
    use procfs::FromBufRead;

    /// The first number after `key` on the line of `file` that starts with it.
    fn proc_number(file: &str, key: &str) -> u64 {
        let text = std::fs::read_to_string(file).unwrap();
        let line = text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key} in {file}"));
        line[key.len()..].split_whitespace().next().unwrap().parse().unwrap()
    }

    fn mounts(text: &str) -> Vec<MountInfo> {
        MountInfos::from_buf_read(text.as_bytes()).unwrap().0
    }

    #[test]
    fn cpu_percent_is_of_one_core_over_the_interval() {
        // 300 ticks (3 s of CPU) in 15 s: 20 % of one core.
        let percent = interval_cpu_percent(300, 15.0, 100.0);
        assert!((percent - 20.0).abs() < 1e-9, "{percent}");
        assert_eq!(interval_cpu_percent(1, 0.0, 100.0), 0.0);
    }

    #[test]
    fn the_process_readings_agree_with_proc() {
        // Counted after the command name, which may hold spaces and ')'.
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let fields: Vec<u64> = stat[stat.rfind(')').unwrap() + 1..].split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
        let ticks_by_hand = fields[10] + fields[11];
        let status_by_hand = (proc_number("/proc/self/status", "VmRSS:"), proc_number("/proc/self/status", "Threads:"));
        let me = Process::myself().unwrap();
        let crate_stat = me.stat().unwrap();
        let ticks = crate_stat.utime + crate_stat.stime;
        assert!(ticks >= ticks_by_hand && ticks - ticks_by_hand < 10 * procfs::ticks_per_second(), "{ticks} vs {ticks_by_hand}");
        let status = me.status().unwrap();
        let rss_kb = status.vmrss.unwrap();
        assert!(rss_kb.abs_diff(status_by_hand.0) < 64 * 1024, "{rss_kb} kB vs {} kB", status_by_hand.0);
        // Other tests start and end threads meanwhile.
        assert!(status.threads >= 1 && status.threads.abs_diff(status_by_hand.1) < 64, "{} vs {}", status.threads, status_by_hand.1);
        assert!(status.cpus_allowed_list.is_some_and(|l| !l.is_empty()));
    }

    #[test]
    fn the_host_readings_agree_with_proc() {
        let (total, available) = host_memory().unwrap();
        assert_eq!(total, proc_number("/proc/meminfo", "MemTotal:") * 1024);
        let available_by_hand = proc_number("/proc/meminfo", "MemAvailable:") * 1024;
        assert!(available <= total && available.abs_diff(available_by_hand) < total / 20, "{available} vs {available_by_hand}");
        assert_eq!(memory_total_bytes(), Some(total));
        // Counters only grow: what the crate reads after the hand is at least as large.
        let retransmits_by_hand = {
            let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap();
            let tcp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
            let column = tcp[0].split_whitespace().position(|n| n == "RetransSegs").unwrap();
            tcp[1].split_whitespace().nth(column).unwrap().parse::<u64>().unwrap()
        };
        let retransmits = procfs::net::snmp().unwrap().tcp_retrans_segs;
        assert!(retransmits >= retransmits_by_hand && retransmits - retransmits_by_hand < 10_000, "{retransmits} vs {retransmits_by_hand}");
        let logical = procfs::CpuInfo::current().unwrap().num_cores();
        assert_eq!(logical, std::fs::read_to_string("/proc/cpuinfo").unwrap().lines().filter(|l| l.starts_with("processor")).count());
        let cores = physical_cores().unwrap();
        assert!(cores >= 1 && cores <= logical, "{cores} of {logical}");
        if std::fs::read_to_string("/proc/cpuinfo").unwrap().contains("core id") {
            assert_eq!(Some(cores), System::physical_core_count().ok(), "sysfs and /proc/cpuinfo disagree");
        }
        let (disk_total, disk_used) = root_disk_bytes().unwrap();
        assert!(disk_used > 0 && disk_used <= disk_total, "{disk_used} of {disk_total}");
    }

    #[test]
    fn net_dev_sums_every_interface_but_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
            face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
            lo:  1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0\n  \
            eth0: 50000     300    0    0    0     0          0         0    7000      70    0    0    0     0       0          0\n  \
            ib0: 20     3    0    0    0     0          0         0    10      1    0    0    0     0       0          0\n";
        let devices = InterfaceDeviceStatus::from_buf_read(text.as_bytes()).unwrap().0;
        assert_eq!(bytes_but_loopback(devices.values()), (50_020, 7_010));
        assert_eq!(bytes_but_loopback([]), (0, 0));
        // This machine's, from the crate, against /proc/net/dev by hand: counters only grow.
        let by_hand = std::fs::read_to_string("/proc/net/dev").unwrap();
        let by_hand: u64 = by_hand
            .lines()
            .skip(2)
            .filter_map(|l| l.split_once(':'))
            .filter(|(name, _)| name.trim() != "lo")
            .map(|(_, f)| f.split_whitespace().next().unwrap().parse::<u64>().unwrap())
            .sum();
        let (recv, _) = bytes_but_loopback(procfs::net::dev_status().unwrap().values());
        assert!(recv >= by_hand && recv - by_hand < 1 << 30, "{recv} vs {by_hand}");
    }

    #[test]
    fn diskstats_and_the_watched_devices() {
        let lines = [
            "   7       0 loop0 10 0 80 0 0 0 0 0 0 0 0 0 0 0 0 0 0",
            "   8       0 sda 100 0 2048 50 10 0 4096 20 0 60 70 0 0 0 0 0 0",
            "   8       1 sda1 90 0 1024 40 9 0 2048 10 0 50 60 0 0 0 0 0 0",
        ];
        let stats = disk_bytes(lines.iter().map(|l| DiskStat::from_line(l).unwrap()).collect());
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
        // This machine's, from the crate, against /proc/diskstats by hand (field 6: sectors read).
        let by_hand = std::fs::read_to_string("/proc/diskstats").unwrap();
        let crate_stats = disk_bytes(procfs::diskstats().unwrap());
        for line in by_hand.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let read = f[5].parse::<u64>().unwrap() * SECTOR_BYTES;
            let (_, (crate_read, _)) = crate_stats.iter().find(|(n, _)| n == f[2]).unwrap();
            assert!(*crate_read >= read && crate_read - read < 1 << 30, "{}: {crate_read} vs {read}", f[2]);
        }
    }

    #[test]
    fn the_devices_that_hold_root() {
        let host = "22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n\
                    23 22 259:1 / /boot rw - vfat /dev/nvme0n1p1 rw\n\
                    24 22 0:21 / /proc rw - proc proc rw\n";
        assert_eq!(root_devices(&mounts(host)), vec!["/dev/nvme0n1p2".to_string()]);
        let container = "500 400 0:50 / / rw - overlay overlay rw,lowerdir=/x\n\
                         501 500 8:1 /var/lib/docker/x/hosts /etc/hosts rw - ext4 /dev/sda1 rw\n\
                         502 500 8:1 /var/lib/docker/x/hostname /etc/hostname rw - ext4 /dev/sda1 rw\n";
        assert_eq!(root_devices(&mounts(container)), vec!["/dev/sda1".to_string()]);
        assert!(root_devices(&[]).is_empty());
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
    fn an_injected_fault_leaves_every_host_key_out() {
        let mut source = HostSource::new(true);
        let mut failures = vec![];
        assert!(source.sample(&mut failures).is_empty());
        let sources: Vec<&str> = failures.iter().map(|f| f.source).collect();
        assert!(sources.contains(&"/proc/self/status") && sources.contains(&"/proc/net/dev"), "{sources:?}");
        assert!(failures.iter().all(|f| f.error.contains("ALGPT2_FAULT_STATS")), "{failures:?}");
    }
}

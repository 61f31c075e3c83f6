//! The cgroup v2 limits that the host metrics divide by, as the official client takes them:
//! the leaf cgroup's memory.max and cpu.max, and the CPUs the process may run on. The
//! files are read by hand: neither sysinfo nor procfs reads cpu.max, and sysinfo's memory
//! limit is the smallest of the ancestors' too, where the official client takes the leaf's.

use procfs::process::{MountInfo, Process};
use procfs::ProcessCGroup;
use std::path::{Path, PathBuf};

/// The cgroup v2 limits the official client divides by (core/internal/monitor/cgroup.go):
/// of the leaf cgroup only, read once at start.
#[derive(Debug, Default, PartialEq)]
pub(super) struct CgroupLimits {
    /// memory.current's path and the finite memory.max beside it.
    pub memory: Option<(PathBuf, u64)>,
    /// The binding CPU limit: cpu.max's quota/period or the CPUs of Cpus_allowed_list
    /// when fewer than the host's; 0 when neither applies.
    pub cpus: f64,
}

impl CgroupLimits {
    pub(super) fn detect(logical_cpus: usize) -> CgroupLimits {
        let Ok(me) = Process::myself() else { return CgroupLimits::default() };
        let allowed = me.status().ok().and_then(|s| s.cpus_allowed_list).map_or(0, |list| cpus_in(&list));
        let affinity = if allowed > 0 && (logical_cpus == 0 || allowed < logical_cpus) { allowed as f64 } else { 0.0 };
        let cgroups = me.cgroups().map(|c| c.0).unwrap_or_default();
        let mounts = me.mountinfo().map(|m| m.0).unwrap_or_default();
        let Some(dir) = cgroup_dir(&cgroups, &mounts) else { return CgroupLimits::default() };
        let memory = read_limit(&dir.join("memory.max")).map(|limit| (dir.join("memory.current"), limit));
        let quota = std::fs::read_to_string(dir.join("cpu.max")).ok().and_then(|t| parse_cpu_max(&t)).unwrap_or(0.0);
        let cpus = min_positive(quota, affinity);
        if memory.is_none() && cpus <= 0.0 {
            return CgroupLimits::default();
        }
        CgroupLimits { memory, cpus }
    }
}

/// The CPUs of a Cpus_allowed_list's ranges ([(0, 3), (8, 8)] for "0-3,8": 5).
fn cpus_in(ranges: &[(u32, u32)]) -> usize {
    ranges.iter().map(|&(first, last)| last.saturating_sub(first) as usize + 1).sum()
}

/// The directory of this process's cgroup v2 (hierarchy 0, no controllers) under the first
/// cgroup2 mount, the mount's root stripped (a container sees a sub-tree).
fn cgroup_dir(cgroups: &[ProcessCGroup], mounts: &[MountInfo]) -> Option<PathBuf> {
    let path = cgroups.iter().find(|c| c.hierarchy == 0 && c.controllers.is_empty())?.pathname.trim();
    let mount = mounts.iter().find(|m| m.fs_type == "cgroup2")?;
    let root = mount.root.trim_end_matches('/');
    let rel = if root.is_empty() {
        path
    } else if path == root {
        "/"
    } else {
        path.strip_prefix(root).filter(|r| r.starts_with('/')).unwrap_or(path)
    };
    Some(mount.mount_point.join(rel.trim_start_matches('/')))
}

/// A memory.max-like file: None for "max" (no limit), 0, or text that is not a number.
pub(super) fn read_limit(path: &Path) -> Option<u64> {
    parse_limit(&std::fs::read_to_string(path).ok()?)
}

fn parse_limit(text: &str) -> Option<u64> {
    text.trim().parse::<u64>().ok().filter(|&v| v > 0)
}

/// cpu.max's "$quota $period" as CPUs; None for "max" (no limit) or a bad file.
fn parse_cpu_max(text: &str) -> Option<f64> {
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
    use procfs::process::MountInfos;
    use procfs::{FromBufRead, ProcessCGroups};

    fn mounts(text: &str) -> Vec<MountInfo> {
        MountInfos::from_buf_read(text.as_bytes()).unwrap().0
    }

    #[test]
    fn cgroup_v2_directory_and_limits() {
        let cgroups = |text: &str| ProcessCGroups::from_buf_read(text.as_bytes()).unwrap().0;
        let mountinfo = mounts("30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n");
        assert_eq!(cgroup_dir(&cgroups("0::/user.slice/job1\n"), &mountinfo), Some(PathBuf::from("/sys/fs/cgroup/user.slice/job1")));
        // A container that sees its own sub-tree mounted at /sys/fs/cgroup.
        let container = mounts("40 35 0:26 /kubepods/pod1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n");
        assert_eq!(cgroup_dir(&cgroups("0::/kubepods/pod1/c2\n"), &container), Some(PathBuf::from("/sys/fs/cgroup/c2")));
        assert_eq!(cgroup_dir(&cgroups("0::/kubepods/pod1\n"), &container), Some(PathBuf::from("/sys/fs/cgroup/")));
        // cgroup v1 only: no "0::" line, or no cgroup2 mount.
        assert_eq!(cgroup_dir(&cgroups("4:memory:/x\n"), &mountinfo), None);
        assert_eq!(cgroup_dir(&cgroups("0::/\n"), &mounts("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n")), None);
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("1073741824\n"), Some(1 << 30));
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2.0));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(min_positive(0.0, 3.0), 3.0);
        assert_eq!(min_positive(2.0, 3.0), 2.0);
        assert_eq!(min_positive(0.0, 0.0), 0.0);
        // Cpus_allowed_list "0-3,8,10-11".
        assert_eq!(cpus_in(&[(0, 3), (8, 8), (10, 11)]), 7);
        assert_eq!(cpus_in(&[]), 0);
    }
}

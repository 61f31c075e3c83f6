//! Picking the tch device for this rank from `device:` and what the machine has.

use crate::config::DeviceKind;
use tch::Device;

/// The configured device does not exist here: a usage error (exit code 2), like a bad
/// config, found only once the machine is looked at.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device: cuda was asked for but libtorch sees no CUDA GPU on this machine (use device: cpu or auto)")]
    NoCuda,
    #[error("local rank {local_rank} has no GPU of its own: this node has {gpus}; start at most {gpus} ranks per node")]
    TooFewGpus { local_rank: usize, gpus: usize },
    /// The estimate against what the device has, already worded: seven fields here would
    /// make every `Result` of this module that large.
    #[error("{0}")]
    TooLarge(String),
}

/// Refuses, before anything is allocated or written, a config whose estimated memory per
/// rank exceeds what `device` has (a GPU's memory, or this rank's share of the RAM the
/// kernel reports available). Nothing is refused where the amount cannot be read.
pub fn check_memory(cfg: &crate::config::Config, device: Device, ranks_on_node: usize) -> Result<(), DeviceError> {
    if !cfg.train.memory_check {
        return Ok(());
    }
    let estimate = crate::model::memory::training(cfg);
    let (have, place) = match device {
        Device::Cuda(i) => match crate::cuda::peak::total_memory(i) {
            Some(bytes) => (bytes as f64, format!("cuda:{i}")),
            None => return Ok(()),
        },
        _ => match available_ram() {
            Some(bytes) => {
                let ranks = ranks_on_node.max(1);
                let share = if ranks > 1 {
                    format!(" (1/{ranks} of the RAM available, one share per rank on this node)")
                } else {
                    " (RAM available)".to_string()
                };
                (bytes as f64 / ranks as f64, format!("this rank{share}"))
            }
            None => return Ok(()),
        },
    };
    if estimate.total() <= have {
        return Ok(());
    }
    let h = crate::model::memory::human;
    Err(DeviceError::TooLarge(format!(
        "this config needs about {} of memory per rank to train (parameters and gradients {}, AdamW {}, activations {}, logits {}), but {place} has {}: reduce train.micro_batch_size (use train.grad_accum_steps for the same batch), train.seq_len or the model (train.memory_check: false skips this estimate)",
        h(estimate.total()),
        h(estimate.parameters),
        h(estimate.optimizer),
        h(estimate.activations),
        h(estimate.logits),
        h(have),
    )))
}

/// MemAvailable of /proc/meminfo, in bytes.
fn available_ram() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// `auto` takes GPU `local_rank` when CUDA works, else the CPU; `cuda` insists on a GPU.
pub fn resolve(kind: DeviceKind, local_rank: usize) -> Result<Device, DeviceError> {
    let gpus = if tch::Cuda::is_available() { tch::Cuda::device_count() as usize } else { 0 };
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Auto if gpus == 0 => Ok(Device::Cpu),
        DeviceKind::Cuda if gpus == 0 => Err(DeviceError::NoCuda),
        DeviceKind::Auto | DeviceKind::Cuda if local_rank >= gpus => Err(DeviceError::TooFewGpus { local_rank, gpus }),
        DeviceKind::Auto | DeviceKind::Cuda => Ok(Device::Cuda(local_rank)),
    }
}

/// How a device is shown in logs and reports.
pub fn describe(device: Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", tch::get_num_threads()),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}

/// Ranks on one node split its cores, so that two ranks do not fight over every core;
/// `OMP_NUM_THREADS`, as PyTorch users set it, overrides the split, up to the cores
/// this process may use.
pub fn share_cpu_threads(ranks_on_node: usize) {
    tch::set_num_threads(cpu_threads(std::env::var("OMP_NUM_THREADS").ok().as_deref(), ranks_on_node, usable_cores()) as i32);
}

fn cpu_threads(omp_num_threads: Option<&str>, ranks_on_node: usize, cores: usize) -> usize {
    match thread_count(omp_num_threads) {
        Some(n) => n.min(cores),
        None => (cores / ranks_on_node.max(1)).max(1),
    }
}

/// The cores this process may run on: its CPU affinity mask (`taskset`, mpirun's
/// binding), and a cgroup's CPU quota where one is set.
pub fn usable_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A thread count as the OpenMP and MKL variables hold it: a positive integer, else none.
fn thread_count(value: Option<&str>) -> Option<usize> {
    value.and_then(|v| v.trim().parse::<usize>().ok()).filter(|&n| n > 0)
}

/// The variables that size libtorch's CPU thread pools (OpenMP's and MKL's).
pub const THREAD_VARIABLES: [&str; 2] = ["OMP_NUM_THREADS", "MKL_NUM_THREADS"];

/// Each of [`THREAD_VARIABLES`] (as `get` reads them) that asks for more threads than
/// `cores`, with its value: `OMP_NUM_THREADS=100000` on 2 cores started over a thousand
/// threads that fought over 2 cores and made no progress for minutes. Such a value is to
/// be set to `cores`.
pub fn excess_thread_variables(get: &dyn Fn(&str) -> Option<String>, cores: usize) -> Vec<(&'static str, usize)> {
    THREAD_VARIABLES.into_iter().filter_map(|key| thread_count(get(key).as_deref()).filter(|&n| n > cores).map(|n| (key, n))).collect()
}

/// Peak FLOP/s of one device for MFU: `train.peak_flops`, else the table of known GPUs.
pub fn peak_flops(configured: Option<f64>, device: Device) -> Option<f64> {
    configured.or_else(|| match device {
        Device::Cuda(i) => crate::cuda::peak::device_name(i).and_then(|n| crate::cuda::peak::peak_flops_of(&n)),
        _ => None,
    })
}

/// Turns TF32 on for libtorch's cuBLAS matrix products when `tf32` (`train.tf32`).
/// libtorch reads `TORCH_ALLOW_TF32_CUBLAS_OVERRIDE` once, at its first CUDA matrix
/// product, and tch has no call for the setting: so this must run before any tensor work
/// and before MPI or anything else starts threads (it changes the environment). A value
/// the user set is left alone.
pub fn allow_tf32(tf32: bool) {
    const KEY: &str = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE";
    if tf32 && std::env::var_os(KEY).is_none() {
        std::env::set_var(KEY, "1");
    }
}

#[cfg(test)]
mod tests {
    use super::{cpu_threads, excess_thread_variables};

    #[test]
    fn omp_num_threads_overrides_the_split_of_the_cores_up_to_the_cores() {
        let cores = 8;
        assert_eq!(cpu_threads(None, 1, cores), cores);
        assert_eq!(cpu_threads(None, cores * 4, cores), 1);
        assert_eq!(cpu_threads(Some("3"), 2, cores), 3);
        assert_eq!(cpu_threads(Some(" 1 "), 1, cores), 1);
        assert_eq!(cpu_threads(Some("100000"), 1, cores), cores);
        // Unset, empty, zero or garbage: the split, as if it were not set.
        for v in ["", "0", "two", "-1"] {
            assert_eq!(cpu_threads(Some(v), 1, cores), cores, "{v:?}");
        }
    }

    #[test]
    fn thread_variables_above_the_cores_are_named_with_their_values() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |key: &str| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| v.to_string())
        };
        let both = env(&[("OMP_NUM_THREADS", "100000"), ("MKL_NUM_THREADS", " 9 ")]);
        assert_eq!(excess_thread_variables(&both, 8), vec![("OMP_NUM_THREADS", 100000), ("MKL_NUM_THREADS", 9)]);
        assert_eq!(excess_thread_variables(&both, 9), vec![("OMP_NUM_THREADS", 100000)]);
        // At or under the cores, unset, or not a count: nothing to cap.
        let fine = env(&[("OMP_NUM_THREADS", "8"), ("MKL_NUM_THREADS", "lots")]);
        assert!(excess_thread_variables(&fine, 8).is_empty());
        assert!(excess_thread_variables(&env(&[]), 1).is_empty());
    }
}

//! Picking the tch device for this rank from `device:` and what the machine has.

use crate::config::DeviceKind;
use anyhow::bail;
use tch::Device;

/// `auto` takes GPU `local_rank` when CUDA works, else the CPU; `cuda` insists on a GPU.
pub fn resolve(kind: DeviceKind, local_rank: usize) -> anyhow::Result<Device> {
    let gpus = if tch::Cuda::is_available() { tch::Cuda::device_count() as usize } else { 0 };
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Auto if gpus == 0 => Ok(Device::Cpu),
        DeviceKind::Auto | DeviceKind::Cuda => {
            if gpus == 0 {
                bail!("device: cuda was asked for but libtorch sees no CUDA GPU on this machine (use device: cpu or auto)");
            }
            if local_rank >= gpus {
                bail!("local rank {local_rank} has no GPU of its own: this node has {gpus}; start at most {gpus} ranks per node");
            }
            Ok(Device::Cuda(local_rank))
        }
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

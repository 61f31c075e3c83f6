//! `wandb-metadata.json`, the run's Overview tab: what the official client records
//! (os, program and arguments, host, start time, CPU and memory, disk, GPUs, git commit;
//! its key names), and what it cannot know from rank 0 alone: every rank's host and GPU,
//! the world size, and the libtorch, CUDA, NCCL and MPI versions this run uses.

use crate::parallel::World;
use crate::report::system;
use serde_json::{json, Map, Value};

/// Every rank calls it (one gather of each rank's host and GPU); the main rank gets the
/// metadata, the others `None`.
pub fn collect(world: &World, device: tch::Device) -> Option<Value> {
    let gpu = match device {
        tch::Device::Cuda(i) => crate::cuda::peak::device_name(i).unwrap_or_else(|| format!("cuda:{i}")),
        _ => String::new(),
    };
    let mine = json!({"rank": world.rank(), "host": host_name(), "device": crate::device::describe(device), "gpu": gpu}).to_string();
    let ranks: Vec<Value> = world.all_gather_text(&mine).iter().map(|t| serde_json::from_str(t).unwrap_or(Value::Null)).collect();
    world.is_main().then(|| document(&ranks, world.size()))
}

fn document(ranks: &[Value], world_size: usize) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        if !v.is_null() {
            m.insert(k.to_string(), v);
        }
    };
    put("os", os_name().map_or(Value::Null, Value::from));
    put("startedAt", json!(rfc3339_now()));
    let args: Vec<String> = std::env::args().collect();
    put("program", args.first().map_or(Value::Null, |a| json!(a)));
    put("args", json!(args.iter().skip(1).collect::<Vec<_>>()));
    put("executable", std::env::current_exe().ok().map_or(Value::Null, |p| json!(p.display().to_string())));
    put("root", std::env::current_dir().ok().map_or(Value::Null, |p| json!(p.display().to_string())));
    put("host", json!(host_name()));
    put("git", json!({"commit": env!("ALGPT2_GIT_REVISION")}));
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    put("cpu_count", json!(system::physical_cores().unwrap_or(logical)));
    put("cpu_count_logical", json!(logical));
    if let Some(model) = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).and_then(|l| l.split_once(':')) {
        put("cpu", json!({"model": model.1.trim()}));
    }
    if let Some(total) = system::memory_total_bytes() {
        // The official client writes 64-bit counts as strings.
        put("memory", json!({"total": total.to_string()}));
    }
    if let Some((total, used)) = system::root_disk_bytes() {
        put("disk", json!({"/": {"total": total.to_string(), "used": used.to_string()}}));
    }
    let gpus: Vec<&str> = ranks.iter().filter_map(|r| r["gpu"].as_str()).filter(|g| !g.is_empty()).collect();
    if let Some(first) = gpus.first() {
        put("gpu", json!(first));
        put("gpu_count", json!(gpus.len()));
        put("gpu_nvidia", json!(gpus.iter().map(|g| json!({"name": g})).collect::<Vec<_>>()));
    }
    if let Some(dir) = crate::versions::libtorch_dir() {
        put("libtorch", json!(algpt2_launch::read_version(&dir)));
        put("cudaVersion", crate::versions::cuda_of_build(&dir).map_or(Value::Null, Value::from));
    }
    put("nccl", crate::parallel::nccl::nccl_version().ok().map_or(Value::Null, |(a, b, c)| json!(format!("{a}.{b}.{c}"))));
    put("mpi", json!(World::library_version()));
    put("algpt2_ddp", json!(env!("CARGO_PKG_VERSION")));
    put("world_size", json!(world_size));
    put("ranks", json!(ranks));
    Value::Object(m)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// `Linux-6.1.0-x86_64`, as Python's `platform.platform()` begins.
fn os_name() -> Option<String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    Some(format!("{}-{}-{}", "Linux", release.trim(), std::env::consts::ARCH))
}

/// Now as `2026-12-03T15:38:44.683556Z`.
fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    format!("{}Z", crate::report::wandb::console_timestamp(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_names_every_rank_and_its_gpu() {
        let ranks = [
            json!({"rank": 0, "host": "a", "device": "cuda:0", "gpu": "NVIDIA H200"}),
            json!({"rank": 1, "host": "b", "device": "cpu", "gpu": ""}),
        ];
        let d = document(&ranks, 2);
        assert_eq!(d["world_size"], 2);
        assert_eq!(d["gpu_count"], 1);
        assert_eq!(d["gpu_nvidia"][0]["name"], "NVIDIA H200");
        assert_eq!(d["ranks"][1]["host"], "b");
        assert!(d["startedAt"].as_str().unwrap().ends_with('Z'));
        assert!(d["cpu_count_logical"].as_u64().unwrap() >= 1);
        assert!(d["memory"]["total"].as_str().unwrap().parse::<u64>().unwrap() > 0);
    }
}

//! This rank's GPU, read through NVML (crate nvml-wrapper, which dlopens libnvidia-ml.so.1:
//! a host without the driver just has no GPU keys). The readings are a plain struct turned
//! into keys by a pure function, so that the tests can feed a fake NVML sample.

use super::Failure;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, MemoryLocation, TemperatureSensor};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use std::collections::BTreeSet;

/// The GPU keys, in the fixed order of the gathered layout (units in `system`'s doc).
pub const GPU_KEYS: [&str; 19] = [
    "gpu", "memory", "memoryAllocated", "memoryAllocatedBytes", "temp", "powerWatts", "enforcedPowerLimitWatts", "powerPercent", "smClock",
    "memoryClock", "graphicsClock", "correctedMemoryErrors", "uncorrectedMemoryErrors", "fanSpeed", "pcieLinkGen", "pcieLinkSpeed",
    "pcieLinkWidth", "maxPcieLinkGen", "maxPcieLinkWidth",
];

/// The keys the official client also sends as `gpu.process.<i>.<key>` for a GPU the
/// monitored process computes on, which a training rank's GPU always is.
pub const GPU_PROCESS_KEYS: [&str; 8] =
    ["gpu", "memory", "memoryAllocated", "memoryAllocatedBytes", "temp", "powerWatts", "enforcedPowerLimitWatts", "powerPercent"];

/// One NVML sample of a GPU; None where that query failed or was not asked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuReadings {
    /// Percent of the last sample period in which a kernel ran.
    pub utilization_percent: Option<u32>,
    /// Percent of the last sample period in which device memory was read or written.
    pub memory_utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_c: Option<u32>,
    pub power_milliwatts: Option<u32>,
    pub power_limit_milliwatts: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    pub graphics_clock_mhz: Option<u32>,
    /// ECC errors since the last driver or GPU reset (the volatile counter, as official).
    pub corrected_memory_errors: Option<u64>,
    pub uncorrected_memory_errors: Option<u64>,
    /// Fan 0, percent of its maximum speed.
    pub fan_speed_percent: Option<u32>,
    pub pcie_link_gen: Option<u32>,
    /// Transfer rate per lane in MT/s, as NVML gives it (16000 on PCIe 4).
    pub pcie_link_speed_mts: Option<u32>,
    pub pcie_link_width: Option<u32>,
    pub max_pcie_link_gen: Option<u32>,
    pub max_pcie_link_width: Option<u32>,
}

/// The official collector's keys and values (xpu/src/gpu_nvidia.rs) for one sample.
pub fn gpu_keys(r: &GpuReadings) -> Vec<(&'static str, f64)> {
    let mut out = vec![];
    let mut put = |key: &'static str, value: Option<f64>| {
        if let Some(v) = value.filter(|v| v.is_finite()) {
            out.push((key, v));
        }
    };
    let f = |v: Option<u32>| v.map(f64::from);
    put("gpu", f(r.utilization_percent));
    put("memory", f(r.memory_utilization_percent));
    let total = r.memory_total_bytes.filter(|&t| t > 0);
    put("memoryAllocated", r.memory_used_bytes.zip(total).map(|(used, total)| used as f64 / total as f64 * 100.0));
    put("memoryAllocatedBytes", r.memory_used_bytes.map(|b| b as f64));
    put("temp", f(r.temperature_c));
    let watts = |mw: Option<u32>| mw.map(|mw| f64::from(mw) / 1000.0);
    let (power, limit) = (watts(r.power_milliwatts), watts(r.power_limit_milliwatts));
    put("powerWatts", power);
    put("enforcedPowerLimitWatts", limit);
    put("powerPercent", power.zip(limit.filter(|&l| l > 0.0)).map(|(p, l)| p / l * 100.0));
    put("smClock", f(r.sm_clock_mhz));
    put("memoryClock", f(r.memory_clock_mhz));
    put("graphicsClock", f(r.graphics_clock_mhz));
    put("correctedMemoryErrors", r.corrected_memory_errors.map(|e| e as f64));
    put("uncorrectedMemoryErrors", r.uncorrected_memory_errors.map(|e| e as f64));
    put("fanSpeed", f(r.fan_speed_percent));
    put("pcieLinkGen", f(r.pcie_link_gen));
    // The official collector multiplies NVML's MT/s by 10^6.
    put("pcieLinkSpeed", r.pcie_link_speed_mts.map(|s| f64::from(s) * 1e6));
    put("pcieLinkWidth", f(r.pcie_link_width));
    put("maxPcieLinkGen", f(r.max_pcie_link_gen));
    put("maxPcieLinkWidth", f(r.max_pcie_link_width));
    out
}

/// Which NVML device a CUDA ordinal is.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Target {
    Index(u32),
    Uuid(String),
}

/// The NVML device of CUDA ordinal `ordinal`, given CUDA_VISIBLE_DEVICES: its `ordinal`-th
/// entry, an index or a (MIG) UUID; unset, the ordinal itself. Like PyTorch's
/// `torch.cuda._get_nvml_device_index`, this takes CUDA's order to be NVML's (PCI bus)
/// order, which holds with CUDA_DEVICE_ORDER=PCI_BUS_ID or GPUs all of one kind.
pub(super) fn nvml_target(ordinal: usize, visible: Option<&str>) -> Result<Target, String> {
    let Some(visible) = visible else {
        return u32::try_from(ordinal).map(Target::Index).map_err(|_| format!("CUDA ordinal {ordinal} is out of range"));
    };
    let entry = visible
        .split(',')
        .map(str::trim)
        .nth(ordinal)
        .filter(|e| !e.is_empty())
        .ok_or_else(|| format!("CUDA ordinal {ordinal} is not in CUDA_VISIBLE_DEVICES={visible:?}"))?;
    if let Ok(index) = entry.parse::<u32>() {
        return Ok(Target::Index(index));
    }
    if entry.starts_with("GPU-") || entry.starts_with("MIG-") {
        return Ok(Target::Uuid(entry.to_string()));
    }
    Err(format!("CUDA_VISIBLE_DEVICES entry {entry:?} (CUDA ordinal {ordinal}) is neither an index nor a GPU UUID"))
}

/// NVML and this rank's device, or why there are none.
pub(super) struct GpuSource {
    /// None after a failed init or device lookup: the rank has a GPU but no GPU keys.
    nvml: Option<(Nvml, Target)>,
    /// Queries that failed once: not asked again, as the official collector does.
    broken: BTreeSet<&'static str>,
}

impl GpuSource {
    /// Initializes NVML and finds CUDA device `ordinal`; `fail` (ALGPT2_FAULT_STATS=nvml)
    /// makes the init fail as a missing driver would.
    pub(super) fn open(ordinal: usize, fail: bool, failures: &mut Vec<Failure>) -> GpuSource {
        let nvml = if fail {
            Err(Failure::new("NVML", "init failed: injected by ALGPT2_FAULT_STATS=nvml"))
        } else {
            Nvml::init().map_err(|e| Failure::new("NVML", format!("init failed (libnvidia-ml.so.1, the driver's): {e}")))
        };
        let nvml = nvml.and_then(|nvml| {
            let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
            let target = nvml_target(ordinal, visible.as_deref()).map_err(|e| Failure::new("NVML device", e))?;
            let target = resolve(&nvml, target).map_err(|e| Failure::new("NVML device", format!("GPU {ordinal}: {e}")))?;
            Ok((nvml, target))
        });
        let nvml = nvml.map_err(|f| failures.push(f)).ok();
        GpuSource { nvml, broken: BTreeSet::new() }
    }

    /// One sample's keys: empty when NVML or the device is unavailable.
    pub(super) fn sample(&mut self, failures: &mut Vec<Failure>) -> Vec<(&'static str, f64)> {
        let Some((nvml, target)) = &self.nvml else { return vec![] };
        let device = match device(nvml, target) {
            Ok(d) => d,
            Err(e) => {
                failures.push(Failure::new("NVML device", format!("{target:?}: {e}")));
                return vec![];
            }
        };
        gpu_keys(&read(&device, &mut Queries { broken: &mut self.broken, failures }))
    }
}

/// A UUID entry as the full UUID NVML knows (CUDA also takes a unique prefix).
fn resolve(nvml: &Nvml, target: Target) -> Result<Target, String> {
    let Target::Uuid(uuid) = &target else { return Ok(target) };
    if nvml.device_by_uuid(uuid.as_str()).is_ok() {
        return Ok(target);
    }
    let count = nvml.device_count().map_err(|e| format!("counting devices: {e}"))?;
    let matches: Vec<String> =
        (0..count).filter_map(|i| nvml.device_by_index(i).ok()?.uuid().ok()).filter(|u| u.starts_with(uuid.as_str())).collect();
    match &matches[..] {
        [one] => Ok(Target::Uuid(one.clone())),
        _ => Err(format!("{} NVML devices have the UUID {uuid}", matches.len())),
    }
}

fn device<'n>(nvml: &'n Nvml, target: &Target) -> Result<Device<'n>, NvmlError> {
    match target {
        Target::Index(i) => nvml.device_by_index(*i),
        Target::Uuid(u) => nvml.device_by_uuid(u.as_str()),
    }
}

/// Asks each NVML query unless it failed before; a failure is noted once.
struct Queries<'a> {
    broken: &'a mut BTreeSet<&'static str>,
    failures: &'a mut Vec<Failure>,
}

impl Queries<'_> {
    fn ask<T>(&mut self, source: &'static str, query: impl FnOnce() -> Result<T, NvmlError>) -> Option<T> {
        if self.broken.contains(source) {
            return None;
        }
        query()
            .map_err(|e| {
                self.broken.insert(source);
                // Data-centre GPUs have no fan, consumer ones no ECC: not supported is normal.
                let failure = Failure::new(source, e.to_string());
                self.failures.push(if matches!(e, NvmlError::NotSupported) { failure.expected() } else { failure });
            })
            .ok()
    }
}

/// Every field independently: a failing query leaves its field None.
fn read(d: &Device, q: &mut Queries) -> GpuReadings {
    let utilization = q.ask("NVML utilization rates", || d.utilization_rates());
    let memory = q.ask("NVML memory info", || d.memory_info());
    let ecc = |kind: MemoryError| move || d.memory_error_counter(kind, EccCounter::Volatile, MemoryLocation::Device);
    GpuReadings {
        utilization_percent: utilization.as_ref().map(|u| u.gpu),
        memory_utilization_percent: utilization.as_ref().map(|u| u.memory),
        memory_used_bytes: memory.as_ref().map(|m| m.used),
        memory_total_bytes: memory.as_ref().map(|m| m.total),
        temperature_c: q.ask("NVML temperature", || d.temperature(TemperatureSensor::Gpu)),
        power_milliwatts: q.ask("NVML power usage", || d.power_usage()),
        power_limit_milliwatts: q.ask("NVML enforced power limit", || d.enforced_power_limit()),
        sm_clock_mhz: q.ask("NVML SM clock", || d.clock_info(Clock::SM)),
        memory_clock_mhz: q.ask("NVML memory clock", || d.clock_info(Clock::Memory)),
        graphics_clock_mhz: q.ask("NVML graphics clock", || d.clock_info(Clock::Graphics)),
        corrected_memory_errors: q.ask("NVML corrected ECC errors", ecc(MemoryError::Corrected)),
        uncorrected_memory_errors: q.ask("NVML uncorrected ECC errors", ecc(MemoryError::Uncorrected)),
        fan_speed_percent: q.ask("NVML fan speed", || d.fan_speed(0)),
        pcie_link_gen: q.ask("NVML PCIe link generation", || d.current_pcie_link_gen()),
        pcie_link_speed_mts: q.ask("NVML PCIe link speed", || d.pcie_link_speed()),
        pcie_link_width: q.ask("NVML PCIe link width", || d.current_pcie_link_width()),
        max_pcie_link_gen: q.ask("NVML max PCIe link generation", || d.max_pcie_link_gen()),
        max_pcie_link_width: q.ask("NVML max PCIe link width", || d.max_pcie_link_width()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fake_nvml_sample_gives_the_official_keys() {
        let r = GpuReadings {
            utilization_percent: Some(87),
            memory_utilization_percent: Some(40),
            memory_used_bytes: Some(30 << 30),
            memory_total_bytes: Some(80 << 30),
            temperature_c: Some(61),
            power_milliwatts: Some(350_000),
            power_limit_milliwatts: Some(700_000),
            sm_clock_mhz: Some(1980),
            memory_clock_mhz: Some(2619),
            graphics_clock_mhz: Some(1980),
            corrected_memory_errors: Some(0),
            uncorrected_memory_errors: Some(2),
            fan_speed_percent: None,
            pcie_link_gen: Some(5),
            pcie_link_speed_mts: Some(32000),
            pcie_link_width: Some(16),
            max_pcie_link_gen: Some(5),
            max_pcie_link_width: Some(16),
        };
        let keys = gpu_keys(&r);
        let get = |k: &str| keys.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
        assert_eq!(get("gpu"), Some(87.0));
        assert_eq!(get("memory"), Some(40.0));
        assert_eq!(get("memoryAllocated"), Some(37.5));
        assert_eq!(get("memoryAllocatedBytes"), Some((30u64 << 30) as f64));
        assert_eq!(get("temp"), Some(61.0));
        assert_eq!(get("powerWatts"), Some(350.0));
        assert_eq!(get("enforcedPowerLimitWatts"), Some(700.0));
        assert_eq!(get("powerPercent"), Some(50.0));
        assert_eq!(get("smClock"), Some(1980.0));
        assert_eq!(get("memoryClock"), Some(2619.0));
        assert_eq!(get("uncorrectedMemoryErrors"), Some(2.0));
        assert_eq!(get("pcieLinkSpeed"), Some(32e9));
        assert_eq!(get("fanSpeed"), None);
        assert_eq!(keys.len(), GPU_KEYS.len() - 1);
        assert!(keys.iter().all(|(k, _)| GPU_KEYS.contains(k)));
        assert!(GPU_PROCESS_KEYS.iter().all(|k| GPU_KEYS.contains(k)));
    }

    #[test]
    fn missing_readings_leave_their_keys_and_the_derived_ones_out() {
        let r =
            GpuReadings { memory_used_bytes: Some(5), memory_total_bytes: Some(0), power_milliwatts: Some(100_000), ..Default::default() };
        let keys = gpu_keys(&r);
        assert_eq!(keys, vec![("memoryAllocatedBytes", 5.0), ("powerWatts", 100.0)]);
        assert!(gpu_keys(&GpuReadings::default()).is_empty());
    }

    #[test]
    fn cuda_ordinals_map_through_cuda_visible_devices() {
        assert_eq!(nvml_target(1, None), Ok(Target::Index(1)));
        assert_eq!(nvml_target(1, Some("4, 6,7")), Ok(Target::Index(6)));
        assert_eq!(nvml_target(0, Some("GPU-8f3c,2")), Ok(Target::Uuid("GPU-8f3c".into())));
        assert_eq!(nvml_target(0, Some("MIG-1234-abcd")), Ok(Target::Uuid("MIG-1234-abcd".into())));
        assert!(nvml_target(2, Some("0,1")).unwrap_err().contains("not in CUDA_VISIBLE_DEVICES"));
        assert!(nvml_target(0, Some("")).is_err());
        assert!(nvml_target(0, Some("banana")).unwrap_err().contains("neither an index"));
    }

    /// This machine has no driver: init is an error (no panic, no link failure), noted once,
    /// and the source then gives no keys.
    #[test]
    fn without_a_driver_the_gpu_source_gives_no_keys() {
        let mut failures = vec![];
        let mut source = GpuSource::open(0, false, &mut failures);
        if source.nvml.is_some() {
            return; // a machine with a GPU: covered by the device checks instead
        }
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].source, "NVML");
        assert!(source.sample(&mut failures).is_empty());
        assert_eq!(failures.len(), 1);
        let mut failures = vec![];
        let source = GpuSource::open(0, true, &mut failures);
        assert!(source.nvml.is_none());
        assert!(failures[0].error.contains("ALGPT2_FAULT_STATS=nvml"), "{failures:?}");
    }
}

//! Compute precision (`train.precision`): fp32, or bf16 matrix products on fp32 master
//! weights.
//!
//! In bf16 the flat fp32 parameters (model/flat.rs) are cast once per optimizer step, in
//! one pass, into a bf16 buffer of the same layout; the model's matrix products use views
//! of it (so the shared block is cast once, not `n_layer` times). Their gradients land in
//! a bf16 gradient buffer of the same layout, added into the fp32 gradients after each
//! micro-step's backward. Embedding lookups, LayerNorm gains and biases, the residual
//! stream, softmax, the loss and every reduction stay fp32; there is no loss scaling
//! (bf16 has fp32's range).

use super::flat::FlatParams;
use crate::config::Precision;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// The precision a run uses and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ComputePrecision {
    pub bf16: bool,
    pub reason: String,
}

impl ComputePrecision {
    pub fn name(&self) -> &'static str {
        if self.bf16 {
            "bf16"
        } else {
            "fp32"
        }
    }
}

/// The CPU's bf16 features, from /proc/cpuinfo: AMX-BF16 (tile units), AVX512-BF16 (dot
/// product instructions).
pub fn cpu_bf16_features() -> Vec<&'static str> {
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else { return Vec::new() };
    let Some(flags) = info.lines().find(|l| l.starts_with("flags")) else { return Vec::new() };
    ["amx_bf16", "avx512_bf16"].into_iter().filter(|f| flags.split_whitespace().any(|x| x == *f)).collect()
}

/// What `auto` decides on: the CPU's bf16 features (`cpu_bf16_features`), or a CUDA
/// GPU's compute capability (None where it cannot be read).
#[derive(Debug, Clone, PartialEq)]
pub enum Hardware {
    Cpu { bf16_features: Vec<&'static str> },
    Gpu { compute_capability: Option<(i32, i32)> },
}

impl Hardware {
    /// The hardware behind `device`, as this machine reports it.
    pub fn of(device: Device) -> Hardware {
        match device {
            Device::Cuda(ordinal) => Hardware::Gpu { compute_capability: crate::cuda::peak::compute_capability(ordinal) },
            _ => Hardware::Cpu { bf16_features: cpu_bf16_features() },
        }
    }
}

/// `train.precision` on `device`: `auto` is bf16 where the hardware computes it natively.
pub fn resolve(wanted: Precision, device: Device) -> ComputePrecision {
    resolve_on(wanted, &Hardware::of(device))
}

/// `train.precision` on `hardware`. `auto` is bf16 on GPUs of compute capability 8.0 or
/// newer (bf16 tensor cores) and on CPUs with AMX's tile units. With AVX512-BF16 alone,
/// libtorch's bf16 matrix products ran no faster than fp32's (141.7 against 146.6
/// GFLOP/s, 2048×512×2048, 2 threads of a Xeon, 2026-12-03) and our bf16 step at 0.55×
/// our fp32 step (the casts cost and nothing pays for them).
pub fn resolve_on(wanted: Precision, hardware: &Hardware) -> ComputePrecision {
    let (bf16, reason) = match (wanted, hardware) {
        (Precision::Fp32, _) => (false, "train.precision: fp32".to_string()),
        (Precision::Bf16, _) => (true, "train.precision: bf16".to_string()),
        (Precision::Auto, Hardware::Gpu { compute_capability: Some((major, minor)) }) if *major >= 8 => {
            (true, format!("auto: GPU of compute capability {major}.{minor} (bf16 tensor cores)"))
        }
        (Precision::Auto, Hardware::Gpu { compute_capability: Some((major, minor)) }) => {
            (false, format!("auto: GPU of compute capability {major}.{minor} has no bf16 tensor cores"))
        }
        (Precision::Auto, Hardware::Gpu { compute_capability: None }) => {
            (false, "auto: the GPU's compute capability is unknown".to_string())
        }
        (Precision::Auto, Hardware::Cpu { bf16_features }) if bf16_features.contains(&"amx_bf16") => {
            (true, "auto: this CPU has amx_bf16".to_string())
        }
        (Precision::Auto, Hardware::Cpu { bf16_features }) if bf16_features.contains(&"avx512_bf16") => {
            (false, "auto: this CPU has AVX512-BF16 but no AMX-BF16, and there bf16 is slower than fp32".to_string())
        }
        (Precision::Auto, Hardware::Cpu { .. }) => (false, "auto: this CPU has no AMX-BF16".to_string()),
    };
    ComputePrecision { bf16, reason }
}

/// The bf16 copies of the parameters and their gradients, in the flat layout.
pub struct Bf16Weights {
    values: Tensor,
    grads: Tensor,
    by_name: HashMap<String, Tensor>,
    _vars: Vec<Tensor>,
}

impl Bf16Weights {
    /// bf16 leaf variables, one per slot of `flat`, viewing one bf16 buffer; their
    /// gradients view a second one (the same aliasing as FlatParams).
    pub fn new(flat: &FlatParams) -> Bf16Weights {
        let values = flat.values.to_kind(Kind::BFloat16);
        let grads = values.zeros_like();
        let mut by_name = HashMap::new();
        let mut vars = Vec::with_capacity(flat.slots.len());
        for slot in &flat.slots {
            let var = values.narrow(0, slot.offset, slot.numel).view(slot.shape.as_slice()).detach().set_requires_grad(true);
            by_name.insert(slot.name.clone(), var.shallow_clone());
            vars.push(var);
        }
        super::flat::point_grads_into(&vars, &flat.slots, &grads);
        let mut grads = grads;
        let _ = grads.zero_();
        Bf16Weights { values, grads, by_name, _vars: vars }
    }

    /// The bf16 variable of parameter `name`.
    pub fn get(&self, name: &str) -> Option<Tensor> {
        self.by_name.get(name).map(Tensor::shallow_clone)
    }

    /// The whole bf16 buffer (the layout of `FlatParams::values`).
    pub fn buffer(&self) -> &Tensor {
        &self.values
    }

    /// Casts the fp32 master weights into the bf16 copies: one pass.
    pub fn refresh(&mut self, flat: &FlatParams) {
        tch::no_grad(|| {
            let _ = self.values.copy_(&flat.values);
        });
    }

    /// Adds the bf16 gradients of the last backward into the fp32 ones and clears them.
    pub fn flush_grads(&mut self, flat: &mut FlatParams) {
        tch::no_grad(|| {
            let _ = flat.grads.g_add_(&self.grads);
            let _ = self.grads.zero_();
        });
    }

    /// `flush_grads` for the runs (offset, elements) of the flat layout only: a staged
    /// backward flushes each stage's parameters as it completes them, the same
    /// additions, element for element, as one flush at the end.
    pub fn flush_grad_runs(&mut self, flat: &mut FlatParams, runs: &[(i64, i64)]) {
        tch::no_grad(|| {
            for &(offset, len) in runs {
                let mut bf16 = self.grads.narrow(0, offset, len);
                let _ = flat.grads.narrow(0, offset, len).g_add_(&bf16);
                let _ = bf16.zero_();
            }
        });
    }

    /// True while every bf16 variable still views the buffers.
    pub fn is_aliased(&self, flat: &FlatParams) -> bool {
        let (base_v, base_g) = (self.values.data_ptr() as usize, self.grads.data_ptr() as usize);
        flat.slots.iter().zip(&self._vars).all(|(s, v)| {
            let at = (s.offset as usize) * 2;
            v.data_ptr() as usize == base_v + at && v.grad().defined() && v.grad().data_ptr() as usize == base_g + at
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::Algpt2;
    use tch::nn::VarStore;

    #[test]
    fn bf16_copies_view_one_buffer_and_their_gradients_reach_the_fp32_ones() {
        tch::manual_seed(2);
        let cfg = ModelConfig {
            vocab_size: 40,
            n_positions: 8,
            n_embd: 16,
            embedding_size: Some(8),
            n_layer: 2,
            n_head: 2,
            ..Default::default()
        };
        let vs = VarStore::new(Device::Cpu);
        let mut model = Algpt2::new(&vs.root(), &cfg);
        let mut flat = FlatParams::new(&vs);
        let mut bf16 = Bf16Weights::new(&flat);
        model.use_compute_weights(&|name| bf16.get(name));
        assert!(bf16.is_aliased(&flat));
        let idx = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).view([1, 6]);
        Algpt2::loss(&model.forward(&idx), &idx).backward();
        bf16.flush_grads(&mut flat);
        let slot = flat.slot("h.0.attn.c_attn.weight").unwrap().clone();
        let grad = flat.grads.narrow(0, slot.offset, slot.numel);
        assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0, "the bf16 matrix's gradient did not reach the fp32 buffer");
        assert_eq!(bf16.grads.abs().sum(Kind::Float).double_value(&[]), 0.0, "bf16 gradients are cleared after the flush");
        // A change of the master weights reaches the copies at the next refresh, once.
        tch::no_grad(|| {
            let _ = flat.values.g_add_scalar_(1.0);
        });
        let before = bf16.get("h.0.attn.c_attn.weight").unwrap().to_kind(Kind::Float);
        bf16.refresh(&flat);
        let after = bf16.get("h.0.attn.c_attn.weight").unwrap().to_kind(Kind::Float);
        assert!(((after - before).mean(Kind::Float).double_value(&[]) - 1.0).abs() < 1e-2);
        assert!(bf16.is_aliased(&flat));
    }

    #[test]
    fn auto_is_bf16_only_with_hardware_for_it() {
        let cpu = |features: &[&'static str]| Hardware::Cpu { bf16_features: features.to_vec() };
        let gpu = |cc: Option<(i32, i32)>| Hardware::Gpu { compute_capability: cc };
        let auto = |hw: &Hardware| resolve_on(Precision::Auto, hw);
        // CPUs: only AMX's tile units make bf16 pay.
        assert!(auto(&cpu(&["amx_bf16", "avx512_bf16"])).bf16);
        assert!(auto(&cpu(&["amx_bf16"])).bf16);
        let avx512 = auto(&cpu(&["avx512_bf16"]));
        assert!(!avx512.bf16 && avx512.reason.contains("AVX512-BF16 but no AMX"), "{avx512:?}");
        let plain = auto(&cpu(&[]));
        assert!(!plain.bf16 && plain.reason.contains("no AMX-BF16"), "{plain:?}");
        // GPUs: bf16 tensor cores from compute capability 8.0 (A100, RTX 6000 Ada 8.9, H100 9.0).
        for cc in [(8, 0), (8, 9), (9, 0), (10, 0)] {
            let r = auto(&gpu(Some(cc)));
            assert!(r.bf16 && r.reason.contains(&format!("{}.{}", cc.0, cc.1)), "{r:?}");
        }
        for cc in [(7, 0), (7, 5), (6, 1)] {
            assert!(!auto(&gpu(Some(cc))).bf16, "{cc:?}");
        }
        assert!(!auto(&gpu(None)).bf16);
        // Every `auto` says so; an explicit precision wins on any hardware.
        for hw in [cpu(&["amx_bf16"]), cpu(&[]), gpu(Some((9, 0))), gpu(Some((7, 0)))] {
            assert!(auto(&hw).reason.starts_with("auto: "), "{hw:?}");
            assert!(resolve_on(Precision::Bf16, &hw).bf16, "{hw:?}");
            assert!(!resolve_on(Precision::Fp32, &hw).bf16, "{hw:?}");
        }
        // This machine: what `resolve` reads off it is what `resolve_on` decides for it.
        assert_eq!(resolve(Precision::Auto, Device::Cpu), auto(&Hardware::of(Device::Cpu)));
    }
}

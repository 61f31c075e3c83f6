//! The kernels of `kernels/`: compiled with NVRTC for this rank's GPU and run against
//! their CPU counterparts on the same input; without a GPU, compiled to PTX for the
//! architectures we target. And the GPU's AdamW step (libtorch's fused kernel) against
//! the CPU's, and the fused attention with dropout against the math path.

use super::Report;
use crate::cuda::kernels::Kernels;
use crate::cuda::nvrtc::{compile, KERNELS};
use anyhow::ensure;
use tch::{Device, Kind};

/// Values per test buffer: several blocks' grid-stride rounds and a ragged tail.
const N: i64 = (1 << 20) + 3;

pub fn run(r: &mut Report, device: Device) {
    let Device::Cuda(ordinal) = device else {
        let archs = ["sm_80", "sm_90"];
        for (file, source) in KERNELS {
            let compiled: anyhow::Result<String> = archs
                .iter()
                .map(|arch| compile(file, source, arch, None).map(|ptx| ptx.len()))
                .collect::<anyhow::Result<Vec<_>>>()
                .map(|sizes| format!("PTX for {} ({} bytes)", archs.join(", "), sizes.iter().sum::<usize>()));
            r.outcome(format!("NVRTC kernels/{file}"), compiled);
        }
        r.skip("GPU kernels and AdamW vs CPU", "no GPU on this rank (kernels were compiled to PTX only)");
        return;
    };
    match Kernels::load(ordinal, None) {
        Ok(k) => {
            r.pass("NVRTC kernels/", format!("{} files compiled for {} and loaded on cuda:{ordinal}", KERNELS.len(), k.arch()));
            r.outcome("kernel dropout_mask", dropout_masks(device));
        }
        Err(e) => r.fail("NVRTC kernels/", format!("{e:#}")),
    }
    r.outcome("AdamW step (libtorch fused)", adamw(device));
    r.outcome("attention with dropout (libtorch fused) vs math path", crate::model::gpt::fused_attention_against_the_math_path(device));
}

/// Masks made on the GPU equal the CPU generator's bit for bit (resume and rank
/// equivalence rely on the masks being a function of their coordinates only).
fn dropout_masks(device: Device) -> anyhow::Result<String> {
    let d = crate::model::dropout::Dropout::new(0.1, 1337, 12, 1, 3);
    let shape = [N];
    let gpu = d.mask(7, &shape, device)?.to_device(Device::Cpu);
    let cpu = d.host_mask(7, &shape);
    ensure!(gpu.equal(&cpu), "GPU and CPU dropout masks differ in {} of {N} values", gpu.ne_tensor(&cpu).sum(Kind::Int64).int64_value(&[]));
    Ok(format!("{N} values identical to the CPU generator"))
}

/// The step's AdamW on the GPU (libtorch's fused kernel) against the CPU's over a few
/// steps, one clipped and one skipped.
fn adamw(device: Device) -> anyhow::Result<String> {
    let d = crate::optim::adamw::compare_with_cpu(device)?;
    ensure!(d.within_rounding(), "{d}");
    Ok(d.to_string())
}

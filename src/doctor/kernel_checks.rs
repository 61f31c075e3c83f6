//! The kernels of `kernels/`: compiled with NVRTC for this rank's GPU and run against
//! libtorch's computation of the same thing on random data; without a GPU, compiled to
//! PTX for the architectures we target.

use super::Report;
use crate::cuda::kernels::{AdamWStep, Kernels};
use crate::cuda::nvrtc::{compile, KERNELS};
use crate::optim::adamw::{update, AdamWHyper};
use anyhow::ensure;
use tch::{Device, Kind, Tensor};

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
        r.skip("kernels vs libtorch", "no GPU on this rank (kernels were compiled to PTX only)");
        return;
    };
    let kernels = match Kernels::load(ordinal, None) {
        Ok(k) => {
            r.pass("NVRTC kernels/", format!("{} files compiled for {} and loaded on cuda:{ordinal}", KERNELS.len(), k.arch()));
            k
        }
        Err(e) => {
            r.fail("NVRTC kernels/", format!("{e:#}"));
            return;
        }
    };
    r.outcome("kernel adamw_step", adamw(&kernels, device));
    r.outcome("kernel grad_norm_sq", grad_norm(&kernels, device));
    r.outcome("kernel bf16 casts", bf16_casts(&kernels, device));
    r.outcome("kernel dropout_mask", dropout_masks(device));
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

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// The fused update against `optim::adamw::update`, the libtorch path the trainer uses.
fn adamw(k: &Kernels, device: Device) -> anyhow::Result<String> {
    tch::manual_seed(11);
    let opts = (Kind::Float, device);
    let params = Tensor::randn([N], opts);
    let grads = Tensor::randn([N], opts) * 1e-2;
    let exp_avg = Tensor::randn([N], opts) * 1e-3;
    let exp_avg_sq = Tensor::rand([N], opts) * 1e-5;
    let (ref_p, ref_m, ref_v) = (params.copy(), exp_avg.copy(), exp_avg_sq.copy());
    let decay_len = N / 2;
    let h = AdamWHyper { lr: 6e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 7 };
    update(&ref_p, &grads, &ref_m, &ref_v, decay_len, &h);
    let step = AdamWStep {
        lr: h.lr as f32,
        beta1: h.beta1 as f32,
        beta2: h.beta2 as f32,
        eps: h.eps as f32,
        weight_decay: h.weight_decay as f32,
        bias_correction1: (1.0 - h.beta1.powi(h.step as i32)) as f32,
        bias_correction2_sqrt: (1.0 - h.beta2.powi(h.step as i32)).sqrt() as f32,
    };
    k.adamw_step(&params, &grads, &exp_avg, &exp_avg_sq, decay_len, &step)?;
    let (ep, em, ev) = (max_abs(&params, &ref_p), max_abs(&exp_avg, &ref_m), max_abs(&exp_avg_sq, &ref_v));
    // The update is ~lr; both round in f32 (the kernel's scalars are f32, libtorch's f64).
    ensure!(ep <= 2e-6 && em <= 1e-9 && ev <= 1e-11, "max |kernel - libtorch|: params {ep:.2e}, exp_avg {em:.2e}, exp_avg_sq {ev:.2e}");
    Ok(format!("{N} values, max error params {ep:.2e}, exp_avg {em:.2e}, exp_avg_sq {ev:.2e}"))
}

/// Sum of squares against libtorch in f64, and the non-finite count of planted NaN/Inf.
fn grad_norm(k: &Kernels, device: Device) -> anyhow::Result<String> {
    tch::manual_seed(12);
    let grads = Tensor::randn([N], (Kind::Float, device));
    let (sum_sq, nonfinite) = k.grad_norm_sq(&grads)?;
    let expected = grads.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]);
    let got = sum_sq.double_value(&[0]);
    let rel = (got - expected).abs() / expected;
    ensure!(
        rel <= 1e-12 && nonfinite.int64_value(&[0]) == 0,
        "sum of squares {got} vs libtorch {expected} (relative {rel:.1e}), non-finite {}",
        nonfinite.int64_value(&[0])
    );
    let planted = [(5, f64::NAN), (N / 3, f64::INFINITY), (N - 1, f64::NEG_INFINITY), (N / 2, f64::NAN)];
    for (i, v) in planted {
        let _ = grads.get(i).fill_(v);
    }
    let expected_bad = grads.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
    let (_, nonfinite) = k.grad_norm_sq(&grads)?;
    let bad = nonfinite.int64_value(&[0]);
    ensure!(bad == expected_bad && bad == planted.len() as i64, "non-finite count {bad}, libtorch counts {expected_bad}");
    Ok(format!("norm {:.6} (relative error {rel:.1e}), {bad} of {bad} planted non-finite values counted", got.sqrt()))
}

/// f32 → bf16 must round as libtorch does (to nearest even), bit for bit; bf16 → f32 × s
/// likewise.
fn bf16_casts(k: &Kernels, device: Device) -> anyhow::Result<String> {
    tch::manual_seed(13);
    let specials = Tensor::from_slice(&[f32::INFINITY, f32::NEG_INFINITY, -0.0, 1e-40, f32::MAX, 1.0 + f32::EPSILON]).to_device(device);
    let src = Tensor::cat(&[Tensor::randn([N], (Kind::Float, device)) * 3.0, specials], 0);
    let ours = Tensor::empty([src.numel() as i64], (Kind::BFloat16, device));
    k.f32_to_bf16(&src, &ours)?;
    let theirs = src.to_kind(Kind::BFloat16);
    let differing = ours.view_dtype(Kind::Int16).ne_tensor(&theirs.view_dtype(Kind::Int16)).sum(Kind::Int64).int64_value(&[]);
    ensure!(differing == 0, "f32_to_bf16: {differing} values differ from libtorch's rounding");
    let back = Tensor::empty([src.numel() as i64], (Kind::Float, device));
    k.bf16_to_f32_scaled(&ours, &back, 0.5)?;
    let expected = theirs.to_kind(Kind::Float) * 0.5;
    let differing_back = back.view_dtype(Kind::Int).ne_tensor(&expected.view_dtype(Kind::Int)).sum(Kind::Int64).int64_value(&[]);
    ensure!(differing_back == 0, "bf16_to_f32_scaled: {differing_back} values differ from libtorch's");
    Ok(format!("{} values each way, max error 0 (bit-identical to libtorch)", src.numel()))
}

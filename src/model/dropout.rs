//! Dropout masks from a counter-based generator: the keep/drop bit of element `i` at
//! dropout site `s` is a pure function of (seed, step, micro-step, rank, site, i). No
//! generator state exists, so a resumed run draws the same masks, and a mask costs one
//! hash per four elements instead of libtorch's per-element Bernoulli draws.
//!
//! Each 64-bit SplitMix64 output gives four 16-bit uniforms; an element is kept when its
//! uniform is at or above `threshold = round(p · 65536)`. Kept elements are scaled by
//! `65536 / (65536 − threshold)`, the reciprocal of the exact keep rate, so the
//! expectation of every activation is unchanged.

use anyhow::Context;
use tch::{Device, Kind, Tensor};

/// Sites of one forward pass: the embeddings, then three per layer application.
pub mod site {
    pub const EMBEDDING: u64 = 0;
    /// The site as errors name it: `embeddings`, `layer 3 attention output`, ...
    pub fn describe(site: u64) -> String {
        let Some(after) = site.checked_sub(1) else { return "embeddings".to_string() };
        let what = ["attention probabilities", "attention output", "MLP output"][(after % 3) as usize];
        format!("layer {} {what}", after / 3)
    }
    pub fn attention_probs(layer: usize) -> u64 {
        1 + 3 * layer as u64
    }
    pub fn attention_out(layer: usize) -> u64 {
        2 + 3 * layer as u64
    }
    pub fn mlp_out(layer: usize) -> u64 {
        3 + 3 * layer as u64
    }
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// Masks at least this large are filled by two threads.
const PARALLEL_ELEMENTS: usize = 1 << 20;

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The dropout of one micro-step on one rank.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f64,
    key: u64,
    threshold: u32,
}

impl Dropout {
    /// `p` in [0, 1); the key mixes every coordinate so that neighbouring steps, micro-steps
    /// and ranks get unrelated streams.
    pub fn new(p: f64, seed: u64, step: u64, micro_step: usize, rank: usize) -> Dropout {
        let mut key = mix64(seed ^ 0x5EED_D80F_0000_0001);
        for part in [step, micro_step as u64, rank as u64] {
            key = mix64(key ^ part.wrapping_mul(GOLDEN).wrapping_add(0x2545_F491_4F6C_DD1D));
        }
        let threshold = (p * 65536.0).round().clamp(0.0, 65535.0) as u32;
        Dropout { p, key, threshold }
    }

    /// True when nothing is dropped (p rounds to 0 at 16-bit resolution).
    pub fn is_identity(&self) -> bool {
        self.threshold == 0
    }

    /// The factor kept elements are multiplied by: 1 / (exact keep rate).
    pub fn scale(&self) -> f64 {
        65536.0 / (65536 - self.threshold) as f64
    }

    /// The key of `site`'s mask, a function of (seed, step, micro-step, rank, site) only;
    /// also the seed of the fused attention's dropout on a GPU (model/gpt.rs).
    pub fn site_key(&self, site: u64) -> u64 {
        mix64(self.key ^ site.wrapping_mul(0xD1B5_4A32_D192_ED03).wrapping_add(GOLDEN))
    }

    /// The mask values of `site` into `out`: `one` where kept, `zero` where dropped.
    fn fill<T: Copy + Send + Sync>(&self, site: u64, out: &mut [T], one: T, zero: T) {
        let key = self.site_key(site);
        let threshold = self.threshold;
        let fill_part = |part: &mut [T], first_group: u64| {
            for (j, quad) in part.chunks_mut(4).enumerate() {
                let bits = mix64(key.wrapping_add((first_group + j as u64).wrapping_mul(GOLDEN)));
                for (lane, x) in quad.iter_mut().enumerate() {
                    let uniform = ((bits >> (16 * lane)) & 0xFFFF) as u32;
                    *x = if uniform >= threshold { one } else { zero };
                }
            }
        };
        if out.len() < PARALLEL_ELEMENTS {
            fill_part(out, 0);
            return;
        }
        // Split on a multiple of 4 so each element keeps its group and lane.
        let half = (out.len() / 8) * 4;
        let (a, b) = out.split_at_mut(half);
        std::thread::scope(|s| {
            s.spawn(|| fill_part(a, 0));
            fill_part(b, (half / 4) as u64);
        });
    }

    /// The mask of `site` on `device`, shaped `shape`: fp32, 0 where dropped and
    /// `scale()` where kept (fp32 so that the scale is exact whatever the compute type;
    /// multiplying a bf16 activation by it gives an fp32 result). On a GPU it is made by
    /// kernels/dropout.cu, which can fail (kernels not loaded, a failed launch): an error
    /// naming the site and the GPU, for the step to return.
    pub fn mask(&self, site: u64, shape: &[i64], device: Device) -> anyhow::Result<Tensor> {
        #[cfg(test)]
        tests::injected_failure(site)?;
        match device {
            Device::Cuda(ordinal) => self
                .gpu_mask(site, shape, ordinal)
                .with_context(|| format!("dropout mask of the {} on cuda:{ordinal}", site::describe(site))),
            _ => Ok(self.host_mask(site, shape).to_device(device)),
        }
    }

    /// The same bits as `host_mask`, made on GPU `ordinal` (no copy of the mask).
    fn gpu_mask(&self, site: u64, shape: &[i64], ordinal: usize) -> anyhow::Result<Tensor> {
        // The kernels first: without them there is no GPU to allocate on either.
        let kernels = crate::cuda::kernels::shared(ordinal)?;
        let out = Tensor::f_empty(shape, (Kind::Float, Device::Cuda(ordinal)))?;
        kernels.dropout_mask(&out, self.site_key(site), self.threshold, self.scale() as f32)?;
        Ok(out)
    }

    /// The mask made on the CPU (what the GPU kernel is checked against).
    pub fn host_mask(&self, site: u64, shape: &[i64]) -> Tensor {
        let out = Tensor::empty(shape, (Kind::Float, Device::Cpu));
        let n = out.numel();
        if n == 0 {
            return out;
        }
        // SAFETY: a fresh contiguous fp32 CPU tensor of n values, written only here.
        let values = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n) };
        self.fill(site, values, self.scale() as f32, 0.0);
        out
    }

    /// `x` with dropout, in fp32.
    pub fn apply(&self, site: u64, x: &Tensor) -> anyhow::Result<Tensor> {
        if self.is_identity() {
            return Ok(x.to_kind(Kind::Float));
        }
        Ok(x * self.mask(site, &x.size(), x.device())?)
    }

    /// `residual + dropout(branch)` in one pass (addcmul), in fp32.
    pub fn add_to(&self, site: u64, residual: &Tensor, branch: &Tensor) -> anyhow::Result<Tensor> {
        if self.is_identity() {
            return Ok(residual + branch);
        }
        Ok(residual.addcmul(branch, &self.mask(site, &branch.size(), branch.device())?))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// A site whose mask fails on this thread (the failure of a GPU mask, without a GPU).
        static FAILING_SITE: Cell<Option<u64>> = const { Cell::new(None) };
    }

    /// Makes `mask` fail at `site` on the calling thread while `f` runs.
    pub(crate) fn with_failing_mask<T>(site: u64, f: impl FnOnce() -> T) -> T {
        FAILING_SITE.with(|s| s.set(Some(site)));
        let out = f();
        FAILING_SITE.with(|s| s.set(None));
        out
    }

    pub(super) fn injected_failure(site: u64) -> anyhow::Result<()> {
        match FAILING_SITE.with(|s| s.get()) {
            Some(failing) if failing == site => Err(anyhow::anyhow!("injected mask failure"))
                .with_context(|| format!("dropout mask of the {} on cuda:0", site::describe(site))),
            _ => Ok(()),
        }
    }

    fn keep_fraction(m: &Tensor) -> f64 {
        m.to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
    }

    #[test]
    fn keep_rate_matches_p_at_every_size_and_both_kinds() {
        let d = Dropout::new(0.1, 7, 3, 0, 0);
        for n in [4096i64, 1 << 21] {
            let kept = keep_fraction(&d.mask(5, &[n], Device::Cpu).unwrap().gt(0.0));
            // Binomial: 5 standard deviations.
            let sd = (0.09 / n as f64).sqrt();
            assert!((kept - 0.9).abs() < 5.0 * sd + 2e-5, "n={n}: kept {kept}");
        }
        assert!((d.scale() - 65536.0 / (65536.0 - 6554.0)).abs() < 1e-12);
    }

    #[test]
    fn masks_are_a_pure_function_of_their_coordinates() {
        let a = Dropout::new(0.1, 1, 2, 3, 4).mask(9, &[3000], Device::Cpu).unwrap();
        let b = Dropout::new(0.1, 1, 2, 3, 4).mask(9, &[3000], Device::Cpu).unwrap();
        assert!(a.equal(&b));
        // The parallel fill gives the same bits as the serial one would for its prefix.
        let big = Dropout::new(0.1, 1, 2, 3, 4).mask(9, &[1 << 21], Device::Cpu).unwrap();
        assert!(big.narrow(0, 0, 3000).equal(&a));
    }

    /// Masks of different sites, layers, steps, micro-steps, ranks and seeds are
    /// independent: the fraction kept by both of two masks is keep², within noise.
    #[test]
    fn masks_are_independent_across_sites_layers_steps_and_ranks() {
        let n = 1i64 << 18;
        let base = Dropout::new(0.1, 42, 10, 0, 0);
        let m0 = base.mask(site::attention_out(0), &[n], Device::Cpu).unwrap();
        let others = [
            base.mask(site::mlp_out(0), &[n], Device::Cpu).unwrap(),
            base.mask(site::attention_out(1), &[n], Device::Cpu).unwrap(),
            base.mask(site::EMBEDDING, &[n], Device::Cpu).unwrap(),
            Dropout::new(0.1, 42, 11, 0, 0).mask(site::attention_out(0), &[n], Device::Cpu).unwrap(),
            Dropout::new(0.1, 42, 10, 1, 0).mask(site::attention_out(0), &[n], Device::Cpu).unwrap(),
            Dropout::new(0.1, 42, 10, 0, 1).mask(site::attention_out(0), &[n], Device::Cpu).unwrap(),
            Dropout::new(0.1, 43, 10, 0, 0).mask(site::attention_out(0), &[n], Device::Cpu).unwrap(),
        ];
        let sd = (0.81 * (1.0 - 0.81) / n as f64).sqrt();
        for (i, other) in others.iter().enumerate() {
            let both = keep_fraction(&(m0.gt(0.0).logical_and(&other.gt(0.0))));
            assert!((both - 0.81).abs() < 5.0 * sd, "mask {i}: both kept {both}");
            assert!(!m0.equal(other), "mask {i} equals the base mask");
        }
        // Neighbouring elements are independent too (lag-1 and lag-4 products).
        for lag in [1, 4] {
            let both = keep_fraction(&(m0.narrow(0, 0, n - lag).gt(0.0).logical_and(&m0.narrow(0, lag, n - lag).gt(0.0))));
            assert!((both - 0.81).abs() < 5.0 * sd, "lag {lag}: {both}");
        }
    }

    #[test]
    fn applying_keeps_the_expectation() {
        let d = Dropout::new(0.25, 3, 0, 0, 0);
        let x = Tensor::ones([1 << 20], (Kind::Float, Device::Cpu));
        let y = d.apply(1, &x).unwrap();
        let mean = y.mean(Kind::Double).double_value(&[]);
        assert!((mean - 1.0).abs() < 5e-3, "{mean}");
        let z = d.add_to(1, &x, &x).unwrap();
        assert!(((z - 1.0) - y).abs().max().double_value(&[]) < 1e-6);
        assert!(Dropout::new(0.0, 1, 1, 1, 1).is_identity());
    }

    /// A mask asked of a GPU that does not exist (any GPU, on a machine without CUDA)
    /// fails as the kernels' failure to load would on a real one: an error naming the
    /// site, its layer and the device, not a panic.
    #[test]
    fn a_mask_on_a_missing_gpu_is_an_error_naming_its_site_and_device() {
        let missing = tch::Cuda::device_count() as usize;
        let made = Dropout::new(0.1, 1, 2, 3, 4).mask(site::mlp_out(2), &[64], Device::Cuda(missing));
        let text = format!("{:#}", made.expect_err("a mask on a GPU that does not exist"));
        assert!(text.starts_with(&format!("dropout mask of the layer 2 MLP output on cuda:{missing}: ")), "{text}");
        assert!(text.contains(&format!("GPU {missing}")), "the cause is kept: {text}");
    }

    #[test]
    fn sites_are_named_by_layer_and_place() {
        assert_eq!(site::describe(site::EMBEDDING), "embeddings");
        assert_eq!(site::describe(site::attention_probs(0)), "layer 0 attention probabilities");
        assert_eq!(site::describe(site::attention_out(3)), "layer 3 attention output");
        assert_eq!(site::describe(site::mlp_out(11)), "layer 11 MLP output");
    }
}

//! Packing and sampling: the token stream is cut into windows of `seq_len + 1` tokens
//! (consecutive windows share one token, so every token after the first is a target
//! exactly once); training draws them in a seeded per-epoch order, each rank taking a
//! disjoint slice of every global batch.

use super::token_file::TokenFile;
use crate::rng::SplitMix64;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

/// Windows in a stream of `tokens` tokens: targets `1..tokens` in non-overlapping runs of
/// `seq_len`, the incomplete tail left out.
pub fn window_count(tokens: u64, seq_len: usize) -> u64 {
    tokens.saturating_sub(1) / seq_len as u64
}

/// Where the sampler stands: `offset` windows of epoch `epoch` consumed. It is global
/// (not per rank), so a run resumes with another world size at the same global batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    pub offset: u64,
    /// Windows in an epoch (absent in checkpoints from before it was recorded). A resume
    /// with another `train.seq_len` has another count: see [`Sampler::restore`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<u64>,
}

/// Draws training windows: every epoch is a fresh permutation of all windows, fixed by
/// the seed and the epoch number; batches run on across epoch ends, so each epoch is
/// used exactly once.
pub struct Sampler {
    windows: u64,
    seed: u64,
    position: u64,
    order: Vec<u32>,
    order_epoch: Option<u64>,
}

impl Sampler {
    pub fn new(windows: u64, seed: u64) -> Sampler {
        assert!(windows > 0 && windows <= u32::MAX as u64, "window count {windows} out of range");
        Sampler { windows, seed, position: 0, order: Vec::new(), order_epoch: None }
    }

    pub fn windows(&self) -> u64 {
        self.windows
    }

    pub fn state(&self) -> SamplerState {
        SamplerState { epoch: self.position / self.windows, offset: self.position % self.windows, windows: Some(self.windows) }
    }

    /// Continues from a saved position; one that cannot be in its data is an error.
    ///
    /// Saved with another window count (another `train.seq_len`: windows of 16 tokens are
    /// twice as many as of 32), the offset in windows no longer means the same place, and
    /// kept as it was it moved the epoch back (8.7e-4 to 4.8e-4 for 32 → 16) or past the
    /// end of the epoch (an error for 16 → 32). It continues instead after the same share
    /// of its epoch, rounded up so that the epoch count never goes back: that share of the
    /// epoch's tokens is counted as consumed. Which windows the rest of the epoch draws
    /// cannot follow on exactly: windows of another length are other stretches of text,
    /// in another order.
    pub fn restore(&mut self, state: SamplerState) -> anyhow::Result<()> {
        let saved_windows = state.windows.unwrap_or(self.windows);
        let offset =
            (state.offset < saved_windows).then(|| (state.offset as u128 * self.windows as u128).div_ceil(saved_windows as u128) as u64);
        let position = offset.and_then(|offset| state.epoch.checked_mul(self.windows)?.checked_add(offset));
        let Some(position) = position else {
            anyhow::bail!("sampler position (epoch {}, offset {}) does not fit data of {saved_windows} windows", state.epoch, state.offset,);
        };
        self.position = position;
        Ok(())
    }

    /// The windows of the next global batch of `size`, in order; advances the sampler.
    pub fn next_batch(&mut self, size: usize) -> Vec<u64> {
        (0..size)
            .map(|_| {
                let SamplerState { epoch, offset, .. } = self.state();
                self.position += 1;
                self.order_of(epoch)[offset as usize] as u64
            })
            .collect()
    }

    fn order_of(&mut self, epoch: u64) -> &[u32] {
        if self.order_epoch != Some(epoch) {
            let mut rng = SplitMix64::new(self.seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
            self.order = (0..self.windows as u32).collect();
            rng.shuffle(&mut self.order);
            self.order_epoch = Some(epoch);
        }
        &self.order
    }
}

/// The part of a global batch that `rank` feeds in micro-step `micro_step`: micro-step m
/// covers `micro_batch × world` consecutive windows and rank r the r-th run of
/// `micro_batch` among them, so that one rank with micro-batch 2B sees what two ranks with
/// B see together.
pub fn rank_slice(batch: &[u64], micro_step: usize, micro_batch: usize, world: usize, rank: usize) -> &[u64] {
    let start = (micro_step * world + rank) * micro_batch;
    &batch[start..start + micro_batch]
}

/// Evaluation windows of `rank`: every `world`-th window of the first `limit` (all when
/// None), so the ranks together read each window once.
pub fn eval_windows(windows: u64, limit: Option<u64>, world: usize, rank: usize) -> impl Iterator<Item = u64> {
    let end = limit.map_or(windows, |l| l.min(windows));
    (rank as u64..end).step_by(world)
}

/// The input token ids of the given windows (each window's first `seq_len` tokens).
pub fn input_ids(tokens: &TokenFile, windows: &[u64], seq_len: usize) -> Vec<i64> {
    let mut ids = Vec::with_capacity(windows.len() * seq_len);
    for &w in windows {
        tokens.extend_range(w * seq_len as u64, seq_len, &mut ids);
    }
    ids
}

/// Inputs and targets [windows, seq_len] of the given windows, on `device`: window w
/// holds tokens `w·seq_len ..= (w+1)·seq_len`, inputs its first `seq_len`, targets its last.
pub fn batch_tensors(tokens: &TokenFile, windows: &[u64], seq_len: usize, device: Device) -> (Tensor, Tensor) {
    let mut ids = Vec::with_capacity(windows.len() * (seq_len + 1));
    for &w in windows {
        tokens.extend_range(w * seq_len as u64, seq_len + 1, &mut ids);
    }
    let all = Tensor::from_slice(&ids).view([windows.len() as i64, seq_len as i64 + 1]).to_device(device);
    (all.narrow(1, 0, seq_len as i64), all.narrow(1, 1, seq_len as i64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn windows_cover_every_target_once() {
        assert_eq!(window_count(0, 4), 0);
        assert_eq!(window_count(4, 4), 0);
        assert_eq!(window_count(5, 4), 1);
        assert_eq!(window_count(13, 4), 3);
    }

    #[test]
    fn each_epoch_is_a_permutation_used_exactly_once() {
        let mut s = Sampler::new(10, 42);
        let drawn = s.next_batch(30); // three epochs, batches crossing epoch ends
        for epoch in drawn.chunks(10) {
            let set: HashSet<_> = epoch.iter().collect();
            assert_eq!(set.len(), 10);
        }
        assert_ne!(drawn[..10], drawn[10..20], "epochs are shuffled differently");
        assert_eq!(s.state(), SamplerState { epoch: 3, offset: 0, windows: Some(10) });
    }

    #[test]
    fn same_seed_same_order_other_seed_other_order() {
        let a = Sampler::new(100, 1).next_batch(100);
        assert_eq!(a, Sampler::new(100, 1).next_batch(100));
        assert_ne!(a, Sampler::new(100, 2).next_batch(100));
    }

    #[test]
    fn restored_sampler_continues_exactly() {
        let mut full = Sampler::new(37, 7);
        let mut first = Sampler::new(37, 7);
        let whole: Vec<u64> = (0..9).flat_map(|_| full.next_batch(12)).collect();
        let mut resumed: Vec<u64> = (0..4).flat_map(|_| first.next_batch(12)).collect();
        let state = first.state();
        let mut second = Sampler::new(37, 7);
        second.restore(state).unwrap();
        resumed.extend((0..5).flat_map(|_| second.next_batch(12)));
        assert_eq!(whole, resumed);
    }

    /// A state saved with another window count (another seq_len) continues after the same
    /// share of its epoch, rounded up: the epoch never goes back, whichever way the count
    /// changes. Without a recorded count (an older checkpoint) the offset is taken as is.
    #[test]
    fn restored_with_another_window_count_keeps_the_share_of_the_epoch() {
        let epoch = |s: &Sampler| s.state().epoch as f64 + s.state().offset as f64 / s.windows() as f64;
        for (saved, now) in [(1000, 2001), (2001, 1000), (7, 3), (3, 7)] {
            for offset in 0..saved.min(50) {
                let state = SamplerState { epoch: 2, offset, windows: Some(saved) };
                let mut s = Sampler::new(now, 1);
                s.restore(state).unwrap();
                let before = 2.0 + offset as f64 / saved as f64;
                assert!(epoch(&s) >= before && epoch(&s) - before <= 1.0 / now as f64 + 1e-12, "{saved} -> {now}, offset {offset}");
            }
        }
        let mut s = Sampler::new(10, 1);
        s.restore(SamplerState { epoch: 1, offset: 9, windows: None }).unwrap();
        assert_eq!(s.state(), SamplerState { epoch: 1, offset: 9, windows: Some(10) });
        for bad in [
            SamplerState { epoch: 1, offset: 10, windows: None },
            SamplerState { epoch: 1, offset: 5, windows: Some(5) },
            SamplerState { epoch: 1, offset: 0, windows: Some(0) },
            SamplerState { epoch: u64::MAX, offset: 0, windows: Some(5) },
        ] {
            assert!(s.restore(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rank_slices_are_disjoint_and_cover_the_batch() {
        let (micro, world, accum) = (3, 2, 2);
        let batch: Vec<u64> = (100..100 + (micro * world * accum) as u64).collect();
        let mut seen = Vec::new();
        for m in 0..accum {
            for r in 0..world {
                seen.extend_from_slice(rank_slice(&batch, m, micro, world, r));
            }
        }
        assert_eq!(seen, batch);
        // One rank with micro-batch 2B sees in micro-step m what two ranks with B see.
        let two: Vec<u64> = [rank_slice(&batch, 1, 3, 2, 0), rank_slice(&batch, 1, 3, 2, 1)].concat();
        assert_eq!(two, rank_slice(&batch, 1, 6, 1, 0));
    }

    #[test]
    fn eval_windows_split_across_ranks_without_overlap() {
        let r0: Vec<u64> = eval_windows(7, None, 2, 0).collect();
        let r1: Vec<u64> = eval_windows(7, None, 2, 1).collect();
        assert_eq!(r0, vec![0, 2, 4, 6]);
        assert_eq!(r1, vec![1, 3, 5]);
        assert_eq!(eval_windows(7, Some(3), 1, 0).count(), 3);
    }
}

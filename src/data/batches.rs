//! Packing and sampling: the token stream is cut into windows of `seq_len + 1` tokens
//! (consecutive windows share one token, so every token after the first is a target
//! exactly once); training draws them in a seeded per-epoch order, each rank taking a
//! disjoint slice of every global batch.

use super::token_file::TokenFile;
use crate::host_to_device;
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
/// The copy does not make the host wait (`host_to_device`).
pub fn batch_tensors(tokens: &TokenFile, windows: &[u64], seq_len: usize, device: Device) -> (Tensor, Tensor) {
    let mut ids = Vec::with_capacity(windows.len() * (seq_len + 1));
    for &w in windows {
        tokens.extend_range(w * seq_len as u64, seq_len + 1, &mut ids);
    }
    let all = host_to_device::upload(&Tensor::from_slice(&ids).view([windows.len() as i64, seq_len as i64 + 1]), device);
    (all.narrow(1, 0, seq_len as i64), all.narrow(1, 1, seq_len as i64))
}

/// One rank's micro-batches of one global batch, each made one micro-step ahead: called
/// once micro-step m's forward is queued, `prepare(m + 1)` gathers the next windows'
/// tokens and queues their copy, so on a GPU the host does that while the forward runs,
/// and m's backward is queued behind the copy without the host having waited. On the CPU
/// every operation runs as it is called, so nothing overlaps there: the same tensors are
/// made at another moment, the results are the same bits.
pub struct MicroBatches<'a> {
    tokens: &'a TokenFile,
    batch: &'a [u64],
    micro_batch: usize,
    seq_len: usize,
    world: usize,
    rank: usize,
    device: Device,
    /// The micro-step made ahead, and its inputs and targets.
    ahead: Option<(usize, (Tensor, Tensor))>,
}

impl<'a> MicroBatches<'a> {
    /// The micro-batches of `rank` of `world` in `batch` (`rank_slice`'s layout).
    pub fn new(
        tokens: &'a TokenFile,
        batch: &'a [u64],
        micro_batch: usize,
        seq_len: usize,
        world: usize,
        rank: usize,
        device: Device,
    ) -> Self {
        MicroBatches { tokens, batch, micro_batch, seq_len, world, rank, device, ahead: None }
    }

    /// Micro-steps in the batch.
    pub fn len(&self) -> usize {
        self.batch.len() / (self.micro_batch * self.world)
    }

    /// This rank's windows in micro-step `micro`.
    pub fn windows(&self, micro: usize) -> &'a [u64] {
        rank_slice(self.batch, micro, self.micro_batch, self.world, self.rank)
    }

    /// Inputs and targets of micro-step `micro`: those made ahead, or made now.
    pub fn take(&mut self, micro: usize) -> (Tensor, Tensor) {
        match self.ahead.take() {
            Some((m, tensors)) if m == micro => tensors,
            _ => batch_tensors(self.tokens, self.windows(micro), self.seq_len, self.device),
        }
    }

    /// Makes micro-step `micro`'s tensors now, for `take` (nothing past the last).
    pub fn prepare(&mut self, micro: usize) {
        if micro < self.len() {
            self.ahead = Some((micro, batch_tensors(self.tokens, self.windows(micro), self.seq_len, self.device)));
        }
    }
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

    /// Each micro-step's tensors, whether made ahead (`prepare`) or when taken, hold its
    /// windows' tokens: inputs the first `seq_len` of each, targets the last.
    #[test]
    fn micro_batches_made_ahead_hold_their_windows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        let mut w = crate::data::token_file::TokenWriter::create(&path, 2, &[0; 32]).unwrap();
        w.push(&(0..100u32).map(|i| i * 7 % 300).collect::<Vec<_>>()).unwrap();
        w.finish().unwrap();
        let tokens = TokenFile::open(&path).unwrap();
        let (micro, world, seq_len) = (3, 2, 4);
        let batch: Vec<u64> = (0..12).rev().collect();
        let expected = |windows: &[u64]| -> (Vec<i64>, Vec<i64>) {
            let at = |w: u64, j: u64| tokens.get(w * seq_len as u64 + j) as i64;
            (
                windows.iter().flat_map(|&w| (0..4).map(move |j| at(w, j))).collect(),
                windows.iter().flat_map(|&w| (1..5).map(move |j| at(w, j))).collect(),
            )
        };
        let values = |t: &Tensor| Vec::<i64>::try_from(t.reshape([-1])).unwrap();
        for rank in 0..world {
            let mut feed = MicroBatches::new(&tokens, &batch, micro, seq_len, world, rank, Device::Cpu);
            assert_eq!(feed.len(), 2);
            // Made when taken, then made ahead; ahead past the last micro-step is nothing.
            let first = feed.take(0);
            feed.prepare(1);
            feed.prepare(2);
            let second = feed.take(1);
            for (m, (inputs, targets)) in [(0, first), (1, second)] {
                let windows = rank_slice(&batch, m, micro, world, rank);
                assert_eq!(feed.windows(m), windows);
                assert_eq!(inputs.size(), vec![micro as i64, seq_len as i64]);
                assert_eq!((values(&inputs), values(&targets)), expected(windows), "rank {rank}, micro-step {m}");
            }
        }
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

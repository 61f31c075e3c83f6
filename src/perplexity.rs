//! Perplexity: exp(mean token cross-entropy) over non-overlapping windows of a split,
//! each rank taking every world-size-th window and the sums combined across ranks, so the
//! result is the same at any world size. Used by training (validation, test) and `eval`.

use crate::data::batches::{batch_tensors, eval_windows};
use crate::data::cache::SplitData;
use crate::model::Algpt2;
use crate::parallel::World;
use serde::Serialize;
use tch::{Device, Kind, Reduction};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Evaluation {
    pub loss: f64,
    pub ppl: f64,
    pub tokens: u64,
    pub windows: u64,
}

/// Evaluates the first `limit` windows of `split` (all when None), `batch` windows at a
/// time per rank, without dropout or gradients.
pub fn evaluate(
    model: &Algpt2,
    split: &SplitData,
    seq_len: usize,
    batch: usize,
    limit: Option<u64>,
    world: &World,
    device: Device,
) -> Evaluation {
    let mine: Vec<u64> = eval_windows(split.windows(seq_len), limit, world.size(), world.rank()).collect();
    let mut totals = [0f64, 0f64, 0f64]; // loss sum, tokens, windows
                                         // Summed on the device and read once.
    let mut loss_sum = tch::Tensor::zeros([], (Kind::Double, device));
    tch::no_grad(|| {
        for chunk in mine.chunks(batch.max(1)) {
            let (inputs, targets) = batch_tensors(&split.tokens, chunk, seq_len, device);
            let logits = model.forward(&inputs);
            let v = logits.size()[2];
            // Per-token losses summed in f64: the total then hardly depends on how the
            // windows were batched, i.e. on the world size.
            let per_token = logits.view([-1, v]).to_kind(Kind::Float).cross_entropy_loss::<tch::Tensor>(
                &targets.reshape([-1]),
                None,
                Reduction::None,
                -100,
                0.0,
            );
            loss_sum += per_token.to_kind(Kind::Double).sum(Kind::Double);
            totals[1] += targets.numel() as f64;
            totals[2] += chunk.len() as f64;
            crate::faults::slow_eval_batch(world.rank());
            // A long evaluation is progress, batch by batch, for the watchdog.
            crate::parallel::phase::progress_made();
        }
    });
    totals[0] = crate::host_waits::read(&loss_sum)[0];
    world.all_reduce_sum(&mut totals);
    let loss = totals[0] / totals[1].max(1.0);
    Evaluation { loss, ppl: loss.exp(), tokens: totals[1] as u64, windows: totals[2] as u64 }
}

//! The token table's gradient in two parts, so that most of it travels during backward.
//! The table is also the head: its gradient is the head's (dense, every row; added by the
//! fused classifier in the forward, before backward starts) plus the embedding lookup's,
//! which the very last stage of backward adds, to the rows of the step's input tokens
//! only. Exchanged whole, it could go only after backward, the largest single bucket of
//! a GPT-2 step at its end (DDP's Reducer waits for it the same way). Instead:
//!
//! - *whole*: when the last backward starts, a copy of the whole table's gradient goes
//!   first;
//! - *rows*: when backward ends, only the rows of the tokens any rank fed in this
//!   micro-step go, packed (the ranks agree on them with one small all-reduce of
//!   looked-up flags before backward);
//! - *written back*: the whole table's mean, then the rows' means over it.
//!
//! A row no rank looked up got `+0.0` from the lookup's backward (a dense gradient, zero
//! there): the copy adds the same `+0.0` (which turns a `-0.0` into `+0.0`, as the
//! lookup's addition does), so every element is averaged from the same values as the
//! whole-buffer exchange's: bit for bit on two ranks, within reduction-order rounding on
//! more.

use super::World;
use tch::{Device, Kind, Tensor};

/// Where the table lies in the flat buffer, and when its rows are complete.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenTableLayout {
    /// Offset of the table in the flat buffer (elements).
    pub offset: i64,
    /// Rows, padding included.
    pub rows: i64,
    /// Values per row.
    pub width: i64,
    /// The stage (backward order) after which its rows are complete.
    pub ready_after: usize,
}

impl TokenTableLayout {
    /// The table's gradient as [rows, width], a view of `grads`.
    fn view(&self, grads: &Tensor) -> Tensor {
        grads.narrow(0, self.offset, self.rows * self.width).view([self.rows, self.width])
    }

    /// The whole part: a contiguous copy of the table's gradient, plus `+0.0` (see the
    /// module's doc).
    pub fn whole_copy(&self, grads: &Tensor) -> Tensor {
        tch::no_grad(|| self.view(grads) + 0.0).contiguous()
    }

    /// The rows part: rows `touched` (i64, ascending, on the gradients' device), packed.
    pub fn rows_copy(&self, grads: &Tensor, touched: &Tensor) -> Tensor {
        tch::no_grad(|| self.view(grads).index_select(0, touched)).contiguous()
    }

    /// Writes the averaged parts into `grads`: the whole table's mean everywhere, then the rows'.
    pub fn write_back(&self, grads: &Tensor, touched: &Tensor, whole: &Tensor, rows: &Tensor) {
        tch::no_grad(|| {
            let mut table = self.view(grads);
            let _ = table.copy_(whole);
            let _ = table.index_copy_(0, touched, rows);
        });
    }
}

/// One step's two parts of the table, for a session (MPI's thread or NCCL's stream),
/// which averages them in place: the whole copy, taken at the start, and the looked-up
/// rows, packed when their stage is done; both live until written back.
pub struct TokenTableInFlight<'a> {
    layout: TokenTableLayout,
    touched: &'a Tensor,
    pub whole: Tensor,
    packed: Option<Tensor>,
}

impl<'a> TokenTableInFlight<'a> {
    /// The parts of the table laid out as `layout` whose rows `touched` are looked up; takes the whole
    /// copy of `grads` now.
    pub fn start(layout: TokenTableLayout, touched: &'a Tensor, grads: &Tensor) -> TokenTableInFlight<'a> {
        TokenTableInFlight { layout, touched, whole: layout.whole_copy(grads), packed: None }
    }

    /// Stage `stage` is done: the looked-up rows of `grads`, packed, the first time their
    /// stage is among those done (None otherwise).
    pub fn pack_if_ready(&mut self, grads: &Tensor, stage: usize) -> Option<Tensor> {
        if self.packed.is_some() || self.layout.ready_after > stage {
            return None;
        }
        let packed = self.layout.rows_copy(grads, self.touched);
        self.packed = Some(packed.shallow_clone());
        Some(packed)
    }

    /// Writes the averaged parts into `grads` (after every stage is done).
    pub fn write_back(&self, grads: &Tensor) {
        self.layout.write_back(grads, self.touched, &self.whole, self.packed.as_ref().expect("packed at the last stage"));
    }
}

/// The rows of `table` that any rank's `input_ids` (its micro-batch's inputs) look up,
/// ascending, on `device`. Agreed through one small all-reduce of looked-up flags rather
/// than computed from the global batch: ranks whose token files differ (doctor's do) must
/// still send rows of the same count.
///
/// The flags are as many as the table's rows, fixed for the run by `model.vocab_size` and
/// agreed with the gradient layout at start-up. With `compare_lengths` (the first step)
/// the ranks compare that length once more, right before the all-reduce that a
/// difference would make write past a buffer: a rank whose length differs is an error
/// naming it.
pub fn rows_looked_up(
    world: &World,
    table: &TokenTableLayout,
    input_ids: &[i64],
    device: Device,
    compare_lengths: bool,
) -> anyhow::Result<Tensor> {
    let mut looked_up = vec![0f64; table.rows as usize];
    if crate::faults::table_flags_extra(world.rank()) {
        looked_up.push(0.0);
    }
    for &id in input_ids {
        if let Some(flag) = usize::try_from(id).ok().and_then(|i| looked_up.get_mut(i)) {
            *flag = 1.0;
        }
    }
    if compare_lengths {
        world.check_same_length("the token table's looked-up flags", looked_up.len())?;
    }
    world.all_reduce_max(&mut looked_up);
    let mut ids: Vec<i64> = looked_up.iter().enumerate().filter(|(_, f)| **f > 0.0).map(|(i, _)| i as i64).collect();
    if crate::faults::table_rows_extra(world.rank()) {
        ids.extend(looked_up.iter().position(|f| *f == 0.0).map(|i| i as i64));
    }
    Ok(touched_rows(ids, device))
}

/// The rows `ids` name, ascending and once each, as a tensor on `device`. Made between the
/// last forward and its backward: the copy must not make the host wait for the forward
/// (`host_to_device`).
pub fn touched_rows(mut ids: Vec<i64>, device: Device) -> Tensor {
    ids.sort_unstable();
    ids.dedup();
    crate::host_to_device::upload(&Tensor::from_slice(&ids).to_kind(Kind::Int64), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_copy_and_the_rows_written_back_give_the_whole_table_exchange() {
        // Two "ranks": a table of 6 rows x 3 whose rows 1 and 4 the lookup changes
        // after the whole copy; row 2 holds a -0.0, which the lookup's +0.0 makes +0.0.
        let table = TokenTableLayout { offset: 2, rows: 6, width: 3, ready_after: 4 };
        let before = |seed: f32| {
            let mut v: Vec<f32> = (0..20).map(|i| seed * (i as f32 - 7.5)).collect();
            v[2 + 2 * 3] = -0.0;
            Tensor::from_slice(&v)
        };
        let touched = touched_rows(vec![4, 1, 4], Device::Cpu);
        let lookup = |grads: &Tensor| {
            let dense = Tensor::zeros([6, 3], (Kind::Float, Device::Cpu));
            let _ = dense.get(1).fill_(0.25);
            let _ = dense.get(4).fill_(-1.5);
            let mut t = grads.narrow(0, 2, 18).view([6, 3]);
            let _ = t.g_add_(&dense);
        };
        let (a, b) = (before(1.0), before(0.5));
        let (whole_a, whole_b) = (table.whole_copy(&a), table.whole_copy(&b));
        lookup(&a);
        lookup(&b);
        let (rows_a, rows_b) = (table.rows_copy(&a, &touched), table.rows_copy(&b, &touched));
        let mean = |x: &Tensor, y: &Tensor| (x + y) * 0.5;
        let whole = mean(&a, &b);
        let out = a.copy();
        table.write_back(&out, &touched, &mean(&whole_a, &whole_b), &mean(&rows_a, &rows_b));
        let bits = |t: &Tensor| Vec::<f32>::try_from(t.narrow(0, 2, 18)).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out), bits(&whole));
        assert_eq!(Vec::<i64>::try_from(&touched).unwrap(), vec![1, 4]);
    }
}

//! Which gradients travel together, and when they are ready: the flat gradient buffer
//! mapped into buckets of about `dist.bucket_mb`, filled in the order backward completes
//! them (the model's stages, src/model/stages.rs), the first at most 1 MB as PyTorch
//! DDP's (so that the exchange starts early). The buffer's layout is not changed (it is
//! the checkpoints' and the optimizer's): a bucket is a few contiguous runs of it.

use super::token_table::TokenTableLayout;
use crate::model::flat::Slot;
use crate::model::stages::stage_of;
use tch::Tensor;

/// Elements of the first bucket at most: 1 MiB of fp32, as DDP's first bucket.
pub const FIRST_BUCKET_ELEMS: i64 = (1 << 20) / 4;

#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// (offset, elements) runs of the flat buffer, ascending, none adjacent to another.
    pub runs: Vec<(i64, i64)>,
    pub elems: i64,
    /// The stage (backward order) after whose backward every gradient of it is complete.
    pub ready_after: usize,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct BucketPlan {
    pub buckets: Vec<Bucket>,
    /// The token table, exchanged in two parts of its own (src/parallel/token_table.rs) and
    /// in no bucket.
    pub table: Option<TokenTableLayout>,
}

impl BucketPlan {
    /// Buckets of about `bucket_elems` (the first at most `FIRST_BUCKET_ELEMS`) over the
    /// slots, stage after stage of `stages` (name prefixes, backward order). A slot no
    /// stage names goes with the last stage. Each slot's padding rows travel with it.
    pub fn new(slots: &[Slot], stages: &[Vec<String>], bucket_elems: i64) -> BucketPlan {
        BucketPlan::with_table(slots, stages, bucket_elems, None)
    }

    /// As `new`, with the slot named `table` (a [rows, width] matrix whose last stage
    /// adds to the rows of the input tokens only) left to its own two-part exchange.
    pub fn with_table(slots: &[Slot], stages: &[Vec<String>], bucket_elems: i64, table: Option<&str>) -> BucketPlan {
        let is_table = |s: &Slot| Some(s.name.as_str()) == table && s.shape.len() == 2;
        let table = slots.iter().find(|s| is_table(s)).map(|s| TokenTableLayout {
            offset: s.offset,
            rows: s.reserved / s.shape[1],
            width: s.shape[1],
            ready_after: stage_of(&s.name, stages),
        });
        let mut order: Vec<(usize, &Slot)> = slots.iter().filter(|s| !is_table(s)).map(|s| (stage_of(&s.name, stages), s)).collect();
        // Stage by stage; within one, by place in the buffer (they complete together).
        order.sort_by_key(|(stage, s)| (*stage, s.offset));
        let mut buckets = Vec::new();
        let mut open: Option<(Vec<(i64, i64)>, i64, usize)> = None;
        for (stage, slot) in order {
            let (runs, elems, ready) = open.get_or_insert_with(|| (Vec::new(), 0, stage));
            runs.push((slot.offset, slot.reserved));
            *elems += slot.reserved;
            *ready = stage;
            let cap = if buckets.is_empty() { FIRST_BUCKET_ELEMS.min(bucket_elems) } else { bucket_elems };
            if *elems >= cap {
                let (runs, elems, ready_after) = open.take().expect("just filled");
                buckets.push(Bucket { runs: merged(runs), elems, ready_after });
            }
        }
        if let Some((runs, elems, ready_after)) = open {
            buckets.push(Bucket { runs: merged(runs), elems, ready_after });
        }
        BucketPlan { buckets, table }
    }
}

/// One overlapped step's plan: the buckets, and the token table's rows this step looks
/// up where the plan keeps the table apart. Made only by [`BucketPlan::for_step`], which
/// asks for those rows exactly when the plan needs them: an overlapped exchange can no
/// longer be started without them and silently leave the table unexchanged.
pub struct StepBuckets<'a> {
    plan: &'a BucketPlan,
    table: Option<(TokenTableLayout, Tensor)>,
}

impl StepBuckets<'_> {
    pub fn plan(&self) -> &BucketPlan {
        self.plan
    }

    /// The table apart and the rows looked up (i64, ascending, on the gradients' device).
    pub fn table(&self) -> Option<(TokenTableLayout, &Tensor)> {
        self.table.as_ref().map(|(rows, touched)| (*rows, touched))
    }
}

impl BucketPlan {
    /// This plan for one overlapped step; `rows_looked_up` gives the table's rows the
    /// step's inputs look up on any rank, and is called only if the plan keeps the table
    /// apart.
    pub fn for_step(&self, rows_looked_up: impl FnOnce(&TokenTableLayout) -> anyhow::Result<Tensor>) -> anyhow::Result<StepBuckets<'_>> {
        let table = match self.table {
            Some(t) => Some((t, rows_looked_up(&t)?)),
            None => None,
        };
        Ok(StepBuckets { plan: self, table })
    }
}

/// Runs sorted, and joined where one ends where the next begins.
fn merged(mut runs: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    runs.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::with_capacity(runs.len());
    for (offset, len) in runs {
        match out.last_mut() {
            Some((o, l)) if *o + *l == offset => *l += len,
            _ => out.push((offset, len)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(name: &str, offset: i64, numel: i64) -> Slot {
        Slot { name: name.into(), shape: vec![numel], offset, numel, reserved: numel, decay: true }
    }

    #[test]
    fn buckets_follow_the_stages_cover_every_slot_once_and_merge_runs() {
        // Layout: matrices first (h.0, h.1, wte), then vectors (h.0, h.1, ln_f).
        let slots = vec![
            slot("h.0.a.weight", 0, 100),
            slot("h.1.a.weight", 100, 100),
            slot("wte", 200, 300),
            slot("h.0.a.bias", 500, 10),
            slot("h.1.a.bias", 510, 10),
            slot("ln_f.weight", 520, 10),
        ];
        let stages: Vec<Vec<String>> =
            [vec!["ln_f."], vec!["h.1."], vec!["h.0."], vec!["wte"]].iter().map(|s| s.iter().map(|p| p.to_string()).collect()).collect();
        let plan = BucketPlan::new(&slots, &stages, 150);
        let summary: Vec<(Vec<(i64, i64)>, usize)> = plan.buckets.iter().map(|b| (b.runs.clone(), b.ready_after)).collect();
        assert_eq!(
            summary,
            vec![
                // ln_f (10) and h.1 (110): 120 < 150, then h.0's weight closes it at 220.
                (vec![(0, 200), (510, 20)], 2),
                // h.0's bias, then wte, which ends where the bias begins: one run.
                (vec![(200, 310)], 3),
            ]
        );
        let covered: i64 = plan.buckets.iter().map(|b| b.elems).sum();
        assert_eq!(covered, 530);
        // A tiny first bucket: at most 1 MiB of fp32.
        let big = vec![slot("ln_f.weight", 0, FIRST_BUCKET_ELEMS), slot("h.0.a.weight", FIRST_BUCKET_ELEMS, 10)];
        let plan = BucketPlan::new(&big, &stages, 1 << 30);
        assert_eq!(plan.buckets.len(), 2);
        assert_eq!(plan.buckets[0].ready_after, 0);
        // The token table apart: in no bucket, its rows complete with its stage.
        let mut with_table = slots.clone();
        with_table[2].shape = vec![100, 3];
        let plan = BucketPlan::with_table(&with_table, &stages, 150, Some("wte"));
        assert_eq!(plan.table, Some(TokenTableLayout { offset: 200, rows: 100, width: 3, ready_after: 3 }));
        assert!(plan.buckets.iter().all(|b| b.runs.iter().all(|&(o, l)| o + l <= 200 || o >= 500)), "{plan:?}");
        assert_eq!(plan.buckets.iter().map(|b| b.elems).sum::<i64>(), 230);
    }
}

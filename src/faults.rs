//! Fault injection for the test suite, off unless `ALGPT2_FAULT` is set. Each fault
//! makes a real failure happen at a chosen point, so tests exercise the real recovery
//! code rather than a mock of it. Faults combine with commas; `:R` limits one to rank R.
//!
//! - `nan_loss@N`: the loss (and gradients) of optimizer step N (1-based) become NaN.
//! - `kill@N`: the process kills itself with SIGKILL right after step N's update, before
//!   anything else of that step is logged or saved (as a preemption or the OOM killer).
//! - `hang@N`: the process stops making progress (sleeps) after step N's update, alive
//!   but silent, as a wedged device or a stuck peer would.
//! - `diverge@N`: step N's update is followed by a change to this rank's weights.
//! - `panic@N`: the process panics after step N's update, as a libtorch call that fails
//!   inside tch (out of memory, say) does.
//! - `save_kill_tensors@N`, `save_kill_state@N`, `save_kill_renamed@N`: SIGKILL while
//!   saving step N's checkpoint: after its tensor files, after its trainer.json (both
//!   still under the temporary name), or right after the rename.
//! - `save_disk_full@N`: writing step N's checkpoint fails as on a full disk (ENOSPC),
//!   after its model file is on disk.
//! - `slow_save@N`: saving step N's checkpoint takes [`SLOW_SAVE`] longer, after its
//!   tensor files (as a slow fsync would).
//! - `slow_eval@0`: every evaluation batch takes [`SLOW_EVAL_BATCH`] longer (a slow device).
//! - `unchecked_ranks@0`: the ranks skip comparing their settings (src/parallel/same_job.rs),
//!   so that tests reach the size checks of the exchanges behind it.
//! - `stats_extra@0`: this rank's system sample carries one value too many.
//! - `table_flags_extra@0`: this rank's looked-up flags of the token table carry one value
//!   too many (as a rank whose table had another number of rows).
//! - `table_rows_extra@0`: this rank packs one row more of the token table than the rows
//!   looked up into the overlapped exchange.
//! - `other_build@0`: this rank reports another build of algpt2-ddp in its settings.
//! - `hang_in_<phase>@0`: the process hangs when it enters that phase of start-up or the
//!   finish (src/parallel/phase.rs names them: `comm_dup`, `weight_broadcast`, ...).
//! - `nccl_never_join@0`: the rank makes no CUDA or NCCL call at NCCL's init
//!   (src/parallel/nccl.rs), so it needs no GPU, and the others' NCCL init waits for it
//!   until `dist.timeout_s` and fails naming the phase ("start-up: NCCL init: rank 0 of 2
//!   (GPU 0) did not join the NCCL communicator within 4 s"); this rank waits twice as
//!   long, so that the others' deadline ends the job, then fails alike.
//! - `export_kill_staged@0`, `export_kill_aside@0`: SIGKILL during `export-hf`, once the
//!   export is whole in its staging directory, or right after the previous export was
//!   moved aside for it (`--force`). An export has no steps: give 0.

/// One fault of the plan: `name@step`, for one rank or all.
#[derive(Debug, Clone, PartialEq)]
struct Fault {
    name: String,
    step: u64,
    rank: Option<usize>,
}

/// `ALGPT2_FAULT` parsed once, at the first question; malformed entries are ignored.
fn plan() -> &'static [Fault] {
    static PLAN: std::sync::OnceLock<Vec<Fault>> = std::sync::OnceLock::new();
    PLAN.get_or_init(|| parse(&std::env::var("ALGPT2_FAULT").unwrap_or_default()))
}

fn parse(spec: &str) -> Vec<Fault> {
    spec.split(',')
        .filter_map(|f| {
            let (name, at) = f.trim().split_once('@')?;
            let (step, rank) = match at.split_once(':') {
                Some((s, r)) => (s, Some(r.parse::<usize>().ok()?)),
                None => (at, None),
            };
            Some(Fault { name: name.to_string(), step: step.parse().ok()?, rank })
        })
        .collect()
}

fn fault_step(name: &str, rank: usize) -> Option<u64> {
    step_in(plan(), name, rank)
}

fn step_in(plan: &[Fault], name: &str, rank: usize) -> Option<u64> {
    plan.iter().find(|f| f.name == name && f.rank.is_none_or(|r| r == rank)).map(|f| f.step)
}

/// What the plan asks of one optimizer step on one rank: asked once, as the step starts
/// (`at_step`), and each part acted on where its real failure would happen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepFaults {
    /// The step (1-based) the answer is for.
    step: u64,
    /// The step's loss (and gradients) become NaN (`nan_loss@N`).
    pub nan_loss: bool,
    /// This rank's weights change after the step's update (`diverge@N`).
    pub diverge: bool,
    /// What the process does right after the step's update (`kill@N`, `panic@N`, `hang@N`).
    after_update: Option<ProcessFault>,
}

/// How the process fails after a step's update.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ProcessFault {
    Kill,
    Panic,
    Hang,
}

/// What step `step` (1-based) of rank `rank` must do.
pub fn at_step(step: u64, rank: usize) -> StepFaults {
    step_faults(plan(), step, rank)
}

fn step_faults(plan: &[Fault], step: u64, rank: usize) -> StepFaults {
    let chosen = |name| step_in(plan, name, rank) == Some(step);
    // Kill before panic before hang: the first that applies is the one that happens.
    let after_update = [("kill", ProcessFault::Kill), ("panic", ProcessFault::Panic), ("hang", ProcessFault::Hang)]
        .into_iter()
        .find_map(|(name, fault)| chosen(name).then_some(fault));
    StepFaults { step, nan_loss: chosen("nan_loss"), diverge: chosen("diverge"), after_update }
}

impl StepFaults {
    /// Dies with SIGKILL, panics or hangs, when chosen for this step: called right after
    /// its update, before anything else of the step is logged or saved.
    pub fn after_update(&self) {
        let step = self.step;
        match self.after_update {
            // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
            Some(ProcessFault::Kill) => unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            },
            Some(ProcessFault::Panic) => panic!("injected failure after step {step} (ALGPT2_FAULT=panic@{step})"),
            Some(ProcessFault::Hang) => loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            },
            None => {}
        }
    }
}

/// True when a test asked the ranks not to compare their settings.
pub fn unchecked_ranks() -> bool {
    plan().iter().any(|f| f.name == "unchecked_ranks")
}

/// True when a test asked this rank's system sample to carry one value too many.
pub fn stats_extra(rank: usize) -> bool {
    fault_step("stats_extra", rank).is_some()
}

/// True when a test asked this rank's looked-up flags of the token table to carry one
/// value too many.
pub fn table_flags_extra(rank: usize) -> bool {
    fault_step("table_flags_extra", rank).is_some()
}

/// True when a test asked this rank to pack one row too many of the token table.
pub fn table_rows_extra(rank: usize) -> bool {
    fault_step("table_rows_extra", rank).is_some()
}

/// True when a test asked this rank to report another build of algpt2-ddp.
pub fn other_build(rank: usize) -> bool {
    fault_step("other_build", rank).is_some()
}

/// How much longer a chosen save takes (`slow_save@N`): twice the tests' `dist.timeout_s`.
pub const SLOW_SAVE: std::time::Duration = std::time::Duration::from_secs(8);

/// Sleeps [`SLOW_SAVE`] when saving step `step`'s checkpoint is the chosen slow one.
pub fn slow_save(step: u64) {
    if fault_step("slow_save", 0) == Some(step) {
        std::thread::sleep(SLOW_SAVE);
    }
}

/// How much longer each evaluation batch takes under `slow_eval@0`.
pub const SLOW_EVAL_BATCH: std::time::Duration = std::time::Duration::from_millis(500);

/// Sleeps [`SLOW_EVAL_BATCH`] when a test asked for a slow evaluation on rank `rank`.
pub fn slow_eval_batch(rank: usize) {
    if fault_step("slow_eval", rank).is_some() {
        std::thread::sleep(SLOW_EVAL_BATCH);
    }
}

/// True when a test chose this rank to never join the NCCL communicator.
pub fn never_joins_nccl(rank: usize) -> bool {
    fault_step("nccl_never_join", rank).is_some()
}

/// Hangs for good when a test chose phase `slug` for this rank.
pub fn hang_in_phase(slug: &str, rank: usize) {
    if fault_step(&format!("hang_in_{slug}"), rank).is_some() {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Dies with SIGKILL at `stage` of saving step `step`'s checkpoint, when chosen.
pub fn kill_in_save(stage: &str, step: u64) {
    if fault_step(&format!("save_kill_{stage}"), 0) == Some(step) {
        // SAFETY: as in StepFaults::after_update.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Dies with SIGKILL at `stage` of committing an export, when chosen.
pub fn kill_in_export(stage: &str) {
    if fault_step(&format!("export_kill_{stage}"), 0).is_some() {
        // SAFETY: as in StepFaults::after_update.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Fails as a full disk would, after `written` is on disk, when saving step `step` is the
/// chosen one.
pub fn disk_full_in_save(written: &std::path::Path, step: u64) -> anyhow::Result<()> {
    if fault_step("save_disk_full", 0) == Some(step) {
        let err = std::io::Error::from_raw_os_error(libc::ENOSPC);
        return Err(anyhow::Error::new(err).context(format!("cannot write {}", written.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_parses_steps_and_ranks() {
        let plan = parse("kill@6:1, nan_loss@3,bad,hang@x,diverge@2:y");
        assert_eq!(
            plan,
            vec![Fault { name: "kill".into(), step: 6, rank: Some(1) }, Fault { name: "nan_loss".into(), step: 3, rank: None }]
        );
        assert!(parse("").is_empty());
    }

    #[test]
    fn a_fault_for_one_rank_is_found_for_that_rank_only() {
        let plan = parse("nccl_never_join@0:1,hang@4");
        assert_eq!(step_in(&plan, "nccl_never_join", 1), Some(0));
        assert_eq!(step_in(&plan, "nccl_never_join", 0), None);
        assert_eq!(step_in(&plan, "hang", 3), Some(4));
        assert_eq!(step_in(&plan, "kill", 1), None);
        // Without ALGPT2_FAULT (as when these tests run), no rank skips its NCCL init.
        if std::env::var_os("ALGPT2_FAULT").is_none() {
            assert!(!never_joins_nccl(0) && !never_joins_nccl(1));
        }
    }

    #[test]
    fn a_step_is_told_everything_the_plan_asks_of_it_at_once() {
        let plan = parse("nan_loss@3,diverge@3:1,kill@5:0,panic@5,hang@6,hang@7");
        let at = |step, rank| step_faults(&plan, step, rank);
        assert_eq!(at(3, 0), StepFaults { step: 3, nan_loss: true, diverge: false, after_update: None });
        assert_eq!(at(3, 1), StepFaults { step: 3, nan_loss: true, diverge: true, after_update: None });
        assert_eq!(at(4, 1), StepFaults { step: 4, nan_loss: false, diverge: false, after_update: None });
        assert_eq!(at(5, 0).after_update, Some(ProcessFault::Kill), "kill comes first where it applies");
        assert_eq!(at(5, 1).after_update, Some(ProcessFault::Panic));
        assert_eq!(at(6, 0).after_update, Some(ProcessFault::Hang));
        assert_eq!(at(7, 0).after_update, None, "only a name's first entry counts");
        at(4, 0).after_update();
    }
}

//! Where each start of a job supervised with `--hostfile` runs: the hosts that passed
//! their check, the ranks they hold, and the gradient accumulation that keeps the global
//! batch of the whole host list (world W0 × `train.grad_accum_steps` A0) on fewer ranks
//! W1: A0 × W0 / W1, where that is a whole number; refused where it is not, and below
//! `--min-ranks`.

use super::hosts::{self, Host};
use crate::exit_code::ExitWith;
use crate::restarts::HostsChange;
use std::path::PathBuf;
use tracing::{info, warn};

/// One start's hosts and ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub hosts: Vec<Host>,
    pub ranks: usize,
    pub grad_accum_steps: usize,
}

/// The `train.grad_accum_steps` that keeps `w0` ranks × `a0` micro-steps on `w1` ranks.
pub fn grad_accum_for(a0: usize, w0: usize, w1: usize) -> Result<usize, String> {
    let micro_batches = a0 * w0;
    if w1 == 0 || micro_batches % w1 != 0 {
        return Err(format!(
            "the global batch of {w0} rank(s) × train.grad_accum_steps {a0} = {micro_batches} micro-batches does not divide over {w1} rank(s), \
             so it cannot be kept: give the hostfile slots that divide it, or a grad_accum_steps that does"
        ));
    }
    Ok(micro_batches / w1)
}

/// The placement over the hosts of `all` that `passed`, keeping the global batch of all
/// of them with `a0` micro-steps each; why not, below `min_ranks` or where the batch
/// does not divide.
pub fn place(all: &[Host], passed: &[bool], a0: usize, min_ranks: usize) -> Result<Placement, String> {
    let w0: usize = all.iter().map(|h| h.slots).sum();
    let hosts: Vec<Host> = all.iter().zip(passed).filter(|(_, &ok)| ok).map(|(h, _)| h.clone()).collect();
    let ranks: usize = hosts.iter().map(|h| h.slots).sum();
    if ranks < min_ranks.max(1) {
        return Err(format!("{ranks} rank(s) on the hosts that answer, fewer than --min-ranks {}", min_ranks.max(1)));
    }
    Ok(Placement { grad_accum_steps: grad_accum_for(a0, w0, ranks)?, hosts, ranks })
}

/// What changed from the `previous` start's hosts to the `next`'s.
pub fn change(previous: &Placement, next: &Placement) -> HostsChange {
    let names = |p: &Placement| p.hosts.iter().map(|h| h.name.clone()).collect::<Vec<_>>();
    let (before, now) = (names(previous), names(next));
    HostsChange {
        dropped: before.iter().filter(|h| !now.contains(h)).cloned().collect(),
        rejoined: now.iter().filter(|h| !before.contains(h)).cloned().collect(),
        running: now,
        ranks: next.ranks,
        grad_accum_steps: next.grad_accum_steps,
    }
}

/// The host list a supervisor owns: checked before every start, written for mpirun.
pub struct Hosts {
    pub all: Vec<Host>,
    agent: Vec<String>,
    binary: String,
    grad_accum_steps: usize,
    min_ranks: usize,
    /// The hostfile each start is given: the hosts that passed.
    pub written: PathBuf,
}

impl Hosts {
    pub fn new(all: Vec<Host>, agent: Vec<String>, binary: String, grad_accum_steps: usize, min_ranks: usize, written: PathBuf) -> Hosts {
        Hosts { all, agent, binary, grad_accum_steps, min_ranks, written }
    }

    pub fn world(&self) -> usize {
        self.all.iter().map(|h| h.slots).sum()
    }

    /// Checks every host, says which are left out and why, and writes the hostfile of
    /// those that passed; a final error (exit 1) when they cannot run the job.
    pub fn place(&self) -> anyhow::Result<Placement> {
        let results = hosts::check_all(&self.all, &self.agent, &self.binary, hosts::CHECK_TIMEOUT);
        let mut lost = Vec::new();
        for (host, result) in self.all.iter().zip(&results) {
            if let Err(why) = result {
                warn!("supervise: host {} left out: {why}", host.name);
                lost.push(format!("{} ({why})", host.name));
            }
        }
        let passed: Vec<bool> = results.iter().map(Result::is_ok).collect();
        let placement = place(&self.all, &passed, self.grad_accum_steps, self.min_ranks).map_err(|why| ExitWith {
            code: 1,
            why: format!(
                "supervise: not starting the job: {why}{}",
                if lost.is_empty() { String::new() } else { format!("; lost: {}", lost.join(", ")) }
            ),
        })?;
        if let Some(dir) = self.written.parent() {
            std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        }
        crate::run_dir::write_atomic(&self.written, hosts::render(&placement.hosts).as_bytes())?;
        info!(
            "supervise: {} rank(s) on {} of {} host(s) ({}), train.grad_accum_steps {} (the global batch of {} rank(s) × {})",
            placement.ranks,
            placement.hosts.len(),
            self.all.len(),
            placement.hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", "),
            placement.grad_accum_steps,
            self.world(),
            self.grad_accum_steps
        );
        Ok(placement)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str, slots: usize) -> Host {
        Host { name: name.into(), slots }
    }

    #[test]
    fn fewer_ranks_keep_the_global_batch_with_more_accumulation_where_it_divides() {
        assert_eq!(grad_accum_for(2, 3, 2), Ok(3));
        assert_eq!(grad_accum_for(1, 8, 4), Ok(2));
        assert_eq!(grad_accum_for(4, 8, 8), Ok(4));
        assert_eq!(grad_accum_for(3, 4, 6), Ok(2));
        let e = grad_accum_for(1, 3, 2).unwrap_err();
        assert!(
            e.starts_with("the global batch of 3 rank(s) × train.grad_accum_steps 1 = 3 micro-batches does not divide over 2 rank(s)"),
            "{e}"
        );
        assert!(grad_accum_for(1, 3, 0).is_err());
    }

    #[test]
    fn the_hosts_that_pass_are_placed_unless_too_few_or_indivisible() {
        let all = [h("a", 2), h("b", 2), h("c", 4)];
        let p = place(&all, &[true, true, true], 1, 1).unwrap();
        assert_eq!((p.ranks, p.grad_accum_steps, p.hosts.len()), (8, 1, 3));
        let p = place(&all, &[false, true, true], 3, 1).unwrap();
        assert_eq!((p.ranks, p.grad_accum_steps), (6, 4));
        let p = place(&all, &[true, true, false], 2, 1).unwrap();
        assert_eq!((p.ranks, p.grad_accum_steps, p.hosts), (4, 4, vec![h("a", 2), h("b", 2)]));
        // 8 micro-batches over 6 ranks: refused, naming the numbers.
        let e = place(&all, &[false, true, true], 1, 1).unwrap_err();
        assert!(e.contains("8 micro-batches does not divide over 6 rank(s)"), "{e}");
        assert_eq!(place(&all, &[true, false, false], 1, 4).unwrap_err(), "2 rank(s) on the hosts that answer, fewer than --min-ranks 4");
        assert_eq!(place(&all, &[false, false, false], 1, 0).unwrap_err(), "0 rank(s) on the hosts that answer, fewer than --min-ranks 1");
    }

    #[test]
    fn a_change_names_the_hosts_dropped_and_rejoined() {
        let all = [h("a", 1), h("b", 1), h("c", 1), h("d", 1)];
        let first = place(&all, &[true, true, true, true], 3, 1).unwrap();
        let second = place(&all, &[true, true, false, true], 3, 1).unwrap();
        let third = place(&all, &[true, false, true, true], 3, 1).unwrap();
        let c = change(&first, &second);
        assert_eq!(
            (c.dropped, c.rejoined, c.running, c.ranks, c.grad_accum_steps),
            (vec!["c".into()], vec![], vec!["a".into(), "b".into(), "d".into()], 3, 4)
        );
        let c = change(&second, &third);
        assert_eq!((c.dropped, c.rejoined), (vec!["b".to_string()], vec!["c".to_string()]));
        let c = change(&third, &third);
        assert!(c.dropped.is_empty() && c.rejoined.is_empty());
    }
}

//! `algpt2-ddp supervise -- <job>`: runs a training job and starts it again from its
//! newest checkpoint when it fails on the way: a rank killed or crashed, a hang the
//! watchdog ended, a preemption (exit 75), mpirun itself gone. Never after a finished run,
//! a configuration error or ranks that disagree (exit 2), or a stop asked of the
//! supervisor (passed on to the job as the launch scripts do). Restarts wait a growing,
//! bounded back-off and are at most `--max-restarts`; each is one line of
//! `<run>/restarts.jsonl` (`crate::restarts`), which the restarted run names in its log
//! and sums in `summary.json`. Exact resume makes the restarted run end where an
//! uninterrupted one would.
//!
//! With `--hostfile`, the supervisor owns the job's hosts and rank count: before every
//! start it checks each host (`hosts`), starts mpirun on those that pass, and keeps the
//! global batch of the whole list with more gradient accumulation on fewer ranks
//! (`placement`); a host that answers again rejoins at the next restart.

mod hosts;
mod job;
mod placement;
mod short_command;
mod verdict;

use crate::exit_code::ExitWith;
use crate::restarts::{self, RestartRecord};
use crate::run_dir::RunDir;
use job::{Attempt, Job};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};
use tracing::info;
use verdict::Verdict;

pub struct Options {
    pub max_restarts: u32,
    /// The wait before the first restart; doubled for each next one.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// The job's command line.
    pub command: Vec<String>,
    /// The hosts the supervisor places the job on (Open MPI hostfile syntax), if any.
    pub hostfile: Option<std::path::PathBuf>,
    /// The fewest ranks a start may have on the hosts that pass their check.
    pub min_ranks: usize,
}

/// The file each start's mpirun is given: the hosts that passed their check.
const WRITTEN_HOSTFILE: &str = "supervise-hosts";

/// The host list of `opts`, for `job`; refusals (exit 2) before anything starts.
fn host_list(opts: &Options, job: &Job) -> anyhow::Result<Option<placement::Hosts>> {
    let Some(file) = &opts.hostfile else { return Ok(None) };
    job.refuse_own_placement()?;
    let all = hosts::read(file).map_err(|e| crate::exit_code::Usage(format!("supervise --hostfile: {e:#}")))?;
    let world: usize = all.iter().map(|h| h.slots).sum();
    if opts.min_ranks > world {
        return Err(crate::exit_code::Usage(format!(
            "supervise: --min-ranks {} is more than the {world} rank(s) of {}",
            opts.min_ranks,
            file.display()
        ))
        .into());
    }
    let agent = hosts::rsh_agent(job.launcher_args(), &|k| std::env::var(k).ok());
    let written = job.run.root.join(WRITTEN_HOSTFILE);
    Ok(Some(placement::Hosts::new(all, agent, job.binary().to_string(), job.cfg.train.grad_accum_steps, opts.min_ranks, written)))
}

/// How long the ended job's last rank may take to go (its own `dist.stop_grace_s`, then
/// a save) before the supervisor ends it, and then waits for the run's lock.
const SLACK: Duration = Duration::from_secs(30);

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let job = Job::from_command(&opts.command)?;
    let hosts = host_list(opts, &job)?;
    let stops = crate::parallel::signals::count_stop_signals()?;
    job::become_subreaper();
    let grace = Duration::from_secs(job.cfg.dist.stop_grace_s) + SLACK;
    if job.cfg.train.save_interval == 0 {
        tracing::warn!("supervise: train.save_interval is 0, so a restart starts from the newest checkpoint there is, or from step 0");
    }
    let mut restart = 0;
    let mut placed = hosts.as_ref().map(placement::Hosts::place).transpose()?;
    loop {
        job::wait_for_run_lock(&job.run, grace)?;
        let attempt = job.start(restart, hosts.as_ref().zip(placed.as_ref()).map(|(h, p)| (h.written.as_path(), p)))?;
        let ended = attempt.wait(&stops);
        attempt.clear_away(grace);
        let why = match verdict::of(ended, stops.load(Ordering::SeqCst) > 0) {
            Verdict::Over => {
                info!("supervise: the job {} after {restart} restart(s): done", verdict::describe(ended));
                return Ok(());
            }
            Verdict::Final { code, why } => return Err(ExitWith { code, why: format!("supervise: {why}") }.into()),
            Verdict::Restart { why } => why,
        };
        if restart >= opts.max_restarts {
            let why = format!("supervise: giving up after {restart} restart(s) (--max-restarts): {why}");
            return Err(ExitWith { code: verdict::code_of(ended), why }.into());
        }
        restart += 1;
        let wait = backoff(opts.backoff, opts.max_backoff, restart);
        info!("supervise: {why}; restart {restart} of at most {} in {:.1} s", opts.max_restarts, wait.as_secs_f64());
        if !sleep_unless_stopped(wait, &stops) {
            info!("supervise: stopped by the user before restart {restart}");
            return Ok(());
        }
        // The hosts are checked again before every start: a lost one is dropped, one that
        // answers again rejoins.
        let next = hosts.as_ref().map(placement::Hosts::place).transpose()?;
        if stops.load(Ordering::SeqCst) > 0 {
            info!("supervise: stopped by the user before restart {restart}");
            return Ok(());
        }
        let mut record = record(&job.run, &attempt, restart, why, wait);
        record.hosts = placed.as_ref().zip(next.as_ref()).map(|(before, now)| placement::change(before, now));
        placed = next;
        info!("supervise: {}", restarts::announcement(&record));
        restarts::append(&job.run.root, &record)?;
    }
}

/// The wait before restart `restart` (1 for the first): `first`, doubled each time, at
/// most `max`.
fn backoff(first: Duration, max: Duration, restart: u32) -> Duration {
    first.saturating_mul(1 << (restart.saturating_sub(1)).min(20)).min(max)
}

/// Sleeps `wait`; false when a stop was asked meanwhile.
fn sleep_unless_stopped(wait: Duration, stops: &AtomicUsize) -> bool {
    let end = std::time::Instant::now() + wait;
    while std::time::Instant::now() < end {
        if stops.load(Ordering::SeqCst) > 0 {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50).min(end.saturating_duration_since(std::time::Instant::now())));
    }
    stops.load(Ordering::SeqCst) == 0
}

/// Where the ended `attempt` stood and where restart `restart` starts.
fn record(run: &RunDir, attempt: &Attempt, restart: u32, reason: String, waited: Duration) -> RestartRecord {
    let failed_at_step = crate::report::metrics_log::MetricsLog::new(&run.metrics()).last_step();
    let newest = crate::checkpoint::list_valid(&run.checkpoints()).pop();
    let resumes_from_step = newest.as_ref().map_or(0, |f| f.state.step);
    // Work since the later of the attempt's start and its newest checkpoint is lost.
    let saved_at = newest.and_then(|f| std::fs::metadata(&f.dir).and_then(|m| m.modified()).ok());
    let since = saved_at.map_or(attempt.started_at, |s| s.max(attempt.started_at));
    RestartRecord {
        restart,
        reason,
        failed_at_step,
        resumes_from_step,
        steps_recomputed: failed_at_step.saturating_sub(resumes_from_step),
        time_lost_s: SystemTime::now().duration_since(since).unwrap_or_default().as_secs_f64(),
        waited_s: waited.as_secs_f64(),
        hosts: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_back_off_doubles_up_to_its_bound() {
        let s = Duration::from_secs;
        let waits: Vec<u64> = (1..=8).map(|r| backoff(s(2), s(60), r).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(s(2), s(60), 1000), s(60));
    }
}

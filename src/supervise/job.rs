//! The supervised job: its command line (`mpirun … algpt2-ddp --config FILE …`), read as
//! the binary would read it to find the run directory; one attempt at running it, in a
//! process group of its own, with the user's stop passed on; and what an attempt leaves
//! behind cleared away before the next.

use super::placement::Placement;
use super::verdict::Ended;
use crate::cli::{Cli, Command};
use crate::config::Config;
use crate::run_dir::RunDir;
use anyhow::{bail, Context};
use clap::Parser;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn usage(why: String) -> anyhow::Error {
    crate::exit_code::Usage(why).into()
}

pub struct Job {
    argv: Vec<String>,
    /// Where the algpt2-ddp program and its arguments start and end in `argv`.
    program_at: usize,
    program_end: usize,
    pub cfg: Config,
    pub run: RunDir,
}

/// mpirun's options that set the rank count or the hosts, which a supervisor given the
/// host list sets itself (Open MPI 4's spellings).
const PLACEMENT_OPTIONS: [&str; 16] = [
    "-n", "--n", "-np", "--np", "-c", "-hostfile", "--hostfile", "-machinefile", "--machinefile", "-H", "-host", "--host", "-rf",
    "--rankfile", "-default-hostfile", "--default-hostfile",
];

impl Job {
    /// The job `argv`: its `algpt2-ddp` (the binary or the bundle's launcher, by name)
    /// must train, with a config whose `checkpoint.resume` is `auto` (a restart resumes
    /// from the newest checkpoint).
    pub fn from_command(argv: &[String]) -> anyhow::Result<Job> {
        let Some(at) =
            argv.iter().position(|a| std::path::Path::new(a).file_name().is_some_and(|n| n.to_string_lossy().starts_with("algpt2-ddp")))
        else {
            return Err(usage(format!(
                "supervise: the command {argv:?} runs no algpt2-ddp: give the training command after `--`, e.g. `-- mpirun -n 2 algpt2-ddp --config FILE`"
            )));
        };
        // In an MPMD line (`mpirun -n 1 algpt2-ddp … : -n 1 algpt2-ddp …`) the first
        // program's arguments end at the `:`.
        let end = argv[at..].iter().position(|a| a == ":").map_or(argv.len(), |n| at + n);
        let cli = Cli::try_parse_from(&argv[at..end])
            .map_err(|e| usage(format!("supervise: the job's algpt2-ddp arguments: {}", e.render().to_string().trim_end())))?;
        let args = match cli.command {
            None => cli.run,
            Some(Command::Train(args)) => args,
            Some(other) => return Err(usage(format!("supervise restarts training runs; the job's algpt2-ddp runs {other:?}"))),
        };
        let cfg = args.load()?;
        if cfg.checkpoint.resume != "auto" {
            return Err(usage(format!(
                "supervise: checkpoint.resume is {:?}; a restarted job must resume from the run's newest checkpoint, so it must be auto",
                cfg.checkpoint.resume
            )));
        }
        let run = RunDir::for_config(&cfg);
        Ok(Job { argv: argv.to_vec(), program_at: at, program_end: end, cfg, run })
    }

    /// The job's algpt2-ddp, as its launcher runs it on every host.
    pub fn binary(&self) -> &str {
        &self.argv[self.program_at]
    }

    /// The launcher's own arguments (mpirun's flags), before the program.
    pub fn launcher_args(&self) -> &[String] {
        &self.argv[1.min(self.program_at)..self.program_at]
    }

    /// Refuses (exit 2) a job whose hosts and rank count a supervisor given the host list
    /// cannot set: one without mpirun before its algpt2-ddp, an MPMD line, or one that
    /// sets them itself.
    pub fn refuse_own_placement(&self) -> anyhow::Result<()> {
        if self.program_at == 0 {
            return Err(usage(format!(
                "supervise --hostfile: the job {:?} starts algpt2-ddp without mpirun: give `-- mpirun [flags] algpt2-ddp --config FILE`",
                self.argv[0]
            )));
        }
        if self.program_end < self.argv.len() {
            return Err(usage("supervise --hostfile: the job is an MPMD line (`:`), whose ranks per program it cannot share out".into()));
        }
        let own = self.launcher_args().iter().find(|a| PLACEMENT_OPTIONS.iter().any(|o| *a == o || a.starts_with(&format!("{o}="))));
        if let Some(own) = own {
            return Err(usage(format!(
                "supervise --hostfile: the job's launcher sets {own:?} itself; with --hostfile the supervisor sets the hosts and the rank count \
                 (-n, --hostfile): leave them out of the job"
            )));
        }
        Ok(())
    }

    /// The command line of a start: the job's own, or on `placement` with the hostfile
    /// `written` and its rank count put after the launcher's name and, where the global
    /// batch takes another accumulation, that set after the program's arguments (later
    /// sets win).
    fn command_line(&self, placement: Option<(&Path, &Placement)>) -> Vec<String> {
        let Some((written, placement)) = placement else { return self.argv.clone() };
        let mut argv =
            vec![self.argv[0].clone(), "--hostfile".into(), written.display().to_string(), "-n".into(), placement.ranks.to_string()];
        argv.extend_from_slice(&self.argv[1..self.program_end]);
        if placement.grad_accum_steps != self.cfg.train.grad_accum_steps {
            argv.push(format!("--set=train.grad_accum_steps={}", placement.grad_accum_steps));
        }
        argv.extend_from_slice(&self.argv[self.program_end..]);
        argv
    }

    /// Starts attempt `restart` (0: the first) in a process group of its own, so that the
    /// user's stop reaches it only through the supervisor and what it leaves behind can
    /// be found.
    pub fn start(&self, restart: u32, placement: Option<(&Path, &Placement)>) -> anyhow::Result<Attempt> {
        let mut argv = self.command_line(placement);
        if restart > 0 && self.program_at > 0 && launcher_is_open_mpi(&argv[0]) {
            argv = forwarding(&argv, crate::restarts::ENV_RESTART);
        }
        let mut command = std::process::Command::new(&argv[0]);
        command.args(&argv[1..]).process_group(0);
        if restart > 0 {
            command.env(crate::restarts::ENV_RESTART, restart.to_string());
        }
        let child = command.spawn().with_context(|| format!("supervise: cannot start {:?}", self.argv[0]))?;
        Ok(Attempt { pid: child.id() as i32, started_at: std::time::SystemTime::now() })
    }
}

/// Whether `launcher` is Open MPI's (its `--version` says so, within a few seconds).
/// Open MPI hands a rank on another host only the variables named with `-x`; MPICH's and
/// Intel's launchers pass the whole environment and do not know `-x`.
fn launcher_is_open_mpi(launcher: &str) -> bool {
    let mut ask = std::process::Command::new(launcher);
    ask.arg("--version");
    matches!(super::short_command::ask(&mut ask, Duration::from_secs(10)), Ok(Some(answer)) if answer.stdout.contains("Open MPI"))
}

/// `argv` (an Open MPI launch) with `-x variable` in each of its app contexts: the first
/// and each after a `:`, as Open MPI reads `-x` per context.
fn forwarding(argv: &[String], variable: &str) -> Vec<String> {
    let mut with = Vec::with_capacity(argv.len() + 4);
    for (i, arg) in argv.iter().enumerate() {
        with.push(arg.clone());
        if i == 0 || arg == ":" {
            with.extend(["-x".to_string(), variable.to_string()]);
        }
    }
    with
}

/// One run of the job.
pub struct Attempt {
    pid: i32,
    pub started_at: std::time::SystemTime,
}

impl Attempt {
    /// Waits for the job to end. The `stops`-th stop asked of the supervisor is passed on:
    /// the first as SIGUSR1 (mpirun forwards it; every rank saves and exits 0), the second
    /// as SIGTERM, a third as SIGKILL to the whole group. Orphans of the job (this process
    /// is their subreaper) are reaped on the way.
    pub fn wait(&self, stops: &AtomicUsize) -> Ended {
        let mut passed_on = 0;
        loop {
            let asked = stops.load(Ordering::SeqCst);
            if asked > passed_on {
                passed_on = asked;
                // SAFETY: plain kill calls on the job's pid and group.
                unsafe {
                    match asked {
                        1 => libc::kill(self.pid, libc::SIGUSR1),
                        2 => libc::kill(self.pid, libc::SIGTERM),
                        _ => libc::kill(-self.pid, libc::SIGKILL),
                    };
                }
            }
            if let Some(ended) = reap_any(self.pid) {
                return ended;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// After the job's process ended: what is left of its group (ranks whose launcher is
    /// gone, a stopped rank) gets `grace` to end by itself, saving if it can, then SIGKILL.
    pub fn clear_away(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while group_alive(self.pid) && Instant::now() < deadline {
            let _ = reap_any(self.pid);
            std::thread::sleep(Duration::from_millis(100));
        }
        if group_alive(self.pid) {
            tracing::warn!("supervise: processes of the ended job were still there after {:.0} s: killing them", grace.as_secs_f64());
            // SAFETY: SIGKILL to the job's own group (it also ends stopped processes).
            unsafe { libc::kill(-self.pid, libc::SIGKILL) };
            while group_alive(self.pid) {
                let _ = reap_any(self.pid);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Orphans of the job come to this process (a subreaper) rather than to init, so that
/// they are reaped here and a group of zombies is never taken for live ranks.
pub fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes one integer argument.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
}

/// Reaps every ended child; how `pid` ended, if it was among them.
fn reap_any(pid: i32) -> Option<Ended> {
    let mut found = None;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let reaped = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if reaped <= 0 {
            return found;
        }
        if reaped == pid {
            found = Some(if libc::WIFSIGNALED(status) {
                Ended::Signal(libc::WTERMSIG(status))
            } else {
                Ended::Code(libc::WEXITSTATUS(status))
            });
        }
    }
}

/// Whether any process of the group `pgid` is left (zombies are reaped first).
fn group_alive(pgid: i32) -> bool {
    let _ = reap_any(pgid);
    // SAFETY: signal 0 only checks that the group exists.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

/// Waits until no training holds the run directory's lock (the ended attempt's rank 0
/// may be on another host, ending within its `dist.stop_grace_s`), for at most `limit`.
pub fn wait_for_run_lock(run: &RunDir, limit: Duration) -> anyhow::Result<()> {
    let path = run.lock();
    if !path.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + limit;
    loop {
        let file = crate::run_dir::open_lock_file(&path).with_context(|| format!("cannot open {}", path.display()))?;
        if file.try_lock().is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "supervise: {} is still held by a training {:.0} s after the job ended (pid {}): not starting a second one",
                path.display(),
                limit.as_secs_f64(),
                std::fs::read_to_string(&path).unwrap_or_default().trim()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn open_mpi_is_told_to_pass_the_restart_number_to_every_app_context() {
        let line = |s: &str| forwarding(&argv(s), "ALGPT2_RESTART").join(" ");
        assert_eq!(line("mpirun -n 2 algpt2-ddp -c x.yaml"), "mpirun -x ALGPT2_RESTART -n 2 algpt2-ddp -c x.yaml");
        assert_eq!(
            line("mpirun -n 1 algpt2-ddp -c a.yaml : -n 1 algpt2-ddp -c b.yaml"),
            "mpirun -x ALGPT2_RESTART -n 1 algpt2-ddp -c a.yaml : -x ALGPT2_RESTART -n 1 algpt2-ddp -c b.yaml"
        );
    }

    #[test]
    fn only_a_launcher_that_says_it_is_open_mpi_is_taken_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let fake = |name: &str, says: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\necho '{says}'\n")).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
            path.display().to_string()
        };
        assert!(launcher_is_open_mpi(&fake("ompi", "mpirun (Open MPI) 4.1.4")));
        assert!(!launcher_is_open_mpi(&fake("hydra", "HYDRA build details:")));
        assert!(!launcher_is_open_mpi("/nonexistent/mpirun"));
    }

    #[test]
    fn the_run_directory_comes_from_the_jobs_own_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().display();
        // mpirun's own -c (its process count) is not the config.
        let job = Job::from_command(&argv(&format!(
            "mpirun -c 2 --oversubscribe target/debug/algpt2-ddp --config configs/quickstart.yaml --set out_dir={out} --set run_name=r"
        )))
        .unwrap();
        assert_eq!(job.run.root, dir.path().join("r"));
        let job = Job::from_command(&argv(&format!("bin/algpt2-ddp train -c configs/quickstart.yaml --set out_dir={out}"))).unwrap();
        assert_eq!(job.run.root, dir.path().join("quickstart"));
        let mpmd =
            format!("mpirun -n 1 algpt2-ddp -c configs/quickstart.yaml --set=out_dir={out} : -n 1 algpt2-ddp -c configs/quickstart.yaml");
        assert_eq!(Job::from_command(&argv(&mpmd)).unwrap().run.root, dir.path().join("quickstart"));
    }

    #[test]
    fn a_job_that_cannot_be_restarted_is_refused_before_it_starts() {
        let e = |s: &str| format!("{:#}", Job::from_command(&argv(s)).err().unwrap());
        assert!(e("mpirun -n 2 python train.py").contains("runs no algpt2-ddp"));
        assert!(e("algpt2-ddp info --config configs/quickstart.yaml").contains("supervise restarts training runs"));
        let resume_none =
            Job::from_command(&argv("algpt2-ddp --config configs/quickstart.yaml --set checkpoint.resume=none")).err().unwrap();
        assert!(resume_none.is::<crate::exit_code::Usage>());
        assert!(format!("{resume_none:#}").contains("checkpoint.resume is \"none\""), "{resume_none:#}");
        assert!(e("algpt2-ddp --config configs/nope.yaml").contains("nope.yaml"));
    }

    #[test]
    fn with_a_host_list_the_supervisor_sets_the_hosts_ranks_and_accumulation() {
        let job =
            Job::from_command(&argv("mpirun --bind-to none algpt2-ddp --config configs/quickstart.yaml --set train.grad_accum_steps=2"))
                .unwrap();
        job.refuse_own_placement().unwrap();
        assert_eq!(job.binary(), "algpt2-ddp");
        assert_eq!(job.launcher_args(), ["--bind-to", "none"]);
        let host = |name: &str| crate::supervise::hosts::Host { name: name.into(), slots: 1 };
        let all = Placement { hosts: vec![host("a"), host("b"), host("c")], ranks: 3, grad_accum_steps: 2 };
        let fewer = Placement { hosts: vec![host("a"), host("b")], ranks: 2, grad_accum_steps: 3 };
        let at = Path::new("/r/supervise-hosts");
        let line = |p: &Placement| job.command_line(Some((at, p))).join(" ");
        let own = "algpt2-ddp --config configs/quickstart.yaml --set train.grad_accum_steps=2";
        assert_eq!(line(&all), format!("mpirun --hostfile /r/supervise-hosts -n 3 --bind-to none {own}"));
        assert_eq!(line(&fewer), format!("mpirun --hostfile /r/supervise-hosts -n 2 --bind-to none {own} --set=train.grad_accum_steps=3"));
        assert_eq!(job.command_line(None).join(" "), format!("mpirun --bind-to none {own}"));
    }

    #[test]
    fn a_job_that_places_its_own_ranks_is_refused_with_a_host_list() {
        let refused = |s: &str| {
            let e = Job::from_command(&argv(s)).unwrap().refuse_own_placement().unwrap_err();
            assert!(e.is::<crate::exit_code::Usage>());
            format!("{e:#}")
        };
        let cfg = "algpt2-ddp --config configs/quickstart.yaml";
        assert!(refused(&format!("mpirun -n 2 {cfg}")).contains("sets \"-n\" itself"));
        assert!(refused(&format!("mpirun -np 2 {cfg}")).contains("sets \"-np\" itself"));
        assert!(refused(&format!("mpirun --hostfile=h {cfg}")).contains("sets \"--hostfile=h\" itself"));
        assert!(refused(&format!("mpirun -H a,b {cfg}")).contains("sets \"-H\" itself"));
        assert!(refused(cfg).contains("without mpirun"));
        assert!(refused(&format!("mpirun {cfg} : {cfg}")).contains("MPMD"));
    }
}

//! `algpt2-ddp supervise --hostfile` losing a host: three network namespaces on a bridge
//! stand in for three hosts (`launch/netns-hosts.sh up 3`), the supervisor runs mpirun in
//! the first with one rank on each, and Open MPI starts the others' daemons through
//! `launch/netns-rsh.sh`. Mid-run the third host is cut off (its processes killed, its
//! link taken down); the supervisor's check before the restart leaves it out, and the job
//! ends on two ranks with the global batch of three kept by more gradient accumulation,
//! every step logged once, the restart naming the host it dropped. And a host that
//! answers again rejoins at the next restart, back to three ranks. Those need root;
//! elsewhere they print "skipped: ..." and pass. Without namespaces: what the supervisor
//! refuses before anything starts.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

// Long enough that the host is lost on the way on an idle machine too.
const STEPS: u64 = 40;

/// The namespaces of this test: names of its own (so that it never meets another run's),
/// addresses as launch/netns-hosts.sh's (each set of namespaces has its own network).
struct Hosts {
    env: Vec<(&'static str, String)>,
}

impl Hosts {
    fn new(tag: &str) -> Hosts {
        let id = std::process::id();
        let env = vec![
            ("ALGPT2_NS1", format!("algpt2-{tag}{id}-1")),
            ("ALGPT2_NS2", format!("algpt2-{tag}{id}-2")),
            ("ALGPT2_NS3", format!("algpt2-{tag}{id}-3")),
            ("ALGPT2_NSB", format!("algpt2-{tag}{id}-b")),
            ("ALGPT2_IP1", "10.77.0.1".into()),
            ("ALGPT2_IP2", "10.77.0.2".into()),
            ("ALGPT2_IP3", "10.77.0.3".into()),
            ("ALGPT2_SUBNET", "10.77.0.0/24".into()),
        ];
        Hosts { env }
    }

    fn get(&self, key: &str) -> &str {
        &self.env.iter().find(|(k, _)| *k == key).unwrap().1
    }

    fn ips(&self) -> [&str; 3] {
        [self.get("ALGPT2_IP1"), self.get("ALGPT2_IP2"), self.get("ALGPT2_IP3")]
    }

    /// Takes host `n`'s link down or up.
    fn link(&self, n: usize, state: &str) {
        let ns = self.get(&format!("ALGPT2_NS{n}"));
        let out = run_bounded(Command::new("ip").args(["-n", ns, "link", "set", &format!("algpt2-v{n}"), state]), LIMIT);
        assert!(out.status.success(), "{}", stderr(&out));
    }

    /// Kills every process of host `n` (the Open MPI daemon and its rank) and waits until
    /// none is left, so that their connections are closed.
    fn kill_all_on(&self, n: usize) {
        let ns = self.get(&format!("ALGPT2_NS{n}"));
        let pids = || -> Vec<i32> {
            stdout(&run_bounded(Command::new("ip").args(["netns", "pids", ns]), LIMIT))
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        };
        assert!(!pids().is_empty(), "no process on host {n}");
        let deadline = Instant::now() + LIMIT;
        while !pids().is_empty() {
            assert!(Instant::now() < deadline, "processes of host {n} outlived SIGKILL: {:?}", pids());
            for pid in pids() {
                // SAFETY: a plain kill of a process in the test's own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn script(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("launch/netns-hosts.sh")).args(args).envs(self.env.iter().map(|(k, v)| (k, v)));
        run_bounded(&mut cmd, LIMIT)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.script(&["down"]);
    }
}

fn sets() -> Vec<String> {
    [
        "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.max_steps=40", "train.log_interval=1", "train.save_interval=4",
        "train.eval_interval=0", "optim.warmup_steps=1", "checkpoint.keep_last=10", "dist.stop_grace_s=3", "dist.timeout_s=30",
        "wandb.mode=disabled",
    ]
    .iter()
    .flat_map(|s| ["--set".to_string(), s.to_string()])
    .collect()
}

fn logged_steps(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

fn wait_for_steps(run: &Path, n: usize, job: &mut Running) {
    let deadline = Instant::now() + LIMIT;
    while logged_steps(run) < n {
        assert!(job.is_running() && Instant::now() < deadline, "no step {n}: {}", job.stderr_so_far());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn restarts(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("restarts.jsonl")).map_or(vec![], |t| t.lines().map(|l| serde_json::from_str(l).unwrap()).collect())
}

/// The two tests take turns: each runs three ranks on a 2-core machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Three namespace hosts up, and the supervised job on them from host 1 (mpirun knows its
/// address as its own) with one rank per host in the hostfile and at least 2 ranks; the
/// job line gives neither -n nor --hostfile: the supervisor sets them. The run is
/// `<d>/runs/h`.
fn supervised(hosts: &Hosts, d: &Path) -> Command {
    let up = hosts.script(&["up", "3"]);
    assert!(up.status.success(), "netns-hosts.sh up 3: {}", stderr(&up));
    let [ip1, ip2, ip3] = hosts.ips();
    let hostfile = d.join("hosts");
    std::fs::write(&hostfile, format!("# three namespace hosts\n{ip1} slots=1\n{ip2} slots=1\n{ip3} slots=1\n")).unwrap();
    let subnet = hosts.get("ALGPT2_SUBNET");
    let agent = repo().join("launch/netns-rsh.sh");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", hosts.get("ALGPT2_NS1"), bin(), "supervise", "--backoff", "1", "--min-ranks", "2", "--hostfile"])
        .arg(&hostfile)
        .args(["--", "mpirun", "--allow-run-as-root", "--bind-to", "none", "--mca", "plm_rsh_agent"])
        .arg(&agent)
        .args(["--mca", "plm_rsh_no_tree_spawn", "1", "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", subnet])
        .args(["--mca", "oob_tcp_if_include", subnet, bin()])
        .args(tiny_run_args(&[], d, "h", &[]))
        .args(sets())
        .envs(hosts.env.iter().map(|(k, v)| (k, v)))
        .current_dir(repo());
    one_math_thread(&mut cmd);
    cmd
}

/// Every step once, to the end.
fn assert_every_step_once(run: &Path) {
    let steps: Vec<u64> = rows_without_machine_metrics(run).iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>());
    assert!(run.join(format!("checkpoints/step_{STEPS:08}")).is_dir());
}

const ON3: &str = "global batch: 12 windows = micro_batch_size 2 x grad_accum_steps 2 x world 3";
const ON2: &str = "global batch: 12 windows = micro_batch_size 2 x grad_accum_steps 3 x world 2";

#[test]
fn a_host_cut_off_mid_run_is_dropped_and_the_job_ends_on_two_with_the_global_batch_kept() {
    if let Some(reason) = cannot_make_namespaces("c") {
        println!("skipped: {reason}");
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let hosts = Hosts::new("c");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let [ip1, ip2, ip3] = hosts.ips();
    let run = d.join("runs/h");
    let mut job = spawn(&mut supervised(&hosts, d));

    // After the checkpoint of step 4 and before that of step 8: host 3 is lost. Its
    // processes are killed first (so that the peers' connections close at once rather
    // than after the watchdog's timeout), then its link goes down, so that the check
    // before the restart cannot reach it.
    wait_for_steps(&run, 6, &mut job);
    hosts.kill_all_on(3);
    hosts.link(3, "down");
    let out = finish_bounded(job, LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");

    // The restart: host 3 dropped, 2 ranks, the accumulation that keeps 3 × 2.
    let records = restarts(&run);
    assert_eq!(records.len(), 1, "{records:?}\n{err}");
    let moved = &records[0]["hosts"];
    assert_eq!(moved["dropped"], serde_json::json!([ip3]), "{records:?}");
    assert_eq!(moved["rejoined"], serde_json::json!([]), "{records:?}");
    assert_eq!(moved["running"], serde_json::json!([ip1, ip2]), "{records:?}");
    assert_eq!((moved["ranks"].as_u64(), moved["grad_accum_steps"].as_u64()), (Some(2), Some(3)), "{records:?}");
    assert!(err.contains(&format!("supervise: host {ip3} left out:")) && err.contains("Network is unreachable"), "{err}");
    assert!(err.contains(&format!("(dropped {ip3}), train.grad_accum_steps 3")), "{err}");
    assert_eq!(std::fs::read_to_string(run.join("supervise-hosts")).unwrap(), format!("{ip1} slots=1\n{ip2} slots=1\n"));

    // The same global batch before and after, on 3 ranks then 2; the restarted run names
    // its restart and the host it lost.
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains(ON3) && log.contains(ON2), "{log}");
    assert!(log.find(ON3) < log.find(ON2), "{log}");
    assert!(log.contains(&format!("(dropped {ip3})")), "{log}");
    assert_every_step_once(&run);
    for line in err.lines().filter(|l| l.contains("supervise:")) {
        println!("{line}");
    }
    println!("lost a host and ended on two: {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn a_host_that_answers_again_rejoins_at_the_next_restart() {
    if let Some(reason) = cannot_make_namespaces("r") {
        println!("skipped: {reason}");
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let hosts = Hosts::new("r");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let [ip1, ip2, ip3] = hosts.ips();
    let run = d.join("runs/h");
    // Host 3 is unreachable from the start: the first start runs on two.
    let mut cmd = supervised(&hosts, d);
    hosts.link(3, "down");
    let mut job = spawn(&mut cmd);
    wait_for_steps(&run, 6, &mut job);
    // It answers again; then host 2 fails, and the restart takes host 3 back.
    hosts.link(3, "up");
    hosts.kill_all_on(2);
    let out = finish_bounded(job, LIMIT);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("supervise: host {ip3} left out:")), "{err}");

    let records = restarts(&run);
    assert_eq!(records.len(), 1, "{records:?}\n{err}");
    let moved = &records[0]["hosts"];
    assert_eq!(moved["dropped"], serde_json::json!([]), "{records:?}");
    assert_eq!(moved["rejoined"], serde_json::json!([ip3]), "{records:?}");
    assert_eq!(moved["running"], serde_json::json!([ip1, ip2, ip3]), "{records:?}");
    assert_eq!((moved["ranks"].as_u64(), moved["grad_accum_steps"].as_u64()), (Some(3), Some(2)), "{records:?}");
    assert!(err.contains(&format!("(rejoined {ip3}), train.grad_accum_steps 2")), "{err}");
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.find(ON2).is_some() && log.find(ON2) < log.find(ON3), "{log}");
    assert_every_step_once(&run);
    println!("a host rejoined: {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn a_host_list_is_refused_with_a_job_that_places_itself_and_hosts_too_few_or_indivisible_never_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hostfile = d.join("hosts");
    std::fs::write(&hostfile, "a slots=1\nb slots=1\nlost slots=1\n").unwrap();
    // An ssh stand-in: `lost` does not answer, the others run the command here.
    let agent = d.join("agent.sh");
    std::fs::write(
        &agent,
        "#!/bin/sh\nif [ \"$1\" = lost ]; then echo \"connect to host $1: No route to host\" >&2; exit 255; fi\nshift\nexec \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let supervise = |flags: &[&str], launcher: &[&str], extra: &[&str]| {
        let mut cmd = Command::new(bin());
        cmd.arg("supervise").arg("--hostfile").arg(&hostfile).args(flags).arg("--").arg("mpirun").args(launcher);
        cmd.arg(bin())
            .args(tiny_run_args(&[], d, "h", &[]))
            .args(sets())
            .args(extra)
            .env("OMPI_MCA_plm_rsh_agent", &agent)
            .current_dir(repo());
        let out = run_bounded(&mut cmd, LIMIT);
        (out.status.code(), stderr(&out))
    };
    // The job line's own rank count or hosts: refused before anything starts.
    let (code, err) = supervise(&[], &["-n", "2"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the job's launcher sets \"-n\" itself"), "{err}");
    let (code, err) = supervise(&["--min-ranks", "4"], &[], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--min-ranks 4 is more than the 3 rank(s)"), "{err}");
    // 3 ranks × 1 micro-step do not divide over the 2 that answer.
    let (code, err) = supervise(&[], &[], &["--set", "train.grad_accum_steps=1"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("host lost left out:") && err.contains("No route to host"), "{err}");
    assert!(err.contains("3 micro-batches does not divide over 2 rank(s)"), "{err}");
    // 3 × 2 would, but 2 ranks are fewer than --min-ranks 3.
    let (code, err) = supervise(&["--min-ranks", "3"], &[], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not starting the job: 2 rank(s) on the hosts that answer, fewer than --min-ranks 3; lost: lost ("), "{err}");
    assert!(!d.join("runs/h/metrics.jsonl").exists(), "nothing was started");
}

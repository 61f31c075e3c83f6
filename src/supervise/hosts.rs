//! The supervised job's hosts (`supervise --hostfile F`): the host list in Open MPI's
//! hostfile syntax, and the check before each start that a host answers and runs the
//! job's binary, through the same remote-shell agent Open MPI starts its daemons with.
//! A host that fails is left out of that start; one that answers again is taken back.

use super::short_command::{self, Answer};
use anyhow::{bail, Context};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// One line of a hostfile: a host and the ranks it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub slots: usize,
}

/// The hosts of an Open MPI hostfile: `NAME [slots=N] [max_slots=M]` per line (slots 1
/// when not given), `#` comments and blank lines skipped. `max_slots` is Open MPI's
/// business and kept out of the count; any other word is refused, since a hostfile
/// this does not understand would give a rank count mpirun does not.
pub fn parse(text: &str) -> anyhow::Result<Vec<Host>> {
    let mut hosts = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        let Some(name) = words.next() else { continue };
        let mut slots = 1;
        for word in words {
            match word.split_once('=') {
                Some(("slots", n)) => {
                    slots = n
                        .parse()
                        .ok()
                        .filter(|&n: &usize| n >= 1)
                        .with_context(|| format!("line {}: slots={n:?} is not a whole number of ranks, 1 or more", number + 1))?;
                }
                Some(("max_slots" | "slots_max", _)) => {}
                _ => bail!("line {}: {word:?} is not understood (the syntax is `HOST slots=N`)", number + 1),
            }
        }
        hosts.push(Host { name: name.to_string(), slots });
    }
    if hosts.is_empty() {
        bail!("it names no host (one `HOST slots=N` per line)");
    }
    Ok(hosts)
}

/// The hostfile `parse` reads back as `hosts`.
pub fn render(hosts: &[Host]) -> String {
    hosts.iter().map(|h| format!("{} slots={}\n", h.name, h.slots)).collect()
}

pub fn read(path: &Path) -> anyhow::Result<Vec<Host>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the hostfile {}", path.display()))?;
    parse(&text).with_context(|| format!("the hostfile {}", path.display()))
}

/// Open MPI's `plm_rsh_agent` for the job: its mpirun's `--mca plm_rsh_agent X`, else
/// `OMPI_MCA_plm_rsh_agent` from `env`, else ssh; split into words as Open MPI does
/// (an agent may carry its own options, `ssh -p 2222`).
pub fn rsh_agent(launcher_args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    let from_args = launcher_args
        .windows(3)
        .rev()
        .find_map(|w| (matches!(w[0].as_str(), "--mca" | "-mca" | "--gmca" | "-gmca") && w[1] == "plm_rsh_agent").then(|| w[2].clone()));
    let agent = from_args.or_else(|| env("OMPI_MCA_plm_rsh_agent")).filter(|a| !a.trim().is_empty()).unwrap_or_else(|| "ssh".into());
    agent.split_whitespace().map(String::from).collect()
}

/// How long a host may take to answer before it counts as lost.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether each of `hosts` answers `agent HOST binary --version` with this program's
/// name within `timeout`: Ok, or why not. The hosts are asked together, so that lost
/// ones cost one timeout, not one each.
pub fn check_all(hosts: &[Host], agent: &[String], binary: &str, timeout: Duration) -> Vec<Result<(), String>> {
    std::thread::scope(|scope| {
        let asks: Vec<_> = hosts.iter().map(|h| scope.spawn(move || check(&h.name, agent, binary, timeout))).collect();
        asks.into_iter().map(|ask| ask.join().unwrap_or_else(|_| Err("the check panicked".into()))).collect()
    })
}

fn check(host: &str, agent: &[String], binary: &str, timeout: Duration) -> Result<(), String> {
    let (program, options) = agent.split_first().ok_or("no rsh agent")?;
    let mut ask = Command::new(program);
    ask.args(options).args([host, binary, "--version"]);
    let Answer { status, stdout: out, stderr: err } = short_command::ask(&mut ask, timeout)
        .map_err(|e| format!("cannot run the rsh agent {program:?}: {e}"))?
        .ok_or_else(|| format!("no answer within {:.0} s", timeout.as_secs_f64()))?;
    let said = err.lines().chain(out.lines()).rfind(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
    if !status.success() {
        return Err(format!(
            "`{} {host} {binary} --version` {status}{}",
            agent.join(" "),
            if said.is_empty() { String::new() } else { format!(": {said}") }
        ));
    }
    if !out.contains("algpt2-ddp") {
        return Err(format!("`{binary} --version` there printed {:?}, not algpt2-ddp's version", out.trim()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn a_hostfile_is_read_as_open_mpi_reads_it() {
        let hosts = parse("# the nodes\nnode1 slots=4\n\n  node2   slots=2 max_slots=8 # spare\nnode3\n").unwrap();
        let h = |name: &str, slots| Host { name: name.into(), slots };
        assert_eq!(hosts, [h("node1", 4), h("node2", 2), h("node3", 1)]);
        assert_eq!(parse(&render(&hosts)).unwrap(), hosts);
        let e = |text: &str| format!("{:#}", parse(text).unwrap_err());
        assert!(e("node1 slots=0").contains("line 1: slots=\"0\" is not a whole number"), "{}", e("node1 slots=0"));
        assert!(e("a\nnode1 slots=x").contains("line 2"));
        assert!(e("node1 cpus=4").contains("\"cpus=4\" is not understood"));
        assert!(e("# nothing\n\n").contains("names no host"));
    }

    #[test]
    fn the_agent_is_the_jobs_mpirun_setting_then_the_environment_then_ssh() {
        let none = |_: &str| None;
        let env = |k: &str| (k == "OMPI_MCA_plm_rsh_agent").then(|| "rsh -x".to_string());
        assert_eq!(rsh_agent(&words("mpirun --mca btl tcp,self --mca plm_rsh_agent /x/netns-rsh.sh"), &env), ["/x/netns-rsh.sh"]);
        assert_eq!(rsh_agent(&words("mpirun --mca btl tcp,self"), &env), ["rsh", "-x"]);
        assert_eq!(rsh_agent(&words("mpirun"), &none), ["ssh"]);
    }

    #[test]
    fn a_host_passes_only_when_the_agent_runs_the_binary_there() {
        // `sh -c SCRIPT` as the agent: HOST becomes $0, the binary $1.
        let agent = |script: &str| vec!["sh".to_string(), "-c".to_string(), script.to_string()];
        let ok = agent("echo algpt2-ddp 0.1.0");
        let lost = agent("echo \"ssh: connect to host $0 port 22: No route to host\" >&2; exit 255");
        let hung = agent("sleep 30");
        let other = agent("echo bash 5.1");
        let host = |name: &str| Host { name: name.into(), slots: 1 };
        let started = Instant::now();
        let results: Vec<_> = [&ok, &lost, &hung, &other]
            .iter()
            .map(|a| check_all(&[host("n1")], a, "algpt2-ddp", Duration::from_millis(500)).remove(0))
            .collect();
        assert_eq!(results[0], Ok(()));
        assert!(
            results[1].as_ref().unwrap_err().ends_with("exit status: 255: ssh: connect to host n1 port 22: No route to host"),
            "{results:?}"
        );
        assert!(results[2].as_ref().unwrap_err().starts_with("no answer within"), "{results:?}");
        assert!(results[3].as_ref().unwrap_err().contains("not algpt2-ddp's version"), "{results:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(check_all(&[host("n1")], &words("/nonexistent/agent"), "x", Duration::from_secs(1))[0]
            .as_ref()
            .unwrap_err()
            .contains("cannot run"));
    }
}

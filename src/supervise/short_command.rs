//! A short command the supervisor asks something of (`--version` of the job's launcher,
//! of the binary on each host), bounded in time: a command that never answers must not
//! hold a restart.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What a short command said: its exit status, stdout and stderr.
pub struct Answer {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `command` with no input and returns what it said within `timeout`: `None` when it
/// did not end in time (its process group is then killed), an error when it cannot start.
pub fn ask(command: &mut Command, timeout: Duration) -> std::io::Result<Option<Answer>> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so that a timeout ends the command and whatever it started.
        .process_group(0)
        .spawn()?;
    // Read on the side: a command that leaves a helper holding its output open (an ssh
    // control master) must not hold the answer past its end.
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        let (send, receive) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            let _ = send.send(text);
        });
        receive
    };
    let out = reader(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = reader(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                // SAFETY: SIGKILL to the command's own process group.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                return Ok(None);
            }
        }
    };
    let collected = |r: std::sync::mpsc::Receiver<String>| r.recv_timeout(Duration::from_secs(1)).unwrap_or_default();
    Ok(Some(Answer { status, stdout: collected(out), stderr: collected(err) }))
}

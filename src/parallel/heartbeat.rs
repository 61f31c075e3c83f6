//! The watchdog's side channel: each rank's watchdog thread tells the others, over UDP,
//! how far its rank got and whether its main thread waits inside a collective, so that
//! the rank whose watchdog fires can name the rank that stopped. MPI cannot carry this:
//! it is not initialized for calls from a second thread, and the main thread is the one
//! that is stuck.
//!
//! Best effort by design: a socket that cannot be opened disables the channel with one
//! warning, lost or blocked datagrams only make the watchdog's message vaguer, and
//! nothing here ever waits on a peer or slows a step.

use super::waiting::in_collective;
use super::World;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

/// What one rank's watchdog says about its rank.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Status {
    pub rank: usize,
    pub last_step: u64,
    /// The main thread is inside a collective (waiting for the others).
    pub waiting: bool,
    /// Time since the rank's last progress, not counting time it was frozen.
    pub stalled_ms: u64,
    /// Its watchdog fired and the rank is ending: the others end too.
    pub ending: bool,
}

impl Status {
    /// A status of this rank, with the main thread's collective state as of now.
    pub fn now(rank: usize, last_step: u64, stalled_ms: u64, ending: bool) -> Status {
        Status { rank, last_step, waiting: in_collective(), stalled_ms, ending }
    }
}

const MAGIC: &str = "algpt2-watchdog/1";

fn encode(nonce: u64, s: &Status) -> String {
    format!("{MAGIC} {nonce:016x} {} {} {} {} {}", s.rank, s.last_step, s.waiting as u8, s.stalled_ms, s.ending as u8)
}

/// A datagram of this job (`nonce`), or None for anything else that reached the port.
fn decode(nonce: u64, text: &str) -> Option<Status> {
    let mut f = text.split_ascii_whitespace();
    if f.next()? != MAGIC || u64::from_str_radix(f.next()?, 16).ok()? != nonce {
        return None;
    }
    let mut number = || f.next()?.parse::<u64>().ok();
    let (rank, last_step, waiting, stalled_ms, ending) = (number()?, number()?, number()?, number()?, number()?);
    Some(Status { rank: usize::try_from(rank).ok()?, last_step, waiting: waiting == 1, stalled_ms, ending: ending == 1 })
}

pub(crate) struct Heartbeat {
    socket: Option<UdpSocket>,
    /// Where each rank listens (none for this rank, or a rank without a socket).
    peers: Vec<Vec<SocketAddr>>,
    /// Rank 0's random number: datagrams of another job (a reused port) are ignored.
    nonce: u64,
}

impl Heartbeat {
    /// A heartbeat that neither sends nor hears (before the addresses are exchanged).
    pub fn unconnected() -> Heartbeat {
        Heartbeat { socket: None, peers: Vec::new(), nonce: 0 }
    }

    /// Opens this rank's socket and learns the others'. A collective: every rank calls it
    /// at the same point of start-up.
    pub fn open(world: &World) -> Heartbeat {
        let socket = if world.size() > 1 {
            match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("rank {}: the watchdog cannot open its UDP socket ({e}): a hang will not name the rank", world.rank());
                    None
                }
            }
        } else {
            None
        };
        let port = socket.as_ref().and_then(|s| s.local_addr().ok()).map_or(0, |a| a.port());
        let nonce = {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new().build_hasher().finish()
        };
        let mine = Address { nonce, host: hostname(), port, ips: if port == 0 { Vec::new() } else { interface_addresses() } };
        let all: Vec<Option<Address>> = world.all_gather_text(&mine.to_text()).iter().map(|t| Address::parse(t)).collect();
        let nonce = all.first().cloned().flatten().map_or(nonce, |a| a.nonce);
        let peers = all
            .iter()
            .enumerate()
            .map(|(rank, a)| match a {
                Some(a) if rank != world.rank() && a.port != 0 => a.targets(&mine),
                _ => Vec::new(),
            })
            .collect();
        Heartbeat { socket, peers, nonce }
    }

    /// Tells every other rank; a peer that cannot be reached is simply not told.
    pub fn send(&self, status: &Status) {
        let Some(socket) = &self.socket else { return };
        let text = encode(self.nonce, status);
        for addr in self.peers.iter().flatten() {
            let _ = socket.send_to(text.as_bytes(), addr);
        }
    }

    /// What the other ranks said until `deadline` (and whatever is already waiting after it).
    pub fn receive(&mut self, deadline: Instant) -> Vec<Status> {
        let mut heard = Vec::new();
        let Some(socket) = &self.socket else {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            return heard;
        };
        let mut buf = [0u8; 512];
        // Past the deadline, short waits drain what queued up meanwhile (all of it, after
        // this process was stopped and continued), up to a bound: a flood of datagrams
        // must not hold the watchdog up.
        let mut late = 64 + 4 * self.peers.len();
        let failed = loop {
            if Instant::now() >= deadline {
                if late == 0 {
                    break None;
                }
                late -= 1;
            }
            let wait = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            if let Err(e) = socket.set_read_timeout(Some(wait)) {
                break Some(e);
            }
            match socket.recv_from(&mut buf) {
                Ok((n, _)) => heard.extend(std::str::from_utf8(&buf[..n]).ok().and_then(|t| decode(self.nonce, t))),
                // A stop signal (SIGSTOP, then SIGCONT) interrupts the wait: go on waiting.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    if Instant::now() >= deadline {
                        break None;
                    }
                }
                Err(e) => break Some(e),
            }
        };
        if let Some(e) = failed {
            tracing::warn!("the watchdog's UDP socket failed ({e}): from now on a hang will not name the rank");
            self.socket = None;
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        }
        heard
    }
}

/// Where a rank listens, as exchanged at start-up.
#[derive(Debug, Clone, PartialEq)]
struct Address {
    nonce: u64,
    host: String,
    port: u16,
    ips: Vec<Ipv4Addr>,
}

impl Address {
    fn to_text(&self) -> String {
        let ips: Vec<String> = self.ips.iter().map(|ip| ip.to_string()).collect();
        format!("{:016x} {} {} {}", self.nonce, self.host, self.port, if ips.is_empty() { "-".to_string() } else { ips.join(",") })
    }

    fn parse(text: &str) -> Option<Address> {
        let mut f = text.split_ascii_whitespace();
        let nonce = u64::from_str_radix(f.next()?, 16).ok()?;
        let host = f.next()?.to_string();
        let port = f.next()?.parse().ok()?;
        let ips = f.next()?.split(',').filter_map(|ip| ip.parse().ok()).collect();
        Some(Address { nonce, host, port, ips })
    }

    /// Where the rank at `mine` sends to: loopback on the same host (the same name and
    /// addresses: containers may share a name), else each of the peer's interfaces (the
    /// ones that do not route there lose the datagram).
    fn targets(&self, mine: &Address) -> Vec<SocketAddr> {
        if self.host == mine.host && self.ips == mine.ips {
            return vec![SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))];
        }
        self.ips.iter().map(|ip| SocketAddr::V4(SocketAddrV4::new(*ip, self.port))).collect()
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = if rc == 0 { String::from_utf8_lossy(&buf[..end]).into_owned() } else { String::new() };
    // One word in the exchanged text.
    let name: String = name.chars().filter(|c| !c.is_whitespace()).collect();
    if name.is_empty() {
        "unknown-host".to_string()
    } else {
        name
    }
}

/// This host's IPv4 addresses other hosts may reach it at (up, not loopback).
fn interface_addresses() -> Vec<Ipv4Addr> {
    let mut found = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs gives a list that freeifaddrs releases; only AF_INET entries'
    // addresses are read, as the sockaddr_in they are.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return found;
        }
        let mut p = head;
        while !p.is_null() {
            let addr = (*p).ifa_addr;
            let up = (*p).ifa_flags & libc::IFF_UP as libc::c_uint != 0;
            if up && !addr.is_null() && i32::from((*addr).sa_family) == libc::AF_INET {
                let ip = Ipv4Addr::from(u32::from_be((*(addr as *const libc::sockaddr_in)).sin_addr.s_addr));
                if !ip.is_loopback() && !found.contains(&ip) {
                    found.push(ip);
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_and_other_jobs_are_ignored() {
        let s = Status { rank: 3, last_step: 41, waiting: true, stalled_ms: 1234, ending: false };
        let text = encode(0xfeed, &s);
        assert_eq!(decode(0xfeed, &text), Some(s));
        assert_eq!(decode(0xbeef, &text), None);
        for junk in ["", "algpt2-watchdog/1", "algpt2-watchdog/1 feed 1 2 x 4 0", "GET / HTTP/1.1", "algpt2-watchdog/1 feed -1 2 0 4 0"] {
            assert_eq!(decode(0xfeed, junk), None, "{junk}");
        }
    }

    #[test]
    fn addresses_round_trip_and_the_same_host_is_reached_on_loopback() {
        let a =
            Address { nonce: 7, host: "node-a".into(), port: 4000, ips: vec![Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(192, 168, 1, 2)] };
        assert_eq!(Address::parse(&a.to_text()), Some(a.clone()));
        assert_eq!(a.targets(&Address { port: 5000, ..a.clone() }), vec!["127.0.0.1:4000".parse::<SocketAddr>().unwrap()]);
        assert_eq!(a.targets(&Address { host: "node-b".into(), ips: vec![Ipv4Addr::new(10, 0, 0, 3)], ..a.clone() }).len(), 2);
        // Another container of the same name.
        assert_eq!(a.targets(&Address { ips: vec![Ipv4Addr::new(10, 0, 0, 3)], ..a.clone() }).len(), 2);
        let none = Address { ips: Vec::new(), ..a };
        assert_eq!(Address::parse(&none.to_text()), Some(none));
        assert_eq!(Address::parse("zz"), None);
    }
}

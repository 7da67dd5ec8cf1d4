//! Reachability probes from inside a pod: one fresh connection each (a TCP or SCTP connect,
//! or a UDP datagram echoed back), timed, with a bound. `trellis lab probe` runs one; the
//! conformance tests run hundreds at once with [`probe_all`].
//!
//! The crate's library (`trellis_probe`) is this file alone, so the end-to-end tests probe
//! exactly as the command does.

use std::fmt;
use std::io::{ErrorKind, Read};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use trellis_netns::Netns;

/// SCTP's IP protocol number.
const IPPROTO_SCTP: i32 = 132;
/// Probes run at once by [`probe_all`] (a thread each).
const PARALLEL: usize = 128;

static TOKEN: AtomicU64 = AtomicU64::new(1);

/// The transport a probe uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    Tcp,
    Udp,
    Sctp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
            Transport::Sctp => "sctp",
        })
    }
}

impl FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Transport::Tcp),
            "udp" => Ok(Transport::Udp),
            "sctp" => Ok(Transport::Sctp),
            other => Err(format!("unknown protocol {other:?} (tcp, udp or sctp)")),
        }
    }
}

/// Splits `PORT[/tcp|udp|sctp]` (TCP when no protocol is given).
pub fn parse_port(text: &str) -> Result<(u16, Transport), String> {
    let (port, transport) = match text.split_once('/') {
        Some((port, protocol)) => (port, protocol.parse()?),
        None => (text, Transport::Tcp),
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("bad port {port:?} (1-65535)"))?;
    Ok((port, transport))
}

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Connected (TCP, SCTP) or echoed (UDP), in this long.
    Connected(Duration),
    /// Actively refused (a reset, an ICMP unreachable).
    Refused,
    /// Nothing came back within the timeout: what a policy's drop looks like.
    TimedOut(Duration),
    /// The probe could not be made (no namespace, no SCTP in the kernel, ...).
    Failed(String),
}

impl Outcome {
    pub fn connected(&self) -> bool {
        matches!(self, Outcome::Connected(_))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Connected(took) => {
                write!(f, "connected in {:.1} ms", took.as_secs_f64() * 1000.0)
            }
            Outcome::Refused => f.write_str("refused"),
            Outcome::TimedOut(after) => {
                write!(f, "timed out after {}", humantime::format_duration(*after))
            }
            Outcome::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// One probe: from inside the namespace `netns` to `to` over `transport`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub netns: String,
    pub to: SocketAddr,
    pub transport: Transport,
}

/// Runs `probe`, waiting at most `timeout` for an answer.
pub fn probe(probe: &Probe, timeout: Duration) -> Outcome {
    let netns = match Netns::open(&probe.netns) {
        Ok(netns) => netns,
        Err(error) => return Outcome::Failed(format!("namespace {}: {error}", probe.netns)),
    };
    let (kind, protocol) = match probe.transport {
        Transport::Tcp => (Type::STREAM, Protocol::TCP),
        Transport::Udp => (Type::DGRAM, Protocol::UDP),
        Transport::Sctp => (Type::STREAM, Protocol::from(IPPROTO_SCTP)),
    };
    // The socket is made inside the pod's namespace and stays bound to it; the connection
    // is then timed on this thread.
    let socket =
        match netns.run(|| Socket::new(Domain::for_address(probe.to), kind, Some(protocol))) {
            Ok(Ok(socket)) => socket,
            Ok(Err(error)) if error.raw_os_error() == Some(nix::libc::EPROTONOSUPPORT) => {
                return Outcome::Failed(format!(
                    "this kernel has no {} (try `modprobe sctp`)",
                    probe.transport
                ));
            }
            Ok(Err(error)) => return Outcome::Failed(format!("socket: {error}")),
            Err(error) => return Outcome::Failed(format!("namespace {}: {error}", probe.netns)),
        };
    match probe.transport {
        Transport::Tcp | Transport::Sctp => connect(&socket, probe.to, timeout),
        Transport::Udp => echo_datagram(&socket, probe.to, timeout),
    }
}

fn connect(socket: &Socket, to: SocketAddr, timeout: Duration) -> Outcome {
    let started = Instant::now();
    match socket.connect_timeout(&to.into(), timeout) {
        Ok(()) => Outcome::Connected(started.elapsed()),
        Err(error) => failure(&error, timeout),
    }
}

/// Sends a datagram with a token of its own and waits for the echo server to send it back.
fn echo_datagram(socket: &Socket, to: SocketAddr, timeout: Duration) -> Outcome {
    let token = format!(
        "trellis-probe {} {}",
        std::process::id(),
        TOKEN.fetch_add(1, Ordering::Relaxed)
    );
    let started = Instant::now();
    if let Err(error) = socket.connect(&to.into()) {
        return failure(&error, timeout);
    }
    if let Err(error) = socket.send(token.as_bytes()) {
        return failure(&error, timeout);
    }
    let mut buffer = [0u8; 256];
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Outcome::TimedOut(timeout);
        }
        if let Err(error) = socket.set_read_timeout(Some(left)) {
            return Outcome::Failed(format!("set timeout: {error}"));
        }
        match (&*socket).read(&mut buffer) {
            Ok(n) => {
                // A stray datagram (an answer to an earlier probe) is not ours: wait on.
                if &buffer[..n] == token.as_bytes() {
                    return Outcome::Connected(started.elapsed());
                }
            }
            Err(error) => return failure(&error, timeout),
        }
    }
}

fn failure(error: &std::io::Error, timeout: Duration) -> Outcome {
    match error.kind() {
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset => Outcome::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::TimedOut(timeout),
        _ => Outcome::Failed(error.to_string()),
    }
}

/// Runs every probe, many at once (each on a short-lived thread of its own), each waiting at
/// most `timeout`; the outcomes in the order of `probes`.
pub fn probe_all(probes: &[Probe], timeout: Duration) -> Vec<Outcome> {
    let mut outcomes = Vec::with_capacity(probes.len());
    for batch in probes.chunks(PARALLEL) {
        std::thread::scope(|scope| {
            let running: Vec<_> = batch
                .iter()
                .map(|p| scope.spawn(move || probe(p, timeout)))
                .collect();
            outcomes.extend(running.into_iter().map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|_| Outcome::Failed("the probe panicked".into()))
            }));
        });
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_name_their_protocol_or_mean_tcp() {
        assert_eq!(parse_port("80"), Ok((80, Transport::Tcp)));
        assert_eq!(parse_port("81/udp"), Ok((81, Transport::Udp)));
        assert_eq!(parse_port("9/SCTP"), Ok((9, Transport::Sctp)));
        assert!(parse_port("0").is_err());
        assert!(parse_port("70000/tcp").is_err());
        assert!(
            parse_port("80/icmp")
                .unwrap_err()
                .contains("unknown protocol")
        );
    }

    #[test]
    fn outcomes_read_as_one_line() {
        assert_eq!(
            Outcome::Connected(Duration::from_micros(420)).to_string(),
            "connected in 0.4 ms"
        );
        assert_eq!(
            Outcome::TimedOut(Duration::from_secs(1)).to_string(),
            "timed out after 1s"
        );
        assert!(Outcome::Connected(Duration::ZERO).connected());
        assert!(!Outcome::Refused.connected());
    }

    #[test]
    fn a_missing_namespace_fails_the_probe_not_the_caller() {
        let outcomes = probe_all(
            &[Probe {
                netns: "trellis-no-such-namespace".into(),
                to: "10.0.0.1:80".parse().unwrap(),
                transport: Transport::Tcp,
            }],
            Duration::from_millis(100),
        );
        assert!(
            matches!(&outcomes[..], [Outcome::Failed(why)] if why.contains("trellis-no-such-namespace")),
            "{outcomes:?}"
        );
    }
}

//! The connectivity matrix: from every pod, an ICMP echo and a TCP connection to the echo
//! server of every other pod, and an ICMP echo to its own node.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use trellis_netns::{Netns, probe};

use super::services::ECHO_PORT;
use super::topology::LabState;
use crate::table::Table;

/// What one source saw of one target.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub target: String,
    /// The ICMP round trip; `None`: no reply.
    pub icmp: Option<Duration>,
    /// The TCP connect time to the echo server; `None`: not probed (a node runs none).
    pub tcp: Option<Result<Duration, ()>>,
}

impl Probe {
    pub fn ok(&self) -> bool {
        self.icmp.is_some() && !matches!(self.tcp, Some(Err(())))
    }

    fn cell(&self) -> String {
        let ms = |d: &Duration| format!("{:.2}", d.as_secs_f64() * 1000.0);
        match (&self.icmp, &self.tcp) {
            (Some(icmp), Some(Ok(tcp))) => format!("{} {}/{} ms", self.target, ms(icmp), ms(tcp)),
            (Some(icmp), None) => format!("{} {} ms", self.target, ms(icmp)),
            (None, Some(Err(()))) => format!("{} FAIL", self.target),
            (None, _) => format!("{} FAIL(icmp)", self.target),
            (Some(_), Some(Err(()))) => format!("{} FAIL(tcp)", self.target),
        }
    }
}

/// One row per source pod.
pub type Row = (String, Vec<Probe>);

pub fn all_ok(rows: &[Row]) -> bool {
    rows.iter().all(|(_, row)| row.iter().all(Probe::ok))
}

fn tcp_connect(netns: &Netns, to: SocketAddr, timeout: Duration) -> Result<Duration, ()> {
    // Timed inside the namespace's thread: entering it is not the network's time.
    let connect = || {
        let started = Instant::now();
        TcpStream::connect_timeout(&to, timeout).map(|_| started.elapsed())
    };
    match netns.run(connect) {
        Ok(Ok(took)) => Ok(took),
        _ => Err(()),
    }
}

/// Measures the whole matrix, each probe waiting at most `timeout`.
pub fn measure(state: &LabState, timeout: Duration) -> Vec<Row> {
    let targets: Vec<(String, Ipv4Addr)> = state
        .pods()
        .filter_map(|(c, _, p)| Some((format!("{}/{}", c.name, p.name), p.address?)))
        .collect();
    state
        .pods()
        .map(|(cluster, node, pod)| {
            let source = format!("{}/{}", cluster.name, pod.name);
            let netns = Netns::open(&pod.netns).ok();
            let icmp = |to: Ipv4Addr| {
                netns
                    .as_ref()
                    .and_then(|ns| probe::icmp_echo(ns, to, timeout).ok().flatten())
            };
            let mut row: Vec<Probe> = targets
                .iter()
                .filter(|(name, _)| *name != source)
                .map(|(name, address)| Probe {
                    target: name.clone(),
                    icmp: icmp(*address),
                    tcp: Some(netns.as_ref().map_or(Err(()), |ns| {
                        tcp_connect(ns, SocketAddr::new((*address).into(), ECHO_PORT), timeout)
                    })),
                })
                .collect();
            row.push(Probe {
                target: format!("{}/{}", cluster.name, node.name),
                icmp: icmp(node.address),
                tcp: None,
            });
            (source, row)
        })
        .collect()
}

/// Prints the matrix; whether every probe succeeded.
pub fn print(rows: &[Row]) -> bool {
    println!("connectivity from each pod (ICMP echo / TCP connect to the echo server):");
    let mut table = Table::without_header();
    for (source, row) in rows {
        let cells: Vec<String> = row.iter().map(Probe::cell).collect();
        table.row([source.clone(), format!("-> {}", cells.join(", "))]);
    }
    print!("{}", table.render("  "));
    all_ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_show_both_probes_and_name_what_failed() {
        let probe = |icmp: Option<u64>, tcp: Option<Result<u64, ()>>| Probe {
            target: "c2/pod-1".into(),
            icmp: icmp.map(Duration::from_micros),
            tcp: tcp.map(|t| t.map(Duration::from_micros)),
        };
        assert_eq!(
            probe(Some(120), Some(Ok(310))).cell(),
            "c2/pod-1 0.12/0.31 ms"
        );
        assert_eq!(probe(Some(50), None).cell(), "c2/pod-1 0.05 ms");
        assert_eq!(probe(Some(50), Some(Err(()))).cell(), "c2/pod-1 FAIL(tcp)");
        assert_eq!(probe(None, Some(Ok(5))).cell(), "c2/pod-1 FAIL(icmp)");
        assert_eq!(probe(None, Some(Err(()))).cell(), "c2/pod-1 FAIL");
        assert!(!probe(Some(50), Some(Err(()))).ok());
        assert!(probe(Some(50), None).ok());
    }
}

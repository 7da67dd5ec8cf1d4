//! Round trips through each tunnel as a user's `ping` (iputils) sees them, between the same
//! two namespaces: paced (an echo every `--gap-ms`, so each finds the tunnel idle, its threads
//! asleep and the vCPUs halted) and rapid (every millisecond). Reports min, p50, p90 and p99,
//! and p50 as a ratio to the peers.

use std::time::Duration;

use crate::stats::{Percentiles, percentiles};
use crate::tunnel::{Contenders, Pair, Running, ping, start_passing};
use anyhow::{Context, bail};

#[derive(clap::Args)]
pub struct Options {
    /// Echoes per contender, per pacing, per round.
    #[arg(long, default_value_t = 300)]
    pings: u32,
    /// Milliseconds between echoes in the paced series.
    #[arg(long, default_value_t = 10)]
    gap_ms: u64,
    #[command(flatten)]
    tunnels: Contenders,
    /// Repeat the whole set, alternating the order, this many times.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pacing {
    Paced,
    Rapid,
}

impl Pacing {
    fn label(self) -> &'static str {
        match self {
            Pacing::Paced => "paced",
            Pacing::Rapid => "rapid (1 ms)",
        }
    }
}

struct Series {
    contender: String,
    pacing: Pacing,
    samples: Vec<Duration>,
}

fn echoes(
    pair: &Pair,
    running: &Running,
    count: u32,
    gap: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let samples = ping(pair, running.target, count, gap)?;
    // A tunnel that loses echoes while idle is broken, not slow.
    let lost = count as usize - samples.len().min(count as usize);
    if lost > count as usize / 100 {
        bail!("{lost} of {count} echoes got no answer");
    }
    Ok(samples)
}

fn measure(contender: &str, options: &Options) -> anyhow::Result<Vec<Series>> {
    let pair = Pair::new()?;
    let running = start_passing(&pair, contender, options.tunnels.boringtun.as_deref())?;
    let mut series = Vec::new();
    for (pacing, gap) in [
        (Pacing::Paced, Duration::from_millis(options.gap_ms)),
        (Pacing::Rapid, Duration::from_millis(1)),
    ] {
        let samples = echoes(&pair, &running, options.pings, gap)
            .with_context(|| format!("{contender}, {}", pacing.label()))?;
        series.push(Series {
            contender: contender.to_string(),
            pacing,
            samples,
        });
    }
    Ok(series)
}

fn line(label: &str, p: &Percentiles) -> String {
    format!(
        "{label:<28} min {:.3}  p50 {:.3}  p90 {:.3}  p99 {:.3} ms",
        p.min, p.p50, p.p90, p.p99
    )
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if options.pings == 0 {
        bail!("--pings must be at least 1");
    }
    println!(
        "latency benchmark: ping, {} echoes per series, every {} ms and every 1 ms, {} round(s), contenders {}",
        options.pings,
        options.gap_ms,
        options.rounds,
        options.tunnels.names.join(", ")
    );
    let mut all: Vec<Series> = Vec::new();
    for round in 0..options.rounds {
        let mut order = options.tunnels.names.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for contender in &order {
            for series in measure(contender, options)? {
                let label = format!("  {} {}", series.contender, series.pacing.label());
                println!("{}", line(&label, &percentiles(&series.samples)));
                all.push(series);
            }
        }
    }
    println!();
    for pacing in [Pacing::Paced, Pacing::Rapid] {
        println!("{} (all rounds pooled):", pacing.label());
        let pooled = |contender: &str| -> Vec<Duration> {
            all.iter()
                .filter(|s| s.contender == contender && s.pacing == pacing)
                .flat_map(|s| s.samples.iter().copied())
                .collect()
        };
        for contender in &options.tunnels.names {
            println!(
                "{}",
                line(&format!("  {contender}"), &percentiles(&pooled(contender)))
            );
        }
        if options.tunnels.names.iter().any(|c| c == "trellis") {
            let trellis = percentiles(&pooled("trellis")).p50;
            for peer in options
                .tunnels
                .names
                .iter()
                .filter(|c| *c != "trellis" && *c != "veth")
            {
                let theirs = percentiles(&pooled(peer)).p50;
                println!(
                    "  p50 trellis / {peer}: {:.2} (below 1 is faster)",
                    trellis / theirs
                );
            }
        }
    }
    Ok(())
}

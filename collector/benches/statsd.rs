//! The statsd per-line path alone (parse and aggregate, no socket): the
//! CPU a line costs in user space, which `benchmarks/statsd.sh` measures
//! whole (BENCHMARKS.md section 7). Run with
//! `cargo bench -p collector --bench statsd` (`STATSD_BENCH_LINES` sets how
//! many lines each case reads; 20 million by default; a case's name after
//! `--` runs that case alone).
//!
//! - `counters`: `benchmarks/statsd.sh`'s packets, 20 counter lines each
//!   (`bench.cNNN.mNN:1|c`), packet k into aggregator k mod 100;
//! - `tagged`: lines as DogStatsD clients write them, a counter with a
//!   sample rate, a timing and a gauge with three tags each;
//! - `influx`: a counter with Influx-style tags in the bucket.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: failing loudly is the point

use std::hint::black_box;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use collector::sources::statsd::aggregate::{Aggregator, Budget};
use collector::sources::statsd::listener::take_packet;
use collector::stats::Stats;

const AGGREGATORS: usize = 100;
const LINES_PER_PACKET: usize = 20;

/// Packet k of a case: its lines joined by `\n`.
fn packets(line: impl Fn(usize, usize) -> String) -> Vec<Vec<u8>> {
    (0..AGGREGATORS)
        .map(|k| {
            (0..LINES_PER_PACKET)
                .map(|j| line(k, j))
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes()
        })
        .collect()
}

/// Reads `lines` lines of `packets` (packet k into aggregator k); returns
/// prints nanoseconds per line.
fn run(name: &str, packets: &[Vec<u8>], lines: usize) {
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if !only.is_empty() && !only.iter().any(|o| o == name) {
        return;
    }
    let budget = Budget::new(usize::MAX);
    let mut aggregators: Vec<Aggregator> = (0..AGGREGATORS)
        .map(|_| Aggregator::new(10_000, &[90.0], budget.clone()))
        .collect();
    let stats = Stats::default();
    // Every series made before the clock starts: the steady state.
    for (packet, aggregator) in packets.iter().zip(&mut aggregators) {
        take_packet(packet, aggregator, &stats);
    }
    let rounds = lines / (LINES_PER_PACKET * AGGREGATORS);
    let before = stats.statsd_lines.load(Relaxed);
    let start = Instant::now();
    for _ in 0..rounds {
        for (packet, aggregator) in packets.iter().zip(&mut aggregators) {
            take_packet(black_box(packet), aggregator, &stats);
        }
    }
    let elapsed = start.elapsed();
    let counted = stats.statsd_lines.load(Relaxed) - before;
    assert_eq!(counted as usize, rounds * LINES_PER_PACKET * AGGREGATORS);
    assert_eq!(stats.statsd_lines_malformed.load(Relaxed), 0);
    let ns = elapsed.as_nanos() as f64 / counted as f64;
    println!("{name:>9}: {ns:6.1} ns a line ({counted} lines, {elapsed:.2?})");
}

fn main() {
    let lines: usize = std::env::var("STATSD_BENCH_LINES")
        .ok()
        .map(|v| v.parse().expect("STATSD_BENCH_LINES: a number of lines"))
        .unwrap_or(20_000_000);
    run(
        "counters",
        &packets(|k, j| format!("bench.c{k:03}.m{j:02}:1|c")),
        lines,
    );
    run(
        "tagged",
        &packets(|k, j| match j % 3 {
            0 => format!("app.requests:1|c|@0.5|#env:prod,route:/api/v{k},status:200"),
            1 => format!("app.latency:{j}.5|ms|#env:prod,route:/api/v{k},status:200"),
            _ => format!("app.queue.m{j}:{k}|g|#env:prod,route:/api/v{k},host:a"),
        }),
        lines / 4,
    );
    run(
        "influx",
        &packets(|k, j| format!("app.hits,region=eu,zone=z{k}:{j}|c")),
        lines / 4,
    );
}

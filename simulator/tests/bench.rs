//! `simulator bench`, briefly, end to end: the harness whose figures
//! BENCHMARKS.md reports keeps measuring what it says it does. It runs the
//! collector binary that `cargo test --workspace` builds for the
//! collector's own integration tests.
#![allow(clippy::unwrap_used)]

use clap::Parser;
use rdkafka::mocking::MockCluster;
use simulator::bench::{BenchOptions, run_point};

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    options: BenchOptions,
}

fn options(extra: &[&str]) -> BenchOptions {
    let me = std::env::current_exe().unwrap();
    // target/<profile>/deps/bench-… → target/<profile>/collector
    let collector = me.parent().unwrap().parent().unwrap().join("collector");
    assert!(
        collector.exists(),
        "{} is missing: `cargo test --workspace` builds it; alone, run `cargo build -p collector` first",
        collector.display()
    );
    let mut args = vec![
        "bench".to_string(),
        format!("--collector-bin={}", collector.display()),
        "--sink=kafka".into(),
        "--seconds=3".into(),
        // Batches every 100 ms, so that a short run produces many messages.
        "--collector-env=KAFKA_PRODUCE_PERIOD_MS=100".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Wrap::parse_from(args).options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturating_point_samples_the_newest_messages_and_runs_the_baseline() {
    let cluster = MockCluster::new(3).unwrap();
    let result = run_point(&options(&[]), 2, Some(&cluster)).await.unwrap();
    assert!(result.datapoints_sent > 0);
    assert_eq!(result.collector.received, result.datapoints_sent);
    let latency = result.latency_ms.unwrap();
    assert!(
        latency.samples > 0,
        "the newest-message sampler read nothing"
    );
    assert!(latency.p50 <= latency.p99 && latency.p99 <= latency.max);
    // The load ran for the time asked, every datapoint sent was delivered
    // to the cluster, and the baseline ran beside it.
    assert!(result.seconds >= 3.0, "{} s of load", result.seconds);
    assert_eq!(result.collector.delivered, result.datapoints_sent);
    assert_eq!(result.collector.dropped, 0);
    assert!(result.baseline_datapoints_per_sec.unwrap() > 0.0);
    assert!(result.ratio.unwrap() > 0.0);
    assert!(result.rss_max_mib >= result.rss_idle_mib && result.rss_idle_mib > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_point_reads_every_message() {
    let cluster = MockCluster::new(3).unwrap();
    let result = run_point(&options(&["--rate=50"]), 2, Some(&cluster))
        .await
        .unwrap();
    assert_eq!(result.collector.received, result.datapoints_sent);
    // 2 connections × 50 blocks/s × 300 datapoints, for about 3 s.
    assert!(
        result.datapoints_sent >= 60_000,
        "{}",
        result.datapoints_sent
    );
    let latency = result.latency_ms.unwrap();
    assert!(latency.samples > 0, "the every-message reader read nothing");
    assert!(latency.p50 <= latency.p99 && latency.p99 <= latency.max);
}

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

/// `--profile node`, with every phase cut short: each goal gets a figure,
/// the CPU is split by the thread groups it names, and the JSON and the
/// chart are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_profile_measures_every_goal_and_draws_them() {
    let dir = std::env::temp_dir().join(format!("node-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg) = (dir.join("node.json"), dir.join("node.svg"));
    let options = options(&[
        "--profile=node",
        "--idle-secs=2",
        "--busy-secs=3",
        &format!("--json={}", json.display()),
        &format!("--chart={}", svg.display()),
    ]);
    let profile = simulator::bench::node::run(&options).await.unwrap();

    // Idle: the collector's threads are its own and librdkafka's; the
    // bare producer's are librdkafka's only, none of this process's others.
    let idle = &profile.idle;
    assert!(
        idle.collector.by_name.contains_key("kafka-events"),
        "{idle:?}"
    );
    assert!(
        idle.collector
            .by_name
            .keys()
            .any(|n| n.starts_with("rdk:broker"))
    );
    assert!(!idle.bare_producer.by_name.is_empty());
    assert!(
        idle.bare_producer
            .by_name
            .keys()
            .all(|n| n.starts_with("rdk:")),
        "{:?}",
        idle.bare_producer.by_name
    );
    assert!(idle.rss_mib > 0.0);

    // The busy node ran with each buffer and delivered what it received.
    let buffers: Vec<_> = profile.busy.iter().map(|b| b.buffer).collect();
    assert_eq!(buffers, ["memory", "disk"]);
    for busy in &profile.busy {
        assert!(busy.datapoints_per_sec > 0.0, "{busy:?}");
        assert!(busy.collector.received > 0);
        assert_eq!(busy.collector.delivered, busy.collector.received);
        assert!(busy.cpu.librdkafka_ns > 0 && busy.cpu.own_ns > 0);
        assert!(busy.rss_max_mib >= busy.rss_mean_mib && busy.rss_mean_mib > 0.0);
    }

    // Saturation: both groups of both producers have a cost per datapoint.
    let saturation = &profile.saturation;
    assert!(saturation.own_ns_per_datapoint > 0.0, "{saturation:?}");
    assert!(saturation.librdkafka_ns_per_datapoint > 0.0);
    assert!(saturation.bare_librdkafka_ns_per_datapoint > 0.0);
    assert!(saturation.bare_own_ns_per_datapoint > 0.0);
    assert_eq!(
        saturation.point.collector.delivered,
        saturation.point.datapoints_sent
    );

    let settings: Vec<_> = profile.latency.iter().map(|l| l.setting).collect();
    assert_eq!(settings, ["default", "low-latency"]);
    for latency in &profile.latency {
        assert!(latency.samples > 0 && latency.p50_ms <= latency.p99_ms);
    }
    assert!(profile.kept.null_gib_per_sec > 0.0);
    assert!(profile.kept.rss_1000_connections_mib > 0.0 && profile.kept.outage_rss_mib > 0.0);

    // Every goal has its figure, in the JSON too, and in the chart.
    assert_eq!(profile.goals.len(), 13);
    assert!(
        profile
            .goals
            .iter()
            .all(|g| g.measured.is_finite() && g.goal > 0.0)
    );
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(written["goals"].as_array().unwrap().len(), 13);
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.contains("measured / goal"));
    for goal in &profile.goals {
        assert!(
            chart.contains(&goal.name.replace('&', "&amp;").replace('\'', "&apos;")),
            "{} not drawn",
            goal.name
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

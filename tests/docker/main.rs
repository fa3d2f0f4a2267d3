//! The Docker tier: the whole pipeline as containers (three agent nodes,
//! one of them a DC/OS 1.12 agent with its statsd module in the happy path,
//! Mesos-DNS, the Kafka scheduler, tansu as a real broker, the verifier),
//! with process- and network-level faults. Every scenario runs under load
//! and ends with the verifier's balance: every datapoint the module
//! producers generated is in Kafka exactly once, or counted as dropped by a
//! producer or a collector.
//!
//! Run by `scripts/test-docker` (part of `scripts/test`), after
//! `scripts/build-images`; one scenario at a time.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: failing loudly is the point

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use collector::sources::agent::mapping::{Naming, map_entries};
use e2e::topology::{Broker, Secured, SpoolStorage, Topology};
use harness::{Cluster, topology};

/// Load before and after a fault.
const LOAD: Duration = Duration::from_secs(20);
/// How long a fault lasts.
const FAULT: Duration = Duration::from_secs(30);

/// Nothing lost and nothing even dropped: everything generated arrived.
fn assert_nothing_dropped(report: &simulator::cluster::ClusterReport) {
    assert_every_producer_arrived(report, 3);
    let c = &report.conservation;
    assert_eq!(c.producer_dropped, 0, "dropped by the producers");
    assert_eq!(c.collector_dropped, 0, "dropped by the collectors");
    assert_eq!(c.arrived, c.generated);
}

fn assert_every_producer_arrived(report: &simulator::cluster::ClusterReport, nodes: usize) {
    let producers: usize = report.producers.values().map(|r| r.producers.len()).sum();
    assert_eq!(producers, nodes * 2, "producers reporting: {report:#?}");
    for r in report.producers.values().flat_map(|r| &r.producers) {
        let arrived = report.seen.producers.get(&r.id).map_or(0, |a| a.datapoints);
        assert!(arrived > 0, "nothing of {} arrived: {r:?}", r.id);
    }
    let duplicates: u64 = report.seen.producers.values().map(|a| a.duplicates).sum();
    assert_eq!(duplicates, 0, "duplicated records");
    assert_eq!(report.seen.undecodable, 0, "undecodable Kafka messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_every_datapoint_from_three_nodes_and_the_sample_producer() {
    let cluster = Cluster::start(
        "happy",
        Topology {
            prometheus: true,
            module_1_12_node: Some(3),
            ..topology()
        },
    )
    .await;
    cluster.run_for(LOAD).await;
    prometheus_has_every_node_container_and_producer(&cluster).await;
    let report = cluster.finish().await;
    assert_nothing_dropped(&report);
    // node-3's agent is a DC/OS 1.12 one: every total its containers'
    // tasks sent over statsd is in Kafka, each in its framework's topic (a
    // deregistered container's last flush included), and, for those still
    // registered, in the Prometheus server.
    let checks = cluster.finish_statsd().await;
    let check = checks.values().next().unwrap();
    assert_eq!(checks.len(), 1, "{checks:?}");
    assert_eq!(check.registered, 3, "the agent's containers: {check:?}");
    assert_eq!(check.deregistered, 1, "{check:?}");
    assert!(check.packets > 0, "{check:?}");
    cluster.log(&format!(
        "statsd on node-3 (1.12): {} containers, {} packets, every total in Kafka and Prometheus",
        check.registered, check.packets
    ));
    // Every producer's last datapoint reaches Prometheus: its values count
    // its datapoints from 0, so the newest it has is the last generated.
    let last: BTreeMap<String, f64> = report
        .producers
        .values()
        .flat_map(|r| &r.producers)
        .map(|p| (p.id.clone(), p.generated as f64 - 1.0))
        .collect();
    cluster
        .eventually(
            harness::docker_patience(),
            "every producer's last datapoint in Prometheus",
            || async {
                let seen = cluster.try_report().await?.prometheus?;
                last.iter()
                    .all(|(id, value)| seen.producers.get(id).is_some_and(|s| s.newest == *value))
                    .then_some(())
            },
        )
        .await;

    // The sample-producer's messages match the agents' JSON: every executor
    // of every agent, with exactly the datapoint names its statistics map to.
    let http = reqwest::Client::new();
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for node in &cluster.nodes {
        let url = format!(
            "http://{}:5051/monitor/statistics.json",
            cluster.node_ip(node.index).await
        );
        let body: serde_json::Value = http.get(url).send().await.unwrap().json().await.unwrap();
        let mapped = map_entries(
            &body,
            Naming {
                topic: Some("sample_metrics"),
                prefix: "",
            },
            0,
        );
        assert!(!mapped.lists.is_empty(), "the agent runs no containers");
        for list in mapped.lists {
            let executor = list.tag("executor_id").unwrap().to_owned();
            expected
                .entry(executor)
                .or_default()
                .extend(list.datapoints.into_iter().map(|d| d.name));
        }
    }
    let seen = cluster
        .eventually(
            harness::docker_patience(),
            "every executor in the sample topic",
            || async {
                let report = cluster.try_report().await?;
                expected
                    .keys()
                    .all(|e| report.seen.sample_executors.contains_key(e))
                    .then_some(report.seen.sample_executors)
            },
        )
        .await;
    for (executor, names) in &expected {
        assert_eq!(
            seen.get(executor),
            Some(names),
            "sample datapoints of executor {executor}"
        );
    }
    cluster.log(&format!(
        "sample topic: {} executors with the agents' datapoint names",
        expected.len()
    ));
}

/// The cluster's Prometheus server (Debian's, in its image) answers,
/// through its own query API: every collector up; every node's node
/// metrics; every container of every agent by its task's name, with the
/// value the agent served; every module producer's latest datapoints (the
/// verifier asks); and no failed scrape.
async fn prometheus_has_every_node_container_and_producer(cluster: &Cluster) {
    let base = format!(
        "http://{}:9090",
        cluster
            .prometheus
            .as_ref()
            .expect("Prometheus runs")
            .ip()
            .await
    );
    let http = reqwest::Client::new();
    let nodes = cluster.nodes.len();
    let producers = cluster
        .eventually(
            harness::docker_patience(),
            "Prometheus has every collector up and every producer's datapoints",
            || async {
                let report = cluster.try_report().await?;
                let seen = report.prometheus?;
                let producers: Vec<simulator::producer::ModuleReport> = report
                    .producers
                    .values()
                    .flat_map(|r| r.producers.clone())
                    .collect();
                let all = seen.up.len() == nodes
                    && seen.up.values().all(|up| *up == 1.0)
                    && producers.len() == nodes * 2
                    && producers.iter().all(|p| {
                        seen.producers
                            .get(&p.id)
                            .is_some_and(|s| s.series > 0 && s.newest > 0.0)
                    });
                all.then_some(producers)
            },
        )
        .await;
    let memory = e2e::prometheus::mem_total_bytes();
    for node in &cluster.nodes {
        let name = format!("node-{}", node.index);
        let query = e2e::prometheus::selector("memory_total", &[("node", &name)]);
        let value = cluster
            .eventually(harness::docker_patience(), &query, || async {
                let result = simulator::prometheus::query(&http, &base, &query).await?;
                e2e::prometheus::only_value(&result)
            })
            .await;
        assert_eq!(value, memory, "{query}");
        let agent = format!("http://{}:5051", cluster.node_ip(node.index).await);
        let tasks = e2e::prometheus::agent_tasks(&agent).await;
        assert_eq!(tasks.len(), 3, "{name}: {tasks:?}");
        for (container, task) in &tasks {
            let query = e2e::prometheus::selector(
                "dcos_metrics_container_mem_limit_bytes",
                &[
                    ("node", &name),
                    ("task_name", &task.task_name),
                    ("container_id", container),
                    ("task_id", &task.task_id),
                ],
            );
            let value = cluster
                .eventually(harness::docker_patience(), &query, || async {
                    let result = simulator::prometheus::query(&http, &base, &query).await?;
                    e2e::prometheus::only_value(&result)
                })
                .await;
            assert_eq!(value, task.mem_limit_bytes, "{query}");
        }
    }
    for (failure, value) in e2e::prometheus::scrape_failures(&base).await {
        assert_eq!(value, 0.0, "{failure}");
    }
    cluster.log(&format!(
        "Prometheus: {nodes} collectors up, node and container metrics by task name, {} producers' latest datapoints",
        producers.len()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_for_30s_then_started_loses_nothing() {
    // Not idempotent: tansu 0.6 (sqlite) panics on an idempotent producer
    // that outlives its restart. The verifier still checks for duplicates.
    let spec = Topology {
        idempotence: Some(false),
        ..topology()
    };
    let cluster = Cluster::start("broker-stop", spec).await;
    cluster.run_for(LOAD).await;
    cluster.log("stopping the broker (sqlite storage) for 30 s");
    cluster.broker.stop(10).await;
    cluster.run_for(FAULT).await;
    cluster.broker.start().await;
    cluster.log("broker started again");
    cluster.run_for(LOAD).await;
    let report = cluster.finish().await;
    // The buffer holds a 30 s outage.
    assert_nothing_dropped(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_cut_off_from_the_broker_network_for_30s_loses_nothing() {
    let cluster = Cluster::start("netcut", topology()).await;
    cluster.run_for(LOAD).await;
    let node = &cluster.nodes[1].agent;
    cluster.log("disconnecting node-2 from the cluster network for 30 s");
    cluster.network.disconnect(node).await;
    cluster.run_for(FAULT).await;
    cluster.network.connect(node).await;
    cluster.log("node-2 reconnected");
    cluster.run_for(LOAD).await;
    let report = cluster.finish().await;
    assert_nothing_dropped(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_moves_the_brokers_and_the_collectors_follow() {
    let spec = Topology {
        spare_broker: true,
        ..topology()
    };
    let cluster = Cluster::start("move", spec).await;
    cluster.run_for(LOAD).await;
    let spare = cluster.spare.as_ref().unwrap();
    let spare_ip = spare.ip().await;
    let spare_broker = format!("{}:9092", spare.name);
    cluster.log(&format!("the scheduler now answers {spare_broker}"));
    let scheduler = format!(
        "http://{}:7000/control/brokers",
        cluster.scheduler.ip().await
    );
    let response = reqwest::Client::new()
        .post(scheduler)
        .json(&serde_json::json!({"dns": [&spare_broker], "address": [format!("{spare_ip}:9092")]}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    // Every collector rediscovers (every 10 s) and moves its traffic.
    for node in &cluster.nodes {
        let logs_say_moved = || async {
            node.collector
                .logs()
                .await
                .lines()
                .any(|l| l.contains(&spare_broker))
                .then_some(())
        };
        cluster
            .eventually(
                harness::docker_patience(),
                &format!(
                    "node-{}'s collector switching to {spare_broker}",
                    node.index
                ),
                logs_say_moved,
            )
            .await;
    }
    cluster.log("every collector switched to the spare broker");
    cluster.run_for(LOAD).await;
    let report = cluster.finish().await;
    assert_nothing_dropped(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_restarted_under_load_every_loss_is_counted() {
    let cluster = Cluster::start("restart", topology()).await;
    cluster.run_for(LOAD).await;
    let collector = &cluster.nodes[0].collector;
    cluster.log("restarting node-1's collector (SIGTERM, then start)");
    collector.stop(40).await;
    collector.start().await;
    assert!(collector.running().await);
    cluster.run_for(LOAD).await;
    let report = cluster.finish().await;
    assert_every_producer_arrived(&report, 3);
    // The first process drained and said so in its last line.
    let logs = collector.logs().await;
    let stopped: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("Collector stopped"))
        .collect();
    assert_eq!(stopped.len(), 1, "one graceful stop: {stopped:?}");
    cluster.log(&format!("first collector's last line: {}", stopped[0]));
    // Whatever was lost, the producers (not connected while the collector
    // was down) and the collectors counted it: the balance held exactly.
    cluster.log(&format!(
        "losses: producers counted {}, collectors counted {}, unaccounted {}",
        report.conservation.producer_dropped,
        report.conservation.collector_dropped,
        report.conservation.unaccounted
    ));
    assert_eq!(report.conservation.unaccounted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_producer_on_one_node_costs_the_others_nothing() {
    let spec = Topology {
        garbage_on_node_1: true,
        ..topology()
    };
    let cluster = Cluster::start("garbage", spec).await;
    cluster.run_for(LOAD).await;
    let report = cluster.finish().await;
    assert_nothing_dropped(&report);
    let metrics = reqwest::get(format!("http://{}:8123/metrics", cluster.node_ip(1).await))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let malformed: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("collector_connections_malformed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        malformed >= 10.0,
        "node-1's collector closed {malformed} malformed connections"
    );
    cluster.log(&format!(
        "node-1's collector closed {malformed} malformed connections; its producers lost nothing"
    ));
}

/// One number from a collector's `/metrics`.
async fn collector_metric(cluster: &Cluster, index: usize, name: &str) -> Option<f64> {
    let url = format!("http://{}:8123/metrics", cluster.node_ip(index).await);
    let body = reqwest::get(url).await.ok()?.text().await.ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

async fn wait_healthy(cluster: &Cluster, index: usize) {
    let http = reqwest::Client::new();
    cluster
        .eventually(
            harness::docker_patience(),
            &format!("node-{index}'s collector answering"),
            || async {
                let url = format!("http://{}:8123/health", cluster.node_ip(index).await);
                http.get(url).send().await.ok().map(|_| ())
            },
        )
        .await;
}

/// SIGKILL, three times under load, with the spool on a volume: each time
/// the collector starts again on its spool and replays it. What a kill may
/// lose is what had not reached the spool's last sync (100 ms) and what sat
/// in the kernel's socket buffers: the balance allows node-1's producers'
/// rate for 3 s per kill, and the duplicates of the replays are reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_killed_three_times_loses_at_most_the_sync_window_per_kill() {
    let spec = topology();
    let per_kill = (spec.rate * spec.producers_per_node as f64 * 3.0) as u64;
    let cluster = Cluster::start("killed", spec).await;
    cluster.run_for(LOAD).await;
    let collector = &cluster.nodes[0].collector;
    let mut replayed = 0.0;
    for kill in 1..=3 {
        cluster.log(&format!(
            "SIGKILL node-1's collector ({kill} of 3), then start it"
        ));
        collector.kill().await;
        collector.start().await;
        wait_healthy(&cluster, 1).await;
        replayed += collector_metric(&cluster, 1, "collector_replayed_datapoints_total")
            .await
            .unwrap_or(0.0);
        cluster.run_for(Duration::from_secs(10)).await;
    }
    let allowance = 3 * per_kill;
    let report = cluster
        .finish_when(&format!("the balance within {allowance} datapoints"), |c| {
            c.holds_within(allowance)
        })
        .await;
    let c = &report.conservation;
    cluster.log(&format!(
        "3 kills: lost {} datapoints (allowed {allowance}), {} duplicated records, {replayed} datapoints replayed",
        c.unaccounted, c.duplicates
    ));
    let logs = collector.logs().await;
    assert_eq!(
        logs.lines()
            .filter(|l| l.contains("Collector stopped"))
            .count(),
        0,
        "a SIGKILLed collector writes no final line"
    );
}

/// The whole of node-2 stops (its producers flush first, as a module does
/// at shutdown) and starts again while the broker is down: the collector's
/// SIGTERM keeps its buffer in the spool, the next start delivers it, and
/// nothing is lost or dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_rebooted_while_the_broker_is_down_loses_nothing() {
    // Not idempotent: tansu 0.6 (sqlite) panics on an idempotent producer
    // that outlives its restart.
    let spec = Topology {
        idempotence: Some(false),
        ..topology()
    };
    let cluster = Cluster::start("reboot", spec).await;
    cluster.run_for(LOAD).await;
    cluster.log("stopping the broker");
    cluster.broker.stop(10).await;
    cluster.run_for(Duration::from_secs(10)).await;
    let node = &cluster.nodes[1];
    cluster.log("rebooting node-2: producers flush, then every container of the node stops");
    cluster.stop_producers(2).await;
    node.sample.stop(10).await;
    node.producers.stop(10).await;
    node.collector.stop(40).await;
    node.agent.stop(10).await;
    cluster.run_for(Duration::from_secs(5)).await;
    node.agent.start().await;
    node.collector.start().await;
    node.producers.start().await;
    node.sample.start().await;
    wait_healthy(&cluster, 2).await;
    cluster.log("node-2 is up again; starting the broker");
    cluster.broker.start().await;
    cluster.run_for(LOAD).await;
    let report = cluster.finish().await;
    // Node-2's producers of both boots report.
    assert_every_producer_arrived(&report, 4);
    let c = &report.conservation;
    assert_eq!(c.producer_dropped, 0, "dropped by the producers");
    assert_eq!(c.collector_dropped, 0, "dropped by the collectors");
    assert_eq!(c.arrived, c.generated);
    let logs = node.collector.logs().await;
    let stopped = logs
        .lines()
        .find(|l| l.contains("Collector stopped"))
        .expect("the reboot's SIGTERM ends with a final line");
    // The collectors log text: `… dropped=0 spooled=6512 …`.
    let field = |key: &str| -> u64 {
        stopped
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {stopped}"))
    };
    assert_eq!(field("dropped"), 0, "{stopped}");
    assert!(field("spooled") > 0, "nothing left in the spool: {stopped}");
    cluster.log(&format!("node-2's collector at the reboot: {stopped}"));
}

/// The spool on a 256 KiB tmpfs, the broker down for 30 s: the disk fills
/// (the spool's bound is its filesystem's free space, so the kernel never
/// refuses a write), the collectors say so (degraded) and keep records in
/// memory, nothing is dropped, and once the broker is back the spool drains,
/// its space comes back and it is used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_disk_full_falls_back_to_memory_and_recovers() {
    let spec = Topology {
        idempotence: Some(false),
        spool: Some(SpoolStorage::Tmpfs(256 * 1024)),
        ..topology()
    };
    let cluster = Cluster::start("diskfull", spec).await;
    cluster.run_for(LOAD).await;
    cluster.log("stopping the broker for 30 s; the spools' tmpfs fill");
    cluster.broker.stop(10).await;
    cluster
        .eventually(
            harness::docker_patience(),
            "node-1's spool degraded by the full disk",
            || async {
                let degraded = collector_metric(&cluster, 1, "collector_spool_degraded").await?;
                (degraded == 1.0).then_some(())
            },
        )
        .await;
    // The spool's bound is the tmpfs's free space: the disk is full before
    // the kernel refuses a write, and the spool says so rather than fail.
    let bound = collector_metric(&cluster, 1, "collector_spool_bound_bytes")
        .await
        .unwrap_or(0.0);
    assert!(
        bound > 0.0 && bound < 256.0 * 1024.0,
        "the spool bounded by its filesystem: {bound}"
    );
    let errors = collector_metric(&cluster, 1, "collector_spool_write_errors_total")
        .await
        .unwrap_or(0.0);
    cluster.log(&format!(
        "node-1's spool is full at {bound} bytes, its filesystem's room ({errors} write errors)"
    ));
    cluster.run_for(FAULT).await;
    cluster.broker.start().await;
    cluster.log("broker started again");
    cluster
        .eventually(
            harness::docker_patience(),
            "node-1's spool in use again",
            || async {
                let degraded = collector_metric(&cluster, 1, "collector_spool_degraded").await?;
                (degraded == 0.0).then_some(())
            },
        )
        .await;
    cluster.log("node-1's spool is in use again");
    cluster.run_for(LOAD).await;
    let report = cluster.finish().await;
    assert_nothing_dropped(&report);
}

/// DC/OS strict mode end to end, from inside the images: Kafka over
/// SASL_SSL with SCRAM-SHA-512 (stunnel in front of tansu, whose users are
/// made before authentication is switched on), brokers found through the
/// Kafka service's SDK API (`/service/kafka/v1/endpoints/broker-tls`) over
/// HTTPS with the CA and a token file. The collectors, the sample-producers
/// and the verifier all connect that way, and the balance is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secured_kafka_over_sasl_ssl_found_over_https_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let (secrets, data) = (dir.path().join("secrets"), dir.path().join("data"));
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    let secured = Secured {
        secrets: secrets.to_str().unwrap().to_owned(),
        data: data.to_str().unwrap().to_owned(),
        user: "metrics",
        token: "docker-tier-service-account-token",
    };
    harness::write_secrets(
        &secrets,
        "secured",
        "docker-tier-scram-password",
        secured.token,
    );
    let spec = Topology {
        secured: Some(secured),
        ..topology()
    };
    let cluster = Cluster::start("secured", spec).await;
    cluster.run_for(LOAD).await;
    let report = cluster.finish().await;
    assert_nothing_dropped(&report);
    assert!(
        !report.seen.sample_executors.is_empty(),
        "the sample-producers' messages arrived"
    );
    let http = reqwest::Client::new();
    for node in &cluster.nodes {
        let api = format!("http://{}:8123", cluster.node_ip(node.index).await);
        let endpoints: serde_json::Value = http
            .get(format!("{api}/v1/endpoints"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let kafka = &endpoints["outputs"][1];
        assert!(
            kafka["discovered_by"]
                .as_str()
                .is_some_and(|m| m.contains("https://")
                    && m.contains("/service/kafka/v1/endpoints/broker-tls")),
            "{kafka}"
        );
        assert_eq!(
            kafka["brokers"],
            serde_json::json!(["mct-secured-tansu:9093"])
        );
        let metrics = http
            .get(format!("{api}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for failure in [
            "collector_kafka_authentication_failures_total 0",
            "collector_kafka_tls_failures_total 0",
        ] {
            assert!(
                metrics.lines().any(|l| l == failure),
                "node-{}: {failure}",
                node.index
            );
        }
    }
    cluster.log("secured: SASL_SSL with SCRAM-SHA-512, broker-tls found over HTTPS with a token");
}

/// One framework's topic refused by the broker (an ACL:
/// `TOPIC_AUTHORIZATION_FAILED`) for 60 s under load, on the disk spool.
/// tansu has no ACLs, so the broker is the simulator's embedded one, in
/// node-1's namespace, refusing the topic through its control API. While it
/// lasts, `/health` names the topic (degraded, 200), the other framework's
/// data is delivered and the spool's segments are freed (its bytes stay
/// under half its 2 MiB bound, which the refused records used to fill in
/// about 40 s, pinning every segment after them); past `kafka_parked_max_bytes` the refused topic's oldest
/// records are dropped, counted as `topic_refused`. Once the refusal ends,
/// what was kept arrives, and the balance holds exactly: generated =
/// arrived + dropped, every drop counted by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_refused_for_60s_costs_only_its_own_data() {
    let spec = Topology {
        nodes: 1,
        broker: Broker::Mock,
        spool: Some(SpoolStorage::Volume),
        rate: 500.0,
        collector_options: vec![
            "--kafka-parked-max-bytes=131072".into(),
            "--buffer-max-bytes=2097152".into(),
            "--spool-max-bytes=2097152".into(),
            "--kafka-max-message-bytes=65536".into(),
            // The embedded broker refuses a topic's metadata only, not its
            // produces: the producer learns of it at its next refresh.
            "--librdkafka=topic.metadata.refresh.interval.ms=1000".into(),
            // The agent's container metrics go to the frameworks' topics
            // too, and their drops would count against the module's
            // datapoints in the balance: only the module's go here.
            "--agent-polling=false".into(),
        ],
        ..topology()
    };
    let cluster = Cluster::start("refused", spec).await;
    cluster.run_for(LOAD).await;
    let (refused, other) = (
        "metrics-5349f49b-68b3-4638-aab2-fc4ec845f993-0001",
        "metrics-5349f49b-68b3-4638-aab2-fc4ec845f993-0000",
    );
    let control = format!(
        "http://{}:9300/topics/{refused}/error",
        cluster.node_ip(1).await
    );
    let http = reqwest::Client::new();
    let response = http
        .post(&control)
        .json(&serde_json::json!({"error": "TOPIC_AUTHORIZATION_FAILED"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204, "refusing {refused}");
    cluster.log(&format!("the broker refuses {refused} for 60 s"));
    let health = format!("http://{}:8123/health", cluster.node_ip(1).await);
    cluster
        .eventually(
            harness::docker_patience(),
            "node-1's /health names the refused topic",
            || async {
                let response = http.get(&health).send().await.ok()?;
                let status = response.status();
                let body: serde_json::Value = response.json().await.ok()?;
                (status == 200
                    && body["status"] == "degraded"
                    && body["reasons"].to_string().contains(refused))
                .then_some(())
            },
        )
        .await;
    let delivered = |topic: &'static str| {
        let cluster = &cluster;
        async move {
            collector_metric(
                cluster,
                1,
                &format!("collector_topic_delivered_datapoints_total{{topic=\"{topic}\"}}"),
            )
            .await
            .unwrap_or(0.0)
        }
    };
    let other_before = delivered(other).await;
    let mut most_spooled = 0.0f64;
    let refusal_ends = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < refusal_ends {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if let Some(bytes) = collector_metric(&cluster, 1, "collector_spool_bytes").await {
            most_spooled = most_spooled.max(bytes);
        }
    }
    let other_during = delivered(other).await - other_before;
    let refused_drops = collector_metric(
        &cluster,
        1,
        "collector_dropped_datapoints_total{reason=\"topic_refused\"}",
    )
    .await
    .unwrap_or(0.0);
    cluster.log(&format!(
        "during the refusal: {other_during} datapoints of {other} delivered, the spool at most {most_spooled} bytes, {refused_drops} datapoints of {refused} dropped past the bound"
    ));
    assert!(other_during > 0.0, "the other framework's data flowed");
    assert!(
        most_spooled < 1024.0 * 1024.0,
        "the spool's segments were freed: {most_spooled} bytes at most"
    );
    assert!(
        refused_drops > 0.0,
        "past the bound, the oldest are dropped"
    );
    let response = http.delete(&control).send().await.unwrap();
    assert_eq!(response.status(), 204);
    cluster.log(&format!("the broker accepts {refused} again"));
    cluster
        .eventually(
            harness::docker_patience(),
            "node-1 healthy again",
            || async {
                let body: serde_json::Value =
                    http.get(&health).send().await.ok()?.json().await.ok()?;
                (body["status"] == "ok").then_some(())
            },
        )
        .await;
    cluster.run_for(LOAD).await;
    let report = cluster.finish().await;
    let c = &report.conservation;
    assert_every_producer_arrived(&report, 1);
    assert_eq!(c.producer_dropped, 0, "dropped by the producers");
    let refused_drops = collector_metric(
        &cluster,
        1,
        "collector_dropped_datapoints_total{reason=\"topic_refused\"}",
    )
    .await
    .unwrap_or(0.0);
    assert_eq!(
        c.collector_dropped as f64, refused_drops,
        "every collector drop is a counted topic_refused one"
    );
    assert_eq!(c.arrived + c.collector_dropped, c.generated);
}

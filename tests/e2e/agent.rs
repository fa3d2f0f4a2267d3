//! The agent side against the simulator's agent and the mock cluster: the
//! sample-producer, and the collector's poller and enrichment.

use std::time::Duration;

use collector::discovery::BrokerSource;
use collector::sample::{SampleConfig, run};
use collector::sources::agent::poller::AgentAddress;
use e2e::{assert_balanced, assert_eventually, consume_all, spawn_collector, test_config};
use rdkafka::mocking::MockCluster;
use serde_json::Value;
use simulator::agent::{AgentFault, mesos_agent, reference};
use simulator::producer::producer;
use tokio_util::sync::CancellationToken;

pub(crate) fn sample_config(agent: String, bootstrap: &str) -> SampleConfig {
    SampleConfig {
        brokers: Some(BrokerSource::Static(
            bootstrap.split(',').map(str::to_owned).collect(),
        )),
        topic: "sample_metrics".into(),
        period: Duration::from_millis(200),
        agent: AgentAddress::Url(agent),
        credentials: Default::default(),
        agent_timeout: Duration::from_secs(2),
        file_dir: None,
        max_pending: SampleConfig::MAX_PENDING,
        max_pending_bytes: SampleConfig::MAX_PENDING_BYTES,
        max_message_bytes: SampleConfig::MAX_MESSAGE_BYTES,
        max_body_bytes: SampleConfig::MAX_BODY_BYTES,
        compression: "snappy".into(),
        security: Default::default(),
        reload: Default::default(),
        librdkafka: Vec::new(),
    }
}

/// Each poll is one Kafka message whose records are exactly the agent's JSON:
/// one MetricList per executor, tags = its top-level strings sorted by key,
/// one datapoint per statistic, at the statistics timestamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_producer_messages_match_the_agent_json_exactly() {
    let kafka = MockCluster::new(1).unwrap();
    let agent = mesos_agent().replay(true).run().await.unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(
        sample_config(agent.url(), &kafka.bootstrap_servers()),
        shutdown.clone(),
    ));
    assert_eventually!(agent.requests() >= 3, "polled a few times");
    shutdown.cancel();
    let report = task.await.unwrap();
    assert!(report.messages_delivered >= 2, "{report:?}");
    assert_eq!(report.datapoints_dropped, 0);

    let collected = e2e::consume(kafka.bootstrap_servers(), "sample_metrics").await;
    assert_eq!(
        collected.messages.len() as u64,
        report.messages_delivered,
        "one message per poll"
    );
    let json: Value = serde_json::from_str(reference::STATISTICS).unwrap();
    let entry = json[0].as_object().unwrap();
    let statistics = entry["statistics"].as_object().unwrap();
    for (_, record) in &collected.records {
        assert_eq!(record.topic, "sample_metrics");
        let mut expected_tags: Vec<(&str, &str)> = entry
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|v| (k.as_str(), v)))
            .collect();
        expected_tags.sort();
        let tags: Vec<(&str, &str)> = record
            .tags
            .iter()
            .map(|t| (t.key.as_str(), t.value.as_str()))
            .collect();
        assert_eq!(tags, expected_tags);
        assert_eq!(record.datapoints.len(), statistics.len() - 1);
        let time_ms = (statistics["timestamp"].as_f64().unwrap() * 1000.0) as i64;
        for point in &record.datapoints {
            assert_eq!(
                point.value,
                statistics[&point.name].as_f64().unwrap(),
                "{}",
                point.name
            );
            assert_eq!(point.time_ms, time_ms);
        }
    }
}

/// No containers: it waits and retries. Brokers down: polls are kept. As
/// soon as either changes, data flows, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_producer_never_gives_up() {
    let kafka = MockCluster::new(1).unwrap();
    let agent = mesos_agent().containers(3).run().await.unwrap();
    agent.set_fault(AgentFault::NoContainers);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(
        sample_config(agent.url(), &kafka.bootstrap_servers()),
        shutdown.clone(),
    ));
    assert_eventually!(
        agent.requests() >= 2,
        "keeps polling an agent with no containers"
    );
    agent.set_fault(AgentFault::ServerError);
    let before = agent.requests();
    assert_eventually!(
        agent.requests() >= before + 2,
        "keeps polling an agent answering 500"
    );
    kafka.broker_down(1).unwrap();
    agent.set_fault(AgentFault::None);
    let before = agent.requests();
    assert_eventually!(agent.requests() >= before + 3, "polls while Kafka is down");
    kafka.broker_up(1).unwrap();
    let bootstrap = kafka.bootstrap_servers();
    assert_eventually!(
        {
            let bootstrap = bootstrap.clone();
            tokio::task::spawn_blocking(move || consume_all(&bootstrap, "sample_metrics"))
                .await
                .unwrap()
                .messages
                .len()
                >= 3
        },
        "the polls made while Kafka was down arrive once it is back"
    );
    shutdown.cancel();
    let report = task.await.unwrap();
    assert!(
        report.empty_polls >= 2 && report.failed_polls >= 2,
        "{report:?}"
    );
    let collected = tokio::task::spawn_blocking(move || consume_all(&bootstrap, "sample_metrics"))
        .await
        .unwrap();
    assert_eq!(collected.datapoints(), report.datapoints_delivered);
    assert!(
        collected
            .records
            .iter()
            .any(|(_, r)| r.datapoints.iter().any(|d| d.name.starts_with("perf."))),
        "nested perf flattened"
    );
    assert!(collected.records.iter().any(|(_, r)| {
        r.datapoints
            .iter()
            .any(|d| d.name.starts_with("blkio_statistics."))
    }));
}

/// The collector polls `/state`, `/containers` and `/metrics/snapshot`: TCP
/// records get agent_id, framework_name and application_name; container
/// and agent metrics arrive on their topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_poller_enriches_and_publishes_agent_metrics() {
    let kafka = MockCluster::new(1).unwrap();
    let agent = mesos_agent()
        .containers(4)
        .frameworks(2)
        .agent_id("agent-7")
        .run()
        .await
        .unwrap();
    let mut config = test_config(&kafka.bootstrap_servers());
    config.agent_polling = true;
    config.agent_url = Some(agent.url());
    config.agent_poll_period = 1;
    let collector = spawn_collector(config).await;
    // A module record for the first container, tagged as the module tags it.
    let statistics = agent.statistics_json();
    let first = &statistics[0];
    let framework_id = first["framework_id"].as_str().unwrap().to_owned();
    let executor_id = first["executor_id"].as_str().unwrap().to_owned();
    assert_eventually!(agent.requests() >= 3, "the poller ran");
    let mut records = producer(collector.addr, "m")
        .topic(&framework_id)
        .block_records(0);
    for record in &mut records {
        record
            .tags
            .push(schema::Tag::new("executor_id", &executor_id));
    }
    let mut bytes = Vec::new();
    let mut encoder = schema::OcfEncoder::new(schema::Codec::Null);
    encoder.write_header(&mut bytes);
    encoder.write_block(&records, &mut bytes);
    let mut stream = tokio::net::TcpStream::connect(collector.addr)
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, &bytes)
        .await
        .unwrap();
    drop(stream);
    assert_eventually!(
        collector.accounting().delivered.datapoints > 0
            && collector.accounting().in_flight().datapoints == 0,
        "delivered"
    );
    let accounting = collector.shutdown().await;
    assert_balanced(&accounting);

    let collected = e2e::consume(kafka.bootstrap_servers(), "metrics-").await;
    let module: Vec<_> = collected
        .records
        .iter()
        .filter(|(_, r)| r.tag("sim_producer") == Some("m"))
        .collect();
    assert_eq!(module.len(), records.len());
    for (topic, record) in &module {
        assert_eq!(topic, &format!("metrics-{framework_id}"));
        assert_eq!(record.tag("agent_id"), Some("agent-7"));
        assert_eq!(record.tag("framework_name"), Some("marathon"));
        assert_eq!(record.tag("application_name"), Some("app-0"));
    }
    let containers: Vec<_> = collected
        .records
        .iter()
        .filter(|(_, r)| r.tag("container_id").is_some())
        .collect();
    assert!(!containers.is_empty(), "/containers metrics arrive");
    assert!(
        containers
            .iter()
            .all(|(t, r)| t == &format!("metrics-{}", r.tag("framework_id").unwrap()))
    );
    assert!(containers.iter().all(|(_, r)| {
        r.datapoints
            .iter()
            .all(|d| d.name.starts_with("dcos.metrics.container."))
    }));
    let snapshot: Vec<_> = collected
        .records
        .iter()
        .filter(|(t, _)| t == "metrics-agent")
        .collect();
    assert!(
        !snapshot.is_empty(),
        "/metrics/snapshot arrives on topic agent"
    );
    assert!(
        snapshot[0]
            .1
            .datapoints
            .iter()
            .any(|d| d.name == "dcos.metrics.agent.slave.tasks_running")
    );
}

/// Cached agent state expires: while `/state` fails for more than four poll
/// periods, records get the original's UNKNOWN_* values, not stale tags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_agent_state_expires() {
    let kafka = MockCluster::new(1).unwrap();
    let agent = mesos_agent()
        .containers(2)
        .agent_id("agent-9")
        .run()
        .await
        .unwrap();
    let mut config = test_config(&kafka.bootstrap_servers());
    config.agent_polling = true;
    config.agent_url = Some(agent.url());
    config.agent_poll_period = 1;
    let collector = spawn_collector(config).await;
    assert_eventually!(agent.requests() >= 3, "the poller ran");
    agent.set_fault(AgentFault::ServerError);
    let failing_since = agent.requests();
    // Each period makes 3 requests: wait out more than four failing periods.
    assert_eventually!(
        agent.requests() >= failing_since + 16,
        "polls failed for over four periods"
    );
    let report = producer(collector.addr, "late")
        .topic("fw")
        .blocks(1)
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector.accounting().in_flight().datapoints == 0
            && collector.accounting().delivered.datapoints >= report.datapoints,
        "delivered"
    );
    assert_balanced(&collector.shutdown().await);
    let collected = e2e::consume(kafka.bootstrap_servers(), "metrics-fw").await;
    assert_eq!(collected.records.len() as u64, report.records);
    assert!(
        collected
            .records
            .iter()
            .all(|(_, r)| r.tag("agent_id") == Some("UNKNOWN_AGENT_STATE")),
        "{:?}",
        collected.records[0].1.tags
    );
}

/// The sample-producer finds Kafka through the scheduler; a scheduler
/// outage holds its polls, which arrive once the scheduler answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_producer_survives_a_scheduler_outage() {
    use simulator::scheduler::{SchedulerFault, kafka_scheduler};
    let kafka = MockCluster::new(1).unwrap();
    let scheduler = kafka_scheduler("kafka").run().await.unwrap();
    let brokers: Vec<String> = kafka
        .bootstrap_servers()
        .split(',')
        .map(str::to_owned)
        .collect();
    scheduler.set_lists(brokers.clone(), brokers);
    scheduler.set_fault(SchedulerFault::Unavailable);
    let agent = mesos_agent().containers(2).run().await.unwrap();
    let mut config = sample_config(agent.url(), &kafka.bootstrap_servers());
    config.brokers = Some(BrokerSource::Framework {
        name: "kafka".into(),
        scheduler_url: Some(scheduler.url()),
        dns_server: None,
        credentials: Default::default(),
        tls: false,
    });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(config, shutdown.clone()));
    assert_eventually!(
        scheduler.requests() >= 2 && agent.requests() >= 3,
        "polling while the scheduler answers 503"
    );
    scheduler.set_fault(SchedulerFault::None);
    assert_eventually!(
        e2e::consume(kafka.bootstrap_servers(), "sample_metrics")
            .await
            .messages
            .len()
            >= 3,
        "the held polls arrive"
    );
    shutdown.cancel();
    let report = task.await.unwrap();
    assert_eq!(report.datapoints_dropped, 0, "{report:?}");
}

/// The `container_id` label values a Prometheus scrape of `addr` holds.
async fn scraped_containers(addr: std::net::SocketAddr) -> std::collections::BTreeSet<String> {
    let Ok(response) = reqwest::get(format!("http://{addr}/metrics")).await else {
        return Default::default();
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split("container_id=\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A container the agent stops listing takes its series out of the node
/// store, and so out of Prometheus, at once (not after
/// `store_expiry_secs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_containers_series_leave_prometheus_at_once() {
    let kafka = MockCluster::new(1).unwrap();
    let agent = mesos_agent().containers(3).run().await.unwrap();
    let mut config = test_config(&kafka.bootstrap_servers());
    config.agent_polling = true;
    config.agent_url = Some(agent.url());
    config.agent_poll_period = 1;
    config.prometheus_listen = "127.0.0.1:0".parse().unwrap();
    let collector = spawn_collector(config).await;
    let prometheus = collector.prometheus.expect("Prometheus on");
    assert_eventually!(
        scraped_containers(prometheus).await.len() == 3,
        "three containers' series served"
    );
    let before = scraped_containers(prometheus).await;
    agent.set_containers(1);
    assert_eventually!(
        scraped_containers(prometheus).await.len() == 1,
        "the stopped containers' series gone"
    );
    let after = scraped_containers(prometheus).await;
    assert!(after.is_subset(&before), "{after:?} of {before:?}");
    let accounting = collector.shutdown().await;
    assert!(accounting.balanced(), "{accounting:?}");
}

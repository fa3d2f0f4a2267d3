//! Broker discovery through the Kafka scheduler (wiremock): faults, and a
//! broker set that moves.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use e2e::{assert_balanced, assert_eventually, consume_all, spawn_collector, test_config};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use serde_json::json;
use simulator::producer::producer;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn framework_config(scheduler: &str) -> collector::config::Config {
    let mut config = test_config("unused");
    config.kafka_brokers = Vec::new();
    config.kafka_framework = "kafka".into();
    config.kafka_scheduler_url = Some(scheduler.into());
    config
}

/// The scheduler fails (500), then answers without `dns` (the original
/// panicked there), and the collector uses `address`, with data held and
/// then delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_faults_then_address_fallback() {
    let kafka = MockCluster::new(3).unwrap();
    let scheduler = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/connection"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(2)
        .expect(2)
        .mount(&scheduler)
        .await;
    let brokers: Vec<String> = kafka
        .bootstrap_servers()
        .split(',')
        .map(str::to_owned)
        .collect();
    Mock::given(method("GET"))
        .and(path("/v1/connection"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"address": brokers, "zookeeper": "zk:2181/kafka"})),
        )
        .mount(&scheduler)
        .await;
    let collector = spawn_collector(framework_config(&scheduler.uri())).await;
    collector
        .deliver(producer(collector.addr, "p").blocks(20))
        .await;
    {
        let state = collector.brokers.lock().unwrap();
        let current = state.current.as_ref().unwrap();
        assert!(current.method.contains("\"address\""), "{}", current.method);
    }
    assert!(
        collector
            .stats
            .discovery_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    assert_balanced(&collector.shutdown().await);
}

/// An unreachable scheduler: nothing is lost while it is down; data waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_scheduler_holds_data_and_counts_it_at_shutdown() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut config = framework_config(&url);
    config.shutdown_grace_secs = 1;
    let collector = spawn_collector(config).await;
    let report = producer(collector.addr, "p").blocks(5).run().await.unwrap();
    assert_eventually!(
        collector.accounting().received.datapoints == report.datapoints,
        "read"
    );
    assert_eventually!(
        collector
            .brokers
            .lock()
            .unwrap()
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("unreachable")),
        "the failure is visible"
    );
    let accounting = collector.shutdown().await;
    assert_balanced(&accounting);
    assert_eq!(
        accounting
            .dropped_for(collector::stats::DropReason::Shutdown)
            .datapoints,
        report.datapoints
    );
}

/// Shutdown right after a broker switch, while the replaced producer still
/// holds messages for brokers that are down: the final count waits for it
/// too, so nothing is left in flight and every datapoint is delivered or
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_broker_switch_counts_the_old_producers_messages() {
    let old = MockCluster::new(1).unwrap();
    let new = MockCluster::new(1).unwrap();
    let scheduler = MockServer::start().await;
    scheduler_names(&scheduler, &old).await;
    let mut config = framework_config(&scheduler.uri());
    config.shutdown_grace_secs = 2;
    config.kafka_rediscover_secs = 3600;
    let collector = spawn_collector(config).await;
    // One topic, known before the outage (creating one needs a broker).
    let warm = collector
        .deliver(producer(collector.addr, "warm").topic("switch").blocks(1))
        .await;
    old.broker_down(1).unwrap();
    let held = producer(collector.addr, "held")
        .topic("switch")
        .blocks(20)
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector.stats.kafka_messages_produced.load(Relaxed) > 1,
        "messages handed to the old producer"
    );
    scheduler_names(&scheduler, &new).await;
    // All brokers down triggers a rediscovery, and so the switch.
    assert_eventually!(
        collector.stats.producer_switches.load(Relaxed) >= 1,
        "switched to the new brokers"
    );
    let accounting = collector.shutdown().await;
    assert_balanced(&accounting);
    assert_eq!(accounting.in_flight().datapoints, 0, "{accounting:?}");
    assert_eq!(
        accounting.received.datapoints,
        warm.datapoints + held.datapoints
    );
}

/// The scheduler moves the brokers to another cluster: the collector
/// rediscovers, switches producers, and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_set_change_is_followed_without_loss() {
    let old = MockCluster::new(1).unwrap();
    let new = MockCluster::new(1).unwrap();
    let scheduler = MockServer::start().await;
    scheduler_names(&scheduler, &old).await;
    let collector = spawn_collector(framework_config(&scheduler.uri())).await;
    let first = collector
        .deliver(producer(collector.addr, "before").blocks(20))
        .await;

    scheduler_names(&scheduler, &new).await;
    let new_bootstrap = new.bootstrap_servers();
    assert_eventually!(
        collector
            .brokers
            .lock()
            .unwrap()
            .current
            .as_ref()
            .is_some_and(|c| c.brokers.join(",") == new_bootstrap),
        "switched to the new brokers"
    );
    let second = producer(collector.addr, "after")
        .blocks(20)
        .interval(Duration::from_millis(1))
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector.accounting().delivered.datapoints == first.datapoints + second.datapoints,
        "all delivered: {:?}",
        collector.accounting()
    );
    assert_balanced(&collector.shutdown().await);
    let (old_bootstrap, new_bootstrap) = (old.bootstrap_servers(), new.bootstrap_servers());
    let (on_old, on_new) = tokio::task::spawn_blocking(move || {
        (
            consume_all(&old_bootstrap, "metrics-"),
            consume_all(&new_bootstrap, "metrics-"),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        on_old.datapoints() + on_new.datapoints(),
        first.datapoints + second.datapoints
    );
    assert_eq!(
        on_new.sequences().0["after"].len(),
        100,
        "data after the switch lands on the new brokers"
    );
}

/// The original's whole lookup, against the simulator's Mesos-DNS: SRV
/// `_kafka._tcp.marathon.mesos`, then `GET http://kafka.mesos:PORT/v1/connection`
/// (resolved through the same DNS), then the `broker-N.kafka.mesos` names.
/// The framework is missing from DNS at first: the collector retries until
/// it appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_srv_then_scheduler_then_broker_names() {
    use std::net::Ipv4Addr;
    use wiremock::matchers::header;

    let kafka = MockCluster::new(3).unwrap();
    let ports: Vec<String> = kafka
        .bootstrap_servers()
        .split(',')
        .map(|b| b.rsplit_once(':').unwrap().1.to_owned())
        .collect();
    let dns_names: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| format!("broker-{i}.kafka.mesos:{port}"))
        .collect();
    let scheduler = MockServer::start().await;
    let scheduler_port = scheduler.address().port();
    Mock::given(method("GET"))
        .and(path("/v1/connection"))
        .and(header(
            "host",
            format!("kafka.mesos:{scheduler_port}").as_str(),
        ))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"dns": dns_names, "address": []})),
        )
        .mount(&scheduler)
        .await;
    let dns = simulator::dns::mesos_dns().run().await.unwrap();
    dns.set_brokers("kafka", &[Ipv4Addr::LOCALHOST; 3]);

    let mut config = test_config("unused");
    config.kafka_brokers = Vec::new();
    config.kafka_framework = "kafka".into();
    config.dns_server = Some(dns.addr);
    let collector = spawn_collector(config).await;
    let report = producer(collector.addr, "p")
        .blocks(10)
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector
            .brokers
            .lock()
            .unwrap()
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("_kafka._tcp.marathon.mesos")),
        "the missing SRV record is reported"
    );
    assert_eq!(collector.accounting().delivered.datapoints, 0);

    dns.set_scheduler("kafka", Ipv4Addr::LOCALHOST, scheduler_port);
    assert_eventually!(
        collector.accounting().delivered.datapoints == report.datapoints,
        "delivered after the SRV record appears"
    );
    {
        let state = collector.brokers.lock().unwrap();
        let current = state.current.as_ref().unwrap();
        assert!(current.method.contains("key \"dns\""), "{}", current.method);
        let mut brokers = current.brokers.clone();
        brokers.sort();
        let mut expected: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        expected.sort();
        assert_eq!(brokers, expected, "broker names resolved through Mesos-DNS");
    }
    assert_balanced(&collector.shutdown().await);
    dns.stop();
}

/// With periodic rediscovery far away, every broker failing is what sends
/// the collector back to the scheduler, which by then names new brokers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_brokers_down_triggers_rediscovery() {
    let old = MockCluster::new(1).unwrap();
    let new = MockCluster::new(1).unwrap();
    let scheduler = MockServer::start().await;
    scheduler_names(&scheduler, &old).await;
    let mut config = framework_config(&scheduler.uri());
    config.kafka_rediscover_secs = 3600;
    let collector = spawn_collector(config).await;
    let first = collector
        .deliver(producer(collector.addr, "before").blocks(5))
        .await;
    scheduler_names(&scheduler, &new).await;
    old.broker_down(1).unwrap();
    let second = producer(collector.addr, "after")
        .blocks(5)
        .run()
        .await
        .unwrap();
    let new_bootstrap = new.bootstrap_servers();
    assert_eventually!(
        collector
            .brokers
            .lock()
            .unwrap()
            .current
            .as_ref()
            .is_some_and(|c| c.brokers.join(",") == new_bootstrap),
        "all brokers down sent the collector back to the scheduler"
    );
    assert_eventually!(
        collector.accounting().delivered.datapoints == first.datapoints + second.datapoints,
        "delivered to the new brokers: {:?}",
        collector.accounting()
    );
    assert_balanced(&collector.shutdown().await);
    let on_new = e2e::consume(new.bootstrap_servers(), "metrics-").await;
    assert_eq!(on_new.sequences().0["after"].len(), 25);
}

/// Makes the scheduler fake answer `/v1/connection` with `cluster`'s
/// brokers (the `dns` list), from now on.
async fn scheduler_names(
    scheduler: &MockServer,
    cluster: &MockCluster<'_, DefaultProducerContext>,
) {
    scheduler.reset().await;
    let dns: Vec<String> = cluster
        .bootstrap_servers()
        .split(',')
        .map(str::to_owned)
        .collect();
    Mock::given(method("GET"))
        .and(path("/v1/connection"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"dns": dns})))
        .mount(scheduler)
        .await;
}

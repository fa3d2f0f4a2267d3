//! The collector tried as a hostile user would: each test here is the
//! regression test of a defect found that way, and fails without its fix.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use collector::config::FullPolicy;
use collector::stats::DropReason;
use e2e::{assert_balanced, assert_eventually, spawn_collector, test_config};
use rdkafka::mocking::MockCluster;
use schema::{Codec, OcfEncoder};
use serde_json::json;
use simulator::agent::mesos_agent;
use simulator::producer::producer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Descriptors this test process has open.
fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Shutdown with the buffer full, every broker down and senders still
/// writing (`block` policy): it ends within its grace, and what waited for
/// room is counted as a `shutdown` drop. It used to hang forever: a
/// connection blocked pushing into the full buffer never saw the shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_a_full_buffer_and_live_senders_ends_within_the_grace() {
    let kafka = MockCluster::new(1).unwrap();
    let mut config = test_config(&kafka.bootstrap_servers());
    config.buffer_max_bytes = 1024 * 1024;
    config.kafka_max_message_bytes = 64 * 1024;
    config.kafka_queue_max_kbytes = 128;
    config.buffer_full_policy = FullPolicy::Block;
    config.shutdown_grace_secs = 2;
    let collector = spawn_collector(config).await;
    collector.warm_up(1).await;
    kafka.broker_down(1).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(
                producer(collector.addr, format!("live{i}"))
                    .blocks(u64::MAX)
                    .shape(10, 20)
                    .until(stop.clone())
                    .run(),
            )
        })
        .collect();
    assert_eventually!(
        collector.stats.buffer_full_waits.load(Relaxed) > 0,
        "the buffer is full and inputs wait for room"
    );
    let started = Instant::now();
    let accounting = tokio::time::timeout(Duration::from_secs(60), collector.shutdown())
        .await
        .expect("shutdown ends");
    let took = started.elapsed();
    stop.store(true, Relaxed);
    for sender in senders {
        let _ = sender.await;
    }
    assert!(
        took <= Duration::from_secs(2 + 2),
        "shutdown took {took:?}, beyond its 2 s grace"
    );
    assert_balanced(&accounting);
    assert!(
        accounting.dropped_for(DropReason::Shutdown).datapoints > 0,
        "{accounting:?}"
    );
    assert_eq!(
        accounting.dropped_for(DropReason::InternalError).datapoints,
        0
    );
}

/// After the brokers change, the replaced producer no longer speaks for
/// Kafka: its old brokers going down raises no alarm, and what it still held
/// goes to the new brokers at once. It used to set "all brokers down" twice
/// a second, turn `/health` 503, and hold moved messages 25 s or more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_producer_raises_no_alarm_and_hands_over_at_once() {
    let old = MockCluster::new(1).unwrap();
    let new = MockCluster::new(1).unwrap();
    let mut config = test_config(&old.bootstrap_servers());
    config.health_kafka_unavailable_secs = 1;
    let collector = spawn_collector(config).await;
    let warm = collector.warm_up(1).await;
    // Messages queued in the old producer while its brokers are down...
    old.broker_down(1).unwrap();
    let held = producer(collector.addr, "held")
        .blocks(20)
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector.accounting().received.datapoints == warm.datapoints + held.datapoints,
        "read"
    );
    // ...move at once when the brokers change.
    let response = reqwest::Client::new()
        .patch(format!("http://{}/v1/config", collector.api))
        .json(&json!({"kafka_brokers": [new.bootstrap_servers()]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let switched = Instant::now();
    assert_eventually!(
        collector.accounting().delivered.datapoints == warm.datapoints + held.datapoints,
        "the moved messages delivered: {:?}",
        collector.accounting()
    );
    assert!(
        switched.elapsed() < Duration::from_secs(10),
        "moved messages took {:?}",
        switched.elapsed()
    );
    // The old producer keeps failing to reach its brokers; for well past
    // the 1 s threshold, nothing says Kafka is down.
    let health = format!("http://{}/health", collector.api);
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        let state = collector.brokers.lock().unwrap().clone();
        assert!(!state.all_brokers_down, "{state:?}");
        let status = reqwest::get(&health).await.unwrap().status().as_u16();
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_balanced(&collector.shutdown().await);
}

/// A partner that closes is noticed at once, without a write: a thousand
/// partners that connect, ask for a topic that never gets data and close
/// leave no descriptor behind. They used to stay registered forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_that_close_leave_no_descriptor_behind() {
    let mut config = test_config("127.0.0.1:9");
    config.kafka = false;
    let collector = spawn_collector(config).await;
    let before = open_descriptors();
    for _ in 0..1000 {
        let mut partner = TcpStream::connect(collector.partner).await.unwrap();
        partner.write_all(b"topics=nonexistent\n").await.unwrap();
        drop(partner);
    }
    assert_eventually!(
        collector.stats.partners_connected.load(Relaxed) == 0,
        "every closed partner unregistered: {}",
        collector.stats.partners_connected.load(Relaxed)
    );
    assert_eventually!(
        open_descriptors() <= before + 16,
        "descriptors back: {} before, {} now",
        before,
        open_descriptors()
    );
    assert_balanced(&collector.shutdown().await);
}

/// At most `max_partners` partners; more are refused, counted, and closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_beyond_the_limit_are_refused_and_counted() {
    let mut config = test_config("127.0.0.1:9");
    config.kafka = false;
    config.max_partners = 2;
    let collector = spawn_collector(config).await;
    let mut kept = Vec::new();
    for _ in 0..2 {
        let mut partner = TcpStream::connect(collector.partner).await.unwrap();
        partner.write_all(b"topics=a\n").await.unwrap();
        kept.push(partner);
    }
    assert_eventually!(
        collector.stats.partners_connected.load(Relaxed) == 2,
        "two partners"
    );
    let mut refused = TcpStream::connect(collector.partner).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(e2e::patience(), refused.read(&mut byte))
        .await
        .expect("the refused partner is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(collector.stats.partners_refused.load(Relaxed), 1);
    assert_eq!(collector.stats.partners_connected.load(Relaxed), 2);
    drop(kept);
    assert_balanced(&collector.shutdown().await);
}

/// A partner that takes nothing is disconnected after the write timeout,
/// and its socket is really closed, even though its writer was blocked in a
/// write. It used to be logged as disconnected and stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_partner_is_really_disconnected() {
    let kafka = MockCluster::new(1).unwrap();
    let mut config = test_config(&kafka.bootstrap_servers());
    config.partner_buffer_kbytes = 64;
    // Never cut off for drops: only the write timeout can end it.
    config.partner_disconnect_after_dropped_kbytes = 1 << 30;
    config.partner_write_timeout_secs = 1;
    let collector = spawn_collector(config).await;
    let mut stalled = TcpStream::connect(collector.partner).await.unwrap();
    assert_eventually!(
        collector.stats.partners_connected.load(Relaxed) == 1,
        "partner registered"
    );
    let load = producer(collector.addr, "p")
        .blocks(4000)
        .shape(10, 20)
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector.accounting().delivered.datapoints == load.datapoints,
        "Kafka got everything"
    );
    assert_eventually!(
        collector.stats.partners_disconnected_slow.load(Relaxed) == 1,
        "the stalled partner was disconnected"
    );
    assert_eventually!(
        collector.stats.partners_connected.load(Relaxed) == 0,
        "and unregistered"
    );
    // Its end sees the close (a reset), once it reads what it was sent.
    let mut sink = vec![0u8; 1 << 16];
    let closed = tokio::time::timeout(e2e::patience(), async {
        loop {
            match stalled.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the stalled partner's socket was closed");
    assert_balanced(&collector.shutdown().await);
}

/// A header or block that trickles in is cut off by the frame timeout,
/// however often single bytes reset the idle timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_frame_is_closed_by_the_frame_timeout() {
    let mut config = test_config("127.0.0.1:9");
    config.kafka = false;
    config.frame_timeout_secs = 1;
    config.idle_timeout_secs = 300;
    let collector = spawn_collector(config).await;
    let mut header = Vec::new();
    OcfEncoder::new(Codec::Null).write_header(&mut header);
    let mut stream = TcpStream::connect(collector.addr).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = tokio::spawn({
        let stop = stop.clone();
        async move {
            for byte in header {
                if stop.load(Relaxed) || stream.write_all(&[byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    assert_eventually!(
        collector.stats.connections_frame_timeout.load(Relaxed) == 1,
        "the trickling connection was closed"
    );
    assert_eq!(collector.stats.connections_open.load(Relaxed), 0);
    stop.store(true, Relaxed);
    let _ = trickle.await;
    assert_balanced(&collector.shutdown().await);
}

/// A connection that sends nothing (a probe, a port scan) is counted as
/// empty, not as malformed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_connection_is_not_malformed() {
    let mut config = test_config("127.0.0.1:9");
    config.kafka = false;
    let collector = spawn_collector(config).await;
    for _ in 0..3 {
        drop(TcpStream::connect(collector.addr).await.unwrap());
    }
    simulator::cluster::probe(&format!("tcp://{}", collector.addr))
        .await
        .unwrap();
    assert_eventually!(
        collector.stats.connections_empty.load(Relaxed) == 4,
        "empty connections counted: {}",
        collector.stats.connections_empty.load(Relaxed)
    );
    assert_eq!(collector.stats.connections_malformed.load(Relaxed), 0);
    assert_balanced(&collector.shutdown().await);
}

/// The agent poller goes through the same bounded path as TCP input: a
/// `/containers` far larger than the buffer is pushed in pieces that each
/// fit, so the buffer never holds more than its bound. It used to push one
/// chunk of it all (87 MB against a 64 MiB bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_agent_response_stays_within_the_buffer_bound() {
    let kafka = MockCluster::new(1).unwrap();
    let agent = mesos_agent().containers(6000).run().await.unwrap();
    let mut config = test_config(&kafka.bootstrap_servers());
    config.agent_polling = true;
    config.agent_url = Some(agent.url());
    config.agent_poll_period = 1;
    config.buffer_max_bytes = 2 * 1024 * 1024;
    config.kafka_max_message_bytes = 256 * 1024;
    let collector = spawn_collector(config).await;
    let stats = collector.stats.clone();
    assert_eventually!(
        stats.delivered.records.load(Relaxed) >= 6000,
        "a whole /containers delivered: {:?}",
        collector.accounting()
    );
    let accounting = collector.shutdown().await;
    assert_balanced(&accounting);
    let high_water = stats.buffer_high_water_bytes.load(Relaxed);
    assert!(high_water <= 2 * 1024 * 1024, "{high_water}");
    agent.stop();
}

/// An agent answer over `agent_max_body_bytes` is refused and counted,
/// never held; polling goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_answer_over_the_limit_is_refused_and_counted() {
    let agent = mesos_agent().containers(2000).run().await.unwrap();
    let mut config = test_config("127.0.0.1:9");
    config.kafka = false;
    config.agent_polling = true;
    config.agent_url = Some(agent.url());
    config.agent_poll_period = 1;
    config.agent_max_body_bytes = 256 * 1024;
    let collector = spawn_collector(config).await;
    let stats = collector.stats.clone();
    assert_eventually!(
        stats.agent_responses_too_large.load(Relaxed) >= 2,
        "two polls' /containers refused"
    );
    assert!(stats.agent_request_failures.load(Relaxed) >= 2);
    // /state and /metrics/snapshot are small, and still polled.
    assert_eventually!(
        stats
            .received(collector::stats::Input::Agent)
            .records
            .load(Relaxed)
            >= 1,
        "the snapshot arrives"
    );
    assert!(
        stats
            .received(collector::stats::Input::Agent)
            .records
            .load(Relaxed)
            < 2000
    );
    assert_balanced(&collector.shutdown().await);
    agent.stop();
}

fn sample_config(agent: String, bootstrap: &str) -> collector::sample::SampleConfig {
    use collector::sample::SampleConfig;
    SampleConfig {
        brokers: Some(collector::discovery::BrokerSource::Static(vec![
            bootstrap.to_owned(),
        ])),
        topic: "sample_metrics".into(),
        period: Duration::from_millis(200),
        agent: collector::sources::agent::poller::AgentAddress::Url(agent),
        credentials: Default::default(),
        agent_timeout: Duration::from_secs(2),
        file_dir: None,
        max_pending: SampleConfig::MAX_PENDING,
        max_pending_bytes: SampleConfig::MAX_PENDING_BYTES,
        max_message_bytes: SampleConfig::MAX_MESSAGE_BYTES,
        max_body_bytes: SampleConfig::MAX_BODY_BYTES,
        compression: "none".into(),
        security: Default::default(),
        reload: Default::default(),
        librdkafka: Vec::new(),
    }
}

/// A poll the brokers refuse as too large is split until it fits, and
/// every datapoint arrives. It used to be kept and retried forever, with
/// good polls queued behind it and dropped as "Kafka unreachable".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_producer_splits_a_poll_the_brokers_refuse_as_too_large() {
    let kafka = MockCluster::new(1).unwrap();
    let agent = mesos_agent().containers(40).run().await.unwrap();
    let mut config = sample_config(agent.url(), &kafka.bootstrap_servers());
    // librdkafka refuses anything over 8 KB, though the poll is cut at 1 MB:
    // as a broker with a smaller limit would.
    config.librdkafka = vec![("message.max.bytes".into(), "8000".into())];
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(collector::sample::run(config, shutdown.clone()));
    assert_eventually!(agent.requests() >= 4, "polled a few times");
    let bootstrap = kafka.bootstrap_servers();
    assert_eventually!(
        {
            let bootstrap = bootstrap.clone();
            tokio::task::spawn_blocking(move || {
                e2e::consume_all(&bootstrap, "sample_metrics").records.len() >= 80
            })
            .await
            .unwrap()
        },
        "two polls' executors arrived"
    );
    shutdown.cancel();
    let report = task.await.unwrap();
    assert_eq!(report.datapoints_dropped, 0, "{report:?}");
    let collected = e2e::consume(kafka.bootstrap_servers(), "sample_metrics").await;
    assert!(collected.messages.iter().all(|(_, m)| m.len() <= 8000));
    assert_eq!(collected.datapoints(), report.datapoints_delivered);
    assert!(report.messages_delivered > report.polls, "{report:?}");
    agent.stop();
}

/// An executor whose statistics fit no message is dropped and counted;
/// polling and sending go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_producer_drops_and_counts_an_executor_too_large_for_any_message() {
    let kafka = MockCluster::new(1).unwrap();
    let agent = mesos_agent().containers(3).run().await.unwrap();
    let mut config = sample_config(agent.url(), &kafka.bootstrap_servers());
    config.librdkafka = vec![("message.max.bytes".into(), "1000".into())];
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(collector::sample::run(config, shutdown.clone()));
    assert_eventually!(agent.requests() >= 5, "keeps polling");
    shutdown.cancel();
    let report = task.await.unwrap();
    assert!(report.datapoints_too_large > 0, "{report:?}");
    assert_eq!(report.datapoints_dropped, report.datapoints_too_large);
    assert_eq!(report.messages_delivered, 0);
    agent.stop();
}

/// While Kafka is down, the polls kept are bounded in bytes, not only in
/// number: the oldest go first, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_producer_bounds_its_pending_polls_in_bytes() {
    let kafka = MockCluster::new(1).unwrap();
    kafka.broker_down(1).unwrap();
    let agent = mesos_agent().containers(10).run().await.unwrap();
    let mut config = sample_config(agent.url(), &kafka.bootstrap_servers());
    config.max_pending_bytes = 16 * 1024;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(collector::sample::run(config, shutdown.clone()));
    assert_eventually!(agent.requests() >= 8, "polled while Kafka is down");
    shutdown.cancel();
    let report = task.await.unwrap();
    assert!(report.polls < collector::sample::SampleConfig::MAX_PENDING as u64);
    assert_eq!(report.datapoints_delivered, 0, "{report:?}");
    assert!(
        report.datapoints_dropped > 0,
        "fewer polls than max_pending, yet the byte bound dropped some: {report:?}"
    );
    agent.stop();
}

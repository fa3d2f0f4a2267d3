//! Faults: malformed inputs, broker outages, request errors, latency,
//! oversized records, and shutdown with brokers down.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use collector::config::FullPolicy;
use collector::stats::DropReason;
use e2e::{assert_balanced, assert_eventually, spawn_collector, test_config};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use simulator::producer::{Malformed, producer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_connections_do_not_disturb_good_ones() {
    let kafka = MockCluster::new(3).unwrap();
    let collector = spawn_collector(test_config(&kafka.bootstrap_servers())).await;
    let mut good = Vec::new();
    for i in 0..3 {
        good.push(tokio::spawn(
            producer(collector.addr, format!("good{i}"))
                .blocks(30)
                .interval(Duration::from_millis(2))
                .run(),
        ));
    }
    for (i, mode) in [
        Malformed::Garbage,
        Malformed::TruncatedBlock,
        Malformed::BadSync,
        Malformed::HugeBlock,
    ]
    .into_iter()
    .enumerate()
    {
        producer(collector.addr, format!("bad{i}"))
            .malformed(mode)
            .run()
            .await
            .unwrap();
    }
    let mut sent = 0;
    for task in good {
        sent += task.await.unwrap().unwrap().datapoints;
    }
    assert_eventually!(
        collector.accounting().delivered.datapoints == sent,
        "good data delivered: {:?}",
        collector.accounting()
    );
    assert_eventually!(
        collector.stats.connections_malformed.load(Relaxed) == 4,
        "4 malformed connections counted"
    );
    let accounting = collector.shutdown().await;
    assert_balanced(&accounting);
    // The one bad connection with a valid first block (BadSync) delivered nothing.
    assert_eq!(accounting.received.datapoints, sent);
    let collected = e2e::consume(kafka.bootstrap_servers(), "metrics-").await;
    let (sequences, duplicates) = collected.sequences();
    assert_eq!(duplicates, 0);
    assert_eq!(
        sequences.keys().cloned().collect::<Vec<_>>(),
        vec!["good0", "good1", "good2"]
    );
    assert!(sequences.values().all(|s| s.len() == 150));
}

/// All brokers down; the `block` policy holds the buffer bound and stops
/// reading inputs; brokers back up: every datapoint arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_down_then_up_block_policy_loses_nothing() {
    let kafka = MockCluster::new(3).unwrap();
    let mut config = test_config(&kafka.bootstrap_servers());
    config.buffer_max_bytes = 1024 * 1024;
    config.kafka_max_message_bytes = 64 * 1024;
    config.kafka_queue_max_kbytes = 256;
    config.buffer_full_policy = FullPolicy::Block;
    let collector = spawn_collector(config).await;
    let warm = collector.warm_up(2).await;

    e2e::all_brokers_down(&kafka, 3);
    let load = tokio::spawn(
        producer(collector.addr, "load")
            .blocks(1200)
            .shape(10, 20)
            .run(),
    );
    assert_eventually!(
        collector.stats.buffer_full_waits.load(Relaxed) > 0,
        "inputs blocked on a full buffer"
    );
    // The input stops being read (TCP backpressure): the byte count stays
    // put for half a second while the brokers are still down.
    let mut last = (
        collector.stats.bytes_received.load(Relaxed),
        std::time::Instant::now(),
    );
    assert_eventually!(
        {
            let now = collector.stats.bytes_received.load(Relaxed);
            if now != last.0 {
                last = (now, std::time::Instant::now());
            }
            last.1.elapsed() >= Duration::from_millis(500)
        },
        "the collector stops reading its input while the buffer is full"
    );
    assert!(
        collector.accounting().received.datapoints < warm.datapoints + 1200 * 200,
        "not everything was read while the brokers were down"
    );
    let bound = 1024 * 1024 + 64 * 1024;
    assert!(
        collector.stats.buffer_high_water_bytes.load(Relaxed) as usize <= bound,
        "buffer bound holds"
    );
    e2e::all_brokers_up(&kafka, 3);
    let sent = load.await.unwrap().unwrap().datapoints + warm.datapoints;
    assert_eventually!(
        collector.accounting().delivered.datapoints == sent,
        "all delivered: {:?}",
        collector.accounting()
    );
    assert!(
        collector.stats.buffer_high_water_bytes.load(Relaxed) as usize <= bound,
        "buffer bound held throughout"
    );
    let accounting = collector.shutdown().await;
    assert_balanced(&accounting);
    assert_eq!(accounting.dropped_total().datapoints, 0);
    let collected = e2e::consume(kafka.bootstrap_servers(), "metrics-").await;
    let (sequences, duplicates) = collected.sequences();
    assert_eq!(duplicates, 0, "idempotent producer: no duplicates");
    assert_eq!(sequences["load"].len(), 12000);
}

/// The `drop_oldest` policy never blocks inputs, and counts what it evicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_down_drop_oldest_counts_every_drop() {
    let kafka = MockCluster::new(3).unwrap();
    let mut config = test_config(&kafka.bootstrap_servers());
    config.buffer_max_bytes = 256 * 1024;
    config.kafka_max_message_bytes = 64 * 1024;
    config.kafka_queue_max_kbytes = 128;
    config.buffer_full_policy = FullPolicy::DropOldest;
    let collector = spawn_collector(config).await;
    let warm = collector.warm_up(2).await;
    e2e::all_brokers_down(&kafka, 3);
    let load = producer(collector.addr, "load")
        .blocks(400)
        .shape(10, 20)
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector.accounting().received.datapoints == warm.datapoints + load.datapoints,
        "the producer was never blocked and everything was read"
    );
    assert_eq!(collector.stats.buffer_full_waits.load(Relaxed), 0);
    e2e::all_brokers_up(&kafka, 3);
    assert_eventually!(
        collector.accounting().in_flight().datapoints == 0,
        "drained: {:?}",
        collector.accounting()
    );
    let accounting = collector.shutdown().await;
    assert_balanced(&accounting);
    let dropped = accounting.dropped_for(DropReason::BufferFull).datapoints;
    assert!(dropped > 0, "the outage overflowed the buffer");
    let collected = e2e::consume(kafka.bootstrap_servers(), "metrics-").await;
    assert_eq!(collected.datapoints(), accounting.delivered.datapoints);
    assert_eq!(
        collected.datapoints() + dropped,
        warm.datapoints + load.datapoints
    );
    let (_, duplicates) = collected.sequences();
    assert_eq!(duplicates, 0);
}

/// One broker of three goes down under load with acks=all and idempotence:
/// the topics it does not lead flow on, whole, while it is down; the one it
/// leads waits and arrives once it is back; nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_broker_down_under_load_no_loss_no_duplicates() {
    let kafka = MockCluster::new(3).unwrap();
    // The leaders are set, not drawn: the mock never moves a leader off a
    // broker that is down, and its own layout is random, so with most
    // partitions drawn to broker 2 too little could flow while it was
    // down (CI saw it once: "load flows with a broker down" not true after
    // 30 s). p0, p1 and p2's topics are led by brokers 1 and 3, p3's by 2.
    for (i, leader) in [1, 3, 1, 2].into_iter().enumerate() {
        let topic = format!("metrics-framework-p{i}");
        kafka.create_topic(&topic, 2, 3).unwrap();
        for partition in 0..2 {
            kafka
                .partition_leader(&topic, partition, Some(leader))
                .unwrap();
        }
    }
    let collector = spawn_collector(test_config(&kafka.bootstrap_servers())).await;
    let mut tasks = Vec::new();
    for i in 0..4 {
        tasks.push(tokio::spawn(
            producer(collector.addr, format!("p{i}"))
                .blocks(300)
                .shape(5, 10)
                .interval(Duration::from_millis(3))
                .run(),
        ));
    }
    assert_eventually!(
        collector.accounting().delivered.datapoints > 2_000,
        "load is flowing"
    );
    let at_down = collector.accounting();
    kafka.broker_down(2).unwrap();
    // p0, p1 and p2 send 15,000 datapoints each.
    assert_eventually!(
        collector.accounting().delivered.datapoints >= 45_000,
        "the topics broker 2 does not lead flow whole while it is down: at the down {at_down:?}; now {:?}; messages produced {}, delivered {}, retried {}; queue-full waits {}; producer switches {}",
        collector.accounting(),
        collector.stats.kafka_messages_produced.load(Relaxed),
        collector.stats.kafka_messages_delivered.load(Relaxed),
        collector.stats.kafka_messages_retried.load(Relaxed),
        collector.stats.kafka_queue_full_waits.load(Relaxed),
        collector.stats.producer_switches.load(Relaxed),
    );
    kafka.broker_up(2).unwrap();
    let mut sent = 0;
    for task in tasks {
        sent += task.await.unwrap().unwrap().datapoints;
    }
    assert_eventually!(
        collector.accounting().delivered.datapoints == sent,
        "all delivered: {:?}",
        collector.accounting()
    );
    assert_balanced(&collector.shutdown().await);
    let collected = e2e::consume(kafka.bootstrap_servers(), "metrics-").await;
    let (sequences, duplicates) = collected.sequences();
    assert_eq!(duplicates, 0);
    assert!(
        sequences.values().all(|s| s.len() == 1500),
        "{:?}",
        sequences.values().map(|s| s.len()).collect::<Vec<_>>()
    );
}

/// Retriable produce errors and added broker latency, injected in the mock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_and_latency_lose_nothing() {
    let kafka = MockCluster::new(3).unwrap();
    for broker in 1..=3 {
        kafka
            .broker_round_trip_time(broker, Duration::from_millis(50))
            .unwrap();
    }
    // The mock checks idempotent sequence numbers only for transactional
    // producers (rdkafka_mock.c, rd_kafka_mock_pid_check). With several
    // requests in flight it acks request N+1 after failing request N, where a
    // real broker answers OutOfOrderSequence; librdkafka then takes the ack of
    // N+1 as proof that N was persisted and never resends it. One request in
    // flight keeps this test about the collector, not the mock's gap.
    let mut config = test_config(&kafka.bootstrap_servers());
    config
        .librdkafka
        .insert("max.in.flight.requests.per.connection".into(), "1".into());
    let collector = spawn_collector(config).await;
    let warm = collector.warm_up(1).await;
    kafka.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ],
    );
    let report = producer(collector.addr, "load")
        .blocks(100)
        .interval(Duration::from_millis(2))
        .run()
        .await
        .unwrap();
    let sent = report.datapoints + warm.datapoints;
    let stats = collector.stats.clone();
    assert_eventually!(
        collector.accounting().delivered.datapoints == sent,
        "all delivered: {:?}",
        collector.accounting()
    );
    assert_balanced(&collector.shutdown().await);
    let collected = e2e::consume(kafka.bootstrap_servers(), "metrics-").await;
    let (sequences, duplicates) = collected.sequences();
    assert_eq!(duplicates, 0);
    let missing: Vec<u64> = (0..500)
        .filter(|s| !sequences["load"].contains(s))
        .collect();
    assert!(missing.is_empty(), "missing sequence numbers: {missing:?}");
    assert_eq!(
        collected.messages.len() as u64,
        stats.kafka_messages_delivered.load(Relaxed),
        "Kafka holds exactly the messages delivery reports acknowledged"
    );
}

/// A record too large for any Kafka message is dropped and counted, never
/// retried; the others flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_is_dropped_and_counted() {
    let kafka = MockCluster::new(1).unwrap();
    let mut config = test_config(&kafka.bootstrap_servers());
    config.kafka_max_message_bytes = 8 * 1024;
    let collector = spawn_collector(config).await;
    let small = producer(collector.addr, "small")
        .blocks(20)
        .shape(5, 10)
        .run()
        .await
        .unwrap();
    let big = producer(collector.addr, "big")
        .blocks(2)
        .shape(1, 1000)
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector.accounting().in_flight().datapoints == 0
            && collector.accounting().received.datapoints == small.datapoints + big.datapoints,
        "drained: {:?}",
        collector.accounting()
    );
    let accounting = collector.shutdown().await;
    assert_balanced(&accounting);
    assert_eq!(
        accounting.dropped_for(DropReason::TooLarge),
        collector::stats::Counts {
            records: 2,
            datapoints: 2000
        }
    );
    assert_eq!(accounting.delivered.datapoints, small.datapoints);
    let collected = e2e::consume(kafka.bootstrap_servers(), "metrics-").await;
    assert!(
        collected
            .messages
            .iter()
            .all(|(_, payload)| payload.len() <= 8 * 1024)
    );
    assert_eq!(collected.datapoints(), small.datapoints);
}

/// Shutdown with every broker down: the grace runs out and everything still
/// queued is counted as dropped for shutdown. Nothing is silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_brokers_down_counts_the_rest() {
    let kafka = MockCluster::new(1).unwrap();
    let mut config = test_config(&kafka.bootstrap_servers());
    config.shutdown_grace_secs = 1;
    let collector = spawn_collector(config).await;
    let warm = collector.warm_up(1).await;
    kafka.broker_down(1).unwrap();
    let load = producer(collector.addr, "load")
        .blocks(50)
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector.accounting().received.datapoints == warm.datapoints + load.datapoints,
        "everything read"
    );
    let accounting = collector.shutdown().await;
    assert_balanced(&accounting);
    assert_eq!(accounting.in_flight().datapoints, 0);
    assert_eq!(
        accounting.delivered.datapoints + accounting.dropped_for(DropReason::Shutdown).datapoints,
        warm.datapoints + load.datapoints
    );
    assert!(accounting.dropped_for(DropReason::Shutdown).datapoints > 0);
}

/// Shutdown keeps to its grace even when Kafka never took anything: here
/// the scheduler never answers, so there is no producer at all. (It used to
/// wait forever for a producer once its outbox held a message.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_without_any_producer_ends_within_the_grace() {
    let mut config = test_config("127.0.0.1:9");
    config.shutdown_grace_secs = 1;
    config.kafka_brokers.clear();
    config.kafka_scheduler_url = Some("http://127.0.0.1:9".into());
    let collector = spawn_collector(config).await;
    let load = producer(collector.addr, "load")
        .blocks(5)
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector.accounting().received.datapoints == load.datapoints,
        "everything read"
    );
    let accounting = tokio::time::timeout(Duration::from_secs(20), collector.shutdown())
        .await
        .expect("shutdown ends within its grace");
    assert_balanced(&accounting);
    assert_eq!(accounting.delivered.datapoints, 0);
    assert_eq!(
        accounting.dropped_for(DropReason::Shutdown).datapoints,
        load.datapoints
    );
}

/// Rate limits drop and count, as in the original.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_rate_limit_drops_and_counts() {
    let kafka = MockCluster::new(1).unwrap();
    let mut config = test_config(&kafka.bootstrap_servers());
    config.input_limit_amount_kbytes = 16;
    config.input_limit_period = 3600;
    let collector = spawn_collector(config).await;
    let report = producer(collector.addr, "p")
        .blocks(50)
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector.accounting().received.datapoints == report.datapoints
            && collector.accounting().in_flight().datapoints == 0,
        "drained: {:?}",
        collector.accounting()
    );
    let accounting = collector.shutdown().await;
    assert_balanced(&accounting);
    let limited = accounting.dropped_for(DropReason::RateLimited).datapoints;
    assert!(limited > 0 && limited < report.datapoints, "{accounting:?}");
    assert_eq!(accounting.delivered.datapoints + limited, report.datapoints);
}

/// The connection limit refuses (and counts) what is over it; the idle
/// timeout closes (and counts) a silent connection. Others keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_and_idle_timeout() {
    use tokio::io::AsyncReadExt;
    let kafka = MockCluster::new(1).unwrap();
    let mut config = test_config(&kafka.bootstrap_servers());
    config.max_connections = 2;
    config.idle_timeout_secs = 1;
    let collector = spawn_collector(config).await;
    let mut first = tokio::net::TcpStream::connect(collector.addr)
        .await
        .unwrap();
    let _second = tokio::net::TcpStream::connect(collector.addr)
        .await
        .unwrap();
    assert_eventually!(
        collector.stats.connections_open.load(Relaxed) == 2,
        "two open"
    );
    let mut third = tokio::net::TcpStream::connect(collector.addr)
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        third.read(&mut byte).await.unwrap_or(0),
        0,
        "the third is closed at once"
    );
    assert_eventually!(
        collector.stats.connections_refused.load(Relaxed) == 1,
        "and counted"
    );
    // Silent connections are closed after the idle timeout.
    assert_eq!(first.read(&mut byte).await.unwrap_or(0), 0);
    assert_eventually!(
        collector.stats.connections_idle_closed.load(Relaxed) == 2,
        "both idle ones closed and counted"
    );
    let report = producer(collector.addr, "after")
        .blocks(3)
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector.accounting().delivered.datapoints == report.datapoints,
        "new connections flow"
    );
    assert_balanced(&collector.shutdown().await);
}

/// A topic the brokers neither report nor let us create holds only its own
/// data: the other topics flow meanwhile, and once the topic can be
/// created its waiting datapoints arrive too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_cannot_be_created_holds_up_only_its_own_data() {
    let kafka = MockCluster::new(1).unwrap();
    let stuck_topic = "metrics-framework-stuck";
    kafka
        .topic_error(
            stuck_topic,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
        )
        .unwrap();
    kafka.request_errors(
        RDKafkaApiKey::CreateTopics,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_POLICY_VIOLATION; 1000],
    );
    let collector = spawn_collector(test_config(&kafka.bootstrap_servers())).await;
    let stuck = producer(collector.addr, "stuck")
        .blocks(10)
        .run()
        .await
        .unwrap();
    let flowing = producer(collector.addr, "flowing")
        .blocks(30)
        .interval(Duration::from_millis(2))
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector.accounting().delivered.datapoints == flowing.datapoints,
        "the other topic is delivered: {:?}",
        collector.accounting()
    );
    let accounting = collector.accounting();
    assert_eq!(
        accounting.in_flight().datapoints,
        stuck.datapoints,
        "the stuck topic's data waits, none of it dropped: {accounting:?}"
    );
    assert_eq!(accounting.dropped_total().datapoints, 0);

    kafka.clear_request_errors(RDKafkaApiKey::CreateTopics);
    kafka
        .topic_error(stuck_topic, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    assert_eventually!(
        collector.accounting().delivered.datapoints == flowing.datapoints + stuck.datapoints,
        "the stuck topic is delivered once it can be created: {:?}",
        collector.accounting()
    );
    assert_balanced(&collector.shutdown().await);
    let collected = e2e::consume(kafka.bootstrap_servers(), "metrics-").await;
    let (sequences, duplicates) = collected.sequences();
    assert_eq!(duplicates, 0);
    assert_eq!(sequences["stuck"].len() as u64, stuck.records);
    assert_eq!(sequences["flowing"].len() as u64, flowing.records);
}

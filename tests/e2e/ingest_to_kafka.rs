//! The happy path: many producers, every datapoint on the right topic.

use e2e::{assert_balanced, assert_eventually, consume_all, fixture, spawn_collector, test_config};
use rdkafka::mocking::MockCluster;
use schema::Codec;
use simulator::producer::producer;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_producers_every_datapoint_arrives_on_its_topic() {
    let kafka = MockCluster::new(3).unwrap();
    let collector = spawn_collector(test_config(&kafka.bootstrap_servers())).await;

    let mut tasks = Vec::new();
    for i in 0..8 {
        let builder = producer(collector.addr, format!("p{i}"))
            .blocks(40)
            .shape(5, 20);
        let builder = match i % 4 {
            0 | 1 => builder.module(),
            2 => builder.other_process(Codec::Deflate),
            _ => builder.other_process(Codec::Snappy),
        };
        tasks.push(tokio::spawn(builder.run()));
    }
    // Bytes no code of ours wrote: fastavro files, seed-era schema included,
    // and the module's exact header followed by fastavro blocks.
    for file in [
        "wire/module-stream.avro",
        "wire/seed-snappy.avro",
        "wire/current-deflate.avro",
    ] {
        let mut stream = tokio::net::TcpStream::connect(collector.addr)
            .await
            .unwrap();
        stream.write_all(&fixture(file)).await.unwrap();
        stream.shutdown().await.unwrap();
    }
    let mut sent = 0;
    for task in tasks {
        sent += task.await.unwrap().unwrap().datapoints;
    }
    let fixture_datapoints: u64 = ["current", "seed", "current"]
        .iter()
        .flat_map(|name| schema::testing::expected_records(&format!("{name}.expected.jsonl")))
        .map(|r| r.datapoints.len() as u64)
        .sum();

    assert_eventually!(
        collector.accounting().delivered.datapoints == sent + fixture_datapoints,
        "all datapoints delivered: {:?}",
        collector.accounting()
    );
    let accounting = collector.shutdown().await;
    assert_balanced(&accounting);
    assert_eq!(accounting.received.datapoints, sent + fixture_datapoints);
    assert_eq!(accounting.dropped_total().datapoints, 0);

    let kafka_bootstrap = kafka.bootstrap_servers();
    let collected = tokio::task::spawn_blocking(move || consume_all(&kafka_bootstrap, "metrics-"))
        .await
        .unwrap();
    assert_eq!(collected.datapoints(), sent + fixture_datapoints);
    let (sequences, duplicates) = collected.sequences();
    assert_eq!(duplicates, 0);
    assert_eq!(sequences.len(), 8);
    for (producer, seqs) in &sequences {
        assert_eq!(seqs.len(), 200, "{producer}: every record once");
        assert_eq!(*seqs.iter().next_back().unwrap(), 199);
    }
    for (topic, record) in &collected.records {
        let expected = collector::route::sanitize_topic(&format!("metrics-{}", record.topic)).0;
        assert_eq!(topic, &expected, "record routed by its topic field");
    }
    assert!(
        collected
            .records
            .iter()
            .any(|(t, _)| t == "metrics-service-kafka-prod"),
        "fastavro records arrived"
    );

    // A decoder we did not write reads the Kafka messages too.
    let all: Vec<u8> = collected
        .messages
        .iter()
        .flat_map(|(_, payload)| payload.iter().copied())
        .collect();
    let fastavro_datapoints: u64 = schema::testing::fastavro_read(&all)
        .iter()
        .map(|r| r.datapoints.len() as u64)
        .sum();
    assert_eq!(fastavro_datapoints, sent + fixture_datapoints);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_tags_single_topic_and_sanitized_topics() {
    let kafka = MockCluster::new(1).unwrap();
    let mut config = test_config(&kafka.bootstrap_servers());
    config.static_tags.insert("dc".into(), "eu-1".into());
    config.kafka_single_topic = Some("all-metrics".into());
    let collector = spawn_collector(config).await;
    let report = producer(collector.addr, "p")
        .topic("bad topic/ü")
        .blocks(3)
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector.accounting().delivered.datapoints == report.datapoints,
        "delivered"
    );
    assert_balanced(&collector.shutdown().await);
    let collected = e2e::consume(kafka.bootstrap_servers(), "all-metrics").await;
    assert_eq!(collected.datapoints(), report.datapoints);
    assert!(
        collected
            .records
            .iter()
            .all(|(_, r)| r.tag("dc") == Some("eu-1"))
    );

    // Without the single topic, the bad name is sanitized and counted.
    let mut config = test_config(&kafka.bootstrap_servers());
    config.kafka_topic_prefix = "san-".into();
    let collector = spawn_collector(config).await;
    let report = producer(collector.addr, "q")
        .topic("bad topic/ü")
        .blocks(2)
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector.accounting().delivered.datapoints == report.datapoints,
        "delivered"
    );
    assert!(
        collector
            .stats
            .topics_sanitized
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    assert_balanced(&collector.shutdown().await);
    let collected = e2e::consume(kafka.bootstrap_servers(), "san-").await;
    assert!(
        collected
            .records
            .iter()
            .all(|(topic, _)| topic == "san-bad_topic__"),
        "{:?}",
        collected.records.first()
    );
    assert_eq!(collected.datapoints(), report.datapoints);
}

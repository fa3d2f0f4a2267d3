//! The HTTP API and the partner output, in process, over real sockets.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use e2e::{assert_balanced, assert_eventually, consume_all, spawn_collector, test_config};
use rdkafka::mocking::MockCluster;
use schema::{Limits, MetricList, StreamDecoder};
use serde_json::{Value, json};
use simulator::producer::producer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn patch(api: std::net::SocketAddr, body: Value, token: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .patch(format!("http://{api}/v1/config"))
        .json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Reads a partner's OCF stream until `want` records or the deadline.
async fn read_partner(stream: &mut tokio::net::TcpStream, want: usize) -> Vec<MetricList> {
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut buf = bytes::BytesMut::new();
    let mut records = Vec::new();
    let deadline = tokio::time::Instant::now() + e2e::patience();
    while records.len() < want {
        let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await;
        let Ok(Ok(n)) = read else { break };
        if n == 0 {
            break;
        }
        while let Some(block) = decoder.decode(&mut buf).unwrap() {
            records.extend(block.records);
        }
    }
    records
}

/// Under load, the prefix changes: records move to the new topics, and every
/// datapoint is delivered exactly once across old and new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_change_under_load_moves_records_and_conserves_counts() {
    let kafka = MockCluster::new(1).unwrap();
    let collector = spawn_collector(test_config(&kafka.bootstrap_servers())).await;
    let load = tokio::spawn(
        producer(collector.addr, "p")
            .blocks(300)
            .interval(Duration::from_millis(3))
            .run(),
    );
    assert_eventually!(
        collector.accounting().delivered.datapoints > 2_000,
        "load flowing"
    );
    let (status, body) = patch(collector.api, json!({"kafka_topic_prefix": "moved-"}), None).await;
    assert_eq!(status, 200, "{body}");
    // An invalid change under load leaves everything as it was.
    let (status, body) = patch(
        collector.api,
        json!({"kafka_topic_prefix": "bad prefix!"}),
        None,
    )
    .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("kafka_topic_prefix"))
    );
    let sent = load.await.unwrap().unwrap().datapoints;
    assert_eventually!(
        collector.accounting().delivered.datapoints == sent,
        "all delivered: {:?}",
        collector.accounting()
    );
    assert_balanced(&collector.shutdown().await);
    let bootstrap = kafka.bootstrap_servers();
    let (old, new) = tokio::task::spawn_blocking(move || {
        (
            consume_all(&bootstrap, "metrics-"),
            consume_all(&bootstrap, "moved-"),
        )
    })
    .await
    .unwrap();
    assert!(
        old.datapoints() > 0 && new.datapoints() > 0,
        "records on both sides of the change"
    );
    assert_eq!(old.datapoints() + new.datapoints(), sent);
    let mut seqs = old.sequences().0.remove("p").unwrap_or_default();
    let (new_seqs, _) = new.sequences();
    let before = seqs.len();
    seqs.extend(new_seqs["p"].iter().copied());
    assert_eq!(
        seqs.len(),
        before + new_seqs["p"].len(),
        "no record in both"
    );
    assert_eq!(seqs.len(), 1500, "every record once");
}

/// A partner receives exactly what Kafka receives; a filtered one, only its topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_receives_exactly_the_stream_kafka_receives() {
    let kafka = MockCluster::new(1).unwrap();
    let collector = spawn_collector(test_config(&kafka.bootstrap_servers())).await;
    let mut everything = tokio::net::TcpStream::connect(collector.partner)
        .await
        .unwrap();
    let mut filtered = tokio::net::TcpStream::connect(collector.partner)
        .await
        .unwrap();
    filtered
        .write_all(b"topics=metrics-framework-b\n")
        .await
        .unwrap();
    assert_eventually!(
        collector.stats.partners_connected.load(Relaxed) == 2,
        "partners registered"
    );
    let a = producer(collector.addr, "a")
        .topic("framework-a")
        .blocks(20)
        .run()
        .await
        .unwrap();
    let b = producer(collector.addr, "b")
        .topic("framework-b")
        .blocks(10)
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector.accounting().delivered.datapoints == a.datapoints + b.datapoints,
        "delivered"
    );
    let all = read_partner(&mut everything, (a.records + b.records) as usize).await;
    let only_b = read_partner(&mut filtered, b.records as usize).await;
    assert_balanced(&collector.shutdown().await);
    let kafka_side = e2e::consume(kafka.bootstrap_servers(), "metrics-").await;
    let key = |r: &MetricList| serde_json::to_string(r).unwrap();
    let mut from_kafka: Vec<String> = kafka_side.records.iter().map(|(_, r)| key(r)).collect();
    let mut from_partner: Vec<String> = all.iter().map(key).collect();
    from_kafka.sort();
    from_partner.sort();
    assert_eq!(
        from_partner, from_kafka,
        "the partner's stream is Kafka's stream"
    );
    assert_eq!(only_b.len() as u64, b.records);
    assert!(only_b.iter().all(|r| r.topic == "framework-b"));
}

/// A partner that never reads doesn't slow Kafka; its drops are counted and
/// it is cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_partner_does_not_slow_kafka() {
    let kafka = MockCluster::new(1).unwrap();
    let mut config = test_config(&kafka.bootstrap_servers());
    config.partner_buffer_kbytes = 64;
    config.partner_disconnect_after_dropped_kbytes = 256;
    let collector = spawn_collector(config).await;
    let stalled = tokio::net::TcpStream::connect(collector.partner)
        .await
        .unwrap();
    assert_eventually!(
        collector.stats.partners_connected.load(Relaxed) == 1,
        "partner registered"
    );
    // Well past what the kernel's socket buffers can hold for the stalled reader.
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
    assert!(
        collector.stats.partner_blocks_dropped.load(Relaxed) > 0,
        "the stalled partner's drops are counted"
    );
    assert_eventually!(
        collector.stats.partners_disconnected_slow.load(Relaxed) == 1,
        "and it was cut off"
    );
    drop(stalled);
    assert_balanced(&collector.shutdown().await);
}

/// `/metrics` over HTTP parses as Prometheus text, and its counters hold the
/// accounting identity; `/health` and `/v1/endpoints` answer over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_over_http_satisfy_the_identity() {
    let kafka = MockCluster::new(1).unwrap();
    let mut config = test_config(&kafka.bootstrap_servers());
    config.kafka_max_message_bytes = 8 * 1024;
    let collector = spawn_collector(config).await;
    let small = producer(collector.addr, "s")
        .blocks(20)
        .run()
        .await
        .unwrap();
    let big = producer(collector.addr, "b")
        .blocks(1)
        .shape(1, 1000)
        .run()
        .await
        .unwrap();
    assert_eventually!(
        collector.accounting().received.datapoints == small.datapoints + big.datapoints
            && collector.accounting().in_flight().datapoints == 0,
        "drained"
    );
    let body = reqwest::get(format!("http://{}/metrics", collector.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counts = simulator::verify::parse_counts(&body).unwrap();
    assert_eq!(counts.received, (small.datapoints + big.datapoints) as f64);
    assert_eq!(counts.received, counts.delivered + counts.dropped);
    assert_eq!(counts.dropped, 1000.0, "the too-large record");
    let health = reqwest::get(format!("http://{}/health", collector.api))
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let endpoints: Value = reqwest::get(format!("http://{}/v1/endpoints", collector.api))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        endpoints["inputs"][0]["address"],
        collector.addr.to_string()
    );
    assert_eq!(
        endpoints["outputs"][1]["brokers"].as_array().map(Vec::len),
        Some(1)
    );
    assert_balanced(&collector.shutdown().await);
}

/// Bound beyond loopback, the API needs its token for changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_enforced_on_a_non_loopback_api() {
    let kafka = MockCluster::new(1).unwrap();
    let mut config = test_config(&kafka.bootstrap_servers());
    config.api_listen = "0.0.0.0:0".parse().unwrap();
    assert!(
        collector::App::bind(config.clone()).await.is_err(),
        "no token: refused at start"
    );
    config.api_token = Some("s3cret".into());
    let collector = spawn_collector(config).await;
    let api = std::net::SocketAddr::from(([127, 0, 0, 1], collector.api.port()));
    assert_eq!(
        patch(api, json!({"kafka_topic_prefix": "a-"}), None)
            .await
            .0,
        401
    );
    assert_eq!(
        patch(api, json!({"kafka_topic_prefix": "a-"}), Some("wrong"))
            .await
            .0,
        401
    );
    assert_eq!(
        patch(api, json!({"kafka_topic_prefix": "a-"}), Some("s3cret"))
            .await
            .0,
        200
    );
    assert_eq!(
        reqwest::get(format!("http://{api}/v1/config"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    collector.shutdown().await;
}

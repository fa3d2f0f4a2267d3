//! Every fake against the reference data of the real systems.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use collector::sources::agent::client::AgentClient;
use collector::sources::agent::mapping::{Naming, map_entries};
use schema::{Limits, StreamDecoder};
use serde_json::Value;
use simulator::agent::{AgentFault, mesos_agent, reference};
use simulator::producer::{ModuleReport, module_producer, producer};
use simulator::scheduler::{SchedulerFault, kafka_scheduler};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

fn reference_header() -> Vec<u8> {
    std::fs::read(schema::testing::fixture_path(
        "wire/mesos-module-ocf-header.bin",
    ))
    .unwrap()
}

#[tokio::test]
async fn the_module_producers_first_601_bytes_are_the_reference_header() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(producer(addr, "p").module().blocks(1).run());
    let (mut stream, _) = listener.accept().await.unwrap();
    let mut first = vec![0u8; 601];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(first, reference_header());
    task.await.unwrap().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let module = tokio::spawn(module_producer(addr, "m").rate(500.0).run(stop.clone()));
    let (mut stream, _) = listener.accept().await.unwrap();
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(first, reference_header(), "the module emulator too");
    stop.store(true, Ordering::Relaxed);
    drop(stream);
    module.await.unwrap();
}

/// One block per 100 datapoints, one MetricList per container, and every
/// generated datapoint either sent or counted as dropped.
#[tokio::test]
async fn the_module_flushes_every_100_datapoints_and_accounts_for_all() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let module = tokio::spawn(
        module_producer(addr, "m")
            .containers(3)
            .rate(2000.0)
            .run(stop.clone()),
    );
    let (mut stream, _) = listener.accept().await.unwrap();
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut buf = bytes::BytesMut::new();
    let mut blocks = Vec::new();
    while blocks.len() < 5 {
        stream.read_buf(&mut buf).await.unwrap();
        while let Some(block) = decoder.decode(&mut buf).unwrap() {
            blocks.push(block);
        }
    }
    assert_eq!(decoder.plan().unwrap().kind(), schema::SchemaKind::Current);
    assert!(
        blocks.iter().all(|b| b.datapoints() == 100),
        "{:?}",
        blocks.iter().map(|b| b.datapoints()).collect::<Vec<_>>()
    );
    assert!(blocks.iter().all(|b| b.records.len() <= 3));
    stop.store(true, Ordering::Relaxed);
    // Keep reading to the end so that everything sent is seen.
    let reader = tokio::spawn(async move {
        let mut received = blocks.iter().map(|b| b.datapoints() as u64).sum::<u64>();
        loop {
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    while let Some(block) = decoder.decode(&mut buf).unwrap() {
                        received += block.datapoints() as u64;
                    }
                }
            }
        }
        received
    });
    let report = module.await.unwrap();
    let received = reader.await.unwrap();
    assert_eq!(report.generated, report.sent + report.dropped);
    assert_eq!(
        received, report.sent,
        "what the module counts as sent arrived"
    );
}

/// No collector: data is dropped and counted, and the module reconnects
/// with backoff once one listens.
#[tokio::test]
async fn the_module_drops_while_disconnected_and_reconnects() {
    // The port is bound but not listening: connecting is refused, and no
    // other process can take the port before the listener starts.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(std::sync::Mutex::new(ModuleReport::default()));
    let module = tokio::spawn(
        module_producer(addr, "m")
            .rate(5000.0)
            .tuning(
                Duration::from_millis(200),
                (Duration::from_millis(50), Duration::from_millis(400)),
                256 * 1024,
            )
            .live_report(live.clone())
            .run(stop.clone()),
    );
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while live.lock().unwrap().dropped == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "nothing was dropped while no collector listened"
    );
    assert_eq!(live.lock().unwrap().connects, 0);
    let listener = socket.listen(16).unwrap();
    let (_stream, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .unwrap()
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let report = module.await.unwrap();
    assert!(
        report.dropped > 0,
        "dropped while no collector listened: {report:?}"
    );
    assert_eq!(report.connects, 1);
    assert_eq!(report.generated, report.sent + report.dropped);
}

#[tokio::test]
async fn the_agent_replays_the_real_responses_byte_for_byte() {
    let agent = mesos_agent().replay(true).run().await.unwrap();
    for (path, body) in [
        ("/monitor/statistics.json", reference::STATISTICS),
        ("/monitor/statistics", reference::STATISTICS),
        ("/containers", reference::CONTAINERS),
        ("/state", reference::STATE),
        ("/metrics/snapshot", reference::SNAPSHOT),
    ] {
        let text = reqwest::get(format!("{}{path}", agent.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(text, body, "{path}");
    }
}

/// The collector's own client and mapping read the emulator's output the
/// way they read a real DC/OS 1.8 agent's.
#[tokio::test]
async fn the_collector_reads_the_emulator_as_it_reads_a_real_agent() {
    let agent = mesos_agent().containers(6).run().await.unwrap();
    let client = AgentClient::new(
        &agent.url(),
        Default::default(),
        Duration::from_secs(2),
        1 << 20,
    )
    .unwrap();
    let naming = Naming {
        topic: Some("t"),
        prefix: "",
    };
    let generated = client.containers().await.unwrap();
    let real: Value = serde_json::from_str(reference::CONTAINERS).unwrap();
    let entry_keys = |v: &Value| -> Vec<String> {
        let mut keys: Vec<String> = v[0].as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    assert_eq!(
        entry_keys(&generated),
        entry_keys(&real),
        "the same /containers entry shape"
    );
    let real_stats: Vec<&String> = real[0]["statistics"].as_object().unwrap().keys().collect();
    for entry in generated.as_array().unwrap() {
        for key in &real_stats {
            assert!(
                entry["statistics"].get(key.as_str()).is_some(),
                "generated statistics lack {key}"
            );
        }
    }
    let mapped = map_entries(&generated, naming, 0);
    assert_eq!(mapped.lists.len(), 6);
    assert!(mapped.skipped.is_empty());
    let real_mapped = map_entries(&real, naming, 0);
    assert_eq!(
        mapped.lists[0]
            .tags
            .iter()
            .map(|t| &t.key)
            .collect::<Vec<_>>(),
        real_mapped.lists[0]
            .tags
            .iter()
            .map(|t| &t.key)
            .collect::<Vec<_>>()
    );
    assert!(mapped.lists.iter().any(|l| {
        l.datapoints
            .iter()
            .any(|d| d.name.starts_with("net_snmp_statistics."))
    }));
    let state = client.state().await.unwrap();
    let enrichment = collector::enrich::Enrichment::from_state(&state);
    assert_eq!(enrichment.frameworks.len(), 2);
    assert_eq!(
        enrichment.applications.len(),
        6,
        "every executor carries a Marathon label"
    );

    // Faults: as a real agent fails.
    agent.set_fault(AgentFault::MissingStatistics);
    let mapped = map_entries(&client.statistics().await.unwrap(), naming, 0);
    assert_eq!(mapped.skipped.len(), 3);
    agent.set_fault(AgentFault::Malformed);
    assert!(client.statistics().await.is_err());
    agent.set_fault(AgentFault::Unauthorized);
    assert!(matches!(
        client.state().await,
        Err(collector::sources::agent::client::AgentError::Unauthorized { .. })
    ));
    agent.set_fault(AgentFault::NoContainers);
    assert_eq!(client.statistics().await.unwrap(), Value::Array(vec![]));
}

#[tokio::test]
async fn the_scheduler_answers_both_reference_shapes_and_its_faults() {
    let scheduler = kafka_scheduler("kafka").run().await.unwrap();
    scheduler.set_brokers(&[
        "10.0.0.211:9843".parse().unwrap(),
        "10.0.0.217:10056".parse().unwrap(),
    ]);
    let get = |path: &'static str| {
        let url = format!("{}{path}", scheduler.url());
        async move {
            let response = reqwest::get(url).await.unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, body) = get("/v1/connection").await;
    assert_eq!(status, 200);
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(schema::testing::fixture_path(
            "kafka/kafka-scheduler-v1-connection-response.json",
        ))
        .unwrap(),
    )
    .unwrap();
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&body), keys(&reference), "the 2016 shape");
    assert_eq!(
        body["dns"][1], "broker-1.kafka.mesos:10056",
        "DNS names built as the real scheduler builds them"
    );
    scheduler.set_vip(Some("broker.kafka.l4lb.thisdcos.directory:9092".into()));
    let with_vip: Value = serde_json::from_str(
        &std::fs::read_to_string(schema::testing::fixture_path(
            "kafka/kafka-scheduler-v1-connection-response-with-vip.json",
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        keys(&get("/v1/connection").await.1),
        keys(&with_vip),
        "the later shape with vip"
    );
    assert_eq!(
        get("/v1/connection/address").await.1["address"][0],
        "10.0.0.211:9843"
    );
    assert_eq!(
        get("/v1/connection/dns").await.1["dns"][0],
        "broker-0.kafka.mesos:9843"
    );
    scheduler.set_fault(SchedulerFault::MissingDns);
    let (_, body) = get("/v1/connection").await;
    assert!(body.get("dns").is_none());
    assert_eq!(
        collector::discovery::brokers_from_connection(&body)
            .unwrap()
            .0,
        "address"
    );
    scheduler.set_fault(SchedulerFault::Unavailable);
    assert_eq!(get("/v1/connection").await.0, 503);
}

//! The agent client against wiremock: every path an agent can take.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::time::Duration;

use collector::config::security::Secret;
use collector::dcos::{Credentials, USER_AGENT};
use collector::sources::agent::client::{AgentClient, AgentError};
use collector::sources::agent::mapping::{Naming, map_entries};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/mesos")
            .join(name),
    )
    .unwrap()
}

async fn client(server: &MockServer) -> AgentClient {
    AgentClient::new(
        &server.uri(),
        Credentials {
            token: Some(Secret("s3cret".into())),
            ..Credentials::default()
        },
        Duration::from_millis(500),
        1 << 20,
    )
    .unwrap()
}

const NAMING: Naming<'static> = Naming {
    topic: Some("sample_metrics"),
    prefix: "",
};

#[tokio::test]
async fn no_containers_then_some_with_user_agent_and_credential() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/monitor/statistics.json"))
        .and(header("user-agent", USER_AGENT))
        .and(header("authorization", "token=s3cret"))
        .respond_with(ResponseTemplate::new(200).set_body_string("[]"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/monitor/statistics.json"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_string(fixture("mesos-monitor-statistics-doc-example.json")),
        )
        .mount(&server)
        .await;
    let client = client(&server).await;
    assert!(
        map_entries(&client.statistics().await.unwrap(), NAMING, 0)
            .lists
            .is_empty()
    );
    assert_eq!(
        map_entries(&client.statistics().await.unwrap(), NAMING, 0)
            .lists
            .len(),
        1
    );
}

#[tokio::test]
async fn statistics_json_falls_back_to_statistics() {
    let server = MockServer::start().await;
    Mock::given(path("/monitor/statistics.json"))
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    Mock::given(path("/monitor/statistics"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_string(fixture("mesos-agent-containers-response-2.json")),
        )
        .expect(1)
        .mount(&server)
        .await;
    let body = client(&server).await.statistics().await.unwrap();
    assert!(!map_entries(&body, NAMING, 0).lists.is_empty());
}

#[tokio::test]
async fn server_errors_timeouts_malformed_and_401_are_typed() {
    let server = MockServer::start().await;
    Mock::given(path("/state"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&server)
        .await;
    Mock::given(path("/containers"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_string("[]")
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&server)
        .await;
    Mock::given(path("/metrics/snapshot"))
        .respond_with(ResponseTemplate::new(200).set_body_string("{\"a\": [1,"))
        .mount(&server)
        .await;
    Mock::given(path("/monitor/statistics.json"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    let client = client(&server).await;
    assert!(matches!(
        client.state().await,
        Err(AgentError::Status { status: 500, .. })
    ));
    assert!(matches!(
        client.containers().await,
        Err(AgentError::Timeout { .. })
    ));
    assert!(matches!(
        client.snapshot().await,
        Err(AgentError::Malformed { .. })
    ));
    assert!(matches!(
        client.statistics().await,
        Err(AgentError::Unauthorized { .. })
    ));
    let unreachable = AgentClient::new(
        "http://127.0.0.1:9",
        Credentials::default(),
        Duration::from_millis(500),
        1 << 20,
    )
    .unwrap();
    assert!(matches!(
        unreachable.state().await,
        Err(AgentError::Unreachable { .. })
    ));
}

#[tokio::test]
async fn missing_statistics_and_the_real_responses() {
    let server = MockServer::start().await;
    Mock::given(path("/containers"))
        .respond_with(ResponseTemplate::new(200).set_body_string(fixture(
            "mesos-agent-containers-no-statistics-testdata.json",
        )))
        .mount(&server)
        .await;
    Mock::given(path("/state"))
        .respond_with(
            ResponseTemplate::new(200).set_body_string(fixture("mesos-agent-state-response.json")),
        )
        .mount(&server)
        .await;
    let client = client(&server).await;
    let mapped = map_entries(&client.containers().await.unwrap(), NAMING, 0);
    assert_eq!((mapped.lists.len(), mapped.skipped.len()), (1, 1));
    let state = client.state().await.unwrap();
    assert_eq!(state["frameworks"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_whether_or_not_its_length_is_announced() {
    // Announced: refused before it is read.
    let server = MockServer::start().await;
    Mock::given(path("/containers"))
        .respond_with(ResponseTemplate::new(200).set_body_string("[".repeat(2 << 20)))
        .mount(&server)
        .await;
    let client = client(&server).await;
    let error = client.containers().await.unwrap_err();
    assert!(
        matches!(error, AgentError::TooLarge { limit, .. } if limit == 1 << 20),
        "{error}"
    );
    assert!(error.to_string().contains("1048576"), "{error}");

    // Not announced: an endless chunked body is cut off at the limit.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let server = tokio::spawn({
        let sent = sent.clone();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await.unwrap();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "[".repeat(64 * 1024));
            // Far more than the limit, unless the client hangs up first.
            for _ in 0..1024 {
                if stream.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
                sent.fetch_add(64 * 1024, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let client = AgentClient::new(
        &format!("http://{addr}"),
        Credentials::default(),
        Duration::from_secs(10),
        1 << 20,
    )
    .unwrap();
    let error = client.containers().await.unwrap_err();
    assert!(matches!(error, AgentError::TooLarge { .. }), "{error}");
    drop(client);
    server.await.unwrap();
    assert!(
        sent.load(std::sync::atomic::Ordering::Relaxed) < 64 << 20,
        "the client stopped reading the endless body"
    );
}

//! The embedded broker: librdkafka's mock cluster, with faults a test
//! switches on and off: a broker down, and a topic the cluster refuses.
//!
//! A refused topic answers metadata requests with the error given (as an
//! ACL refusal does: `TOPIC_AUTHORIZATION_FAILED`). The mock cluster has
//! no per-topic error for Produce: a producer that knew the topic before
//! learns of the refusal from its next metadata refresh (librdkafka then
//! fails the topic's messages with the error, as a real broker's Produce
//! answer would), so a test sets `topic.metadata.refresh.interval.ms`
//! short. (Taking the partitions' leader away instead would fail the
//! produces at once, but the mock cluster then crashes answering Produce
//! and Fetch requests for a partition without a leader.) It has no
//! CreateTopics at all: a client creating the topic fails there whatever
//! the fault.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::post;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};

/// A librdkafka error code by its name, as librdkafka spells it without its
/// prefix (`TOPIC_AUTHORIZATION_FAILED`, `UNKNOWN_TOPIC_OR_PART`); `None`
/// for a name it does not know.
pub fn error_by_name(name: &str) -> Option<RDKafkaRespErr> {
    let wanted = name.trim().to_ascii_uppercase();
    let wanted = wanted
        .strip_prefix("RD_KAFKA_RESP_ERR_")
        .unwrap_or(&wanted)
        .to_owned();
    (-200..=200)
        .filter_map(|code| RDKafkaRespErr::try_from(code).ok())
        .find(|err| {
            format!("{err:?}")
                .strip_prefix("RD_KAFKA_RESP_ERR_")
                .is_some_and(|n| n == wanted)
        })
}

/// How the mock cluster is told about faults: what the control API asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// A broker down (`false`) or up again (`true`).
    Broker { id: i32, up: bool },
    /// Every request about `topic` fails with `error`, until
    /// [`Fault::TopicMended`].
    TopicError {
        topic: String,
        error: RDKafkaRespErr,
    },
    /// The topic's error is gone.
    TopicMended { topic: String },
}

/// Applies `fault` to `cluster` (brokers numbered from 1).
pub fn apply(
    cluster: &MockCluster<'_, DefaultProducerContext>,
    fault: &Fault,
) -> Result<(), String> {
    match fault {
        Fault::Broker { id, up: true } => cluster.broker_up(*id).map_err(|e| e.to_string()),
        Fault::Broker { id, up: false } => cluster.broker_down(*id).map_err(|e| e.to_string()),
        Fault::TopicError { topic, error } => cluster
            .topic_error(topic, *error)
            .map_err(|e| e.to_string()),
        Fault::TopicMended { topic } => cluster
            .topic_error(topic, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
            .map_err(|e| e.to_string()),
    }
}

/// `simulator kafka`: the mock cluster with `brokers` brokers, and its
/// control API on `control`, until Ctrl-C. The mock cluster is not `Send`:
/// it lives on this thread, and the control API (on a runtime thread of its
/// own) sends it faults.
pub fn run(brokers: i32, control: SocketAddr, bootstrap: Option<SocketAddr>) -> anyhow::Result<()> {
    let cluster = MockCluster::new(brokers)?;
    let first: SocketAddr = cluster
        .bootstrap_servers()
        .split(',')
        .next()
        .and_then(|b| b.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("the mock cluster has no broker address"))?;
    let (tx, rx) = std::sync::mpsc::channel::<Option<Fault>>();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(control).await?;
            let fixed = match bootstrap {
                Some(addr) => {
                    let forward = tokio::net::TcpListener::bind(addr).await?;
                    let bound = forward.local_addr()?;
                    tokio::spawn(forward_to(forward, first));
                    Some(bound)
                }
                None => None,
            };
            let _ = bound_tx.send((listener.local_addr()?, fixed));
            let server = axum::serve(listener, router(tx.clone()));
            tokio::select! {
                _ = server => {}
                _ = tokio::signal::ctrl_c() => { let _ = tx.send(None); }
            }
            Ok::<_, anyhow::Error>(())
        })
    });
    let (control, fixed) = bound_rx.recv()?;
    match fixed {
        Some(fixed) => println!(
            "bootstrap servers: {fixed} (to {first}; brokers {})",
            cluster.bootstrap_servers()
        ),
        None => println!("bootstrap servers: {}", cluster.bootstrap_servers()),
    }
    println!(
        "control API: http://{control}/brokers/<id>/down|up, http://{control}/topics/<name>/error"
    );
    while let Ok(Some(fault)) = rx.recv() {
        match apply(&cluster, &fault) {
            Ok(()) => println!("{fault:?}"),
            Err(error) => eprintln!("{fault:?}: {error}"),
        }
    }
    Ok(())
}

/// Passes every connection to `listener` on to `to`, both ways.
async fn forward_to(listener: tokio::net::TcpListener, to: SocketAddr) {
    while let Ok((mut client, _)) = listener.accept().await {
        tokio::spawn(async move {
            if let Ok(mut broker) = tokio::net::TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
            }
        });
    }
}

/// The control API: each request becomes a [`Fault`] sent to the cluster.
fn router(faults: std::sync::mpsc::Sender<Option<Fault>>) -> axum::Router {
    let brokers = faults.clone();
    let topics = faults.clone();
    axum::Router::new()
        .route(
            "/brokers/{id}/{state}",
            post(move |Path((id, state)): Path<(i32, String)>| async move {
                match state.as_str() {
                    "down" | "up" => {
                        let up = state == "up";
                        let _ = brokers.send(Some(Fault::Broker { id, up }));
                        StatusCode::NO_CONTENT
                    }
                    _ => StatusCode::NOT_FOUND,
                }
            }),
        )
        .route(
            "/topics/{name}/error",
            post({
                let topics = topics.clone();
                move |Path(topic): Path<String>, Json(body): Json<serde_json::Value>| async move {
                    let name = body.get("error").and_then(|e| e.as_str()).unwrap_or("");
                    match error_by_name(name) {
                        Some(error) => {
                            let _ = topics.send(Some(Fault::TopicError { topic, error }));
                            (StatusCode::NO_CONTENT, String::new())
                        }
                        None => (
                            StatusCode::BAD_REQUEST,
                            format!("error: {name:?} is not a librdkafka error name (such as TOPIC_AUTHORIZATION_FAILED)"),
                        ),
                    }
                }
            })
            .delete(move |Path(topic): Path<String>| async move {
                let _ = faults.send(Some(Fault::TopicMended { topic }));
                StatusCode::NO_CONTENT
            }),
        )
}

/// The error's description, for messages.
pub fn describe(error: RDKafkaRespErr) -> String {
    format!("{} ({:?})", RDKafkaErrorCode::from(error), error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_found_by_librdkafka_s_names() {
        assert_eq!(
            error_by_name("TOPIC_AUTHORIZATION_FAILED"),
            Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED)
        );
        assert_eq!(
            error_by_name("topic_authorization_failed"),
            Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED)
        );
        assert_eq!(
            error_by_name("RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART"),
            Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
        );
        assert_eq!(error_by_name("NO_SUCH_ERROR"), None);
    }
}

//! Kafka broker discovery, as the original did it, without its panics:
//!
//! 1. a static `kafka_brokers` list wins;
//! 2. otherwise the DNS SRV record `_NAME._tcp.marathon.mesos` gives the
//!    scheduler's port (Mesos-DNS);
//! 3. ask the scheduler (`http://NAME.mesos:PORT`, or `kafka_scheduler_url`,
//!    such as DC/OS's `https://master.mesos/service/kafka` through Admin
//!    Router): the SDK-era service's `/v1/endpoints/broker`, or
//!    `/v1/endpoints/broker-tls` when the brokers are reached over TLS, and
//!    the original framework's `/v1/connection` where those are not found
//!    (404); with the DC/OS CA file and `Authorization: token=…` when set
//!    ([`Credentials`]);
//! 4. use `dns`, falling back to `address` and then `vip` when a key is
//!    missing or empty (both answers have the same keys).
//!
//! Every failure is a typed error with the name or URL it concerns; callers
//! retry with capped exponential backoff and jitter ([`Backoff`]).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use serde::Serialize;

use crate::backoff::Backoff;
use crate::dcos::Credentials;
use crate::http::HttpClient;

/// The most a scheduler's answer may hold (its broker list).
const MAX_ANSWER: usize = 1 << 20;

/// Where brokers come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerSource {
    /// A fixed list.
    Static(Vec<String>),
    /// Ask the Kafka framework's scheduler.
    Framework {
        /// Framework name, e.g. `kafka`.
        name: String,
        /// Scheduler base URL, skipping the DNS lookups.
        scheduler_url: Option<String>,
        /// DNS server to ask instead of the system's.
        dns_server: Option<SocketAddr>,
        /// The CA file and token for an HTTPS, authenticated scheduler.
        credentials: Credentials,
        /// Whether the brokers are reached over TLS (`broker-tls`).
        tls: bool,
    },
}

impl From<&crate::config::Config> for BrokerSource {
    fn from(config: &crate::config::Config) -> Self {
        if config.kafka_brokers.is_empty() {
            BrokerSource::Framework {
                name: config.kafka_framework.clone(),
                scheduler_url: config.kafka_scheduler_url.clone(),
                dns_server: config.dns_server,
                credentials: Credentials::from(config),
                tls: config.kafka_security_protocol.uses_tls(),
            }
        } else {
            BrokerSource::Static(config.kafka_brokers.clone())
        }
    }
}

impl BrokerSource {
    /// The brokers, when they are configured rather than discovered.
    pub fn fixed(&self) -> Option<Discovered> {
        match self {
            BrokerSource::Static(brokers) => Some(configured(brokers)),
            BrokerSource::Framework { .. } => None,
        }
    }

    /// The HTTP client [`discover`] asks the scheduler with: over TLS when
    /// its URL is `https://` or a DC/OS CA file is given (see
    /// `crate::http`). Static brokers need none.
    pub fn http_client(&self) -> Result<HttpClient, DiscoveryError> {
        let (base, credentials) = match self {
            BrokerSource::Framework {
                scheduler_url,
                credentials,
                ..
            } => (
                // Found through Mesos-DNS: plain HTTP.
                scheduler_url.as_deref().unwrap_or("http://marathon.mesos"),
                credentials.clone(),
            ),
            BrokerSource::Static(_) => ("http://localhost", Credentials::default()),
        };
        HttpClient::new(base, &credentials, Duration::from_secs(5))
            .map_err(|e| DiscoveryError::Credentials(e.to_string()))
    }
}

/// A broker list and how it was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Discovered {
    /// `host:port` bootstrap servers.
    pub brokers: Vec<String>,
    /// How they were found, for logs and the API.
    pub method: String,
}

/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The resolver could not be built.
    #[error("DNS resolver setup failed: {0}")]
    Resolver(String),
    /// The SRV lookup failed or found nothing.
    #[error("DNS SRV lookup of {name} failed: {reason}")]
    Srv {
        /// The SRV name.
        name: String,
        /// What the resolver said.
        reason: String,
    },
    /// The scheduler's host name did not resolve.
    #[error("DNS lookup of {name} failed: {reason}")]
    Host {
        /// The host name.
        name: String,
        /// What the resolver said.
        reason: String,
    },
    /// The scheduler could not be reached.
    #[error("Kafka scheduler {url} unreachable: {reason}")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// The transport error.
        reason: String,
    },
    /// The scheduler refused the credential (or there is none).
    #[error(
        "Kafka scheduler {url} answered HTTP {status}: set auth_credential_file to a token it accepts"
    )]
    Unauthorized {
        /// The URL asked.
        url: String,
        /// 401 or 403.
        status: u16,
    },
    /// The CA file or the token file could not be used.
    #[error("Kafka scheduler credentials: {0}")]
    Credentials(String),
    /// Neither the SDK service's endpoint nor the original's was found.
    #[error(
        "Kafka scheduler answered 404 at each of {}: is it the Kafka service's scheduler (and, for broker-tls, is TLS on in the service)?",
        .tried.join(", ")
    )]
    NotFound {
        /// The URLs asked.
        tried: Vec<String>,
    },
    /// The scheduler answered with an error status.
    #[error("Kafka scheduler {url} answered HTTP {status}")]
    Status {
        /// The URL asked.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The scheduler's answer has no usable broker list.
    #[error("Kafka scheduler {url} answered without brokers: {reason}")]
    NoBrokers {
        /// The URL asked.
        url: String,
        /// What was wrong with the body.
        reason: String,
    },
}

fn resolver(dns_server: Option<SocketAddr>) -> Result<TokioResolver, DiscoveryError> {
    let provider = TokioRuntimeProvider::default();
    let builder = match dns_server {
        Some(server) => {
            let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
            for connection in &mut name_server.connections {
                connection.port = server.port();
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![name_server]),
                provider,
            )
        }
        None => {
            TokioResolver::builder(provider).map_err(|e| DiscoveryError::Resolver(e.to_string()))?
        }
    };
    let mut builder = builder;
    builder.options_mut().timeout = Duration::from_secs(2);
    builder.options_mut().attempts = 2;
    builder
        .build()
        .map_err(|e| DiscoveryError::Resolver(e.to_string()))
}

/// Brokers from the configuration.
fn configured(brokers: &[String]) -> Discovered {
    Discovered {
        brokers: brokers.to_vec(),
        method: "static kafka_brokers".into(),
    }
}

/// Finds the brokers. `http` is reused across calls.
pub async fn discover(
    source: &BrokerSource,
    http: &HttpClient,
) -> Result<Discovered, DiscoveryError> {
    let (name, scheduler_url, dns_server, credentials, tls) = match source {
        BrokerSource::Static(brokers) => return Ok(configured(brokers)),
        BrokerSource::Framework {
            name,
            scheduler_url,
            dns_server,
            credentials,
            tls,
        } => (name, scheduler_url, *dns_server, credentials, *tls),
    };
    let (base, host_header) =
        match scheduler_url {
            Some(base) => (base.trim_end_matches('/').to_owned(), None),
            None => {
                let resolver = resolver(dns_server)?;
                let srv_name = format!("_{name}._tcp.marathon.mesos.");
                let srv = resolver.srv_lookup(srv_name.as_str()).await.map_err(|e| {
                    DiscoveryError::Srv {
                        name: srv_name.clone(),
                        reason: e.to_string(),
                    }
                })?;
                let port = srv
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::SRV(srv) => Some((srv.priority, srv.port)),
                        _ => None,
                    })
                    .min()
                    .map(|(_, port)| port)
                    .ok_or_else(|| DiscoveryError::Srv {
                        name: srv_name.clone(),
                        reason: "no SRV records".into(),
                    })?;
                let host = format!("{name}.mesos");
                let ip = resolve_host(&resolver, &host).await?;
                (
                    format!("http://{}", SocketAddr::new(ip, port)),
                    Some(format!("{host}:{port}")),
                )
            }
        };
    // The SDK-era service's endpoint first; the original's where it is not
    // found.
    let endpoint = if tls { "broker-tls" } else { "broker" };
    let paths = [
        format!("/v1/endpoints/{endpoint}"),
        "/v1/connection".to_owned(),
    ];
    let mut answer = None;
    let mut headers = credentials
        .authorization_header()
        .map_err(|e| DiscoveryError::Credentials(e.to_string()))?;
    if let Some(host) = &host_header {
        headers.push((hyper::header::HOST, host.clone()));
    }
    for path in &paths {
        let url = format!("{base}{path}");
        let response = http
            .get(&url, &headers)
            .await
            .map_err(|e| DiscoveryError::Unreachable {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        match response.status() {
            404 => continue,
            status @ (401 | 403) => return Err(DiscoveryError::Unauthorized { url, status }),
            status if !(200..300).contains(&status) => {
                return Err(DiscoveryError::Status { url, status });
            }
            _ => {
                answer = Some((url, response));
                break;
            }
        }
    }
    let Some((url, mut response)) = answer else {
        return Err(DiscoveryError::NotFound {
            tried: paths.iter().map(|path| format!("{base}{path}")).collect(),
        });
    };
    let body = response
        .bytes_within(MAX_ANSWER)
        .await
        .map_err(|e| DiscoveryError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| DiscoveryError::NoBrokers {
            url: url.clone(),
            reason: format!("the answer is larger than {MAX_ANSWER} bytes"),
        })?;
    let body: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| DiscoveryError::NoBrokers {
            url: url.clone(),
            reason: format!("not JSON: {e}"),
        })?;
    let (key, mut brokers) =
        brokers_from_connection(&body).map_err(|reason| DiscoveryError::NoBrokers {
            url: url.clone(),
            reason,
        })?;
    if let Some(server) = dns_server {
        // librdkafka resolves with the system resolver; when a DNS server is
        // configured, hand it addresses that server gave us.
        let resolver = resolver(Some(server))?;
        for broker in &mut brokers {
            if let Some((host, port)) = broker.rsplit_once(':')
                && host.parse::<IpAddr>().is_err()
                && let Ok(ip) = resolve_host(&resolver, host).await
            {
                *broker = SocketAddr::new(ip, port.parse().unwrap_or(9092)).to_string();
            }
        }
    }
    Ok(Discovered {
        brokers,
        method: format!("scheduler {url} key \"{key}\""),
    })
}

async fn resolve_host(resolver: &TokioResolver, host: &str) -> Result<IpAddr, DiscoveryError> {
    let fqdn = format!("{}.", host.trim_end_matches('.'));
    let lookup = resolver
        .lookup_ip(fqdn.as_str())
        .await
        .map_err(|e| DiscoveryError::Host {
            name: host.to_owned(),
            reason: e.to_string(),
        })?;
    lookup.iter().next().ok_or_else(|| DiscoveryError::Host {
        name: host.to_owned(),
        reason: "no addresses".into(),
    })
}

/// Picks the broker list out of a `/v1/connection` body: `dns`, else
/// `address`, else `vip`. Returns the key used.
pub fn brokers_from_connection(
    body: &serde_json::Value,
) -> Result<(&'static str, Vec<String>), String> {
    for key in ["dns", "address"] {
        if let Some(list) = body.get(key).and_then(|v| v.as_array()) {
            let brokers: Vec<String> = list
                .iter()
                .filter_map(|v| v.as_str())
                .map(str::to_owned)
                .collect();
            if !brokers.is_empty() {
                return Ok((key, brokers));
            }
        }
    }
    if let Some(vip) = body.get("vip").and_then(|v| v.as_str())
        && !vip.is_empty()
    {
        return Ok(("vip", vec![vip.to_owned()]));
    }
    Err("none of \"dns\", \"address\" or \"vip\" holds a broker".into())
}

/// Discovers brokers in a task of its own, so that a slow scheduler or DNS
/// never stalls whoever uses them: at once, then every `rediscover`, when
/// `kick`ed (at most every five seconds: all brokers down), and whenever
/// `source` changes. A failure is retried with backoff. Every result is
/// sent to `results`; the task ends with `stop` or when nobody listens.
pub async fn watch(
    mut source: tokio::sync::watch::Receiver<BrokerSource>,
    rediscover: Duration,
    kick: std::sync::Arc<tokio::sync::Notify>,
    results: tokio::sync::mpsc::Sender<Result<Discovered, String>>,
    stats: std::sync::Arc<crate::stats::Stats>,
    stop: tokio_util::sync::CancellationToken,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    let mut last_kick: Option<tokio::time::Instant> = None;
    // Made again only when the source (and so its CA file) changes, or
    // when making it failed.
    let mut http: Option<(BrokerSource, HttpClient)> = None;
    loop {
        let current = source.borrow_and_update().clone();
        // Static brokers need no HTTP client.
        let result = match current.fixed() {
            Some(fixed) => Ok(fixed),
            None => {
                let client = match &http {
                    Some((made_for, client)) if *made_for == current => Ok(client.clone()),
                    _ => current.http_client(),
                };
                match client {
                    Ok(client) => {
                        http = Some((current.clone(), client.clone()));
                        tokio::select! {
                            result = discover(&current, &client) => result,
                            () = stop.cancelled() => return,
                        }
                    }
                    Err(error) => Err(error),
                }
            }
        };
        let next = match &result {
            Ok(_) => {
                stats.discoveries.fetch_add(1, Relaxed);
                backoff.reset();
                match current {
                    BrokerSource::Static(_) => None,
                    BrokerSource::Framework { .. } => Some(rediscover),
                }
            }
            Err(error) => {
                stats.discovery_failures.fetch_add(1, Relaxed);
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "Kafka broker discovery failed; retrying with backoff.");
                Some(delay)
            }
        };
        if results
            .send(result.map_err(|e| e.to_string()))
            .await
            .is_err()
        {
            return;
        }
        let framework = matches!(current, BrokerSource::Framework { .. });
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                changed = source.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tracing::info!("Broker settings changed: rediscovering.");
                    break;
                }
                () = sleep_or_never(next) => break,
                () = kick.notified(), if framework => {
                    let now = tokio::time::Instant::now();
                    if last_kick.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(5)) {
                        last_kick = Some(now);
                        break;
                    }
                }
            }
        }
    }
}

async fn sleep_or_never(delay: Option<Duration>) {
    match delay {
        Some(delay) => tokio::time::sleep(delay).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_scheduler_found_through_mesos_dns_is_asked_without_tls() {
        let framework = |scheduler_url: Option<&str>| BrokerSource::Framework {
            name: "kafka".into(),
            scheduler_url: scheduler_url.map(str::to_owned),
            dns_server: None,
            credentials: Credentials::default(),
            tls: false,
        };
        assert!(!framework(None).http_client().unwrap().is_tls());
        assert!(
            !framework(Some("http://10.0.0.9:1234"))
                .http_client()
                .unwrap()
                .is_tls()
        );
        assert!(
            framework(Some("https://master.mesos/service/kafka"))
                .http_client()
                .unwrap()
                .is_tls()
        );
    }

    #[test]
    fn dns_then_address_then_vip() {
        let full = json!({"dns": ["broker-0.kafka.mesos:9843"], "address": ["10.0.0.1:9843"], "vip": "v:9092"});
        assert_eq!(brokers_from_connection(&full).unwrap().0, "dns");
        let no_dns = json!({"address": ["10.0.0.1:9843"], "vip": "v:9092"});
        assert_eq!(
            brokers_from_connection(&no_dns).unwrap(),
            ("address", vec!["10.0.0.1:9843".to_owned()])
        );
        let only_vip = json!({"dns": [], "vip": "v:9092"});
        assert_eq!(brokers_from_connection(&only_vip).unwrap().0, "vip");
        assert!(brokers_from_connection(&json!({"zookeeper": "zk"})).is_err());
        assert!(brokers_from_connection(&json!([1, 2])).is_err());
    }

    #[test]
    fn reference_responses_parse() {
        for (file, key) in [
            ("kafka-scheduler-v1-connection-response.json", "dns"),
            (
                "kafka-scheduler-v1-connection-response-with-vip.json",
                "dns",
            ),
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fixtures/kafka")
                .join(file);
            let body: serde_json::Value =
                serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
            assert_eq!(brokers_from_connection(&body).unwrap().0, key);
        }
    }
}

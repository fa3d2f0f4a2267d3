//! The DC/OS 1.12+ mesos module (`com_mesosphere_dcos_MetricsIsolatorModule`)
//! and the tasks it launches: each container is registered as the module
//! registers it (`POST /container` with `{"container_id"}`, JSON both ways,
//! over the registration API's unix socket or TCP), and its task sends
//! statsd to the address the answer gave, with totals known exactly:
//! counters with a sample rate and several values a line, a timing with a
//! sample rate, a gauge, a set and DogStatsD tags, several lines a packet.
//! Some containers are deregistered at the end (`DELETE /container/{id}`)
//! right after their last packet, so that their last flush is checked too.
//!
//! [`StatsdModuleReport`] says what each container's series must total;
//! [`check_kafka`] and [`check_prometheus`] compare it with what arrived.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Where the registration API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// A unix socket (DC/OS: `/run/dcos/telegraf/dcos_statsd.sock`).
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl std::str::FromStr for Control {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(Self::Unix(path.into())),
            Some(_) => Err("unix: needs a path".into()),
            None => s
                .parse()
                .map(Self::Tcp)
                .map_err(|_| format!("{s:?} is not unix:PATH or IP:PORT")),
        }
    }
}

/// One series a task must have produced, as the collector names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Expected {
    /// The datapoint's name (`sim.latency.count` for a timing's count).
    pub name: String,
    /// Tags it must carry (besides the container's).
    pub tags: BTreeMap<String, String>,
    /// Its cumulative value.
    pub value: f64,
}

/// What one container's registration and task did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerReport {
    /// The container's id.
    pub container_id: String,
    /// The registration's status (201 served, 204 refused).
    pub status: u16,
    /// The address the answer gave (`STATSD_UDP_HOST`:`STATSD_UDP_PORT`).
    pub address: Option<String>,
    /// Packets its task sent.
    pub packets: u64,
    /// Lines in them.
    pub lines: u64,
    /// Whether it was deregistered at the end (202).
    pub deregistered: bool,
    /// What its series must total (none when it was refused).
    pub expected: Vec<Expected>,
}

/// What the emulated module and its tasks did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsdModuleReport {
    /// Per container, in the order registered.
    pub containers: Vec<ContainerReport>,
    /// Calls that failed (no answer, or one the module fails a launch on).
    pub failed_calls: Vec<String>,
}

impl StatsdModuleReport {
    /// Packets every task sent.
    pub fn packets(&self) -> u64 {
        self.containers.iter().map(|c| c.packets).sum()
    }
}

/// The module emulator.
#[derive(Debug, Clone)]
pub struct StatsdModule {
    control: Control,
    containers: Vec<String>,
    packets_per_sec: f64,
    deregister: usize,
}

/// A module registering `containers` on `control`.
pub fn statsd_module(control: Control, containers: Vec<String>) -> StatsdModule {
    StatsdModule {
        control,
        containers,
        packets_per_sec: 10.0,
        deregister: 0,
    }
}

impl StatsdModule {
    /// Packets each task sends per second (six lines each).
    pub fn rate(mut self, packets_per_sec: f64) -> Self {
        self.packets_per_sec = packets_per_sec;
        self
    }

    /// Deregisters the last `n` containers once their tasks stop.
    pub fn deregister(mut self, n: usize) -> Self {
        self.deregister = n;
        self
    }

    /// Registers every container, runs their tasks until `stop`, then
    /// deregisters the last ones; returns what each must total.
    pub async fn run(self, stop: Arc<AtomicBool>) -> StatsdModuleReport {
        let mut report = StatsdModuleReport::default();
        let mut tasks = Vec::new();
        for id in &self.containers {
            let body = format!("{{\"container_id\":\"{id}\"}}");
            let mut container = ContainerReport {
                container_id: id.clone(),
                ..ContainerReport::default()
            };
            match call(&self.control, "POST", "/container", Some(&body)).await {
                Ok((201, answer)) => {
                    container.status = 201;
                    let answer: serde_json::Value =
                        serde_json::from_str(&answer).unwrap_or_default();
                    // The module fails the launch without both fields.
                    match (
                        answer["statsd_host"].as_str(),
                        answer["statsd_port"].as_u64(),
                    ) {
                        (Some(host), Some(port)) => {
                            container.address = Some(format!("{host}:{port}"));
                        }
                        _ => report.failed_calls.push(format!(
                            "POST /container {id}: 201 without host and port: {answer}"
                        )),
                    }
                }
                Ok((204, _)) => container.status = 204,
                Ok((status, body)) => {
                    container.status = status;
                    report.failed_calls.push(format!(
                        "POST /container {id}: {status} {body} (the launch fails)"
                    ));
                }
                Err(error) => report
                    .failed_calls
                    .push(format!("POST /container {id}: {error} (the launch fails)")),
            }
            report.containers.push(container);
        }
        for (i, container) in report.containers.iter().enumerate() {
            let Some(address) = container.address.clone() else {
                continue;
            };
            let (stop, rate) = (stop.clone(), self.packets_per_sec);
            tasks.push((i, tokio::spawn(task(address, rate, stop))));
        }
        for (i, task) in tasks {
            if let Ok(sent) = task.await {
                let container = &mut report.containers[i];
                container.packets = sent;
                container.lines = sent * LINES_PER_PACKET;
                container.expected = expected(sent);
            }
        }
        let first_deregistered = report.containers.len().saturating_sub(self.deregister);
        for container in &mut report.containers[first_deregistered..] {
            if container.status != 201 {
                continue;
            }
            let path = format!("/container/{}", container.container_id);
            match call(&self.control, "DELETE", &path, None).await {
                Ok((202, _)) => container.deregistered = true,
                Ok((status, body)) => report
                    .failed_calls
                    .push(format!("DELETE {path}: {status} {body}")),
                Err(error) => report.failed_calls.push(format!("DELETE {path}: {error}")),
            }
        }
        report
    }
}

/// Lines in each packet a task sends.
pub const LINES_PER_PACKET: u64 = 6;

/// The `k`th packet of a task.
fn packet(k: u64) -> String {
    format!(
        "sim.requests:1|c|@0.5\nsim.multi:1|c:2|c\nsim.latency:{}|ms|@0.25\nsim.queue:{k}|g\nsim.users:u{}|s\nsim.tagged:1|c|#env:prod,shard",
        k % 10 + 1,
        k % 5
    )
}

/// What a task's series total after `n` packets, as Telegraf's statsd
/// rules count them.
pub fn expected(n: u64) -> Vec<Expected> {
    if n == 0 {
        return Vec::new();
    }
    let tags = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let series = |name: &str, kind: &str, value: f64| Expected {
        name: name.into(),
        tags: tags(&[("metric_type", kind)]),
        value,
    };
    let latency_sum: u64 = (0..n).map(|k| 4 * (k % 10 + 1)).sum();
    vec![
        // 1 at @0.5 counts 2.
        series("sim.requests", "counter", 2.0 * n as f64),
        series("sim.multi", "counter", 3.0 * n as f64),
        // Each timing at @0.25 counts four times.
        series("sim.latency.count", "timing", 4.0 * n as f64),
        series("sim.latency.sum", "timing", latency_sum as f64),
        series("sim.queue", "gauge", (n - 1) as f64),
        series("sim.users", "set", n.min(5) as f64),
        Expected {
            name: "sim.tagged".into(),
            tags: tags(&[("metric_type", "counter"), ("env", "prod"), ("shard", "")]),
            value: n as f64,
        },
    ]
}

/// Sends packets to `address` until `stop`; returns how many.
async fn task(address: String, packets_per_sec: f64, stop: Arc<AtomicBool>) -> u64 {
    let Ok(socket) = tokio::net::UdpSocket::bind("127.0.0.1:0").await else {
        return 0;
    };
    let mut interval =
        tokio::time::interval(Duration::from_secs_f64(1.0 / packets_per_sec.max(0.1)));
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) {
        interval.tick().await;
        if socket
            .send_to(packet(sent).as_bytes(), address.as_str())
            .await
            .is_ok()
        {
            sent += 1;
        }
    }
    sent
}

/// One HTTP/1.1 call as the module makes it; the status and the body.
pub async fn call(
    control: &Control,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let exchange = async {
        match control {
            Control::Unix(socket) => {
                exchange(
                    tokio::net::UnixStream::connect(socket).await?,
                    method,
                    path,
                    body,
                )
                .await
            }
            Control::Tcp(addr) => {
                exchange(
                    tokio::net::TcpStream::connect(addr).await?,
                    method,
                    path,
                    body,
                )
                .await
            }
        }
    };
    // The module's request_timeout.
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 5 s"))?
}

async fn exchange(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    match body {
        Some(body) => request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )),
        None => request.push_str("\r\n"),
    }
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.take(1 << 20).read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A statsd value seen in Kafka: its record's tags, its time, its value
/// and its topic.
pub type SeenValue = (BTreeMap<String, String>, i64, f64, String);

/// Every statsd value seen in Kafka, by container id and datapoint name
/// (each series' latest kept).
pub type StatsdSeen = BTreeMap<(String, String), Vec<SeenValue>>;

/// Whether `tags` hold every one of `wanted`.
fn holds(tags: &BTreeMap<String, String>, wanted: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| tags.get(k) == Some(v))
}

/// Every way Kafka's statsd values differ from what the tasks sent: a
/// series missing, its latest value not the total, or (the agent naming
/// every container) its record without its framework's id or in another
/// topic than `<prefix><framework id>`.
pub fn check_kafka(report: &StatsdModuleReport, seen: &StatsdSeen, prefix: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for container in report.containers.iter().filter(|c| c.status == 201) {
        for expected in &container.expected {
            let key = (container.container_id.clone(), expected.name.clone());
            let latest = seen
                .get(&key)
                .into_iter()
                .flatten()
                .filter(|(tags, ..)| holds(tags, &expected.tags))
                .max_by_key(|(_, time, ..)| *time);
            match latest {
                None => failures.push(format!(
                    "statsd: {} {} {:?} never reached Kafka",
                    container.container_id, expected.name, expected.tags
                )),
                Some((tags, _, _, topic))
                    if tags
                        .get("framework_id")
                        .is_none_or(|f| *topic != format!("{prefix}{f}")) =>
                {
                    failures.push(format!(
                        "statsd: {} {} is in topic {topic} with tags {tags:?}, not its framework's",
                        container.container_id, expected.name
                    ));
                }
                Some((_, _, value, _)) if *value != expected.value => failures.push(format!(
                    "statsd: {} {} {:?} is {value} in Kafka, the task sent {}{}",
                    container.container_id,
                    expected.name,
                    expected.tags,
                    expected.value,
                    if container.deregistered {
                        " (deregistered: its last flush)"
                    } else {
                        ""
                    }
                )),
                Some(_) => {}
            }
        }
    }
    failures
}

/// One series Prometheus must have: its metric name, the labels that pick
/// it out, and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct PrometheusSeries {
    /// The metric's name (dots made underscores, as the collector names it).
    pub metric: String,
    /// `container_id` and the series' non-empty tags.
    pub labels: BTreeMap<String, String>,
    /// What the task sent.
    pub value: f64,
}

/// The series Prometheus must have of `report`: those of the containers
/// still registered (a deregistered one's series leave with the agent's
/// next word on it).
pub fn prometheus_series(report: &StatsdModuleReport) -> Vec<PrometheusSeries> {
    report
        .containers
        .iter()
        .filter(|c| c.status == 201 && !c.deregistered)
        .flat_map(|container| {
            container.expected.iter().map(|expected| {
                let mut labels: BTreeMap<String, String> = expected
                    .tags
                    .iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                labels.insert("container_id".into(), container.container_id.clone());
                PrometheusSeries {
                    metric: expected.name.replace('.', "_"),
                    labels,
                    value: expected.value,
                }
            })
        })
        .collect()
}

/// Every way a collector's Prometheus text (`/metrics`, read with the
/// `prometheus-parse` crate) differs from what the tasks sent.
pub fn check_prometheus(report: &StatsdModuleReport, text: &str) -> Vec<String> {
    let scrape = match prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))) {
        Ok(scrape) => scrape,
        Err(error) => {
            return vec![format!(
                "statsd: the Prometheus text does not parse: {error}"
            )];
        }
    };
    let mut failures = Vec::new();
    for series in prometheus_series(report) {
        let found = scrape.samples.iter().find(|s| {
            s.metric == series.metric
                && series
                    .labels
                    .iter()
                    .all(|(k, v)| s.labels.get(k) == Some(v.as_str()))
        });
        let value = found.map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        });
        if value != Some(series.value) {
            failures.push(format!(
                "statsd: {} {} is {value:?} in Prometheus, the task sent {}",
                series.labels["container_id"], series.metric, series.value
            ));
        }
    }
    failures
}

/// Every way what a Prometheus server (`base`, `http://HOST:PORT`) has
/// scraped differs from what the tasks sent, asked through its query API:
/// each series by its labels, exactly one, with the task's total.
pub async fn check_prometheus_server(
    report: &StatsdModuleReport,
    http: &reqwest::Client,
    base: &str,
) -> Vec<String> {
    let mut failures = Vec::new();
    for series in prometheus_series(report) {
        let selector = format!(
            "{}{{{}}}",
            series.metric,
            series
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let Some(result) = crate::prometheus::query(http, base, &selector).await else {
            failures.push(format!("statsd: Prometheus does not answer {selector}"));
            continue;
        };
        let values: Vec<Option<f64>> = result
            .iter()
            .map(|sample| sample["value"][1].as_str().and_then(|v| v.parse().ok()))
            .collect();
        if values != [Some(series.value)] {
            failures.push(format!(
                "statsd: Prometheus has {values:?} for {selector}, the task sent {}",
                series.value
            ));
        }
    }
    failures
}

/// What the module's control API answers (`GET /report`, `POST /stop`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModuleControlReport {
    /// True until stopped: the report is then final.
    pub running: bool,
    /// The final report, once stopped.
    pub report: Option<StatsdModuleReport>,
}

/// A running module, stopped through its control API or [`ModuleRun::stop`].
pub struct ModuleRun {
    stop: Arc<AtomicBool>,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<StatsdModuleReport>>>,
    done: std::sync::Mutex<Option<StatsdModuleReport>>,
}

impl ModuleRun {
    /// Starts `module`.
    pub fn start(module: StatsdModule) -> Arc<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        Arc::new(Self {
            task: tokio::sync::Mutex::new(Some(tokio::spawn(module.run(stop.clone())))),
            stop,
            done: std::sync::Mutex::new(None),
        })
    }

    /// What it has done: nothing final until stopped.
    pub fn report(&self) -> ModuleControlReport {
        let report = self.done.lock().unwrap_or_else(|p| p.into_inner()).clone();
        ModuleControlReport {
            running: report.is_none(),
            report,
        }
    }

    /// Stops the tasks, deregisters the last containers, and returns the
    /// final report (the same one to every caller).
    pub async fn stop(&self) -> StatsdModuleReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut task = self.task.lock().await;
        if let Some(task) = task.take() {
            let report = task.await.unwrap_or_else(|error| StatsdModuleReport {
                failed_calls: vec![format!("the module's task failed: {error}")],
                ..StatsdModuleReport::default()
            });
            *self.done.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
        }
        self.done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default()
    }

    /// Serves `GET /report` and `POST /stop` on `listen`; the address.
    pub async fn serve(self: Arc<Self>, listen: SocketAddr) -> std::io::Result<SocketAddr> {
        use axum::extract::State;
        use axum::routing::{get, post};
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .route(
                "/report",
                get(|State(m): State<Arc<Self>>| async move { axum::Json(m.report()) }),
            )
            .route(
                "/stop",
                post(|State(m): State<Arc<Self>>| async move {
                    let report = m.stop().await;
                    axum::Json(ModuleControlReport {
                        running: false,
                        report: Some(report),
                    })
                }),
            )
            .with_state(self);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(addr)
    }
}

/// What the verifier found of one module: its containers' totals checked
/// against Kafka and, when the verifier has one, the Prometheus server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsdCheck {
    /// The module still runs (or cannot be reached): nothing is checked.
    pub running: bool,
    /// Containers registered (201).
    pub registered: usize,
    /// Containers deregistered at the end.
    pub deregistered: usize,
    /// Packets their tasks sent.
    pub packets: u64,
    /// Every difference, and every call the module failed on.
    pub failures: Vec<String>,
}

impl StatsdCheck {
    /// Stopped, and everything its tasks sent arrived.
    pub fn holds(&self) -> bool {
        !self.running && self.registered > 0 && self.failures.is_empty()
    }
}

/// Checks the module whose control API is at `url` against what Kafka
/// (`seen`, topics `<prefix><framework id>`) and the Prometheus server at
/// `prometheus` have.
pub async fn check_module(
    http: &reqwest::Client,
    url: &str,
    seen: &StatsdSeen,
    prefix: &str,
    prometheus: Option<&str>,
) -> StatsdCheck {
    let answer = async {
        http.get(format!("{url}/report"))
            .send()
            .await?
            .error_for_status()?
            .json::<ModuleControlReport>()
            .await
    };
    let Ok(ModuleControlReport {
        running: false,
        report: Some(report),
    }) = answer.await
    else {
        return StatsdCheck {
            running: true,
            ..StatsdCheck::default()
        };
    };
    let mut failures = report.failed_calls.clone();
    failures.extend(check_kafka(&report, seen, prefix));
    if let Some(base) = prometheus {
        failures.extend(check_prometheus_server(&report, http, base).await);
    }
    StatsdCheck {
        running: false,
        registered: report.containers.iter().filter(|c| c.status == 201).count(),
        deregistered: report.containers.iter().filter(|c| c.deregistered).count(),
        packets: report.packets(),
        failures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expected_totals_follow_telegrafs_rules() {
        let e = expected(12);
        let value = |name: &str| e.iter().find(|x| x.name == name).unwrap().value;
        assert_eq!(value("sim.requests"), 24.0);
        assert_eq!(value("sim.multi"), 36.0);
        assert_eq!(value("sim.latency.count"), 48.0);
        // Values 1..10, then 1, 2: (55 + 3) × 4.
        assert_eq!(value("sim.latency.sum"), 232.0);
        assert_eq!(value("sim.queue"), 11.0);
        assert_eq!(value("sim.users"), 5.0);
        assert_eq!(value("sim.tagged"), 12.0);
        assert_eq!(packet(3).lines().count() as u64, LINES_PER_PACKET);
        assert!(expected(0).is_empty());
    }
}

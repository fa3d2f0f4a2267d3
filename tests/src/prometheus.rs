//! A real Prometheus server (Debian's `prometheus` package, installed by
//! `scripts/test`) that scrapes given targets every second; the failures
//! it counts; and what a test expects of an agent's containers, read from
//! the agent's own answers. The Docker tier uses them with Prometheus in a
//! container.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// A Prometheus server on 127.0.0.1, stopped when dropped.
pub struct PrometheusServer {
    child: Child,
    /// Its HTTP API.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PrometheusServer {
    /// Starts one scraping `targets` every second (job `collector`), and
    /// waits until it listens.
    pub async fn start(targets: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(ToString::to_string).collect();
        std::fs::write(
            &config,
            simulator::prometheus::config(&targets, std::time::Duration::from_secs(1)),
        )
        .unwrap();
        let mut child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("prometheus (Debian's package; scripts/test installs it): {e}")
            });
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("msg=\"Listening on\"")
                    && let Some(addr) = line.rsplit("address=").next()
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let addr: SocketAddr = tokio::time::timeout(crate::patience(), rx)
            .await
            .expect("Prometheus said where it listens")
            .unwrap()
            .parse()
            .unwrap();
        let server = Self {
            child,
            addr,
            _dir: dir,
        };
        crate::eventually("Prometheus ready", || async {
            reqwest::get(format!("http://{addr}/-/ready"))
                .await
                .is_ok_and(|r| r.status().is_success())
                .then_some(())
                .ok_or_else(|| "not ready".to_owned())
        })
        .await;
        server
    }

    /// An instant query's result vector; empty when it does not answer.
    pub async fn query(&self, query: &str) -> Vec<Value> {
        let base = format!("http://{}", self.addr);
        simulator::prometheus::query(&reqwest::Client::new(), &base, query)
            .await
            .unwrap_or_default()
    }
}

/// The failures Prometheus counts for the samples of its scrapes: each must
/// stay 0.
pub const SCRAPE_FAILURES: &[&str] = &[
    "prometheus_target_scrapes_sample_duplicate_timestamp_total",
    "prometheus_target_scrapes_sample_out_of_order_total",
    "prometheus_target_scrapes_sample_out_of_bounds_total",
    "prometheus_target_scrapes_exceeded_sample_limit_total",
];

/// The value of each of [`SCRAPE_FAILURES`] in the Prometheus at `base`'s
/// own `/metrics`.
pub async fn scrape_failures(base: &str) -> Vec<(&'static str, f64)> {
    let body = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    SCRAPE_FAILURES
        .iter()
        .map(|name| {
            let value = body
                .lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in Prometheus's own metrics"));
            (*name, value)
        })
        .collect()
}

/// What a test expects of one container of an agent, read from the agent's
/// `/state` and `/containers` here, apart from the collector's own reading
/// of them.
#[derive(Debug, Clone)]
pub struct AgentTask {
    /// Its framework's id.
    pub framework_id: String,
    /// Its executor's id.
    pub executor_id: String,
    /// The task whose first status names the container.
    pub task_id: String,
    /// That task's name.
    pub task_name: String,
    /// Its framework's role.
    pub role: String,
    /// The executor's labels, but the Cosmos bookkeeping ones.
    pub labels: BTreeMap<String, String>,
    /// The container's `mem_limit_bytes`, which stays as it is.
    pub mem_limit_bytes: f64,
}

/// Every container of the agent at `url` (`http://host:port`) whose task
/// `/state` names, by container id.
pub async fn agent_tasks(url: &str) -> BTreeMap<String, AgentTask> {
    let get = |path: &str| {
        let url = format!("{url}{path}");
        async move {
            reqwest::get(url)
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let state = get("/state").await;
    let containers = get("/containers").await;
    let mut out = BTreeMap::new();
    for entry in containers.as_array().unwrap() {
        let container = entry["container_id"].as_str().unwrap();
        for framework in state["frameworks"].as_array().unwrap() {
            for executor in framework["executors"].as_array().unwrap() {
                for task in executor["tasks"].as_array().unwrap() {
                    if task["statuses"][0]["container_status"]["container_id"]["value"] != container
                    {
                        continue;
                    }
                    let labels = executor["labels"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|l| {
                            (
                                l["key"].as_str().unwrap().to_owned(),
                                l["value"].as_str().unwrap().to_owned(),
                            )
                        })
                        .filter(|(k, _)| {
                            !k.starts_with("DCOS_PACKAGE_") && k != "DCOS_SERVICE_PORT_INDEX"
                        })
                        .collect();
                    out.insert(
                        container.to_owned(),
                        AgentTask {
                            framework_id: framework["id"].as_str().unwrap().to_owned(),
                            executor_id: executor["id"].as_str().unwrap().to_owned(),
                            task_id: task["id"].as_str().unwrap().to_owned(),
                            task_name: task["name"].as_str().unwrap().to_owned(),
                            role: framework["role"].as_str().unwrap().to_owned(),
                            labels,
                            mem_limit_bytes: entry["statistics"]["mem_limit_bytes"]
                                .as_f64()
                                .unwrap(),
                        },
                    );
                }
            }
        }
    }
    out
}

/// A PromQL selector: `name` with `labels` matched exactly.
pub fn selector(name: &str, labels: &[(&str, &str)]) -> String {
    let labels: Vec<String> = std::iter::once(("__name__", name))
        .chain(labels.iter().copied())
        .map(|(k, v)| format!("{k}={}", Value::from(v)))
        .collect();
    format!("{{{}}}", labels.join(","))
}

/// The value of an instant query's only sample.
pub fn only_value(result: &[Value]) -> Option<f64> {
    match result {
        [sample] => sample["value"][1].as_str()?.parse().ok(),
        _ => None,
    }
}

/// The node's memory as the kernel says it (`MemTotal`), in bytes: what
/// `memory.total` must be.
pub fn mem_total_bytes() -> f64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024.0
}

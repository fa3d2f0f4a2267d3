//! A real Prometheus server (Debian's `prometheus` package, installed by
//! `scripts/test`) that scrapes given targets every second, and its query
//! API, which the Docker tier also asks when Prometheus runs in a
//! container.

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
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: collector\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
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

    /// An instant query's result vector (see [`query`]).
    pub async fn query(&self, query: &str) -> Vec<Value> {
        self::query(&format!("http://{}", self.addr), query).await
    }
}

/// An instant query's result vector, asked of the Prometheus at `base`
/// (`http://host:port`); empty when it does not answer.
pub async fn query(base: &str, query: &str) -> Vec<Value> {
    let encoded: String = query
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let Ok(response) = reqwest::get(format!("{base}/api/v1/query?query={encoded}")).await else {
        return Vec::new();
    };
    let answer: Value = response.json().await.unwrap_or_default();
    answer["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
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

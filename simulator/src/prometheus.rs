//! A real Prometheus server in the cluster (Debian's `prometheus`, in the
//! `metrics-collector/prometheus` image, which has no shell): `simulator
//! prometheus` writes its configuration and becomes it; and what the
//! verifier asks of it through its query API.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::producer::PRODUCER_TAG;

/// Prometheus's configuration: one job, `collector`, scraping `targets`
/// (`HOST:PORT`) every `interval`.
pub fn config(targets: &[String], interval: Duration) -> String {
    let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    let secs = interval.as_secs().max(1);
    format!(
        "global:\n  scrape_interval: {secs}s\n  scrape_timeout: {secs}s\nscrape_configs:\n  - job_name: collector\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    )
}

/// Writes the configuration into `data` and runs `binary` on it in this
/// process's place (so that the container's signals reach Prometheus);
/// returns only when that fails.
pub fn exec(
    binary: &Path,
    targets: &[String],
    interval: Duration,
    listen: &str,
    data: &Path,
) -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    let file = data.join("prometheus.yml");
    if let Err(error) = std::fs::write(&file, config(targets, interval)) {
        return anyhow::anyhow!("{}: {error}", file.display());
    }
    let error = std::process::Command::new(binary)
        .arg(format!("--config.file={}", file.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            data.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .exec();
    anyhow::anyhow!("{}: {error}", binary.display())
}

/// One module producer's series in Prometheus.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProducerSeries {
    /// Series with its `sim_producer` label.
    pub series: u64,
    /// The largest value among them: the producer's values count up, so
    /// this is its latest datapoint Prometheus has.
    pub newest: f64,
}

/// What Prometheus's query API says of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrometheusSeen {
    /// `up` per scraped target (`instance`).
    pub up: BTreeMap<String, f64>,
    /// Per module producer (`sim_producer`).
    pub producers: BTreeMap<String, ProducerSeries>,
    /// Whether the query API answered.
    pub answered: bool,
}

/// An instant query's result vector, asked of the Prometheus at `base`
/// (`http://host:port`); `None` when it does not answer.
pub async fn query(http: &reqwest::Client, base: &str, query: &str) -> Option<Vec<Value>> {
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
    let answer: Value = http
        .get(format!("{base}/api/v1/query?query={encoded}"))
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .json()
        .await
        .ok()?;
    answer["data"]["result"].as_array().cloned()
}

/// `(label value, sample value)` of each sample of `result`.
fn by_label<'r>(result: &'r [Value], label: &str) -> impl Iterator<Item = (String, f64)> + 'r {
    let label = label.to_owned();
    result.iter().filter_map(move |sample| {
        let key = sample["metric"][&label].as_str()?.to_owned();
        let value = sample["value"][1].as_str()?.parse().ok()?;
        Some((key, value))
    })
}

/// Asks the Prometheus at `base` for `up` and every module producer's
/// series.
pub async fn seen(http: &reqwest::Client, base: &str) -> PrometheusSeen {
    let mut seen = PrometheusSeen::default();
    let Some(up) = query(http, base, "up").await else {
        return seen;
    };
    seen.answered = true;
    seen.up = by_label(&up, "instance").collect();
    let selector = format!("{{{PRODUCER_TAG}!=\"\"}}");
    let counts = query(
        http,
        base,
        &format!("count by ({PRODUCER_TAG}) ({selector})"),
    )
    .await
    .unwrap_or_default();
    let newest = query(http, base, &format!("max by ({PRODUCER_TAG}) ({selector})"))
        .await
        .unwrap_or_default();
    for (producer, count) in by_label(&counts, PRODUCER_TAG) {
        seen.producers.entry(producer).or_default().series = count as u64;
    }
    for (producer, value) in by_label(&newest, PRODUCER_TAG) {
        seen.producers.entry(producer).or_default().newest = value;
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration is what `promtool check config` accepts (Debian's
    /// `prometheus` package, which `scripts/test` installs).
    #[test]
    fn promtool_accepts_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("prometheus.yml");
        std::fs::write(
            &file,
            config(
                &["node-1:61091".into(), "node-2:61091".into()],
                Duration::from_secs(5),
            ),
        )
        .unwrap();
        let out = std::process::Command::new("promtool")
            .args(["check", "config"])
            .arg(&file)
            .output()
            .expect("promtool (Debian's prometheus package; scripts/test installs it)");
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

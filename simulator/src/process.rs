//! Running the collector binary as a child process, as an operator would,
//! and reading its memory and CPU from /proc.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};

/// The collector binary next to this executable (same cargo profile).
pub fn sibling_collector() -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    me.with_file_name("collector")
}

/// The last line the collector logs: its final counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FinalCounts {
    /// Datapoints received.
    pub received: u64,
    /// Datapoints delivered to Kafka.
    pub delivered: u64,
    /// Datapoints served without Kafka (`kafka = false`).
    pub served: u64,
    /// Datapoints dropped.
    pub dropped: u64,
    /// The buffer's high-water mark, bytes.
    pub buffer_high_water_bytes: u64,
}

/// A collector child process with JSON logs.
pub struct CollectorProcess {
    child: Child,
    /// Its TCP input.
    pub input: String,
    /// Its HTTP API.
    api: String,
    lines: mpsc::Receiver<String>,
    recent: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
}

impl CollectorProcess {
    /// Starts `binary` with `args` and waits for its start-up line.
    pub fn start(binary: &Path, args: &[String], env: &[(String, String)]) -> anyhow::Result<Self> {
        let mut child = Command::new(binary)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(["--log-format", "json"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stderr = child.stderr.take().context("collector stderr")?;
        let (tx, lines) = mpsc::channel();
        let recent = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        {
            let recent = recent.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(mut recent) = recent.lock() {
                        recent.push_back(line.clone());
                        if recent.len() > 40 {
                            recent.pop_front();
                        }
                    }
                    let _ = tx.send(line);
                }
            });
        }
        let input = loop {
            let line = lines
                .recv_timeout(Duration::from_secs(30))
                .with_context(|| {
                    let said: Vec<String> = recent
                        .lock()
                        .map(|r| r.iter().cloned().collect())
                        .unwrap_or_default();
                    format!(
                        "no start-up line from the collector; it said:\n{}",
                        said.join("\n")
                    )
                })?;
            if line.contains("Collector started") {
                let value: serde_json::Value = serde_json::from_str(&line)?;
                let addr = |key: &str| value[key].as_str().map(str::to_owned);
                break (
                    addr("input").context("input address")?,
                    addr("api").context("api address")?,
                );
            }
        };
        let (input, api) = input;
        Ok(Self {
            child,
            input,
            api,
            lines,
            recent,
        })
    }

    /// Datapoints the collector has received so far (its `/metrics`).
    pub fn received(&self) -> anyhow::Result<u64> {
        self.metric("collector_received_datapoints_total{")
    }

    /// The sum of the `/metrics` samples whose line starts with `prefix`
    /// (a name, with `{` to take every label set, or with its labels).
    pub fn metric(&self, prefix: &str) -> anyhow::Result<u64> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&self.api)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: collector\r\n\r\n")?;
        let mut body = String::new();
        stream.read_to_string(&mut body)?;
        Ok(body
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum())
    }

    /// The collector's last log lines, for error reports.
    pub fn recent_log(&self) -> String {
        self.recent
            .lock()
            .map(|r| r.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size now, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        rss_of(self.pid())
    }

    /// User + system CPU time so far (Linux clock ticks are 1/100 s).
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the whole line.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Duration::from_millis((ticks(11) + ticks(12)) * 10)
    }

    /// SIGTERM, then the final counts from its last log line.
    pub fn stop(mut self) -> anyhow::Result<FinalCounts> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let counts = loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(120))
                .context("collector final line")?;
            if line.contains("Collector stopped") {
                let value: serde_json::Value = serde_json::from_str(&line)?;
                let get = |k: &str| {
                    value[k]
                        .as_u64()
                        .with_context(|| format!("{k} in the collector's final line: {line}"))
                };
                break FinalCounts {
                    received: get("received")?,
                    delivered: get("delivered")?,
                    // Builds before `served` counted what the null sink
                    // took as delivered.
                    served: value["served"].as_u64().unwrap_or(0),
                    dropped: get("dropped")?,
                    buffer_high_water_bytes: get("buffer_high_water_bytes")?,
                };
            }
        };
        let exit = self.child.wait()?;
        if !exit.success() {
            bail!("collector exited with {exit}");
        }
        Ok(counts)
    }
}

impl Drop for CollectorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The resident set size of `pid` now, bytes (0 once it has exited).
pub(crate) fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

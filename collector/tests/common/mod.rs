//! What the tests of the `collector` and `sample-producer` binaries share:
//! starting one with its JSON log collected, its `/metrics`, and stopping it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // each test file uses a part

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn binary(name: &str) -> Command {
    let path = match name {
        "collector" => env!("CARGO_BIN_EXE_collector"),
        _ => env!("CARGO_BIN_EXE_sample-producer"),
    };
    let mut command = Command::new(path);
    // A clean environment, so that the host's variables can't leak in.
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    command
}

/// Runs `program` with `args` and `env` to its end: its exit code, stdout
/// and stderr.
pub fn output(program: &str, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let output = binary(program)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures")
            .join(path),
    )
    .unwrap()
}

/// Retries `condition` every 50 ms until it holds, or panics with `what`.
pub fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < PATIENCE,
            "not true after {PATIENCE:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A collector process, its JSON log collected as it runs.
pub struct Running {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
    pub input: SocketAddr,
    pub api: SocketAddr,
    pub partner: SocketAddr,
    /// The Prometheus listener, when on.
    pub prometheus: Option<SocketAddr>,
    /// The v0 metrics API (`IP:PORT` or `unix:PATH`), when on.
    pub metrics_api: Option<String>,
    /// The node-wide statsd listener (UDP), when on.
    pub statsd: Option<SocketAddr>,
}

/// The flags every test collector gets: ports chosen by the kernel, JSON
/// logs, no agent polling, no node metrics, the null sink (unless `args` says otherwise).
pub fn base_args() -> Vec<String> {
    [
        "--listen-endpoint=127.0.0.1:0",
        "--api-listen=127.0.0.1:0",
        "--partner-listen=127.0.0.1:0",
        "--log-format=json",
        "--agent-polling=false",
        "--node-metrics=false",
        "--kafka=false",
        "--input-limit-amount-kbytes=0",
        "--global-limit-amount-kbytes=0",
    ]
    .map(String::from)
    .to_vec()
}

/// Starts the collector with `args` (after [`base_args`]), under a
/// descriptor limit if one is given, and waits for its start-up line.
pub fn start(args: &[&str], nofile: Option<u32>) -> Running {
    start_with(args, nofile, &[])
}

/// [`start`], with `envs` set for the collector.
pub fn start_with(args: &[&str], nofile: Option<u32>, envs: &[(&str, String)]) -> Running {
    let key = |a: &str| a.split('=').next().unwrap_or(a).to_owned();
    let given: Vec<String> = args.iter().map(|a| key(a)).collect();
    let mut all: Vec<String> = base_args()
        .into_iter()
        .filter(|a| !given.contains(&key(a)))
        .collect();
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let mut command = match nofile {
        Some(limit) => {
            let mut command = binary("collector");
            let program = command.get_program().to_owned();
            let mut shell = Command::new("sh");
            shell
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .arg("-c")
                .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                .arg(program)
                .args(&all);
            command = shell;
            command
        }
        None => {
            let mut command = binary("collector");
            command.args(&all);
            command
        }
    };
    command.envs(envs.iter().map(|(k, v)| (*k, v)));
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("Collector started") {
                let _ = started_tx.send(line.clone());
            }
            sink.lock().unwrap().push(line);
        }
    });
    let line = started_rx
        .recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("no start-up line: {:?}", log.lock().unwrap()));
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addr = |key: &str| value[key].as_str().unwrap().parse().unwrap();
    Running {
        input: addr("input"),
        api: addr("api"),
        partner: addr("partner"),
        prometheus: value["prometheus"].as_str().and_then(|a| a.parse().ok()),
        metrics_api: value["metrics_api"]
            .as_str()
            .filter(|a| !a.is_empty())
            .map(str::to_owned),
        statsd: value["statsd"].as_str().and_then(|a| a.parse().ok()),
        child,
        log,
    }
}

/// A GET over plain HTTP/1.0: the status and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: collector\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A POST with an empty body over plain HTTP/1.0: the status.
pub fn http_post(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "POST {path} HTTP/1.0\r\nHost: collector\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

/// Descriptors a process has open, now.
pub fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Threads of a process, now.
pub fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

impl Drop for Running {
    fn drop(&mut self) {
        // A failed test must not leave its collector running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            * 1024
    }

    /// A counter or gauge from `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = http_get(self.api, "/metrics").unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    }

    /// A counter or gauge from `/metrics`, when the API answers.
    pub fn try_metric(&self, name: &str) -> Option<f64> {
        let (_, body) = http_get(self.api, "/metrics").ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
    }

    pub fn log_lines(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// SIGTERM; asserts it exits 0 with its final line balanced, and
    /// returns that line.
    pub fn stop_balanced(self) -> serde_json::Value {
        let (code, final_line) = self.stop();
        assert_eq!(code, Some(0), "{final_line}");
        assert!(balanced(&final_line), "{final_line}");
        final_line
    }

    /// SIGTERM, then the exit code and the final line.
    pub fn stop(mut self) -> (Option<i32>, serde_json::Value) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let code = self.child.wait().unwrap().code();
        // The reader thread sees the pipe close after the process exits.
        let mut last = None;
        eventually("the final line", || {
            last = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains("Collector stopped"))
                .cloned();
            last.is_some()
        });
        (code, serde_json::from_str(&last.unwrap()).unwrap())
    }
}

/// Each sample of a Prometheus text, by its name and labels as written.
pub fn prometheus_samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// A systemd unit's (or drop-in's) `Environment=` settings.
pub fn unit_environment(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Whether the final line balances: received + replayed = delivered +
/// served + dropped + spooled.
pub fn balanced(last: &serde_json::Value) -> bool {
    let n = |k: &str| last[k].as_u64().unwrap();
    n("received") + n("replayed") == n("delivered") + n("served") + n("dropped") + n("spooled")
}

/// Starts a server from Debian's packages (Prometheus, the node exporter)
/// told to listen on port 0, and returns it with the address it logged
/// (`msg="Listening on" address=…`). `what` names its package, for the
/// message when it is missing.
pub fn spawn_listening(mut command: Command, what: &str) -> (Child, SocketAddr) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what} (Debian's package; scripts/test installs it): {e}"));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("msg=\"Listening on\"")
                && let Some(addr) = line.rsplit("address=").next()
            {
                let _ = tx.send(addr.trim().to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("{what} did not say where it listens"))
        .parse()
        .unwrap();
    (child, addr)
}

/// Runs `promtool check metrics` on `text`: its exit code and output.
pub fn promtool(text: &str) -> (i32, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

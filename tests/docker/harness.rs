//! A cluster of containers for the Docker tier: Mesos-DNS, the Kafka
//! scheduler, tansu (a real Kafka-protocol broker), and agent nodes, each
//! with its agent emulator, collector, module producers and
//! sample-producer, plus the verifier. The same topology as
//! `docker-compose.yml`.
//!
//! Containers are driven through the `docker` CLI, in the way
//! testcontainers' CLI client works: testcontainers-rs ≥ 0.16 speaks Docker
//! API ≥ 1.44 through bollard, which this machine's Engine 20.10 (API 1.41)
//! refuses ("client version 1.53 is too new"), and 0.15's CLI client cannot
//! start a container in another's network namespace (it tries to create a
//! network named `container:…`). Every container and network is labelled
//! and removed on drop, and leftovers of an interrupted run are removed
//! before a cluster starts.
//!
//! Each node is one network namespace, owned by its agent emulator's
//! container: the collector, the module producers and the sample-producer
//! join it, so they reach each other on 127.0.0.1 as on a real agent, and a
//! collector restarts without taking its producers' network away.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use simulator::cluster::ClusterReport;

const LABEL: &str = "metrics-collector-test=1";
const TOKEN: &str = "docker-tier-token";

/// Runs `docker ARGS`; stdout, or the error with stderr.
pub fn docker(args: &[&str]) -> Result<String, String> {
    let output = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker {}: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) -> String {
    docker(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Removes what an interrupted run left behind.
pub fn remove_leftovers() {
    let filter = format!("label={LABEL}");
    let containers = docker(&["ps", "-aq", "--filter", &filter]).unwrap_or_default();
    for id in containers.split_whitespace() {
        let _ = docker(&["rm", "-f", "-v", id]);
    }
    let networks = docker(&["network", "ls", "-q", "--filter", &filter]).unwrap_or_default();
    for id in networks.split_whitespace() {
        let _ = docker(&["network", "rm", id]);
    }
}

/// A container, removed on drop.
pub struct Container {
    /// Its name.
    pub name: String,
}

impl Container {
    fn run(name: &str, options: &[&str], image: &str, args: &[&str]) -> Self {
        let mut all = vec!["run", "-d", "--name", name, "--label", LABEL];
        all.extend_from_slice(options);
        all.push(image);
        all.extend_from_slice(args);
        must(&all);
        Self {
            name: name.to_owned(),
        }
    }

    /// Its IP address on `network`.
    pub fn ip(&self, network: &str) -> String {
        must(&[
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
            &self.name,
        ])
    }

    /// Everything it printed, stdout and stderr.
    pub fn logs(&self) -> String {
        let output = Command::new("docker")
            .args(["logs", &self.name])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            });
        output.unwrap_or_else(|e| e.to_string())
    }

    /// Whether it is running.
    pub fn running(&self) -> bool {
        docker(&["inspect", "-f", "{{.State.Running}}", &self.name]).is_ok_and(|s| s == "true")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.name]);
    }
}

/// A network, removed on drop (after the containers, which are dropped
/// first as fields of [`Cluster`] declared before it).
pub struct Network {
    /// Its name.
    pub name: String,
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker(&["network", "rm", &self.name]);
    }
}

/// One agent node.
pub struct Node {
    /// 1-based.
    pub index: usize,
    /// Owns the node's network namespace.
    pub agent: Container,
    /// The collector.
    pub collector: Container,
    /// The module producers (control API on :9100).
    pub producers: Container,
    /// The sample-producer.
    pub sample: Container,
    /// A garbage producer, when asked for.
    pub garbage: Option<Container>,
}

/// What a cluster is made of.
pub struct Spec {
    /// Agent nodes.
    pub nodes: usize,
    /// Module producers per node.
    pub producers_per_node: usize,
    /// Datapoints per second, per producer.
    pub rate: f64,
    /// A second broker, idle at first, for the brokers to move to.
    pub spare_broker: bool,
    /// A garbage producer on node 1.
    pub garbage_on_node_1: bool,
    /// Idempotent Kafka producers (the default). tansu 0.6 with sqlite
    /// storage panics when an idempotent producer outlives a broker restart
    /// (README, "Known limits").
    pub idempotence: bool,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            nodes: 3,
            producers_per_node: 2,
            rate: 200.0,
            spare_broker: false,
            garbage_on_node_1: false,
            idempotence: true,
        }
    }
}

/// A running cluster. Field order is drop order: containers, then the
/// network.
pub struct Cluster {
    /// The verifier (report on :9200).
    pub verifier: Container,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// Mesos-DNS, at a fixed address.
    pub dns: Container,
    /// The Kafka scheduler (:7000).
    pub scheduler: Container,
    /// The broker, `tansu:9092`.
    pub broker: Container,
    /// The spare broker, `tansu-b:9092`.
    pub spare: Option<Container>,
    /// The network.
    pub network: Network,
    http: reqwest::Client,
    started: Instant,
}

fn images_present() {
    for image in [
        "metrics-collector/collector:local",
        "metrics-collector/simulator:local",
        "metrics-collector/tansu:local",
    ] {
        if docker(&["image", "inspect", "-f", "{{.Id}}", image]).is_err() {
            panic!("image {image} is missing: run scripts/build-images first");
        }
    }
}

/// How long the Docker tier waits for a condition: containers take seconds
/// where in-process fakes take milliseconds, so four times the suite's
/// patience (`RUST_TEST_PATIENCE_MS`; 120 s by default).
pub fn docker_patience() -> Duration {
    e2e::patience() * 4
}

/// Polls `check` every 250 ms until it returns `Some`, or `None` after
/// `timeout`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn tansu_args(advertised: &str) -> Vec<String> {
    [
        "broker",
        "--listener-url",
        "tcp://0.0.0.0:9092",
        "--advertised-listener-url",
        &format!("tcp://{advertised}:9092"),
        "--storage-engine",
        "sqlite:///data/tansu.db",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Cluster {
    /// Starts a cluster named `name` on subnet 10.231.`subnet`.0/24 and waits
    /// until every part answers.
    pub async fn start(name: &str, subnet: u8, spec: Spec) -> Self {
        images_present();
        remove_leftovers();
        let started = Instant::now();
        let prefix = format!("mct-{name}");
        let net = prefix.clone();
        must(&[
            "network",
            "create",
            "--label",
            LABEL,
            "--subnet",
            &format!("10.231.{subnet}.0/24"),
            &net,
        ]);
        let network = Network { name: net.clone() };
        let dns_ip = format!("10.231.{subnet}.53");
        let on = |alias: &str| -> Vec<String> {
            vec![
                "--network".into(),
                net.clone(),
                "--network-alias".into(),
                alias.into(),
                "--hostname".into(),
                alias.into(),
            ]
        };
        let run = |name: &str, options: Vec<String>, image: &str, args: Vec<String>| {
            let options: Vec<&str> = options.iter().map(String::as_str).collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Container::run(name, &options, image, &args)
        };
        let simulator = "metrics-collector/simulator:local";
        let collector_image = "metrics-collector/collector:local";
        let s = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };

        let broker = run(
            &format!("{prefix}-tansu"),
            on("tansu"),
            "metrics-collector/tansu:local",
            tansu_args("tansu"),
        );
        let spare = spec.spare_broker.then(|| {
            run(
                &format!("{prefix}-tansu-b"),
                on("tansu-b"),
                "metrics-collector/tansu:local",
                tansu_args("tansu-b"),
            )
        });
        let scheduler = run(
            &format!("{prefix}-scheduler"),
            on("kafka-scheduler"),
            simulator,
            s(&[
                "scheduler",
                "--listen",
                "0.0.0.0:7000",
                "--brokers",
                "tansu:9092",
            ]),
        );
        let mut dns_options = on("mesos-dns");
        dns_options.extend(s(&["--ip", &dns_ip]));
        let dns = run(
            &format!("{prefix}-dns"),
            dns_options,
            simulator,
            s(&[
                "dns",
                "--listen",
                "0.0.0.0:53",
                "--scheduler",
                "kafka-scheduler:7000",
            ]),
        );

        let mut nodes = Vec::new();
        for index in 1..=spec.nodes {
            let node = format!("node-{index}");
            let agent = run(
                &format!("{prefix}-{node}"),
                on(&node),
                simulator,
                s(&["agent", "--listen", "0.0.0.0:5051", "--containers", "3"]),
            );
            let joined = s(&["--network", &format!("container:{prefix}-{node}")]);
            let idempotence = format!("enable.idempotence={}", spec.idempotence);
            let collector = run(
                &format!("{prefix}-{node}-collector"),
                joined.clone(),
                collector_image,
                s(&[
                    "--kafka-framework",
                    "kafka",
                    "--dns-server",
                    &format!("{dns_ip}:53"),
                    "--kafka-rediscover-secs",
                    "10",
                    "--api-listen",
                    "0.0.0.0:8123",
                    "--api-token",
                    TOKEN,
                    "--agent-url",
                    "http://127.0.0.1:5051",
                    "--agent-poll-period",
                    "5",
                    "--static-tag",
                    &format!("node={node}"),
                    // tansu 0.6 with sqlite storage cannot serve
                    // snappy-compressed batches (README, "Known limits").
                    "--kafka-compress-snappy",
                    "false",
                    "--librdkafka",
                    "compression.codec=lz4",
                    "--librdkafka",
                    &idempotence,
                ]),
            );
            let producers = run(
                &format!("{prefix}-{node}-producers"),
                joined.clone(),
                simulator,
                s(&[
                    "producers",
                    "--collector",
                    "127.0.0.1:8124",
                    "--count",
                    &spec.producers_per_node.to_string(),
                    "--rate",
                    &spec.rate.to_string(),
                    "--id",
                    &node,
                    "--listen",
                    "0.0.0.0:9100",
                ]),
            );
            let mut sample_options = joined.clone();
            sample_options.extend(s(&["--entrypoint", "/bin/sample-producer"]));
            let sample = run(
                &format!("{prefix}-{node}-sample"),
                sample_options,
                collector_image,
                s(&[
                    "-framework",
                    "kafka",
                    "-dns-server",
                    &format!("{dns_ip}:53"),
                    "-agent-url",
                    "http://127.0.0.1:5051",
                    "-period",
                    "5",
                    "-compression",
                    "lz4",
                    "-librdkafka",
                    &idempotence,
                ]),
            );
            let garbage = (spec.garbage_on_node_1 && index == 1).then(|| {
                run(
                    &format!("{prefix}-{node}-garbage"),
                    joined.clone(),
                    simulator,
                    s(&[
                        "garbage",
                        "--collector",
                        "127.0.0.1:8124",
                        "--every",
                        "500ms",
                    ]),
                )
            });
            nodes.push(Node {
                index,
                agent,
                collector,
                producers,
                sample,
                garbage,
            });
        }

        let mut verify = s(&["verify", "--brokers", "tansu:9092"]);
        if spare.is_some() {
            verify.extend(s(&["--brokers", "tansu-b:9092"]));
        }
        for index in 1..=spec.nodes {
            verify.extend(s(&[
                "--producers",
                &format!("http://node-{index}:9100"),
                "--metrics",
                &format!("http://node-{index}:8123/metrics"),
            ]));
        }
        verify.extend(s(&["--listen", "0.0.0.0:9200", "--interval", "5s"]));
        let verifier = run(
            &format!("{prefix}-verifier"),
            on("verifier"),
            simulator,
            verify,
        );

        let cluster = Self {
            verifier,
            nodes,
            dns,
            scheduler,
            broker,
            spare,
            network,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            started,
        };
        cluster.wait_ready().await;
        cluster
    }

    async fn wait_ready(&self) {
        let timeout = docker_patience();
        for node in &self.nodes {
            let health = format!("http://{}:8123/health", self.node_ip(node.index));
            self.eventually(
                timeout,
                &format!("collector on node-{} healthy", node.index),
                || {
                    let health = health.clone();
                    async move {
                        let response = self.http.get(&health).send().await.ok()?;
                        response.status().is_success().then_some(())
                    }
                },
            )
            .await;
        }
        self.eventually(timeout, "datapoints from every node in Kafka", || async {
            let report = self.try_report().await?;
            let nodes_seen = (1..=self.nodes.len())
                .filter(|i| {
                    let prefix = format!("node-{i}-");
                    report
                        .seen
                        .producers
                        .iter()
                        .any(|(id, a)| id.starts_with(&prefix) && a.datapoints > 0)
                })
                .count();
            (nodes_seen == self.nodes.len()).then_some(())
        })
        .await;
        println!(
            "[{:>5.1}s] cluster up: {} nodes, every node's datapoints arriving",
            self.started.elapsed().as_secs_f64(),
            self.nodes.len()
        );
    }

    /// Polls `check` until it returns `Some`; after `timeout`, prints every
    /// container's last log lines and fails.
    pub async fn eventually<T, F, Fut>(&self, timeout: Duration, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        match poll_until(timeout, check).await {
            Some(value) => value,
            None => {
                self.dump_logs();
                panic!("{what}: not within {timeout:?}");
            }
        }
    }

    /// Seconds since start, for the log lines.
    pub fn log(&self, what: &str) {
        println!("[{:>5.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// A node's current IP (it can change after a network reconnect).
    pub fn node_ip(&self, index: usize) -> String {
        self.nodes[index - 1].agent.ip(&self.network.name)
    }

    /// The verifier's report, if it answers.
    pub async fn try_report(&self) -> Option<ClusterReport> {
        let url = format!(
            "http://{}:9200/report",
            self.verifier.ip(&self.network.name)
        );
        self.http.get(url).send().await.ok()?.json().await.ok()
    }

    /// Lets the load run for `duration` (a fixed stretch of load, not a wait
    /// for a condition), logging the verifier's summary every 5 s.
    pub async fn run_for(&self, duration: Duration) {
        let end = Instant::now() + duration;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(5).min(end - Instant::now())).await;
            if let Some(report) = self.try_report().await {
                self.log(&report.summary());
            }
        }
    }

    /// Stops every node's producers (they flush what they hold) and waits
    /// until the verifier's balance holds: every generated datapoint is in
    /// Kafka or counted as dropped. Returns the final report.
    pub async fn finish(&self) -> ClusterReport {
        for node in &self.nodes {
            let url = format!("http://{}:9100/stop", self.node_ip(node.index));
            let response = self.http.post(&url).send().await;
            assert!(
                response.as_ref().is_ok_and(|r| r.status().is_success()),
                "stopping node-{}'s producers: {response:?}",
                node.index
            );
        }
        self.log("producers stopped; waiting for the balance");
        let patience = docker_patience();
        let deadline = Instant::now() + patience;
        loop {
            let report = self.try_report().await;
            match report {
                Some(report) if report.conservation.holds => {
                    self.log(&format!("final: {}", report.summary()));
                    return report;
                }
                Some(report) if Instant::now() > deadline => {
                    self.dump_logs();
                    panic!(
                        "conservation does not hold after {patience:?}: {}\nfailures: {:?}",
                        report.summary(),
                        report.conservation.failures
                    );
                }
                None if Instant::now() > deadline => {
                    self.dump_logs();
                    panic!("the verifier does not answer");
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// Prints every container's last log lines (for a failing run).
    pub fn dump_logs(&self) {
        let mut all: BTreeMap<&str, String> = BTreeMap::new();
        all.insert(&self.verifier.name, self.verifier.logs());
        all.insert(&self.broker.name, self.broker.logs());
        all.insert(&self.dns.name, self.dns.logs());
        all.insert(&self.scheduler.name, self.scheduler.logs());
        for node in &self.nodes {
            all.insert(&node.collector.name, node.collector.logs());
            all.insert(&node.producers.name, node.producers.logs());
            all.insert(&node.sample.name, node.sample.logs());
            if let Some(garbage) = &node.garbage {
                all.insert(&garbage.name, garbage.logs());
            }
        }
        for (name, logs) in all {
            let lines: Vec<&str> = logs.lines().collect();
            println!("---- {name} (last 15 lines)");
            for line in &lines[lines.len().saturating_sub(15)..] {
                println!("  {line}");
            }
        }
    }
}

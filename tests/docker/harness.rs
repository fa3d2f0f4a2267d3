//! A cluster of containers for the Docker tier: Mesos-DNS, the Kafka
//! scheduler, tansu (a real Kafka-protocol broker), and agent nodes, each
//! with its agent emulator, collector, module producers and
//! sample-producer, plus the verifier: the topology of
//! `e2e::topology`, which `docker-compose.yml` is rendered from.
//!
//! Containers run through testcontainers (0.28, on bollard 0.21.1, which
//! speaks to this project's Docker Engine 20.10 at the engine's own API
//! version): it starts them, waits for their start-up log lines, captures
//! their logs, and removes them on drop. What is ours: the topology, one
//! labelled network per cluster (created and removed here, through
//! bollard), and removing what an interrupted run left behind, by label.
//!
//! Each node is one network namespace, owned by its agent emulator's
//! container: the collector, the module producers and the sample-producer
//! join it (`container:<id>`), so they reach each other on 127.0.0.1 as on
//! a real agent, and a collector restarts without taking its producers'
//! network away. Containers are named after the cluster (`mct-<name>-…`)
//! and address each other by those names on the cluster's network.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{NetworkConnectRequest, NetworkCreateRequest, NetworkDisconnectRequest};
use bollard::query_parameters::{
    ListContainersOptionsBuilder, ListNetworksOptionsBuilder, RemoveContainerOptionsBuilder,
};
use e2e::topology::{Broker, Image, Kind, Mount, Place, Topology};
use simulator::cluster::ClusterReport;
use testcontainers::core::WaitFor;
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

const LABEL: (&str, &str) = ("metrics-collector-test", "1");
const TOKEN: &str = "docker-tier-token";
const TAG: &str = "local";

fn docker() -> Docker {
    Docker::connect_with_local_defaults().expect("the Docker socket")
}

fn label_filter() -> HashMap<&'static str, Vec<String>> {
    HashMap::from([("label", vec![format!("{}={}", LABEL.0, LABEL.1)])])
}

/// Removes what an interrupted run left behind: every labelled container,
/// then every labelled network.
pub async fn remove_leftovers() {
    let docker = docker();
    let containers = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&label_filter())
                .build(),
        ))
        .await
        .unwrap_or_default();
    for id in containers.into_iter().filter_map(|c| c.id) {
        let _ = docker
            .remove_container(
                &id,
                Some(
                    RemoveContainerOptionsBuilder::default()
                        .force(true)
                        .v(true)
                        .build(),
                ),
            )
            .await;
    }
    let networks = docker
        .list_networks(Some(
            ListNetworksOptionsBuilder::default()
                .filters(&label_filter())
                .build(),
        ))
        .await
        .unwrap_or_default();
    for name in networks.into_iter().filter_map(|n| n.name) {
        let _ = docker.remove_network(&name).await;
    }
}

/// One container of the cluster, removed on drop (by testcontainers).
pub struct Container {
    /// Its name, which is also how the others address it.
    pub name: String,
    network: String,
    /// The container whose network namespace it joined, if it did.
    owner: Option<String>,
    inner: ContainerAsync<GenericImage>,
}

/// A topology mount as Docker's: a volume is anonymous (removed with its
/// container), a tmpfs has its size.
fn docker_mount(mount: &Mount) -> bollard::models::Mount {
    use bollard::models::{MountTmpfsOptions, MountType as MountTypeEnum};
    match mount {
        Mount::Volume { path, .. } => bollard::models::Mount {
            target: Some((*path).to_owned()),
            typ: Some(MountTypeEnum::VOLUME),
            ..Default::default()
        },
        Mount::Tmpfs { path, bytes } => bollard::models::Mount {
            target: Some((*path).to_owned()),
            typ: Some(MountTypeEnum::TMPFS),
            tmpfs_options: Some(MountTmpfsOptions {
                size_bytes: i64::try_from(*bytes).ok(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Mount::Shared { .. } => unreachable!("made a host directory by Cluster::start"),
        Mount::Bind {
            host,
            path,
            read_only,
        } => bollard::models::Mount {
            source: Some(host.clone()),
            target: Some((*path).to_owned()),
            typ: Some(MountTypeEnum::BIND),
            read_only: Some(*read_only),
            ..Default::default()
        },
    }
}

/// How a container joins the cluster.
enum Join<'a> {
    /// The cluster's network, under its own name.
    Network(&'a str),
    /// Another container's network namespace.
    Namespace(&'a Container),
}

impl Container {
    async fn run(
        name: String,
        join: Join<'_>,
        image: &str,
        entrypoint: Option<&str>,
        args: Vec<String>,
        ready: Option<&str>,
        mounts: &[Mount],
    ) -> Self {
        let mounts: Vec<bollard::models::Mount> = mounts.iter().map(docker_mount).collect();
        let mut image = GenericImage::new(image, TAG);
        if let Some(entrypoint) = entrypoint {
            image = image.with_entrypoint(entrypoint);
        }
        if let Some(line) = ready {
            image = image.with_wait_for(WaitFor::message_on_either_std(line));
        }
        let request = image
            .with_cmd(args)
            .with_container_name(&name)
            .with_label(LABEL.0, LABEL.1)
            .with_startup_timeout(docker_patience());
        let owner = match &join {
            Join::Network(_) => None,
            Join::Namespace(owner) => Some(owner.name.clone()),
        };
        let (network, request) = match join {
            Join::Network(network) => (
                network.to_owned(),
                request
                    .with_network(network)
                    .with_hostname(&name)
                    .with_host_config_modifier(move |host| {
                        if !mounts.is_empty() {
                            host.mounts = Some(mounts.clone());
                        }
                    }),
            ),
            // Set in the host config rather than through `with_network`,
            // which would also create a bridge network of that literal
            // name; and without the port publishing a namespace member
            // may not have.
            Join::Namespace(owner) => {
                let mode = format!("container:{}", owner.inner.id());
                (
                    owner.network.clone(),
                    request.with_host_config_modifier(move |host| {
                        host.network_mode = Some(mode.clone());
                        host.publish_all_ports = Some(false);
                        host.port_bindings = None;
                        if !mounts.is_empty() {
                            host.mounts = Some(mounts.clone());
                        }
                    }),
                )
            }
        };
        let inner = request
            .start()
            .await
            .unwrap_or_else(|error| panic!("starting {name}: {error}"));
        Self {
            name,
            network,
            owner,
            inner,
        }
    }

    /// Its IP address on the cluster's network (a namespace's owner's).
    pub async fn ip(&self) -> String {
        let details = docker()
            .inspect_container(self.owner.as_deref().unwrap_or(&self.name), None)
            .await
            .unwrap_or_else(|error| panic!("inspecting {}: {error}", self.name));
        details
            .network_settings
            .and_then(|settings| settings.networks)
            .and_then(|mut networks| networks.remove(&self.network))
            .and_then(|endpoint| endpoint.ip_address)
            .unwrap_or_else(|| panic!("{} has no address on {}", self.name, self.network))
    }

    /// Everything it printed, stdout and stderr.
    pub async fn logs(&self) -> String {
        let stdout = self.inner.stdout_to_vec().await.unwrap_or_default();
        let stderr = self.inner.stderr_to_vec().await.unwrap_or_default();
        format!(
            "{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        )
    }

    /// Whether it is running.
    pub async fn running(&self) -> bool {
        self.inner.is_running().await.unwrap_or(false)
    }

    /// Stops it: SIGTERM, then SIGKILL after `grace_secs`.
    pub async fn stop(&self, grace_secs: i32) {
        self.inner
            .stop_with_timeout(Some(grace_secs))
            .await
            .unwrap_or_else(|error| panic!("stopping {}: {error}", self.name));
    }

    /// SIGKILL: no grace, no final line.
    pub async fn kill(&self) {
        docker()
            .kill_container(
                &self.name,
                Some(
                    bollard::query_parameters::KillContainerOptionsBuilder::default()
                        .signal("SIGKILL")
                        .build(),
                ),
            )
            .await
            .unwrap_or_else(|error| panic!("killing {}: {error}", self.name));
        e2e::poll_until(docker_patience(), POLL, || async {
            (!self.running().await).then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("{} still runs after SIGKILL", self.name));
    }

    /// Starts it again.
    pub async fn start(&self) {
        self.inner
            .start()
            .await
            .unwrap_or_else(|error| panic!("starting {} again: {error}", self.name));
    }
}

/// The cluster's network, removed on drop, after the containers (which
/// are dropped first, as fields of [`Cluster`] declared before it).
pub struct Network {
    /// Its name.
    pub name: String,
}

impl Network {
    async fn create(name: &str) -> Self {
        docker()
            .create_network(NetworkCreateRequest {
                name: name.to_owned(),
                labels: Some(HashMap::from([(LABEL.0.to_owned(), LABEL.1.to_owned())])),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|error| panic!("creating network {name}: {error}"));
        Self {
            name: name.to_owned(),
        }
    }

    /// Cuts `container` (a namespace's owner) off the network.
    pub async fn disconnect(&self, container: &Container) {
        docker()
            .disconnect_network(
                &self.name,
                NetworkDisconnectRequest {
                    container: container.name.clone(),
                    force: Some(true),
                },
            )
            .await
            .unwrap_or_else(|error| panic!("disconnecting {}: {error}", container.name));
    }

    /// Connects `container` again.
    pub async fn connect(&self, container: &Container) {
        docker()
            .connect_network(
                &self.name,
                NetworkConnectRequest {
                    container: container.name.clone(),
                    endpoint_config: None,
                },
            )
            .await
            .unwrap_or_else(|error| panic!("connecting {}: {error}", container.name));
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the tests' runtime: remove from a thread of its
        // own, and wait for it.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let _ = docker().remove_network(&name).await;
            });
        })
        .join();
    }
}

/// One agent node. Field order is drop order: the containers that join
/// the node's namespace before its owner.
pub struct Node {
    /// 1-based.
    pub index: usize,
    /// The collector.
    pub collector: Container,
    /// The module producers (control API on :9100).
    pub producers: Container,
    /// The sample-producer.
    pub sample: Container,
    /// A garbage producer, when asked for.
    pub garbage: Option<Container>,
    /// DC/OS 1.12's module, on the topology's 1.12 node.
    pub module: Option<Container>,
    /// Owns the node's network namespace.
    pub agent: Container,
}

/// Makes the secured cluster's SCRAM user in the setup broker: tansu's own
/// CLI, run in its container, retried until the broker answers.
async fn make_users(setup: &Container, topology: &Topology) {
    use bollard::exec::{CreateExecOptions, StartExecResults};
    let secured = topology.secured.as_ref().expect("a secured topology");
    let password = std::fs::read_to_string(format!("{}/kafka-password", secured.secrets))
        .expect("the password file");
    let command = vec![
        "/bin/tansu".to_owned(),
        "user".into(),
        "create".into(),
        "--broker".into(),
        "tcp://127.0.0.1:9092".into(),
        secured.user.into(),
        password.trim_end().into(),
        "--mechanism".into(),
        "scram512".into(),
    ];
    let docker = docker();
    let made = e2e::poll_until(docker_patience(), POLL, || {
        let (docker, command) = (docker.clone(), command.clone());
        async move {
            let exec = docker
                .create_exec(
                    &setup.name,
                    CreateExecOptions {
                        cmd: Some(command),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        ..Default::default()
                    },
                )
                .await
                .ok()?;
            if let Ok(StartExecResults::Attached { mut output, .. }) =
                docker.start_exec(&exec.id, None).await
            {
                use futures::StreamExt as _;
                while output.next().await.is_some() {}
            }
            let inspected = docker.inspect_exec(&exec.id).await.ok()?;
            (inspected.exit_code == Some(0)).then_some(())
        }
    })
    .await;
    made.unwrap_or_else(|| panic!("no SCRAM user made in {}", setup.name));
}

/// Writes a secured cluster's files into `secrets` (see
/// `Secured::secrets`): a CA made now, certificates for the broker's TLS
/// port and the scheduler under their container names, the password, the
/// token, and stunnel's configuration.
pub fn write_secrets(secrets: &std::path::Path, cluster: &str, user_password: &str, token: &str) {
    use simulator::tls::{CertSpec, TestCa};
    let ca = TestCa::new("Docker tier CA").expect("a CA");
    ca.write(&secrets.join("ca.crt")).expect("ca.crt");
    for (service, file) in [("tansu", "tansu"), ("kafka-scheduler", "scheduler")] {
        let host = format!("mct-{cluster}-{service}");
        ca.issue(&CertSpec::server(&[&host]))
            .expect("a certificate")
            .write(secrets, file)
            .expect("certificate files");
    }
    std::fs::write(secrets.join("kafka-password"), format!("{user_password}\n")).unwrap();
    std::fs::write(secrets.join("token"), format!("{token}\n")).unwrap();
    std::fs::write(
        secrets.join("stunnel.conf"),
        format!(
            "foreground = yes\npid =\nsyslog = no\n[kafka]\naccept = 0.0.0.0:9093\nconnect = 127.0.0.1:9092\ncert = {dir}/tansu.crt\nkey = {dir}/tansu.key\n",
            dir = e2e::topology::SECRETS_DIR
        ),
    )
    .unwrap();
}

/// The topology the scenarios start from: `docker-compose.yml`'s, with
/// the tests' API token and idempotent producers said explicitly.
pub fn topology() -> Topology {
    Topology {
        idempotence: Some(true),
        api_token: TOKEN,
        // Only the happy path asks Prometheus and runs DC/OS 1.12's module;
        // the others spare their CPU.
        prometheus: false,
        module_1_12_node: None,
        ..Topology::default()
    }
}

/// A running cluster. Field order is drop order: containers, then the
/// network.
pub struct Cluster {
    /// The verifier (report on :9200).
    pub verifier: Container,
    /// The Prometheus server scraping the collectors (:9090).
    pub prometheus: Option<Container>,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// Mesos-DNS.
    pub dns: Container,
    /// The Kafka scheduler (:7000).
    pub scheduler: Container,
    /// stunnel in the broker's namespace (:9093), in a secured cluster.
    pub tls: Option<Container>,
    /// The broker (:9092): tansu, or the embedded broker in node-1's
    /// namespace (its control API on :9300).
    pub broker: Container,
    /// The spare broker (:9092).
    pub spare: Option<Container>,
    /// The network.
    pub network: Network,
    /// The host directories behind the topology's shared volumes, removed
    /// after every container.
    _shared: tempfile::TempDir,
    http: reqwest::Client,
    started: Instant,
}

async fn images_present(topology: &Topology) {
    let docker = docker();
    let mut images = vec![Image::Collector, Image::Simulator];
    if topology.broker == Broker::Tansu {
        images.push(Image::Tansu);
    }
    if topology.secured.is_some() {
        images.push(Image::Stunnel);
    }
    if topology.prometheus {
        images.push(Image::Prometheus);
    }
    for image in images {
        let image = format!("{}:{TAG}", image.name());
        if docker.inspect_image(&image).await.is_err() {
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

/// How often the Docker tier polls a condition (containers, HTTP).
const POLL: Duration = Duration::from_millis(250);

impl Cluster {
    /// Starts `topology` as a cluster named `name`, on a network of its
    /// own, and waits until every part answers. Containers are named
    /// `mct-<name>-<service>` and reach each other by those names.
    pub async fn start(name: &str, topology: Topology) -> Self {
        images_present(&topology).await;
        remove_leftovers().await;
        let started = Instant::now();
        let prefix = format!("mct-{name}");
        let network = Network::create(&prefix).await;
        let host = |service: &str| format!("{prefix}-{service}");
        // The collectors are given Mesos-DNS's IP, known once it runs; no
        // service before it needs it.
        let mut dns_ip = String::from("0.0.0.0");
        let mut containers: BTreeMap<String, Container> = BTreeMap::new();
        let shared = tempfile::tempdir().expect("a directory for the shared volumes");
        let mut next = 0;
        while let Some(service) = topology.services(&host, &dns_ip).into_iter().nth(next) {
            next += 1;
            let join = match &service.place {
                Place::Cluster => Join::Network(&network.name),
                Place::Node(node) => Join::Namespace(&containers[node]),
            };
            // A shared volume is a directory of the cluster's, bound into
            // each of its services.
            let mounts: Vec<Mount> = service
                .mounts
                .iter()
                .map(|mount| match mount {
                    Mount::Shared { name, path } => {
                        let host = shared.path().join(name);
                        std::fs::create_dir_all(&host).expect("a shared volume's directory");
                        Mount::Bind {
                            host: host.to_str().expect("a UTF-8 path").to_owned(),
                            path,
                            read_only: false,
                        }
                    }
                    other => other.clone(),
                })
                .collect();
            let container = Container::run(
                host(&service.name),
                join,
                service.image.name(),
                service.entrypoint,
                service.args,
                service.ready,
                &mounts,
            )
            .await;
            if service.kind == Kind::Dns {
                dns_ip = container.ip().await;
            }
            if service.kind == Kind::BrokerSetup {
                make_users(&container, &topology).await;
                // Removed on drop; the broker starts next on its database.
                container.stop(10).await;
                continue;
            }
            containers.insert(service.name, container);
        }
        let mut take = |service: &str| {
            containers
                .remove(service)
                .unwrap_or_else(|| panic!("the topology has no {service}"))
        };
        let nodes = (1..=topology.nodes)
            .map(|index| Node {
                index,
                collector: take(&format!("collector-{index}")),
                producers: take(&format!("producers-{index}")),
                sample: take(&format!("sample-{index}")),
                garbage: (topology.garbage_on_node_1 && index == 1).then(|| take("garbage-1")),
                module: (topology.module_1_12_node == Some(index))
                    .then(|| take(&format!("module-{index}"))),
                agent: take(&format!("node-{index}")),
            })
            .collect();
        let cluster = Self {
            verifier: take("verifier"),
            prometheus: topology.prometheus.then(|| take("prometheus")),
            nodes,
            dns: take("mesos-dns"),
            scheduler: take("kafka-scheduler"),
            tls: topology.secured.is_some().then(|| take("tls")),
            broker: take(match topology.broker {
                Broker::Tansu => "tansu",
                Broker::Mock => "kafka",
            }),
            spare: topology.spare_broker.then(|| take("tansu-b")),
            network,
            _shared: shared,
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
            let health = format!("http://{}:8123/health", self.node_ip(node.index).await);
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
        match e2e::poll_until(timeout, POLL, check).await {
            Some(value) => value,
            None => {
                self.dump_logs().await;
                panic!("{what}: not within {timeout:?}");
            }
        }
    }

    /// Seconds since start, for the log lines.
    pub fn log(&self, what: &str) {
        println!("[{:>5.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// A node's current IP (it can change after a network reconnect).
    pub async fn node_ip(&self, index: usize) -> String {
        self.nodes[index - 1].agent.ip().await
    }

    /// The verifier's report, if it answers.
    pub async fn try_report(&self) -> Option<ClusterReport> {
        let url = format!("http://{}:9200/report", self.verifier.ip().await);
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
        self.finish_when("conservation", |c| c.holds).await
    }

    /// Stops a node's producers (they flush and report their final
    /// counts), and has the verifier record them.
    pub async fn stop_producers(&self, index: usize) {
        let url = format!("http://{}:9100/stop", self.node_ip(index).await);
        let response = self.http.post(&url).send().await;
        assert!(
            response.as_ref().is_ok_and(|r| r.status().is_success()),
            "stopping node-{index}'s producers: {response:?}"
        );
        self.eventually(
            docker_patience(),
            &format!("the verifier has node-{index}'s final counts"),
            || async { self.try_report().await.map(|_| ()) },
        )
        .await;
    }

    /// Stops the 1.12 modules through the verifier (their tasks stop, the
    /// last containers are deregistered) and waits until the verifier finds
    /// every total their tasks sent in Kafka and in Prometheus. Returns
    /// the checks.
    pub async fn finish_statsd(&self) -> BTreeMap<String, simulator::statsd_module::StatsdCheck> {
        let url = format!("http://{}:9200/statsd/stop", self.verifier.ip().await);
        let response = self.http.post(&url).send().await;
        assert!(
            response.as_ref().is_ok_and(|r| r.status().is_success()),
            "stopping the 1.12 modules: {response:?}"
        );
        let patience = docker_patience();
        let holding = e2e::poll_until(patience, POLL, || async {
            let report = self.try_report().await?;
            (!report.statsd.is_empty() && report.statsd.values().all(|c| c.holds()))
                .then_some(report.statsd)
        })
        .await;
        if let Some(checks) = holding {
            return checks;
        }
        let last = self.try_report().await;
        self.dump_logs().await;
        panic!(
            "the 1.12 modules' totals are not all in Kafka and Prometheus after {patience:?}: {:#?}",
            last.map(|r| r.statsd)
        );
    }

    /// Stops every node's producers, then waits until `holds` says the
    /// balance is what the scenario allows. Returns the final report.
    pub async fn finish_when(
        &self,
        what: &str,
        holds: impl Fn(&simulator::cluster::Conservation) -> bool,
    ) -> ClusterReport {
        for node in &self.nodes {
            self.stop_producers(node.index).await;
        }
        self.log("producers stopped; waiting for the balance");
        let patience = docker_patience();
        let holding = e2e::poll_until(patience, POLL, || async {
            self.try_report()
                .await
                .filter(|report| holds(&report.conservation))
        })
        .await;
        if let Some(report) = holding {
            self.log(&format!("final: {}", report.summary()));
            return report;
        }
        let last = self.try_report().await;
        self.dump_logs().await;
        match last {
            Some(report) => panic!(
                "{what} does not hold after {patience:?}: {}\nfailures: {:?}\ncollectors: {:?}",
                report.summary(),
                report.conservation.failures,
                report.collectors
            ),
            None => panic!("the verifier does not answer"),
        }
    }

    /// Prints every container's last log lines (for a failing run).
    pub async fn dump_logs(&self) {
        let mut all: Vec<&Container> =
            vec![&self.verifier, &self.broker, &self.dns, &self.scheduler];
        all.extend(self.spare.iter());
        all.extend(self.tls.iter());
        for node in &self.nodes {
            all.extend([&node.agent, &node.collector, &node.producers, &node.sample]);
            all.extend(node.garbage.iter());
            all.extend(node.module.iter());
        }
        let mut logs = BTreeMap::new();
        for container in all {
            logs.insert(container.name.clone(), container.logs().await);
        }
        for (name, logs) in logs {
            let lines: Vec<&str> = logs.lines().collect();
            println!("---- {name} (last 15 lines)");
            for line in &lines[lines.len().saturating_sub(15)..] {
                println!("  {line}");
            }
        }
    }
}

//! The cluster's topology, written once: every service with its image,
//! command and place (the cluster network, or an agent node's network
//! namespace). The Docker tier (`tests/docker/harness.rs`) starts its
//! containers from it, and `docker-compose.yml` is rendered from it: a test
//! holds the file to it (`UPDATE_COMPOSE=1 cargo test -p e2e --lib compose`
//! rewrites the file).

use std::fmt::Write as _;

/// Which image a service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// `collector` and `sample-producer`.
    Collector,
    /// Every fake and the verifier.
    Simulator,
    /// The broker.
    Tansu,
    /// stunnel, terminating TLS in front of the broker (Debian's stunnel4).
    Stunnel,
    /// Debian's Prometheus server, with the simulator to configure it.
    Prometheus,
}

impl Image {
    /// The image's name (its tag is `local`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Collector => "metrics-collector/collector",
            Self::Simulator => "metrics-collector/simulator",
            Self::Tansu => "metrics-collector/tansu",
            Self::Stunnel => "metrics-collector/stunnel",
            Self::Prometheus => "metrics-collector/prometheus",
        }
    }
}

/// Where a service runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// On the cluster's network, under its own name.
    Cluster,
    /// Inside this agent node's network namespace (the node's service
    /// name), reaching the node's other services on 127.0.0.1.
    Node(String),
}

/// What a service is, for its health check and start-up order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// tansu.
    Broker,
    /// tansu without authentication, on the broker's database, long
    /// enough for the SCRAM users to be made in it (secured clusters).
    BrokerSetup,
    /// stunnel in the broker's namespace (secured clusters).
    Tls,
    /// The embedded broker, in node-1's namespace ([`Broker::Mock`]).
    MockBroker,
    /// The Kafka scheduler fake.
    Scheduler,
    /// The Mesos-DNS fake.
    Dns,
    /// An agent node (owns the node's namespace).
    Agent,
    /// A collector.
    Collector,
    /// The module producers of a node.
    Producers,
    /// DC/OS 1.12's mesos module on a node (`simulator module`):
    /// registers the agent's containers with the collector's registration
    /// API and runs their tasks' statsd.
    StatsdModule,
    /// A sample-producer.
    Sample,
    /// A garbage producer.
    Garbage,
    /// The Prometheus server scraping the collectors.
    Prometheus,
    /// The verifier.
    Verifier,
}

/// The Kafka broker the cluster runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// tansu on the cluster network (`tansu:9092`), found through the
    /// scheduler as on a real cluster.
    Tansu,
    /// The simulator's embedded broker (librdkafka's mock cluster) in
    /// node-1's namespace, at `127.0.0.1:9092`, with its control API on
    /// `:9300` (a topic refused, a broker down): for faults tansu can't
    /// play, such as an ACL refusing a topic. The cluster then has one
    /// node, and the verifier runs in its namespace.
    Mock,
}

/// Where the collectors keep their disk spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolStorage {
    /// A volume of the node's own, kept across restarts of the collector
    /// (a Marathon persistent volume, a host path).
    Volume,
    /// A tmpfs of this many bytes: small enough to fill.
    Tmpfs(u64),
}

/// Storage mounted into a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// A volume, named after the service's node in `docker-compose.yml`
    /// (the Docker tier gives each container an anonymous one).
    Volume {
        /// Its name in `docker-compose.yml`.
        name: String,
        /// Where it is mounted.
        path: &'static str,
    },
    /// A tmpfs.
    Tmpfs {
        /// Where it is mounted.
        path: &'static str,
        /// Its size.
        bytes: u64,
    },
    /// A volume the services of one node share (the registration API's
    /// socket directory): named in `docker-compose.yml`; a directory of the
    /// cluster's own on the host in the Docker tier.
    Shared {
        /// Its name.
        name: String,
        /// Where it is mounted.
        path: &'static str,
    },
    /// A directory of the host's.
    Bind {
        /// The host's directory.
        host: String,
        /// Where it is mounted.
        path: &'static str,
        /// Read-only.
        read_only: bool,
    },
}

/// Where a secured cluster's certificates and secrets are, inside its
/// containers (read-only).
pub const SECRETS_DIR: &str = "/etc/metrics-collector/secrets";

/// A secured cluster: Kafka over SASL_SSL with SCRAM-SHA-512 (stunnel in
/// front of tansu, which does not use its own `--cert`), found through the
/// Kafka service's SDK API over HTTPS with a token, as in DC/OS strict mode.
/// The collectors, the sample-producers and the verifier all connect that
/// way, from inside their images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secured {
    /// A host directory holding the CA (`ca.crt`), the TLS port's and the
    /// scheduler's certificates and keys (`tansu.crt`, `tansu.key`,
    /// `scheduler.crt`, `scheduler.key`), the user's password
    /// (`kafka-password`), the token (`token`) and stunnel's configuration
    /// (`stunnel.conf`), mounted read-only at [`SECRETS_DIR`].
    pub secrets: String,
    /// A host directory for tansu's database: the setup broker makes the
    /// users in it, then the broker with authentication on serves it.
    pub data: String,
    /// The SCRAM-SHA-512 user everything connects as.
    pub user: &'static str,
    /// The token the scheduler requires.
    pub token: &'static str,
}

impl Secured {
    fn mount(&self) -> Mount {
        Mount::Bind {
            host: self.secrets.clone(),
            path: SECRETS_DIR,
            read_only: true,
        }
    }

    /// The collector's Kafka security options (the sample-producer's and
    /// the verifier's are the same).
    fn kafka_options(&self, dash: &str) -> Vec<String> {
        vec![
            format!("{dash}-kafka-security-protocol=sasl_ssl"),
            format!("{dash}-kafka-ssl-ca-file={SECRETS_DIR}/ca.crt"),
            format!("{dash}-kafka-sasl-mechanism=SCRAM-SHA-512"),
            format!("{dash}-kafka-sasl-username={}", self.user),
            format!("{dash}-kafka-sasl-password-file={SECRETS_DIR}/kafka-password"),
        ]
    }

    /// Discovery over HTTPS with the token, through `/service/kafka`.
    fn discovery_options(&self, dash: &str, scheduler: &str) -> Vec<String> {
        vec![
            format!("{dash}-kafka-scheduler-url=https://{scheduler}:7000/service/kafka"),
            format!("{dash}-dcos-ca-file={SECRETS_DIR}/ca.crt"),
            format!("{dash}-auth-credential-file={SECRETS_DIR}/token"),
        ]
    }
}

/// Where the collectors' spool is, inside their containers.
pub const SPOOL_DIR: &str = "/var/lib/metrics-collector/spool";

/// Where DC/OS 1.12's module calls the registration API: the directory,
/// shared by the node's collector and module.
pub const STATSD_SOCKET_DIR: &str = "/run/dcos/telegraf";

/// The 1.12 module's control API port (`simulator module --listen`).
pub const STATSD_MODULE_PORT: u16 = 9101;

/// One service of the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// Its name in `docker-compose.yml`.
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// Its image.
    pub image: Image,
    /// An entrypoint other than the image's.
    pub entrypoint: Option<&'static str>,
    /// Its arguments.
    pub args: Vec<String>,
    /// Where it runs.
    pub place: Place,
    /// A line it prints once it serves, to wait for.
    pub ready: Option<&'static str>,
    /// Storage mounted into it.
    pub mounts: Vec<Mount>,
}

/// What a cluster is made of.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Agent nodes.
    pub nodes: usize,
    /// Module producers per node.
    pub producers_per_node: usize,
    /// Datapoints per second, per producer.
    pub rate: f64,
    /// A second broker, `tansu-b`, idle at first, for the brokers to move to.
    pub spare_broker: bool,
    /// A garbage producer on node 1.
    pub garbage_on_node_1: bool,
    /// `enable.idempotence` for the Kafka producers, when set; librdkafka's
    /// default (on, with acks=all) otherwise. tansu 0.6 with sqlite storage
    /// panics when an idempotent producer outlives a broker restart
    /// (docs/local-cluster.md, "Known limits").
    pub idempotence: Option<bool>,
    /// The collectors' API token.
    pub api_token: &'static str,
    /// The collectors' disk spool (`buffer_type = disk`), or the memory
    /// buffer.
    pub spool: Option<SpoolStorage>,
    /// Kafka over SASL_SSL and discovery over HTTPS with a token, or
    /// plaintext as in the original.
    pub secured: Option<Secured>,
    /// The broker.
    pub broker: Broker,
    /// Collector options added last (`--name=value`).
    pub collector_options: Vec<String>,
    /// A Prometheus server (`prometheus`, :9090) scraping every collector
    /// on DC/OS's port 61091, which the verifier asks.
    pub prometheus: bool,
    /// The node (1-based) whose agent is a DC/OS 1.12 one: its collector
    /// serves the registration API on the module's unix socket, and the
    /// module (`module-N`) registers the agent's containers and runs their
    /// tasks' statsd; the verifier checks their totals once it is stopped.
    /// Its module producers stay, as the node's other local processes.
    pub module_1_12_node: Option<usize>,
}

impl Default for Topology {
    /// The cluster `docker-compose.yml` runs.
    fn default() -> Self {
        Self {
            nodes: 3,
            producers_per_node: 2,
            rate: 200.0,
            spare_broker: false,
            garbage_on_node_1: false,
            idempotence: None,
            api_token: "local-cluster-token",
            spool: Some(SpoolStorage::Volume),
            secured: None,
            broker: Broker::Tansu,
            collector_options: Vec::new(),
            prometheus: true,
            module_1_12_node: Some(3),
        }
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl Topology {
    /// Every service, in start-up order. `host` maps a service's name to
    /// the name others reach it by; `dns_ip` is Mesos-DNS's address, which
    /// the collectors are given as an IP (as on a real agent).
    pub fn services(&self, host: &dyn Fn(&str) -> String, dns_ip: &str) -> Vec<Service> {
        let cluster = |name: &str, kind, image, args: Vec<String>, ready| Service {
            name: name.to_owned(),
            kind,
            image,
            entrypoint: None,
            args,
            place: Place::Cluster,
            ready,
            mounts: Vec::new(),
        };
        let tansu = |name: &str| {
            cluster(
                name,
                Kind::Broker,
                Image::Tansu,
                vec![
                    "broker".into(),
                    "--listener-url=tcp://0.0.0.0:9092".into(),
                    format!("--advertised-listener-url=tcp://{}:9092", host(name)),
                    "--storage-engine=sqlite:///data/tansu.db".into(),
                ],
                None,
            )
        };
        let mut services = Vec::new();
        let mock = self.broker == Broker::Mock;
        // What every Kafka client in node-1's namespace dials with the
        // embedded broker.
        const MOCK_BOOTSTRAP: &str = "127.0.0.1:9092";
        match &self.secured {
            None if mock => {}
            None => services.push(tansu("tansu")),
            Some(secured) => {
                // The users are made while authentication is off and the
                // broker advertises its own port; then the broker starts
                // with authentication on the same database, advertising
                // stunnel's TLS port.
                let data = Mount::Bind {
                    host: secured.data.clone(),
                    path: "/data",
                    read_only: false,
                };
                let mut setup = tansu("tansu-setup");
                setup.kind = Kind::BrokerSetup;
                setup.mounts.push(data.clone());
                services.push(setup);
                let mut broker = tansu("tansu");
                for arg in &mut broker.args {
                    if arg.starts_with("--advertised-listener-url=") {
                        *arg = format!("--advertised-listener-url=tcp://{}:9093", host("tansu"));
                    }
                }
                broker.args.push("--authentication".into());
                broker.mounts.push(data);
                services.push(broker);
                services.push(Service {
                    name: "tls".into(),
                    kind: Kind::Tls,
                    image: Image::Stunnel,
                    entrypoint: None,
                    args: vec![format!("{SECRETS_DIR}/stunnel.conf")],
                    place: Place::Node("tansu".into()),
                    ready: Some("Configuration successful"),
                    mounts: vec![secured.mount()],
                });
            }
        }
        if self.spare_broker {
            services.push(tansu("tansu-b"));
        }
        let mut scheduler = cluster(
            "kafka-scheduler",
            Kind::Scheduler,
            Image::Simulator,
            vec![
                "scheduler".into(),
                "--listen=0.0.0.0:7000".into(),
                // With the embedded broker the collectors are given its
                // address; the scheduler only has to start.
                if mock {
                    format!("--brokers={MOCK_BOOTSTRAP}")
                } else {
                    format!("--brokers={}:9092", host("tansu"))
                },
            ],
            Some("Kafka scheduler listening on"),
        );
        if let Some(secured) = &self.secured {
            scheduler.args.extend([
                "--sdk".to_owned(),
                format!("--tls-brokers={}:9093", host("tansu")),
                format!("--https-cert={SECRETS_DIR}/scheduler.crt"),
                format!("--https-key={SECRETS_DIR}/scheduler.key"),
                format!("--token={}", secured.token),
            ]);
            scheduler.mounts.push(secured.mount());
        }
        services.push(scheduler);
        services.push(cluster(
            "mesos-dns",
            Kind::Dns,
            Image::Simulator,
            vec![
                "dns".into(),
                "--listen=0.0.0.0:53".into(),
                format!("--scheduler={}:7000", host("kafka-scheduler")),
            ],
            Some("Mesos-DNS listening on"),
        ));
        let idempotence = self
            .idempotence
            .map(|on| format!("enable.idempotence={on}"));
        for index in 1..=self.nodes {
            let node = format!("node-{index}");
            let in_node =
                |name: String, kind, image, entrypoint, args: Vec<String>, ready| Service {
                    name,
                    kind,
                    image,
                    entrypoint,
                    args,
                    place: Place::Node(node.clone()),
                    ready,
                    mounts: Vec::new(),
                };
            services.push(cluster(
                &node,
                Kind::Agent,
                Image::Simulator,
                strings(&["agent", "--listen=0.0.0.0:5051", "--containers=3"]),
                Some("agent listening on"),
            ));
            if mock && index == 1 {
                services.push(in_node(
                    "kafka".into(),
                    Kind::MockBroker,
                    Image::Simulator,
                    None,
                    vec![
                        "kafka".into(),
                        "--brokers=1".into(),
                        "--control=0.0.0.0:9300".into(),
                        format!("--bootstrap={MOCK_BOOTSTRAP}"),
                    ],
                    Some("control API"),
                ));
            }
            let discovery = if mock {
                vec![format!("--kafka-brokers={MOCK_BOOTSTRAP}")]
            } else {
                vec![
                    "--kafka-framework=kafka".into(),
                    format!("--dns-server={dns_ip}:53"),
                ]
            };
            let mut collector: Vec<String> = discovery;
            collector.extend([
                "--kafka-rediscover-secs=10".into(),
                "--api-listen=0.0.0.0:8123".into(),
                format!("--api-token={}", self.api_token),
                // Prometheus on DC/OS's port, as the deploy files set it;
                // the producers' per-record sequence tag is for the
                // verifier's Kafka accounting, not a series of its own.
                "--prometheus-listen=0.0.0.0:61091".into(),
                format!("--store-drop-tags={}", simulator::producer::SEQ_TAG),
                "--agent-url=http://127.0.0.1:5051".into(),
                "--agent-poll-period=5".into(),
                format!("--static-tag=node={node}"),
                // tansu 0.6 with sqlite storage cannot serve
                // snappy-compressed batches (docs/local-cluster.md, "Known limits").
                "--kafka-compress-snappy=false".into(),
                "--librdkafka=compression.codec=lz4".into(),
            ]);
            collector.extend(idempotence.iter().map(|o| format!("--librdkafka={o}")));
            if self.spool.is_some() {
                collector.extend([
                    "--buffer-type=disk".to_owned(),
                    format!("--spool-dir={SPOOL_DIR}"),
                ]);
            }
            if let Some(secured) = &self.secured {
                collector.extend(secured.kafka_options("-"));
                collector.extend(secured.discovery_options("-", &host("kafka-scheduler")));
            }
            let statsd_1_12 = self.module_1_12_node == Some(index);
            let shared = Mount::Shared {
                name: format!("statsd-{index}"),
                path: STATSD_SOCKET_DIR,
            };
            if statsd_1_12 {
                collector.extend([
                    format!("--statsd-control-listen=unix:{STATSD_SOCKET_DIR}/dcos_statsd.sock"),
                    // On the shared volume: a restarted collector binds
                    // every registered container's port again.
                    format!("--statsd-state-dir={STATSD_SOCKET_DIR}/containers"),
                ]);
            }
            collector.extend(self.collector_options.iter().cloned());
            let mut service = in_node(
                format!("collector-{index}"),
                Kind::Collector,
                Image::Collector,
                None,
                collector,
                Some("Collector started."),
            );
            service
                .mounts
                .extend(self.spool.map(|storage| match storage {
                    SpoolStorage::Volume => Mount::Volume {
                        name: format!("spool-{index}"),
                        path: SPOOL_DIR,
                    },
                    SpoolStorage::Tmpfs(bytes) => Mount::Tmpfs {
                        path: SPOOL_DIR,
                        bytes,
                    },
                }));
            service
                .mounts
                .extend(self.secured.as_ref().map(Secured::mount));
            if statsd_1_12 {
                service.mounts.push(shared.clone());
            }
            services.push(service);
            if statsd_1_12 {
                let mut module = in_node(
                    format!("module-{index}"),
                    Kind::StatsdModule,
                    Image::Simulator,
                    None,
                    vec![
                        "module".into(),
                        format!("--control=unix:{STATSD_SOCKET_DIR}/dcos_statsd.sock"),
                        "--agent=http://127.0.0.1:5051".into(),
                        "--rate=10".into(),
                        "--deregister=1".into(),
                        format!("--listen=0.0.0.0:{STATSD_MODULE_PORT}"),
                    ],
                    Some("module control API on"),
                );
                module.mounts.push(shared);
                services.push(module);
            }
            services.push(in_node(
                format!("producers-{index}"),
                Kind::Producers,
                Image::Simulator,
                None,
                vec![
                    "producers".into(),
                    "--collector=127.0.0.1:8124".into(),
                    format!("--count={}", self.producers_per_node),
                    format!("--rate={}", self.rate),
                    format!("--id={node}"),
                    "--listen=0.0.0.0:9100".into(),
                ],
                None,
            ));
            let mut sample = if mock {
                strings(&["-brokers", MOCK_BOOTSTRAP])
            } else {
                strings(&[
                    "-framework",
                    "kafka",
                    "-dns-server",
                    &format!("{dns_ip}:53"),
                ])
            };
            sample.extend(strings(&[
                "-agent-url",
                "http://127.0.0.1:5051",
                "-period",
                "5",
                "-compression",
                "lz4",
            ]));
            if let Some(option) = &idempotence {
                sample.extend(strings(&["-librdkafka", option]));
            }
            if let Some(secured) = &self.secured {
                sample.extend(secured.kafka_options("-"));
                sample.extend(secured.discovery_options("-", &host("kafka-scheduler")));
            }
            let mut sample = in_node(
                format!("sample-{index}"),
                Kind::Sample,
                Image::Collector,
                Some("/bin/sample-producer"),
                sample,
                None,
            );
            sample
                .mounts
                .extend(self.secured.as_ref().map(Secured::mount));
            services.push(sample);
            if self.garbage_on_node_1 && index == 1 {
                services.push(in_node(
                    format!("garbage-{index}"),
                    Kind::Garbage,
                    Image::Simulator,
                    None,
                    strings(&["garbage", "--collector=127.0.0.1:8124", "--every=500ms"]),
                    None,
                ));
            }
        }
        let mut verify = vec!["verify".into()];
        // With the embedded broker, the verifier joins node-1's namespace
        // and reaches everything on 127.0.0.1.
        let at = |node: &str| {
            if mock {
                "127.0.0.1".to_owned()
            } else {
                host(node)
            }
        };
        match &self.secured {
            None if mock => verify.push(format!("--brokers={MOCK_BOOTSTRAP}")),
            None => verify.push(format!("--brokers={}:9092", host("tansu"))),
            Some(secured) => {
                verify.push(format!("--brokers={}:9093", host("tansu")));
                verify.extend(secured.kafka_options("-"));
            }
        }
        if self.spare_broker {
            verify.push(format!("--brokers={}:9092", host("tansu-b")));
        }
        for index in 1..=self.nodes {
            verify.push(format!(
                "--producers=http://{}:9100",
                at(&format!("node-{index}"))
            ));
        }
        for index in 1..=self.nodes {
            verify.push(format!(
                "--metrics=http://{}:8123/metrics",
                at(&format!("node-{index}"))
            ));
        }
        if let Some(index) = self.module_1_12_node.filter(|i| *i <= self.nodes) {
            verify.push(format!(
                "--statsd-module=http://{}:{STATSD_MODULE_PORT}",
                at(&format!("node-{index}"))
            ));
        }
        if self.prometheus {
            let targets = (1..=self.nodes)
                .map(|index| format!("--target={}:61091", host(&format!("node-{index}"))));
            let mut prometheus = cluster(
                "prometheus",
                Kind::Prometheus,
                Image::Prometheus,
                std::iter::once("prometheus".to_owned())
                    .chain(targets)
                    .chain([
                        "--interval=5s".to_owned(),
                        "--listen=0.0.0.0:9090".to_owned(),
                    ])
                    .collect(),
                Some("Server is ready to receive web requests."),
            );
            prometheus.entrypoint = Some("/bin/simulator");
            services.push(prometheus);
            verify.push(format!("--prometheus=http://{}:9090", host("prometheus")));
        }
        verify.extend(strings(&["--listen=0.0.0.0:9200", "--interval=5s"]));
        let mut verifier = cluster(
            "verifier",
            Kind::Verifier,
            Image::Simulator,
            verify,
            Some("verifier report on"),
        );
        verifier
            .mounts
            .extend(self.secured.as_ref().map(Secured::mount));
        if mock {
            verifier.place = Place::Node("node-1".into());
        }
        services.push(verifier);
        services
    }
}

/// Mesos-DNS's fixed address in `docker-compose.yml`.
pub const COMPOSE_DNS_IP: &str = "10.231.7.53";
/// The compose cluster's subnet.
pub const COMPOSE_SUBNET: &str = "10.231.7.0/24";

const COMPOSE_HEADER: &str = "\
# GENERATED from tests/src/topology.rs (the topology the Docker tier runs):
# edit that, then `UPDATE_COMPOSE=1 cargo test -p e2e --lib compose`.
#
# The local cluster: Mesos-DNS, the Kafka scheduler, tansu (a real
# Kafka-protocol broker), three agent nodes, a Prometheus server scraping
# every collector on DC/OS's port 61091, and the verifier, all offline.
#
#   scripts/build-images          # once; seconds when nothing changed
#   docker-compose up -d
#   docker-compose logs -f verifier
#   curl -s localhost:9200/report  # the verifier's balance, as JSON
#   curl -s localhost:9090/api/v1/query --data-urlencode 'query=memory_total'  # Prometheus
#   docker-compose down -v
#
# Each node is one network namespace, owned by its agent emulator (node-N):
# the collector, the module producers and the sample-producer join it with
# `network_mode: service:node-N`, so they reach each other on 127.0.0.1 as on
# a real agent (collector input 127.0.0.1:8124, agent 127.0.0.1:5051), and a
# collector restart does not take its producers' network away.
#
# node-3's agent is a DC/OS 1.12 one: module-3 registers its containers on
# the collector's registration API (unix:/run/dcos/telegraf/dcos_statsd.sock,
# a volume both share) and runs their tasks' statsd. Stopping it through the
# verifier deregisters one container and fixes what every series must total;
# the verifier then checks those totals in Kafka and Prometheus:
#   curl -s -X POST localhost:9200/statsd/stop   # then the report's \"statsd\"
#
# The images are FROM scratch (no shell): health checks run our own probes.
version: \"2.4\"
";

fn quoted(arg: &str) -> String {
    format!("{arg:?}")
}

/// `docker-compose.yml` for `topology`.
pub fn compose(topology: &Topology) -> String {
    let services = topology.services(&|name| name.to_owned(), COMPOSE_DNS_IP);
    let mut out = String::from(COMPOSE_HEADER);
    out.push_str("\nservices:\n");
    let healthy = |names: &[&str]| -> String {
        let mut s = String::from("    depends_on:\n");
        for name in names {
            let _ = writeln!(s, "      {name}: {{ condition: service_healthy }}");
        }
        s
    };
    for service in &services {
        let _ = writeln!(out, "  {}:", service.name);
        let _ = writeln!(out, "    image: {}:local", service.image.name());
        if let Some(entrypoint) = service.entrypoint {
            let _ = writeln!(out, "    entrypoint: [{}]", quoted(entrypoint));
        }
        out.push_str("    command:\n");
        for arg in &service.args {
            let _ = writeln!(out, "      - {}", quoted(arg));
        }
        let (mut volumes, mut tmpfs) = (Vec::new(), Vec::new());
        for mount in &service.mounts {
            match mount {
                Mount::Volume { name, path } | Mount::Shared { name, path } => {
                    volumes.push(format!("\"{name}:{path}\""));
                }
                Mount::Tmpfs { path, bytes } => tmpfs.push(format!("\"{path}:size={bytes}\"")),
                Mount::Bind {
                    host,
                    path,
                    read_only,
                } => {
                    let mode = if *read_only { ":ro" } else { "" };
                    volumes.push(format!("\"{host}:{path}{mode}\""));
                }
            }
        }
        if !volumes.is_empty() {
            let _ = writeln!(out, "    volumes: [{}]", volumes.join(", "));
        }
        if !tmpfs.is_empty() {
            let _ = writeln!(out, "    tmpfs: [{}]", tmpfs.join(", "));
        }
        match &service.place {
            Place::Node(node) => {
                let _ = writeln!(out, "    network_mode: service:{node}");
            }
            Place::Cluster if service.kind == Kind::Dns => {
                let _ = writeln!(
                    out,
                    "    networks:\n      cluster:\n        ipv4_address: {COMPOSE_DNS_IP}"
                );
            }
            Place::Cluster => out.push_str("    networks: [cluster]\n"),
        }
        let probe = |test: &str| {
            format!(
                "    healthcheck:\n      test: [\"CMD\", {test}]\n      interval: 2s\n      timeout: 5s\n      retries: 30\n"
            )
        };
        let node = match &service.place {
            Place::Node(node) => node.as_str(),
            Place::Cluster => "",
        };
        match service.kind {
            // Secured clusters are the Docker tier's only.
            Kind::BrokerSetup | Kind::Tls | Kind::MockBroker => {}
            Kind::Broker => {
                out.push_str("    volumes: [tansu-data:/data]\n");
                out.push_str(&probe(
                    "\"/bin/tansu\", \"topic\", \"list\", \"--broker\", \"tcp://127.0.0.1:9092\"",
                ));
            }
            Kind::Scheduler => {
                out.push_str(&probe(
                    "\"/bin/simulator\", \"probe\", \"http://127.0.0.1:7000/v1/connection\"",
                ));
                out.push_str(&healthy(&["tansu"]));
            }
            Kind::Dns => {
                out.push_str(&probe(
                    "\"/bin/simulator\", \"probe\", \"tcp://127.0.0.1:53\"",
                ));
                out.push_str(&healthy(&["kafka-scheduler"]));
            }
            Kind::Agent => out.push_str(&probe(
                "\"/bin/simulator\", \"probe\", \"http://127.0.0.1:5051/state\"",
            )),
            Kind::Collector => {
                out.push_str(&probe("\"/bin/collector\", \"health\""));
                out.push_str(&healthy(&[node, "mesos-dns", "tansu"]));
                out.push_str("    stop_grace_period: 40s\n    restart: unless-stopped\n");
            }
            Kind::Producers | Kind::Garbage | Kind::StatsdModule => {
                let collector = node.replace("node-", "collector-");
                out.push_str(&healthy(&[&collector]));
                out.push_str("    restart: unless-stopped\n");
            }
            Kind::Sample => {
                out.push_str(&healthy(&[node, "mesos-dns"]));
                out.push_str("    restart: unless-stopped\n");
            }
            Kind::Prometheus => {
                out.push_str("    ports: [\"127.0.0.1:9090:9090\"]\n");
                out.push_str(&probe(
                    "\"/bin/simulator\", \"probe\", \"http://127.0.0.1:9090/-/ready\"",
                ));
            }
            Kind::Verifier => {
                out.push_str("    ports: [\"127.0.0.1:9200:9200\"]\n    depends_on:\n");
                for producers in services
                    .iter()
                    .filter(|s| matches!(s.kind, Kind::Producers | Kind::StatsdModule))
                {
                    let _ = writeln!(
                        out,
                        "      {}: {{ condition: service_started }}",
                        producers.name
                    );
                }
            }
        }
        out.push('\n');
    }
    let _ = write!(
        out,
        "networks:\n  cluster:\n    ipam:\n      config:\n        - subnet: {COMPOSE_SUBNET}\n\nvolumes:\n  tansu-data:\n"
    );
    let mut named = std::collections::BTreeSet::new();
    for service in &services {
        for mount in &service.mounts {
            if let Mount::Volume { name, .. } | Mount::Shared { name, .. } = mount
                && named.insert(name)
            {
                let _ = writeln!(out, "  {name}:");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_file_is_the_topology() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker-compose.yml");
        let rendered = compose(&Topology::default());
        if std::env::var_os("UPDATE_COMPOSE").is_some() {
            std::fs::write(&path, &rendered).expect("writing docker-compose.yml");
        }
        let on_disk = std::fs::read_to_string(&path).expect("docker-compose.yml");
        assert!(
            on_disk == rendered,
            "docker-compose.yml is not the topology of tests/src/topology.rs: \
             run `UPDATE_COMPOSE=1 cargo test -p e2e --lib compose`"
        );
    }

    #[test]
    fn the_nodes_services_live_in_their_namespace() {
        let topology = Topology {
            spare_broker: true,
            garbage_on_node_1: true,
            idempotence: Some(false),
            ..Topology::default()
        };
        let services = topology.services(&|name| format!("x-{name}"), "10.0.0.1");
        let named = |name: &str| services.iter().find(|s| s.name == name).unwrap();
        assert_eq!(named("collector-2").place, Place::Node("node-2".into()));
        assert_eq!(named("garbage-1").place, Place::Node("node-1".into()));
        assert!(services.iter().all(|s| s.name != "garbage-2"));
        assert!(
            named("tansu-b")
                .args
                .contains(&"--advertised-listener-url=tcp://x-tansu-b:9092".into())
        );
        assert!(
            named("collector-1")
                .args
                .contains(&"--librdkafka=enable.idempotence=false".into())
        );
        assert!(
            named("collector-1")
                .args
                .contains(&"--dns-server=10.0.0.1:53".into())
        );
        assert!(
            named("verifier")
                .args
                .contains(&"--metrics=http://x-node-3:8123/metrics".into())
        );
        // node-3 is a DC/OS 1.12 agent: its collector serves the
        // registration API where its module calls, on a volume both share,
        // and the verifier checks the module's totals; no other node has one.
        let socket = format!("unix:{STATSD_SOCKET_DIR}/dcos_statsd.sock");
        assert!(
            named("collector-3")
                .args
                .contains(&format!("--statsd-control-listen={socket}"))
        );
        assert!(
            named("module-3")
                .args
                .contains(&format!("--control={socket}"))
        );
        let shared = Mount::Shared {
            name: "statsd-3".into(),
            path: STATSD_SOCKET_DIR,
        };
        assert!(named("collector-3").mounts.contains(&shared));
        assert!(named("module-3").mounts.contains(&shared));
        assert_eq!(named("module-3").place, Place::Node("node-3".into()));
        assert!(named("verifier").args.contains(&format!(
            "--statsd-module=http://x-node-3:{STATSD_MODULE_PORT}"
        )));
        assert!(services.iter().all(|s| s.name != "module-1"));
        assert!(
            named("collector-1")
                .args
                .iter()
                .all(|a| !a.starts_with("--statsd"))
        );
        // Every node's services come after the node that owns their namespace.
        for (i, service) in services.iter().enumerate() {
            if let Place::Node(node) = &service.place {
                assert!(
                    services[..i].iter().any(|s| &s.name == node),
                    "{}",
                    service.name
                );
            }
        }
    }
}

//! Fakes of every system around the collector, for tests, `simulator up`
//! and benchmarks. Each fake is a builder that returns a handle.
//!
//! # Layout
//!
//! - [`listening`]: the handle every fake returns (address, stop, join).
//! - [`dns`]: Mesos-DNS (SRV and A records) on hickory's server crate.
//! - [`kafka`]: the embedded broker (librdkafka's mock cluster) and the
//!   faults a test puts on it: a broker down, a topic refused.
//! - [`producer`]: TCP producers that emulate the mesos-agent module (its
//!   exact header, fixed sync, null codec) and "other processes" (random
//!   sync, deflate or snappy), plus malformed modes. Every MetricList carries
//!   a producer id and a sequence number so a verifier can account for it.
//! - [`statsd_module`]: the DC/OS 1.12+ mesos module (container
//!   registrations over the statsd registration API) and its tasks' statsd
//!   with known totals, and the checks of what arrived.
//! - [`prometheus`]: a real Prometheus server in the cluster, configured by
//!   `simulator prometheus`, and what the verifier asks of it.
//! - [`cluster`]: the same pieces as separate processes (docker-compose and
//!   the Docker tests): the producers' control API, the verifier's report
//!   and the balance across nodes, a health probe.
#![forbid(unsafe_code)] // the one audited exception is collector::resident

pub mod agent;
pub mod bench;
pub mod cluster;
pub mod dns;
pub mod kafka;
pub mod listening;
pub mod process;
pub mod producer;
pub mod prometheus;
pub mod scheduler;
pub mod statsd_module;
pub mod tls;
pub mod up;
pub mod verify;

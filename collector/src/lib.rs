//! The metrics collector: a per-node agent for Mesos / DC/OS clusters.
//!
//! It takes Avro OCF metrics over TCP from the mesos-agent module and other
//! local processes, enriches them with agent and framework tags, and forwards
//! them to Kafka and to local partner processes.
//!
//! # Layout
//!
//! - [`decode`]: the `collector decode` tool: OCF in, JSON lines out.

pub mod decode;

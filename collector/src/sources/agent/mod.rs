//! The Mesos agent: one HTTP client shared by the collector and the
//! sample-producer ([`client`]), the tolerant mapping of its JSON to
//! MetricLists ([`mapping`]), and the collector's poller and enrichment
//! ([`poller`]).

pub mod client;
pub mod mapping;
pub mod poller;

//! Sources: where records come from. Each pushes into the buffer through
//! the one bounded path, [`crate::pipeline`].
//!
//! - [`tcp`]: the Avro OCF listener of the mesos-agent module and other
//!   local processes, one task per connection.
//! - [`agent`]: the Mesos agent: its client, the mapping of its JSON to
//!   MetricLists, and the poller (`/state` for enrichment, `/containers`
//!   and `/metrics/snapshot` as records).
//! - [`node`]: the node's own metrics (CPU, memory, filesystems, network…).
//! - [`statsd`]: statsd lines, read and aggregated per series.

pub mod agent;
pub mod node;
pub mod statsd;
pub mod tcp;

/// Now, in ms since the epoch: the time of the datapoints the collector
/// makes itself.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

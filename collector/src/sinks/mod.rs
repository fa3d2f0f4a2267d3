//! Sinks: where records go.
//!
//! - [`kafka`]: batches per topic ([`batch`]), produces OCF files, and
//!   counts what Kafka acknowledged as delivered. It pops chunks from the
//!   buffer, the seam between sources and Kafka.
//! - the null sink (`kafka = false`): the end of the pipeline when the
//!   node's own outputs (the store, the partners) are all there is; it
//!   counts what reaches it as served.
//! - [`partner`]: local partner processes, each sent the blocks as they are
//!   routed, with a queue of its own.
//! - [`store`]: the node store, the latest value of every series as records
//!   are routed, which the Prometheus listener and the v0 API read.

pub mod batch;
pub mod kafka;
pub mod partner;
pub mod store;

use std::sync::Arc;

use crate::buffer::Buffer;
use crate::shutdown::Task;
use crate::stats::Stats;

/// Spawns the null sink (`kafka = false`).
pub fn spawn_null(buffer: Arc<Buffer>, stats: Arc<Stats>) -> Task {
    Task::spawn("sink", run_null(buffer, stats))
}

/// Takes everything from the buffer, counting it as served: the store and
/// the partners had it before it was buffered.
async fn run_null(buffer: Arc<Buffer>, stats: Arc<Stats>) {
    while let Some(chunk) = buffer.pop().await {
        stats
            .served
            .add(chunk.items.len() as u64, chunk.datapoints());
        let seqs: Vec<u64> = chunk
            .items
            .iter()
            .map(|r| r.seq)
            .filter(|&s| s != 0)
            .collect();
        // Read from the main spool only: the null sink parks nothing.
        buffer.ack("", &seqs);
    }
}

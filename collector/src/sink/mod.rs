//! Sinks: where buffered records go. The buffer is the seam: a sink only
//! ever pops chunks from it.
//!
//! - [`kafka`]: batches per topic, produces OCF files, and counts what Kafka
//!   acknowledged as delivered.
//! - the null sink: counts and discards (`kafka = false`), for benchmarks.

pub mod batch;
pub mod kafka;

use std::sync::Arc;

use crate::buffer::Buffer;
use crate::shutdown::Task;
use crate::stats::Stats;

/// Spawns the null sink (`kafka = false`).
pub fn spawn_null(buffer: Arc<Buffer>, stats: Arc<Stats>) -> Task {
    Task::spawn("sink", run_null(buffer, stats))
}

/// Takes everything from the buffer and discards it, counting it as delivered.
async fn run_null(buffer: Arc<Buffer>, stats: Arc<Stats>) {
    while let Some(chunk) = buffer.pop().await {
        stats
            .delivered
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

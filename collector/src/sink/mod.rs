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
use crate::stats::Stats;

/// Takes everything from the buffer and discards it, counting it as delivered.
pub async fn run_null(buffer: Arc<Buffer>, stats: Arc<Stats>) {
    while let Some(chunk) = buffer.pop().await {
        stats
            .delivered
            .add(chunk.items.len() as u64, chunk.datapoints());
    }
}

//! The `dcos.metrics` Avro contract, shared by the collector and the simulator.
//!
//! # Layout
//!
//! - [`model`]: the Rust types `MetricList`, `Tag` and `Datapoint`.
//! - [`datum`]: the binary *format* of one record: a hand-written reader
//!   (current and seed-era schemas) and writer, pure functions over bytes.
//! - [`raw`]: records of the current schema validated in place and written
//!   again by splicing their bytes (the collector's hot path).
//! - [`ocf`]: the Object Container File *framing*: [`ocf::StreamDecoder`], an
//!   incremental sans-I/O decoder for TCP streams and concatenated files, and
//!   [`ocf::OcfEncoder`].
//! - [`codec`]: null, deflate and snappy (with its CRC32) block codecs.
//! - [`resolve`]: how a stream's writer schema is read: directly, as the
//!   seed-era schema, or through Avro schema resolution (apache-avro).
//! - [`error`]: typed decode errors with byte offsets.
//!
//! apache-avro is used for parsing schemas, canonical forms, resolution, and
//! as the oracle in tests; never per record on the hot path.
#![forbid(unsafe_code)] // the one audited exception is collector::resident

pub mod codec;
pub mod datum;
pub mod error;
pub mod model;
pub mod ocf;
pub mod raw;
pub mod resolve;

#[cfg(feature = "test-util")]
pub mod arbitrary;
#[cfg(feature = "test-util")]
pub mod testing;

pub use codec::Codec;
pub use error::{DecodeError, DecodeErrorKind};
pub use model::{Datapoint, MetricList, Tag};
pub use ocf::{Block, Limits, OcfEncoder, StreamDecoder, decode_all};
pub use resolve::{ReaderPlan, SchemaKind};

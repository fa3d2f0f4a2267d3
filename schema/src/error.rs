//! Typed decode errors. Each says what went wrong and at which byte offset
//! of the stream, so that a log line can point at the exact spot.

use crate::codec::CodecError;
use crate::resolve::SchemaError;

/// A stream that can't be decoded further. "Need more bytes" is never an
/// error: the decoder returns `Ok(None)` for it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind} (at byte offset {offset})")]
pub struct DecodeError {
    /// Offset in the stream (from its first byte, across concatenated files)
    /// of the structure that is wrong.
    pub offset: u64,
    /// What is wrong.
    pub kind: DecodeErrorKind,
}

/// What is wrong with a stream.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeErrorKind {
    /// The stream does not start with `Obj\x01`.
    #[error("bad magic: expected 4f 62 6a 01 (\"Obj\\x01\"), found {found:02x?}")]
    BadMagic {
        /// The first bytes seen.
        found: Vec<u8>,
    },
    /// The header is still incomplete after `limit` bytes.
    #[error("header is larger than the {limit}-byte limit")]
    HeaderTooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// The header's metadata map is malformed.
    #[error("malformed header: {0}")]
    BadHeader(String),
    /// The header has no `avro.schema` entry.
    #[error("header has no avro.schema entry")]
    MissingSchema,
    /// `avro.codec` names a codec we don't support.
    #[error("unknown codec {0:?}: expected null, deflate or snappy")]
    UnknownCodec(String),
    /// The writer schema is unusable.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// A block's trailing sync marker differs from the header's.
    #[error("sync marker mismatch: expected {expected:02x?}, found {found:02x?}")]
    SyncMismatch {
        /// From the header.
        expected: [u8; 16],
        /// At the end of the block.
        found: [u8; 16],
    },
    /// A block declares more bytes than the limit allows.
    #[error("block of {size} bytes is larger than the {limit}-byte limit")]
    BlockTooLarge {
        /// The size the block declares.
        size: u64,
        /// The limit in force.
        limit: usize,
    },
    /// A block's object count is negative or impossible for its size.
    #[error("invalid block object count {count} for a block of {size} bytes")]
    BadBlockCount {
        /// The declared count.
        count: i64,
        /// The declared size.
        size: i64,
    },
    /// A varint in the block framing is malformed.
    #[error("malformed varint in block framing")]
    BadVarint,
    /// The block's data does not decompress.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A record can't be decoded with the writer schema.
    #[error("undecodable record {index} in block: {reason}")]
    UndecodableRecord {
        /// Index of the record in its block.
        index: u64,
        /// What went wrong.
        reason: String,
    },
    /// The block's records end before its data does.
    #[error("block has {0} bytes left over after its last record")]
    TrailingBytes(usize),
    /// The stream ended in the middle of a header or block.
    #[error("stream ends inside a {inside} ({buffered} bytes of it received)")]
    Truncated {
        /// `header` or `block`.
        inside: &'static str,
        /// How many bytes of it arrived.
        buffered: usize,
    },
}

impl DecodeErrorKind {
    /// A short, stable, low-cardinality name for counters and log fields.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeErrorKind::BadMagic { .. } => "bad_magic",
            DecodeErrorKind::HeaderTooLarge { .. } => "header_too_large",
            DecodeErrorKind::BadHeader(_) => "bad_header",
            DecodeErrorKind::MissingSchema => "missing_schema",
            DecodeErrorKind::UnknownCodec(_) => "unknown_codec",
            DecodeErrorKind::Schema(_) => "incompatible_schema",
            DecodeErrorKind::SyncMismatch { .. } => "sync_mismatch",
            DecodeErrorKind::BlockTooLarge { .. } => "block_too_large",
            DecodeErrorKind::BadBlockCount { .. } => "bad_block_count",
            DecodeErrorKind::BadVarint => "bad_varint",
            DecodeErrorKind::Codec(_) => "corrupt_block",
            DecodeErrorKind::UndecodableRecord { .. } => "undecodable_record",
            DecodeErrorKind::TrailingBytes(_) => "trailing_bytes",
            DecodeErrorKind::Truncated { .. } => "truncated",
        }
    }
}

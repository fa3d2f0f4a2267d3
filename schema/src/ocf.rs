//! Avro Object Container File *framing*, for streams as well as files.
//!
//! A stream is one or more OCF files back to back: `Obj\x01`, a metadata map,
//! a 16-byte sync marker, then blocks of (count, size, data, sync). Over TCP
//! the module streams one file for as long as the connection lives; in Kafka
//! every message is one whole file; `kcat` output is many files concatenated.
//! A block's count can never start with the byte `O` (it would be negative),
//! so a new header after a block is unambiguous.
//!
//! [`StreamDecoder`] is a sans-I/O state machine: it takes bytes in chunks of
//! any size and yields blocks of records, or "need more bytes". It never
//! blocks, never panics, and bounds every allocation by [`Limits`].

use bytes::{Buf, BytesMut};

use crate::codec::Codec;
use crate::datum::{self, MIN_METRIC_LIST_LEN};
use crate::error::{DecodeError, DecodeErrorKind};
use crate::model::MetricList;
use crate::raw::{self, RawRecord};
use crate::resolve::{HEADER_SCHEMA_JSON, ReaderPlan, SchemaKind};

/// The four bytes every OCF file starts with.
pub const MAGIC: [u8; 4] = *b"Obj\x01";

/// The mesos module's fixed sync marker (ASCII, marked TODO/TEMP in its source).
pub const MODULE_SYNC: [u8; 16] = *b"FEFEFEFEFEFEFEFE";

/// Bounds on what a stream may make the decoder buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest header (magic, metadata, sync) accepted. The module's is 601 bytes.
    pub max_header_bytes: usize,
    /// Largest block, as declared on the wire (compressed size).
    pub max_block_bytes: usize,
    /// Largest block after decompression.
    pub max_decompressed_block_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_block_bytes: 8 * 1024 * 1024,
            max_decompressed_block_bytes: 32 * 1024 * 1024,
        }
    }
}

/// A parsed OCF header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The block codec.
    pub codec: Codec,
    /// The sync marker every block must end with.
    pub sync: [u8; 16],
    /// The writer schema, as sent.
    pub schema_json: String,
    /// Every metadata entry, in wire order (including `avro.*`).
    pub metadata: Vec<(String, Vec<u8>)>,
    /// Length of the header on the wire.
    pub len: usize,
}

/// One decoded block.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// The records, converted to the current schema.
    pub records: Vec<MetricList>,
    /// Stream offset of the block's first byte.
    pub offset: u64,
    /// Bytes the block took on the wire.
    pub wire_len: usize,
    /// Bytes of the block's records once decompressed.
    pub data_len: usize,
}

/// One block as [`StreamDecoder::decode_view`] hands it out.
#[derive(Debug)]
pub enum BlockView<'a> {
    /// Records of the current schema, validated in place.
    Raw(RawBlock<'a>),
    /// Records of another schema, decoded and converted.
    Decoded(Block),
}

/// A block of current-schema records read in place.
#[derive(Debug)]
pub struct RawBlock<'a> {
    /// The records, each borrowing its bytes.
    pub records: Vec<RawRecord<'a>>,
    /// Stream offset of the block's first byte.
    pub offset: u64,
    /// Bytes the block took on the wire.
    pub wire_len: usize,
    /// Bytes of the block's records once decompressed.
    pub data_len: usize,
}

impl RawBlock<'_> {
    /// The records decoded into owned values.
    pub fn to_block(&self) -> Result<Block, DecodeError> {
        let records = self
            .records
            .iter()
            .enumerate()
            .map(|(index, raw)| {
                datum::read_metric_list(&mut datum::Cursor::new(raw.bytes())).map_err(|e| {
                    DecodeError {
                        offset: self.offset,
                        kind: DecodeErrorKind::UndecodableRecord {
                            index: index as u64,
                            reason: e.to_string(),
                        },
                    }
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Block {
            records,
            offset: self.offset,
            wire_len: self.wire_len,
            data_len: self.data_len,
        })
    }
}

/// What comes next at the front of the input, as [`StreamDecoder::peek`]
/// sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing, or a header or block that has not all arrived. `needed` is
    /// the whole block's length from the front (after the headers `peek`
    /// consumed), once the block's count and size have arrived.
    Incomplete {
        /// Bytes the whole block takes, when known.
        needed: Option<usize>,
    },
    /// A whole block: [`StreamDecoder::decode_view`] returns it next.
    Block(BlockInfo),
}

/// A whole block at the front of the input, before it is decoded or
/// decompressed: what a caller needs to budget memory for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockInfo {
    /// Records the block declares.
    pub records: u64,
    /// Its length on the wire.
    pub wire_len: usize,
    /// Its codec.
    pub codec: Codec,
    /// The length of its records once decompressed, when that is known
    /// without decompressing: always for null, from its preamble for snappy
    /// (when within the limit), never for deflate.
    pub data_len: Option<usize>,
    /// Whether its records are read in place (the current schema) rather
    /// than decoded into owned values.
    pub in_place: bool,
}

impl Block {
    /// Total datapoints across the block's records.
    pub fn datapoints(&self) -> usize {
        self.records.iter().map(|r| r.datapoints.len()).sum()
    }
}

/// Reads a varint at `pos`: `Ok(None)` if the input ends first.
fn varint(input: &[u8], pos: usize) -> Result<Option<(i64, usize)>, ()> {
    let mut value: u64 = 0;
    for (i, &byte) in input
        .get(pos..)
        .unwrap_or_default()
        .iter()
        .enumerate()
        .take(10)
    {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((
                ((value >> 1) as i64) ^ -((value & 1) as i64),
                pos + i + 1,
            )));
        }
    }
    if input.len().saturating_sub(pos) >= 10 {
        Err(())
    } else {
        Ok(None)
    }
}

type HeaderResult = Result<Option<Header>, (usize, DecodeErrorKind)>;

/// Parses a header at the start of `input`. `Ok(None)` means more bytes are
/// needed; errors carry the offset relative to `input`.
pub fn parse_header(input: &[u8], limits: &Limits) -> HeaderResult {
    parse_header_needing(input, limits).map(|(header, _)| header)
}

/// [`parse_header`], and when more bytes are needed, how many the input
/// must hold at least before parsing again can get further: a header that
/// trickles in is not parsed again from the start for every byte.
fn parse_header_needing(
    input: &[u8],
    limits: &Limits,
) -> Result<(Option<Header>, usize), (usize, DecodeErrorKind)> {
    check_magic(input)?;
    let too_large = || {
        (
            0,
            DecodeErrorKind::HeaderTooLarge {
                limit: limits.max_header_bytes,
            },
        )
    };
    match parse_header_body(input, limits)? {
        Err(_) if input.len() >= limits.max_header_bytes => Err(too_large()),
        // Parsing again gets further only with this many bytes, and the
        // limit is checked at the limit.
        Err(at_least) => Ok((None, at_least.min(limits.max_header_bytes))),
        Ok(header) if header.len > limits.max_header_bytes => Err(too_large()),
        Ok(header) => Ok((Some(header), 0)),
    }
}

/// Refuses input that does not start like a header. Reported up to the
/// first byte that differs, so that the error is the same however the input
/// was cut into pieces.
fn check_magic(input: &[u8]) -> Result<(), (usize, DecodeErrorKind)> {
    match input.iter().zip(MAGIC).position(|(got, want)| *got != want) {
        Some(differs) => Err((
            0,
            DecodeErrorKind::BadMagic {
                found: input[..=differs].to_vec(),
            },
        )),
        None => Ok(()),
    }
}

/// A header, or (as `Err`) the length the input must reach at least before
/// it can be parsed further.
type HeaderBody = Result<Header, usize>;

fn parse_header_body(
    input: &[u8],
    limits: &Limits,
) -> Result<HeaderBody, (usize, DecodeErrorKind)> {
    if input.len() < 4 {
        return Ok(Err(4));
    }
    let bad = |pos: usize, what: &str| (pos, DecodeErrorKind::BadHeader(what.to_owned()));
    let mut pos = 4;
    let mut metadata = Vec::new();
    macro_rules! long {
        () => {
            match varint(input, pos) {
                Ok(Some((value, next))) => {
                    pos = next;
                    value
                }
                Ok(None) => return Ok(Err(input.len() + 1)),
                Err(()) => return Err(bad(pos, "malformed varint in metadata")),
            }
        };
    }
    macro_rules! bytes {
        () => {{
            let at = pos;
            let len = long!();
            let Ok(len) = usize::try_from(len) else {
                return Err(bad(at, "negative length in metadata"));
            };
            if len > limits.max_header_bytes {
                return Err((
                    at,
                    DecodeErrorKind::HeaderTooLarge {
                        limit: limits.max_header_bytes,
                    },
                ));
            }
            let Some(bytes) = input.get(pos..pos + len) else {
                return Ok(Err(pos + len));
            };
            pos += len;
            bytes
        }};
    }
    loop {
        let at = pos;
        let mut count = long!();
        if count == 0 {
            break;
        }
        if count < 0 {
            count = count
                .checked_neg()
                .ok_or_else(|| bad(at, "bad metadata count"))?;
            let _block_bytes = long!();
        }
        for _ in 0..count {
            let at = pos;
            let key = bytes!();
            let key = std::str::from_utf8(key).map_err(|_| bad(at, "metadata key is not UTF-8"))?;
            let value = bytes!();
            metadata.push((key.to_owned(), value.to_vec()));
        }
    }
    let Some(sync) = input.get(pos..pos + 16) else {
        return Ok(Err(pos + 16));
    };
    let len = pos + 16;
    let mut codec = Codec::Null;
    let mut schema_json = None;
    for (key, value) in &metadata {
        match key.as_str() {
            "avro.codec" => {
                codec = Codec::from_name(value).ok_or_else(|| {
                    (
                        0,
                        DecodeErrorKind::UnknownCodec(String::from_utf8_lossy(value).into_owned()),
                    )
                })?;
            }
            "avro.schema" => {
                let json =
                    std::str::from_utf8(value).map_err(|_| bad(0, "avro.schema is not UTF-8"))?;
                schema_json = Some(json.to_owned());
            }
            _ => {}
        }
    }
    let schema_json = schema_json.ok_or((0, DecodeErrorKind::MissingSchema))?;
    let mut sync_marker = [0u8; 16];
    sync_marker.copy_from_slice(sync);
    Ok(Ok(Header {
        codec,
        sync: sync_marker,
        schema_json,
        metadata,
        len,
    }))
}

struct Stream {
    header: Header,
    plan: ReaderPlan,
}

enum Step {
    NeedMore,
    Header(usize),
    Block(usize, Block),
}

/// Incremental decoder of a stream of one or more OCF files.
pub struct StreamDecoder {
    limits: Limits,
    stream: Option<Stream>,
    /// Bytes a header being read needs at least before it is parsed again.
    header_needs: usize,
    /// Stream offset of the first byte not yet consumed.
    offset: u64,
    scratch: Vec<u8>,
    failed: Option<DecodeError>,
    files: u64,
}

impl StreamDecoder {
    /// A decoder expecting a header first.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            stream: None,
            header_needs: 0,
            offset: 0,
            scratch: Vec::new(),
            failed: None,
            files: 0,
        }
    }

    /// The header of the file being read, once it has arrived.
    pub fn header(&self) -> Option<&Header> {
        self.stream.as_ref().map(|s| &s.header)
    }

    /// The reader plan of the file being read.
    pub fn plan(&self) -> Option<&ReaderPlan> {
        self.stream.as_ref().map(|s| &s.plan)
    }

    /// Stream offset of the next byte to be consumed.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// How many OCF headers have been read.
    pub fn files(&self) -> u64 {
        self.files
    }

    /// Decodes from the front of `input`. Returns how many bytes were consumed
    /// and the next complete block, if there is one. `(n, None)` means the
    /// rest of `input` is an incomplete header or block: call again with more.
    pub fn decode_slice(&mut self, input: &[u8]) -> Result<(usize, Option<Block>), DecodeError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let mut used = 0;
        loop {
            let at = self.offset;
            match self.step(&input[used..]) {
                Ok(Step::NeedMore) => return Ok((used, None)),
                Ok(Step::Header(n)) => {
                    used += n;
                    self.offset += n as u64;
                }
                Ok(Step::Block(n, block)) => {
                    self.offset += n as u64;
                    return Ok((used + n, Some(block)));
                }
                Err((relative, kind)) => {
                    let error = DecodeError {
                        offset: at + relative as u64,
                        kind,
                    };
                    self.failed = Some(error.clone());
                    return Err(error);
                }
            }
        }
    }

    /// Decodes from `buf`, consuming what was used.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Block>, DecodeError> {
        let (used, block) = self.decode_slice(buf)?;
        buf.advance(used);
        Ok(block)
    }

    /// Call at end of input with whatever bytes are left over: anything but
    /// nothing is a truncated header or block.
    pub fn finish(&mut self, leftover: &[u8]) -> Result<(), DecodeError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        if leftover.is_empty() && self.files > 0 {
            return Ok(());
        }
        let inside = if self.stream.is_none() || leftover.first() == Some(&MAGIC[0]) {
            "header"
        } else {
            "block"
        };
        let error = DecodeError {
            offset: self.offset,
            kind: DecodeErrorKind::Truncated {
                inside,
                buffered: leftover.len(),
            },
        };
        self.failed = Some(error.clone());
        Err(error)
    }

    fn step(&mut self, input: &[u8]) -> Result<Step, (usize, DecodeErrorKind)> {
        if input.is_empty() {
            return Ok(Step::NeedMore);
        }
        if self.stream.is_none() || input[0] == MAGIC[0] {
            return self.step_header(input);
        }
        let stream = self.stream.as_ref().expect("checked above");
        match step_block(
            stream,
            &self.limits,
            &mut self.scratch,
            input,
            false,
            self.offset,
        )? {
            None => Ok(Step::NeedMore),
            Some((n, BlockView::Decoded(block))) => Ok(Step::Block(n, block)),
            // Not asked for, but a view converts without loss.
            Some((n, BlockView::Raw(block))) => Ok(Step::Block(
                n,
                block.to_block().map_err(|error| (0, error.kind))?,
            )),
        }
    }

    /// Like [`decode_slice`](Self::decode_slice), but records of the current
    /// schema are validated in place and handed out as [`RawRecord`]s
    /// borrowing `input` (or the decompressed block), never decoded into
    /// owned strings. Other schemas are decoded and converted as usual.
    pub fn decode_view<'a>(
        &'a mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<BlockView<'a>>), DecodeError> {
        let (used, block_next) = self.consume_headers(input)?;
        if !block_next {
            return Ok((used, None));
        }
        let Self {
            stream,
            limits,
            scratch,
            offset,
            failed,
            ..
        } = self;
        let stream = stream.as_ref().expect("a block follows only a header");
        view_block(stream, limits, scratch, input, used, offset, failed)
    }

    /// [`decode_view`](Self::decode_view), decompressing into `scratch`
    /// instead of the decoder's own buffer: for callers that share one
    /// buffer between many decoders (cleared first, left as it is after).
    pub fn decode_view_into<'a>(
        &'a mut self,
        input: &'a [u8],
        scratch: &'a mut Vec<u8>,
    ) -> Result<(usize, Option<BlockView<'a>>), DecodeError> {
        let (used, block_next) = self.consume_headers(input)?;
        if !block_next {
            return Ok((used, None));
        }
        let Self {
            stream,
            limits,
            offset,
            failed,
            ..
        } = self;
        let stream = stream.as_ref().expect("a block follows only a header");
        view_block(stream, limits, scratch, input, used, offset, failed)
    }

    /// Consumes every whole header at the front of `input`. Returns the
    /// bytes consumed and whether a block (complete or not) starts there.
    fn consume_headers(&mut self, input: &[u8]) -> Result<(usize, bool), DecodeError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let mut used = 0;
        loop {
            let rest = &input[used..];
            if rest.is_empty() {
                return Ok((used, false));
            }
            if self.stream.is_some() && rest[0] != MAGIC[0] {
                return Ok((used, true));
            }
            match self.step_header(rest) {
                Ok(Step::Header(n)) => {
                    used += n;
                    self.offset += n as u64;
                }
                Ok(_) => return Ok((used, false)),
                Err((relative, kind)) => return Err(self.fail(relative, kind)),
            }
        }
    }

    fn fail(&mut self, relative: usize, kind: DecodeErrorKind) -> DecodeError {
        let error = DecodeError {
            offset: self.offset + relative as u64,
            kind,
        };
        self.failed = Some(error.clone());
        error
    }

    /// Consumes the headers at the front of `input` (like
    /// [`decode_view`](Self::decode_view)) and says what the block after
    /// them will take, without decoding or decompressing it. When it
    /// answers [`Next::Block`], `decode_view` on the rest returns that block
    /// or an error, never "need more bytes". Errors are the ones
    /// `decode_view` would give for the block's count and size.
    pub fn peek(&mut self, input: &[u8]) -> Result<(usize, Next), DecodeError> {
        let (used, block_next) = self.consume_headers(input)?;
        let incomplete = |needed| Ok((used, Next::Incomplete { needed }));
        let Some(stream) = self.stream.as_ref().filter(|_| block_next) else {
            return incomplete(None);
        };
        let rest = &input[used..];
        let prelude = match block_prelude(stream, &self.limits, rest) {
            Ok(Some(prelude)) => prelude,
            Ok(None) => return incomplete(None),
            Err((relative, kind)) => return Err(self.fail(relative, kind)),
        };
        if rest.len() < prelude.total {
            return incomplete(Some(prelude.total));
        }
        let data = &rest[prelude.data_start..prelude.data_start + prelude.size];
        let codec = stream.header.codec;
        let data_len = match codec {
            Codec::Null => Some(data.len()),
            Codec::Snappy => data
                .len()
                .checked_sub(4)
                .and_then(|end| snap::raw::decompress_len(&data[..end]).ok())
                .filter(|&len| len <= self.limits.max_decompressed_block_bytes),
            Codec::Deflate => None,
        };
        Ok((
            used,
            Next::Block(BlockInfo {
                records: prelude.count,
                wire_len: prelude.total,
                codec,
                data_len,
                in_place: stream.plan.kind() == SchemaKind::Current,
            }),
        ))
    }

    /// Frees the decompression buffer: call it once a block's view is no
    /// longer needed, so that a connection waiting for its next block holds
    /// no decompressed bytes.
    pub fn release_scratch(&mut self) {
        self.scratch = Vec::new();
    }

    fn step_header(&mut self, input: &[u8]) -> Result<Step, (usize, DecodeErrorKind)> {
        if input.len() < self.header_needs {
            check_magic(input)?;
            return Ok(Step::NeedMore);
        }
        let (header, needs) = parse_header_needing(input, &self.limits)?;
        self.header_needs = needs;
        let Some(header) = header else {
            return Ok(Step::NeedMore);
        };
        let plan = match &self.stream {
            // Concatenated files usually repeat the same schema: skip re-parsing it.
            Some(previous) if previous.header.schema_json == header.schema_json => {
                previous.plan.clone()
            }
            _ if header.schema_json == HEADER_SCHEMA_JSON => ReaderPlan::current(),
            _ => ReaderPlan::for_writer_schema(&header.schema_json).map_err(|e| (0, e.into()))?,
        };
        let len = header.len;
        self.stream = Some(Stream { header, plan });
        self.files += 1;
        Ok(Step::Header(len))
    }
}

/// The block after the headers (`used` bytes) of `input`, read in place,
/// keeping the decoder's offset and failure up to date.
fn view_block<'a>(
    stream: &Stream,
    limits: &Limits,
    scratch: &'a mut Vec<u8>,
    input: &'a [u8],
    used: usize,
    offset: &mut u64,
    failed: &mut Option<DecodeError>,
) -> Result<(usize, Option<BlockView<'a>>), DecodeError> {
    match step_block(stream, limits, scratch, &input[used..], true, *offset) {
        Ok(None) => Ok((used, None)),
        Ok(Some((n, view))) => {
            *offset += n as u64;
            Ok((used + n, Some(view)))
        }
        Err((relative, kind)) => {
            let error = DecodeError {
                offset: *offset + relative as u64,
                kind,
            };
            *failed = Some(error.clone());
            Err(error)
        }
    }
}

/// A block's framing, read from its first bytes: the record count, where
/// its data lies, and whether the whole block has arrived.
struct Prelude {
    count: u64,
    data_start: usize,
    size: usize,
    /// Bytes from the block's first byte to the end of its sync marker.
    total: usize,
}

/// Reads the count and size at the start of `input` and checks them
/// against the limits: `Ok(None)` when even those have not all arrived.
fn block_prelude(
    stream: &Stream,
    limits: &Limits,
    input: &[u8],
) -> Result<Option<Prelude>, (usize, DecodeErrorKind)> {
    let (count, after_count) = match varint(input, 0) {
        Ok(Some(v)) => v,
        Ok(None) => return Ok(None),
        Err(()) => return Err((0, DecodeErrorKind::BadVarint)),
    };
    let (size, data_start) = match varint(input, after_count) {
        Ok(Some(v)) => v,
        Ok(None) => return Ok(None),
        Err(()) => return Err((0, DecodeErrorKind::BadVarint)),
    };
    let bad_count = || (0, DecodeErrorKind::BadBlockCount { count, size });
    let (Ok(count), Ok(size)) = (u64::try_from(count), usize::try_from(size)) else {
        return Err(bad_count());
    };
    if size > limits.max_block_bytes {
        return Err((
            0,
            DecodeErrorKind::BlockTooLarge {
                size: size as u64,
                limit: limits.max_block_bytes,
            },
        ));
    }
    let max_data = match stream.header.codec {
        Codec::Null => size,
        _ => limits.max_decompressed_block_bytes,
    };
    if count > (max_data / MIN_METRIC_LIST_LEN) as u64 {
        return Err(bad_count());
    }
    Ok(Some(Prelude {
        count,
        data_start,
        size,
        total: data_start + size + 16,
    }))
}

/// Reads one block at the start of `input`: `Ok(None)` when it is not
/// all there yet. With `raw`, records of the current schema are scanned in
/// place instead of decoded.
fn step_block<'a>(
    stream: &Stream,
    limits: &Limits,
    scratch: &'a mut Vec<u8>,
    input: &'a [u8],
    raw: bool,
    offset: u64,
) -> Result<Option<(usize, BlockView<'a>)>, (usize, DecodeErrorKind)> {
    let Some(Prelude {
        count,
        data_start,
        size,
        total,
    }) = block_prelude(stream, limits, input)?
    else {
        return Ok(None);
    };
    let sync_start = data_start + size;
    if input.len() < total {
        return Ok(None);
    }
    if input[sync_start..total] != stream.header.sync {
        let mut found = [0u8; 16];
        found.copy_from_slice(&input[sync_start..total]);
        return Err((
            sync_start,
            DecodeErrorKind::SyncMismatch {
                expected: stream.header.sync,
                found,
            },
        ));
    }
    let data = stream
        .header
        .codec
        .decompress(
            &input[data_start..sync_start],
            limits.max_decompressed_block_bytes,
            scratch,
        )
        .map_err(|e| (0, e.into()))?;
    let undecodable = |index, reason| (0, DecodeErrorKind::UndecodableRecord { index, reason });
    let capacity = (count as usize).min(data.len() / MIN_METRIC_LIST_LEN);
    let (read, view) = if raw && stream.plan.kind() == SchemaKind::Current {
        let mut cursor = datum::Cursor::new(data);
        let mut records = Vec::with_capacity(capacity);
        for index in 0..count {
            let record = raw::scan_metric_list(&mut cursor)
                .map_err(|e| undecodable(index, e.to_string()))?;
            records.push(record);
        }
        (
            cursor.position(),
            BlockView::Raw(RawBlock {
                records,
                offset,
                wire_len: total,
                data_len: data.len(),
            }),
        )
    } else {
        let mut records = Vec::with_capacity(capacity);
        let read = stream
            .plan
            .read_records(data, count, &mut records)
            .map_err(|e| undecodable(e.index, e.reason))?;
        (
            read,
            BlockView::Decoded(Block {
                records,
                offset,
                wire_len: total,
                data_len: data.len(),
            }),
        )
    };
    if read != data.len() {
        return Err((0, DecodeErrorKind::TrailingBytes(data.len() - read)));
    }
    Ok(Some((total, view)))
}

/// Decodes a complete input (one or more whole OCF files) at once.
pub fn decode_all(input: &[u8], limits: Limits) -> Result<Vec<MetricList>, DecodeError> {
    let mut decoder = StreamDecoder::new(limits);
    let mut records = Vec::new();
    let mut rest = input;
    loop {
        let (used, block) = decoder.decode_slice(rest)?;
        rest = &rest[used..];
        match block {
            Some(block) => records.extend(block.records),
            None => {
                decoder.finish(rest)?;
                return Ok(records);
            }
        }
    }
}

/// Writes OCF headers and blocks of MetricLists in the current schema: the
/// one place OCF framing is written, for whole files (one per Kafka
/// message) and for streams (the partner output, the simulator's
/// producers).
#[derive(Debug, Clone)]
pub struct OcfEncoder {
    codec: Codec,
    sync: [u8; 16],
    header: Vec<u8>,
    data: Vec<u8>,
}

/// The most a block's record count and byte size take: two varints.
const BLOCK_VARINTS_MAX: usize = 20;

impl OcfEncoder {
    /// An encoder with a random sync marker.
    pub fn new(codec: Codec) -> Self {
        Self::with_sync(codec, rand::random())
    }

    /// An encoder with a fixed sync marker, such as [`MODULE_SYNC`].
    pub fn with_sync(codec: Codec, sync: [u8; 16]) -> Self {
        let mut header = Vec::with_capacity(640);
        header.extend_from_slice(&MAGIC);
        datum::write_long(&mut header, 2);
        datum::write_bytes(&mut header, b"avro.codec");
        datum::write_bytes(&mut header, codec.name().as_bytes());
        datum::write_bytes(&mut header, b"avro.schema");
        datum::write_bytes(&mut header, HEADER_SCHEMA_JSON.as_bytes());
        datum::write_long(&mut header, 0);
        header.extend_from_slice(&sync);
        Self {
            codec,
            sync,
            header,
            data: Vec::new(),
        }
    }

    /// The block codec.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The sync marker.
    pub fn sync(&self) -> [u8; 16] {
        self.sync
    }

    /// The header: magic, `{avro.codec, avro.schema}`, sync. With the null
    /// codec and [`MODULE_SYNC`] this is the module's exact 601 bytes.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// Appends the header.
    pub fn write_header(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header);
    }

    /// The most a one-block file adds around its records' encoded bytes,
    /// uncompressed: header, record count, byte size, sync.
    pub fn file_overhead(&self) -> usize {
        self.header.len() + BLOCK_VARINTS_MAX + self.sync.len()
    }

    /// Appends one block holding `records`.
    pub fn write_block(&mut self, records: &[MetricList], out: &mut Vec<u8>) {
        let mut data = std::mem::take(&mut self.data);
        data.clear();
        for record in records {
            datum::write_metric_list(&mut data, record);
        }
        self.write_encoded_block(records.len(), &data, out);
        self.data = data;
    }

    /// Appends one block of `count` records already encoded back to back in
    /// `encoded` (see [`datum::write_metric_list`]).
    pub fn write_encoded_block(&self, count: usize, encoded: &[u8], out: &mut Vec<u8>) {
        self.write_encoded_parts(count, &[encoded], out);
    }

    /// Appends one block of `count` records already encoded, in `parts`
    /// taken back to back. With the null codec the parts are copied once,
    /// straight into `out`.
    pub fn write_encoded_parts<P: AsRef<[u8]>>(
        &self,
        count: usize,
        parts: &[P],
        out: &mut Vec<u8>,
    ) {
        datum::write_long(out, count as i64);
        match self.codec {
            Codec::Null => {
                let len: usize = parts.iter().map(|p| p.as_ref().len()).sum();
                datum::write_long(out, len as i64);
                for part in parts {
                    out.extend_from_slice(part.as_ref());
                }
            }
            codec => {
                let encoded = parts.iter().fold(Vec::new(), |mut all, part| {
                    all.extend_from_slice(part.as_ref());
                    all
                });
                let mut packed = Vec::with_capacity(encoded.len() / 2 + 16);
                codec.compress(&encoded, &mut packed);
                datum::write_bytes(out, &packed);
            }
        }
        out.extend_from_slice(&self.sync);
    }

    /// A whole OCF file holding `records` in one block: one Kafka message.
    pub fn file(&mut self, records: &[MetricList]) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            self.file_overhead() + records.iter().map(datum::encoded_len).sum::<usize>(),
        );
        self.write_header(&mut out);
        self.write_block(records, &mut out);
        out
    }

    /// A whole OCF file of `count` records already encoded in `parts`, in
    /// one exactly sized allocation with the null codec.
    pub fn file_from_parts<P: AsRef<[u8]>>(&self, count: usize, parts: &[P]) -> Vec<u8> {
        let len: usize = parts.iter().map(|p| p.as_ref().len()).sum();
        let exact = match self.codec {
            Codec::Null => {
                self.header.len()
                    + datum::long_len(count as i64)
                    + datum::long_len(len as i64)
                    + len
                    + self.sync.len()
            }
            _ => self.file_overhead() + len,
        };
        let mut out = Vec::with_capacity(exact);
        self.write_header(&mut out);
        self.write_encoded_parts(count, parts, &mut out);
        out
    }

    /// The block of `file`, a one-block file written by an encoder with
    /// this codec (whatever its sync marker), marked with this encoder's
    /// sync instead: what a stream that began with this encoder's header
    /// continues with. `None` when `file` is not such a file.
    pub fn block_of_file(&self, file: &[u8]) -> Option<Vec<u8>> {
        let sync_at = self.header.len() - self.sync.len();
        if file.len() < self.header.len() + 2 + self.sync.len()
            || file[..sync_at] != self.header[..sync_at]
            || file[sync_at..self.header.len()] != file[file.len() - self.sync.len()..]
        {
            return None;
        }
        let mut block = file[self.header.len()..].to_vec();
        let end = block.len() - self.sync.len();
        block[end..].copy_from_slice(&self.sync);
        Some(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Datapoint, Tag};

    fn sample() -> Vec<MetricList> {
        vec![
            MetricList {
                topic: "fw-1".into(),
                tags: vec![Tag::new("framework_id", "fw-1")],
                datapoints: vec![
                    Datapoint::new("cpu", 1000, 0.5),
                    Datapoint::new("mem", 1001, f64::NAN),
                ],
            },
            MetricList::default(),
        ]
    }

    #[test]
    fn module_header_is_601_bytes() {
        let mut out = Vec::new();
        OcfEncoder::with_sync(Codec::Null, MODULE_SYNC).write_header(&mut out);
        assert_eq!(out.len(), 601);
    }

    #[test]
    fn byte_at_a_time_gives_the_same_records() {
        let mut encoder = OcfEncoder::new(Codec::Snappy);
        let mut stream = Vec::new();
        encoder.write_header(&mut stream);
        encoder.write_block(&sample(), &mut stream);
        encoder.write_block(&sample()[..1], &mut stream);

        let mut decoder = StreamDecoder::new(Limits::default());
        let mut buf = BytesMut::new();
        let mut records = Vec::new();
        for byte in &stream {
            buf.extend_from_slice(&[*byte]);
            while let Some(block) = decoder.decode(&mut buf).unwrap() {
                records.extend(block.records);
            }
        }
        decoder.finish(&buf).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].datapoints[0], sample()[0].datapoints[0]);
        assert!(records[0].datapoints[1].value.is_nan());
    }

    #[test]
    fn errors_carry_the_offset() {
        let mut encoder = OcfEncoder::with_sync(Codec::Null, MODULE_SYNC);
        let mut stream = encoder.file(&sample());
        let last = stream.len() - 1;
        stream[last] = b'X';
        let err = decode_all(&stream, Limits::default()).unwrap_err();
        assert!(
            matches!(err.kind, DecodeErrorKind::SyncMismatch { .. }),
            "{err}"
        );
        assert_eq!(err.offset, (stream.len() - 16) as u64);
    }

    #[test]
    fn huge_declared_block_is_refused_before_buffering() {
        let mut stream = Vec::new();
        OcfEncoder::new(Codec::Null).write_header(&mut stream);
        let header_len = stream.len();
        datum::write_long(&mut stream, 1);
        datum::write_long(&mut stream, 1 << 40);
        let err = StreamDecoder::new(Limits::default())
            .decode_slice(&stream)
            .unwrap_err();
        assert!(
            matches!(err.kind, DecodeErrorKind::BlockTooLarge { .. }),
            "{err}"
        );
        assert_eq!(err.offset, header_len as u64);
    }

    #[test]
    fn bad_magic_is_reported_at_offset_zero() {
        let err = decode_all(b"GET / HTTP/1.1\r\n", Limits::default()).unwrap_err();
        assert!(
            matches!(err.kind, DecodeErrorKind::BadMagic { .. }),
            "{err}"
        );
        assert_eq!(err.offset, 0);
    }

    /// A header that arrives a byte at a time is not parsed again from its
    /// start for every byte: the decoder waits until the string it stopped
    /// in can be whole. (A 64 KiB header sent a byte at a time used to cost
    /// about 2 billion byte reads.)
    #[test]
    fn a_trickled_header_is_parsed_a_few_times_not_once_per_byte() {
        let mut header = Vec::new();
        OcfEncoder::with_sync(Codec::Null, MODULE_SYNC).write_header(&mut header);
        let mut decoder = StreamDecoder::new(Limits::default());
        let mut parses = 0;
        for end in 1..header.len() {
            let before = decoder.header_needs;
            assert!(matches!(
                decoder.decode_slice(&header[..end]),
                Ok((0, None))
            ));
            if end >= before {
                parses += 1;
            }
        }
        let (used, block) = decoder.decode_slice(&header).unwrap();
        assert_eq!((used, block.is_none()), (header.len(), true));
        assert!(
            parses < 20,
            "{parses} parses of a {}-byte header",
            header.len()
        );
    }

    /// Found by fuzzing (ocf_stream): the error named however many bytes had
    /// arrived, so the same stream cut differently failed differently.
    #[test]
    fn bad_magic_is_the_same_however_the_stream_is_cut() {
        let stream = b"Ob\x8e\xfe\xf9";
        let whole = decode_all(stream, Limits::default()).unwrap_err();
        let mut decoder = StreamDecoder::new(Limits::default());
        assert!(matches!(decoder.decode_slice(&stream[..2]), Ok((0, None))));
        let cut = decoder.decode_slice(&stream[..3]).unwrap_err();
        assert_eq!(whole, cut);
        assert_eq!(
            whole.kind,
            DecodeErrorKind::BadMagic {
                found: b"Ob\x8e".to_vec()
            }
        );
    }

    #[test]
    fn truncation_is_an_error_at_end_of_input_only() {
        let stream = OcfEncoder::new(Codec::Deflate).file(&sample());
        let cut = &stream[..stream.len() - 3];
        let mut decoder = StreamDecoder::new(Limits::default());
        let (used, block) = decoder.decode_slice(cut).unwrap();
        assert!(block.is_none());
        let err = decoder.finish(&cut[used..]).unwrap_err();
        assert!(
            matches!(
                err.kind,
                DecodeErrorKind::Truncated {
                    inside: "block",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn concatenated_files_decode_in_order() {
        let mut a = OcfEncoder::new(Codec::Null).file(&sample()[..1]);
        a.extend(OcfEncoder::new(Codec::Snappy).file(&sample()));
        let records = decode_all(&a, Limits::default()).unwrap();
        assert_eq!(records.len(), 3);
    }

    #[test]
    fn oversized_header_is_refused() {
        let limits = Limits {
            max_header_bytes: 100,
            ..Limits::default()
        };
        let stream = OcfEncoder::new(Codec::Null).file(&sample());
        let err = decode_all(&stream, limits).unwrap_err();
        assert!(
            matches!(err.kind, DecodeErrorKind::HeaderTooLarge { limit: 100 }),
            "{err}"
        );
    }

    #[test]
    fn a_file_from_parts_is_the_file_of_its_records() {
        for codec in [Codec::Null, Codec::Deflate, Codec::Snappy] {
            let records = sample();
            let mut encoder = OcfEncoder::with_sync(codec, [9; 16]);
            let parts: Vec<Vec<u8>> = records
                .iter()
                .map(|r| {
                    let mut part = Vec::new();
                    datum::write_metric_list(&mut part, r);
                    part
                })
                .collect();
            let from_parts = encoder.file_from_parts(records.len(), &parts);
            assert_eq!(from_parts, encoder.file(&records), "{codec:?}");
            if codec == Codec::Null {
                assert_eq!(from_parts.len(), from_parts.capacity());
            }
            assert!(from_parts.len() <= encoder.file_overhead() + parts.concat().len());
        }
    }

    /// The partner output's stream: its own header, then the blocks of
    /// files written with other sync markers, re-marked.
    #[test]
    fn blocks_of_files_continue_a_stream_under_another_header() {
        let records = sample();
        let stream_encoder = OcfEncoder::new(Codec::Null);
        let mut stream = stream_encoder.header().to_vec();
        for i in 0..3 {
            let file = OcfEncoder::new(Codec::Null).file(&records[..=i.min(records.len() - 1)]);
            stream.extend(
                stream_encoder
                    .block_of_file(&file)
                    .expect("a one-block file"),
            );
        }
        let decoded = decode_all(&stream, Limits::default()).unwrap();
        assert_eq!(decoded.len(), 1 + 2 + 2);
        // Not such a file: another codec, a cut file, a bare header.
        let deflated = OcfEncoder::new(Codec::Deflate).file(&records);
        assert_eq!(stream_encoder.block_of_file(&deflated), None);
        let file = OcfEncoder::new(Codec::Null).file(&records);
        assert_eq!(stream_encoder.block_of_file(&file[..file.len() - 1]), None);
        assert_eq!(stream_encoder.block_of_file(stream_encoder.header()), None);
    }
}

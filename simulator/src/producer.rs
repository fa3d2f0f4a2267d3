//! Module producers: OCF over TCP, like the mesos-agent module and other
//! local processes.
//!
//! Every MetricList carries the tags `sim_producer` (the producer's id) and
//! `sim_seq` (its record sequence number, from 0), so that a verifier can
//! find every missing, duplicated or reordered record.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use schema::ocf::MODULE_SYNC;
use schema::{Codec, Datapoint, MetricList, OcfEncoder, Tag};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Tag naming the producer of a record.
pub const PRODUCER_TAG: &str = "sim_producer";
/// Tag holding a record's sequence number within its producer.
pub const SEQ_TAG: &str = "sim_seq";

/// Ways to send a broken stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Random bytes, no header.
    Garbage,
    /// A valid header, then a block cut short before the connection closes.
    TruncatedBlock,
    /// A valid header and block whose sync marker is wrong.
    BadSync,
    /// A valid header, then a block declaring a 1 TiB size.
    HugeBlock,
}

/// What a producer sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerReport {
    /// The producer's id.
    pub id: String,
    /// Blocks written.
    pub blocks: u64,
    /// MetricLists written.
    pub records: u64,
    /// Datapoints written.
    pub datapoints: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Builds a producer. `module()` gives the mesos module's exact framing.
#[derive(Debug, Clone)]
pub struct ProducerBuilder {
    addr: SocketAddr,
    id: String,
    topic: String,
    codec: Codec,
    module_sync: bool,
    blocks: u64,
    records_per_block: usize,
    datapoints_per_record: usize,
    interval: Option<Duration>,
    malformed: Option<Malformed>,
    stop: Option<Arc<AtomicBool>>,
}

/// A producer sending to `addr`.
pub fn producer(addr: SocketAddr, id: impl Into<String>) -> ProducerBuilder {
    let id = id.into();
    ProducerBuilder {
        addr,
        topic: format!("framework-{id}"),
        id,
        codec: Codec::Null,
        module_sync: true,
        blocks: 10,
        records_per_block: 5,
        datapoints_per_record: 20,
        interval: None,
        malformed: None,
        stop: None,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl ProducerBuilder {
    /// The mesos module's framing: null codec, sync `FEFEFEFEFEFEFEFE`, so
    /// its first 601 bytes equal the reference header.
    pub fn module(mut self) -> Self {
        self.codec = Codec::Null;
        self.module_sync = true;
        self
    }

    /// "Another process": this codec and a random sync.
    pub fn other_process(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self.module_sync = false;
        self
    }

    /// The record `topic` (the collector prefixes it).
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self
    }

    /// How many blocks to send.
    pub fn blocks(mut self, blocks: u64) -> Self {
        self.blocks = blocks;
        self
    }

    /// Records per block and datapoints per record.
    pub fn shape(mut self, records_per_block: usize, datapoints_per_record: usize) -> Self {
        self.records_per_block = records_per_block;
        self.datapoints_per_record = datapoints_per_record;
        self
    }

    /// Wait this long between blocks (default: as fast as possible).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    /// Keep sending (up to `blocks`) until `stop` is set.
    pub fn until(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// Send a broken stream instead.
    pub fn malformed(mut self, mode: Malformed) -> Self {
        self.malformed = Some(mode);
        self
    }

    /// The records of block `block`, numbered from `first_seq`.
    pub fn block_records(&self, first_seq: u64) -> Vec<MetricList> {
        let time_ms = now_ms();
        (0..self.records_per_block as u64)
            .map(|i| MetricList {
                topic: self.topic.clone(),
                tags: vec![
                    Tag::new(PRODUCER_TAG, &self.id),
                    Tag::new(SEQ_TAG, (first_seq + i).to_string()),
                    Tag::new("framework_id", &self.topic),
                ],
                datapoints: (0..self.datapoints_per_record)
                    .map(|j| {
                        Datapoint::new(
                            format!("usage.metric_{j}"),
                            time_ms,
                            (first_seq + i) as f64 + j as f64 / 100.0,
                        )
                    })
                    .collect(),
            })
            .collect()
    }

    fn encoder(&self) -> OcfEncoder {
        if self.module_sync {
            OcfEncoder::with_sync(self.codec, MODULE_SYNC)
        } else {
            OcfEncoder::new(self.codec)
        }
    }

    /// Connects, sends, closes. Returns what was written.
    pub async fn run(self) -> std::io::Result<ProducerReport> {
        let mut stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let mut report = ProducerReport {
            id: self.id.clone(),
            ..ProducerReport::default()
        };
        let mut encoder = self.encoder();
        let mut out = Vec::with_capacity(64 * 1024);
        encoder.write_header(&mut out);
        if let Some(mode) = self.malformed {
            return self.run_malformed(stream, mode, out, report).await;
        }
        let mut seq = 0u64;
        for _ in 0..self.blocks {
            if self
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
            {
                break;
            }
            let records = self.block_records(seq);
            seq += records.len() as u64;
            encoder.write_block(&records, &mut out);
            report.blocks += 1;
            report.records += records.len() as u64;
            report.datapoints += records
                .iter()
                .map(|r| r.datapoints.len() as u64)
                .sum::<u64>();
            if self.interval.is_some() || out.len() >= 32 * 1024 {
                stream.write_all(&out).await?;
                report.bytes += out.len() as u64;
                out.clear();
            }
            if let Some(interval) = self.interval {
                tokio::time::sleep(interval).await;
            }
        }
        stream.write_all(&out).await?;
        report.bytes += out.len() as u64;
        stream.shutdown().await?;
        Ok(report)
    }

    async fn run_malformed(
        &self,
        mut stream: TcpStream,
        mode: Malformed,
        mut out: Vec<u8>,
        mut report: ProducerReport,
    ) -> std::io::Result<ProducerReport> {
        let mut encoder = self.encoder();
        match mode {
            Malformed::Garbage => {
                out = (0..4096).map(|_| rand::random::<u8>()).collect();
                // Never let garbage start with the magic by chance.
                out[0] = b'G';
            }
            Malformed::TruncatedBlock => {
                let mut block = Vec::new();
                encoder.write_block(&self.block_records(0), &mut block);
                out.extend_from_slice(&block[..block.len() / 2]);
            }
            Malformed::BadSync => {
                encoder.write_block(&self.block_records(0), &mut out);
                let last = out.len() - 1;
                out[last] ^= 0xff;
            }
            Malformed::HugeBlock => {
                schema::datum::write_long(&mut out, 1);
                schema::datum::write_long(&mut out, 1 << 40);
            }
        }
        stream.write_all(&out).await?;
        report.bytes = out.len() as u64;
        let _ = stream.shutdown().await;
        Ok(report)
    }
}

/// Bytes waiting for the socket, and where each block in them lies.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// How much of `bytes` the current connection has taken.
    written: usize,
    /// Blocks not yet completely written, oldest first.
    blocks: std::collections::VecDeque<PendingBlock>,
}

#[derive(Clone, Copy)]
struct PendingBlock {
    start: usize,
    end: usize,
    datapoints: u64,
}

impl Pending {
    /// Bytes not yet written.
    fn unsent(&self) -> &[u8] {
        &self.bytes[self.written..]
    }

    fn unsent_len(&self) -> usize {
        self.bytes.len() - self.written
    }

    fn push(&mut self, block: &[u8], datapoints: u64) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(block);
        self.blocks.push_back(PendingBlock {
            start,
            end: self.bytes.len(),
            datapoints,
        });
    }

    /// `written` more bytes went to the socket; returns the datapoints of
    /// the blocks now completely written.
    fn advance(&mut self, written: usize) -> u64 {
        self.written += written;
        let mut sent = 0;
        while let Some(block) = self.blocks.front().copied() {
            if block.end > self.written {
                break;
            }
            sent += block.datapoints;
            self.blocks.pop_front();
        }
        // Drop what is written, but keep the start of a block cut short.
        let cut = self
            .blocks
            .front()
            .map_or(self.written, |b| b.start.min(self.written));
        self.cut(cut);
        sent
    }

    fn cut(&mut self, cut: usize) {
        self.bytes.drain(..cut);
        self.written -= cut;
        for block in &mut self.blocks {
            block.start -= cut;
            block.end -= cut;
        }
    }

    /// A new connection: the header goes first. A block the last connection
    /// cut short is lost (returns its datapoints); whole blocks stay.
    fn reconnect(&mut self, header: &[u8]) -> u64 {
        let mut lost = 0;
        if let Some(block) = self.blocks.front().copied()
            && block.start < self.written
        {
            lost = block.datapoints;
            self.blocks.pop_front();
        }
        let keep_from = self.blocks.front().map_or(self.bytes.len(), |b| b.start);
        self.written = keep_from;
        self.cut(keep_from);
        self.bytes.splice(0..0, header.iter().copied());
        for block in &mut self.blocks {
            block.start += header.len();
            block.end += header.len();
        }
        lost
    }

    /// Everything pending is lost: returns its datapoints.
    fn lose(&mut self) -> u64 {
        self.bytes.clear();
        self.written = 0;
        self.blocks.drain(..).map(|b| b.datapoints).sum()
    }
}

/// One block of every container's accumulated datapoints, each record
/// tagged with the next sequence number.
fn take_block(lists: &mut [MetricList], seq: &mut u64, encoder: &mut OcfEncoder) -> Vec<u8> {
    let mut records: Vec<MetricList> = Vec::new();
    for list in lists.iter_mut() {
        if list.datapoints.is_empty() {
            continue;
        }
        let mut record = list.clone();
        record.tags.push(Tag::new(SEQ_TAG, seq.to_string()));
        *seq += 1;
        records.push(record);
        list.datapoints.clear();
    }
    let mut block = Vec::new();
    encoder.write_block(&records, &mut block);
    block
}

/// True when the peer has closed its side (EOF) or the connection failed.
fn peer_closed(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 64];
    match stream.try_read(&mut probe) {
        Ok(0) => true,
        Ok(_) => false,
        Err(error) => error.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// What an emulated mesos module did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModuleReport {
    /// The module's id (`sim_producer` tag).
    pub id: String,
    /// Datapoints generated.
    pub generated: u64,
    /// Datapoints in blocks handed completely to the socket.
    pub sent: u64,
    /// Datapoints dropped: not connected, over the 256 KiB pending limit, or
    /// in a block cut by a broken connection.
    pub dropped: u64,
    /// Connections made.
    pub connects: u64,
}

/// Emulates the mesos-agent module's TCP output exactly
/// (`module/avro_encoder.cpp`, `tcp_sender.cpp` @ 8136116):
///
/// - the 601-byte header (null codec, sync `FEFEFEFEFEFEFEFE`) on every
///   (re)connect;
/// - one block per flush, when 100 datapoints have accumulated or every
///   10 s, with one MetricList per container;
/// - reconnect with exponential backoff 1, 2, 4 … 60 s;
/// - data dropped and counted while not connected, or when pending bytes
///   would go over 256 KiB.
#[derive(Debug, Clone)]
pub struct ModuleProducer {
    addr: SocketAddr,
    id: String,
    containers: usize,
    datapoints_per_sec: f64,
    flush_datapoints: usize,
    flush_interval: Duration,
    pending_limit: usize,
    backoff: (Duration, Duration),
    live: Option<Arc<std::sync::Mutex<ModuleReport>>>,
}

/// A mesos module emulator sending to `addr`.
pub fn module_producer(addr: SocketAddr, id: impl Into<String>) -> ModuleProducer {
    ModuleProducer {
        addr,
        id: id.into(),
        containers: 3,
        datapoints_per_sec: 100.0,
        flush_datapoints: 100,
        flush_interval: Duration::from_secs(10),
        pending_limit: 256 * 1024,
        backoff: (Duration::from_secs(1), Duration::from_secs(60)),
        live: None,
    }
}

impl ModuleProducer {
    /// Containers whose statsd datapoints it forwards.
    pub fn containers(mut self, n: usize) -> Self {
        self.containers = n.max(1);
        self
    }

    /// Datapoints generated per second, over all containers.
    pub fn rate(mut self, datapoints_per_sec: f64) -> Self {
        self.datapoints_per_sec = datapoints_per_sec;
        self
    }

    /// Overrides the module's constants (for fast tests).
    pub fn tuning(
        mut self,
        flush_interval: Duration,
        backoff: (Duration, Duration),
        pending_limit: usize,
    ) -> Self {
        self.flush_interval = flush_interval;
        self.backoff = backoff;
        self.pending_limit = pending_limit;
        self
    }

    /// Keeps `live` up to date with the report while it runs.
    pub fn live_report(mut self, live: Arc<std::sync::Mutex<ModuleReport>>) -> Self {
        self.live = Some(live);
        self
    }

    /// Runs until `stop`; returns what it did.
    pub async fn run(self, stop: Arc<AtomicBool>) -> ModuleReport {
        let mut report = ModuleReport {
            id: self.id.clone(),
            ..ModuleReport::default()
        };
        let encoder = OcfEncoder::with_sync(Codec::Null, MODULE_SYNC);
        let mut block_encoder = encoder.clone();
        let mut stream: Option<TcpStream> = None;
        let mut next_connect = tokio::time::Instant::now();
        let mut backoff = self.backoff.0;
        let mut pending = Pending::default();
        let mut lists: Vec<MetricList> = (0..self.containers)
            .map(|c| MetricList {
                topic: format!("5349f49b-68b3-4638-aab2-fc4ec845f993-{:04}", c % 2),
                tags: vec![
                    Tag::new(
                        "framework_id",
                        format!("5349f49b-68b3-4638-aab2-fc4ec845f993-{:04}", c % 2),
                    ),
                    Tag::new("executor_id", format!("{}-executor-{c}", self.id)),
                    Tag::new("container_id", format!("{}-container-{c}", self.id)),
                    Tag::new(PRODUCER_TAG, &self.id),
                ],
                datapoints: Vec::new(),
            })
            .collect();
        let mut seq = 0u64;
        let mut accumulated = 0usize;
        let mut last_flush = tokio::time::Instant::now();
        let tick = Duration::from_millis(20);
        let per_tick = self.datapoints_per_sec * tick.as_secs_f64();
        let mut carry = 0.0;
        let mut interval = tokio::time::interval(tick);
        while !stop.load(Ordering::Relaxed) {
            interval.tick().await;
            // Generate statsd-like datapoints; flush at 100 of them, or every 10 s.
            carry += per_tick;
            let timer_due = accumulated > 0 && last_flush.elapsed() >= self.flush_interval;
            while carry >= 1.0 || (timer_due && accumulated > 0) {
                if carry >= 1.0 {
                    carry -= 1.0;
                    let container = (report.generated as usize) % self.containers;
                    lists[container].datapoints.push(Datapoint::new(
                        format!("statsd.metric_{}", report.generated % 7),
                        now_ms(),
                        report.generated as f64,
                    ));
                    report.generated += 1;
                    accumulated += 1;
                }
                if accumulated < self.flush_datapoints && !(timer_due && carry < 1.0) {
                    continue;
                }
                last_flush = tokio::time::Instant::now();
                let block = take_block(&mut lists, &mut seq, &mut block_encoder);
                let datapoints = accumulated as u64;
                accumulated = 0;
                if stream.is_none() || pending.unsent_len() + block.len() > self.pending_limit {
                    report.dropped += datapoints;
                } else {
                    pending.push(&block, datapoints);
                }
            }
            // (Re)connect with backoff; the header goes first on every connection.
            if stream.is_none() && tokio::time::Instant::now() >= next_connect {
                match TcpStream::connect(self.addr).await {
                    Ok(s) => {
                        report.connects += 1;
                        backoff = self.backoff.0;
                        let mut header = Vec::new();
                        encoder.write_header(&mut header);
                        report.dropped += pending.reconnect(&header);
                        stream = Some(s);
                    }
                    Err(_) => {
                        next_connect = tokio::time::Instant::now() + backoff;
                        backoff = (backoff * 2).min(self.backoff.1);
                    }
                }
            }
            // The collector half-closes a connection when it shuts down: stop
            // writing to it (nothing written so far is lost) and reconnect,
            // keeping the whole blocks not yet written. (The real module
            // never reads its socket; see docs/local-cluster.md, "Known limits".)
            if let Some(s) = &stream
                && peer_closed(s)
            {
                stream = None;
                next_connect = tokio::time::Instant::now() + backoff;
                backoff = (backoff * 2).min(self.backoff.1);
            }
            // Send what the socket takes without blocking.
            if let Some(s) = &stream
                && pending.unsent_len() > 0
            {
                match s.try_write(pending.unsent()) {
                    Ok(written) => report.sent += pending.advance(written),
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        // The connection broke: what is pending is lost.
                        report.dropped += pending.lose();
                        stream = None;
                        next_connect = tokio::time::Instant::now() + backoff;
                        backoff = (backoff * 2).min(self.backoff.1);
                    }
                }
            }
            if let Some(live) = &self.live {
                *live.lock().unwrap_or_else(|p| p.into_inner()) = report.clone();
            }
        }
        // Stopping flushes what has accumulated, as a last block.
        if accumulated > 0 && stream.is_some() {
            let block = take_block(&mut lists, &mut seq, &mut block_encoder);
            pending.push(&block, accumulated as u64);
            accumulated = 0;
        }
        // Give the last pending bytes a moment (never re-sending a byte),
        // then count the rest.
        if let Some(mut s) = stream.take() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while pending.unsent_len() > 0 && tokio::time::Instant::now() < deadline {
                if tokio::time::timeout(Duration::from_millis(100), s.writable())
                    .await
                    .is_err()
                {
                    continue;
                }
                match s.try_write(pending.unsent()) {
                    Ok(written) => report.sent += pending.advance(written),
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
            let _ = s.shutdown().await;
        }
        report.dropped += pending.lose() + accumulated as u64;
        if let Some(live) = &self.live {
            *live.lock().unwrap_or_else(|p| p.into_inner()) = report.clone();
        }
        report
    }
}

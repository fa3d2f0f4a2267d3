//! Partner output: local partner processes connect over TCP and receive the
//! records Kafka received, as an OCF stream: a header per connection, then
//! one block per Kafka message that was acknowledged.
//!
//! A partner may first send one line, `topics=<comma list or regex>\n`, to
//! receive only those Kafka topics (a list of names, or a regular expression
//! matched against the whole topic name).
//!
//! A slow or stuck partner never slows Kafka delivery: each partner has a
//! bounded queue; when it is full the oldest blocks are dropped and counted,
//! and a partner that has lost more than its limit, or takes nothing of a
//! write within the write timeout, is disconnected with a log line. A
//! partner that closes its end is noticed at once (its half is read), so it
//! holds no descriptor. At most `max_partners` are connected; more are
//! refused and counted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt as _;
use regex::Regex;
use schema::{Codec, OcfEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::is_valid_topic;
use crate::shutdown::{Shutdown, Task};
use crate::stats::Stats;

/// Per-partner limits, changeable at runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartnerLimits {
    /// Bytes queued per partner before the oldest are dropped.
    pub buffer_bytes: usize,
    /// Dropped bytes after which a partner is disconnected.
    pub disconnect_after_dropped_bytes: usize,
    /// Most partners connected at once.
    pub max_partners: usize,
    /// A write that takes no bytes for this long disconnects the partner.
    pub write_timeout: Duration,
}

impl From<&crate::config::Config> for PartnerLimits {
    fn from(config: &crate::config::Config) -> Self {
        Self {
            buffer_bytes: config.partner_buffer_kbytes * 1024,
            disconnect_after_dropped_bytes: config.partner_disconnect_after_dropped_kbytes * 1024,
            max_partners: config.max_partners,
            write_timeout: Duration::from_secs(config.partner_write_timeout_secs),
        }
    }
}

/// Which topics a partner wants.
#[derive(Debug, Clone)]
pub enum TopicFilter {
    /// Everything.
    All,
    /// These names.
    List(Vec<String>),
    /// Topics the expression matches entirely.
    Pattern(Regex),
}

impl TopicFilter {
    /// Parses the value of a `topics=` line.
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        if value.is_empty() {
            return Ok(TopicFilter::All);
        }
        let names: Vec<&str> = value.split(',').map(str::trim).collect();
        if names.iter().all(|n| is_valid_topic(n)) {
            return Ok(TopicFilter::List(
                names.into_iter().map(str::to_owned).collect(),
            ));
        }
        regex::RegexBuilder::new(&format!("^(?:{value})$"))
            // A hostile line may not make a large automaton.
            .size_limit(1 << 20)
            .dfa_size_limit(1 << 20)
            .build()
            .map(TopicFilter::Pattern)
            .map_err(|e| format!("not a topic list or a regex: {e}"))
    }

    /// Whether `topic` passes.
    pub fn accepts(&self, topic: &str) -> bool {
        match self {
            TopicFilter::All => true,
            TopicFilter::List(names) => names.iter().any(|n| n == topic),
            TopicFilter::Pattern(pattern) => pattern.is_match(topic),
        }
    }
}

#[derive(Default)]
struct Queue {
    blocks: VecDeque<Bytes>,
    bytes: usize,
    dropped_bytes: usize,
}

struct Partner {
    peer: String,
    filter: TopicFilter,
    queue: Mutex<Queue>,
    ready: Notify,
    /// Cut off for falling too far behind: its writer stops, even in the
    /// middle of a write.
    cut: CancellationToken,
}

/// The fan-out to every connected partner.
pub struct PartnerHub {
    /// Writes the stream's header; Kafka messages' blocks are re-marked
    /// with its sync.
    encoder: OcfEncoder,
    partners: Mutex<Vec<Arc<Partner>>>,
    /// Partner connections open, whether or not they have sent their
    /// topics line yet: what the limit counts.
    connections: AtomicUsize,
    limits: watch::Receiver<PartnerLimits>,
    stats: Arc<Stats>,
}

impl PartnerHub {
    /// A hub for Kafka messages (null-codec OCF files, one block each).
    pub fn new(limits: watch::Receiver<PartnerLimits>, stats: Arc<Stats>) -> Self {
        Self {
            encoder: OcfEncoder::new(Codec::Null),
            partners: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            limits,
            stats,
        }
    }

    fn partners(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Partner>>> {
        self.partners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Partners connected now.
    pub fn count(&self) -> usize {
        self.partners().len()
    }

    /// Hands a delivered Kafka message (a whole OCF file) to the partners
    /// that want its topic. Never blocks: called from delivery callbacks.
    pub fn publish(&self, topic: &str, payload: &[u8]) {
        let partners = self.partners();
        if partners.is_empty() {
            return;
        }
        let Some(block) = self.encoder.block_of_file(payload) else {
            return;
        };
        let block = Bytes::from(block);
        let limits = *self.limits.borrow();
        for partner in partners.iter().filter(|p| p.filter.accepts(topic)) {
            let mut queue = partner.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.bytes += block.len();
            queue.blocks.push_back(block.clone());
            while queue.bytes > limits.buffer_bytes && queue.blocks.len() > 1 {
                if let Some(old) = queue.blocks.pop_front() {
                    queue.bytes -= old.len();
                    queue.dropped_bytes += old.len();
                    self.stats.partner_blocks_dropped.fetch_add(1, Relaxed);
                }
            }
            if queue.dropped_bytes > limits.disconnect_after_dropped_bytes
                && !partner.cut.is_cancelled()
            {
                partner.cut.cancel();
                self.stats.partners_disconnected_slow.fetch_add(1, Relaxed);
                warn!(peer = %partner.peer, dropped_bytes = queue.dropped_bytes, "Disconnected a partner too far behind.");
            }
            drop(queue);
            partner.ready.notify_one();
        }
    }
}

/// The longest `topics=` line read.
pub const MAX_REQUEST_LINE: usize = 4096;

/// Parses what a partner sent first: nothing, or `topics=<list or
/// regex>` (the newline already removed).
pub fn parse_request_line(line: &[u8]) -> Result<TopicFilter, String> {
    let line = String::from_utf8_lossy(line);
    match line.trim().strip_prefix("topics=") {
        Some(value) => TopicFilter::parse(value),
        None if line.trim().is_empty() => Ok(TopicFilter::All),
        None => Err(format!(
            "expected `topics=<list or regex>`, got {:?}",
            line.trim()
        )),
    }
}

/// Reads the optional `topics=` line: whatever the partner sends within a
/// short window, up to a newline.
async fn read_filter(stream: &mut TcpStream) -> Result<TopicFilter, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_millis(300), async {
        while line.len() < MAX_REQUEST_LINE {
            match stream.read(&mut byte).await {
                Ok(0) | Err(_) => break,
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => line.push(byte[0]),
            }
        }
    })
    .await;
    if read.is_err() && line.is_empty() {
        return Ok(TopicFilter::All);
    }
    parse_request_line(&line)
}

/// Why a partner's connection ended.
enum End {
    /// It closed its end, or a write failed.
    Gone,
    /// It fell too far behind.
    Cut,
    /// A write took nothing within the write timeout.
    Stalled,
    /// The collector is stopping.
    Shutdown,
}

/// Resolves when the partner closes its end (or its socket fails);
/// anything it sends after its topics line is read and ignored.
async fn closed(reader: &mut tokio::net::tcp::OwnedReadHalf) {
    let mut sink = [0u8; 256];
    loop {
        match reader.read(&mut sink).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn serve_partner(
    mut stream: TcpStream,
    peer: String,
    hub: Arc<PartnerHub>,
    shutdown: CancellationToken,
) {
    let filter = match read_filter(&mut stream).await {
        Ok(filter) => filter,
        Err(error) => {
            warn!(%peer, %error, "Refused a partner: bad topics line.");
            return;
        }
    };
    info!(%peer, filter = ?filter, "Partner connected.");
    let partner = Arc::new(Partner {
        peer: peer.clone(),
        filter,
        queue: Mutex::new(Queue::default()),
        ready: Notify::new(),
        cut: CancellationToken::new(),
    });
    hub.partners().push(partner.clone());
    hub.stats.partners_connected.fetch_add(1, Relaxed);
    let (mut reader, mut writer) = stream.into_split();
    let mut next = Some(Bytes::copy_from_slice(hub.encoder.header()));
    let end = loop {
        let Some(block) = next.take() else {
            tokio::select! {
                () = partner.ready.notified() => {}
                () = closed(&mut reader) => break End::Gone,
                () = partner.cut.cancelled() => break End::Cut,
                () = shutdown.cancelled() => break End::Shutdown,
            }
            next = {
                let mut queue = partner.queue.lock().unwrap_or_else(|p| p.into_inner());
                let block = queue.blocks.pop_front();
                if let Some(block) = &block {
                    queue.bytes -= block.len();
                }
                block
            };
            continue;
        };
        let write_timeout = hub.limits.borrow().write_timeout;
        tokio::select! {
            written = tokio::time::timeout(write_timeout, writer.write_all(&block)) => match written {
                Ok(Ok(())) => {
                    hub.stats
                        .partner_bytes_sent
                        .fetch_add(block.len() as u64, Relaxed);
                }
                Ok(Err(_)) => break End::Gone,
                Err(_) => break End::Stalled,
            },
            () = closed(&mut reader) => break End::Gone,
            () = partner.cut.cancelled() => break End::Cut,
            () = shutdown.cancelled() => break End::Shutdown,
        }
        next = {
            let mut queue = partner.queue.lock().unwrap_or_else(|p| p.into_inner());
            let block = queue.blocks.pop_front();
            if let Some(block) = &block {
                queue.bytes -= block.len();
            }
            block
        };
    };
    hub.partners().retain(|p| !Arc::ptr_eq(p, &partner));
    hub.stats.partners_connected.fetch_sub(1, Relaxed);
    let stream = reader.reunite(writer).ok();
    if matches!(end, End::Stalled | End::Cut)
        && let Some(stream) = &stream
    {
        // What the partner's socket still holds for it is not worth waiting
        // for: reset, so the descriptor is free at once.
        let _ = stream.set_zero_linger();
    }
    drop(stream);
    match end {
        End::Stalled => {
            hub.stats.partners_disconnected_slow.fetch_add(1, Relaxed);
            warn!(%peer, "Disconnected a partner that took nothing within the write timeout.");
        }
        End::Gone => info!(%peer, "Partner disconnected."),
        End::Cut | End::Shutdown => {}
    }
}

/// Spawns the partner output; it stops with the outputs, once the sink has
/// delivered what it could.
pub fn spawn(listener: TcpListener, hub: Arc<PartnerHub>, shutdown: &Shutdown) -> Task {
    Task::spawn(
        "partner output",
        serve(listener, hub, shutdown.outputs().clone()),
    )
}

/// Accepts partners until `shutdown`, at most `max_partners` at once.
async fn serve(listener: TcpListener, hub: Arc<PartnerHub>, shutdown: CancellationToken) {
    let mut failures = 0;
    while let Some((stream, peer)) = crate::net::accept(
        &listener,
        "partner accept",
        &mut failures,
        &hub.stats,
        &shutdown,
    )
    .await
    {
        let max = hub.limits.borrow().max_partners;
        if hub.connections.load(Relaxed) >= max {
            hub.stats.partners_refused.fetch_add(1, Relaxed);
            crate::telemetry::throttled_warn("partner refused", |repeats| {
                warn!(%peer, max_partners = max, repeats, "Refused a partner connection: at the partner limit.");
            });
            drop(stream);
            continue;
        }
        hub.connections.fetch_add(1, Relaxed);
        let hub = hub.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let served = std::panic::AssertUnwindSafe(serve_partner(
                stream,
                peer.clone(),
                hub.clone(),
                shutdown,
            ))
            .catch_unwind()
            .await;
            if let Err(panic) = served {
                hub.stats.task_panics.fetch_add(1, Relaxed);
                tracing::error!(%peer, panic = %crate::shutdown::panic_message(panic), "A partner connection's task panicked; it was closed.");
            }
            hub.connections.fetch_sub(1, Relaxed);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        assert!(TopicFilter::parse("").unwrap().accepts("x"));
        let list = TopicFilter::parse("metrics-a, metrics-b").unwrap();
        assert!(list.accepts("metrics-b") && !list.accepts("metrics-c"));
        let pattern = TopicFilter::parse("metrics-.*-prod").unwrap();
        assert!(pattern.accepts("metrics-kafka-prod") && !pattern.accepts("metrics-kafka-prod2"));
        assert!(TopicFilter::parse("(").is_err());
    }

    #[test]
    fn a_slow_partner_loses_the_oldest_and_is_cut_off() {
        let (_tx, limits) = watch::channel(PartnerLimits {
            buffer_bytes: 100,
            disconnect_after_dropped_bytes: 150,
            max_partners: 8,
            write_timeout: Duration::from_secs(10),
        });
        let stats = Arc::new(Stats::default());
        let hub = PartnerHub::new(limits, stats.clone());
        let partner = Arc::new(Partner {
            peer: "127.0.0.1:1".into(),
            filter: TopicFilter::All,
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            cut: CancellationToken::new(),
        });
        hub.partners().push(partner.clone());
        // A 60-byte block: 44 bytes, then the file's sync marker.
        let mut payload = hub.encoder.header().to_vec();
        payload.extend([0u8; 44]);
        payload.extend(hub.encoder.sync());
        for _ in 0..3 {
            hub.publish("t", &payload);
        }
        // 60-byte blocks into a 100-byte queue: each new block pushes the oldest out.
        assert_eq!(stats.partner_blocks_dropped.load(Relaxed), 2);
        assert!(!partner.cut.is_cancelled());
        for _ in 0..3 {
            hub.publish("t", &payload);
        }
        assert!(
            partner.cut.is_cancelled(),
            "cut off after 150 dropped bytes"
        );
        assert_eq!(stats.partners_disconnected_slow.load(Relaxed), 1);
        assert!(partner.queue.lock().unwrap().bytes <= 120);
    }
}

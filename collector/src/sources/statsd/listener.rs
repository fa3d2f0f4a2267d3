//! A statsd UDP listener: reads packets, aggregates their lines (see
//! [`super::aggregate`]) and, every `statsd_flush_secs`, pushes every
//! series' value into the pipeline as records of one topic with the
//! source's tags. At shutdown, what the socket still holds is read and
//! flushed before it stops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use schema::Tag;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::aggregate::{Aggregator, Budget};
use super::parse::{Line, lines};
use crate::pipeline::Pipeline;
use crate::route::Router;
use crate::shutdown::{Shutdown, Task};
use crate::stats::{Input, Stats};

/// The largest UDP datagram.
const MAX_PACKET: usize = 65_536;

/// Packets read at shutdown, at most, before the last flush.
const DRAIN_PACKETS: usize = 10_000;

/// Bytes of datapoints made for one push, about: a flush of many series is
/// pushed in pieces, never made whole.
const FLUSH_PIECE_BYTES: usize = 256 * 1024;

/// What one listener does with what it reads.
#[derive(Debug, Clone)]
pub struct StatsdSettings {
    /// How often every series' value is pushed.
    pub flush: Duration,
    /// Percentiles of timings and histograms, each in (0, 100].
    pub percentiles: Vec<f64>,
    /// Series held, at most.
    pub max_series: usize,
    /// What every statsd series of the collector may take together.
    pub budget: Arc<Budget>,
}

impl StatsdSettings {
    /// The configuration's settings, within `budget`.
    pub fn new(config: &crate::config::Config, budget: Arc<Budget>) -> Self {
        Self {
            flush: Duration::from_secs(config.statsd_flush_secs),
            percentiles: config.statsd_percentile_values(),
            max_series: config.statsd_max_series_per_container,
            budget,
        }
    }
}

/// Binds a UDP socket at `addr` (port 0: the kernel's choice); returns it
/// with its address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, SocketAddr)> {
    let socket = UdpSocket::bind(addr).await?;
    let local = socket.local_addr()?;
    Ok((socket, local))
}

/// A statsd listener and where its records go.
pub struct StatsdListener {
    /// The socket.
    pub socket: UdpSocket,
    /// Its records' topic.
    pub topic: String,
    /// Its records' tags (before the series' own).
    pub tags: Vec<Tag>,
    /// Settings.
    pub settings: StatsdSettings,
    /// Where records go.
    pub pipeline: Arc<Pipeline>,
}

/// The socket's inode, by which the kernel's tables name it.
fn inode(socket: &UdpSocket) -> Option<u64> {
    rustix::fs::fstat(socket).ok().map(|st| st.st_ino)
}

/// Datagrams the kernel dropped for the socket of `inode` (its receive
/// buffer full), from the `drops` column of `/proc/net/udp` and `udp6`
/// (in `proc_net`).
pub fn kernel_drops(proc_net: &std::path::Path, inode: u64) -> Option<u64> {
    let wanted = inode.to_string();
    ["udp", "udp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(proc_net.join(table)).ok()?;
        text.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
            (fields.get(9) == Some(&wanted.as_str())).then(|| fields.get(12)?.parse().ok())?
        })
    })
}

/// Counts into `stats` what the kernel dropped for the socket of `inode`
/// since `seen`, and logs it.
fn count_kernel_drops(inode: Option<u64>, seen: &mut u64, stats: &Stats) {
    let Some(drops) = inode.and_then(|i| kernel_drops("/proc/net".as_ref(), i)) else {
        return;
    };
    let new = drops.saturating_sub(*seen);
    *seen = drops;
    if new > 0 {
        stats
            .statsd_packets_dropped_by_kernel
            .fetch_add(new, Relaxed);
        crate::telemetry::throttled_warn("statsd kernel drops", |repeats| {
            warn!(
                dropped = new,
                repeats,
                "The kernel dropped statsd packets: the listener's receive buffer was full."
            );
        });
    }
}

/// Counts what a packet held into `stats` and `aggregator`.
pub fn take_packet(packet: &[u8], aggregator: &mut Aggregator, stats: &Stats) {
    stats.statsd_packets.fetch_add(1, Relaxed);
    let mut line = Line::default();
    let mut tags = Vec::new();
    for text in lines(packet) {
        match text.and_then(|text| line.read(text)) {
            Ok(()) => {
                stats.statsd_lines.fetch_add(1, Relaxed);
                aggregator.add(&line, &mut tags);
            }
            Err(reason) => {
                stats.statsd_lines_malformed.fetch_add(1, Relaxed);
                crate::telemetry::throttled_warn("statsd line malformed", |repeats| {
                    warn!(%reason, repeats, "A statsd line was refused; the rest of its packet is read.");
                });
            }
        }
    }
    // What the packet's values could not be taken for, counted at once.
    let refused = aggregator.take_refused();
    if refused != Default::default() {
        stats
            .statsd_series_refused
            .fetch_add(refused.series + refused.too_long, Relaxed);
        stats
            .statsd_set_members_refused
            .fetch_add(refused.set_members, Relaxed);
    }
}

impl StatsdListener {
    /// Runs until the shutdown begins, then reads what the socket holds,
    /// flushes and stops.
    pub fn spawn(self, shutdown: &Shutdown) -> Task {
        Task::spawn("statsd", self.run(shutdown.begun().clone()))
    }

    async fn run(self, stop: CancellationToken) {
        let local = self.socket.local_addr().ok();
        info!(address = ?local, topic = %self.topic, flush = ?self.settings.flush, "Listening for statsd.");
        let stats = self.pipeline.stats.clone();
        let mut aggregator = Aggregator::new(
            self.settings.max_series,
            &self.settings.percentiles,
            self.settings.budget.clone(),
        );
        let mut router = Router::default();
        let mut buf = vec![0u8; MAX_PACKET];
        let inode = inode(&self.socket);
        let mut drops_seen = 0;
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + self.settings.flush,
            self.settings.flush,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {
                    count_kernel_drops(inode, &mut drops_seen, &stats);
                    if !self.flush(&aggregator, &mut router, &stop).await {
                        return;
                    }
                }
                read = self.socket.recv_from(&mut buf) => match read {
                    Ok((n, _)) => take_packet(&buf[..n], &mut aggregator, &stats),
                    Err(error) => crate::telemetry::throttled_warn("statsd read failed", |repeats| {
                        warn!(%error, repeats, "A statsd read failed.");
                    }),
                },
            }
        }
        // What arrived before the shutdown is flushed with the rest.
        for _ in 0..DRAIN_PACKETS {
            match self.socket.try_recv_from(&mut buf) {
                Ok((n, _)) => take_packet(&buf[..n], &mut aggregator, &stats),
                Err(_) => break,
            }
        }
        count_kernel_drops(inode, &mut drops_seen, &stats);
        self.flush(&aggregator, &mut router, &stop).await;
    }

    /// Pushes every series' value; false when the pipeline gave up (the
    /// shutdown's drain ended first).
    async fn flush(
        &self,
        aggregator: &Aggregator,
        router: &mut Router,
        stop: &CancellationToken,
    ) -> bool {
        let stats = &self.pipeline.stats;
        stats
            .statsd_bytes
            .store(self.settings.budget.used() as i64, Relaxed);
        let order = aggregator.order();
        let mut next = 0;
        let time_ms = crate::sources::now_ms();
        loop {
            let records = aggregator.records_from(
                &order,
                &mut next,
                &self.topic,
                &self.tags,
                time_ms,
                FLUSH_PIECE_BYTES,
            );
            if records.is_empty() {
                return true;
            }
            let give_up = async {
                stop.cancelled().await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
            if !self
                .pipeline
                .push_owned(router, Input::Statsd, records, give_up)
                .await
            {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_drops_are_read_by_inode_from_either_table() {
        let dir = tempfile::tempdir().unwrap();
        let header = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n";
        std::fs::write(
            dir.path().join("udp"),
            format!("{header}  12: 0100007F:A3D5 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 17\n"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("udp6"),
            format!("{header}   3: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 777 2 0000000000000000 5\n"),
        )
        .unwrap();
        assert_eq!(kernel_drops(dir.path(), 4242), Some(17));
        assert_eq!(kernel_drops(dir.path(), 777), Some(5));
        assert_eq!(kernel_drops(dir.path(), 1), None);
    }
}

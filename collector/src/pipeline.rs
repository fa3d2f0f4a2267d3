//! The path every input's records take into the buffer: a memory
//! reservation made before the work, routing (topic, key, static and
//! enrichment tags), the per-topic counts, and the push. The TCP input and
//! the agent poller share it, so both are bounded and counted alike.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use schema::MetricList;
use schema::raw::RawRecord;
use tokio::sync::{Notify, watch};

use crate::buffer::{Buffer, Chunk};
use crate::enrich::{Enrichment, Kind};
use crate::memory::Lease;
use crate::route::{Records, Router, Routing};
use crate::sinks::store::{Source, Store};
use crate::stats::{DropReason, Input, Stats};

/// What every input shares to reach the buffer.
pub struct Pipeline {
    /// Counters.
    pub stats: Arc<Stats>,
    /// Where routed records go.
    pub buffer: Arc<Buffer>,
    /// Routing settings in force.
    pub routing: watch::Receiver<Arc<Routing>>,
    /// What the agent's `/state` says, for tags added when absent.
    pub enrichment: watch::Receiver<Arc<Enrichment>>,
    /// Told when a record names a framework id `/state` doesn't know.
    pub refresh: Arc<Notify>,
    /// The node store, when an output reads it.
    pub store: Option<Arc<Store>>,
}

impl Pipeline {
    /// The routing and enrichment in force: one snapshot per block, so that
    /// a configuration change never splits one.
    pub fn settings(&self) -> (Arc<Routing>, Arc<Enrichment>) {
        (
            self.routing.borrow().clone(),
            self.enrichment.borrow().clone(),
        )
    }

    fn counted(&self, records: &Records, sanitized: u64, unknown_framework: bool) {
        if unknown_framework {
            self.refresh.notify_one();
        }
        if sanitized > 0 {
            self.stats.topics_sanitized.fetch_add(sanitized, Relaxed);
        }
        self.stats
            .count_topics(records.items.iter().map(|r| (&r.topic, r.datapoints)));
    }

    /// Routes records of the current schema read in place, into `lease`.
    pub fn route_raw<'a>(
        &self,
        router: &mut Router,
        routing: &'a Routing,
        enrichment: &'a Enrichment,
        records: &[RawRecord<'a>],
        lease: &mut Lease,
    ) -> Records {
        let mut unknown_framework = false;
        // The store takes each record's tags (with those routing adds) and
        // datapoints as routing reads them.
        let mut feed = self.store.as_ref().map(|store| store.feed(Source::Input));
        let routed = router.route_block(
            routing,
            records,
            lease,
            |record| {
                let (extra, unknown) = enrichment.tags_for_lookup(Kind::App, |key| record.tag(key));
                unknown_framework |= unknown;
                extra
            },
            |record, added| {
                if let Some(feed) = &mut feed {
                    feed.record(
                        record.tags().chain(added.iter().copied()),
                        record.datapoint_values(),
                    );
                }
            },
        );
        drop(feed);
        self.counted(&routed.records, routed.sanitized, unknown_framework);
        routed.records
    }

    /// Routes owned records (decoded from another schema, or made from the
    /// agent's JSON), into `lease`.
    pub fn route_owned(
        &self,
        source: Source,
        router: &mut Router,
        routing: &Routing,
        enrichment: &Enrichment,
        records: Vec<MetricList>,
        lease: &mut Lease,
    ) -> Records {
        let mut unknown_framework = false;
        let mut sanitized = 0;
        // The agent's records of a container are its statistics; a record
        // from the TCP input with a container id is what its task sent.
        let kind = match source {
            Source::Agent => Kind::Container,
            Source::Input | Source::Node => Kind::App,
        };
        let prepared = records
            .into_iter()
            .map(|record| {
                let (extra, unknown) = enrichment.tags_for(kind, &record);
                unknown_framework |= unknown;
                let (prepared, was_sanitized) = router.prepare(routing, &extra, record);
                sanitized += u64::from(was_sanitized);
                prepared
            })
            .collect::<Vec<_>>();
        if let Some(store) = &self.store {
            let mut feed = store.feed(source);
            for p in &prepared {
                feed.record(
                    p.record()
                        .tags
                        .iter()
                        .map(|t| (t.key.as_str(), t.value.as_str())),
                    p.record()
                        .datapoints
                        .iter()
                        .map(|d| (d.name.as_str(), d.time_ms, d.value)),
                );
            }
        }
        let records = crate::route::encode_all(prepared, lease);
        self.counted(&records, sanitized, unknown_framework);
        records
    }

    /// The agent poller's and the node source's path: counts `records` as received from `input`,
    /// then routes and pushes them in pieces that each fit the buffer's
    /// bound, each reserved before it is routed (waiting for room under
    /// `block`). When `give_up` resolves first, or the buffer closes, what
    /// is left is counted as a `shutdown` drop; returns false then.
    pub async fn push_owned(
        &self,
        router: &mut Router,
        input: Input,
        records: Vec<MetricList>,
        give_up: impl Future<Output = ()>,
    ) -> bool {
        let count = |records: &[MetricList]| {
            (
                records.len() as u64,
                records.iter().map(|r| r.datapoints.len() as u64).sum(),
            )
        };
        let (all_records, all_datapoints) = count(&records);
        self.stats
            .count_received(input, all_records, all_datapoints);
        let mut give_up = pin!(give_up);
        let mut rest = records;
        while !rest.is_empty() {
            let (routing, enrichment) = self.settings();
            let enrichment_len = enrichment.max_extra_len();
            // As many records as fit a quarter of what may be reserved.
            let room = self.buffer.capacity() / 4;
            let mut take = rest.len();
            while take > 1 && routing.records_estimate(&rest[..take], enrichment_len) > room {
                take /= 2;
            }
            let tail = rest.split_off(take);
            let piece = std::mem::replace(&mut rest, tail);
            let estimate = routing.records_estimate(&piece, enrichment_len);
            let lease = tokio::select! {
                lease = self.buffer.reserve(estimate) => lease,
                () = &mut give_up => None,
            };
            let Some(mut lease) = lease else {
                let (records, datapoints) = count(&piece);
                let (left_records, left_datapoints) = count(&rest);
                self.stats.count_drop(
                    DropReason::Shutdown,
                    records + left_records,
                    datapoints + left_datapoints,
                );
                return false;
            };
            let source = match input {
                Input::Node => Source::Node,
                Input::Agent => Source::Agent,
                // statsd is what a task (or a process of the node) sent:
                // app metrics, as the TCP input's.
                Input::Tcp | Input::Statsd => Source::Input,
            };
            let chunk: Chunk =
                self.route_owned(source, router, &routing, &enrichment, piece, &mut lease);
            drop(lease);
            self.buffer.push(chunk, &mut give_up).await;
        }
        true
    }
}

/// A pipeline into a 1 MiB buffer with the default routing, for tests:
/// with the sender of its enrichment.
#[cfg(test)]
pub(crate) fn test_pipeline(
    enrichment: Enrichment,
) -> (Arc<Pipeline>, watch::Sender<Arc<Enrichment>>) {
    let config = crate::config::Config::default();
    let stats = Arc::new(Stats::default());
    let (states, enrichment) = watch::channel(Arc::new(enrichment));
    let pipeline = Pipeline {
        stats: stats.clone(),
        buffer: Arc::new(Buffer::new(
            1 << 20,
            crate::config::FullPolicy::Block,
            stats,
        )),
        routing: watch::channel(Arc::new(Routing::from_config(&config))).1,
        enrichment,
        refresh: Arc::new(Notify::new()),
        store: None,
    };
    (Arc::new(pipeline), states)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, FullPolicy};
    use schema::Datapoint;

    #[tokio::test]
    async fn agent_records_are_routed_and_counted_like_tcp_ones() {
        let config = Config::default();
        let stats = Arc::new(Stats::default());
        let buffer = Arc::new(Buffer::new(1 << 20, FullPolicy::Block, stats.clone()));
        let pipeline = Pipeline {
            stats: stats.clone(),
            buffer: buffer.clone(),
            routing: watch::channel(Arc::new(Routing::from_config(&config))).1,
            enrichment: watch::channel(Arc::new(Enrichment::default())).1,
            refresh: Arc::new(Notify::new()),
            store: None,
        };
        let list = |topic: &str| MetricList {
            topic: topic.into(),
            tags: Vec::new(),
            datapoints: vec![Datapoint::new("cpus_user_time_secs", 1, 1.0)],
        };
        let pushed = pipeline
            .push_owned(
                &mut Router::default(),
                Input::Agent,
                vec![list("bad topic/ü"), list("fine")],
                std::future::pending(),
            )
            .await;
        assert!(pushed);
        assert_eq!(stats.topics_sanitized.load(Relaxed), 1);
        assert_eq!(stats.accounting().received.datapoints, 2);
        buffer.close();
        let chunk = buffer.pop().await.expect("the agent's records are queued");
        let topics: Vec<&str> = chunk.items.iter().map(|r| &*r.topic).collect();
        assert_eq!(topics.len(), 2);
        assert!(
            topics
                .iter()
                .all(|t| t.bytes().all(|b| b.is_ascii_graphic())),
            "{topics:?}"
        );
    }
}

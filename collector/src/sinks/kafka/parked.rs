//! Records waiting for their topic, in memory: topics being looked up
//! (waiting), and topics the brokers refuse (refused; with the disk spool
//! those move to its parked area instead, see `spool::parked`).
//!
//! Both are bounded by `kafka_parked_max_bytes`, in different ways:
//!
//! - waiting records past the bound make the sink stop taking from the
//!   buffer, as a broker outage does (a topic lookup that can't be
//!   answered is one), so the buffer's full policy decides;
//! - refused records past the bound are dropped, the oldest of the topic
//!   holding the most first, counted as `topic_refused`: a topic refused
//!   for hours costs its own data, never the others' flow.
//!
//! Each record keeps its share of the buffer's bound (its lease) while it
//! waits here.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::memory::Lease;
use crate::route::Routed;
use crate::stats::Counts;

/// One topic's records.
#[derive(Debug, Default)]
struct Queue {
    /// The brokers refuse the topic (else it is being looked up).
    refused: bool,
    records: VecDeque<(Routed, Lease)>,
    bytes: usize,
}

/// Every topic's parked records.
#[derive(Debug)]
pub(super) struct Parked {
    topics: HashMap<Arc<str>, Queue>,
    waiting_bytes: usize,
    refused_bytes: usize,
    max_bytes: usize,
}

impl Parked {
    /// An empty store bounded by `max_bytes` (`kafka_parked_max_bytes`).
    pub(super) fn new(max_bytes: usize) -> Self {
        Self {
            topics: HashMap::new(),
            waiting_bytes: 0,
            refused_bytes: 0,
            max_bytes,
        }
    }

    fn tally(&mut self, refused: bool) -> &mut usize {
        if refused {
            &mut self.refused_bytes
        } else {
            &mut self.waiting_bytes
        }
    }

    /// Parks `record` (holding `lease`) behind its topic's others.
    pub(super) fn park(&mut self, record: Routed, lease: Lease, refused: bool) {
        let bytes = lease.bytes().max(record.data.len());
        let queue = self.topics.entry(record.topic.clone()).or_default();
        if queue.records.is_empty() {
            queue.refused = refused;
        }
        let refused = queue.refused;
        queue.bytes += bytes;
        queue.records.push_back((record, lease));
        *self.tally(refused) += bytes;
    }

    /// Marks `topic` refused or not; its records move between the two
    /// tallies.
    pub(super) fn set_refused(&mut self, topic: &str, refused: bool) {
        let Some(queue) = self.topics.get_mut(topic) else {
            return;
        };
        if queue.refused == refused {
            return;
        }
        queue.refused = refused;
        let bytes = queue.bytes;
        *self.tally(!refused) -= bytes;
        *self.tally(refused) += bytes;
    }

    /// Takes every record parked for `topic`, in order.
    pub(super) fn take(&mut self, topic: &str) -> Vec<(Routed, Lease)> {
        let Some(queue) = self.topics.remove(topic) else {
            return Vec::new();
        };
        *self.tally(queue.refused) -= queue.bytes;
        queue.records.into()
    }

    /// Takes the oldest record parked for `topic`.
    pub(super) fn take_first(&mut self, topic: &str) -> Option<(Routed, Lease)> {
        let queue = self.topics.get_mut(topic)?;
        let (record, lease) = queue.records.pop_front()?;
        let bytes = lease.bytes().max(record.data.len());
        queue.bytes -= bytes;
        let refused = queue.refused;
        if queue.records.is_empty() {
            self.topics.remove(topic);
        }
        *self.tally(refused) -= bytes;
        Some((record, lease))
    }

    /// The refused topic holding the most.
    fn largest_refused(&self) -> Option<Arc<str>> {
        self.topics
            .iter()
            .filter(|(_, q)| q.refused)
            .max_by_key(|(_, q)| q.bytes)
            .map(|(t, _)| t.clone())
    }

    /// Takes everything, at shutdown.
    pub(super) fn take_all(&mut self) -> Vec<(Routed, Lease)> {
        let topics: Vec<Arc<str>> = self.topics.keys().cloned().collect();
        topics.iter().flat_map(|t| self.take(t)).collect()
    }

    /// Whether waiting records hold the bound: the sink takes nothing more
    /// from the buffer until lookups have let some go.
    pub(super) fn waiting_full(&self) -> bool {
        self.waiting_bytes >= self.max_bytes
    }

    /// The oldest refused record of the topic holding the most, while
    /// refused records hold more than the bound: the caller drops it,
    /// counted.
    pub(super) fn over_bound(&mut self) -> Option<(Routed, Lease)> {
        if self.refused_bytes <= self.max_bytes {
            return None;
        }
        let topic = self.largest_refused()?;
        self.take_first(&topic)
    }

    /// Whether anything is parked.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    /// The topics with parked records.
    pub(super) fn topics(&self) -> impl Iterator<Item = &Arc<str>> {
        self.topics.keys()
    }

    /// Whether records of `topic` are parked.
    pub(super) fn contains(&self, topic: &str) -> bool {
        self.topics.contains_key(topic)
    }

    /// Records and datapoints parked for `topic`.
    pub(super) fn counts(&self, topic: &str) -> Counts {
        self.topics
            .get(topic)
            .map_or(Counts::default(), |q| Counts {
                records: q.records.len() as u64,
                datapoints: q.records.iter().map(|(r, _)| u64::from(r.datapoints)).sum(),
            })
    }

    /// Bytes parked: waiting, and refused.
    pub(super) fn bytes(&self) -> (usize, usize) {
        (self.waiting_bytes, self.refused_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str, n: u8) -> (Routed, Lease) {
        (
            Routed {
                topic: topic.into(),
                key: None,
                data: vec![n; 100].into(),
                datapoints: 1,
                share: 100,
                seq: 0,
            },
            Lease::detached(),
        )
    }

    #[test]
    fn refused_records_past_the_bound_go_oldest_first_from_the_largest_topic() {
        let mut parked = Parked::new(1000);
        for n in 0..8 {
            let (r, l) = record("big", n);
            parked.park(r, l, true);
        }
        for n in 0..3 {
            let (r, l) = record("small", n);
            parked.park(r, l, true);
        }
        assert_eq!(parked.bytes(), (0, 1100));
        let (dropped, _) = parked.over_bound().expect("over the bound");
        assert_eq!((&*dropped.topic, dropped.data[0]), ("big", 0));
        assert!(parked.over_bound().is_none(), "back at the bound");
        assert_eq!(parked.counts("small").records, 3);
        assert_eq!(parked.take("big").len(), 7);
        assert_eq!(parked.bytes(), (0, 300));
    }

    #[test]
    fn waiting_records_hold_the_bound_and_move_when_refused() {
        let mut parked = Parked::new(250);
        for n in 0..3 {
            let (r, l) = record("t", n);
            parked.park(r, l, false);
        }
        assert!(parked.waiting_full());
        assert!(
            parked.over_bound().is_none(),
            "waiting records are never dropped"
        );
        parked.set_refused("t", true);
        assert_eq!(parked.bytes(), (0, 300));
        assert!(!parked.waiting_full());
        assert!(parked.over_bound().is_some());
        assert_eq!(parked.take_all().len(), 2);
        assert!(parked.is_empty());
    }
}

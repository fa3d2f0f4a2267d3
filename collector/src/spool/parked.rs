//! The parked area: records of topics the brokers refuse (an ACL, for
//! hours), moved out of the spool's log so that they pin none of its
//! segments, and kept until their topic can be written.
//!
//! Each refused topic has a spool of its own, `parked/<topic in hex>` under
//! `spool_dir`, with the same segments, ledger, cursor and replay as the
//! main one. Moving a record there appends it to its topic's spool and
//! marks it done in the spool it came from, so the main spool's segments
//! are deleted as the other topics are delivered. Together the topics'
//! spools hold at most `kafka_parked_max_bytes`: past it, the topic holding
//! the most loses its oldest segment, counted as `topic_refused`. Once the
//! topic is writable, the sink reads its spool back
//! ([`Spool::release`]) and reports each outcome as for any record; the
//! spool goes once it is empty. A restart replays the parked records too.
//!
//! A record read back from a topic's spool carries its sequence number
//! there with [`PARKED_SEQ`] set, so that its outcome reaches that spool.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use tracing::{info, warn};

use super::{ReadChunk, Refused, Role, Spool, SpoolSettings};
use crate::memory::Lease;
use crate::route::Routed;
use crate::stats::{Counts, DropReason, Stats};

/// Set in the sequence number of a record read back from a parked topic's
/// spool: its outcome is reported there, not to the main spool.
pub const PARKED_SEQ: u64 = 1 << 63;

/// Topics parked on disk at once, at most: each spool keeps a few
/// descriptors open (its lock, its newest segment). The records of more
/// refused topics wait in memory, under the same bound.
pub const MAX_PARKED_TOPICS: usize = 32;

/// The file in each parked topic's directory that names the topic.
const TOPIC_FILE: &str = "topic";

/// The parked topics' spools.
#[derive(Debug)]
pub(super) struct Area {
    dir: PathBuf,
    max_bytes: u64,
    spools: HashMap<Arc<str>, Arc<Spool>>,
    /// What an earlier run left was read: only once the main spool holds
    /// its lock, so that a collector denied the directory never touches
    /// another's parked records.
    loaded: bool,
}

/// A parked topic's directory name: the topic in hex, or, for a name too
/// long for a directory, a hash of it (its `topic` file names it either
/// way).
fn dir_name(topic: &str) -> String {
    if topic.len() <= 120 {
        return hex(topic);
    }
    // FNV-1a, 64 bits: stable across runs and versions.
    let hash = topic.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("h{hash:016x}")
}

fn hex(topic: &str) -> String {
    topic.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(name: &str) -> Option<String> {
    if name.is_empty() || !name.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..name.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(name.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

impl Area {
    /// The parked area of the main spool in `settings.dir`, not read yet
    /// (see [`load`](Self::load)).
    pub(super) fn new(settings: &SpoolSettings) -> Self {
        Self {
            dir: settings.dir.join("parked"),
            max_bytes: settings.parked_max_bytes,
            spools: HashMap::new(),
            loaded: false,
        }
    }

    /// Opens the topics' spools an earlier run left (their records counted
    /// as replayed), once: the main spool holds its lock.
    pub(super) fn load(&mut self, settings: &SpoolSettings, stats: &Arc<Stats>) {
        if std::mem::replace(&mut self.loaded, true) {
            return;
        }
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let topic = fs::read_to_string(path.join(TOPIC_FILE))
                .ok()
                .or_else(|| unhex(&entry.file_name().to_string_lossy()));
            let Some(topic) = topic.filter(|t| dir_name(t) == entry.file_name().to_string_lossy())
            else {
                warn!(file = %path.display(),
                    "A file in the spool's parked area is not a parked topic; it is left alone.");
                continue;
            };
            let topic: Arc<str> = Arc::from(topic.as_str());
            let spool = self.topic_spool(settings, stats, &topic);
            match spool.unread().records {
                0 => {
                    self.remove_if_empty(&topic);
                }
                records => {
                    info!(%topic, records,
                        "Records parked for a topic the brokers refused are kept until it can be written.");
                }
            }
        }
    }

    fn topic_spool(
        &mut self,
        settings: &SpoolSettings,
        stats: &Arc<Stats>,
        topic: &Arc<str>,
    ) -> Arc<Spool> {
        if let Some(spool) = self.spools.get(topic) {
            return spool.clone();
        }
        let dir = self.dir.join(dir_name(topic));
        let new = !dir.exists();
        let spool = Spool::open_as(
            SpoolSettings {
                dir: dir.clone(),
                max_bytes: self.max_bytes,
                parked_max_bytes: 0,
                ..settings.clone()
            },
            stats.clone(),
            Role::Parked,
        );
        if new {
            // Its name, and the directories that hold it, durable before
            // anything is moved there.
            let _ = fs::write(dir.join(TOPIC_FILE), topic.as_bytes());
            for made in [&dir, &self.dir, &settings.dir] {
                if let Ok(made) = fs::File::open(made) {
                    let _ = made.sync_all();
                }
            }
        }
        self.spools.insert(topic.clone(), spool.clone());
        spool
    }

    fn bytes(&self) -> u64 {
        self.spools.values().map(|s| s.bytes()).sum()
    }

    /// Closes `topic`'s spool and deletes its directory when it holds
    /// nothing, read or not; true when it did.
    fn remove_if_empty(&mut self, topic: &str) -> bool {
        let Some(spool) = self.spools.get(topic) else {
            return false;
        };
        // Only a spool that holds its lock, is in use and has nothing on
        // disk but what it knows of: never one that could not be read,
        // nor another collector's.
        if !spool.is_empty() || !spool.owns_its_files() {
            return false;
        }
        let dir = spool.settings.dir.clone();
        spool.close();
        self.spools.remove(topic);
        if let Err(error) = fs::remove_dir_all(&dir) {
            warn!(dir = %dir.display(), %error, "Could not delete an emptied parked topic's spool.");
        }
        true
    }

    /// Drops the oldest segment of the topic holding the most, counted as
    /// `topic_refused`; false when nothing can be dropped.
    fn drop_oldest(&self) -> bool {
        let mut by_size: Vec<(&Arc<str>, &Arc<Spool>)> = self.spools.iter().collect();
        by_size.sort_by_key(|(_, s)| std::cmp::Reverse(s.bytes()));
        by_size.into_iter().any(|(topic, spool)| {
            let dropped = spool.drop_oldest_segment(DropReason::TopicRefused, true);
            if dropped {
                crate::telemetry::throttled_warn("parked_dropped", |repeats| {
                    warn!(%topic, repeats, limit = self.max_bytes,
                        "The parked records of refused topics reached kafka_parked_max_bytes; the oldest were dropped (topic_refused).");
                });
            }
            dropped
        })
    }
}

impl Spool {
    fn area(&self) -> std::sync::MutexGuard<'_, Area> {
        self.area
            .as_ref()
            .expect("only the main spool parks")
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Moves `records` (all of `topic`, which the brokers refuse) to the
    /// topic's parked spool, and marks them done where they came from.
    /// `Full` when the parked area can't make room (the caller drops them,
    /// counted), `Unavailable` when its disk can't be used (the caller
    /// keeps them in memory).
    pub fn park(&self, topic: &Arc<str>, records: &[Routed]) -> Result<(), Refused> {
        if self.area.is_none() || records.is_empty() {
            return Err(Refused::Unavailable);
        }
        if !self.area().loaded {
            // The main spool is not ours (yet): nothing is moved.
            return Err(Refused::Unavailable);
        }
        let len: u64 = records
            .iter()
            .map(|r| super::frame::frame_len(&r.topic, r.key.as_deref(), r.data.len()) as u64)
            .sum();
        let spool = {
            let mut area = self.area();
            while area.bytes() + len > area.max_bytes {
                if !area.drop_oldest() {
                    if area.bytes() > 0 {
                        return Err(Refused::Full);
                    }
                    break;
                }
            }
            if !area.spools.contains_key(topic) && area.spools.len() >= MAX_PARKED_TOPICS {
                crate::telemetry::throttled_warn("parked_topics", |repeats| {
                    warn!(%topic, repeats, limit = MAX_PARKED_TOPICS,
                        "Too many refused topics parked on disk; this one's records wait in memory.");
                });
                return Err(Refused::Unavailable);
            }
            area.topic_spool(&self.settings, &self.stats, topic)
        };
        spool.append(records)?;
        let (parked, main): (Vec<u64>, Vec<u64>) = records
            .iter()
            .map(|r| r.seq)
            .filter(|&seq| seq != 0)
            .partition(|&seq| seq & PARKED_SEQ != 0);
        self.ack_seqs(&main);
        let parked: Vec<u64> = parked.into_iter().map(|s| s & !PARKED_SEQ).collect();
        spool.ack_seqs(&parked);
        Ok(())
    }

    /// The parked topics and what each holds unread.
    pub fn parked_topics(&self) -> Vec<(Arc<str>, Counts)> {
        let Some(area) = &self.area else {
            return Vec::new();
        };
        let area = area.lock().unwrap_or_else(|p| p.into_inner());
        area.spools
            .iter()
            .map(|(topic, spool)| (topic.clone(), spool.unread()))
            .collect()
    }

    /// Bytes the parked topics' spools hold.
    pub fn parked_bytes(&self) -> u64 {
        self.area
            .as_ref()
            .map_or(0, |a| a.lock().unwrap_or_else(|p| p.into_inner()).bytes())
    }

    /// Reads the next records parked for `topic`, under `lease` (given
    /// back with them), with [`PARKED_SEQ`] set in their sequence numbers;
    /// `None` when there are none left to read.
    pub fn release(&self, topic: &str, lease: Lease) -> Option<(ReadChunk, Lease)> {
        let spool = self.area.as_ref()?;
        let spool = spool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spools
            .get(topic)?
            .clone();
        spool.read_ahead(lease);
        let (mut chunk, lease) = spool.take_ready()?;
        for record in &mut chunk.items {
            record.seq |= PARKED_SEQ;
        }
        Some((chunk, lease))
    }

    /// Forgets `topic`'s parked spool once it holds nothing, read or not,
    /// deleting its directory.
    pub fn forget_parked(&self, topic: &str) {
        if let Some(area) = &self.area {
            area.lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove_if_empty(topic);
        }
    }

    /// Reports outcomes of records of `topic`: those read back from its
    /// parked spool go there.
    pub(super) fn ack_parked(&self, topic: &str, seqs: &[u64]) {
        let Some(area) = &self.area else {
            return;
        };
        let spool = area
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spools
            .get(topic)
            .cloned();
        if let Some(spool) = spool {
            spool.ack_seqs(seqs);
        }
    }

    /// Syncs every parked topic's spool (before the main spool's cursor,
    /// which no longer holds what moved there).
    pub(super) fn sync_parked(&self) {
        let spools: Vec<Arc<Spool>> = match &self.area {
            Some(area) => area
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .spools
                .values()
                .cloned()
                .collect(),
            None => return,
        };
        for spool in spools {
            spool.sync();
        }
    }

    /// At close: closes every parked topic's spool; what they hold unread
    /// stays for the next start, and the empty ones go.
    pub(super) fn close_parked(&self) -> Counts {
        let spools: Vec<Arc<Spool>> = match &self.area {
            Some(area) => {
                let mut area = area.lock().unwrap_or_else(|p| p.into_inner());
                let topics: Vec<Arc<str>> = area.spools.keys().cloned().collect();
                for topic in topics {
                    area.remove_if_empty(&topic);
                }
                area.spools.values().cloned().collect()
            }
            None => return Counts::default(),
        };
        spools.iter().fold(Counts::default(), |total, spool| {
            let left = spool.close();
            Counts {
                records: total.records + left.records,
                datapoints: total.datapoints + left.datapoints,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_and_their_directories_map_both_ways() {
        for topic in ["metrics-a", "metrics-ü/..", "x"] {
            assert_eq!(unhex(&hex(topic)).as_deref(), Some(topic));
        }
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex(""), None);
    }
}

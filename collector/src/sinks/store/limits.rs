//! The node store's bounds and its readers' share of the memory formula,
//! declared apart from the store so that the configuration (which owns the
//! formula) and the counters can name them without depending on the store.

use std::time::Duration;

/// The average bytes of name and tags a series may take: with
/// [`SERIES_OVERHEAD_BYTES`], what `store_max_series` series may take in
/// all, families included.
pub const SERIES_BUDGET_BYTES: usize = 256;
/// What a series takes beyond its key: its entry in the map (the key's and
/// family's pointers, its value and times) and the key's allocation header.
pub const SERIES_OVERHEAD_BYTES: usize = 96;
/// What a family takes beyond its name: its entry and its label map.
pub const FAMILY_OVERHEAD_BYTES: usize = 128;
/// What one of a family's label names takes beyond its bytes.
pub const LABEL_OVERHEAD_BYTES: usize = 64;
/// Label names one Prometheus family may have (the union of its series'
/// tag keys, sanitized).
pub const MAX_FAMILY_LABELS: usize = 64;
/// Bytes of those label names together.
pub const MAX_FAMILY_LABEL_BYTES: usize = 1024;
/// Why a datapoint of a series not held was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `store_max_series` series are held.
    Series,
    /// The byte bound is reached.
    Bytes,
    /// Its family would have too many label names.
    Labels,
}

impl Refusal {
    /// Every reason, for the counters.
    pub const ALL: [Refusal; 3] = [Refusal::Series, Refusal::Bytes, Refusal::Labels];

    /// The reason's label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Series => "series",
            Refusal::Bytes => "bytes",
            Refusal::Labels => "labels",
        }
    }
}

/// The store's bounds, and the tags it leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// Most series held.
    pub max_series: usize,
    /// A series not updated for this long is forgotten.
    pub expiry: Duration,
    /// Tag keys left out of every series (`store_drop_tags`).
    pub drop_tags: Vec<String>,
}

impl StoreSettings {
    /// What the store takes at most, everything it holds counted.
    pub fn memory_bound(&self) -> usize {
        self.max_series
            .saturating_mul(SERIES_BUDGET_BYTES + SERIES_OVERHEAD_BYTES)
    }
}

/// Prometheus scrapes rendered at once, at most.
pub const MAX_SCRAPES: usize = 2;
/// v0 messages written at once, at most.
pub const MAX_ANSWERS: usize = 2;
/// Heap an answer (a scrape, a v0 message) takes per series, at most: its
/// place in the snapshot (the shared family name and key, the sample: 64
/// bytes) and in the set of samples already written (a hash, with the
/// set's spare room).
pub const SCRAPE_BYTES_PER_SERIES: usize = 128;

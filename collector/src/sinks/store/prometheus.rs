//! The store in Prometheus text format (version 0.0.4), as dcos-metrics
//! served it on `:61091/metrics`, without its bugs.
//!
//! - A family's name is the datapoint's name with every character outside
//!   `[a-zA-Z0-9_:]` as `_`, and `_` before a leading digit (or for an
//!   empty name): `cpus.user.time` gives `cpus_user_time`, `123abc` gives
//!   `_123abc`. Names are not lowercased, nor renamed otherwise.
//! - A label's name is a tag's key the same way, with `:` as `_` too (label
//!   names may not hold one). Keys that begin with `__` are left out:
//!   Prometheus reserves them (`__name__` would clash with the name).
//! - Every family is a `gauge`, with one label set: the union of its series'
//!   label names, `""` where a series lacks one (so Prometheus drops no
//!   series, DCOS_OSS-3863).
//! - A label never appears twice in a sample (prometheus/prometheus#6853).
//!   A key appears once in a record: the collector adds its static and
//!   enrichment tags only where the record lacks that exact key, so a
//!   record's own `container_id` wins. Of two keys that sanitize to the
//!   same name (`task.name` and `task_name`), the one already spelled as
//!   the label wins, wherever it came from; when neither is, the first in
//!   byte order.
//! - Two series that come out the same (the same family and labels once
//!   sanitized) are given once: the first by original name, then tags, in
//!   byte order. The rest are counted
//!   (`collector_store_samples_skipped_total{reason="duplicate"}`).
//! - A family whose name is one of the collector's own (`collector_*`) is
//!   left out and counted (`reason="name_taken"`).
//! - NaN and infinities are written as Prometheus spells them: `NaN`,
//!   `+Inf`, `-Inf`. No timestamp is given: a series is there while it is
//!   fresh (see `store_expiry_secs`).

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::hash::BuildHasher;
use std::sync::Arc;

use super::{Key, Sample, parse_key};

/// The HELP line of every family from the store.
pub const HELP: &str =
    "latest value of a datapoint the node's inputs sent (see docs/prometheus-and-v0.md)";

fn sanitize_with(name: &str, colon: bool) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    if name.chars().next().is_none_or(|c| c.is_ascii_digit()) {
        out.push('_');
    }
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':') {
            c
        } else {
            '_'
        }
    }));
    out
}

/// A datapoint's name as a Prometheus metric name.
pub fn sanitize(name: &str) -> String {
    sanitize_with(name, true)
}

/// A tag's key as a Prometheus label name (borrowed when it is one
/// already), or `None` for a key Prometheus reserves (beginning with `__`).
pub fn label_name(key: &str) -> Option<Cow<'_, str>> {
    let valid = key
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let name = if valid {
        Cow::Borrowed(key)
    } else {
        Cow::Owned(sanitize_with(key, false))
    };
    (!name.starts_with("__")).then_some(name)
}

/// Appends a value as Prometheus spells it.
pub fn write_value(out: &mut String, value: f64) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value.is_infinite() {
        out.push_str(if value > 0.0 { "+Inf" } else { "-Inf" });
    } else if value == 0.0 || (1e-5..1e15).contains(&value.abs()) {
        let _ = write!(out, "{value}");
    } else {
        let _ = write!(out, "{value:e}");
    }
}

fn write_escaped(out: &mut String, value: &str) {
    // Runs without a character to escape are copied whole.
    let mut rest = value;
    while let Some(at) = rest.find(['\\', '"', '\n']) {
        out.push_str(&rest[..at]);
        out.push_str(match rest.as_bytes()[at] {
            b'\\' => "\\\\",
            b'"' => "\\\"",
            _ => "\\n",
        });
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
}

/// What a rendering left out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Skipped {
    /// Samples that came out the same as an earlier one.
    pub duplicate: u64,
    /// Samples of a family named like one of the collector's own.
    pub name_taken: u64,
}

/// The family being written: its label names, and the samples already
/// written (hashes of their names and labels).
struct Current {
    end: usize,
    labels: Vec<String>,
    seen: HashSet<u64, foldhash::fast::RandomState>,
}

/// A key's strings in order (its name, then each tag's key and value), as
/// bytes.
fn fields(key: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = key;
    std::iter::from_fn(move || {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let field = rest.get(4..4 + len)?;
        rest = &rest[4 + len..];
        Some(field)
    })
}

/// Orders two keys by their original name, then their tags, each compared
/// as strings are (byte by byte; the keys' own bytes put a length before
/// each string, so they are compared field by field).
fn by_original(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    fields(a).cmp(fields(b))
}

/// Renders a snapshot of the store chunk by chunk, so that a scrape of any
/// size is written out without holding the store or its whole text.
pub struct Renderer {
    /// The snapshot, sorted by family, then by original name and tags.
    series: Vec<(Arc<str>, Key, Sample)>,
    next: usize,
    current: Option<Current>,
    reserved: HashSet<String>,
    hasher: foldhash::fast::RandomState,
    skipped: Skipped,
}

impl Renderer {
    /// A renderer of `snapshot`, leaving out the families named in
    /// `reserved` (the collector's own).
    pub fn new(mut series: Vec<(Arc<str>, Key, Sample)>, reserved: HashSet<String>) -> Self {
        // A family's name is one Arc the store shares: the same pointer is
        // the same family, without comparing its bytes.
        series.sort_unstable_by(|a, b| {
            let family = if Arc::ptr_eq(&a.0, &b.0) {
                std::cmp::Ordering::Equal
            } else {
                a.0.cmp(&b.0)
            };
            family.then_with(|| by_original(&a.1, &b.1))
        });
        Self {
            series,
            next: 0,
            current: None,
            reserved,
            hasher: foldhash::fast::RandomState::default(),
            skipped: Skipped::default(),
        }
    }

    /// What was left out so far.
    pub fn skipped(&self) -> Skipped {
        self.skipped
    }

    /// Begins the family at `self.next`: its HELP and TYPE lines, and its
    /// label names (the union of its series' keys, sanitized). Returns
    /// false for a family left out.
    fn begin_family(&mut self, out: &mut String) -> bool {
        let start = self.next;
        let family = &self.series[start].0;
        let end = start
            + self.series[start..]
                .iter()
                .take_while(|(f, _, _)| f == family)
                .count();
        if self.reserved.contains(&**family) {
            self.skipped.name_taken += (end - start) as u64;
            self.next = end;
            return false;
        }
        let labels: std::collections::BTreeSet<String> = self.series[start..end]
            .iter()
            .flat_map(|(_, key, _)| {
                parse_key(key)
                    .1
                    .filter_map(|(k, _)| label_name(k).map(Cow::into_owned))
            })
            .collect();
        let labels: Vec<String> = labels.into_iter().collect();
        let _ = writeln!(out, "# HELP {family} {HELP}\n# TYPE {family} gauge");
        self.current = Some(Current {
            end,
            labels,
            seen: HashSet::default(),
        });
        true
    }

    /// The next stretch of text, at least `at_least` bytes unless the end
    /// comes first (it ends at a line's end); `None` at the end.
    pub fn next_chunk(&mut self, at_least: usize) -> Option<String> {
        if self.next >= self.series.len() {
            return None;
        }
        let mut out = String::with_capacity(at_least.min(1 << 20) + 4096);
        while self.next < self.series.len() && out.len() < at_least {
            if self.current.is_none() && !self.begin_family(&mut out) {
                continue;
            }
            let Some(current) = self.current.as_mut() else {
                continue;
            };
            let (family, key, sample) = &self.series[self.next];
            self.next += 1;
            if !write_sample(current, &self.hasher, family, key, sample, &mut out) {
                self.skipped.duplicate += 1;
            }
            if self.next >= current.end {
                self.current = None;
            }
        }
        Some(out)
    }
}

/// Writes one sample of the current family, unless one with the same
/// labels was written: then returns false.
fn write_sample(
    current: &mut Current,
    hasher: &foldhash::fast::RandomState,
    family: &str,
    key: &Key,
    sample: &Sample,
    out: &mut String,
) -> bool {
    let mut values: Vec<Option<(&str, bool)>> = vec![None; current.labels.len()];
    for (k, v) in parse_key(key).1 {
        let Some(name) = label_name(k) else { continue };
        let Ok(at) = current
            .labels
            .binary_search_by(|label| label.as_str().cmp(&name))
        else {
            continue;
        };
        let exact = name == k;
        if values[at].is_none_or(|(_, held_exact)| exact && !held_exact) {
            values[at] = Some((v, exact));
        }
    }
    let start = out.len();
    out.push_str(family);
    if !current.labels.is_empty() {
        out.push('{');
        for (i, (name, value)) in current.labels.iter().zip(&values).enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(name);
            out.push_str("=\"");
            write_escaped(out, value.map_or("", |(v, _)| v));
            out.push('"');
        }
        out.push('}');
    }
    if current.seen.insert(hasher.hash_one(&out[start..])) {
        out.push(' ');
        write_value(out, sample.value);
        out.push('\n');
        true
    } else {
        out.truncate(start);
        false
    }
}

/// The families a text in Prometheus format declares, with the names its
/// histograms' and summaries' samples take: a family from the store may
/// take none of them.
pub fn declared_names(text: &str) -> HashSet<String> {
    let mut names = HashSet::new();
    for line in text.lines() {
        let mut words = line
            .strip_prefix("# TYPE ")
            .into_iter()
            .flat_map(str::split_whitespace);
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        if matches!(kind, "histogram" | "summary") {
            for suffix in ["_bucket", "_sum", "_count", "_created"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name.to_owned());
    }
    names
}

/// One sample line: its name, its labels in order, its value.
pub type ParsedSample = (String, Vec<(String, String)>, f64);

/// Reads one sample line strictly as the text format says: a name, the
/// labels with their escapes, one space, a value. For the tests and the
/// fuzz target, which check what the renderer writes.
pub fn parse_sample(line: &str) -> Result<ParsedSample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no name")?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            let eq = rest.find('=').ok_or("no = after a label")?;
            let label = rest[..eq].to_owned();
            let valid = label
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("label name {label:?}"));
            }
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or("an unquoted value")?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next().ok_or("no closing quote")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().ok_or("a lone backslash")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => return Err(format!("unknown escape \\{c}")),
                    },
                    (_, '\n') => return Err("a raw newline in a value".into()),
                    (_, c) => value.push(c),
                }
            };
            labels.push((label, value));
            rest = &rest[end + 1..];
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else {
                rest = rest.strip_prefix('}').ok_or("no } after the labels")?;
                break;
            }
        }
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value = match value {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| format!("value {v:?}"))?,
    };
    Ok((name, labels, value))
}

/// Checks what a Prometheus text parser needs of a rendering: every sample
/// belongs to the family declared just before it, each family is declared
/// once with a valid name, each label appears once in a sample and the
/// label set is the same across a family, no sample is given twice, no
/// label is reserved. Returns the samples.
pub fn check_text(text: &str) -> Result<Vec<ParsedSample>, String> {
    let mut families = HashSet::new();
    let mut family = String::new();
    let mut label_set: Option<Vec<String>> = None;
    let mut lines = HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            family = rest.split(' ').next().unwrap_or_default().to_owned();
            if !families.insert(family.clone()) {
                return Err(format!("{family} declared twice"));
            }
            label_set = None;
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name, labels, value) = parse_sample(line)?;
        if name != family {
            return Err(format!("{name} under the family {family}"));
        }
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        if !valid {
            return Err(format!("metric name {name:?}"));
        }
        let keys: Vec<String> = labels.iter().map(|(k, _)| k.clone()).collect();
        let distinct: HashSet<&String> = keys.iter().collect();
        if distinct.len() != keys.len() {
            return Err(format!("a label twice: {line}"));
        }
        if keys.iter().any(|k| k.starts_with("__")) {
            return Err(format!("a reserved label: {line}"));
        }
        let held = label_set.get_or_insert_with(|| keys.clone());
        if *held != keys {
            return Err(format!("two label sets in {family}: {line}"));
        }
        let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
        if !lines.insert(series.to_owned()) {
            return Err(format!("a sample twice: {line}"));
        }
        samples.push((name, labels, value));
    }
    Ok(samples)
}

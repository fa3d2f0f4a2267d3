//! The node store's Prometheus text, from any names, tags and values: the
//! text reads back strictly as the format says (each family once, one
//! label set per family, no label twice or reserved, no sample twice),
//! every series held is written or counted as a duplicate, and cutting it
//! into chunks changes nothing.
//!
//! Input: lines (lossy UTF-8), each a record `name|key=value|...|value`;
//! the first byte picks the chunk size.

#![no_main]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use collector::route::Routed;
use collector::stats::Stats;
use collector::sinks::store::prometheus::{Renderer, check_text};
use collector::sinks::store::{Source, Store, StoreSettings};
use libfuzzer_sys::fuzz_target;
use schema::{Datapoint, MetricList, Tag};

fn record(line: &str) -> MetricList {
    let mut parts: Vec<&str> = line.split('|').collect();
    let value = match parts.pop().unwrap_or_default() {
        "nan" => f64::NAN,
        "inf" => f64::INFINITY,
        "-inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or(v.len() as f64),
    };
    let name = if parts.is_empty() {
        ""
    } else {
        parts.remove(0)
    };
    MetricList {
        topic: "t".into(),
        tags: parts
            .iter()
            .map(|t| {
                let (k, v) = t.split_once('=').unwrap_or((t, ""));
                Tag::new(k, v)
            })
            .collect(),
        datapoints: vec![Datapoint::new(name, 0, value)],
    }
}

fn render(store: &Store, chunk: usize) -> (String, u64) {
    let mut renderer = Renderer::new(store.snapshot(), HashSet::new());
    let mut text = String::new();
    while let Some(part) = renderer.next_chunk(chunk) {
        assert!(part.is_empty() || part.ends_with('\n'));
        text.push_str(&part);
    }
    (text, renderer.skipped().duplicate)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let store = Store::new(
        StoreSettings {
            max_series: 1000,
            expiry: Duration::from_secs(60),
            drop_tags: Vec::new(),
        },
        Arc::new(Stats::default()),
    );
    for line in String::from_utf8_lossy(rest).lines() {
        let mut data = Vec::new();
        schema::datum::write_metric_list(&mut data, &record(line));
        let routed = Routed {
            topic: "t".into(),
            key: None,
            data: data.into(),
            datapoints: 1,
            share: 0,
            seq: 0,
        };
        store.observe(Source::Input, &[routed]);
    }
    let (text, duplicates) = render(&store, usize::from(first) + 1);
    let samples = check_text(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(samples.len() as u64 + duplicates, store.len() as u64);
    let (whole, _) = render(&store, usize::MAX);
    assert_eq!(text, whole);
});

//! Proptest strategies for the records, shared with the simulator and tests.

use proptest::prelude::*;

use crate::model::{Datapoint, MetricList, Tag};

/// Any string, including non-ASCII and empty ones, kept short.
pub fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_.]{0,12}",
        any::<String>().prop_map(|s| s.chars().take(16).collect()),
        Just("ünïcødé ✓ 指标".to_owned()),
    ]
}

/// Any double, NaN and the infinities included.
pub fn any_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-0.0),
        Just(f64::MIN_POSITIVE),
    ]
}

/// Any time, the i64 extremes included.
pub fn any_time() -> impl Strategy<Value = i64> {
    prop_oneof![
        any::<i64>(),
        Just(i64::MIN),
        Just(i64::MAX),
        0i64..2_000_000_000_000
    ]
}

/// Any tag.
pub fn any_tag() -> impl Strategy<Value = Tag> {
    (any_text(), any_text()).prop_map(|(key, value)| Tag { key, value })
}

/// Any datapoint.
pub fn any_datapoint() -> impl Strategy<Value = Datapoint> {
    (any_text(), any_time(), any_value()).prop_map(|(name, time_ms, value)| Datapoint {
        name,
        time_ms,
        value,
    })
}

/// Any MetricList, empty arrays included.
pub fn any_metric_list() -> impl Strategy<Value = MetricList> {
    (
        any_text(),
        prop::collection::vec(any_tag(), 0..4),
        prop::collection::vec(any_datapoint(), 0..8),
    )
        .prop_map(|(topic, tags, datapoints)| MetricList {
            topic,
            tags,
            datapoints,
        })
}

/// Up to `max` MetricLists.
pub fn any_metric_lists(max: usize) -> impl Strategy<Value = Vec<MetricList>> {
    prop::collection::vec(any_metric_list(), 0..max)
}

/// Compares records the way the wire does: doubles by bit pattern, with
/// every NaN equal to every other NaN.
pub fn same_records(a: &[MetricList], b: &[MetricList]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.topic == y.topic
                && x.tags == y.tags
                && x.datapoints.len() == y.datapoints.len()
                && x.datapoints.iter().zip(&y.datapoints).all(|(p, q)| {
                    p.name == q.name
                        && p.time_ms == q.time_ms
                        && (p.value.to_bits() == q.value.to_bits()
                            || (p.value.is_nan() && q.value.is_nan()))
                })
        })
}

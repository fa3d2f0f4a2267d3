//! Agent JSON to MetricLists. Pure functions over `serde_json::Value`, total
//! on any input: what can't be mapped is skipped and reported, never a panic.
//!
//! One MetricList per executor or container. Its tags are the entry's
//! top-level strings (`container_id`, `executor_id`, `executor_name`,
//! `framework_id`, `source`), sorted by key so that label sets are stable.
//! Every numeric leaf of `statistics` except its top-level `timestamp`
//! becomes one Datapoint, at `time_ms = timestamp × 1000`. Nested objects
//! and arrays are flattened with dotted names instead of lost:
//!
//! - an object member: `parent.member`, e.g. `perf.cycles`,
//!   `net_snmp_statistics.tcp_stats.CurrEstab`;
//! - an array element: `parent.<key>` where `<key>` is the element's string
//!   `id` or `op` (or its `device` as `major_minor`), otherwise its index:
//!   `net_traffic_control_statistics.bw_limit.bytes`,
//!   `blkio_statistics.cfq.0.io_serviced.TOTAL`,
//!   `blkio_statistics.throttling.8_0.io_service_bytes.READ`;
//! - an element `{"op": X, "value": N}` (only strings besides `value`) is
//!   the one datapoint `parent.X`.
//!
//! The strings `"NaN"`, `"Infinity"` and `"-Infinity"` are read as doubles
//! (see [`tolerate_non_finite`]).

use schema::{Datapoint, MetricList, Tag};
use serde_json::Value;

/// Rewrites bare `NaN`, `Infinity` and `-Infinity` tokens (outside strings)
/// as the strings `"NaN"`, `"Infinity"` and `"-Infinity"`, which the mapping
/// reads back as doubles. Everything else is left as it is.
pub fn tolerate_non_finite(body: &str) -> std::borrow::Cow<'_, str> {
    if !body.contains("NaN") && !body.contains("Infinity") {
        return std::borrow::Cow::Borrowed(body);
    }
    let mut out = String::with_capacity(body.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = body;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        match token {
            Some(token) => {
                out.push('"');
                out.push_str(token);
                out.push('"');
                rest = &rest[token.len()..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

/// What a mapping produced, and what it had to skip.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Mapped {
    /// The MetricLists.
    pub lists: Vec<MetricList>,
    /// Entries skipped, with the reason (e.g. no `statistics`).
    pub skipped: Vec<String>,
    /// Entries whose `statistics` had no `timestamp`; `now_ms` was used.
    pub missing_timestamp: usize,
}

/// Naming and topic choices of a mapping.
#[derive(Debug, Clone, Copy)]
pub struct Naming<'a> {
    /// The MetricList topic, or `None` to use each entry's `framework_id`.
    pub topic: Option<&'a str>,
    /// Prefix of every datapoint name, e.g. `dcos.metrics.container.`.
    pub prefix: &'a str,
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

fn element_key(index: usize, element: &Value) -> String {
    if let Some(object) = element.as_object() {
        for key in ["id", "op"] {
            if let Some(name) = object.get(key).and_then(Value::as_str)
                && !name.is_empty()
            {
                return name.to_owned();
            }
        }
        if let Some(device) = object.get("device").and_then(Value::as_object)
            && let (Some(major), Some(minor)) = (device.get("major"), device.get("minor"))
        {
            return format!("{major}_{minor}");
        }
    }
    index.to_string()
}

/// Appends one Datapoint per numeric leaf under `value`, named `path`.
pub fn flatten(path: &mut String, value: &Value, time_ms: i64, out: &mut Vec<Datapoint>) {
    if let Some(v) = number(value) {
        out.push(Datapoint::new(path.clone(), time_ms, v));
        return;
    }
    let len = path.len();
    let push_key = |path: &mut String, key: &str| {
        if !path.is_empty() && !path.ends_with('.') {
            path.push('.');
        }
        path.push_str(key);
    };
    match value {
        Value::Object(members) => {
            for (key, member) in members {
                push_key(path, key);
                flatten(path, member, time_ms, out);
                path.truncate(len);
            }
        }
        Value::Array(elements) => {
            for (i, element) in elements.iter().enumerate() {
                push_key(path, &element_key(i, element));
                match value_only(element) {
                    // `{"op": "READ", "value": 5}` reads as `parent.READ`.
                    Some(v) => out.push(Datapoint::new(path.clone(), time_ms, v)),
                    None => flatten(path, element, time_ms, out),
                }
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// The `value` of an element whose only number is its `value` member.
fn value_only(element: &Value) -> Option<f64> {
    let object = element.as_object()?;
    let v = object.get("value").and_then(number)?;
    object
        .iter()
        .all(|(k, m)| k == "value" || (number(m).is_none() && !m.is_object() && !m.is_array()))
        .then_some(v)
}

/// Maps a `/monitor/statistics` or `/containers` body.
pub fn map_entries(body: &Value, naming: Naming<'_>, now_ms: i64) -> Mapped {
    let mut mapped = Mapped::default();
    let Some(entries) = body.as_array() else {
        mapped.skipped.push("body is not a JSON array".into());
        return mapped;
    };
    for (i, entry) in entries.iter().enumerate() {
        map_entry(i, entry, naming, now_ms, &mut mapped);
    }
    mapped
}

/// [`map_entries`] straight from the body's text, one entry at a time: the
/// whole body is never held as a JSON tree (which takes several times its
/// size), only one entry of it. Bare `NaN` and `Infinity` are tolerated.
pub fn map_entries_text(body: &str, naming: Naming<'_>, now_ms: i64) -> Result<Mapped, String> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, SeqAccess, Visitor};
    struct Entries<'m, 'n> {
        mapped: &'m mut Mapped,
        naming: Naming<'n>,
        now_ms: i64,
    }
    impl<'de> DeserializeSeed<'de> for Entries<'_, '_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
            deserializer.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Entries<'_, '_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON array of entries")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0;
            while let Some(entry) = seq.next_element::<Value>()? {
                map_entry(i, &entry, self.naming, self.now_ms, self.mapped);
                i += 1;
            }
            Ok(())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            // Values are read as the tree would read them, so that what it
            // refuses (a number out of range) is refused here too.
            while map.next_entry::<IgnoredAny, Value>()?.is_some() {}
            self.mapped.skipped.push("body is not a JSON array".into());
            Ok(())
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
            self.mapped.skipped.push("body is not a JSON array".into());
            Ok(())
        }
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
            self.visit_unit()
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
            self.visit_unit()
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
            self.visit_unit()
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
            self.visit_unit()
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
            self.visit_unit()
        }
    }
    let body = tolerate_non_finite(body);
    let mut mapped = Mapped::default();
    let mut deserializer = serde_json::Deserializer::from_str(&body);
    Entries {
        mapped: &mut mapped,
        naming,
        now_ms,
    }
    .deserialize(&mut deserializer)
    .and_then(|()| deserializer.end())
    .map_err(|e| e.to_string())?;
    Ok(mapped)
}

/// Maps one entry (the `i`th) of a `/monitor/statistics` or `/containers`
/// body into `mapped`.
fn map_entry(i: usize, entry: &Value, naming: Naming<'_>, now_ms: i64, mapped: &mut Mapped) {
    let Some(object) = entry.as_object() else {
        mapped.skipped.push(format!("entry {i} is not an object"));
        return;
    };
    let Some(statistics) = object.get("statistics").and_then(Value::as_object) else {
        let who = object
            .get("executor_id")
            .and_then(Value::as_str)
            .unwrap_or("?");
        mapped
            .skipped
            .push(format!("entry {i} (executor {who}) has no statistics"));
        return;
    };
    let mut tags: Vec<Tag> = object
        .iter()
        .filter_map(|(key, value)| value.as_str().map(|v| Tag::new(key, v)))
        .collect();
    tags.sort_by(|a, b| a.key.cmp(&b.key));
    let time_ms = match statistics
        .get("timestamp")
        .and_then(number)
        .filter(|t| t.is_finite())
    {
        Some(seconds) => (seconds * 1000.0) as i64,
        None => {
            mapped.missing_timestamp += 1;
            now_ms
        }
    };
    let mut datapoints = Vec::with_capacity(statistics.len());
    let mut path = String::from(naming.prefix);
    for (key, value) in statistics {
        if key == "timestamp" {
            continue;
        }
        let len = path.len();
        path.push_str(key);
        flatten(&mut path, value, time_ms, &mut datapoints);
        path.truncate(len);
    }
    let topic = match naming.topic {
        Some(topic) => topic.to_owned(),
        None => object
            .get("framework_id")
            .and_then(Value::as_str)
            .unwrap_or("unknown_container")
            .to_owned(),
    };
    mapped.lists.push(MetricList {
        topic,
        tags,
        datapoints,
    });
}

/// Maps a `/metrics/snapshot` body: one MetricList on topic `topic`, each
/// key `a/b` named `<prefix>a.b`, stamped `now_ms`.
pub fn map_snapshot(body: &Value, topic: &str, prefix: &str, now_ms: i64) -> Mapped {
    let mut mapped = Mapped::default();
    let Some(members) = body.as_object() else {
        mapped.skipped.push("snapshot is not a JSON object".into());
        return mapped;
    };
    let datapoints = members
        .iter()
        .filter_map(|(key, value)| {
            number(value)
                .map(|v| Datapoint::new(format!("{prefix}{}", key.replace('/', ".")), now_ms, v))
        })
        .collect();
    mapped.lists.push(MetricList {
        topic: topic.to_owned(),
        tags: Vec::new(),
        datapoints,
    });
    mapped
}

/// Counts the numeric leaves under `value` (what `flatten` must emit).
pub fn numeric_leaves(value: &Value) -> usize {
    if number(value).is_some() {
        return 1;
    }
    match value {
        Value::Object(members) => members.values().map(numeric_leaves).sum(),
        Value::Array(elements) => elements.iter().map(numeric_leaves).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mapping_the_text_as_it_is_parsed_gives_what_mapping_the_tree_gives() {
        let naming = Naming {
            topic: None,
            prefix: "p.",
        };
        for name in [
            "mesos-agent-containers-response-1.json",
            "mesos-agent-containers-response-2.json",
            "mesos-agent-containers-blkio-testdata.json",
            "mesos-agent-containers-no-statistics-testdata.json",
            "mesos-monitor-statistics-doc-example.json",
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fixtures/mesos")
                .join(name);
            let text = std::fs::read_to_string(path).unwrap();
            let tree = super::super::client::parse_body("x", &text).unwrap();
            assert_eq!(
                map_entries_text(&text, naming, 7).unwrap(),
                map_entries(&tree, naming, 7),
                "{name}"
            );
        }
        for text in ["{}", "3", "null", "\"x\"", "[1, [2], {}]", "[NaN]"] {
            let tree = super::super::client::parse_body("x", text).unwrap();
            assert_eq!(
                map_entries_text(text, naming, 7).unwrap(),
                map_entries(&tree, naming, 7),
                "{text}"
            );
        }
        assert!(map_entries_text("[{]", naming, 7).is_err());
        // Found by fuzzing (agent_entries): a body that is not an array, with
        // a number out of f64's range, was skipped as the wrong shape by the
        // text mapper but refused by the parser. Both refuse it now.
        let out_of_range = "\n { \"daj\": 8E0474\n\t}";
        assert!(super::super::client::parse_body("x", out_of_range).is_err());
        assert!(map_entries_text(out_of_range, naming, 7).is_err());
        assert!(map_entries_text("[] trailing", naming, 7).is_err());
    }

    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn fixture(name: &str) -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/mesos")
            .join(name);
        super::super::client::parse_body("fixture", &std::fs::read_to_string(path).unwrap())
            .unwrap()
    }

    const SAMPLE: Naming<'static> = Naming {
        topic: Some("sample_metrics"),
        prefix: "",
    };

    #[test]
    fn real_containers_response() {
        let body = fixture("mesos-agent-containers-response-1.json");
        let mapped = map_entries(&body, SAMPLE, 0);
        assert_eq!(mapped.lists.len(), 8);
        let first = &mapped.lists[0];
        let keys: Vec<&str> = first.tags.iter().map(|t| t.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "container_id",
                "executor_id",
                "executor_name",
                "framework_id",
                "source"
            ]
        );
        assert_eq!(
            first.datapoints.len(),
            18,
            "the 19 statistics keys less timestamp"
        );
        let ts = body[0]["statistics"]["timestamp"].as_f64().unwrap();
        assert!(
            first
                .datapoints
                .iter()
                .all(|d| d.time_ms == (ts * 1000.0) as i64)
        );
        assert!(
            first
                .datapoints
                .iter()
                .any(|d| d.name == "cpus_user_time_secs" && d.value == 0.08)
        );
    }

    #[test]
    fn empty_source_and_docs_example() {
        let body = fixture("mesos-agent-containers-response-2.json");
        let mapped = map_entries(&body, SAMPLE, 0);
        assert!(mapped.lists.iter().any(|l| l.tag("source") == Some("")));
        let doc = map_entries(
            &fixture("mesos-monitor-statistics-doc-example.json"),
            SAMPLE,
            0,
        );
        assert_eq!(doc.lists.len(), 1);
        assert_eq!(
            doc.lists[0].datapoints.len(),
            11,
            "the docs example has 11 statistics besides timestamp"
        );
    }

    #[test]
    fn nested_blkio_is_flattened_and_a_missing_timestamp_uses_now() {
        let mapped = map_entries(
            &fixture("mesos-agent-containers-blkio-testdata.json"),
            SAMPLE,
            42_000,
        );
        assert_eq!(mapped.missing_timestamp, 1);
        let names: Vec<&str> = mapped.lists[0]
            .datapoints
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        assert!(
            names.contains(&"blkio_statistics.cfq.0.io_merged.TOTAL"),
            "{names:?}"
        );
        assert!(
            names.contains(&"blkio_statistics.throttling.8_0.io_service_bytes.READ"),
            "{names:?}"
        );
        assert!(
            names.contains(&"blkio_statistics.throttling.1.io_serviced.TOTAL"),
            "{names:?}"
        );
        assert!(
            mapped.lists[0]
                .datapoints
                .iter()
                .all(|d| d.time_ms == 42_000)
        );
    }

    #[test]
    fn a_missing_statistics_is_skipped_not_a_crash() {
        let mapped = map_entries(
            &fixture("mesos-agent-containers-no-statistics-testdata.json"),
            SAMPLE,
            0,
        );
        assert_eq!(mapped.lists.len(), 1);
        assert_eq!(mapped.skipped.len(), 1);
    }

    #[test]
    fn topic_from_framework_id_with_prefix() {
        let body = fixture("mesos-agent-containers-response-1.json");
        let mapped = map_entries(
            &body,
            Naming {
                topic: None,
                prefix: "dcos.metrics.container.",
            },
            0,
        );
        assert_eq!(
            mapped.lists[0].topic,
            body[0]["framework_id"].as_str().unwrap()
        );
        assert!(
            mapped.lists[0]
                .datapoints
                .iter()
                .all(|d| d.name.starts_with("dcos.metrics.container."))
        );
    }

    #[test]
    fn snapshot_names_and_topic() {
        let mapped = map_snapshot(
            &fixture("mesos-agent-metrics-snapshot-response.json"),
            "agent",
            "dcos.metrics.agent.",
            7,
        );
        let list = &mapped.lists[0];
        assert_eq!(list.topic, "agent");
        assert!(
            list.datapoints
                .iter()
                .any(|d| d.name == "dcos.metrics.agent.slave.tasks_finished" && d.value == 1541.0)
        );
    }

    #[test]
    fn nan_and_huge_integers() {
        let body = super::super::client::parse_body("x", r#"[{"executor_id":"e","statistics":{"timestamp":1.5,"a":NaN,"b":184467440737095516150,"c":{"d":-Infinity}}}]"#).unwrap();
        let mapped = map_entries(&body, SAMPLE, 0);
        let points = &mapped.lists[0].datapoints;
        assert_eq!(points.len(), 3);
        assert!(points.iter().any(|d| d.name == "a" && d.value.is_nan()));
        assert!(points.iter().any(|d| d.name == "b" && d.value > 1e20));
        assert!(
            points
                .iter()
                .any(|d| d.name == "c.d" && d.value == f64::NEG_INFINITY)
        );
        assert!(points.iter().all(|d| d.time_ms == 1500));
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "[a-zA-Z_]{0,6}".prop_map(Value::from),
            Just(json!("NaN")),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{1,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_json_never_panics(body in any_json()) {
            let _ = map_entries(&body, SAMPLE, 0);
            let _ = map_entries(&Value::Array(vec![body.clone()]), SAMPLE, 0);
            let _ = map_snapshot(&body, "agent", "", 0);
        }

        #[test]
        fn every_numeric_leaf_is_one_datapoint_and_tags_are_sorted(
            statistics in prop::collection::btree_map("[a-z_]{1,8}", any_json(), 0..8),
            strings in prop::collection::btree_map("[a-z_]{1,8}", "[a-z]{0,4}", 0..5),
        ) {
            let mut entry: serde_json::Map<String, Value> = strings.into_iter().map(|(k, v)| (k, Value::from(v))).collect();
            let statistics: serde_json::Map<String, Value> = statistics.into_iter().filter(|(k, _)| k != "timestamp").collect();
            let leaves: usize = statistics.values().map(numeric_leaves).sum();
            entry.insert("statistics".into(), Value::Object(statistics));
            let mapped = map_entries(&Value::Array(vec![Value::Object(entry)]), SAMPLE, 0);
            prop_assert_eq!(mapped.lists.len(), 1);
            prop_assert_eq!(mapped.lists[0].datapoints.len(), leaves);
            let keys: Vec<&String> = mapped.lists[0].tags.iter().map(|t| &t.key).collect();
            let mut sorted = keys.clone();
            sorted.sort();
            prop_assert_eq!(keys, sorted);
        }
    }
}

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use proptest::prelude::*;
use schema::{Datapoint, MetricList, Tag};

use super::prometheus::{Renderer, declared_names, label_name, sanitize};
use super::*;
use crate::route::Routed;

fn routed(name_values: &[(&str, f64)], tags: &[(&str, &str)]) -> Routed {
    let list = MetricList {
        topic: "t".into(),
        tags: tags.iter().map(|(k, v)| Tag::new(*k, *v)).collect(),
        datapoints: name_values
            .iter()
            .map(|(n, v)| Datapoint::new(*n, 1_000, *v))
            .collect(),
    };
    let mut data = Vec::new();
    schema::datum::write_metric_list(&mut data, &list);
    Routed {
        topic: "t".into(),
        key: None,
        data: data.into(),
        datapoints: name_values.len() as u32,
        share: 0,
        seq: 0,
    }
}

/// New series refused, for any reason.
fn refused_total(stats: &Stats) -> u64 {
    stats.store_refused.iter().map(|r| r.load(Relaxed)).sum()
}

fn store(max_series: usize) -> (Store, Arc<Stats>) {
    let stats = Arc::new(Stats::default());
    let store = Store::new(
        StoreSettings {
            max_series,
            expiry: Duration::from_secs(120),
            drop_tags: Vec::new(),
        },
        stats.clone(),
    );
    (store, stats)
}

fn render_all(
    store: &Store,
    reserved: HashSet<String>,
    chunk: usize,
) -> (String, prometheus::Skipped) {
    let mut renderer = Renderer::new(store.snapshot(), reserved);
    let mut text = String::new();
    while let Some(part) = renderer.next_chunk(chunk) {
        assert!(
            part.is_empty() || part.ends_with('\n'),
            "a chunk ends a line"
        );
        text.push_str(&part);
    }
    (text, renderer.skipped())
}

#[test]
fn the_latest_value_of_each_series_is_kept_with_its_sorted_tags() {
    let (store, stats) = store(100);
    store.observe(
        Source::Input,
        &[routed(
            &[("a", 1.0), ("b", 2.0)],
            &[("z", "1"), ("k", "v"), ("k", "later")],
        )],
    );
    store.observe(
        Source::Input,
        &[routed(&[("a", 3.0)], &[("k", "v"), ("z", "1")])],
    );
    let snapshot = store.snapshot();
    assert_eq!(
        snapshot.len(),
        2,
        "the same tags in another order are the same series"
    );
    let a = snapshot
        .iter()
        .find(|(_, key, _)| parse_key(key).0 == "a")
        .unwrap();
    assert_eq!(a.2.value, 3.0);
    assert_eq!(&*a.0, "a");
    assert_eq!(
        parse_key(&a.1).1.collect::<Vec<_>>(),
        vec![("k", "v"), ("z", "1")],
        "sorted by key; of a key given twice the first is kept"
    );
    assert_eq!(stats.store_series.load(Relaxed), 2);
    assert!(stats.store_bytes.load(Relaxed) > 0);
}

#[test]
fn names_and_tags_with_any_bytes_make_distinct_keys() {
    let (store, _) = store(100);
    // Without length prefixes these two would make the same key.
    store.observe(Source::Input, &[routed(&[("a\0b", 1.0)], &[])]);
    store.observe(Source::Input, &[routed(&[("a", 2.0)], &[("b", "")])]);
    assert_eq!(store.len(), 2);
}

#[test]
fn new_series_beyond_each_bound_are_refused_and_counted_while_held_ones_update() {
    let (store, stats) = store(3);
    let names: Vec<String> = (0..5).map(|i| format!("s{i}")).collect();
    for name in &names {
        store.observe(Source::Input, &[routed(&[(name, 1.0)], &[])]);
    }
    assert_eq!(store.len(), 3);
    assert_eq!(
        stats.store_refused[Refusal::Series as usize].load(Relaxed),
        2
    );
    store.observe(Source::Input, &[routed(&[("s0", 9.0)], &[])]);
    assert!(
        store
            .snapshot()
            .iter()
            .any(|(_, k, s)| parse_key(k).0 == "s0" && s.value == 9.0)
    );

    // Bytes: 4 series of 256 bytes on average; one long key takes them.
    let (store, stats) = store_with(4);
    let long = "x".repeat(900);
    store.observe(Source::Input, &[routed(&[("long", 1.0)], &[("k", &long)])]);
    store.observe(Source::Input, &[routed(&[("other", 1.0)], &[("k", &long)])]);
    assert_eq!(store.len(), 1);
    assert_eq!(
        stats.store_refused[Refusal::Bytes as usize].load(Relaxed),
        1
    );

    // Labels: a family's label names are bounded.
    let (store, stats) = store_with(10_000);
    for i in 0..MAX_FAMILY_LABELS + 5 {
        store.observe(
            Source::Input,
            &[routed(&[("f", 1.0)], &[(&format!("k{i}"), "v")])],
        );
    }
    assert_eq!(store.len(), MAX_FAMILY_LABELS);
    assert_eq!(
        stats.store_refused[Refusal::Labels as usize].load(Relaxed),
        5
    );
    let long_key = "k".repeat(MAX_FAMILY_LABEL_BYTES + 1);
    store.observe(Source::Input, &[routed(&[("g", 1.0)], &[(&long_key, "v")])]);
    assert_eq!(
        stats.store_refused[Refusal::Labels as usize].load(Relaxed),
        6
    );
}

fn store_with(max_series: usize) -> (Store, Arc<Stats>) {
    store(max_series)
}

#[test]
fn expired_series_go_and_take_their_labels_out_of_the_family() {
    let stats = Arc::new(Stats::default());
    let store = Store::new(
        StoreSettings {
            max_series: 100,
            expiry: Duration::ZERO,
            drop_tags: Vec::new(),
        },
        stats.clone(),
    );
    for i in 0..MAX_FAMILY_LABELS {
        store.observe(
            Source::Input,
            &[routed(&[("f", 1.0)], &[(&format!("k{i}"), "v")])],
        );
    }
    assert_eq!(store.expire(), MAX_FAMILY_LABELS);
    assert!(store.is_empty());
    assert_eq!(
        stats.store_series_expired.load(Relaxed),
        MAX_FAMILY_LABELS as u64
    );
    assert_eq!(stats.store_series.load(Relaxed), 0);
    assert_eq!(stats.store_bytes.load(Relaxed), 0);
    // The family's label names went with its series: new ones fit again.
    for i in 0..MAX_FAMILY_LABELS {
        store.observe(
            Source::Input,
            &[routed(&[("f", 1.0)], &[(&format!("new{i}"), "v")])],
        );
    }
    assert_eq!(store.len(), MAX_FAMILY_LABELS);
    assert_eq!(
        stats.store_refused[Refusal::Labels as usize].load(Relaxed),
        0
    );
}

#[test]
fn a_family_keeps_the_labels_its_remaining_series_use() {
    let (store, stats) = store(100);
    store.observe(
        Source::Input,
        &[
            routed(&[("f", 1.0)], &[("shared", "a"), ("only_b", "x")]),
            routed(&[("f", 2.0)], &[("shared", "b")]),
        ],
    );
    let bytes_with_both = stats.store_bytes.load(Relaxed);
    assert_eq!(
        store.remove_where(|key, _| parse_key(key).1.any(|(k, _)| k == "only_b")),
        1
    );
    let (text, _) = render_all(&store, HashSet::new(), 1);
    assert!(text.contains("f{shared=\"b\"} 2\n"), "{text}");
    assert!(!text.contains("only_b"), "{text}");
    assert!(stats.store_bytes.load(Relaxed) < bytes_with_both);
    // Every label name but `shared` is free again: 63 new ones fit.
    for i in 0..MAX_FAMILY_LABELS - 1 {
        store.observe(
            Source::Input,
            &[routed(&[("f", 1.0)], &[(&format!("n{i}"), "v")])],
        );
    }
    assert_eq!(
        stats.store_refused[Refusal::Labels as usize].load(Relaxed),
        0
    );
    store.observe(
        Source::Input,
        &[routed(&[("f", 1.0)], &[("one_more", "v")])],
    );
    assert_eq!(
        stats.store_refused[Refusal::Labels as usize].load(Relaxed),
        1
    );
    assert_eq!(store.remove_where(|_, _| true), MAX_FAMILY_LABELS);
    assert_eq!(
        stats.store_bytes.load(Relaxed),
        0,
        "every byte counted in is counted out"
    );
}

#[test]
fn names_are_sanitized_as_dcos_metrics_did_without_lowercasing() {
    for (name, want) in [
        ("abc", "abc"),
        ("abc123", "abc123"),
        ("123abc", "_123abc"),
        ("foo-bar", "foo_bar"),
        ("foo bar", "foo_bar"),
        ("cpus.user.time", "cpus_user_time"),
        ("CPU.Total", "CPU_Total"),
        ("foo:bar", "foo:bar"),
        ("", "_"),
        ("é", "_"),
    ] {
        assert_eq!(sanitize(name), want, "{name:?}");
    }
    assert_eq!(label_name("foo:bar").as_deref(), Some("foo_bar"));
    assert_eq!(label_name("9lives").as_deref(), Some("_9lives"));
    assert_eq!(label_name("__name__"), None);
    assert_eq!(
        label_name("_.x").as_deref(),
        None,
        "`_.x` becomes `__x`, reserved"
    );
}

#[test]
fn a_family_has_one_label_set_and_no_label_twice() {
    let (store, _) = store(100);
    store.observe(
        Source::Agent,
        &[
            routed(
                &[("cpus.user.time", 1.5)],
                &[("container_id", "c1"), ("source", "s")],
            ),
            routed(
                &[("cpus.user.time", 2.5)],
                &[("container_id", "c2"), ("task_name", "t")],
            ),
            // Two keys that sanitize to one label: the exact spelling wins.
            routed(
                &[("mem", 1.0)],
                &[("task.name", "dotted"), ("task_name", "exact")],
            ),
            // Neither exact: the first in byte order wins.
            routed(&[("disk", 1.0)], &[("a-b", "dash"), ("a.b", "dot")]),
        ],
    );
    let (text, skipped) = render_all(&store, HashSet::new(), 1);
    assert_eq!(skipped, prometheus::Skipped::default());
    assert!(
        text.contains("cpus_user_time{container_id=\"c1\",source=\"s\",task_name=\"\"} 1.5\n"),
        "{text}"
    );
    assert!(
        text.contains("cpus_user_time{container_id=\"c2\",source=\"\",task_name=\"t\"} 2.5\n"),
        "{text}"
    );
    assert!(text.contains("mem{task_name=\"exact\"} 1\n"), "{text}");
    assert!(text.contains("disk{a_b=\"dash\"} 1\n"), "{text}");
    assert_eq!(text.matches("# TYPE cpus_user_time gauge\n").count(), 1);
}

#[test]
fn non_finite_values_are_spelled_as_prometheus_spells_them_and_names_taken_are_left_out() {
    let (store, _) = store(100);
    store.observe(
        Source::Input,
        &[routed(
            &[
                ("nan", f64::NAN),
                ("inf", f64::INFINITY),
                ("neg", f64::NEG_INFINITY),
                ("big", 1e300),
                ("tiny", 1e-300),
                ("collector.spool.bytes", 1.0),
                ("collector_kafka_batch_records_bucket", 1.0),
            ],
            &[],
        )],
    );
    let own = crate::stats::prometheus::render(&Stats::default(), Default::default());
    let (text, skipped) = render_all(&store, declared_names(&own), 64 * 1024);
    assert!(text.contains("\nnan NaN\n"), "{text}");
    assert!(text.contains("\ninf +Inf\n"), "{text}");
    assert!(text.contains("\nneg -Inf\n"), "{text}");
    assert!(text.contains("\nbig 1e300\n"), "{text}");
    assert!(text.contains("\ntiny 1e-300\n"), "{text}");
    assert!(!text.contains("collector_"), "{text}");
    assert_eq!(skipped.name_taken, 2);
}

#[test]
fn series_that_come_out_the_same_are_given_once() {
    let (store, _) = store(100);
    store.observe(
        Source::Input,
        &[
            routed(&[("a.b", 1.0), ("a_b", 2.0)], &[]),
            routed(&[("x", 1.0)], &[("k.1", "v")]),
            routed(&[("x", 2.0)], &[("k_1", "v")]),
        ],
    );
    let (text, skipped) = render_all(&store, HashSet::new(), 1);
    assert_eq!(skipped.duplicate, 2, "{text}");
    assert!(
        text.contains("\na_b 1\n"),
        "the first in the order of the original names: {text}"
    );
    assert!(text.contains("x{k_1=\"v\"} 1\n"), "{text}");
}

#[test]
fn label_values_are_escaped() {
    let (store, _) = store(100);
    store.observe(
        Source::Input,
        &[routed(&[("m", 1.0)], &[("k", "a\"b\\c\nd")])],
    );
    let (text, _) = render_all(&store, HashSet::new(), 1);
    assert!(text.contains(r#"m{k="a\"b\\c\nd"} 1"#), "{text}");
}

fn parse_sample(line: &str) -> (String, Vec<(String, String)>, f64) {
    prometheus::parse_sample(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

fn check_exposition(text: &str) {
    if let Err(e) = prometheus::check_text(text) {
        panic!("{e}\n{text}");
    }
}

/// The rules of the module's doc, written again without its code: each
/// series' last value, by family and labels (the union, `""` where
/// missing), the first by original name and tags where two come out the
/// same.
#[allow(clippy::type_complexity)]
fn model(
    records: &[(Vec<(String, f64)>, Vec<(String, String)>)],
) -> BTreeMap<(String, Vec<(String, String)>), f64> {
    fn clean(s: &str, colon: bool) -> String {
        let mut out: String = s
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
            out.insert(0, '_');
        }
        out
    }
    let label = |k: &str| Some(clean(k, false)).filter(|l| !l.starts_with("__"));
    // Each series' last value; a record's tags deduplicated, the first kept.
    let mut series: BTreeMap<(String, Vec<(String, String)>), f64> = BTreeMap::new();
    for (points, tags) in records {
        let mut kept: Vec<(String, String)> = Vec::new();
        for (k, v) in tags {
            if !kept.iter().any(|(held, _)| held == k) {
                kept.push((k.clone(), v.clone()));
            }
        }
        kept.sort();
        for (name, value) in points {
            series.insert((name.clone(), kept.clone()), *value);
        }
    }
    let mut families: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, tags) in series.keys() {
        let union = families.entry(clean(name, true)).or_default();
        union.extend(tags.iter().filter_map(|(k, _)| label(k)));
    }
    let mut out = BTreeMap::new();
    // In the order of the original name, then tags: the first one stays.
    for ((name, tags), value) in &series {
        let family = clean(name, true);
        let mut labels: BTreeMap<String, (String, bool)> = families[&family]
            .iter()
            .map(|l| (l.clone(), (String::new(), false)))
            .collect();
        let mut set: BTreeSet<String> = BTreeSet::new();
        for (k, v) in tags {
            let Some(l) = label(k) else { continue };
            let exact = &l == k;
            let held = labels.get_mut(&l).unwrap();
            if !set.contains(&l) || (exact && !held.1) {
                *held = (v.clone(), exact);
                set.insert(l);
            }
        }
        let labels: Vec<(String, String)> = labels.into_iter().map(|(k, (v, _))| (k, v)).collect();
        out.entry((family, labels)).or_insert(*value);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn any_names_tags_and_values_render_to_text_a_parser_reads(
        records in prop::collection::vec(
            (
                prop::collection::vec(("[a-c.:_0-9é -]{0,6}", any::<f64>()), 1..5),
                prop::collection::vec(("[a-c._:0-9A-]{0,4}", "[a\"\\\\\n ]{0,4}"), 0..4),
            ),
            1..12,
        ),
        chunk in 1usize..4096,
    ) {
        let (store, _) = store(10_000);
        for (points, tags) in &records {
            let points: Vec<(&str, f64)> = points.iter().map(|(n, v)| (n.as_str(), *v)).collect();
            let tags: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            store.observe(Source::Input, &[routed(&points, &tags)]);
        }
        let (text, skipped) = render_all(&store, HashSet::new(), chunk);
        let (whole, _) = render_all(&store, HashSet::new(), usize::MAX);
        prop_assert_eq!(&text, &whole, "chunking changes nothing");
        check_exposition(&text);
        let samples = text.lines().filter(|l| !l.starts_with('#')).count() as u64;
        prop_assert_eq!(samples + skipped.duplicate, store.len() as u64, "every series given or counted");
        // What was written is what a model of the rules, written apart,
        // says from the input alone.
        let mut served = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, labels, value) = parse_sample(line);
            served.insert((name, labels), value.to_bits());
        }
        let expected: BTreeMap<_, _> = model(&records)
            .into_iter()
            .map(|(k, v)| (k, v.to_bits()))
            .collect();
        prop_assert_eq!(served, expected);
    }
}

/// `store_drop_tags`: a tag unique to each record (a sequence number) is
/// left out, so that the records are one series, its latest value; the
/// other tags stay.
#[test]
fn dropped_tags_leave_records_that_differ_only_by_them_one_series() {
    let stats = Arc::new(Stats::default());
    let store = Store::new(
        StoreSettings {
            max_series: 100,
            expiry: Duration::from_secs(120),
            drop_tags: vec!["seq".into(), "absent".into()],
        },
        stats.clone(),
    );
    for seq in 0..50 {
        store.observe(
            Source::Input,
            &[routed(
                &[("a", f64::from(seq))],
                &[("seq", &seq.to_string()), ("k", "v")],
            )],
        );
    }
    let snapshot = store.snapshot();
    assert_eq!(snapshot.len(), 1, "{snapshot:?}");
    let (_, key, sample) = &snapshot[0];
    let (name, tags) = parse_key(key);
    assert_eq!(name, "a");
    assert_eq!(tags.collect::<Vec<_>>(), vec![("k", "v")]);
    assert_eq!(sample.value, 49.0);
    assert_eq!(refused_total(&stats), 0);
}

/// A record whose keys take many turns (20,000 datapoints with 512 bytes
/// of tags: 10 MB of keys) is taken whole, a turn at a time.
#[test]
fn a_record_whose_keys_take_several_turns_is_taken_whole() {
    let (store, stats) = store(100_000);
    let names: Vec<String> = (0..20_000).map(|i| format!("m{i:05}")).collect();
    let points: Vec<(&str, f64)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as f64))
        .collect();
    let long = "v".repeat(512);
    store.observe(Source::Input, &[routed(&points, &[("k", &long)])]);
    let snapshot = store.snapshot();
    assert_eq!(snapshot.len(), 20_000);
    for (_, key, sample) in &snapshot {
        let (name, mut tags) = parse_key(key);
        let i: f64 = name[1..].parse().unwrap();
        assert_eq!(sample.value, i, "{name}");
        assert_eq!(tags.next(), Some(("k", long.as_str())));
    }
    assert_eq!(refused_total(&stats), 0);
}

/// Records whose tag parts fill several turns (300 records with 4 KiB of
/// tags each: 1.2 MB), and a series given twice in one feed, once in each
/// of two turns: every series is held once, with its last value.
#[test]
fn records_whose_tags_fill_several_turns_are_all_taken_and_the_last_value_wins() {
    let (store, _) = store(100_000);
    let values: Vec<String> = (0..300)
        .map(|i| format!("{i:04}{}", "v".repeat(4096)))
        .collect();
    let mut records: Vec<Routed> = values
        .iter()
        .map(|v| routed(&[("a", 1.0), ("b", 2.0)], &[("k", v), ("z", "1")]))
        .collect();
    // The first record's series again at the end: 1.2 MB later.
    records.push(routed(&[("a", 10.0)], &[("z", "1"), ("k", &values[0])]));
    store.observe(Source::Input, &records);
    let snapshot = store.snapshot();
    assert_eq!(snapshot.len(), 600);
    let by_key: BTreeMap<(String, String), f64> = snapshot
        .iter()
        .map(|(_, key, sample)| {
            let (name, mut tags) = parse_key(key);
            let (k, v) = tags.next().unwrap();
            assert_eq!(k, "k");
            assert_eq!(tags.next(), Some(("z", "1")), "tags sorted by key");
            ((name.to_owned(), v[..4].to_owned()), sample.value)
        })
        .collect();
    assert_eq!(by_key[&("a".to_owned(), "0000".to_owned())], 10.0);
    assert_eq!(by_key[&("b".to_owned(), "0000".to_owned())], 2.0);
    assert_eq!(by_key[&("a".to_owned(), "0299".to_owned())], 1.0);
}

/// The lookup's equality itself (the map calls it only on a hash match, so
/// the store-level test below could pass with a wrong one): a name and a
/// tag part are compared apart.
#[test]
fn a_key_is_its_name_and_its_tag_part_apart() {
    let key_of = |name: &str, tags: &[(&str, &str)]| {
        let mut key = Vec::new();
        put(&mut key, name);
        let start = key.len();
        for (k, v) in tags {
            put(&mut key, k);
            put(&mut key, v);
        }
        let part = key[start..].to_vec();
        (key, part)
    };
    let (ab, ab_part) = key_of("ab", &[("c", "d")]);
    let (a, a_part) = key_of("a", &[("bc", "d")]);
    let (abc, abc_part) = key_of("abc", &[]);
    assert!(key_is(&ab, b"ab", &ab_part));
    assert!(!key_is(&ab, b"a", &a_part));
    assert!(!key_is(&a, b"ab", &ab_part));
    assert!(!key_is(&abc, b"ab", &abc_part));
    assert!(!key_is(&ab, b"abc", &abc_part));
    assert!(!key_is(&ab, b"ab", &a_part));
}

/// Series that differ only in where their name ends and their tags begin
/// are apart: a series is matched by its name and its tags, not by their
/// bytes run together.
#[test]
fn a_name_and_tags_are_matched_apart() {
    let (store, _) = store(100);
    store.observe(
        Source::Input,
        &[
            routed(&[("ab", 1.0)], &[("c", "d")]),
            routed(&[("a", 2.0)], &[("bc", "d")]),
            routed(&[("abc", 3.0)], &[]),
        ],
    );
    store.observe(Source::Input, &[routed(&[("ab", 4.0)], &[("c", "d")])]);
    let mut values: Vec<f64> = store.snapshot().iter().map(|(_, _, s)| s.value).collect();
    values.sort_by(f64::total_cmp);
    assert_eq!(values, [2.0, 3.0, 4.0]);
}

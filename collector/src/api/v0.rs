//! The DC/OS v0 metrics API (`metrics_api_listen`), as dcos-metrics'
//! code served it (`producers/http`), read from the node store: the API
//! the DC/OS CLI and UI read, behind Admin Router's
//! `/system/v1/metrics/`.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /v0/ping` | `{"ok":true,"timestamp":…}` |
//! | `GET /v0/node` | the node metrics, or 204 |
//! | `GET /v0/containers` | the ids of the containers with metrics, `[]` when none (never 204) |
//! | `GET /v0/containers/{id}` | the container's metrics from the agent, or 204 |
//! | `GET /v0/containers/{id}/app` | the container's app metrics (records from the TCP input with its `container_id` tag), or 204 |
//! | `GET /v0/containers/{id}/app/{metric-id}` | those named `metric-id`, or 204 |
//! | `GET /v0/debug` | every series in one message, or 204 |
//!
//! A message is `{"datapoints":[{"name","value","unit","timestamp","tags"?}],
//! "dimensions":{…}}`. `dimensions` has `mesos_id` (the agent's id) and
//! `hostname` (the node's address) always, `cluster_id` when known, and,
//! for a container, the ids and names its records carry (`container_id`,
//! `executor_id`, `framework_id`, `framework_name`, `framework_role`,
//! `framework_principal`, `task_id`, `task_name`), and a container's
//! message its executor's `labels` (left out of its datapoints' tags).
//! A datapoint's `tags` are
//! its record's tags but `agent_id` (and, for an app datapoint, but the
//! dimensions). A series whose tags the agent's `/state` completed later
//! is given once, its newest. Values: numbers; NaN as the string `"NaN"` (as
//! dcos-metrics did), the infinities as `"Infinity"` and `"-Infinity"`
//! (JSON has no number for them). Node and container timestamps are
//! RFC 3339 with nanoseconds, app timestamps in whole seconds, as
//! dcos-metrics gave them. Where dcos-metrics matched `{id}` and
//! `{metric-id}` as prefixes (so `/app/foo` also gave `foobar`), these
//! match whole ids and names. 204 answers have an empty body.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::enrich::{Enrichment, Kind as EnrichKind};
use crate::sinks::store::{Key, Sample, Source, Store, parse_key};

/// Tags that become a message's dimensions rather than datapoint tags.
pub const DIMENSION_TAGS: &[&str] = &[
    "container_id",
    "executor_id",
    "framework_id",
    "framework_name",
    "framework_role",
    "framework_principal",
    "task_id",
    "task_name",
];

/// Tags that name the node, which `mesos_id` and `hostname` already give.
const NODE_TAGS: &[&str] = &["agent_id"];

/// Tags the collector adds from the agent's `/state`, which change once it
/// answers (and so do the labels it adds).
const ENRICHED_TAGS: &[&str] = &[
    "agent_id",
    "framework_name",
    "application_name",
    "task_id",
    "task_name",
    "framework_role",
    "framework_principal",
    "executor_name",
];

/// What the routes read.
#[derive(Clone)]
pub struct V0State {
    /// The node store.
    pub store: Arc<Store>,
    /// The agent's `/state`, for `mesos_id` and `hostname`.
    pub enrichment: watch::Receiver<Arc<Enrichment>>,
    /// The cluster's id (`cluster_id`, or `/var/lib/dcos/cluster-id`).
    pub cluster_id: Option<String>,
    /// Turns to write a message
    /// ([`MAX_ANSWERS`](crate::sinks::store::limits::MAX_ANSWERS) at once).
    pub turns: Arc<tokio::sync::Semaphore>,
}

/// The API's routes.
pub fn router(state: V0State) -> Router {
    Router::new()
        .route("/v0/ping", get(ping))
        .route("/v0/node", get(node))
        .route("/v0/containers", get(containers))
        .route("/v0/containers/{id}", get(container))
        .route("/v0/containers/{id}/app", get(app))
        .route("/v0/containers/{id}/app/{metric}", get(app_metric))
        .route("/v0/debug", get(debug))
        .with_state(state)
}

/// Days since 1970-01-01 to a civil date (proleptic Gregorian).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A time in ms since the epoch as RFC 3339 in UTC: with the fraction Go's
/// `RFC3339Nano` gives (trailing zeros dropped), or in whole seconds.
pub fn rfc3339(ms: i64, fraction: bool) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let (y, m, d) = civil(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    let mut out = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        t / 3600,
        t % 3600 / 60,
        t % 60
    );
    if fraction && millis != 0 {
        let digits = format!("{millis:03}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

use crate::sources::now_ms;

/// A JSON answer, as Go's encoder wrote it: with a newline.
fn json_answer(value: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
        format!("{value}\n"),
    )
        .into_response()
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// What a message is made of.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Node,
    Container,
    App,
    Any,
}

/// One datapoint as the v0 API writes it.
#[derive(serde::Serialize)]
struct Point<'a> {
    name: &'a str,
    value: Value,
    unit: &'a str,
    timestamp: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tags: BTreeMap<&'a str, &'a str>,
}

fn point_value(value: f64) -> Value {
    if value.is_nan() {
        Value::from("NaN")
    } else if value.is_infinite() {
        Value::from(if value > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        Value::from(value)
    }
}

/// Writes one datapoint's JSON to `out`. Its tags are its record's but
/// the node's (`mesos_id` and `hostname` give them); an app datapoint's
/// also leave out what the dimensions give, as dcos-metrics' did.
fn write_point(out: &mut Vec<u8>, key: &Key, sample: &Sample, hidden: &[(String, String)]) {
    let (name, tags) = parse_key(key);
    let app = sample.source == Source::Input;
    let tags = tags
        .filter(|(k, v)| {
            !(NODE_TAGS.contains(k)
                || app && DIMENSION_TAGS.contains(k)
                || hidden.iter().any(|(h, hv)| h == k && hv == v))
        })
        .collect();
    let point = Point {
        name,
        value: point_value(sample.value),
        unit: match sample.source {
            Source::Node => crate::sources::node::unit(name).unwrap_or(""),
            _ => "",
        },
        timestamp: rfc3339(sample.time_ms, sample.source != Source::Input),
        tags,
    };
    let _ = serde_json::to_writer(out, &point);
}

impl V0State {
    /// The series of `kind` for which `select` holds, in key order.
    fn series(
        &self,
        kind: Kind,
        select: impl Fn(&str, &BTreeMap<&str, &str>) -> bool,
    ) -> Vec<(Key, Sample)> {
        let out: Vec<(Key, Sample)> = self
            .store
            .snapshot()
            .into_iter()
            .filter(|(_, key, sample)| {
                let (name, tags) = parse_key(key);
                let tags: BTreeMap<&str, &str> = tags.collect();
                let fits = match kind {
                    Kind::Node => sample.source == Source::Node,
                    Kind::Container => {
                        sample.source == Source::Agent && tags.contains_key("container_id")
                    }
                    Kind::App => {
                        sample.source == Source::Input && tags.contains_key("container_id")
                    }
                    Kind::Any => true,
                };
                fits && select(name, &tags)
            })
            .map(|(_, key, sample)| (key, sample))
            .collect();
        // A series whose tags the agent's `/state` completed later (the
        // first records of a node or container carry `UNKNOWN_*` values,
        // and no task metadata, until it answers) is the same datapoint:
        // the newest is given.
        let enrichment = self.enrichment.borrow().clone();
        let same = |key: &Key| {
            let (name, tags) = parse_key(key);
            let tags: Vec<(&str, &str)> = tags.collect();
            let container = tags
                .iter()
                .find(|(k, _)| *k == "container_id")
                .map_or("", |(_, v)| *v);
            // A label the enrichment added (the same key and value), not a
            // tag of the record's own that shares its key.
            let labelled = |k: &str, v: &str| {
                [EnrichKind::Container, EnrichKind::App]
                    .iter()
                    .any(|&kind| {
                        enrichment
                            .labels(kind, container)
                            .iter()
                            .any(|(l, lv)| l == k && lv == v)
                    })
            };
            let tags: Vec<(&str, &str)> = tags
                .into_iter()
                .filter(|(k, v)| !ENRICHED_TAGS.contains(k) && !labelled(k, v))
                .collect();
            (
                name.to_owned(),
                tags.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>(),
            )
        };
        let mut newest: BTreeMap<(String, Vec<String>), (Key, Sample)> = BTreeMap::new();
        for (key, sample) in out {
            let held = newest
                .entry(same(&key))
                .or_insert_with(|| (key.clone(), sample));
            if sample.time_ms > held.1.time_ms {
                *held = (key, sample);
            }
        }
        newest.into_values().collect()
    }

    /// The message's dimensions: the node's, then, for one container's
    /// message, the first value of each dimension tag its series carry
    /// (`/v0/debug` mixes containers: its datapoints keep their tags).
    fn dimensions(&self, kind: Kind, series: &[(Key, Sample)]) -> Map<String, Value> {
        let enrichment = self.enrichment.borrow().clone();
        let mut dimensions = Map::new();
        dimensions.insert(
            "mesos_id".into(),
            enrichment.agent_id.clone().unwrap_or_default().into(),
        );
        if let Some(cluster) = &self.cluster_id {
            dimensions.insert("cluster_id".into(), cluster.clone().into());
        }
        dimensions.insert(
            "hostname".into(),
            enrichment.node_host.clone().unwrap_or_default().into(),
        );
        if kind == Kind::Any || kind == Kind::Node {
            return dimensions;
        }
        for (key, _) in series {
            for (k, v) in parse_key(key).1 {
                if DIMENSION_TAGS.contains(&k) && !dimensions.contains_key(k) {
                    dimensions.insert(k.to_owned(), v.to_owned().into());
                }
            }
        }
        // A container's message has its executor's labels, as dcos-metrics'
        // did (an app message's task labels are its datapoints' tags).
        if kind == Kind::Container {
            let labels = container_labels(&enrichment, &dimensions);
            if !labels.is_empty() {
                let labels: Map<String, Value> = labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone().into()))
                    .collect();
                dimensions.insert("labels".into(), labels.into());
            }
        }
        dimensions
    }

    /// A MetricsMessage of the series `select` picks, written as the
    /// reader takes it; 204 when there are none, 503 when others are being
    /// written for too long.
    async fn message(
        &self,
        kind: Kind,
        select: impl Fn(&str, &BTreeMap<&str, &str>) -> bool + Send + 'static,
    ) -> Response {
        let Some(turn) = super::take_turn(&self.turns).await else {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "other answers are being written; try again\n",
            )
                .into_response();
        };
        let state = self.clone();
        let Ok((series, dimensions, hidden)) = tokio::task::spawn_blocking(move || {
            let series = state.series(kind, select);
            let dimensions = state.dimensions(kind, &series);
            let hidden = if kind == Kind::Container {
                container_labels(&state.enrichment.borrow(), &dimensions).to_vec()
            } else {
                Vec::new()
            };
            (series, dimensions, hidden)
        })
        .await
        else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        if series.is_empty() {
            return no_content();
        }
        let message = Message {
            head: Some(String::from("{\"datapoints\":[")),
            series,
            hidden,
            next: 0,
            tail: Some(format!(
                "],\"dimensions\":{}}}\n",
                Value::Object(dimensions)
            )),
        };
        (
            [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
            super::chunked_body(turn, message),
        )
            .into_response()
    }
}

/// One MetricsMessage being written: its head, its datapoints a chunk at
/// a time, then its dimensions.
struct Message {
    head: Option<String>,
    series: Vec<(Key, Sample)>,
    /// Tags given in the dimensions' `labels` instead.
    hidden: Vec<(String, String)>,
    next: usize,
    tail: Option<String>,
}

impl super::Chunks for Message {
    fn next_chunk(&mut self) -> Option<String> {
        if let Some(head) = self.head.take() {
            return Some(head);
        }
        if self.next >= self.series.len() {
            return self.tail.take();
        }
        let mut out = Vec::with_capacity(CHUNK_BYTES + 1024);
        while self.next < self.series.len() && out.len() < CHUNK_BYTES {
            if self.next > 0 {
                out.push(b',');
            }
            let (key, sample) = &self.series[self.next];
            write_point(&mut out, key, sample, &self.hidden);
            self.next += 1;
        }
        // serde_json writes UTF-8.
        Some(
            String::from_utf8(out)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        )
    }
}

/// The executor labels of the container a message's dimensions name.
fn container_labels<'e>(
    enrichment: &'e Enrichment,
    dimensions: &Map<String, Value>,
) -> &'e [(String, String)] {
    dimensions
        .get("container_id")
        .and_then(Value::as_str)
        .map_or(&[], |id| enrichment.labels(EnrichKind::Container, id))
}

/// Bytes of a message written at a time, at least.
const CHUNK_BYTES: usize = 64 * 1024;

async fn ping() -> Response {
    json_answer(&json!({"ok": true, "timestamp": rfc3339(now_ms(), false)}))
}

async fn node(State(state): State<V0State>) -> Response {
    state.message(Kind::Node, |_, _| true).await
}

async fn containers(State(state): State<V0State>) -> Response {
    let Some(_turn) = super::take_turn(&state.turns).await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "other answers are being written; try again\n",
        )
            .into_response();
    };
    let store = state.store.clone();
    let Ok(ids) = tokio::task::spawn_blocking(move || {
        store
            .snapshot()
            .into_iter()
            .filter(|(_, _, sample)| sample.source != Source::Node)
            .filter_map(|(_, key, _)| {
                parse_key(&key)
                    .1
                    .find(|(k, _)| *k == "container_id")
                    .map(|(_, v)| v.to_owned())
            })
            .collect::<BTreeSet<String>>()
    })
    .await
    else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    json_answer(&json!(ids))
}

async fn container(State(state): State<V0State>, Path(id): Path<String>) -> Response {
    state
        .message(Kind::Container, move |_, tags| {
            tags.get("container_id") == Some(&id.as_str())
        })
        .await
}

async fn app(State(state): State<V0State>, Path(id): Path<String>) -> Response {
    state
        .message(Kind::App, move |_, tags| {
            tags.get("container_id") == Some(&id.as_str())
        })
        .await
}

async fn app_metric(
    State(state): State<V0State>,
    Path((id, metric)): Path<(String, String)>,
) -> Response {
    state
        .message(Kind::App, move |name, tags| {
            name == metric && tags.get("container_id") == Some(&id.as_str())
        })
        .await
}

async fn debug(State(state): State<V0State>) -> Response {
    state.message(Kind::Any, |_, _| true).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_as_go_wrote_them() {
        assert_eq!(rfc3339(0, true), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_523_317_576_834, true), "2018-04-09T23:46:16.834Z");
        assert_eq!(rfc3339(1_523_317_576_800, true), "2018-04-09T23:46:16.8Z");
        assert_eq!(rfc3339(1_523_317_576_834, false), "2018-04-09T23:46:16Z");
        assert_eq!(rfc3339(951_782_400_000, true), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(-1, true), "1969-12-31T23:59:59.999Z");
    }
}

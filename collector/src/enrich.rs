//! Enrichment: the tags a record gets from what the agent's `/state` says
//! about its source, added where the record lacks them, as the original
//! did: the agent id, the framework's name, the application's name, and,
//! for a record with a `container_id`, its task's metadata (as dcos-metrics
//! and DC/OS's Telegraf added it):
//!
//! | tag | container metrics (the agent's `/containers`) | app metrics (records from the TCP input) |
//! | --- | --- | --- |
//! | `task_id`, `task_name` | the task whose status names the container | the same |
//! | `framework_name`, `framework_role`, `framework_principal` | the task's (or executor's) framework | the same |
//! | `executor_name` | the executor whose `container` is the container | the task's executor |
//! | labels | the executor's labels | the task's labels |
//!
//! A task is matched by its first status's `container_status.container_id`,
//! then by any later status's. The Cosmos bookkeeping labels
//! ([`COSMOS_LABELS`]) are left out; so is a label whose key or value is
//! over [`MAX_LABEL_LEN`] bytes, and every label past [`MAX_LABELS`] (or
//! [`MAX_LABELS_BYTES`]) of one container: both counted ([`LabelsLeftOut`]), as the agent's `/state`
//! is read.
//!
//! A record naming a framework or a container the state does not know asks
//! the poller for a fresh `/state` (a new task's metadata then follows
//! within seconds, not at the next poll), once per id until the next
//! regular poll.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use schema::{MetricList, Tag};
use serde_json::Value;

use crate::route::ExtraTags;

/// The original's value before the first `/state` arrives.
pub const UNKNOWN_AGENT: &str = "UNKNOWN_AGENT_STATE";
/// The original's value for a framework id `/state` doesn't list.
pub const UNKNOWN_FRAMEWORK: &str = "UNKNOWN_FRAMEWORK_ID";

/// Labels Cosmos (the DC/OS package manager) sets for its own bookkeeping:
/// never copied to metrics (dcos-metrics #152).
pub const COSMOS_LABELS: &[&str] = &[
    "DCOS_PACKAGE_DEFINITION",
    "DCOS_PACKAGE_FRAMEWORK_NAME",
    "DCOS_PACKAGE_METADATA",
    "DCOS_PACKAGE_OPTIONS",
    "DCOS_PACKAGE_SOURCE",
    "DCOS_SERVICE_PORT_INDEX",
    "DCOS_SERVICE_SCHEME",
    "MARATHON_SINGLE_INSTANCE_APP",
];

/// A label whose key or value is longer than this, in bytes, is left out
/// (dcos-metrics' `maxLabelLength`).
pub const MAX_LABEL_LEN: usize = 128;

/// At most this many labels of one container are copied; the rest are
/// left out (a task's labels are otherwise unbounded).
pub const MAX_LABELS: usize = 32;

/// At most this many bytes of labels (keys and values) of one container
/// are copied; the rest are left out. What enrichment may add to a record
/// is reserved for every record of a block before it is read, so one
/// container's labels cost every record that much room.
pub const MAX_LABELS_BYTES: usize = 2048;

/// Which metrics of a container a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The agent's statistics of the container.
    Container,
    /// What the container's task sends itself (the TCP input).
    App,
}

/// Labels the latest `/state` had that are left off the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LabelsLeftOut {
    /// A key or value over [`MAX_LABEL_LEN`] bytes.
    pub too_long: u64,
    /// Past [`MAX_LABELS`], or [`MAX_LABELS_BYTES`], of one container.
    pub too_many: u64,
}

/// The tags one container's records get, by [`Kind`]: the task's metadata
/// first, then the labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerTags {
    container: Vec<(String, String)>,
    container_labels: usize,
    app: Vec<(String, String)>,
    app_labels: usize,
    /// The framework and executor ids of the task (or executor) the
    /// container runs.
    ids: Option<(String, String)>,
}

impl ContainerTags {
    /// The framework and executor ids of what the container runs, when
    /// `/state` gives both.
    pub fn ids(&self) -> Option<(&str, &str)> {
        self.ids.as_ref().map(|(f, e)| (f.as_str(), e.as_str()))
    }

    /// The tags of `kind`.
    pub fn tags(&self, kind: Kind) -> &[(String, String)] {
        match kind {
            Kind::Container => &self.container,
            Kind::App => &self.app,
        }
    }

    /// The labels among [`tags`](Self::tags) (the executor's, or the task's).
    pub fn labels(&self, kind: Kind) -> &[(String, String)] {
        let tags = self.tags(kind);
        let count = match kind {
            Kind::Container => self.container_labels,
            Kind::App => self.app_labels,
        };
        &tags[tags.len() - count..]
    }

    fn len(&self) -> usize {
        let bytes = |tags: &[(String, String)]| -> usize {
            tags.iter().map(|(k, v)| k.len() + v.len() + 2 * 5).sum()
        };
        bytes(&self.container).max(bytes(&self.app))
    }
}

/// What `/state` tells about the records' sources.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Enrichment {
    /// The most bytes the tags added to one record take (see
    /// [`max_extra_len`](Self::max_extra_len)).
    max_extra: usize,
    /// Whether enrichment is on at all (agent polling enabled).
    pub enabled: bool,
    /// `state.id`.
    pub agent_id: Option<String>,
    /// framework id → name.
    pub frameworks: HashMap<String, String>,
    /// executor id → application name (label `MARATHON_APP_ID` or
    /// `DCOS_SPACE`, leading `/` trimmed).
    pub applications: HashMap<String, String>,
    /// container id → its task's metadata and labels.
    pub containers: HashMap<String, ContainerTags>,
    /// Labels left out of `containers`.
    pub labels_left_out: LabelsLeftOut,
    /// The agent's host, as the poller reaches it: the node's address,
    /// which the v0 API gives as `hostname` (as dcos-metrics gave
    /// `detect_ip`'s).
    pub node_host: Option<String>,
    /// Framework and container ids records named that this state did not
    /// know.
    asked: Asked,
}

/// Framework and container ids a state was asked about and did not know:
/// each asks for a refresh of `/state` once, not once per record, and at
/// most [`MAX_ASKED`] of each. A state fetched because of them keeps what
/// was asked (an id still unknown then is not asked about again); the
/// regular poll's state starts afresh.
#[derive(Debug, Default, Clone)]
struct Asked(Arc<Mutex<AskedIds>>);

#[derive(Debug, Default)]
struct AskedIds {
    frameworks: HashSet<String, foldhash::fast::RandomState>,
    containers: HashSet<String, foldhash::fast::RandomState>,
}

/// Unknown ids of each kind that one state remembers asking about.
pub const MAX_ASKED: usize = 1024;

impl Asked {
    /// Whether `id` is asked about for the first time (and there is room
    /// to remember it).
    fn first_time(&self, framework: bool, id: &str) -> bool {
        let mut asked = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let ids = if framework {
            &mut asked.frameworks
        } else {
            &mut asked.containers
        };
        ids.len() < MAX_ASKED && !ids.contains(id) && ids.insert(id.to_owned())
    }
}

impl PartialEq for Asked {
    /// What was asked is not part of what a state says.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The `{key, value}` labels of a `/state` object.
fn labels_of(object: &Value) -> impl Iterator<Item = (&str, &str)> {
    object
        .get("labels")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|l| Some((l.get("key")?.as_str()?, l.get("value")?.as_str()?)))
}

fn str_of<'v>(object: &'v Value, key: &str) -> Option<&'v str> {
    object.get(key).and_then(Value::as_str)
}

/// A framework's role: `role`, or the first of `roles` (multi-role
/// frameworks).
fn role_of(framework: &Value) -> Option<&str> {
    str_of(framework, "role").or_else(|| {
        framework
            .get("roles")
            .and_then(Value::as_array)
            .and_then(|roles| roles.first())
            .and_then(Value::as_str)
    })
}

/// Appends `object`'s labels to `tags`, but the Cosmos ones, the too long
/// and those past the bound; counts what is left out.
fn push_labels(
    object: &Value,
    tags: &mut Vec<(String, String)>,
    left_out: &mut LabelsLeftOut,
    counted: &mut HashSet<*const Value>,
) -> usize {
    // A task named by several statuses is read for each: counted once.
    let counted = counted.insert(std::ptr::from_ref(object));
    let mut count = 0;
    let mut bytes = 0;
    for (key, value) in labels_of(object) {
        if COSMOS_LABELS.contains(&key) || tags.iter().any(|(k, _)| k == key) {
            continue;
        }
        if key.len() > MAX_LABEL_LEN || value.len() > MAX_LABEL_LEN {
            left_out.too_long += u64::from(counted);
        } else if count >= MAX_LABELS || bytes + key.len() + value.len() > MAX_LABELS_BYTES {
            left_out.too_many += u64::from(counted);
        } else {
            tags.push((key.to_owned(), value.to_owned()));
            count += 1;
            bytes += key.len() + value.len();
        }
    }
    count
}

/// The metadata tags (those of them `/state` gives) of a framework, an
/// executor and a task.
fn metadata(
    framework: &Value,
    executor: Option<&Value>,
    task: Option<&Value>,
) -> Vec<(String, String)> {
    let mut tags = Vec::new();
    let mut push = |key: &str, value: Option<&str>| {
        if let Some(value) = value.filter(|v| !v.is_empty() && v.len() <= MAX_LABEL_LEN) {
            tags.push((key.to_owned(), value.to_owned()));
        }
    };
    push("task_id", task.and_then(|t| str_of(t, "id")));
    push("task_name", task.and_then(|t| str_of(t, "name")));
    push("framework_name", str_of(framework, "name"));
    push("framework_role", role_of(framework));
    push("framework_principal", str_of(framework, "principal"));
    push("executor_name", executor.and_then(|e| str_of(e, "name")));
    tags
}

/// The container ids a task's statuses name, the first status's first.
fn task_containers(task: &Value) -> impl Iterator<Item = &str> {
    task.get("statuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|status| {
            status
                .get("container_status")?
                .get("container_id")?
                .get("value")?
                .as_str()
        })
}

impl Enrichment {
    /// Enrichment turned on, before any `/state` arrived.
    pub fn pending() -> Self {
        Self {
            enabled: true,
            ..Self::default()
        }
        .measured()
    }

    /// Keeps what `previous` was asked about and did not know: for a
    /// state fetched because of it.
    pub fn keep_asked(&mut self, previous: &Self) {
        self.asked = previous.asked.clone();
    }

    /// The most bytes the tags [`tags_for_lookup`](Self::tags_for_lookup)
    /// adds to one record take, spliced in: what the buffer reserves for
    /// them before a block is routed.
    pub fn max_extra_len(&self) -> usize {
        self.max_extra
    }

    fn measured(mut self) -> Self {
        let longest = |names: &HashMap<String, String>, fallback: &str| {
            names
                .values()
                .map(String::len)
                .max()
                .unwrap_or(0)
                .max(fallback.len())
        };
        self.max_extra = if self.enabled {
            let tag = |key: &str, value: usize| key.len() + value + 2 * 5;
            tag(
                "agent_id",
                self.agent_id.as_deref().unwrap_or(UNKNOWN_AGENT).len(),
            ) + tag(
                "framework_name",
                longest(&self.frameworks, UNKNOWN_FRAMEWORK),
            ) + tag("application_name", longest(&self.applications, ""))
                + self
                    .containers
                    .values()
                    .map(ContainerTags::len)
                    .max()
                    .unwrap_or(0)
        } else {
            0
        };
        self
    }

    /// Reads a `/state` body; tolerant of missing parts.
    pub fn from_state(state: &Value) -> Self {
        let mut enrichment = Self::pending();
        enrichment.agent_id = str_of(state, "id").map(str::to_owned);
        let frameworks = state
            .get("frameworks")
            .and_then(Value::as_array)
            .into_iter()
            .flatten();
        // container id → (framework, executor, task, whether by the first
        // status).
        let mut tasks: HashMap<&str, (&Value, &Value, &Value, bool)> = HashMap::new();
        // container id → (framework, executor).
        let mut executors: HashMap<&str, (&Value, &Value)> = HashMap::new();
        for framework in frameworks {
            let (Some(id), Some(name)) = (str_of(framework, "id"), str_of(framework, "name"))
            else {
                continue;
            };
            enrichment.frameworks.insert(id.to_owned(), name.to_owned());
            for executor in framework
                .get("executors")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(container) = str_of(executor, "container") {
                    executors.entry(container).or_insert((framework, executor));
                }
                for task in executor
                    .get("tasks")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    for (i, container) in task_containers(task).enumerate() {
                        let first = i == 0;
                        let held = tasks
                            .entry(container)
                            .or_insert((framework, executor, task, first));
                        if first && !held.3 {
                            *held = (framework, executor, task, first);
                        }
                    }
                }
                let Some(executor_id) = str_of(executor, "id") else {
                    continue;
                };
                let app = labels_of(executor)
                    .filter(|(k, _)| *k == "MARATHON_APP_ID" || *k == "DCOS_SPACE")
                    .min_by_key(|(k, _)| *k != "MARATHON_APP_ID")
                    .map(|(_, v)| v.trim_start_matches('/').to_owned());
                if let Some(app) = app {
                    enrichment.applications.insert(executor_id.to_owned(), app);
                }
            }
        }
        let mut left_out = LabelsLeftOut::default();
        let mut counted = HashSet::new();
        let mut ids: Vec<&str> = tasks.keys().chain(executors.keys()).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let task = tasks.get(id);
            let executor = executors.get(id);
            let mut entry = ContainerTags {
                ids: task.map(|t| (t.0, t.1)).or(executor.copied()).and_then(
                    |(framework, executor)| {
                        Some((
                            str_of(framework, "id")?.to_owned(),
                            str_of(executor, "id")?.to_owned(),
                        ))
                    },
                ),
                ..ContainerTags::default()
            };
            // Container metrics: the task, and the executor that runs in
            // this container, with its labels.
            let runs_here = executor.map(|&(_, executor)| executor);
            if let Some(framework) = executor.map(|e| e.0).or(task.map(|t| t.0)) {
                entry.container = metadata(framework, runs_here, task.map(|t| t.2));
            }
            if let Some(runs_here) = runs_here {
                entry.container_labels =
                    push_labels(runs_here, &mut entry.container, &mut left_out, &mut counted);
            }
            // App metrics: the task, its executor, its labels.
            if let Some(&(framework, executor, task, _)) = task {
                entry.app = metadata(framework, Some(executor), Some(task));
                entry.app_labels = push_labels(task, &mut entry.app, &mut left_out, &mut counted);
            }
            enrichment.containers.insert(id.to_owned(), entry);
        }
        enrichment.labels_left_out = left_out;
        enrichment.measured()
    }

    /// The tags to add to `record` (added only where absent), and whether its
    /// framework id is unknown to the cached state.
    pub fn tags_for(&self, kind: Kind, record: &MetricList) -> (Vec<Tag>, bool) {
        let (extra, unknown) = self.tags_for_lookup(kind, |key| record.tag(key));
        (extra.iter().map(|(k, v)| Tag::new(k, v)).collect(), unknown)
    }

    /// The labels `/state` gives the metrics of `kind` of `container_id`
    /// (the executor's, or the task's).
    pub fn labels(&self, kind: Kind, container_id: &str) -> &[(String, String)] {
        self.containers
            .get(container_id)
            .map_or(&[], |c| c.labels(kind))
    }

    /// [`tags_for`](Self::tags_for) for a record known only by a tag
    /// lookup, without allocating: the tags borrow from `self`.
    pub fn tags_for_lookup<'r>(
        &self,
        kind: Kind,
        tag: impl Fn(&str) -> Option<&'r str>,
    ) -> (ExtraTags<'_>, bool) {
        let mut extra = ExtraTags::default();
        if !self.enabled {
            return (extra, false);
        }
        extra.push(
            "agent_id",
            self.agent_id.as_deref().unwrap_or(UNKNOWN_AGENT),
        );
        let mut unknown = false;
        if let Some(framework_id) = tag("framework_id") {
            match self.frameworks.get(framework_id) {
                Some(name) => extra.push("framework_name", name),
                None => {
                    unknown = self.agent_id.is_some() && self.asked.first_time(true, framework_id);
                    extra.push("framework_name", UNKNOWN_FRAMEWORK);
                }
            }
        }
        if let Some(app) = tag("executor_id").and_then(|e| self.applications.get(e)) {
            extra.push("application_name", app);
        }
        if let Some(id) = tag("container_id") {
            match self.containers.get(id) {
                Some(container) => extra.extend(container.tags(kind)),
                // A container started since the last `/state`: a refresh
                // brings its task's metadata, as for a new framework.
                None => unknown |= self.agent_id.is_some() && self.asked.first_time(false, id),
            }
        }
        (extra, unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_state_enriches_with_names_and_apps() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/mesos/mesos-agent-state-response.json");
        let state: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let enrichment = Enrichment::from_state(&state);
        let framework_id = "8b4e6d80-0271-4be0-9f08-0aeff7f0d751-0002";
        let record = MetricList {
            tags: vec![Tag::new("framework_id", framework_id)],
            ..MetricList::default()
        };
        let (tags, unknown) = enrichment.tags_for(Kind::App, &record);
        assert!(!unknown);
        assert!(tags.contains(&Tag::new("framework_name", "kafka")));
        assert_eq!(tags[0].key, "agent_id");
        assert_ne!(tags[0].value, UNKNOWN_AGENT);
        let (_, executor) = enrichment
            .applications
            .iter()
            .find(|(e, _)| e.starts_with("metrics-collector"))
            .unwrap();
        assert_eq!(
            executor, "metrics-collector",
            "DCOS_SPACE with its leading / trimmed"
        );
        let stranger = MetricList {
            tags: vec![Tag::new("framework_id", "nope")],
            ..MetricList::default()
        };
        let (tags, unknown) = enrichment.tags_for(Kind::App, &stranger);
        assert!(unknown);
        assert!(tags.contains(&Tag::new("framework_name", UNKNOWN_FRAMEWORK)));
        // Once per state: the next record of that framework asks nothing.
        assert!(!enrichment.tags_for(Kind::App, &stranger).1);
    }

    /// A container's framework and executor ids (statsd's topic and tags
    /// come from them), here by the executor that runs in it.
    #[test]
    fn a_container_knows_its_framework_and_executor_ids() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/mesos/mesos-agent-state-response.json");
        let state: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let enrichment = Enrichment::from_state(&state);
        let mut found = 0;
        for framework in state["frameworks"].as_array().unwrap() {
            for executor in framework["executors"].as_array().unwrap() {
                let container = executor["container"].as_str().unwrap();
                assert_eq!(
                    enrichment.containers[container].ids(),
                    Some((
                        framework["id"].as_str().unwrap(),
                        executor["id"].as_str().unwrap()
                    ))
                );
                found += 1;
            }
        }
        assert_eq!(found, 3);
    }

    /// A record naming a container or a framework the state does not know
    /// asks for a refresh once per id, not once per record; a state fetched
    /// because of it asks nothing again for those ids, while the regular
    /// poll's state does; at most MAX_ASKED ids of each kind are asked about.
    #[test]
    fn unknown_ids_ask_for_a_refresh_once_each() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/mesos/mesos-agent-state-with-tasks-testdata.json");
        let mut state: Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        // dcos-metrics' test state has no agent id; a state that answered has.
        state["id"] = Value::from("agent-1");
        let record = |key: &str, id: &str| MetricList {
            tags: vec![Tag::new(key, id)],
            ..MetricList::default()
        };
        let enrichment = Enrichment::from_state(&state);
        let known = enrichment.containers.keys().next().unwrap().clone();
        assert!(
            !enrichment
                .tags_for(Kind::App, &record("container_id", &known))
                .1
        );
        let new = record("container_id", "new-container");
        assert!(enrichment.tags_for(Kind::App, &new).1);
        assert!(!enrichment.tags_for(Kind::App, &new).1);
        assert!(
            enrichment
                .tags_for(Kind::App, &record("framework_id", "new-container"))
                .1
        );

        let mut refreshed = Enrichment::from_state(&state);
        refreshed.keep_asked(&enrichment);
        assert!(!refreshed.tags_for(Kind::App, &new).1);
        let polled = Enrichment::from_state(&state);
        assert!(polled.tags_for(Kind::App, &new).1);

        let many = Enrichment::from_state(&state);
        let asking = (0..MAX_ASKED + 10)
            .filter(|i| {
                many.tags_for(Kind::App, &record("container_id", &format!("c{i}")))
                    .1
            })
            .count();
        assert_eq!(asking, MAX_ASKED);
        // Before any state, nothing asks.
        assert!(!Enrichment::pending().tags_for(Kind::App, &new).1);
    }

    #[test]
    fn before_any_state_the_original_unknown_values() {
        let record = MetricList {
            tags: vec![Tag::new("framework_id", "f")],
            ..MetricList::default()
        };
        let (tags, unknown) = Enrichment::pending().tags_for(Kind::App, &record);
        assert!(!unknown, "no refresh storm before the first state");
        assert_eq!(
            tags,
            vec![
                Tag::new("agent_id", UNKNOWN_AGENT),
                Tag::new("framework_name", UNKNOWN_FRAMEWORK)
            ]
        );
        assert!(
            Enrichment::default()
                .tags_for(Kind::App, &record)
                .0
                .is_empty(),
            "disabled: nothing added"
        );
    }

    fn fixture(name: &str) -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/mesos")
            .join(name);
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// The container's record from `/containers`, mapped as the poller maps
    /// it, with the tags of `kind` added.
    fn enriched(enrichment: &Enrichment, kind: Kind) -> Vec<(String, String)> {
        let containers = fixture("mesos-agent-containers-testdata.json");
        let mapped = crate::sources::agent::mapping::map_entries(
            &containers,
            crate::sources::agent::mapping::Naming {
                topic: None,
                prefix: "",
            },
            0,
        );
        let mut record = mapped.lists[0].clone();
        for tag in enrichment.tags_for(kind, &record).0 {
            record.add_tag_if_absent(&tag.key, &tag.value);
        }
        record.tags.into_iter().map(|t| (t.key, t.value)).collect()
    }

    fn get<'t>(tags: &'t [(String, String)], key: &str) -> Option<&'t str> {
        tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// dcos-metrics' own test data: the task's status names the container
    /// `/containers` lists, so its task joins; the executor's `container`
    /// names another id, so its labels join only once it names this one.
    #[test]
    fn the_task_whose_status_names_the_container_gives_its_metadata() {
        let mut state = fixture("mesos-agent-state-with-tasks-testdata.json");
        let enrichment = Enrichment::from_state(&state);
        let tags = enriched(&enrichment, Kind::Container);
        assert_eq!(
            get(&tags, "task_id"),
            Some("foo.124b1048-a17a-11e6-9182-080027fb5b88")
        );
        assert_eq!(get(&tags, "task_name"), Some("foo"));
        assert_eq!(get(&tags, "framework_name"), Some("marathon"));
        assert_eq!(get(&tags, "framework_role"), Some("*"));
        assert_eq!(get(&tags, "framework_principal"), Some("dcos_marathon"));
        assert_eq!(
            get(&tags, "executor_name"),
            Some(
                "Command Executor (Task: foo.adf2b6f4-a171-11e6-9182-080027fb5b88) (Command: sh -c 'sleep 900')"
            ),
            "the record's own executor_name is kept"
        );
        assert_eq!(
            get(&tags, "somekey"),
            None,
            "the executor runs in another container"
        );
        let app = enriched(&enrichment, Kind::App);
        assert_eq!(get(&app, "task_name"), Some("foo"));
        assert_eq!(get(&app, "somekey"), Some("someval"), "the task's labels");
        assert_eq!(
            enrichment.labels(Kind::App, "e4faacb2-f69f-4ea1-9d96-eb06fea75eef"),
            [("somekey".to_owned(), "someval".to_owned())]
        );

        state["frameworks"][0]["executors"][0]["container"] =
            "e4faacb2-f69f-4ea1-9d96-eb06fea75eef".into();
        state["frameworks"][0]["executors"][0]["labels"] = serde_json::json!([
            {"key": "executor_label", "value": "yes"},
            {"key": "DCOS_PACKAGE_METADATA", "value": "cosmos"},
        ]);
        let enrichment = Enrichment::from_state(&state);
        let tags = enriched(&enrichment, Kind::Container);
        assert_eq!(
            get(&tags, "executor_label"),
            Some("yes"),
            "the executor's labels"
        );
        assert_eq!(get(&tags, "somekey"), None, "not the task's");
        assert_eq!(
            get(&tags, "DCOS_PACKAGE_METADATA"),
            None,
            "Cosmos's are left out"
        );
        assert_eq!(get(&tags, "task_name"), Some("foo"));
        assert_eq!(enrichment.labels_left_out, LabelsLeftOut::default());
    }

    #[test]
    fn cosmos_long_and_surplus_labels_are_left_out_and_counted() {
        let mut labels: Vec<Value> = COSMOS_LABELS
            .iter()
            .map(|k| serde_json::json!({"key": k, "value": "x"}))
            .collect();
        labels.push(serde_json::json!({"key": "long", "value": "v".repeat(MAX_LABEL_LEN + 1)}));
        labels.push(serde_json::json!({"key": "k".repeat(MAX_LABEL_LEN + 1), "value": "v"}));
        labels.push(serde_json::json!({"key": "edge", "value": "v".repeat(MAX_LABEL_LEN)}));
        for i in 0..MAX_LABELS + 5 {
            labels.push(serde_json::json!({"key": format!("l{i:02}"), "value": "v"}));
        }
        let state = serde_json::json!({
            "id": "agent-1",
            "frameworks": [{
                "id": "f", "name": "marathon", "roles": ["slave_public"],
                "executors": [{
                    "id": "e", "name": "exec", "container": "c",
                    "labels": labels,
                    "tasks": [{
                        "id": "t", "name": "task", "labels": labels,
                        "statuses": [
                            {"container_status": {"container_id": {"value": "c"}}},
                            {"container_status": {"container_id": {"value": "c-later"}}},
                        ],
                    }],
                }],
            }],
        });
        let enrichment = Enrichment::from_state(&state);
        for kind in [Kind::Container, Kind::App] {
            let labels = enrichment.labels(kind, "c");
            assert_eq!(labels.len(), MAX_LABELS, "{kind:?}");
            // What the memory reservation counts on.
            let (extra, _) = enrichment.tags_for_lookup(kind, |key| match key {
                "framework_id" => Some("f"),
                "executor_id" => Some("e"),
                "container_id" => Some("c"),
                _ => None,
            });
            assert!(
                extra.iter().count() <= crate::route::MAX_ENRICHMENT_TAGS,
                "{kind:?}: {}",
                extra.iter().count()
            );
            assert_eq!(labels[0], ("edge".to_owned(), "v".repeat(MAX_LABEL_LEN)));
            assert!(
                labels
                    .iter()
                    .all(|(k, _)| !COSMOS_LABELS.contains(&k.as_str()))
            );
            let tags = enrichment.containers["c"].tags(kind);
            assert_eq!(
                get(tags, "framework_role"),
                Some("slave_public"),
                "the first of roles"
            );
        }
        // Each of the two lists leaves out the same: two too long, and the
        // labels past the bound (the Cosmos ones are not counted).
        assert_eq!(
            enrichment.labels_left_out,
            LabelsLeftOut {
                too_long: 4,
                too_many: 2 * 6,
            }
        );
        // Labels of 128-byte values: the byte bound comes first.
        let wide: Vec<Value> = (0..MAX_LABELS)
            .map(|i| serde_json::json!({"key": format!("w{i:02}"), "value": "v".repeat(MAX_LABEL_LEN)}))
            .collect();
        let mut state = state.clone();
        state["frameworks"][0]["executors"][0]["labels"] = wide.into();
        let enrichment_wide = Enrichment::from_state(&state);
        let labels = enrichment_wide.labels(Kind::Container, "c");
        let bytes: usize = labels.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(
            bytes <= MAX_LABELS_BYTES && labels.len() < MAX_LABELS,
            "{bytes}"
        );
        assert_eq!(
            enrichment_wide.labels_left_out.too_many as usize,
            (MAX_LABELS - labels.len()) + 6,
            "the executor's past the bytes, the task's past the count"
        );
        // A later status names the container too (app metrics of a task
        // whose container changed).
        assert_eq!(
            get(enrichment.containers["c-later"].tags(Kind::App), "task_id"),
            Some("t")
        );
        assert!(enrichment.labels(Kind::Container, "c-later").is_empty());
    }

    #[test]
    fn the_longest_tags_bound_what_is_added() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/mesos/mesos-agent-state-response.json");
        let state: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let enrichment = Enrichment::from_state(&state);
        let mut bytes = Vec::new();
        for (framework, executor) in enrichment
            .frameworks
            .keys()
            .flat_map(|f| enrichment.applications.keys().map(move |e| (f, e)))
        {
            let (extra, _) = enrichment.tags_for_lookup(Kind::App, |key| match key {
                "framework_id" => Some(framework.as_str()),
                "executor_id" => Some(executor.as_str()),
                _ => None,
            });
            let len: usize = extra
                .iter()
                .map(|(k, v)| {
                    bytes.clear();
                    schema::datum::write_bytes(&mut bytes, k.as_bytes());
                    schema::datum::write_bytes(&mut bytes, v.as_bytes());
                    bytes.len()
                })
                .sum();
            assert!(len <= enrichment.max_extra_len(), "{len}");
        }
        // With the task metadata and labels of a container.
        let state = fixture("mesos-agent-state-with-tasks-testdata.json");
        let enrichment = Enrichment::from_state(&state);
        for kind in [Kind::Container, Kind::App] {
            let mut most = 0;
            for container in enrichment.containers.keys() {
                let (extra, _) = enrichment.tags_for_lookup(kind, |key| match key {
                    "framework_id" => Some("5349f49b-68b3-4638-aab2-fc4ec845f993-0000"),
                    "container_id" => Some(container.as_str()),
                    _ => None,
                });
                let mut len = 0;
                for (k, v) in extra.iter() {
                    bytes.clear();
                    schema::datum::write_bytes(&mut bytes, k.as_bytes());
                    schema::datum::write_bytes(&mut bytes, v.as_bytes());
                    len += bytes.len();
                }
                most = most.max(extra.iter().count());
                assert!(len <= enrichment.max_extra_len(), "{len}");
            }
            assert!(most > 5, "{kind:?}: the task's metadata is counted");
        }
        assert_eq!(Enrichment::default().max_extra_len(), 0);
        assert!(
            Enrichment::pending().max_extra_len() >= UNKNOWN_AGENT.len() + UNKNOWN_FRAMEWORK.len()
        );
    }
}

//! Enrichment: the tags a record gets from what the agent's `/state` says
//! about its source (agent id, framework name, application name), added
//! where the record lacks them, as the original did.

use std::collections::HashMap;

use schema::{MetricList, Tag};
use serde_json::Value;

use crate::route::ExtraTags;

/// The original's value before the first `/state` arrives.
pub const UNKNOWN_AGENT: &str = "UNKNOWN_AGENT_STATE";
/// The original's value for a framework id `/state` doesn't list.
pub const UNKNOWN_FRAMEWORK: &str = "UNKNOWN_FRAMEWORK_ID";

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
    /// The agent's host, as the poller reaches it: the node's address,
    /// which the v0 API gives as `hostname` (as dcos-metrics gave
    /// `detect_ip`'s).
    pub node_host: Option<String>,
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
        } else {
            0
        };
        self
    }

    /// Reads a `/state` body; tolerant of missing parts.
    pub fn from_state(state: &Value) -> Self {
        let mut enrichment = Self::pending();
        enrichment.agent_id = state.get("id").and_then(Value::as_str).map(str::to_owned);
        for framework in state
            .get("frameworks")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(id), Some(name)) = (
                framework.get("id").and_then(Value::as_str),
                framework.get("name").and_then(Value::as_str),
            ) else {
                continue;
            };
            enrichment.frameworks.insert(id.to_owned(), name.to_owned());
            for executor in framework
                .get("executors")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(executor_id) = executor.get("id").and_then(Value::as_str) else {
                    continue;
                };
                let labels = executor
                    .get("labels")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten();
                let app = labels
                    .filter_map(|l| Some((l.get("key")?.as_str()?, l.get("value")?.as_str()?)))
                    .filter(|(k, _)| *k == "MARATHON_APP_ID" || *k == "DCOS_SPACE")
                    .min_by_key(|(k, _)| *k != "MARATHON_APP_ID")
                    .map(|(_, v)| v.trim_start_matches('/').to_owned());
                if let Some(app) = app {
                    enrichment.applications.insert(executor_id.to_owned(), app);
                }
            }
        }
        enrichment.measured()
    }

    /// The tags to add to `record` (added only where absent), and whether its
    /// framework id is unknown to the cached state.
    pub fn tags_for(&self, record: &MetricList) -> (Vec<Tag>, bool) {
        let (extra, unknown) = self.tags_for_lookup(|key| record.tag(key));
        (
            extra
                .as_slice()
                .iter()
                .map(|(k, v)| Tag::new(*k, *v))
                .collect(),
            unknown,
        )
    }

    /// [`tags_for`](Self::tags_for) for a record known only by a tag
    /// lookup, without allocating: the tags borrow from `self`.
    pub fn tags_for_lookup<'r>(
        &self,
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
                    unknown = self.agent_id.is_some();
                    extra.push("framework_name", UNKNOWN_FRAMEWORK);
                }
            }
        }
        if let Some(app) = tag("executor_id").and_then(|e| self.applications.get(e)) {
            extra.push("application_name", app);
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
        let (tags, unknown) = enrichment.tags_for(&record);
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
        let (tags, unknown) = enrichment.tags_for(&stranger);
        assert!(unknown);
        assert!(tags.contains(&Tag::new("framework_name", UNKNOWN_FRAMEWORK)));
    }

    #[test]
    fn before_any_state_the_original_unknown_values() {
        let record = MetricList {
            tags: vec![Tag::new("framework_id", "f")],
            ..MetricList::default()
        };
        let (tags, unknown) = Enrichment::pending().tags_for(&record);
        assert!(!unknown, "no refresh storm before the first state");
        assert_eq!(
            tags,
            vec![
                Tag::new("agent_id", UNKNOWN_AGENT),
                Tag::new("framework_name", UNKNOWN_FRAMEWORK)
            ]
        );
        assert!(
            Enrichment::default().tags_for(&record).0.is_empty(),
            "disabled: nothing added"
        );
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
            let (extra, _) = enrichment.tags_for_lookup(|key| match key {
                "framework_id" => Some(framework.as_str()),
                "executor_id" => Some(executor.as_str()),
                _ => None,
            });
            let len: usize = extra
                .as_slice()
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
        assert_eq!(Enrichment::default().max_extra_len(), 0);
        assert!(
            Enrichment::pending().max_extra_len() >= UNKNOWN_AGENT.len() + UNKNOWN_FRAMEWORK.len()
        );
    }
}

//! Configuration changes while running. A change is a JSON merge patch
//! (RFC 7396) of the effective configuration. It is validated as a whole,
//! unknown keys are errors, and settings that need a restart are refused.
//! A valid change applies atomically: every setting is published together,
//! and each input block is routed with one consistent snapshot, so no
//! datapoint is lost or duplicated by a change.

use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::watch;

use crate::buffer::Buffer;
use crate::config::{Config, ConfigError};
use crate::route::Routing;
use crate::sinks::kafka::SinkRuntime;
use crate::sinks::partner::PartnerLimits;
use crate::sources::tcp::RateLimits;
use crate::stats::Stats;
use crate::telemetry::LogControl;

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The change is invalid (400).
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// The change touches settings that need a restart (409).
    #[error("these settings need a restart: {}", .0.join(", "))]
    RestartRequired(Vec<String>),
}

/// The settings in force, and where each runtime setting is published.
pub struct Runtime {
    config: Mutex<Config>,
    /// Routing.
    pub routing: watch::Sender<Arc<Routing>>,
    /// Input rate limits.
    pub rate_limits: watch::Sender<RateLimits>,
    /// Batch thresholds and broker source.
    pub sink: watch::Sender<SinkRuntime>,
    /// Partner limits.
    pub partner_limits: watch::Sender<PartnerLimits>,
    /// The buffer, for its full policy.
    pub buffer: Arc<Buffer>,
    log: Mutex<Option<LogControl>>,
    stats: Arc<Stats>,
}

/// JSON merge patch: objects merge, `null` removes (back to the default),
/// anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let Value::Object(target) = target else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

impl Runtime {
    /// Publishes `config`'s runtime settings through these senders.
    pub fn new(
        config: Config,
        routing: watch::Sender<Arc<Routing>>,
        rate_limits: watch::Sender<RateLimits>,
        sink: watch::Sender<SinkRuntime>,
        partner_limits: watch::Sender<PartnerLimits>,
        buffer: Arc<Buffer>,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            config: Mutex::new(config),
            routing,
            rate_limits,
            sink,
            partner_limits,
            buffer,
            log: Mutex::new(None),
            stats,
        }
    }

    /// Lets log-level changes reach the global subscriber.
    pub fn set_log_control(&self, log: LogControl) {
        *self.log.lock().unwrap_or_else(|p| p.into_inner()) = Some(log);
    }

    /// The configuration in force.
    pub fn config(&self) -> Config {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Validates and applies a merge patch; returns the new configuration.
    pub fn patch(&self, patch: &Value) -> Result<Config, PatchError> {
        if !patch.is_object() {
            return Err(ConfigError {
                field: "(body)".into(),
                message: "must be a JSON object".into(),
            }
            .into());
        }
        // Holding the lock serializes changes.
        let mut current = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let old = serde_json::to_value(&*current).map_err(|e| ConfigError {
            field: "(config)".into(),
            message: e.to_string(),
        })?;
        // A secret option sent back as GET /v1/config shows it stays as it
        // is (a redacted `librdkafka` entry is not recognised this way).
        let mut patch = patch.clone();
        if let Value::Object(fields) = &mut patch {
            fields.retain(|key, value| {
                !(value == crate::config::REDACTED
                    && crate::config::OPTIONS
                        .iter()
                        .any(|o| o.secret && o.name == key.as_str()))
            });
        }
        let mut merged = old.clone();
        merge_patch(&mut merged, &patch);
        let new: Config = serde_path_to_error::deserialize(merged.clone()).map_err(|error| {
            let message = error.inner().to_string();
            let field =
                crate::config::unknown_field(&message).unwrap_or_else(|| error.path().to_string());
            ConfigError { field, message }
        })?;
        new.validate()?;
        let new_value = serde_json::to_value(&new).map_err(|e| ConfigError {
            field: "(config)".into(),
            message: e.to_string(),
        })?;
        let changed: Vec<String> = new_value
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(key, value)| old.get(key.as_str()) != Some(value))
            .map(|(key, _)| key.clone())
            .collect();
        let refused: Vec<String> = changed
            .iter()
            .filter(|k| !crate::config::is_runtime(k))
            .cloned()
            .collect();
        if !refused.is_empty() {
            return Err(PatchError::RestartRequired(refused));
        }
        if changed.iter().any(|k| k == "log_level")
            && let Some(log) = &*self.log.lock().unwrap_or_else(|p| p.into_inner())
        {
            log.set(&new.log_level).map_err(|message| ConfigError {
                field: "log_level".into(),
                message,
            })?;
        }
        self.publish(&new);
        if !changed.is_empty() {
            self.stats
                .config_changes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(changed = %changed.join(","), "Configuration changed.");
        }
        *current = new.clone();
        Ok(new)
    }

    /// Makes the Kafka clients anew, reading the security settings' files
    /// again (SIGHUP and `POST /v1/kafka/reload`). The files are checked
    /// first: a secret that can't be read or a certificate that doesn't
    /// parse is refused, naming its option, and the clients in use stay.
    pub fn reload_kafka(&self) -> Result<(), ConfigError> {
        let config = self.config();
        if config.kafka {
            crate::config::security::KafkaSecurity::from(&config).check()?;
        }
        self.sink.send_modify(|s| s.reloads += 1);
        self.stats
            .kafka_reloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("Kafka security settings reloaded: the producer is made anew.");
        Ok(())
    }

    fn publish(&self, config: &Config) {
        let routing = Arc::new(Routing::from_config(config));
        self.routing.send_if_modified(|r| {
            let changed = **r != *routing;
            if changed {
                *r = routing.clone();
            }
            changed
        });
        self.rate_limits.send_if_modified(|r| {
            let new = RateLimits::from(config);
            let changed = *r != new;
            *r = new;
            changed
        });
        let mut sink = SinkRuntime::from(config);
        self.sink.send_if_modified(|s| {
            sink.reloads = s.reloads;
            let changed = *s != sink;
            *s = sink.clone();
            changed
        });
        self.partner_limits.send_if_modified(|p| {
            let new = PartnerLimits::from(config);
            let changed = *p != new;
            *p = new;
            changed
        });
        self.buffer.set_policy(config.buffer_full_policy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7396() {
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut target, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(target, json!({"a": "z", "c": {"d": "e"}}));
    }
}

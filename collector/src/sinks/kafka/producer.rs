//! The producer's life: made for a broker set, replaced when the set
//! changes (the old one flushes to its brokers, or is purged at once when
//! they are all down, and its messages move over).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{Producer, PurgeConfig};
use tokio::time::Instant;
use tracing::{error, info};

use super::delivery::Context;
use super::{BrokerState, KafkaSink};
use super::{KafkaProducer, SinkProducer};
use crate::discovery::Discovered;

impl KafkaSink {
    /// A producer for `discovered`, and the configuration its topic admin
    /// uses (the same, made once: it reads the secret files).
    pub(super) fn create_producer(
        &self,
        discovered: &Discovered,
    ) -> Result<(SinkProducer, ClientConfig), String> {
        let generation = self.generation.load(Relaxed) + 1;
        let context = Context {
            stats: self.stats.clone(),
            partners: self.partners.as_ref().map(Arc::downgrade),
            retry: self.retry_tx.clone(),
            retry_budget: self.retry_budget.clone(),
            room: self.room.clone(),
            brokers_down: self.brokers_down.clone(),
            state: self.state.clone(),
            generation,
            current: self.generation.clone(),
            all_down: AtomicBool::new(false),
            final_purge: AtomicBool::new(false),
            counted: AtomicBool::new(false),
            spool: self.buffer.spool().map(Arc::downgrade),
            tls: self.settings.security.protocol.uses_tls(),
            brokers: discovered.brokers.clone(),
            security: self.settings.security.clone(),
            diagnosed: AtomicBool::new(false),
            failure_reported: self.failure_reported.clone(),
            probing: self.probing.clone(),
            confirmed: self.confirmed_tx.clone(),
        };
        let config = self
            .settings
            .client_config(&discovered.brokers)
            .map_err(|e| e.to_string())?;
        let producer =
            KafkaProducer::create(&config, context).map_err(|e: KafkaError| e.to_string())?;
        Ok((producer, config))
    }

    pub(super) fn set_state(&self, update: impl FnOnce(&mut BrokerState)) {
        update(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Takes in what the discovery task found: a changed broker set gets a
    /// new producer, and the old one's messages move over.
    pub(super) fn apply_discovery(&mut self, result: Result<Discovered, String>) {
        let discovered = match result {
            Ok(discovered) => discovered,
            Err(error) => {
                let has_producer = self.producer.is_some();
                self.set_state(|s| {
                    s.last_error = Some(error);
                    if !has_producer {
                        s.unavailable_since
                            .get_or_insert_with(std::time::Instant::now);
                    }
                });
                return;
            }
        };
        self.set_state(|s| s.last_error = None);
        if let Some((_, current)) = &self.producer
            && current.brokers == discovered.brokers
        {
            return;
        }
        self.remake = Some(Some(discovered));
        self.remake_when_allowed();
    }

    /// When the wanted producer may be made: `REMAKE_INTERVAL` after the
    /// last, and while `MAX_PRODUCERS` are alive, every 200 ms (the
    /// housekeeping lets go of those done flushing).
    pub(super) fn remake_at(&self) -> Option<Instant> {
        self.remake.as_ref()?;
        let now = Instant::now();
        let after = self.last_made.map_or(now, |t| t + super::REMAKE_INTERVAL);
        if self.retiring.len() + 1 >= super::MAX_PRODUCERS {
            Some(after.max(now + Duration::from_millis(200)))
        } else {
            Some(after)
        }
    }

    /// Makes the producer wanted (`remake`), unless the last one was made
    /// less than `REMAKE_INTERVAL` ago or `MAX_PRODUCERS` are alive: then
    /// the loop comes back to it, with whatever was asked for last.
    pub(super) fn remake_when_allowed(&mut self) {
        let Some(wanted) = &self.remake else {
            return;
        };
        let now = Instant::now();
        if self
            .last_made
            .is_some_and(|t| now < t + super::REMAKE_INTERVAL)
            || self.retiring.len() + 1 >= super::MAX_PRODUCERS
        {
            return;
        }
        let discovered = wanted
            .clone()
            .or_else(|| self.producer.as_ref().map(|(_, current)| current.clone()))
            .or_else(|| self.unmade.clone());
        if wanted.is_none() {
            info!("Making the Kafka producer anew with the current settings.");
        }
        self.remake = None;
        if let Some(discovered) = discovered {
            self.last_made = Some(now);
            self.switch_producer(discovered);
        }
    }

    /// Whether a TLS or authentication failure is being reported.
    pub(super) fn security_failure_reported(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .security_failure
            .is_some()
    }

    /// Asks the brokers for metadata, off the runtime's threads: an answer
    /// means connected and authenticated, and clears a reported TLS or
    /// authentication failure even with no data to deliver (after a broker
    /// restart that looked like a protocol mismatch, or once the broker's
    /// side was mended).
    pub(super) fn probe_brokers(&self) {
        let Some((producer, _)) = &self.producer else {
            return;
        };
        let (producer, state) = (producer.clone(), self.state.clone());
        let (generation, current) = (self.generation.load(Relaxed), self.generation.clone());
        tokio::task::spawn_blocking(move || {
            let answered = producer
                .client()
                .fetch_metadata(None, Duration::from_secs(5))
                .is_ok();
            if answered && current.load(Relaxed) == generation {
                let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                state.security_failure = None;
                state.all_brokers_down = false;
                state.unavailable_since = None;
            }
        });
    }

    /// A new producer for `discovered`; the old one's messages move over.
    fn switch_producer(&mut self, discovered: Discovered) {
        let (producer, admin) = match self.create_producer(&discovered) {
            Ok((producer, admin)) => (Arc::new(producer), admin),
            Err(error) => {
                self.unmade = Some(discovered.clone());
                self.stats.kafka_client_failures.fetch_add(1, Relaxed);
                error!(%error, brokers = ?discovered.brokers, "Could not create the Kafka producer; check the security settings and the librdkafka options.");
                let has_producer = self.producer.is_some();
                self.set_state(|s| {
                    s.last_error = Some(format!("could not create the Kafka producer: {error}"));
                    if !has_producer {
                        s.unavailable_since
                            .get_or_insert_with(std::time::Instant::now);
                    }
                });
                return;
            }
        };
        self.unmade = None;
        info!(brokers = ?discovered.brokers, method = %discovered.method, "Using Kafka brokers.");
        // From here on, only the new producer speaks for the broker state.
        self.generation.fetch_add(1, Relaxed);
        self.set_state(|s| {
            s.current = Some(discovered.clone());
            s.all_brokers_down = false;
            s.unavailable_since = None;
            s.security_failure = None;
        });
        let same_brokers = self
            .producer
            .as_ref()
            .is_some_and(|(_, old)| old.brokers == discovered.brokers);
        // The same brokers know the same topics: only lookups under way are
        // made again. New brokers: every topic is looked up again.
        self.topics.reset(same_brokers);
        self.lookups.clear();
        self.admin_cell = Arc::default();
        self.produced_topics.clear();
        self.admin = Some(admin);
        let old = self.producer.replace((producer, discovered));
        // Topics are looked up again on the new brokers.
        let waiting: Vec<Arc<str>> = self
            .parked
            .topics()
            .chain(self.disk_parked.iter())
            .cloned()
            .collect();
        for topic in waiting {
            self.gate(&topic);
        }
        if let Some((old, old_brokers)) = old {
            self.stats.producer_switches.fetch_add(1, Relaxed);
            if same_brokers {
                info!("Kafka producer made anew: moving queued messages to it.");
            } else {
                info!(old = ?old_brokers.brokers, "Kafka brokers changed: moving queued messages to the new brokers.");
            }
            // What the old producer holds goes to the old brokers while
            // they answer: re-sending a request in flight blindly would
            // duplicate whatever they had written, and purging only the
            // queue makes an idempotent producer stall on its sequence gap.
            // What has no answer after 30 s, or everything at once when the
            // old brokers are all down, is purged; it comes back to be
            // produced again at once to the new brokers.
            // A producer's drop purges and flushes: off the runtime's
            // threads.
            let (done, flushing): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retiring)
                .into_iter()
                .partition(|p| p.in_flight_count() == 0);
            self.retiring = flushing;
            self.retiring.push(old.clone());
            if !done.is_empty() {
                tokio::task::spawn_blocking(move || drop(done));
            }
            tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                loop {
                    if old.flush(Duration::from_millis(200)).is_ok() {
                        return;
                    }
                    if old.context().all_down.load(Relaxed)
                        || started.elapsed() >= Duration::from_secs(30)
                    {
                        break;
                    }
                }
                old.purge(PurgeConfig::default().queue().inflight());
                let _ = old.flush(Duration::from_secs(1));
            });
        }
    }
}

//! The thread that serves a producer's events (delivery reports, errors,
//! logs): asleep in librdkafka's queue while there are none.
//!
//! rust-rdkafka's `ThreadedProducer` polls in turns of 100 ms and spends
//! the last fraction of a millisecond of every turn polling without
//! waiting (its deadline is passed to librdkafka in whole milliseconds,
//! rounded down), so an idle collector with three brokers used 0.9 % of a
//! core. This thread waits in turns of [`TURN`], a whole number of
//! milliseconds and a few microseconds more, so that a turn with no event
//! ends asleep: two wake-ups a second when idle.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext, PurgeConfig};

/// One wait for events. A turn that saw no event costs one wake-up; one
/// that did ends with less than a millisecond of polling without waiting.
/// Stopping the thread waits for the turn in progress to end.
pub(crate) const TURN: Duration = Duration::from_micros(500_005);

/// A librdkafka producer and the thread that serves its events.
///
/// Dropping it purges what librdkafka still holds and serves the delivery
/// reports on the dropping thread (as the producer's own drop does, so
/// every report is counted before the drop returns), then stops the thread
/// and waits for its turn to end (at most [`TURN`]): the producer is
/// destroyed before the drop returns, as rust-rdkafka's producers are. At
/// shutdown, [`stop_events`](Self::stop_events) bounds that wait by the
/// shutdown's reserve. The sink's context holds the spool and the partner
/// hub weakly, so a producer whose thread outlives that keeps neither.
///
/// The sink's producer and the sample-producer's are both of this kind.
pub(crate) struct KafkaProducer<C: ProducerContext + 'static> {
    producer: Arc<BaseProducer<C>>,
    stop: Arc<AtomicBool>,
    /// Disconnected once the thread has let go of the producer.
    stopped: Mutex<mpsc::Receiver<()>>,
}

impl<C: ProducerContext + 'static> KafkaProducer<C> {
    /// A producer for `config` and its event thread.
    pub(crate) fn create(config: &ClientConfig, context: C) -> Result<Self, KafkaError> {
        let producer: Arc<BaseProducer<C>> = Arc::new(config.create_with_context(context)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (done, stopped) = mpsc::channel::<()>();
        {
            let (producer, stop) = (producer.clone(), stop.clone());
            std::thread::Builder::new()
                .name("kafka-events".into())
                .spawn(move || {
                    while !stop.load(Relaxed) {
                        producer.poll(TURN);
                    }
                    drop(producer);
                    drop(done);
                })
                .map_err(|e| {
                    KafkaError::ClientCreation(format!("no thread for the producer's events: {e}"))
                })?;
        }
        Ok(Self {
            producer,
            stop,
            stopped: Mutex::new(stopped),
        })
    }

    /// Stops the event thread and waits up to `wait` for it to let go of
    /// the producer (at most [`TURN`]): whether it did. Reports are then
    /// served only by whoever flushes the producer.
    pub(crate) fn stop_events(&self, wait: Duration) -> bool {
        self.stop.store(true, Relaxed);
        let stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        matches!(
            stopped.recv_timeout(wait),
            Err(mpsc::RecvTimeoutError::Disconnected)
        )
    }
}

impl<C: ProducerContext + 'static> Deref for KafkaProducer<C> {
    type Target = BaseProducer<C>;

    fn deref(&self) -> &Self::Target {
        &self.producer
    }
}

impl<C: ProducerContext + 'static> Drop for KafkaProducer<C> {
    fn drop(&mut self) {
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
        let _ = self.producer.flush(Duration::from_millis(500));
        self.stop_events(TURN + Duration::from_millis(100));
    }
}

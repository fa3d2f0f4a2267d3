//! Logging: `tracing`, human-readable by default or JSON lines, with a log
//! filter that can change at runtime; warnings that can repeat without
//! bound (refused connections, failed accepts, malformed streams) are
//! throttled to one line per reason per interval, with the count.
//! Signal handling, installed before anything listens.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, reload};

use crate::config::LogFormat;

/// Applies a filter directive to the global subscriber.
type Reload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Changes the global log filter while running.
pub struct LogControl(Reload);

impl LogControl {
    /// Applies a new `EnvFilter` directive.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        (self.0)(filter)
    }
}

/// Installs the global subscriber. `filter` is an `EnvFilter` directive
/// (validated with the configuration).
pub fn init(filter: &str, format: LogFormat) -> LogControl {
    let initial = EnvFilter::try_new(with_quiet_dependencies(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter_layer, handle) = reload::Layer::new(initial);
    let registry = tracing_subscriber::registry().with(filter_layer);
    let _ = match format {
        LogFormat::Text => {
            // Colours only on a terminal, never in files or journald.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(ansi)
                        .with_writer(std::io::stderr),
                )
                .try_init()
        }
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    LogControl(Box::new(move |directive| {
        let filter =
            EnvFilter::try_new(with_quiet_dependencies(directive)).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    }))
}

/// `directive`, with apache-avro kept to errors unless it names it: it
/// warns about every writer schema with a `logicalType` it ignores (each
/// fastavro-written connection), which says nothing about our data.
fn with_quiet_dependencies(directive: &str) -> String {
    if directive.contains("apache_avro") {
        directive.to_owned()
    } else if directive.trim().is_empty() {
        "apache_avro=error".to_owned()
    } else {
        format!("{directive},apache_avro=error")
    }
}

/// How often a throttled warning may be logged, per reason.
pub const THROTTLE_INTERVAL: Duration = Duration::from_secs(10);

/// Counts occurrences per reason and lets one through per interval.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    seen: Mutex<HashMap<&'static str, (Option<Instant>, u64)>>,
}

impl Throttle {
    /// A throttle letting one occurrence per `interval` through, per reason.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one occurrence of `reason`. When one may be logged, calls
    /// `log` with how many occurrences it stands for (itself and those held
    /// back since the last line).
    pub fn hit(&self, reason: &'static str, log: impl FnOnce(u64)) {
        let now = Instant::now();
        let repeats = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let entry = seen.entry(reason).or_insert((None, 0));
            entry.1 += 1;
            if entry
                .0
                .is_some_and(|last| now.duration_since(last) < self.interval)
            {
                return;
            }
            entry.0 = Some(now);
            std::mem::take(&mut entry.1)
        };
        log(repeats);
    }
}

static THROTTLE: LazyLock<Throttle> = LazyLock::new(|| Throttle::new(THROTTLE_INTERVAL));

/// A warning that may repeat without bound: logged at most once per
/// [`THROTTLE_INTERVAL`] per `reason`; `log` gets the count it stands for.
pub fn throttled_warn(reason: &'static str, log: impl FnOnce(u64)) {
    THROTTLE.hit(reason, log);
}

/// SIGINT and SIGTERM (and SIGHUP, a reload), listened for from the moment
/// this is made: install it before binding anything, so that a signal that
/// arrives while the collector starts ends it cleanly (or waits to reload
/// it) instead of killing it.
pub struct Signals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Installs the handlers (inside a tokio runtime).
    pub fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                terminate: Some(signal(SignalKind::terminate())?),
                interrupt: Some(signal(SignalKind::interrupt())?),
                hangup: Some(signal(SignalKind::hangup())?),
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Calls `reload` on every SIGHUP (also one that arrived before), in a
    /// task of its own, for as long as the runtime runs.
    pub fn on_hangup(&mut self, reload: impl Fn() + Send + 'static) {
        #[cfg(unix)]
        if let Some(mut hangup) = self.hangup.take() {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    reload();
                }
            });
        }
        #[cfg(not(unix))]
        drop(reload);
    }

    /// Resolves when SIGINT or SIGTERM has arrived (also one that arrived
    /// before this was called).
    pub async fn recv(mut self) {
        #[cfg(unix)]
        {
            let terminate = async {
                match self.terminate.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let interrupt = async {
                match self.interrupt.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = terminate => {}
                () = interrupt => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_line_through_per_interval_with_the_count() {
        let throttle = Throttle::new(Duration::from_secs(3600));
        let mut lines = Vec::new();
        for _ in 0..1000 {
            throttle.hit("refused", |n| lines.push(("refused", n)));
        }
        throttle.hit("malformed", |n| lines.push(("malformed", n)));
        assert_eq!(lines, vec![("refused", 1), ("malformed", 1)]);
        let throttle = Throttle::new(Duration::ZERO);
        throttle.hit("x", |n| lines.push(("x", n)));
        throttle.hit("x", |n| lines.push(("x", n)));
        assert_eq!(&lines[2..], &[("x", 1), ("x", 1)]);
    }

    #[test]
    fn apache_avro_is_quiet_unless_asked_for() {
        assert_eq!(with_quiet_dependencies("info"), "info,apache_avro=error");
        assert_eq!(
            with_quiet_dependencies("apache_avro=debug"),
            "apache_avro=debug"
        );
        EnvFilter::try_new(with_quiet_dependencies("collector=debug,info")).unwrap();
    }
}

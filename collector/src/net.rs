//! Listening sockets: binding (port 0 allowed, reported back) and an accept
//! loop that backs off when accepting fails, out of file descriptors for
//! example, instead of spinning and logging in a loop.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::stats::Stats;

/// Pending connections the kernel may queue before `accept`. tokio's
/// default is 1024; a thousand module connections arriving at once (every
/// process reconnecting after a restart) overflowed it now and then, and a
/// connection was reset.
const LISTEN_BACKLOG: u32 = 4096;

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// The OS error.
    pub source: std::io::Error,
}

/// Binds `addr` and returns the listener with the address it got.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), BindError> {
    let error = |source| BindError { addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(error)?;
    socket.set_reuseaddr(true).map_err(error)?;
    socket.bind(addr).map_err(error)?;
    let listener = socket.listen(LISTEN_BACKLOG).map_err(error)?;
    let bound = listener.local_addr().map_err(error)?;
    Ok((listener, bound))
}

/// The longest pause after failed accepts.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts the next connection, or `None` once `shutdown` fires. A failed
/// accept (EMFILE, ENFILE, ENOBUFS...) is counted, logged at most once per
/// interval with the count, and followed by a pause that doubles from 10 ms
/// to a second while failures go on: the descriptors a spinning loop would
/// burn are the ones the rest of the collector needs.
pub async fn accept(
    listener: &TcpListener,
    which: &'static str,
    failures: &mut u32,
    stats: &Stats,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(pair) => {
                *failures = 0;
                return Some(pair);
            }
            Err(error) => {
                *failures = (*failures + 1).min(16);
                stats.accept_failures.fetch_add(1, Relaxed);
                let pause = (Duration::from_millis(10) * (1 << (*failures - 1).min(7)))
                    .min(MAX_ACCEPT_BACKOFF);
                crate::telemetry::throttled_warn(which, |repeats| {
                    warn!(listener = which, %error, repeats, pause_ms = pause.as_millis() as u64,
                        "Failed to accept a connection; pausing before the next accept.");
                });
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

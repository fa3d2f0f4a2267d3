//! Listening sockets: binding (port 0 allowed, reported back), an accept
//! loop that backs off when accepting fails, out of file descriptors for
//! example, instead of spinning and logging in a loop, and the descriptor
//! budget every listener is held to, so that no flood of one starves
//! another or the rest of the collector.

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

/// A listening socket [`accept`] takes connections from: TCP, or a unix
/// socket.
pub trait Acceptor: Send + Sync {
    /// A connection.
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;

    /// The next connection, with its peer's address for the logs.
    fn accept_one(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Stream, String)>> + Send;
}

impl Acceptor for TcpListener {
    type Stream = TcpStream;

    async fn accept_one(&self) -> std::io::Result<(TcpStream, String)> {
        let (stream, peer) = self.accept().await?;
        Ok((stream, peer.to_string()))
    }
}

impl Acceptor for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;

    async fn accept_one(&self) -> std::io::Result<(tokio::net::UnixStream, String)> {
        let (stream, _) = self.accept().await?;
        Ok((stream, "unix".into()))
    }
}

/// The sockets systemd passed this process (socket activation), read once.
#[derive(Default)]
struct Passed {
    /// The listening unix sockets, by the path each is bound to.
    sockets: std::collections::HashMap<std::path::PathBuf, std::os::unix::net::UnixListener>,
    /// Why the others are not used, for the log once it is set up.
    unusable: Vec<String>,
}

/// The sockets systemd passed (`LISTEN_FDS`, and `LISTEN_PID` when set, as
/// `sd_listen_fds` reads them), taken at the first call. That call removes
/// both variables from the environment, so it must come while the process
/// has one thread: [`take_passed_sockets`] at the top of `main`.
fn passed() -> &'static std::sync::Mutex<Passed> {
    static PASSED: std::sync::OnceLock<std::sync::Mutex<Passed>> = std::sync::OnceLock::new();
    PASSED.get_or_init(|| {
        let mut passed = Passed::default();
        let mut fds = listenfd::ListenFd::from_env();
        for index in 0..fds.len() {
            match fds.take_unix_listener(index) {
                Ok(Some(listener)) => {
                    match listener
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_pathname().map(std::path::Path::to_owned))
                    {
                        Some(path) => {
                            passed.sockets.insert(socket_key(&path), listener);
                        }
                        None => passed
                            .unusable
                            .push(format!("socket {index}: a unix socket with no path")),
                    }
                }
                Ok(None) => {}
                // A TCP or datagram socket: no listener takes one.
                Err(error) => passed.unusable.push(format!("socket {index}: {error}")),
            }
        }
        std::sync::Mutex::new(passed)
    })
}

/// A socket's path as the passed sockets are looked up by: its directory
/// resolved (`/var/run` and `/run`, `a//b` and `a/b` are one), or the path
/// as given where that fails.
fn socket_key(path: &std::path::Path) -> std::path::PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            dir
        })
        .map_or_else(|_| path.to_owned(), |dir| dir.join(name)),
        _ => path.to_owned(),
    }
}

/// Takes the sockets systemd passed, if any. Call it first thing in
/// `main`, before any thread starts: it removes `LISTEN_FDS` and
/// `LISTEN_PID` from the environment, as `sd_listen_fds` does.
pub fn take_passed_sockets() {
    let _ = passed();
}

/// Warns of every socket systemd passed that no listener took (its path
/// not one the configuration listens on: connections to it would wait
/// and never be answered), and of those no listener can take.
pub fn warn_unused_passed_sockets() {
    let passed = passed().lock().unwrap_or_else(|p| p.into_inner());
    for path in passed.sockets.keys() {
        warn!(
            path = %path.display(),
            "systemd passed a socket that no listener is configured on (set the listener to unix:<this path>); connections to it are never answered"
        );
    }
    for reason in &passed.unusable {
        warn!(%reason, "systemd passed a socket that no listener can take (only unix stream sockets are taken)");
    }
}

/// Binds a unix socket at `path`, readable and writable by its owner and
/// group (0660, as DC/OS's sockets were), the group `group` when given (a
/// name from `/etc/group` or a number: the reader's; errors name its
/// option); its directory is made when missing. A socket file left
/// there by a process that is gone (a connection is refused) is replaced;
/// anything else there is an error.
///
/// A socket systemd passed bound to `path` (socket activation) is used as
/// it is instead, its mode and group systemd's: it outlives the process,
/// so a connection made while the collector restarts waits in its backlog
/// for the next process rather than being refused.
pub async fn bind_unix(
    path: &std::path::Path,
    group: Option<SocketGroup<'_>>,
) -> Result<tokio::net::UnixListener, UnixBindError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let error = |source| UnixBindError::Bind {
        path: path.to_owned(),
        source,
    };
    let passed = passed()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .sockets
        .remove(&socket_key(path));
    if let Some(listener) = passed {
        tracing::info!(
            path = %path.display(),
            "Listening on the socket systemd passed: connections made while the collector restarts wait for it."
        );
        if let Some(group) = &group {
            warn!(
                option = group.option,
                group = group.name,
                path = %path.display(),
                "The socket is systemd's: its group is the socket unit's SocketGroup=, not this option."
            );
        }
        listener.set_nonblocking(true).map_err(error)?;
        return tokio::net::UnixListener::from_std(listener).map_err(error);
    }
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        let probe = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::UnixStream::connect(path),
        )
        .await;
        if let Ok(Err(e)) = probe
            && e.kind() == std::io::ErrorKind::ConnectionRefused
        {
            std::fs::remove_file(path).map_err(error)?;
        }
    }
    // The group is known before anything is bound.
    let group_error = |group: &SocketGroup<'_>, reason| UnixBindError::Group {
        option: group.option,
        group: group.name.to_owned(),
        reason,
    };
    let gid = group
        .as_ref()
        .map(|g| group_id(g.name, "/etc/group".as_ref()).map_err(|reason| group_error(g, reason)))
        .transpose()?;
    // DC/OS's socket paths are under directories another unit made.
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(error)?;
    if let (Some(gid), Some(group)) = (gid, &group) {
        // Not following a symlink put there since the bind.
        rustix::fs::chownat(
            rustix::fs::CWD,
            path,
            None,
            Some(rustix::fs::Gid::from_raw(gid)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| {
            let _ = std::fs::remove_file(path);
            let name = group.name;
            group_error(
                group,
                if e == rustix::io::Errno::PERM {
                    format!(
                        "the collector is not a member of group {name}, so it cannot give it the socket (systemd: SupplementaryGroups={name})"
                    )
                } else {
                    format!("cannot give the socket {} to it: {e}", path.display())
                },
            )
        })?;
    }
    Ok(listener)
}

/// The group a unix socket is given, and the option that asked for it.
#[derive(Debug, Clone, Copy)]
pub struct SocketGroup<'a> {
    /// The option, for errors.
    pub option: &'static str,
    /// A name from `/etc/group`, or a number.
    pub name: &'a str,
}

/// The id of group `name` (a number, or a name in the `group` file at
/// `groups`, as `/etc/group` lists them).
pub fn group_id(name: &str, groups: &std::path::Path) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return if gid == u32::MAX {
            Err(format!("{gid} is not a group id"))
        } else {
            Ok(gid)
        };
    }
    let file = std::fs::read_to_string(groups)
        .map_err(|e| format!("cannot read {}: {e}", groups.display()))?;
    file.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let (group, _password, gid) = (fields.next()?, fields.next()?, fields.next()?);
            (group == name).then_some(gid)
        })
        .next()
        .ok_or_else(|| format!("no group {name} in {}", groups.display()))?
        .parse()
        .map_err(|_| format!("group {name} has no valid id in {}", groups.display()))
}

/// A unix socket that could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum UnixBindError {
    /// Binding it, or setting its mode, failed.
    #[error("cannot listen on unix:{}: {source}", path.display())]
    Bind {
        /// The path.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The group asked for is unknown, or the socket could not be given it.
    #[error("{option} = {group}: {reason}")]
    Group {
        /// The option that asked for it.
        option: &'static str,
        /// The group asked for.
        group: String,
        /// Why.
        reason: String,
    },
}

/// The longest pause after failed accepts.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts the next connection, or `None` once `shutdown` fires. A failed
/// accept (EMFILE, ENFILE, ENOBUFS...) is counted, logged at most once per
/// interval with the count, and followed by a pause that doubles from 10 ms
/// to a second while failures go on: the descriptors a spinning loop would
/// burn are the ones the rest of the collector needs.
pub async fn accept<L: Acceptor>(
    listener: &L,
    which: &'static str,
    failures: &mut u32,
    stats: &Stats,
    shutdown: &CancellationToken,
) -> Option<(L::Stream, String)> {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return None,
            accepted = listener.accept_one() => accepted,
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

/// Descriptors kept for what is not a listener's connection: librdkafka's
/// broker connections (up to three producers and their admin clients, a few
/// per broker each), the spool's files (its segments, cursor and lock, and
/// each parked topic's), the agent and scheduler clients, DNS, the logs.
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// HTTP API connections open at once, at most: more are closed as soon as
/// they are accepted, and counted.
pub const API_MAX_CONNECTIONS: usize = 64;

/// The connections each listener may hold, fitted to the process's
/// descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptors {
    /// The descriptor limit in force (RLIMIT_NOFILE, raised to its hard
    /// limit).
    pub limit: u64,
    /// TCP input connections (`max_connections`, or fewer where the limit
    /// leaves less).
    pub input: usize,
    /// HTTP API connections.
    pub api: usize,
    /// The statsd registration API's connections: as many as containers
    /// (a burst of launches is answered at once), at least `api`.
    pub statsd_control: usize,
}

/// Raises the descriptor limit to its hard limit, and fits the listeners
/// into it: the partners take `max_partners`, the API and each other
/// served listener (Prometheus) at most [`API_MAX_CONNECTIONS`], statsd's
/// container listeners `statsd_sockets` (a UDP socket each, and as many
/// registration connections), and the
/// input what is left of the limit less
/// [`RESERVED_DESCRIPTORS`] and what is open now, at most
/// `max_connections`. A flood of any listener then ends at its own limit,
/// refused and counted there, and the others keep their descriptors.
pub fn fit_descriptors(
    max_connections: usize,
    max_partners: usize,
    served_listeners: usize,
    statsd_sockets: usize,
) -> Descriptors {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    // Up to the hard limit (an unlimited one taken as 2^20); never lower.
    let target = limit.maximum.unwrap_or(1 << 20);
    if let Some(current) = limit.current
        && target > current
    {
        let raised = rustix::process::Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = raised;
        }
    }
    let nofile = limit.current.unwrap_or(u64::MAX);
    let open = std::fs::read_dir("/proc/self/fd").map_or(16, |d| d.count() as u64);
    let left = nofile.saturating_sub(RESERVED_DESCRIPTORS + open) as usize;
    let api = API_MAX_CONNECTIONS.min((left / 8).max(4));
    let statsd_control = if statsd_sockets > 0 {
        statsd_sockets.max(api)
    } else {
        0
    };
    let input = max_connections.min(
        left.saturating_sub(
            api * (1 + served_listeners) + max_partners + statsd_sockets + statsd_control,
        )
        .max(1),
    );
    if input < max_connections {
        warn!(
            max_connections,
            taken = input,
            descriptor_limit = nofile,
            "The descriptor limit leaves fewer input connections than max_connections; raise the limit (LimitNOFILE=) or lower max_connections."
        );
    }
    Descriptors {
        limit: nofile,
        input,
        api,
        statsd_control,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener's path finds the socket systemd passed however the two
    /// spell its directory: through a link, with a doubled slash.
    #[test]
    fn a_passed_socket_is_found_by_its_directory_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("run");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("var-run");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let passed = socket_key(&real.join("x.sock"));
        assert_eq!(socket_key(&link.join("x.sock")), passed);
        let doubled = format!("{}//x.sock", real.display());
        assert_eq!(socket_key(std::path::Path::new(&doubled)), passed);
        assert_ne!(socket_key(&real.join("y.sock")), passed);
        // A directory that does not exist: the path as given.
        let missing = dir.path().join("missing/x.sock");
        assert_eq!(socket_key(&missing), missing);
    }
}

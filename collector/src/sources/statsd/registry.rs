//! The containers registered through the statsd registration API (see
//! [`super::control`]): each has a UDP listener of its own (see
//! [`super::listener`]), and, with `statsd_state_dir`, a file that binds it
//! again on the same port after a restart.
//!
//! A state file is named after its container and holds what the
//! registration answered, `{"container_id", "statsd_host", "statsd_port"}`
//! (DC/OS's Telegraf kept the same files, so its files can be taken over
//! as they are). It is written whole before the answer (a temporary file,
//! renamed over it), and removed at deregistration. It is not synced:
//! registrations matter across the collector's restarts, which the page
//! cache survives, and not across the node's, which its containers do not
//! survive either; so no registration waits for a disk.
//!
//! A metrics agent must never fail a task's launch: anything that keeps a
//! container from its listener (the limit, a port that cannot be bound, a
//! file that cannot be written, the shutdown) makes the registration
//! [`Refused`], answered 204, counted and logged: the task then runs
//! without statsd.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use serde::{Deserialize, Serialize};
use std::net::UdpSocket;
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::listener::{ByteLimit, Destination, StatsdListener, StatsdSettings};
use crate::config::{Config, ConfigError};
use crate::pipeline::Pipeline;

/// Bytes of a container id, at most (Mesos' are UUIDs, 36 bytes).
pub const MAX_ID_BYTES: usize = 255;

/// Bytes of a state file read at start, at most.
pub const MAX_STATE_FILE_BYTES: u64 = 4096;

/// How long a registration may take before it is answered 204 (the module
/// gives up, and fails the launch, after 5 s).
pub const REGISTRATION_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

/// How long a container the agent's `/state` named (or one restored at
/// start) may be missing from it before it is deregistered: one answer
/// leaving it out (an agent recovering) is not enough.
pub const ABSENT_FOR: std::time::Duration = std::time::Duration::from_secs(300);

/// How long a container registered since the start may go without the
/// agent's `/state` ever naming it before it is deregistered: its launch
/// failed or it was killed before it ran, and its `DELETE` never came (a
/// container's executor is named from its launch on; a pod's task once it
/// runs, after its image is pulled).
pub const NEVER_NAMED_FOR: std::time::Duration = std::time::Duration::from_secs(3600);

/// What `POST /container` sends (the module sends `container_id` alone).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Request {
    /// The container's id.
    pub container_id: String,
    /// The address the task should send to, instead of `statsd_host`.
    #[serde(default)]
    pub statsd_host: Option<String>,
    /// The port to bind, instead of one the kernel picks (0: the kernel's).
    #[serde(default)]
    pub statsd_port: Option<u16>,
}

impl Request {
    /// Reads a request body; the error says why, for the 400 answer.
    pub fn from_json(body: &[u8]) -> Result<Self, String> {
        let request: Self = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        if request.container_id.is_empty() {
            return Err("container_id is empty".into());
        }
        Ok(request)
    }
}

/// A registered container: the answer to its registration, and its state
/// file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    /// The container's id.
    pub container_id: String,
    /// The address its task sends to.
    pub statsd_host: String,
    /// The port its listener is bound to.
    pub statsd_port: u16,
}

impl Container {
    /// Reads a state file's content.
    pub fn from_json(text: &[u8]) -> Result<Self, String> {
        let container: Self = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        check_id(&container.container_id)?;
        if container.statsd_port == 0 {
            return Err("statsd_port is 0".into());
        }
        Ok(container)
    }
}

/// Whether `id` can name a container here (and its state file): 1 to
/// [`MAX_ID_BYTES`] bytes of ASCII letters, digits, `-`, `_` and `.`, not
/// starting with `.` (Mesos' container ids are UUIDs).
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(format!(
            "a container id has 1 to {MAX_ID_BYTES} bytes, not {}",
            id.len()
        ));
    }
    if id.starts_with('.')
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "container id {id:?} has a character other than letters, digits, '-', '_' and '.', or starts with '.'"
        ));
    }
    Ok(())
}

/// Why a registration is answered 204.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `statsd_max_containers` are registered.
    #[error("{0} containers are registered already (statsd_max_containers)")]
    Full(usize),
    /// The id cannot name a container.
    #[error("{0}")]
    Id(String),
    /// The address asked for is not an IP address.
    #[error("statsd_host {0:?} is not an IP address this node can bind")]
    Host(String),
    /// The port could not be bound.
    #[error("cannot bind {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        reason: String,
    },
    /// The state file could not be written.
    #[error("cannot write its state file {path}: {reason}")]
    State {
        /// The file.
        path: PathBuf,
        /// The error.
        reason: String,
    },
    /// The collector is shutting down.
    #[error("the collector is shutting down")]
    ShuttingDown,
    /// The registration took longer than [`REGISTRATION_DEADLINE`].
    #[error("it took longer than {REGISTRATION_DEADLINE:?}")]
    Slow,
}

/// What a registration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// A listener was bound for it.
    New(Container),
    /// It was registered already: the same listener.
    Known(Container),
}

/// What the registry is given.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// The address bound and given to tasks (`statsd_host`).
    pub host: IpAddr,
    /// Where registrations are kept (`statsd_state_dir`).
    pub state_dir: Option<PathBuf>,
    /// Containers at once, at most.
    pub max_containers: usize,
    /// Each listener's settings (shared with the node-wide listener).
    pub listener: StatsdSettings,
    /// Each container's byte limit.
    pub limit: Option<ByteLimit>,
}

impl RegistrySettings {
    /// The configuration's settings, the listeners' shared with `listener`.
    pub fn new(config: &Config, listener: StatsdSettings) -> Self {
        Self {
            host: config.statsd_host,
            state_dir: config.statsd_state_dir.clone(),
            max_containers: config.statsd_max_containers,
            listener,
            limit: ByteLimit::from_config(config),
        }
    }
}

/// A container's socket bound at start from its state file, before the
/// pipeline exists.
pub struct Restored {
    /// The container.
    pub container: Container,
    /// Its socket.
    pub socket: UdpSocket,
}

/// Reads `statsd_state_dir` and binds every container it holds again, on
/// its port where it is free (another the kernel picks where not, its file
/// rewritten and the change logged). A file that cannot be read is logged
/// and left; the directory is made when missing, and an error naming the
/// option stops the start when it cannot be.
pub async fn restore(settings: &RegistrySettings) -> Result<Vec<Restored>, ConfigError> {
    let Some(dir) = &settings.state_dir else {
        return Ok(Vec::new());
    };
    let option_error = |reason: String| {
        ConfigError::new("statsd_state_dir", format!("{}: {reason}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| option_error(e.to_string()))?;
    let entries = std::fs::read_dir(dir).map_err(|e| option_error(e.to_string()))?;
    let mut names: Vec<String> = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            // A write cut short by a crash: its container was never told.
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
            continue;
        }
        names.push(name);
    }
    names.sort();
    let mut restored = Vec::new();
    for name in names {
        let path = dir.join(&name);
        if restored.len() >= settings.max_containers {
            warn!(path = %path.display(), max = settings.max_containers, "A registered container was not restored: statsd_max_containers are restored already.");
            continue;
        }
        let container = match read_state(&path) {
            Ok(container) if container.container_id == name => container,
            Ok(container) => {
                warn!(path = %path.display(), container_id = %container.container_id, "A statsd state file names another container than its own name; left as it is.");
                continue;
            }
            Err(reason) => {
                warn!(path = %path.display(), %reason, "A statsd state file could not be read; left as it is.");
                continue;
            }
        };
        let ip = container
            .statsd_host
            .parse::<IpAddr>()
            .unwrap_or(settings.host);
        let mut container = container;
        let socket = match bind_udp(SocketAddr::new(ip, container.statsd_port)) {
            Ok(socket) => socket,
            Err(error) => match bind_udp(SocketAddr::new(ip, 0)) {
                Ok(socket) => {
                    let port = socket.local_addr().map_or(0, |a| a.port());
                    warn!(
                        container_id = %container.container_id,
                        old_port = container.statsd_port,
                        new_port = port,
                        %error,
                        "A registered container's statsd port was taken meanwhile: it listens on a new one, which its task does not know; what the task sends is lost until it is launched again."
                    );
                    container.statsd_port = port;
                    if let Err(reason) = write_state(dir, &container) {
                        warn!(path = %path.display(), %reason, "A statsd state file could not be rewritten.");
                    }
                    socket
                }
                Err(error) => {
                    warn!(container_id = %container.container_id, %error, "A registered container's statsd listener could not be bound again.");
                    continue;
                }
            },
        };
        restored.push(Restored { container, socket });
    }
    if !restored.is_empty() {
        info!(containers = restored.len(), dir = %dir.display(), "Restored the registered statsd containers.");
    }
    Ok(restored)
}

/// Binds a non-blocking UDP socket.
fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    super::listener::bind(addr).map(|(socket, _)| socket)
}

/// Reads a state file.
fn read_state(path: &Path) -> Result<Container, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = Vec::new();
    file.take(MAX_STATE_FILE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_STATE_FILE_BYTES {
        return Err(format!("over {MAX_STATE_FILE_BYTES} bytes"));
    }
    Container::from_json(&text)
}

/// Writes `container`'s state file whole: a temporary file, renamed over
/// it (not synced: see the module's doc).
pub fn write_state(dir: &Path, container: &Container) -> Result<(), String> {
    use std::io::Write;
    let path = dir.join(&container.container_id);
    let temporary = dir.join(format!(".{}.tmp", container.container_id));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(&serde_json::to_vec(container).map_err(std::io::Error::other)?)?;
        std::fs::rename(&temporary, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        e.to_string()
    })
}

/// A registered container's listener, while it runs.
struct Entry {
    container: Container,
    /// Stops its listener (which then flushes).
    stop: CancellationToken,
    /// Its listener's task.
    task: Option<tokio::task::Id>,
    /// Whether the agent's `/state` has named it, or it was restored at
    /// start (so that its absence means it is gone).
    seen_by_agent: bool,
    /// Since when the agent's `/state` has not named it, once it had.
    absent_since: Option<std::time::Instant>,
    /// When it was registered (or restored).
    registered_at: std::time::Instant,
}

struct Inner {
    containers: BTreeMap<String, Entry>,
    listeners: JoinSet<()>,
    closed: bool,
}

/// The registered containers and their listeners.
pub struct Registry {
    settings: RegistrySettings,
    pipeline: Arc<Pipeline>,
    /// The collector's shutdown (begun): stops every listener.
    shutdown: CancellationToken,
    inner: Mutex<Inner>,
}

impl Registry {
    /// A registry with the containers `restored` at start, their listeners
    /// running.
    pub fn new(
        settings: RegistrySettings,
        pipeline: Arc<Pipeline>,
        shutdown: CancellationToken,
        restored: Vec<Restored>,
    ) -> Arc<Self> {
        let registry = Self {
            settings,
            pipeline,
            shutdown,
            inner: Mutex::new(Inner {
                containers: BTreeMap::new(),
                listeners: JoinSet::new(),
                closed: false,
            }),
        };
        {
            let mut inner = registry
                .inner
                .try_lock()
                .expect("a new registry is not shared yet");
            for Restored { container, socket } in restored {
                registry.start(&mut inner, container, socket, true);
            }
        }
        Arc::new(registry)
    }

    /// The registered containers, by id.
    pub async fn containers(&self) -> Vec<Container> {
        let inner = self.inner.lock().await;
        inner
            .containers
            .values()
            .map(|e| e.container.clone())
            .collect()
    }

    /// The container registered as `id`.
    pub async fn container(&self, id: &str) -> Option<Container> {
        let inner = self.inner.lock().await;
        inner.containers.get(id).map(|e| e.container.clone())
    }

    /// Registers a container: binds its listener and keeps its state file,
    /// or gives the one it has.
    pub async fn register(&self, request: Request) -> Result<Registered, Refused> {
        let outcome = tokio::time::timeout(REGISTRATION_DEADLINE, self.try_register(request))
            .await
            .unwrap_or(Err(Refused::Slow));
        match &outcome {
            Ok(Registered::New(container)) => {
                self.pipeline
                    .stats
                    .statsd_registrations
                    .fetch_add(1, Relaxed);
                info!(
                    container_id = %container.container_id,
                    host = %container.statsd_host,
                    port = container.statsd_port,
                    "Registered a container for statsd."
                );
            }
            Ok(Registered::Known(_)) => {}
            Err(reason) => {
                self.pipeline
                    .stats
                    .statsd_registrations_refused
                    .fetch_add(1, Relaxed);
                crate::telemetry::throttled_warn("statsd registration refused", |repeats| {
                    warn!(%reason, repeats, "A container's statsd registration was answered 204: its task runs without statsd.");
                });
            }
        }
        outcome
    }

    async fn try_register(&self, request: Request) -> Result<Registered, Refused> {
        check_id(&request.container_id).map_err(Refused::Id)?;
        let ip = match &request.statsd_host {
            Some(host) => host
                .parse::<IpAddr>()
                .map_err(|_| Refused::Host(host.clone()))?,
            None => self.settings.host,
        };
        // Registrations are taken one at a time (a repeated one then finds
        // the first's listener), and nothing from here on awaits: a call
        // given up (the client gone, the deadline) leaves nothing half done.
        let mut inner = self.inner.lock().await;
        self.reap(&mut inner);
        if inner.closed || self.shutdown.is_cancelled() {
            return Err(Refused::ShuttingDown);
        }
        if let Some(entry) = inner.containers.get(&request.container_id) {
            return Ok(Registered::Known(entry.container.clone()));
        }
        if inner.containers.len() >= self.settings.max_containers {
            return Err(Refused::Full(inner.containers.len()));
        }
        let addr = SocketAddr::new(ip, request.statsd_port.unwrap_or(0));
        let (socket, port) = bind_udp(addr)
            .and_then(|s| {
                let port = s.local_addr()?.port();
                Ok((s, port))
            })
            .map_err(|e| Refused::Bind {
                addr,
                reason: e.to_string(),
            })?;
        let container = Container {
            container_id: request.container_id,
            statsd_host: request.statsd_host.unwrap_or_else(|| ip.to_string()),
            statsd_port: port,
        };
        // A small write into the page cache (not synced): no wait on a disk.
        if let Some(dir) = &self.settings.state_dir {
            write_state(dir, &container).map_err(|reason| Refused::State {
                path: dir.join(&container.container_id),
                reason,
            })?;
        }
        self.start(&mut inner, container.clone(), socket, false);
        Ok(Registered::New(container))
    }

    /// Counts the listeners that ended by a panic (a bug: the container's
    /// listener is gone; it is deregistered so that a new registration
    /// binds another).
    fn reap(&self, inner: &mut Inner) {
        while let Some(ended) = inner.listeners.try_join_next_with_id() {
            if let Err(error) = ended
                && error.is_panic()
            {
                self.pipeline.stats.task_panics.fetch_add(1, Relaxed);
                let task = error.id();
                if let Some(id) = inner
                    .containers
                    .iter()
                    .find(|(_, e)| e.task == Some(task))
                    .map(|(id, _)| id.clone())
                {
                    warn!(container_id = %id, "A container's statsd listener panicked; it is deregistered.");
                    self.remove(inner, &id, "its listener panicked");
                }
            }
        }
    }

    /// Starts `container`'s listener on `socket`; `restored` at start.
    fn start(&self, inner: &mut Inner, container: Container, socket: UdpSocket, restored: bool) {
        let stop = self.shutdown.child_token();
        let listener = StatsdListener {
            socket,
            destination: Destination::Container(container.container_id.clone()),
            settings: self.settings.listener.clone(),
            limit: self.settings.limit,
            pipeline: self.pipeline.clone(),
        };
        let task = inner
            .listeners
            .spawn(listener.run(stop.clone(), self.shutdown.clone()))
            .id();
        inner.containers.insert(
            container.container_id.clone(),
            Entry {
                container,
                stop,
                task: Some(task),
                seen_by_agent: restored,
                absent_since: None,
                registered_at: std::time::Instant::now(),
            },
        );
        self.pipeline
            .stats
            .statsd_containers
            .store(inner.containers.len() as i64, Relaxed);
    }

    /// Deregisters the container `id`: its listener reads what its socket
    /// holds, flushes and closes; its state file is removed. False for an
    /// unknown id.
    pub async fn deregister(&self, id: &str) -> bool {
        let mut inner = self.inner.lock().await;
        self.reap(&mut inner);
        self.remove(&mut inner, id, "deregistered")
    }

    /// Stops `id`'s listener (it flushes what it holds) and removes its
    /// state file; false for an unknown id. Nothing awaits.
    fn remove(&self, inner: &mut Inner, id: &str, why: &str) -> bool {
        let Some(entry) = inner.containers.remove(id) else {
            return false;
        };
        entry.stop.cancel();
        let stats = &self.pipeline.stats;
        stats
            .statsd_containers
            .store(inner.containers.len() as i64, Relaxed);
        stats.statsd_deregistrations.fetch_add(1, Relaxed);
        if let Some(dir) = &self.settings.state_dir {
            match std::fs::remove_file(dir.join(id)) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    warn!(container_id = %id, %error, "A deregistered container's statsd state file could not be removed: a restart binds it again.");
                }
                _ => {}
            }
        }
        info!(container_id = %id, why, "A container's statsd listener flushes and closes.");
        true
    }

    /// Deregisters the containers the agent's `/state` named (or that were
    /// restored at start) and has not named for [`ABSENT_FOR`]: the
    /// module's `DELETE` for them never came (the collector was down,
    /// say), and their listeners would otherwise hold a port and a place
    /// under `statsd_max_containers` for good. A container `/state` has
    /// never named since it registered (its task still starting) is left
    /// alone for [`NEVER_NAMED_FOR`]. `now` is the state's time.
    fn forget_gone(
        &self,
        inner: &mut Inner,
        state: &crate::enrich::Enrichment,
        now: std::time::Instant,
    ) {
        if !state.enabled || state.agent_id.is_none() {
            return;
        }
        let mut gone = Vec::new();
        for (id, entry) in &mut inner.containers {
            if state.containers.contains_key(id) {
                entry.seen_by_agent = true;
                entry.absent_since = None;
            } else if entry.seen_by_agent {
                let since = *entry.absent_since.get_or_insert(now);
                if now.duration_since(since) >= ABSENT_FOR {
                    gone.push(id.clone());
                }
            } else if now.duration_since(entry.registered_at) >= NEVER_NAMED_FOR {
                gone.push(id.clone());
            }
        }
        for id in gone {
            self.remove(inner, &id, "gone from the agent's /state");
        }
    }

    /// Runs until the shutdown begins, then stops taking registrations and
    /// waits for every listener's last flush.
    /// Meanwhile, a container the agent's `/state` stops naming is
    /// deregistered.
    pub async fn run(self: Arc<Self>) {
        let mut states = self.pipeline.enrichment.clone();
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                changed = states.changed() => {
                    if changed.is_err() {
                        self.shutdown.cancelled().await;
                        break;
                    }
                    let state = states.borrow_and_update().clone();
                    let mut inner = self.inner.lock().await;
                    self.reap(&mut inner);
                    self.forget_gone(&mut inner, &state, std::time::Instant::now());
                }
            }
        }
        let mut listeners = {
            let mut inner = self.inner.lock().await;
            inner.closed = true;
            std::mem::take(&mut inner.listeners)
        };
        while let Some(ended) = listeners.join_next().await {
            if ended.is_err_and(|e| e.is_panic()) {
                self.pipeline.stats.task_panics.fetch_add(1, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path, max_containers: usize) -> RegistrySettings {
        RegistrySettings {
            host: IpAddr::from([127, 0, 0, 1]),
            state_dir: Some(dir.to_owned()),
            max_containers,
            listener: StatsdSettings::new(&Config::default()),
            limit: None,
        }
    }

    #[test]
    fn ids_that_cannot_name_a_file_are_refused() {
        for good in [
            "3f1e6b0e-1c4b-4a47-9e1e-7c0e5c4f1f1a",
            "a",
            "a.b_c-d",
            &"x".repeat(255),
        ] {
            assert!(check_id(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            "é",
            "a\0b",
            &"x".repeat(256),
        ] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn requests_and_state_files_are_read_strictly_enough() {
        assert_eq!(
            Request::from_json(br#"{"container_id":"c","unknown":1}"#),
            Ok(Request {
                container_id: "c".into(),
                statsd_host: None,
                statsd_port: None
            })
        );
        for bad in [
            &b"{}"[..],
            b"[]",
            b"",
            br#"{"container_id":""}"#,
            br#"{"container_id":"c","statsd_port":70000}"#,
        ] {
            assert!(
                Request::from_json(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let container = Container {
            container_id: "c".into(),
            statsd_host: "198.51.100.1".into(),
            statsd_port: 4242,
        };
        let text = serde_json::to_vec(&container).unwrap();
        assert_eq!(Container::from_json(&text), Ok(container));
        // Telegraf's files, as it wrote them.
        assert!(
            Container::from_json(
                br#"{"container_id":"abc","statsd_host":"198.51.100.1","statsd_port":37211}"#
            )
            .is_ok()
        );
        for bad in [
            &br#"{"container_id":"../c","statsd_host":"h","statsd_port":1}"#[..],
            br#"{"container_id":"c","statsd_host":"h","statsd_port":0}"#,
            br#"{"container_id":"c","statsd_port":1}"#,
        ] {
            assert!(
                Container::from_json(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_state_file_is_written_whole_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let container = Container {
            container_id: "c".into(),
            statsd_host: "127.0.0.1".into(),
            statsd_port: 1234,
        };
        write_state(dir.path(), &container).unwrap();
        assert_eq!(read_state(&dir.path().join("c")), Ok(container));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["c"], "no temporary file left");
        std::fs::write(dir.path().join("big"), vec![b' '; 5000]).unwrap();
        assert!(
            read_state(&dir.path().join("big"))
                .unwrap_err()
                .contains("over")
        );
    }

    #[tokio::test]
    async fn restore_binds_the_same_ports_or_new_ones_and_skips_what_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        // A port below the kernel's ephemeral range (32768 and up by
        // default), so that no test running beside takes it meanwhile.
        let free_port = (24_000..32_000)
            .find(|p| std::net::UdpSocket::bind(("127.0.0.1", *p)).is_ok())
            .unwrap();
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        for (id, port) in [("a", free_port), ("b", taken_port)] {
            let container = Container {
                container_id: id.into(),
                statsd_host: "127.0.0.1".into(),
                statsd_port: port,
            };
            write_state(dir.path(), &container).unwrap();
        }
        std::fs::write(dir.path().join("garbage"), b"{").unwrap();
        std::fs::write(
            dir.path().join("other"),
            br#"{"container_id":"not-other","statsd_host":"127.0.0.1","statsd_port":1}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join(".x.tmp"), b"{").unwrap();
        let restored = restore(&settings(dir.path(), 10)).await.unwrap();
        let got: Vec<_> = restored.iter().map(|r| r.container.clone()).collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            (got[0].container_id.as_str(), got[0].statsd_port),
            ("a", free_port)
        );
        assert_eq!(got[1].container_id, "b");
        assert_ne!(got[1].statsd_port, taken_port);
        assert_eq!(
            restored[1].socket.local_addr().unwrap().port(),
            got[1].statsd_port
        );
        assert_eq!(read_state(&dir.path().join("b")), Ok(got[1].clone()));
        assert!(!dir.path().join(".x.tmp").exists());
        assert!(dir.path().join("garbage").exists(), "left as it is");
        drop(restored);
        // At most max_containers.
        assert_eq!(restore(&settings(dir.path(), 1)).await.unwrap().len(), 1);
        // A directory that cannot be made names its option.
        let file = dir.path().join("a");
        let error = restore(&settings(&file.join("sub"), 1))
            .await
            .err()
            .unwrap();
        assert!(error.to_string().contains("statsd_state_dir"), "{error}");
    }

    /// A container the agent's `/state` named, or one restored at start,
    /// is deregistered (its file removed) once `/state` has left it out
    /// for ABSENT_FOR, not at one answer leaving it out; one it has never
    /// named since it registered stays.
    #[tokio::test]
    async fn a_container_gone_from_the_agents_state_is_deregistered() {
        use std::time::Instant;
        let dir = tempfile::tempdir().unwrap();
        let state = |containers: &[&str]| {
            let executors: Vec<_> = containers
                .iter()
                .map(|c| serde_json::json!({"id": format!("ex-{c}"), "container": c, "tasks": []}))
                .collect();
            crate::enrich::Enrichment::from_state(&serde_json::json!({
                "id": "agent",
                "frameworks": [{"id": "fw", "name": "marathon", "executors": executors}]
            }))
        };
        let restored = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let restored = Restored {
            container: Container {
                container_id: "restored".into(),
                statsd_host: "127.0.0.1".into(),
                statsd_port: restored.local_addr().unwrap().port(),
            },
            socket: restored,
        };
        write_state(dir.path(), &restored.container).unwrap();
        let (pipeline, _states) = crate::pipeline::test_pipeline(state(&[]));
        let shutdown = CancellationToken::new();
        let registry = Registry::new(
            settings(dir.path(), 10),
            pipeline.clone(),
            shutdown.clone(),
            vec![restored],
        );
        for id in ["running", "starting"] {
            let request =
                Request::from_json(format!("{{\"container_id\":\"{id}\"}}").as_bytes()).unwrap();
            assert!(matches!(
                registry.register(request).await,
                Ok(Registered::New(_))
            ));
        }
        let ids = || async {
            registry
                .containers()
                .await
                .into_iter()
                .map(|c| c.container_id)
                .collect::<Vec<_>>()
        };
        let forget = |names: &'static [&'static str], at: Instant| {
            let registry = registry.clone();
            let state = state(names);
            async move {
                let mut inner = registry.inner.lock().await;
                registry.forget_gone(&mut inner, &state, at);
            }
        };
        let t0 = Instant::now();
        // A pending state (no agent id yet) says nothing.
        {
            let mut inner = registry.inner.lock().await;
            registry.forget_gone(
                &mut inner,
                &crate::enrich::Enrichment::pending(),
                t0 + ABSENT_FOR * 2,
            );
        }
        forget(&["running"], t0).await;
        // Left out once, and for less than ABSENT_FOR: all stay.
        forget(&[], t0).await;
        forget(&[], t0 + ABSENT_FOR / 2).await;
        assert_eq!(ids().await, ["restored", "running", "starting"]);
        // Named again: its absence starts afresh.
        forget(&["running"], t0 + ABSENT_FOR / 2).await;
        forget(&[], t0 + ABSENT_FOR).await;
        assert_eq!(
            ids().await,
            ["running", "starting"],
            "the restored one, never named, gone"
        );
        forget(&[], t0 + ABSENT_FOR * 2).await;
        assert_eq!(
            ids().await,
            ["starting"],
            "the one never named since it registered stays"
        );
        for gone in ["restored", "running"] {
            assert!(!dir.path().join(gone).exists(), "{gone}");
        }
        assert!(dir.path().join("starting").exists());
        assert_eq!(pipeline.stats.statsd_deregistrations.load(Relaxed), 2);
        assert_eq!(pipeline.stats.statsd_containers.load(Relaxed), 1);
        // ...until NEVER_NAMED_FOR.
        forget(&[], t0 + NEVER_NAMED_FOR).await;
        assert!(ids().await.is_empty());
        assert!(!dir.path().join("starting").exists());
        // At shutdown a known container is not served again either.
        let request = Request::from_json(br#"{"container_id":"known"}"#).unwrap();
        assert!(matches!(
            registry.register(request).await,
            Ok(Registered::New(_))
        ));
        shutdown.cancel();
        let request = Request::from_json(br#"{"container_id":"known"}"#).unwrap();
        assert_eq!(registry.register(request).await, Err(Refused::ShuttingDown));
        registry.run().await;
    }

    /// A state file that cannot be written refuses the registration, and
    /// leaves no listener behind.
    #[tokio::test]
    async fn a_state_file_that_cannot_be_written_answers_204() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("containers");
        let (pipeline, _states) =
            crate::pipeline::test_pipeline(crate::enrich::Enrichment::default());
        let registry = Registry::new(
            settings(&state_dir, 10),
            pipeline.clone(),
            CancellationToken::new(),
            Vec::new(),
        );
        // The directory replaced by a file (a full or broken disk writes
        // nothing either).
        std::fs::write(&state_dir, b"").unwrap();
        let request = Request::from_json(br#"{"container_id":"c"}"#).unwrap();
        assert!(matches!(
            registry.register(request).await,
            Err(Refused::State { .. })
        ));
        assert!(registry.containers().await.is_empty());
        assert_eq!(pipeline.stats.statsd_registrations_refused.load(Relaxed), 1);
        assert_eq!(pipeline.stats.statsd_containers.load(Relaxed), 0);
    }
}

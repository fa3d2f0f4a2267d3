//! Real servers for the secured-Kafka tests, no mocks: tansu 0.6 with SCRAM
//! users (made while authentication is off, then the broker restarted with
//! `--authentication` on the same database), and Debian's stunnel4 in front
//! of it for TLS (tansu takes `--cert`/`--key` but does not use them).
//!
//! tansu comes from `scripts/install-tansu` (`$TANSU_BIN`, or the cache it
//! installs into); stunnel from Debian's `stunnel4` (`scripts/test`
//! installs it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tempfile::TempDir;
use tokio::process::{Child, Command};

/// The tansu binary: `$TANSU_BIN`, or where `scripts/install-tansu` put it
/// (`$TANSU_CACHE/bin/tansu`, by default under `~/.cache`).
pub fn tansu_bin() -> PathBuf {
    let path = std::env::var_os("TANSU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("TANSU_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    let home = std::env::var_os("HOME")
                        .map(PathBuf::from)
                        .unwrap_or_default();
                    home.join(".cache/metrics-collector/tansu")
                });
            cache.join("bin/tansu")
        });
    assert!(
        path.is_file(),
        "tansu is not installed at {} (run scripts/install-tansu, or set TANSU_BIN)",
        path.display()
    );
    path
}

/// A free port on 127.0.0.1 (bound and released: the servers here take a
/// port on their command line, not port 0).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until `addr` accepts connections, or fails after
/// [`crate::patience`]
/// (at once if `child` exits first).
pub async fn wait_listening(addr: SocketAddr, what: &str, child: &mut Child) {
    crate::eventually(&format!("{what} listening on {addr}"), || {
        let exited = child.try_wait().ok().flatten();
        async move {
            if let Some(status) = exited {
                panic!("{what} exited with {status} before listening on {addr}");
            }
            tokio::net::TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
    .await;
}

/// A SCRAM user.
#[derive(Debug, Clone)]
pub struct ScramUser {
    /// The name.
    pub name: String,
    /// The password.
    pub password: String,
    /// `scram256` or `scram512`, as tansu's CLI names them.
    pub mechanism: &'static str,
}

/// A tansu broker with authentication on, on 127.0.0.1.
pub struct Tansu {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Killed on drop.
    _child: Child,
    _dir: TempDir,
}

impl Tansu {
    /// Starts tansu with `users` made, then authentication on (without
    /// users, authentication stays off). It advertises `advertised_port` on
    /// `localhost` (stunnel's, when TLS goes through stunnel), or its own
    /// port.
    pub async fn start(users: &[ScramUser], advertised_port: Option<u16>) -> Self {
        let bin = tansu_bin();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let broker = |advertised: u16, authentication: bool| {
            let mut command = Command::new(&bin);
            command
                .current_dir(dir.path())
                .arg("broker")
                .arg(format!("--listener-url=tcp://127.0.0.1:{port}"))
                .arg(format!(
                    "--advertised-listener-url=tcp://localhost:{advertised}"
                ))
                // Relative to the working directory, whatever it says.
                .arg("--storage-engine=sqlite://tansu.db")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true);
            if authentication {
                command.arg("--authentication");
            }
            command.spawn().expect("tansu starts")
        };
        if users.is_empty() {
            let mut child = broker(advertised_port.unwrap_or(port), false);
            wait_listening(addr, "tansu", &mut child).await;
            return Self {
                addr,
                _child: child,
                _dir: dir,
            };
        }
        // 1. Without authentication, advertising its own port, so that
        //    the CLI can reach it; make the users.
        let mut first = broker(port, false);
        wait_listening(addr, "tansu", &mut first).await;
        for user in users {
            let status = Command::new(&bin)
                .current_dir(dir.path())
                .args(["user", "create", "--broker"])
                .arg(format!("tcp://127.0.0.1:{port}"))
                .arg(&user.name)
                .arg(&user.password)
                .arg(format!("--mechanism={}", user.mechanism))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .status()
                .await
                .expect("tansu user create runs");
            assert!(
                status.success(),
                "tansu user create {}: {status}",
                user.name
            );
        }
        first.kill().await.expect("tansu stops");
        // 2. Authentication on, on the same database.
        let mut child = broker(advertised_port.unwrap_or(port), true);
        wait_listening(addr, "tansu --authentication", &mut child).await;
        Self {
            addr,
            _child: child,
            _dir: dir,
        }
    }
}

/// How stunnel checks clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Server TLS only.
    None,
    /// Mutual TLS: a client certificate signed by the CA is required
    /// (`verify = 2`).
    Required,
}

/// stunnel, terminating TLS in front of a plaintext server.
pub struct Stunnel {
    /// Where it accepts TLS.
    pub addr: SocketAddr,
    /// Killed on drop.
    _child: Child,
    _dir: TempDir,
}

impl Stunnel {
    /// Accepts TLS on `port` with `cert` and `key`, and forwards to
    /// `backend`. With [`ClientAuth::Required`], client certificates must
    /// chain to `ca`.
    pub async fn start(
        port: u16,
        backend: SocketAddr,
        cert: &Path,
        key: &Path,
        ca: &Path,
        client_auth: ClientAuth,
    ) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut conf = format!(
            "foreground = yes\npid =\nsyslog = no\ndebug = 4\n[kafka]\naccept = {addr}\nconnect = {backend}\ncert = {}\nkey = {}\n",
            cert.display(),
            key.display()
        );
        if client_auth == ClientAuth::Required {
            conf.push_str(&format!("CAfile = {}\nverify = 2\n", ca.display()));
        }
        let path = dir.path().join("stunnel.conf");
        std::fs::write(&path, conf).expect("stunnel.conf written");
        let mut child = Command::new("stunnel")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("stunnel starts (Debian's stunnel4; scripts/test installs it)");
        wait_listening(addr, "stunnel", &mut child).await;
        Self {
            addr,
            _child: child,
            _dir: dir,
        }
    }
}

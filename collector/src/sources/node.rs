//! Node metrics: the node's own CPU, load, memory, swap, filesystems,
//! network and processes, under the names dcos-metrics served (its
//! `collectors/node`), every `node_poll_period`.
//!
//! They are read from `/proc` with the `procfs` crate (kept by the same
//! hands for years, used by Prometheus's Rust client; it parses exactly the
//! files read here and nothing is paged in that is not used), and each
//! mounted filesystem is measured with `statvfs` (rustix). The records go
//! the way the agent poller's do: through the pipeline into the buffer (to
//! Kafka on topic `node`, so `metrics-node`) and into the node store.
//!
//! One record carries the node-wide datapoints, one per filesystem has the
//! tag `path` (its mount point), one per network interface has the tag
//! `interface`. Pseudo filesystems are left out, as node exporters leave
//! them out: [`PSEUDO_FILESYSTEMS`].
//!
//! A poll runs on a blocking thread (a `statvfs` on a hung network mount
//! can block); the next one starts only once it has returned, so a hung
//! mount holds one thread, never more, and the node's other metrics simply
//! wait (logged once).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use procfs::prelude::*;
use procfs::{CpuTime, KernelStats, LoadAverage, Meminfo, Uptime};
use schema::{Datapoint, MetricList, Tag};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::pipeline::Pipeline;
use crate::route::Router;
use crate::shutdown::{Shutdown, Task};
use crate::stats::Input;

/// Every datapoint name, with its unit, as dcos-metrics named them.
pub const METRICS: &[(&str, &str)] = &[
    ("system.uptime", "count"),
    ("cpu.cores", "count"),
    ("cpu.total", "percent"),
    ("cpu.user", "percent"),
    ("cpu.system", "percent"),
    ("cpu.idle", "percent"),
    ("cpu.wait", "percent"),
    ("load.1min", "count"),
    ("load.5min", "count"),
    ("load.15min", "count"),
    ("filesystem.capacity.total", "bytes"),
    ("filesystem.capacity.used", "bytes"),
    ("filesystem.capacity.free", "bytes"),
    ("filesystem.inode.total", "count"),
    ("filesystem.inode.used", "count"),
    ("filesystem.inode.free", "count"),
    ("memory.total", "bytes"),
    ("memory.free", "bytes"),
    ("memory.buffers", "bytes"),
    ("memory.cached", "bytes"),
    ("swap.total", "bytes"),
    ("swap.free", "bytes"),
    ("swap.used", "bytes"),
    ("network.in", "bytes"),
    ("network.out", "bytes"),
    ("network.in.packets", "count"),
    ("network.out.packets", "count"),
    ("network.in.dropped", "count"),
    ("network.out.dropped", "count"),
    ("network.in.errors", "count"),
    ("network.out.errors", "count"),
    ("process.count", "count"),
];

/// The unit of a node metric, for the v0 API.
pub fn unit(name: &str) -> Option<&'static str> {
    METRICS.iter().find(|(n, _)| *n == name).map(|(_, u)| *u)
}

/// Filesystem types left out: kernel and virtual filesystems, and the
/// layered and in-memory ones of containers (as node_exporter's defaults
/// and gopsutil's physical partitions leave them out).
pub const PSEUDO_FILESYSTEMS: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "hugetlbfs",
    "mqueue",
    "nsfs",
    "overlay",
    "proc",
    "pstore",
    "ramfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "squashfs",
    "sysfs",
    "tmpfs",
    "tracefs",
];

/// Network filesystems, left out as dcos-metrics left them out (gopsutil's
/// physical partitions drop every `nodev` type): a hung server would hang
/// the poll, and their space is the server's, not the node's. Any FUSE
/// filesystem (`fuse`, `fuse.*`) is left out too.
pub const NETWORK_FILESYSTEMS: &[&str] = &[
    "9p",
    "afs",
    "ceph",
    "cifs",
    "glusterfs",
    "gpfs",
    "lustre",
    "ncpfs",
    "nfs",
    "nfs4",
    "smb3",
    "smbfs",
    "sshfs",
];

/// Whether a filesystem of `fs_type` is measured.
pub fn measured(fs_type: &str) -> bool {
    !PSEUDO_FILESYSTEMS.contains(&fs_type)
        && !NETWORK_FILESYSTEMS.contains(&fs_type)
        && fs_type != "fuse"
        && !fs_type.starts_with("fuse.")
}

/// The node source's settings.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// Poll period.
    pub period: Duration,
    /// Where procfs is mounted (`/proc`; a host's, mounted into a
    /// container, elsewhere).
    pub proc_root: PathBuf,
    /// The records' topic.
    pub topic: String,
}

impl From<&crate::config::Config> for NodeSettings {
    fn from(config: &crate::config::Config) -> Self {
        Self {
            period: Duration::from_secs(config.node_poll_period),
            proc_root: config.node_proc_path.clone(),
            topic: NODE_TOPIC.into(),
        }
    }
}

/// The topic of node metrics (Kafka: `metrics-node` with the default
/// prefix), as the agent's own metrics go to `agent`.
pub const NODE_TOPIC: &str = "node";

/// Why a poll could not read a file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct NodeError {
    /// The file.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

/// Reads the node's metrics; keeps the CPU times of the previous poll, for
/// the percentages.
#[derive(Debug)]
pub struct NodeReader {
    root: PathBuf,
    topic: String,
    previous: Option<CpuTime>,
}

fn pct(part: u64, all: u64) -> f64 {
    if all == 0 {
        return 0.0;
    }
    let value = part as f64 * 100.0 / all as f64;
    ((value * 100.0).round() / 100.0).max(0.0)
}

fn all_ticks(t: &CpuTime) -> u64 {
    t.user
        + t.nice
        + t.system
        + t.idle
        + t.iowait.unwrap_or(0)
        + t.irq.unwrap_or(0)
        + t.softirq.unwrap_or(0)
        + t.steal.unwrap_or(0)
}

impl NodeReader {
    /// A reader of the procfs at `root`, making records of `topic`.
    pub fn new(root: impl Into<PathBuf>, topic: impl Into<String>) -> Self {
        Self {
            root: root.into(),
            topic: topic.into(),
            previous: None,
        }
    }

    fn read<T: FromRead>(&self, file: &str) -> Result<T, NodeError> {
        let path = self.root.join(file);
        T::from_file(&path).map_err(|e| NodeError {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// One poll: the node-wide record, then one per filesystem and one per
    /// interface, stamped `now_ms`. What can't be read is left out and
    /// reported; the rest is returned.
    pub fn poll(&mut self, now_ms: i64) -> (Vec<MetricList>, Vec<NodeError>) {
        let mut errors = Vec::new();
        let mut node = Vec::new();
        let point = |points: &mut Vec<Datapoint>, name: &str, value: f64| {
            points.push(Datapoint::new(name, now_ms, value));
        };
        match self.read::<Uptime>("uptime") {
            Ok(uptime) => point(&mut node, "system.uptime", uptime.uptime.trunc()),
            Err(e) => errors.push(e),
        }
        let stat = self.root.join("stat");
        match KernelStats::from_file(&stat, procfs::current_system_info()) {
            Ok(stats) => {
                point(&mut node, "cpu.cores", stats.cpu_time.len() as f64);
                let now = stats.total;
                let delta = |f: fn(&CpuTime) -> u64| {
                    f(&now).saturating_sub(self.previous.as_ref().map_or(0, f))
                };
                let all = delta(all_ticks);
                let user = pct(delta(|t| t.user), all);
                let system = pct(delta(|t| t.system), all);
                point(
                    &mut node,
                    "cpu.total",
                    ((user + system) * 100.0).round() / 100.0,
                );
                point(&mut node, "cpu.user", user);
                point(&mut node, "cpu.system", system);
                point(&mut node, "cpu.idle", pct(delta(|t| t.idle), all));
                point(
                    &mut node,
                    "cpu.wait",
                    pct(delta(|t| t.iowait.unwrap_or(0)), all),
                );
                self.previous = Some(now);
            }
            Err(e) => errors.push(NodeError {
                path: stat.display().to_string(),
                message: e.to_string(),
            }),
        }
        match self.read::<LoadAverage>("loadavg") {
            Ok(load) => {
                // procfs reads them as f32; the file has two decimals.
                let two = |v: f32| (f64::from(v) * 100.0).round() / 100.0;
                point(&mut node, "load.1min", two(load.one));
                point(&mut node, "load.5min", two(load.five));
                point(&mut node, "load.15min", two(load.fifteen));
            }
            Err(e) => errors.push(e),
        }
        match self.read::<Meminfo>("meminfo") {
            Ok(mem) => {
                point(&mut node, "memory.total", mem.mem_total as f64);
                point(&mut node, "memory.free", mem.mem_free as f64);
                point(&mut node, "memory.buffers", mem.buffers as f64);
                point(&mut node, "memory.cached", mem.cached as f64);
                point(&mut node, "swap.total", mem.swap_total as f64);
                point(&mut node, "swap.free", mem.swap_free as f64);
                point(
                    &mut node,
                    "swap.used",
                    mem.swap_total.saturating_sub(mem.swap_free) as f64,
                );
            }
            Err(e) => errors.push(e),
        }
        match std::fs::read_dir(&self.root) {
            Ok(entries) => {
                let processes = entries
                    .filter_map(Result::ok)
                    .filter(|e| {
                        let name = e.file_name();
                        let name = name.to_string_lossy();
                        !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit())
                    })
                    .count();
                point(&mut node, "process.count", processes as f64);
            }
            Err(e) => errors.push(NodeError {
                path: self.root.display().to_string(),
                message: e.to_string(),
            }),
        }
        let mut lists = vec![self.list(Vec::new(), node)];
        match self.read::<procfs::process::MountInfos>("self/mountinfo") {
            Ok(mounts) => {
                // The last mount at a path is the one on top: its type
                // decides, and it is what statvfs measures.
                let mut top: Vec<procfs::process::MountInfo> = Vec::new();
                for mount in mounts.0 {
                    top.retain(|m| m.mount_point != mount.mount_point);
                    top.push(mount);
                }
                for mount in top.into_iter().filter(|m| measured(&m.fs_type)) {
                    match filesystem(&mount.mount_point, now_ms) {
                        Ok(points) => lists.push(self.list(
                            vec![Tag::new("path", mount.mount_point.to_string_lossy())],
                            points,
                        )),
                        Err(e) => errors.push(NodeError {
                            path: mount.mount_point.display().to_string(),
                            message: format!("statvfs: {e}"),
                        }),
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        match self.read::<procfs::net::InterfaceDeviceStatus>("net/dev") {
            Ok(devices) => {
                let mut devices: Vec<_> = devices.0.into_values().collect();
                devices.sort_by(|a, b| a.name.cmp(&b.name));
                for d in devices {
                    let points = [
                        ("network.in", d.recv_bytes),
                        ("network.out", d.sent_bytes),
                        ("network.in.packets", d.recv_packets),
                        ("network.out.packets", d.sent_packets),
                        ("network.in.dropped", d.recv_drop),
                        ("network.out.dropped", d.sent_drop),
                        ("network.in.errors", d.recv_errs),
                        ("network.out.errors", d.sent_errs),
                    ]
                    .into_iter()
                    .map(|(name, value)| Datapoint::new(name, now_ms, value as f64))
                    .collect();
                    lists.push(self.list(vec![Tag::new("interface", d.name)], points));
                }
            }
            Err(e) => errors.push(e),
        }
        lists.retain(|l| !l.datapoints.is_empty());
        (lists, errors)
    }

    fn list(&self, tags: Vec<Tag>, datapoints: Vec<Datapoint>) -> MetricList {
        MetricList {
            topic: self.topic.clone(),
            tags,
            datapoints,
        }
    }
}

/// A filesystem's capacity and inodes, as gopsutil's `disk.Usage` gave them:
/// free is what an unprivileged user may still use.
fn filesystem(mount_point: &Path, now_ms: i64) -> std::io::Result<Vec<Datapoint>> {
    let fs = rustix::fs::statvfs(mount_point)?;
    let size = fs.f_frsize.max(1);
    let total = fs.f_blocks.saturating_mul(size);
    let free = fs.f_bavail.saturating_mul(size);
    let used = fs.f_blocks.saturating_sub(fs.f_bfree).saturating_mul(size);
    Ok([
        ("filesystem.capacity.total", total),
        ("filesystem.capacity.used", used),
        ("filesystem.capacity.free", free),
        ("filesystem.inode.total", fs.f_files),
        (
            "filesystem.inode.used",
            fs.f_files.saturating_sub(fs.f_ffree),
        ),
        ("filesystem.inode.free", fs.f_ffree),
    ]
    .into_iter()
    .map(|(name, value)| Datapoint::new(name, now_ms, value as f64))
    .collect())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// How long records already polled may still wait for room once shutdown
/// has begun: the TCP inputs' drain time.
const DRAIN: Duration = Duration::from_secs(1);

/// How long the first poll waits for the agent's `/state`, at most.
const FIRST_STATE_WAIT: Duration = Duration::from_secs(10);

/// The node source's task.
pub struct NodeSource {
    /// Settings.
    pub settings: NodeSettings,
    /// The way into the buffer and the store.
    pub pipeline: std::sync::Arc<Pipeline>,
}

impl NodeSource {
    /// Spawns the source; it stops when the shutdown begins.
    pub fn spawn(self, shutdown: &Shutdown) -> Task {
        Task::spawn("node metrics", self.run(shutdown.begun().clone()))
    }

    async fn run(self, shutdown: CancellationToken) {
        info!(period = ?self.settings.period, proc = %self.settings.proc_root.display(), "Collecting node metrics.");
        let fresh =
            || NodeReader::new(self.settings.proc_root.clone(), self.settings.topic.clone());
        let mut reader = Some(fresh());
        let mut router = Router::default();
        let mut tick = tokio::time::interval(self.settings.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A poll that has not returned within its period (a hung mount):
        // the next ones wait for it, on no other thread.
        let mut running: Option<tokio::task::JoinHandle<Polled>> = None;
        let mut reported: std::collections::HashSet<String> = std::collections::HashSet::new();
        // With the agent polled, the first poll waits a while for its
        // `/state`, so that the node's series carry the agent's id from the
        // start: series recorded before it are forgotten once it answers,
        // and the node's would then be missing for a whole period.
        let mut enrichment = self.pipeline.enrichment.clone();
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tokio::time::timeout(
                FIRST_STATE_WAIT,
                enrichment.wait_for(|e| !e.enabled || e.agent_id.is_some()),
            ) => {}
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut poll = match (running.take(), reader.take()) {
                (Some(poll), _) => poll,
                (None, Some(mut polling)) => tokio::task::spawn_blocking(move || {
                    let result = polling.poll(now_ms());
                    (polling, result)
                }),
                (None, None) => {
                    reader = Some(fresh());
                    continue;
                }
            };
            let joined = tokio::select! {
                () = shutdown.cancelled() => return,
                joined = &mut poll => joined,
                () = tokio::time::sleep(self.settings.period) => {
                    crate::telemetry::throttled_warn("node poll stuck", |repeats| {
                        warn!(
                            repeats,
                            "A node poll has not returned within its period (a hung mount?); the node's metrics wait for it."
                        );
                    });
                    running = Some(poll);
                    continue;
                }
            };
            let (back, (lists, errors)) = match joined {
                Ok(done) => done,
                Err(error) => {
                    tracing::error!(%error, "A node poll failed (a bug); polling on with a new reader.");
                    reader = Some(fresh());
                    continue;
                }
            };
            reader = Some(back);
            if reported.len() > 256 {
                reported.clear();
            }
            for error in errors {
                if reported.insert(error.path.clone()) {
                    warn!(%error, "A node metric could not be read; left out until it can.");
                }
            }
            let give_up = async {
                shutdown.cancelled().await;
                tokio::time::sleep(DRAIN).await;
            };
            if !lists.is_empty()
                && !self
                    .pipeline
                    .push_owned(&mut router, Input::Node, lists, give_up)
                    .await
            {
                return;
            }
        }
    }
}

/// A poll's reader given back, with what it read.
type Polled = (NodeReader, (Vec<MetricList>, Vec<NodeError>));

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: &str| {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, body).unwrap();
        };
        write("uptime", "12345.67 20000.00\n");
        write(
            "stat",
            "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\ncpu1 50 0 25 400 25 0 0 0 0 0\nctxt 1\nbtime 1\nprocesses 10\nprocs_running 1\nprocs_blocked 0\n",
        );
        write("loadavg", "0.50 0.25 0.10 1/100 4242\n");
        write(
            "meminfo",
            "MemTotal: 1000 kB\nMemFree: 400 kB\nBuffers: 10 kB\nCached: 100 kB\nSwapCached: 0 kB\nActive: 1 kB\nInactive: 1 kB\nSwapTotal: 200 kB\nSwapFree: 150 kB\nDirty: 0 kB\nWriteback: 0 kB\nMapped: 0 kB\nSlab: 0 kB\nCommitLimit: 0 kB\nCommitted_AS: 0 kB\nVmallocTotal: 0 kB\nVmallocUsed: 0 kB\nVmallocChunk: 0 kB\n",
        );
        write(
            "net/dev",
            "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo: 1000 10 1 2 0 0 0 0 2000 20 3 4 0 0 0 0\n",
        );
        write(
            "self/mountinfo",
            "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n23 22 0:5 / /proc rw - proc proc rw\n24 22 0:6 / /tmp rw - tmpfs tmpfs rw\n25 22 0:7 / /mnt rw - nfs4 server:/x rw\n26 22 0:8 / /fuse rw - fuse.sshfs h:/ rw\n27 22 8:1 / /data rw - ext4 /dev/sda1 rw\n28 27 0:9 / /data rw - tmpfs tmpfs rw\n",
        );
        for pid in ["1", "42", "self-not-a-pid"] {
            std::fs::create_dir_all(dir.path().join(pid)).unwrap();
        }
        dir
    }

    fn values(
        lists: &[MetricList],
        tag: Option<(&str, &str)>,
    ) -> std::collections::BTreeMap<String, f64> {
        lists
            .iter()
            .filter(|l| match tag {
                None => l.tags.is_empty(),
                Some((k, v)) => l.tags.iter().any(|t| t.key == k && t.value == v),
            })
            .flat_map(|l| l.datapoints.iter().map(|d| (d.name.clone(), d.value)))
            .collect()
    }

    #[test]
    fn a_poll_gives_the_dcos_metrics_names_from_procfs() {
        let proc = fake_proc();
        let mut reader = NodeReader::new(proc.path(), NODE_TOPIC);
        let (lists, errors) = reader.poll(7);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(lists.iter().all(|l| l.topic == "node"));
        assert!(
            lists
                .iter()
                .flat_map(|l| &l.datapoints)
                .all(|d| d.time_ms == 7)
        );
        let node = values(&lists, None);
        assert_eq!(node["system.uptime"], 12345.0);
        assert_eq!(node["cpu.cores"], 2.0);
        // Since boot on the first poll: 100 user, 50 system, 800 idle, 50
        // iowait of 1,000 ticks.
        assert_eq!(node["cpu.user"], 10.0);
        assert_eq!(node["cpu.system"], 5.0);
        assert_eq!(node["cpu.total"], 15.0);
        assert_eq!(node["cpu.idle"], 80.0);
        assert_eq!(node["cpu.wait"], 5.0);
        assert_eq!(node["load.1min"], 0.5);
        assert_eq!(node["load.15min"], 0.1);
        assert_eq!(node["memory.total"], 1000.0 * 1024.0);
        assert_eq!(node["memory.free"], 400.0 * 1024.0);
        assert_eq!(node["memory.buffers"], 10.0 * 1024.0);
        assert_eq!(node["memory.cached"], 100.0 * 1024.0);
        assert_eq!(node["swap.used"], 50.0 * 1024.0);
        assert_eq!(node["process.count"], 2.0);
        let lo = values(&lists, Some(("interface", "lo")));
        assert_eq!(lo["network.in"], 1000.0);
        assert_eq!(lo["network.out"], 2000.0);
        assert_eq!(lo["network.in.errors"], 1.0);
        assert_eq!(lo["network.out.dropped"], 4.0);
        // Only the ext4 root: /proc and /tmp are pseudo filesystems, /mnt
        // a network one, /fuse a FUSE one, and /data has a tmpfs on top.
        let paths: Vec<&str> = lists
            .iter()
            .flat_map(|l| &l.tags)
            .filter(|t| t.key == "path")
            .map(|t| t.value.as_str())
            .collect();
        assert_eq!(paths, ["/"]);
        let root = values(&lists, Some(("path", "/")));
        assert!(root["filesystem.capacity.total"] > 0.0);
        let names: std::collections::BTreeSet<&str> = lists
            .iter()
            .flat_map(|l| l.datapoints.iter().map(|d| d.name.as_str()))
            .collect();
        let declared: std::collections::BTreeSet<&str> = METRICS.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, declared, "every declared name, and no other");
    }

    #[test]
    fn the_percentages_are_of_the_time_since_the_last_poll() {
        let proc = fake_proc();
        let mut reader = NodeReader::new(proc.path(), NODE_TOPIC);
        reader.poll(1);
        std::fs::write(
            proc.path().join("stat"),
            "cpu  200 0 50 850 100 0 0 0 0 0\ncpu0 100 0 25 425 50 0 0 0 0 0\ncpu1 100 0 25 425 50 0 0 0 0 0\nctxt 1\nbtime 1\nprocesses 10\n",
        )
        .unwrap();
        let (lists, _) = reader.poll(2);
        let node = values(&lists, None);
        // 200 ticks since: 100 user, 50 idle, 50 iowait.
        assert_eq!(node["cpu.user"], 50.0);
        assert_eq!(node["cpu.system"], 0.0);
        assert_eq!(node["cpu.idle"], 25.0);
        assert_eq!(node["cpu.wait"], 25.0);
    }

    /// A poll that hangs (here on a FIFO, as on a hung mount) holds its one
    /// thread: nothing is read meanwhile, the polls after wait for it, it
    /// is taken as soon as it returns, and shutdown does not wait for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_poll_holds_one_thread_and_shutdown_does_not_wait_for_it() {
        use std::sync::Arc;
        let proc = fake_proc();
        let fifo = proc.path().join("uptime");
        std::fs::remove_file(&fifo).unwrap();
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let stats = Arc::new(crate::stats::Stats::default());
        let config = crate::config::Config::default();
        let buffer = Arc::new(crate::buffer::Buffer::new(
            1 << 20,
            crate::config::FullPolicy::Block,
            stats.clone(),
        ));
        let pipeline = Arc::new(Pipeline {
            stats: stats.clone(),
            buffer: buffer.clone(),
            routing: tokio::sync::watch::channel(Arc::new(crate::route::Routing::from_config(
                &config,
            )))
            .1,
            enrichment: tokio::sync::watch::channel(Arc::new(crate::enrich::Enrichment::default()))
                .1,
            refresh: Arc::new(tokio::sync::Notify::new()),
            store: None,
        });
        let source = NodeSource {
            settings: NodeSettings {
                period: Duration::from_millis(100),
                proc_root: proc.path().to_owned(),
                topic: NODE_TOPIC.into(),
            },
            pipeline,
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(shutdown.clone()));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(
            stats.received(Input::Node).get().records,
            0,
            "nothing while the poll hangs"
        );
        let writer = fifo.clone();
        std::thread::spawn(move || std::fs::write(writer, "5.0 1.0\n"));
        let start = std::time::Instant::now();
        while stats.received(Input::Node).get().records == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the poll taken once it returned"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The next poll hangs on the FIFO again: shutdown does not wait.
        tokio::time::sleep(Duration::from_millis(300)).await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the source stops at once")
            .unwrap();
        // Let the blocked poll go, so that the runtime's blocking pool ends
        // (the runtime's drop waits for it). The FIFO must outlive the
        // writer's open: the thread owns the directory, removed once the
        // write is done (removed at the end of this test instead, a writer
        // that came late found no FIFO, the poll stayed blocked in its
        // open, and the test hung in the runtime's drop).
        std::thread::spawn(move || {
            let _ = std::fs::write(fifo, "");
            drop(proc);
        });
    }

    #[test]
    fn what_cannot_be_read_is_left_out_and_named() {
        let proc = fake_proc();
        std::fs::write(proc.path().join("meminfo"), "garbage").unwrap();
        std::fs::remove_file(proc.path().join("loadavg")).unwrap();
        let mut reader = NodeReader::new(proc.path(), NODE_TOPIC);
        let (lists, errors) = reader.poll(1);
        let node = values(&lists, None);
        assert!(!node.contains_key("memory.total"));
        assert!(!node.contains_key("load.1min"));
        assert_eq!(node["system.uptime"], 12345.0);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().any(|e| e.path.ends_with("loadavg")));
    }
}

//! CPU time per thread from `/proc/PID/task/*`, in nanoseconds
//! (`schedstat`), grouped by thread name: librdkafka's threads (`rdk:*`)
//! against the rest, which are the process's own.

use std::collections::HashMap;

use anyhow::Context as _;

use serde::Serialize;

/// The CPU time of each live thread of a process at one moment.
#[derive(Debug, Clone, Default)]
pub struct Threads(HashMap<u32, (String, u64)>);

/// Reads every thread of `pid`. A thread that has exited is not there: a
/// window's figures count the threads alive at its end. An error when the
/// process is gone or the kernel keeps no `schedstat` (a figure of 0 would
/// pass every goal).
pub fn sample(pid: u32) -> anyhow::Result<Threads> {
    let mut threads = HashMap::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("reading the threads of process {pid}"))?;
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let path = task.path();
        // A thread that ends meanwhile has no files left: skipped.
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("schedstat")),
        ) else {
            continue;
        };
        let ns = stat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("{}/schedstat: {stat:?}", path.display()))?;
        threads.insert(tid, (name.trim().to_owned(), ns));
    }
    anyhow::ensure!(
        !threads.is_empty(),
        "no thread of process {pid} has a readable schedstat (CONFIG_SCHEDSTATS)"
    );
    Ok(Threads(threads))
}

/// The id of the calling thread.
pub fn current_tid() -> Option<u32> {
    std::fs::read_link("/proc/thread-self")
        .ok()?
        .file_name()?
        .to_str()?
        .parse()
        .ok()
}

impl Threads {
    /// The threads' ids.
    pub fn tids(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.keys().copied()
    }

    /// CPU time per thread since `before` (a thread born since counts in
    /// full), keeping only the threads `keep` accepts.
    pub fn since(&self, before: &Threads, keep: impl Fn(u32) -> bool) -> CpuSplit {
        let mut split = CpuSplit::default();
        for (&tid, (name, ns)) in &self.0 {
            if !keep(tid) {
                continue;
            }
            let earlier = before.0.get(&tid).map_or(0, |(_, ns)| *ns);
            let spent = ns.saturating_sub(earlier);
            if name.starts_with("rdk:") {
                split.librdkafka_ns += spent;
            } else {
                split.own_ns += spent;
            }
            *split.by_name.entry(name.clone()).or_default() += spent;
        }
        split
    }
}

/// CPU time over a window, nanoseconds, split by thread group.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuSplit {
    /// The process's own threads: tokio's workers and blocking pool, the
    /// main thread, the producer's event thread.
    pub own_ns: u64,
    /// librdkafka's threads (`rdk:main`, `rdk:broker*`, …).
    pub librdkafka_ns: u64,
    /// Per thread name (threads of one name summed).
    pub by_name: std::collections::BTreeMap<String, u64>,
}

impl CpuSplit {
    /// Every thread.
    pub fn total_ns(&self) -> u64 {
        self.own_ns + self.librdkafka_ns
    }
}

/// Percent of one core that `ns` of CPU over `seconds` is.
pub fn percent(ns: u64, seconds: f64) -> f64 {
    ns as f64 / 1e7 / seconds.max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_of_this_process_is_seen_by_name() {
        let before = sample(std::process::id()).unwrap();
        let worker = std::thread::Builder::new()
            .name("rdk:spinner".into())
            .spawn(|| {
                let end = std::time::Instant::now() + std::time::Duration::from_millis(50);
                let mut n = 0u64;
                while std::time::Instant::now() < end {
                    n = n.wrapping_add(1);
                }
                let after = sample(std::process::id()).unwrap();
                (n, after)
            })
            .unwrap();
        let (_, after) = worker.join().unwrap();
        let split = after.since(&before, |_| true);
        assert!(
            split.by_name.get("rdk:spinner").copied().unwrap_or(0) >= 10_000_000,
            "{split:?}"
        );
        assert!(split.librdkafka_ns >= split.by_name["rdk:spinner"]);
        assert!(current_tid().is_some());
    }
}

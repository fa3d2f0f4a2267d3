//! The disk spool's own figures, and the choice of format: our segment
//! files against an embedded store from crates.io (redb) on the same
//! records, in one run. Run with `cargo bench -p collector --bench spool`
//! (`SPOOL_BENCH_MIB` sets how much is written; 1024 by default).
//!
//! - append: chunks of 64 records of 1 KiB (one input block), synced every
//!   100 ms (`spool_fsync = interval`), or each chunk (`always`);
//! - replay: a start on the full spool (its scan), then every record read
//!   back and acknowledged, so that every segment is deleted;
//! - redb: the same chunks, one write transaction each without sync, a
//!   synced commit every 100 ms; then read back in key order and deleted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: failing loudly is the point

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use collector::route::Routed;
use collector::spool::{FsyncMode, Spool, SpoolSettings};
use collector::stats::Stats;

const RECORD: usize = 1024;
const PER_CHUNK: usize = 64;
const MIB: f64 = 1024.0 * 1024.0;

fn chunk(n: usize) -> Vec<Routed> {
    (0..PER_CHUNK)
        .map(|i| Routed {
            topic: "metrics-agent".into(),
            key: None,
            data: Bytes::from(vec![(n + i) as u8; RECORD]),
            datapoints: 30,
            share: 0,
            seq: 0,
        })
        .collect()
}

fn settings(dir: &std::path::Path, fsync: FsyncMode, bytes: u64) -> SpoolSettings {
    SpoolSettings {
        dir: dir.to_owned(),
        max_bytes: bytes * 2,
        fsync,
        fsync_interval: Duration::from_millis(100),
        max_record_bytes: 1_000_000,
        memory_bytes: 64 << 20,
        retry: Duration::from_secs(2),
        parked_max_bytes: 0,
    }
}

/// Appends `bytes` of records; returns MiB/s.
fn append(spool: &Spool, bytes: u64) -> f64 {
    let chunks = (bytes as usize) / (RECORD * PER_CHUNK);
    let data: Vec<Vec<Routed>> = (0..16).map(chunk).collect();
    let start = Instant::now();
    let mut last_sync = Instant::now();
    for n in 0..chunks {
        spool.append(&data[n % data.len()]).expect("append");
        if last_sync.elapsed() >= Duration::from_millis(100) {
            spool.sync();
            last_sync = Instant::now();
        }
    }
    spool.sync();
    (chunks * RECORD * PER_CHUNK) as f64 / MIB / start.elapsed().as_secs_f64()
}

/// Reads everything back and acknowledges it; returns (records, seconds).
fn drain(spool: &Spool) -> (u64, f64) {
    let start = Instant::now();
    let mut records = 0;
    while let Some(read) = spool.read() {
        records += read.items.len() as u64;
        let seqs: Vec<u64> = read.items.iter().map(|r| r.seq).collect();
        spool.ack("metrics", &seqs);
    }
    (records, start.elapsed().as_secs_f64())
}

fn spool_runs(root: &std::path::Path, mib: u64) {
    let bytes = mib << 20;
    let dir = root.join("interval");
    let spool = Spool::open(
        settings(&dir, FsyncMode::Interval, bytes),
        Arc::new(Stats::default()),
    );
    let rate = append(&spool, bytes);
    drop(spool);
    println!("spool append, fsync every 100 ms: {rate:.0} MiB/s ({mib} MiB)");
    // A replay after a reboot reads from the disk, not the page cache: drop
    // it when allowed (root), and say which one was measured.
    let cache = match std::fs::write("/proc/sys/vm/drop_caches", "3") {
        Ok(()) => "page cache dropped: from the disk",
        Err(_) => "page cache kept (not root): from memory",
    };
    let start = Instant::now();
    let stats = Arc::new(Stats::default());
    let spool = Spool::open(settings(&dir, FsyncMode::Interval, bytes), stats.clone());
    let scanned = start.elapsed().as_secs_f64();
    let (records, read) = drain(&spool);
    println!(
        "spool replay of {mib} MiB ({cache}): scan {scanned:.2} s, read and acknowledge {read:.2} s, {records} records, {:.0} MiB/s in all; segments left {}",
        mib as f64 / (scanned + read),
        std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "seg"))
            .count()
    );
    let always_mib = (mib / 16).max(16);
    let dir = root.join("always");
    let spool = Spool::open(
        settings(&dir, FsyncMode::Always, always_mib << 20),
        Arc::new(Stats::default()),
    );
    let rate = append(&spool, always_mib << 20);
    println!("spool append, fsync each chunk (always): {rate:.0} MiB/s ({always_mib} MiB)");
}

fn redb_run(root: &std::path::Path, mib: u64) {
    use redb::{Database, Durability, TableDefinition};
    const TABLE: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("spool");
    let path = root.join("redb.db");
    let db = Database::create(&path).expect("redb");
    let chunks = ((mib << 20) as usize) / (RECORD * PER_CHUNK);
    let data: Vec<Vec<Routed>> = (0..16).map(chunk).collect();
    let start = Instant::now();
    let mut last_sync = Instant::now();
    let mut seq = 0u64;
    for n in 0..chunks {
        let mut tx = db.begin_write().expect("begin");
        let sync = last_sync.elapsed() >= Duration::from_millis(100);
        tx.set_durability(if sync {
            Durability::Immediate
        } else {
            Durability::None
        });
        {
            let mut table = tx.open_table(TABLE).expect("table");
            for record in &data[n % data.len()] {
                seq += 1;
                table.insert(seq, &record.data[..]).expect("insert");
            }
        }
        tx.commit().expect("commit");
        if sync {
            last_sync = Instant::now();
        }
    }
    let rate = (chunks * RECORD * PER_CHUNK) as f64 / MIB / start.elapsed().as_secs_f64();
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    println!(
        "redb insert, synced commit every 100 ms: {rate:.0} MiB/s ({mib} MiB; file {:.0} MiB)",
        size as f64 / MIB
    );
    let start = Instant::now();
    let mut read = 0u64;
    let mut from = 1u64;
    while from <= seq {
        let to = (from + 1024).min(seq + 1);
        {
            let tx = db.begin_read().expect("read");
            let table = tx.open_table(TABLE).expect("table");
            for entry in table.range(from..to).expect("range") {
                let (_, value) = entry.expect("entry");
                read += value.value().len() as u64;
            }
        }
        let mut tx = db.begin_write().expect("begin");
        tx.set_durability(Durability::None);
        {
            let mut table = tx.open_table(TABLE).expect("table");
            for key in from..to {
                table.remove(key).expect("remove");
            }
        }
        tx.commit().expect("commit");
        from = to;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "redb read back and delete {mib} MiB: {secs:.2} s, {:.0} MiB/s; file after {:.0} MiB",
        read as f64 / MIB / secs,
        std::fs::metadata(&path).map_or(0, |m| m.len()) as f64 / MIB
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("spool: bench");
        return;
    }
    let mib: u64 = std::env::var("SPOOL_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("spool-bench");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    spool_runs(&root, mib);
    redb_run(&root, (mib / 4).max(16));
    let _ = std::fs::remove_dir_all(&root);
}

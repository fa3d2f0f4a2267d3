//! glibc malloc's thresholds (`collector::resident::keep_message_memory`),
//! live. Its own test binary, holding this one test: its allocator is
//! glibc's `malloc` (the collector's mimalloc is its binary's own), as
//! librdkafka's is, and the thresholds, once set, stay set for the process.

use collector::resident::{MallocThresholds, keep_message_memory, thresholds_set_in};

/// A batch's size: `kafka_produce_kbytes`' default.
const BATCH: usize = 512 * 1024;

/// Minor page faults of this process so far.
fn minor_faults() -> u64 {
    procfs::process::Process::myself()
        .and_then(|me| me.stat())
        .expect("/proc/self/stat")
        .minflt
}

/// Faults taken by rounds of eight batches in flight at once (4 MiB, as
/// librdkafka holds messages until they are delivered), each written
/// whole, then all freed.
fn faults_for_rounds(rounds: usize) -> u64 {
    let before = minor_faults();
    for _ in 0..rounds {
        let batches: Vec<Vec<u8>> = (0..8).map(|_| vec![1u8; BATCH]).collect();
        std::hint::black_box(&batches);
    }
    minor_faults() - before
}

/// With glibc's defaults, the freed batches at an arena's top pass its
/// trim threshold and go back to the kernel, so every round faults its
/// 4 MiB in again (1,024 pages); with the collector's thresholds they are
/// kept and reused.
#[test]
fn freed_batches_are_reused_not_faulted_in_again() {
    let env = std::env::vars_os().map(|(k, v)| {
        (
            k.to_string_lossy().into_owned(),
            v.to_string_lossy().into_owned(),
        )
    });
    if thresholds_set_in(env) {
        eprintln!("not checked: this environment sets glibc malloc's thresholds itself");
        assert_eq!(keep_message_memory(), MallocThresholds::Operators);
        return;
    }
    let rounds = 25;
    let defaults = faults_for_rounds(rounds);
    assert_eq!(keep_message_memory(), MallocThresholds::Set);
    let kept = faults_for_rounds(rounds);
    eprintln!("minor faults for {rounds} rounds: {defaults} with glibc's defaults, {kept} kept");
    // Every round but the first faults its pages in again with the
    // defaults.
    assert!(defaults >= (rounds as u64 - 1) * 1_000, "{defaults}");
    // At most the first round's pages, and the vector of batches.
    assert!(kept < 2 * 1_024 + 200, "{kept}");
}

//! glibc malloc's thresholds (`collector::resident::keep_message_memory`),
//! live. A test binary of its own, without libtest's harness: the
//! thresholds are set only while the process has one thread (glibc's
//! `mallopt` is not thread-safe), and libtest runs each test on a thread
//! of its own. Its allocator is glibc's `malloc` (the collector's mimalloc
//! is its binary's own), as librdkafka's is.

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

/// Whether the environment changes glibc malloc in a way this test's
/// counts do not hold for: the thresholds themselves (the collector then
/// leaves them), or the padding and huge pages of its heaps.
fn malloc_tuned_here(env: &[(String, String)]) -> bool {
    thresholds_set_in(env.iter().cloned())
        || env.iter().any(|(key, value)| {
            key == "MALLOC_TOP_PAD_"
                || (key == "GLIBC_TUNABLES"
                    && (value.contains("glibc.malloc.top_pad=")
                        || value.contains("glibc.malloc.hugetlb=")))
        })
}

/// With glibc's defaults, the freed batches at an arena's top pass its
/// trim threshold and go back to the kernel, so every round faults its
/// 4 MiB in again (1,024 pages); with the collector's thresholds they are
/// kept and reused. Returns whether it was checked.
fn freed_batches_are_reused_not_faulted_in_again() -> bool {
    // As the collector does: a 2 MiB huge page would take one fault for
    // 512 pages, and make the counts below the host's.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let env: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    if malloc_tuned_here(&env) {
        eprintln!("not checked: this environment tunes glibc malloc itself");
        return false;
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
    true
}

/// Another thread running: the thresholds are left alone.
fn not_set_beside_another_thread() {
    let (stop, wait) = std::sync::mpsc::channel::<()>();
    let other = std::thread::spawn(move || wait.recv());
    assert_eq!(keep_message_memory(), MallocThresholds::NotAlone);
    drop(stop);
    let _ = other.join();
}

fn main() {
    let (mut passed, mut skipped) = (0, 0);
    let mut report = |name: &str, checked: bool| {
        if checked {
            passed += 1;
            println!("test {name} ... ok");
        } else {
            skipped += 1;
            println!("test {name} ... ignored, the environment tunes glibc malloc");
        }
    };
    // Alone first: the thresholds, once set, stay set.
    report(
        "freed_batches_are_reused_not_faulted_in_again",
        freed_batches_are_reused_not_faulted_in_again(),
    );
    let env = std::env::vars_os().map(|(k, v)| {
        (
            k.to_string_lossy().into_owned(),
            v.to_string_lossy().into_owned(),
        )
    });
    let operators = thresholds_set_in(env);
    if !operators {
        not_set_beside_another_thread();
    }
    report("not_set_beside_another_thread", !operators);
    println!(
        "\ntest result: ok. {passed} passed; 0 failed; {skipped} ignored; 0 measured; 0 filtered out\n"
    );
}

//! The collector's own code, given back to the kernel once it has started.
//!
//! A process's resident set counts every page of its executable that it
//! has touched, and the kernel maps a page's neighbours with it (up to
//! 64 KiB around each fault), so the code that ran only to start (option
//! parsing, validation, the clients' setup) stays resident for the
//! process's whole life: about 6 MiB of the collector's idle RSS. Once the
//! collector has been up [`SETTLE`], [`page_out_own_code`] advises the
//! kernel (`MADV_PAGEOUT`, Linux 5.4) to reclaim the read-only mappings of
//! the collector's own executable. The advice changes no content: a page
//! reclaimed leaves the page cache, and is read again from the file (a
//! major fault) when its code next runs, so the code the collector runs
//! while idle is resident again within its first turns.
//!
//! Before that it advises `MADV_RANDOM` on the same mappings: a fault then
//! reads its one page, not the 128 KiB of read-ahead around it, and the
//! 64 KiB mapped around a fault can only be pages the page cache still
//! holds. So what comes back is the code that runs, page by page: 0.6 MiB
//! less idle RSS than with read-ahead, for some 40 more major faults of a
//! page each on the first busy seconds (BENCHMARKS.md section 1).
//!
//! The kernel reclaims a file's pages only for a process that owns the
//! file, may write it, or holds `CAP_FOWNER`, and leaves pages that
//! another process maps too (two collectors run from one file keep it
//! resident), and pages not yet written back (so the file is synced
//! first). So it works as root (the Docker images) and
//! where the binary belongs to the collector's user (a Marathon app's
//! sandbox), and does nothing under the systemd unit's `DynamicUser=` with
//! a binary owned by root: the advice is taken and nothing is reclaimed.
//! What the executable's pages took before and after is logged, so each
//! node says which case it is.
//!
//! The other side of residency is memory given back too eagerly. librdkafka
//! allocates each message's copy with glibc's `malloc`. A batch (flushed
//! at `kafka_produce_kbytes`, 512 KiB, and never over
//! `kafka_max_message_bytes`, 1,000,000 bytes) is above glibc's first
//! `mmap` threshold (128 KiB), and freed memory at the top of an arena is
//! handed back to the kernel once it passes the trim threshold, so at
//! saturation every message's copy faulted in and zeroed fresh pages: a
//! sixth of the collector's own CPU per datapoint (BENCHMARKS.md section
//! 1). [`keep_message_memory`] sets both thresholds (`mallopt`) so that a
//! freed message's memory is reused: up to [`TRIM_THRESHOLD`] free at the
//! top of each glibc arena is kept. An operator's own thresholds, in the
//! environment, win.

use std::io;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use procfs::process::{MMPermissions, MMapPath, MemoryMap, MemoryMaps, Process};

/// How long after the start the collector's code is paged out: by then its
/// start, and the first connection to the brokers, have run.
pub const SETTLE: Duration = Duration::from_secs(10);

/// What [`page_out_own_code`] did: the mappings advised, and the pages
/// of the executable resident before and after (`Rss` in
/// `/proc/self/smaps`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PagedOut {
    pub advised: Vec<Range<usize>>,
    pub resident_before_kib: u64,
    pub resident_after_kib: u64,
}

/// The mappings of the executable `exe` in `maps`.
fn of<'a>(maps: &'a MemoryMaps, exe: &'a Path) -> impl Iterator<Item = &'a MemoryMap> {
    maps.iter()
        .filter(move |map| matches!(&map.pathname, MMapPath::Path(path) if path == exe))
}

/// The read-only mappings of the executable `exe` in `maps` (as
/// `/proc/self/maps` or `smaps` lists them): its code and read-only data.
/// Writable ones (its data, and what relocation made private) are left out.
pub fn own_code(maps: &MemoryMaps, exe: &Path) -> Vec<Range<usize>> {
    of(maps, exe)
        .filter(|map| !map.perms.contains(MMPermissions::WRITE))
        .filter_map(|map| {
            let (start, end) = map.address;
            let range = usize::try_from(start).ok()?..usize::try_from(end).ok()?;
            (range.start < range.end).then_some(range)
        })
        .collect()
}

/// The pages of `exe`'s mappings resident, in KiB, as `smaps` gives them:
/// the sum of their `Rss` lines.
pub fn resident_kib(smaps: &MemoryMaps, exe: &Path) -> u64 {
    of(smaps, exe)
        .filter_map(|map| map.extension.map.get("Rss"))
        .sum::<u64>()
        / 1024
}

/// Advises the kernel to reclaim the pages of the running executable's
/// read-only mappings. An error where the kernel lacks the advice (before
/// Linux 5.4), `/proc` is not mounted, or a seccomp filter refuses it; the
/// mapping refused keeps its read-ahead then, and the ones after it are
/// left alone. It blocks (a write-back, a reclaim): run it off the
/// runtime's workers.
pub fn page_out_own_code() -> io::Result<PagedOut> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    // A binary written moments before its start (fetched into a Marathon
    // sandbox, copied into place) is still dirty in the page cache, and
    // the kernel reclaims no dirty page on advice: write it back first (a
    // read-only descriptor may). Should that fail, its pages stay, as the
    // figures logged show.
    let _ = std::fs::File::open("/proc/self/exe").and_then(|file| file.sync_data());
    let me = Process::myself().map_err(io::Error::other)?;
    let before = me.smaps().map_err(io::Error::other)?;
    let mut paged = PagedOut {
        resident_before_kib: resident_kib(&before, &exe),
        ..PagedOut::default()
    };
    let ranges = own_code(&before, &exe);
    drop(before);
    for range in ranges {
        advise_page_out(range.clone())?;
        paged.advised.push(range);
    }
    paged.resident_after_kib = resident_kib(&me.smaps().map_err(io::Error::other)?, &exe);
    Ok(paged)
}

/// Waits [`SETTLE`], then pages the collector's code out, once; what it
/// did is logged (at debug: nothing here needs an operator).
pub async fn page_out_after_settle() {
    tokio::time::sleep(SETTLE).await;
    let paged = tokio::task::spawn_blocking(page_out_own_code)
        .await
        .unwrap_or_else(|error| Err(io::Error::other(error)));
    match paged {
        Ok(paged) => tracing::debug!(
            mappings = paged.advised.len(),
            resident_before_kib = paged.resident_before_kib,
            resident_after_kib = paged.resident_after_kib,
            "The collector's own code was advised out after its start (the kernel reclaims it only where the collector owns its executable, may write it, or has CAP_FOWNER)."
        ),
        Err(error) => tracing::debug!(%error, "The collector's own code could not be paged out."),
    }
}

/// glibc's `mmap` threshold set: messages up to 1 MiB (a batch is at most
/// `kafka_max_message_bytes`, 1,000,000 bytes by default) come from an
/// arena, whose memory is reused, not from a mapping of their own,
/// unmapped when freed. Larger messages are mapped each time, as before.
pub const MMAP_THRESHOLD: usize = 1 << 20;

/// glibc's trim threshold set: up to 8 MiB free at the top of each arena
/// is kept for the next messages, not handed back and faulted in again.
pub const TRIM_THRESHOLD: usize = 8 << 20;

/// Whether the environment sets glibc malloc's `mmap` or trim threshold
/// (`GLIBC_TUNABLES`, or the older `MALLOC_*_THRESHOLD_`): the operator's
/// choice is left as it is.
pub fn thresholds_set_in(env: impl IntoIterator<Item = (String, String)>) -> bool {
    env.into_iter().any(|(key, value)| match key.as_str() {
        "GLIBC_TUNABLES" => value.split([':', ',']).any(|tunable| {
            tunable.starts_with("glibc.malloc.mmap_threshold=")
                || tunable.starts_with("glibc.malloc.trim_threshold=")
        }),
        "MALLOC_MMAP_THRESHOLD_" | "MALLOC_TRIM_THRESHOLD_" => true,
        _ => false,
    })
}

/// What [`keep_message_memory`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MallocThresholds {
    /// Set to [`MMAP_THRESHOLD`] and [`TRIM_THRESHOLD`].
    Set,
    /// Left as the environment sets them.
    Operators,
    /// Left: another thread was running (`mallopt` is not thread-safe).
    NotAlone,
    /// glibc refused them, or this is not glibc.
    Unchanged,
}

/// Sets glibc malloc's `mmap` and trim thresholds (module doc), unless the
/// environment sets either. Only while the process has one thread: glibc
/// marks `mallopt` MT-Unsafe (it writes parameters every thread's
/// `malloc` reads without a lock), so call it first thing in `main`.
pub fn keep_message_memory() -> MallocThresholds {
    // `vars_os`: a variable that is not UTF-8 is no reason to panic.
    let env = std::env::vars_os().map(|(key, value)| {
        (
            key.to_string_lossy().into_owned(),
            value.to_string_lossy().into_owned(),
        )
    });
    if thresholds_set_in(env) {
        return MallocThresholds::Operators;
    }
    if threads() != Some(1) {
        return MallocThresholds::NotAlone;
    }
    if set_thresholds() {
        MallocThresholds::Set
    } else {
        MallocThresholds::Unchanged
    }
}

/// The process's threads, as `/proc/self/task` lists them.
fn threads() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/task").ok()?.count())
}

/// Sets the thresholds; only while the process has one thread (see
/// [`keep_message_memory`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_thresholds() -> bool {
    let (Ok(mmap), Ok(trim)) = (
        libc::c_int::try_from(MMAP_THRESHOLD),
        libc::c_int::try_from(TRIM_THRESHOLD),
    ) else {
        return false;
    };
    // SAFETY: `mallopt` changes two of glibc malloc's parameters and
    // touches no memory of ours. glibc marks it MT-Unsafe: it writes
    // parameters that `malloc` and `free` read without a lock. Its one
    // caller, `keep_message_memory`, calls it only when `/proc/self/task`
    // lists one thread, this one, and nothing made here starts another.
    // Each threshold is within what glibc accepts (the `mmap` one at most
    // 32 MiB on 64-bit), and it answers 0 for a value it refuses, changing
    // nothing.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, trim) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> bool {
    false
}

/// Advises the kernel first that the range is read at random
/// (`MADV_RANDOM`), then to reclaim it (`MADV_PAGEOUT`); if the second is
/// refused, the range's read-ahead is given back (`MADV_NORMAL`).
#[allow(unsafe_code)]
fn advise_page_out(range: Range<usize>) -> io::Result<()> {
    let (start, len) = (range.start as *mut std::ffi::c_void, range.len());
    // SAFETY: no advice here changes what the memory holds, so no
    // reference into the range is invalidated. `MADV_RANDOM` and
    // `MADV_NORMAL` only set the kernel's read-ahead for the range's
    // faults. `MADV_PAGEOUT` only asks it to reclaim the range's pages
    // now, as it may under memory pressure at any time: unlike
    // `MADV_DONTNEED`, a clean file page is read again from its file, and
    // a private page that relocation wrote is swapped out, or kept where
    // there is no swap. The range is a whole mapping as
    // `/proc/self/smaps` lists it.
    unsafe {
        rustix::mm::madvise(start, len, rustix::mm::Advice::Random)?;
        rustix::mm::madvise(start, len, rustix::mm::Advice::LinuxPageOut).inspect_err(|_| {
            let _ = rustix::mm::madvise(start, len, rustix::mm::Advice::Normal);
        })
    }
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use procfs::FromBufRead;

    use super::*;

    /// As the kernel writes it: the path padded to a column, a trailing
    /// space where a mapping has no name.
    const SMAPS: &str = "\
55d0a0000000-55d0a0400000 r--p 00000000 00:2f 1234                       /usr/bin/collector
Size:               4096 kB
Rss:                 512 kB
55d0a0400000-55d0a0c00000 r-xp 00400000 00:2f 1234                       /usr/bin/collector
Size:               8192 kB
Rss:                6764 kB
Pss:                6764 kB
55d0a0c00000-55d0a0cb0000 r--p 00c00000 00:2f 1234                       /usr/bin/collector
Rss:                 100 kB
55d0a0cb0000-55d0a0cb8000 rw-p 00cb0000 00:2f 1234                       /usr/bin/collector
Rss:                  28 kB
55d0a0cb8000-55d0a0cc0000 rw-p 00000000 00:00 0\x20
Rss:                  32 kB
55d0a2000000-55d0a2100000 rw-p 00000000 00:00 0                          [heap]
Rss:                 140 kB
7f0000000000-7f0000100000 r-xp 00028000 00:2f 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1136 kB
7f0000200000-7f0000300000 r-xp 00000000 00:2f 77                         /usr/bin/collector-old
Rss:                   4 kB
7f0000400000-7f0000500000 r-xp 00000000 00:2f 78                         /opt/my apps/collector
Rss:                  64 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  16 kB
VmFlags: rd wr mr mw me gd ac
";

    fn parse(text: &str) -> MemoryMaps {
        MemoryMaps::from_buf_read(text.as_bytes()).expect("smaps as the kernel writes it")
    }

    #[test]
    fn only_the_executables_read_only_mappings_are_paged_out() {
        let maps = parse(SMAPS);
        assert_eq!(
            own_code(&maps, Path::new("/usr/bin/collector")),
            [
                0x55d0a0000000..0x55d0a0400000,
                0x55d0a0400000..0x55d0a0c00000,
                0x55d0a0c00000..0x55d0a0cb0000,
            ]
        );
        assert!(own_code(&maps, Path::new("/usr/lib/other")).is_empty());
        assert_eq!(
            own_code(&maps, Path::new("/opt/my apps/collector")),
            vec![0x7f0000400000..0x7f0000500000]
        );
    }

    #[test]
    fn a_replaced_executable_is_found_by_the_name_the_kernel_gives_it() {
        let maps = parse(
            "55d0a0400000-55d0a0c00000 r-xp 00400000 00:2f 1234 /usr/bin/collector (deleted)\n",
        );
        let found = own_code(&maps, Path::new("/usr/bin/collector (deleted)"));
        assert_eq!(found, vec![0x55d0a0400000..0x55d0a0c00000]);
    }

    #[test]
    fn the_executables_resident_pages_are_summed_from_smaps() {
        let maps = parse(SMAPS);
        // Every mapping of the executable, its writable one too.
        assert_eq!(
            resident_kib(&maps, Path::new("/usr/bin/collector")),
            512 + 6764 + 100 + 28
        );
        assert_eq!(resident_kib(&maps, Path::new("/opt/my apps/collector")), 64);
        assert_eq!(resident_kib(&maps, Path::new("/nothing")), 0);
    }

    #[test]
    fn the_operators_malloc_thresholds_win() {
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        for set in [
            env(&[("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")]),
            env(&[(
                "GLIBC_TUNABLES",
                "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=131072",
            )]),
            env(&[("MALLOC_MMAP_THRESHOLD_", "131072")]),
            env(&[("PATH", "/bin"), ("MALLOC_TRIM_THRESHOLD_", "0")]),
        ] {
            assert!(thresholds_set_in(set.clone()), "{set:?}");
        }
        for unset in [
            env(&[]),
            // The systemd unit's own setting leaves the thresholds to us.
            env(&[("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")]),
            env(&[("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")]),
            env(&[("MALLOC_ARENA_MAX", "2")]),
        ] {
            assert!(!thresholds_set_in(unset.clone()), "{unset:?}");
        }
    }

    #[test]
    fn malformed_smaps_is_an_error_not_a_guess() {
        for text in ["garbage\n", "1-2 r-xp 0 0 0 x\n", "Rss: 4 kB\n"] {
            assert!(
                MemoryMaps::from_buf_read(text.as_bytes()).is_err(),
                "{text:?}"
            );
        }
        // Well formed, but an empty range: nothing to advise.
        let empty = parse("2000-1000 r-xp 00000000 00:00 0 /x\n");
        assert_eq!(empty.len(), 1);
        assert!(own_code(&empty, Path::new("/x")).is_empty());
    }
}

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
//! major fault, with read-ahead) when its code next runs, so the code the
//! collector runs while idle is resident again within its first turns.
//!
//! The kernel reclaims a file's pages only for a process that owns the
//! file, may write it, or holds `CAP_FOWNER`, and leaves pages that
//! another process maps too. So it works as root (the Docker images) and
//! where the binary belongs to the collector's user (a Marathon app's
//! sandbox), and does nothing under the systemd unit's `DynamicUser=` with
//! a binary owned by root: the advice is taken and nothing is reclaimed.
//! What the executable's pages took before and after is logged, so each
//! node says which case it is.

use std::io;
use std::ops::Range;
use std::time::Duration;

/// How long after the start the collector's code is paged out: by then its
/// start, and the first connection to the brokers, have run.
pub const SETTLE: Duration = Duration::from_secs(10);

/// What [`page_out_own_code`] did: the mappings advised, and the pages
/// of the executable resident before and after (`Rss` in
/// `/proc/self/smaps`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PagedOut {
    pub mappings: usize,
    pub resident_before_kib: u64,
    pub resident_after_kib: u64,
}

/// The read-only mappings of the executable `exe` in `maps` (the text of
/// `/proc/self/maps`): its code and read-only data. Writable ones (its data,
/// and what relocation made private) are left out.
pub fn own_code(maps: &str, exe: &str) -> Vec<Range<usize>> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(6, ' ');
            let range = fields.next()?;
            let perms = fields.next()?;
            let path = fields.nth(3)?.trim_start();
            if path != exe || perms.as_bytes().get(1) != Some(&b'-') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (start < end).then_some(start..end)
        })
        .collect()
}

/// The pages of `exe`'s mappings resident, in KiB, as `smaps` (the text of
/// `/proc/self/smaps`) gives them: the sum of their `Rss` lines.
pub fn resident_kib(smaps: &str, exe: &str) -> u64 {
    let mut ours = false;
    let mut total = 0;
    for line in smaps.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            if ours {
                total += rss
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        } else if line.split_once(' ').is_some_and(|(range, _)| {
            range.contains('-') && range.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
        }) {
            ours = line.splitn(6, ' ').nth(5).map(str::trim_start) == Some(exe);
        }
    }
    total
}

/// Advises the kernel to reclaim the pages of the running executable's
/// read-only mappings. An error where the kernel lacks the advice (before
/// Linux 5.4), `/proc` is not mounted, or a seccomp filter refuses it;
/// nothing is changed then.
pub fn page_out_own_code() -> io::Result<PagedOut> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let exe = exe.to_string_lossy();
    let resident = || -> io::Result<u64> {
        Ok(resident_kib(
            &std::fs::read_to_string("/proc/self/smaps")?,
            &exe,
        ))
    };
    let mut paged = PagedOut {
        resident_before_kib: resident()?,
        ..PagedOut::default()
    };
    for range in own_code(&std::fs::read_to_string("/proc/self/maps")?, &exe) {
        advise_page_out(range)?;
        paged.mappings += 1;
    }
    paged.resident_after_kib = resident()?;
    Ok(paged)
}

/// Waits [`SETTLE`], then pages the collector's code out, once; what it
/// did is logged (at debug: nothing here needs an operator).
pub async fn page_out_after_settle() {
    tokio::time::sleep(SETTLE).await;
    match page_out_own_code() {
        Ok(paged) => tracing::debug!(
            mappings = paged.mappings,
            resident_before_kib = paged.resident_before_kib,
            resident_after_kib = paged.resident_after_kib,
            "The collector's own code was advised out after its start (the kernel reclaims it only where the collector owns its executable, may write it, or has CAP_FOWNER)."
        ),
        Err(error) => tracing::debug!(%error, "The collector's own code could not be paged out."),
    }
}

#[allow(unsafe_code)]
fn advise_page_out(range: Range<usize>) -> io::Result<()> {
    // SAFETY: `MADV_PAGEOUT` only asks the kernel to reclaim the pages of
    // a range of this process's mappings; unlike `MADV_DONTNEED` it never
    // changes what the memory holds (a clean file page is read again from
    // its file; a private page that relocation wrote is swapped out, or
    // kept where there is no swap), so no reference into the range is
    // invalidated. The range is a whole
    // mapping as `/proc/self/maps` lists it, so page-aligned.
    unsafe {
        rustix::mm::madvise(
            range.start as *mut std::ffi::c_void,
            range.len(),
            rustix::mm::Advice::LinuxPageOut,
        )
    }
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    // As the kernel writes them: the path padded to a column.
    const MAPS: &str = "\
55d0a0000000-55d0a0400000 r--p 00000000 00:2f 1234                       /usr/bin/collector
55d0a0400000-55d0a0c00000 r-xp 00400000 00:2f 1234                       /usr/bin/collector
55d0a0c00000-55d0a0cb0000 r--p 00c00000 00:2f 1234                       /usr/bin/collector
55d0a0cb0000-55d0a0cb8000 rw-p 00cb0000 00:2f 1234                       /usr/bin/collector
55d0a0cb8000-55d0a0cc0000 rw-p 00000000 00:00 0
55d0a2000000-55d0a2100000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000100000 r-xp 00028000 00:2f 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000200000-7f0000300000 r-xp 00000000 00:2f 77                         /usr/bin/collector-old
7f0000400000-7f0000500000 r-xp 00000000 00:2f 78                         /opt/my apps/collector
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn only_the_executables_read_only_mappings_are_paged_out() {
        assert_eq!(
            own_code(MAPS, "/usr/bin/collector"),
            [
                0x55d0a0000000..0x55d0a0400000,
                0x55d0a0400000..0x55d0a0c00000,
                0x55d0a0c00000..0x55d0a0cb0000,
            ]
        );
        assert!(own_code(MAPS, "/usr/lib/other").is_empty());
        assert_eq!(
            own_code(MAPS, "/opt/my apps/collector"),
            vec![0x7f0000400000..0x7f0000500000]
        );
        assert!(own_code("garbage\n\n1-0 r-xp 0 0 0 x\n", "x").is_empty());
    }

    #[test]
    fn a_replaced_executable_is_found_by_the_name_the_kernel_gives_it() {
        let maps =
            "55d0a0400000-55d0a0c00000 r-xp 00400000 00:2f 1234 /usr/bin/collector (deleted)\n";
        let found = own_code(maps, "/usr/bin/collector (deleted)");
        assert_eq!(found, vec![0x55d0a0400000..0x55d0a0c00000]);
    }

    #[test]
    fn the_executables_resident_pages_are_summed_from_smaps() {
        let smaps = "\
55d0a0400000-55d0a0c00000 r-xp 00400000 00:2f 1234                       /usr/bin/collector
Size:               8192 kB
Rss:                6764 kB
Pss:                6764 kB
55d0a0cb0000-55d0a0cb8000 rw-p 00cb0000 00:2f 1234                       /usr/bin/collector
Rss:                  28 kB
55d0a2000000-55d0a2100000 rw-p 00000000 00:00 0                          [heap]
Rss:                 140 kB
7f0000000000-7f0000100000 r-xp 00028000 00:2f 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1136 kB
VmFlags: rd ex mr mw me sd
";
        assert_eq!(resident_kib(smaps, "/usr/bin/collector"), 6792);
        assert_eq!(resident_kib(smaps, "[heap]"), 140);
        assert_eq!(resident_kib(smaps, "/nothing"), 0);
    }

    /// The advice, on this very test binary: where the kernel reclaims
    /// (this process owns the binary or may write it, or is root, as in
    /// CI), the binary's resident pages fall, and the code runs on after
    /// it (it is read again from the file).
    #[test]
    fn this_process_pages_out_its_own_code_and_runs_on() {
        let paged = page_out_own_code().expect("MADV_PAGEOUT on this kernel");
        assert!(paged.mappings >= 2, "{paged:?}");
        let exe = std::fs::metadata("/proc/self/exe").expect("the test binary");
        let writable = rustix::fs::access("/proc/self/exe", rustix::fs::Access::WRITE_OK).is_ok();
        let owner =
            std::os::unix::fs::MetadataExt::uid(&exe) == rustix::process::geteuid().as_raw();
        if !(writable || owner) {
            eprintln!(
                "not checked: the kernel reclaims nothing here (the test binary is neither this user's nor writable by it): {paged:?}"
            );
            return;
        }
        eprintln!("{paged:?}");
        assert!(
            paged.resident_after_kib < paged.resident_before_kib,
            "{paged:?}"
        );
    }
}

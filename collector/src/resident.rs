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
//! reclaimed is read again from the file (usually still in the page cache)
//! when the code is next run, so the code the collector runs while idle is
//! resident again within its first turns, and only that. Pages another
//! process maps too are left alone by the kernel.

use std::io;
use std::ops::Range;
use std::time::Duration;

/// How long after the start the collector's code is paged out: by then its
/// start, and the first connection to the brokers, have run.
pub const SETTLE: Duration = Duration::from_secs(10);

/// What [`page_out_own_code`] advised.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PagedOut {
    pub mappings: usize,
    pub bytes: usize,
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

/// Advises the kernel to reclaim the pages of the running executable's
/// read-only mappings. An error where the kernel lacks the advice (before
/// Linux 5.4) or `/proc` is not mounted; nothing is changed then.
pub fn page_out_own_code() -> io::Result<PagedOut> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let exe = exe.to_string_lossy();
    let mut paged = PagedOut::default();
    for range in own_code(&maps, &exe) {
        advise_page_out(range.clone())?;
        paged.mappings += 1;
        paged.bytes += range.len();
    }
    Ok(paged)
}

/// Waits [`SETTLE`], then pages the collector's code out, once; what it
/// did is logged (at debug: nothing here needs an operator).
pub async fn page_out_after_settle() {
    tokio::time::sleep(SETTLE).await;
    match page_out_own_code() {
        Ok(paged) => tracing::debug!(
            mappings = paged.mappings,
            bytes = paged.bytes,
            "The collector's own code was paged out after its start."
        ),
        Err(error) => tracing::debug!(%error, "The collector's own code could not be paged out."),
    }
}

#[allow(unsafe_code)]
fn advise_page_out(range: Range<usize>) -> io::Result<()> {
    // SAFETY: `MADV_PAGEOUT` only asks the kernel to reclaim the pages of
    // a range of this process's mappings; unlike `MADV_DONTNEED` it never
    // changes what the memory holds (a clean file page is read again from
    // its file, a dirty or anonymous one is swapped or kept), so no
    // reference into the range is invalidated. The range is a whole
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

    const MAPS: &str = "\
55d0a0000000-55d0a0400000 r--p 00000000 00:2f 1234 /usr/bin/collector
55d0a0400000-55d0a0c00000 r-xp 00400000 00:2f 1234 /usr/bin/collector
55d0a0c00000-55d0a0cb0000 r--p 00c00000 00:2f 1234 /usr/bin/collector
55d0a0cb0000-55d0a0cb8000 rw-p 00cb0000 00:2f 1234 /usr/bin/collector
55d0a0cb8000-55d0a0cc0000 rw-p 00000000 00:00 0
55d0a2000000-55d0a2100000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000100000 r-xp 00028000 00:2f 99 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000200000-7f0000300000 r-xp 00000000 00:2f 77 /usr/bin/collector-old
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
        assert!(own_code("garbage\n\n1-0 r-xp 0 0 0 x\n", "x").is_empty());
    }

    #[test]
    fn a_replaced_executable_is_found_by_the_name_the_kernel_gives_it() {
        let maps =
            "55d0a0400000-55d0a0c00000 r-xp 00400000 00:2f 1234 /usr/bin/collector (deleted)\n";
        let found = own_code(maps, "/usr/bin/collector (deleted)");
        assert_eq!(found, vec![0x55d0a0400000..0x55d0a0c00000]);
    }

    /// The advice is taken by this kernel on this very test binary, and
    /// the code still runs after it (it is read again from the file).
    #[test]
    fn this_process_pages_out_its_own_code_and_runs_on() {
        let paged = page_out_own_code().expect("MADV_PAGEOUT on this kernel");
        assert!(paged.mappings >= 2, "{paged:?}");
        assert!(paged.bytes >= 1 << 20, "{paged:?}");
        assert_eq!(own_code(MAPS, "/usr/bin/collector").len(), 3);
    }
}

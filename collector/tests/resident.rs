//! The page-out of the collector's own code (`collector::resident`), live,
//! on this very test binary. Its own test binary, holding this one test:
//! no other test's thread runs (and faults in code) between the readings
//! before and after, as one did beside it among the library's unit tests
//! (resident before 22,680 KiB, after 57,416).

use procfs::process::{Process, VmFlags};

use collector::resident::page_out_own_code;

/// Its read-only mappings are marked as read at random (`rr` in smaps'
/// `VmFlags`); where the kernel reclaims (this process owns the binary or
/// may write it, or is root, as in CI), the binary's resident pages fall,
/// and the code runs on after it (it is read again from the file).
#[test]
fn this_process_pages_out_its_own_code_and_runs_on() {
    let paged = page_out_own_code().expect("MADV_PAGEOUT on this kernel");
    assert!(paged.advised.len() >= 2, "{paged:?}");
    // Each range advised is marked, found by its address.
    let maps = Process::myself().and_then(|me| me.smaps()).expect("smaps");
    for range in &paged.advised {
        let map = maps
            .iter()
            .find(|map| map.address == (range.start as u64, range.end as u64))
            .unwrap_or_else(|| panic!("{range:x?} is no longer a mapping"));
        assert!(map.extension.vm_flags.contains(VmFlags::RR), "{map:?}");
    }
    let exe = std::fs::metadata("/proc/self/exe").expect("the test binary");
    let writable = rustix::fs::access("/proc/self/exe", rustix::fs::Access::WRITE_OK).is_ok();
    let owner = std::os::unix::fs::MetadataExt::uid(&exe) == rustix::process::geteuid().as_raw();
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

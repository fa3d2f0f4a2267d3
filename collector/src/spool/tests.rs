//! The spool's unit tests.

use std::fs::OpenOptions;

use bytes::Bytes;

use super::frame::{self, FrameRef};
use super::segment::segment_name;
use super::*;

fn settings(dir: &Path) -> SpoolSettings {
    SpoolSettings {
        dir: dir.to_owned(),
        max_bytes: 1 << 20,
        fsync: FsyncMode::Interval,
        fsync_interval: Duration::from_millis(100),
        max_record_bytes: 4096,
        memory_bytes: 1 << 20,
        retry: Duration::ZERO,
        parked_max_bytes: 256 * 1024,
    }
}

/// `n` records of `points` datapoints each, numbered from `from` in
/// their data.
fn records(from: u32, n: u32, points: u32) -> Vec<Routed> {
    (from..from + n)
        .map(|i| Routed {
            topic: "metrics".into(),
            key: i.is_multiple_of(3).then(|| Arc::from("node-1")),
            data: Bytes::from(format!("record {i:06} {}", "x".repeat(40))),
            datapoints: points,
            share: 0,
            seq: 0,
        })
        .collect()
}

fn read_all(spool: &Spool) -> Vec<Routed> {
    let mut out = Vec::new();
    while let Some(chunk) = spool.read() {
        out.extend(chunk.items);
    }
    out
}

fn names(records: &[Routed]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.data[..13]).into_owned())
        .collect()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

#[test]
fn records_read_back_in_order_with_their_topic_key_and_datapoints() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let spool = Spool::open(settings(dir.path()), stats.clone());
    assert_eq!(spool.degraded(), None);
    spool.append(&records(0, 10, 2)).unwrap();
    spool.append(&records(10, 10, 2)).unwrap();
    let read = read_all(&spool);
    assert_eq!(names(&read), names(&records(0, 20, 2)));
    let seqs: Vec<u64> = read.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    assert_eq!(read[3].key.as_deref(), Some("node-1"));
    assert_eq!(read[4].key, None);
    assert!(
        read.iter()
            .all(|r| &*r.topic == "metrics" && r.datapoints == 2)
    );
    assert!(!spool.has_unread());
}

#[test]
fn a_segment_is_deleted_only_once_every_record_in_it_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    settings.max_bytes = 512 * 1024; // 64 KiB segments
    let spool = Spool::open(settings, Arc::new(Stats::default()));
    for i in 0..40 {
        spool.append(&records(i * 50, 50, 1)).unwrap();
    }
    let before = segment_files(dir.path()).len();
    assert!(before >= 3, "{before} segments");
    let read = read_all(&spool);
    assert_eq!(read.len(), 2000);
    assert_eq!(
        segment_files(dir.path()).len(),
        before,
        "read is not acknowledged"
    );
    // Everything but one early record: nothing from its segment on can go.
    let held = read[10].seq;
    let others: Vec<u64> = read.iter().map(|r| r.seq).filter(|&s| s != held).collect();
    spool.ack("metrics", &others);
    assert_eq!(segment_files(dir.path()).len(), before);
    spool.ack("metrics", &[held]);
    // Only the newest (still written to) stays.
    assert_eq!(segment_files(dir.path()).len(), 1);
}

#[test]
fn a_restart_replays_what_was_not_acknowledged_and_counts_possible_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let spool = Spool::open(settings(dir.path()), stats);
    spool.append(&records(0, 30, 3)).unwrap();
    let first = spool.read().unwrap().items;
    assert_eq!(first.len(), 30);
    // The first ten acknowledged; the rest read (sent) but not.
    spool.ack(
        "metrics",
        &first[..10].iter().map(|r| r.seq).collect::<Vec<_>>(),
    );
    spool.append(&records(30, 5, 3)).unwrap();
    spool.sync();
    drop(spool);

    let stats = Arc::new(Stats::default());
    let spool = Spool::open(settings(dir.path()), stats.clone());
    let replayed = stats.replayed.get();
    assert_eq!((replayed.records, replayed.datapoints), (25, 75));
    assert_eq!(stats.spool_possible_duplicates.load(Relaxed), 20);
    // Replayed first, in order; new input after it.
    spool.append(&records(100, 2, 3)).unwrap();
    let read = read_all(&spool);
    let mut expected = names(&records(10, 25, 3));
    expected.extend(names(&records(100, 2, 3)));
    assert_eq!(names(&read), expected);
    let seqs: Vec<u64> = read.iter().map(|r| r.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

#[test]
fn close_counts_what_stays_unread() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
    spool.append(&records(0, 7, 4)).unwrap();
    assert_eq!(
        spool.close(),
        Counts {
            records: 7,
            datapoints: 28
        }
    );
}

#[test]
fn the_disk_bound_refuses_and_drop_oldest_deletes_an_unread_segment_counted() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let mut settings = settings(dir.path());
    settings.max_bytes = 512 * 1024;
    let spool = Spool::open(settings, stats.clone());
    let mut appended = 0u64;
    let full = loop {
        match spool.append(&records(0, 100, 1)) {
            Ok(()) => appended += 100,
            Err(refused) => break refused,
        }
        assert!(appended < 100_000, "the bound never refused");
    };
    assert_eq!(full, Refused::Full);
    let on_disk: u64 = segment_files(dir.path())
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert!(on_disk <= 512 * 1024, "{on_disk} bytes on disk");
    assert!(spool.drop_oldest());
    let dropped = stats.accounting().dropped_for(DropReason::BufferFull);
    assert!(
        dropped.records > 0 && dropped.records.is_multiple_of(100),
        "{dropped:?}"
    );
    spool.append(&records(0, 100, 1)).unwrap();
    let read = read_all(&spool);
    assert_eq!(read.len() as u64 + dropped.records, appended + 100);
}

#[test]
fn a_full_disk_degrades_to_memory_and_the_disk_is_used_again_when_it_has_room() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let spool = Spool::open(settings(dir.path()), stats.clone());
    spool.append(&records(0, 5, 1)).unwrap();
    *spool.faults().write.lock().unwrap() = Some(io::ErrorKind::StorageFull);
    assert_eq!(spool.append(&records(5, 5, 1)), Err(Refused::Unavailable));
    let reason = spool.degraded().expect("degraded");
    assert!(reason.contains("disk full"), "{reason}");
    assert_eq!(stats.spool_degraded.load(Relaxed), 1);
    assert_eq!(stats.spool_write_errors.load(Relaxed), 1);
    // Still failing: still degraded.
    assert_eq!(spool.append(&records(5, 5, 1)), Err(Refused::Unavailable));
    *spool.faults().write.lock().unwrap() = None;
    spool.append(&records(10, 5, 1)).unwrap();
    assert_eq!(spool.degraded(), None);
    assert_eq!(stats.spool_degraded.load(Relaxed), 0);
    let mut expected = names(&records(0, 5, 1));
    expected.extend(names(&records(10, 5, 1)));
    assert_eq!(
        names(&read_all(&spool)),
        expected,
        "what was written before is kept"
    );
}

/// The segment a full disk sealed is deleted once Kafka has reported
/// on it, with nothing more to read: its space is what lets the disk
/// be used again.
#[test]
fn a_segment_sealed_by_a_full_disk_frees_its_space_once_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
    spool.append(&records(0, 5, 1)).unwrap();
    let read = read_all(&spool);
    assert_eq!(read.len(), 5);
    *spool.faults().write.lock().unwrap() = Some(io::ErrorKind::StorageFull);
    assert_eq!(spool.append(&records(5, 5, 1)), Err(Refused::Unavailable));
    assert_eq!(segment_files(dir.path()).len(), 1);
    spool.ack("metrics", &read.iter().map(|r| r.seq).collect::<Vec<_>>());
    assert_eq!(
        segment_files(dir.path()).len(),
        0,
        "the sealed segment went"
    );
    *spool.faults().write.lock().unwrap() = None;
    spool.append(&records(10, 5, 1)).unwrap();
    assert_eq!(spool.degraded(), None);
    assert_eq!(names(&read_all(&spool)), names(&records(10, 5, 1)));
}

/// A record too large to send is counted once, when its write is
/// taken: a write the disk bound refused leaves it in its chunk.
#[test]
fn a_record_too_large_is_counted_once_even_when_its_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let mut settings = settings(dir.path());
    settings.max_bytes = 512 * 1024;
    let spool = Spool::open(settings, stats.clone());
    let mut chunk = records(0, 10, 1);
    chunk[3].data = Bytes::from(vec![0; 200 * 1024]);
    while spool.append(&records(0, 9, 1)).is_ok() {}
    assert_eq!(spool.append(&chunk), Err(Refused::Full));
    assert_eq!(spool.append(&chunk), Err(Refused::Full));
    assert_eq!(
        stats.accounting().dropped_for(DropReason::TooLarge).records,
        0
    );
    assert!(spool.drop_oldest());
    spool.append(&chunk).unwrap();
    assert_eq!(
        stats.accounting().dropped_for(DropReason::TooLarge).records,
        1
    );
}

/// Frames whose sequence numbers go back, repeat or jump (segments
/// copied or concatenated by hand) are skipped as damage, never a panic
/// or a bookkeeping blow-up, and the others are read.
#[test]
fn sequence_numbers_out_of_order_are_damage_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut seg = frame::SEGMENT_MAGIC.to_vec();
    for seq in [5u64, 6, 3, 6, 7, 7 + 3 * MAX_CHUNK_SPAN, u64::MAX] {
        frame::encode(
            &mut seg,
            &FrameRef {
                seq,
                written_ms: 1,
                datapoints: 1,
                topic: "metrics",
                key: None,
                data: b"x",
            },
        );
    }
    fs::write(dir.path().join(segment_name(5)), &seg).unwrap();
    let stats = Arc::new(Stats::default());
    let spool = Spool::open(settings(dir.path()), stats.clone());
    assert_eq!(spool.degraded(), None);
    let seqs: Vec<u64> = read_all(&spool).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![5, 6, 7, 7 + 3 * MAX_CHUNK_SPAN, u64::MAX]);
    let lost = stats.accounting().dropped_for(DropReason::SpoolCorrupt);
    assert_eq!(lost.records, 2, "the two out of order");
    assert_eq!(spool.append(&records(0, 1, 1)), Ok(()));
}

/// A segment that can't be read at start is left on disk, and no new
/// segment takes its name.
#[test]
fn an_unreadable_segment_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let name = dir.path().join(segment_name(1));
    fs::create_dir(&name).unwrap();
    let spool = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
    assert_eq!(spool.degraded(), None);
    spool.append(&records(0, 3, 1)).unwrap();
    assert!(name.is_dir(), "left alone");
    assert_eq!(read_all(&spool).len(), 3);
}

#[test]
fn a_read_only_disk_degrades_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
    *spool.faults().write.lock().unwrap() = Some(io::ErrorKind::ReadOnlyFilesystem);
    assert_eq!(spool.append(&records(0, 5, 1)), Err(Refused::Unavailable));
    let reason = spool.degraded().expect("degraded");
    assert!(
        reason.contains("read-only") || reason.contains("Read-only"),
        "{reason}"
    );
}

#[test]
fn a_directory_that_cannot_be_made_leaves_the_spool_degraded_not_failed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    let stats = Arc::new(Stats::default());
    let spool = Spool::open(settings(&file.join("spool")), stats.clone());
    let reason = spool.degraded().expect("degraded");
    assert!(reason.contains("can't be created"), "{reason}");
    assert_eq!(spool.append(&records(0, 1, 1)), Err(Refused::Unavailable));
    assert!(check_dir(&file.join("spool")).is_err());
    assert!(check_dir(dir.path()).is_ok());
}

#[test]
fn a_second_collector_on_the_same_directory_is_refused_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let first = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
    let second = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
    assert_eq!(first.degraded(), None);
    let reason = second.degraded().expect("degraded");
    assert!(reason.contains("in use by another collector"), "{reason}");
}

/// A crash in the middle of the last write, at every byte of its last
/// frame: a restart replays every whole frame, counts the torn one, and
/// goes on writing.
#[test]
fn a_torn_last_write_at_every_offset_costs_only_the_torn_frame() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
    spool.append(&records(0, 4, 1)).unwrap();
    spool.sync();
    drop(spool);
    let segment = segment_files(dir.path()).remove(0);
    let whole = fs::read(&segment).unwrap();
    let last_record = &records(3, 1, 1)[0];
    let last = frame::frame_len(
        "metrics",
        last_record.key.as_deref(),
        last_record.data.len(),
    );
    let last_start = whole.len() - last;
    for cut in last_start..whole.len() {
        let copy = tempfile::tempdir().unwrap();
        fs::write(
            copy.path().join(segment.file_name().unwrap()),
            &whole[..cut],
        )
        .unwrap();
        let stats = Arc::new(Stats::default());
        let spool = Spool::open(settings(copy.path()), stats.clone());
        assert_eq!(stats.replayed.get().records, 3, "cut at {cut}");
        assert_eq!(
            stats.spool_corrupt.load(Relaxed),
            u64::from(cut > last_start),
            "cut at {cut}"
        );
        spool.append(&records(9, 1, 1)).unwrap();
        let read = read_all(&spool);
        assert_eq!(read.len(), 4, "cut at {cut}");
        assert!(read[3].seq > read[2].seq);
    }
}

#[test]
fn damaged_foreign_zero_length_and_truncated_files_never_stop_a_start() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
    spool.append(&records(0, 20, 1)).unwrap();
    spool.sync();
    drop(spool);
    let segment = segment_files(dir.path()).remove(0);
    let mut bytes = fs::read(&segment).unwrap();
    // A flipped bit in the fifth frame's data.
    let frame = bytes.len() / 20;
    bytes[8 + 4 * frame + frame / 2] ^= 0x10;
    fs::write(&segment, &bytes).unwrap();
    // A zero-length segment, a segment of garbage, and a stranger.
    fs::write(dir.path().join(segment_name(9000)), b"").unwrap();
    fs::write(dir.path().join(segment_name(9100)), vec![0xAB; 3000]).unwrap();
    fs::write(dir.path().join("notes.txt"), b"not ours").unwrap();

    let stats = Arc::new(Stats::default());
    let spool = Spool::open(settings(dir.path()), stats.clone());
    assert_eq!(spool.degraded(), None);
    assert_eq!(stats.replayed.get().records, 19);
    assert!(stats.spool_corrupt.load(Relaxed) >= 2);
    let read = read_all(&spool);
    assert_eq!(read.len(), 19);
    assert!(!names(&read).contains(&"record 000004".to_owned()));
    assert!(
        dir.path().join("notes.txt").exists(),
        "a stranger is left alone"
    );
    assert!(
        !dir.path().join(segment_name(9000)).exists(),
        "an empty segment goes"
    );
}

/// A segment damaged after it was written (here, truncated while the
/// collector runs): what can't be read back is counted as dropped, so
/// the count still balances.
#[test]
fn records_lost_to_damage_after_writing_are_counted_as_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let mut settings = settings(dir.path());
    settings.max_bytes = 512 * 1024;
    let spool = Spool::open(settings, stats.clone());
    for i in 0..30 {
        spool.append(&records(i * 50, 50, 2)).unwrap();
    }
    let first = segment_files(dir.path()).remove(0);
    let len = fs::metadata(&first).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&first)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let read = read_all(&spool);
    let lost = stats.accounting().dropped_for(DropReason::SpoolCorrupt);
    assert!(lost.records > 0);
    assert_eq!(read.len() as u64 + lost.records, 1500);
    assert_eq!(lost.datapoints, 2 * lost.records);
}

/// Files in `dir` this process holds open although they were deleted.
fn deleted_but_open(dir: &Path) -> Vec<String> {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .filter(|target| {
            target.starts_with(&*dir.to_string_lossy()) && target.ends_with(" (deleted)")
        })
        .collect()
}

/// A segment deleted while the spool is degraded (a full disk, and then
/// Kafka acknowledged what it held) is let go of, by the writer and by the
/// syncs alike: a handle left on it would keep its space from the disk that
/// needs it, and every retry would hit ENOSPC again.
#[test]
fn a_segment_deleted_while_degraded_is_let_go_of_so_its_space_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
    spool.append(&records(0, 5, 1)).unwrap();
    let read = read_all(&spool);
    *spool.faults().write.lock().unwrap() = Some(io::ErrorKind::StorageFull);
    assert_eq!(spool.append(&records(5, 5, 1)), Err(Refused::Unavailable));
    spool.sync();
    spool.ack("metrics", &read.iter().map(|r| r.seq).collect::<Vec<_>>());
    spool.sync();
    assert_eq!(segment_files(dir.path()), Vec::<PathBuf>::new());
    assert_eq!(deleted_but_open(dir.path()), Vec::<String>::new());
    // The disk mended, the spool is used again.
    *spool.faults().write.lock().unwrap() = None;
    spool.append(&records(10, 5, 1)).unwrap();
    assert_eq!(spool.degraded(), None);
}

/// Records that got their final outcome above the watermark (delivered or
/// dropped out of order, while an earlier one was still in flight) are not
/// replayed after a restart, nor after the one after it: the cursor saves
/// them, and only what had no outcome comes back.
#[test]
fn a_restart_replays_nothing_that_got_its_outcome_above_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
    spool.append(&records(0, 30, 2)).unwrap();
    let read = read_all(&spool);
    assert_eq!(read.len(), 30);
    // The first five have no outcome; the rest do, but for record 15.
    let done: Vec<u64> = read[5..]
        .iter()
        .filter(|r| r.seq != read[15].seq)
        .map(|r| r.seq)
        .collect();
    spool.ack("metrics", &done);
    // A later read, all of it done: done ahead of the first.
    spool.append(&records(30, 10, 2)).unwrap();
    let later = spool.read().unwrap().items;
    assert_eq!(later.len(), 10);
    spool.ack("metrics", &later.iter().map(|r| r.seq).collect::<Vec<_>>());
    let left = spool.close();
    assert_eq!(left, Counts::default(), "everything was read");
    drop(spool);

    let pending = |from: &[Routed]| {
        let mut names = names(&from[..5]);
        names.push(names_of(&from[15]));
        names
    };
    for restart in 1..=2 {
        let stats = Arc::new(Stats::default());
        let spool = Spool::open(settings(dir.path()), stats.clone());
        assert_eq!(
            stats.replayed.get(),
            Counts {
                records: 6,
                datapoints: 12
            },
            "restart {restart}"
        );
        assert_eq!(stats.spool_possible_duplicates.load(Relaxed), 6);
        if restart == 2 {
            let again = read_all(&spool);
            assert_eq!(names(&again), pending(&read), "restart {restart}");
            spool.ack("metrics", &again.iter().map(|r| r.seq).collect::<Vec<_>>());
        }
        spool.close();
    }
    let stats = Arc::new(Stats::default());
    let _spool = Spool::open(settings(dir.path()), stats.clone());
    assert_eq!(stats.replayed.get(), Counts::default());
}

fn names_of(record: &Routed) -> String {
    names(std::slice::from_ref(record)).remove(0)
}

/// A filesystem smaller than `spool_max_bytes` bounds the spool: segments
/// are sized to it, and when it is used up the records wait in memory
/// (degraded, saying why) without a write failing; as Kafka acknowledges,
/// segments go and the disk takes writes again, with no write error ever.
#[test]
fn a_filesystem_smaller_than_the_bound_is_used_steadily_without_write_errors() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let mut settings = settings(dir.path());
    settings.max_bytes = 64 << 20;
    let spool = Spool::open(settings, stats.clone());
    *spool.faults().filesystem_bytes.lock().unwrap() = Some(512 * 1024);
    spool.sync();
    let report = spool.report();
    assert!(report.limited_by_filesystem);
    assert!(
        report.bound < 512 * 1024 && report.bound > 400 * 1024,
        "{report:?}"
    );
    let mut appended = 0u64;
    let refused = loop {
        match spool.append(&records(0, 20, 1)) {
            Ok(()) => appended += 20,
            Err(refused) => break refused,
        }
        assert!(appended < 100_000, "the filesystem's bound never held");
    };
    assert_eq!(refused, Refused::Unavailable);
    let reason = spool
        .degraded()
        .expect("degraded while the filesystem is full");
    assert!(reason.contains("filesystem is full"), "{reason}");
    assert_eq!(stats.spool_degraded.load(Relaxed), 1);
    assert!(
        segment_files(dir.path()).len() >= 6,
        "segments sized to the filesystem: {:?}",
        segment_files(dir.path())
    );
    let on_disk: u64 = segment_files(dir.path())
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert!(on_disk <= report.bound, "{on_disk} > {}", report.bound);
    // Kafka acknowledges what was read: the disk is written again.
    for _ in 0..3 {
        let chunk = spool.read().unwrap();
        spool.ack(
            "metrics",
            &chunk.items.iter().map(|r| r.seq).collect::<Vec<_>>(),
        );
        appended -= chunk.items.len() as u64;
    }
    spool.append(&records(0, 20, 1)).unwrap();
    assert_eq!(spool.degraded(), None);
    assert_eq!(stats.spool_degraded.load(Relaxed), 0);
    assert_eq!(stats.spool_write_errors.load(Relaxed), 0);
    assert_eq!(read_all(&spool).len() as u64, appended + 20);
}

/// Records moved to the parked area are marked done in the main spool,
/// kept on disk across a restart (replayed, named by their topic), read
/// back with their parked sequence numbers, and the topic's spool goes once
/// they are all done. A second collector on the same directory, refused its
/// lock, never touches them.
#[test]
fn parked_records_survive_a_restart_and_a_second_collector_leaves_them_alone() {
    let dir = tempfile::tempdir().unwrap();
    let topic: Arc<str> = Arc::from("metrics-refused");
    let stats = Arc::new(Stats::default());
    let spool = Spool::open(settings(dir.path()), stats.clone());
    spool.append(&records(0, 10, 2)).unwrap();
    let read = read_all(&spool);
    let moved: Vec<Routed> = read
        .iter()
        .map(|r| Routed {
            topic: topic.clone(),
            ..r.clone()
        })
        .collect();
    spool.park(&topic, &moved).unwrap();
    assert_eq!(
        segment_files(dir.path()).len(),
        1,
        "the main spool's records are done"
    );
    let second = Spool::open(settings(dir.path()), Arc::new(Stats::default()));
    assert!(second.degraded().is_some());
    assert_eq!(second.park(&topic, &moved), Err(Refused::Unavailable));
    drop(second);
    assert!(dir.path().join("parked").read_dir().unwrap().count() == 1);
    assert_eq!(
        spool.close().records,
        10,
        "what is parked is left for the next start"
    );
    drop(spool);

    let stats = Arc::new(Stats::default());
    let spool = Spool::open(settings(dir.path()), stats.clone());
    assert_eq!(stats.replayed.get().records, 10);
    assert_eq!(
        spool.parked_topics(),
        vec![(
            topic.clone(),
            Counts {
                records: 10,
                datapoints: 20
            }
        )]
    );
    let (released, _lease) = spool.release(&topic, Lease::detached()).unwrap();
    assert_eq!(released.items.len(), 10);
    assert!(released.items.iter().all(|r| r.seq & PARKED_SEQ != 0));
    assert_eq!(names(&released.items), names(&records(0, 10, 2)));
    spool.ack(
        &topic,
        &released.items.iter().map(|r| r.seq).collect::<Vec<_>>(),
    );
    spool.forget_parked(&topic);
    assert!(spool.parked_topics().is_empty());
    assert_eq!(dir.path().join("parked").read_dir().unwrap().count(), 0);
}

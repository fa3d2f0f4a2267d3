//! statsd packets, from any bytes: reading one never panics; every line
//! reads as the general path reads it (the path for the simplest lines
//! agrees with it); a packet reads
//! as the concatenation of its lines read alone (one line's error never
//! takes another's values); a line refused takes nothing; the aggregator
//! stays within its bound of series, and every value it gives is a number
//! or a count that reads back as one; the listener's packet reader (whose
//! path for the simplest lines builds no `Line`) takes what the lines
//! read one by one give, and counts the same lines taken and refused.
//!
//! Input: any bytes, read as one packet and, split on `\n`, as packets of
//! one line each.

#![no_main]

use collector::sources::statsd::aggregate::{Aggregator, Budget};
use collector::sources::statsd::listener::take_packet;
use collector::sources::statsd::parse::{Line, lines};
use collector::stats::Stats;
use libfuzzer_sys::fuzz_target;
use std::sync::atomic::Ordering::Relaxed;

const MAX_SERIES: usize = 64;

/// Every value read from `packet`, with its line's name and tags, as text.
fn read(packet: &[u8], aggregator: &mut Aggregator) -> (Vec<String>, usize) {
    let mut out = Vec::new();
    let mut refused = 0;
    let mut line = Line::default();
    let mut tags = Vec::new();
    for text in lines(packet) {
        let Ok(text) = text else {
            // Not UTF-8: refused before it is read.
            refused += 1;
            continue;
        };
        let read = line.read(text);
        // The path for the simplest lines reads as the general one.
        let mut general = Line::default();
        assert_eq!(read, general.read_general(text), "{text:?}");
        // (A refused line's name is left as it was: it names nothing.)
        if read.is_ok() {
            assert_eq!((line.name, &line.tags, &line.values), (general.name, &general.tags, &general.values), "{text:?}");
        }
        match read {
            Ok(()) => {
                assert!(!line.name.is_empty());
                assert!(!line.values.is_empty());
                out.push(format!("{} {:?} {:?}", line.name, line.tags, line.values));
                aggregator.add(&line, &mut tags);
            }
            Err(_) => {
                assert!(line.values.is_empty() && line.tags.is_empty());
                refused += 1;
            }
        }
    }
    (out, refused)
}

fuzz_target!(|data: &[u8]| {
    let mut whole = Aggregator::new(MAX_SERIES, &[50.0, 99.9], Budget::new(1 << 20));
    let (all, refused) = read(data, &mut whole);
    let mut apart = Aggregator::new(MAX_SERIES, &[50.0, 99.9], Budget::new(1 << 20));
    let mut each = Vec::new();
    let mut each_refused = 0;
    for piece in data.split(|b| *b == b'\n') {
        let (values, refused) = read(piece, &mut apart);
        each.extend(values);
        each_refused += refused;
    }
    assert_eq!(all, each, "a packet reads as its lines read alone");
    assert_eq!(refused, each_refused);
    assert!(whole.len() <= MAX_SERIES);
    let mut taken = Aggregator::new(MAX_SERIES, &[50.0, 99.9], Budget::new(1 << 20));
    let stats = Stats::default();
    take_packet(data, &mut taken, &stats);
    assert_eq!(stats.statsd_lines.load(Relaxed), all.len() as u64);
    assert_eq!(stats.statsd_lines_malformed.load(Relaxed), refused as u64);
    let records = whole.records("t", &[], 0);
    same(&records, &apart.records("t", &[], 0));
    same(&records, &taken.records("t", &[], 0));
});

/// The same records: tags, names and values, in the same order.
fn same(records: &[schema::MetricList], again: &[schema::MetricList]) {
    assert_eq!(records.len(), again.len());
    for (a, b) in records.iter().zip(again) {
        assert_eq!(a.tags, b.tags);
        assert_eq!(a.datapoints.len(), b.datapoints.len());
        for (x, y) in a.datapoints.iter().zip(&b.datapoints) {
            assert_eq!(x.name, y.name);
            // The same values in the same order: even the reservoir's
            // random replacements agree.
            assert!(x.value == y.value || (x.value.is_nan() && y.value.is_nan()), "{} {} {}", x.name, x.value, y.value);
        }
    }
}

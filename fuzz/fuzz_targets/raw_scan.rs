//! The in-place scan of a record (`schema::raw`) accepts and refuses
//! exactly what the full reader does, at the same offset, with the same
//! error; what it accepts reads back the same, tags and datapoints.

#![no_main]

use libfuzzer_sys::fuzz_target;
use schema::datum::{self, Cursor};

fuzz_target!(|data: &[u8]| {
    let mut full = Cursor::new(data);
    let mut raw = Cursor::new(data);
    match (
        datum::read_metric_list(&mut full),
        schema::raw::scan_metric_list(&mut raw),
    ) {
        (Ok(decoded), Ok(scanned)) => {
            assert_eq!(full.position(), raw.position());
            assert_eq!(scanned.bytes(), &data[..full.position()]);
            assert_eq!(scanned.topic(), decoded.topic);
            assert_eq!(scanned.datapoints() as usize, decoded.datapoints.len());
            let tags: Vec<(&str, &str)> = scanned.tags().collect();
            let want: Vec<(&str, &str)> = decoded
                .tags
                .iter()
                .map(|t| (t.key.as_str(), t.value.as_str()))
                .collect();
            assert_eq!(tags, want);
            let points: Vec<(&str, i64, u64)> = scanned
                .datapoint_values()
                .map(|(name, time, value)| (name, time, value.to_bits()))
                .collect();
            let want: Vec<(&str, i64, u64)> = decoded
                .datapoints
                .iter()
                .map(|d| (d.name.as_str(), d.time_ms, d.value.to_bits()))
                .collect();
            assert_eq!(points, want);
            // Splicing no tags writes the record as it was.
            let mut out = Vec::new();
            scanned.write_with_tags(&[], &mut out);
            assert_eq!(out, scanned.bytes());
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("reader {:?} vs scan {:?}", a.map(|_| ()), b.map(|_| ())),
    }
});

//! Writer-schema resolution: any schema text a header may carry is either
//! refused with an error or gives a reader plan, and that plan reads any
//! bytes without panicking.

#![no_main]

use libfuzzer_sys::fuzz_target;
use schema::ReaderPlan;

fuzz_target!(|data: &[u8]| {
    // Schema text, a zero byte, then record bytes.
    let (text, records) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    if let Ok(plan) = ReaderPlan::for_writer_schema(text) {
        let mut out = Vec::new();
        let count = records.first().map_or(0, |&n| u64::from(n % 16));
        let _ = plan.read_records(records, count, &mut out);
    }
});

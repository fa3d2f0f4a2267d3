//! A partner's first line (`topics=<list or regex>`): a filter or a
//! refusal, and a filter matches any topic name without panicking.

#![no_main]

use collector::sinks::partner::{MAX_REQUEST_LINE, parse_request_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let line = &data[..data.len().min(MAX_REQUEST_LINE)];
    if let Ok(filter) = parse_request_line(line) {
        for topic in [
            "metrics-a",
            "",
            "metrics-kafka-prod",
            "x".repeat(249).as_str(),
        ] {
            let _ = filter.accepts(topic);
        }
    }
});

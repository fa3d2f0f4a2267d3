//! `/state` bodies: enrichment is read from anything that parses, and the
//! tags it adds to a record never take more than it announces (what the
//! buffer reserves for them).

#![no_main]

use collector::enrich::Enrichment;
use collector::mesos::client::parse_body;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(state) = parse_body("fuzz", text) else {
        return;
    };
    let enrichment = Enrichment::from_state(&state);
    let frameworks: Vec<&str> = enrichment
        .frameworks
        .keys()
        .map(String::as_str)
        .chain(["unknown"])
        .collect();
    let executors: Vec<&str> = enrichment
        .applications
        .keys()
        .map(String::as_str)
        .chain(["unknown"])
        .collect();
    let mut bytes = Vec::new();
    for framework in &frameworks {
        for executor in &executors {
            let (extra, _) = enrichment.tags_for_lookup(|key| match key {
                "framework_id" => Some(framework),
                "executor_id" => Some(executor),
                _ => None,
            });
            bytes.clear();
            for (key, value) in extra.as_slice() {
                schema::datum::write_bytes(&mut bytes, key.as_bytes());
                schema::datum::write_bytes(&mut bytes, value.as_bytes());
            }
            assert!(bytes.len() <= enrichment.max_extra_len());
        }
    }
});

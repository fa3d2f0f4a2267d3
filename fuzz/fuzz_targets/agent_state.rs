//! `/state` bodies: enrichment is read from anything that parses, and the
//! tags it adds to a record (its agent's, framework's and application's,
//! and its container's task metadata and labels, of either kind) never take
//! more than it announces (what the buffer reserves for them).

#![no_main]

use collector::enrich::{Enrichment, Kind};
use collector::sources::agent::client::parse_body;
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
    let containers: Vec<&str> = enrichment
        .containers
        .keys()
        .map(String::as_str)
        .chain(["unknown"])
        .collect();
    let mut bytes = Vec::new();
    for framework in &frameworks {
        for executor in &executors {
            for container in &containers {
                for kind in [Kind::Container, Kind::App] {
                    let (extra, _) = enrichment.tags_for_lookup(kind, |key| match key {
                        "framework_id" => Some(framework),
                        "executor_id" => Some(executor),
                        "container_id" => Some(container),
                        _ => None,
                    });
                    bytes.clear();
                    for (key, value) in extra.iter() {
                        schema::datum::write_bytes(&mut bytes, key.as_bytes());
                        schema::datum::write_bytes(&mut bytes, value.as_bytes());
                    }
                    assert!(bytes.len() <= enrichment.max_extra_len());
                }
            }
        }
    }
});

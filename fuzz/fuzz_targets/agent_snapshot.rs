//! `/metrics/snapshot` bodies map without panicking: one record, one
//! datapoint per numeric member.

#![no_main]

use collector::sources::agent::client::parse_body;
use collector::sources::agent::mapping::map_snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(body) = parse_body("fuzz", text) else {
        return;
    };
    let mapped = map_snapshot(&body, "agent", "dcos.metrics.agent.", 7);
    if let Some(members) = body.as_object() {
        assert_eq!(mapped.lists.len(), 1);
        assert!(mapped.lists[0].datapoints.len() <= members.len());
    }
});

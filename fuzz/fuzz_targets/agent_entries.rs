//! `/monitor/statistics.json` and `/containers` bodies: mapped as they are
//! parsed, they give exactly what mapping the parsed tree gives, and never
//! panic.

#![no_main]

use collector::sources::agent::client::parse_body;
use collector::sources::agent::mapping::{Naming, map_entries, map_entries_text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let naming = Naming {
        topic: None,
        prefix: "dcos.metrics.container.",
    };
    let streamed = map_entries_text(text, naming, 7);
    match parse_body("fuzz", text) {
        // Debug output compares NaN values as equal.
        Ok(tree) => assert_eq!(
            format!("{:?}", streamed.expect("a body that parses maps")),
            format!("{:?}", map_entries(&tree, naming, 7))
        ),
        Err(_) => assert!(streamed.is_err()),
    }
});

//! The Kafka scheduler's `/v1/connection` answer: brokers are picked from
//! anything that parses, or the answer is refused with a reason.

#![no_main]

use collector::discovery::brokers_from_connection;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok((key, brokers)) = brokers_from_connection(&body) {
        assert!(["dns", "address", "vip"].contains(&key));
        assert!(!brokers.is_empty());
        for broker in brokers {
            let _ = collector::config::check_broker(&broker);
        }
    }
});

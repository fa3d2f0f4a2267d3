//! The statsd registration API's request bodies and state files, from any
//! bytes: reading one never panics; a request read has a container id; a
//! state file read names a container whose id can name a file (never a
//! path out of the state directory), a port that is not 0, and writes back
//! to the same file content it reads as.
//!
//! Input: any bytes, read as a `POST /container` body and as a state file.

#![no_main]

use collector::sources::statsd::registry::{Container, Request, check_id};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = Request::from_json(data) {
        assert!(!request.container_id.is_empty());
        // What the registry does first with an id: never a panic, and an
        // id it takes has no path in it.
        if check_id(&request.container_id).is_ok() {
            assert!(!request.container_id.contains('/'));
            assert!(!request.container_id.starts_with('.'));
        }
    }
    if let Ok(container) = Container::from_json(data) {
        assert!(check_id(&container.container_id).is_ok());
        assert!(!container.container_id.contains('/'));
        assert_ne!(container.statsd_port, 0);
        let written = serde_json::to_vec(&container).unwrap();
        assert_eq!(Container::from_json(&written), Ok(container));
    }
});

//! TOML configuration files: any text is a configuration or an error that
//! names a field; a configuration that validates has a memory bound.

#![no_main]

use collector::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text, "fuzz.toml") {
        Ok(config) => {
            if config.validate_settings().is_ok() {
                let bound = config.memory_bound();
                assert!(bound.total >= bound.buffer);
            }
        }
        Err(error) => assert!(!error.field.is_empty()),
    }
});

//! `PATCH /v1/config`: any body is applied whole or refused whole; what is
//! in force afterwards always validates.

#![no_main]

use std::sync::{Arc, OnceLock};

use collector::buffer::Buffer;
use collector::config::{Config, FullPolicy};
use collector::sources::tcp::RateLimits;
use collector::sinks::partner::PartnerLimits;
use collector::route::Routing;
use collector::runtime::Runtime;
use collector::sinks::kafka::SinkRuntime;
use collector::stats::Stats;
use libfuzzer_sys::fuzz_target;
use tokio::sync::watch;

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        // The null sink: validating a patch never makes a Kafka client.
        let config = Config {
            kafka: false,
            ..Config::default()
        };
        let stats = Arc::new(Stats::default());
        Runtime::new(
            config.clone(),
            watch::Sender::new(Arc::new(Routing::from_config(&config))),
            watch::Sender::new(RateLimits::from(&config)),
            watch::Sender::new(SinkRuntime::from(&config)),
            watch::Sender::new(PartnerLimits::from(&config)),
            Arc::new(Buffer::new(1 << 20, FullPolicy::Block, stats.clone())),
            stats,
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(patch) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let runtime = runtime();
    let before = runtime.config();
    match runtime.patch(&patch) {
        Ok(after) => assert_eq!(after, runtime.config()),
        Err(_) => assert_eq!(before, runtime.config(), "a refused patch changes nothing"),
    }
    runtime
        .config()
        .validate_settings()
        .expect("what is in force validates");
});

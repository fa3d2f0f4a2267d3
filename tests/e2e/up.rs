//! `simulator up --duration 20s`, as the README runs it: the whole cluster
//! in one process, ending with the verifier's conservation check.

use std::time::Duration;

use simulator::up::{ModuleGeneration, Scenario, UpOptions, print_report, run};

fn options(scenario: Option<Scenario>) -> UpOptions {
    UpOptions {
        module: ModuleGeneration::V1_11,
        duration: Some(Duration::from_secs(20)),
        producers: 4,
        containers: 6,
        rate: 1000.0,
        brokers: 3,
        scenario,
        quiet: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_for_20s_conserves_every_datapoint() {
    e2e::trace_init();
    let report = run(options(None), std::future::pending()).await.unwrap();
    print_report(&report);
    assert!(report.passed(), "{:?}", report.failures);
    assert_eq!(report.producers_verified, report.producers_sent);
    // Its Prometheus listener serves every container with its task's name.
    assert!(!report.tasks_served.is_empty(), "{report:?}");
    assert_eq!(
        report.producers_generated,
        report.producers_sent + report.producers_dropped
    );
    assert!(report.sample_producer.datapoints_delivered > 0);
}

/// `simulator up --module 1.12`: the agent's containers registered as the
/// 1.12 module registers them, their tasks' statsd totals exact in Kafka
/// (each in its framework's topic) and in Prometheus, two containers
/// deregistered with their last flush arriving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_the_1_12_module_every_statsd_total_arrives() {
    let mut options = options(None);
    options.module = ModuleGeneration::V1_12;
    let report = run(options, std::future::pending()).await.unwrap();
    print_report(&report);
    assert!(report.passed(), "{:?}", report.failures);
    let statsd = report.statsd.expect("the 1.12 module ran");
    assert_eq!(statsd.registered, 6);
    assert_eq!(statsd.deregistered, 2);
    assert!(statsd.packets > 0 && statsd.packets == statsd.packets_read);
    assert_eq!(statsd.series_checked, 6 * 7);
    assert_eq!(report.producers_sent, 0, "no 1.11 module");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_a_broker_outage_conserves_every_datapoint() {
    let report = run(
        options(Some(Scenario::BrokerOutage)),
        std::future::pending(),
    )
    .await
    .unwrap();
    print_report(&report);
    assert!(report.passed(), "{:?}", report.failures);
    assert_eq!(
        report.producers_verified, report.producers_sent,
        "block policy: nothing lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_the_scheduler_moving_the_brokers() {
    let report = run(
        options(Some(Scenario::SchedulerMove)),
        std::future::pending(),
    )
    .await
    .unwrap();
    print_report(&report);
    assert!(report.passed(), "{:?}", report.failures);
    assert_eq!(
        report.producer_switches, 1,
        "the collector followed the brokers to the new cluster"
    );
    assert_eq!(report.producers_verified, report.producers_sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_a_stalled_partner() {
    let mut options = options(Some(Scenario::PartnerStall));
    options.rate = 4000.0;
    let report = run(options, std::future::pending()).await.unwrap();
    print_report(&report);
    assert!(report.passed(), "{:?}", report.failures);
    assert_eq!(
        report.producers_verified, report.producers_sent,
        "Kafka unaffected by the stalled partner"
    );
    assert!(
        report.partner_blocks_dropped > 0,
        "the partner really stalled: blocks were dropped for it, not waited for"
    );
}

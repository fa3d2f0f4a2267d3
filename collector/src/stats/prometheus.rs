//! `/metrics` in Prometheus text format: the accounting counters by input
//! and by drop reason, per-topic counts, every plain counter and gauge
//! declared in [`Stats`], the broker state, and the histograms.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use super::{DropReason, Histogram, Input, Stats};

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
        }
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, "", value);
    }

    /// A histogram kept in `scale`s of its unit (1000 for one kept in
    /// milliseconds and shown in seconds, Prometheus's base unit).
    fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram, scale: f64) {
        self.family(name, "histogram", help);
        let mut cumulative = 0;
        for (i, bound) in histogram.bounds.iter().enumerate() {
            cumulative += histogram.counts[i].load(Relaxed);
            self.sample(
                &format!("{name}_bucket"),
                &format!("le=\"{}\"", bound / scale),
                cumulative,
            );
        }
        cumulative += histogram.counts[histogram.bounds.len()].load(Relaxed);
        self.sample(&format!("{name}_bucket"), "le=\"+Inf\"", cumulative);
        self.sample(
            &format!("{name}_sum"),
            "",
            histogram.sum.load(Relaxed) as f64 / scale,
        );
        self.sample(&format!("{name}_count"), "", cumulative);
    }
}

/// What the sink reports of the brokers, for the `collector_kafka_*` gauges.
#[derive(Debug, Clone, Default)]
pub struct BrokerGauges {
    /// Brokers in use.
    pub brokers: usize,
    /// Every broker is down.
    pub all_down: bool,
    /// Seconds Kafka has been unreachable (0 when reachable).
    pub unavailable_secs: u64,
    /// Topics the brokers refuse, with the datapoints kept for each (at
    /// most [`super::TOPIC_CARDINALITY_CAP`]).
    pub refused_topics: Vec<(String, u64)>,
}

/// Renders every counter in Prometheus text format.
pub fn render(stats: &Stats, brokers: BrokerGauges) -> String {
    let mut t = Text(String::with_capacity(8192));
    let acc = stats.accounting();
    for (unit, received, delivered, served) in [
        (
            "datapoints",
            Input::ALL.map(|i| stats.received(i).datapoints.load(Relaxed)),
            acc.delivered.datapoints,
            acc.served.datapoints,
        ),
        (
            "records",
            Input::ALL.map(|i| stats.received(i).records.load(Relaxed)),
            acc.delivered.records,
            acc.served.records,
        ),
    ] {
        let name = format!("collector_received_{unit}_total");
        t.family(
            &name,
            "counter",
            &format!("{unit} decoded from an input, by input"),
        );
        for (input, value) in Input::ALL.iter().zip(received) {
            t.sample(&name, &format!("input=\"{}\"", input.label()), value);
        }
        t.one(
            &format!("collector_delivered_{unit}_total"),
            "counter",
            &format!("{unit} acknowledged by Kafka"),
            delivered,
        );
        t.one(
            &format!("collector_served_{unit}_total"),
            "counter",
            &format!(
                "{unit} served by the node's own outputs (Prometheus, the v0 API, partners) and sent no further: kafka = false"
            ),
            served,
        );
        let name = format!("collector_dropped_{unit}_total");
        t.family(&name, "counter", &format!("{unit} dropped, by reason"));
        for reason in DropReason::ALL {
            let counts = acc.dropped_for(reason);
            let value = if unit == "datapoints" {
                counts.datapoints
            } else {
                counts.records
            };
            t.sample(&name, &format!("reason=\"{}\"", reason.as_str()), value);
        }
        let pick = |c: super::Counts| {
            if unit == "datapoints" {
                c.datapoints
            } else {
                c.records
            }
        };
        t.one(
            &format!("collector_replayed_{unit}_total"),
            "counter",
            &format!("{unit} found in the disk spool at start, left by an earlier run"),
            pick(acc.replayed),
        );
        t.one(
            &format!("collector_spooled_{unit}_total"),
            "counter",
            &format!("{unit} left in the disk spool at exit, for the next run"),
            pick(acc.spooled),
        );
        let in_flight = if unit == "datapoints" {
            acc.in_flight().datapoints
        } else {
            acc.in_flight().records
        };
        t.one(
            &format!("collector_in_flight_{unit}"),
            "gauge",
            &format!("{unit} received and not yet delivered, served or dropped"),
            in_flight,
        );
    }
    let topics = stats.topics.lock().map(|t| t.clone()).unwrap_or_default();
    t.family(
        "collector_topic_received_datapoints_total",
        "counter",
        "datapoints routed to a Kafka topic (at most 200 topics; the rest as _other)",
    );
    for (topic, counts) in &topics {
        t.sample(
            "collector_topic_received_datapoints_total",
            &format!("topic=\"{}\"", escape(topic)),
            counts.received,
        );
    }
    t.family(
        "collector_topic_delivered_datapoints_total",
        "counter",
        "datapoints delivered to a Kafka topic (at most 200 topics; the rest as _other)",
    );
    for (topic, counts) in &topics {
        t.sample(
            "collector_topic_delivered_datapoints_total",
            &format!("topic=\"{}\"", escape(topic)),
            counts.delivered,
        );
    }
    for scalar in stats.scalars() {
        t.one(scalar.name, scalar.kind, scalar.help.trim(), scalar.value);
    }
    t.one(
        "collector_kafka_brokers",
        "gauge",
        "brokers in use",
        brokers.brokers,
    );
    t.one(
        "collector_kafka_all_brokers_down",
        "gauge",
        "1 when every broker is down",
        u8::from(brokers.all_down),
    );
    t.one(
        "collector_kafka_unavailable_seconds",
        "gauge",
        "seconds Kafka has been unreachable (0 when reachable)",
        brokers.unavailable_secs,
    );
    t.family(
        "collector_kafka_topic_refused_kept_datapoints",
        "gauge",
        "datapoints kept for a topic the brokers refuse, until it can be written (at most 200 topics)",
    );
    for (topic, kept) in &brokers.refused_topics {
        t.sample(
            "collector_kafka_topic_refused_kept_datapoints",
            &format!("topic=\"{}\"", escape(topic)),
            *kept,
        );
    }
    t.family(
        "collector_store_series_refused_total",
        "counter",
        "new series the node store refused, by the bound reached",
    );
    for reason in crate::sinks::store::limits::Refusal::ALL {
        t.sample(
            "collector_store_series_refused_total",
            &format!("reason=\"{}\"", reason.as_str()),
            stats.store_refused[reason as usize].load(Relaxed),
        );
    }
    t.family(
        "collector_store_samples_skipped_total",
        "counter",
        "samples left out of Prometheus scrapes: the same family and labels as an earlier one, or a family named like one of the collector's own",
    );
    t.sample(
        "collector_store_samples_skipped_total",
        "reason=\"duplicate\"",
        stats.store_skipped_duplicate.load(Relaxed),
    );
    t.sample(
        "collector_store_samples_skipped_total",
        "reason=\"name_taken\"",
        stats.store_skipped_name_taken.load(Relaxed),
    );
    t.histogram(
        "collector_kafka_batch_records",
        "records per Kafka message",
        &stats.batch_records,
        1.0,
    );
    t.histogram(
        "collector_delivery_latency_seconds",
        "seconds from batching to Kafka's acknowledgement",
        &stats.delivery_latency_ms,
        1000.0,
    );
    t.histogram(
        "collector_spool_fsync_seconds",
        "seconds each disk spool sync took",
        &stats.spool_fsync_ms,
        1000.0,
    );
    t.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_declared_counter_is_one_family_with_its_help() {
        let stats = Stats::default();
        stats.connections_accepted.fetch_add(3, Relaxed);
        stats.partners_connected.fetch_add(2, Relaxed);
        let text = render(&stats, BrokerGauges::default());
        let mut families = std::collections::HashSet::new();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap();
            assert!(families.insert(name.to_owned()), "{name} twice");
        }
        for scalar in stats.scalars() {
            assert!(families.contains(scalar.name), "{}", scalar.name);
            assert!(
                text.contains(&format!("# HELP {} {}", scalar.name, scalar.help.trim())),
                "{}",
                scalar.name
            );
        }
        assert!(text.contains("\ncollector_connections_accepted_total 3\n"));
        assert!(text.contains("\ncollector_partners_connected 2\n"));
        assert!(text.contains("collector_received_datapoints_total{input=\"agent\"} 0"));
    }
}

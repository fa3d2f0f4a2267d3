//! The other direction of the golden tests: Python's fastavro, an Avro
//! implementation we did not write, reads what our encoder writes.
//! Needs `python3` with fastavro and cramjam (scripts/requirements-test.txt);
//! the README's test command installs them. Missing, this test fails loudly.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use schema::arbitrary::same_records;
use schema::ocf::MODULE_SYNC;
use schema::testing::fastavro_read;
use schema::{Codec, Datapoint, MetricList, OcfEncoder, Tag};

fn records() -> Vec<MetricList> {
    vec![
        MetricList {
            topic: "fw-ünï ✓".into(),
            tags: vec![Tag::new("framework_id", "fw-1"), Tag::new("", "")],
            datapoints: vec![
                Datapoint::new("cpu", i64::MIN, f64::NAN),
                Datapoint::new("mem", i64::MAX, f64::NEG_INFINITY),
                Datapoint::new("disk", 1_464_000_000_000, 0.1),
            ],
        },
        MetricList::default(),
    ]
}

#[test]
fn fastavro_reads_every_codec_we_write() {
    for codec in Codec::ALL {
        let mut encoder = OcfEncoder::new(codec);
        let mut bytes = Vec::new();
        encoder.write_header(&mut bytes);
        encoder.write_block(&records(), &mut bytes);
        encoder.write_block(&records()[..1], &mut bytes);
        let mut want = records();
        want.push(records()[0].clone());
        assert!(same_records(&fastavro_read(&bytes), &want), "{codec}");
    }
}

#[test]
fn fastavro_reads_the_module_form_and_concatenated_files() {
    let mut bytes = OcfEncoder::with_sync(Codec::Null, MODULE_SYNC).file(&records());
    bytes.extend(OcfEncoder::new(Codec::Snappy).file(&records()));
    let want = [records(), records()].concat();
    assert!(same_records(&fastavro_read(&bytes), &want));
}

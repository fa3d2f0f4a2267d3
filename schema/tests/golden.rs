//! Golden tests on bytes this project did not write: the mesos module's
//! reference header and OCF files written by Python's fastavro.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::path::PathBuf;

use schema::arbitrary::same_records;
use schema::ocf::{MODULE_SYNC, StreamDecoder};
use schema::{Codec, Limits, MetricList, OcfEncoder, SchemaKind, decode_all};

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/wire")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn expected(name: &str) -> Vec<MetricList> {
    String::from_utf8(fixture(name))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Decodes `bytes` fed in chunks of `chunk` bytes, checking the schema kind.
fn decode_chunked(bytes: &[u8], chunk: usize, kind: SchemaKind) -> (Vec<MetricList>, usize) {
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut buf = bytes::BytesMut::new();
    let (mut records, mut blocks) = (Vec::new(), 0);
    for piece in bytes.chunks(chunk) {
        buf.extend_from_slice(piece);
        while let Some(block) = decoder.decode(&mut buf).unwrap() {
            records.extend(block.records);
            blocks += 1;
        }
    }
    decoder.finish(&buf).unwrap();
    assert_eq!(decoder.plan().unwrap().kind(), kind);
    (records, blocks)
}

#[test]
fn our_module_header_equals_the_reference_byte_for_byte() {
    let mut ours = Vec::new();
    OcfEncoder::with_sync(Codec::Null, MODULE_SYNC).write_header(&mut ours);
    assert_eq!(ours, fixture("mesos-module-ocf-header.bin"));
}

#[test]
fn module_header_followed_by_fastavro_blocks() {
    let want = expected("current.expected.jsonl");
    for chunk in [1, 7, 601, 4096] {
        let (got, blocks) =
            decode_chunked(&fixture("module-stream.avro"), chunk, SchemaKind::Current);
        assert!(blocks > 1, "the fixture has several blocks");
        assert!(same_records(&got, &want), "chunk {chunk}: {got:?}");
    }
}

#[test]
fn fastavro_current_schema_every_codec() {
    let want = expected("current.expected.jsonl");
    for codec in ["null", "deflate", "snappy"] {
        let bytes = fixture(&format!("current-{codec}.avro"));
        for chunk in [1, 3, 64, bytes.len()] {
            let (got, blocks) = decode_chunked(&bytes, chunk, SchemaKind::Current);
            assert!(blocks > 1);
            assert!(same_records(&got, &want), "{codec} chunk {chunk}: {got:?}");
        }
    }
}

#[test]
fn fastavro_seed_schema_every_codec_is_flattened() {
    let want = expected("seed.expected.jsonl");
    for codec in ["null", "deflate", "snappy"] {
        let bytes = fixture(&format!("seed-{codec}.avro"));
        let (got, _) = decode_chunked(&bytes, 5, SchemaKind::Seed);
        assert!(same_records(&got, &want), "{codec}: {got:?}");
    }
}

#[test]
fn fastavro_other_writer_schema_is_resolved() {
    let (got, _) = decode_chunked(
        &fixture("resolved-null.avro"),
        11,
        SchemaKind::ResolvedToCurrent,
    );
    assert!(
        same_records(&got, &expected("resolved.expected.jsonl")),
        "{got:?}"
    );
}

#[test]
fn concatenated_fastavro_files_like_kcat_output() {
    let mut all = Vec::new();
    let mut want = Vec::new();
    for (file, exp) in [
        ("current-snappy.avro", "current.expected.jsonl"),
        ("seed-deflate.avro", "seed.expected.jsonl"),
        ("module-stream.avro", "current.expected.jsonl"),
    ] {
        all.extend(fixture(file));
        want.extend(expected(exp));
    }
    let got = decode_all(&all, Limits::default()).unwrap();
    assert!(same_records(&got, &want));
}

#[test]
fn apache_avro_oracle_agrees_on_the_fastavro_files() {
    for codec in ["null", "deflate", "snappy"] {
        let bytes = fixture(&format!("current-{codec}.avro"));
        let oracle: Vec<MetricList> = apache_avro::Reader::new(&bytes[..])
            .unwrap()
            .map(|v| apache_avro::from_value::<MetricList>(&v.unwrap()).unwrap())
            .collect();
        let ours = decode_all(&bytes, Limits::default()).unwrap();
        assert!(same_records(&ours, &oracle), "{codec}");
    }
}

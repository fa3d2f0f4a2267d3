//! Property tests for the codec: round trips, chunking invariance, totality,
//! codec equivalence, and agreement with apache-avro as an oracle.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use apache_avro::types::Value;
use proptest::prelude::*;
use schema::arbitrary::{any_metric_lists, same_records};
use schema::datum::{self, Cursor};
use schema::{Codec, Limits, MetricList, OcfEncoder, StreamDecoder, decode_all};

fn any_codec() -> impl Strategy<Value = Codec> {
    prop::sample::select(Codec::ALL.to_vec())
}

/// A stream of one header and one block per group.
fn stream(codec: Codec, groups: &[Vec<MetricList>]) -> Vec<u8> {
    let mut encoder = OcfEncoder::new(codec);
    let mut out = Vec::new();
    encoder.write_header(&mut out);
    for group in groups {
        encoder.write_block(group, &mut out);
    }
    out
}

fn decode_in_pieces(bytes: &[u8], cuts: &[usize]) -> Result<Vec<MetricList>, schema::DecodeError> {
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut buf = bytes::BytesMut::new();
    let mut records = Vec::new();
    let mut start = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    points.push(bytes.len());
    for end in points {
        buf.extend_from_slice(&bytes[start..end.max(start)]);
        start = end.max(start);
        while let Some(block) = decoder.decode(&mut buf)? {
            records.extend(block.records);
        }
    }
    decoder.finish(&buf)?;
    Ok(records)
}

fn to_value(list: &MetricList) -> Value {
    Value::Record(vec![
        ("topic".into(), Value::String(list.topic.clone())),
        (
            "tags".into(),
            Value::Array(
                list.tags
                    .iter()
                    .map(|t| {
                        Value::Record(vec![
                            ("key".into(), Value::String(t.key.clone())),
                            ("value".into(), Value::String(t.value.clone())),
                        ])
                    })
                    .collect(),
            ),
        ),
        (
            "datapoints".into(),
            Value::Array(
                list.datapoints
                    .iter()
                    .map(|d| {
                        Value::Record(vec![
                            ("name".into(), Value::String(d.name.clone())),
                            ("time_ms".into(), Value::Long(d.time_ms)),
                            ("value".into(), Value::Double(d.value)),
                        ])
                    })
                    .collect(),
            ),
        ),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn records_round_trip(groups in prop::collection::vec(any_metric_lists(6), 0..4), codec in any_codec()) {
        let bytes = stream(codec, &groups);
        let got = decode_all(&bytes, Limits::default()).unwrap();
        let want: Vec<MetricList> = groups.concat();
        prop_assert!(same_records(&got, &want));
    }

    #[test]
    fn every_codec_gives_the_same_records(records in any_metric_lists(8)) {
        let decoded: Vec<Vec<MetricList>> = Codec::ALL
            .iter()
            .map(|codec| decode_all(&OcfEncoder::new(*codec).file(&records), Limits::default()).unwrap())
            .collect();
        prop_assert!(same_records(&decoded[0], &records));
        prop_assert!(same_records(&decoded[1], &records));
        prop_assert!(same_records(&decoded[2], &records));
    }

    #[test]
    fn cutting_a_valid_stream_anywhere_changes_nothing(
        groups in prop::collection::vec(any_metric_lists(4), 1..4),
        codec in any_codec(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let bytes = stream(codec, &groups);
        let got = decode_in_pieces(&bytes, &cuts).unwrap();
        prop_assert!(same_records(&got, &groups.concat()));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), cuts in prop::collection::vec(any::<usize>(), 0..6)) {
        let _ = decode_in_pieces(&bytes, &cuts);
        let mut with_magic = b"Obj\x01".to_vec();
        with_magic.extend(&bytes);
        let _ = decode_in_pieces(&with_magic, &cuts);
    }

    #[test]
    fn corrupting_a_valid_stream_never_panics(
        records in any_metric_lists(6),
        codec in any_codec(),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        truncate in any::<usize>(),
    ) {
        let mut bytes = OcfEncoder::new(codec).file(&records);
        for (at, byte) in flips {
            let at = at % bytes.len();
            bytes[at] = byte;
        }
        let _ = decode_all(&bytes, Limits::default());
        bytes.truncate(truncate % (bytes.len() + 1));
        let _ = decode_in_pieces(&bytes, &[truncate / 3]);
    }

    #[test]
    fn fast_reader_and_apache_avro_agree(records in any_metric_lists(6)) {
        let schema = schema::resolve::metrics_schema();
        // apache-avro writes, we read.
        let mut writer = apache_avro::Writer::new(schema, Vec::new()).unwrap();
        for record in &records {
            writer.append_value(to_value(record)).unwrap();
        }
        let theirs = writer.into_inner().unwrap();
        prop_assert!(same_records(&decode_all(&theirs, Limits::default()).unwrap(), &records));
        // We write, apache-avro reads.
        let ours = OcfEncoder::new(Codec::Null).file(&records);
        let read: Vec<MetricList> = apache_avro::Reader::new(&ours[..])
            .unwrap()
            .map(|v| apache_avro::from_value::<MetricList>(&v.unwrap()).unwrap())
            .collect();
        prop_assert!(same_records(&read, &records));
    }

    #[test]
    fn encoded_len_is_exact(records in any_metric_lists(4)) {
        for record in &records {
            let mut out = Vec::new();
            datum::write_metric_list(&mut out, record);
            prop_assert_eq!(out.len(), datum::encoded_len(record));
            let mut cursor = Cursor::new(&out);
            let back = datum::read_metric_list(&mut cursor).unwrap();
            prop_assert_eq!(cursor.position(), out.len());
            prop_assert!(same_records(&[back], std::slice::from_ref(record)));
        }
    }

    #[test]
    fn in_place_scan_agrees_with_the_decoder_on_any_bytes(
        records in any_metric_lists(3),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        noise in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut inputs = vec![noise];
        for record in &records {
            let mut bytes = Vec::new();
            datum::write_metric_list(&mut bytes, record);
            let mut flipped = bytes.clone();
            for (at, byte) in &flips {
                let at = at % flipped.len();
                flipped[at] = *byte;
            }
            inputs.push(bytes);
            inputs.push(flipped);
        }
        for bytes in &inputs {
            let mut a = Cursor::new(bytes);
            let mut b = Cursor::new(bytes);
            match (datum::read_metric_list(&mut a), schema::raw::scan_metric_list(&mut b)) {
                (Ok(decoded), Ok(raw)) => {
                    prop_assert_eq!(a.position(), b.position());
                    prop_assert_eq!(raw.bytes(), &bytes[..a.position()]);
                    prop_assert_eq!(raw.topic(), decoded.topic.as_str());
                    prop_assert_eq!(raw.datapoints() as usize, decoded.datapoints.len());
                    let tags: Vec<(String, String)> = raw.tags().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
                    let want: Vec<(String, String)> = decoded.tags.iter().map(|t| (t.key.clone(), t.value.clone())).collect();
                    prop_assert_eq!(tags, want);
                }
                (Err(x), Err(y)) => prop_assert_eq!(x, y),
                (x, y) => prop_assert!(false, "decoder {:?} vs scan {:?}", x.map(|_| ()), y.map(|_| ())),
            }
        }
    }

    #[test]
    fn splicing_tags_is_re_encoding_with_the_tags_added(
        records in any_metric_lists(3),
        extra in prop::collection::vec((schema::arbitrary::any_text(), schema::arbitrary::any_text()), 0..4),
    ) {
        let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        for record in &records {
            let mut bytes = Vec::new();
            datum::write_metric_list(&mut bytes, record);
            let raw = schema::raw::scan_metric_list(&mut Cursor::new(&bytes)).unwrap();
            let mut spliced = Vec::new();
            raw.write_with_tags(&extra, &mut spliced);
            prop_assert_eq!(spliced.len(), raw.encoded_len_with(&extra));
            let mut expected = record.clone();
            expected.tags.extend(extra.iter().map(|(k, v)| schema::Tag::new(*k, *v)));
            let mut reencoded = Vec::new();
            datum::write_metric_list(&mut reencoded, &expected);
            prop_assert_eq!(spliced, reencoded);
        }
    }

    #[test]
    fn the_in_place_view_yields_the_same_records_and_errors(
        groups in prop::collection::vec(any_metric_lists(4), 1..4),
        codec in any_codec(),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
    ) {
        let mut bytes = stream(codec, &groups);
        for (at, byte) in flips {
            let at = at % bytes.len();
            bytes[at] = byte;
        }
        let expected = decode_all(&bytes, Limits::default());
        let mut decoder = StreamDecoder::new(Limits::default());
        let mut rest = &bytes[..];
        let mut got = Vec::new();
        let result = loop {
            match decoder.decode_view(rest) {
                Ok((used, Some(view))) => {
                    match view {
                        schema::ocf::BlockView::Raw(block) => got.extend(block.to_block().unwrap().records),
                        schema::ocf::BlockView::Decoded(block) => got.extend(block.records),
                    }
                    rest = &rest[used..];
                }
                Ok((used, None)) => {
                    rest = &rest[used..];
                    break decoder.finish(rest).map(|()| got);
                }
                Err(error) => break Err(error),
            }
        };
        match (expected, result) {
            (Ok(want), Ok(got)) => prop_assert!(same_records(&got, &want)),
            (Err(want), Err(got)) => prop_assert_eq!(want, got),
            (want, got) => prop_assert!(false, "decode_all {:?} vs view {:?}", want.map(|r| r.len()), got.map(|r| r.len())),
        }
    }

    #[test]
    fn peek_announces_exactly_the_block_the_view_returns(
        groups in prop::collection::vec(any_metric_lists(4), 1..4),
        codec in any_codec(),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let mut bytes = stream(codec, &groups);
        for (at, byte) in flips {
            let at = at % bytes.len();
            bytes[at] = byte;
        }
        let expected = decode_all(&bytes, Limits::default());
        let result = decode_peeking(&bytes, &cuts);
        match (expected, result) {
            (Ok(want), Ok(got)) => prop_assert!(same_records(&got, &want)),
            (Err(want), Err(got)) => prop_assert_eq!(want, got),
            (want, got) => prop_assert!(false, "decode_all {:?} vs peeking {:?}", want.map(|r| r.len()), got.map(|r| r.len())),
        }
    }
}

/// Decodes as the collector's input does: bytes arrive in pieces; `peek`
/// says what the next block will take, then `decode_view` returns it. Every
/// promise `peek` makes is checked.
fn decode_peeking(bytes: &[u8], cuts: &[usize]) -> Result<Vec<MetricList>, schema::DecodeError> {
    use schema::ocf::{BlockView, Next};
    let mut decoder = StreamDecoder::new(Limits::default());
    let mut buf: Vec<u8> = Vec::new();
    let mut records = Vec::new();
    let mut start = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    points.push(bytes.len());
    for end in points {
        buf.extend_from_slice(&bytes[start..end.max(start)]);
        start = end.max(start);
        loop {
            let (used, next) = decoder.peek(&buf)?;
            buf.drain(..used);
            let info = match next {
                Next::Block(info) => info,
                Next::Incomplete { needed } => {
                    if let Some(needed) = needed {
                        assert!(
                            needed > buf.len(),
                            "incomplete, yet {needed} <= {}",
                            buf.len()
                        );
                    }
                    break;
                }
            };
            let (used, view) = decoder.decode_view(&buf)?;
            let view = view.expect("peek announced a whole block");
            assert_eq!(used, info.wire_len);
            let (count, data_len) = match &view {
                BlockView::Raw(block) => (block.records.len(), block.data_len),
                BlockView::Decoded(block) => (block.records.len(), block.data_len),
            };
            assert_eq!(count as u64, info.records);
            assert_eq!(info.in_place, matches!(view, BlockView::Raw(_)));
            if let Some(len) = info.data_len {
                assert_eq!(len, data_len);
            }
            match view {
                BlockView::Raw(block) => records.extend(block.to_block().unwrap().records),
                BlockView::Decoded(block) => records.extend(block.records),
            }
            buf.drain(..used);
            decoder.release_scratch();
        }
    }
    decoder.finish(&buf)?;
    Ok(records)
}

//! `collector decode`: OCF streams or files in, one JSON object per
//! MetricList out, one per line. Works on what
//! `kcat -C -t TOPIC -e -f '%s'` prints, since each Kafka message is a whole
//! OCF file and the decoder reads concatenated files.

use std::io::{self, Read, Write};

use schema::{DecodeError, Limits, StreamDecoder};

/// What went wrong while decoding one input.
#[derive(Debug, thiserror::Error)]
pub enum DecodeFailure {
    /// The bytes are not a valid stream. Everything before the error was
    /// already written out.
    #[error(transparent)]
    Corrupt(#[from] DecodeError),
    /// Reading the input or writing the output failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Counts of what one input held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecodeSummary {
    /// OCF files (headers) read.
    pub files: u64,
    /// MetricLists written.
    pub records: u64,
    /// Datapoints across them.
    pub datapoints: u64,
}

/// Decodes everything `input` holds and writes JSON lines to `output`.
/// Records are written as soon as their block is complete, so a corrupt
/// stream still yields everything before the corruption.
pub fn decode_to(
    mut input: impl Read,
    output: &mut impl Write,
    limits: Limits,
) -> Result<DecodeSummary, DecodeFailure> {
    let mut decoder = StreamDecoder::new(limits);
    let mut buf = bytes::BytesMut::with_capacity(64 * 1024);
    let mut summary = DecodeSummary::default();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match input.read(&mut chunk) {
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error.into()),
        };
        if n == 0 {
            output.flush()?;
            decoder.finish(&buf)?;
            summary.files = decoder.files();
            return Ok(summary);
        }
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(block)) => {
                    for record in &block.records {
                        serde_json::to_writer(&mut *output, record).map_err(io::Error::other)?;
                        output.write_all(b"\n")?;
                        summary.records += 1;
                        summary.datapoints += record.datapoints.len() as u64;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    output.flush()?;
                    return Err(error.into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schema::{Codec, Datapoint, MetricList, OcfEncoder, Tag};

    fn records() -> Vec<MetricList> {
        vec![MetricList {
            topic: "t".into(),
            tags: vec![Tag::new("k", "v")],
            datapoints: vec![Datapoint::new("d", 5, f64::INFINITY)],
        }]
    }

    #[test]
    fn prints_one_json_line_per_record() {
        let mut bytes = OcfEncoder::new(Codec::Snappy).file(&records());
        bytes.extend(OcfEncoder::new(Codec::Null).file(&records()));
        let mut out = Vec::new();
        let summary = decode_to(&bytes[..], &mut out, Limits::default()).unwrap();
        assert_eq!(
            summary,
            DecodeSummary {
                files: 2,
                records: 2,
                datapoints: 2
            }
        );
        let line = r#"{"topic":"t","tags":[{"key":"k","value":"v"}],"datapoints":[{"name":"d","time_ms":5,"value":"Infinity"}]}"#;
        assert_eq!(String::from_utf8(out).unwrap(), format!("{line}\n{line}\n"));
    }

    #[test]
    fn corrupt_input_keeps_what_came_before() {
        let mut bytes = OcfEncoder::new(Codec::Null).file(&records());
        let good = bytes.len();
        bytes.extend(b"Obj\x01garbage");
        let mut out = Vec::new();
        let err = decode_to(&bytes[..], &mut out, Limits::default()).unwrap_err();
        let DecodeFailure::Corrupt(err) = err else {
            panic!("{err}")
        };
        assert_eq!(err.offset, good as u64);
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 1);
    }
}

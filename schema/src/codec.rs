//! OCF block codecs: `null`, `deflate` (raw RFC 1951) and `snappy` (raw
//! snappy followed by the big-endian CRC32 of the uncompressed data).

use std::io::Read;

/// A block compression codec named in the OCF header's `avro.codec`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Blocks are stored as they are. The mesos module's only codec.
    #[default]
    Null,
    /// Raw deflate, with no zlib header.
    Deflate,
    /// Snappy, with a 4-byte CRC32 trailer.
    Snappy,
}

/// Why a block could not be decompressed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The compressed data is corrupt.
    #[error("{codec} data is corrupt: {reason}")]
    Corrupt {
        /// Codec name.
        codec: &'static str,
        /// What the decompressor said.
        reason: String,
    },
    /// The block would decompress to more than the limit.
    #[error("{codec} block decompresses to more than the {limit}-byte limit")]
    TooLarge {
        /// Codec name.
        codec: &'static str,
        /// The limit in force.
        limit: usize,
    },
    /// The snappy CRC32 trailer does not match the data.
    #[error("snappy CRC32 mismatch: trailer says {expected:08x}, data hashes to {actual:08x}")]
    CrcMismatch {
        /// From the trailer.
        expected: u32,
        /// Computed.
        actual: u32,
    },
}

impl Codec {
    /// Every codec, for tests and option parsing.
    pub const ALL: [Codec; 3] = [Codec::Null, Codec::Deflate, Codec::Snappy];

    /// The name written in `avro.codec`.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Null => "null",
            Codec::Deflate => "deflate",
            Codec::Snappy => "snappy",
        }
    }

    /// Parses an `avro.codec` value.
    pub fn from_name(name: &[u8]) -> Option<Codec> {
        match name {
            b"null" => Some(Codec::Null),
            b"deflate" => Some(Codec::Deflate),
            b"snappy" => Some(Codec::Snappy),
            _ => None,
        }
    }

    /// Appends the compressed form of `data` to `out`.
    pub fn compress(self, data: &[u8], out: &mut Vec<u8>) {
        match self {
            Codec::Null => out.extend_from_slice(data),
            Codec::Deflate => {
                let mut encoder =
                    flate2::write::DeflateEncoder::new(out, flate2::Compression::default());
                // Writing into a Vec cannot fail.
                let _ = std::io::Write::write_all(&mut encoder, data);
                let _ = encoder.finish();
            }
            Codec::Snappy => {
                let start = out.len();
                out.resize(start + snap::raw::max_compress_len(data.len()), 0);
                let written = snap::raw::Encoder::new()
                    .compress(data, &mut out[start..])
                    .expect("max_compress_len is enough room for any input");
                out.truncate(start + written);
                out.extend_from_slice(&crc32fast::hash(data).to_be_bytes());
            }
        }
    }

    /// Decompresses `data` into `scratch` (for `null`, returns `data` itself)
    /// and refuses anything that would grow past `limit` bytes.
    pub fn decompress<'a>(
        self,
        data: &'a [u8],
        limit: usize,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], CodecError> {
        scratch.clear();
        match self {
            Codec::Null => Ok(data),
            Codec::Deflate => {
                let decoder = flate2::read::DeflateDecoder::new(data);
                decoder
                    .take(limit as u64 + 1)
                    .read_to_end(scratch)
                    .map_err(|error| CodecError::Corrupt {
                        codec: "deflate",
                        reason: error.to_string(),
                    })?;
                if scratch.len() > limit {
                    return Err(CodecError::TooLarge {
                        codec: "deflate",
                        limit,
                    });
                }
                Ok(scratch)
            }
            Codec::Snappy => {
                let Some(split) = data.len().checked_sub(4) else {
                    return Err(CodecError::Corrupt {
                        codec: "snappy",
                        reason: "block shorter than its CRC32 trailer".into(),
                    });
                };
                let (payload, trailer) = data.split_at(split);
                let corrupt = |error: snap::Error| CodecError::Corrupt {
                    codec: "snappy",
                    reason: error.to_string(),
                };
                let len = snap::raw::decompress_len(payload).map_err(corrupt)?;
                if len > limit {
                    return Err(CodecError::TooLarge {
                        codec: "snappy",
                        limit,
                    });
                }
                scratch.resize(len, 0);
                let written = snap::raw::Decoder::new()
                    .decompress(payload, scratch)
                    .map_err(corrupt)?;
                scratch.truncate(written);
                let expected = u32::from_be_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
                let actual = crc32fast::hash(scratch);
                if expected != actual {
                    return Err(CodecError::CrcMismatch { expected, actual });
                }
                Ok(scratch)
            }
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Codec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Codec::from_name(s.as_bytes())
            .ok_or_else(|| format!("unknown codec {s:?}: expected null, deflate or snappy"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips() {
        let data: Vec<u8> = (0..10_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for codec in Codec::ALL {
            let mut packed = Vec::new();
            codec.compress(&data, &mut packed);
            let mut scratch = Vec::new();
            assert_eq!(
                codec.decompress(&packed, data.len(), &mut scratch).unwrap(),
                &data[..],
                "{codec}"
            );
        }
    }

    #[test]
    fn decompression_bombs_hit_the_limit() {
        let data = vec![0u8; 1 << 20];
        for codec in [Codec::Deflate, Codec::Snappy] {
            let mut packed = Vec::new();
            codec.compress(&data, &mut packed);
            let mut scratch = Vec::new();
            let err = codec.decompress(&packed, 1000, &mut scratch).unwrap_err();
            assert!(
                matches!(err, CodecError::TooLarge { limit: 1000, .. }),
                "{codec}: {err}"
            );
            assert!(scratch.len() <= 1001);
        }
    }

    #[test]
    fn snappy_checks_its_crc() {
        let mut packed = Vec::new();
        Codec::Snappy.compress(b"hello hello hello", &mut packed);
        let last = packed.len() - 1;
        packed[last] ^= 1;
        let err = Codec::Snappy
            .decompress(&packed, 100, &mut Vec::new())
            .unwrap_err();
        assert!(matches!(err, CodecError::CrcMismatch { .. }));
    }
}

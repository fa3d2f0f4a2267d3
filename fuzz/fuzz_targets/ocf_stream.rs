//! The OCF stream decoder, fed in arbitrary chunkings, as the TCP input
//! feeds it (`peek`, then `decode_view`): it never panics, every promise
//! `peek` makes holds, and it yields exactly what decoding the whole input
//! at once yields, records or error.

#![no_main]

use libfuzzer_sys::fuzz_target;
use schema::ocf::{BlockView, Next};
use schema::{Limits, StreamDecoder, decode_all};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size; the rest is the stream.
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk % 64) + 1;
    let limits = Limits {
        max_header_bytes: 4096,
        max_block_bytes: 1 << 16,
        max_decompressed_block_bytes: 1 << 17,
    };
    let whole = decode_all(stream, limits);
    let mut decoder = StreamDecoder::new(limits);
    // What has arrived, and where the undecoded part of it starts.
    let mut buf: Vec<u8> = Vec::new();
    let mut start = 0;
    let mut records = Vec::new();
    let mut result = Ok(());
    'feed: for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let (used, next) = match decoder.peek(&buf[start..]) {
                Ok(peeked) => peeked,
                Err(error) => {
                    result = Err(error);
                    break 'feed;
                }
            };
            start += used;
            let info = match next {
                Next::Block(info) => info,
                Next::Incomplete { needed } => {
                    if let Some(needed) = needed {
                        assert!(needed > buf.len() - start);
                    }
                    break;
                }
            };
            match decoder.decode_view(&buf[start..]) {
                Ok((used, Some(view))) => {
                    assert_eq!(used, info.wire_len);
                    let (count, data_len) = match &view {
                        BlockView::Raw(block) => (block.records.len(), block.data_len),
                        BlockView::Decoded(block) => (block.records.len(), block.data_len),
                    };
                    assert_eq!(count as u64, info.records);
                    if let Some(len) = info.data_len {
                        assert_eq!(len, data_len);
                    }
                    match view {
                        BlockView::Raw(block) => records
                            .extend(block.to_block().expect("a scanned block decodes").records),
                        BlockView::Decoded(block) => records.extend(block.records),
                    }
                    start += used;
                    decoder.release_scratch();
                }
                Ok((_, None)) => panic!("peek announced a block decode_view did not return"),
                Err(error) => {
                    result = Err(error);
                    break 'feed;
                }
            }
        }
    }
    let result = result.and_then(|()| decoder.finish(&buf[start..]));
    match (whole, result) {
        (Ok(want), Ok(())) => assert!(schema::arbitrary::same_records(&records, &want)),
        (Err(want), Err(got)) => assert_eq!(want, got),
        (want, got) => panic!("whole {:?} vs chunked {:?}", want.map(|r| r.len()), got),
    }
});

//! The disk spool's frame scanner (`collector::spool::frame`) on any bytes:
//! it never panics, what it reports covers the input in order without a
//! gap, every frame it returns re-encodes to exactly the bytes it was read
//! from, and a frame is cut short only when more bytes follow. The first
//! byte says whether they do.

#![no_main]

use collector::spool::frame::{Item, Scanner, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let more = flags & 1 == 1;
    let mut covered = 0;
    for item in Scanner::new(bytes, 1 << 16, more) {
        match item {
            Item::Frame { offset, len, frame } => {
                assert_eq!(offset, covered);
                let mut again = Vec::new();
                encode(&mut again, &frame);
                assert_eq!(&again[..], &bytes[offset..offset + len]);
                covered += len;
            }
            Item::Corrupt { offset, len, .. } => {
                assert_eq!(offset, covered);
                assert!(len > 0);
                covered += len;
            }
            Item::Incomplete { offset } => {
                assert!(more, "a frame cut short at the end of the segment");
                assert_eq!(offset, covered);
            }
        }
    }
    assert!(covered <= bytes.len());
});

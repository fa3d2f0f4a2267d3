//! The disk spool's cursor (`collector::spool::Cursor`) on any bytes: it
//! never panics, and a slot it accepts is written back to exactly the same
//! bytes. The first byte says whether the rest is a whole slot, or a slot's
//! body to which the target adds its CRC (so that the fuzzer explores what
//! lies past the checksum).

#![no_main]

use collector::spool::Cursor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let slot = if flags & 1 == 1 {
        let mut slot = bytes.to_vec();
        slot.extend_from_slice(&crc32c::crc32c(bytes).to_le_bytes());
        slot
    } else {
        bytes.to_vec()
    };
    if let Some((cursor, generation)) = Cursor::decode(&slot) {
        assert_eq!(cursor.encode(generation), slot, "re-encodes to its bytes");
        for seq in [0, 1, 63, 64, u64::MAX] {
            let _ = cursor.is_done(seq);
        }
    }
});

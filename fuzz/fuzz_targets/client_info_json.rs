//! ClientInfo JSON parsing never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = derpd::proto::ClientInfo::from_json(data);
});

//! STUN request parsing never panics; accepted requests get a bounded answer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tx) = derpd::stun::parse_binding_request(data) {
        let mut out = [0u8; derpd::stun::MAX_RESPONSE_LEN];
        let n = derpd::stun::binding_response(&tx, "127.0.0.1:1".parse().unwrap(), &mut out);
        assert!(n <= data.len().max(32));
    }
});

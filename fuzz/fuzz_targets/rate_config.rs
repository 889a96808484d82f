//! The derper rate-config JSON never panics the parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = derpd::config::parse_rate_config(data);
});

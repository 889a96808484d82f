//! Request-head parsing never panics, and a parsed head never claims more
//! bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, n))) = derpd::http::head::parse_head(data) {
        assert!(n <= data.len());
    }
});

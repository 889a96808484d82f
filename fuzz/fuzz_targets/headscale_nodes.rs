//! headscale's node-list answer: classification and parsing never panic, and
//! a 200 is exactly a parse of the body.
#![no_main]

use derpd::companion::headscale::{classify, parse_node_list};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((status, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let status = u16::from_be_bytes(*status) % 600;
    let _ = classify(status, body);
    let direct = parse_node_list(body);
    let via_200 = classify(200, body);
    assert_eq!(direct.is_ok(), via_200.is_ok());
});

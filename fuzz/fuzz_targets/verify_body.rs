//! `/verify` request bodies: answering never panics, and with no node cache
//! nothing is ever allowed.
#![no_main]

use derpd::companion::verify::{answer, Answer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let a = answer(None, data);
    assert!(!matches!(a, Answer::Allow(true)), "allowed with no cache");
});

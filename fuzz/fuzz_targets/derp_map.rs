//! The companion's DERP map file (JSON, or TOML when the first byte is odd):
//! parsing never panics, and an accepted map re-serializes to JSON that
//! parses back to the same map.
#![no_main]

use derpd::companion::derpmap::DerpMap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if let Ok(m) = DerpMap::parse(text, sel & 1 == 1) {
        let json = String::from_utf8(m.to_json()).unwrap();
        let back = DerpMap::parse(&json, false).expect("own JSON parses back");
        assert_eq!(back, m);
    }
});

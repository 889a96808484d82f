//! The tunnel's DERP map parser never panics, for any region filter, and
//! an accepted map always yields a relay to dial.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 4);
    if rest.len() < n {
        return;
    }
    let (ids, json) = rest.split_at(n);
    let regions: Vec<i64> = ids.iter().map(|&b| i64::from(b)).collect();
    if let Ok(relays) = derpd::tunnel::derpmap::parse(json, &regions) {
        assert!(!relays.is_empty());
    }
});

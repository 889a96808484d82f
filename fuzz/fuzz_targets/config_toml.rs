//! The TOML config file: parsing into `Settings` and resolving it (all
//! validation and defaults) never panics.
#![no_main]

use derpd::config::Settings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(s) = toml::from_str::<Settings>(text) {
        let _ = s.resolve();
    }
});

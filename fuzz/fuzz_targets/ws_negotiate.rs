//! The WebSocket upgrade negotiation never panics on arbitrary headers.
//! Input: first line is the method, then `name: value` lines.
#![no_main]

use derpd::http::websocket::negotiate;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let Some(method) = lines.next().and_then(|m| Method::from_bytes(m).ok()) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    if let Ok(acc) = negotiate(&method, &headers) {
        assert_eq!(acc.accept_key.len(), 28, "base64 of a SHA-1");
    }
});

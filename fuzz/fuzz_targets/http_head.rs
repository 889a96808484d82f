//! Request-head parsing and the upgrade decision never panic; a parsed head
//! never claims more bytes than it was given, and needs no more bytes than
//! it claims.
#![no_main]

use derpd::http::head::{parse_head, UpgradeKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((head, n))) = parse_head(data) {
        assert!(n <= data.len());
        assert!(matches!(parse_head(&data[..n]), Ok(Some((_, m))) if m == n));
        let _ = head.check_framing();
        let kind = head.upgrade_kind();
        if head.is_raw_derp_upgrade() {
            assert_eq!(kind, UpgradeKind::RawDerp);
        }
        assert_eq!(head.is_websocket_derp(), kind == UpgradeKind::WebSocketDerp);
    }
});

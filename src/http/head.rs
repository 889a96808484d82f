//! Parsing the first request head of a connection (with `httparse`), so a
//! DERP upgrade can be answered byte-exactly and hand the raw socket, plus
//! whatever the client pipelined after the head, to the relay.

/// Largest request head accepted.
pub const MAX_HEAD_LEN: usize = 16 << 10;
/// Most headers accepted in one request.
pub const MAX_HEADERS: usize = 64;

/// The parts of a request head the front door decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// `Upgrade` header value, lower-cased.
    pub upgrade: Option<String>,
    /// `Sec-WebSocket-Protocol` header value.
    pub ws_protocol: Option<String>,
    /// `Derp-Fast-Start: 1` was sent.
    pub fast_start: bool,
    /// An `Ideal-Node` header was sent.
    pub ideal_node: bool,
    /// HTTP/1.1 (not 1.0).
    pub http11: bool,
    /// How many `Host` headers were sent.
    pub hosts: usize,
    /// Every `Content-Length` value, trimmed.
    pub content_lengths: Vec<String>,
    /// Every `Transfer-Encoding` value, trimmed.
    pub transfer_encodings: Vec<String>,
}

/// Why a well-formed head is refused, as Go's `net/http` refuses it: the
/// framing rules proxies disagree on are where request smuggling lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// HTTP/1.1 without exactly one `Host` header.
    #[error("missing or repeated Host header")]
    Host,
    /// A `Content-Length` that is not one non-negative number below 2^63.
    #[error("bad or repeated Content-Length")]
    ContentLength,
    /// Repeated `Transfer-Encoding`, or one next to a `Content-Length`.
    #[error("ambiguous Transfer-Encoding")]
    TransferEncoding,
    /// A `Transfer-Encoding` other than `chunked` (Go answers 501).
    #[error("unsupported Transfer-Encoding")]
    UnsupportedTransferEncoding,
}

impl FramingError {
    /// The HTTP status to answer with.
    pub fn status(self) -> u16 {
        match self {
            FramingError::UnsupportedTransferEncoding => 501,
            _ => 400,
        }
    }

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            FramingError::Host => "missing_host",
            FramingError::ContentLength => "bad_content_length",
            FramingError::TransferEncoding => "bad_transfer_encoding",
            FramingError::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
        }
    }
}

impl RequestHead {
    /// Checks the framing headers: one `Host` (HTTP/1.1), at most one
    /// `Content-Length` of 0..2^63, at most one `Transfer-Encoding`, which
    /// must be `chunked` and not sent along with a `Content-Length`.
    pub fn check_framing(&self) -> Result<(), FramingError> {
        if self.http11 && self.hosts != 1 || self.hosts > 1 {
            return Err(FramingError::Host);
        }
        match self.content_lengths.as_slice() {
            [] => {}
            [v] if !v.is_empty()
                && v.len() <= 19
                && v.bytes().all(|b| b.is_ascii_digit())
                && v.parse::<i64>().is_ok() => {}
            _ => return Err(FramingError::ContentLength),
        }
        match self.transfer_encodings.as_slice() {
            [] => Ok(()),
            [_] if !self.content_lengths.is_empty() => Err(FramingError::TransferEncoding),
            [te] if te.eq_ignore_ascii_case("chunked") => Ok(()),
            [_] => Err(FramingError::UnsupportedTransferEncoding),
            _ => Err(FramingError::TransferEncoding),
        }
    }
}

/// Why a head could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Not HTTP/1.x syntax.
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    /// More than [`MAX_HEAD_LEN`] bytes without the end of the head.
    #[error("request head larger than {MAX_HEAD_LEN} bytes")]
    TooLarge,
}

impl RequestHead {
    /// Whether this is a raw DERP upgrade of `/derp`.
    pub fn is_raw_derp_upgrade(&self) -> bool {
        self.path == "/derp" && self.upgrade_kind() == UpgradeKind::RawDerp
    }

    /// Whether this asks for DERP over WebSocket (subprotocol `derp`).
    pub fn is_websocket_derp(&self) -> bool {
        self.upgrade_kind() == UpgradeKind::WebSocketDerp
    }

    /// What kind of upgrade the request asks for.
    pub fn upgrade_kind(&self) -> UpgradeKind {
        upgrade_kind(self.upgrade.as_deref(), self.ws_protocol.as_deref())
    }
}

/// What a request to `/derp` asks to upgrade to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeKind {
    /// The DERP byte stream right after the HTTP response (`Upgrade: DERP`,
    /// or the legacy `Upgrade: websocket` without the `derp` subprotocol).
    RawDerp,
    /// DERP carried in WebSocket binary messages (subprotocol `derp`).
    WebSocketDerp,
    /// No (known) upgrade: answered 426.
    None,
}

/// Decides the upgrade from the `Upgrade` and `Sec-WebSocket-Protocol`
/// header values, as Tailscale's relay does. Shared by the first-request
/// path and the hyper path so the two can never disagree.
pub fn upgrade_kind(upgrade: Option<&str>, ws_protocol: Option<&str>) -> UpgradeKind {
    let upgrade = upgrade.map(str::trim);
    if upgrade.is_some_and(|u| u.eq_ignore_ascii_case("derp")) {
        return UpgradeKind::RawDerp;
    }
    if !upgrade.is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
        return UpgradeKind::None;
    }
    if ws_protocol.is_some_and(|p| p.contains("derp")) {
        UpgradeKind::WebSocketDerp
    } else {
        UpgradeKind::RawDerp
    }
}

/// Parses a request head from the start of `buf`.
///
/// `Ok(None)`: incomplete, read more. `Ok(Some((head, n)))`: the head is
/// `buf[..n]`; anything after it belongs to the body or the DERP stream.
pub fn parse_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_LEN => {
            return Err(HeadError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    if n > MAX_HEAD_LEN {
        return Err(HeadError::TooLarge);
    }
    let all = |name: &str| -> Vec<String> {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
            .collect()
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
    };
    let target = req.path.unwrap_or("/");
    let path = target.split('?').next().unwrap_or("/").to_owned();
    Ok(Some((
        RequestHead {
            method: req.method.unwrap_or("").to_owned(),
            path,
            upgrade: header("upgrade").map(|u| u.to_ascii_lowercase()),
            ws_protocol: header("sec-websocket-protocol"),
            fast_start: header("derp-fast-start").as_deref() == Some("1"),
            ideal_node: header("ideal-node").is_some(),
            http11: req.version == Some(1),
            hosts: all("host").len(),
            content_lengths: all("content-length"),
            transfer_encodings: all("transfer-encoding"),
        },
        n,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_client_upgrade_with_pipelined_bytes() {
        let req = b"GET /derp HTTP/1.1\r\nHost: derp.example.com\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nIdeal-Node: 900a\r\n\r\n\x02\x00\x00";
        let (head, n) = parse_head(req).unwrap().unwrap();
        assert_eq!(&req[n..], b"\x02\x00\x00");
        assert!(head.is_raw_derp_upgrade());
        assert!(head.ideal_node);
        assert!(!head.fast_start);
    }

    #[test]
    fn post_upgrade_and_fast_start() {
        let req = b"POST /derp HTTP/1.1\r\nHost: 127.0.0.1:3340\r\nupgrade: derp\r\nDerp-Fast-Start: 1\r\n\r\n";
        let (head, _) = parse_head(req).unwrap().unwrap();
        assert!(head.is_raw_derp_upgrade());
        assert!(head.fast_start);
    }

    #[test]
    fn websocket_variants() {
        let ws =
            b"GET /derp HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Protocol: derp\r\n\r\n";
        let (head, _) = parse_head(ws).unwrap().unwrap();
        assert!(head.is_websocket_derp());
        assert!(!head.is_raw_derp_upgrade());
        let legacy = b"GET /derp HTTP/1.1\r\nUpgrade: WebSocket\r\n\r\n";
        let (head, _) = parse_head(legacy).unwrap().unwrap();
        assert!(head.is_raw_derp_upgrade());
    }

    #[test]
    fn framing_follows_go() {
        let check = |head: &str| {
            let req = format!("{head}\r\n\r\n");
            parse_head(req.as_bytes())
                .unwrap()
                .unwrap()
                .0
                .check_framing()
        };
        let ok = "GET /derp HTTP/1.1\r\nHost: x";
        assert_eq!(check(ok), Ok(()));
        assert_eq!(check("GET / HTTP/1.0"), Ok(()), "HTTP/1.0 needs no Host");
        assert_eq!(check("GET / HTTP/1.1"), Err(FramingError::Host));
        assert_eq!(check(&format!("{ok}\r\nHost: y")), Err(FramingError::Host));
        assert_eq!(check(&format!("{ok}\r\nContent-Length: 0")), Ok(()));
        for bad in [
            "-1",
            "18446744073709551616",
            "9223372036854775808",
            "1e3",
            "",
            "+5",
            "0x10",
        ] {
            assert_eq!(
                check(&format!("{ok}\r\nContent-Length: {bad}")),
                Err(FramingError::ContentLength),
                "{bad}"
            );
        }
        assert_eq!(
            check(&format!("{ok}\r\nContent-Length: 5\r\nContent-Length: 5")),
            Err(FramingError::ContentLength)
        );
        assert_eq!(
            check(&format!("{ok}\r\nTransfer-Encoding: chunked")),
            Ok(())
        );
        assert_eq!(
            check(&format!("{ok}\r\nTransfer-Encoding: Chunked")),
            Ok(())
        );
        for te in ["gzip", "gzip, chunked", "chunked, chunked", "identity"] {
            assert_eq!(
                check(&format!("{ok}\r\nTransfer-Encoding: {te}")),
                Err(FramingError::UnsupportedTransferEncoding),
                "{te}"
            );
        }
        assert_eq!(
            check(&format!(
                "{ok}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
            )),
            Err(FramingError::TransferEncoding)
        );
        assert_eq!(
            check(&format!(
                "{ok}\r\nTransfer-Encoding: chunked\r\nContent-Length: 3"
            )),
            Err(FramingError::TransferEncoding)
        );
    }

    #[test]
    fn partial_oversized_and_garbage() {
        assert_eq!(parse_head(b"GET /derp HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD_LEN + 10, b'a');
        assert_eq!(parse_head(&big), Err(HeadError::TooLarge));
        assert!(matches!(
            parse_head(b"\x16\x03\x01\x02\x00garbage\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        let path_only = b"GET /derp?x=1 HTTP/1.1\r\n\r\n";
        assert_eq!(parse_head(path_only).unwrap().unwrap().0.path, "/derp");
    }
}

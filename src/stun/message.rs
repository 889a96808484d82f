//! STUN messages, free of I/O: recognising a Tailscale binding request and
//! writing the answer. Pure, allocation-free and panic-free on any input, so
//! unit tests and the fuzzer call it directly.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The STUN magic cookie (RFC 5389), bytes 4–7 of every STUN message.
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// Length of the fixed STUN message header.
pub const HEADER_LEN: usize = 20;
/// Size of the largest response we ever send (IPv6 source).
pub const MAX_RESPONSE_LEN: usize = 44;
/// Size of a response to an IPv4 source.
pub const IPV4_RESPONSE_LEN: usize = 32;

pub(crate) const BINDING_REQUEST: [u8; 2] = [0x00, 0x01];
pub(crate) const BINDING_SUCCESS: [u8; 2] = [0x01, 0x01];
pub(crate) const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
pub(crate) const ATTR_SOFTWARE: u16 = 0x8022;
pub(crate) const ATTR_FINGERPRINT: u16 = 0x8028;
pub(crate) const SOFTWARE_VALUE: &[u8] = b"tailnode";
const FINGERPRINT_XOR: u32 = 0x5354_554E;
pub(crate) const FAMILY_IPV4: u8 = 0x01;
pub(crate) const FAMILY_IPV6: u8 = 0x02;

/// A 96-bit STUN transaction ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TxId(pub [u8; 12]);

/// Why a datagram was not accepted as a Tailscale binding request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StunError {
    /// Shorter than the 20-byte STUN header.
    TooShort,
    /// Top two bits of byte 0 are set or the magic cookie is wrong.
    NotStun,
    /// A STUN message, but not a Binding Request (type `0x0001`).
    NotBindingRequest,
    /// The attributes after the header are not well-formed TLVs.
    MalformedAttribute,
    /// No `SOFTWARE` attribute at all.
    MissingSoftware,
    /// `SOFTWARE` present, but none with the exact value `tailnode`.
    WrongSoftware,
    /// The last attribute is not `FINGERPRINT`.
    MissingFingerprint,
    /// `FINGERPRINT` has the wrong length or does not match the message CRC.
    BadFingerprint,
}

impl fmt::Display for StunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StunError::TooShort => "packet shorter than a STUN header",
            StunError::NotStun => "not a STUN packet",
            StunError::NotBindingRequest => "not a STUN binding request",
            StunError::MalformedAttribute => "malformed STUN attributes",
            StunError::MissingSoftware => "missing SOFTWARE attribute",
            StunError::WrongSoftware => "SOFTWARE attribute is not tailnode",
            StunError::MissingFingerprint => "last attribute is not FINGERPRINT",
            StunError::BadFingerprint => "FINGERPRINT mismatch",
        })
    }
}

impl std::error::Error for StunError {}

/// Reports whether `pkt` is shaped like a STUN message: at least 20 bytes,
/// the top two bits of byte 0 clear, and the magic cookie in bytes 4–7.
pub fn is_stun_packet(pkt: &[u8]) -> bool {
    check_stun_header(pkt).is_ok()
}

fn check_stun_header(pkt: &[u8]) -> Result<(), StunError> {
    if pkt.len() < HEADER_LEN {
        return Err(StunError::TooShort);
    }
    match (pkt.first(), pkt.get(4..8)) {
        (Some(b0), Some(cookie)) if b0 & 0b1100_0000 == 0 && cookie == MAGIC_COOKIE => Ok(()),
        _ => Err(StunError::NotStun),
    }
}

pub(crate) fn fingerprint(msg: &[u8]) -> u32 {
    crc32fast::hash(msg) ^ FINGERPRINT_XOR
}

/// Parses a Tailscale STUN Binding Request and returns its transaction ID.
///
/// Accepts only requests with a `SOFTWARE` attribute equal to `tailnode` and
/// a correct `FINGERPRINT` as the last attribute. The header length field is
/// not cross-checked against the datagram length.
pub fn parse_binding_request(pkt: &[u8]) -> Result<TxId, StunError> {
    check_stun_header(pkt)?;
    if pkt.get(0..2) != Some(&BINDING_REQUEST[..]) {
        return Err(StunError::NotBindingRequest);
    }
    let mut tx = [0u8; 12];
    tx.copy_from_slice(pkt.get(8..HEADER_LEN).ok_or(StunError::TooShort)?);

    let mut rest = pkt.get(HEADER_LEN..).ok_or(StunError::TooShort)?;
    let mut offset = HEADER_LEN;
    let mut software_seen = false;
    let mut software_ok = false;
    // (type, offset of the attribute header, value) of the last attribute.
    let mut last: Option<(u16, usize, &[u8])> = None;

    while !rest.is_empty() {
        let [t0, t1, l0, l1, tail @ ..] = rest else {
            return Err(StunError::MalformedAttribute);
        };
        let attr_type = u16::from_be_bytes([*t0, *t1]);
        let len = usize::from(u16::from_be_bytes([*l0, *l1]));
        let padded = (len + 3) & !3;
        let value = tail.get(..len).ok_or(StunError::MalformedAttribute)?;
        let after = tail.get(padded..).ok_or(StunError::MalformedAttribute)?;

        if attr_type == ATTR_SOFTWARE {
            software_seen = true;
            software_ok |= value == SOFTWARE_VALUE;
        }
        last = Some((attr_type, offset, value));
        offset += 4 + padded;
        rest = after;
    }

    if !software_ok {
        return Err(if software_seen {
            StunError::WrongSoftware
        } else {
            StunError::MissingSoftware
        });
    }
    let (fp_start, fp_value) = match last {
        Some((ATTR_FINGERPRINT, start, value)) => (start, value),
        _ => return Err(StunError::MissingFingerprint),
    };
    let got: [u8; 4] = fp_value.try_into().map_err(|_| StunError::BadFingerprint)?;
    let covered = pkt.get(..fp_start).ok_or(StunError::BadFingerprint)?;
    if u32::from_be_bytes(got) != fingerprint(covered) {
        return Err(StunError::BadFingerprint);
    }
    Ok(TxId(tx))
}

/// Writes a Binding Success response for transaction `tx` telling the client
/// its address is `addr`, and returns the number of bytes written (32 for
/// IPv4, including IPv4-mapped IPv6 addresses, or 44 for IPv6).
///
/// The response holds exactly one `XOR-MAPPED-ADDRESS` attribute.
pub fn binding_response(tx: &TxId, addr: SocketAddr, out: &mut [u8; MAX_RESPONSE_LEN]) -> usize {
    let ip = unmap(addr.ip());
    let (family, addr_len): (u8, u16) = match ip {
        IpAddr::V4(_) => (FAMILY_IPV4, 4),
        IpAddr::V6(_) => (FAMILY_IPV6, 16),
    };
    let attr_len = 4 + addr_len;
    let body_len = 4 + attr_len;
    let total = HEADER_LEN + usize::from(body_len);

    out[0..2].copy_from_slice(&BINDING_SUCCESS);
    out[2..4].copy_from_slice(&body_len.to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE);
    out[8..20].copy_from_slice(&tx.0);
    out[20..22].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    out[22..24].copy_from_slice(&attr_len.to_be_bytes());
    out[24] = 0;
    out[25] = family;
    let port = addr.port() ^ u16::from_be_bytes([MAGIC_COOKIE[0], MAGIC_COOKIE[1]]);
    out[26..28].copy_from_slice(&port.to_be_bytes());

    // XOR key: cookie followed by the transaction ID (only the cookie is used for IPv4).
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE);
    key[4..].copy_from_slice(&tx.0);
    match ip {
        IpAddr::V4(v4) => xor_into(&mut out[28..32], &v4.octets(), &key),
        IpAddr::V6(v6) => xor_into(&mut out[28..44], &v6.octets(), &key),
    }
    total
}

fn xor_into(dst: &mut [u8], src: &[u8], key: &[u8]) {
    for ((d, s), k) in dst.iter_mut().zip(src).zip(key) {
        *d = s ^ k;
    }
}

/// Maps `::ffff:a.b.c.d` to `a.b.c.d`; other addresses are returned unchanged.
pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytecodec::{DecodeExt, EncodeExt};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};
    use stun_codec::rfc5389::attributes::{Fingerprint, Software, XorMappedAddress};
    use stun_codec::rfc5389::{methods::BINDING, Attribute};
    use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId};

    const TX: TxId = TxId([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);

    /// A Tailscale binding request, byte for byte; the fingerprint was
    /// computed independently (Python `zlib.crc32(...) ^ 0x5354554e`).
    pub(crate) const TS_REQUEST: [u8; 40] = [
        0x00, 0x01, 0x00, 0x14, // Binding Request, length 20
        0x21, 0x12, 0xA4, 0x42, // cookie
        1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, // txid
        0x80, 0x22, 0x00, 0x08, b't', b'a', b'i', b'l', b'n', b'o', b'd', b'e', // SOFTWARE
        0x80, 0x28, 0x00, 0x04, 0xB3, 0x2C, 0x37, 0x0F, // FINGERPRINT
    ];

    /// Builds header + attributes (+ a correct FINGERPRINT if `fp`).
    fn build(msg_type: [u8; 2], tx: &TxId, attrs: &[(u16, &[u8])], fp: bool) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&msg_type);
        v.extend_from_slice(&[0, 0]);
        v.extend_from_slice(&MAGIC_COOKIE);
        v.extend_from_slice(&tx.0);
        for (t, val) in attrs {
            v.extend_from_slice(&t.to_be_bytes());
            v.extend_from_slice(&(val.len() as u16).to_be_bytes());
            v.extend_from_slice(val);
            while v.len() % 4 != 0 {
                v.push(0);
            }
        }
        let body = v.len() - HEADER_LEN + if fp { 8 } else { 0 };
        v[2..4].copy_from_slice(&(body as u16).to_be_bytes());
        if fp {
            let crc = fingerprint(&v);
            v.extend_from_slice(&[0x80, 0x28, 0x00, 0x04]);
            v.extend_from_slice(&crc.to_be_bytes());
        }
        v
    }

    pub(crate) fn encode_with_stun_codec(
        tx: [u8; 12],
        software: Option<&str>,
        fp: bool,
    ) -> Vec<u8> {
        let mut msg =
            Message::<Attribute>::new(MessageClass::Request, BINDING, TransactionId::new(tx));
        if let Some(s) = software {
            msg.add_attribute(Software::new(s.to_owned()).expect("software"));
        }
        if fp {
            let f = Fingerprint::new(&msg).expect("fingerprint");
            msg.add_attribute(f);
        }
        MessageEncoder::new()
            .encode_into_bytes(msg)
            .expect("encode")
    }

    pub(crate) fn decode_with_stun_codec(bytes: &[u8]) -> Message<Attribute> {
        MessageDecoder::<Attribute>::new()
            .decode_from_bytes(bytes)
            .expect("decode")
            .expect("broken message")
    }

    #[test]
    fn hand_built_tailscale_request_parses() {
        assert_eq!(parse_binding_request(&TS_REQUEST), Ok(TX));
        assert!(is_stun_packet(&TS_REQUEST));
        // Our test builder and the third-party encoder produce the same bytes.
        assert_eq!(
            build(BINDING_REQUEST, &TX, &[(ATTR_SOFTWARE, b"tailnode")], true),
            TS_REQUEST
        );
        assert_eq!(
            encode_with_stun_codec(TX.0, Some("tailnode"), true),
            TS_REQUEST
        );
        // And the third-party decoder validates its fingerprint.
        let m = decode_with_stun_codec(&TS_REQUEST);
        assert_eq!(m.transaction_id().as_bytes(), &TX.0);
    }

    #[test]
    fn ipv4_response_bytes() {
        let mut out = [0xEE; MAX_RESPONSE_LEN];
        let addr: SocketAddr = "192.0.2.1:32853".parse().unwrap();
        let n = binding_response(&TX, addr, &mut out);
        let want: [u8; 32] = [
            0x01, 0x01, 0x00, 0x0C, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
            0x00, 0x20, 0x00, 0x08, // XOR-MAPPED-ADDRESS, len 8
            0x00, 0x01, 0xA1, 0x47, // reserved, IPv4, 32853 ^ 0x2112
            0xE1, 0x12, 0xA6, 0x43, // 192.0.2.1 ^ cookie
        ];
        assert_eq!(n, IPV4_RESPONSE_LEN);
        assert_eq!(&out[..n], &want[..]);
    }

    #[test]
    fn ipv6_response_bytes() {
        let mut out = [0xEE; MAX_RESPONSE_LEN];
        let addr: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let n = binding_response(&TX, addr, &mut out);
        let want: [u8; 44] = [
            0x01, 0x01, 0x00, 0x18, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
            0x00, 0x20, 0x00, 0x14, // XOR-MAPPED-ADDRESS, len 20
            0x00, 0x02, 0x20, 0xA9, // reserved, IPv6, 443 ^ 0x2112
            0x01, 0x13, 0xA9, 0xFA, // 2001:0db8 ^ cookie
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0D, // ^ txid
        ];
        assert_eq!(n, MAX_RESPONSE_LEN);
        assert_eq!(out, want);
    }

    #[test]
    fn ipv4_mapped_source_answered_as_ipv4() {
        let mapped = SocketAddr::V6(SocketAddrV6::new(
            Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped(),
            32853,
            0,
            0,
        ));
        let plain: SocketAddr = "192.0.2.1:32853".parse().unwrap();
        let (mut a, mut b) = ([0; MAX_RESPONSE_LEN], [0; MAX_RESPONSE_LEN]);
        let na = binding_response(&TX, mapped, &mut a);
        let nb = binding_response(&TX, plain, &mut b);
        assert_eq!(na, 32);
        assert_eq!(a[..na], b[..nb]);
        assert_eq!(a[25], FAMILY_IPV4);
    }

    #[test]
    fn responses_decode_with_third_party_decoder() {
        for addr in [
            "198.51.100.7:1".parse::<SocketAddr>().unwrap(),
            "[2001:db8:1:2:3:4:5:6]:65535".parse().unwrap(),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 3478),
        ] {
            let mut out = [0; MAX_RESPONSE_LEN];
            let n = binding_response(&TX, addr, &mut out);
            let m = decode_with_stun_codec(&out[..n]);
            assert_eq!(m.class(), MessageClass::SuccessResponse);
            assert_eq!(m.method(), BINDING);
            assert_eq!(m.transaction_id().as_bytes(), &TX.0);
            assert_eq!(m.attributes().count(), 1);
            let x = m.get_attribute::<XorMappedAddress>().expect("xor-mapped");
            assert_eq!(x.address(), addr);
        }
    }

    #[test]
    fn is_stun_packet_rules() {
        let mut p = TS_REQUEST;
        assert!(is_stun_packet(&p[..20]));
        assert!(!is_stun_packet(&p[..19]));
        assert!(!is_stun_packet(&[]));
        p[0] = 0x20; // still STUN-shaped
        assert!(is_stun_packet(&p));
        p[0] = 0x40;
        assert!(!is_stun_packet(&p));
        p[0] = 0xF0;
        assert!(!is_stun_packet(&p));
        p[0] = 0x80;
        assert!(!is_stun_packet(&p));
        let mut q = TS_REQUEST;
        q[7] ^= 1;
        assert!(!is_stun_packet(&q));
    }

    #[test]
    fn error_too_short() {
        assert_eq!(parse_binding_request(&[]), Err(StunError::TooShort));
        assert_eq!(
            parse_binding_request(&TS_REQUEST[..19]),
            Err(StunError::TooShort)
        );
    }

    #[test]
    fn error_not_stun() {
        let mut p = TS_REQUEST;
        p[0] = 0x40;
        assert_eq!(parse_binding_request(&p), Err(StunError::NotStun));
        let mut p = TS_REQUEST;
        p[0] = 0xC0;
        assert_eq!(parse_binding_request(&p), Err(StunError::NotStun));
        let mut p = TS_REQUEST;
        p[4] = 0x00; // wrong cookie
        assert_eq!(parse_binding_request(&p), Err(StunError::NotStun));
    }

    #[test]
    fn error_not_binding_request() {
        // 0x20 in byte 0 passes the STUN shape check but is not type 0x0001.
        let mut p = TS_REQUEST;
        p[0] = 0x20;
        assert_eq!(parse_binding_request(&p), Err(StunError::NotBindingRequest));
        // A well-formed Binding Success (0x0101) is not a request either.
        let p = build(BINDING_SUCCESS, &TX, &[(ATTR_SOFTWARE, b"tailnode")], true);
        assert_eq!(parse_binding_request(&p), Err(StunError::NotBindingRequest));
        // Binding indication 0x0011.
        let p = build([0x00, 0x11], &TX, &[(ATTR_SOFTWARE, b"tailnode")], true);
        assert_eq!(parse_binding_request(&p), Err(StunError::NotBindingRequest));
    }

    #[test]
    fn error_malformed_attribute() {
        // Attribute header cut short (2 bytes after the header).
        assert_eq!(
            parse_binding_request(&TS_REQUEST[..22]),
            Err(StunError::MalformedAttribute)
        );
        // Truncated value: FINGERPRINT declares 4 bytes, only 2 present.
        assert_eq!(
            parse_binding_request(&TS_REQUEST[..38]),
            Err(StunError::MalformedAttribute)
        );
        // Value fits but its padding does not: 5-byte value needs 8 bytes.
        let mut p = build(BINDING_REQUEST, &TX, &[(ATTR_SOFTWARE, b"tailnode")], true);
        p.extend_from_slice(&[0x00, 0x99, 0x00, 0x05, 1, 2, 3, 4, 5]);
        assert_eq!(
            parse_binding_request(&p),
            Err(StunError::MalformedAttribute)
        );
        // Length field far beyond the packet.
        let mut p = TS_REQUEST;
        p[22] = 0xFF;
        assert_eq!(
            parse_binding_request(&p),
            Err(StunError::MalformedAttribute)
        );
    }

    #[test]
    fn error_missing_software() {
        let p = build(BINDING_REQUEST, &TX, &[], true);
        assert_eq!(parse_binding_request(&p), Err(StunError::MissingSoftware));
        // Bare header.
        assert_eq!(
            parse_binding_request(&p[..HEADER_LEN]),
            Err(StunError::MissingSoftware)
        );
        // What a generic (non-Tailscale) client sends.
        let p = encode_with_stun_codec(TX.0, None, true);
        assert_eq!(parse_binding_request(&p), Err(StunError::MissingSoftware));
    }

    #[test]
    fn error_wrong_software() {
        for v in [&b"other"[..], b"tailnod", b"tailnodes", b"TAILNODE", b""] {
            let p = build(BINDING_REQUEST, &TX, &[(ATTR_SOFTWARE, v)], true);
            assert_eq!(parse_binding_request(&p), Err(StunError::WrongSoftware));
        }
        let p = encode_with_stun_codec(TX.0, Some("other"), true);
        assert_eq!(parse_binding_request(&p), Err(StunError::WrongSoftware));
        // A second, correct SOFTWARE is enough.
        let p = build(
            BINDING_REQUEST,
            &TX,
            &[(ATTR_SOFTWARE, b"other"), (ATTR_SOFTWARE, b"tailnode")],
            true,
        );
        assert_eq!(parse_binding_request(&p), Ok(TX));
    }

    #[test]
    fn error_missing_fingerprint() {
        // No fingerprint at all.
        let p = build(BINDING_REQUEST, &TX, &[(ATTR_SOFTWARE, b"tailnode")], false);
        assert_eq!(
            parse_binding_request(&p),
            Err(StunError::MissingFingerprint)
        );
        // Fingerprint present but not last (correct CRC of what precedes it).
        let mut p = build(BINDING_REQUEST, &TX, &[(ATTR_SOFTWARE, b"tailnode")], true);
        p.extend_from_slice(&[0x00, 0x99, 0x00, 0x04, 0, 0, 0, 0]);
        assert_eq!(
            parse_binding_request(&p),
            Err(StunError::MissingFingerprint)
        );
        let p = encode_with_stun_codec(TX.0, Some("tailnode"), false);
        assert_eq!(
            parse_binding_request(&p),
            Err(StunError::MissingFingerprint)
        );
    }

    #[test]
    fn error_bad_fingerprint() {
        let mut p = TS_REQUEST;
        p[39] ^= 0x01;
        assert_eq!(parse_binding_request(&p), Err(StunError::BadFingerprint));
        // Changing a covered byte (the txid) invalidates the fingerprint.
        let mut p = TS_REQUEST;
        p[10] ^= 0x80;
        assert_eq!(parse_binding_request(&p), Err(StunError::BadFingerprint));
        // Raw CRC without the 0x5354554E XOR.
        let mut p = TS_REQUEST;
        let raw = crc32fast::hash(&p[..32]);
        p[36..40].copy_from_slice(&raw.to_be_bytes());
        assert_eq!(parse_binding_request(&p), Err(StunError::BadFingerprint));
        // FINGERPRINT of the wrong length.
        let p = build(
            BINDING_REQUEST,
            &TX,
            &[(ATTR_SOFTWARE, b"tailnode"), (ATTR_FINGERPRINT, &[0; 8])],
            false,
        );
        assert_eq!(parse_binding_request(&p), Err(StunError::BadFingerprint));
    }

    #[test]
    fn accepts_extra_attributes_and_ignores_header_length() {
        let p = build(
            BINDING_REQUEST,
            &TX,
            &[
                (0x0024, &[1, 2, 3, 4]),
                (ATTR_SOFTWARE, b"tailnode"),
                (0x8029, &[9; 3]),
            ],
            true,
        );
        assert_eq!(parse_binding_request(&p), Ok(TX));
        // The header length field is not cross-checked (only covered by the CRC).
        let mut p = build(BINDING_REQUEST, &TX, &[(ATTR_SOFTWARE, b"tailnode")], false);
        p[2..4].copy_from_slice(&[0x12, 0x34]);
        let crc = fingerprint(&p);
        p.extend_from_slice(&[0x80, 0x28, 0x00, 0x04]);
        p.extend_from_slice(&crc.to_be_bytes());
        assert_eq!(parse_binding_request(&p), Ok(TX));
    }

    /// Independent check that an accepted packet really is well-formed.
    fn looks_valid(p: &[u8], tx: &TxId) -> bool {
        let n = p.len();
        n >= 40
            && p[0..2] == BINDING_REQUEST
            && p[4..8] == MAGIC_COOKIE
            && p[8..20] == tx.0
            && p[n - 8..n - 4] == [0x80, 0x28, 0x00, 0x04]
            && p[n - 4..] == fingerprint(&p[..n - 8]).to_be_bytes()
            && p.windows(12)
                .any(|w| w[..4] == [0x80, 0x22, 0x00, 0x08] && &w[4..] == SOFTWARE_VALUE)
    }

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
    }

    #[test]
    fn fuzz_never_panics_and_only_accepts_valid() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut accepted = 0;

        // Every single-bit flip of a valid request is rejected (CRC-32
        // detects all single-bit errors; flips in the attribute headers
        // break the structure).
        for i in 0..TS_REQUEST.len() * 8 {
            let mut p = TS_REQUEST;
            p[i / 8] ^= 1 << (i % 8);
            assert!(parse_binding_request(&p).is_err(), "bit {i} accepted");
        }
        // Every truncation is rejected.
        for n in 0..TS_REQUEST.len() {
            assert!(parse_binding_request(&TS_REQUEST[..n]).is_err());
        }

        for round in 0..6000 {
            let p: Vec<u8> = match round % 4 {
                // Pure noise.
                0 => (0..rng.below(80)).map(|_| rng.byte()).collect(),
                // Valid header, random tail.
                1 => {
                    let mut p = TS_REQUEST[..20].to_vec();
                    p.extend((0..rng.below(64)).map(|_| rng.byte()));
                    p
                }
                // Random mutations of the valid request.
                2 => {
                    let mut p = TS_REQUEST.to_vec();
                    for _ in 0..=rng.below(4) {
                        match rng.below(4) {
                            0 => {
                                let i = rng.below(p.len().max(1));
                                if let Some(b) = p.get_mut(i) {
                                    *b = rng.byte();
                                }
                            }
                            1 => p.truncate(rng.below(p.len() + 1)),
                            2 => p.push(rng.byte()),
                            _ => {
                                let i = rng.below(p.len() + 1);
                                p.insert(i, rng.byte());
                            }
                        }
                    }
                    p
                }
                // Freshly built valid requests with random txid and extra attributes.
                _ => {
                    let mut tx = [0u8; 12];
                    tx.iter_mut().for_each(|b| *b = rng.byte());
                    let extra: Vec<u8> = (0..rng.below(10)).map(|_| rng.byte()).collect();
                    let p = build(
                        BINDING_REQUEST,
                        &TxId(tx),
                        &[(0x8023, &extra), (ATTR_SOFTWARE, b"tailnode")],
                        true,
                    );
                    assert_eq!(parse_binding_request(&p), Ok(TxId(tx)));
                    p
                }
            };
            if let Ok(tx) = parse_binding_request(&p) {
                assert!(looks_valid(&p, &tx), "accepted malformed {p:02x?}");
                accepted += 1;
            }
        }
        assert!(accepted >= 1500, "valid requests must be accepted");
    }
}

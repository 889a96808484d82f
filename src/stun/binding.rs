//! The client side of a STUN binding, free of I/O: the request a Tailscale
//! client sends (`SOFTWARE: tailnode` and a `FINGERPRINT`, which derper and
//! derpd insist on) and the parse of the server's answer down to the
//! address it saw us at. Used by the prober; pure and panic-free on any
//! input, like [`super::message`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::message::{
    fingerprint, TxId, ATTR_FINGERPRINT, ATTR_SOFTWARE, ATTR_XOR_MAPPED_ADDRESS, BINDING_REQUEST,
    BINDING_SUCCESS, FAMILY_IPV4, FAMILY_IPV6, HEADER_LEN, MAGIC_COOKIE, SOFTWARE_VALUE,
};

/// Length of the request [`binding_request`] writes.
pub const REQUEST_LEN: usize = 40;

/// XOR-MAPPED-ADDRESS as some older servers number it (RFC 3489 era).
const ATTR_XOR_MAPPED_ADDRESS_ALT: u16 = 0x8020;

/// Why a datagram is not the answer to our binding request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseError {
    /// Shorter than a STUN header, or the magic cookie is wrong.
    NotStun,
    /// A STUN message, but not a Binding Success response.
    NotSuccess,
    /// The answer to another transaction.
    WrongTransaction,
    /// The attributes are not well-formed TLVs.
    MalformedAttribute,
    /// No XOR-MAPPED-ADDRESS attribute (or one of an unknown family).
    NoXorMappedAddress,
}

impl fmt::Display for ResponseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResponseError::NotStun => "answer is not a STUN message",
            ResponseError::NotSuccess => "answer is not a binding success response",
            ResponseError::WrongTransaction => "answer is for another transaction",
            ResponseError::MalformedAttribute => "answer has malformed attributes",
            ResponseError::NoXorMappedAddress => "answer has no usable XOR-MAPPED-ADDRESS",
        })
    }
}

impl std::error::Error for ResponseError {}

/// A Tailscale-style binding request for transaction `tx`.
pub fn binding_request(tx: &TxId) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[0..2].copy_from_slice(&BINDING_REQUEST);
    out[2..4].copy_from_slice(&((REQUEST_LEN - HEADER_LEN) as u16).to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE);
    out[8..20].copy_from_slice(&tx.0);
    out[20..22].copy_from_slice(&ATTR_SOFTWARE.to_be_bytes());
    out[22..24].copy_from_slice(&(SOFTWARE_VALUE.len() as u16).to_be_bytes());
    out[24..32].copy_from_slice(SOFTWARE_VALUE);
    out[32..34].copy_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    out[34..36].copy_from_slice(&4u16.to_be_bytes());
    let fp = fingerprint(&out[..32]);
    out[36..40].copy_from_slice(&fp.to_be_bytes());
    out
}

/// Parses the answer to transaction `tx` and returns the address in its
/// XOR-MAPPED-ADDRESS (where the server saw the request come from).
pub fn parse_binding_response(pkt: &[u8], tx: &TxId) -> Result<SocketAddr, ResponseError> {
    if pkt.len() < HEADER_LEN || pkt[0] & 0b1100_0000 != 0 || pkt[4..8] != MAGIC_COOKIE {
        return Err(ResponseError::NotStun);
    }
    if pkt[0..2] != BINDING_SUCCESS {
        return Err(ResponseError::NotSuccess);
    }
    if pkt[8..20] != tx.0 {
        return Err(ResponseError::WrongTransaction);
    }
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE);
    key[4..].copy_from_slice(&tx.0);
    let mut rest = &pkt[HEADER_LEN..];
    let mut found = None;
    while !rest.is_empty() {
        let [t0, t1, l0, l1, tail @ ..] = rest else {
            return Err(ResponseError::MalformedAttribute);
        };
        let attr_type = u16::from_be_bytes([*t0, *t1]);
        let len = usize::from(u16::from_be_bytes([*l0, *l1]));
        let value = tail.get(..len).ok_or(ResponseError::MalformedAttribute)?;
        // The last attribute may lack its padding.
        rest = tail.get((len + 3) & !3..).unwrap_or(&[]);
        if found.is_none()
            && (attr_type == ATTR_XOR_MAPPED_ADDRESS || attr_type == ATTR_XOR_MAPPED_ADDRESS_ALT)
        {
            found = xor_address(value, &key);
        }
    }
    found.ok_or(ResponseError::NoXorMappedAddress)
}

/// Decodes an XOR-MAPPED-ADDRESS value.
fn xor_address(value: &[u8], key: &[u8; 16]) -> Option<SocketAddr> {
    let [_, family, p0, p1, addr @ ..] = value else {
        return None;
    };
    let port = u16::from_be_bytes([p0 ^ key[0], p1 ^ key[1]]);
    let ip = match (*family, addr.len()) {
        (FAMILY_IPV4, 4) => {
            let mut o = [0u8; 4];
            for (i, b) in o.iter_mut().enumerate() {
                *b = addr[i] ^ key[i];
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        (FAMILY_IPV6, 16) => {
            let mut o = [0u8; 16];
            for (i, b) in o.iter_mut().enumerate() {
                *b = addr[i] ^ key[i];
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::{binding_response, parse_binding_request, MAX_RESPONSE_LEN};

    const TX: TxId = TxId([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);

    #[test]
    fn our_request_is_byte_for_byte_a_tailscale_request() {
        assert_eq!(
            binding_request(&TX),
            crate::stun::message::tests::TS_REQUEST
        );
        assert_eq!(parse_binding_request(&binding_request(&TX)), Ok(TX));
    }

    #[test]
    fn responses_round_trip_for_both_families() {
        for addr in ["198.51.100.7:4242", "[2001:db8::9]:65535", "127.0.0.1:1"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut out = [0u8; MAX_RESPONSE_LEN];
            let n = binding_response(&TX, addr, &mut out);
            assert_eq!(parse_binding_response(&out[..n], &TX), Ok(addr));
            let other = TxId([9; 12]);
            assert_eq!(
                parse_binding_response(&out[..n], &other),
                Err(ResponseError::WrongTransaction)
            );
        }
    }

    #[test]
    fn junk_is_an_error_never_a_panic() {
        assert_eq!(
            parse_binding_response(&[], &TX),
            Err(ResponseError::NotStun)
        );
        let req = binding_request(&TX);
        assert_eq!(
            parse_binding_response(&req, &TX),
            Err(ResponseError::NotSuccess)
        );
        let mut out = [0u8; MAX_RESPONSE_LEN];
        let n = binding_response(&TX, "10.0.0.1:5".parse().unwrap(), &mut out);
        for cut in HEADER_LEN..n {
            let _ = parse_binding_response(&out[..cut], &TX);
        }
        // A header only: no address.
        assert_eq!(
            parse_binding_response(&out[..HEADER_LEN], &TX),
            Err(ResponseError::NoXorMappedAddress)
        );
        // A truncated attribute.
        assert_eq!(
            parse_binding_response(&out[..HEADER_LEN + 6], &TX),
            Err(ResponseError::MalformedAttribute)
        );
    }
}

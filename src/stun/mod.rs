//! Minimal STUN server answering Tailscale binding requests.
//!
//! This mirrors the behaviour Tailscale clients (netcheck) expect from a DERP
//! node's STUN port:
//!
//! * Only Binding Requests that look exactly like a Tailscale client's are
//!   answered: a `SOFTWARE` attribute with value `tailnode` must be present and
//!   the last attribute must be a correct `FINGERPRINT`. Everything else is
//!   silently ignored (and counted as `not_stun`).
//! * The answer is a Binding Success response carrying a single
//!   `XOR-MAPPED-ADDRESS` attribute and nothing else, so a response is never
//!   larger than needed (32 bytes for IPv4 sources, 44 bytes for IPv6 sources).
//!   IPv4-mapped IPv6 sources (from a dual-stack socket) are answered as IPv4.
//!
//! The packet codec ([`message`]: [`parse_binding_request`],
//! [`binding_response`], [`is_stun_packet`]) is pure, allocation-free and
//! never panics; [`server`] ([`serve`]) is the UDP loop around it, as
//! [`crate::proto`] is the I/O-free protocol that [`crate::relay`] drives.
//! [`binding`] is the client side (the request a Tailscale client sends and
//! the parse of the answer), for the prober.

pub mod binding;
pub mod message;
pub mod server;

pub use message::{
    binding_response, is_stun_packet, parse_binding_request, StunError, TxId, HEADER_LEN,
    IPV4_RESPONSE_LEN, MAGIC_COOKIE, MAX_RESPONSE_LEN,
};
pub use server::{serve, StunStats, StunStatsSnapshot, DEFAULT_PORT};

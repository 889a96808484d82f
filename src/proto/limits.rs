//! Size limits and constants of DERP protocol version 2.

/// Version of the DERP protocol this crate speaks.
pub const PROTOCOL_VERSION: u32 = 2;
/// The 8 bytes that start every ServerKey body: "DERP" + U+1F511 (key) in UTF-8.
pub const MAGIC: [u8; 8] = *b"DERP\xF0\x9F\x94\x91";
/// Length of a frame header: type byte + big-endian u32 body length.
pub const FRAME_HEADER_LEN: usize = 5;
/// Length of a NaCl box nonce.
pub const NONCE_LEN: usize = 24;
/// Length of the Poly1305 tag that prefixes a sealed box.
pub const BOX_OVERHEAD: usize = 16;
/// Largest packet payload carried by SendPacket / RecvPacket / ForwardPacket.
pub const MAX_PACKET_SIZE: usize = 64 << 10;
/// Smallest ClientInfo body the server accepts (key + nonce).
pub const MIN_CLIENT_INFO_LEN: usize = 32 + NONCE_LEN;
/// Largest ClientInfo body the server accepts.
pub const MAX_CLIENT_INFO_LEN: usize = 256 << 10;
/// Largest ServerInfo sealed JSON a client accepts.
pub const MAX_INFO_LEN: usize = 1 << 20;
/// Smallest meaningful ServerKey body (magic + key).
pub const SERVER_KEY_LEN: usize = MAGIC.len() + 32;
/// Largest ServerKey body a client accepts (the rest is reserved).
pub const MAX_SERVER_KEY_LEN: usize = 1024;
/// Smallest and largest Ping body the server accepts; only the first 8 bytes are echoed.
pub const MIN_PING_LEN: usize = 8;
/// See [`MIN_PING_LEN`].
pub const MAX_PING_LEN: usize = 1000;
/// Body length of a PeerPresent frame as the reference server writes it.
pub const PEER_PRESENT_LEN: usize = 32 + 16 + 2 + 1;
/// Upper bound for small control frames whose trailing bytes are ignored
/// (PeerGone, PeerPresent, KeepAlive, Restarting) when decoding as a client.
pub const MAX_CONTROL_FRAME_LEN: usize = 1024;
/// Largest Health text a client accepts.
pub const MAX_HEALTH_LEN: usize = 64 << 10;
/// The 6-byte prefix of a disco (NAT traversal) message: "TS" + U+1F4AC.
pub const DISCO_MAGIC: [u8; 6] = *b"TS\xF0\x9F\x92\xAC";
/// A payload looks like disco when it is at least magic + key + nonce long.
pub const DISCO_MIN_LEN: usize = DISCO_MAGIC.len() + 32 + NONCE_LEN;

/// Whether a packet payload looks like a disco message (which gets its own
/// queue, `PeerGone(NotHere)` replies and metric labels).
pub fn looks_like_disco(payload: &[u8]) -> bool {
    payload.len() >= DISCO_MIN_LEN && payload.starts_with(&DISCO_MAGIC)
}

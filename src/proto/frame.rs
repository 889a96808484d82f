//! DERP frames as typed values, and their encoding.
//!
//! Every frame on the wire is `type:u8 | len:u32be | body[len]`. [`Frame`]
//! holds one decoded frame; payloads are [`Bytes`] that share the buffer they
//! were read from. Decoding lives in [`super::codec`].

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};

use super::key::NodePublic;
use super::limits::*;

/// The type byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// S→C: magic + server public key.
    ServerKey = 0x01,
    /// C→S: client key + nonce + sealed JSON.
    ClientInfo = 0x02,
    /// S→C: nonce + sealed JSON.
    ServerInfo = 0x03,
    /// C→S: destination key + payload.
    SendPacket = 0x04,
    /// S→C: source key + payload.
    RecvPacket = 0x05,
    /// S→C: empty liveness frame.
    KeepAlive = 0x06,
    /// C→S: one byte, whether this server is the client's home.
    NotePreferred = 0x07,
    /// S→C: key + reason.
    PeerGone = 0x08,
    /// S→C (mesh watchers): key + ip + port + flags.
    PeerPresent = 0x09,
    /// C→S (mesh): source key + destination key + payload.
    ForwardPacket = 0x0A,
    /// C→S (mesh): subscribe to connect/disconnect events.
    WatchConns = 0x10,
    /// C→S (mesh): close every connection of a key.
    ClosePeer = 0x11,
    /// Either way: 8 opaque bytes to echo.
    Ping = 0x12,
    /// Either way: the echoed 8 bytes.
    Pong = 0x13,
    /// S→C: health problem text (empty = healthy).
    Health = 0x14,
    /// S→C: server restarting, with reconnect hints.
    Restarting = 0x15,
}

impl FrameType {
    /// Maps a type byte to a known frame type.
    pub fn from_u8(b: u8) -> Option<FrameType> {
        use FrameType::*;
        Some(match b {
            0x01 => ServerKey,
            0x02 => ClientInfo,
            0x03 => ServerInfo,
            0x04 => SendPacket,
            0x05 => RecvPacket,
            0x06 => KeepAlive,
            0x07 => NotePreferred,
            0x08 => PeerGone,
            0x09 => PeerPresent,
            0x0A => ForwardPacket,
            0x10 => WatchConns,
            0x11 => ClosePeer,
            0x12 => Ping,
            0x13 => Pong,
            0x14 => Health,
            0x15 => Restarting,
            _ => return None,
        })
    }
}

/// Why a peer is gone (`PeerGone` reason byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerGoneReason {
    /// The peer disconnected from the region (0x00).
    Disconnected,
    /// The peer is not known here (0x01); sent for disco packets to unknown keys.
    NotHere,
    /// Any other reason byte (tolerated when decoding).
    Other(u8),
}

impl PeerGoneReason {
    /// The wire byte.
    pub fn to_u8(self) -> u8 {
        match self {
            PeerGoneReason::Disconnected => 0x00,
            PeerGoneReason::NotHere => 0x01,
            PeerGoneReason::Other(b) => b,
        }
    }

    /// From the wire byte.
    pub fn from_u8(b: u8) -> PeerGoneReason {
        match b {
            0x00 => PeerGoneReason::Disconnected,
            0x01 => PeerGoneReason::NotHere,
            b => PeerGoneReason::Other(b),
        }
    }
}

/// Bit flags in PeerPresent.
pub mod peer_present_flags {
    /// A regular client (set only when no other bit applies).
    pub const IS_REGULAR: u8 = 0x01;
    /// The connection presented the mesh key.
    pub const IS_MESH_PEER: u8 = 0x02;
    /// The client said it is a prober.
    pub const IS_PROBER: u8 = 0x04;
    /// The client sent an `Ideal-Node` header.
    pub const NOT_IDEAL: u8 = 0x08;
}

/// One decoded DERP frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The server's public key (first frame from the server).
    ServerKey {
        /// Server public key.
        key: NodePublic,
    },
    /// The client's key, nonce and sealed ClientInfo JSON.
    ClientInfo {
        /// Key the client claims.
        key: NodePublic,
        /// Box nonce.
        nonce: [u8; NONCE_LEN],
        /// Sealed JSON (tag first).
        sealed: Bytes,
    },
    /// The server's nonce and sealed ServerInfo JSON.
    ServerInfo {
        /// Box nonce.
        nonce: [u8; NONCE_LEN],
        /// Sealed JSON (tag first).
        sealed: Bytes,
    },
    /// A packet for `dst`.
    SendPacket {
        /// Destination key.
        dst: NodePublic,
        /// Opaque payload (≤ [`MAX_PACKET_SIZE`]).
        payload: Bytes,
    },
    /// A packet from `src`.
    RecvPacket {
        /// Source key.
        src: NodePublic,
        /// Opaque payload.
        payload: Bytes,
    },
    /// Liveness.
    KeepAlive,
    /// Whether this server is the client's home.
    NotePreferred(bool),
    /// A peer is gone.
    PeerGone {
        /// The peer.
        key: NodePublic,
        /// Why.
        reason: PeerGoneReason,
    },
    /// A peer connected (to mesh watchers).
    PeerPresent {
        /// The peer.
        key: NodePublic,
        /// Its remote address, if known.
        addr: Option<SocketAddr>,
        /// [`peer_present_flags`] bits (0 = not sent by the server).
        flags: u8,
    },
    /// A packet forwarded by a mesh peer.
    ForwardPacket {
        /// Original sender.
        src: NodePublic,
        /// Destination.
        dst: NodePublic,
        /// Opaque payload.
        payload: Bytes,
    },
    /// Subscribe to connection events (mesh only).
    WatchConns,
    /// Close every connection of `key` (mesh only).
    ClosePeer {
        /// The key to close.
        key: NodePublic,
    },
    /// Echo request; only the first 8 bytes matter.
    Ping([u8; 8]),
    /// Echo reply.
    Pong([u8; 8]),
    /// Health problem text; empty means healthy again.
    Health(Bytes),
    /// The server is restarting.
    Restarting {
        /// Suggested delay before reconnecting.
        reconnect_in_ms: u32,
        /// How long to keep trying.
        try_for_ms: u32,
    },
    /// A frame this side does not act on; its body was skipped.
    Ignored {
        /// The type byte.
        frame_type: u8,
        /// Its body length.
        len: u32,
    },
}

impl Frame {
    /// The frame's type byte.
    pub fn type_byte(&self) -> u8 {
        use FrameType as T;
        (match self {
            Frame::ServerKey { .. } => T::ServerKey,
            Frame::ClientInfo { .. } => T::ClientInfo,
            Frame::ServerInfo { .. } => T::ServerInfo,
            Frame::SendPacket { .. } => T::SendPacket,
            Frame::RecvPacket { .. } => T::RecvPacket,
            Frame::KeepAlive => T::KeepAlive,
            Frame::NotePreferred(_) => T::NotePreferred,
            Frame::PeerGone { .. } => T::PeerGone,
            Frame::PeerPresent { .. } => T::PeerPresent,
            Frame::ForwardPacket { .. } => T::ForwardPacket,
            Frame::WatchConns => T::WatchConns,
            Frame::ClosePeer { .. } => T::ClosePeer,
            Frame::Ping(_) => T::Ping,
            Frame::Pong(_) => T::Pong,
            Frame::Health(_) => T::Health,
            Frame::Restarting { .. } => T::Restarting,
            Frame::Ignored { frame_type, .. } => return *frame_type,
        }) as u8
    }

    /// Length of the encoded body (header excluded).
    pub fn body_len(&self) -> usize {
        match self {
            Frame::ServerKey { .. } => SERVER_KEY_LEN,
            Frame::ClientInfo { sealed, .. } => 32 + NONCE_LEN + sealed.len(),
            Frame::ServerInfo { sealed, .. } => NONCE_LEN + sealed.len(),
            Frame::SendPacket { payload, .. } | Frame::RecvPacket { payload, .. } => {
                32 + payload.len()
            }
            Frame::KeepAlive | Frame::WatchConns => 0,
            Frame::NotePreferred(_) => 1,
            Frame::PeerGone { .. } => 33,
            Frame::PeerPresent { .. } => PEER_PRESENT_LEN,
            Frame::ForwardPacket { payload, .. } => 64 + payload.len(),
            Frame::ClosePeer { .. } => 32,
            Frame::Ping(_) | Frame::Pong(_) => 8,
            Frame::Health(text) => text.len(),
            Frame::Restarting { .. } => 8,
            Frame::Ignored { len, .. } => *len as usize,
        }
    }

    /// Appends the encoded frame (header + body) to `out`.
    ///
    /// `Ignored` encodes as its type and length followed by `len` zero bytes.
    pub fn encode(&self, out: &mut BytesMut) {
        let len = self.body_len();
        out.reserve(FRAME_HEADER_LEN + len);
        put_header(out, self.type_byte(), len);
        match self {
            Frame::ServerKey { key } => {
                out.put_slice(&MAGIC);
                out.put_slice(&key.0);
            }
            Frame::ClientInfo { key, nonce, sealed } => {
                out.put_slice(&key.0);
                out.put_slice(nonce);
                out.put_slice(sealed);
            }
            Frame::ServerInfo { nonce, sealed } => {
                out.put_slice(nonce);
                out.put_slice(sealed);
            }
            Frame::SendPacket { dst: k, payload } | Frame::RecvPacket { src: k, payload } => {
                out.put_slice(&k.0);
                out.put_slice(payload);
            }
            Frame::KeepAlive | Frame::WatchConns => {}
            Frame::NotePreferred(p) => out.put_u8(u8::from(*p)),
            Frame::PeerGone { key, reason } => {
                out.put_slice(&key.0);
                out.put_u8(reason.to_u8());
            }
            Frame::PeerPresent { key, addr, flags } => {
                out.put_slice(&key.0);
                let (ip, port) = match addr {
                    Some(a) => (to_v6_mapped(a.ip()), a.port()),
                    None => (Ipv6Addr::UNSPECIFIED, 0),
                };
                out.put_slice(&ip.octets());
                out.put_u16(port);
                out.put_u8(*flags);
            }
            Frame::ForwardPacket { src, dst, payload } => {
                out.put_slice(&src.0);
                out.put_slice(&dst.0);
                out.put_slice(payload);
            }
            Frame::ClosePeer { key } => out.put_slice(&key.0),
            Frame::Ping(data) | Frame::Pong(data) => out.put_slice(data),
            Frame::Health(text) => out.put_slice(text),
            Frame::Restarting {
                reconnect_in_ms,
                try_for_ms,
            } => {
                out.put_u32(*reconnect_in_ms);
                out.put_u32(*try_for_ms);
            }
            Frame::Ignored { len, .. } => out.put_bytes(0, *len as usize),
        }
    }

    /// The encoded frame as a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + self.body_len());
        self.encode(&mut out);
        out.freeze()
    }
}

/// Appends a frame header.
pub fn put_header(out: &mut BytesMut, frame_type: u8, body_len: usize) {
    out.put_u8(frame_type);
    out.put_u32(u32::try_from(body_len).expect("frame bodies are far below 4 GiB"));
}

/// Encodes the header and source key of a RecvPacket whose payload is
/// `payload_len` bytes: the 37 bytes that precede the payload on the wire.
pub fn recv_packet_prefix(src: &NodePublic, payload_len: usize) -> [u8; FRAME_HEADER_LEN + 32] {
    let mut out = [0u8; FRAME_HEADER_LEN + 32];
    out[0] = FrameType::RecvPacket as u8;
    let len = u32::try_from(32 + payload_len).expect("payload is bounded");
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out[5..].copy_from_slice(&src.0);
    out
}

/// IPv4 addresses travel IPv4-mapped in PeerPresent.
fn to_v6_mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

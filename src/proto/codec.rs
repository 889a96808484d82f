//! Incremental, bounded frame decoding.
//!
//! [`FrameDecoder`] splits frames off the front of a read buffer without
//! copying their bodies. It checks each frame's length against the limits of
//! its type as soon as the 5-byte header is in, so an oversized frame is an
//! error before its body is buffered. Frames the decoding side does not act on
//! are skipped as they arrive, never buffered.

use std::net::{IpAddr, SocketAddr};

use bytes::{Buf, Bytes, BytesMut};

use super::frame::{Frame, FrameType, PeerGoneReason};
use super::key::NodePublic;
use super::limits::*;

/// Which side of the connection is decoding: it decides which frame types are
/// parsed and which are skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Decoding what a client sends.
    Server,
    /// Decoding what a server sends.
    Client,
}

/// A malformed frame. Each class of bad input has its own variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// ClientInfo body shorter than key + nonce.
    #[error("ClientInfo body of {0} bytes is shorter than {MIN_CLIENT_INFO_LEN}")]
    ClientInfoTooShort(u32),
    /// ClientInfo body larger than 256 KiB.
    #[error("ClientInfo body of {0} bytes exceeds {MAX_CLIENT_INFO_LEN}")]
    ClientInfoTooLong(u32),
    /// SendPacket body without a full destination key.
    #[error("SendPacket body of {0} bytes has no room for a destination key")]
    SendPacketTooShort(u32),
    /// ForwardPacket body without both keys.
    #[error("ForwardPacket body of {0} bytes has no room for two keys")]
    ForwardPacketTooShort(u32),
    /// RecvPacket body without a full source key.
    #[error("RecvPacket body of {0} bytes has no room for a source key")]
    RecvPacketTooShort(u32),
    /// A packet payload over 64 KiB.
    #[error("{frame:?} payload of {payload_len} bytes exceeds {MAX_PACKET_SIZE}")]
    PacketTooLarge {
        /// Which packet frame.
        frame: FrameType,
        /// The payload length it announced.
        payload_len: u64,
    },
    /// NotePreferred body not exactly one byte.
    #[error("NotePreferred body must be 1 byte, got {0}")]
    NotePreferredBadLength(u32),
    /// WatchConns with a body.
    #[error("WatchConns body must be empty, got {0} bytes")]
    WatchConnsNotEmpty(u32),
    /// ClosePeer body not exactly one key.
    #[error("ClosePeer body must be 32 bytes, got {0}")]
    ClosePeerBadLength(u32),
    /// Ping body under 8 bytes.
    #[error("Ping body of {0} bytes is shorter than {MIN_PING_LEN}")]
    PingTooShort(u32),
    /// Ping body over 1000 bytes.
    #[error("Ping body of {0} bytes exceeds {MAX_PING_LEN}")]
    PingTooLong(u32),
    /// Pong body not 8..=1000 bytes.
    #[error("Pong body of {0} bytes is not between 8 and 1000")]
    PongBadLength(u32),
    /// ServerKey body shorter than magic + key.
    #[error("ServerKey body of {0} bytes is shorter than {SERVER_KEY_LEN}")]
    ServerKeyTooShort(u32),
    /// ServerKey body over 1 KiB.
    #[error("ServerKey body of {0} bytes exceeds {MAX_SERVER_KEY_LEN}")]
    ServerKeyTooLong(u32),
    /// ServerKey body not starting with the DERP magic.
    #[error("ServerKey does not start with the DERP magic")]
    BadMagic,
    /// ServerInfo body shorter than nonce + box tag.
    #[error("ServerInfo body of {0} bytes is too short")]
    ServerInfoTooShort(u32),
    /// ServerInfo body over the info limit.
    #[error("ServerInfo body of {0} bytes is too long")]
    ServerInfoTooLong(u32),
    /// PeerGone body without a full key.
    #[error("PeerGone body of {0} bytes has no room for a key")]
    PeerGoneTooShort(u32),
    /// PeerPresent body without a full key.
    #[error("PeerPresent body of {0} bytes has no room for a key")]
    PeerPresentTooShort(u32),
    /// Restarting body under 8 bytes.
    #[error("Restarting body of {0} bytes is shorter than 8")]
    RestartingTooShort(u32),
    /// A control frame (KeepAlive, PeerGone, PeerPresent, Restarting) over 1 KiB.
    #[error("{frame:?} body of {len} bytes exceeds {MAX_CONTROL_FRAME_LEN}")]
    ControlFrameTooLong {
        /// Which frame.
        frame: FrameType,
        /// Its length.
        len: u32,
    },
    /// Health text over 64 KiB.
    #[error("Health body of {0} bytes is too long")]
    HealthTooLong(u32),
    /// A mesh-only frame (WatchConns, ClosePeer, ForwardPacket) from a client
    /// that did not present the mesh key; refused before its body is read.
    #[error("{0:?} is only allowed from mesh peers")]
    MeshOnly(FrameType),
}

/// Splits frames off a byte buffer, for one [`Role`].
#[derive(Debug)]
pub struct FrameDecoder {
    role: Role,
    mesh_frames_allowed: bool,
    /// Server role: ClientInfo was already received, so another one is
    /// skipped like any frame the server does not act on.
    handshake_done: bool,
    /// Bytes of an ignored frame's body still to discard.
    skip: usize,
}

impl FrameDecoder {
    /// A decoder for the given side.
    pub fn new(role: Role) -> FrameDecoder {
        FrameDecoder {
            role,
            mesh_frames_allowed: true,
            handshake_done: false,
            skip: 0,
        }
    }

    /// Server role: the handshake is over; a later ClientInfo frame is
    /// skipped (whatever its length), as Tailscale's relay does.
    pub fn handshake_done(&mut self) {
        self.handshake_done = true;
    }

    /// Whether a frame has started but not finished: part of it is in
    /// `buf` (what [`FrameDecoder::decode`] left there), or the rest of a
    /// skipped frame's body is still to come.
    pub fn mid_frame(&self, buf: &BytesMut) -> bool {
        self.skip > 0 || !buf.is_empty()
    }

    /// Server role: whether mesh-only frames are accepted (the client
    /// presented the mesh key). When not, their header alone is an error.
    pub fn allow_mesh_frames(&mut self, allowed: bool) {
        self.mesh_frames_allowed = allowed;
    }

    /// Decodes the next frame from the front of `buf`.
    ///
    /// Returns `Ok(None)` when more bytes are needed (having reserved room
    /// for the rest of the current frame). Frames of types this role does not
    /// act on come back as [`Frame::Ignored`] as soon as their header is in;
    /// their bodies are then discarded as they arrive.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if self.skip > 0 {
            let n = self.skip.min(buf.len());
            buf.advance(n);
            self.skip -= n;
            if self.skip > 0 {
                return Ok(None);
            }
        }
        if buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let type_byte = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        let Some(frame_type) = FrameType::from_u8(type_byte).filter(|t| self.parses(*t)) else {
            buf.advance(FRAME_HEADER_LEN);
            self.skip = len as usize;
            let n = self.skip.min(buf.len());
            buf.advance(n);
            self.skip -= n;
            return Ok(Some(Frame::Ignored {
                frame_type: type_byte,
                len,
            }));
        };
        if !self.mesh_frames_allowed
            && matches!(
                frame_type,
                FrameType::WatchConns | FrameType::ClosePeer | FrameType::ForwardPacket
            )
        {
            return Err(FrameError::MeshOnly(frame_type));
        }
        check_len(frame_type, len)?;
        let total = FRAME_HEADER_LEN + len as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(FRAME_HEADER_LEN);
        let body = buf.split_to(len as usize).freeze();
        parse_body(frame_type, body).map(Some)
    }

    /// Whether this role parses frames of type `t` (the rest are skipped).
    fn parses(&self, t: FrameType) -> bool {
        use FrameType::*;
        match self.role {
            Role::Server if t == ClientInfo => !self.handshake_done,
            Role::Server => matches!(
                t,
                SendPacket | NotePreferred | ForwardPacket | WatchConns | ClosePeer | Ping
            ),
            Role::Client => matches!(
                t,
                ServerKey
                    | ServerInfo
                    | RecvPacket
                    | KeepAlive
                    | PeerGone
                    | PeerPresent
                    | Ping
                    | Pong
                    | Health
                    | Restarting
            ),
        }
    }
}

/// Checks a frame's announced body length against its type's limits.
pub fn check_len(t: FrameType, len: u32) -> Result<(), FrameError> {
    use FrameError as E;
    let n = len as usize;
    let too_large = |keys: usize| {
        (n > keys + MAX_PACKET_SIZE).then_some(E::PacketTooLarge {
            frame: t,
            payload_len: (n - keys) as u64,
        })
    };
    let control = |min: usize, short: FrameError| {
        if n < min {
            Err(short)
        } else if n > MAX_CONTROL_FRAME_LEN {
            Err(E::ControlFrameTooLong { frame: t, len })
        } else {
            Ok(())
        }
    };
    match t {
        FrameType::ClientInfo if n < MIN_CLIENT_INFO_LEN => Err(E::ClientInfoTooShort(len)),
        FrameType::ClientInfo if n > MAX_CLIENT_INFO_LEN => Err(E::ClientInfoTooLong(len)),
        FrameType::SendPacket if n < 32 => Err(E::SendPacketTooShort(len)),
        FrameType::RecvPacket if n < 32 => Err(E::RecvPacketTooShort(len)),
        FrameType::SendPacket | FrameType::RecvPacket => too_large(32).map_or(Ok(()), Err),
        FrameType::ForwardPacket if n < 64 => Err(E::ForwardPacketTooShort(len)),
        FrameType::ForwardPacket => too_large(64).map_or(Ok(()), Err),
        FrameType::NotePreferred if n != 1 => Err(E::NotePreferredBadLength(len)),
        FrameType::WatchConns if n != 0 => Err(E::WatchConnsNotEmpty(len)),
        FrameType::ClosePeer if n != 32 => Err(E::ClosePeerBadLength(len)),
        FrameType::Ping if n < MIN_PING_LEN => Err(E::PingTooShort(len)),
        FrameType::Ping if n > MAX_PING_LEN => Err(E::PingTooLong(len)),
        FrameType::Pong if !(MIN_PING_LEN..=MAX_PING_LEN).contains(&n) => {
            Err(E::PongBadLength(len))
        }
        FrameType::ServerKey if n < SERVER_KEY_LEN => Err(E::ServerKeyTooShort(len)),
        FrameType::ServerKey if n > MAX_SERVER_KEY_LEN => Err(E::ServerKeyTooLong(len)),
        FrameType::ServerInfo if n < NONCE_LEN + BOX_OVERHEAD => Err(E::ServerInfoTooShort(len)),
        FrameType::ServerInfo if n > NONCE_LEN + MAX_INFO_LEN => Err(E::ServerInfoTooLong(len)),
        FrameType::PeerGone => control(32, E::PeerGoneTooShort(len)),
        FrameType::PeerPresent => control(32, E::PeerPresentTooShort(len)),
        FrameType::Restarting => control(8, E::RestartingTooShort(len)),
        FrameType::KeepAlive if n > MAX_CONTROL_FRAME_LEN => {
            Err(E::ControlFrameTooLong { frame: t, len })
        }
        FrameType::Health if n > MAX_HEALTH_LEN => Err(E::HealthTooLong(len)),
        _ => Ok(()),
    }
}

/// Parses a body whose length [`check_len`] accepted.
fn parse_body(t: FrameType, body: Bytes) -> Result<Frame, FrameError> {
    let key = |at: usize| NodePublic::from_slice(&body[at..]).expect("length checked");
    let eight = |b: &Bytes| -> [u8; 8] { b[..8].try_into().expect("length checked") };
    Ok(match t {
        FrameType::ServerKey if !body.starts_with(&MAGIC) => return Err(FrameError::BadMagic),
        FrameType::ServerKey => Frame::ServerKey {
            key: key(MAGIC.len()),
        },
        FrameType::ClientInfo => Frame::ClientInfo {
            key: key(0),
            nonce: body[32..32 + NONCE_LEN].try_into().expect("length checked"),
            sealed: body.slice(32 + NONCE_LEN..),
        },
        FrameType::ServerInfo => Frame::ServerInfo {
            nonce: body[..NONCE_LEN].try_into().expect("length checked"),
            sealed: body.slice(NONCE_LEN..),
        },
        FrameType::SendPacket => Frame::SendPacket {
            dst: key(0),
            payload: body.slice(32..),
        },
        FrameType::RecvPacket => Frame::RecvPacket {
            src: key(0),
            payload: body.slice(32..),
        },
        FrameType::ForwardPacket => Frame::ForwardPacket {
            src: key(0),
            dst: key(32),
            payload: body.slice(64..),
        },
        FrameType::KeepAlive => Frame::KeepAlive,
        FrameType::NotePreferred => Frame::NotePreferred(body[0] != 0),
        FrameType::PeerGone => Frame::PeerGone {
            key: key(0),
            reason: PeerGoneReason::from_u8(body.get(32).copied().unwrap_or(0)),
        },
        FrameType::PeerPresent => {
            let addr = body.get(32..50).and_then(|b| {
                let ip: [u8; 16] = b[..16].try_into().ok()?;
                let port = u16::from_be_bytes([b[16], b[17]]);
                let ip = std::net::Ipv6Addr::from(ip);
                if ip.is_unspecified() && port == 0 {
                    return None;
                }
                let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
                Some(SocketAddr::new(ip, port))
            });
            Frame::PeerPresent {
                key: key(0),
                addr,
                flags: body.get(50).copied().unwrap_or(0),
            }
        }
        FrameType::WatchConns => Frame::WatchConns,
        FrameType::ClosePeer => Frame::ClosePeer { key: key(0) },
        FrameType::Ping => Frame::Ping(eight(&body)),
        FrameType::Pong => Frame::Pong(eight(&body)),
        FrameType::Health => Frame::Health(body),
        FrameType::Restarting => Frame::Restarting {
            reconnect_in_ms: u32::from_be_bytes(body[..4].try_into().expect("length checked")),
            try_for_ms: u32::from_be_bytes(body[4..8].try_into().expect("length checked")),
        },
    })
}

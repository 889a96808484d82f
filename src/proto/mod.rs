//! The DERP protocol, free of I/O: keys, frames, bounded decoding and the
//! handshake's sealed boxes. Nothing here touches a socket or a runtime, so
//! every part can be unit-tested and fuzzed directly.

pub mod codec;
pub mod frame;
pub mod handshake;
pub mod key;
pub mod limits;

pub use codec::{FrameDecoder, FrameError, Role};
pub use frame::{Frame, FrameType, PeerGoneReason};
pub use handshake::{ClientInfo, HandshakeError, MeshKey, ServerInfo};
pub use key::{NodePrivate, NodePublic};

#[cfg(test)]
mod tests;

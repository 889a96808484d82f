//! One client connection's shared state: who it is, its outbox, and the
//! signal that closes it. Shared between its reader, its writer and the
//! registry (through which other connections reach it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;

use super::outbox::Outbox;
use crate::proto::frame::peer_present_flags;
use crate::proto::NodePublic;

/// Process-unique connection number.
pub type ConnId = u64;

/// Destinations a connection has sent packets to: destination key → the
/// destination's connection at that time. Used for PeerGone(Disconnected).
pub type SentTo = HashMap<NodePublic, ConnId>;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// A connected, handshaken client.
pub struct ClientConn {
    /// Unique number of this connection.
    pub id: ConnId,
    /// The node key the client proved it holds.
    pub key: NodePublic,
    /// Remote address (for PeerPresent and logs).
    pub remote: SocketAddr,
    /// Presented the region's mesh key.
    pub can_mesh: bool,
    /// Said it is a prober.
    pub is_prober: bool,
    /// Sent an `Ideal-Node` header (not on its region's first node).
    pub not_ideal: bool,
    /// Outgoing queues.
    pub outbox: Outbox,
    /// Closes the connection (reader and writer) when cancelled.
    pub cancel: CancellationToken,
    /// Shares its key with another connection right now.
    pub is_dup: AtomicBool,
    /// Last NotePreferred value.
    pub preferred: AtomicBool,
}

impl ClientConn {
    /// A new connection with a fresh id.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: NodePublic,
        remote: SocketAddr,
        can_mesh: bool,
        is_prober: bool,
        not_ideal: bool,
        outbox: Outbox,
        cancel: CancellationToken,
    ) -> ClientConn {
        ClientConn {
            id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
            key,
            remote,
            can_mesh,
            is_prober,
            not_ideal,
            outbox,
            cancel,
            is_dup: AtomicBool::new(false),
            preferred: AtomicBool::new(false),
        }
    }

    /// PeerPresent flags describing this connection.
    pub fn present_flags(&self) -> u8 {
        let mut f = 0;
        if self.can_mesh {
            f |= peer_present_flags::IS_MESH_PEER;
        }
        if self.is_prober {
            f |= peer_present_flags::IS_PROBER;
        }
        if self.not_ideal {
            f |= peer_present_flags::NOT_IDEAL;
        }
        if f == 0 {
            f = peer_present_flags::IS_REGULAR;
        }
        f
    }
}

impl std::fmt::Debug for ClientConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConn")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("remote", &self.remote)
            .finish()
    }
}

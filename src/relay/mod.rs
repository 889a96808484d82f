//! The running relay: accepts upgraded connections, runs the server side of
//! the handshake, registers clients and forwards their packets.
//!
//! Each client is a reader (the task that accepted it) plus a writer task,
//! joined by the client's bounded [`outbox::Outbox`]. Keys connected to other
//! relays are reached through the [`remote::RemoteKeys`] seam, which the mesh
//! implements; the relay core names no mesh type.

pub mod conn;
pub mod gate;
pub mod outbox;
pub mod ratelimit;
pub mod reader;
pub mod registry;
pub mod remote;
pub mod restart;
pub mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::metrics::{DropReason, Metrics};
use crate::proto::handshake::{HandshakeSecret, PeerBox};
use crate::proto::{
    ClientInfo, Frame, FrameDecoder, HandshakeError, MeshKey, NodePrivate, NodePublic, Role,
    ServerInfo,
};
use conn::ClientConn;
pub use gate::HandshakeGate;
use outbox::Outbox;
pub use ratelimit::ClientRateLimit;
use reader::{Reader, ReaderEnd};
use registry::Registry;
pub use remote::RemoteKeys;
pub use restart::RestartHints;

/// Tunables of the relay core.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Packets queued per destination (regular and disco each).
    pub queue_depth: usize,
    /// Write deadline for regular clients (`None` = no deadline).
    pub write_timeout: Option<Duration>,
    /// Write deadline for mesh peers.
    pub mesh_write_timeout: Option<Duration>,
    /// Deadline for the whole handshake (ServerKey out, ClientInfo in).
    pub handshake_timeout: Duration,
    /// KeepAlive period (plus a per-connection jitter).
    pub keepalive_interval: Duration,
    /// Upper bound of the per-connection keepalive jitter.
    pub keepalive_jitter: Duration,
    /// Control frames queued per regular client before new ones are dropped.
    pub control_queue_cap: usize,
    /// Control frames queued per mesh peer (PeerPresent floods).
    pub mesh_control_queue_cap: usize,
    /// Close clients that send nothing for this long (`None` = never).
    pub idle_timeout: Option<Duration>,
    /// Close clients that start a frame and do not finish it within this
    /// (`None` = never). Quiet clients between frames are not affected.
    pub frame_timeout: Option<Duration>,
    /// Per-client receive limit (mesh peers are exempt).
    pub client_rate: ClientRateLimit,
    /// Handshake steps (TLS, the DERP box, admission) run at once
    /// (`None` = no bound); see [`gate`].
    pub handshake_parallelism: Option<usize>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            queue_depth: 32,
            write_timeout: Some(Duration::from_secs(2)),
            mesh_write_timeout: Some(Duration::from_secs(30)),
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(60),
            keepalive_jitter: Duration::from_secs(5),
            control_queue_cap: 1024,
            mesh_control_queue_cap: 1 << 18,
            idle_timeout: None,
            frame_timeout: Some(Duration::from_secs(30)),
            client_rate: ClientRateLimit::default(),
            handshake_parallelism: Some(gate::default_parallelism()),
        }
    }
}

/// State shared by every connection of one relay.
pub struct Shared {
    /// Core tunables.
    pub config: RelayConfig,
    /// The relay's private key, prepared for handshakes.
    secret: HandshakeSecret,
    /// The relay's public node key.
    pub public_key: NodePublic,
    mesh_key: Option<MeshKey>,
    /// Connected clients (and keys known through the mesh).
    pub registry: Registry,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the relay shuts down.
    pub shutdown: CancellationToken,
    /// Bounds the handshake steps running at once (TLS in the listener,
    /// the DERP handshake and admission here).
    pub handshake_gate: HandshakeGate,
    client_rate: parking_lot::RwLock<ClientRateLimit>,
    client_rate_generation: std::sync::atomic::AtomicU64,
    /// Admission check for new non-mesh clients (headscale companion).
    admission: parking_lot::RwLock<Option<Arc<dyn crate::companion::admission::Admission>>>,
    /// The headscale companion, when configured (its HTTP endpoints).
    companion: std::sync::OnceLock<Arc<crate::companion::Companion>>,
}

impl Shared {
    /// The current per-client rate limit and its generation (bumped on
    /// every change, so readers notice a reload with one atomic load).
    pub fn client_rate(&self) -> (ClientRateLimit, u64) {
        let g = self
            .client_rate_generation
            .load(std::sync::atomic::Ordering::Acquire);
        (*self.client_rate.read(), g)
    }

    /// The generation of the per-client rate limit.
    #[inline]
    pub fn client_rate_generation(&self) -> u64 {
        self.client_rate_generation
            .load(std::sync::atomic::Ordering::Acquire)
    }
}

/// How a connection reached the relay (from the HTTP layer).
#[derive(Debug, Clone, Default)]
pub struct AcceptOptions {
    /// Bytes to write before the ServerKey frame, in the same write (the
    /// `101 Switching Protocols` head; empty for fast start).
    pub preamble: Bytes,
    /// The client sent an `Ideal-Node` header.
    pub not_ideal: bool,
    /// The connection's TCP socket, when the caller has it: a client cut
    /// off for not reading is then closed abortively (RST), so the kernel
    /// frees its unsent data at once. Must stay open for the whole
    /// [`Relay::serve_conn`] call (the read and write halves own it).
    pub tcp_fd: Option<std::os::fd::RawFd>,
}

/// Why a connection ended before or during its life as a client.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The handshake did not finish within the deadline.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    /// A malformed frame during the handshake.
    #[error("bad frame during handshake: {0}")]
    Frame(#[from] crate::proto::FrameError),
    /// The socket failed or closed during the handshake.
    #[error("i/o during handshake: {0}")]
    Io(#[from] std::io::Error),
}

impl ConnError {
    fn label(&self) -> &'static str {
        match self {
            ConnError::HandshakeTimeout => "timeout",
            ConnError::Handshake(HandshakeError::FirstFrameNotClientInfo(_)) => "not_client_info",
            ConnError::Handshake(HandshakeError::BoxOpenFailed) => "box_open",
            ConnError::Handshake(HandshakeError::BadMeshKey) => "bad_mesh_key",
            ConnError::Handshake(_) => "bad_client_info",
            ConnError::Frame(_) => "bad_frame",
            ConnError::Io(_) => "io",
        }
    }
}

/// A DERP relay. Cheap to clone.
#[derive(Clone)]
pub struct Relay {
    shared: Arc<Shared>,
}

impl Relay {
    /// A relay with the given key, optional mesh key and metrics.
    pub fn new(
        private_key: NodePrivate,
        mesh_key: Option<MeshKey>,
        config: RelayConfig,
        metrics: Arc<Metrics>,
    ) -> Relay {
        let public_key = private_key.public();
        let secret = HandshakeSecret::new(&private_key);
        Relay {
            shared: Arc::new(Shared {
                secret,
                public_key,
                mesh_key,
                registry: Registry::new(metrics.clone()),
                handshake_gate: HandshakeGate::new(config.handshake_parallelism, metrics.clone()),
                metrics,
                shutdown: CancellationToken::new(),
                client_rate: parking_lot::RwLock::new(config.client_rate),
                client_rate_generation: std::sync::atomic::AtomicU64::new(0),
                admission: parking_lot::RwLock::new(None),
                companion: std::sync::OnceLock::new(),
                config,
            }),
        }
    }

    /// The relay's public key.
    pub fn public_key(&self) -> NodePublic {
        self.shared.public_key
    }

    /// Shared state (registry, metrics, config).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Attaches what knows about keys connected to other relays (the
    /// mesh); once per relay. Returns `keys` back if one is attached.
    pub fn attach_remote<T: RemoteKeys>(&self, keys: Arc<T>) -> Result<(), Arc<T>> {
        self.shared.registry.remote.attach(keys)
    }

    /// Sets (or clears) the admission check applied to every new non-mesh
    /// client after its ClientInfo opens.
    pub fn set_admission(
        &self,
        admission: Option<Arc<dyn crate::companion::admission::Admission>>,
    ) {
        *self.shared.admission.write() = admission;
    }

    /// Attaches the headscale companion (serves its HTTP endpoints); once.
    pub fn set_companion(&self, companion: Arc<crate::companion::Companion>) {
        let _ = self.shared.companion.set(companion);
    }

    /// The headscale companion, if attached.
    pub fn companion(&self) -> Option<&Arc<crate::companion::Companion>> {
        self.shared.companion.get()
    }

    /// Replaces the per-client rate limit; applies to existing connections.
    pub fn set_client_rate(&self, rate: ClientRateLimit) {
        *self.shared.client_rate.write() = rate;
        self.shared
            .client_rate_generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tracing::info!(
            bytes_per_sec = rate.bytes_per_sec,
            burst = rate.burst,
            "per-client rate limit set"
        );
    }

    /// Starts a graceful restart (see [`restart`]): every connection is
    /// sent a `Restarting` frame now, with its own reconnect delay spread
    /// over `hints.spread`, and is closed once that delay has passed (at
    /// once when there is no spread). Returns how many connections were
    /// told and when the last of them is closed.
    pub fn restart(&self, hints: RestartHints) -> (usize, Duration) {
        let plan = restart::plan(&hints, self.shared.registry.all_conns());
        let told = plan.len();
        let last = plan
            .iter()
            .map(|(_, d)| d.close_after)
            .max()
            .unwrap_or_default();
        let mut later = Vec::new();
        for (conn, dep) in plan {
            if dep.close_after.is_zero() {
                conn.outbox.finish_with(dep.frame);
            } else {
                // Kept for the close if the control queue had no room now.
                let unsent = (!conn.outbox.push_control(dep.frame.clone())).then_some(dep.frame);
                later.push((dep.close_after, conn, unsent));
            }
        }
        if !later.is_empty() {
            later.sort_by_key(|(at, _, _)| *at);
            let start = tokio::time::Instant::now();
            let shutdown = self.shared.shutdown.clone();
            tokio::spawn(async move {
                for (at, conn, unsent) in later {
                    tokio::select! {
                        _ = tokio::time::sleep_until(start + at) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    match unsent {
                        Some(frame) => conn.outbox.finish_with(frame),
                        None => conn.outbox.finish(),
                    }
                }
            });
        }
        (told, last)
    }

    /// Closes every client connection.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }

    /// Serves one upgraded connection until it ends: handshake, then the
    /// client's reader runs here and its writer in a task of its own.
    /// `buf` holds bytes the HTTP layer read past the request head.
    pub async fn serve_conn<R, W>(
        &self,
        mut r: R,
        mut w: W,
        mut buf: BytesMut,
        remote: SocketAddr,
        opts: AcceptOptions,
    ) where
        R: reader::ReadHalf,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        // The handshake and admission are transient: boxed, their state is
        // freed once the client is in, instead of sizing this (long-lived)
        // future. An idle client's memory is mostly its two tasks.
        let not_ideal = opts.not_ideal;
        let tcp_fd = opts.tcp_fd;
        // Its CPU steps go through the handshake gate: relaying first.
        let admitted = self
            .shared
            .handshake_gate
            .gated(Box::pin(self.admit(&mut r, &mut w, &mut buf, remote, opts)))
            .await;
        let Some((conn, server_info)) = admitted else {
            return;
        };
        let shared = &self.shared;
        // Reader and writer share this task: one task per connection (its
        // header and alignment are a good part of an idle client's memory).
        // They still make progress independently: `join!` polls each when
        // the task wakes, and neither waits for the other.
        let writer = writer::run(w, conn.clone(), shared.clone(), server_info, tcp_fd);
        let reader = async {
            let mut reader = Reader::new(conn.clone(), shared.clone());
            let end = reader.run(&mut r, buf).await;
            // A storm's clients all leave at once: their teardowns take
            // turns at the handshake gate instead of filling the run
            // queues ahead of the connections that stay.
            let _turn = Box::pin(shared.handshake_gate.turn()).await;
            conn.cancel.cancel();
            let leftover = conn.outbox.close();
            writer::count_batch_drops(shared, &leftover, DropReason::GoneDisconnected);
            reader.finish();
            let sent_to = std::mem::take(&mut reader.sent_to);
            shared.registry.unregister(&conn, sent_to);
            if not_ideal {
                shared.metrics.current_notideal_connections.dec();
            }
            end
        };
        let (end, wend) = tokio::join!(reader, writer);
        let (key, id) = (conn.key, conn.id);
        match &end {
            ReaderEnd::Eof | ReaderEnd::Closed => {
                tracing::debug!(%remote, %key, conn = id, writer = ?wend, "client disconnected")
            }
            e => {
                tracing::info!(%remote, %key, conn = id, error = %e, "client connection closed")
            }
        }
    }

    /// Handshake, admission and registration: the registered connection
    /// and its sealed ServerInfo frame, or `None` (counted and logged).
    async fn admit<R, W>(
        &self,
        r: &mut R,
        w: &mut W,
        buf: &mut BytesMut,
        remote: SocketAddr,
        opts: AcceptOptions,
    ) -> Option<(Arc<ClientConn>, Bytes)>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let shared = &self.shared;
        shared.metrics.accepts.inc();
        let hs = timeout(
            shared.config.handshake_timeout,
            self.handshake(r, w, buf, &opts),
        )
        .await
        .unwrap_or(Err(ConnError::HandshakeTimeout));
        let (client_key, info, peer_box) = match hs {
            Ok(v) => v,
            Err(e) => {
                shared.metrics.handshake_failed(e.label());
                tracing::debug!(%remote, error = %e, "handshake failed");
                return None;
            }
        };
        let can_mesh = match (&shared.mesh_key, &info.mesh_key) {
            (Some(ours), Some(theirs)) => ours.matches(theirs),
            _ => false,
        };
        // Admission (issue 6): mesh-key clients skip it; a refused client is
        // closed silently (the decision is counted by the check).
        let admission = (!can_mesh)
            .then(|| shared.admission.read().clone())
            .flatten();
        if let Some(admission) = admission {
            if !admission.admit(client_key, remote).await {
                tracing::debug!(%remote, key = %client_key, "client refused by admission");
                return None;
            }
        }
        let (rate, _) = shared.client_rate();
        let advertised = if can_mesh || !rate.is_enabled() {
            ServerInfo::current(0, 0)
        } else {
            ServerInfo::current(rate.bytes_per_sec as i64, rate.burst as i64)
        };
        let server_info = peer_box.seal_server_info(&advertised).to_bytes();
        let control_cap = if can_mesh {
            shared.config.mesh_control_queue_cap
        } else {
            shared.config.control_queue_cap
        };
        let conn = Arc::new(ClientConn::new(
            client_key,
            remote,
            can_mesh,
            info.is_prober,
            opts.not_ideal,
            Outbox::new(shared.config.queue_depth, control_cap),
            shared.shutdown.child_token(),
        ));
        if opts.not_ideal {
            shared.metrics.current_notideal_connections.inc();
        }
        shared.registry.register(conn.clone());
        tracing::debug!(%remote, key = %client_key, can_mesh, conn = conn.id, "client connected");
        Some((conn, server_info))
    }

    /// Server side of the handshake: ServerKey out, ClientInfo in and opened.
    async fn handshake<R, W>(
        &self,
        r: &mut R,
        w: &mut W,
        buf: &mut BytesMut,
        opts: &AcceptOptions,
    ) -> Result<(NodePublic, ClientInfo, PeerBox), ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let shared = &self.shared;
        let mut out = BytesMut::with_capacity(opts.preamble.len() + 45);
        out.extend_from_slice(&opts.preamble);
        Frame::ServerKey {
            key: shared.public_key,
        }
        .encode(&mut out);
        w.write_all(&out).await?;
        w.flush().await?;

        let mut dec = FrameDecoder::new(Role::Server);
        let frame = loop {
            if let Some(f) = dec.decode(buf)? {
                break f;
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(4096);
            }
            if r.read_buf(buf).await? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        };
        let Frame::ClientInfo { key, nonce, sealed } = frame else {
            let t = frame.type_byte();
            return Err(HandshakeError::FirstFrameNotClientInfo(t).into());
        };
        // One key agreement serves both boxes (ClientInfo in, ServerInfo out).
        let peer_box = shared.secret.peer_box(&key)?;
        let info = peer_box.open_client_info(&nonce, &sealed)?;
        Ok((key, info, peer_box))
    }
}

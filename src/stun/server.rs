//! The STUN server: a UDP loop around [`super::message`], and its counters.

use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

use super::message::{binding_response, parse_binding_request, unmap, MAX_RESPONSE_LEN};

/// Default UDP port of the STUN server.
pub const DEFAULT_PORT: u16 = 3478;
/// Receive buffer size: any UDP datagram fits, so nothing is truncated.
const RECV_BUF_LEN: usize = 64 * 1024;
/// Pause after a socket read error so a persistent error cannot spin the loop.
const READ_ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// Counters of the STUN server (Tailscale's `stun` expvar set).
///
/// `success`, `not_stun`, `read_error` and `write_error` are the request
/// dispositions; `ipv4` / `ipv6` count the address family of every accepted
/// request (IPv4-mapped IPv6 sources count as IPv4).
#[derive(Debug, Default)]
pub struct StunStats {
    /// Requests answered successfully.
    pub success: AtomicU64,
    /// Datagrams ignored because they were not a valid Tailscale binding request.
    pub not_stun: AtomicU64,
    /// Socket receive errors.
    pub read_error: AtomicU64,
    /// Failures sending a response.
    pub write_error: AtomicU64,
    /// Accepted requests from IPv4 sources.
    pub ipv4: AtomicU64,
    /// Accepted requests from IPv6 sources.
    pub ipv6: AtomicU64,
}

/// A point-in-time copy of [`StunStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StunStatsSnapshot {
    /// See [`StunStats::success`].
    pub success: u64,
    /// See [`StunStats::not_stun`].
    pub not_stun: u64,
    /// See [`StunStats::read_error`].
    pub read_error: u64,
    /// See [`StunStats::write_error`].
    pub write_error: u64,
    /// See [`StunStats::ipv4`].
    pub ipv4: u64,
    /// See [`StunStats::ipv6`].
    pub ipv6: u64,
}

impl StunStats {
    /// Returns zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads all counters (each individually; not an atomic snapshot).
    pub fn snapshot(&self) -> StunStatsSnapshot {
        StunStatsSnapshot {
            success: self.success.load(Ordering::Relaxed),
            not_stun: self.not_stun.load(Ordering::Relaxed),
            read_error: self.read_error.load(Ordering::Relaxed),
            write_error: self.write_error.load(Ordering::Relaxed),
            ipv4: self.ipv4.load(Ordering::Relaxed),
            ipv6: self.ipv6.load(Ordering::Relaxed),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Runs the STUN server on `socket` until `shutdown` completes.
///
/// Valid Tailscale binding requests are answered to their source address;
/// everything else is ignored. Read errors are logged and followed by a
/// one-second pause.
pub async fn serve(
    socket: Arc<UdpSocket>,
    stats: Arc<StunStats>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut buf = vec![0u8; RECV_BUF_LEN];
    let mut resp = [0u8; MAX_RESPONSE_LEN];
    loop {
        let received = tokio::select! {
            biased;
            () = &mut shutdown => return,
            r = socket.recv_from(&mut buf) => r,
        };
        let (n, src) = match received {
            Ok(v) => v,
            Err(err) => {
                bump(&stats.read_error);
                tracing::warn!(error = %err, "STUN: UDP read error");
                tokio::select! {
                    biased;
                    () = &mut shutdown => return,
                    () = tokio::time::sleep(READ_ERROR_BACKOFF) => continue,
                }
            }
        };
        let pkt = buf.get(..n).unwrap_or_default();
        let tx = match parse_binding_request(pkt) {
            Ok(tx) => tx,
            Err(_) => {
                bump(&stats.not_stun);
                continue;
            }
        };
        match unmap(src.ip()) {
            IpAddr::V4(_) => bump(&stats.ipv4),
            IpAddr::V6(_) => bump(&stats.ipv6),
        }
        let len = binding_response(&tx, src, &mut resp);
        match socket.send_to(&resp[..len], src).await {
            Ok(_) => bump(&stats.success),
            Err(err) => {
                bump(&stats.write_error);
                tracing::debug!(error = %err, %src, "STUN: UDP write error");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::message::tests::{decode_with_stun_codec, encode_with_stun_codec, TS_REQUEST};
    use crate::stun::message::BINDING_SUCCESS;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    use stun_codec::rfc5389::attributes::XorMappedAddress;
    use stun_codec::rfc5389::methods::BINDING;
    use stun_codec::MessageClass;

    async fn spawn_server(
        bind: &str,
    ) -> std::io::Result<(
        SocketAddr,
        Arc<StunStats>,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )> {
        let sock = Arc::new(UdpSocket::bind(bind).await?);
        let addr = sock.local_addr()?;
        let stats = Arc::new(StunStats::new());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(serve(sock, stats.clone(), async move {
            let _ = rx.await;
        }));
        Ok((addr, stats, tx, handle))
    }

    async fn recv_reply(client: &UdpSocket) -> Option<Vec<u8>> {
        let mut buf = [0u8; 1500];
        match tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await {
            Ok(r) => Some(buf[..r.expect("recv")].to_vec()),
            Err(_) => None,
        }
    }

    /// Sends a third-party-encoded Tailscale request and checks the reply.
    async fn roundtrip(client: &UdpSocket, server: SocketAddr, tx: [u8; 12], want: SocketAddr) {
        let req = encode_with_stun_codec(tx, Some("tailnode"), true);
        client.send_to(&req, server).await.unwrap();
        let reply = recv_reply(client).await.expect("no STUN reply");
        let want_len = if want.is_ipv4() { 32 } else { 44 };
        assert_eq!(reply.len(), want_len);
        let m = decode_with_stun_codec(&reply);
        assert_eq!(m.class(), MessageClass::SuccessResponse);
        assert_eq!(m.method(), BINDING);
        assert_eq!(m.transaction_id().as_bytes(), &tx);
        assert_eq!(m.attributes().count(), 1);
        let x = m.get_attribute::<XorMappedAddress>().expect("xor-mapped");
        assert_eq!(x.address(), want);
    }

    async fn wait_for(stats: &StunStats, pred: impl Fn(StunStatsSnapshot) -> bool) {
        for _ in 0..200 {
            if pred(stats.snapshot()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("stats never matched: {:?}", stats.snapshot());
    }

    #[tokio::test]
    async fn loopback_ipv4() {
        let (server, stats, stop, handle) = spawn_server("127.0.0.1:0").await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let me = client.local_addr().unwrap();

        roundtrip(&client, server, [7; 12], me).await;
        wait_for(&stats, |s| s.success == 1).await;

        // Malformed, non-binding STUN, and a non-Tailscale request: no reply.
        let mut not_binding = TS_REQUEST;
        not_binding[0..2].copy_from_slice(&BINDING_SUCCESS);
        let generic = encode_with_stun_codec([8; 12], None, true);
        for bad in [&b"hello, not stun at all"[..], &not_binding, &generic, &[]] {
            client.send_to(bad, server).await.unwrap();
        }
        assert_eq!(
            recv_reply(&client).await,
            None,
            "ignored packets got a reply"
        );
        wait_for(&stats, |s| s.not_stun == 4).await;

        // Still serving afterwards.
        roundtrip(&client, server, [9; 12], me).await;
        wait_for(&stats, |s| s.success == 2).await;
        let s = stats.snapshot();
        assert_eq!(
            s,
            StunStatsSnapshot {
                success: 2,
                not_stun: 4,
                read_error: 0,
                write_error: 0,
                ipv4: 2,
                ipv6: 0,
            }
        );

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .expect("serve did not stop on shutdown")
            .unwrap();
    }

    #[tokio::test]
    async fn loopback_ipv6_and_dual_stack() {
        // Skip quietly where the machine has no IPv6 loopback.
        let Ok(client6) = UdpSocket::bind("[::1]:0").await else {
            eprintln!("no IPv6 loopback; skipping");
            return;
        };
        let (server, stats, stop, handle) = spawn_server("[::]:0").await.unwrap();
        let server6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), server.port());
        roundtrip(&client6, server6, [1; 12], client6.local_addr().unwrap()).await;

        // On a dual-stack socket an IPv4 client shows up as ::ffff:127.0.0.1
        // and must still get the 32-byte IPv4 answer.
        if let Ok(client4) = UdpSocket::bind("127.0.0.1:0").await {
            let server4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), server.port());
            if client4.send_to(&TS_REQUEST, server4).await.is_ok() {
                if let Some(reply) = recv_reply(&client4).await {
                    assert_eq!(reply.len(), 32);
                    let m = decode_with_stun_codec(&reply);
                    let x = m.get_attribute::<XorMappedAddress>().unwrap();
                    assert_eq!(x.address(), client4.local_addr().unwrap());
                    wait_for(&stats, |s| s.ipv4 == 1).await;
                } else {
                    eprintln!("[::] is IPv6-only here; dual-stack part skipped");
                }
            }
        }
        wait_for(&stats, |s| s.ipv6 == 1).await;
        stop.send(()).unwrap();
        handle.await.unwrap();
    }
}

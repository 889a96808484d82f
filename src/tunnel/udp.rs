//! The local UDP side: one socket per peer, read and written in batches
//! through `quinn-udp` (`recvmmsg`, and GRO/GSO where the kernel has them),
//! so a burst of WireGuard datagrams costs a few system calls, not one each.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::time::Duration;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams read per receive call (quinn-udp's `recvmmsg` batch).
pub const RECV_SLOTS: usize = quinn_udp::BATCH_SIZE;
/// Bytes per receive slot: one GRO-coalesced train, or one datagram of any
/// size UDP allows.
pub const SLOT_BYTES: usize = 64 << 10;
/// Most bytes in one GSO send (the kernel's limit for one UDP send).
const MAX_GSO_BYTES: usize = 65_000;
/// Socket buffer size asked for (best effort; the kernel may cap it).
const SOCKET_BUFFER: usize = 4 << 20;
/// How long a send waits for room in the socket buffer before dropping.
const SEND_WAIT: Duration = Duration::from_millis(100);

/// One local UDP socket with batched I/O.
pub struct LocalSocket {
    sock: UdpSocket,
    state: UdpSocketState,
}

impl LocalSocket {
    /// Binds `addr` (non-blocking, large buffers, GRO on where supported).
    pub fn bind(addr: SocketAddr) -> io::Result<LocalSocket> {
        let std = std::net::UdpSocket::bind(addr)?;
        std.set_nonblocking(true)?;
        let state = UdpSocketState::new((&std).into())?;
        let _ = state.set_recv_buffer_size((&std).into(), SOCKET_BUFFER);
        let _ = state.set_send_buffer_size((&std).into(), SOCKET_BUFFER);
        Ok(LocalSocket {
            sock: UdpSocket::from_std(std)?,
            state,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Most segments one send may carry (1 without GSO).
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments().max(1)
    }

    /// Waits for datagrams and reads as many as are ready into `batch`.
    pub async fn recv(&self, batch: &mut RecvBatch) -> io::Result<()> {
        batch.count = 0;
        let RecvBatch { buf, meta, count } = batch;
        let n = self
            .sock
            .async_io(Interest::READABLE, || {
                let mut slices: Vec<IoSliceMut<'_>> =
                    buf.chunks_mut(SLOT_BYTES).map(IoSliceMut::new).collect();
                self.state.recv((&self.sock).into(), &mut slices, meta)
            })
            .await?;
        *count = n;
        Ok(())
    }

    /// Sends `contents` to `dst` as datagrams of `segment` bytes each (the
    /// last may be shorter): one GSO send where the kernel can, else one
    /// send per datagram. Waits a little for buffer room, then gives up.
    pub async fn send(&self, dst: SocketAddr, contents: &[u8], segment: usize) -> io::Result<u32> {
        let segments = contents.len().div_ceil(segment.max(1));
        if segments > 1 && self.max_segments() > 1 {
            match self.send_one(dst, contents, Some(segment)).await {
                Ok(()) => return Ok(1),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(e),
                // GSO refused (quinn-udp turns it off for next time): fall
                // back to one datagram per send.
                Err(_) => {}
            }
        }
        let mut calls = 0;
        for d in contents.chunks(segment.max(1)) {
            self.send_one(dst, d, None).await?;
            calls += 1;
        }
        Ok(calls)
    }

    async fn send_one(
        &self,
        dst: SocketAddr,
        contents: &[u8],
        seg: Option<usize>,
    ) -> io::Result<()> {
        let t = Transmit {
            destination: dst,
            ecn: None,
            contents,
            segment_size: seg,
            src_ip: None,
        };
        match self.sock.try_io(Interest::WRITABLE, || {
            self.state.try_send((&self.sock).into(), &t)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return r,
        }
        tokio::time::timeout(
            SEND_WAIT,
            self.sock.async_io(Interest::WRITABLE, || {
                self.state.try_send((&self.sock).into(), &t)
            }),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "local socket full"))?
    }
}

/// Buffers for one batched receive.
pub struct RecvBatch {
    buf: Vec<u8>,
    meta: Vec<RecvMeta>,
    count: usize,
}

impl RecvBatch {
    /// Buffers for [`RECV_SLOTS`] slots of [`SLOT_BYTES`]. The zeroed
    /// allocation is mapped lazily, so only the pages datagrams actually
    /// reach become resident (about one page per slot for WireGuard's
    /// MTU-sized packets).
    pub fn new() -> RecvBatch {
        RecvBatch {
            buf: vec![0; RECV_SLOTS * SLOT_BYTES],
            meta: vec![RecvMeta::default(); RECV_SLOTS],
            count: 0,
        }
    }

    /// Every datagram of the last receive, with its source; GRO trains are
    /// split back into datagrams.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        self.meta[..self.count]
            .iter()
            .zip(self.buf.chunks(SLOT_BYTES))
            .flat_map(|(m, slot)| {
                let data = &slot[..m.len.min(slot.len())];
                let stride = if m.stride == 0 {
                    data.len().max(1)
                } else {
                    m.stride
                };
                data.chunks(stride).map(move |d| (m.addr, d))
            })
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

/// Datagrams bound for one local address, gathered so that runs of equal
/// size go out as one GSO send.
#[derive(Default)]
pub struct SendBatch {
    buf: Vec<u8>,
    lens: Vec<u16>,
}

/// What flushing a [`SendBatch`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Datagrams sent.
    pub sent: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Datagrams dropped because sending failed.
    pub failed: u64,
    /// Send calls made.
    pub calls: u64,
}

impl SendBatch {
    /// Adds one datagram (at most 65535 bytes; larger ones are refused).
    pub fn push(&mut self, datagram: &[u8]) -> bool {
        let Ok(len) = u16::try_from(datagram.len()) else {
            return false;
        };
        self.buf.extend_from_slice(datagram);
        self.lens.push(len);
        true
    }

    /// Datagrams waiting.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Forgets everything waiting; returns how many datagrams that was.
    pub fn discard(&mut self) -> usize {
        let n = self.lens.len();
        self.buf.clear();
        self.lens.clear();
        n
    }

    /// The groups a flush sends: `(start, end, segment)` byte ranges where
    /// every datagram is `segment` bytes except possibly the last.
    pub fn groups(&self, max_segments: usize) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        let mut i = 0;
        let mut start = 0;
        while i < self.lens.len() {
            let seg = usize::from(self.lens[i]);
            let mut end = start + seg;
            let mut n = 1;
            i += 1;
            while i < self.lens.len() && n < max_segments {
                let len = usize::from(self.lens[i]);
                if len > seg || end + len > MAX_GSO_BYTES {
                    break;
                }
                end += len;
                n += 1;
                i += 1;
                if len < seg {
                    break;
                }
            }
            out.push((start, end, seg));
            start = end;
        }
        out
    }

    /// Sends everything waiting to `dst` and empties the batch.
    pub async fn flush(&mut self, sock: &LocalSocket, dst: SocketAddr) -> Flushed {
        let mut f = Flushed::default();
        let groups = self.groups(sock.max_segments());
        for (start, end, seg) in groups {
            let n = (end - start).div_ceil(seg.max(1)).max(1) as u64;
            match sock.send(dst, &self.buf[start..end], seg).await {
                Ok(calls) => {
                    f.sent += n;
                    f.bytes += (end - start) as u64;
                    f.calls += u64::from(calls);
                }
                Err(_) => f.failed += n,
            }
        }
        self.discard();
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(lens: &[u16]) -> SendBatch {
        let mut b = SendBatch::default();
        for &l in lens {
            assert!(b.push(&vec![l as u8; l as usize]));
        }
        b
    }

    #[test]
    fn equal_runs_group_and_a_shorter_datagram_ends_a_group() {
        let b = batch(&[100, 100, 100, 40, 100, 200, 200]);
        assert_eq!(
            b.groups(64),
            vec![(0, 340, 100), (340, 440, 100), (440, 840, 200)]
        );
        assert_eq!(b.groups(1).len(), 7);
        assert_eq!(
            b.groups(2),
            vec![
                (0, 200, 100),
                (200, 340, 100),
                (340, 440, 100),
                (440, 840, 200)
            ]
        );
    }

    #[test]
    fn groups_stay_under_the_gso_byte_limit() {
        let b = batch(&[1400; 100]);
        let groups = b.groups(64);
        assert!(groups.iter().all(|(s, e, _)| e - s <= MAX_GSO_BYTES));
        assert_eq!(groups.iter().map(|(s, e, _)| e - s).sum::<usize>(), 140_000);
        assert!(!batch(&[]).push(&vec![0; 70_000]));
    }

    #[tokio::test]
    async fn batched_send_and_receive_keep_datagram_boundaries() {
        let a = LocalSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = LocalSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let sizes: Vec<u16> = vec![1200, 1200, 1200, 1200, 500, 1200, 77, 9000];
        let mut out = SendBatch::default();
        for (i, &l) in sizes.iter().enumerate() {
            out.push(&vec![i as u8; l as usize]);
        }
        let f = out.flush(&a, b.local_addr().unwrap()).await;
        assert_eq!(f.sent, sizes.len() as u64);
        assert_eq!(f.failed, 0);
        assert!(out.is_empty());

        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut rb = RecvBatch::new();
        while got.len() < sizes.len() {
            tokio::time::timeout(Duration::from_secs(5), b.recv(&mut rb))
                .await
                .expect("datagrams arrive")
                .unwrap();
            for (from, d) in rb.datagrams() {
                assert_eq!(from, a.local_addr().unwrap());
                got.push(d.to_vec());
            }
        }
        for (i, (d, &l)) in got.iter().zip(&sizes).enumerate() {
            assert_eq!(d.len(), l as usize, "datagram {i}");
            assert!(d.iter().all(|&x| x == i as u8), "datagram {i}");
        }
    }
}

//! `/proc/net/tcp` as tests read it: which sockets exist, their state and
//! their timers.

use std::net::SocketAddr;

/// One row of `/proc/net/tcp` (IPv4).
pub struct TcpRow {
    /// Local address.
    pub local: SocketAddr,
    /// Remote address.
    pub remote: SocketAddr,
    /// TCP state (01 established, 04 FIN-WAIT-1, …).
    pub state: u8,
    /// Which timer runs: 0 none, 1 retransmit, 2 keepalive, 4 zero-window.
    pub timer: u8,
    /// Clock ticks until it fires.
    pub when_ticks: u64,
    /// The socket's inode (names it in `/proc/*/fd`).
    pub inode: u64,
}

fn parse_addr(hex: &str) -> SocketAddr {
    let (ip, port) = hex.split_once(':').unwrap();
    let ip = u32::from_str_radix(ip, 16).unwrap();
    let ip = std::net::Ipv4Addr::from(ip.to_le_bytes());
    SocketAddr::new(ip.into(), u16::from_str_radix(port, 16).unwrap())
}

/// Every IPv4 TCP socket of this network namespace.
pub fn tcp_rows() -> Vec<TcpRow> {
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (timer, when) = f[5].split_once(':').unwrap();
            TcpRow {
                local: parse_addr(f[1]),
                remote: parse_addr(f[2]),
                state: u8::from_str_radix(f[3], 16).unwrap(),
                timer: u8::from_str_radix(timer, 16).unwrap(),
                when_ticks: u64::from_str_radix(when, 16).unwrap(),
                inode: f[9].parse().unwrap(),
            }
        })
        .collect()
}

/// The row of the connection from `local` to `remote`, if it exists.
pub fn find(local: SocketAddr, remote: SocketAddr) -> Option<TcpRow> {
    tcp_rows()
        .into_iter()
        .find(|r| r.local == local && r.remote == remote)
}

/// The row of the connection from `local` to `remote`.
pub fn row(local: SocketAddr, remote: SocketAddr) -> TcpRow {
    find(local, remote).unwrap_or_else(|| panic!("no socket {local} -> {remote} in /proc/net/tcp"))
}

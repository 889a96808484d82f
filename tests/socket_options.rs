//! derper's TCP options (`--tcp-keepalive-time`, `--tcp-user-timeout`) on
//! the sockets the relay accepts and on its mesh links, read back from the
//! kernel: with getsockopt on the relay's own file descriptors when it runs
//! in this process, and from `/proc/net/tcp`'s timer column when it is the
//! real binary.

mod common;

use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::proc_net::{row, tcp_rows};
use common::*;
use derpd::mesh::{MeshExt, MeshOptions, PeerSpec};
use derpd::proto::{MeshKey, NodePrivate};
use derpd::server::{Server, ServerConfig};
use derpd::sockopt::TcpTimeouts;
use socket2::SockRef;

/// This process's file descriptor of the socket with `inode`.
fn fd_of_inode(inode: u64) -> RawFd {
    let want = format!("socket:[{inode}]");
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == want) {
            return e.file_name().to_string_lossy().parse().unwrap();
        }
    }
    panic!("socket inode {inode} is not open in this process");
}

/// Keepalive idle time and user timeout, as the kernel holds them for the
/// in-process socket from `local` to `remote`.
fn options_of(local: SocketAddr, remote: SocketAddr) -> (Option<Duration>, Option<Duration>) {
    let fd = fd_of_inode(row(local, remote).inode);
    // SAFETY: the fd belongs to a socket the relay keeps open for the whole
    // call (the client connection to it is still open).
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let s = SockRef::from(&fd);
    let keepalive = s
        .keepalive()
        .unwrap()
        .then(|| s.tcp_keepalive_time().unwrap());
    (keepalive, s.tcp_user_timeout().unwrap())
}

async fn relay_with(tcp: TcpTimeouts) -> Server {
    let mut config = ServerConfig::loopback_ephemeral();
    config.limits.tcp = tcp;
    Server::start(config, NodePrivate::generate(), Some(MeshKey::generate()))
        .await
        .expect("relay starts")
}

#[tokio::test]
async fn accepted_connections_carry_derpers_defaults() {
    let server = relay_with(TcpTimeouts::default()).await;
    let stream = upgraded_stream(&server, "GET").await;
    let client_addr = stream.local_addr().unwrap();
    let _client = ts_derp::Client::handshake(stream, &ts_keys::NodeKeyPair::random())
        .await
        .unwrap();
    assert_eq!(
        options_of(server.addr, client_addr),
        (
            Some(Duration::from_secs(600)),
            Some(Duration::from_secs(15))
        )
    );
    // The client's own socket is untouched: the values are the relay's.
    assert_eq!(options_of(client_addr, server.addr), (None, None));
    // The relay sets these on its listener; accepted sockets inherit them,
    // Nagle off included.
    let fd = fd_of_inode(row(server.addr, client_addr).inode);
    // SAFETY: as in `options_of`.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    assert!(SockRef::from(&fd).tcp_nodelay().unwrap(), "TCP_NODELAY");
    server.shutdown().await;
}

#[tokio::test]
async fn zero_turns_the_options_off() {
    let server = relay_with(TcpTimeouts::OFF).await;
    let stream = upgraded_stream(&server, "GET").await;
    let client_addr = stream.local_addr().unwrap();
    let _client = ts_derp::Client::handshake(stream, &ts_keys::NodeKeyPair::random())
        .await
        .unwrap();
    assert_eq!(options_of(server.addr, client_addr), (None, None));
    server.shutdown().await;
}

#[tokio::test]
async fn mesh_links_carry_the_options() {
    let mk = MeshKey::generate();
    let start = || async {
        Server::start(
            ServerConfig::loopback_ephemeral(),
            NodePrivate::generate(),
            Some(mk.clone()),
        )
        .await
        .unwrap()
    };
    let (a, b) = (start().await, start().await);
    let opts = MeshOptions {
        tcp: TcpTimeouts {
            keepalive_time: Some(Duration::from_secs(42)),
            user_timeout: Some(Duration::from_secs(9)),
        },
        ..MeshOptions::default()
    };
    let to_b = PeerSpec::parse(&format!("http://{}", b.addr)).unwrap();
    a.relay.mesh().set_peers(&[to_b], &opts).unwrap();
    assert!(eventually(|| a.relay.mesh().links_up() == 1).await);
    let link = tcp_rows()
        .into_iter()
        .find(|r| r.remote == b.addr && r.local.ip() == b.addr.ip() && r.local != b.addr)
        .expect("the link's socket");
    assert_eq!(
        options_of(link.local, link.remote),
        (Some(Duration::from_secs(42)), Some(Duration::from_secs(9)))
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// Kills the child when dropped (also when an assertion fails).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_flag_gives_accepted_sockets_a_keepalive_timer() {
    let port = free_port();
    let _relay = Child(
        Command::new(env!("CARGO_BIN_EXE_derpd"))
            .args([
                "serve",
                "--dev",
                "-a",
                &format!("127.0.0.1:{port}"),
                "--stun=false",
                "--metrics-addr",
                "off",
                "--tcp-keepalive-time",
                "30s",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let server: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = std::time::Instant::now() + ARRIVES;
    let client = loop {
        match std::net::TcpStream::connect(server) {
            Ok(c) => break c,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("relay did not start: {e}"),
        }
    };
    let accepted = {
        let deadline = std::time::Instant::now() + ARRIVES;
        loop {
            let r = row(server, client.local_addr().unwrap());
            if r.timer == 2 || std::time::Instant::now() >= deadline {
                break r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(
        accepted.timer, 2,
        "a keepalive timer runs on the accepted socket"
    );
    // Clock ticks are 1/100 s: the timer is due within 30 s, not the
    // kernel's default two hours.
    assert!(
        accepted.when_ticks <= 30 * 100,
        "keepalive due in {} ticks",
        accepted.when_ticks
    );
    let ours = row(client.local_addr().unwrap(), server);
    assert_eq!(ours.timer, 0, "the client socket has no keepalive");
}

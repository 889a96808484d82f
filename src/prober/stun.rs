//! The STUN probe: a Tailscale-style binding request to one node's STUN
//! port over IPv4 or IPv6, retransmitted until answered, and the answer's
//! XOR-MAPPED-ADDRESS checked: the right transaction, the family we sent
//! from, a real port, and (when the node is on loopback, where nothing can
//! translate) exactly the address we sent from.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;

use super::dial::{self, Want};
use super::map::Node;
use super::probe::Outcome;
use crate::stun::binding::{binding_request, parse_binding_response};
use crate::stun::TxId;

/// How long to wait for an answer before sending the request again.
const RETRANSMIT: Duration = Duration::from_millis(250);

/// Runs the probe over `want` (V4 or V6) for at most `timeout`.
pub async fn probe(node: &Node, port: u16, want: Want, timeout: Duration) -> Outcome {
    let start = tokio::time::Instant::now();
    match exchange(node, port, want, start + timeout).await {
        Ok((mapped, latency)) => Outcome::ok(latency).with_note(format!("mapped {mapped}")),
        Err(e) => Outcome::fail(start.elapsed(), e),
    }
}

async fn exchange(
    node: &Node,
    port: u16,
    want: Want,
    give_up: tokio::time::Instant,
) -> Result<(SocketAddr, Duration), String> {
    let dst = dial::address(node, want, port).await?;
    let local: IpAddr = if dst.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let sock = UdpSocket::bind((local, 0))
        .await
        .map_err(|e| format!("binding a UDP socket: {e}"))?;
    sock.connect(dst)
        .await
        .map_err(|e| format!("STUN to {dst}: {e}"))?;
    let ours = sock.local_addr().map_err(|e| e.to_string())?;
    let tx = TxId(std::array::from_fn(|_| fastrand::u8(..)));
    let req = binding_request(&tx);
    let mut buf = [0u8; 1500];
    let mut last_err = None;
    loop {
        let sent = tokio::time::Instant::now();
        if sent >= give_up {
            return Err(last_err.unwrap_or_else(|| format!("no STUN answer from {dst}")));
        }
        if let Err(e) = sock.send(&req).await {
            last_err = Some(format!("STUN to {dst}: {e}"));
        }
        let deadline = (sent + RETRANSMIT).min(give_up);
        loop {
            let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                Err(_) => break,
                Ok(Ok(n)) => n,
                // An ICMP unreachable shows as a refused receive: remember
                // it and keep trying until the caller's deadline.
                Ok(Err(e)) => {
                    last_err = Some(format!("STUN to {dst}: {e}"));
                    tokio::time::sleep_until(deadline).await;
                    break;
                }
            };
            let mapped = match parse_binding_response(&buf[..n], &tx) {
                Ok(a) => a,
                Err(e) => {
                    last_err = Some(format!("STUN from {dst}: {e}"));
                    continue;
                }
            };
            let latency = sent.elapsed();
            check(mapped, ours, dst)?;
            return Ok((mapped, latency));
        }
    }
}

/// Whether `mapped` can be where `dst` saw us sending from `ours`.
fn check(mapped: SocketAddr, ours: SocketAddr, dst: SocketAddr) -> Result<(), String> {
    if mapped.is_ipv4() != dst.is_ipv4() {
        return Err(format!(
            "XOR-MAPPED-ADDRESS {mapped} is not of the family we sent from"
        ));
    }
    if mapped.port() == 0 {
        return Err(format!("XOR-MAPPED-ADDRESS {mapped} has port 0"));
    }
    if dst.ip().is_loopback() && (mapped.port() != ours.port() || !mapped.ip().is_loopback()) {
        return Err(format!(
            "XOR-MAPPED-ADDRESS {mapped}, but we sent from port {} on loopback",
            ours.port()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_are_checked() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let lo = a("127.0.0.1:3478");
        assert!(check(a("127.0.0.1:5000"), a("0.0.0.0:5000"), lo).is_ok());
        assert!(check(a("127.0.0.1:5001"), a("0.0.0.0:5000"), lo).is_err());
        assert!(check(a("[::1]:5000"), a("0.0.0.0:5000"), lo).is_err());
        let far = a("198.51.100.1:3478");
        assert!(check(a("203.0.113.9:61000"), a("0.0.0.0:5000"), far).is_ok());
        assert!(check(a("203.0.113.9:0"), a("0.0.0.0:5000"), far).is_err());
    }
}

//! TCP options that find dead peers behind NATs that silently drop state:
//! keepalive probes after an idle time, and `TCP_USER_TIMEOUT`, the longest
//! sent data may stay unacknowledged. derper sets both on every accepted
//! connection (`--tcp-keepalive-time` 10m, `--tcp-user-timeout` 15s);
//! derpd sets them on accepted client connections and on mesh links.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// The keepalive and user-timeout settings; `None` leaves the kernel's
/// default (off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpTimeouts {
    /// Idle time before the first keepalive probe.
    pub keepalive_time: Option<Duration>,
    /// `TCP_USER_TIMEOUT`.
    pub user_timeout: Option<Duration>,
}

impl Default for TcpTimeouts {
    /// derper's defaults: keepalive after 10 minutes, user timeout 15 s.
    fn default() -> Self {
        TcpTimeouts {
            keepalive_time: Some(Duration::from_secs(600)),
            user_timeout: Some(Duration::from_secs(15)),
        }
    }
}

impl TcpTimeouts {
    /// Neither option set.
    pub const OFF: TcpTimeouts = TcpTimeouts {
        keepalive_time: None,
        user_timeout: None,
    };

    /// Applies the options to a connected or accepted TCP socket.
    pub fn apply<S: std::os::fd::AsFd>(&self, socket: &S) -> std::io::Result<()> {
        let sock = SockRef::from(socket);
        if let Some(idle) = self.keepalive_time {
            // Go probes every `idle` too once the first probe is sent.
            let ka = TcpKeepalive::new().with_time(idle).with_interval(idle);
            sock.set_tcp_keepalive(&ka)?;
        }
        if let Some(t) = self.user_timeout {
            sock.set_tcp_user_timeout(Some(t))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_reach_the_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let t = TcpTimeouts {
            keepalive_time: Some(Duration::from_secs(30)),
            user_timeout: Some(Duration::from_secs(7)),
        };
        t.apply(&c).unwrap();
        let s = SockRef::from(&c);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(30));
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(7)));

        let c2 = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        TcpTimeouts::OFF.apply(&c2).unwrap();
        let s2 = SockRef::from(&c2);
        assert!(!s2.keepalive().unwrap());
        assert_eq!(s2.tcp_user_timeout().unwrap(), None);
    }
}

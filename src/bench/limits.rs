//! Up-front checks that a run fits the machine, so that a run too large
//! fails at once with a clear message instead of half-way through: file
//! descriptors (of the bench and of the relay), ephemeral ports per source
//! address, and loopback source addresses.

use std::net::{IpAddr, Ipv4Addr};

/// File descriptors a process keeps beyond its connections (runtime,
/// standard streams, /proc reads, the relay's listeners).
pub const RESERVE_FDS: u64 = 64;

/// The most loopback source addresses (127.0.0.2 … 127.0.0.255).
pub const MAX_SOURCE_ADDRS: usize = 254;

/// Connections a run holds open at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct Connections {
    /// Idle clients (`--idle`). In a storm they are closed before they are
    /// redialed, so they never count twice on the client side.
    pub idle: u64,
    /// Sender/receiver pairs: two connections each.
    pub pairs: u64,
    /// Stuck mesh watchers.
    pub stuck_watchers: u64,
    /// Churn rounds in flight at most (two connections each), 0 without
    /// churn.
    pub churn_rounds: u64,
}

impl Connections {
    /// Connections open at once, at most.
    pub fn total(&self) -> u64 {
        self.idle + 2 * self.pairs + self.stuck_watchers + 2 * self.churn_rounds
    }

    /// File descriptors the bench process needs; when the relay runs in
    /// the same process it holds the other end of every connection too.
    pub fn bench_fds(&self, relay_in_process: bool) -> u64 {
        let ends = if relay_in_process { 2 } else { 1 };
        ends * self.total() + RESERVE_FDS
    }

    /// File descriptors a relay in another process needs for this run.
    pub fn relay_fds(&self) -> u64 {
        self.total() + RESERVE_FDS
    }
}

/// Checks `need` file descriptors against `limit` (`who` names the
/// process); the message says how large `--idle` may be.
pub fn check_fds(need: u64, limit: u64, idle: u64, who: &str) -> Result<(), String> {
    if need <= limit {
        return Ok(());
    }
    let fit = idle.saturating_sub(need - limit);
    Err(format!(
        "{who} needs about {need} file descriptors for this run but may open only {limit} \
         (RLIMIT_NOFILE; raising the hard limit needs root or CAP_SYS_RESOURCE): \
         use --idle {fit} or fewer, or run several bench processes"
    ))
}

/// Local ports one source address can use: the size of
/// `net.ipv4.ip_local_port_range`.
pub fn ephemeral_ports() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<u64>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    Some(hi.saturating_sub(lo) + 1)
}

/// Checks that `idle` clients spread over `sources` source addresses fit
/// in `ports` ephemeral ports each. In a storm every closed connection
/// keeps its port in TIME-WAIT (60 s) while it is redialed from another,
/// so each address needs twice as many.
pub fn check_ports(idle: u64, sources: u64, storm: bool, ports: u64) -> Result<(), String> {
    let sources = sources.max(1);
    let per_source = idle.div_ceil(sources) * if storm { 2 } else { 1 };
    if per_source <= ports {
        return Ok(());
    }
    let per = if storm { ports / 2 } else { ports };
    let want = idle.div_ceil(per.max(1));
    Err(format!(
        "--idle {idle} over {sources} source address(es) needs {per_source} local ports on each{} \
         but the ephemeral range has {ports}: use --source-addrs {want} or more",
        if storm {
            " (a storm's closed connections hold theirs in TIME-WAIT)"
        } else {
            ""
        }
    ))
}

/// The source address of idle client `i` with `--source-addrs n`:
/// round-robin over 127.0.0.2 … 127.0.0.(n+1); `None` (the kernel's
/// choice) for n ≤ 1.
pub fn source_addr(i: usize, n: usize) -> Option<IpAddr> {
    if n <= 1 {
        return None;
    }
    let last = (2 + i % n.min(MAX_SOURCE_ADDRS)) as u8;
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
}

/// The host of a relay URL (`http://host:port/…`, `https://[v6]:port`).
pub fn url_host(url: &str) -> &str {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    let hp = rest.split('/').next().unwrap_or("");
    if let Some(v6) = hp.strip_prefix('[') {
        return v6.split(']').next().unwrap_or("");
    }
    hp.rsplit_once(':').map_or(hp, |(h, _)| h)
}

/// Checks `--source-addrs n` against the relay URL: binding 127.0.0.x
/// only reaches a relay on IPv4 loopback.
pub fn check_sources(url: &str, n: usize) -> Result<(), String> {
    if n == 0 || n > MAX_SOURCE_ADDRS {
        return Err(format!(
            "--source-addrs must be between 1 and {MAX_SOURCE_ADDRS}"
        ));
    }
    if n == 1 {
        return Ok(());
    }
    let host = url_host(url);
    let loopback_v4 = host == "localhost"
        || host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_ipv4() && ip.is_loopback());
    if loopback_v4 {
        Ok(())
    } else {
        Err(format!(
            "--source-addrs {n} binds clients to 127.0.0.2 … 127.0.0.{}, which only reach \
             a relay on IPv4 loopback; {host:?} is not (use --source-addrs 1)",
            n + 1
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_go_round_robin_from_127_0_0_2() {
        assert_eq!(source_addr(0, 1), None);
        assert_eq!(source_addr(7, 0), None);
        let got: Vec<String> = (0..5)
            .map(|i| source_addr(i, 2).unwrap().to_string())
            .collect();
        assert_eq!(
            got,
            [
                "127.0.0.2",
                "127.0.0.3",
                "127.0.0.2",
                "127.0.0.3",
                "127.0.0.2"
            ]
        );
        assert_eq!(source_addr(253, 254).unwrap().to_string(), "127.0.0.255");
        assert_eq!(source_addr(254, 254).unwrap().to_string(), "127.0.0.2");
    }

    #[test]
    fn source_addresses_need_a_loopback_relay() {
        assert!(check_sources("http://127.0.0.1:3340", 2).is_ok());
        assert!(check_sources("https://localhost:443/derp", 4).is_ok());
        assert!(check_sources("http://127.5.6.7", 2).is_ok());
        // One address: no binding, any relay.
        assert!(check_sources("https://derp.example.com", 1).is_ok());
        let e = check_sources("https://derp.example.com", 2).unwrap_err();
        assert!(
            e.contains("derp.example.com") && e.contains("127.0.0.3"),
            "{e}"
        );
        assert!(check_sources("http://[::1]:3340", 2).is_err());
        assert!(check_sources("http://10.0.0.1:3340", 2).is_err());
        assert!(check_sources("http://127.0.0.1:3340", 0).is_err());
        assert!(check_sources("http://127.0.0.1:3340", 255).is_err());
    }

    #[test]
    fn url_hosts() {
        assert_eq!(url_host("http://127.0.0.1:3340/derp"), "127.0.0.1");
        assert_eq!(url_host("https://localhost"), "localhost");
        assert_eq!(url_host("http://[::1]:80"), "::1");
        assert_eq!(url_host("127.0.0.1:1"), "127.0.0.1");
    }

    #[test]
    fn fd_budget_counts_every_connection_once_or_twice_in_process() {
        let c = Connections {
            idle: 19_000,
            pairs: 10,
            stuck_watchers: 0,
            churn_rounds: 0,
        };
        assert_eq!(c.total(), 19_020);
        assert_eq!(c.bench_fds(false), 19_020 + RESERVE_FDS);
        assert_eq!(c.relay_fds(), 19_020 + RESERVE_FDS);
        assert_eq!(c.bench_fds(true), 2 * 19_020 + RESERVE_FDS);
        assert!(check_fds(c.bench_fds(false), 20_000, 19_000, "the bench").is_ok());
        // 100,000 idle clients do not fit in 20,000 descriptors; the
        // message says what would.
        let big = Connections { idle: 100_000, ..c };
        let e = check_fds(big.bench_fds(false), 20_000, 100_000, "the bench").unwrap_err();
        assert!(e.contains("100084") && e.contains("--idle 19916"), "{e}");
        let churn = Connections {
            churn_rounds: 256,
            ..c
        };
        assert_eq!(churn.total(), 19_020 + 512);
    }

    #[test]
    fn port_budget_per_source_address() {
        let range = 60999 - 32768 + 1;
        assert!(check_ports(19_000, 1, false, range).is_ok());
        assert!(check_ports(19_000, 2, true, range).is_ok());
        let e = check_ports(19_000, 1, true, range).unwrap_err();
        assert!(e.contains("--source-addrs 2"), "{e}");
        let e = check_ports(100_000, 2, false, range).unwrap_err();
        assert!(e.contains("--source-addrs 4"), "{e}");
        assert!(check_ports(100_000, 8, true, range).is_ok());
        assert!(check_ports(0, 1, true, range).is_ok());
    }
}

//! `derpd serve` runs with glibc's thread caches off (it executes itself
//! once with `GLIBC_TUNABLES`), keeping its PID, unless the operator's
//! `GLIBC_TUNABLES` already sets the tcache.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The relay's `GLIBC_TUNABLES` as its running process sees it, once it
/// listens; `env` is what it was started with.
fn tunables_of_running_relay(env: Option<&str>) -> Option<String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_derpd"));
    cmd.args(["serve", "--dev", "-a", &format!("127.0.0.1:{port}")])
        .args(["--stun=false", "--metrics-addr", "off"])
        .env_remove("GLIBC_TUNABLES")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(v) = env {
        cmd.env("GLIBC_TUNABLES", v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "relay did not listen");
        assert!(child.try_wait().unwrap().is_none(), "relay exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Same PID: the process that listens is the one we started.
    let environ = std::fs::read(format!("/proc/{}/environ", child.id())).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let var = |name: &str| {
        environ
            .split(|&b| b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok())
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    // Executed again exactly when the operator left the tcache alone.
    let tuned = var("DERPD_MALLOC_TUNED").is_some();
    assert_eq!(tuned, !env.unwrap_or("").contains("tcache"));
    var("GLIBC_TUNABLES")
}

#[test]
fn the_relay_turns_the_tcache_off_for_itself() {
    assert_eq!(
        tunables_of_running_relay(None).as_deref(),
        Some("glibc.malloc.tcache_count=0")
    );
    // Other tunables of the operator's: executed again all the same.
    assert!(tunables_of_running_relay(Some("glibc.malloc.arena_max=2")).is_some());
    // (With other tunables set, glibc's loader cuts the string it shows at
    // the first ':' while it parses it; the pure function that appends
    // ours is unit-tested in derpd::memory.)
}

#[test]
fn an_operators_tcache_setting_wins() {
    assert_eq!(
        tunables_of_running_relay(Some("glibc.malloc.tcache_count=7")).as_deref(),
        Some("glibc.malloc.tcache_count=7")
    );
}

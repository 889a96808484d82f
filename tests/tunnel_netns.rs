//! Real WireGuard (Debian's `wireguard-go` + `wireguard-tools`) over two
//! `derpd tunnel`s and a relay, in three network namespaces the script
//! creates and removes: handshake, ping both ways, 4 MiB byte-exact TCP
//! transfers, iperf3, traffic stopping with the relay. See
//! `scripts/netns-tunnel-test.sh`. Needs root; skipped (with a note) when
//! not root. `scripts/test.sh` installs the packages it needs.

use std::process::Command;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

#[test]
fn wireguard_go_pair_over_derpd_tunnels_in_namespaces() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to create network namespaces");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/netns-tunnel-test.sh");
    let out = Command::new(script)
        .env("DERPD", env!("CARGO_BIN_EXE_derpd"))
        .output()
        .expect("runs the namespace script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "namespace test failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    for step in [
        "handshake: A at",
        "ping A → B and B → A: ok",
        "4 MiB A → B and B → A: byte-exact",
        "iperf3: ",
        "relay stopped: ping A → B fails",
        "relay back: tunnels reconnected",
        "== PASS",
    ] {
        assert!(stdout.contains(step), "missing step {step:?}\n{stdout}");
    }
}

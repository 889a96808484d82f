//! `derpd prober` against real relays: three `derpd serve` processes on
//! loopback, meshed, with TLS from a test CA and STUN, probed by the
//! `derpd prober` binary (`--once`'s table and exit code, `/metrics` of a
//! running prober); and the mesh probe's exchange with Tailscale's
//! `ts_derp` client as one end.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::ca::TestCa;

/// One `derpd serve` process of the test region.
struct Relay {
    name: String,
    port: u16,
    stun: u16,
    metrics: u16,
    child: Option<Child>,
}

impl Relay {
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A region of three meshed relays (`derp1`..`derp3`, hostnames
/// `derpN.test` on 127.0.0.1), its CA file and a DERP map file.
struct Region {
    dir: tempfile::TempDir,
    relays: Vec<Relay>,
}

impl Region {
    /// Starts the region. `odd_key`: derp3 gets a mesh key of its own.
    /// `short_lived`: derp3's certificate expires in 5 days.
    fn start(odd_key: bool, short_lived: bool, yaml: bool) -> Region {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
        let key = |name: &str| {
            let out = Command::new(env!("CARGO_BIN_EXE_derpd"))
                .args(["keygen", "--mesh"])
                .output()
                .unwrap();
            let p = dir.path().join(name);
            std::fs::write(&p, out.stdout).unwrap();
            p
        };
        let (mesh, odd) = (key("mesh.key"), key("odd.key"));
        let mut relays: Vec<Relay> = (1..=3)
            .map(|i| Relay {
                name: format!("derp{i}"),
                port: common::free_port(),
                stun: common::free_port(),
                metrics: common::free_port(),
                child: None,
            })
            .collect();
        let peers: Vec<String> = relays
            .iter()
            .map(|r| format!("{}.test:{}/127.0.0.1:{}", r.name, r.port, r.port))
            .collect();
        let peers = peers.join(",");
        for (i, r) in relays.iter_mut().enumerate() {
            let host = format!("{}.test", r.name);
            let certdir = dir.path().join(&r.name);
            std::fs::create_dir_all(&certdir).unwrap();
            let leaf = if short_lived && i == 2 {
                ca.leaf_until(
                    &[&host],
                    time::OffsetDateTime::now_utc() + time::Duration::days(5),
                )
            } else {
                ca.leaf(&[&host])
            };
            std::fs::write(certdir.join(format!("{host}.crt")), &leaf.crt_pem).unwrap();
            std::fs::write(certdir.join(format!("{host}.key")), &leaf.key_pem).unwrap();
            let psk = if odd_key && i == 2 { &odd } else { &mesh };
            let log = std::fs::File::create(dir.path().join(format!("{}.log", r.name))).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_derpd"))
                .args(["serve", "--addr", &format!("127.0.0.1:{}", r.port)])
                .args(["--hostname", &host, "--certmode", "manual"])
                .arg("--certdir")
                .arg(&certdir)
                .args(["--http-port", "-1", "--stun-port", &r.stun.to_string()])
                .args(["--metrics-addr", &format!("127.0.0.1:{}", r.metrics)])
                .arg("--state-dir")
                .arg(dir.path().join(format!("{}-state", r.name)))
                .arg("--mesh-psk-file")
                .arg(psk)
                .args(["--mesh-with", &peers])
                .arg("--mesh-ca-file")
                .arg(dir.path().join("ca.pem"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("derpd serve runs");
            r.child = Some(child);
        }
        let region = Region { dir, relays };
        region.write_map(yaml);
        // Every relay serves; the meshed ones have linked to each other.
        for (i, r) in region.relays.iter().enumerate() {
            let want = if odd_key { usize::from(i < 2) } else { 2 };
            let ok = wait_until(Duration::from_secs(20), || {
                http_get(r.metrics, "/metrics").is_some_and(|m| {
                    m.lines()
                        .filter(|l| l.starts_with("derpd_mesh_link_up{") && l.ends_with(" 1"))
                        .count()
                        >= want
                })
            });
            assert!(ok, "{} serves with {want} mesh links up", r.name);
        }
        region
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The DERP map of the region: JSON as `/derpmap.json` serves it, or
    /// headscale's YAML `derp.paths` format.
    fn write_map(&self, yaml: bool) {
        if yaml {
            let mut y = String::from(
                "regions:\n  900:\n    regionid: 900\n    regioncode: test\n    \
                 regionname: Test\n    nodes:\n",
            );
            for r in &self.relays {
                y += &format!(
                    "      - name: {}\n        regionid: 900\n        hostname: {}.test\n        \
                     ipv4: 127.0.0.1\n        ipv6: none\n        stunport: {}\n        \
                     derpport: {}\n",
                    r.name, r.name, r.stun, r.port
                );
            }
            std::fs::write(self.path("derp.yaml"), y).unwrap();
        } else {
            let nodes: Vec<serde_json::Value> = self
                .relays
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "Name": r.name, "RegionID": 900, "HostName": format!("{}.test", r.name),
                        "IPv4": "127.0.0.1", "IPv6": "none", "STUNPort": r.stun, "DERPPort": r.port,
                    })
                })
                .collect();
            let map = serde_json::json!({"Regions": {"900": {
                "RegionID": 900, "RegionCode": "test", "RegionName": "Test", "Nodes": nodes}}});
            std::fs::write(self.path("derpmap.json"), map.to_string()).unwrap();
        }
    }

    /// `derpd prober --once` with short timeouts: (exit code, stdout).
    fn probe_once(&self, map: &str) -> (i32, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_derpd"))
            .args(["prober", "--once", "--derp-map"])
            .arg(self.path(map))
            .arg("--ca-file")
            .arg(self.path("ca.pem"))
            .args(["--stun-timeout", "1s", "--tls-timeout", "3s"])
            .args(["--derp-timeout", "3s", "--mesh-timeout", "3s"])
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), stdout)
    }
}

fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// GET `path` on 127.0.0.1:`port`; the body of a 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// The `--once` table as (node or pair, probe) → (result, detail).
fn table(out: &str) -> BTreeMap<(String, String), (String, String)> {
    out.lines()
        .skip(1)
        .filter(|l| l.starts_with("test "))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let detail = cols.get(5..).map(|c| c.join(" ")).unwrap_or_default();
            (
                (cols[1].to_owned(), cols[2].to_owned()),
                (cols[3].to_owned(), detail),
            )
        })
        .collect()
}

fn touches(target: &str, node: &str) -> bool {
    target == node
        || target.starts_with(&format!("{node}->"))
        || target.ends_with(&format!("->{node}"))
}

#[test]
fn a_meshed_region_is_all_green_and_a_stopped_relay_fails_only_its_probes() {
    let mut region = Region::start(false, false, false);
    let (code, out) = region.probe_once("derpmap.json");
    let t = table(&out);
    // 3 × (tls, stun4, derp) + 6 ordered mesh pairs.
    assert_eq!(t.len(), 15, "{out}");
    assert!(t.values().all(|(r, _)| r == "ok"), "{out}");
    assert_eq!(code, 0, "{out}");
    assert!(t[&("derp1".into(), "stun4".into())]
        .1
        .starts_with("mapped 127.0.0.1:"));
    assert!(t[&("derp2->derp3".into(), "mesh".into())].0 == "ok");
    assert!(out.ends_with("15 probes, 15 ok, 0 failed\n"), "{out}");

    region.relays[2].stop();
    let (code, out) = region.probe_once("derpmap.json");
    assert_ne!(code, 0, "{out}");
    let t = table(&out);
    assert_eq!(t.len(), 15, "{out}");
    for ((target, probe), (result, detail)) in &t {
        if touches(target, "derp3") {
            assert_eq!(result, "FAIL", "{target} {probe} fails: {out}");
            assert!(!detail.is_empty(), "{target} {probe} says why: {out}");
        } else {
            assert_eq!(result, "ok", "{target} {probe} stays green: {out}");
        }
    }
    assert!(out.ends_with("15 probes, 8 ok, 7 failed\n"), "{out}");
}

#[test]
fn a_changed_mesh_key_fails_only_the_mesh_pairs_and_an_expiring_certificate_shows() {
    let region = Region::start(true, true, true);
    let (code, out) = region.probe_once("derp.yaml");
    assert_ne!(code, 0, "{out}");
    let t = table(&out);
    assert_eq!(t.len(), 15, "{out}");
    for ((target, probe), (result, _)) in &t {
        let broken = probe == "mesh" && touches(target, "derp3");
        assert_eq!(
            result,
            if broken { "FAIL" } else { "ok" },
            "{target} {probe}: {out}"
        );
    }
    let (_, tls3) = &t[&("derp3".into(), "tls".into())];
    assert_eq!(tls3, "cert expires in 4.9 days", "{out}");
    assert!(t[&("derp1".into(), "tls".into())]
        .1
        .starts_with("cert expires in"));

    // The same, as a running prober's /metrics says it.
    let listen = common::free_port();
    let mut prober = Command::new(env!("CARGO_BIN_EXE_derpd"))
        .args(["prober", "--derp-map"])
        .arg(region.path("derp.yaml"))
        .arg("--ca-file")
        .arg(region.path("ca.pem"))
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--interval", "1s", "--mesh-interval", "2s"])
        .args(["--stun-timeout", "1s", "--mesh-timeout", "1500ms"])
        .args([
            "--bw-interval",
            "2s",
            "--bw-size",
            "100000",
            "--bw-timeout",
            "2s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let series = |m: &str, name: &str, labels: &str| -> Option<f64> {
        m.lines()
            .find(|l| l.starts_with(&format!("{name}{{{labels}}} ")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    let pair = |from: &str, to: &str, probe: &str| {
        format!("from=\"{from}\",probe=\"{probe}\",region=\"test\",to=\"{to}\"")
    };
    let node = |n: &str, probe: &str| format!("node=\"{n}\",probe=\"{probe}\",region=\"test\"");
    let mut last = String::new();
    let every_probe_ran = wait_until(Duration::from_secs(20), || {
        let Some(m) = http_get(listen, "/metrics") else {
            return false;
        };
        last = m;
        let m = &last;
        let names = ["derp1", "derp2", "derp3"];
        names.iter().all(|n| {
            ["tls", "stun4", "derp"]
                .iter()
                .all(|p| series(m, "derpd_prober_node_success", &node(n, p)).is_some())
                && names.iter().filter(|o| *o != n).all(|o| {
                    series(m, "derpd_prober_pair_success", &pair(n, o, "mesh")).is_some()
                        && series(m, "derpd_prober_pair_success", &pair(n, o, "bandwidth"))
                            .is_some()
                })
        })
    });
    let page = http_get(listen, "/");
    let _ = prober.kill();
    let _ = prober.wait();
    assert!(every_probe_ran, "{last}");
    let m = &last;
    for n in ["derp1", "derp2", "derp3"] {
        for p in ["tls", "stun4", "derp"] {
            assert_eq!(
                series(m, "derpd_prober_node_success", &node(n, p)),
                Some(1.0),
                "{n} {p}"
            );
        }
    }
    assert_eq!(
        series(
            m,
            "derpd_prober_pair_success",
            &pair("derp1", "derp2", "mesh")
        ),
        Some(1.0)
    );
    assert_eq!(
        series(
            m,
            "derpd_prober_pair_success",
            &pair("derp2", "derp1", "bandwidth")
        ),
        Some(1.0)
    );
    assert!(series(
        m,
        "derpd_prober_bandwidth_bytes_per_second",
        "from=\"derp1\",region=\"test\",to=\"derp2\""
    )
    .is_some_and(|b| b > 0.0));
    for (a, b) in [("derp1", "derp3"), ("derp3", "derp2")] {
        assert_eq!(
            series(m, "derpd_prober_pair_success", &pair(a, b, "mesh")),
            Some(0.0),
            "{a}->{b}"
        );
    }
    let expiry = series(
        m,
        "derpd_prober_cert_expiry_timestamp_seconds",
        "node=\"derp3\",region=\"test\"",
    )
    .expect("derp3's certificate expiry");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let days = (expiry - now) / 86_400.0;
    assert!((4.9..=5.0).contains(&days), "{days} days");
    let page = page.expect("the status page");
    assert!(
        page.contains("<td>derp1-&gt;derp3</td><td>mesh</td><td>FAIL</td>"),
        "{page}"
    );
    assert!(page.contains("class=\"ok\""), "{page}");
}

/// The mesh probe's exchange with Tailscale's client as either end.
mod ts_end {
    use super::common::*;
    use bytes::Bytes;
    use derpd::mesh::{MeshExt, MeshOptions, PeerSpec};
    use derpd::prober::mesh::{exchange, PacketEnd};
    use derpd::proto::{MeshKey, NodePublic};
    use derpd::server::Server;
    use tokio::net::TcpStream;

    struct Ts(ts_derp::Client<TcpStream>, NodePublic);

    impl PacketEnd for Ts {
        fn key(&self) -> NodePublic {
            self.1
        }
        async fn send(&mut self, dst: NodePublic, payload: Bytes) -> Result<(), String> {
            self.0
                .send_one(to_ts(&dst), &payload)
                .await
                .map_err(|e| format!("{e:?}"))
        }
        async fn recv(&mut self) -> Result<(NodePublic, Bytes), String> {
            let (src, p) = self.0.recv_one().await.map_err(|e| format!("{e:?}"))?;
            Ok((from_ts(&src), Bytes::copy_from_slice(p.as_ref())))
        }
    }

    #[tokio::test]
    async fn ts_derp_clients_take_either_end_of_a_mesh_probe() {
        let mk = MeshKey::generate();
        let a = start_with(Default::default(), Some(mk.clone())).await;
        let b = start_with(Default::default(), Some(mk.clone())).await;
        let list: Vec<PeerSpec> = [&a, &b]
            .iter()
            .map(|s| PeerSpec::parse(&format!("http://{}", s.addr)).unwrap())
            .collect();
        for s in [&a, &b] {
            s.relay
                .mesh()
                .set_peers(&list, &MeshOptions::default())
                .unwrap();
        }
        let servers: [&Server; 2] = [&a, &b];
        for (from, to) in [(0, 1), (1, 0)] {
            let (tc, tk) = ts_client(servers[to]).await;
            let mut theirs = Ts(tc, from_ts(&tk.public));
            let (mut ours, _) = our_client(servers[from]).await;
            let deadline = tokio::time::Instant::now() + ARRIVES;
            let o = exchange(&mut ours, &mut theirs, "ours", "ts_derp", deadline).await;
            assert!(o.is_ok(), "ours -> ts_derp: {o:?}");
            let (tc, tk) = ts_client(servers[from]).await;
            let mut theirs = Ts(tc, from_ts(&tk.public));
            let (mut ours, _) = our_client(servers[to]).await;
            let o = exchange(&mut theirs, &mut ours, "ts_derp", "ours", deadline).await;
            assert!(o.is_ok(), "ts_derp -> ours: {o:?}");
        }
        a.shutdown().await;
        b.shutdown().await;
    }
}

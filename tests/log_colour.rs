//! Logs fit for journald, Kubernetes and log files: the built binary writes
//! ANSI colour codes only when standard error is a terminal, and never with
//! `NO_COLOR` set (<https://no-color.org>).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ESC: u8 = 0x1b;

fn derpd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_derpd"));
    cmd.env("RUST_LOG", "info").env_remove("NO_COLOR");
    cmd
}

fn wait_for(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log within 30s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `derpd serve` with standard error redirected to a file, as systemd
/// (journald), Kubernetes and Docker run it: start, serve, stop on SIGTERM.
/// Not one escape byte in the file, in either log format.
#[test]
fn no_escape_codes_when_stderr_is_a_file() {
    for format in ["text", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr.log");
        let mut child = derpd()
            .args(["serve", "--addr", "127.0.0.1:0", "--stun=false"])
            .args(["--metrics-addr", "off", "--log-format", format])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_for(&log, "derpd serving");
        let killed = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = child.wait().unwrap();
        assert!(status.success(), "derpd exited with {status}");
        let bytes = std::fs::read(&log).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("stopped"), "{format}: {text}");
        assert!(
            !bytes.contains(&ESC),
            "{format}: escape byte in a log written to a file:\n{text:?}"
        );
    }
}

/// What `derpd serve` writes to a terminal: run under `script(1)`, which
/// gives it a pseudo-terminal. The listen address is taken, so the relay
/// logs `starting` and exits at once.
fn on_a_terminal(no_color: Option<&str>) -> Option<Vec<u8>> {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no script(1) to run derpd on a pseudo-terminal");
        return None;
    }
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let command = format!(
        "{} serve --addr {} --stun=false --metrics-addr off --state-dir {}",
        env!("CARGO_BIN_EXE_derpd"),
        busy.local_addr().unwrap(),
        dir.path().join("state").display()
    );
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-e", "-c", &command, "/dev/null"])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    if let Some(v) = no_color {
        cmd.env("NO_COLOR", v);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("starting"),
        "no log on the terminal: {text:?}"
    );
    Some(out.stdout)
}

#[test]
fn colour_on_a_terminal_unless_no_color() {
    let Some(plain) = on_a_terminal(None) else {
        return;
    };
    assert!(plain.contains(&ESC), "no colour on a terminal");
    // An empty NO_COLOR does not count (no-color.org).
    assert!(on_a_terminal(Some("")).unwrap().contains(&ESC));
    let out = on_a_terminal(Some("1")).unwrap();
    assert!(
        !out.contains(&ESC),
        "NO_COLOR=1, yet escape codes: {:?}",
        String::from_utf8_lossy(&out)
    );
}

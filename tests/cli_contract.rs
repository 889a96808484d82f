//! The operator-facing contract of `derpd serve`: its `--help` text, and the
//! exact errors (and exit codes) for bad flag values and bad TOML values.
//!
//! The built binary runs in `tests/fixtures/cli/` (so the paths in messages
//! are the same everywhere) and its output is compared with the recorded
//! text in that directory. After an intended change to flags or messages,
//! re-record with `DERPD_RECORD_CLI=1 cargo test --test cli_contract` and
//! review the diff.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bad flag values (and combinations) whose errors are recorded. None of
/// them may start a server: each is expected to exit with an error.
const BAD_FLAGS: &[&[&str]] = &[
    // Rejected by the flag parser.
    &["--hostnme", "x"],
    &["-hostnme=x"],
    &["--stun-port", "x"],
    &["--stun-port", "70000"],
    &["--certmode", "sometimes"],
    &["--log-format", "xml"],
    &["--dev=maybe"],
    &["--stun", "false"],
    &["--queue-depth", "abc"],
    &["--queue-depth", "-3"],
    &["--http-port", "x"],
    &["--accept-connection-limit", "-1"],
    &["--per-client-rate-limit", "fast"],
    &["--admission-when-empty", "sometimes"],
    &["--verify-client-url-fail-open=perhaps"],
    // Rejected when the settings are resolved.
    &["--config", "files/missing.toml"],
    &["--addr", "nowhere"],
    &["-a", ":99999"],
    &["--hostname", ""],
    &["--dev", "--certmode", "manual"],
    &["--http-port", "70000"],
    &["--http-port", "-2"],
    &["--metrics-addr", "localhost"],
    &["--tcp-write-timeout", "soon"],
    &["--handshake-timeout", "0"],
    &["--handshake-timeout", "10 jiffies"],
    &["--idle-timeout", "x"],
    &["--frame-timeout", "later"],
    &["--tcp-keepalive-time", "often"],
    &["--tcp-keepalive-time", "100ms"],
    &["--tcp-user-timeout", "-3s"],
    &["--listen-backlog", "0"],
    &["--listen-backlog", "many"],
    &["--headscale-max-shrink", "2"],
    &["--headscale-max-shrink", "NaN"],
    &[
        "--headscale-url",
        "http://h",
        "--headscale-api-key-file",
        "/k",
        "--headscale-shrink-confirm",
        "a while",
    ],
    &[
        "--headscale-url",
        "http://h",
        "--headscale-api-key-file",
        "/k",
        "--headscale-ca-file",
        "files/missing.pem",
    ],
    &["--queue-depth", "0"],
    &["--queue-depth", "70000"],
    &["--accept-connection-limit=-1"],
    &["--accept-connection-limit", "NaN"],
    &[
        "--accept-connection-limit",
        "5",
        "--accept-connection-burst",
        "0",
    ],
    &["--rate-config", "files/missing.json"],
    &["--rate-config", "files/not-json.txt"],
    &["--shutdown-timeout", "later"],
    &["--restart-reconnect-in", "x"],
    &["--restart-try-for", "1 fortnight"],
    &["--mesh-with", "derp1.example.com,derp2.example.com"],
    &["--mesh-with", "host:xx", "--mesh-psk-file", "files/bad-psk"],
    &["--mesh-ca-file", "files/missing.pem"],
    &["--mesh-ca-file", "files/not-json.txt"],
    &["--verify-clients", "true"],
    &["--verify-clients", "headscale"],
    &["--headscale-url", "https://hs.example.com"],
    &["--headscale-api-key-file", "files/key"],
    &[
        "--headscale-url",
        "ftp://hs.example.com",
        "--headscale-api-key-file",
        "files/key",
    ],
    &[
        "--headscale-url",
        "http://hs.example.com",
        "--headscale-api-key-file",
        "files/key",
        "--headscale-poll-interval",
        "0",
    ],
    &[
        "--headscale-url",
        "http://hs.example.com",
        "--headscale-api-key-file",
        "files/key",
        "--headscale-timeout",
        "never",
    ],
    &["--allow-tags", "tag:a"],
    &["--allow-users", "alice,bob"],
    &["--admission-when-empty", "allow"],
    &["--companion-peers", "https://a.example.com,nope"],
    &["--verify-client-url", "not a url"],
    &[
        "--verify-client-url",
        "http://127.0.0.1:9/verify",
        "--verify-client-url-cache",
        "soon",
    ],
    &["--derp-map-file", "files/missing-map.json"],
    &["--derp-map-file", "files/not-json.txt"],
    // Rejected after the settings resolved, before anything listens.
    &["--dev", "--mesh-psk-file", "files/bad-psk"],
    &["--dev", "--mesh-psk-file", "files/missing-psk"],
    &[
        "-c",
        "files/bad.key",
        "--stun=false",
        "--metrics-addr",
        "off",
    ],
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cli")
}

/// Runs `derpd serve ARGS` in the fixtures directory and describes how it
/// ended: the command, the exit code, stdout and stderr.
fn run(args: &[&str]) -> String {
    let state = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_derpd"))
        .arg("serve")
        .args(args)
        .current_dir(fixtures())
        .env_remove("RUST_LOG")
        .env_remove("XDG_STATE_HOME")
        .env("STATE_DIRECTORY", state.path())
        .env("HOME", state.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("derpd runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = child.wait_with_output().expect("output");
    let code = match status {
        Some(s) => format!("{:?}", s.code()),
        None => "still running after 30s (killed)".into(),
    };
    format!(
        "$ derpd serve {}\nexit: {code}\n--- stdout\n{}--- stderr\n{}\n",
        args.iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    )
}

/// Compares `actual` with the recorded file, or records it when
/// `DERPD_RECORD_CLI` is set.
fn check(name: &str, actual: &str) {
    let path = fixtures().join(name);
    if std::env::var_os("DERPD_RECORD_CLI").is_some() {
        std::fs::write(&path, actual).expect("record fixture");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (record with DERPD_RECORD_CLI=1)", path.display()));
    if expected != actual {
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(e, a)| e != a)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{name} differs from the recorded text at line {}:\n  recorded: {:?}\n  now:      {:?}\n\
             (re-record with DERPD_RECORD_CLI=1 only for an intended change)",
            first + 1,
            expected.lines().nth(first),
            actual.lines().nth(first),
        );
    }
}

#[test]
fn serve_help_is_unchanged() {
    check("serve-help.txt", &run(&["--help"]));
}

#[test]
fn bad_flag_values_give_the_recorded_errors() {
    let text: String = BAD_FLAGS.iter().map(|args| run(args)).collect();
    check("bad-flags.txt", &text);
}

#[test]
fn bad_toml_values_give_the_recorded_errors() {
    let mut files: Vec<String> = std::fs::read_dir(fixtures().join("toml"))
        .expect("toml fixtures")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .filter(|n| n.ends_with(".toml"))
        .collect();
    files.sort();
    assert!(files.len() > 20, "the TOML cases are present");
    let text: String = files
        .iter()
        .map(|f| run(&["--config", &format!("toml/{f}")]))
        .collect();
    check("bad-toml.txt", &text);
}

//! derper-compatible command lines: Go-style single-dash long flags.

/// Rewrites Go-style single-dash long flags (`-hostname=x`, `-stun-port 3478`,
/// as Tailscale's derper accepts them) to `--hostname=x`, so derper command
/// lines work unchanged. Single-letter flags (`-a`, `-c`), negative numbers
/// (`-1`) and everything after `--` are left alone.
pub fn go_style_args<I: IntoIterator<Item = std::ffi::OsString>>(
    args: I,
) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut rest = false;
    for arg in args {
        let rewritten = match arg.to_str() {
            Some("--") => {
                rest = true;
                None
            }
            Some(a) if !rest && a.starts_with('-') && !a.starts_with("--") => {
                let name = a[1..].split('=').next().unwrap_or("");
                let long_name = name.len() >= 2
                    && name.starts_with(|c: char| c.is_ascii_lowercase())
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
                long_name.then(|| format!("-{a}").into())
            }
            _ => None,
        };
        out.push(rewritten.unwrap_or(arg));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derper_style_single_dash_flags_are_accepted() {
        let args = |v: &[&str]| -> Vec<String> {
            go_style_args(v.iter().map(std::ffi::OsString::from))
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect()
        };
        assert_eq!(
            args(&[
                "derpd",
                "serve",
                "-hostname=derp.example.com",
                "-stun-port",
                "3478",
                "-a",
                ":443"
            ]),
            [
                "derpd",
                "serve",
                "--hostname=derp.example.com",
                "--stun-port",
                "3478",
                "-a",
                ":443"
            ]
        );
        assert_eq!(
            args(&[
                "derpd",
                "serve",
                "--http-port",
                "-1",
                "-c",
                "/k",
                "-verify-clients"
            ]),
            [
                "derpd",
                "serve",
                "--http-port",
                "-1",
                "-c",
                "/k",
                "--verify-clients"
            ]
        );
        assert_eq!(args(&["derpd", "--", "-dev"]), ["derpd", "--", "-dev"]);
    }
}

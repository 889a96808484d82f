//! The open-file limit. Like Go's runtime, `derpd` raises its soft
//! `RLIMIT_NOFILE` to the hard limit at start, so a relay (or a benchmark
//! holding many idle clients) is bounded by what the administrator allows,
//! not by the shell's conventional soft default of 1024.

// `rlim_t` is `u64` on 64-bit Linux but not on every target.
#![allow(clippy::unnecessary_cast)]

use std::sync::OnceLock;

/// The soft and hard `RLIMIT_NOFILE` of this process.
pub fn nofile() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((lim.rlim_cur as u64, lim.rlim_max as u64))
}

/// What [`raise_nofile`] did: the soft limit before and after, and the
/// hard limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    /// Soft limit before.
    pub before: u64,
    /// Soft limit now.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

static LAST: OnceLock<Result<Raised, String>> = OnceLock::new();

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new
/// soft limit. A hard limit of "unlimited" cannot be a soft limit for file
/// descriptors on Linux; then the soft limit is raised to `fs.nr_open`
/// (the kernel's ceiling). On failure the limit is left as it was. The
/// outcome of the first call is kept for [`last_raise`].
pub fn raise_nofile() -> std::io::Result<u64> {
    let result = raise_inner();
    let _ = LAST.set(result.as_ref().map(|r| *r).map_err(|e| e.to_string()));
    result.map(|r| r.soft)
}

/// The outcome of the first [`raise_nofile`], if it ran (for logging once
/// the logger is set up).
pub fn last_raise() -> Option<&'static Result<Raised, String>> {
    LAST.get()
}

fn raise_inner() -> std::io::Result<Raised> {
    let (before, hard) = nofile()?;
    let target = if hard == libc::RLIM_INFINITY as u64 {
        nr_open().unwrap_or(before).max(before)
    } else {
        hard
    };
    if target > before {
        let lim = libc::rlimit {
            rlim_cur: target as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: `lim` is a valid rlimit; the call only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let (soft, hard) = nofile()?;
    Ok(Raised { before, soft, hard })
}

/// `fs.nr_open`: the most file descriptors a process may ever have.
fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The soft open-file limit of another process, from `/proc/PID/limits`.
pub fn nofile_of(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    parse_limits_nofile(&text)
}

/// The soft "Max open files" of a `/proc/PID/limits` text (`None` when
/// absent; "unlimited" is `u64::MAX`).
fn parse_limits_nofile(text: &str) -> Option<u64> {
    let rest = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    let soft = rest.split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_to_the_hard_limit_and_keeps_it() {
        let soft = raise_nofile().expect("getrlimit/setrlimit");
        let (now, hard) = nofile().unwrap();
        assert_eq!(soft, now);
        if hard != libc::RLIM_INFINITY as u64 {
            assert_eq!(now, hard);
        }
        // Raising again is a no-op.
        assert_eq!(raise_nofile().unwrap(), now);
        assert!(last_raise().is_some());
        assert_eq!(nofile_of(std::process::id()), Some(now));
    }

    #[test]
    fn parses_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max open files            1024                 20000                files     \n";
        assert_eq!(parse_limits_nofile(text), Some(1024));
        let text = "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_limits_nofile(text), Some(u64::MAX));
        assert_eq!(parse_limits_nofile("Max processes 10 10 processes\n"), None);
    }
}

//! Polling headscale's `GET /api/v1/node` and the loop that keeps the cache
//! fresh: headscale first; when it fails, the newest snapshot of a peer
//! relay. Backoff with jitter on failure.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, AUTHORIZATION};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use super::headscale::{classify, FetchError, ParsedList};
pub use super::reason::SyncCause;
use super::{Companion, HttpClient};

/// Largest node-list body accepted (64 MiB: ~100k nodes).
pub const MAX_BODY: usize = 64 << 20;

/// The longest wait between failed attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The wait before the next attempt after `failures` consecutive failures
/// (0 = success: the poll interval). Doubles per failure from the poll
/// interval up to [`MAX_BACKOFF`] (or the poll interval, if larger), then
/// "equal jitter": a uniform pick in `[d/2, d]`; `rand01` is in `[0, 1)`.
pub fn next_delay(poll: Duration, failures: u32, rand01: f64) -> Duration {
    if failures == 0 {
        return poll;
    }
    let cap = MAX_BACKOFF.max(poll);
    let d = poll
        .checked_mul(1u32 << failures.min(16))
        .unwrap_or(cap)
        .min(cap);
    d / 2 + d.mul_f64(rand01.clamp(0.0, 1.0) / 2.0)
}

/// Reads the API key file, trimming whitespace (`headscale apikeys create
/// > FILE` leaves a newline).
pub fn read_api_key(path: &Path) -> Result<Zeroizing<String>, FetchError> {
    let raw = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| FetchError::KeyFile(format!("{}: {e}", path.display())))?,
    );
    let key = Zeroizing::new(raw.trim().to_owned());
    if key.is_empty() {
        return Err(FetchError::KeyFile(format!("{}: empty", path.display())));
    }
    Ok(key)
}

/// The node-list URL for a headscale base URL.
pub fn node_list_url(base: &str) -> String {
    format!("{}/api/v1/node", base.trim_end_matches('/'))
}

/// One `GET /api/v1/node`.
pub async fn fetch_nodes(
    client: &HttpClient,
    base: &str,
    api_key: &str,
    timeout: Duration,
) -> Result<ParsedList, FetchError> {
    let mut auth = HeaderValue::from_str(&format!("Bearer {api_key}")).map_err(|_| {
        FetchError::KeyFile("the API key contains characters not allowed in a header".into())
    })?;
    auth.set_sensitive(true);
    let req = hyper::Request::get(node_list_url(base))
        .header(AUTHORIZATION, auth)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| FetchError::Unreachable(format!("bad headscale URL: {e}")))?;
    let fut = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| FetchError::Unreachable(error_chain(&e)))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    FetchError::TooLarge(MAX_BODY)
                } else {
                    FetchError::Unreachable(format!("reading the body: {e}"))
                }
            })?
            .to_bytes();
        Ok::<_, FetchError>((status, body))
    };
    let (status, body) = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| FetchError::Timeout)??;
    classify(status, &body)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// How a failed sync is reported: one line per kind of outage, so an
/// operator can tell an unreachable headscale from a refused API key from
/// an answer that is not a node list.
fn outage_kind(e: &FetchError) -> &'static str {
    match e {
        FetchError::Auth(_) | FetchError::KeyFile(_) => "auth",
        FetchError::Unreachable(_) | FetchError::Timeout => "unreachable",
        FetchError::Status(_) => "http_status",
        FetchError::Decode(_) | FetchError::TooLarge(_) => "decode",
        FetchError::Store(_) => "store",
    }
}

/// Keeps the cache fresh until `shutdown`.
pub async fn run(c: Arc<Companion>, shutdown: CancellationToken) {
    let poll = c.config.poll_interval;
    let mut failures: u32 = 0;
    // The kind of outage last reported (None: healthy, or nothing said).
    let mut reported: Option<&'static str> = None;
    loop {
        let attempt = async {
            match &c.config.headscale {
                Some(_) => match c.sync_once(SyncCause::Poll).await {
                    Ok(n) => {
                        if let Some(kind) = reported.take() {
                            tracing::warn!(
                                nodes = n,
                                after = kind,
                                failures,
                                "headscale sync recovered"
                            );
                        }
                        true
                    }
                    Err(e) => {
                        let kind = outage_kind(&e);
                        if reported == Some(kind) {
                            tracing::debug!(error = %e, failures, "headscale sync failed again");
                        } else if kind == "auth" {
                            // A configuration error, not an outage: say it loudly.
                            tracing::error!(kind, error = %e, "headscale sync failing: fix the API key; serving the cached snapshot meanwhile");
                        } else {
                            tracing::warn!(kind, error = %e, "headscale sync failing; serving the cached snapshot meanwhile");
                        }
                        reported = Some(kind);
                        false
                    }
                },
                None => false,
            }
        };
        let ok = tokio::select! {
            ok = attempt => ok,
            _ = shutdown.cancelled() => return,
        };
        if !ok {
            tokio::select! {
                _ = c.fetch_from_peers() => {}
                _ = shutdown.cancelled() => return,
            }
            if c.config.headscale.is_some() {
                failures = failures.saturating_add(1);
            }
        } else {
            failures = 0;
        }
        let delay = next_delay(poll, failures, fastrand::f64());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let p = Duration::from_secs(10);
        assert_eq!(next_delay(p, 0, 0.9), p);
        assert_eq!(next_delay(p, 1, 0.0), Duration::from_secs(10));
        assert_eq!(next_delay(p, 1, 0.999_999).as_secs(), 19);
        assert_eq!(next_delay(p, 2, 0.0), Duration::from_secs(20));
        assert_eq!(next_delay(p, 30, 0.0), Duration::from_secs(30));
        assert!(next_delay(p, 30, 0.999) <= MAX_BACKOFF);
        let long = Duration::from_secs(600);
        assert!(next_delay(long, 5, 0.5) <= long);
        let short = Duration::from_millis(100);
        assert!(next_delay(short, 3, 0.5) >= Duration::from_millis(400));
    }

    #[test]
    fn api_key_file_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "abcdefg.0123456789abcdef0123456789abcdef\n").unwrap();
        assert_eq!(
            read_api_key(&p).unwrap().as_str(),
            "abcdefg.0123456789abcdef0123456789abcdef"
        );
        std::fs::write(&p, " \n").unwrap();
        assert!(matches!(read_api_key(&p), Err(FetchError::KeyFile(_))));
        assert!(matches!(
            read_api_key(&dir.path().join("nope")),
            Err(FetchError::KeyFile(_))
        ));
        assert_eq!(node_list_url("http://h:8080/"), "http://h:8080/api/v1/node");
    }
}

//! Reads a DERP map document (the companion's `/derpmap.json`, Tailscale's
//! or headscale's map files) from a path or an `http(s)://` URL, bounded in
//! size and time. Shared by the clients that take a map: the tunnel and
//! the prober.

use std::time::Duration;

/// Largest map document read.
pub const MAX_MAP_BYTES: usize = 4 << 20;
/// How long a URL may take to answer.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// The bytes at `source`: a file, or an `http(s)://` URL fetched with the
/// TLS configuration `tls` makes (called only for URLs).
pub async fn read(
    source: &str,
    tls: impl FnOnce() -> Result<rustls::ClientConfig, String>,
) -> Result<Vec<u8>, String> {
    if source.starts_with("http://") || source.starts_with("https://") {
        let tls = tls().map_err(|e| format!("DERP map {source}: {e}"))?;
        tokio::time::timeout(FETCH_TIMEOUT, fetch(source, tls))
            .await
            .map_err(|_| format!("DERP map {source}: no answer within {FETCH_TIMEOUT:?}"))?
    } else {
        let meta = tokio::fs::metadata(source)
            .await
            .map_err(|e| format!("DERP map {source}: {e}"))?;
        if meta.len() > MAX_MAP_BYTES as u64 {
            return Err(format!(
                "DERP map {source}: larger than {MAX_MAP_BYTES} bytes"
            ));
        }
        tokio::fs::read(source)
            .await
            .map_err(|e| format!("DERP map {source}: {e}"))
    }
}

async fn fetch(url: &str, tls: rustls::ClientConfig) -> Result<Vec<u8>, String> {
    use http_body_util::{BodyExt, Empty, Limited};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let uri: hyper::Uri = url.parse().map_err(|e| format!("DERP map {url}: {e}"))?;
    let resp = client
        .get(uri)
        .await
        .map_err(|e| format!("DERP map {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("DERP map {url}: HTTP {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_MAP_BYTES)
        .collect()
        .await
        .map_err(|e| format!("DERP map {url}: {e}"))?;
    Ok(body.to_bytes().to_vec())
}

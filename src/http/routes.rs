//! Every HTTP endpoint of the main listener other than the raw DERP upgrade
//! of a connection's first request: probes, captive-portal check, home page,
//! and DERP upgrades that arrive later on a kept-alive connection.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::head::{upgrade_kind, UpgradeKind};
use super::{Body, Front};
use crate::relay::AcceptOptions;

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The value of `X-Tailscale-Response` for a challenge, if it is acceptable:
/// at most 64 characters from `[A-Za-z0-9._:-]`.
pub fn challenge_response(challenge: &[u8]) -> Option<String> {
    let ok = !challenge.is_empty()
        && challenge.len() <= 64
        && challenge
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(c));
    ok.then(|| format!("response {}", String::from_utf8_lossy(challenge)))
}

/// Route label for metrics.
fn route_label(path: &str) -> &'static str {
    match path {
        "/derp" => "derp",
        "/derp/probe" | "/derp/latency-check" => "probe",
        "/generate_204" => "generate_204",
        "/robots.txt" => "robots",
        "/" => "home",
        "/healthz" | "/readyz" => "health",
        "/verify" => "verify",
        "/derpmap.json" => "derpmap",
        crate::companion::replicate::PATH => "snapshot",
        _ => "other",
    }
}

/// Serves one request.
pub async fn handle(
    front: Front,
    remote: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    // Later requests on a kept-alive connection: hyper checks their
    // framing; HTTP/1.1 without a Host is refused here, as Go does.
    let resp = if req.version() == hyper::Version::HTTP_11
        && req.headers().get_all(header::HOST).iter().count() != 1
    {
        front
            .relay
            .metrics()
            .http_request_errors
            .with_label_values(&["missing_host"])
            .inc();
        text(StatusCode::BAD_REQUEST, "missing or repeated Host header\n")
    } else {
        route(&front, remote, req).await
    };
    front
        .relay
        .metrics()
        .http_requests
        .with_label_values(&[route_label(&path), resp.status().as_str()])
        .inc();
    Ok(resp)
}

async fn route(front: &Front, remote: SocketAddr, mut req: Request<Incoming>) -> Response<Body> {
    if req.uri().path() == "/readyz" {
        return readyz(front, &req);
    }
    if crate::companion::http::handles(req.uri().path()) {
        return crate::companion::http::serve(front.relay.companion(), req).await;
    }
    let is_get_or_head = matches!(*req.method(), Method::GET | Method::HEAD);
    match req.uri().path() {
        "/derp" => derp_upgrade(front, remote, &mut req),
        "/derp/probe" | "/derp/latency-check" => {
            if !is_get_or_head {
                return text(StatusCode::METHOD_NOT_ALLOWED, "bogus probe method\n");
            }
            let mut r = Response::new(Full::new(Bytes::new()));
            r.headers_mut().insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
            r
        }
        "/generate_204" => generate_204(&req),
        "/robots.txt" if is_get_or_head => text(StatusCode::OK, "User-agent: *\nDisallow: /\n"),
        "/" if is_get_or_head => home_page(front),
        "/" | "/robots.txt" => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `/readyz`: 200 or 503 by [`super::readiness`]'s rules, with details.
fn readyz<B>(front: &Front, req: &Request<B>) -> Response<Body> {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    let companion = front.relay.companion().map(|c| c.readiness());
    let links = crate::mesh::MeshExt::mesh(&front.relay).link_summaries();
    let (ready, body) = super::readiness::report(companion, &links);
    let mut r = Response::new(Full::new(Bytes::from(body)));
    if !ready {
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `204 No Content` for captive-portal checks, answering a valid
/// `X-Tailscale-Challenge`.
pub fn generate_204<B>(req: &Request<B>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, must-revalidate, no-transform, max-age=0"),
    );
    let challenge = req
        .headers()
        .get("x-tailscale-challenge")
        .and_then(|v| challenge_response(v.as_bytes()));
    if let Some(v) = challenge.and_then(|v| HeaderValue::from_str(&v).ok()) {
        r.headers_mut().insert("x-tailscale-response", v);
    }
    r
}

fn home_page(front: &Front) -> Response<Body> {
    let body = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>derpd</title></head><body>\n\
         <h1>DERP</h1>\n<p>This is a <a href=\"https://tailscale.com/kb/1232/derp-servers\">DERP</a> \
         relay server (derpd {}), for Tailscale and WireGuard clients.</p>\n\
         <p>Public key: <code>{}</code></p>\n</body></html>\n",
        env!("CARGO_PKG_VERSION"),
        front.relay.public_key()
    );
    let mut r = Response::new(Full::new(Bytes::from(body)));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    r
}

/// A DERP upgrade that arrives through hyper (a later request on a kept-alive
/// connection): answered with the same 101 headers, then relayed.
fn derp_upgrade(front: &Front, remote: SocketAddr, req: &mut Request<Incoming>) -> Response<Body> {
    let header_str = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let kind = upgrade_kind(
        header_str(header::UPGRADE),
        header_str(header::SEC_WEBSOCKET_PROTOCOL),
    );
    match kind {
        // DERP over WebSocket (issue 3); disabled → 426 like a non-upgrade.
        UpgradeKind::WebSocketDerp if front.websocket => {
            return super::websocket::upgrade(front, remote, req)
        }
        UpgradeKind::WebSocketDerp | UpgradeKind::None => {
            return text(
                StatusCode::UPGRADE_REQUIRED,
                "DERP requires connection upgrade\n",
            )
        }
        UpgradeKind::RawDerp => {}
    }
    let not_ideal = req.headers().contains_key("ideal-node");
    let on_upgrade = hyper::upgrade::on(req);
    let relay = front.relay.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let (r, w) = tokio::io::split(TokioIo::new(upgraded));
                // hyper owns the socket here: no abortive close on a cut.
                let opts = AcceptOptions {
                    preamble: Bytes::new(),
                    not_ideal,
                    tcp_fd: None,
                };
                relay.serve_conn(r, w, BytesMut::new(), remote, opts).await;
            }
            Err(e) => tracing::debug!(%remote, error = %e, "upgrade failed"),
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for (k, v) in super::upgrade_headers(&front.relay.public_key()) {
        r.headers_mut().insert(
            k,
            HeaderValue::from_str(&v).expect("header values are ASCII"),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            challenge_response(b"input").as_deref(),
            Some("response input")
        );
        assert_eq!(
            challenge_response(b"ts_derp99b.tailscale.com").as_deref(),
            Some("response ts_derp99b.tailscale.com")
        );
        assert_eq!(challenge_response(b"a b"), None);
        assert_eq!(challenge_response(b"a\0b"), None);
        assert_eq!(challenge_response(&[b'a'; 65]), None);
        assert!(challenge_response(&[b'a'; 64]).is_some());
    }
}

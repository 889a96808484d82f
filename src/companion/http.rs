//! The companion's endpoints on the relay's main listener: `/healthz`,
//! `/readyz`, `POST /verify`, `/derpmap.json`, and the mesh-only
//! `/derpd/v1/snapshot`.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::verify::{self, Answer};
use super::{replicate, Companion};

/// Paths served here (`/readyz` is the HTTP layer's: it also reports the
/// mesh; see [`Companion::readiness`]).
pub const PATHS: [&str; 4] = ["/healthz", "/verify", "/derpmap.json", replicate::PATH];

/// Whether `path` is a companion endpoint.
pub fn handles(path: &str) -> bool {
    PATHS.contains(&path)
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body)
}

/// Serves a companion endpoint (`handles(path)` is true). Without a
/// companion, `/healthz` still answers; the rest is 404.
pub async fn serve<B>(companion: Option<&Arc<Companion>>, req: Request<B>) -> Response<Full<Bytes>>
where
    B: hyper::body::Body + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.uri().path().to_owned();
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    match (path.as_str(), companion) {
        ("/healthz", _) if get => text(StatusCode::OK, "ok\n"),
        ("/healthz", _) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        ("/verify", Some(c)) if c.config.keeps_cache() => verify_endpoint(c, req).await,
        ("/derpmap.json", Some(c)) if c.derp_map_json.is_some() => {
            if !get {
                return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            }
            let body = c.derp_map_json.clone().unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
        (replicate::PATH, Some(c)) if c.mesh_key.is_some() => snapshot_endpoint(c, &req),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn verify_endpoint<B>(c: &Companion, req: Request<B>) -> Response<Full<Bytes>>
where
    B: hyper::body::Body + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if req.method() != Method::POST {
        c.metrics.verify("bad_request");
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    let body = match Limited::new(req.into_body(), verify::MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            c.metrics.verify("bad_request");
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
            }
            return text(StatusCode::BAD_REQUEST, "bad request body\n");
        }
    };
    let mut answer = c.cache.with_view(|v| verify::answer(v, &body));
    if answer == Answer::Allow(false) && c.refresh_on_miss().await {
        answer = c.cache.with_view(|v| verify::answer(v, &body));
    }
    match answer {
        Answer::Allow(allow) => {
            c.metrics.verify(if allow { "allow" } else { "deny" });
            let b = if allow { verify::ALLOW } else { verify::DENY };
            reply(StatusCode::OK, "application/json", Bytes::from_static(b))
        }
        Answer::BadRequest(_) => {
            c.metrics.verify("bad_request");
            text(StatusCode::BAD_REQUEST, "bad request\n")
        }
    }
}

fn snapshot_endpoint<B>(c: &Companion, req: &Request<B>) -> Response<Full<Bytes>> {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    if !replicate::authorized(
        c.mesh_key.as_ref(),
        req.headers().get(replicate::MESH_KEY_HEADER),
    ) {
        c.metrics.replication("served", "denied");
        return text(StatusCode::FORBIDDEN, "mesh key required\n");
    }
    match c.snapshot() {
        Some(s) => {
            c.metrics.replication("served", "ok");
            reply(StatusCode::OK, "application/json", s.to_json())
        }
        None => {
            c.metrics.replication("served", "empty");
            text(StatusCode::NOT_FOUND, "no snapshot yet\n")
        }
    }
}

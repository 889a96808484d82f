//! The plain-HTTP listener that runs next to a TLS main listener: it serves
//! only what Tailscale's relay serves there — `/generate_204`, ACME HTTP-01
//! challenges, and redirects to HTTPS. DERP is not served on it.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use crate::tls::TlsManager;

/// ACME HTTP-01 challenge path prefix.
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Serves one request on the plain-HTTP listener.
pub async fn handle(
    tls: Arc<TlsManager>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    if path == "/generate_204" {
        return Ok(super::routes::generate_204(&req));
    }
    if let Some(token) = path.strip_prefix(ACME_CHALLENGE_PREFIX) {
        return Ok(match tls.http01_response(token) {
            Some(auth) => Response::new(Full::new(Bytes::from(auth))),
            None => status(StatusCode::NOT_FOUND, "no such challenge\n"),
        });
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Ok(status(StatusCode::BAD_REQUEST, "Use HTTPS\n"));
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name).to_owned());
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return Ok(status(StatusCode::BAD_REQUEST, "missing Host\n"));
    };
    let target = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let location = format!("https://{host}{target}");
    let mut r = status(StatusCode::FOUND, "");
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            r.headers_mut().insert(header::LOCATION, v);
            Ok(r)
        }
        Err(_) => Ok(status(StatusCode::BAD_REQUEST, "bad Host\n")),
    }
}

fn status(code: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = code;
    r
}

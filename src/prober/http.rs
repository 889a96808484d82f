//! The prober's HTTP listener: the status page at `/` and Prometheus
//! metrics at `/metrics`; anything else is a 404.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::metrics::ProberMetrics;
use super::status::Status;

/// Serves `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    status: Arc<Status>,
    metrics: Arc<ProberMetrics>,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "accept");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (status, metrics) = (status.clone(), metrics.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, metrics) = (status.clone(), metrics.clone());
                async move { Ok::<_, Infallible>(answer(&req, &status, &metrics)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

fn answer<B>(req: &Request<B>, status: &Status, metrics: &ProberMetrics) -> Response<Full<Bytes>> {
    let (code, kind, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET" | "HEAD", "/") => (StatusCode::OK, "text/html; charset=utf-8", status.html()),
        ("GET" | "HEAD", "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        ),
    };
    Response::builder()
        .status(code)
        .header("Content-Type", kind)
        .header("Cache-Control", "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

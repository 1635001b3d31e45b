//! The webhook port's connections: bounded in number and in time.
//!
//! Guarantees:
//! - At most `max_connections` connections are open at once; one more is closed as soon as it is
//!   accepted (counted `over_cap`), so nobody can exhaust the process's file descriptors or memory
//!   by opening connections.
//! - A connection that has not sent a complete request head within `header_read_timeout` of
//!   opening, or of its previous response (an idle keep-alive connection), is closed (counted
//!   `header_timeout`). The body deadline is the request handler's (`read_body`).
//! - On shutdown no new connection is accepted, idle ones are closed, and requests in progress are
//!   answered before `serve` returns (each is bounded by the timeouts above and Kafka's request
//!   timeout).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use gridtalk_telemetry::Metrics;

/// How connections to the port are bounded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown` completes, then waits for the open requests.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let metrics = Metrics::global();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let closing = CancellationToken::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: the listener itself is fine, so wait a
                // moment instead of spinning on the same error.
                tracing::warn!(error = %e, "webhook port: accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics
                .webhook_connections
                .with_label_values(&["over_cap"])
                .inc();
            drop(stream);
            continue;
        };
        metrics
            .webhook_connections
            .with_label_values(&["accepted"])
            .inc();
        let _ = stream.set_nodelay(true);
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let closing = closing.clone();
        tokio::spawn(async move {
            let _permit = permit;
            metrics.webhook_connections_open.inc();
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                _ = closing.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            metrics.webhook_connections_open.dec();
            match served {
                Ok(()) => {}
                Err(e) if e.is_timeout() => {
                    metrics
                        .webhook_connections
                        .with_label_values(&["header_timeout"])
                        .inc();
                }
                Err(e) => tracing::debug!(error = %e, "webhook connection ended with an error"),
            }
        });
    }
    drop(listener);
    closing.cancel();
    // Every connection holds a permit until it is done; all of them back means all are closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
}

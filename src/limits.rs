//! Limits against callers that hold connections open without sending a
//! request. pingora reads a request head with a per-read timeout only, so a
//! client trickling one byte at a time (slowloris) would never expire; this
//! wraps the HTTP app with a deadline for the whole head.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

use crate::state::Shared;

tokio::task_local! {
    /// Set once the request head of the request being processed is read.
    static HEAD_READ: Cell<bool>;
}

/// Called by the proxy as soon as pingora has read a request head: from
/// here on the deadline no longer applies to this request.
pub fn head_read() {
    let _ = HEAD_READ.try_with(|read| read.set(true));
}

/// The HTTP app `A`, with a deadline for each request head (and so for an
/// idle keep-alive connection waiting for its next request).
pub struct HeadDeadline<A> {
    inner: Arc<A>,
    timeout: Duration,
    shared: Arc<Shared>,
}

impl<A> HeadDeadline<A> {
    pub fn new(inner: A, timeout: Duration, shared: Arc<Shared>) -> Self {
        HeadDeadline {
            inner: Arc::new(inner),
            timeout,
            shared,
        }
    }
}

#[async_trait]
impl<A> HttpServerApp for HeadDeadline<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        HEAD_READ
            .scope(Cell::new(false), async {
                let work = self.inner.process_new_http(session, shutdown);
                tokio::pin!(work);
                tokio::select! {
                    reused = &mut work => reused,
                    () = tokio::time::sleep(self.timeout) => {
                        if HEAD_READ.with(Cell::get) {
                            work.await
                        } else {
                            // Dropping the work closes the connection.
                            self.shared.metrics.downstream_closed.with_label_values(&["head_timeout"]).inc();
                            None
                        }
                    }
                }
            })
            .await
    }

    fn h2_options(&self) -> Option<pingora::protocols::http::v2::server::H2Options> {
        self.inner.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.inner.server_options()
    }

    async fn http_cleanup(&self) {
        self.inner.http_cleanup().await
    }
}

/// Caps concurrent caller connections; one over the cap is closed at once
/// and counted, so a flood of idle connections cannot exhaust descriptors.
pub struct ConnectionCap<A> {
    inner: Arc<A>,
    permits: Arc<tokio::sync::Semaphore>,
    shared: Arc<Shared>,
}

impl<A> ConnectionCap<A> {
    pub fn new(inner: A, permits: Arc<tokio::sync::Semaphore>, shared: Arc<Shared>) -> Self {
        ConnectionCap {
            inner: Arc::new(inner),
            permits,
            shared,
        }
    }
}

#[async_trait]
impl<A> ServerApp for ConnectionCap<A>
where
    A: ServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Ok(_permit) = self.permits.clone().try_acquire_owned() else {
            self.shared
                .metrics
                .downstream_closed
                .with_label_values(&["connection_limit"])
                .inc();
            return None;
        };
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

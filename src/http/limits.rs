//! Limits against callers that hold connections open without sending a
//! request. pingora reads a request head with a per-read timeout only, so a
//! client trickling one byte at a time (slowloris) would never expire; this
//! puts a deadline on the whole head.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream, ALPN};
use pingora::server::ShutdownWatch;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task;

tokio::task_local! {
    /// Since when the connection has been waiting for a request head;
    /// `None` while one of its requests is being served.
    static WAITING_FOR_HEAD_SINCE: Cell<Option<Instant>>;
}

/// Called by the proxy as soon as pingora has read a request head: from
/// here on the deadline no longer applies to this connection.
pub fn head_read() {
    let _ = WAITING_FOR_HEAD_SINCE.try_with(|since| since.set(None));
}

/// Called by the proxy once a request is done: a kept-alive connection
/// waits for its next request head from now on.
pub fn awaiting_next_head() {
    let _ = WAITING_FOR_HEAD_SINCE.try_with(|since| since.set(Some(Instant::now())));
}

/// The app `A`, with a deadline for each request head of an HTTP/1
/// connection, and so for a kept-alive connection waiting for its next
/// request. The deadline is kept per connection, not per request: a
/// request only marks when its connection starts and stops waiting.
/// HTTP/2 connections are left to pingora's h2 idle timeout; their
/// streams arrive with their heads whole.
pub struct HeadDeadline<A> {
    inner: Arc<A>,
    timeout: Duration,
    /// `sealgate_downstream_closed_total{reason="head_timeout"}`.
    closed: IntCounter,
}

impl<A> HeadDeadline<A> {
    pub fn new(inner: A, timeout: Duration, closed: IntCounter) -> Self {
        HeadDeadline {
            inner: Arc::new(inner),
            timeout,
            closed,
        }
    }
}

#[async_trait]
impl<A> ServerApp for HeadDeadline<A>
where
    A: ServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.inner.process_new(stream, shutdown).await;
        }
        WAITING_FOR_HEAD_SINCE
            .scope(Cell::new(Some(Instant::now())), async {
                tokio::select! {
                    biased;
                    reused = self.inner.process_new(stream, shutdown) => reused,
                    // Counted inside the branch: select drops the work, and
                    // so closes the connection, before any handler runs,
                    // and whoever sees the close must find it counted.
                    () = async {
                        head_overdue(self.timeout).await;
                        self.closed.inc();
                    } => None,
                }
            })
            .await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// Completes once the connection has waited `timeout` for a request head.
/// It sleeps until the earliest moment that could happen, so the timer of
/// a busy connection fires about once per `timeout` rather than being set
/// and cancelled for every request.
async fn head_overdue(timeout: Duration) {
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        deadline.as_mut().await;
        let now = Instant::now();
        let next = match WAITING_FOR_HEAD_SINCE.with(Cell::get) {
            Some(since) if now.saturating_duration_since(since) >= timeout => return,
            Some(since) => since + timeout,
            None => now + timeout,
        };
        deadline.as_mut().reset(next.into());
    }
}

/// Caps concurrent caller connections; one over the cap is closed at once
/// and counted, so a flood of idle connections cannot exhaust descriptors.
pub struct ConnectionCap<A> {
    inner: Arc<A>,
    permits: Arc<tokio::sync::Semaphore>,
    /// `sealgate_downstream_closed_total{reason="connection_limit"}`.
    closed: IntCounter,
}

impl<A> ConnectionCap<A> {
    pub fn new(inner: A, permits: Arc<tokio::sync::Semaphore>, closed: IntCounter) -> Self {
        ConnectionCap {
            inner: Arc::new(inner),
            permits,
            closed,
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
            self.closed.inc();
            return None;
        };
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// TLS handshakes under way, by the task that runs each. pingora runs the
/// pre-TLS hook, the handshake and the handshake-complete callback in one
/// task and gives the callback nothing else that tells connections apart.
#[derive(Default)]
pub struct Handshakes(Mutex<HashMap<task::Id, Arc<AtomicBool>>>);

impl Handshakes {
    fn begin(&self, task: task::Id) -> Arc<AtomicBool> {
        let finished = Arc::new(AtomicBool::new(false));
        if let Ok(mut running) = self.0.lock() {
            running.insert(task, finished.clone());
        }
        finished
    }

    /// Called from the handshake-complete callback: the connection's
    /// deadline no longer applies.
    pub fn finished(&self) {
        if let Some(finished) = task::try_id().and_then(|task| self.take(task)) {
            finished.store(true, Ordering::Release);
        }
    }

    fn take(&self, task: task::Id) -> Option<Arc<AtomicBool>> {
        self.0
            .lock()
            .ok()
            .and_then(|mut running| running.remove(&task))
    }
}

/// A deadline for the TLS handshake. pingora's own is a fixed 60 s and not
/// counted; this one is `[proxy.tls] handshake_timeout_s`, and each
/// connection it ends is counted as `reason="tls_handshake_timeout"`.
pub struct HandshakeDeadline {
    timeout: Duration,
    handshakes: Arc<Handshakes>,
    /// `sealgate_downstream_closed_total{reason="tls_handshake_timeout"}`.
    closed: IntCounter,
}

impl HandshakeDeadline {
    pub fn new(timeout: Duration, handshakes: Arc<Handshakes>, closed: IntCounter) -> Self {
        HandshakeDeadline {
            timeout,
            handshakes,
            closed,
        }
    }
}

#[async_trait]
impl PreTlsProcess for HandshakeDeadline {
    /// Puts the raw connection behind a socket whose reads and writes fail
    /// once the deadline passes before the handshake has finished.
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        let Some(task) = task::try_id() else {
            return Ok(());
        };
        let raw_fd = stream.as_raw_fd();
        let placeholder = L4Stream::from(VirtualSocketStream::new(Box::new(Closed)));
        let inner = std::mem::replace(stream, placeholder);
        let guarded = UntilHandshake {
            inner,
            deadline: Deadline::Running(Box::pin(tokio::time::sleep(self.timeout))),
            finished: self.handshakes.begin(task),
            task,
            handshakes: self.handshakes.clone(),
            timeouts: self.closed.clone(),
        };
        let mut outer = L4Stream::from(VirtualSocketStream::new(Box::new(guarded)));
        // The peer address and the like are still read from the real socket,
        // which lives on inside the guard.
        outer.set_socket_digest(SocketDigest::from_raw_fd(raw_fd));
        *stream = outer;
        Ok(())
    }
}

/// The real connection until its handshake finishes or times out.
struct UntilHandshake {
    inner: L4Stream,
    deadline: Deadline,
    /// Set by the handshake-complete callback, through the registry.
    finished: Arc<AtomicBool>,
    task: task::Id,
    handshakes: Arc<Handshakes>,
    timeouts: IntCounter,
}

#[derive(Debug)]
enum Deadline {
    Running(Pin<Box<tokio::time::Sleep>>),
    /// The handshake finished in time: nothing is checked any more.
    Lifted,
    /// Counted once; every later read or write fails too.
    Passed,
}

fn handshake_timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timeout")
}

impl UntilHandshake {
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match &mut self.deadline {
            Deadline::Lifted => Ok(()),
            Deadline::Passed => Err(handshake_timed_out()),
            Deadline::Running(_) if self.finished.load(Ordering::Acquire) => {
                self.deadline = Deadline::Lifted;
                Ok(())
            }
            Deadline::Running(sleep) => {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Ok(());
                }
                self.deadline = Deadline::Passed;
                self.timeouts.inc();
                Err(handshake_timed_out())
            }
        }
    }
}

impl Drop for UntilHandshake {
    fn drop(&mut self) {
        if !self.finished.load(Ordering::Acquire) {
            self.handshakes.take(self.task);
        }
    }
}

impl fmt::Debug for UntilHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UntilHandshake")
            .field("inner", &self.inner)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for UntilHandshake {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_deadline(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for UntilHandshake {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_deadline(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_deadline(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_deadline(cx)?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl VirtualSocket for UntilHandshake {
    /// pingora sets socket options at accept, on the real socket, before
    /// the guard exists; there is nothing left to set through it.
    fn set_socket_option(&self, _: VirtualSockOpt) -> io::Result<()> {
        Ok(())
    }
}

/// Stands in for the connection while it is moved into its guard.
#[derive(Debug)]
struct Closed;

impl AsyncRead for Closed {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Closed {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl VirtualSocket for Closed {
    fn set_socket_option(&self, _: VirtualSockOpt) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Never answers; when its work is dropped, which closes the
    /// connection, it notes how many head timeouts had been counted.
    struct NeverAnswers {
        closed: IntCounter,
        counted_at_close: Arc<Mutex<Option<u64>>>,
    }

    struct CloseProbe<'a>(&'a NeverAnswers);

    impl Drop for CloseProbe<'_> {
        fn drop(&mut self) {
            if let Ok(mut counted) = self.0.counted_at_close.lock() {
                *counted = Some(self.0.closed.get());
            }
        }
    }

    #[async_trait]
    impl ServerApp for NeverAnswers {
        async fn process_new(
            self: &Arc<Self>,
            _stream: Stream,
            _shutdown: &ShutdownWatch,
        ) -> Option<Stream> {
            let _probe = CloseProbe(self);
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn a_head_timeout_is_counted_before_the_connection_closes() {
        let closed = IntCounter::new("head_timeouts", "test").unwrap();
        let counted_at_close = Arc::new(Mutex::new(None));
        let app = Arc::new(HeadDeadline::new(
            NeverAnswers {
                closed: closed.clone(),
                counted_at_close: counted_at_close.clone(),
            },
            Duration::from_millis(20),
            closed.clone(),
        ));
        let stream: Stream = Box::new(L4Stream::from(VirtualSocketStream::new(Box::new(Closed))));
        let (_keep_running, shutdown) = tokio::sync::watch::channel(false);

        assert!(app.process_new(stream, &shutdown).await.is_none());
        assert_eq!(*counted_at_close.lock().unwrap(), Some(1));
        assert_eq!(closed.get(), 1);
    }
}

//! Limits on connections, before any request exists: how many may be open,
//! how long a TLS handshake and a request's headers may take, and how long
//! a new connection may stay silent. Without them one client holding
//! sockets open (slowloris) would starve every other.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Connection limits of the daemon's port.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Time for a new connection's first byte, a TLS handshake, and the
    /// headers of an HTTP/1.1 request.
    pub header_timeout: Duration,
    /// HTTP/2 streams open at once per connection.
    pub max_streams: u32,
    /// HTTP/2 keep-alive ping interval; an unanswered ping closes the connection.
    pub keepalive: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            max_streams: 256,
            keepalive: Duration::from_secs(30),
        }
    }
}

/// A stream that fails with `TimedOut` if no byte arrives within its
/// deadline; once one has, it is a plain stream. Covers the time hyper
/// spends choosing between HTTP/1.1 and HTTP/2, which has no timer of its own.
pub struct FirstByteDeadline<S> {
    inner: S,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> FirstByteDeadline<S> {
    pub fn new(inner: S, within: Duration) -> Self {
        FirstByteDeadline { inner, deadline: Some(Box::pin(tokio::time::sleep(within))) }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstByteDeadline<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(_) if buf.filled().len() > before => this.deadline = None,
            Poll::Pending => {
                if let Some(d) = this.deadline.as_mut()
                    && d.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no request arrived in time",
                    )));
                }
            }
            _ => {}
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstByteDeadline<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

use std::future::Future;

/// Logs "connection limit reached" at most once per interval.
pub struct RateLimitedWarning {
    last: std::sync::Mutex<Option<std::time::Instant>>,
    every: Duration,
    dropped: std::sync::atomic::AtomicU64,
}

impl RateLimitedWarning {
    pub fn new(every: Duration) -> Self {
        RateLimitedWarning { last: Default::default(), every, dropped: Default::default() }
    }

    /// Counts one event; returns the count so far when a line is due.
    pub fn hit(&self) -> Option<u64> {
        let n = self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= self.every) {
            *last = Some(now);
            return Some(n);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_silent_connection_times_out_and_a_talking_one_does_not() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut s = FirstByteDeadline::new(server, Duration::from_millis(50));
        let mut b = [0u8; 4];
        let e = s.read(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);

        let (mut client2, server2) = tokio::io::duplex(64);
        let mut s2 = FirstByteDeadline::new(server2, Duration::from_millis(50));
        client2.write_all(b"x").await.unwrap();
        assert_eq!(s2.read(&mut b).await.unwrap(), 1);
        // After the first byte, silence is allowed.
        let waited = tokio::time::timeout(Duration::from_millis(150), s2.read(&mut b)).await;
        assert!(waited.is_err(), "no deadline after the first byte");
        client.shutdown().await.unwrap();
    }

    #[test]
    fn warnings_are_rate_limited_but_counted() {
        let w = RateLimitedWarning::new(Duration::from_secs(60));
        assert_eq!(w.hit(), Some(1));
        assert_eq!(w.hit(), None);
        assert_eq!(w.hit(), None);
        assert_eq!(w.dropped.load(std::sync::atomic::Ordering::Relaxed), 3);
    }
}

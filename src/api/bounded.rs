//! Bounds on the API's connections: how many are open at once, and how
//! long one may sit idle.
//!
//! axum's `serve` keeps a connection as long as its client does, even one
//! that never finishes its request. The API shares the process's file
//! descriptors with MQTT and the share ledger, so a few thousand silent
//! sockets could starve both; these bounds keep the API's share small.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// API connections open at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 512;

/// How long a connection may go without reading or writing a byte: a
/// request that does not arrive, or a response its client does not take.
pub const IDLE: Duration = Duration::from_secs(20);

/// How long a request's headers may take to arrive, however they trickle
/// (`server::serve_http` gives it to hyper).
pub const HEADERS: Duration = Duration::from_secs(20);

/// A listener whose connections are counted and time out when idle.
pub struct Bounded<L> {
    inner: L,
    /// Which listener, for the log.
    name: &'static str,
    slots: Arc<Semaphore>,
    last_warning: Option<Instant>,
}

impl<L> Bounded<L> {
    pub fn new(inner: L, name: &'static str) -> Self {
        Bounded {
            inner,
            name,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            last_warning: None,
        }
    }

    /// Once a second at most: a flood of connections is one event.
    fn warn_full(&mut self) {
        if self
            .last_warning
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.last_warning = Some(Instant::now());
            tracing::warn!(
                listener = self.name,
                max = MAX_CONNECTIONS,
                "HTTP connection closed: too many open"
            );
        }
    }
}

impl<L: axum::serve::Listener> axum::serve::Listener for Bounded<L> {
    type Io = Idle<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = self.inner.accept().await;
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => return (Idle::new(io, slot), addr),
                Err(_) => {
                    drop(io);
                    self.warn_full();
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that fails with `TimedOut` after [`IDLE`] without progress.
pub struct Idle<S> {
    inner: S,
    deadline: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl<S> Idle<S> {
    fn new(inner: S, slot: OwnedSemaphorePermit) -> Self {
        Idle {
            inner,
            deadline: Box::pin(tokio::time::sleep(IDLE)),
            _slot: slot,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn progressed(&mut self) {
        self.deadline
            .as_mut()
            .reset(tokio::time::Instant::now() + IDLE);
    }

    /// What a pending read or write becomes: still pending, or timed out.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "idle HTTP API connection",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.progressed();
                }
                Poll::Ready(r)
            }
            Poll::Pending => this.pending(cx),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    this.progressed();
                }
                Poll::Ready(r)
            }
            Poll::Pending => this.pending(cx),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => this.pending(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

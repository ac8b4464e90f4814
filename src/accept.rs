//! What a listener does when accepting a connection fails.
//!
//! Out of file descriptors, `accept` fails as fast as it is called, for as
//! long as the descriptors stay taken. A listener that retried at once and
//! logged each failure would spin a core and fill the disk with its log
//! (an outside review saw the metrics endpoint's former listener write
//! 60 MB a second), and a full disk closes the share ledger. So each
//! listener waits before it tries again, counts every failure, and logs the
//! first of a run and then one a minute.

use std::io;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::logging::Throttle;

/// The wait after a failure that is the server's, not the connection's.
const BACK_OFF: Duration = Duration::from_millis(50);

/// How often a run of failures is logged again.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// One listener's failures.
pub struct Failures {
    listener: &'static str,
    counter: metrics::Counter,
    log: Throttle,
}

impl Failures {
    /// `listener` names it in the log and in the metric's `listener` label.
    pub fn new(listener: &'static str) -> Self {
        Failures {
            listener,
            counter: metrics::counter!(crate::metrics::ACCEPT_FAILURES, "listener" => listener),
            log: Throttle::new(LOG_EVERY),
        }
    }

    /// Counts `e`, logs it if it is time to, and waits before the next
    /// `accept` unless only that one connection failed.
    pub async fn after(&mut self, e: &io::Error) {
        if self.note(e, Instant::now()) {
            tokio::time::sleep(BACK_OFF).await;
        }
    }

    /// Counts and maybe logs `e`; whether to wait before the next `accept`.
    fn note(&mut self, e: &io::Error, now: Instant) -> bool {
        self.counter.increment(1);
        if let Some(left_out) = self.log.allow(now) {
            tracing::warn!(
                listener = self.listener,
                error = %e,
                failures_since_last_logged = left_out,
                "accept failed (logged once a minute while it goes on; \
                 consentry_accept_failures_total counts each)"
            );
        }
        !connection_only(e)
    }
}

/// A failure of the connection being accepted (reset or aborted before we
/// took it), which says nothing about the next one.
fn connection_only(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// A TCP listener for axum whose failures go through [`Failures`]
/// (axum's own waits a second and logs each one).
pub struct Tcp {
    inner: TcpListener,
    failures: Failures,
}

impl Tcp {
    pub fn new(inner: TcpListener, listener: &'static str) -> Self {
        Tcp {
            inner,
            failures: Failures::new(listener),
        }
    }
}

impl axum::serve::Listener for Tcp {
    type Io = TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok(accepted) => return accepted,
                Err(e) => self.failures.after(&e).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_failures_is_logged_once_a_minute_and_waited_out() {
        let mut f = Failures::new("test");
        let emfile = io::Error::from_raw_os_error(24);
        let start = Instant::now();
        assert!(f.note(&emfile, start), "out of descriptors: wait");
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert!(
            !f.note(&aborted, start),
            "one connection's failure: no wait"
        );
    }
}

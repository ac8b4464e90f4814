//! Password hashing and checking, bounded.
//!
//! argon2 with its default parameters is built to cost memory (19 MiB) and
//! tens of milliseconds per check: right against someone who stole the
//! hashes, ruinous when anyone who reaches the API or the MQTT port can ask
//! for as many checks at once as they like (400 parallel logins once took
//! 8 GB and stalled the API for seconds). So every argon2 run goes through
//! here: at most one per core at a time, and a bounded queue behind them.
//! Past the queue the caller is told at once that the server is busy (HTTP
//! 503 with Retry-After, MQTT CONNACK Server busy), which a client retries,
//! instead of the server taking on work it can only finish too late.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, TryAcquireError};

use crate::api::login_limiter::Source;
use crate::metrics as m;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WorkError {
    #[error("too many password checks are waiting")]
    Busy,
    #[error("the password check did not finish")]
    Failed,
}

pub struct PasswordWork {
    running: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
    /// Checks waiting or running, by the address they came from: one
    /// address's flood of wrong passwords would otherwise fill the queue
    /// and turn everybody else away (found by an outside review).
    by_source: Mutex<HashMap<Source, usize>>,
    /// 0: no bound per address.
    max_per_source: usize,
}

/// A source's place among the checks under way, given back when dropped;
/// `from` is `None` where no bound applies.
struct SourceSlot<'a> {
    work: &'a PasswordWork,
    from: Option<Source>,
}

impl Drop for SourceSlot<'_> {
    fn drop(&mut self) {
        let Some(from) = self.from else { return };
        let mut by = self
            .work
            .by_source
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by.get_mut(&from) {
            *n -= 1;
            if *n == 0 {
                by.remove(&from);
            }
        }
    }
}

impl PasswordWork {
    /// `parallel` checks at once (at least one), `max_waiting` queued
    /// behind them (0: none wait; a check runs only when a core is free).
    pub fn new(parallel: usize, max_waiting: usize) -> Self {
        Self {
            running: Arc::new(Semaphore::new(parallel.max(1))),
            waiting: AtomicUsize::new(0),
            max_waiting,
            by_source: Mutex::new(HashMap::new()),
            max_per_source: 0,
        }
    }

    /// At most `max` checks waiting or running from one address (IPv6: one
    /// /64); 0 for no bound. Checks from no known address are not bounded.
    pub fn per_source(mut self, max: usize) -> Self {
        self.max_per_source = max;
        self
    }

    /// `None` when `from` already holds all its places.
    fn take_slot(&self, from: Source) -> Option<SourceSlot<'_>> {
        if self.max_per_source == 0 || from == Source::Unknown {
            return Some(SourceSlot {
                work: self,
                from: None,
            });
        }
        let mut by = self.by_source.lock().unwrap_or_else(|e| e.into_inner());
        let n = by.entry(from).or_insert(0);
        if *n >= self.max_per_source {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            work: self,
            from: Some(from),
        })
    }

    /// One check per core.
    pub fn per_core(max_waiting: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::new(cores, max_waiting)
    }

    /// Runs `f` (blocking: argon2) for a caller at `from` when a core is
    /// free for it.
    pub async fn run<T, F>(&self, from: Source, f: F) -> Result<T, WorkError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let Some(_slot) = self.take_slot(from) else {
            metrics::counter!(m::PASSWORD_CHECKS, "result" => "busy").increment(1);
            return Err(WorkError::Busy);
        };
        /// Leaves the queue however the wait ends, the caller going away included.
        struct InQueue<'a>(&'a AtomicUsize);
        impl Drop for InQueue<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let permit = match self.running.clone().try_acquire_owned() {
            Ok(free) => free,
            Err(TryAcquireError::Closed) => return Err(WorkError::Failed),
            Err(TryAcquireError::NoPermits) => {
                let ahead = self.waiting.fetch_add(1, Ordering::AcqRel);
                let _queued = InQueue(&self.waiting);
                if ahead >= self.max_waiting {
                    metrics::counter!(m::PASSWORD_CHECKS, "result" => "busy").increment(1);
                    return Err(WorkError::Busy);
                }
                self.running
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| WorkError::Failed)?
            }
        };
        metrics::counter!(m::PASSWORD_CHECKS, "result" => "run").increment(1);
        // The permit goes with the work: a caller that stops waiting does
        // not free the core (or the memory) before argon2 is done with it.
        tokio::task::spawn_blocking(move || {
            let _running = permit;
            f()
        })
        .await
        .map_err(|_| WorkError::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Starts a check that holds `work`'s one core until the sender is used
    /// (or dropped); returns once it runs, with its task (answering 1).
    async fn hold_the_core(
        work: &Arc<PasswordWork>,
    ) -> (
        mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<i32, WorkError>>,
    ) {
        let (release, held) = mpsc::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let work = work.clone();
        let running = tokio::spawn(async move {
            work.run(Source::Unknown, move || {
                let _ = started_tx.send(());
                held.recv().ok();
                1
            })
            .await
        });
        started.await.unwrap();
        (release, running)
    }

    #[tokio::test]
    async fn past_the_queue_callers_are_told_busy_at_once() {
        let work = Arc::new(PasswordWork::new(1, 1));
        let (release, running) = hold_the_core(&work).await;
        // One may wait for the core...
        let queued = tokio::spawn({
            let work = work.clone();
            async move { work.run(Source::Unknown, || 2).await }
        });
        while work.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        // ...the next is refused without waiting.
        assert_eq!(work.run(Source::Unknown, || 3).await, Err(WorkError::Busy));
        release.send(()).unwrap();
        assert_eq!(running.await.unwrap(), Ok(1));
        assert_eq!(queued.await.unwrap(), Ok(2));
        // The queue has emptied, so work is taken again.
        assert_eq!(work.run(Source::Unknown, || 4).await, Ok(4));
        assert_eq!(work.waiting.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn with_no_queue_work_still_runs_on_a_free_core() {
        let work = PasswordWork::new(1, 0);
        assert_eq!(work.run(Source::Unknown, || 1).await, Ok(1));
        assert_eq!(work.run(Source::Unknown, || 2).await, Ok(2));
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_leaves_the_queue() {
        let work = Arc::new(PasswordWork::new(1, 1));
        let (release, running) = hold_the_core(&work).await;
        let gave_up = tokio::time::timeout(
            std::time::Duration::from_millis(10),
            work.run(Source::Unknown, || ()),
        )
        .await;
        assert!(gave_up.is_err(), "the core is held, so it waited");
        assert_eq!(work.waiting.load(Ordering::Acquire), 0);
        release.send(()).unwrap();
        assert_eq!(running.await.unwrap(), Ok(1));
    }

    #[tokio::test]
    async fn one_address_holds_at_most_its_share_of_the_queue() {
        let work = Arc::new(PasswordWork::new(1, 8).per_source(2));
        let (release, running) = hold_the_core(&work).await;
        let flood = Source::of(Some("192.0.2.7".parse().unwrap()));
        let other = Source::of(Some("198.51.100.1".parse().unwrap()));
        let wait = |from: Source, answer: i32| {
            let work = work.clone();
            tokio::spawn(async move { work.run(from, move || answer).await })
        };
        let queued = [wait(flood, 2), wait(flood, 3)];
        while work.waiting.load(Ordering::Acquire) < 2 {
            tokio::task::yield_now().await;
        }
        // The flood's third is refused at once; another address still queues.
        assert_eq!(work.run(flood, || 4).await, Err(WorkError::Busy));
        let theirs = wait(other, 5);
        while work.waiting.load(Ordering::Acquire) < 3 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        assert_eq!(running.await.unwrap(), Ok(1));
        for (q, want) in queued.into_iter().zip([2, 3]) {
            assert_eq!(q.await.unwrap(), Ok(want));
        }
        assert_eq!(theirs.await.unwrap(), Ok(5));
        // Done, the address has its places back, and nothing is left behind.
        assert_eq!(work.run(flood, || 6).await, Ok(6));
        assert!(work.by_source.lock().unwrap().is_empty());
    }
}

//! Backpressure from subscribers to publishers, for the embedded broker.
//!
//! rumqttd acknowledges a publish as soon as it is in its log, and its log
//! is a bounded ring per subscription filter: a subscriber that falls behind
//! by more than the ring holds silently loses messages whose publishers were
//! told they were delivered (QoS 1). With a larger ring the broker instead
//! grows to gigabytes. consentry sees both ends, so it keeps the count rumqttd
//! does not: for every session holding subscriptions, the bytes forwarded to
//! the broker that match one of its filters minus the bytes the broker
//! delivered to it. A publisher whose message goes to a subscriber more than
//! `limit` behind is held — its socket is not read, so TCP stops the device —
//! until the subscriber has caught up.
//!
//! The count errs towards "less behind" so that it cannot hold a publisher
//! forever by mistake: filters count once they are acknowledged by the
//! broker, a message matching several filters of one session counts once
//! while the broker delivers it once per filter, and deliveries the count
//! never saw (retained messages) only lower it, never below zero. Shared
//! subscriptions are not counted (one member of the group gets each message).
//! A subscriber that is behind and takes nothing from the broker for
//! `stall` is disconnected as a slow consumer, which also breaks any cycle
//! of sessions that publish to each other while holding each other.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::topic;

/// One subscribing session's position.
#[derive(Debug)]
pub struct Lag {
    session: u64,
    filters: ArcSwap<Vec<String>>,
    owed: AtomicU64,
    /// Milliseconds since `Backpressure::epoch` of the last delivery.
    progress_ms: AtomicU64,
    /// Set when publishers gave up waiting for this session.
    kicked: AtomicBool,
    /// Set when the session ended or stopped subscribing.
    gone: AtomicBool,
    kick: tokio::sync::Notify,
}

impl Lag {
    pub fn owed(&self) -> u64 {
        self.owed.load(Ordering::Relaxed)
    }

    /// Resolves once publishers have given up on this session.
    pub async fn kicked(&self) {
        loop {
            let notified = self.kick.notified();
            if self.kicked.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Debug)]
pub struct Backpressure {
    limit: u64,
    stall: Duration,
    epoch: Instant,
    sessions: ArcSwap<Vec<Arc<Lag>>>,
    /// Serializes changes to `sessions` (reads are lock-free).
    write: Mutex<()>,
}

/// What a publisher waits on.
#[derive(Debug, Default)]
pub struct Held {
    lags: Vec<Arc<Lag>>,
    since: Option<Instant>,
}

impl Held {
    pub fn is_held(&self) -> bool {
        !self.lags.is_empty()
    }

    pub fn since(&self) -> Option<Instant> {
        self.since
    }
}

impl Backpressure {
    /// `limit`: bytes a subscriber may be behind before its publishers are
    /// held; 0 turns backpressure off.
    pub fn new(limit: u64, stall: Duration) -> Self {
        Backpressure {
            limit,
            stall,
            epoch: Instant::now(),
            sessions: ArcSwap::from_pointee(Vec::new()),
            write: Mutex::new(()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.limit > 0
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Sets the filters the broker acknowledged for `session`. A session
    /// without counted filters is not tracked at all, so the cost of a
    /// forward grows with subscribing sessions, not with connections.
    pub fn set_filters(&self, session: u64, current: &mut Option<Arc<Lag>>, filters: Vec<String>) {
        if !self.enabled() {
            return;
        }
        let filters: Vec<String> = filters
            .into_iter()
            .filter(|f| !f.starts_with("$share/"))
            .collect();
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        match (current.as_ref(), filters.is_empty()) {
            (Some(lag), false) => lag.filters.store(Arc::new(filters)),
            (Some(lag), true) => {
                lag.gone.store(true, Ordering::Release);
                self.sessions.rcu(|v| {
                    v.iter()
                        .filter(|l| l.session != session)
                        .cloned()
                        .collect::<Vec<_>>()
                });
                *current = None;
            }
            (None, false) => {
                let lag = Arc::new(Lag {
                    session,
                    filters: ArcSwap::from_pointee(filters),
                    owed: AtomicU64::new(0),
                    progress_ms: AtomicU64::new(self.now_ms()),
                    kicked: AtomicBool::new(false),
                    gone: AtomicBool::new(false),
                    kick: tokio::sync::Notify::new(),
                });
                self.sessions.rcu(|v| {
                    let mut v = (**v).clone();
                    v.push(lag.clone());
                    v
                });
                *current = Some(lag);
            }
            (None, true) => {}
        }
    }

    /// Accounts a publish forwarded by `from` and returns whether the
    /// publisher must now be held, adding what it waits on to `held`. The
    /// publisher's own subscriptions never hold it: it would be waiting for
    /// itself to read.
    pub fn forwarded(&self, from: u64, topic: &str, bytes: u64, held: &mut Held) {
        if !self.enabled() {
            return;
        }
        for lag in self.sessions.load().iter() {
            // `set_filters` keeps no shared subscriptions: plain filters only.
            let counted = lag
                .filters
                .load()
                .iter()
                .any(|f| topic::filter_matches(f, topic));
            if !counted {
                continue;
            }
            let owed = lag.owed.fetch_add(bytes, Ordering::Relaxed) + bytes;
            if owed > self.limit
                && lag.session != from
                && !held.lags.iter().any(|l| Arc::ptr_eq(l, lag))
            {
                held.lags.push(lag.clone());
                held.since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Accounts a delivery the broker made to `lag`'s session.
    pub fn delivered(&self, lag: &Lag, bytes: u64) {
        let _ = lag
            .owed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| {
                Some(o.saturating_sub(bytes))
            });
        lag.progress_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Drops from `held` what no longer holds the publisher: subscribers
    /// caught up, gone, or stalled past `stall` (which are kicked).
    /// Returns how many slow consumers this call kicked.
    pub fn recheck(&self, held: &mut Held) -> usize {
        let now = self.now_ms();
        let stall = self.stall.as_millis() as u64;
        let mut kicked = 0;
        held.lags.retain(|lag| {
            if lag.owed() <= self.limit
                || lag.kicked.load(Ordering::Acquire)
                || lag.gone.load(Ordering::Acquire)
            {
                return false;
            }
            if now.saturating_sub(lag.progress_ms.load(Ordering::Relaxed)) > stall {
                lag.kicked.store(true, Ordering::Release);
                lag.kick.notify_waiters();
                kicked += 1;
                return false;
            }
            true
        });
        if held.lags.is_empty() {
            held.since = None;
        }
        kicked
    }

    /// Removes a session that ended.
    pub fn remove(&self, current: &mut Option<Arc<Lag>>) {
        if let Some(lag) = current.take() {
            lag.gone.store(true, Ordering::Release);
            let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
            self.sessions.rcu(|v| {
                v.iter()
                    .filter(|l| !Arc::ptr_eq(l, &lag))
                    .cloned()
                    .collect::<Vec<_>>()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters(f: &[&str]) -> Vec<String> {
        f.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_publisher_is_held_only_past_the_limit_and_released_when_the_subscriber_catches_up() {
        let bp = Backpressure::new(1000, Duration::from_secs(60));
        let mut sub = None;
        bp.set_filters(1, &mut sub, filters(&["pii/+/+/heart_rate"]));
        let lag = sub.clone().unwrap();
        let mut held = Held::default();
        bp.forwarded(2, "pii/a/d/heart_rate", 600, &mut held);
        assert!(!held.is_held());
        bp.forwarded(2, "pii/a/d/steps", 600, &mut held);
        assert!(
            !held.is_held(),
            "a topic the subscriber does not want does not count"
        );
        bp.forwarded(2, "pii/a/d/heart_rate", 600, &mut held);
        assert!(held.is_held());
        assert_eq!(lag.owed(), 1200);
        bp.recheck(&mut held);
        assert!(held.is_held(), "still behind");
        bp.delivered(&lag, 600);
        bp.recheck(&mut held);
        assert!(!held.is_held());
        bp.delivered(&lag, 10_000);
        assert_eq!(
            lag.owed(),
            0,
            "deliveries it never counted do not go below zero"
        );
    }

    #[test]
    fn own_subscriptions_and_shared_subscriptions_never_hold() {
        let bp = Backpressure::new(10, Duration::from_secs(60));
        let mut own = None;
        bp.set_filters(1, &mut own, filters(&["t/#"]));
        let mut shared = None;
        bp.set_filters(3, &mut shared, filters(&["$share/g/t/#"]));
        assert!(shared.is_none(), "a shared subscription is not tracked");
        let mut held = Held::default();
        bp.forwarded(1, "t/x", 100, &mut held);
        assert!(!held.is_held());
        bp.forwarded(2, "t/x", 100, &mut held);
        assert!(held.is_held(), "another publisher is held by session 1");
    }

    #[test]
    fn a_stalled_subscriber_is_kicked_and_releases_its_publishers() {
        let bp = Backpressure::new(10, Duration::from_millis(0));
        let mut sub = None;
        bp.set_filters(1, &mut sub, filters(&["t/#"]));
        let lag = sub.clone().unwrap();
        let mut held = Held::default();
        bp.forwarded(2, "t/x", 100, &mut held);
        assert!(held.is_held());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(bp.recheck(&mut held), 1);
        assert!(!held.is_held());
        assert!(lag.kicked.load(Ordering::Acquire));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), lag.kicked())
                .await
                .expect("the kicked session learns of it")
        });
    }

    #[test]
    fn a_session_that_ended_holds_no_one() {
        let bp = Backpressure::new(10, Duration::from_secs(60));
        let mut sub = None;
        bp.set_filters(1, &mut sub, filters(&["t/#"]));
        let mut held = Held::default();
        bp.forwarded(2, "t/x", 100, &mut held);
        assert!(held.is_held());
        bp.remove(&mut sub);
        bp.recheck(&mut held);
        assert!(!held.is_held());
        bp.forwarded(2, "t/x", 100, &mut held);
        assert!(!held.is_held());
    }

    #[test]
    fn unsubscribing_everything_stops_tracking_and_zero_limit_is_off() {
        let bp = Backpressure::new(10, Duration::from_secs(60));
        let mut sub = None;
        bp.set_filters(1, &mut sub, filters(&["t/#"]));
        bp.set_filters(1, &mut sub, vec![]);
        assert!(sub.is_none());
        let mut held = Held::default();
        bp.forwarded(2, "t/x", 100, &mut held);
        assert!(!held.is_held());

        let off = Backpressure::new(0, Duration::from_secs(60));
        let mut sub = None;
        off.set_filters(1, &mut sub, filters(&["t/#"]));
        assert!(sub.is_none());
    }
}

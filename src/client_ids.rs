//! Which session holds which client id, so that a new connection with the
//! same id takes the session over (MQTT 3.1.1 §3.1.4, MQTT 5 §3.1.4).
//!
//! The broker does this for sessions it can see, but a session that has
//! nothing to say to the broker has no connection there (see
//! `Session::go_up`), so consentry keeps the map itself. Ids are the
//! namespaced ones sent upstream, so a device cannot take over a provider.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct ClientIds {
    held: Mutex<HashMap<String, Holder>>,
}

#[derive(Debug)]
struct Holder {
    session: u64,
    taken_over: Arc<Notify>,
    successor_resumed: Arc<AtomicBool>,
}

/// A session's claim on its client id; tells it when it was taken over.
#[derive(Debug)]
pub struct Claim {
    pub id: String,
    session: u64,
    pub taken_over: Arc<Notify>,
    /// Set before `taken_over` is told: whether the connection that took
    /// the id over resumes the session (clean start 0) rather than
    /// starting a new one. A will waiting out its delay depends on it.
    successor_resumed: Arc<AtomicBool>,
}

impl Claim {
    /// Whether the connection that took the id over resumed the session.
    /// Meaningful once the id was taken over.
    pub fn successor_resumed(&self) -> bool {
        self.successor_resumed.load(Ordering::Acquire)
    }
}

impl ClientIds {
    /// Claims `id` for `session`, telling the session that held it, if
    /// any, that it was taken over, and whether `clean` started anew.
    pub fn claim(&self, id: &str, session: u64, clean: bool) -> Claim {
        let taken_over = Arc::new(Notify::new());
        let successor_resumed = Arc::new(AtomicBool::new(false));
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let previous = held.insert(
            id.to_string(),
            Holder {
                session,
                taken_over: taken_over.clone(),
                successor_resumed: successor_resumed.clone(),
            },
        );
        if let Some(old) = previous {
            // Under the lock: whoever sees the id taken over (`holds`)
            // also sees how.
            old.successor_resumed.store(!clean, Ordering::Release);
            // A permit, so the old session learns of it even if it is not
            // waiting at this moment.
            old.taken_over.notify_one();
        }
        Claim {
            id: id.to_string(),
            session,
            taken_over,
            successor_resumed,
        }
    }

    /// Gives the id back, unless a newer session holds it by now.
    pub fn release(&self, claim: &Claim) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held
            .get(&claim.id)
            .is_some_and(|h| h.session == claim.session)
        {
            held.remove(&claim.id);
        }
    }

    /// Whether `claim` still holds its id: false once a newer session
    /// claimed it.
    pub fn holds(&self, claim: &Claim) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&claim.id)
            .is_some_and(|h| h.session == claim.session)
    }

    pub fn len(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_second_claim_takes_the_id_over_and_the_first_release_keeps_it() {
        let ids = ClientIds::default();
        let first = ids.claim("d:w:c1", 1, false);
        let second = ids.claim("d:w:c1", 2, false);
        tokio::time::timeout(Duration::from_secs(1), first.taken_over.notified())
            .await
            .expect("the first session is told");
        assert!(!ids.holds(&first) && ids.holds(&second));
        assert!(first.successor_resumed());
        ids.release(&first);
        assert_eq!(ids.len(), 1, "the newer session still holds the id");
        let other = ids.claim("d:w:c2", 3, true);
        assert_eq!(ids.len(), 2);
        let third = ids.claim("d:w:c1", 4, true);
        assert!(!second.successor_resumed(), "a clean start resumes nothing");
        ids.release(&second);
        ids.release(&third);
        ids.release(&other);
        assert!(ids.is_empty());
    }
}

//! Which session holds which client id, so that a new connection with the
//! same id takes the session over (MQTT 3.1.1 §3.1.4, MQTT 5 §3.1.4).
//!
//! The broker does this for sessions it can see, but a session that has
//! nothing to say to the broker has no connection there (see
//! `Session::go_up`), so consentry keeps the map itself. Ids are the
//! namespaced ones sent upstream, so a device cannot take over a provider.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct ClientIds {
    held: Mutex<HashMap<String, (u64, Arc<Notify>)>>,
}

/// A session's claim on its client id; tells it when it was taken over.
#[derive(Debug)]
pub struct Claim {
    pub id: String,
    session: u64,
    pub taken_over: Arc<Notify>,
}

impl ClientIds {
    /// Claims `id` for `session`, telling the session that held it, if
    /// any, that it was taken over.
    pub fn claim(&self, id: &str, session: u64) -> Claim {
        let taken_over = Arc::new(Notify::new());
        let previous = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), (session, taken_over.clone()));
        if let Some((_, old)) = previous {
            // A permit, so the old session learns of it even if it is not
            // waiting at this moment.
            old.notify_one();
        }
        Claim {
            id: id.to_string(),
            session,
            taken_over,
        }
    }

    /// Gives the id back, unless a newer session holds it by now.
    pub fn release(&self, claim: &Claim) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held
            .get(&claim.id)
            .is_some_and(|(s, _)| *s == claim.session)
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
            .is_some_and(|(s, _)| *s == claim.session)
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
        let first = ids.claim("d:w:c1", 1);
        let second = ids.claim("d:w:c1", 2);
        tokio::time::timeout(Duration::from_secs(1), first.taken_over.notified())
            .await
            .expect("the first session is told");
        assert!(!ids.holds(&first) && ids.holds(&second));
        ids.release(&first);
        assert_eq!(ids.len(), 1, "the newer session still holds the id");
        let other = ids.claim("d:w:c2", 3);
        assert_eq!(ids.len(), 2);
        ids.release(&second);
        ids.release(&other);
        assert!(ids.is_empty());
    }
}

//! Which session holds which client id, so that a new connection with the
//! same id takes the session over (MQTT 3.1.1 §3.1.4, MQTT 5 §3.1.4).
//!
//! The broker does this for sessions it can see, but a session that has
//! nothing to say to the broker has no connection there (see
//! `Session::go_up`), so consentry keeps the map itself. Ids are the
//! namespaced ones sent upstream (`at_broker`), so a device cannot take
//! over a provider. The map also keeps, per id, the order in which the
//! wills of its sessions fell due (`Ticket`; `crate::will` publishes them).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct ClientIds {
    held: Mutex<HashMap<String, Holder>>,
    /// Each client id's wills, in the order they fell due.
    wills: Lines,
}

type Lines = Arc<Mutex<HashMap<String, Line>>>;

#[derive(Debug)]
struct Holder {
    session: u64,
    taken_over: Arc<Notify>,
    successor_resumed: Arc<AtomicBool>,
    /// Set for a session with a will: its place among the id's wills,
    /// given when a newer session takes the id over.
    will_ticket: Option<Arc<Mutex<Option<Ticket>>>>,
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
    will_ticket: Option<Arc<Mutex<Option<Ticket>>>>,
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
    /// `will`: the session has a will.
    pub fn claim(&self, id: &str, session: u64, clean: bool, will: bool) -> Claim {
        let taken_over = Arc::new(Notify::new());
        let successor_resumed = Arc::new(AtomicBool::new(false));
        let will_ticket = will.then(Arc::default);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let previous = held.insert(
            id.to_string(),
            Holder {
                session,
                taken_over: taken_over.clone(),
                successor_resumed: successor_resumed.clone(),
                will_ticket: will_ticket.clone(),
            },
        );
        if let Some(old) = previous {
            // Under the lock: whoever sees the id taken over (`holds`)
            // also sees how.
            old.successor_resumed.store(!clean, Ordering::Release);
            // The old session's will falls due now, before any will of
            // this one can (unless it waits out a delay that this
            // resumption cancels, when the ticket is given up), however
            // late the old session's task gets to it.
            if let Some(t) = &old.will_ticket {
                *t.lock().unwrap_or_else(|e| e.into_inner()) = Some(issue(&self.wills, id));
            }
            // A permit, so the old session learns of it even if it is not
            // waiting at this moment.
            old.taken_over.notify_one();
        }
        Claim {
            id: id.to_string(),
            session,
            taken_over,
            successor_resumed,
            will_ticket,
        }
    }

    /// Gives the id back, unless a newer session holds it by now.
    pub fn release(&self, claim: &Claim) {
        give_back(
            &mut self.held.lock().unwrap_or_else(|e| e.into_inner()),
            claim,
        );
    }

    /// The will of `claim`'s session fell due: gives the id back and
    /// returns the will's place among the id's wills, the one a takeover
    /// gave it or else the next.
    pub fn will_due(&self, claim: Claim) -> Ticket {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let given = claim
            .will_ticket
            .as_ref()
            .and_then(|t| t.lock().unwrap_or_else(|e| e.into_inner()).take());
        let ticket = given.unwrap_or_else(|| issue(&self.wills, &claim.id));
        // Under the same lock: no newer session can give this one a
        // second place meanwhile.
        give_back(&mut held, &claim);
        ticket
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

/// Removes `claim`'s id from `held`, unless a newer session holds it.
fn give_back(held: &mut HashMap<String, Holder>, claim: &Claim) {
    if held
        .get(&claim.id)
        .is_some_and(|h| h.session == claim.session)
    {
        held.remove(&claim.id);
    }
}

/// The wills of one client id, published one at a time in the order they
/// fell due: a later retained will must not be overwritten by an earlier
/// one, and their connections share an id, so at a broker the second would
/// take the first over.
#[derive(Debug)]
struct Line {
    issued: u64,
    serving: u64,
    /// Tickets given up before their turn.
    skipped: Vec<u64>,
    moved: Arc<Notify>,
}

fn issue(lines: &Lines, client_id: &str) -> Ticket {
    let mut all = lines.lock().unwrap_or_else(|e| e.into_inner());
    let line = all.entry(client_id.to_string()).or_insert_with(|| Line {
        issued: 0,
        serving: 0,
        skipped: Vec::new(),
        moved: Arc::new(Notify::new()),
    });
    let number = line.issued;
    line.issued += 1;
    Ticket {
        lines: lines.clone(),
        client_id: client_id.to_string(),
        number,
        moved: line.moved.clone(),
    }
}

/// A will's place among its client id's wills. Dropping it lets the next
/// one go.
#[derive(Debug)]
pub struct Ticket {
    lines: Lines,
    client_id: String,
    number: u64,
    moved: Arc<Notify>,
}

impl Ticket {
    /// Waits until every will of the client id before this one is done.
    pub async fn turn(&self) {
        loop {
            let moved = self.moved.notified();
            let mut moved = std::pin::pin!(moved);
            // Registered before the check, so a move in between is seen.
            moved.as_mut().enable();
            let mine = self
                .lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&self.client_id)
                .is_none_or(|l| l.serving == self.number);
            if mine {
                return;
            }
            moved.await;
        }
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let Some(line) = lines.get_mut(&self.client_id) else {
            return;
        };
        if line.serving != self.number {
            line.skipped.push(self.number);
            return;
        }
        line.serving += 1;
        while let Some(at) = line.skipped.iter().position(|&n| n == line.serving) {
            line.skipped.swap_remove(at);
            line.serving += 1;
        }
        if line.serving == line.issued {
            lines.remove(&self.client_id);
        } else {
            line.moved.notify_waiters();
        }
    }
}

/// Longest client id consentry sends a broker: long enough for any id a
/// client is likely to choose, short enough for any broker and for a
/// will's connection (`crate::will`), whose id adds a prefix.
const MAX_AT_BROKER: usize = 256;

/// The client id at the broker for a session of `namespace` (`d:{device}:`,
/// `p:{provider}:` or `a:`; ids are plain, `model::valid_id`) whose client
/// chose `client_id`. A device cannot take over a provider's broker session
/// by choosing its client id, and any id a client may choose (MQTT allows
/// any UTF-8) is one every broker takes: rumqttd refuses `+ $ # /` in an
/// id, so those are escaped (with `%`, `~` and control characters), and an
/// id that would be longer than [`MAX_AT_BROKER`] is replaced by its
/// SHA-256. The mapping is one to one, so takeovers keep working.
pub fn at_broker(namespace: &str, client_id: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(namespace.len() + client_id.len());
    out.push_str(namespace);
    for c in client_id.chars() {
        if "+$#/%~".contains(c) || c.is_control() {
            let mut utf8 = [0u8; 4];
            for b in c.encode_utf8(&mut utf8).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
    if out.len() > MAX_AT_BROKER {
        use sha2::{Digest, Sha256};
        out.truncate(namespace.len());
        out.push('~');
        out.push_str(&hex::encode(Sha256::digest(client_id.as_bytes())));
    }
    out
}

/// A session's SUBSCRIBE or UNSUBSCRIBE filter as the broker gets it: a
/// shared subscription's group (`$share/{group}/…`) is put in the
/// session's `namespace`, as its client id is, so that only sessions of
/// one identity share a group. Members of a group with different rights
/// (two providers, one without the user's consent) would lose to each
/// other every message the broker gave the one that may not have it.
/// Other filters are unchanged.
pub fn filter_at_broker(namespace: &str, filter: &str) -> String {
    match filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
    {
        Some((group, rest)) => format!("$share/{namespace}{group}/{rest}"),
        None => filter.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn shared_groups_at_the_broker_are_the_sessions_own() {
        assert_eq!(
            filter_at_broker("p:fit:", "$share/g/pii/#"),
            "$share/p:fit:g/pii/#"
        );
        assert_eq!(filter_at_broker("p:fit:", "pii/#"), "pii/#");
        assert_eq!(filter_at_broker("d:w:", "$SYS/#"), "$SYS/#");
    }

    #[test]
    fn ids_at_the_broker_are_plain_bounded_and_distinct() {
        assert_eq!(at_broker("d:w:", "sensor-42"), "d:w:sensor-42");
        assert_eq!(at_broker("d:w:", "a/b/+/#"), "d:w:a%2Fb%2F%2B%2F%23");
        assert_eq!(at_broker("a:", "$SYS"), "a:%24SYS");
        assert_eq!(at_broker("d:w:", "é\n"), "d:w:é%0A");
        assert_eq!(at_broker("d:w:", "x\u{1}"), "d:w:x%01");
        let long = "x".repeat(65_000);
        let hashed = at_broker("d:w:", &long);
        assert!(
            hashed.starts_with("d:w:~") && hashed.len() == 4 + 1 + 64,
            "{hashed}"
        );
        // Escapes and hashes cannot be chosen to collide with another id.
        assert_ne!(at_broker("d:w:", "%2F"), at_broker("d:w:", "/"));
        assert_ne!(at_broker("d:w:", &hashed[4..]), hashed);
        for id in at_broker("d:w:", "a/b/+/#$%~").chars() {
            assert!(!"+$#/~".contains(id));
        }
    }

    #[tokio::test]
    async fn a_second_claim_takes_the_id_over_and_the_first_release_keeps_it() {
        let ids = ClientIds::default();
        let first = ids.claim("d:w:c1", 1, false, false);
        let second = ids.claim("d:w:c1", 2, false, false);
        tokio::time::timeout(Duration::from_secs(1), first.taken_over.notified())
            .await
            .expect("the first session is told");
        assert!(!ids.holds(&first) && ids.holds(&second));
        assert!(first.successor_resumed());
        ids.release(&first);
        assert_eq!(ids.len(), 1, "the newer session still holds the id");
        let other = ids.claim("d:w:c2", 3, true, false);
        assert_eq!(ids.len(), 2);
        let third = ids.claim("d:w:c1", 4, true, false);
        assert!(!second.successor_resumed(), "a clean start resumes nothing");
        ids.release(&second);
        ids.release(&third);
        ids.release(&other);
        assert!(ids.is_empty());
    }

    /// The wills of one id go in the order their sessions were taken over,
    /// however late each session's task gets to its will.
    #[tokio::test]
    async fn wills_go_in_the_order_their_sessions_ended() {
        let ids = Arc::new(ClientIds::default());
        let claims: Vec<_> = (0..5).map(|n| ids.claim("d:w:c", n, true, true)).collect();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Sessions 0–3 were taken over in turn and session 4 holds the id;
        // their tasks get to their wills last first, and session 1's will
        // is not due after all (a resumption cancelled it).
        for (n, claim) in claims.into_iter().enumerate().rev() {
            if n == 1 {
                ids.release(&claim);
            } else {
                let ticket = ids.will_due(claim);
                let order = order.clone();
                tasks.push(tokio::spawn(async move {
                    ticket.turn().await;
                    order.lock().unwrap().push(n);
                }));
            }
            tokio::task::yield_now().await;
        }
        // Another id's will does not wait for these.
        let other = ids.will_due(ids.claim("d:w:other", 9, true, true));
        tokio::time::timeout(Duration::from_secs(1), other.turn())
            .await
            .expect("another id's line moves on its own");
        drop(other);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 2, 3, 4]);
        assert!(ids.is_empty());
        assert!(
            ids.wills.lock().unwrap().is_empty(),
            "served lines are forgotten"
        );
    }
}

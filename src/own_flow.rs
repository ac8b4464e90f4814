//! consentry's own QoS 1/2 flow towards a client whose session is not
//! persistent.
//!
//! The broker would otherwise hold each delivery in flight until the client
//! acknowledged it through consentry, and that round trip includes the
//! ledger's fsync: with rumqttd's fixed window of 100 unacknowledged
//! messages per connection, a subscriber could not receive more than 100
//! messages per fsync. For a session that ends with its connection (MQTT
//! 3.1.1 clean session, MQTT 5 session expiry 0) nothing is lost by
//! completing the broker's flow as soon as consentry has decided the
//! delivery: in-flight messages of such a session die with its connection
//! (MQTT 3.1.1 §4.1, MQTT 5 §4.1), whichever hop drops it. Towards the
//! client consentry then is the sender, with packet ids of its own.
//! Persistent sessions keep the broker's ids and end-to-end acknowledgement,
//! so the broker redelivers after a reconnect.

use std::collections::HashMap;

use rumqttc::v5::mqttbytes::QoS;

/// Where one of our deliveries to the client stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// QoS 1 waiting for PUBACK, or QoS 2 waiting for PUBREC.
    Sent(QoS),
    /// QoS 2: PUBREL sent, waiting for PUBCOMP.
    Released,
}

/// What the session does with an acknowledgement from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// No delivery in flight has this id at this stage: the client
    /// acknowledged something never sent, or acknowledged it twice. The
    /// broker has no flow with this client either (a session that is not
    /// persistent runs all of its QoS 1/2 deliveries here).
    Unknown,
    /// The flow for this id is complete.
    Done,
    /// Send PUBREL for this id to the client.
    Release(u16),
}

#[derive(Debug)]
pub struct OwnFlow {
    inflight: HashMap<u16, Stage>,
    next: u16,
    /// The client's Receive Maximum (MQTT 5), or 65535.
    limit: usize,
}

impl OwnFlow {
    pub fn new(receive_maximum: Option<u16>) -> Self {
        OwnFlow {
            inflight: HashMap::new(),
            next: 1,
            limit: receive_maximum.map_or(u16::MAX as usize, |r| r.max(1) as usize),
        }
    }

    /// Whether another QoS 1/2 delivery may be started now.
    pub fn has_room(&self) -> bool {
        self.inflight.len() < self.limit
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// A fresh packet id for a delivery at `qos` (1 or 2), or None when
    /// the client's window is full.
    pub fn start(&mut self, qos: QoS) -> Option<u16> {
        if !self.has_room() || qos == QoS::AtMostOnce {
            return None;
        }
        // At most 65535 ids in flight and the window is not full, so a free
        // id exists; the scan is short unless the window is nearly full.
        loop {
            let id = self.next;
            self.next = if self.next == u16::MAX {
                1
            } else {
                self.next + 1
            };
            if let std::collections::hash_map::Entry::Vacant(e) = self.inflight.entry(id) {
                e.insert(Stage::Sent(qos));
                return Some(id);
            }
        }
    }

    pub fn on_puback(&mut self, pkid: u16) -> Answer {
        match self.inflight.get(&pkid) {
            Some(Stage::Sent(QoS::AtLeastOnce)) => {
                self.inflight.remove(&pkid);
                Answer::Done
            }
            _ => Answer::Unknown,
        }
    }

    /// `failed`: the PUBREC carried a reason code ≥ 0x80, which ends the
    /// flow (MQTT 5 §4.3.3).
    pub fn on_pubrec(&mut self, pkid: u16, failed: bool) -> Answer {
        match self.inflight.get_mut(&pkid) {
            Some(s @ Stage::Sent(QoS::ExactlyOnce)) => {
                if failed {
                    self.inflight.remove(&pkid);
                    Answer::Done
                } else {
                    *s = Stage::Released;
                    Answer::Release(pkid)
                }
            }
            // A repeated PUBREC after our PUBREL: answer it again.
            Some(Stage::Released) => Answer::Release(pkid),
            _ => Answer::Unknown,
        }
    }

    pub fn on_pubcomp(&mut self, pkid: u16) -> Answer {
        match self.inflight.get(&pkid) {
            Some(Stage::Released) => {
                self.inflight.remove(&pkid);
                Answer::Done
            }
            _ => Answer::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qos1_flow_completes_on_puback() {
        let mut f = OwnFlow::new(None);
        let id = f.start(QoS::AtLeastOnce).unwrap();
        assert_eq!(f.in_flight(), 1);
        assert_eq!(f.on_pubcomp(id), Answer::Unknown);
        assert_eq!(f.on_puback(id), Answer::Done);
        assert_eq!(f.in_flight(), 0);
        assert_eq!(
            f.on_puback(id),
            Answer::Unknown,
            "a second PUBACK is unknown"
        );
    }

    #[test]
    fn qos2_flow_releases_then_completes() {
        let mut f = OwnFlow::new(None);
        let id = f.start(QoS::ExactlyOnce).unwrap();
        assert_eq!(
            f.on_puback(id),
            Answer::Unknown,
            "PUBACK does not end QoS 2"
        );
        assert_eq!(f.on_pubcomp(id), Answer::Unknown, "PUBCOMP before PUBREL");
        assert_eq!(f.on_pubrec(id, false), Answer::Release(id));
        assert_eq!(
            f.on_pubrec(id, false),
            Answer::Release(id),
            "repeated PUBREC"
        );
        assert_eq!(f.on_pubcomp(id), Answer::Done);
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn failed_pubrec_ends_the_flow() {
        let mut f = OwnFlow::new(None);
        let id = f.start(QoS::ExactlyOnce).unwrap();
        assert_eq!(f.on_pubrec(id, true), Answer::Done);
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn receive_maximum_bounds_the_window_and_ids_are_reused_only_when_free() {
        let mut f = OwnFlow::new(Some(3));
        let a = f.start(QoS::AtLeastOnce).unwrap();
        let b = f.start(QoS::AtLeastOnce).unwrap();
        let c = f.start(QoS::ExactlyOnce).unwrap();
        assert!(!f.has_room());
        assert_eq!(f.start(QoS::AtLeastOnce), None);
        assert_eq!(f.on_puback(b), Answer::Done);
        let d = f.start(QoS::AtLeastOnce).unwrap();
        assert!(![a, c].contains(&d), "an id in flight is never handed out");
        assert!(f.start(QoS::AtMostOnce).is_none(), "QoS 0 needs no id");
    }

    #[test]
    fn ids_wrap_around_past_65535_and_skip_ids_in_flight() {
        let mut f = OwnFlow::new(None);
        let first = f.start(QoS::AtLeastOnce).unwrap();
        assert_eq!(first, 1);
        for _ in 2..=u16::MAX {
            let id = f.start(QoS::AtLeastOnce).unwrap();
            assert_eq!(f.on_puback(id), Answer::Done);
        }
        // 1 is still in flight: the next id after 65535 is 2.
        assert_eq!(f.start(QoS::AtLeastOnce), Some(2));
        assert_ne!(f.start(QoS::AtLeastOnce), Some(0));
    }
}

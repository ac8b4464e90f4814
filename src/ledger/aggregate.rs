//! In-memory aggregation of blocked deliveries. A blocked stream can be very chatty (a device
//! publishing every second to a recipient without consent), so it is counted per user,
//! recipient, kind, reason and hour instead of logged per message.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};

use super::entry::BlockedCount;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    user: String,
    recipient: String,
    kind: String,
    reason: String,
    hour_start: DateTime<Utc>,
}

#[derive(Default)]
pub(crate) struct Aggregator {
    map: Mutex<HashMap<Key, u64>>,
}

/// Above this many distinct keys the writer is asked to flush early, bounding memory.
pub(crate) const FLUSH_THRESHOLD: usize = 50_000;

pub(crate) fn hour_start(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(TimeDelta::hours(1)).unwrap_or(t)
}

impl Aggregator {
    /// Returns the number of distinct keys now held.
    pub fn add(
        &self,
        user: &str,
        recipient: &str,
        kind: &str,
        reason: &str,
        at: DateTime<Utc>,
    ) -> usize {
        let key = Key {
            user: user.to_owned(),
            recipient: recipient.to_owned(),
            kind: kind.to_owned(),
            reason: reason.to_owned(),
            hour_start: hour_start(at),
        };
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let c = m.entry(key).or_insert(0);
        *c = c.saturating_add(1);
        m.len()
    }

    pub fn take(&self) -> Vec<BlockedCount> {
        let m = std::mem::take(&mut *self.map.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out: Vec<BlockedCount> = m
            .into_iter()
            .map(|(k, count)| BlockedCount {
                user: k.user,
                recipient: k.recipient,
                kind: k.kind,
                reason: k.reason,
                hour_start: k.hour_start,
                count,
            })
            .collect();
        // Deterministic order keeps the on-disk layout reproducible for a given input.
        out.sort_by(|a, b| {
            (a.hour_start, &a.user, &a.recipient, &a.kind, &a.reason).cmp(&(
                b.hour_start,
                &b.user,
                &b.recipient,
                &b.kind,
                &b.reason,
            ))
        });
        out
    }
}

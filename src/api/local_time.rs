//! Times as a user reads them: in their own zone, with its offset, in every
//! response about them (share history, consent history, receipts, account
//! events), so the same moment never reads two ways on one account.

use chrono::{DateTime, FixedOffset, Utc};
use chrono_tz::Tz;

use super::State;

/// The user's zone; UTC for an unknown user or zone (neither is stored).
pub(super) fn zone(state: &State, user: &str) -> Tz {
    state
        .prefs
        .user(user)
        .and_then(|u| u.time_zone.parse().ok())
        .unwrap_or(chrono_tz::UTC)
}

/// `t` in `tz`, with the offset in force there at that moment.
pub(super) fn local(t: DateTime<Utc>, tz: Tz) -> DateTime<FixedOffset> {
    t.with_timezone(&tz).fixed_offset()
}

//! RFC 6238 §5.2: a TOTP code is accepted once. The last time step accepted
//! for each user is kept here, in the database, so that neither a second
//! login within the same step nor a restart lets a code be used again.

use rusqlite::params;

use super::{Store, StoreError};

/// Run at every open. `IF NOT EXISTS`: a database made before this table
/// existed gains it as it is opened, and nothing else changes.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS totp_last_step (
    user_id TEXT PRIMARY KEY,
    step INTEGER NOT NULL
);
";

impl Store {
    /// Records `step` as the last TOTP time step accepted for `user` if it is
    /// later than the one recorded, and says whether it was. False means the
    /// code of that step, or of a later one, was accepted before. One
    /// statement: of two logins racing with the same code, one wins.
    ///
    /// `newest` is the latest step a code is accepted for now. A recorded
    /// step past it was accepted while the clock was ahead (a wrong NTP
    /// step): no code could be newer until the clock reached it again, so it
    /// would lock the user out for as long as the clock was wrong. Such a
    /// record gives way to the step now accepted.
    pub fn accept_totp_step(&self, user: &str, step: u64, newest: u64) -> Result<bool, StoreError> {
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        let newest = i64::try_from(newest).unwrap_or(i64::MAX);
        self.with(|c, _| {
            let changed = c.execute(
                "INSERT INTO totp_last_step (user_id, step) VALUES (?1, ?2)
                 ON CONFLICT(user_id) DO UPDATE SET step = excluded.step
                 WHERE excluded.step > totp_last_step.step OR totp_last_step.step > ?3",
                params![user, step, newest],
            )?;
            Ok(changed == 1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_accepted_once_and_only_going_forward() {
        let s = Store::in_memory(&[1; 32]).unwrap();
        assert!(s.accept_totp_step("alice", 100, 101).unwrap());
        assert!(!s.accept_totp_step("alice", 100, 101).unwrap(), "replayed");
        assert!(!s.accept_totp_step("alice", 99, 101).unwrap(), "older step");
        assert!(s.accept_totp_step("alice", 101, 101).unwrap());
        // Per user.
        assert!(s.accept_totp_step("bob", 100, 101).unwrap());
    }

    /// Found by an outside review: a login while the clock was a day ahead
    /// recorded a step no code could pass until the clock got there again.
    #[test]
    fn a_step_recorded_while_the_clock_was_ahead_gives_way() {
        let s = Store::in_memory(&[1; 32]).unwrap();
        let ahead = 100 + 2880; // a day of 30 s steps
        assert!(s.accept_totp_step("alice", ahead, ahead + 1).unwrap());
        // The clock is right again: now is step 100.
        assert!(s.accept_totp_step("alice", 100, 101).unwrap());
        assert!(!s.accept_totp_step("alice", 100, 101).unwrap(), "replayed");
        assert!(!s.accept_totp_step("alice", 99, 101).unwrap(), "older step");
        assert!(s.accept_totp_step("alice", 101, 102).unwrap());
    }

    #[test]
    fn an_existing_database_gains_the_table_and_it_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        // A database as made before this table existed.
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(super::super::SCHEMA)
            .unwrap();
        {
            let s = Store::open(&path, &[2; 32]).unwrap();
            assert!(s.accept_totp_step("alice", 100, 101).unwrap());
        }
        let s = Store::open(&path, &[2; 32]).unwrap();
        assert!(!s.accept_totp_step("alice", 100, 101).unwrap(), "reopened");
        assert!(s.accept_totp_step("alice", 101, 102).unwrap());
    }
}

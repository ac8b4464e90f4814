//! One-time recovery codes, kept as digests only: a code that matches is
//! deleted in the same statement, so of two logins racing with one code,
//! one wins.

use rusqlite::params;

use super::{Store, StoreError};

/// Run at every open; a database made before this table gains it.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS recovery_codes (
    user_id TEXT NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY (user_id, digest)
);
";

impl Store {
    /// Replaces every recovery code of `user` with these; `first` for the
    /// set made at registration, which is not an account event.
    pub fn replace_recovery_codes(
        &self,
        user: &str,
        digests: &[[u8; 32]],
        first: bool,
    ) -> Result<(), StoreError> {
        self.with(|c, _| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM recovery_codes WHERE user_id = ?1",
                params![user],
            )?;
            // The first set, at registration, replaces nothing.
            if !first {
                super::account_events::record(
                    &tx,
                    user,
                    super::AccountEvent::RecoveryCodesReplaced,
                )?;
            }
            for d in digests {
                tx.execute(
                    "INSERT OR IGNORE INTO recovery_codes (user_id, digest) VALUES (?1, ?2)",
                    params![user, &d[..]],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Uses up the code with this digest: how many `user` has left, or
    /// `None` if it was not one of theirs (never, or already used).
    pub fn use_recovery_code(
        &self,
        user: &str,
        digest: &[u8; 32],
    ) -> Result<Option<usize>, StoreError> {
        self.with(|c, _| {
            let tx = c.transaction()?;
            let used = tx.execute(
                "DELETE FROM recovery_codes WHERE user_id = ?1 AND digest = ?2",
                params![user, &digest[..]],
            )?;
            if used == 0 {
                return Ok(None);
            }
            super::account_events::record(&tx, user, super::AccountEvent::RecoveryCodeUsed)?;
            let left: i64 = tx.query_row(
                "SELECT COUNT(*) FROM recovery_codes WHERE user_id = ?1",
                params![user],
                |r| r.get(0),
            )?;
            tx.commit()?;
            Ok(Some(usize::try_from(left).unwrap_or(0)))
        })
    }

    pub fn recovery_codes_left(&self, user: &str) -> Result<usize, StoreError> {
        self.with(|c, _| {
            let left: i64 = c.query_row(
                "SELECT COUNT(*) FROM recovery_codes WHERE user_id = ?1",
                params![user],
                |r| r.get(0),
            )?;
            Ok(usize::try_from(left).unwrap_or(0))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_is_used_once_and_a_new_set_replaces_the_old() {
        let s = Store::in_memory(&[3; 32]).unwrap();
        s.replace_recovery_codes("alice", &[[1; 32], [2; 32]], true)
            .unwrap();
        s.replace_recovery_codes("bob", &[[1; 32]], true).unwrap();
        assert_eq!(s.recovery_codes_left("alice").unwrap(), 2);
        assert_eq!(s.use_recovery_code("alice", &[1; 32]).unwrap(), Some(1));
        assert_eq!(
            s.use_recovery_code("alice", &[1; 32]).unwrap(),
            None,
            "used"
        );
        assert_eq!(s.use_recovery_code("alice", &[9; 32]).unwrap(), None);
        // Per user: bob's copy of the same digest is still his.
        assert_eq!(s.use_recovery_code("bob", &[1; 32]).unwrap(), Some(0));
        s.replace_recovery_codes("alice", &[[7; 32]], false)
            .unwrap();
        assert_eq!(
            s.use_recovery_code("alice", &[2; 32]).unwrap(),
            None,
            "old set"
        );
        assert_eq!(s.recovery_codes_left("alice").unwrap(), 1);
    }
}

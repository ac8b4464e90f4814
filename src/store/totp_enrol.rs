//! Enrolling a new TOTP authenticator: a new secret waits here until the user
//! proves, with one of its codes, that their authenticator has it. Only then
//! does it replace the old one, so a scan that failed never locks a user out.

use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension};

use super::{Store, StoreError};

/// Run at every open; `IF NOT EXISTS`, as for `totp_last_step`.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS totp_pending (
    user_id TEXT PRIMARY KEY,
    secret BLOB NOT NULL,
    expires_at INTEGER NOT NULL
);
";

impl Store {
    /// Keeps `secret` (sealed) as `user`'s pending authenticator until
    /// `expires`, replacing one pending before.
    pub fn set_pending_totp(
        &self,
        user: &str,
        secret: &[u8],
        expires: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.with(|c, cipher| {
            let sealed = cipher.seal(&format!("totp_pending.{user}"), secret)?;
            c.execute(
                "INSERT OR REPLACE INTO totp_pending (user_id, secret, expires_at) VALUES (?1, ?2, ?3)",
                params![user, sealed, expires.timestamp()],
            )?;
            Ok(())
        })
    }

    /// `user`'s pending secret, unless there is none or it has expired.
    pub fn pending_totp(&self, user: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|c, cipher| {
            let sealed: Option<Vec<u8>> = c
                .query_row(
                    "SELECT secret FROM totp_pending WHERE user_id = ?1 AND expires_at >= ?2",
                    params![user, Utc::now().timestamp()],
                    |r| r.get(0),
                )
                .optional()?;
            sealed
                .map(|s| cipher.open(&format!("totp_pending.{user}"), &s))
                .transpose()
        })
    }

    /// Makes the pending secret `user`'s authenticator, in one transaction:
    /// it replaces the old secret, the login secrets become the user's own
    /// (an import leaves them), and `step`, whose code confirmed it, counts
    /// as used, so that code cannot also log in.
    pub fn activate_totp(&self, user: &str, secret: &[u8], step: u64) -> Result<(), StoreError> {
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        self.transaction(|tx| {
            tx.set_own_login(user, None, Some(secret))?;
            tx.tx.execute(
                "INSERT INTO totp_last_step (user_id, step) VALUES (?1, ?2)
                 ON CONFLICT(user_id) DO UPDATE SET step = max(step, excluded.step)",
                params![user, step],
            )?;
            tx.tx
                .execute("DELETE FROM totp_pending WHERE user_id = ?1", [user])?;
            tx.account_event(user, super::AccountEvent::AuthenticatorChanged)
        })
    }
}

impl Store {
    /// The operator's reset for a user who lost a factor: new password and
    /// authenticator secret, every session ended, any pending enrolment
    /// dropped. A directory import leaves the new secrets alone.
    pub fn reset_login(
        &self,
        user: &str,
        password_hash: &str,
        totp_secret: &[u8],
    ) -> Result<(), StoreError> {
        self.transaction(|tx| {
            // Kept over a directory reload, which would otherwise give back
            // the secrets that were lost.
            tx.set_own_login(user, Some(password_hash), Some(totp_secret))?;
            tx.tx
                .execute("DELETE FROM sessions WHERE user_id = ?1", [user])?;
            tx.tx
                .execute("DELETE FROM totp_pending WHERE user_id = ?1", [user])?;
            // The last step used was the old secret's: the new one's code of
            // the same 30 s must not be taken for a replay.
            tx.tx
                .execute("DELETE FROM totp_last_step WHERE user_id = ?1", [user])?;
            tx.account_event(user, super::AccountEvent::LoginResetByOperator)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(user: &str) -> Store {
        let s = Store::in_memory(&[3; 32]).unwrap();
        s.transaction(|tx| {
            tx.put_user(
                &crate::model::User {
                    id: user.into(),
                    time_zone: "UTC".into(),
                    jurisdiction: None,
                },
                Some(("hash", Some(b"old secret"))),
                true,
            )
        })
        .unwrap();
        s
    }

    #[test]
    fn a_pending_secret_replaces_the_old_one_only_when_activated() {
        let s = store_with("alice");
        let soon = Utc::now() + chrono::Duration::minutes(10);
        assert_eq!(s.pending_totp("alice").unwrap(), None);
        s.set_pending_totp("alice", b"new secret", soon).unwrap();
        assert_eq!(
            s.pending_totp("alice").unwrap().as_deref(),
            Some(&b"new secret"[..])
        );
        let auth = s.user_auth("alice").unwrap().unwrap();
        assert_eq!(auth.totp_secret.as_deref(), Some(&b"old secret"[..]));

        assert!(s.accept_totp_step("alice", 100, 101).unwrap());
        // Confirmed by a code of an earlier step than the last login's: the
        // last step used does not go back.
        s.activate_totp("alice", b"new secret", 99).unwrap();
        let auth = s.user_auth("alice").unwrap().unwrap();
        assert_eq!(auth.totp_secret.as_deref(), Some(&b"new secret"[..]));
        assert_eq!(s.pending_totp("alice").unwrap(), None);
        assert!(!s.accept_totp_step("alice", 100, 101).unwrap());
        // A later confirming step is used up.
        s.activate_totp("alice", b"newer", 105).unwrap();
        assert!(!s.accept_totp_step("alice", 105, 106).unwrap());
        assert!(s.accept_totp_step("alice", 106, 107).unwrap());
        assert!(matches!(
            s.activate_totp("nobody", b"x", 1),
            Err(StoreError::NotFound { .. })
        ));
        s.reset_login("alice", "new hash", b"operator's").unwrap();
        use super::super::AccountEvent::*;
        let events = s.account_event_names("alice");
        assert_eq!(
            events,
            [
                AuthenticatorChanged,
                AuthenticatorChanged,
                LoginResetByOperator
            ]
        );
        assert!(s.account_events("nobody").unwrap().is_empty());
    }

    #[test]
    fn an_expired_pending_secret_is_gone() {
        let s = store_with("bob");
        s.set_pending_totp("bob", b"new", Utc::now() - chrono::Duration::seconds(1))
            .unwrap();
        assert_eq!(s.pending_totp("bob").unwrap(), None);
    }
}

//! What happened to a user's login, for the user to read. An operator's
//! reset above all: whoever holds the secrets it hands out can act as the
//! user, and every consent given after it reads as the user's own, so the
//! user must be able to see that it happened (X.1363 9.1.3).

use chrono::{DateTime, Utc};
use rusqlite::params;
use serde::Serialize;

use super::{parse_time, Store, StoreError, Tx};

/// Run at every open; a database made before this table gains it.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS account_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    at TEXT NOT NULL,
    event TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS account_events_by_user ON account_events(user_id, seq);
";

/// A change to how a user logs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccountEvent {
    /// The operator replaced the password, authenticator and recovery codes
    /// and ended every session.
    LoginResetByOperator,
    /// A reload of the operator's directory file replaced the password or
    /// authenticator, and ended every session.
    LoginReplacedFromDirectory,
    PasswordChanged,
    AuthenticatorChanged,
    /// A new set replaced the recovery codes.
    RecoveryCodesReplaced,
    /// A recovery code stood in for the authenticator.
    RecoveryCodeUsed,
    /// The operator removed one of the user's devices: its credentials
    /// stopped working (a device's login is the user's too).
    DeviceRemovedByOperator,
}

const ALL: [AccountEvent; 7] = [
    AccountEvent::LoginResetByOperator,
    AccountEvent::LoginReplacedFromDirectory,
    AccountEvent::PasswordChanged,
    AccountEvent::AuthenticatorChanged,
    AccountEvent::RecoveryCodesReplaced,
    AccountEvent::RecoveryCodeUsed,
    AccountEvent::DeviceRemovedByOperator,
];

impl AccountEvent {
    fn as_str(self) -> &'static str {
        match self {
            AccountEvent::LoginResetByOperator => "login_reset_by_operator",
            AccountEvent::LoginReplacedFromDirectory => "login_replaced_from_directory",
            AccountEvent::PasswordChanged => "password_changed",
            AccountEvent::AuthenticatorChanged => "authenticator_changed",
            AccountEvent::RecoveryCodesReplaced => "recovery_codes_replaced",
            AccountEvent::RecoveryCodeUsed => "recovery_code_used",
            AccountEvent::DeviceRemovedByOperator => "device_removed_by_operator",
        }
    }

    fn parse(s: &str) -> Option<AccountEvent> {
        ALL.into_iter().find(|e| e.as_str() == s)
    }
}

/// Records `event` for `user` on `c`, inside the caller's transaction or
/// statement group, so the event and the change it records go together.
pub(super) fn record(
    c: &rusqlite::Connection,
    user: &str,
    event: AccountEvent,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO account_events (user_id, at, event) VALUES (?1, ?2, ?3)",
        params![user, Utc::now().to_rfc3339(), event.as_str()],
    )?;
    Ok(())
}

impl Tx<'_> {
    /// Records `event` for `user`, in the transaction that made the change.
    pub fn account_event(&self, user: &str, event: AccountEvent) -> Result<(), StoreError> {
        record(self.tx, user, event)
    }
}

impl Store {
    /// `user`'s account events, oldest first.
    pub fn account_events(
        &self,
        user: &str,
    ) -> Result<Vec<(DateTime<Utc>, AccountEvent)>, StoreError> {
        self.with(|c, _| {
            let mut st =
                c.prepare("SELECT at, event FROM account_events WHERE user_id = ?1 ORDER BY seq")?;
            let rows = st.query_map([user], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (at, event) = row?;
                // Written only by this module: an unknown name is from a
                // newer version, and is skipped rather than failing the list.
                if let Some(e) = AccountEvent::parse(&event) {
                    out.push((parse_time(&at)?, e));
                }
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
impl Store {
    /// `user`'s account events without their times.
    pub(super) fn account_event_names(&self, user: &str) -> Vec<AccountEvent> {
        let events = self.account_events(user).expect("account events");
        events.into_iter().map(|(_, e)| e).collect()
    }
}

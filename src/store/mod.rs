//! The embedded, transactional, durable store of the preference manager.
//!
//! SQLite, because the product runs as one process on one node and needs
//! transactions and crash safety, not a database server: one file under the
//! data directory, WAL journal, `synchronous = FULL` so a committed consent
//! change survives a power cut. rusqlite bundles SQLite, so nothing needs to
//! be installed.
//!
//! PII columns (user profiles, TOTP secrets, preference documents, the
//! consent history, receipts) are encrypted with [`cipher::Cipher`]; ids are
//! stored in clear because they are the accounts' login names and keys.
//! Nothing is ever overwritten in `consent_history`.

mod account_events;
mod cipher;
mod consent_mark;
mod consented_kinds;
mod recovery_codes;
mod totp_enrol;
mod totp_steps;

pub use account_events::AccountEvent;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, FixedOffset, Utc};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use cipher::Cipher;
pub use consent_mark::ConsentMark;

use crate::model::{Device, Directory, Kind, Preferences, Provider, User};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("stored document is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("decryption failed (wrong key or altered data)")]
    Crypto,
    /// A stored value that does not decrypt, and where it is: `place` is the value's associated
    /// data, `table.column.row-key`, which is how the operator finds the row.
    #[error(
        "the store {file}: {} does not decrypt: it was altered or damaged, or the store was \
         written under another master key (master.key or CONSENTRY_MASTER_KEY). Restore the \
         store, or the master key, from a backup",
        cipher::describe_place(place)
    )]
    Undecryptable { file: String, place: String },
    /// SQLite does not recognise the file, or finds its pages damaged.
    #[error(
        "the store {file} is corrupt or is not a consentry store ({detail}). Is the path the \
         store's? Restore it from a backup of the data directory"
    )]
    NotAStore {
        file: String,
        detail: rusqlite::Error,
    },
    #[error("value encrypted under unknown key {0}")]
    UnknownKey(u32),
    #[error("{what} {id:?} already exists")]
    Exists { what: &'static str, id: String },
    #[error("no such {what} {id:?}")]
    NotFound { what: &'static str, id: String },
    #[error("preferences are at version {current}, not {expected}")]
    Conflict { current: u64, expected: u64 },
}

impl StoreError {
    /// The database cannot write for now: the disk is full, the file
    /// read-only or unreadable, or another writer holds it. Nothing was
    /// changed, and the same request may succeed later.
    pub fn is_unavailable(&self) -> bool {
        use rusqlite::ErrorCode::*;
        matches!(
            self,
            StoreError::Db(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    DiskFull | ReadOnly | CannotOpen | SystemIoFailure | DatabaseBusy
                        | DatabaseLocked
                )
        )
    }
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS kinds (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS providers (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    profile BLOB NOT NULL,
    password_hash TEXT,
    totp BLOB,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    password_hash TEXT,
    cert_sha256 TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS preferences (
    user_id TEXT PRIMARY KEY REFERENCES users(id),
    version INTEGER NOT NULL,
    doc BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS consent_history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    at TEXT NOT NULL,
    source TEXT NOT NULL,
    doc BLOB NOT NULL,
    receipt_jti TEXT
);
CREATE TABLE IF NOT EXISTS receipts (
    jti TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    at TEXT NOT NULL,
    doc BLOB NOT NULL
);
-- Users whose login secrets are their own (registered through the API, or
-- changed their password there): a directory import leaves them alone.
CREATE TABLE IF NOT EXISTS own_login (user_id TEXT PRIMARY KEY REFERENCES users(id));
-- Users whose profile (time zone) is their own: registered through the API,
-- or changed it there. A directory import leaves their profile alone.
CREATE TABLE IF NOT EXISTS own_profile (user_id TEXT PRIMARY KEY REFERENCES users(id));
-- Device ids their users manage, having registered or removed them through
-- the API (removed_at set): a directory import leaves them alone, so it
-- neither brings back a removed device nor replaces a registered one's secret.
CREATE TABLE IF NOT EXISTS user_devices (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    removed_at TEXT
);
-- Each provider as the directory file last said it. A reload applies a
-- provider only where the file changed it since, so a change the operator
-- made through the API stands until the file is edited for that provider.
CREATE TABLE IF NOT EXISTS imported_providers (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash BLOB PRIMARY KEY,
    user_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS disputes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    ledger_seq INTEGER NOT NULL,
    provider TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    resolved_at TEXT,
    detail BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_by_user ON receipts(user_id, at);
CREATE INDEX IF NOT EXISTS history_by_user ON consent_history(user_id, seq);
"#;

/// What the store keeps of a user beyond the id, encrypted as one value.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Profile {
    time_zone: String,
    jurisdiction: Option<String>,
}

/// Secrets a login needs.
#[derive(Debug)]
pub struct UserAuth {
    pub password_hash: Option<String>,
    pub totp_secret: Option<Vec<u8>>,
}

/// One entry of a user's consent history.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    pub version: u64,
    pub at: DateTime<Utc>,
    pub source: String,
    pub preferences: Preferences,
    pub receipt_jti: Option<String>,
}

/// A stored receipt: its JSON and signed forms, as issued.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredReceipt {
    pub jti: String,
    pub version: u64,
    pub at: DateTime<Utc>,
    pub json: serde_json::Value,
    pub jws: String,
}

pub struct Store {
    conn: Mutex<Connection>,
    cipher: Cipher,
    /// Raised after each commit that changed a user's preferences.
    consent_mark: std::sync::OnceLock<ConsentMark>,
}

impl Store {
    pub fn open(path: &Path, key: &[u8; 32]) -> Result<Store, StoreError> {
        Store::open_file(path, key).map_err(|e| match e {
            // SQLite words both as its own ("file is not a database"), which names no file and
            // reads, behind the caller's guess at a full disk, like a problem of space.
            StoreError::Db(detail @ rusqlite::Error::SqliteFailure(..))
                if matches!(
                    detail.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
                ) =>
            {
                StoreError::NotAStore {
                    file: path.display().to_string(),
                    detail,
                }
            }
            other => other,
        })
    }

    fn open_file(path: &Path, key: &[u8; 32]) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // What is deleted or overwritten is zeroed, not left in free space
        // for someone with the file to read (a dispute's parties in clear,
        // below; expired sessions). The store writes little, so the extra
        // writes cost nothing that shows.
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(totp_steps::SCHEMA)?;
        conn.execute_batch(totp_enrol::SCHEMA)?;
        conn.execute_batch(recovery_codes::SCHEMA)?;
        conn.execute_batch(account_events::SCHEMA)?;
        conn.execute_batch(consented_kinds::SCHEMA)?;
        let store = Store {
            conn: Mutex::new(conn),
            cipher: Cipher::new(1, key).in_file(path),
            consent_mark: Default::default(),
        };
        store.seal_dispute_parties()?;
        store.backfill_consented_kinds()?;
        Ok(store)
    }

    /// Moves the provider, kind and record of disputes written before they
    /// were sealed into the sealed detail, in one transaction.
    fn seal_dispute_parties(&self) -> Result<(), StoreError> {
        self.with(|c, cipher| {
            let tx = c.transaction()?;
            let clear: Vec<(i64, String, String, i64, Vec<u8>)> = tx
                .prepare(
                    "SELECT id, provider, kind, ledger_seq, detail FROM disputes \
                     WHERE provider != '' OR kind != '' OR ledger_seq != 0",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
                .collect::<Result<_, _>>()?;
            for (id, provider, kind, seq, sealed) in &clear {
                let aad = format!("disputes.detail.{id}");
                let mut d: DisputeDetail = serde_json::from_slice(&cipher.open(&aad, sealed)?)?;
                d.provider.get_or_insert_with(|| provider.clone());
                d.kind.get_or_insert_with(|| kind.clone());
                d.ledger_seq.get_or_insert(*seq as u64);
                tx.execute(
                    "UPDATE disputes SET provider = '', kind = '', ledger_seq = 0, detail = ?2 WHERE id = ?1",
                    params![id, cipher.seal(&aad, &serde_json::to_vec(&d)?)?],
                )?;
            }
            tx.commit()?;
            if !clear.is_empty() {
                // The old pages are in the WAL and the main file until a
                // checkpoint writes the new ones over them.
                c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
                tracing::info!(disputes = clear.len(), "sealed the parties and record of earlier disputes");
            }
            Ok(())
        })
    }

    /// An in-memory store, for tests and benchmarks.
    pub fn in_memory(key: &[u8; 32]) -> Result<Store, StoreError> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(totp_steps::SCHEMA)?;
        conn.execute_batch(totp_enrol::SCHEMA)?;
        conn.execute_batch(recovery_codes::SCHEMA)?;
        conn.execute_batch(account_events::SCHEMA)?;
        conn.execute_batch(consented_kinds::SCHEMA)?;
        let store = Store {
            conn: Mutex::new(conn),
            cipher: Cipher::new(1, key),
            consent_mark: Default::default(),
        };
        store.backfill_consented_kinds()?;
        Ok(store)
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection, &Cipher) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut conn, &self.cipher)
    }

    /// Runs `f` in one transaction: all of it is committed, or none. `f`
    /// may fail with its caller's own error; the transaction then rolls back.
    pub fn transaction<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let tx = conn.transaction().map_err(StoreError::from)?;
        let t = Tx {
            tx: &tx,
            cipher: &self.cipher,
            consented_kinds: Default::default(),
            consent_changed: Default::default(),
        };
        let out = f(&t)?;
        let consent_changed = t.consent_changed.get();
        tx.commit().map_err(StoreError::from)?;
        if consent_changed {
            // Still under the connection's lock: marks follow commits in order.
            if let Some(mark) = self.consent_mark.get() {
                let raised = last_consent_seq(&conn)
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|seq| mark.raise(seq));
                if let Err(e) = raised {
                    // The change is committed and in force; what is lost is
                    // only the means to notice a restore of an older store.
                    tracing::error!(
                        mark = %mark.path().display(),
                        error = %e,
                        "consent mark not raised"
                    );
                }
            }
        }
        Ok(out)
    }

    /// From now on, every commit that changes a user's preferences raises
    /// `mark` (see [`ConsentMark`]).
    pub fn keep_consent_mark(&self, mark: ConsentMark) {
        let _ = self.consent_mark.set(mark);
    }

    /// The sequence number of the last consent change committed; 0 if none.
    pub fn last_consent_seq(&self) -> Result<u64, StoreError> {
        self.with(|c, _| last_consent_seq(c))
    }

    /// Everything the ACT and the credentials are compiled from.
    pub fn directory(&self) -> Result<(Directory, Vec<Kind>), StoreError> {
        self.with(|c, cipher| {
            let mut kinds = Vec::new();
            let mut st = c.prepare("SELECT doc FROM kinds ORDER BY rowid")?;
            for doc in st.query_map([], |r| r.get::<_, String>(0))? {
                kinds.push(serde_json::from_str(&doc?)?);
            }
            let mut dir = Directory::default();
            let mut st = c.prepare("SELECT doc FROM providers ORDER BY rowid")?;
            for doc in st.query_map([], |r| r.get::<_, String>(0))? {
                dir.providers.push(serde_json::from_str(&doc?)?);
            }
            let mut st = c.prepare("SELECT id, profile FROM users ORDER BY rowid")?;
            let rows = st.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })?;
            for row in rows {
                let (id, sealed) = row?;
                let p: Profile =
                    serde_json::from_slice(&cipher.open(&format!("users.profile.{id}"), &sealed)?)?;
                dir.users.push(User {
                    id,
                    time_zone: p.time_zone,
                    jurisdiction: p.jurisdiction,
                });
            }
            let mut st = c.prepare(
                "SELECT id, user_id, password_hash, cert_sha256 FROM devices ORDER BY rowid",
            )?;
            let rows = st.query_map([], |r| {
                Ok(Device {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    password_hash: r.get(2)?,
                    cert_sha256: r.get(3)?,
                })
            })?;
            for d in rows {
                dir.devices.push(d?);
            }
            let mut st = c.prepare("SELECT user_id, doc FROM preferences ORDER BY rowid")?;
            let rows = st.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })?;
            for row in rows {
                let (user, sealed) = row?;
                dir.preferences.push(serde_json::from_slice(
                    &cipher.open(&format!("preferences.doc.{user}"), &sealed)?,
                )?);
            }
            Ok((dir, kinds))
        })
    }

    pub fn user_auth(&self, user: &str) -> Result<Option<UserAuth>, StoreError> {
        self.with(|c, cipher| {
            let row = c
                .query_row(
                    "SELECT password_hash, totp FROM users WHERE id = ?1",
                    [user],
                    |r| {
                        Ok((
                            r.get::<_, Option<String>>(0)?,
                            r.get::<_, Option<Vec<u8>>>(1)?,
                        ))
                    },
                )
                .optional()?;
            let Some((password_hash, totp)) = row else {
                return Ok(None);
            };
            let totp_secret = match totp {
                Some(sealed) => Some(cipher.open(&format!("users.totp.{user}"), &sealed)?),
                None => None,
            };
            Ok(Some(UserAuth {
                password_hash,
                totp_secret,
            }))
        })
    }

    pub fn preferences(&self, user: &str) -> Result<Preferences, StoreError> {
        self.transaction(|tx| tx.preferences(user))
    }

    /// The users whose latest preferences did not come from `import_source`:
    /// they set them themselves, and a directory import leaves them alone.
    pub fn self_set_users(&self, import_source: &str) -> Result<HashSet<String>, StoreError> {
        self.with(|c, _| {
            let mut st = c.prepare(
                "SELECT user_id FROM consent_history WHERE seq IN \
                 (SELECT MAX(seq) FROM consent_history GROUP BY user_id) AND source <> ?1",
            )?;
            let users = st.query_map([import_source], |r| r.get::<_, String>(0))?;
            Ok(users.collect::<Result<HashSet<_>, _>>()?)
        })
    }

    pub fn history(&self, user: &str) -> Result<Vec<HistoryEntry>, StoreError> {
        self.with(|c, cipher| {
            let mut st = c.prepare(
                "SELECT seq, version, at, source, doc, receipt_jti FROM consent_history WHERE user_id = ?1 ORDER BY seq",
            )?;
            let rows = st.query_map([user], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, version, at, source, sealed, receipt_jti) = row?;
                let doc = cipher.open(&format!("consent_history.doc.{seq}"), &sealed)?;
                out.push(HistoryEntry {
                    version: version as u64,
                    at: parse_time(&at)?,
                    source,
                    preferences: serde_json::from_slice(&doc)?,
                    receipt_jti,
                });
            }
            Ok(out)
        })
    }

    pub fn receipts(&self, user: &str) -> Result<Vec<StoredReceipt>, StoreError> {
        self.with(|c, cipher| {
            let mut st =
                c.prepare("SELECT jti, doc FROM receipts WHERE user_id = ?1 ORDER BY at, rowid")?;
            let rows = st.query_map([user], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (jti, sealed) = row?;
                out.push(serde_json::from_slice(
                    &cipher.open(&format!("receipts.doc.{jti}"), &sealed)?,
                )?);
            }
            Ok(out)
        })
    }

    pub fn receipt(&self, user: &str, jti: &str) -> Result<Option<StoredReceipt>, StoreError> {
        self.with(|c, cipher| {
            let sealed: Option<Vec<u8>> = c
                .query_row(
                    "SELECT doc FROM receipts WHERE user_id = ?1 AND jti = ?2",
                    [user, jti],
                    |r| r.get(0),
                )
                .optional()?;
            match sealed {
                None => Ok(None),
                Some(s) => Ok(Some(serde_json::from_slice(
                    &cipher.open(&format!("receipts.doc.{jti}"), &s)?,
                )?)),
            }
        })
    }

    pub fn create_session(
        &self,
        token_hash: &[u8; 32],
        user: &str,
        expires: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.with(|c, _| {
            c.execute(
                "DELETE FROM sessions WHERE expires_at < ?1",
                [Utc::now().timestamp()],
            )?;
            c.execute(
                "INSERT INTO sessions (token_hash, user_id, expires_at) VALUES (?1, ?2, ?3)",
                params![&token_hash[..], user, expires.timestamp()],
            )?;
            Ok(())
        })
    }

    /// The ids of devices their users registered or removed themselves.
    /// Whether the store has never held a user, a provider or a consent:
    /// a first start, or a store that was lost.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        self.with(|c, _| {
            let held: bool = c.query_row(
                "SELECT EXISTS(SELECT 1 FROM users) OR EXISTS(SELECT 1 FROM providers) \
                 OR EXISTS(SELECT 1 FROM consent_history)",
                [],
                |r| r.get(0),
            )?;
            Ok(!held)
        })
    }

    /// Users whose profile is their own (see `own_profile`).
    pub fn own_profiles(&self) -> Result<HashSet<String>, StoreError> {
        self.with(|c, _| {
            let mut stmt = c.prepare("SELECT user_id FROM own_profile")?;
            let ids = stmt
                .query_map([], |r| r.get(0))?
                .collect::<Result<HashSet<String>, _>>()?;
            Ok(ids)
        })
    }

    pub fn user_managed_devices(&self) -> Result<HashSet<String>, StoreError> {
        self.with(|c, _| {
            let mut stmt = c.prepare("SELECT id FROM user_devices")?;
            let ids = stmt
                .query_map([], |r| r.get(0))?
                .collect::<Result<HashSet<String>, _>>()?;
            Ok(ids)
        })
    }

    /// Forgets every import record, as a store from before they were kept.
    #[cfg(test)]
    pub fn forget_imported_providers(&self) -> Result<(), StoreError> {
        self.with(|c, _| {
            c.execute("DELETE FROM imported_providers", [])?;
            Ok(())
        })
    }

    /// Each provider as the directory file last said it, as JSON.
    pub fn imported_providers(&self) -> Result<HashMap<String, String>, StoreError> {
        self.with(|c, _| {
            let mut stmt = c.prepare("SELECT id, doc FROM imported_providers")?;
            let docs = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<HashMap<String, String>, _>>()?;
            Ok(docs)
        })
    }

    /// Ends one session; whether it was there.
    pub fn delete_session(&self, token_hash: &[u8; 32]) -> Result<bool, StoreError> {
        self.with(|c, _| {
            Ok(c.execute(
                "DELETE FROM sessions WHERE token_hash = ?1",
                [&token_hash[..]],
            )? > 0)
        })
    }

    /// Ends every session of `user` but `keep`; how many ended.
    pub fn delete_sessions(
        &self,
        user: &str,
        keep: Option<&[u8; 32]>,
    ) -> Result<usize, StoreError> {
        self.with(|c, _| {
            Ok(c.execute(
                "DELETE FROM sessions WHERE user_id = ?1 AND token_hash IS NOT ?2",
                params![user, keep.map(|k| &k[..])],
            )?)
        })
    }

    /// Replaces `user`'s password with one they chose: from now on their
    /// login secrets are their own, and a directory import keeps them.
    pub fn set_own_password(&self, user: &str, password_hash: &str) -> Result<(), StoreError> {
        self.transaction(|tx| {
            tx.set_own_login(user, Some(password_hash), None)?;
            tx.account_event(user, AccountEvent::PasswordChanged)
        })
    }

    /// The user a session token is for, while it lasts. A session that
    /// ends more than `ttl_secs` (and a few minutes' slack) from now was
    /// opened by a clock ahead of this one, or this one was set back since:
    /// it is refused, so a wrong clock never makes a session outlive its
    /// time to live.
    pub fn session_user(
        &self,
        token_hash: &[u8; 32],
        ttl_secs: u64,
    ) -> Result<Option<String>, StoreError> {
        const SLACK_SECS: i64 = 300;
        let now = Utc::now().timestamp();
        let latest = now
            .saturating_add(i64::try_from(ttl_secs).unwrap_or(i64::MAX))
            .saturating_add(SLACK_SECS);
        self.with(|c, _| {
            Ok(c.query_row(
                "SELECT user_id FROM sessions
                 WHERE token_hash = ?1 AND expires_at >= ?2 AND expires_at <= ?3",
                params![&token_hash[..], now, latest],
                |r| r.get(0),
            )
            .optional()?)
        })
    }
}

#[cfg(test)]
mod session_clock_tests {
    use super::*;

    /// Found by an outside review: a login while the clock was a month
    /// ahead gave a token that lived for that month once the clock was right.
    #[test]
    fn a_session_never_outlives_its_time_to_live_by_a_wrong_clock() {
        let s = Store::in_memory(&[3; 32]).unwrap();
        let t = |secs| Utc::now() + chrono::Duration::seconds(secs);
        s.create_session(&[1; 32], "alice", t(3600)).unwrap();
        s.create_session(&[2; 32], "alice", t(30 * 24 * 3600))
            .unwrap();
        s.create_session(&[3; 32], "alice", t(-1)).unwrap();
        assert_eq!(
            s.session_user(&[1; 32], 3600).unwrap().as_deref(),
            Some("alice")
        );
        assert_eq!(
            s.session_user(&[2; 32], 3600).unwrap(),
            None,
            "opened by a clock ahead"
        );
        assert_eq!(s.session_user(&[3; 32], 3600).unwrap(), None, "ended");
        // A time to live lowered since: sessions end by the new one.
        assert_eq!(s.session_user(&[1; 32], 600).unwrap(), None);
    }
}

/// A user's complaint about one ledger record (X.1363 9.2.3, redress).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Dispute {
    pub id: i64,
    pub user: String,
    pub ledger_seq: u64,
    pub provider: String,
    pub kind: String,
    /// open, upheld or rejected.
    pub state: String,
    /// UTC as stored; in the user's zone in answers to the user.
    pub created_at: DateTime<FixedOffset>,
    pub resolved_at: Option<DateTime<FixedOffset>>,
    pub reason: String,
    pub resolution: Option<String>,
}

impl Dispute {
    /// The same dispute with its times in `tz`.
    pub fn in_zone<Z: chrono::TimeZone>(self, tz: &Z) -> Dispute {
        let local = |t: DateTime<FixedOffset>| t.with_timezone(tz).fixed_offset();
        Dispute {
            created_at: local(self.created_at),
            resolved_at: self.resolved_at.map(local),
            ..self
        }
    }
}

/// A dispute's sealed part. Which provider got which kind of a user's data
/// is itself what the ledger encrypts, and the record's sequence number
/// would tie the user to its frame, whose blind index finds all their
/// records: all three are sealed here. Rows from before kept them in the
/// clear columns, which now hold "" and 0 (no ledger record has seq 0).
#[derive(Serialize, Deserialize)]
struct DisputeDetail {
    reason: String,
    resolution: Option<String>,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    ledger_seq: Option<u64>,
}

impl Store {
    pub fn add_dispute(
        &self,
        user: &str,
        ledger_seq: u64,
        provider: &str,
        kind: &str,
        reason: &str,
    ) -> Result<Dispute, StoreError> {
        self.with(|c, cipher| {
            let tx = c.transaction()?;
            let id: i64 = tx.query_row(
                "SELECT COALESCE(MAX(id), 0) + 1 FROM disputes",
                [],
                |r| r.get(0),
            )?;
            let now = Utc::now();
            let detail = serde_json::to_vec(&DisputeDetail {
                reason: reason.to_string(),
                resolution: None,
                provider: Some(provider.to_string()),
                kind: Some(kind.to_string()),
                ledger_seq: Some(ledger_seq),
            })?;
            tx.execute(
                "INSERT INTO disputes (id, user_id, ledger_seq, provider, kind, state, created_at, detail) VALUES (?1, ?2, 0, '', '', 'open', ?3, ?4)",
                params![
                    id,
                    user,
                    now.to_rfc3339(),
                    cipher.seal(&format!("disputes.detail.{id}"), &detail)?
                ],
            )?;
            tx.commit()?;
            Ok(Dispute {
                id,
                user: user.into(),
                ledger_seq,
                provider: provider.into(),
                kind: kind.into(),
                state: "open".into(),
                created_at: now.fixed_offset(),
                resolved_at: None,
                reason: reason.into(),
                resolution: None,
            })
        })
    }

    /// Disputes of one user, or all of them (`None`), oldest first.
    pub fn disputes(&self, user: Option<&str>) -> Result<Vec<Dispute>, StoreError> {
        self.with(|c, cipher| {
            let mut st = c.prepare(
                "SELECT id, user_id, ledger_seq, provider, kind, state, created_at, resolved_at, detail FROM disputes
                 WHERE ?1 IS NULL OR user_id = ?1 ORDER BY id",
            )?;
            let rows = st.query_map([user], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, Vec<u8>>(8)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, user, seq, provider, kind, state, created, resolved, sealed) = row?;
                let d: DisputeDetail = serde_json::from_slice(
                    &cipher.open(&format!("disputes.detail.{id}"), &sealed)?,
                )?;
                out.push(Dispute {
                    id,
                    user,
                    ledger_seq: d.ledger_seq.unwrap_or(seq as u64),
                    provider: d.provider.unwrap_or(provider),
                    kind: d.kind.unwrap_or(kind),
                    state,
                    created_at: parse_time(&created)?.fixed_offset(),
                    resolved_at: resolved
                        .as_deref()
                        .map(parse_time)
                        .transpose()?
                        .map(|t| t.fixed_offset()),
                    reason: d.reason,
                    resolution: d.resolution,
                });
            }
            Ok(out)
        })
    }

    pub fn resolve_dispute(
        &self,
        id: i64,
        state: &str,
        resolution: &str,
    ) -> Result<Dispute, StoreError> {
        let current = self
            .disputes(None)?
            .into_iter()
            .find(|d| d.id == id)
            .ok_or(StoreError::NotFound {
                what: "dispute",
                id: id.to_string(),
            })?;
        self.with(|c, cipher| {
            let detail = serde_json::to_vec(&DisputeDetail {
                reason: current.reason.clone(),
                resolution: Some(resolution.to_string()),
                provider: Some(current.provider.clone()),
                kind: Some(current.kind.clone()),
                ledger_seq: Some(current.ledger_seq),
            })?;
            let now = Utc::now();
            // Once: a resolution is the record of redress (X.1363 9.2 3)),
            // and a second one would erase the first without a trace.
            let changed = c.execute(
                "UPDATE disputes SET state = ?2, resolved_at = ?3, detail = ?4 \
                 WHERE id = ?1 AND state = 'open'",
                params![
                    id,
                    state,
                    now.to_rfc3339(),
                    cipher.seal(&format!("disputes.detail.{id}"), &detail)?
                ],
            )?;
            if changed == 0 {
                return Err(StoreError::Exists {
                    what: "resolution of dispute",
                    id: id.to_string(),
                });
            }
            Ok(Dispute {
                state: state.into(),
                resolved_at: Some(now.fixed_offset()),
                resolution: Some(resolution.into()),
                ..current
            })
        })
    }
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Db(rusqlite::Error::InvalidColumnName(e.to_string())))
}

/// Writes inside one transaction.
pub struct Tx<'a> {
    tx: &'a Transaction<'a>,
    cipher: &'a Cipher,
    /// Kinds this transaction noted as consented to already: an import of
    /// many users notes each kind once.
    consented_kinds: std::cell::RefCell<HashSet<String>>,
    /// Whether it changed a user's preferences.
    consent_changed: std::cell::Cell<bool>,
}

impl Tx<'_> {
    /// Replaces whichever of `user`'s login secrets are given and makes them
    /// the user's own (`own_login`): a directory import no longer replaces
    /// them.
    pub(super) fn set_own_login(
        &self,
        user: &str,
        password_hash: Option<&str>,
        totp_secret: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let sealed = totp_secret
            .map(|t| self.cipher.seal(&format!("users.totp.{user}"), t))
            .transpose()?;
        let n = self.tx.execute(
            "UPDATE users SET password_hash = coalesce(?2, password_hash), totp = coalesce(?3, totp)
             WHERE id = ?1",
            params![user, password_hash, sealed],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what: "user",
                id: user.to_string(),
            });
        }
        self.tx.execute(
            "INSERT OR IGNORE INTO own_login (user_id) VALUES (?1)",
            [user],
        )?;
        Ok(())
    }

    /// Makes `user`'s profile their own: a directory import no longer
    /// replaces it.
    pub fn set_own_profile(&self, user: &str) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT OR IGNORE INTO own_profile (user_id) VALUES (?1)",
            [user],
        )?;
        Ok(())
    }

    pub fn put_kind(&self, kind: &Kind) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO kinds (name, doc) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET doc = excluded.doc",
            params![kind.name, serde_json::to_string(kind)?],
        )?;
        Ok(())
    }

    pub fn put_provider(&self, p: &Provider) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO providers (id, doc) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
            params![p.id, serde_json::to_string(p)?],
        )?;
        Ok(())
    }

    /// Remembers `doc` (a provider's JSON) as what the directory file says
    /// of provider `id`.
    pub fn note_imported_provider(&self, id: &str, doc: &str) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO imported_providers (id, doc) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
            params![id, doc],
        )?;
        Ok(())
    }

    /// Creates or updates a user's profile. `auth` replaces the login secrets
    /// when given, except a user's own (see `own_login`) on an update: a
    /// directory import must not give back a password its user replaced.
    /// Creating a user with `auth` makes the secrets their own.
    pub fn put_user(
        &self,
        user: &User,
        auth: Option<(&str, Option<&[u8]>)>,
        create_only: bool,
    ) -> Result<(), StoreError> {
        let exists: bool = self
            .tx
            .query_row("SELECT 1 FROM users WHERE id = ?1", [&user.id], |_| Ok(()))
            .optional()?
            .is_some();
        if exists && create_only {
            return Err(StoreError::Exists {
                what: "user",
                id: user.id.clone(),
            });
        }
        let profile = serde_json::to_vec(&Profile {
            time_zone: user.time_zone.clone(),
            jurisdiction: user.jurisdiction.clone(),
        })?;
        let sealed = self
            .cipher
            .seal(&format!("users.profile.{}", user.id), &profile)?;
        if exists {
            self.tx.execute(
                "UPDATE users SET profile = ?2 WHERE id = ?1",
                params![user.id, sealed],
            )?;
        } else {
            self.tx.execute(
                "INSERT INTO users (id, profile, created_at) VALUES (?1, ?2, ?3)",
                params![user.id, sealed, Utc::now().to_rfc3339()],
            )?;
        }
        let own: bool = self
            .tx
            .query_row(
                "SELECT 1 FROM own_login WHERE user_id = ?1",
                [&user.id],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if let Some((hash, totp)) = auth.filter(|_| !own) {
            if create_only {
                self.tx.execute(
                    "INSERT OR IGNORE INTO own_login (user_id) VALUES (?1)",
                    [&user.id],
                )?;
            }
            if exists && !create_only && self.login_differs(&user.id, hash, totp)? {
                // The operator's file gave this user a new login: like a
                // reset, it ends their sessions, and they can see it. Their
                // recovery codes went with the old login (the file has none
                // to give: the operator's reset hands out new ones).
                self.tx
                    .execute("DELETE FROM sessions WHERE user_id = ?1", [&user.id])?;
                self.tx
                    .execute("DELETE FROM recovery_codes WHERE user_id = ?1", [&user.id])?;
                self.account_event(&user.id, AccountEvent::LoginReplacedFromDirectory)?;
            }
            let totp = match totp {
                Some(secret) => Some(
                    self.cipher
                        .seal(&format!("users.totp.{}", user.id), secret)?,
                ),
                None => None,
            };
            self.tx.execute(
                "UPDATE users SET password_hash = ?2, totp = ?3 WHERE id = ?1",
                params![user.id, hash, totp],
            )?;
        }
        Ok(())
    }

    /// Whether `user` had a login and these differ from it. A first login
    /// replaces nothing: the file's first import inserts the user, then
    /// sets it.
    fn login_differs(
        &self,
        user: &str,
        hash: &str,
        totp: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let (old_hash, old_totp): (Option<String>, Option<Vec<u8>>) = self.tx.query_row(
            "SELECT password_hash, totp FROM users WHERE id = ?1",
            [user],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let old_totp = old_totp
            .map(|sealed| self.cipher.open(&format!("users.totp.{user}"), &sealed))
            .transpose()?;
        Ok(
            old_hash.is_some()
                && (old_hash.as_deref() != Some(hash) || old_totp.as_deref() != totp),
        )
    }

    /// Deletes a device and remembers that its user removed it.
    pub fn remove_device(&self, id: &str, user: &str) -> Result<(), StoreError> {
        self.tx.execute("DELETE FROM devices WHERE id = ?1", [id])?;
        self.tx.execute(
            "INSERT OR REPLACE INTO user_devices (id, user_id, removed_at) VALUES (?1, ?2, ?3)",
            params![id, user, Utc::now().to_rfc3339()],
        )?;
        Ok(())
    }

    /// Creates or updates a device; creating one (API registration) makes
    /// it one its user manages.
    pub fn put_device(&self, d: &Device, create_only: bool) -> Result<(), StoreError> {
        if create_only {
            self.tx.execute(
                "INSERT OR REPLACE INTO user_devices (id, user_id, removed_at) VALUES (?1, ?2, NULL)",
                params![d.id, d.user],
            )?;
        }
        let sql = if create_only {
            "INSERT INTO devices (id, user_id, password_hash, cert_sha256, created_at) VALUES (?1, ?2, ?3, ?4, ?5)"
        } else {
            "INSERT INTO devices (id, user_id, password_hash, cert_sha256, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(id) DO UPDATE SET user_id = excluded.user_id, password_hash = excluded.password_hash, cert_sha256 = excluded.cert_sha256"
        };
        match self.tx.execute(
            sql,
            params![
                d.id,
                d.user,
                d.password_hash,
                d.cert_sha256,
                Utc::now().to_rfc3339()
            ],
        ) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Exists {
                    what: "device",
                    id: d.id.clone(),
                })
            }
            r => r.map(|_| ()).map_err(Into::into),
        }
    }

    pub fn preferences(&self, user: &str) -> Result<Preferences, StoreError> {
        let row: Option<Vec<u8>> = self
            .tx
            .query_row(
                "SELECT doc FROM preferences WHERE user_id = ?1",
                [user],
                |r| r.get(0),
            )
            .optional()?;
        match row {
            Some(sealed) => Ok(serde_json::from_slice(
                &self
                    .cipher
                    .open(&format!("preferences.doc.{user}"), &sealed)?,
            )?),
            None => Ok(Preferences {
                user: user.to_string(),
                ..Default::default()
            }),
        }
    }

    /// Stores `prefs` as the user's new document if the stored version is
    /// `expected` (when given), appends it to the history, and returns the
    /// new version.
    pub fn replace_preferences(
        &self,
        mut prefs: Preferences,
        expected: Option<u64>,
        source: &str,
        receipt: Option<&StoredReceipt>,
    ) -> Result<Preferences, StoreError> {
        let current = self.preferences(&prefs.user)?.version;
        if let Some(expected) = expected {
            if expected != current {
                return Err(StoreError::Conflict { current, expected });
            }
        }
        prefs.version = current + 1;
        self.note_consented_kinds(&prefs)?;
        let user = prefs.user.clone();
        let doc = serde_json::to_vec(&prefs)?;
        self.tx.execute(
            "INSERT INTO preferences (user_id, version, doc) VALUES (?1, ?2, ?3)
             ON CONFLICT(user_id) DO UPDATE SET version = excluded.version, doc = excluded.doc",
            params![
                user,
                prefs.version as i64,
                self.cipher.seal(&format!("preferences.doc.{user}"), &doc)?
            ],
        )?;
        let seq: i64 = self.tx.query_row(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM consent_history",
            [],
            |r| r.get(0),
        )?;
        self.consent_changed.set(true);
        self.tx.execute(
            "INSERT INTO consent_history (seq, user_id, version, at, source, doc, receipt_jti) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                seq,
                user,
                prefs.version as i64,
                Utc::now().to_rfc3339(),
                source,
                self.cipher.seal(&format!("consent_history.doc.{seq}"), &doc)?,
                receipt.map(|r| r.jti.clone()),
            ],
        )?;
        if let Some(r) = receipt {
            self.tx.execute(
                "INSERT INTO receipts (jti, user_id, version, at, doc) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    r.jti,
                    user,
                    prefs.version as i64,
                    r.at.to_rfc3339(),
                    self.cipher
                        .seal(&format!("receipts.doc.{}", r.jti), &serde_json::to_vec(r)?)?
                ],
            )?;
        }
        Ok(prefs)
    }

    pub fn user_exists(&self, user: &str) -> Result<bool, StoreError> {
        Ok(self
            .tx
            .query_row("SELECT 1 FROM users WHERE id = ?1", [user], |_| Ok(()))
            .optional()?
            .is_some())
    }
}

fn last_consent_seq(c: &Connection) -> Result<u64, StoreError> {
    let seq: i64 = c.query_row(
        "SELECT COALESCE(MAX(seq), 0) FROM consent_history",
        [],
        |r| r.get(0),
    )?;
    Ok(seq as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> User {
        User {
            id: id.into(),
            time_zone: "Europe/Paris".into(),
            jurisdiction: Some("FR".into()),
        }
    }

    #[test]
    fn versions_history_and_conflicts() {
        let s = Store::in_memory(&[1; 32]).unwrap();
        s.transaction(|tx| tx.put_user(&user("alice"), Some(("h", Some(b"totp"))), true))
            .unwrap();
        let p = |n: usize| Preferences {
            user: "alice".into(),
            version: 0,
            collect: (0..n)
                .map(|i| crate::model::CollectGrant {
                    kind: format!("k{i}"),
                    windows: vec![],
                })
                .collect(),
            share: vec![],
            receipt: None,
        };
        let v1 = s
            .transaction(|tx| tx.replace_preferences(p(1), Some(0), "api", None))
            .unwrap();
        assert_eq!(v1.version, 1);
        let stale = s.transaction(|tx| tx.replace_preferences(p(2), Some(0), "api", None));
        assert!(matches!(
            stale,
            Err(StoreError::Conflict {
                current: 1,
                expected: 0
            })
        ));
        s.transaction(|tx| tx.replace_preferences(p(2), Some(1), "api", None))
            .unwrap();
        let h = s.history("alice").unwrap();
        assert_eq!(h.iter().map(|e| e.version).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(h[0].preferences.collect.len(), 1);
        assert_eq!(s.preferences("alice").unwrap().collect.len(), 2);
        let auth = s.user_auth("alice").unwrap().unwrap();
        assert_eq!(auth.totp_secret.as_deref(), Some(&b"totp"[..]));
        assert!(matches!(
            s.transaction(|tx| tx.put_user(&user("alice"), None, true)),
            Err(StoreError::Exists { .. })
        ));
    }

    /// Only a commit that changed preferences raises the mark, to the
    /// store's last consent change; a rolled-back one does not.
    #[test]
    fn consent_changes_raise_the_mark_after_their_commit() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::in_memory(&[1; 32]).unwrap();
        let (mark, _) = ConsentMark::open(dir.path()).unwrap();
        s.keep_consent_mark(mark);
        let marked = || ConsentMark::open(dir.path()).unwrap().1;
        s.transaction(|tx| tx.put_user(&user("alice"), None, true))
            .unwrap();
        assert_eq!(marked(), None);
        let p = |version| Preferences {
            user: "alice".into(),
            version,
            collect: vec![],
            share: vec![],
            receipt: None,
        };
        s.transaction(|tx| tx.replace_preferences(p(0), Some(0), "api", None))
            .unwrap();
        assert_eq!(marked(), Some(1));
        let failed: Result<(), StoreError> = s.transaction(|tx| {
            tx.replace_preferences(p(1), Some(1), "api", None)?;
            Err(StoreError::Conflict {
                current: 0,
                expected: 0,
            })
        });
        assert!(failed.is_err());
        assert_eq!(marked(), Some(1));
        assert_eq!(s.last_consent_seq().unwrap(), 1);
        s.transaction(|tx| tx.replace_preferences(p(1), Some(1), "api", None))
            .unwrap();
        assert_eq!((marked(), s.last_consent_seq().unwrap()), (Some(2), 2));
    }

    #[test]
    fn pii_is_not_in_the_file_in_clear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        {
            let s = Store::open(&path, &[2; 32]).unwrap();
            s.transaction(|tx| {
                tx.put_user(&user("alice"), Some(("h", Some(b"JBSWY3DPEHPK3PXP"))), true)?;
                tx.replace_preferences(
                    Preferences {
                        user: "alice".into(),
                        version: 0,
                        collect: vec![crate::model::CollectGrant {
                            kind: "heart_rate".into(),
                            windows: vec![],
                        }],
                        share: vec![],
                        receipt: None,
                    },
                    None,
                    "api",
                    None,
                )
            })
            .unwrap();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        for f in ["store.db-wal"] {
            if let Ok(b) = std::fs::read(dir.path().join(f)) {
                bytes.extend(b);
            }
        }
        for needle in [&b"Europe/Paris"[..], b"heart_rate", b"JBSWY3DPEHPK3PXP"] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        }
        // And it all reads back with the key.
        let s = Store::open(&path, &[2; 32]).unwrap();
        let (dir, _) = s.directory().unwrap();
        assert_eq!(dir.users[0].time_zone, "Europe/Paris");
        assert_eq!(dir.preferences[0].collect[0].kind, "heart_rate");
        assert!(Store::open(&path, &[3; 32]).unwrap().directory().is_err());
    }

    /// A reload that replaces a user's login takes their sessions and
    /// recovery codes with the old one, and says so; a first login, or the
    /// same one again, does neither.
    #[test]
    fn a_login_the_file_replaces_takes_sessions_and_recovery_codes() {
        let s = Store::in_memory(&[4; 32]).unwrap();
        let import = |hash: &str| {
            s.transaction(|tx| {
                tx.put_user(&user("alice"), None, false)?;
                tx.put_user(&user("alice"), Some((hash, Some(b"totp"))), false)
            })
            .unwrap()
        };
        import("h1");
        s.replace_recovery_codes("alice", &[[1; 32]], false)
            .unwrap();
        let soon = Utc::now() + chrono::Duration::hours(1);
        s.create_session(&[9; 32], "alice", soon).unwrap();
        import("h1");
        assert_eq!(s.recovery_codes_left("alice").unwrap(), 1);
        assert_eq!(
            s.session_user(&[9; 32], 3600).unwrap().as_deref(),
            Some("alice")
        );
        import("h2");
        assert_eq!(s.recovery_codes_left("alice").unwrap(), 0);
        assert_eq!(s.session_user(&[9; 32], 3600).unwrap(), None);
        let events = s.account_event_names("alice");
        assert_eq!(
            events,
            [
                AccountEvent::RecoveryCodesReplaced,
                AccountEvent::LoginReplacedFromDirectory
            ]
        );
    }

    /// Reads a store file and its WAL, as someone with the disk would.
    fn file_bytes(dir: &Path) -> Vec<u8> {
        ["store.db", "store.db-wal"]
            .iter()
            .filter_map(|f| std::fs::read(dir.join(f)).ok())
            .flatten()
            .collect()
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    /// Who got which kind of whose data is what the ledger hides; a
    /// dispute of a share must not give it away in clear columns, and
    /// disputes written before keep working once their columns are sealed.
    #[test]
    fn disputes_seal_the_provider_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        {
            let s = Store::open(&path, &[2; 32]).unwrap();
            s.add_dispute("alice", 7, "fitcoach", "heart_rate", "not me")
                .unwrap();
            // A dispute as the store wrote them before: parties in clear.
            s.with(|c, cipher| {
                let detail = br#"{"reason":"old","resolution":null}"#;
                c.execute(
                    "INSERT INTO disputes (id, user_id, ledger_seq, provider, kind, state, created_at, detail) \
                     VALUES (2, 'alice', 8, 'insureco', 'location', 'open', ?1, ?2)",
                    params![
                        Utc::now().to_rfc3339(),
                        cipher.seal("disputes.detail.2", detail)?
                    ],
                )?;
                Ok(())
            })
            .unwrap();
        }
        assert!(contains(&file_bytes(dir.path()), "insureco"));
        let s = Store::open(&path, &[2; 32]).unwrap();
        let bytes = file_bytes(dir.path());
        for needle in ["fitcoach", "heart_rate", "insureco", "location"] {
            assert!(!contains(&bytes, needle), "{needle} in clear");
        }
        let parties = |s: &Store| {
            s.disputes(Some("alice"))
                .unwrap()
                .into_iter()
                .map(|d| (d.id, d.ledger_seq, d.provider, d.kind, d.reason))
                .collect::<Vec<_>>()
        };
        let want = vec![
            (
                1,
                7,
                "fitcoach".into(),
                "heart_rate".into(),
                "not me".into(),
            ),
            (2, 8, "insureco".into(), "location".into(), "old".into()),
        ];
        let clear_seqs: Vec<i64> = s
            .with(|c, _| {
                Ok(c.prepare("SELECT ledger_seq FROM disputes ORDER BY id")?
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<_, _>>()?)
            })
            .unwrap();
        assert_eq!(clear_seqs, [0, 0], "a record's seq in clear");
        assert_eq!(parties(&s), want);
        let resolved = s.resolve_dispute(2, "upheld", "sorry").unwrap();
        assert_eq!(
            (resolved.provider.as_str(), resolved.kind.as_str()),
            ("insureco", "location")
        );
        assert_eq!(parties(&s), want, "a resolution keeps the parties");
    }

    /// A store file whose header was damaged failed to open with only "open the store …
    /// (is its disk full or read-only?): database: file is not a database".
    #[test]
    fn a_file_that_is_not_a_store_is_named_and_called_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("consentry.db");
        std::fs::write(&path, [0x5a; 8192]).unwrap();
        let Err(err) = Store::open(&path, &[1; 32]) else {
            panic!("opened a file that is not a database");
        };
        let msg = err.to_string();
        for part in [
            &path.display().to_string(),
            "corrupt",
            "not a consentry store",
        ] {
            assert!(msg.contains(part), "{part:?} not in {msg}");
        }
    }

    /// A value altered on disk said only "decryption failed (wrong key or altered data)",
    /// naming no file, table or row.
    #[test]
    fn a_value_that_does_not_decrypt_names_its_file_and_table_not_its_user() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("consentry.db");
        let s = Store::open(&path, &[1; 32]).unwrap();
        s.transaction(|tx| tx.put_user(&user("alice"), None, true))
            .unwrap();
        s.directory().expect("intact");
        let raw = Connection::open(&path).unwrap();
        let mut sealed: Vec<u8> = raw
            .query_row("SELECT profile FROM users WHERE id = 'alice'", [], |r| {
                r.get(0)
            })
            .unwrap();
        *sealed.last_mut().unwrap() ^= 1;
        raw.execute(
            "UPDATE users SET profile = ?1 WHERE id = 'alice'",
            params![sealed],
        )
        .unwrap();
        let msg = s.directory().expect_err("altered").to_string();
        for part in [
            &path.display().to_string(),
            "column profile of table users, in one user's row",
            "master.key",
        ] {
            assert!(msg.contains(part), "{part:?} not in {msg}");
        }
        assert!(!msg.contains("alice"), "logs carry no user ids: {msg}");
    }
}

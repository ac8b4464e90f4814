//! The kinds any user has ever consented to collect or share. Data of such a
//! kind may still be held (retained messages, sessions' queues, an external
//! broker's store), minimized as the kind was defined when it was collected,
//! and deliveries do not minimize it again: a definition that drops a field
//! would let those messages carry it to providers that consented to the
//! narrower kind. So a kind named here is never narrowed (`prefs`). Names are
//! kept as keyed digests: which kinds were consented to is no one's to read
//! from the file.

use std::collections::HashSet;

use rusqlite::params;

use super::{Store, StoreError, Tx};
use crate::model::Preferences;

/// Run at every open; a database made before this table gains it, and is
/// filled from the consent history once (`backfill`).
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS consented_kinds (blind BLOB PRIMARY KEY);
CREATE TABLE IF NOT EXISTS consented_kinds_filled (done INTEGER NOT NULL);
";

const PLACE: &str = "consented_kinds";

fn kinds(p: &Preferences) -> impl Iterator<Item = &str> {
    p.collect
        .iter()
        .map(|g| g.kind.as_str())
        .chain(p.share.iter().map(|g| g.kind.as_str()))
}

impl Tx<'_> {
    pub(super) fn note_consented_kinds(&self, p: &Preferences) -> Result<(), StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached("INSERT OR IGNORE INTO consented_kinds (blind) VALUES (?1)")?;
        let mut noted = self.consented_kinds.borrow_mut();
        for k in kinds(p) {
            if !noted.contains(k) {
                stmt.execute([&self.cipher.blind(PLACE, k.as_bytes())[..]])?;
                noted.insert(k.to_owned());
            }
        }
        Ok(())
    }
}

impl Store {
    /// Fills the table from the consent history of a store made before it.
    pub(super) fn backfill_consented_kinds(&self) -> Result<(), StoreError> {
        self.with(|c, cipher| {
            let tx = c.transaction()?;
            let done: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM consented_kinds_filled)",
                [],
                |r| r.get(0),
            )?;
            if done {
                return Ok(());
            }
            let mut names = HashSet::new();
            {
                let mut st = tx.prepare("SELECT seq, doc FROM consent_history")?;
                let rows =
                    st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
                for row in rows {
                    let (seq, sealed) = row?;
                    let doc = cipher.open(&format!("consent_history.doc.{seq}"), &sealed)?;
                    let p: Preferences = serde_json::from_slice(&doc)?;
                    names.extend(kinds(&p).map(str::to_owned));
                }
            }
            for n in &names {
                tx.execute(
                    "INSERT OR IGNORE INTO consented_kinds (blind) VALUES (?1)",
                    params![&cipher.blind(PLACE, n.as_bytes())[..]],
                )?;
            }
            tx.execute("INSERT INTO consented_kinds_filled (done) VALUES (1)", [])?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Whether any user has ever consented to collect or share `kind`.
    pub fn kind_consented(&self, kind: &str) -> Result<bool, StoreError> {
        self.with(|c, cipher| {
            Ok(c.query_row(
                "SELECT EXISTS(SELECT 1 FROM consented_kinds WHERE blind = ?1)",
                [&cipher.blind(PLACE, kind.as_bytes())[..]],
                |r| r.get(0),
            )?)
        })
    }
}

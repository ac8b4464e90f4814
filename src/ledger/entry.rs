//! The plaintext data types the ledger stores. They are serialised (share records in the compact
//! encoding of `codec`, the rest as JSON) and encrypted as a whole; only the blind index, the time and chain fields live in the clear header.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One delivery of a user's personal data to an application service provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareRecord {
    pub time: DateTime<Utc>,
    /// The data service provider (operator name). Filled from [`super::LedgerConfig::creator`]
    /// when left empty.
    pub creator: String,
    /// Application provider id, e.g. "fitcoach".
    pub recipient: String,
    /// PII principal id. Only ever stored encrypted; look-ups use the blind index.
    pub user: String,
    /// Device id. Only ever stored encrypted.
    pub device: String,
    pub kind: String,
    pub pii_category: String,
    pub purpose: String,
    pub action: ShareAction,
    #[serde(with = "hex32")]
    pub payload_digest: [u8; 32],
    pub qos: u8,
    pub receipt_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t")]
pub enum ShareAction {
    Delivered,
    Masked { fields: Vec<MaskedField> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedField {
    pub field: String,
    pub method: String,
}

impl ShareRecord {
    /// The record as [`super::Ledger::submit_ref`] takes it.
    pub fn as_ref(&self) -> ShareRef<'_> {
        ShareRef {
            time: self.time,
            creator: &self.creator,
            recipient: &self.recipient,
            user: &self.user,
            device: &self.device,
            kind: &self.kind,
            pii_category: &self.pii_category,
            purpose: &self.purpose,
            masked: match &self.action {
                ShareAction::Delivered => None,
                ShareAction::Masked { fields } => Some(fields),
            },
            payload_digest: self.payload_digest,
            qos: self.qos,
            receipt_id: self.receipt_id.as_deref(),
        }
    }
}

/// A [`ShareRecord`] that borrows its strings. A delivery logs one of these
/// straight into the record's encoding; building the owned record first cost
/// ten allocations per delivery (fifteenth session's profile of a flood).
#[derive(Clone, Copy)]
pub struct ShareRef<'a> {
    pub time: DateTime<Utc>,
    /// Filled from [`super::LedgerConfig::creator`] when empty.
    pub creator: &'a str,
    pub recipient: &'a str,
    pub user: &'a str,
    pub device: &'a str,
    pub kind: &'a str,
    pub pii_category: &'a str,
    pub purpose: &'a str,
    /// `None`: delivered as published.
    pub masked: Option<&'a dyn MaskedFields>,
    pub payload_digest: [u8; 32],
    pub qos: u8,
    pub receipt_id: Option<&'a str>,
}

/// The (field, method) pairs of a masked delivery, in whatever shape the
/// caller holds them.
pub trait MaskedFields {
    fn count(&self) -> usize;
    fn each(&self, f: &mut dyn FnMut(&str, &str));
}

impl MaskedFields for Vec<MaskedField> {
    fn count(&self) -> usize {
        self.len()
    }
    fn each(&self, f: &mut dyn FnMut(&str, &str)) {
        for m in self {
            f(&m.field, &m.method);
        }
    }
}

/// Deliveries that were refused, counted per user, recipient, kind, reason and hour rather than
/// logged one by one. Several entries may exist for the same key and hour (one per flush):
/// their counts add up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedCount {
    pub user: String,
    pub recipient: String,
    pub kind: String,
    pub reason: String,
    pub hour_start: DateTime<Utc>,
    pub count: u64,
}

/// X.1363 9.1.3: an extract of a user's PII by anyone other than the user is logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtractRecord {
    pub actor: String,
    pub user: String,
    pub what: String,
    pub purpose: String,
    pub time: DateTime<Utc>,
}

/// What a reader gets back from the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Share(ShareRecord),
    Blocked(BlockedCount),
    Extract(ExtractRecord),
}

impl Entry {
    pub fn time(&self) -> DateTime<Utc> {
        match self {
            Entry::Share(r) => r.time,
            Entry::Blocked(b) => b.hour_start,
            Entry::Extract(e) => e.time,
        }
    }

    pub fn user(&self) -> &str {
        match self {
            Entry::Share(r) => &r.user,
            Entry::Blocked(b) => &b.user,
            Entry::Extract(e) => &e.user,
        }
    }

    /// Recipient for shares and blocked counts; the actor for extracts.
    pub fn recipient(&self) -> &str {
        match self {
            Entry::Share(r) => &r.recipient,
            Entry::Blocked(b) => &b.recipient,
            Entry::Extract(e) => &e.actor,
        }
    }

    /// Data kind for shares and blocked counts; the extracted item for extracts.
    pub fn kind(&self) -> &str {
        match self {
            Entry::Share(r) => &r.kind,
            Entry::Blocked(b) => &b.kind,
            Entry::Extract(e) => &e.what,
        }
    }

    pub(crate) const SHARE: u8 = 1;
    pub(crate) const BLOCKED: u8 = 2;

    pub(crate) fn type_byte(&self) -> u8 {
        match self {
            Entry::Share(_) => Self::SHARE,
            Entry::Blocked(_) => Self::BLOCKED,
            Entry::Extract(_) => 3,
        }
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        match self {
            Entry::Share(r) => {
                let mut out = Vec::new();
                super::codec::encode_share(&r.as_ref(), &mut out);
                Ok(out)
            }
            Entry::Blocked(b) => serde_json::to_vec(b),
            Entry::Extract(e) => serde_json::to_vec(e),
        }
    }

    pub(crate) fn decode(type_byte: u8, plaintext: &[u8]) -> Option<Entry> {
        match type_byte {
            1 => super::codec::decode_share(plaintext).map(Entry::Share),
            2 => serde_json::from_slice(plaintext).ok().map(Entry::Blocked),
            3 => serde_json::from_slice(plaintext).ok().map(Entry::Extract),
            _ => None,
        }
    }
}

mod hex32 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 64];
        // Cannot fail: the output buffer is exactly twice the input length.
        hex::encode_to_slice(v, &mut buf).map_err(serde::ser::Error::custom)?;
        s.serialize_str(std::str::from_utf8(&buf).map_err(serde::ser::Error::custom)?)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = <&str>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(D::Error::custom)?;
        Ok(out)
    }
}

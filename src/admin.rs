//! Operator commands on a stopped consentry's data: verify and read the
//! share ledger, rotate its keys. Each takes the ledger directory's lock, so
//! none of them runs beside a live server.

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::config::Config;
use crate::ledger::{self, Entry, ExtractRecord, Keyring, Ledger, ReadFilter};
use crate::server::{data_dir, ledger_config, ledger_paths};

/// Walks the chain and the checkpoints. `Err` names the first bad record.
pub fn verify(cfg: &Config) -> anyhow::Result<String> {
    let (dir, keys) = existing_ledger(cfg)?;
    let _lock = ledger::lock_dir(&dir)?;
    let r = ledger::verify_dir(&dir, &keys)?;
    let records = match r.first_seq {
        Some(first) => format!("{} records (seq {first}..={})", r.records, r.head_seq),
        None => format!("{} records", r.records),
    };
    let mut report = format!(
        "ledger OK: {records}, {} signed checkpoints, head {} at seq {}{}",
        r.checkpoints,
        hex::encode(r.head),
        r.head_seq,
        r.anchor_seq
            .map(|a| format!(", records up to seq {a} purged by retention"))
            .unwrap_or_default()
    );
    if r.unsigned_tail > 0 {
        report.push_str(&format!(
            "\nWARNING: the last {} records (after seq {}) are not signed by a checkpoint, so \
             records cut from the end would not show. Expected only after a crash: consentry \
             signs them at its next start.",
            r.unsigned_tail,
            r.head_seq - r.unsigned_tail
        ));
    }
    Ok(report)
}

/// The ledger directory and its keys, both required to exist: these commands read a ledger,
/// and creating either would only hide a wrong `--data-dir`.
fn existing_ledger(cfg: &Config) -> anyhow::Result<(std::path::PathBuf, Keyring)> {
    let (dir, keys) = ledger_paths(cfg);
    if !dir.is_dir() {
        anyhow::bail!(
            "no share ledger at {} (is the data directory right?)",
            dir.display()
        );
    }
    let keys = match Keyring::from_env()? {
        Some(k) => k,
        None => Keyring::load(&keys)?,
    };
    Ok((dir, keys))
}

pub struct ShowArgs {
    pub user: String,
    pub provider: Option<String>,
    pub kind: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub actor: String,
    pub purpose: String,
}

/// Reads one user's history. Reading is an extract of that user's PII by
/// the operator (X.1363 9.1.3), so it is recorded, durably, before anything
/// is shown.
pub async fn show(cfg: &Config, args: ShowArgs) -> anyhow::Result<Vec<Value>> {
    let (_, keys) = existing_ledger(cfg)?;
    let ledger = Ledger::open(ledger_config(cfg), keys)?;
    // A mistyped name would otherwise read as an empty history, and leave
    // an extract record of a user who does not exist.
    if !user_in_store(cfg, &args.user)? {
        ledger.shutdown().await;
        anyhow::bail!(
            "no user {:?} in the store; nothing was read or recorded",
            args.user
        );
    }
    let filter = ReadFilter {
        from: args.from,
        to: args.to,
        recipient: args.provider.clone(),
        kind: args.kind.clone(),
        after_seq: None,
        limit: 0,
    };
    let what = format!(
        "share history{}{}",
        args.provider
            .as_ref()
            .map(|p| format!(", provider {p}"))
            .unwrap_or_default(),
        args.kind
            .as_ref()
            .map(|k| format!(", kind {k}"))
            .unwrap_or_default()
    );
    let extract = ledger.record_extract(ExtractRecord {
        actor: args.actor,
        user: args.user.clone(),
        what,
        purpose: args.purpose,
        time: Utc::now(),
    })?;
    extract.await.context("record the extract")?;
    let entries = ledger.read_user(&args.user, &filter);
    ledger.shutdown().await;
    Ok(entries?
        .into_iter()
        .map(|(seq, e)| entry_json(seq, &e))
        .collect())
}

/// Whether the store knows `user`. The store must exist: opening a missing
/// one would create it empty.
fn user_in_store(cfg: &Config, user: &str) -> anyhow::Result<bool> {
    let path = data_dir(cfg)?.join(crate::server::STORE_FILE);
    if !path.is_file() {
        anyhow::bail!(
            "no store at {} (is the data directory right?)",
            path.display()
        );
    }
    let store = crate::server::open_store(cfg)?;
    Ok(store.transaction(|tx| tx.user_exists(user))?)
}

/// One entry as `ledger show` prints it: the field names of the HTTP API's
/// history (`provider` for the record's recipient), times in UTC, and the
/// user, whom the operator's reader does not otherwise see.
pub fn entry_json(seq: u64, e: &Entry) -> Value {
    match e {
        Entry::Share(r) => json!({
            "seq": seq,
            "type": "share",
            "time": r.time,
            "creator": r.creator,
            "provider": r.recipient,
            "user": r.user,
            "device": r.device,
            "kind": r.kind,
            "pii_category": r.pii_category,
            "purpose": r.purpose,
            "action": r.action,
            "payload_sha256": hex::encode(r.payload_digest),
            "qos": r.qos,
            "receipt_id": r.receipt_id,
        }),
        Entry::Blocked(b) => json!({
            "seq": seq,
            "type": "blocked",
            "time": b.hour_start,
            "user": b.user,
            "provider": b.recipient,
            "kind": b.kind,
            "reason": b.reason,
            "hour_start": b.hour_start,
            "count": b.count,
        }),
        Entry::Extract(x) => json!({
            "seq": seq,
            "type": "extract",
            "time": x.time,
            "actor": x.actor,
            "user": x.user,
            "what": x.what,
            "purpose": x.purpose,
        }),
    }
}

/// Adds a data key and makes it active; old records stay readable.
pub fn rotate_keys(cfg: &Config) -> anyhow::Result<String> {
    if std::env::var_os(ledger::KEYS_ENV).is_some() {
        anyhow::bail!(
            "keys come from {}; rotate them where that document is kept",
            ledger::KEYS_ENV
        );
    }
    data_dir(cfg)?;
    let (dir, path) = ledger_paths(cfg);
    let _lock = ledger::lock_dir(&dir)?;
    if !path.exists() {
        Keyring::load_or_create(&path)?;
    }
    let id = Keyring::rotate(&path)?;
    Ok(format!("new active data key {}", id.0))
}

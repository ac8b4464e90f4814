//! Per-user reads through the blind index: headers are matched without decrypting, and only the
//! user's own records are decrypted.

use std::path::Path;

use super::entry::Entry;
use super::error::{LedgerError, TamperKind};
use super::keys::Keyring;
use super::record::{next_frame, Next};
use super::segment::{list_segments, read_opt};
use super::ReadFilter;

const HOUR_US: i64 = 3_600_000_000;

pub(crate) fn read_user(
    dir: &Path,
    keys: &Keyring,
    durable_seq: u64,
    user: &str,
    filter: &ReadFilter,
) -> Result<Vec<(u64, Entry)>, LedgerError> {
    let blind = keys.blind_index(user);
    let from_us = filter.from.map(|t| t.timestamp_micros());
    let to_us = filter.to.map(|t| t.timestamp_micros());
    let after = filter.after_seq.unwrap_or(0);
    let limit = if filter.limit == 0 {
        usize::MAX
    } else {
        filter.limit
    };
    let mut out = Vec::new();
    let segs = list_segments(dir)?;
    for (i, (first, path)) in segs.iter().enumerate() {
        if *first > durable_seq {
            break;
        }
        // Skip whole segments that end at or before `after_seq`.
        if segs.get(i + 1).is_some_and(|(next, _)| *next <= after + 1) {
            continue;
        }
        let Some(data) = read_opt(path)? else {
            continue;
        };
        let mut off = 0;
        // Stops at a torn or damaged frame: that is verify_dir's business, not a reader's.
        while let Next::Frame(f) = next_frame(&data, off) {
            off = f.end;
            let h = &f.header;
            if h.seq > durable_seq {
                return Ok(out);
            }
            // A header's time is never before the record's own (the writer may raise it past a
            // clock that went back), so it can rule a record out of `from` but not of `to`. A
            // count of refused deliveries covers its whole hour.
            let span = if h.entry_type == Entry::BLOCKED {
                HOUR_US
            } else {
                1
            };
            if h.blind != blind
                || h.seq <= after
                || from_us.is_some_and(|t| h.time_us.saturating_add(span) <= t)
            {
                continue;
            }
            let pt = f.decrypt(keys).map_err(|e| match e {
                LedgerError::Crypto => {
                    LedgerError::tampered(h.seq, TamperKind::Modified, "AEAD tag does not verify")
                }
                other => other,
            })?;
            let entry = Entry::decode(h.entry_type, &pt).ok_or_else(|| {
                LedgerError::tampered(h.seq, TamperKind::Modified, "plaintext does not decode")
            })?;
            // Ranges go by the time the history shows, the record's own.
            let at = entry.time().timestamp_micros();
            if entry.user() != user
                || from_us.is_some_and(|t| at.saturating_add(span) <= t)
                || to_us.is_some_and(|t| at >= t)
                || filter
                    .recipient
                    .as_deref()
                    .is_some_and(|r| entry.recipient() != r)
                || filter.kind.as_deref().is_some_and(|k| entry.kind() != k)
            {
                continue;
            }
            out.push((h.seq, entry));
            if out.len() >= limit {
                return Ok(out);
            }
        }
    }
    Ok(out)
}

//! Crash recovery at open: find the valid prefix of the newest segment and cut a torn tail.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::checkpoint::Loaded;
use super::error::{LedgerError, TamperKind};
use super::keys::Keyring;
use super::record::{next_frame, Next};
use super::segment::{fsync_dir, list_segments, read_opt};

pub(crate) struct Recovered {
    pub next_seq: u64,
    pub head: [u8; 32],
    /// The newest segment (first seq, path, size after recovery), if any exists.
    pub active: Option<(u64, PathBuf, u64)>,
    /// Highest boot counter seen in a nonce on disk: a lost state file must not reset it.
    pub max_boot: u32,
    /// The newest record time in the active segment (µs), for retention once it is closed.
    pub newest_us: i64,
    /// The oldest record time in the active segment (µs): it is closed once that is
    /// [`super::writer::SEGMENT_MAX_AGE`] old, so retention can reach it.
    pub oldest_us: i64,
}

pub(crate) fn recover(dir: &Path, keys: &Keyring, cps: &Loaded) -> Result<Recovered, LedgerError> {
    let last_cp = cps.lines.iter().flatten().max_by_key(|c| c.seq);
    // A different signing key means a different keyring: recovering with it would mistake every
    // record after the last checkpoint for damage.
    if let Some(cp) = last_cp {
        if !cp.verify(&keys.verifying_key()) {
            return Err(LedgerError::KeyFile(
                "keyring does not match this ledger (latest checkpoint signature fails)".into(),
            ));
        }
    }
    let covered = last_cp.map_or(0, |c| c.seq);
    let segs = list_segments(dir)?;
    let Some((first, path)) = segs.last().cloned() else {
        if covered > 0 {
            return Err(LedgerError::tampered(
                1,
                TamperKind::Truncated,
                format!("no segment files, but a checkpoint covers seq {covered}"),
            ));
        }
        return Ok(Recovered {
            next_seq: 1,
            head: [0; 32],
            active: None,
            max_boot: 0,
            newest_us: i64::MIN,
            oldest_us: i64::MAX,
        });
    };

    let data = read_opt(&path)?.unwrap_or_default();
    let mut off = 0usize;
    let mut expected = first;
    let mut prev: Option<[u8; 32]> = None;
    let mut max_boot = 0u32;
    let mut bad_at: Option<usize> = None;
    let mut newest_us = i64::MIN;
    let mut oldest_us = i64::MAX;
    loop {
        match next_frame(&data, off) {
            Next::End => break,
            Next::Torn | Next::Bad => {
                bad_at = Some(off);
                break;
            }
            Next::Frame(f) => {
                let chained = prev.is_none_or(|p| p == f.header.prev);
                if f.header.seq != expected || !chained {
                    bad_at = Some(off);
                    break;
                }
                match f.decrypt(keys) {
                    Ok(_) => {}
                    Err(LedgerError::Crypto) => {
                        bad_at = Some(off);
                        break;
                    }
                    Err(e) => return Err(e),
                }
                max_boot = max_boot.max(f.header.boot());
                newest_us = newest_us.max(f.header.time_us);
                oldest_us = oldest_us.min(f.header.time_us);
                prev = Some(f.hash());
                expected = expected.saturating_add(1);
                off = f.end;
            }
        }
    }

    let mut size = data.len() as u64;
    if let Some(at) = bad_at {
        if expected <= covered {
            return Err(LedgerError::tampered(
                expected,
                TamperKind::Modified,
                "a record covered by a signed checkpoint is damaged; refusing to truncate",
            ));
        }
        quarantine_and_truncate(dir, &path, &data, at, expected)?;
        size = at as u64;
    }

    let head = match prev {
        Some(h) => h,
        None => head_before(&segs, first, cps, &mut max_boot)?,
    };
    Ok(Recovered {
        next_seq: expected,
        head,
        active: Some((first, path, size)),
        max_boot,
        newest_us,
        oldest_us,
    })
}

/// The cut bytes were never acknowledged if this is a crash, but if it is damage or tampering
/// they are evidence: keep them (they are ciphertext, no ids in clear) instead of discarding.
fn quarantine_and_truncate(
    dir: &Path,
    path: &Path,
    data: &[u8],
    at: usize,
    seq: u64,
) -> Result<(), LedgerError> {
    let dropped = &data[at..];
    let qpath = dir.join(format!(
        "torn-{seq:020}-{}.bin",
        chrono::Utc::now().timestamp_micros()
    ));
    let mut q = super::owner_only(&mut OpenOptions::new())
        .write(true)
        .create_new(true)
        .open(&qpath)
        .map_err(|e| LedgerError::io("create quarantine file", e))?;
    q.write_all(dropped)
        .and_then(|_| q.sync_all())
        .map_err(|e| LedgerError::io("write quarantine file", e))?;
    fsync_dir(dir)?;
    tracing::warn!(
        segment = %path.display(),
        offset = at,
        bytes = dropped.len(),
        first_dropped_seq = seq,
        quarantine = %qpath.display(),
        "ledger tail was torn or damaged; truncated it"
    );
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| LedgerError::io("open segment for truncation", e))?;
    f.set_len(at as u64)
        .and_then(|_| f.sync_all())
        .map_err(|e| LedgerError::io("truncate torn segment", e))
}

/// Head hash just before `first` when the newest segment holds no records.
fn head_before(
    segs: &[(u64, PathBuf)],
    first: u64,
    cps: &Loaded,
    max_boot: &mut u32,
) -> Result<[u8; 32], LedgerError> {
    if first <= 1 {
        return Ok([0; 32]);
    }
    if segs.len() >= 2 {
        let (_, prev_path) = &segs[segs.len() - 2];
        let data = read_opt(prev_path)?.unwrap_or_default();
        let mut off = 0;
        let mut last = None;
        while let Next::Frame(f) = next_frame(&data, off) {
            *max_boot = (*max_boot).max(f.header.boot());
            last = Some((f.header.seq, f.hash()));
            off = f.end;
        }
        if let Some((seq, h)) = last {
            if seq.checked_add(1) == Some(first) {
                return Ok(h);
            }
        }
    }
    cps.lines
        .iter()
        .flatten()
        .find(|c| c.seq.checked_add(1) == Some(first))
        .map(|c| c.head)
        .ok_or_else(|| {
            LedgerError::tampered(
                first - 1,
                TamperKind::Removed,
                "cannot find the record or checkpoint preceding the newest segment",
            )
        })
}

//! Crash recovery at open: find the valid prefix of the newest segment and cut a torn tail.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::checkpoint::Loaded;
use super::error::{LedgerError, TamperKind};
use super::keys::{Keyring, Origin, KEYS_ENV};
use super::record::{next_frame, Next};
use super::segment::{fsync_dir, list_segments, read_opt, CHECKPOINT_FILE, STATE_FILE};

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
    let segs = list_segments(dir)?;
    refuse_new_keys(dir, keys, &segs, cps)?;
    refuse_lost_state(dir, &segs)?;
    check_checkpoints(dir, keys, cps)?;
    let covered = cps.max_seq();
    if cps.lines.is_empty() {
        refuse_unsigned_records(dir, &segs)?;
    }
    let Some((first, path)) = segs.last().cloned() else {
        if covered > 0 {
            return Err(LedgerError::tampered(
                1,
                TamperKind::Truncated,
                format!(
                    "no segment files in {}, but a signed checkpoint covers seq {covered}; \
                     refusing to open the ledger: restore its segment files from a backup",
                    dir.display()
                ),
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
    // Where the valid records end, and whether that is a frame cut short (a torn write).
    let mut bad_at: Option<(usize, bool)> = None;
    let mut newest_us = i64::MIN;
    let mut oldest_us = i64::MAX;
    loop {
        match next_frame(&data, off) {
            Next::End => break,
            Next::Torn => {
                bad_at = Some((off, true));
                break;
            }
            Next::Bad => {
                bad_at = Some((off, false));
                break;
            }
            Next::Frame(f) => {
                let chained = prev.is_none_or(|p| p == f.header.prev);
                if f.header.seq != expected || !chained {
                    bad_at = Some((off, false));
                    break;
                }
                match f.decrypt(keys) {
                    Ok(_) => {}
                    // A whole frame that does not authenticate is not a torn write: a crash
                    // leaves a frame short, never complete with a wrong tag. It is the wrong
                    // keys, or damage: cutting it, and everything after it, would destroy
                    // records (with new keys, all of them).
                    Err(LedgerError::Crypto) => {
                        return Err(undecryptable(keys, &path, f.header.seq, prev.is_some()))
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

    // The chain must reach every record a signed checkpoint vouches for, whether it ends in a
    // torn or damaged frame or stops cleanly at a record boundary (a segment cut short, an old
    // backup of it restored): opening would append new records under those sequence numbers
    // and the ledger would never verify again.
    let head_seq = expected - 1;
    if !may_cut_after(head_seq, covered) {
        return Err(match bad_at {
            Some((_, torn)) => LedgerError::tampered(
                expected,
                TamperKind::Modified,
                format!(
                    "record {expected} in {} is {}, but a signed checkpoint covers seq \
                     {covered}; refusing to open the ledger or cut it: restore the ledger \
                     directory from a backup (check it with `consentry ledger verify`)",
                    path.display(),
                    if torn { "cut short" } else { "damaged" }
                ),
            ),
            None => truncated(dir, head_seq, covered),
        });
    }

    let mut size = data.len() as u64;
    if let Some((at, _)) = bad_at {
        quarantine_and_truncate(dir, &path, &data, at, expected)?;
        size = at as u64;
    }

    let head = match prev {
        Some(h) => h,
        None => head_before(dir, &segs, first, cps, &mut max_boot)?,
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

/// Whether recovery may cut the newest segment's tail after record `head_seq`, given that a
/// signed checkpoint vouches for every record up to `covered`. A crash only ever tears what came
/// after the last checkpoint: a cut below one would drop records the ledger had signed as
/// written. `verify` asks the same question before it reports a torn tail as a crash's doing.
pub(crate) fn may_cut_after(head_seq: u64, covered: u64) -> bool {
    head_seq >= covered
}

fn truncated(dir: &Path, head_seq: u64, covered: u64) -> LedgerError {
    LedgerError::tampered(
        head_seq + 1,
        TamperKind::Truncated,
        format!(
            "a signed checkpoint covers seq {covered} but the chain in {} ends at {head_seq}: \
             records {}..={covered} are missing. Refusing to open the ledger, which would write \
             new records under their sequence numbers; restore the ledger directory from a \
             backup (check it with `consentry ledger verify`)",
            dir.display(),
            head_seq + 1
        ),
    )
}

/// `keys` were created by this start because their file did not exist, but the directory
/// already holds a ledger: it was written with the keys of a file that is gone. Recovering with
/// the new ones would find no record it can read.
fn refuse_new_keys(
    dir: &Path,
    keys: &Keyring,
    segs: &[(u64, PathBuf)],
    cps: &Loaded,
) -> Result<(), LedgerError> {
    let Origin::File {
        path,
        created: true,
    } = keys.origin()
    else {
        return Ok(());
    };
    if segs.is_empty() && cps.lines.is_empty() && cps.torn_at.is_none() {
        return Ok(());
    }
    // The new keys have encrypted and signed nothing. Left in place, the file would turn the
    // next start's "missing" into "does not fit", and could be taken for this ledger's own key
    // file when backups are sorted out.
    let removed = match std::fs::remove_file(path) {
        Ok(()) => "; the key file this start created has been removed again".to_owned(),
        Err(e) => format!(
            "; the key file this start created could not be removed ({e}): delete it before \
             restoring"
        ),
    };
    Err(LedgerError::WrongKeys(format!(
        "the ledger key file {} is missing, but {} holds a ledger written with the keys it held; \
         refusing to start new keys over it, which could read none of its records. Restore {} \
         (or set {KEYS_ENV}) from a backup{removed}",
        path.display(),
        dir.display(),
        path.display()
    )))
}

/// The writer stores `state.json` before it creates the first segment, so segments without it
/// mean it was lost. Its boot counter is the first half of every record's nonce, and what is
/// left on disk cannot stand in for it: the newest segment shows the boots of the records still
/// in it, not of a record cut off a torn tail (kept in a `torn-*.bin` file) when it was the
/// first its boot wrote, nor of records retention purged (still in backups). Starting again
/// from the boots that do show could encrypt new records under those records' nonces, and two
/// AES-GCM messages under one key and nonce give away the XOR of their plaintexts and let
/// anyone forge records under that key.
fn refuse_lost_state(dir: &Path, segs: &[(u64, PathBuf)]) -> Result<(), LedgerError> {
    let state = dir.join(STATE_FILE);
    let Some((_, seg)) = segs.first() else {
        return Ok(());
    };
    match std::fs::symlink_metadata(&state) {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(LedgerError::io(format!("stat {}", state.display()), e)),
    }
    Err(LedgerError::Config(format!(
        "{} is missing, but {} holds the ledger's records (such as {}): it held the boot \
         counter that keeps every record's nonce unique under its data key, and without it new \
         records could reuse the nonces of records written before, exposing them. Refusing to \
         open the ledger. Restore {} from the same backup as the ledger directory; if it is lost \
         for good, add a data key no record was encrypted with (`consentry keys rotate`, or in \
         the {KEYS_ENV} document), then write {{\"boot\":0,\"key_uses\":{{}}}} to {}",
        state.display(),
        dir.display(),
        seg.display(),
        state.display(),
        state.display(),
    )))
}

/// What `verify` refuses about checkpoints, start refuses too: a malformed line, and keys that
/// did not sign the latest checkpoint.
fn check_checkpoints(dir: &Path, keys: &Keyring, cps: &Loaded) -> Result<(), LedgerError> {
    let file = dir.join(CHECKPOINT_FILE);
    // An incomplete last line (no newline) is a crash in the middle of appending it, and is cut
    // when the log is opened; a complete line that does not parse is not.
    if let Some(i) = cps.lines.iter().position(Option::is_none) {
        return Err(LedgerError::tampered(
            0,
            TamperKind::CheckpointInvalid,
            format!(
                "line {} of {} is malformed (a whole line, so not one a crash cut short); \
                 refusing to open the ledger: restore {} from a backup (check it with \
                 `consentry ledger verify`)",
                i + 1,
                file.display(),
                file.display()
            ),
        ));
    }
    let vk = keys.verifying_key();
    let Some(last) = cps.lines.iter().flatten().max_by_key(|c| c.seq) else {
        return Ok(());
    };
    if last.verify(&vk) {
        return Ok(());
    }
    // Error path only, so checking every line is affordable: any that verifies means these are
    // the ledger's keys and the latest checkpoint itself is forged or damaged.
    if cps.lines.iter().flatten().any(|c| c.verify(&vk)) {
        return Err(LedgerError::tampered(
            last.seq,
            TamperKind::CheckpointInvalid,
            format!(
                "the signature of the checkpoint at seq {} in {} does not verify; refusing to \
                 open the ledger: restore {} from a backup",
                last.seq,
                file.display(),
                file.display()
            ),
        ));
    }
    // A different signing key means a different keyring: recovering with it would mistake every
    // record after the last checkpoint for damage.
    Err(LedgerError::WrongKeys(format!(
        "{} do not fit the ledger in {}: none of its signed checkpoints verifies with them. \
         Is that this ledger's key file? Restore the right one (or {KEYS_ENV}) from a backup",
        keys.source_name(),
        dir.display()
    )))
}

/// A ledger gets its first checkpoint (seq 0) when it is created, fsynced before the writer
/// takes any record, so records without a single checkpoint mean the checkpoint file was
/// removed or emptied. (The one crash window, between creating the first segment and signing
/// that checkpoint, leaves an empty segment, which is fine. A ledger written by a consentry
/// from before that first checkpoint existed, which crashed before its first periodic one, is
/// refused too, as `verify` refuses it.) Accepting it would give up the only way to tell a
/// chain cut at its end.
fn refuse_unsigned_records(dir: &Path, segs: &[(u64, PathBuf)]) -> Result<(), LedgerError> {
    for (_, seg) in segs {
        let len = std::fs::metadata(seg)
            .map_err(|e| LedgerError::io(format!("stat {}", seg.display()), e))?
            .len();
        if len > 0 {
            let file = dir.join(CHECKPOINT_FILE);
            return Err(LedgerError::tampered(
                0,
                TamperKind::CheckpointInvalid,
                format!(
                    "{} is missing or holds no checkpoint, but {} holds records; a ledger is \
                     signed from its creation, so the checkpoints were removed, and a cut at \
                     the end of the chain could no longer be told. Refusing to open the ledger: \
                     restore {} from a backup (check it with `consentry ledger verify`)",
                    file.display(),
                    seg.display(),
                    file.display()
                ),
            ));
        }
    }
    Ok(())
}

/// A whole record that does not decrypt. If it is the first one read, the likeliest cause is
/// keys that are not this ledger's; otherwise the record was altered.
fn undecryptable(keys: &Keyring, seg: &Path, seq: u64, after_good: bool) -> LedgerError {
    if after_good {
        return LedgerError::tampered(
            seq,
            TamperKind::Modified,
            format!(
                "record {seq} in {} does not authenticate (its AEAD tag fails) although the \
                 records before it do: it was altered or damaged, which a crash does not do. \
                 Refusing to open the ledger or cut it; run `consentry ledger verify` and \
                 restore the ledger directory from a backup",
                seg.display()
            ),
        );
    }
    LedgerError::WrongKeys(format!(
        "record {seq} in {} does not decrypt with {}: the ledger's key file is missing or is \
         not the one this ledger was written with (or the record was altered). Refusing to \
         open the ledger rather than discard records; restore the ledger's key file (or \
         {KEYS_ENV}) from a backup",
        seg.display(),
        keys.source_name()
    ))
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
    let qpath = quarantine_path(dir, seq);
    let failed = |what: &str, e| {
        LedgerError::io(
            format!(
                "{what} the quarantine file {} for the {} bytes to cut from the end of {}; \
                 nothing was cut",
                qpath.display(),
                dropped.len(),
                path.display()
            ),
            e,
        )
    };
    let mut q = super::owner_only(&mut OpenOptions::new())
        .write(true)
        .create_new(true)
        .open(&qpath)
        .map_err(|e| failed("create", e))?;
    let written = write_quarantine(&mut q, dropped);
    drop(q);
    if let Err(e) = written {
        // A partial copy is not the evidence, and left behind it would read as a tail cut at
        // an earlier start: the segment still holds the bytes, and the next start tries again.
        let _ = std::fs::remove_file(&qpath);
        return Err(failed("write", e));
    }
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
        .map_err(|e| LedgerError::io(format!("open {} to cut its tail", path.display()), e))?;
    f.set_len(at as u64)
        .and_then(|_| f.sync_all())
        .map_err(|e| LedgerError::io(format!("cut the tail of {}", path.display()), e))
}

/// Where recovery keeps the tail it cuts, the first record of which would have been `seq`.
fn quarantine_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(quarantine_name(
        seq,
        &chrono::Utc::now().timestamp_micros().to_string(),
    ))
}

/// The name of a quarantine file: `stamp` is when it was cut (µs since the epoch).
pub(crate) fn quarantine_name(seq: u64, stamp: &str) -> String {
    format!("torn-{seq:020}-{stamp}.bin")
}

fn write_quarantine(q: &mut std::fs::File, bytes: &[u8]) -> std::io::Result<()> {
    q.write_all(bytes)?;
    q.sync_all()
}

/// Head hash just before `first` when the newest segment holds no records.
fn head_before(
    dir: &Path,
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
            // Segments are closed whole and purged whole: one that does not end just before
            // the next lost records, and a checkpoint past them must not paper over that.
            return Err(LedgerError::tampered(
                seq.saturating_add(1),
                TamperKind::Removed,
                format!(
                    "{} ends at record {seq} but the next segment starts at {first}; refusing \
                     to open the ledger: restore the ledger directory from a backup (check it \
                     with `consentry ledger verify`)",
                    prev_path.display()
                ),
            ));
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
                format!(
                    "cannot find the record or checkpoint preceding the newest segment in {}; \
                     refusing to open the ledger: restore it from a backup",
                    dir.display()
                ),
            )
        })
}

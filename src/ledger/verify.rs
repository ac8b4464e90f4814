//! Offline verification: walks every segment, checks sequence continuity, the hash chain, each
//! record's AEAD tag and every signed checkpoint, and names the first bad sequence number.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::checkpoint::{self, Checkpoint};
use super::error::{LedgerError, TamperKind};
use super::keys::Keyring;
use super::record::{next_frame, Next, RawFrame};
use super::recover::{may_cut_after, quarantine_name};
use super::segment::{list_segments, read_opt};

/// What a successful verification saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records present and verified.
    pub records: u64,
    /// Distinct checkpoint sequence numbers with a valid signature.
    pub checkpoints: u64,
    /// First sequence number still on disk (greater than 1 after a retention purge).
    pub first_seq: Option<u64>,
    /// Sequence number and hash of the last record.
    pub head_seq: u64,
    pub head: [u8; 32],
    /// When old segments were purged: the checkpoint the walk started from.
    pub anchor_seq: Option<u64>,
    /// Records after the last signed checkpoint. Their end is not pinned: records cut from there
    /// would not show. consentry signs its head when it closes the ledger and when it opens it
    /// again after a crash, so a stopped ledger has none unless it crashed since its last start.
    pub unsigned_tail: u64,
    /// An incomplete record ending the newest segment, past the last signed checkpoint: what a
    /// crash in the middle of an append leaves, and what the server cuts off at its next start.
    pub torn_tail: Option<TornTail>,
}

/// The bytes of a record a crash cut short, at the end of the newest segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub segment: PathBuf,
    /// Where the incomplete record starts in the segment.
    pub offset: u64,
    pub bytes: u64,
    /// The sequence number the record would have had.
    pub seq: u64,
}

/// Verifies a ledger directory. Meant for a closed ledger: on a live one the writer may be in
/// the middle of appending, which would show up as a truncated tail.
pub fn verify_dir(dir: &Path, keys: &Keyring) -> Result<VerifyReport, LedgerError> {
    let vk = keys.verifying_key();
    let loaded = checkpoint::load(dir)?;
    let mut cps: BTreeMap<u64, Checkpoint> = BTreeMap::new();
    for (i, line) in loaded.lines.iter().enumerate() {
        let Some(cp) = line else {
            return Err(LedgerError::tampered(
                0,
                TamperKind::CheckpointInvalid,
                format!("checkpoint line {} is malformed", i + 1),
            ));
        };
        if !cp.verify(&vk) {
            return Err(LedgerError::tampered(
                cp.seq,
                TamperKind::CheckpointInvalid,
                "signature does not verify",
            ));
        }
        if let Some(other) = cps.get(&cp.seq) {
            if other.head != cp.head {
                return Err(LedgerError::tampered(
                    cp.seq,
                    TamperKind::CheckpointMismatch,
                    "two signed checkpoints disagree",
                ));
            }
        }
        cps.insert(cp.seq, cp.clone());
    }
    let segments = list_segments(dir)?;
    if cps.is_empty() {
        // A ledger's first checkpoint is signed when it is created (at seq 0), before any record.
        return Err(if segments.is_empty() {
            LedgerError::Config(format!(
                "no share ledger in {}: no segments and no checkpoints",
                dir.display()
            ))
        } else {
            LedgerError::tampered(
                0,
                TamperKind::CheckpointInvalid,
                "no signed checkpoint: checkpoints.jsonl was removed or emptied",
            )
        });
    }

    let mut expected: Option<u64> = None;
    let mut prev_hash = [0u8; 32];
    let mut records = 0u64;
    let mut first_seq = None;
    let mut anchor_seq = None;
    let newest_segment = segments.last().map(|(first, _)| *first);
    let newest_index = segments.len().saturating_sub(1);
    let mut torn_tail = None;

    for (i, (first, path)) in segments.into_iter().enumerate() {
        let Some(data) = read_opt(&path)? else {
            continue;
        };
        let mut frames: Vec<RawFrame<'_>> = Vec::new();
        let mut off = 0;
        let tail = loop {
            match next_frame(&data, off) {
                Next::Frame(f) => {
                    off = f.end;
                    frames.push(f);
                }
                Next::End => break None,
                // Only the newest segment is ever appended to, so only there can a crash leave
                // a record cut short; whether it did is settled once the chain's end is known.
                Next::Torn if i == newest_index => {
                    torn_tail = Some(TornTail {
                        segment: path.clone(),
                        offset: off as u64,
                        bytes: (data.len() - off) as u64,
                        seq: 0,
                    });
                    break None;
                }
                Next::Torn => break Some((TamperKind::Truncated, "segment ends inside a record")),
                Next::Bad => break Some((TamperKind::Modified, "unparseable record frame")),
            }
        };
        // A segment is named for the first record it holds, or, empty, for the next record the
        // chain takes (the writer opens the next segment before writing to it, and retention
        // deletes whole segments, never the newest). So once the chain has started, each name
        // must continue it: a gap between names is records removed even where the segment
        // after the gap holds none, as recovery refuses it.
        if let Some(exp) = expected {
            if first != exp {
                return Err(LedgerError::tampered(
                    exp,
                    if first > exp {
                        TamperKind::Removed
                    } else {
                        TamperKind::Reordered
                    },
                    format!(
                        "the chain ends at seq {} but the next segment, {}, starts at {first}",
                        exp - 1,
                        path.display()
                    ),
                ));
            }
        }
        if let Some(f) = frames.first() {
            if f.header.seq != first {
                return Err(LedgerError::tampered(
                    f.header.seq,
                    TamperKind::Modified,
                    format!(
                        "{} is named for seq {first} but its first record is seq {}",
                        path.display(),
                        f.header.seq
                    ),
                ));
            }
        }
        for (j, f) in frames.iter().enumerate() {
            let seq = f.header.seq;
            match expected {
                None => {
                    if seq == 1 {
                        if f.header.prev != [0; 32] {
                            return Err(LedgerError::tampered(
                                1,
                                TamperKind::Modified,
                                "first record has a non-zero prev hash",
                            ));
                        }
                    } else {
                        anchor_seq = Some(anchor(&cps, seq, Some(f.header.prev))?.0);
                    }
                }
                Some(exp) if seq != exp => {
                    let later = frames[j + 1..].iter().any(|g| g.header.seq == exp);
                    let kind = if later || seq < exp {
                        TamperKind::Reordered
                    } else {
                        TamperKind::Removed
                    };
                    return Err(LedgerError::tampered(
                        exp,
                        kind,
                        format!("found seq {seq} where {exp} was expected"),
                    ));
                }
                Some(_) => {
                    if f.header.prev != prev_hash {
                        return Err(LedgerError::tampered(
                            seq,
                            TamperKind::Modified,
                            "prev hash does not match the preceding record",
                        ));
                    }
                }
            }
            match f.decrypt(keys) {
                Ok(_) => {}
                Err(LedgerError::Crypto) => {
                    return Err(LedgerError::tampered(
                        seq,
                        TamperKind::Modified,
                        "AEAD tag does not verify",
                    ))
                }
                Err(e) => return Err(e),
            }
            let h = f.hash();
            if cps.get(&seq).is_some_and(|cp| cp.head != h) {
                return Err(LedgerError::tampered(
                    seq,
                    TamperKind::CheckpointMismatch,
                    "record hash differs from the signed checkpoint",
                ));
            }
            prev_hash = h;
            expected = Some(seq.saturating_add(1));
            records += 1;
            first_seq.get_or_insert(seq);
        }
        if let Some((kind, why)) = tail {
            return Err(LedgerError::tampered(
                expected.unwrap_or(1),
                kind,
                format!("{why} in {}", path.display()),
            ));
        }
    }

    if expected.is_none() {
        // No record on disk. Either a new ledger (its one segment, empty, is seg-1) or one whose
        // every record was purged by retention: its newest segment, empty, is named for the
        // next record, and a checkpoint signed before the purge pins the chain's head just
        // below it (as recovery takes it when it opens the ledger).
        if let Some(first) = newest_segment.filter(|&f| f > 1) {
            let (at, head) = anchor(&cps, first, None)?;
            anchor_seq = Some(at);
            prev_hash = head;
            expected = Some(first);
        }
    }
    let head_seq = expected.map_or(0, |e| e - 1);
    let last_cp = cps.keys().next_back().copied().unwrap_or(0);
    if let Some(torn) = &mut torn_tail {
        torn.seq = head_seq.saturating_add(1);
        // The rule start-up recovery cuts by: below a signed checkpoint a record cut short is not
        // a crash's doing, and the server refuses to open such a ledger.
        if !may_cut_after(head_seq, last_cp) {
            return Err(LedgerError::tampered(
                torn.seq,
                TamperKind::Truncated,
                format!(
                    "segment ends inside a record in {} (at byte {}), but a signed checkpoint \
                     covers seq {last_cp}: records were cut, not torn by a crash",
                    torn.segment.display(),
                    torn.offset
                ),
            ));
        }
        // Said on its own line, apart from the report: the verification passed, but the file
        // will change at the next start, and an operator comparing copies should know why.
        tracing::warn!(
            "{} ends in an incomplete record (seq {}: {} bytes from byte {}), as a crash in the \
             middle of an append leaves it; such a record was never acknowledged. Every record \
             before it verifies. consentry cuts it off at its next start and keeps its bytes in \
             {}",
            torn.segment.display(),
            torn.seq,
            torn.bytes,
            torn.offset,
            dir.join(quarantine_name(torn.seq, "<time>")).display()
        );
    }
    if last_cp > head_seq {
        return Err(LedgerError::tampered(
            head_seq.saturating_add(1),
            TamperKind::Truncated,
            format!("a signed checkpoint covers seq {last_cp} but the chain ends at {head_seq}"),
        ));
    }
    Ok(VerifyReport {
        records,
        checkpoints: cps.len() as u64,
        first_seq,
        head_seq,
        head: prev_hash,
        anchor_seq,
        unsigned_tail: head_seq - last_cp,
        torn_tail,
    })
}

/// The chain on disk starts at `seq` > 1, the next record after an older part that was purged
/// (or removed). Only a signed checkpoint at exactly the cut (`seq - 1`) makes that legitimate,
/// and when the record at `seq` is on disk, its prev hash (`prev`) must be that checkpoint's
/// head. Returns the checkpoint's seq and head.
fn anchor(
    cps: &BTreeMap<u64, Checkpoint>,
    seq: u64,
    prev: Option<[u8; 32]>,
) -> Result<(u64, [u8; 32]), LedgerError> {
    let Some(before) = seq.checked_sub(1) else {
        return Err(LedgerError::tampered(
            0,
            TamperKind::Modified,
            "record with seq 0",
        ));
    };
    match cps.get(&before) {
        Some(cp) if prev.is_none_or(|p| p == cp.head) => Ok((before, cp.head)),
        Some(_) => Err(LedgerError::tampered(
            seq,
            TamperKind::Modified,
            "first record does not continue the anchoring checkpoint",
        )),
        None => {
            let missing = cps
                .range(..seq)
                .next_back()
                .map_or(1, |(s, _)| s.saturating_add(1));
            Err(LedgerError::tampered(
                missing,
                TamperKind::Removed,
                format!("records before seq {seq} are missing and no checkpoint anchors the cut"),
            ))
        }
    }
}

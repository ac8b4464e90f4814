//! Signed checkpoints: Ed25519 over (seq, head hash, time), one JSON object per line in
//! `checkpoints.jsonl`. They pin the chain so that rewriting history needs the signing key, and
//! they anchor verification after retention has purged old segments.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::error::LedgerError;
use super::keys::Keyring;
use super::segment::{fsync_dir, read_opt, CHECKPOINT_FILE};

const DOMAIN: &[u8] = b"consentry-ledger-checkpoint-v1\0";

#[derive(Serialize, Deserialize)]
struct Line {
    seq: u64,
    head: String,
    time_us: i64,
    sig: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    pub seq: u64,
    pub head: [u8; 32],
    pub time_us: i64,
    pub sig: [u8; 64],
}

fn message(seq: u64, head: &[u8; 32], time_us: i64) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 48);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(head);
    m.extend_from_slice(&time_us.to_be_bytes());
    m
}

impl Checkpoint {
    pub fn sign(keys: &Keyring, seq: u64, head: [u8; 32], time_us: i64) -> Checkpoint {
        let sig = keys.signing_key().sign(&message(seq, &head, time_us));
        Checkpoint {
            seq,
            head,
            time_us,
            sig: sig.to_bytes(),
        }
    }

    pub fn verify(&self, vk: &VerifyingKey) -> bool {
        let sig = Signature::from_bytes(&self.sig);
        vk.verify_strict(&message(self.seq, &self.head, self.time_us), &sig)
            .is_ok()
    }

    fn to_line(&self) -> Result<Vec<u8>, LedgerError> {
        let mut v = serde_json::to_vec(&Line {
            seq: self.seq,
            head: hex::encode(self.head),
            time_us: self.time_us,
            sig: B64.encode(self.sig),
        })?;
        v.push(b'\n');
        Ok(v)
    }

    fn from_line(line: &[u8]) -> Option<Checkpoint> {
        let l: Line = serde_json::from_slice(line).ok()?;
        let mut head = [0u8; 32];
        hex::decode_to_slice(&l.head, &mut head).ok()?;
        let sig: [u8; 64] = B64.decode(&l.sig).ok()?.try_into().ok()?;
        Some(Checkpoint {
            seq: l.seq,
            head,
            time_us: l.time_us,
            sig,
        })
    }
}

pub(crate) struct Loaded {
    /// One entry per complete line; `None` for a line that does not parse.
    pub lines: Vec<Option<Checkpoint>>,
    /// Byte offset where an incomplete last line (a torn write) starts.
    pub torn_at: Option<u64>,
}

impl Loaded {
    pub fn max_seq(&self) -> u64 {
        self.lines
            .iter()
            .flatten()
            .map(|c| c.seq)
            .max()
            .unwrap_or(0)
    }
}

pub(crate) fn load(dir: &Path) -> Result<Loaded, LedgerError> {
    let data = read_opt(&dir.join(CHECKPOINT_FILE))?.unwrap_or_default();
    let mut lines = Vec::new();
    let mut start = 0usize;
    while start < data.len() {
        match data[start..].iter().position(|&b| b == b'\n') {
            Some(n) => {
                lines.push(Checkpoint::from_line(&data[start..start + n]));
                start += n + 1;
            }
            None => {
                return Ok(Loaded {
                    lines,
                    torn_at: Some(start as u64),
                })
            }
        }
    }
    Ok(Loaded {
        lines,
        torn_at: None,
    })
}

pub(crate) struct CheckpointLog {
    file: File,
}

impl CheckpointLog {
    /// Opens for append, cutting an incomplete last line left by a crash: it was never fsynced,
    /// so nothing was promised about it.
    pub fn open(dir: &Path, torn_at: Option<u64>) -> Result<CheckpointLog, LedgerError> {
        let path = dir.join(CHECKPOINT_FILE);
        let existed = path.exists();
        let file = super::owner_only(&mut OpenOptions::new())
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| LedgerError::io("open checkpoint log", e))?;
        if let Some(at) = torn_at {
            tracing::warn!(offset = at, "truncating torn checkpoint line");
            file.set_len(at)
                .and_then(|_| file.sync_all())
                .map_err(|e| LedgerError::io("truncate checkpoint log", e))?;
        }
        if !existed {
            fsync_dir(dir)?;
        }
        Ok(CheckpointLog { file })
    }

    pub fn append(&mut self, cp: &Checkpoint) -> Result<(), LedgerError> {
        let line = cp.to_line()?;
        self.file
            .write_all(&line)
            .and_then(|_| self.file.sync_data())
            .map_err(|e| LedgerError::io("write checkpoint", e))
    }
}

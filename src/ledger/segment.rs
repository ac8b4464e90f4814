//! Files in the ledger directory: numbered segment files, the boot/state file, and fsync helpers.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::LedgerError;

const SEG_PREFIX: &str = "seg-";
const SEG_SUFFIX: &str = ".log";
pub(crate) const CHECKPOINT_FILE: &str = "checkpoints.jsonl";
pub(crate) const STATE_FILE: &str = "state.json";

pub(crate) fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{SEG_PREFIX}{first_seq:020}{SEG_SUFFIX}"))
}

/// Segment files sorted by the first sequence number in their name.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LedgerError> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir)
        .map_err(|e| LedgerError::io(format!("list {}", dir.display()), e))?;
    for ent in rd {
        let ent = ent.map_err(|e| LedgerError::io("list ledger dir", e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(num) = name
            .strip_prefix(SEG_PREFIX)
            .and_then(|n| n.strip_suffix(SEG_SUFFIX))
        else {
            continue;
        };
        if let Ok(first) = num.parse::<u64>() {
            out.push((first, ent.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads a whole file; `None` if it has disappeared (e.g. purged by retention meanwhile).
pub(crate) fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, LedgerError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LedgerError::io(format!("read {}", path.display()), e)),
    }
}

/// A new or renamed directory entry is only durable once its directory is fsynced.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), LedgerError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| LedgerError::io(format!("fsync dir {}", dir.display()), e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Persisted across opens. `boot` feeds the nonce prefix; `key_uses` is an upper bound on the
/// number of encryptions done under each data key (reserved ahead of use, so a crash can only
/// over-count, never under-count).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct State {
    pub boot: u32,
    pub key_uses: BTreeMap<u32, u64>,
    /// The latest record time (µs since the epoch) the ledger has written: record times in the
    /// chain do not go back far below it (see the writer).
    #[serde(default)]
    pub time_hwm_us: i64,
}

impl State {
    pub fn load(dir: &Path) -> Result<State, LedgerError> {
        match read_opt(&dir.join(STATE_FILE))? {
            // A new ledger's. Beside segments, recovery has already refused a lost one: the
            // records left cannot tell which boots were used (see `recover`).
            None => Ok(State::default()),
            Some(b) => serde_json::from_slice(&b).map_err(|e| {
                LedgerError::Config(format!(
                    "{STATE_FILE} is unreadable ({e}); refusing to guess a boot counter"
                ))
            }),
        }
    }

    /// Write-to-temp, fsync, rename, fsync dir: the old or the new state survives a crash, never
    /// a torn mix.
    pub fn store(&self, dir: &Path) -> Result<(), LedgerError> {
        let tmp = dir.join("state.json.tmp");
        let bytes = serde_json::to_vec(self)?;
        let mut f = super::owner_only(&mut std::fs::OpenOptions::new())
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| LedgerError::io("create state tmp", e))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| LedgerError::io("write state", e))?;
        std::fs::rename(&tmp, dir.join(STATE_FILE))
            .map_err(|e| LedgerError::io("rename state", e))?;
        fsync_dir(dir)
    }
}

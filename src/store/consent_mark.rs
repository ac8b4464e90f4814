//! The last consent change the store committed, kept outside the store.
//!
//! Every change of a user's preferences (a withdrawal among them) adds a row
//! to `consent_history`, whose sequence only grows. A store copied back
//! from an older backup without the rest of the data directory has fewer of
//! them than consentry committed; started on, it would put back in force
//! the grants users withdrew since, and nothing else would notice: the
//! share ledger records deliveries, not consents. This file remembers the
//! highest sequence committed, so that a start can refuse such a store
//! (`server::start`).
//!
//! It is written after the store's commit, so a crash between the two
//! leaves the mark behind the store, which is never taken for a restore.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The file's name in the data directory. Not `consentry.db…`, so that a
/// copy of the store's files does not bring it along.
pub const FILE: &str = "consent-mark";

#[derive(Debug)]
pub struct ConsentMark {
    path: PathBuf,
    /// What the file holds; raised only, under the lock, so two commits
    /// cannot write their marks out of order.
    written: Mutex<u64>,
}

impl ConsentMark {
    /// The mark in `data_dir`, and the sequence it holds if the file exists.
    pub fn open(data_dir: &Path) -> std::io::Result<(ConsentMark, Option<u64>)> {
        let path = data_dir.join(FILE);
        let held = match std::fs::read_to_string(&path) {
            Ok(text) => Some(parse(&text).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} does not hold a consent sequence number: {:?}",
                        path.display(),
                        text.chars().take(40).collect::<String>()
                    ),
                )
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("read {}: {e}", path.display()),
                ))
            }
        };
        let mark = ConsentMark {
            path,
            written: Mutex::new(held.unwrap_or(0)),
        };
        Ok((mark, held))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records that the store committed consent changes up to `seq`.
    /// Durable when it returns: written aside, synced, renamed over the
    /// mark, and the directory synced.
    pub fn raise(&self, seq: u64) -> std::io::Result<()> {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if seq <= *written && self.path.exists() {
            return Ok(());
        }
        let tmp = self.path.with_extension("tmp");
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        let mut f = o.open(&tmp)?;
        writeln!(f, "{seq}")?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        *written = seq.max(*written);
        Ok(())
    }
}

fn parse(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_is_raised_never_lowered_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mark, held) = ConsentMark::open(dir.path()).unwrap();
        assert_eq!(held, None);
        mark.raise(7).unwrap();
        mark.raise(3).unwrap();
        assert_eq!(ConsentMark::open(dir.path()).unwrap().1, Some(7));
        mark.raise(9).unwrap();
        assert_eq!(ConsentMark::open(dir.path()).unwrap().1, Some(9));
        assert!(!dir.path().join("consent-mark.tmp").exists());
    }

    #[test]
    fn a_mark_that_is_not_a_number_is_an_error_not_zero() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "garbage").unwrap();
        let e = ConsentMark::open(dir.path()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("consent-mark"), "{e}");
    }
}

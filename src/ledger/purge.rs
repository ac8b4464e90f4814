//! What retention needs to know about closed segments, without reading them on the writer.
//!
//! Retention deletes a closed segment once its newest record is past the cutoff, and first signs
//! a checkpoint over the segment's last record so verification can start after the gap. Finding
//! those two facts means reading a whole segment (64 MiB by default): done by the writer it
//! stalled every delivery waiting for durability for 100–250 ms, once per minute and after every
//! rotation. So the writer records them itself for every segment it closes, and segments it
//! found on disk at open are read once, on a thread of their own.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use super::record::{next_frame, Next};
use super::segment::read_opt;

/// A closed segment, as retention sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Summary {
    /// The newest record time in the segment (µs since the epoch); `i64::MIN` when empty.
    pub newest_us: i64,
    /// Sequence number and hash of the last record, for the checkpoint signed before deletion.
    pub last: Option<(u64, [u8; 32])>,
    /// False when a frame is torn or malformed: damaged history is evidence, never purged.
    pub clean: bool,
}

impl Summary {
    /// Reads a segment's frames (headers only; one hash, of the last record).
    pub fn of(data: &[u8]) -> Summary {
        let mut off = 0;
        let mut newest_us = i64::MIN;
        let mut last = None;
        let clean = loop {
            match next_frame(data, off) {
                Next::Frame(f) => {
                    newest_us = newest_us.max(f.header.time_us);
                    off = f.end;
                    last = Some(f);
                }
                Next::End => break true,
                Next::Torn | Next::Bad => break false,
            }
        };
        Summary {
            newest_us,
            last: last.map(|f| (f.header.seq, f.hash())),
            clean,
        }
    }
}

/// Called by the scanner after each reply, so the writer purges without waiting a minute.
pub(crate) type Wake = Arc<dyn Fn() + Send + Sync>;

type Request = (u64, PathBuf);
type Reply = (u64, Option<Summary>);

/// Summaries by first sequence number, and the scanner for segments without one.
pub(crate) struct Purger {
    known: HashMap<u64, Summary>,
    asked: HashSet<u64>,
    scanner: Option<(Sender<Request>, Receiver<Reply>)>,
    wake: Wake,
}

impl Purger {
    pub fn new(wake: Wake) -> Purger {
        Purger {
            known: HashMap::new(),
            asked: HashSet::new(),
            scanner: None,
            wake,
        }
    }

    /// The writer has just closed this segment and knows its summary.
    pub fn closed(&mut self, first: u64, summary: Summary) {
        self.known.insert(first, summary);
    }

    pub fn forget(&mut self, first: u64) {
        self.known.remove(&first);
        self.asked.remove(&first);
    }

    /// The summary of a closed segment, or `None` while it is being read (then ask again later).
    pub fn summary(&mut self, first: u64, path: &Path) -> Option<Summary> {
        self.collect();
        if let Some(s) = self.known.get(&first) {
            return Some(*s);
        }
        if self.asked.insert(first) {
            let (tx, _) = self.scanner.get_or_insert_with(|| spawn(self.wake.clone()));
            if tx.send((first, path.to_path_buf())).is_err() {
                // The scanner thread is gone (it could not be started, or panicked): retention
                // waits rather than read 64 MiB here; a restart tries again.
                tracing::warn!("ledger segment scanner unavailable; retention paused");
            }
        }
        None
    }

    fn collect(&mut self) {
        let Some((_, rx)) = &self.scanner else { return };
        while let Ok((first, summary)) = rx.try_recv() {
            match summary {
                Some(s) => {
                    if !s.clean {
                        // Said once per segment, not on every purge.
                        tracing::warn!(first_seq = first, "not purging a damaged segment");
                    }
                    self.known.insert(first, s);
                }
                // Gone or unreadable: the next listing decides whether to ask again.
                None => {
                    self.asked.remove(&first);
                }
            }
        }
    }
}

fn spawn(wake: Wake) -> (Sender<Request>, Receiver<Reply>) {
    let (req_tx, req_rx) = channel::<Request>();
    let (rep_tx, rep_rx) = channel::<Reply>();
    let started = std::thread::Builder::new()
        .name("consentry-ledger-scan".into())
        .spawn(move || {
            // Ends when the writer drops its sender.
            for (first, path) in req_rx {
                let summary = match read_opt(&path) {
                    Ok(Some(data)) => Some(Summary::of(&data)),
                    Ok(None) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read a ledger segment for retention");
                        None
                    }
                };
                if rep_tx.send((first, summary)).is_err() {
                    return;
                }
                wake();
            }
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "cannot start the ledger segment scanner");
    }
    (req_tx, rep_rx)
}

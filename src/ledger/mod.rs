//! The share ledger: an encrypted, tamper-evident, durable, append-only history of every
//! delivery of a user's personal data to an application service provider (ITU-T X.1363).
//!
//! * Each record is AES-256-GCM encrypted; its clear header (AEAD associated data) carries the
//!   key id, nonce, sequence number, time, the blind index `HMAC(blind key, user)` and the
//!   previous record's hash. User and device ids exist only inside the ciphertext.
//! * Records form a SHA-256 hash chain; Ed25519-signed checkpoints pin it (`checkpoints.jsonl`).
//! * A single writer thread does group commit: many records, one write, one `sync_data`, then
//!   every [`Durable`] in the group resolves. A resolved `Durable` survives `kill -9`.
//! * Any append or fsync failure makes the ledger fail closed until it is reopened.
//!
//! Directory layout: `seg-<first seq>.log` segments, `checkpoints.jsonl`, `state.json` (boot
//! counter and key-use accounting), and `torn-*.bin` quarantine files if recovery cut a tail.

mod aggregate;
mod checkpoint;
mod codec;
mod entry;
mod error;
mod keys;
mod purge;
mod read;
mod record;
mod recover;
mod segment;
mod verify;
mod writer;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;

pub use entry::{
    BlockedCount, Entry, ExtractRecord, MaskedField, MaskedFields, ShareAction, ShareRecord,
    ShareRef,
};
pub use error::{LedgerError, TamperKind};
pub use keys::{KeyId, Keyring, KEYS_ENV};
pub use verify::{verify_dir, TornTail, VerifyReport};

use writer::{Shared, Writer};

#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub dir: PathBuf,
    /// Sign a checkpoint once this many records were appended since the last one.
    pub checkpoint_every: u64,
    /// Most records written under one fsync.
    pub max_batch: usize,
    /// A segment file is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    /// Closed segments whose records are all older than this are deleted.
    pub retention: Option<Duration>,
    /// Operator name, filled into [`ShareRecord::creator`] when it is empty.
    pub creator: String,
    /// Queue bound: `submit` returns [`LedgerError::Overloaded`] beyond it rather than let
    /// memory grow without limit while the disk is slow.
    pub max_pending: usize,
    /// How often blocked-delivery aggregates are written out.
    pub blocked_flush_every: Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            dir: PathBuf::from("ledger"),
            checkpoint_every: 10_000,
            max_batch: 16_384,
            segment_bytes: 64 << 20,
            retention: None,
            creator: "consentry".to_owned(),
            max_pending: 1_000_000,
            blocked_flush_every: Duration::from_secs(60),
        }
    }
}

impl LedgerConfig {
    fn validate(&self) -> Result<(), LedgerError> {
        if self.checkpoint_every == 0 {
            return Err(LedgerError::Config(
                "checkpoint_every must be at least 1".into(),
            ));
        }
        if self.max_batch == 0 || self.max_pending == 0 {
            return Err(LedgerError::Config(
                "max_batch and max_pending must be at least 1".into(),
            ));
        }
        if self.segment_bytes < 1024 {
            return Err(LedgerError::Config(
                "segment_bytes must be at least 1024".into(),
            ));
        }
        if self.blocked_flush_every.is_zero() {
            return Err(LedgerError::Config(
                "blocked_flush_every must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// Selects entries in [`Ledger::read_user`]. `from` is inclusive, `to` exclusive; both compare
/// against the entry time. `limit == 0` means no limit.
#[derive(Debug, Clone, Default)]
pub struct ReadFilter {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub recipient: Option<String>,
    pub kind: Option<String>,
    pub after_seq: Option<u64>,
    pub limit: usize,
}

/// Resolves to the record's sequence number once it has been fsynced, or to the error that made
/// the ledger fail. Hand data to a provider only after this resolved `Ok`.
#[must_use = "a record is only durable once its Durable resolves Ok"]
pub struct Durable(oneshot::Receiver<Result<u64, LedgerError>>);

impl Future for Durable {
    type Output = Result<u64, LedgerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.0).poll(cx) {
            Poll::Ready(Ok(r)) => Poll::Ready(r),
            // The writer went away without answering (it panicked or the ledger was dropped).
            Poll::Ready(Err(_)) => Poll::Ready(Err(LedgerError::Closed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Durable {
    /// Blocks the current thread until durable. Must not be called from async code.
    pub fn wait_blocking(self) -> Result<u64, LedgerError> {
        self.0.blocking_recv().unwrap_or(Err(LedgerError::Closed))
    }
}

/// A share record's place in the ledger's queue, from [`Ledger::queue_share`]. The writer
/// commits in queue order, so once a ticket is durable so is every record queued before it: a
/// session waits for its newest ticket only. Unlike [`Durable`] it costs no channel per record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

/// Ends the writer's part: whatever it was waiting for will not come.
struct WriterGone(Arc<Shared>);

impl Drop for WriterGone {
    fn drop(&mut self) {
        self.0.writer_gone.store(true, Ordering::Release);
        self.0.durable_notify.notify_waiters();
    }
}

struct Handle {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    done: Mutex<Option<oneshot::Receiver<()>>>,
    /// Held for the ledger's lifetime: two writers on one directory would
    /// reuse nonces (the boot counter lives in the directory).
    _lock: std::fs::File,
}

/// `o`, creating files owner-only (0600): the ledger's records are
/// encrypted, but who shared with whom, and when, is for its owner alone.
pub(crate) fn owner_only(o: &mut std::fs::OpenOptions) -> &mut std::fs::OpenOptions {
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(o, 0o600);
    o
}

/// A ledger an earlier version wrote readable by others (0755 / 0644) is
/// made owner-only, the directory and every file in it. Returns how many
/// were tightened.
fn make_owner_only(dir: &std::path::Path) -> std::io::Result<usize> {
    let mut tightened = 0usize;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mut tighten = |path: &std::path::Path, mode: u32| -> std::io::Result<()> {
            // `metadata` follows a symlink: a symlink's own mode is always 0777 and guards
            // nothing (the ledger looked loose at every start), the directory it points to is
            // what others can or cannot read. `set_permissions` follows it as well, so it is the
            // ledger's real directory that is tightened, as it would be without the link, and
            // only once; the link itself is never changed or replaced. Files are only reached
            // below when they are regular files, never through a symlink, so a link placed in
            // the ledger cannot get a file elsewhere chmod-ed.
            let now = std::fs::metadata(path)?.permissions().mode();
            if now & 0o077 != 0 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                tightened += 1;
            }
            Ok(())
        };
        tighten(dir, 0o700)?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                tighten(&entry.path(), 0o600)?;
            }
        }
        if tightened > 0 {
            tracing::info!(
                dir = %dir.display(),
                tightened,
                "ledger made owner-only (it was readable by others)"
            );
        }
    }
    Ok(tightened)
}

const LOCK_FILE: &str = "LOCK";

/// Takes the directory's exclusive lock (creating the directory if need be), or says who
/// holds it. What the writer takes: it is the only one that writes.
fn lock_exclusive(dir: &std::path::Path) -> Result<std::fs::File, LedgerError> {
    crate::secrets::create_private_dir(dir).map_err(|e| LedgerError::io("create ledger dir", e))?;
    lock_exclusive_io(dir)
        .map_err(|(what, e)| LedgerError::io(what, e))?
        .map_err(|()| LedgerError::Locked(dir.display().to_string()))
}

/// `Ok(Err(()))` when someone else holds the lock.
fn lock_exclusive_io(
    dir: &std::path::Path,
) -> Result<Result<std::fs::File, ()>, (&'static str, std::io::Error)> {
    make_owner_only(dir).map_err(|e| ("make the ledger owner-only", e))?;
    let file = owner_only(&mut std::fs::OpenOptions::new())
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(|e| ("open ledger lock", e))?;
    match file.try_lock() {
        Ok(()) => Ok(Ok(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(Err(())),
        Err(std::fs::TryLockError::Error(e)) => Err(("lock ledger dir", e)),
    }
}

/// The lock an operator command takes on a stopped ledger: the exclusive one, so that it never
/// runs beside a live server. A directory it cannot write to (a read-only mount, a backup, a
/// copy it may only read) cannot be written by anyone else either, as far as this user can
/// tell: there the command takes a shared lock on a `LOCK` file opened read-only (a live
/// consentry holds it exclusively, so that still refuses beside one), or, when there is no
/// `LOCK` file to lock, none at all. Either way it logs a warning saying so. `None` when no
/// lock is held.
pub fn lock_dir(dir: &std::path::Path) -> Result<Option<std::fs::File>, LedgerError> {
    crate::secrets::create_private_dir(dir).map_err(|e| LedgerError::io("create ledger dir", e))?;
    let why = match lock_exclusive_io(dir) {
        Ok(Ok(file)) => return Ok(Some(file)),
        Ok(Err(())) => return Err(LedgerError::Locked(dir.display().to_string())),
        Err((_, e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            e
        }
        Err((what, e)) => return Err(LedgerError::io(what, e)),
    };
    lock_for_reading(dir, &why)
}

/// [`lock_dir`] in a directory it cannot write to, for the reason `why`.
fn lock_for_reading(
    dir: &std::path::Path,
    why: &std::io::Error,
) -> Result<Option<std::fs::File>, LedgerError> {
    let failed = match std::fs::File::open(dir.join(LOCK_FILE)) {
        Ok(file) => match file.try_lock_shared() {
            Ok(()) => {
                tracing::warn!(
                    dir = %dir.display(),
                    reason = %why,
                    "the ledger directory cannot be written; took a shared lock on its LOCK file \
                     instead of the exclusive one and reading it as it is"
                );
                return Ok(Some(file));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LedgerError::Locked(dir.display().to_string()))
            }
            Err(std::fs::TryLockError::Error(e)) => ("locked", e),
        },
        Err(e) => ("opened", e),
    };
    let (what, e) = failed;
    tracing::warn!(
        dir = %dir.display(),
        reason = %why,
        error = %e,
        "the ledger directory cannot be written and its LOCK file cannot be {what}; going on \
         without a lock"
    );
    Ok(None)
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The last handle is gone without shutdown(): still let the writer flush and close.
        self.shared.request_shutdown();
    }
}

/// Cheap, cloneable handle to an open ledger.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Handle>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("dir", &self.inner.shared.cfg.dir)
            .field("healthy", &self.is_healthy())
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// Opens (or creates) the ledger in `cfg.dir`, recovering from a crash, and starts the
    /// writer thread.
    pub fn open(cfg: LedgerConfig, keys: Keyring) -> Result<Ledger, LedgerError> {
        cfg.validate()?;
        let lock = lock_exclusive(&cfg.dir)?;
        metrics::gauge!(crate::metrics::LEDGER_HEALTHY).set(1.0);
        let shared = Arc::new(Shared {
            queue: Mutex::new(writer::Queue::default()),
            cv: std::sync::Condvar::new(),
            healthy: AtomicBool::new(true),
            durable_seq: AtomicU64::new(0),
            durable_pos: AtomicU64::new(0),
            durable_notify: tokio::sync::Notify::new(),
            writer_gone: AtomicBool::new(false),
            clock_behind_us: AtomicI64::new(0),
            clock_jumped_us: AtomicI64::new(0),
            blocked: aggregate::Aggregator::default(),
            keys,
            cfg,
            #[cfg(test)]
            fault_dev_full: AtomicBool::new(false),
            #[cfg(test)]
            clock_skew_us: AtomicI64::new(0),
        });
        let writer = Writer::open(Arc::clone(&shared))?;
        let (done_tx, done_rx) = oneshot::channel();
        let gone = WriterGone(Arc::clone(&shared));
        let thread = std::thread::Builder::new()
            .name("consentry-ledger".into())
            .spawn(move || {
                // Dropped however the writer ends, a panic included.
                let _gone = gone;
                writer.run();
                let _ = done_tx.send(());
            })
            .map_err(|e| LedgerError::io("spawn ledger writer", e))?;
        Ok(Ledger {
            inner: Arc::new(Handle {
                shared,
                thread: Mutex::new(Some(thread)),
                done: Mutex::new(Some(done_rx)),
                _lock: lock,
            }),
        })
    }

    fn enqueue(&self, entry: Entry) -> Result<Durable, LedgerError> {
        let plaintext = entry.encode()?;
        let (tx, rx) = oneshot::channel();
        self.enqueue_with(
            entry.type_byte(),
            entry.time(),
            entry.user(),
            Some(tx),
            |out| out.extend_from_slice(&plaintext),
        )?;
        Ok(Durable(rx))
    }

    /// Queues a record whose plaintext `encode` appends to the queue; returns its place.
    fn enqueue_with(
        &self,
        entry_type: u8,
        time: DateTime<Utc>,
        user: &str,
        ack: Option<writer::Ack>,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<u64, LedgerError> {
        let shared = &self.inner.shared;
        // Encoding and the blind index run on the caller's thread so the single writer thread
        // only encrypts, hashes and writes.
        let blind = shared.keys.blind_index(user);
        shared.push(entry_type, time.timestamp_micros(), blind, ack, encode)
    }

    fn enqueue_share(
        &self,
        rec: &ShareRef<'_>,
        ack: Option<writer::Ack>,
    ) -> Result<u64, LedgerError> {
        let mut rec = *rec;
        if rec.creator.is_empty() {
            rec.creator = &self.inner.shared.cfg.creator;
        }
        self.enqueue_with(Entry::SHARE, rec.time, rec.user, ack, |out| {
            codec::encode_share(&rec, out)
        })
    }

    /// Queues one delivery record. Never waits for the disk; fails at once if the ledger has
    /// failed or is shut down. Await the returned [`Durable`] before delivering.
    pub fn submit(&self, rec: ShareRecord) -> Result<Durable, LedgerError> {
        self.submit_ref(&rec.as_ref())
    }

    /// [`Ledger::submit`] for a record whose strings the caller holds.
    pub fn submit_ref(&self, rec: &ShareRef<'_>) -> Result<Durable, LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue_share(rec, Some(tx))?;
        Ok(Durable(rx))
    }

    /// [`Ledger::submit_ref`] for a hot path: the record is durable once [`Ledger::durable`]
    /// resolves `Ok` for its ticket or for any later one.
    pub fn queue_share(&self, rec: &ShareRef<'_>) -> Result<Ticket, LedgerError> {
        self.enqueue_share(rec, None).map(Ticket)
    }

    /// Whether every record queued up to `ticket` is fsynced.
    pub fn is_durable(&self, ticket: Ticket) -> bool {
        self.inner.shared.durable_pos.load(Ordering::Acquire) >= ticket.0
    }

    /// Resolves once every record queued up to `ticket` is fsynced, or to the error that means
    /// it never will be. Cancel-safe.
    pub async fn durable(&self, ticket: Ticket) -> Result<(), LedgerError> {
        let shared = &self.inner.shared;
        loop {
            let notified = shared.durable_notify.notified();
            tokio::pin!(notified);
            // Registered before the look, so a rise in between still wakes it.
            notified.as_mut().enable();
            if self.is_durable(ticket) {
                return Ok(());
            }
            if let Some(e) = shared.stopped() {
                return Err(e);
            }
            notified.await;
        }
    }

    /// Counts a refused delivery. Counts are aggregated per (user, recipient, kind, reason,
    /// hour) in memory and written as [`BlockedCount`] entries periodically and at shutdown.
    pub fn record_blocked(&self, user: &str, recipient: &str, kind: &str, reason: &str) {
        let shared = &self.inner.shared;
        if !shared.healthy.load(Ordering::Acquire) {
            tracing::debug!("ledger unhealthy; blocked delivery not counted");
            return;
        }
        let n = shared
            .blocked
            .add(user, recipient, kind, reason, Utc::now());
        if n >= aggregate::FLUSH_THRESHOLD {
            shared.request_blocked_flush();
        }
    }

    /// Logs an extract of a user's PII by someone other than the user (X.1363 9.1.3).
    pub fn record_extract(&self, rec: ExtractRecord) -> Result<Durable, LedgerError> {
        self.enqueue(Entry::Extract(rec))
    }

    /// Returns the user's durable entries in sequence order. Reads segment files from disk:
    /// call it from a blocking context (e.g. `spawn_blocking`) in async code.
    pub fn read_user(
        &self,
        user: &str,
        filter: &ReadFilter,
    ) -> Result<Vec<(u64, Entry)>, LedgerError> {
        let shared = &self.inner.shared;
        read::read_user(
            &shared.cfg.dir,
            &shared.keys,
            shared.durable_seq.load(Ordering::Acquire),
            user,
            filter,
        )
    }

    pub fn is_healthy(&self) -> bool {
        self.inner.shared.healthy.load(Ordering::Acquire)
    }

    /// Highest sequence number known to be fsynced.
    pub fn durable_seq(&self) -> u64 {
        self.inner.shared.durable_seq.load(Ordering::Acquire)
    }

    /// Flushes blocked aggregates, writes and fsyncs what is queued, signs a final checkpoint
    /// and joins the writer. Other clones of this handle get [`LedgerError::Closed`] afterwards.
    pub async fn shutdown(self) {
        self.inner.shared.request_shutdown();
        let done = self
            .inner
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(done) = done {
            let _ = done.await;
        }
        let thread = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = thread {
            // The writer has signalled it is finished, so this join does not block for long.
            if t.join().is_err() {
                tracing::error!("ledger writer thread panicked");
            }
        }
    }

    #[cfg(test)]
    fn shared(&self) -> &Shared {
        &self.inner.shared
    }
}

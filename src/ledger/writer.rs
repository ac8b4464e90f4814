//! The single writer thread: assigns sequence numbers, encrypts, chains, appends and fsyncs in
//! groups (group commit), writes checkpoints, flushes blocked-count aggregates and purges old
//! segments.
//!
//! Nonces are `boot (u32 BE) || counter (u64 BE)`. The boot counter is bumped and fsynced in
//! `state.json` before the first encryption of every open, and is also raised above any boot
//! number still visible in the newest segment, so a nonce is never reused under a key even after
//! a crash, a torn tail, or a lost state file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::oneshot;

use super::aggregate::Aggregator;
use super::checkpoint::{self, Checkpoint, CheckpointLog};
use super::entry::Entry;
use super::error::LedgerError;
use super::keys::Keyring;
use super::purge::{Purger, Summary};
use super::record::{seal, Header, HEADER_LEN, MAX_BODY, TAG_LEN};
use super::recover::recover;
use super::segment::{fsync_dir, list_segments, segment_path, State};
use super::LedgerConfig;

/// NIST SP 800-38D bounds GCM invocations per key at 2^32 for random IVs; our IVs are
/// deterministic (no such bound), but we stay far below it anyway and require a rotation.
pub(crate) const KEY_USE_LIMIT: u64 = 1 << 31;
const KEY_USE_WARN: u64 = 1 << 30;
/// Key uses are reserved on disk ahead of use in chunks, so counting costs one state write per
/// chunk instead of one per record; a crash wastes at most one chunk of the budget.
const RESERVE_CHUNK: u64 = 1 << 20;
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// With retention on, the active segment is closed once its oldest record
/// is this old, whatever its size: only closed segments are purged, and at
/// a low rate a segment would otherwise stay open, and its records kept,
/// for months past the retention period. A record is then deleted at most
/// this long after its retention ends.
pub(crate) const SEGMENT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Stores `now` in `cell`; whether it held 0 before.
fn gauge_was_zero(cell: &AtomicI64, now: i64) -> bool {
    cell.swap(now, Ordering::Relaxed) == 0
}

/// How far a record's time may fall behind the latest time the ledger has written (callers
/// stamp records before they queue, so a little disorder is normal) before the wall clock is
/// taken to have gone back: then the record's header carries that latest time instead.
pub(crate) const CLOCK_TOLERANCE: Duration = Duration::from_secs(5 * 60);

pub(crate) type Ack = oneshot::Sender<Result<u64, LedgerError>>;

/// A queued record; its plaintext is the next `len` bytes of its batch's `bytes`.
pub(crate) struct Pending {
    pub entry_type: u8,
    pub time_us: i64,
    pub blind: [u8; 32],
    pub len: usize,
    pub ack: Option<Ack>,
    /// Its place in the queue (see [`super::Ticket`]); 0 for what the writer adds itself.
    pub pos: u64,
}

/// Records in queue order, their plaintexts back to back in one buffer: a
/// record costs no allocation of its own, and no buffer is allocated on a
/// session's thread to be freed on the writer's (glibc's slow path; the
/// sixteenth session's profile of a flood, bench/HISTORY.md).
#[derive(Default)]
pub(crate) struct Batch {
    pub items: Vec<Pending>,
    pub bytes: Vec<u8>,
}

impl Batch {
    /// Appends one record whose plaintext `encode` appends to `bytes`.
    pub fn push(
        &mut self,
        entry_type: u8,
        time_us: i64,
        blind: [u8; 32],
        ack: Option<Ack>,
        pos: u64,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), LedgerError> {
        let start = self.bytes.len();
        encode(&mut self.bytes);
        let len = self.bytes.len() - start;
        if len + HEADER_LEN + TAG_LEN > MAX_BODY {
            self.bytes.truncate(start);
            return Err(LedgerError::Config(format!(
                "record of {len} bytes exceeds the ledger's {MAX_BODY}-byte limit"
            )));
        }
        self.items.push(Pending {
            entry_type,
            time_us,
            blind,
            len,
            ack,
            pos,
        });
        Ok(())
    }

    /// Empties the batch for reuse. A burst (a backlog while the disk was
    /// slow) does not stay allocated: past these sizes the buffers go.
    fn clear(&mut self) {
        const KEEP_ITEMS: usize = 1 << 16;
        const KEEP_BYTES: usize = 16 << 20;
        self.items.clear();
        self.bytes.clear();
        if self.items.capacity() > KEEP_ITEMS {
            self.items = Vec::new();
        }
        if self.bytes.capacity() > KEEP_BYTES {
            self.bytes = Vec::new();
        }
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[derive(Default)]
pub(crate) struct Queue {
    pub records: Batch,
    /// The place of the last record callers queued: places count from 1.
    pub pushed: u64,
    pub shutdown: bool,
    pub failed: Option<String>,
    pub flush_blocked: bool,
    /// A closed segment's summary arrived from the scanner: retention can go on.
    pub purge_ready: bool,
}

pub(crate) struct Shared {
    pub queue: Mutex<Queue>,
    pub cv: Condvar,
    pub healthy: AtomicBool,
    pub durable_seq: AtomicU64,
    /// The place in the queue (see [`super::Ticket`]) up to which every record is fsynced.
    pub durable_pos: AtomicU64,
    /// Woken when `durable_pos` rises, the ledger fails or the writer is gone.
    pub durable_notify: tokio::sync::Notify,
    /// Set when the writer thread has ended, however it ended.
    pub writer_gone: AtomicBool,
    /// How far (µs) the wall clock was behind [`Writer`]'s time high-water mark when last
    /// looked at; 0 when it was not.
    pub clock_behind_us: AtomicI64,
    /// How far (µs) the wall clock ran ahead of the time passed since the writer opened, when
    /// retention last looked; 0 when it had not.
    pub clock_jumped_us: AtomicI64,
    pub blocked: Aggregator,
    pub keys: Keyring,
    pub cfg: LedgerConfig,
    /// Test hook: swap the segment handle for /dev/full to get a real ENOSPC from the kernel.
    #[cfg(test)]
    pub fault_dev_full: AtomicBool,
    /// Test hook: added to the wall clock the writer reads (µs).
    #[cfg(test)]
    pub clock_skew_us: AtomicI64,
}

impl Shared {
    /// The wall clock, as the writer reads it (µs since the epoch).
    pub fn now_us(&self) -> i64 {
        let now = Utc::now().timestamp_micros();
        #[cfg(test)]
        let now = now + self.clock_skew_us.load(Ordering::Relaxed);
        now
    }
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic elsewhere while holding the lock leaves the queue consistent (pushes and
        // drains are single operations), so keep going rather than propagate the poison.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues one record (see [`Batch::push`]); the plaintext is encoded
    /// under the queue's lock, straight into the queue. Returns its place.
    pub fn push(
        &self,
        entry_type: u8,
        time_us: i64,
        blind: [u8; 32],
        ack: Option<Ack>,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<u64, LedgerError> {
        let mut q = self.lock();
        if let Some(reason) = &q.failed {
            return Err(LedgerError::Unhealthy(reason.clone()));
        }
        if q.shutdown {
            return Err(LedgerError::Closed);
        }
        if q.records.items.len() >= self.cfg.max_pending {
            return Err(LedgerError::Overloaded);
        }
        let was_empty = q.records.is_empty();
        let pos = q.pushed + 1;
        q.records
            .push(entry_type, time_us, blind, ack, pos, encode)?;
        q.pushed = pos;
        drop(q);
        // The writer only sleeps on an empty queue, so only the first push needs to wake it.
        if was_empty {
            self.cv.notify_one();
        }
        Ok(pos)
    }

    /// Why records that are not durable yet never will be, if that is so.
    pub fn stopped(&self) -> Option<LedgerError> {
        if !self.healthy.load(Ordering::Acquire) {
            // `failed` is set just after `healthy` is cleared.
            let reason = self.lock().failed.clone();
            let reason = reason.unwrap_or_else(|| "the ledger failed".into());
            return Some(LedgerError::Unhealthy(reason));
        }
        self.writer_gone
            .load(Ordering::Acquire)
            .then_some(LedgerError::Closed)
    }

    pub fn request_shutdown(&self) {
        self.lock().shutdown = true;
        self.cv.notify_all();
    }

    pub fn request_blocked_flush(&self) {
        self.lock().flush_blocked = true;
        self.cv.notify_one();
    }
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    dir: PathBuf,
    seg: File,
    seg_first: u64,
    seg_size: u64,
    /// The newest record time in the active segment (µs), for retention once it is closed.
    seg_newest: i64,
    /// Oldest record time in the active segment (µs); `i64::MAX` when empty.
    seg_oldest: i64,
    purger: Purger,
    next_seq: u64,
    head: [u8; 32],
    cp: CheckpointLog,
    last_cp_seq: u64,
    boot: u32,
    nonce_ctr: u64,
    state: State,
    active_key: u32,
    key_used: u64,
    buf: Vec<u8>,
    acks: Vec<(u64, Ack)>,
    spare: Batch,
    last_blocked_flush: Instant,
    last_purge: Option<Instant>,
    /// The latest record time (µs) the ledger has written, persisted in `state.json` and raised
    /// at open to the newest record in the newest segment and the latest checkpoint's time.
    /// Record headers never carry a time more than [`CLOCK_TOLERANCE`] below it.
    time_hwm: i64,
    /// The wall clock (µs) and the monotonic one when the writer opened: retention's clock runs
    /// no faster than the time that has passed since (see [`Writer::purge_now`]).
    opened: (i64, Instant),
}

fn open_append(path: &std::path::Path, create_new: bool) -> Result<File, LedgerError> {
    let mut o = OpenOptions::new();
    super::owner_only(&mut o).append(true);
    if create_new {
        o.create_new(true);
    }
    o.open(path)
        .map_err(|e| LedgerError::io(format!("open segment {}", path.display()), e))
}

impl Writer {
    /// Recovers the directory, bumps the boot counter durably and prepares the writer.
    pub fn open(shared: Arc<Shared>) -> Result<Writer, LedgerError> {
        let cfg = &shared.cfg;
        let dir = cfg.dir.clone();
        crate::secrets::create_private_dir(&dir)
            .map_err(|e| LedgerError::io(format!("create {}", dir.display()), e))?;
        let cps = checkpoint::load(&dir)?;
        let rec = recover(&dir, &shared.keys, &cps)?;

        let mut state = State::load(&dir)?;
        let boot = state
            .boot
            .max(rec.max_boot)
            .checked_add(1)
            .ok_or_else(|| LedgerError::Config("boot counter exhausted".into()))?;
        let active_key = shared.keys.active_key_id().0;
        let key_used = state.key_uses.get(&active_key).copied().unwrap_or(0);
        if key_used >= KEY_USE_LIMIT {
            return Err(LedgerError::KeyExhausted(active_key));
        }
        state.boot = boot;
        state.key_uses.insert(active_key, key_used + RESERVE_CHUNK);
        // A crash loses what was not stored yet, but not the newest segment's records; and each
        // checkpoint holds the writer's clock when it was signed (at each stop, each purge), so
        // a ledger whose records were all purged still knows how late it has been.
        let cp_newest = cps.lines.iter().flatten().map(|c| c.time_us).max();
        state.time_hwm_us = state
            .time_hwm_us
            .max(rec.newest_us)
            .max(cp_newest.unwrap_or(i64::MIN));
        let time_hwm = state.time_hwm_us;
        state.store(&dir)?;

        let cp = CheckpointLog::open(&dir, cps.torn_at)?;
        let wake = {
            let shared = Arc::downgrade(&shared);
            Arc::new(move || {
                if let Some(shared) = shared.upgrade() {
                    shared.lock().purge_ready = true;
                    shared.cv.notify_one();
                }
            })
        };
        let (seg, seg_first, seg_size) = match rec.active {
            Some((first, path, size)) => (open_append(&path, false)?, first, size),
            None => {
                let path = segment_path(&dir, rec.next_seq);
                let f = open_append(&path, true)?;
                fsync_dir(&dir)?;
                (f, rec.next_seq, 0)
            }
        };
        shared
            .durable_seq
            .store(rec.next_seq.saturating_sub(1), Ordering::Release);
        tracing::info!(
            dir = %dir.display(),
            boot,
            next_seq = rec.next_seq,
            key_id = active_key,
            "ledger opened"
        );
        let signed_head = cps
            .lines
            .iter()
            .flatten()
            .any(|c| c.seq == rec.next_seq - 1);
        let mut writer = Writer {
            dir,
            seg,
            seg_first,
            seg_size,
            seg_newest: rec.newest_us,
            seg_oldest: rec.oldest_us,
            purger: Purger::new(wake),
            next_seq: rec.next_seq,
            head: rec.head,
            cp,
            last_cp_seq: cps.max_seq(),
            boot,
            nonce_ctr: 0,
            state,
            active_key,
            key_used,
            buf: Vec::with_capacity(1 << 20),
            acks: Vec::new(),
            spare: Batch::default(),
            last_blocked_flush: Instant::now(),
            last_purge: None,
            time_hwm,
            opened: (shared.now_us(), Instant::now()),
            shared,
        };
        // The head of a closed ledger is always signed: a new ledger gets a checkpoint at seq 0,
        // and records a crash left after the last checkpoint are signed once recovery accepted
        // them. So `verify` can tell a removed checkpoint file, and an unsigned head means a
        // crash since the last start, nothing else.
        if !signed_head {
            writer.checkpoint()?;
        }
        Ok(writer)
    }

    pub fn run(mut self) {
        if let Err(e) = self.run_inner() {
            self.fail(e);
        }
    }

    fn run_inner(&mut self) -> Result<(), LedgerError> {
        loop {
            let (mut batch, shutting_down, flush_req, purge_ready) = self.next_batch();
            let flush_due =
                self.last_blocked_flush.elapsed() >= self.shared.cfg.blocked_flush_every;
            if shutting_down || flush_req || flush_due {
                self.last_blocked_flush = Instant::now();
                for b in self.shared.blocked.take() {
                    let e = Entry::Blocked(b);
                    let plaintext = e.encode()?;
                    batch.push(
                        e.type_byte(),
                        e.time().timestamp_micros(),
                        self.shared.keys.blind_index(e.user()),
                        None,
                        0,
                        |out| out.extend_from_slice(&plaintext),
                    )?;
                }
            }
            if !batch.is_empty() {
                self.commit(&mut batch)?;
            }
            self.spare = batch;
            if self.next_seq
                > self
                    .last_cp_seq
                    .saturating_add(self.shared.cfg.checkpoint_every)
            {
                self.checkpoint()?;
            }
            if self.shared.cfg.retention.is_some()
                && (purge_ready || self.last_purge.is_none_or(|t| t.elapsed() >= PURGE_EVERY))
            {
                self.last_purge = Some(Instant::now());
                self.purge()?;
            }
            if shutting_down {
                if self.next_seq - 1 > self.last_cp_seq {
                    self.checkpoint()?;
                }
                self.state.key_uses.insert(self.active_key, self.key_used);
                self.state.time_hwm_us = self.time_hwm;
                self.state.store(&self.dir)?;
                tracing::info!(head_seq = self.next_seq - 1, "ledger closed");
                return Ok(());
            }
        }
    }

    /// Waits for work and takes up to `max_batch` queued records.
    fn next_batch(&mut self) -> (Batch, bool, bool, bool) {
        let shared = Arc::clone(&self.shared);
        let cfg = &shared.cfg;
        let mut q = shared.lock();
        loop {
            if !q.records.is_empty() || q.shutdown || q.flush_blocked || q.purge_ready {
                break;
            }
            let mut wait = cfg
                .blocked_flush_every
                .saturating_sub(self.last_blocked_flush.elapsed());
            if cfg.retention.is_some() {
                let purge_in = self
                    .last_purge
                    .map_or(Duration::ZERO, |t| PURGE_EVERY.saturating_sub(t.elapsed()));
                wait = wait.min(purge_in);
            }
            if wait.is_zero() {
                break;
            }
            q = shared
                .cv
                .wait_timeout(q, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let flush_req = std::mem::take(&mut q.flush_blocked);
        let purge_ready = std::mem::take(&mut q.purge_ready);
        let mut batch = std::mem::take(&mut self.spare);
        batch.clear();
        if q.records.items.len() <= cfg.max_batch {
            std::mem::swap(&mut q.records, &mut batch);
        } else {
            let cut: usize = q.records.items[..cfg.max_batch].iter().map(|p| p.len).sum();
            batch.items.extend(q.records.items.drain(..cfg.max_batch));
            batch.bytes.extend(q.records.bytes.drain(..cut));
        }
        let shutting_down = q.shutdown && q.records.is_empty();
        (batch, shutting_down, flush_req, purge_ready)
    }

    fn next_nonce(&mut self) -> Result<[u8; 12], LedgerError> {
        self.key_used += 1;
        if self.key_used > KEY_USE_LIMIT {
            return Err(LedgerError::KeyExhausted(self.active_key));
        }
        if self.key_used == KEY_USE_WARN {
            tracing::warn!(
                key_id = self.active_key,
                "ledger data key is halfway to its encryption limit; rotate the keyring"
            );
        }
        let reserved = self
            .state
            .key_uses
            .get(&self.active_key)
            .copied()
            .unwrap_or(0);
        if self.key_used > reserved {
            self.state
                .key_uses
                .insert(self.active_key, self.key_used + RESERVE_CHUNK);
            self.state.time_hwm_us = self.time_hwm;
            self.state.store(&self.dir)?;
        }
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.boot.to_be_bytes());
        n[4..].copy_from_slice(&self.nonce_ctr.to_be_bytes());
        self.nonce_ctr = self
            .nonce_ctr
            .checked_add(1)
            .ok_or(LedgerError::KeyExhausted(self.active_key))?;
        Ok(n)
    }

    fn commit(&mut self, batch: &mut Batch) -> Result<(), LedgerError> {
        self.watch_clock(self.shared.now_us());
        self.buf.clear();
        self.acks.clear();
        let n = batch.items.len();
        let last_pos = batch
            .items
            .iter()
            .rev()
            .find_map(|p| (p.pos > 0).then_some(p.pos));
        let mut items = batch.items.drain(..);
        let mut plaintexts = &mut batch.bytes[..];
        let res = (|| {
            for p in items.by_ref() {
                if let Some(ack) = p.ack {
                    self.acks.push((self.next_seq, ack));
                }
                let time_us = self.ledger_time(p.entry_type, p.time_us);
                let pending_bytes = self.seg_size + self.buf.len() as u64;
                if (pending_bytes >= self.shared.cfg.segment_bytes && pending_bytes > 0)
                    || self.segment_too_old(time_us)
                {
                    self.flush_buf()?;
                    self.rotate()?;
                }
                self.seg_newest = self.seg_newest.max(time_us);
                self.seg_oldest = self.seg_oldest.min(time_us);
                let header = Header {
                    entry_type: p.entry_type,
                    seq: self.next_seq,
                    time_us,
                    key_id: self.active_key,
                    nonce: self.next_nonce()?,
                    blind: p.blind,
                    prev: self.head,
                };
                let (pt, rest) = std::mem::take(&mut plaintexts).split_at_mut(p.len);
                plaintexts = rest;
                self.head = seal(&self.shared.keys, &header, pt, &mut self.buf)?;
                self.next_seq += 1;
            }
            self.flush_buf()
        })();
        if let Err(e) = res {
            // Everyone in this batch must hear about the failure, not just a dropped channel.
            for p in items {
                if let Some(ack) = p.ack {
                    self.acks.push((0, ack));
                }
            }
            return Err(e);
        }
        drop(items);
        self.shared
            .durable_seq
            .store(self.next_seq - 1, Ordering::Release);
        if let Some(pos) = last_pos {
            self.shared.durable_pos.store(pos, Ordering::Release);
            self.shared.durable_notify.notify_waiters();
        }
        metrics::counter!(crate::metrics::LEDGER_APPENDS).increment(n as u64);
        metrics::histogram!(crate::metrics::LEDGER_BATCH_SIZE).record(n as f64);
        for (seq, ack) in self.acks.drain(..) {
            let _ = ack.send(Ok(seq));
        }
        Ok(())
    }

    /// One write and one `sync_data` for everything encoded since the last flush.
    fn flush_buf(&mut self) -> Result<(), LedgerError> {
        #[cfg(test)]
        if self.shared.fault_dev_full.load(Ordering::Relaxed) {
            if let Ok(f) = OpenOptions::new().write(true).open("/dev/full") {
                self.seg = f;
            }
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        self.seg
            .write_all(&self.buf)
            .map_err(|e| LedgerError::io("append to segment", e))?;
        self.seg_size += self.buf.len() as u64;
        self.buf.clear();
        let t = Instant::now();
        self.seg
            .sync_data()
            .map_err(|e| LedgerError::io("fsync segment", e))?;
        metrics::histogram!(crate::metrics::LEDGER_FSYNC_SECONDS).record(t.elapsed().as_secs_f64());
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), LedgerError> {
        let path = segment_path(&self.dir, self.next_seq);
        let f = open_append(&path, true)?;
        // The new file's directory entry must be durable before records in it are acknowledged.
        fsync_dir(&self.dir)?;
        // Everything up to here is flushed: the closing segment ends at the chain's head.
        let last = (self.next_seq > self.seg_first).then_some((self.next_seq - 1, self.head));
        self.purger.closed(
            self.seg_first,
            Summary {
                newest_us: self.seg_newest,
                last,
                clean: true,
            },
        );
        self.seg_newest = i64::MIN;
        self.seg_oldest = i64::MAX;
        self.seg = f;
        self.seg_first = self.next_seq;
        self.seg_size = 0;
        // Give retention a chance right after a segment closes.
        self.last_purge = None;
        Ok(())
    }

    /// The time a record's header carries, the one retention and time ranges go by: the time
    /// its caller stamped, unless that is more than [`CLOCK_TOLERANCE`] before the latest time
    /// the ledger has written. Then the wall clock went back (or stood behind when the record
    /// was stamped), and a record written minutes ago would look as old as the clock was wrong
    /// and be purged that much early once the clock is right again: it gets that latest time.
    /// Counts of refused deliveries are stamped with the start of their hour and keep it. The
    /// record's own (encrypted) time, which history shows, is left as its caller stamped it.
    fn ledger_time(&mut self, entry_type: u8, time_us: i64) -> i64 {
        let behind = self.time_hwm.saturating_sub(time_us);
        let time_us = if entry_type != Entry::BLOCKED && behind > CLOCK_TOLERANCE.as_micros() as i64
        {
            self.time_hwm
        } else {
            time_us
        };
        self.time_hwm = self.time_hwm.max(time_us);
        time_us
    }

    /// Says when the wall clock is behind the latest time the ledger has written by more than
    /// [`CLOCK_TOLERANCE`] (once when it falls behind, once when it has caught up), and
    /// exports by how much.
    fn watch_clock(&mut self, now_us: i64) {
        let behind = self.time_hwm.saturating_sub(now_us);
        let behind = if behind > CLOCK_TOLERANCE.as_micros() as i64 {
            behind
        } else {
            0
        };
        let was = self.shared.clock_behind_us.swap(behind, Ordering::Relaxed);
        if behind > 0 && was == 0 {
            tracing::error!(
                behind_secs = behind / 1_000_000,
                ledger_time = %chrono::DateTime::from_timestamp_micros(self.time_hwm)
                    .unwrap_or_default(),
                "the wall clock is behind the latest time the share ledger has written: it was \
                 set back, or was ahead before. New records are stamped with that latest time \
                 until the clock passes it, so they are kept past retention by as much. Check \
                 the clock (NTP)"
            );
        } else if behind == 0 && was > 0 {
            tracing::info!("the wall clock has caught up with the share ledger's time");
        }
        metrics::gauge!(crate::metrics::LEDGER_CLOCK_BEHIND).set(behind as f64 / 1e6);
    }

    /// The time retention goes by: the wall clock, but no later than it was when the writer
    /// opened plus the time that has passed since (and [`CLOCK_TOLERANCE`]). A clock stepped
    /// forward while running (a wrong NTP step) would otherwise delete records as old as the
    /// step, within a minute and for good. What it cannot tell: a step while consentry was
    /// stopped, which looks like a long stop; and a clock set right after it was behind, whose
    /// purges wait for the next start.
    fn purge_now(&mut self) -> i64 {
        let wall = self.shared.now_us();
        let (opened_wall, opened_at) = self.opened;
        let passed = i64::try_from(opened_at.elapsed().as_micros()).unwrap_or(i64::MAX);
        let steady = opened_wall
            .saturating_add(passed)
            .saturating_add(CLOCK_TOLERANCE.as_micros() as i64);
        let jumped = wall.saturating_sub(steady).max(0);
        let gauge = metrics::gauge!(crate::metrics::LEDGER_CLOCK_JUMPED);
        if jumped > 0 {
            if gauge_was_zero(&self.shared.clock_jumped_us, jumped) {
                tracing::error!(
                    ahead_secs = jumped / 1_000_000,
                    "the wall clock ran ahead of the time that has passed since the share ledger \
                     opened (stepped forward?): retention goes by the time that has passed, so \
                     nothing is deleted early; check the clock (NTP). A restart takes the clock \
                     as it is then"
                );
            }
            gauge.set(jumped as f64 / 1e6);
            steady
        } else {
            if !gauge_was_zero(&self.shared.clock_jumped_us, 0) {
                tracing::info!("the wall clock is back in step with the share ledger's");
            }
            gauge.set(0.0);
            wall
        }
    }

    fn checkpoint(&mut self) -> Result<(), LedgerError> {
        let seq = self.next_seq - 1;
        let cp = Checkpoint::sign(&self.shared.keys, seq, self.head, self.shared.now_us());
        self.cp.append(&cp)?;
        self.last_cp_seq = seq;
        Ok(())
    }

    /// Whether the active segment, holding records, is to be closed before one of `now_us` is
    /// added: retention only purges closed segments.
    fn segment_too_old(&self, now_us: i64) -> bool {
        self.shared.cfg.retention.is_some()
            && self.seg_oldest != i64::MAX
            && now_us.saturating_sub(self.seg_oldest) >= SEGMENT_MAX_AGE.as_micros() as i64
    }

    /// Deletes closed segments whose records are all older than the retention period. Before a
    /// segment goes, a checkpoint is signed at its last record so verification can start from it.
    /// An active segment too old to stay open is closed first, so that a ledger that sees few or
    /// no new records still forgets on time.
    fn purge(&mut self) -> Result<(), LedgerError> {
        let Some(retention) = self.shared.cfg.retention else {
            return Ok(());
        };
        let now = self.shared.now_us();
        self.watch_clock(now);
        if self.segment_too_old(now) {
            self.rotate()?;
        }
        let Ok(retention) = chrono::TimeDelta::from_std(retention) else {
            return Ok(());
        };
        // Deleting is upkeep, not a record: a failure (out of file
        // descriptors for a moment, say) keeps records longer and is tried
        // again at the next tick, but does not stop deliveries.
        if let Err(e) = self.purge_closed(retention) {
            tracing::error!(error = %e, "could not delete records past retention; trying again");
            metrics::counter!(crate::metrics::LEDGER_PURGE_FAILURES).increment(1);
        }
        Ok(())
    }

    /// Deletes the closed segments whose records are all past `retention`.
    fn purge_closed(&mut self, retention: chrono::TimeDelta) -> Result<(), LedgerError> {
        #[cfg(test)]
        if self.dir.join("test-fail-purge").exists() {
            return Err(LedgerError::io(
                "purge (test fault)",
                std::io::Error::other("test fault"),
            ));
        }
        let cutoff = self
            .purge_now()
            .saturating_sub(retention.num_microseconds().unwrap_or(i64::MAX));
        for (first, path) in list_segments(&self.dir)? {
            if first >= self.seg_first {
                break;
            }
            let Some(summary) = self.purger.summary(first, &path) else {
                // Being read on the scanner thread; it wakes us when done.
                break;
            };
            // Damaged history is evidence; leave it for verify_dir to report.
            if !summary.clean || summary.newest_us >= cutoff {
                break;
            }
            if let Some((seq, hash)) = summary.last {
                let cp = Checkpoint::sign(&self.shared.keys, seq, hash, self.shared.now_us());
                self.cp.append(&cp)?;
            }
            std::fs::remove_file(&path)
                .map_err(|e| LedgerError::io(format!("purge {}", path.display()), e))?;
            fsync_dir(&self.dir)?;
            self.purger.forget(first);
            tracing::info!(segment = %path.display(), "purged segment past retention");
        }
        Ok(())
    }

    fn fail(&mut self, e: LedgerError) {
        let msg = e.to_string();
        tracing::error!(error = %msg, "ledger write failed; failing closed");
        metrics::counter!(crate::metrics::LEDGER_APPEND_FAILURES).increment(1);
        self.shared.healthy.store(false, Ordering::SeqCst);
        metrics::gauge!(crate::metrics::LEDGER_HEALTHY).set(0.0);
        let queued = {
            let mut q = self.shared.lock();
            q.failed = Some(msg.clone());
            std::mem::take(&mut q.records).items
        };
        for (_, ack) in self.acks.drain(..) {
            let _ = ack.send(Err(LedgerError::Unhealthy(msg.clone())));
        }
        for p in queued {
            if let Some(ack) = p.ack {
                let _ = ack.send(Err(LedgerError::Unhealthy(msg.clone())));
            }
        }
        self.shared.durable_notify.notify_waiters();
    }
}

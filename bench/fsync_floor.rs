//! How long does the ledger's fsync take on this machine, idle and while its
//! cores are busy? Not consentry's code: the append and `fdatasync` the
//! ledger's writer makes once per group commit, timed alone, so that the e2e
//! harness's added p99 at half of max has a floor to be read against
//! (bench/HISTORY.md, twentieth session). Every personal delivery waits for
//! its record's fsync (invariant 2), so a delivery's latency holds at least
//! the fsync of its group commit.
//!
//! Five phases, one after the other: the machine idle; one thread spinning
//! per core at normal priority, as consentry and the load generator keep the
//! cores busy at half of max; the same spinners at nice 19, the lowest
//! priority, which the kernel gives way to anything else. Idle and busy, the
//! commit is also written over a pre-zeroed file instead of appended (see
//! [`Write`]): what the ledger could do, not what it does.
//!
//! `cargo bench --bench fsync_floor` — `CONSENTRY_FSYNC_SECS` sets each
//! phase's length (default 5), `CONSENTRY_FSYNC_BYTES` the bytes a commit
//! appends (default 40 000: the ~135 records of ~300 bytes a commit held at
//! half of max in the twentieth session's e2e run). The file lives under
//! cargo's target directory, on the disk a build's data would be on.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Spins one thread per core until dropped.
struct Spinners {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Spinners {
    fn start(nice: i32) -> Spinners {
        let stop = Arc::new(AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = (0..cores)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    lower_priority(nice);
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        Spinners { stop, threads }
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sets the calling thread's nice value (Linux keeps one per thread).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn lower_priority(nice: i32) {
    if nice != 0 {
        // SAFETY: setpriority takes plain integers; who = 0 is the calling thread.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
        if r != 0 {
            eprintln!(
                "could not set nice {nice}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn lower_priority(nice: i32) {
    if nice != 0 {
        eprintln!("nice {nice} is not set on this platform; the spinners run at normal priority");
    }
}

struct Phase {
    name: &'static str,
    /// Milliseconds, sorted.
    lat: Vec<f64>,
}

impl Phase {
    fn at(&self, q: f64) -> f64 {
        let i = ((self.lat.len() as f64 * q) as usize).min(self.lat.len() - 1);
        self.lat[i]
    }

    fn above(&self, ms: f64) -> usize {
        self.lat.iter().filter(|&&l| l > ms).count()
    }
}

/// How a commit reaches the file.
#[derive(Clone, Copy)]
enum Write {
    /// Appended at the end, as the ledger does: the file grows, so each
    /// `fdatasync` also commits the new size to the file system's journal.
    Append,
    /// Written over a file filled with zeros and synced beforehand (what
    /// databases that recycle their logs do): the size and the block map do
    /// not change, so `fdatasync` only flushes data. Wraps around at its end.
    PreZeroed,
}

const PREZEROED_BYTES: u64 = 64 << 20;

fn run(
    name: &'static str,
    how: Write,
    dir: &std::path::Path,
    bytes: usize,
    secs: f64,
) -> std::io::Result<Phase> {
    let path = dir.join("commits.seg");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    if let Write::PreZeroed = how {
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..PREZEROED_BYTES >> 20 {
            f.write_all(&zeros)?;
        }
        f.sync_all()?;
    }
    let commit = vec![0x5au8; bytes];
    let mut lat = Vec::new();
    let mut at = 0u64;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        let t = Instant::now();
        match how {
            Write::Append => f.write_all(&commit)?,
            Write::PreZeroed => {
                if at + bytes as u64 > PREZEROED_BYTES {
                    at = 0;
                }
                std::os::unix::fs::FileExt::write_all_at(&f, &commit, at)?;
                at += bytes as u64;
            }
        }
        f.sync_data()?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(f);
    std::fs::remove_file(&path)?;
    lat.sort_by(f64::total_cmp);
    Ok(Phase { name, lat })
}

fn main() -> std::io::Result<()> {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let secs: f64 = env_or("CONSENTRY_FSYNC_SECS", 5.0);
    let bytes: usize = env_or("CONSENTRY_FSYNC_BYTES", 40_000);
    let dir = tempfile::Builder::new()
        .prefix("fsync-floor")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    println!(
        "{bytes} bytes + fdatasync per commit, {secs} s per phase, in {}",
        dir.path().display()
    );
    let d = dir.path();
    let mut phases = vec![
        run("idle, appended", Write::Append, d, bytes, secs)?,
        run("idle, pre-zeroed", Write::PreZeroed, d, bytes, secs)?,
    ];
    {
        let _busy = Spinners::start(0);
        phases.push(run("cores busy, appended", Write::Append, d, bytes, secs)?);
        phases.push(run(
            "cores busy, pre-zeroed",
            Write::PreZeroed,
            d,
            bytes,
            secs,
        )?);
    }
    {
        let _busy = Spinners::start(19);
        phases.push(run(
            "cores busy at nice 19, appended",
            Write::Append,
            d,
            bytes,
            secs,
        )?);
    }
    println!("| phase | commits | p50 ms | p99 ms | p999 ms | max ms | > 1 ms | > 5 ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for p in &phases {
        if p.lat.is_empty() {
            println!("| {} | 0 | – | – | – | – | – | – |", p.name);
            continue;
        }
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
            p.name,
            p.lat.len(),
            p.at(0.5),
            p.at(0.99),
            p.at(0.999),
            p.lat[p.lat.len() - 1],
            p.above(1.0),
            p.above(5.0)
        );
    }
    Ok(())
}

//! Durable append throughput of the share ledger.
//!
//! `group_commit`: one tokio task submits N records, then awaits all their `Durable`s, so the
//! writer folds many records into each fsync. `group_commit_tickets`: the same with the path a
//! provider session takes, `queue_share` and one wait for the last record's ticket.
//! `await_each`: the task awaits every record before submitting the next, so each record pays a
//! full fsync — the gap between the two is what group commit buys. Throughput is reported in
//! elements (records) per second.

use std::future::Future;
use std::time::{Duration, Instant};

use chrono::Utc;
use consentry::ledger::{Keyring, Ledger, LedgerConfig, MaskedField, ShareAction, ShareRecord};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio::runtime::Runtime;

fn record(i: u64) -> ShareRecord {
    ShareRecord {
        time: Utc::now(),
        creator: String::new(),
        recipient: "fitcoach".into(),
        user: format!("user-{:05}", i % 10_000),
        device: format!("watch-{:05}", i % 10_000),
        kind: "heart_rate".into(),
        pii_category: "Health".into(),
        purpose: "fitness-coaching".into(),
        action: if i.is_multiple_of(4) {
            ShareAction::Masked {
                fields: vec![MaskedField {
                    field: "location".into(),
                    method: "coarsen".into(),
                }],
            }
        } else {
            ShareAction::Delivered
        },
        payload_digest: [(i % 251) as u8; 32],
        qos: 1,
        receipt_id: Some(format!("rcpt-{:016x}", i / 100)),
    }
}

fn open(dir: &std::path::Path) -> Ledger {
    let keys = Keyring::generate().expect("generate keys");
    let cfg = LedgerConfig {
        dir: dir.to_path_buf(),
        ..LedgerConfig::default()
    };
    Ledger::open(cfg, keys).expect("open ledger")
}

/// Criterion's total for `iters` runs of `run`, each on its own clone of the ledger, timed from
/// the first record queued to the last one durable.
fn timed<F, Fut>(rt: &Runtime, ledger: &Ledger, iters: u64, run: F) -> Duration
where
    F: Fn(Ledger) -> Fut,
    Fut: Future<Output = ()>,
{
    (0..iters)
        .map(|_| {
            let ledger = ledger.clone();
            rt.block_on(async {
                let start = Instant::now();
                run(ledger).await;
                start.elapsed()
            })
        })
        .sum()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    const N: u64 = 100_000;
    let tmp = tempfile::tempdir().expect("tempdir");
    let ledger = open(tmp.path());
    let mut g = c.benchmark_group("ledger_append");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(15))
        .throughput(Throughput::Elements(N));
    g.bench_function("group_commit_100k", |b| {
        b.iter_custom(|iters| {
            timed(&rt, &ledger, iters, |ledger| async move {
                let mut pending = Vec::with_capacity(N as usize);
                for i in 0..N {
                    pending.push(ledger.submit(record(i)).expect("submit"));
                }
                for d in pending {
                    d.await.expect("durable");
                }
            })
        })
    });
    g.bench_function("group_commit_tickets_100k", |b| {
        b.iter_custom(|iters| {
            timed(&rt, &ledger, iters, |ledger| async move {
                let mut last = None;
                for i in 0..N {
                    let r = record(i);
                    last = Some(ledger.queue_share(&r.as_ref()).expect("queue"));
                }
                if let Some(t) = last {
                    ledger.durable(t).await.expect("durable");
                }
            })
        })
    });
    g.finish();

    const M: u64 = 200;
    let mut g = c.benchmark_group("ledger_append");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(M));
    g.bench_function("await_each_200", |b| {
        b.iter_custom(|iters| {
            timed(&rt, &ledger, iters, |ledger| async move {
                for i in 0..M {
                    let d = ledger.submit(record(i)).expect("submit");
                    d.await.expect("durable");
                }
            })
        })
    });
    g.finish();
    rt.block_on(ledger.shutdown());
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Micro-benchmarks of every hot-path part (criterion):
//! ACT decisions with 1M users × 10 providers (alone and while 1k updates/s
//! are applied), one user's change from commit to swap, template
//! resolution, masking per method for JSON and MessagePack, receipt signing.
//! ACT memory per user is printed at start (RSS before/after building it).
//!
//! `cargo bench --bench micro` — `CONSENTRY_BENCH_USERS` overrides 1M.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use consentry::acl::Acl;
use consentry::act::{Act, ActHandle, Delivery, Principal};
use consentry::mask;
use consentry::model::*;
use consentry::topic::{Template, TopicName};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};

const PROVIDERS: usize = 10;

#[path = "users.rs"]
mod users;
use users::users;

/// The shipped kinds (heart_rate, location, steps).
fn kinds() -> Vec<Kind> {
    let cfg: consentry::config::Config =
        toml::from_str(include_str!("../config/consentry.toml")).expect("shipped config parses");
    cfg.kinds
}

fn directory(n: usize) -> Directory {
    let providers = (0..PROVIDERS)
        .map(|p| Provider {
            id: format!("p{p}"),
            name: format!("Provider {p}"),
            role: ProviderRole::Application,
            password_hash: None,
            cert_sha256: None,
            controller: Contact::default(),
            jurisdiction: None,
            privacy_policy: None,
            purposes: vec![Purpose {
                id: "service".into(),
                statement: "s".into(),
                category: PurposeCategory::ContractedService,
                kinds: vec!["heart_rate".into(), "location".into(), "steps".into()],
                core: true,
                retention_days: 365,
                termination: String::new(),
            }],
        })
        .collect();
    let mut dir = Directory {
        providers,
        ..Default::default()
    };
    for i in 0..n {
        dir.users.push(User {
            id: format!("u{i}"),
            time_zone: "Europe/Paris".into(),
            jurisdiction: None,
        });
        dir.devices.push(Device {
            id: format!("d{i}"),
            user: format!("u{i}"),
            password_hash: None,
            cert_sha256: None,
        });
        dir.preferences.push(prefs(i, 0));
    }
    dir
}

/// Gives user `i` new preferences (varied by `salt`) and swaps the ACT.
fn change_user(act: &ActHandle, i: usize, salt: usize) {
    let user = User {
        id: format!("u{i}"),
        time_zone: "Europe/Paris".into(),
        jurisdiction: None,
    };
    let cur = act.load();
    let next = cur
        .with_user(cur.version + 1, &user, Some(&prefs(i, salt)))
        .expect("valid");
    act.store(next);
}

/// User i shares heart_rate with two providers and location masked with one.
fn prefs(i: usize, salt: usize) -> Preferences {
    let mut mask = BTreeMap::new();
    mask.insert("lat".to_string(), MaskMethod::Generalize { decimals: 2 });
    let share = |p: usize, kind: &str, mask: BTreeMap<String, MaskMethod>| ShareGrant {
        provider: format!("p{}", p % PROVIDERS),
        purpose: "service".into(),
        kind: kind.into(),
        mask,
        expires: None,
    };
    Preferences {
        user: format!("u{i}"),
        version: 1,
        collect: ["heart_rate", "location", "steps"]
            .iter()
            .map(|k| CollectGrant {
                kind: k.to_string(),
                windows: vec![],
            })
            .collect(),
        share: vec![
            share(i + salt, "heart_rate", BTreeMap::new()),
            share(i + salt + 1, "heart_rate", BTreeMap::new()),
            share(i + salt + 2, "location", mask),
        ],
        // As with receipts on: every version names its receipt, and the ACT
        // keeps that id in the user's record.
        receipt: Some(uuid::Uuid::from_u128(((salt as u128) << 64) | i as u128).to_string()),
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

struct Loaded {
    act: Arc<ActHandle>,
    n: usize,
}

fn load() -> Loaded {
    let n = users();
    let dir = directory(n);
    let before = rss_bytes();
    let started = Instant::now();
    let act = Act::compile(
        1,
        &["pii/{user}/{device}/{kind}".to_string()],
        &kinds(),
        &dir,
        Acl::deny_all(),
    )
    .expect("compiles");
    let took = started.elapsed();
    let after = rss_bytes();
    drop(dir);
    eprintln!(
        "ACT with {n} users x {PROVIDERS} providers: compiled in {:.2?}, {:.0} bytes of RSS per user (user + device + 3 grants)",
        took,
        after.saturating_sub(before) as f64 / n as f64
    );
    Loaded {
        act: Arc::new(ActHandle::new(act)),
        n,
    }
}

fn decisions(c: &mut Criterion) {
    let Loaded { act, n } = load();
    let topics: Vec<String> = (0..4096)
        .map(|j| {
            let i = (j * 7919) % n;
            format!("pii/u{i}/d{i}/heart_rate")
        })
        .collect();
    let providers: Vec<Principal> = (0..PROVIDERS)
        .map(|p| Principal::Provider {
            id: format!("p{p}"),
        })
        .collect();
    let devices: Vec<Principal> = (0..4096)
        .map(|j| {
            let i = (j * 7919) % n;
            Principal::Device {
                id: format!("d{i}"),
                user: format!("u{i}"),
            }
        })
        .collect();
    let now = Utc::now();
    // The three decisions, for the k-th call: each measured alone and
    // again while updates apply.
    let share = |k: usize| {
        let a = act.load();
        let d = a.deliver(&providers[k % PROVIDERS], &topics[k % topics.len()], now);
        matches!(d, Ok(Delivery::Personal { .. }))
    };
    let collect = |k: usize| {
        let i = k % topics.len();
        // The session checks the name once; that check is part of the decision.
        let name = TopicName::new(&topics[i]).expect("generated topics are valid");
        act.load().ingress(&devices[i], name, now).is_ok()
    };
    let may_subscribe = |k: usize| {
        act.load()
            .subscribe(&providers[k % PROVIDERS], "pii/+/+/heart_rate")
            .is_ok()
    };
    let mut g = c.benchmark_group("act");
    g.measurement_time(Duration::from_secs(4));
    let mut k = 0usize;
    // These cycle through 4096 users, whose records stay in the CPU caches
    // between visits: a busy gateway's recently active users.
    g.bench_function("share (deliver decision), 1M users", |b| {
        b.iter(|| {
            k = k.wrapping_add(1);
            black_box(share(k))
        })
    });
    // The same over 256k users: nearly every lookup misses the caches and
    // the TLB, as for a user not seen for a while.
    let cold: Vec<String> = (0..(1 << 18))
        .map(|j| {
            let i = (j * 104_729) % n;
            format!("pii/u{i}/d{i}/heart_rate")
        })
        .collect();
    g.bench_function(
        "share (deliver decision), 1M users, 256k of them in turn",
        |b| {
            b.iter(|| {
                k = k.wrapping_add(1);
                let a = act.load();
                let d = a.deliver(&providers[k % PROVIDERS], &cold[k % cold.len()], now);
                black_box(matches!(d, Ok(Delivery::Personal { .. })))
            })
        },
    );
    drop(cold);
    g.bench_function("collect (ingress decision), 1M users", |b| {
        b.iter(|| {
            k = k.wrapping_add(1);
            black_box(collect(k))
        })
    });
    g.bench_function("may_subscribe", |b| {
        b.iter(|| {
            k = k.wrapping_add(1);
            black_box(may_subscribe(k))
        })
    });

    // The same decision while another thread applies 1k changes per second.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (act, stop) = (act.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut j = 0usize;
            let mut applied = 0u64;
            // Paced by deadline, not by a sleep after each change, so the
            // change's own time does not lower the rate below 1k/s.
            let mut due = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                change_user(&act, (j * 104_729) % n, j);
                applied += 1;
                j += 1;
                due += Duration::from_millis(1);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            applied
        })
    };
    let started = Instant::now();
    g.bench_function("share (deliver decision) while 1k updates/s apply", |b| {
        b.iter(|| {
            k = k.wrapping_add(1);
            black_box(share(k))
        })
    });
    g.bench_function("collect (ingress decision) while 1k updates/s apply", |b| {
        b.iter(|| {
            k = k.wrapping_add(1);
            black_box(collect(k))
        })
    });
    g.bench_function("may_subscribe while 1k updates/s apply", |b| {
        b.iter(|| {
            k = k.wrapping_add(1);
            black_box(may_subscribe(k))
        })
    });
    stop.store(true, Ordering::Relaxed);
    let applied = writer.join().unwrap_or(0);
    eprintln!(
        "updates applied during those benchmarks: {applied} in {:.1?} ({:.0}/s)",
        started.elapsed(),
        applied as f64 / started.elapsed().as_secs_f64()
    );

    // One user's change: compile that user and swap the snapshot in.
    g.bench_function("one user's change: recompile + swap, 1M users", |b| {
        let mut j = 0usize;
        b.iter(|| {
            j += 1;
            change_user(&act, (j * 7919) % n, j);
        })
    });
    g.finish();
}

fn commit_to_swap(c: &mut Criterion) {
    use consentry::prefs::PreferenceManager;
    use consentry::store::Store;
    let n = users().min(200_000);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("bench.db"), &[7; 32]).unwrap();
    let (pm, _, _) = PreferenceManager::open(
        store,
        vec!["pii/{user}/{device}/{kind}".into()],
        &kinds(),
        vec![],
        directory(n),
        None,
    )
    .unwrap();
    let mut g = c.benchmark_group("preference manager");
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(6));
    let mut j = 0usize;
    let name = format!("change one user: validate + SQLite commit (fsync) + swap, {n} users");
    g.bench_function(&name, |b| {
        b.iter(|| {
            j += 1;
            let i = (j * 7919) % n;
            pm.change(&format!("u{i}"), None, "bench", |p| {
                p.share.retain(|g| g.kind != "steps");
                p.collect.rotate_left(1);
                Ok(())
            })
            .unwrap();
        })
    });
    g.finish();
}

fn hot_path(c: &mut Criterion) {
    let t = Template::parse("pii/{user}/{device}/{kind}").unwrap();
    let mut g = c.benchmark_group("hot path");
    g.bench_function("template resolution", |b| {
        b.iter(|| black_box(t.resolve(black_box("pii/alice/alice-watch/heart_rate"))))
    });
    let json = Bytes::from_static(
        br#"{"lat":48.85661,"lon":2.35222,"trip":"morning-run-17","note":"with Bob"}"#,
    );
    let mut mp = Vec::new();
    rmpv::encode::write_value(
        &mut mp,
        &rmpv::Value::Map(vec![
            ("lat".into(), rmpv::Value::F64(48.85661)),
            ("lon".into(), rmpv::Value::F64(2.35222)),
            ("trip".into(), "morning-run-17".into()),
            ("note".into(), "with Bob".into()),
        ]),
    )
    .unwrap();
    let mp = Bytes::from(mp);
    let key = [7u8; 32];
    let methods = [
        ("remove", MaskMethod::Remove),
        ("redact", MaskMethod::Redact),
        ("generalize", MaskMethod::Generalize { decimals: 2 }),
        ("pseudonymize", MaskMethod::Pseudonymize),
    ];
    for (name, m) in methods {
        let field = if matches!(m, MaskMethod::Generalize { .. }) {
            "lat"
        } else {
            "trip"
        };
        let rules = vec![(field.to_string(), m)];
        g.bench_function(format!("mask {name} json"), |b| {
            b.iter(|| black_box(mask::mask(PayloadFormat::Json, &json, &rules, &key).unwrap()))
        });
        g.bench_function(format!("mask {name} msgpack"), |b| {
            b.iter(|| black_box(mask::mask(PayloadFormat::Msgpack, &mp, &rules, &key).unwrap()))
        });
    }
    let declared = vec!["lat".to_string(), "lon".to_string()];
    let none = BTreeMap::new();
    g.bench_function("minimize json (strip 2 fields)", |b| {
        b.iter(|| {
            black_box(mask::minimize(PayloadFormat::Json, &json, &declared, &none, false).unwrap())
        })
    });
    // The common case at ingress: nothing to strip, every field typed.
    let clean = Bytes::from_static(br#"{"lat":48.8566,"lon":2.3522}"#);
    let typed: BTreeMap<String, FieldType> = declared
        .iter()
        .map(|f| (f.clone(), FieldType::Number))
        .collect();
    g.bench_function("minimize json (clean, untyped)", |b| {
        b.iter(|| {
            black_box(mask::minimize(PayloadFormat::Json, &clean, &declared, &none, false).unwrap())
        })
    });
    g.bench_function("minimize json (clean, 2 typed fields)", |b| {
        b.iter(|| {
            black_box(
                mask::minimize(PayloadFormat::Json, &clean, &declared, &typed, false).unwrap(),
            )
        })
    });
    g.finish();
}

fn receipts(c: &mut Criterion) {
    use consentry::receipt::{receipt_for, Operator, ReceiptKeys};
    let dir = directory(1);
    let keys = ReceiptKeys::generate();
    let op: Operator = toml::from_str(
        r#"name = "bench"
jurisdiction = "FR"
policy_uri = "https://example.org/p"
controller = { company = "C", name = "N", address = "A", email = "e@example.org", phone = "1" }"#,
    )
    .unwrap();
    let mut g = c.benchmark_group("receipts");
    g.bench_function("build + sign (EdDSA JWS)", |b| {
        b.iter_batched(
            || (),
            |_| {
                let r = receipt_for(
                    &op,
                    &dir.users[0],
                    &dir.preferences[0],
                    &dir,
                    &kinds(),
                    Utc::now(),
                )
                .unwrap();
                black_box(keys.sign(&r).unwrap())
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, hot_path, receipts, decisions, commit_to_swap);
criterion_main!(benches);

//! How fast can a share decision be on this machine at all? Not consentry's
//! ACT: the least a share decision must do, in the layout that touches the
//! least memory, so that `micro`'s "share" row has a floor to be read
//! against (bench/HISTORY.md, fourteenth session).
//!
//! The decision is the one `Act::deliver` makes for `micro`'s load: split
//! `pii/{user}/{device}/{kind}`, find the kind, find the user, check the
//! device, find a grant of that kind to the asking provider, check its
//! expiry, read the receipt id. Every user's record is one cache line
//! (open addressing, linear probing, ids inline): one line a lookup when
//! the user sits in its home slot, which is what the slot count buys.
//! What it leaves out is what a real table needs: ids longer than 12
//! bytes, more than one device or four grants, collection windows,
//! changes without a full rebuild.
//!
//! `cargo bench --bench act_floor` — `CONSENTRY_BENCH_USERS` overrides 1M;
//! run it again under `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` for huge pages.

use std::hash::BuildHasher;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};

const PROVIDERS: usize = 10;
const KINDS: [&str; 3] = ["heart_rate", "location", "steps"];

#[path = "users.rs"]
mod users;
use users::users;

/// A user's whole record in one cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Default)]
struct Slot {
    /// High half of the id's hash, never 0: 0 marks a free slot.
    tag: u32,
    user_len: u8,
    device_len: u8,
    grants_len: u8,
    user: [u8; 13],
    device: [u8; 12],
    /// provider index | kind id << 8 | rule index << 16
    grants: [u32; 4],
    receipt: [u8; 16],
}

const _: () = assert!(std::mem::size_of::<Slot>() == 64);

struct Rule {
    masked: bool,
    expires: Option<i64>,
}

struct Table {
    slots: Vec<Slot>,
    rules: Vec<Rule>,
    providers: Vec<String>,
    hasher: foldhash::quality::RandomState,
}

fn inline<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0; N];
    out[..s.len()].copy_from_slice(s.as_bytes());
    out
}

impl Table {
    /// `per_user` slots for each user: more slots, shorter probes.
    fn new(users: usize, per_user: f64) -> Table {
        let len = ((users as f64 * per_user) as usize).max(users + 1);
        Table {
            slots: vec![Slot::default(); len],
            rules: vec![
                Rule {
                    masked: false,
                    expires: None,
                },
                Rule {
                    masked: true,
                    expires: None,
                },
            ],
            providers: (0..PROVIDERS).map(|p| format!("p{p}")).collect(),
            hasher: foldhash::quality::RandomState::default(),
        }
    }

    fn home(&self, user: &[u8]) -> (u32, usize) {
        let h = self.hasher.hash_one(user);
        // Range reduction by multiplication: any table length, no modulo.
        let at = ((u128::from(h) * self.slots.len() as u128) >> 64) as usize;
        ((h >> 32) as u32 | 1, at)
    }

    fn insert(&mut self, user: &str, device: &str, grants: &[u32], receipt: [u8; 16]) {
        let (tag, mut at) = self.home(user.as_bytes());
        while self.slots[at].tag != 0 {
            at = (at + 1) % self.slots.len();
        }
        let mut g = [0; 4];
        g[..grants.len()].copy_from_slice(grants);
        self.slots[at] = Slot {
            tag,
            user_len: user.len() as u8,
            device_len: device.len() as u8,
            grants_len: grants.len() as u8,
            user: inline(user),
            device: inline(device),
            grants: g,
            receipt,
        };
    }

    fn find(&self, user: &[u8]) -> Option<&Slot> {
        let (tag, mut at) = self.home(user);
        loop {
            let s = &self.slots[at];
            if s.tag == tag && &s.user[..usize::from(s.user_len)] == user {
                return Some(s);
            }
            if s.tag == 0 {
                return None;
            }
            at = (at + 1) % self.slots.len();
        }
    }

    fn share(&self, provider: &str, topic: &str, now: i64) -> Option<(bool, [u8; 16])> {
        let rest = topic.strip_prefix("pii/")?.as_bytes();
        let a = memchr::memchr(b'/', rest)?;
        let (user, rest) = (&rest[..a], &rest[a + 1..]);
        let b = memchr::memchr(b'/', rest)?;
        let (device, kind) = (&rest[..b], &rest[b + 1..]);
        if user.is_empty() || device.is_empty() || memchr::memchr(b'/', kind).is_some() {
            return None;
        }
        let kind = KINDS.iter().position(|k| k.as_bytes() == kind)? as u32;
        let s = self.find(user)?;
        if &s.device[..usize::from(s.device_len)] != device {
            return None;
        }
        let g = s.grants[..usize::from(s.grants_len)].iter().find(|&&g| {
            (g >> 8) & 0xff == kind && self.providers[(g & 0xff) as usize] == provider
        })?;
        let rule = &self.rules[(g >> 16) as usize];
        if rule.expires.is_some_and(|e| e <= now) {
            return None;
        }
        Some((rule.masked, s.receipt))
    }
}

/// `micro`'s load: user i shares heart_rate with providers i and i+1 and
/// location, masked, with i+2 (mod 10).
fn load(n: usize, per_user: f64) -> Table {
    let mut t = Table::new(n, per_user);
    for i in 0..n {
        let grant =
            |p: usize, kind: u32, rule: u32| (p % PROVIDERS) as u32 | kind << 8 | rule << 16;
        let grants = [grant(i, 0, 0), grant(i + 1, 0, 0), grant(i + 2, 1, 1)];
        t.insert(
            &format!("u{i}"),
            &format!("d{i}"),
            &grants,
            (i as u128).to_le_bytes(),
        );
    }
    t
}

fn floor(c: &mut Criterion) {
    let n = users();
    // The same 4 096 users in turn as `micro`'s share benchmark.
    let topics: Vec<String> = (0..4096)
        .map(|j| {
            let i = (j * 7919) % n;
            format!("pii/u{i}/d{i}/heart_rate")
        })
        .collect();
    let providers: Vec<String> = (0..PROVIDERS).map(|p| format!("p{p}")).collect();
    let mut g = c.benchmark_group("act floor");
    g.measurement_time(Duration::from_secs(4));
    for per_user in [1.25, 2.0, 4.0] {
        let table = load(n, per_user);
        // The floor must decide what the load says: heart_rate goes to
        // providers i and i+1 only.
        for k in 0..4096 * PROVIDERS {
            let (i, p) = ((k % 4096 * 7919) % n, k % PROVIDERS);
            let decided = table.share(&providers[p], &topics[k % 4096], 0);
            let granted = p == i % PROVIDERS || p == (i + 1) % PROVIDERS;
            assert_eq!(decided.is_some(), granted, "floor table decides wrongly");
        }
        let bytes = per_user * std::mem::size_of::<Slot>() as f64;
        let mut k = 0usize;
        g.bench_function(
            format!("share, {n} users, one line each, {bytes:.0} B of slots a user"),
            |b| {
                b.iter(|| {
                    k = k.wrapping_add(1);
                    black_box(table.share(
                        black_box(&providers[k % PROVIDERS]),
                        black_box(&topics[k % 4096]),
                        0,
                    ))
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, floor);
criterion_main!(benches);

//! The access control table (X.1363 10.1): preferences compiled into an
//! immutable snapshot that answers the three questions the gateway asks on
//! its hot path:
//!
//! * `ingress`   — may this client publish this topic now? (collection)
//! * `subscribe` — may this client hold this subscription? (purpose limitation)
//! * `deliver`   — may this message reach this client, and in which view? (sharing)
//!
//! Each answer is a permit or a [`Deny`] with its reason. Decisions are pure
//! functions of the snapshot, the principal, the topic and the time, so they are
//! tested with literal tables. A preference change compiles a new snapshot and
//! swaps it into [`ActHandle`]; readers never take a lock.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use chrono::{DateTime, Datelike, NaiveTime, Timelike, Utc, Weekday};
use chrono_tz::Tz;
use thiserror::Error;
use uuid::Uuid;

use crate::acl::{Access, Acl};
use crate::model::{Directory, Kind, MaskMethod, PayloadFormat, Preferences, ProviderRole, Window};
use crate::short_eq::{self, same};
use crate::topic::{self, Resolved, Template, TopicName};

/// Who a session is, as established at CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Device { id: String, user: String },
    Provider { id: String },
    Anonymous,
}

impl Principal {
    pub fn role(&self) -> &'static str {
        match self {
            Principal::Device { .. } => "device",
            Principal::Provider { .. } => "provider",
            Principal::Anonymous => "anonymous",
        }
    }
}

/// Why the ACT said no. `as_str` is the metrics label: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Deny {
    #[error("topic is in the personal-data space but matches no template and kind")]
    UnknownTopic,
    #[error("no such user")]
    UnknownUser,
    #[error("device publishes under another user or device id")]
    Misattributed,
    #[error("only devices publish personal data")]
    NotADevice,
    #[error("only application providers receive personal data")]
    NotAProvider,
    #[error("the user has not consented to collection of this kind")]
    NoCollectConsent,
    #[error("outside the user's collection windows")]
    OutsideWindow,
    #[error("the user has not consented to sharing this kind with this provider")]
    NoShareConsent,
    #[error("the sharing consent has expired")]
    Expired,
    #[error("no purpose of this provider asks for a kind this filter can match")]
    PurposeLimited,
    #[error("the ACL does not allow this topic")]
    Acl,
    #[error("invalid topic or filter")]
    Invalid,
    #[error("the topic is reserved for consentry's own notices")]
    Reserved,
    #[error("a derived kind is published by the data service provider, not a device")]
    Derived,
}

impl Deny {
    pub fn as_str(&self) -> &'static str {
        match self {
            Deny::UnknownTopic => "unknown_topic",
            Deny::UnknownUser => "unknown_user",
            Deny::Misattributed => "misattributed",
            Deny::NotADevice => "not_a_device",
            Deny::NotAProvider => "not_a_provider",
            Deny::NoCollectConsent => "no_collect_consent",
            Deny::OutsideWindow => "outside_window",
            Deny::NoShareConsent => "no_share_consent",
            Deny::Expired => "expired",
            Deny::PurposeLimited => "purpose_limited",
            Deny::Acl => "acl",
            Deny::Invalid => "invalid",
            Deny::Reserved => "reserved",
            Deny::Derived => "derived_kind",
        }
    }
}

#[derive(Debug, Error)]
pub enum CompileError {
    #[error("template: {0}")]
    Template(#[from] topic::TemplateError),
    #[error("kind {0:?} is declared twice")]
    DuplicateKind(String),
    #[error("kind {kind:?} gives a type to {field:?}, which is not one of its fields")]
    TypedField { kind: String, field: String },
    #[error("kind {kind:?} is opaque (its payloads are never read), so it cannot type {field:?}")]
    TypedOpaque { kind: String, field: String },
    #[error(
        "kind {kind:?} gives {field:?} a scalar type, but declares fields inside it ({inner:?})"
    )]
    TypedParent {
        kind: String,
        field: String,
        inner: String,
    },
    #[error("{what} {id:?} is declared twice")]
    Duplicate { what: &'static str, id: String },
    #[error("user {user:?}: unknown time zone {tz:?}")]
    TimeZone { user: String, tz: String },
    #[error("device {device:?} belongs to unknown user {user:?}")]
    DeviceUser { device: String, user: String },
    #[error("provider {provider:?} purpose {purpose:?} names unknown kind {kind:?}")]
    PurposeKind {
        provider: String,
        purpose: String,
        kind: String,
    },
    #[error("preferences for unknown user {0:?}")]
    PrefUser(String),
    #[error("preferences of {user:?} name unknown kind {kind:?}")]
    PrefKind {
        user: String,
        kind: String,
        /// Which grant, as a path into the preferences (`share[2]`).
        at: String,
    },
    #[error("preferences of {user:?} name unknown provider {provider:?}")]
    PrefProvider {
        user: String,
        provider: String,
        at: String,
    },
    #[error(
        "preferences of {user:?}: provider {provider:?} has no purpose {purpose:?} asking for {kind:?}"
    )]
    PurposeLimitation {
        user: String,
        provider: String,
        purpose: String,
        kind: String,
        at: String,
    },
    #[error("preferences of {user:?}: kind {kind:?} is shared twice with {provider:?}")]
    DuplicateShare {
        user: String,
        provider: String,
        kind: String,
        at: String,
    },
    #[error("preferences of {user:?}: kind {kind:?} has no field {field:?} to mask")]
    MaskField {
        user: String,
        kind: String,
        field: String,
        at: String,
    },
    #[error("preferences of {user:?}: kind {kind:?} is opaque and can only be shared whole")]
    MaskOpaque {
        user: String,
        kind: String,
        at: String,
    },
    #[error("preferences of {user:?}: receipt {id:?} is not a UUID")]
    Receipt { user: String, id: String },
}

/// What a provider sees of one kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum View {
    Deliver,
    /// Field path → method, sorted by path. Shared, so that cached masked
    /// views can hold on to the rules they were made with.
    Mask(Arc<[(String, MaskMethod)]>),
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ShareRule {
    pub purpose: String,
    pub view: Arc<View>,
    pub expires: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
struct ProviderRules {
    index: u16,
    role: ProviderRole,
    /// Kind ids some purpose of this provider asks for.
    requested: Vec<u16>,
    /// Purpose id → the kind ids it asks for.
    purposes: FastMap<String, Vec<u16>>,
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;
/// Users and devices are split over shards, each behind its own `Arc`, so
/// one user's change copies one shard, not the table.
const SHARDS: usize = 1024;

/// What ingress lets through.
#[derive(Debug)]
pub enum Ingress<'a> {
    Personal {
        kind: &'a Kind,
        resolved: Resolved<'a>,
    },
    Plain,
}

/// What delivery lets through.
#[derive(Debug)]
pub enum Delivery<'a> {
    Personal {
        kind: &'a Kind,
        resolved: Resolved<'a>,
        rule: &'a ShareRule,
        /// The consent receipt of the user's preferences in force (its jti).
        receipt: Option<Uuid>,
    },
    Plain,
}

#[derive(Debug)]
pub struct Act {
    pub version: u64,
    templates: Vec<Template>,
    kinds: Vec<Kind>,
    kind_ids: KindIds,
    providers: FastMap<String, ProviderRules>,
    /// Provider ids by index.
    provider_ids: Vec<String>,
    /// User id → the user's record (see [`pack_user`]), which also lists the
    /// user's devices: a decision needs one lookup, not one per id.
    users: Vec<Arc<UserShard>>,
    /// Device id → the id of the user it is bound to. Decisions read the
    /// binding from the user's record; this side answers
    /// [`Act::device_user`] and finds a device's old user when it moves.
    devices: Vec<Arc<Table>>,
    acl: Acl,
    /// One hash per id and lookup: its low bits choose the shard, its high
    /// half is the slot tag inside the shard.
    hasher: foldhash::fast::RandomState,
}

/// Kind name → kind id. A decision looks up the kind its topic names.
/// Kinds are few, and bucketed by the length of their names a lookup is
/// nearly always one comparison: cheaper than hashing the name.
#[derive(Debug, Clone, Default)]
struct KindIds {
    by_len: Vec<Vec<(Box<str>, u16)>>,
}

/// Names this long or longer share the last bucket.
const LONG_KIND: usize = 64;

impl KindIds {
    /// False if `name` is already there.
    fn insert(&mut self, name: &str, id: u16) -> bool {
        if self.get(name).is_some() {
            return false;
        }
        let b = name.len().min(LONG_KIND);
        if self.by_len.len() <= b {
            self.by_len.resize_with(b + 1, Vec::new);
        }
        self.by_len[b].push((name.into(), id));
        true
    }

    #[inline]
    fn get(&self, name: &str) -> Option<u16> {
        self.by_len
            .get(name.len().min(LONG_KIND))?
            .iter()
            .find(|(n, _)| same(n.as_bytes(), name.as_bytes()))
            .map(|&(_, id)| id)
    }
}

/// consentry's own messages to a provider (e.g. disputes of its records) go
/// to `consentry/notices/{provider}`: only consentry publishes there, and
/// only that provider reads it.
pub const NOTICE_PREFIX: &str = "consentry/notices/";

enum Class<'t> {
    Notice(&'t str),
    Personal(Resolved<'t>, u16),
    UnknownPersonal,
    Plain,
}

fn parse_tz(user: &str, tz: &str) -> Result<Tz, CompileError> {
    tz.parse().map_err(|_| CompileError::TimeZone {
        user: user.into(),
        tz: tz.into(),
    })
}

// === packed records ===
//
// Millions of users each with a map entry, boxed id strings and boxed
// slices cost ~440 bytes a user and a cache miss per pointer followed (six
// or more per decision at 1M users). Instead each shard packs its records
// into one buffer, grouped in hash buckets, and an array of bucket bounds
// finds them: a lookup reads one pair of bounds and the one or two cache
// lines of its bucket.

/// Appends `v` in LEB128: ids, counts and indexes are almost always < 128,
/// so one byte each.
fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_field(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// Reads what `put_varint` and `put_field` wrote. Records are only ever
/// written by this module, so a short one is a bug here: it panics.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    #[inline]
    fn varint(&mut self) -> usize {
        match self.0 {
            [b, rest @ ..] if *b < 0x80 => {
                self.0 = rest;
                usize::from(*b)
            }
            _ => self.long_varint(),
        }
    }

    #[cold]
    fn long_varint(&mut self) -> usize {
        let (mut value, mut shift) = (0usize, 0);
        loop {
            let (&b, rest) = self.0.split_first().expect("packed ACT record ends early");
            self.0 = rest;
            value |= usize::from(b & 0x7f) << shift;
            if b < 0x80 {
                return value;
            }
            shift += 7;
        }
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn field(&mut self) -> &'a [u8] {
        let n = self.varint();
        self.bytes(n)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One shard of a keyed table, in buckets: a key's bucket holds its record
/// and the records of the few keys that share the bucket, back to back.
///
/// A record is `[tag][key][body]`: the tag (four bytes, little-endian) is
/// the high half of the key's hash (the low half picks the shard), and its
/// low bits pick the bucket; key and body are fields. A whole tag must match
/// before a key is compared.
///
/// With at least as many buckets as keys, a bucket holds one or two records
/// on average, and its bounds cost 4 to 8 bytes a key: less than an index
/// of 8-byte slots kept under 3/4 full, and a lookup scans adjacent bytes
/// rather than probing slots that each point elsewhere.
#[derive(Debug, Clone)]
struct Table {
    /// Bucket `b` is `data[starts[b]..starts[b + 1]]`. The bucket count,
    /// `starts.len() - 1`, is a power of two and at least `len`.
    starts: Box<[u32]>,
    len: usize,
    data: Box<[u8]>,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            starts: vec![0; 2].into_boxed_slice(),
            len: 0,
            data: Box::default(),
        }
    }
}

fn tag_of(hash: u64) -> u32 {
    (hash >> 32) as u32
}

fn offset(at: usize) -> u32 {
    u32::try_from(at).expect("an ACT shard holds under 4 GiB")
}

/// A record, found.
struct Record<'a> {
    tag: u32,
    key: &'a [u8],
    body: &'a [u8],
}

/// The records of a run of buckets, in order.
struct Records<'a>(&'a [u8]);

impl<'a> Iterator for Records<'a> {
    type Item = Record<'a>;

    #[inline]
    fn next(&mut self) -> Option<Record<'a>> {
        let (tag, rest) = self.0.split_first_chunk::<4>()?;
        let mut r = Reader(rest);
        let (key, body) = (r.field(), r.field());
        self.0 = r.0;
        Some(Record {
            tag: u32::from_le_bytes(*tag),
            key,
            body,
        })
    }
}

fn put_record(out: &mut Vec<u8>, tag: u32, key: &[u8], body: &[u8]) {
    out.extend_from_slice(&tag.to_le_bytes());
    put_field(out, key);
    put_field(out, body);
}

impl Table {
    fn bucket(&self, tag: u32) -> usize {
        // `starts.len() - 1` buckets, a power of two: one less is the mask.
        tag as usize & (self.starts.len() - 2)
    }

    /// Bucket `b`'s bytes and where they start.
    #[inline]
    fn bucket_bytes(&self, b: usize) -> (usize, &[u8]) {
        let (from, to) = (self.starts[b] as usize, self.starts[b + 1] as usize);
        (from, &self.data[from..to])
    }

    #[inline]
    fn get(&self, hash: u64, key: &[u8]) -> Option<&[u8]> {
        let tag = tag_of(hash);
        Records(self.bucket_bytes(self.bucket(tag)).1)
            .find(|r| r.tag == tag && same(r.key, key))
            .map(|r| r.body)
    }

    /// The byte range of `key`'s record, whose hash is `hash`.
    fn find(&self, hash: u64, key: &[u8]) -> Option<std::ops::Range<usize>> {
        let tag = tag_of(hash);
        let (from, bytes) = self.bucket_bytes(self.bucket(tag));
        let end = from + bytes.len();
        let mut records = Records(bytes);
        loop {
            let start = end - records.0.len();
            let r = records.next()?;
            if r.tag == tag && same(r.key, key) {
                return Some(start..end - records.0.len());
            }
        }
    }

    /// A copy with `key`'s record replaced by `body`, or added. Built at its
    /// exact size: a shard copy is kept for as long as its snapshot lives.
    fn with(&self, hash: u64, key: &[u8], body: &[u8]) -> Table {
        let tag = tag_of(hash);
        let (replaced, len) = match self.find(hash, key) {
            Some(range) => (range, self.len),
            None if self.len < self.starts.len() - 1 => {
                let end = self.starts[self.bucket(tag) + 1] as usize;
                (end..end, self.len + 1)
            }
            // Full: rebuilt with twice the buckets.
            None => {
                let mut b = TableBuilder::default();
                for r in Records(&self.data) {
                    b.push(r.tag, r.key, r.body);
                }
                b.push(tag, key, body);
                return b.finish().expect("the added key is new");
            }
        };
        let mut data = Vec::with_capacity(self.data.len() + key.len() + body.len() + 24);
        data.extend_from_slice(&self.data[..replaced.start]);
        put_record(&mut data, tag, key, body);
        let grown = data.len() - replaced.start;
        data.extend_from_slice(&self.data[replaced.end..]);
        let mut starts = self.starts.clone();
        for s in &mut starts[self.bucket(tag) + 1..] {
            *s = offset(*s as usize + grown - replaced.len());
        }
        Table {
            starts,
            len,
            data: data.into_boxed_slice(),
        }
    }
}

impl Table {
    /// A copy without `key`'s record; `None` if it has none.
    fn without(&self, hash: u64, key: &[u8]) -> Option<Table> {
        let removed = self.find(hash, key)?;
        let mut data = Vec::with_capacity(self.data.len() - removed.len());
        data.extend_from_slice(&self.data[..removed.start]);
        data.extend_from_slice(&self.data[removed.end..]);
        let mut starts = self.starts.clone();
        for s in &mut starts[self.bucket(tag_of(hash)) + 1..] {
            *s = offset(*s as usize - removed.len());
        }
        Some(Table {
            starts,
            len: self.len - 1,
            data: data.into_boxed_slice(),
        })
    }
}

/// Records gathered in any order, then laid out in buckets at once: adding
/// them one by one to a [`Table`] would move the records behind each.
#[derive(Debug, Default)]
struct TableBuilder {
    data: Vec<u8>,
    /// (tag, where the record starts in `data`).
    records: Vec<(u32, u32)>,
}

impl TableBuilder {
    fn push(&mut self, tag: u32, key: &[u8], body: &[u8]) {
        self.records.push((tag, offset(self.data.len())));
        put_record(&mut self.data, tag, key, body);
    }

    /// The table, or the first key found twice.
    fn finish(mut self) -> Result<Table, Vec<u8>> {
        let buckets = self.records.len().next_power_of_two().max(1);
        let bucket = |tag: u32| tag as usize & (buckets - 1);
        // Sorted by bucket and within one by tag, so that equal tags sit
        // side by side for the duplicate check.
        self.records
            .sort_unstable_by_key(|&(tag, at)| (bucket(tag), tag, at));
        let record = |at: u32| Records(&self.data[at as usize..]).next().expect("pushed");
        let mut data = Vec::with_capacity(self.data.len());
        let mut starts = vec![0u32; buckets + 1];
        for (i, &(tag, at)) in self.records.iter().enumerate() {
            let r = record(at);
            let same_tag = self.records[..i].iter().rev().take_while(|p| p.0 == tag);
            for &(_, earlier) in same_tag {
                if record(earlier).key == r.key {
                    return Err(r.key.to_vec());
                }
            }
            put_record(&mut data, tag, r.key, r.body);
            starts[bucket(tag) + 1] = offset(data.len());
        }
        // Empty buckets end where the bucket before them does.
        for b in 1..starts.len() {
            starts[b] = starts[b].max(starts[b - 1]);
        }
        Ok(Table {
            starts: starts.into_boxed_slice(),
            len: self.records.len(),
            data: data.into_boxed_slice(),
        })
    }
}

/// One shard of users, and the share rules its records name by index.
#[derive(Debug, Clone, Default)]
struct UserShard {
    table: Table,
    /// Each rule with the number of grants naming it. A rule nobody grants
    /// any more is dropped and its index reused, so a long-running ACT does
    /// not collect rules (one per distinct expiry, say).
    rules: Vec<(Option<Arc<ShareRule>>, u32)>,
}

impl UserShard {
    /// The index of `rule`, counting one more grant of it. A scan: a shard
    /// has a few hundred rules at most, and this runs once per grant change.
    fn grant(&mut self, rule: ShareRule) -> usize {
        let mut free = None;
        for (i, (r, refs)) in self.rules.iter_mut().enumerate() {
            match r {
                Some(r) if **r == rule => {
                    *refs += 1;
                    return i;
                }
                None if free.is_none() => free = Some(i),
                _ => {}
            }
        }
        let entry = (Some(Arc::new(rule)), 1);
        match free {
            Some(i) => {
                self.rules[i] = entry;
                i
            }
            None => {
                self.rules.push(entry);
                self.rules.len() - 1
            }
        }
    }

    /// Forgets the grants of a record that is being replaced.
    fn release(&mut self, body: &[u8]) {
        let mut r = at_grants(body);
        for _ in 0..r.varint() {
            let (_, _, i) = (r.varint(), r.varint(), r.varint());
            let (rule, refs) = &mut self.rules[i];
            *refs -= 1;
            if *refs == 0 {
                *rule = None;
            }
        }
    }
}

/// One user's preferences, validated, before they are packed.
struct UserRules<'p> {
    tz: Tz,
    /// A bit per kind id: collected at any time.
    always: Vec<u8>,
    /// Kinds collected only inside these windows.
    windows: Vec<(u16, &'p [Window])>,
    /// (provider index, kind id, rule).
    share: Vec<(u16, u16, ShareRule)>,
    receipt: Option<Uuid>,
}

/// A user's record body:
///
/// ```text
/// devices   field: the ids of the devices bound to the user, each a field
/// share     count, then (provider index, kind id, rule index) per grant
/// always    ceil(kinds / 8) bytes, a bit per kind id
/// tz        index in chrono_tz::TZ_VARIANTS, two bytes little-endian
/// windows   count, then (kind id, count, that many spans) per kind
/// receipt   0, or 1 and the 16 bytes of the preferences' receipt id
/// ```
///
/// Other integers are varints. Devices and grants come first: a delivery
/// reads nothing else. `grant` turns a rule into its index in the shard.
fn pack_user(
    devices: &[u8],
    rules: UserRules,
    mut grant: impl FnMut(ShareRule) -> usize,
    out: &mut Vec<u8>,
) {
    put_field(out, devices);
    put_varint(out, rules.share.len());
    for (provider, kind, rule) in rules.share {
        put_varint(out, provider.into());
        put_varint(out, kind.into());
        put_varint(out, grant(rule));
    }
    out.extend_from_slice(&rules.always);
    out.extend_from_slice(&tz_index(rules.tz).to_le_bytes());
    put_varint(out, rules.windows.len());
    for (kind, windows) in rules.windows {
        put_varint(out, kind.into());
        put_varint(out, windows.len());
        for w in windows {
            Span::of(w).write(out);
        }
    }
    match rules.receipt {
        Some(id) => {
            out.push(1);
            out.extend_from_slice(id.as_bytes());
        }
        None => out.push(0),
    }
}

/// A reader at the grants of a user's record body.
fn at_grants(body: &[u8]) -> Reader<'_> {
    let mut r = Reader(body);
    r.field();
    r
}

/// A user's record body with `device` removed from its device list, or
/// added to it.
fn with_device(body: &[u8], device: &[u8], bound: bool) -> Vec<u8> {
    let mut r = Reader(body);
    let mut list = Reader(r.field());
    let mut packed = Vec::new();
    while !list.is_empty() {
        let d = list.field();
        if d != device {
            put_field(&mut packed, d);
        }
    }
    if bound {
        put_field(&mut packed, device);
    }
    let mut out = Vec::with_capacity(body.len() + 16);
    put_field(&mut out, &packed);
    out.extend_from_slice(r.0);
    out
}

fn tz_index(tz: Tz) -> u16 {
    // `Tz` is a fieldless enum listed in TZ_VARIANTS in declaration order;
    // the search is only a guard should a release ever reorder them.
    let i = match chrono_tz::TZ_VARIANTS.get(tz as usize) {
        Some(t) if *t == tz => tz as usize,
        _ => chrono_tz::TZ_VARIANTS
            .iter()
            .position(|t| *t == tz)
            .expect("every Tz is in TZ_VARIANTS"),
    };
    u16::try_from(i).expect("fewer than 65536 time zones")
}

/// A collection window in record form. Times are (seconds from midnight,
/// nanoseconds), which order exactly as `NaiveTime`s do.
#[derive(Debug, Clone, Copy)]
struct Span {
    /// Bit `n` set: the window opens on the day `n` days after Monday.
    days: u8,
    from: (u32, u32),
    to: (u32, u32),
}

impl Span {
    fn of(w: &Window) -> Span {
        let time = |t: NaiveTime| (t.num_seconds_from_midnight(), t.nanosecond());
        Span {
            days: w.days.iter().fold(0, |m, d| m | day_bit(*d)),
            from: time(w.from),
            to: time(w.to),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.push(self.days);
        for v in [self.from.0, self.from.1, self.to.0, self.to.1] {
            put_varint(out, v as usize);
        }
    }

    fn read(r: &mut Reader) -> Span {
        let days = r.bytes(1)[0];
        let mut next = || r.varint() as u32;
        Span {
            days,
            from: (next(), next()),
            to: (next(), next()),
        }
    }
}

fn day_bit(d: Weekday) -> u8 {
    1 << d.num_days_from_monday()
}

/// A user's record, found.
#[derive(Clone, Copy)]
struct UserRef<'a> {
    shard: &'a UserShard,
    body: &'a [u8],
}

impl<'a> UserRef<'a> {
    fn grants(&self) -> Reader<'a> {
        at_grants(self.body)
    }

    /// Last in the record: a decision that does not need it reads nothing
    /// more, and the grants stay where a delivery looks first.
    fn receipt(&self, kinds: usize) -> Option<Uuid> {
        let mut r = self.grants();
        for _ in 0..r.varint() * 3 {
            r.varint();
        }
        r.bytes(always_len(kinds) + 2);
        for _ in 0..r.varint() {
            r.varint();
            for _ in 0..r.varint() {
                Span::read(&mut r);
            }
        }
        match r.bytes(1)[0] {
            0 => None,
            _ => Uuid::from_slice(r.bytes(16)).ok(),
        }
    }

    fn has_device(&self, device: &str) -> bool {
        let mut list = Reader(Reader(self.body).field());
        while !list.is_empty() {
            if same(list.field(), device.as_bytes()) {
                return true;
            }
        }
        false
    }

    /// The rule under which `kind` is shared with the provider `id`;
    /// `providers` are the provider ids by index. Comparing the names of
    /// the few providers granted this kind costs less than a map lookup.
    fn share_rule(&self, providers: &[String], id: &str, kind: u16) -> Option<&'a ShareRule> {
        let mut r = self.grants();
        for _ in 0..r.varint() {
            let (p, k, i) = (r.varint(), r.varint(), r.varint());
            if k == usize::from(kind)
                && providers
                    .get(p)
                    .is_some_and(|p| same(p.as_bytes(), id.as_bytes()))
            {
                return self.shard.rules[i].0.as_deref();
            }
        }
        None
    }

    fn may_collect(&self, kind: u16, kinds: usize, now: DateTime<Utc>) -> Result<(), Deny> {
        let mut r = self.grants();
        for _ in 0..r.varint() * 3 {
            r.varint();
        }
        let always = r.bytes(always_len(kinds));
        if always[usize::from(kind / 8)] & (1 << (kind % 8)) != 0 {
            return Ok(());
        }
        let tz = r.bytes(2);
        let tz = chrono_tz::TZ_VARIANTS[usize::from(u16::from_le_bytes([tz[0], tz[1]]))];
        for _ in 0..r.varint() {
            let (k, n) = (r.varint(), r.varint());
            if k == usize::from(kind) {
                let spans = (0..n).map(|_| Span::read(&mut r));
                return if in_windows(spans, tz, now) {
                    Ok(())
                } else {
                    Err(Deny::OutsideWindow)
                };
            }
            for _ in 0..n {
                Span::read(&mut r);
            }
        }
        Err(Deny::NoCollectConsent)
    }
}

/// The typed fields of `k` whose type could never be checked, each with the
/// error that says why: any on an opaque kind (its payloads are not read),
/// and a scalar type on a field that has declared fields inside it.
pub fn untypable(k: &Kind) -> Vec<(&str, CompileError)> {
    k.types
        .keys()
        .filter_map(|field| {
            let why = if k.format == PayloadFormat::Opaque {
                CompileError::TypedOpaque {
                    kind: k.name.clone(),
                    field: field.clone(),
                }
            } else {
                let below = format!("{field}.");
                let inner = k.fields.iter().find(|f| f.starts_with(&below))?;
                CompileError::TypedParent {
                    kind: k.name.clone(),
                    field: field.clone(),
                    inner: inner.clone(),
                }
            };
            Some((field.as_str(), why))
        })
        .collect()
}

fn always_len(kinds: usize) -> usize {
    kinds.div_ceil(8).max(1)
}

// === impl Act ===

impl Act {
    pub fn compile(
        version: u64,
        templates: &[String],
        kinds: &[Kind],
        dir: &Directory,
        acl: Acl,
    ) -> Result<Act, CompileError> {
        let templates = templates
            .iter()
            .map(|t| Template::parse(t))
            .collect::<Result<Vec<_>, _>>()?;
        let mut kind_ids = KindIds::default();
        for (i, k) in kinds.iter().enumerate() {
            if !kind_ids.insert(&k.name, i as u16) {
                return Err(CompileError::DuplicateKind(k.name.clone()));
            }
            if let Some(field) = k.types.keys().find(|f| !k.fields.contains(f)) {
                return Err(CompileError::TypedField {
                    kind: k.name.clone(),
                    field: field.clone(),
                });
            }
            // A type that could never be checked would only look like a guarantee.
            if let Some((_, why)) = untypable(k).into_iter().next() {
                return Err(why);
            }
        }
        let mut providers = FastMap::default();
        for (index, p) in dir.providers.iter().enumerate() {
            let mut requested = Vec::new();
            let mut purposes = FastMap::default();
            for purpose in &p.purposes {
                let mut ids = Vec::new();
                for k in &purpose.kinds {
                    let id = kind_ids.get(k).ok_or_else(|| CompileError::PurposeKind {
                        provider: p.id.clone(),
                        purpose: purpose.id.clone(),
                        kind: k.clone(),
                    })?;
                    ids.push(id);
                    if !requested.contains(&id) {
                        requested.push(id);
                    }
                }
                // Two purposes under one id: a grant could not say which
                // one the user agreed to.
                if purposes.insert(purpose.id.clone(), ids).is_some() {
                    return Err(CompileError::Duplicate {
                        what: "purpose",
                        id: format!("{}/{}", p.id, purpose.id),
                    });
                }
            }
            let rules = ProviderRules {
                index: index as u16,
                role: p.role,
                requested,
                purposes,
            };
            if providers.insert(p.id.clone(), rules).is_some() {
                return Err(CompileError::Duplicate {
                    what: "provider",
                    id: p.id.clone(),
                });
            }
        }
        let mut act = Act {
            version,
            templates,
            kinds: kinds.to_vec(),
            kind_ids,
            providers,
            provider_ids: dir.providers.iter().map(|p| p.id.clone()).collect(),
            users: Vec::new(),
            devices: Vec::new(),
            acl,
            hasher: foldhash::fast::RandomState::default(),
        };

        // Each user's devices, as lists threaded through `next_device`, so
        // that a user's record is written once, devices included.
        let mut user_index: FastMap<&str, u32> = FastMap::default();
        user_index.reserve(dir.users.len());
        for (i, u) in dir.users.iter().enumerate() {
            user_index.entry(u.id.as_str()).or_insert(i as u32);
        }
        let mut first_device = vec![u32::MAX; dir.users.len()];
        let mut next_device = vec![u32::MAX; dir.devices.len()];
        for (j, d) in dir.devices.iter().enumerate().rev() {
            if let Some(&i) = user_index.get(d.user.as_str()) {
                next_device[j] = first_device[i as usize];
                first_device[i as usize] = j as u32;
            }
        }
        drop(user_index);

        let mut tables: Vec<TableBuilder> = (0..SHARDS).map(|_| TableBuilder::default()).collect();
        let mut rules: Vec<Vec<(Option<Arc<ShareRule>>, u32)>> = vec![Vec::new(); SHARDS];
        // Equal rules are one allocation, whatever their shards: a decision
        // then reads a rule that is already in cache. Each shard's index of
        // a rule is found by its address (`UserShard::grant` scans, which
        // would be quadratic over a shard of distinct rules).
        let mut interned: FastSet<Arc<ShareRule>> = FastSet::default();
        let mut known: FastMap<(usize, *const ShareRule), usize> = FastMap::default();
        let prefs: FastMap<&str, &Preferences> = dir
            .preferences
            .iter()
            .map(|p| (p.user.as_str(), p))
            .collect();
        let (mut devices, mut body) = (Vec::new(), Vec::new());
        for (i, u) in dir.users.iter().enumerate() {
            let tz = parse_tz(&u.id, &u.time_zone)?;
            let user_rules = act.user_rules(&u.id, tz, prefs.get(u.id.as_str()).copied())?;
            let hash = act.hash(&u.id);
            let s = hash as usize % SHARDS;
            devices.clear();
            let mut j = first_device[i];
            while j != u32::MAX {
                put_field(&mut devices, dir.devices[j as usize].id.as_bytes());
                j = next_device[j as usize];
            }
            body.clear();
            let shard_rules = &mut rules[s];
            pack_user(
                &devices,
                user_rules,
                |rule| {
                    let rule = match interned.get(&rule) {
                        Some(r) => r.clone(),
                        None => {
                            let r = Arc::new(rule);
                            interned.insert(r.clone());
                            r
                        }
                    };
                    let i = *known.entry((s, Arc::as_ptr(&rule))).or_insert_with(|| {
                        shard_rules.push((Some(rule), 0));
                        shard_rules.len() - 1
                    });
                    shard_rules[i].1 += 1;
                    i
                },
                &mut body,
            );
            tables[s].push(tag_of(hash), u.id.as_bytes(), &body);
        }
        drop((interned, known, first_device, next_device));
        let duplicate = |what, key: Vec<u8>| CompileError::Duplicate {
            what,
            id: String::from_utf8_lossy(&key).into_owned(),
        };
        let users = tables
            .into_iter()
            .map(|t| t.finish().map_err(|key| duplicate("user", key)))
            .collect::<Result<Vec<_>, _>>()?;
        let user_exists = |id: &str| {
            let hash = act.hash(id);
            users[hash as usize % SHARDS]
                .get(hash, id.as_bytes())
                .is_some()
        };
        for p in &dir.preferences {
            if !user_exists(&p.user) {
                return Err(CompileError::PrefUser(p.user.clone()));
            }
        }
        let mut device_tables: Vec<TableBuilder> =
            (0..SHARDS).map(|_| TableBuilder::default()).collect();
        for d in &dir.devices {
            if !user_exists(&d.user) {
                return Err(CompileError::DeviceUser {
                    device: d.id.clone(),
                    user: d.user.clone(),
                });
            }
            let hash = act.hash(&d.id);
            device_tables[hash as usize % SHARDS].push(
                tag_of(hash),
                d.id.as_bytes(),
                d.user.as_bytes(),
            );
        }
        act.devices = device_tables
            .into_iter()
            .map(|t| t.finish().map(Arc::new))
            .collect::<Result<_, _>>()
            .map_err(|key| duplicate("device", key))?;
        // The small parts of the shards, which every decision reads, are
        // allocated last and in one run, so they sit together in memory.
        act.users = users
            .into_iter()
            .zip(rules)
            .map(|(table, rules)| {
                Arc::new(UserShard {
                    table,
                    rules: rules.clone(),
                })
            })
            .collect();
        Ok(act)
    }

    /// This ACT with one user's preferences (and profile) replaced: only
    /// that user's shard is copied. Validates like [`Act::compile`].
    pub fn with_user(
        &self,
        version: u64,
        user: &crate::model::User,
        prefs: Option<&Preferences>,
    ) -> Result<Act, CompileError> {
        let tz = parse_tz(&user.id, &user.time_zone)?;
        let rules = self.user_rules(&user.id, tz, prefs)?;
        let hash = self.hash(&user.id);
        let i = hash as usize % SHARDS;
        let old = &*self.users[i];
        let old_body = old.table.get(hash, user.id.as_bytes());
        let mut rules_of_shard = UserShard {
            table: Table::default(),
            rules: old.rules.clone(),
        };
        let mut body = Vec::new();
        // The devices stay: they are bound by `with_device`, not by preferences.
        let devices = old_body.map_or(&[][..], |b| Reader(b).field());
        pack_user(devices, rules, |r| rules_of_shard.grant(r), &mut body);
        // Released after granting, so that rules the user keeps are found
        // again rather than dropped and rebuilt.
        if let Some(b) = old_body {
            rules_of_shard.release(b);
        }
        let shard = UserShard {
            table: old.table.with(hash, user.id.as_bytes(), &body),
            rules: rules_of_shard.rules,
        };
        let mut users = self.users.clone();
        users[i] = Arc::new(shard);
        Ok(self.next(version, users, self.devices.clone()))
    }

    /// This ACT with one more device bound to an existing user.
    pub fn with_device(&self, version: u64, device: &str, user: &str) -> Result<Act, CompileError> {
        if self.user(user).is_none() {
            return Err(CompileError::DeviceUser {
                device: device.into(),
                user: user.into(),
            });
        }
        let hash = self.hash(device);
        let d = hash as usize % SHARDS;
        let old_user = self.devices[d].get(hash, device.as_bytes());
        if old_user == Some(user.as_bytes()) {
            return Ok(self.next(version, self.users.clone(), self.devices.clone()));
        }
        let mut users = self.users.clone();
        let mut rebind = |id: &[u8], bound: bool| {
            let hash = self.hasher.hash_one(id);
            let i = hash as usize % SHARDS;
            let shard = &*users[i];
            let body = shard
                .table
                .get(hash, id)
                .expect("a bound device's user exists");
            let body = with_device(body, device.as_bytes(), bound);
            users[i] = Arc::new(UserShard {
                table: shard.table.with(hash, id, &body),
                rules: shard.rules.clone(),
            });
        };
        if let Some(old) = old_user {
            rebind(old, false);
        }
        rebind(user.as_bytes(), true);
        let mut devices = self.devices.clone();
        devices[d] = Arc::new(self.devices[d].with(hash, device.as_bytes(), user.as_bytes()));
        Ok(self.next(version, users, devices))
    }

    /// A copy in which `device` is bound to nobody: it no longer speaks for
    /// its user, at ingress or at delivery. Unchanged (at `version`) if it
    /// was not bound.
    pub fn without_device(&self, version: u64, device: &str) -> Act {
        let hash = self.hash(device);
        let d = hash as usize % SHARDS;
        let Some(user) = self.devices[d].get(hash, device.as_bytes()) else {
            return self.next(version, self.users.clone(), self.devices.clone());
        };
        let mut users = self.users.clone();
        let user_hash = self.hasher.hash_one(user);
        let u = user_hash as usize % SHARDS;
        let shard = &*users[u];
        if let Some(body) = shard.table.get(user_hash, user) {
            let body = with_device(body, device.as_bytes(), false);
            users[u] = Arc::new(UserShard {
                table: shard.table.with(user_hash, user, &body),
                rules: shard.rules.clone(),
            });
        }
        let mut devices = self.devices.clone();
        if let Some(t) = self.devices[d].without(hash, device.as_bytes()) {
            devices[d] = Arc::new(t);
        }
        self.next(version, users, devices)
    }

    fn next(&self, version: u64, users: Vec<Arc<UserShard>>, devices: Vec<Arc<Table>>) -> Act {
        Act {
            version,
            templates: self.templates.clone(),
            kinds: self.kinds.clone(),
            kind_ids: self.kind_ids.clone(),
            providers: self.providers.clone(),
            provider_ids: self.provider_ids.clone(),
            users,
            devices,
            acl: self.acl.clone(),
            hasher: self.hasher.clone(),
        }
    }

    /// Ids are hashed as bytes everywhere, so that an id read back from a
    /// record hashes as the one given.
    fn hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id.as_bytes())
    }

    fn user(&self, id: &str) -> Option<UserRef<'_>> {
        let hash = self.hash(id);
        let shard = &*self.users[hash as usize % SHARDS];
        let body = shard.table.get(hash, id.as_bytes())?;
        Some(UserRef { shard, body })
    }

    /// Compiles and validates one user's preferences.
    fn user_rules<'p>(
        &self,
        user: &str,
        tz: Tz,
        prefs: Option<&'p Preferences>,
    ) -> Result<UserRules<'p>, CompileError> {
        let mut always = vec![0u8; always_len(self.kinds.len())];
        let mut windows = Vec::new();
        let mut share: Vec<(u16, u16, ShareRule)> = Vec::new();
        let kind_id = |kind: &str, at: &dyn Fn() -> String| {
            self.kind_ids
                .get(kind)
                .ok_or_else(|| CompileError::PrefKind {
                    user: user.into(),
                    kind: kind.into(),
                    at: at(),
                })
        };
        let collect = prefs.map(|p| p.collect.as_slice()).unwrap_or_default();
        for (i, grant) in collect.iter().enumerate() {
            let id = kind_id(&grant.kind, &|| format!("collect[{i}]"))?;
            if grant.windows.is_empty() {
                always[usize::from(id / 8)] |= 1 << (id % 8);
            } else {
                windows.push((id, grant.windows.as_slice()));
            }
        }
        let shared = prefs.map(|p| p.share.as_slice()).unwrap_or_default();
        for (i, grant) in shared.iter().enumerate() {
            // Errors name the grant, for the API's `field` (`share[2].purpose`).
            let at = || format!("share[{i}]");
            let id = kind_id(&grant.kind, &at)?;
            let kind = &self.kinds[id as usize];
            let provider =
                self.providers
                    .get(&grant.provider)
                    .ok_or_else(|| CompileError::PrefProvider {
                        user: user.into(),
                        provider: grant.provider.clone(),
                        at: at(),
                    })?;
            let asked = provider
                .purposes
                .get(&grant.purpose)
                .is_some_and(|kinds| kinds.contains(&id));
            if !asked {
                return Err(CompileError::PurposeLimitation {
                    user: user.into(),
                    provider: grant.provider.clone(),
                    purpose: grant.purpose.clone(),
                    kind: grant.kind.clone(),
                    at: at(),
                });
            }
            let view = if grant.mask.is_empty() {
                View::Deliver
            } else {
                if kind.format == PayloadFormat::Opaque {
                    return Err(CompileError::MaskOpaque {
                        user: user.into(),
                        kind: kind.name.clone(),
                        at: at(),
                    });
                }
                for field in grant.mask.keys() {
                    if !kind.fields.contains(field) {
                        return Err(CompileError::MaskField {
                            user: user.into(),
                            kind: kind.name.clone(),
                            field: field.clone(),
                            at: at(),
                        });
                    }
                }
                View::Mask(
                    grant
                        .mask
                        .iter()
                        .map(|(f, m)| (f.clone(), m.clone()))
                        .collect(),
                )
            };
            if share
                .iter()
                .any(|(p, k, _)| *p == provider.index && *k == id)
            {
                return Err(CompileError::DuplicateShare {
                    user: user.into(),
                    provider: grant.provider.clone(),
                    kind: grant.kind.clone(),
                    at: at(),
                });
            }
            let rule = ShareRule {
                purpose: grant.purpose.clone(),
                view: Arc::new(view),
                expires: grant.expires,
            };
            share.push((provider.index, id, rule));
        }
        // Only consentry writes it, from a UUID it made; anything else is
        // a bug worth failing the compile for, not a record without it.
        let receipt = match prefs.and_then(|p| p.receipt.as_deref()) {
            Some(id) => Some(Uuid::parse_str(id).map_err(|_| CompileError::Receipt {
                user: user.into(),
                id: id.into(),
            })?),
            None => None,
        };
        Ok(UserRules {
            tz,
            always,
            windows,
            share,
            receipt,
        })
    }

    pub fn kind(&self, name: &str) -> Option<&Kind> {
        self.kind_ids.get(name).map(|i| &self.kinds[i as usize])
    }

    /// The user a device is bound to.
    pub fn device_user(&self, device: &str) -> Option<&str> {
        let hash = self.hash(device);
        let user = self.devices[hash as usize % SHARDS].get(hash, device.as_bytes())?;
        std::str::from_utf8(user).ok()
    }

    pub fn is_provider(&self, id: &str) -> bool {
        self.providers.contains_key(id)
    }

    /// The (user, device, kind) of a personal-data topic with a known kind.
    pub fn resolve<'t>(&self, topic: &'t str) -> Option<Resolved<'t>> {
        match self.classify(topic) {
            Class::Personal(r, _) => Some(r),
            _ => None,
        }
    }

    fn classify<'t>(&self, topic: &'t str) -> Class<'t> {
        if let Some(provider) = short_eq::strip_prefix(topic, NOTICE_PREFIX) {
            return Class::Notice(provider);
        }
        let mut claimed = false;
        for t in &self.templates {
            // Resolving first: on the hot path nearly every topic resolves,
            // and then the prefix check is already done.
            if let Some(r) = t.resolve(topic) {
                if let Some(id) = self.kind_ids.get(r.kind) {
                    return Class::Personal(r, id);
                }
                claimed = true;
            } else if t.claims(topic) {
                claimed = true;
            }
        }
        if claimed {
            Class::UnknownPersonal
        } else {
            Class::Plain
        }
    }

    /// Collection: may `who` publish `topic` at `now`?
    pub fn ingress<'a>(
        &'a self,
        who: &Principal,
        topic: TopicName<'a>,
        now: DateTime<Utc>,
    ) -> Result<Ingress<'a>, Deny> {
        let topic = topic.as_str();
        match self.classify(topic) {
            Class::Notice(_) => Err(Deny::Reserved),
            Class::Plain => {
                if self.acl.allows(who, topic, Access::Write) {
                    Ok(Ingress::Plain)
                } else {
                    Err(Deny::Acl)
                }
            }
            Class::UnknownPersonal => Err(Deny::UnknownTopic),
            Class::Personal(r, kind_id) => {
                let kind = &self.kinds[kind_id as usize];
                let user = match who {
                    // The binding in force, not the one seen at CONNECT: the
                    // device must be in the user's record now.
                    Principal::Device { id, .. } => {
                        let user = same(id.as_bytes(), r.device.as_bytes())
                            .then(|| self.user(r.user))
                            .flatten()
                            .filter(|u| u.has_device(r.device))
                            .ok_or(Deny::Misattributed)?;
                        // A derived kind is the data service provider's
                        // processing (X.1363 10.1), never a device's reading.
                        if kind.derived {
                            return Err(Deny::Derived);
                        }
                        user
                    }
                    // The data service provider's own processing publishes
                    // derived kinds (X.1363 10.1); nobody else may publish
                    // into the personal-data space.
                    Principal::Provider { id } => {
                        let is_data = self
                            .providers
                            .get(id)
                            .is_some_and(|p| p.role == ProviderRole::Data);
                        if !(is_data && kind.derived) {
                            return Err(Deny::NotADevice);
                        }
                        self.user(r.user).ok_or(Deny::UnknownUser)?
                    }
                    Principal::Anonymous => return Err(Deny::NotADevice),
                };
                user.may_collect(kind_id, self.kinds.len(), now)?;
                Ok(Ingress::Personal { kind, resolved: r })
            }
        }
    }

    /// Whether `who` may clear the retained message on `topic` (an empty
    /// retained PUBLISH): a personal-data topic naming `who`, a device bound
    /// to the user the topic names. Clearing collects nothing, so neither
    /// collection consent nor a window is asked: a user who withdrew
    /// collection can still have the device erase its last reading.
    pub fn may_clear_retained(&self, who: &Principal, topic: TopicName) -> bool {
        let Class::Personal(r, kind_id) = self.classify(topic.as_str()) else {
            return false;
        };
        match who {
            // Not a derived kind: that reading is the data service
            // provider's, which a device may not publish, nor erase.
            Principal::Device { id, .. } => {
                !self.kinds[kind_id as usize].derived
                    && same(id.as_bytes(), r.device.as_bytes())
                    && self.user(r.user).is_some_and(|u| u.has_device(r.device))
            }
            _ => false,
        }
    }

    /// Subscriptions are a coarse gate (purpose limitation); each delivery is
    /// still decided on its own by [`Act::deliver`].
    pub fn subscribe(&self, who: &Principal, filter: &str) -> Result<(), Deny> {
        let filter = topic::strip_shared(filter).ok_or(Deny::Invalid)?;
        if !topic::valid_filter(filter) {
            return Err(Deny::Invalid);
        }
        if let Principal::Provider { id } = who {
            if short_eq::strip_prefix(filter, NOTICE_PREFIX)
                .is_some_and(|p| same(p.as_bytes(), id.as_bytes()))
            {
                return Ok(());
            }
        }
        if self.acl.may_subscribe(who, filter) {
            return Ok(());
        }
        let requested = match who {
            Principal::Provider { id } => self.providers.get(id).map(|p| &p.requested),
            _ => None,
        };
        if let Some(requested) = requested {
            let any = self.templates.iter().any(|t| {
                requested
                    .iter()
                    .any(|&k| t.filter_may_match(filter, &self.kinds[k as usize].name))
            });
            if any {
                return Ok(());
            }
            if self
                .templates
                .iter()
                .any(|t| t.filter_overlaps_space(filter))
            {
                return Err(Deny::PurposeLimited);
            }
        }
        Err(Deny::Acl)
    }

    /// Sharing: may a message on `topic` reach `who` at `now`, and how?
    pub fn deliver<'a>(
        &'a self,
        who: &Principal,
        topic: &'a str,
        now: DateTime<Utc>,
    ) -> Result<Delivery<'a>, Deny> {
        match self.classify(topic) {
            Class::Notice(p) => match who {
                Principal::Provider { id } if id == p => Ok(Delivery::Plain),
                _ => Err(Deny::Acl),
            },
            Class::Plain => {
                if self.acl.allows(who, topic, Access::Read) {
                    Ok(Delivery::Plain)
                } else {
                    Err(Deny::Acl)
                }
            }
            Class::UnknownPersonal => Err(Deny::UnknownTopic),
            Class::Personal(r, kind_id) => {
                let Principal::Provider { id } = who else {
                    return Err(Deny::NotAProvider);
                };
                let user = self.user(r.user).ok_or(Deny::UnknownUser)?;
                // A device whose binding was removed no longer speaks for its user.
                if !user.has_device(r.device) {
                    return Err(Deny::Misattributed);
                }
                let rule = user
                    .share_rule(&self.provider_ids, id, kind_id)
                    .ok_or(Deny::NoShareConsent)?;
                if rule.expires.is_some_and(|e| e <= now) {
                    return Err(Deny::Expired);
                }
                Ok(Delivery::Personal {
                    kind: &self.kinds[kind_id as usize],
                    resolved: r,
                    rule,
                    receipt: user.receipt(self.kinds.len()),
                })
            }
        }
    }
}

fn in_windows(spans: impl IntoIterator<Item = Span>, tz: Tz, now: DateTime<Utc>) -> bool {
    let local = now.with_timezone(&tz);
    let day = local.weekday();
    let time = (local.num_seconds_from_midnight(), local.nanosecond());
    let on = |w: &Span, d: Weekday| w.days & day_bit(d) != 0;
    spans.into_iter().any(|w| {
        if w.from < w.to {
            on(&w, day) && w.from <= time && time < w.to
        } else {
            // Wraps midnight: the evening belongs to the listed day, the
            // early morning to the day after it.
            (on(&w, day) && time >= w.from) || (on(&w, day.pred()) && time < w.to)
        }
    })
}

/// The ACT in force. One atomic load per decision; a change is a new
/// snapshot, visible to the next decision.
pub struct ActHandle {
    current: ArcSwap<Act>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl ActHandle {
    pub fn new(act: Act) -> Self {
        let (changed, _) = tokio::sync::watch::channel(act.version);
        Self {
            current: ArcSwap::from_pointee(act),
            changed,
        }
    }

    pub fn load(&self) -> Guard<Arc<Act>> {
        self.current.load()
    }

    pub fn store(&self, act: Act) {
        let v = act.version;
        self.current.store(Arc::new(act));
        metrics::gauge!("consentry_act_version").set(v as f64);
        self.changed.send_replace(v);
    }

    /// Puts `act` in force without telling sessions: for a user's grants
    /// while their change commits (and back if it fails), which changes
    /// nothing sessions re-check (subscriptions, device bindings).
    pub fn store_quietly(&self, act: Arc<Act>) {
        self.current.store(act);
    }

    /// Sessions watch this to re-check what they hold.
    pub fn subscribe_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::{AclRule, Clients};
    use crate::model::*;
    use chrono::{NaiveTime, TimeZone, Weekday};

    fn kinds() -> Vec<Kind> {
        let k = |name: &str, category, fields: &[&str]| Kind {
            name: name.into(),
            category,
            sensitive: category == PiiCategory::Health,
            format: PayloadFormat::Json,
            fields: fields.iter().map(|s| s.to_string()).collect(),
            types: Default::default(),
            undeclared: Undeclared::Strip,
            derived: false,
        };
        vec![
            k("heart_rate", PiiCategory::Health, &["bpm"]),
            k("location", PiiCategory::Behavioral, &["lat", "lon"]),
            k("steps", PiiCategory::Behavioral, &["count"]),
        ]
    }

    fn provider(id: &str, purpose: &str, kinds: &[&str]) -> Provider {
        Provider {
            id: id.into(),
            name: id.into(),
            role: ProviderRole::Application,
            password_hash: None,
            cert_sha256: None,
            controller: Contact::default(),
            jurisdiction: None,
            privacy_policy: None,
            purposes: vec![Purpose {
                id: purpose.into(),
                statement: "s".into(),
                category: PurposeCategory::PersonalizedExperience,
                kinds: kinds.iter().map(|s| s.to_string()).collect(),
                core: true,
                retention_days: 365,
                termination: String::new(),
            }],
        }
    }

    fn dir(prefs: Vec<Preferences>) -> Directory {
        Directory {
            users: vec![
                User {
                    id: "alice".into(),
                    time_zone: "Europe/Paris".into(),
                    jurisdiction: None,
                },
                User {
                    id: "bob".into(),
                    time_zone: "UTC".into(),
                    jurisdiction: None,
                },
            ],
            devices: vec![
                Device {
                    id: "alice-watch".into(),
                    user: "alice".into(),
                    password_hash: None,
                    cert_sha256: None,
                },
                Device {
                    id: "bob-phone".into(),
                    user: "bob".into(),
                    password_hash: None,
                    cert_sha256: None,
                },
            ],
            providers: vec![
                provider("fitcoach", "coaching", &["heart_rate", "steps", "location"]),
                provider("insureco", "pricing", &["heart_rate", "steps"]),
            ],
            preferences: prefs,
            logins: vec![],
        }
    }

    fn alice_prefs() -> Preferences {
        let mut mask = std::collections::BTreeMap::new();
        mask.insert("lat".into(), MaskMethod::Generalize { decimals: 2 });
        mask.insert("lon".into(), MaskMethod::Generalize { decimals: 2 });
        Preferences {
            user: "alice".into(),
            version: 1,
            collect: ["heart_rate", "location", "steps"]
                .iter()
                .map(|k| CollectGrant {
                    kind: k.to_string(),
                    windows: vec![],
                })
                .collect(),
            share: vec![
                ShareGrant {
                    provider: "fitcoach".into(),
                    purpose: "coaching".into(),
                    kind: "heart_rate".into(),
                    mask: Default::default(),
                    expires: None,
                },
                ShareGrant {
                    provider: "fitcoach".into(),
                    purpose: "coaching".into(),
                    kind: "location".into(),
                    mask,
                    expires: None,
                },
            ],
            receipt: Some(ALICE_RECEIPT.into()),
        }
    }

    const ALICE_RECEIPT: &str = "8a0ee6c2-3f1c-4f43-9d36-0a5e6b8e2a11";

    fn act(prefs: Vec<Preferences>, acl: Acl) -> Act {
        Act::compile(
            1,
            &["pii/{user}/{device}/{kind}".to_string()],
            &kinds(),
            &dir(prefs),
            acl,
        )
        .unwrap()
    }

    fn dev(id: &str, user: &str) -> Principal {
        Principal::Device {
            id: id.into(),
            user: user.into(),
        }
    }

    fn prov(id: &str) -> Principal {
        Principal::Provider { id: id.into() }
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0).unwrap() // a Monday
    }

    fn name(topic: &str) -> TopicName<'_> {
        TopicName::new(topic).expect("a valid topic name")
    }

    #[test]
    fn kind_ids_find_every_name_and_only_those() {
        let long_a = "a".repeat(LONG_KIND + 5);
        let long_b = format!("{}b", "a".repeat(LONG_KIND + 4));
        let names = ["steps", "sleep", "x", "heart_rate", &long_a, &long_b];
        let mut ids = KindIds::default();
        for (i, n) in names.iter().enumerate() {
            assert!(ids.insert(n, i as u16), "{n}");
        }
        for (i, n) in names.iter().enumerate() {
            assert_eq!(ids.get(n), Some(i as u16), "{n}");
        }
        // Same length as a kind, a prefix of one, longer, empty: none is one.
        for n in [
            "steep",
            "heart_rat",
            "heart_rates",
            "",
            &"a".repeat(LONG_KIND),
        ] {
            assert_eq!(ids.get(n), None, "{n:?}");
        }
        assert!(!ids.insert("sleep", 9), "a second `sleep`");
        assert!(!ids.insert(&long_b, 9), "a second long name");
        assert_eq!(ids.get("sleep"), Some(1));
    }

    /// A derived kind is published by the data service provider only: a
    /// device may neither publish it nor clear its retained message, which
    /// would replace or erase the provider's.
    #[test]
    fn a_device_neither_publishes_nor_clears_a_derived_kind() {
        let mut all = kinds();
        all.push(Kind {
            name: "stress".into(),
            category: PiiCategory::Health,
            sensitive: true,
            format: PayloadFormat::Json,
            fields: vec!["level".into()],
            types: Default::default(),
            undeclared: Undeclared::Strip,
            derived: true,
        });
        let mut prefs = alice_prefs();
        prefs.collect.push(CollectGrant {
            kind: "stress".into(),
            windows: vec![],
        });
        let mut d = dir(vec![prefs]);
        let mut ops = provider("ops", "derive", &["heart_rate"]);
        ops.role = ProviderRole::Data;
        d.providers.push(ops);
        let templates = ["pii/{user}/{device}/{kind}".to_string()];
        let a = Act::compile(1, &templates, &all, &d, Acl::deny_all()).unwrap();
        let alice = dev("alice-watch", "alice");
        let stress = name("pii/alice/alice-watch/stress");
        let got = a.ingress(&alice, stress, now()).map(|_| ());
        assert_eq!(got, Err(Deny::Derived));
        assert!(a.ingress(&prov("ops"), stress, now()).is_ok());
        assert!(!a.may_clear_retained(&alice, stress));
        // Its own readings of collected kinds it still clears; nobody else's.
        let heart = name("pii/alice/alice-watch/heart_rate");
        assert!(a.may_clear_retained(&alice, heart));
        assert!(!a.may_clear_retained(&dev("bob-phone", "bob"), heart));
        assert!(!a.may_clear_retained(&prov("ops"), heart));
    }

    #[test]
    fn ingress_table() {
        let a = act(vec![alice_prefs()], Acl::deny_all());
        let alice = dev("alice-watch", "alice");
        let cases: &[(&Principal, &str, Result<(), Deny>)] = &[
            (&alice, "pii/alice/alice-watch/heart_rate", Ok(())),
            (&alice, "pii/alice/alice-watch/location", Ok(())),
            (
                &alice,
                "pii/bob/alice-watch/heart_rate",
                Err(Deny::Misattributed),
            ),
            (
                &alice,
                "pii/alice/bob-phone/heart_rate",
                Err(Deny::Misattributed),
            ),
            (
                &alice,
                "pii/alice/alice-watch/mood",
                Err(Deny::UnknownTopic),
            ),
            (&alice, "pii/alice/alice-watch", Err(Deny::UnknownTopic)),
            (&alice, "status/alice-watch", Err(Deny::Acl)),
            (
                &prov("fitcoach"),
                "pii/alice/alice-watch/steps",
                Err(Deny::NotADevice),
            ),
            (
                &Principal::Anonymous,
                "pii/alice/alice-watch/steps",
                Err(Deny::NotADevice),
            ),
        ];
        for (who, topic, want) in cases {
            let got = a.ingress(who, name(topic), now()).map(|_| ());
            assert_eq!(&got, want, "{who:?} {topic}");
        }
        let bob = dev("bob-phone", "bob");
        assert_eq!(
            a.ingress(&bob, name("pii/bob/bob-phone/location"), now())
                .map(|_| ()),
            Err(Deny::NoCollectConsent)
        );
    }

    /// Windows are wall-clock times in the user's zone: on the night clocks
    /// go forward, a window inside the skipped hour never opens; on the night
    /// they go back, the hour that happens twice is inside it both times.
    #[test]
    fn collection_windows_across_daylight_saving_changes() {
        let mut prefs = alice_prefs();
        prefs.collect[0].windows = vec![Window {
            days: vec![Weekday::Sun],
            from: NaiveTime::from_hms_opt(2, 0, 0).unwrap(),
            to: NaiveTime::from_hms_opt(3, 0, 0).unwrap(),
        }];
        let a = act(vec![prefs], Acl::deny_all());
        let alice = dev("alice-watch", "alice");
        let topic = name("pii/alice/alice-watch/heart_rate");
        let open = |y, m, d, h, min| {
            let at = Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap();
            match a.ingress(&alice, topic, at) {
                Ok(_) => true,
                Err(Deny::OutsideWindow) => false,
                Err(e) => panic!("{e:?}"),
            }
        };
        // Sunday 29 March 2026, Paris: 01:00 UTC is 02:00 CET, which becomes 03:00 CEST.
        for (h, min) in [(0, 30), (0, 59), (1, 0), (1, 30), (2, 0)] {
            assert!(!open(2026, 3, 29, h, min), "{h:02}:{min:02} UTC, 29 March");
        }
        // A week later the window opens at 02:00 CEST, 00:00 UTC.
        assert!(open(2026, 4, 5, 0, 0));
        // Sunday 25 October 2026: 01:00 UTC is 03:00 CEST, which becomes 02:00 CET.
        assert!(!open(2026, 10, 24, 23, 59), "01:59 CEST");
        for (h, min) in [(0, 0), (0, 59), (1, 0), (1, 59)] {
            assert!(
                open(2026, 10, 25, h, min),
                "{h:02}:{min:02} UTC, 25 October"
            );
        }
        assert!(!open(2026, 10, 25, 2, 0), "03:00 CET");
    }

    #[test]
    fn collection_windows_in_user_time_zone() {
        let mut prefs = alice_prefs();
        let weekdays = vec![
            Weekday::Mon,
            Weekday::Tue,
            Weekday::Wed,
            Weekday::Thu,
            Weekday::Fri,
        ];
        prefs.collect[0].windows = vec![Window {
            days: weekdays,
            from: NaiveTime::from_hms_opt(9, 0, 0).unwrap(),
            to: NaiveTime::from_hms_opt(17, 30, 0).unwrap(),
        }];
        let a = act(vec![prefs], Acl::deny_all());
        let alice = dev("alice-watch", "alice");
        let at = |y, m, d, h, min| Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap();
        let topic = name("pii/alice/alice-watch/heart_rate");
        // Paris is UTC+1 in November: 07:59 UTC is 08:59 local.
        assert_eq!(
            a.ingress(&alice, topic, at(2026, 11, 23, 7, 59))
                .map(|_| ()),
            Err(Deny::OutsideWindow)
        );
        assert!(a.ingress(&alice, topic, at(2026, 11, 23, 8, 0)).is_ok());
        assert!(a.ingress(&alice, topic, at(2026, 11, 23, 16, 29)).is_ok());
        assert_eq!(
            a.ingress(&alice, topic, at(2026, 11, 23, 16, 30))
                .map(|_| ()),
            Err(Deny::OutsideWindow)
        );
        // Saturday.
        assert_eq!(
            a.ingress(&alice, topic, at(2026, 11, 28, 10, 0))
                .map(|_| ()),
            Err(Deny::OutsideWindow)
        );
        // Summer time: UTC+2, so 07:00 UTC is 09:00 local on a Wednesday.
        assert!(a.ingress(&alice, topic, at(2026, 7, 1, 7, 0)).is_ok());
        // Other kinds have no window.
        assert!(a
            .ingress(
                &alice,
                name("pii/alice/alice-watch/steps"),
                at(2026, 11, 28, 3, 0)
            )
            .is_ok());
    }

    #[test]
    fn window_wrapping_midnight() {
        let w = Window {
            days: vec![Weekday::Fri],
            from: NaiveTime::from_hms_opt(22, 0, 0).unwrap(),
            to: NaiveTime::from_hms_opt(6, 0, 0).unwrap(),
        };
        let tz: Tz = "UTC".parse().unwrap();
        let at = |d, h| Utc.with_ymd_and_hms(2026, 11, d, h, 0, 0).unwrap();
        let w = [Span::of(&w)];
        assert!(in_windows(w, tz, at(27, 23))); // Fri 23:00
        assert!(in_windows(w, tz, at(28, 5))); // Sat 05:00
        assert!(!in_windows(w, tz, at(28, 6)));
        assert!(!in_windows(w, tz, at(27, 21)));
    }

    #[test]
    fn delivery_table() {
        let a = act(vec![alice_prefs()], Acl::deny_all());
        let fit = prov("fitcoach");
        let ins = prov("insureco");
        let hr = "pii/alice/alice-watch/heart_rate";
        match a.deliver(&fit, hr, now()) {
            Ok(Delivery::Personal {
                rule,
                kind,
                receipt,
                ..
            }) => {
                assert_eq!(*rule.view, View::Deliver);
                assert_eq!(rule.purpose, "coaching");
                assert_eq!(kind.name, "heart_rate");
                assert_eq!(
                    receipt.map(|r| r.to_string()).as_deref(),
                    Some(ALICE_RECEIPT)
                );
            }
            other => panic!("{other:?}"),
        }
        match a.deliver(&fit, "pii/alice/alice-watch/location", now()) {
            Ok(Delivery::Personal { rule, .. }) => {
                assert!(matches!(*rule.view, View::Mask(ref m) if m.len() == 2))
            }
            other => panic!("{other:?}"),
        }
        let denied = |who: &Principal, t: &str| a.deliver(who, t, now()).map(|_| ()).unwrap_err();
        assert_eq!(
            denied(&fit, "pii/alice/alice-watch/steps"),
            Deny::NoShareConsent
        );
        assert_eq!(denied(&ins, hr), Deny::NoShareConsent);
        assert_eq!(denied(&dev("bob-phone", "bob"), hr), Deny::NotAProvider);
        assert_eq!(
            denied(&fit, "pii/alice/bob-phone/heart_rate"),
            Deny::Misattributed
        );
        assert_eq!(denied(&fit, "pii/carol/c-1/heart_rate"), Deny::UnknownUser);
        assert_eq!(denied(&fit, "pii/alice/alice-watch/x"), Deny::UnknownTopic);
        assert_eq!(denied(&fit, "status/x"), Deny::Acl);
    }

    #[test]
    fn notices_reach_only_their_provider() {
        let a = act(vec![alice_prefs()], Acl::deny_all());
        let t = "consentry/notices/fitcoach";
        assert_eq!(a.subscribe(&prov("fitcoach"), t), Ok(()));
        assert_eq!(a.subscribe(&prov("insureco"), t), Err(Deny::Acl));
        assert!(matches!(
            a.deliver(&prov("fitcoach"), t, now()),
            Ok(Delivery::Plain)
        ));
        assert_eq!(
            a.deliver(&prov("insureco"), t, now()).map(|_| ()),
            Err(Deny::Acl)
        );
        assert_eq!(
            a.ingress(&prov("fitcoach"), name(t), now()).map(|_| ()),
            Err(Deny::Reserved)
        );
        assert_eq!(
            a.ingress(&dev("alice-watch", "alice"), name(t), now())
                .map(|_| ()),
            Err(Deny::Reserved)
        );
    }

    #[test]
    fn expired_share() {
        let mut prefs = alice_prefs();
        prefs.share[0].expires = Some(now());
        let a = act(vec![prefs], Acl::deny_all());
        assert_eq!(
            a.deliver(&prov("fitcoach"), "pii/alice/alice-watch/heart_rate", now())
                .map(|_| ())
                .unwrap_err(),
            Deny::Expired
        );
    }

    #[test]
    fn subscription_table() {
        let acl = Acl::new(vec![AclRule {
            filter: "status/#".into(),
            clients: Clients::Any,
            access: Access::ReadWrite,
        }]);
        let a = act(vec![alice_prefs()], acl);
        let fit = prov("fitcoach");
        let ins = prov("insureco");
        assert_eq!(a.subscribe(&fit, "pii/#"), Ok(()));
        assert_eq!(a.subscribe(&fit, "pii/+/+/location"), Ok(()));
        assert_eq!(
            a.subscribe(&ins, "pii/+/+/location"),
            Err(Deny::PurposeLimited)
        );
        assert_eq!(
            a.subscribe(&ins, "$share/g/pii/+/+/location"),
            Err(Deny::PurposeLimited)
        );
        assert_eq!(a.subscribe(&ins, "$share/g/pii/+/+/steps"), Ok(()));
        assert_eq!(a.subscribe(&ins, "$SYS/#"), Err(Deny::Acl));
        assert_eq!(a.subscribe(&ins, "status/+"), Ok(()));
        assert_eq!(a.subscribe(&ins, "other/+"), Err(Deny::Acl));
        assert_eq!(a.subscribe(&ins, "pii/#/x"), Err(Deny::Invalid));
        assert_eq!(
            a.subscribe(&dev("alice-watch", "alice"), "pii/#"),
            Err(Deny::Acl)
        );
        // `#` overlaps the open status/ space, so it is held; deliveries decide.
        assert_eq!(a.subscribe(&dev("alice-watch", "alice"), "#"), Ok(()));
    }

    #[test]
    fn compile_errors() {
        let mut p = alice_prefs();
        p.share.push(ShareGrant {
            provider: "insureco".into(),
            purpose: "pricing".into(),
            kind: "location".into(),
            mask: Default::default(),
            expires: None,
        });
        let err = Act::compile(
            1,
            &["pii/{user}/{device}/{kind}".to_string()],
            &kinds(),
            &dir(vec![p]),
            Acl::deny_all(),
        )
        .unwrap_err();
        assert!(
            matches!(err, CompileError::PurposeLimitation { .. }),
            "{err}"
        );

        let mut p = alice_prefs();
        p.share[1].mask.insert("alt".into(), MaskMethod::Remove);
        let err = Act::compile(
            1,
            &["pii/{user}/{device}/{kind}".to_string()],
            &kinds(),
            &dir(vec![p]),
            Acl::deny_all(),
        )
        .unwrap_err();
        assert!(matches!(err, CompileError::MaskField { .. }), "{err}");

        let mut p = alice_prefs();
        p.collect.push(CollectGrant {
            kind: "mood".into(),
            windows: vec![],
        });
        let err = Act::compile(
            1,
            &["pii/{user}/{device}/{kind}".to_string()],
            &kinds(),
            &dir(vec![p]),
            Acl::deny_all(),
        )
        .unwrap_err();
        assert!(matches!(err, CompileError::PrefKind { .. }), "{err}");
    }

    fn user(id: &str) -> User {
        User {
            id: id.into(),
            time_zone: "UTC".into(),
            jurisdiction: None,
        }
    }

    #[test]
    fn devices_move_between_users() {
        let a = act(vec![alice_prefs()], Acl::deny_all());
        let fit = prov("fitcoach");
        let hr = "pii/alice/alice-watch/heart_rate";
        assert_eq!(a.device_user("alice-watch"), Some("alice"));
        assert_eq!(a.device_user("nobody"), None);
        assert!(matches!(
            a.with_device(2, "x", "carol"),
            Err(CompileError::DeviceUser { .. })
        ));

        let a = a.with_device(2, "alice-phone", "alice").unwrap();
        assert_eq!(a.version, 2);
        assert_eq!(a.device_user("alice-phone"), Some("alice"));
        assert!(a
            .deliver(&fit, "pii/alice/alice-phone/heart_rate", now())
            .is_ok());
        assert!(a.deliver(&fit, hr, now()).is_ok());
        // Binding a device again to its own user changes nothing.
        let a = a.with_device(3, "alice-phone", "alice").unwrap();
        assert!(a
            .deliver(&fit, "pii/alice/alice-phone/heart_rate", now())
            .is_ok());

        let moved = a.with_device(4, "alice-watch", "bob").unwrap();
        assert_eq!(moved.device_user("alice-watch"), Some("bob"));
        assert_eq!(
            moved.deliver(&fit, hr, now()).map(|_| ()),
            Err(Deny::Misattributed)
        );
        assert_eq!(
            moved
                .ingress(&dev("alice-watch", "alice"), name(hr), now())
                .map(|_| ()),
            Err(Deny::Misattributed)
        );
        // Under bob it is bound, and bob's own (missing) consent decides.
        assert_eq!(
            moved
                .ingress(
                    &dev("alice-watch", "bob"),
                    name("pii/bob/alice-watch/heart_rate"),
                    now()
                )
                .map(|_| ()),
            Err(Deny::NoCollectConsent)
        );
        // Removed: bound to nobody, refused both ways; the user's other
        // devices are untouched.
        let gone = a.without_device(5, "alice-watch");
        assert_eq!(gone.version, 5);
        assert_eq!(gone.device_user("alice-watch"), None);
        assert_eq!(
            gone.deliver(&fit, hr, now()).map(|_| ()),
            Err(Deny::Misattributed)
        );
        assert_eq!(
            gone.ingress(&dev("alice-watch", "alice"), name(hr), now())
                .map(|_| ()),
            Err(Deny::Misattributed)
        );
        assert!(gone
            .deliver(&fit, "pii/alice/alice-phone/heart_rate", now())
            .is_ok());
        assert_eq!(
            gone.without_device(6, "alice-watch")
                .device_user("alice-phone"),
            Some("alice")
        );
        // Alice's other devices and the snapshot before stay as they were.
        assert!(moved
            .deliver(&fit, "pii/alice/alice-phone/heart_rate", now())
            .is_ok());
        assert!(a.deliver(&fit, hr, now()).is_ok());
    }

    #[test]
    fn user_changes_keep_devices_and_other_users() {
        let a = act(vec![alice_prefs()], Acl::deny_all());
        let fit = prov("fitcoach");
        let mut prefs = alice_prefs();
        prefs.share.remove(0);
        prefs.receipt = Some("not a uuid".into());
        assert!(matches!(
            a.with_user(2, &user("alice"), Some(&prefs)),
            Err(CompileError::Receipt { .. })
        ));
        let second = "0b7d3a52-9c61-4d2e-8f0a-6f1e2d3c4b5a";
        prefs.receipt = Some(second.into());
        let b = a.with_user(2, &user("alice"), Some(&prefs)).unwrap();
        // The record names the new version's receipt (collection reads
        // past it: the ingress check below).
        match b.deliver(&fit, "pii/alice/alice-watch/location", now()) {
            Ok(Delivery::Personal { receipt, .. }) => {
                assert_eq!(receipt.map(|r| r.to_string()).as_deref(), Some(second))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            b.deliver(&fit, "pii/alice/alice-watch/heart_rate", now())
                .map(|_| ()),
            Err(Deny::NoShareConsent)
        );
        assert!(b
            .deliver(&fit, "pii/alice/alice-watch/location", now())
            .is_ok());
        assert_eq!(b.device_user("alice-watch"), Some("alice"));
        assert!(b
            .ingress(
                &dev("alice-watch", "alice"),
                name("pii/alice/alice-watch/steps"),
                now()
            )
            .is_ok());
        // The old snapshot is untouched.
        assert!(a
            .deliver(&fit, "pii/alice/alice-watch/heart_rate", now())
            .is_ok());

        // A new user, then a device for them.
        let c = b.with_user(3, &user("carol"), None).unwrap();
        let c = c.with_device(4, "carol-ring", "carol").unwrap();
        assert_eq!(
            c.deliver(&fit, "pii/carol/carol-ring/heart_rate", now())
                .map(|_| ()),
            Err(Deny::NoShareConsent)
        );
        let mut carol = alice_prefs();
        carol.user = "carol".into();
        let c = c.with_user(5, &user("carol"), Some(&carol)).unwrap();
        assert!(c
            .deliver(&fit, "pii/carol/carol-ring/heart_rate", now())
            .is_ok());
        assert_eq!(c.device_user("carol-ring"), Some("carol"));
        assert!(matches!(
            c.with_user(
                6,
                &user("carol"),
                Some(&{
                    let mut p = carol.clone();
                    p.share[0].provider = "nobody".into();
                    p
                })
            ),
            Err(CompileError::PrefProvider { .. })
        ));
    }

    #[test]
    fn rules_nobody_grants_are_dropped() {
        let mut a = act(vec![alice_prefs()], Acl::deny_all());
        for day in 1..50 {
            let mut prefs = alice_prefs();
            prefs.share[0].expires = Some(now() + chrono::Duration::days(day));
            a = a
                .with_user(day as u64 + 1, &user("alice"), Some(&prefs))
                .unwrap();
        }
        let shard = &a.users[a.hash("alice") as usize % SHARDS];
        let live = shard.rules.iter().filter(|(r, _)| r.is_some()).count();
        assert_eq!(live, 2);
        assert!(shard.rules.len() <= 3, "{}", shard.rules.len());
        assert_eq!(shard.rules.iter().map(|(_, n)| n).sum::<u32>(), 2);
        match a.deliver(&prov("fitcoach"), "pii/alice/alice-watch/heart_rate", now()) {
            Ok(Delivery::Personal { rule, .. }) => {
                assert_eq!(rule.expires, Some(now() + chrono::Duration::days(49)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tables_grow_and_replace() {
        let hasher = foldhash::fast::RandomState::default();
        let hash = |k: &str| hasher.hash_one(k.as_bytes());
        let key = |i: usize| format!("key-{i}-{}", "x".repeat(i % 200));
        let value = |i: usize| vec![i as u8; i % 300];
        // Half built at once, half added one by one (growing the table).
        let mut b = TableBuilder::default();
        for i in 0..1000 {
            b.push(tag_of(hash(&key(i))), key(i).as_bytes(), &value(i));
        }
        let mut t = b.finish().expect("no duplicates");
        for i in 1000..2000 {
            t = t.with(hash(&key(i)), key(i).as_bytes(), &value(i));
        }
        for i in (0..2000).step_by(7) {
            t = t.with(hash(&key(i)), key(i).as_bytes(), &[1, 2, 3]);
        }
        let k = key(5000);
        t = t.with(hash(&k), k.as_bytes(), b"new");
        assert_eq!(t.len, 2001);
        assert!(t.starts.len() > t.len, "at least as many buckets as keys");
        for i in 0..2000 {
            let want = if i % 7 == 0 { vec![1, 2, 3] } else { value(i) };
            assert_eq!(t.get(hash(&key(i)), key(i).as_bytes()), Some(&want[..]));
        }
        assert_eq!(t.get(hash(&k), k.as_bytes()), Some(&b"new"[..]));
        assert_eq!(t.get(hash("absent"), b"absent"), None);
        assert_eq!(Table::default().get(hash("absent"), b"absent"), None);
        assert_eq!(Records(&t.data).count(), 2001);

        // Removing every third key leaves the rest found, and adding after
        // a removal still works.
        for i in (0..2000).step_by(3) {
            t = t
                .without(hash(&key(i)), key(i).as_bytes())
                .expect("present");
        }
        assert!(t.without(hash(&key(0)), key(0).as_bytes()).is_none());
        t = t.with(hash(&key(3)), key(3).as_bytes(), b"back");
        for i in 0..2000 {
            let got = t.get(hash(&key(i)), key(i).as_bytes());
            match i {
                3 => assert_eq!(got, Some(&b"back"[..])),
                _ if i % 3 == 0 => assert_eq!(got, None, "{i}"),
                _ if i % 7 == 0 => assert_eq!(got, Some(&[1, 2, 3][..])),
                _ => assert_eq!(got, Some(&value(i)[..])),
            }
        }
        assert_eq!(t.len, 2001 - 667 + 1);
        assert_eq!(Records(&t.data).count(), t.len);
    }

    #[test]
    fn tables_find_keys_that_share_a_tag() {
        // Equal tags (as from a hash collision) are told apart by the key.
        let mut b = TableBuilder::default();
        b.push(7, b"a", b"1");
        b.push(7, b"b", b"2");
        let t = b.finish().expect("distinct keys");
        let hash = 7u64 << 32;
        assert_eq!(t.get(hash, b"a"), Some(&b"1"[..]));
        assert_eq!(t.get(hash, b"b"), Some(&b"2"[..]));
        assert_eq!(t.get(hash, b"c"), None);
        let t = t.with(hash, b"a", b"3").with(hash, b"c", b"4");
        assert_eq!(t.get(hash, b"a"), Some(&b"3"[..]));
        assert_eq!(t.get(hash, b"b"), Some(&b"2"[..]));
        assert_eq!(t.get(hash, b"c"), Some(&b"4"[..]));

        let mut b = TableBuilder::default();
        b.push(7, b"a", b"1");
        b.push(9, b"b", b"2");
        b.push(7, b"a", b"3");
        assert_eq!(b.finish().err(), Some(b"a".to_vec()));
    }

    #[test]
    fn many_kinds_providers_and_long_ids() {
        // Indexes and lengths past 127 take two varint bytes; more than
        // eight kinds take more than one byte of bits.
        let kinds: Vec<Kind> = (0..150)
            .map(|i| Kind {
                name: format!("k{i}"),
                category: PiiCategory::Behavioral,
                sensitive: false,
                format: PayloadFormat::Json,
                fields: vec!["v".into()],
                types: Default::default(),
                undeclared: Undeclared::Strip,
                derived: false,
            })
            .collect();
        let names: Vec<&str> = kinds.iter().map(|k| k.name.as_str()).collect();
        let uid = "u".repeat(300);
        let did = "d".repeat(200);
        let mut d = Directory {
            users: vec![User {
                id: uid.clone(),
                time_zone: "Pacific/Auckland".into(),
                jurisdiction: None,
            }],
            devices: vec![Device {
                id: did.clone(),
                user: uid.clone(),
                password_hash: None,
                cert_sha256: None,
            }],
            providers: (0..200)
                .map(|i| provider(&format!("p{i}"), "all", &names))
                .collect(),
            ..Default::default()
        };
        let window = Window {
            days: vec![Weekday::Mon],
            from: NaiveTime::from_hms_opt(0, 0, 0).unwrap(),
            to: NaiveTime::from_hms_nano_opt(23, 59, 59, 999_999_999).unwrap(),
        };
        d.preferences = vec![Preferences {
            user: uid.clone(),
            version: 1,
            collect: vec![
                CollectGrant {
                    kind: "k140".into(),
                    windows: vec![],
                },
                CollectGrant {
                    kind: "k9".into(),
                    windows: vec![Window {
                        days: vec![Weekday::Sun],
                        ..window.clone()
                    }],
                },
                CollectGrant {
                    kind: "k130".into(),
                    windows: vec![window],
                },
            ],
            share: vec![ShareGrant {
                provider: "p199".into(),
                purpose: "all".into(),
                kind: "k149".into(),
                mask: Default::default(),
                expires: None,
            }],
            receipt: None,
        }];
        let a = Act::compile(
            1,
            &["pii/{user}/{device}/{kind}".to_string()],
            &kinds,
            &d,
            Acl::deny_all(),
        )
        .unwrap();
        let me = dev(&did, &uid);
        let topic = |k: &str| format!("pii/{uid}/{did}/{k}");
        // 10:00 UTC on Monday 23 November is 23:00 on Monday in Auckland.
        let ingress = |k: &str| a.ingress(&me, name(&topic(k)), now()).map(|_| ());
        assert_eq!(ingress("k140"), Ok(()));
        assert_eq!(ingress("k130"), Ok(()));
        assert_eq!(ingress("k9"), Err(Deny::OutsideWindow));
        assert_eq!(ingress("k8"), Err(Deny::NoCollectConsent));
        assert!(a.deliver(&prov("p199"), &topic("k149"), now()).is_ok());
        assert_eq!(
            a.deliver(&prov("p198"), &topic("k149"), now()).map(|_| ()),
            Err(Deny::NoShareConsent)
        );
        assert_eq!(
            a.deliver(&prov("p199"), &topic("k148"), now()).map(|_| ()),
            Err(Deny::NoShareConsent)
        );
        assert_eq!(a.device_user(&did), Some(uid.as_str()));
    }

    #[test]
    fn time_zones_round_trip() {
        for tz in chrono_tz::TZ_VARIANTS {
            assert_eq!(chrono_tz::TZ_VARIANTS[usize::from(tz_index(tz))], tz);
        }
    }

    #[test]
    fn compile_rejects_duplicates_and_strays() {
        let compile = |d: &Directory| {
            Act::compile(
                1,
                &["pii/{user}/{device}/{kind}".to_string()],
                &kinds(),
                d,
                Acl::deny_all(),
            )
        };
        let mut d = dir(vec![]);
        d.users.push(d.users[0].clone());
        assert!(matches!(
            compile(&d),
            Err(CompileError::Duplicate { what: "user", .. })
        ));
        let mut d = dir(vec![]);
        d.devices.push(d.devices[0].clone());
        assert!(matches!(
            compile(&d),
            Err(CompileError::Duplicate { what: "device", .. })
        ));
        let mut d = dir(vec![]);
        d.devices[1].user = "carol".into();
        assert!(matches!(compile(&d), Err(CompileError::DeviceUser { .. })));
        let mut p = alice_prefs();
        p.user = "carol".into();
        assert!(matches!(
            compile(&dir(vec![p])),
            Err(CompileError::PrefUser(_))
        ));
    }
}

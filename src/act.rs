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

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Guard};
use chrono::{DateTime, Datelike, Utc};
use chrono_tz::Tz;
use thiserror::Error;

use crate::acl::{Access, Acl};
use crate::model::{Directory, Kind, MaskMethod, PayloadFormat, Preferences, ProviderRole, Window};
use crate::topic::{self, Resolved, Template};

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
        }
    }
}

#[derive(Debug, Error)]
pub enum CompileError {
    #[error("template: {0}")]
    Template(#[from] topic::TemplateError),
    #[error("kind {0:?} is declared twice")]
    DuplicateKind(String),
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
    PrefKind { user: String, kind: String },
    #[error("preferences of {user:?} name unknown provider {provider:?}")]
    PrefProvider { user: String, provider: String },
    #[error(
        "preferences of {user:?}: provider {provider:?} has no purpose {purpose:?} asking for {kind:?}"
    )]
    PurposeLimitation {
        user: String,
        provider: String,
        purpose: String,
        kind: String,
    },
    #[error("preferences of {user:?}: kind {kind:?} is shared twice with {provider:?}")]
    DuplicateShare {
        user: String,
        provider: String,
        kind: String,
    },
    #[error("preferences of {user:?}: kind {kind:?} has no field {field:?} to mask")]
    MaskField {
        user: String,
        kind: String,
        field: String,
    },
    #[error("preferences of {user:?}: kind {kind:?} is opaque and can only be shared whole")]
    MaskOpaque { user: String, kind: String },
}

/// What a provider sees of one kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum View {
    Deliver,
    /// Field path → method, sorted by path.
    Mask(Vec<(String, MaskMethod)>),
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ShareRule {
    pub purpose: String,
    pub view: Arc<View>,
    pub expires: Option<DateTime<Utc>>,
}

/// One user's compiled preferences, kept small: there may be millions.
#[derive(Debug, Clone)]
struct UserRules {
    tz: Tz,
    /// A bit per kind id: collected at any time.
    always: Box<[u64]>,
    /// Kinds collected only inside these windows.
    windows: Box<[(u16, Box<[Window]>)]>,
    /// (provider index, kind id, rule); a handful per user, so a scan beats
    /// a map. Equal rules are one allocation shared by every user.
    share: Box<[(u16, u16, Arc<ShareRule>)]>,
}

#[derive(Debug)]
struct ProviderRules {
    index: u16,
    role: ProviderRole,
    /// Kind ids some purpose of this provider asks for.
    requested: Vec<u16>,
    /// Purpose id → the kind ids it asks for.
    purposes: FastMap<String, Vec<u16>>,
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// Users and devices are split over shards, each behind its own `Arc`, so
/// one user's change copies one shard, not the table.
const SHARDS: usize = 1024;
type Shards<V> = Vec<Arc<FastMap<Box<str>, V>>>;

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
    },
    Plain,
}

#[derive(Debug)]
pub struct Act {
    pub version: u64,
    templates: Vec<Template>,
    kinds: Vec<Kind>,
    kind_ids: FastMap<String, u16>,
    providers: FastMap<String, ProviderRules>,
    users: Shards<UserRules>,
    /// Device id → the user it is bound to.
    devices: Shards<Box<str>>,
    acl: Acl,
    shard_of: foldhash::fast::RandomState,
    /// Interned share rules, shared by every version of the ACT.
    rules: Arc<Mutex<FastMap<Arc<ShareRule>, ()>>>,
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
        let mut kind_ids = FastMap::default();
        for (i, k) in kinds.iter().enumerate() {
            if kind_ids.insert(k.name.clone(), i as u16).is_some() {
                return Err(CompileError::DuplicateKind(k.name.clone()));
            }
        }
        let mut providers = FastMap::default();
        for (index, p) in dir.providers.iter().enumerate() {
            let mut requested = Vec::new();
            let mut purposes = FastMap::default();
            for purpose in &p.purposes {
                let mut ids = Vec::new();
                for k in &purpose.kinds {
                    let id = *kind_ids.get(k).ok_or_else(|| CompileError::PurposeKind {
                        provider: p.id.clone(),
                        purpose: purpose.id.clone(),
                        kind: k.clone(),
                    })?;
                    ids.push(id);
                    if !requested.contains(&id) {
                        requested.push(id);
                    }
                }
                purposes.insert(purpose.id.clone(), ids);
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
            users: Vec::new(),
            devices: Vec::new(),
            acl,
            shard_of: foldhash::fast::RandomState::default(),
            rules: Arc::default(),
        };

        let mut users: Vec<FastMap<Box<str>, UserRules>> =
            (0..SHARDS).map(|_| FastMap::default()).collect();
        let prefs: FastMap<&str, &Preferences> = dir
            .preferences
            .iter()
            .map(|p| (p.user.as_str(), p))
            .collect();
        for u in &dir.users {
            let tz = parse_tz(&u.id, &u.time_zone)?;
            let rules = act.user_rules(&u.id, tz, prefs.get(u.id.as_str()).copied())?;
            let shard = act.shard(&u.id);
            if users[shard].insert(u.id.as_str().into(), rules).is_some() {
                return Err(CompileError::Duplicate {
                    what: "user",
                    id: u.id.clone(),
                });
            }
        }
        for p in &dir.preferences {
            if !users[act.shard(&p.user)].contains_key(p.user.as_str()) {
                return Err(CompileError::PrefUser(p.user.clone()));
            }
        }
        let mut devices: Vec<FastMap<Box<str>, Box<str>>> =
            (0..SHARDS).map(|_| FastMap::default()).collect();
        for d in &dir.devices {
            if !users[act.shard(&d.user)].contains_key(d.user.as_str()) {
                return Err(CompileError::DeviceUser {
                    device: d.id.clone(),
                    user: d.user.clone(),
                });
            }
            let shard = act.shard(&d.id);
            if devices[shard]
                .insert(d.id.as_str().into(), d.user.as_str().into())
                .is_some()
            {
                return Err(CompileError::Duplicate {
                    what: "device",
                    id: d.id.clone(),
                });
            }
        }
        act.users = users.into_iter().map(Arc::new).collect();
        act.devices = devices.into_iter().map(Arc::new).collect();
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
        let i = self.shard(&user.id);
        let mut shard = (*self.users[i]).clone();
        shard.insert(user.id.as_str().into(), rules);
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
        let i = self.shard(device);
        let mut shard = (*self.devices[i]).clone();
        shard.insert(device.into(), user.into());
        let mut devices = self.devices.clone();
        devices[i] = Arc::new(shard);
        Ok(self.next(version, self.users.clone(), devices))
    }

    fn next(&self, version: u64, users: Shards<UserRules>, devices: Shards<Box<str>>) -> Act {
        Act {
            version,
            templates: self.templates.clone(),
            kinds: self.kinds.clone(),
            kind_ids: self.kind_ids.clone(),
            providers: self
                .providers
                .iter()
                .map(|(k, p)| {
                    (
                        k.clone(),
                        ProviderRules {
                            index: p.index,
                            role: p.role,
                            requested: p.requested.clone(),
                            purposes: p.purposes.clone(),
                        },
                    )
                })
                .collect(),
            users,
            devices,
            acl: self.acl.clone(),
            shard_of: self.shard_of.clone(),
            rules: self.rules.clone(),
        }
    }

    fn shard(&self, key: &str) -> usize {
        (self.shard_of.hash_one(key) as usize) % SHARDS
    }

    fn user(&self, id: &str) -> Option<&UserRules> {
        self.users[self.shard(id)].get(id)
    }

    fn intern(&self, rule: ShareRule) -> Arc<ShareRule> {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((existing, _)) = rules.get_key_value(&rule) {
            return existing.clone();
        }
        let rule = Arc::new(rule);
        rules.insert(rule.clone(), ());
        rule
    }

    /// Compiles and validates one user's preferences.
    fn user_rules(
        &self,
        user: &str,
        tz: Tz,
        prefs: Option<&Preferences>,
    ) -> Result<UserRules, CompileError> {
        let mut always = vec![0u64; self.kinds.len().div_ceil(64).max(1)];
        let mut windows = Vec::new();
        let mut share: Vec<(u16, u16, Arc<ShareRule>)> = Vec::new();
        let kind_id = |kind: &str| {
            self.kind_ids
                .get(kind)
                .copied()
                .ok_or_else(|| CompileError::PrefKind {
                    user: user.into(),
                    kind: kind.into(),
                })
        };
        for grant in prefs.map(|p| p.collect.as_slice()).unwrap_or_default() {
            let id = kind_id(&grant.kind)?;
            if grant.windows.is_empty() {
                always[id as usize / 64] |= 1 << (id % 64);
            } else {
                windows.push((id, grant.windows.clone().into_boxed_slice()));
            }
        }
        for grant in prefs.map(|p| p.share.as_slice()).unwrap_or_default() {
            let id = kind_id(&grant.kind)?;
            let kind = &self.kinds[id as usize];
            let provider =
                self.providers
                    .get(&grant.provider)
                    .ok_or_else(|| CompileError::PrefProvider {
                        user: user.into(),
                        provider: grant.provider.clone(),
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
                });
            }
            let view = if grant.mask.is_empty() {
                View::Deliver
            } else {
                if kind.format == PayloadFormat::Opaque {
                    return Err(CompileError::MaskOpaque {
                        user: user.into(),
                        kind: kind.name.clone(),
                    });
                }
                for field in grant.mask.keys() {
                    if !kind.fields.contains(field) {
                        return Err(CompileError::MaskField {
                            user: user.into(),
                            kind: kind.name.clone(),
                            field: field.clone(),
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
                });
            }
            let rule = self.intern(ShareRule {
                purpose: grant.purpose.clone(),
                view: Arc::new(view),
                expires: grant.expires,
            });
            share.push((provider.index, id, rule));
        }
        Ok(UserRules {
            tz,
            always: always.into_boxed_slice(),
            windows: windows.into_boxed_slice(),
            share: share.into_boxed_slice(),
        })
    }

    pub fn kind(&self, name: &str) -> Option<&Kind> {
        self.kind_ids.get(name).map(|&i| &self.kinds[i as usize])
    }

    /// The user a device is bound to.
    pub fn device_user(&self, device: &str) -> Option<&str> {
        self.devices[self.shard(device)].get(device).map(|u| &**u)
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
        if let Some(provider) = topic.strip_prefix(NOTICE_PREFIX) {
            return Class::Notice(provider);
        }
        let mut claimed = false;
        for t in &self.templates {
            // Resolving first: on the hot path nearly every topic resolves,
            // and then the prefix check is already done.
            if let Some(r) = t.resolve(topic) {
                if let Some(&id) = self.kind_ids.get(r.kind) {
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
        topic: &'a str,
        now: DateTime<Utc>,
    ) -> Result<Ingress<'a>, Deny> {
        if !topic::valid_topic_name(topic) {
            return Err(Deny::Invalid);
        }
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
                match who {
                    // The binding in force, not the one seen at CONNECT.
                    Principal::Device { id, .. } => {
                        if id != r.device || self.device_user(id) != Some(r.user) {
                            return Err(Deny::Misattributed);
                        }
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
                    }
                    Principal::Anonymous => return Err(Deny::NotADevice),
                }
                let rules = self.user(r.user).ok_or(Deny::UnknownUser)?;
                if rules.always[kind_id as usize / 64] & (1 << (kind_id % 64)) == 0 {
                    let windows = rules
                        .windows
                        .iter()
                        .find(|(k, _)| *k == kind_id)
                        .ok_or(Deny::NoCollectConsent)?;
                    if !in_windows(&windows.1, rules.tz, now) {
                        return Err(Deny::OutsideWindow);
                    }
                }
                Ok(Ingress::Personal { kind, resolved: r })
            }
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
            if filter.strip_prefix(NOTICE_PREFIX) == Some(id.as_str()) {
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
                let rules = self.user(r.user).ok_or(Deny::UnknownUser)?;
                // A device whose binding was removed no longer speaks for its user.
                if self.device_user(r.device) != Some(r.user) {
                    return Err(Deny::Misattributed);
                }
                let provider = self.providers.get(id).ok_or(Deny::NoShareConsent)?;
                let rule = rules
                    .share
                    .iter()
                    .find(|(p, k, _)| *p == provider.index && *k == kind_id)
                    .map(|(_, _, rule)| &**rule)
                    .ok_or(Deny::NoShareConsent)?;
                if rule.expires.is_some_and(|e| e <= now) {
                    return Err(Deny::Expired);
                }
                Ok(Delivery::Personal {
                    kind: &self.kinds[kind_id as usize],
                    resolved: r,
                    rule,
                })
            }
        }
    }
}

fn in_windows(windows: &[Window], tz: Tz, now: DateTime<Utc>) -> bool {
    let local = now.with_timezone(&tz);
    let (day, time) = (local.weekday(), local.time());
    windows.iter().any(|w| {
        if w.from < w.to {
            w.days.contains(&day) && w.from <= time && time < w.to
        } else {
            // Wraps midnight: the evening belongs to the listed day, the
            // early morning to the day after it.
            (w.days.contains(&day) && time >= w.from)
                || (w.days.contains(&day.pred()) && time < w.to)
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
        }
    }

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
            (&alice, "pii/alice/alice-watch/+", Err(Deny::Invalid)),
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
            let got = a.ingress(who, topic, now()).map(|_| ());
            assert_eq!(&got, want, "{who:?} {topic}");
        }
        let bob = dev("bob-phone", "bob");
        assert_eq!(
            a.ingress(&bob, "pii/bob/bob-phone/location", now())
                .map(|_| ()),
            Err(Deny::NoCollectConsent)
        );
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
        let topic = "pii/alice/alice-watch/heart_rate";
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
                "pii/alice/alice-watch/steps",
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
        assert!(in_windows(std::slice::from_ref(&w), tz, at(27, 23))); // Fri 23:00
        assert!(in_windows(std::slice::from_ref(&w), tz, at(28, 5))); // Sat 05:00
        assert!(!in_windows(std::slice::from_ref(&w), tz, at(28, 6)));
        assert!(!in_windows(std::slice::from_ref(&w), tz, at(27, 21)));
    }

    #[test]
    fn delivery_table() {
        let a = act(vec![alice_prefs()], Acl::deny_all());
        let fit = prov("fitcoach");
        let ins = prov("insureco");
        let hr = "pii/alice/alice-watch/heart_rate";
        match a.deliver(&fit, hr, now()) {
            Ok(Delivery::Personal { rule, kind, .. }) => {
                assert_eq!(*rule.view, View::Deliver);
                assert_eq!(rule.purpose, "coaching");
                assert_eq!(kind.name, "heart_rate");
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
            a.ingress(&prov("fitcoach"), t, now()).map(|_| ()),
            Err(Deny::Reserved)
        );
        assert_eq!(
            a.ingress(&dev("alice-watch", "alice"), t, now())
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
}

//! The PII preference manager (X.1363 10.1, 11.2.2): the one place a user's
//! preferences change. Every accepted change is validated by compiling the
//! ACT it leads to, documented by a consent receipt, committed to the store
//! together with its history entry and receipt, and the new ACT is swapped
//! in — all before the caller hears "accepted". So when a revocation
//! returns, no later delivery is decided under the old consent.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use thiserror::Error;

use crate::acl::{Acl, AclRule};
use crate::act::{Act, ActHandle, CompileError};
use crate::auth::{AuthError, Credentials, SharedCredentials};
use crate::model::{Device, Directory, Kind, Preferences, Provider, User};
use crate::store::{Store, StoreError, StoredReceipt};

#[derive(Debug, Error)]
pub enum PrefError {
    #[error(transparent)]
    Invalid(#[from] CompileError),
    #[error("preferences are at version {current}")]
    Conflict { current: u64 },
    #[error("no such user {0:?}")]
    UnknownUser(String),
    #[error("{0}")]
    Exists(String),
    #[error("no such device {0:?}")]
    UnknownDevice(String),
    /// A grant to remove that the preferences do not hold.
    #[error("{0}")]
    NoSuchGrant(String),
    #[error("credentials: {0}")]
    Credentials(#[from] AuthError),
    #[error("login of {0:?}: totp_secret is not base32")]
    BadLogin(String),
    #[error("could not issue the consent receipt: {0}")]
    Receipt(String),
    #[error("store: {0}")]
    Store(StoreError),
    /// A change the ACT could compile but that cannot be what the user
    /// meant (a window on no day, a grant that expired before it was given).
    #[error("{message}")]
    Pointless {
        /// The grant's field, as a path into the preferences
        /// (`collect[1].windows[0].days`).
        field: String,
        message: String,
    },
    /// A provider's terms no user could read and consent to.
    #[error("provider {provider:?}: {}: {}", .terms.field, .terms.message)]
    BadTerms {
        provider: String,
        terms: crate::model::BadTerms,
    },
}

impl From<StoreError> for PrefError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { current, .. } => PrefError::Conflict { current },
            StoreError::Exists { what, id } => PrefError::Exists(format!("{what} {id:?} exists")),
            e => PrefError::Store(e),
        }
    }
}

/// The consent history's source for versions a directory import made.
pub const IMPORT_SOURCE: &str = "import";

/// How a version of a user's preferences came about; its receipt says so
/// (Kantara `moc`), since only one of the two is the user acting here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The user, through the preference manager.
    User,
    /// The operator's directory file, for a user who has not set any.
    Directory,
}

/// Documents a consent: builds and signs the receipt for a user's new
/// preferences. Implemented by the receipt module; a trait so the manager
/// is tested without keys.
pub trait ReceiptIssuer: Send + Sync {
    fn issue(
        &self,
        user: &User,
        prefs: &Preferences,
        channel: Channel,
        dir: &Directory,
        kinds: &[Kind],
        now: DateTime<Utc>,
    ) -> Result<StoredReceipt, String>;
}

/// The result of an accepted change.
#[derive(Debug, Clone)]
pub struct Applied {
    pub preferences: Preferences,
    pub receipt: Option<StoredReceipt>,
    pub act_version: u64,
}

/// The directory in memory, indexed: a change to one user touches one
/// entry, not a copy of everything.
struct State {
    users: HashMap<String, User>,
    prefs: HashMap<String, Preferences>,
    devices: HashMap<String, Device>,
    providers: Vec<Provider>,
    kinds: Vec<Kind>,
    act_version: u64,
    /// Users whose latest preferences they set themselves. A directory
    /// import never overrides those: the preferences are the user's, and an
    /// unchanged file re-applied on SIGHUP would otherwise undo a withdrawal.
    self_set: HashSet<String>,
}

impl State {
    fn new(dir: Directory, kinds: Vec<Kind>) -> State {
        State {
            users: dir.users.into_iter().map(|u| (u.id.clone(), u)).collect(),
            prefs: dir
                .preferences
                .into_iter()
                .map(|p| (p.user.clone(), p))
                .collect(),
            devices: dir.devices.into_iter().map(|d| (d.id.clone(), d)).collect(),
            providers: dir.providers,
            kinds,
            act_version: 1,
            self_set: HashSet::new(),
        }
    }

    fn directory(&self) -> Directory {
        Directory {
            users: self.users.values().cloned().collect(),
            devices: self.devices.values().cloned().collect(),
            providers: self.providers.clone(),
            preferences: self.prefs.values().cloned().collect(),
            logins: vec![],
        }
    }

    /// What a receipt needs of the directory: the providers' T&C.
    fn providers_only(&self) -> Directory {
        Directory {
            providers: self.providers.clone(),
            ..Default::default()
        }
    }
}

pub struct PreferenceManager {
    store: Store,
    act: Arc<ActHandle>,
    creds: SharedCredentials,
    templates: Vec<String>,
    acl: Vec<AclRule>,
    issuer: Option<Arc<dyn ReceiptIssuer>>,
    /// Changes are serialized: compile, commit and swap happen as one step.
    state: Mutex<State>,
}

/// Compiles the ACT and credentials from a directory.
pub fn compile(
    templates: &[String],
    kinds: &[Kind],
    dir: &Directory,
    acl: &[AclRule],
    version: u64,
) -> Result<(Act, Credentials), PrefError> {
    let act = Act::compile(version, templates, kinds, dir, Acl::new(acl.to_vec()))?;
    let creds = Credentials::from_directory(dir)?;
    Ok((act, creds))
}

impl PreferenceManager {
    /// Loads the store, applies the directory file `seed` to it as
    /// [`PreferenceManager::import`] does, compiles the ACT and returns it
    /// with the manager.
    pub fn open(
        store: Store,
        templates: Vec<String>,
        config_kinds: &[Kind],
        acl: Vec<AclRule>,
        seed: Directory,
        issuer: Option<Arc<dyn ReceiptIssuer>>,
    ) -> Result<(PreferenceManager, Arc<ActHandle>, SharedCredentials), PrefError> {
        // Kinds are configuration: the file's declarations win at each start,
        // except over a kind users consented to as it is stored (`put_kind`).
        let (stored, stored_kinds) = store.directory()?;
        for k in config_kinds {
            let Some(old) = stored_kinds.iter().find(|o| o.name == k.name) else {
                continue;
            };
            if let Some(field) = dropped_field(old, k) {
                if store.kind_consented(&k.name)? {
                    return Err(PrefError::Exists(format!(
                        "[[kinds]] {:?} no longer declares {field:?}, which the stored definition \
                         does; users have consented to this kind, and messages collected under it \
                         (retained, queued) may still carry that field. Restore the field, or \
                         declare the new definition under another name",
                        k.name
                    )));
                }
            }
            let users = stored
                .preferences
                .iter()
                .filter(|p| names_kind(p, &k.name))
                .count();
            if !same_definition(old, k) && users > 0 {
                return Err(PrefError::Exists(format!(
                    "[[kinds]] {:?} differs from the definition in the store, which the \
                     preferences of {users} user(s) name: they consented to it as stored \
                     ({}). Restore that definition, or declare the new one under another name",
                    k.name,
                    serde_json::to_string(old).unwrap_or_default(),
                )));
            }
        }
        drop((stored, stored_kinds));
        store.transaction(|tx| {
            for k in config_kinds {
                tx.put_kind(k)?;
            }
            Ok::<_, StoreError>(())
        })?;
        let (dir, mut kinds) = store.directory()?;
        drop_untypable_types(&mut kinds, config_kinds);
        let self_set = store.self_set_users(IMPORT_SOURCE)?;
        let (act, creds) = compile(&templates, &kinds, &dir, &acl, 1)?;
        let act = Arc::new(ActHandle::new(act));
        let creds: SharedCredentials = Arc::new(arc_swap::ArcSwap::from_pointee(creds));
        let pm = PreferenceManager {
            store,
            act: act.clone(),
            creds: creds.clone(),
            templates,
            acl,
            issuer,
            state: Mutex::new(State {
                self_set,
                ..State::new(dir, kinds)
            }),
        };
        // The file is applied at each start as on SIGHUP: an edit made while
        // consentry was stopped is in force once it runs.
        pm.import(seed)?;
        Ok((pm, act, creds))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Recompiles everything from `dir`, and if that succeeds lets `commit`
    /// write it; only then the new ACT and credentials are swapped in. For
    /// changes that touch what many users depend on (providers, kinds, files).
    fn swap_in_all(
        &self,
        state: &mut State,
        dir: Directory,
        kinds: Vec<Kind>,
        commit: impl FnOnce(&Directory) -> Result<(), PrefError>,
    ) -> Result<u64, PrefError> {
        let version = state.act_version + 1;
        let (act, creds) = compile(&self.templates, &kinds, &dir, &self.acl, version)?;
        commit(&dir)?;
        self.creds.store(Arc::new(creds));
        self.act.store(act);
        let act_version = state.act_version;
        let self_set = std::mem::take(&mut state.self_set);
        *state = State::new(dir, kinds);
        state.act_version = act_version + 1;
        state.self_set = self_set;
        Ok(version)
    }

    /// The id of the receipt a new version will get: chosen before the
    /// version is compiled, so that the ACT, and through it every share
    /// record, names the receipt in force.
    fn new_receipt_id(&self) -> Option<String> {
        self.issuer
            .as_ref()
            .map(|_| uuid::Uuid::new_v4().hyphenated().to_string())
    }

    pub fn providers(&self) -> Vec<Provider> {
        self.lock().providers.clone()
    }

    pub fn kinds(&self) -> Vec<Kind> {
        self.lock().kinds.clone()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn user(&self, id: &str) -> Option<User> {
        self.lock().users.get(id).cloned()
    }

    pub fn preferences(&self, user: &str) -> Result<Preferences, PrefError> {
        let state = self.lock();
        if !state.users.contains_key(user) {
            return Err(PrefError::UnknownUser(user.into()));
        }
        Ok(state
            .prefs
            .get(user)
            .cloned()
            .unwrap_or_else(|| Preferences {
                user: user.into(),
                ..Default::default()
            }))
    }

    /// Applies `change` to the user's preferences if they are at version
    /// `expected` (when given). Validated, documented, committed and in
    /// force when this returns `Ok`. Only this user's part of the ACT is
    /// recompiled.
    pub fn change(
        &self,
        user: &str,
        expected: Option<u64>,
        source: &str,
        change: impl FnOnce(&mut Preferences) -> Result<(), PrefError>,
    ) -> Result<Applied, PrefError> {
        let mut state = self.lock();
        let u = state
            .users
            .get(user)
            .cloned()
            .ok_or_else(|| PrefError::UnknownUser(user.into()))?;
        let mut prefs = state
            .prefs
            .get(user)
            .cloned()
            .unwrap_or_else(|| Preferences {
                user: user.into(),
                ..Default::default()
            });
        if let Some(expected) = expected {
            if expected != prefs.version {
                return Err(PrefError::Conflict {
                    current: prefs.version,
                });
            }
        }
        let expected = prefs.version;
        let before = prefs.clone();
        change(&mut prefs)?;
        prefs.user = user.into();
        prefs.version = expected + 1;
        prefs.receipt = self.new_receipt_id();
        let act_version = state.act_version + 1;
        let act = self.act.load().with_user(act_version, &u, Some(&prefs))?;
        // What the change takes away stops before the receipt's time is
        // taken, so no delivery decided after that time goes by the earlier
        // version where it differs; what it adds starts once committed.
        let previous = Arc::clone(&*self.act.load());
        if let Some(interim) = in_both(&before, &prefs) {
            let interim = previous.with_user(act_version, &u, Some(&interim))?;
            self.act.store_quietly(Arc::new(interim));
        }
        let receipt = self
            .issuer
            .as_ref()
            .map(|issuer| {
                issuer
                    .issue(
                        &u,
                        &prefs,
                        Channel::User,
                        &state.providers_only(),
                        &state.kinds,
                        Utc::now(),
                    )
                    .map_err(PrefError::Receipt)
            })
            .transpose();
        let committed = receipt.and_then(|receipt| {
            self.store.transaction(|tx| {
                tx.replace_preferences(prefs.clone(), Some(expected), source, receipt.as_ref())
            })?;
            Ok(receipt)
        });
        let receipt = match committed {
            Ok(r) => r,
            Err(e) => {
                self.act.store_quietly(previous);
                return Err(e);
            }
        };
        self.act.store(act);
        state.prefs.insert(user.into(), prefs.clone());
        state.self_set.insert(user.into());
        state.act_version = act_version;
        tracing::info!(act_version, source, "preferences changed");
        Ok(Applied {
            preferences: prefs,
            receipt,
            act_version,
        })
    }

    /// Moves a user to another time zone, at their request. Their
    /// collection windows are read in it, so preferences with a window are
    /// issued again under a receipt that states the new zone. The profile is
    /// then the user's: a directory import leaves it alone. Returns the
    /// new preferences if they were issued again.
    pub fn set_time_zone(&self, user: &str, time_zone: &str) -> Result<Option<Applied>, PrefError> {
        let mut state = self.lock();
        let mut u = state
            .users
            .get(user)
            .cloned()
            .ok_or_else(|| PrefError::UnknownUser(user.into()))?;
        if u.time_zone == time_zone {
            return Ok(None);
        }
        u.time_zone = time_zone.into();
        let act_version = state.act_version + 1;
        let current = state.prefs.get(user).cloned();
        let reissued = current.as_ref().filter(|p| has_windows(p)).map(|p| {
            let mut p = p.clone();
            p.version += 1;
            p.receipt = self.new_receipt_id();
            p
        });
        let in_force = reissued.as_ref().or(current.as_ref());
        let act = self.act.load().with_user(act_version, &u, in_force)?;
        // Windows move with the zone: collection under them stops while the
        // change commits (see `change`), in neither zone's reading.
        let previous = Arc::clone(&*self.act.load());
        if let Some(p) = &current {
            let mut interim = p.clone();
            interim.collect.retain(|g| g.windows.is_empty());
            if interim.collect.len() < p.collect.len() {
                let interim = previous.with_user(act_version, &u, Some(&interim))?;
                self.act.store_quietly(Arc::new(interim));
            }
        }
        let committed = (|| {
            let receipt = match (&self.issuer, &reissued) {
                (Some(issuer), Some(p)) => Some(
                    issuer
                        .issue(
                            &u,
                            p,
                            Channel::User,
                            &state.providers_only(),
                            &state.kinds,
                            Utc::now(),
                        )
                        .map_err(PrefError::Receipt)?,
                ),
                _ => None,
            };
            self.store.transaction(|tx| {
                tx.put_user(&u, None, false)?;
                tx.set_own_profile(user)?;
                if let Some(p) = &reissued {
                    tx.replace_preferences(
                        p.clone(),
                        Some(p.version - 1),
                        "api",
                        receipt.as_ref(),
                    )?;
                }
                Ok::<_, PrefError>(())
            })?;
            Ok::<_, PrefError>(receipt)
        })();
        let receipt = match committed {
            Ok(r) => r,
            Err(e) => {
                self.act.store_quietly(previous);
                return Err(e);
            }
        };
        self.act.store(act);
        state.users.insert(user.into(), u);
        state.act_version = act_version;
        tracing::info!(act_version, "time zone changed");
        Ok(reissued.map(|p| {
            state.prefs.insert(user.into(), p.clone());
            state.self_set.insert(user.into());
            Applied {
                preferences: p,
                receipt,
                act_version,
            }
        }))
    }

    /// Registers a user with login secrets (argon2 hash, TOTP secret).
    pub fn register_user(
        &self,
        user: User,
        password_hash: &str,
        totp_secret: &[u8],
    ) -> Result<(), PrefError> {
        let mut state = self.lock();
        if state.users.contains_key(&user.id) {
            return Err(PrefError::Exists(format!("user {:?} exists", user.id)));
        }
        let act_version = state.act_version + 1;
        let act = self.act.load().with_user(act_version, &user, None)?;
        self.store.transaction(|tx| {
            tx.put_user(&user, Some((password_hash, Some(totp_secret))), true)?;
            tx.set_own_profile(&user.id)
        })?;
        self.act.store(act);
        state.users.insert(user.id.clone(), user);
        state.act_version = act_version;
        Ok(())
    }

    pub fn register_device(&self, device: Device) -> Result<(), PrefError> {
        let mut state = self.lock();
        if state.devices.contains_key(&device.id)
            || state.providers.iter().any(|p| p.id == device.id)
        {
            return Err(PrefError::Exists(format!("{:?} is taken", device.id)));
        }
        let act_version = state.act_version + 1;
        let act = self
            .act
            .load()
            .with_device(act_version, &device.id, &device.user)?;
        let creds = self.creds.load().with_device(&device)?;
        self.store.transaction(|tx| tx.put_device(&device, true))?;
        self.creds.store(Arc::new(creds));
        self.act.store(act);
        state.devices.insert(device.id.clone(), device);
        state.act_version = act_version;
        Ok(())
    }

    /// Removes one of `user`'s devices: its credentials stop working, it no
    /// longer speaks for `user` (its live connection is closed when the new
    /// ACT reaches it), and a directory import does not bring it back.
    /// Returns the topics it may have left retained messages on, for the
    /// caller to clear at the broker.
    pub fn remove_device(&self, user: &str, device: &str) -> Result<Vec<String>, PrefError> {
        let mut state = self.lock();
        if state.devices.get(device).is_none_or(|d| d.user != user) {
            return Err(PrefError::UnknownDevice(device.to_string()));
        }
        self.remove_device_of(&mut state, user, device, None)
    }

    /// Removes a device as [`PreferenceManager::remove_device`] does, at the
    /// operator's hand (a device reported stolen, say), whoever's it is. Its
    /// user sees that it happened in their account events.
    pub fn remove_device_as_operator(&self, device: &str) -> Result<Vec<String>, PrefError> {
        let mut state = self.lock();
        let Some(user) = state.devices.get(device).map(|d| d.user.clone()) else {
            return Err(PrefError::UnknownDevice(device.to_string()));
        };
        let event = Some(crate::store::AccountEvent::DeviceRemovedByOperator);
        self.remove_device_of(&mut state, &user, device, event)
    }

    fn remove_device_of(
        &self,
        state: &mut State,
        user: &str,
        device: &str,
        event: Option<crate::store::AccountEvent>,
    ) -> Result<Vec<String>, PrefError> {
        let act_version = state.act_version + 1;
        let act = self.act.load().without_device(act_version, device);
        let creds = self.creds.load().without_device(device);
        self.store.transaction(|tx| {
            tx.remove_device(device, user)?;
            if let Some(event) = event {
                tx.account_event(user, event)?;
            }
            Ok::<_, PrefError>(())
        })?;
        self.creds.store(Arc::new(creds));
        self.act.store(act);
        state.devices.remove(device);
        state.act_version = act_version;
        let topics = self
            .templates
            .iter()
            .filter_map(|t| crate::topic::Template::parse(t).ok())
            .flat_map(|t| {
                state
                    .kinds
                    .iter()
                    .map(move |k| t.topic(user, device, &k.name))
            })
            .collect();
        Ok(topics)
    }

    /// `user`'s devices, by id.
    pub fn devices_of(&self, user: &str) -> Vec<String> {
        let state = self.lock();
        let mut ids: Vec<String> = state
            .devices
            .values()
            .filter(|d| d.user == user)
            .map(|d| d.id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Registers a provider or updates one: refused while users' grants
    /// name a purpose whose terms would change (see `consent_changes`).
    /// Returns whether the provider is new.
    pub fn put_provider(&self, mut provider: Provider) -> Result<bool, PrefError> {
        check_terms(&provider)?;
        let mut state = self.lock();
        let old = state.providers.iter().find(|p| p.id == provider.id);
        let created = old.is_none();
        if let Some(old) = old {
            if let Some(refusal) = consent_changes(old, &provider, state.prefs.values()) {
                return Err(PrefError::Exists(refusal));
            }
            // An update that brings no credentials keeps the provider's
            // login: re-stating its terms must not lock it out.
            if provider.password_hash.is_none() {
                provider.password_hash = old.password_hash.clone();
            }
            if provider.cert_sha256.is_none() {
                provider.cert_sha256 = old.cert_sha256.clone();
            }
        }
        let mut dir = state.directory();
        dir.providers.retain(|p| p.id != provider.id);
        dir.providers.push(provider.clone());
        let kinds = state.kinds.clone();
        self.swap_in_all(&mut state, dir, kinds, |_| {
            self.store.transaction(|tx| tx.put_provider(&provider))?;
            Ok(())
        })?;
        Ok(created)
    }

    /// Declares a kind, or changes one no user's preferences name. A kind
    /// that grants name is what those users consented to: another field, or
    /// no longer sensitive, would change their consent without them.
    /// Returns whether the kind is new.
    pub fn put_kind(&self, kind: Kind) -> Result<bool, PrefError> {
        let mut state = self.lock();
        let old = state.kinds.iter().find(|k| k.name == kind.name);
        let created = old.is_none();
        if let Some(old) = old {
            if same_definition(old, &kind) {
                return Ok(false);
            }
            let users = state
                .prefs
                .values()
                .filter(|p| names_kind(p, &kind.name))
                .count();
            if users > 0 {
                return Err(PrefError::Exists(format!(
                    "kind {:?} is named in the preferences of {users} user(s), who consented \
                     to it as it is; declare the new definition under another name",
                    kind.name
                )));
            }
            if let Some(field) = dropped_field(old, &kind) {
                if self.store.kind_consented(&kind.name)? {
                    return Err(PrefError::Exists(format!(
                        "kind {:?} would no longer declare {field:?}; users have consented to \
                         it before, and messages collected then (retained, queued) may still \
                         carry that field; declare the new definition under another name",
                        kind.name
                    )));
                }
            }
        }
        let mut kinds = state.kinds.clone();
        kinds.retain(|k| k.name != kind.name);
        kinds.push(kind.clone());
        let dir = state.directory();
        self.swap_in_all(&mut state, dir, kinds, |_| {
            self.store.transaction(|tx| tx.put_kind(&kind))?;
            Ok(())
        })?;
        Ok(created)
    }

    /// Applies a directory file: users, devices and providers are created or
    /// updated; each user's preferences that differ from the stored ones
    /// become a new version with its history entry and receipt, unless the
    /// user set their preferences themselves since the last import. The
    /// whole file is validated first; nothing is written if it does not
    /// compile.
    pub fn import(&self, file: Directory) -> Result<u64, PrefError> {
        let source = IMPORT_SOURCE;
        let Directory {
            mut users,
            mut devices,
            providers,
            preferences,
            logins,
        } = file;
        let mut state = self.lock();
        // Windows are read in the user's zone, so a new zone changes what a
        // user consented to: it stays the user's where the preferences are
        // theirs, and re-issues the preferences where they are the file's.
        let own_profiles = self.store.own_profiles()?;
        let mut zones_kept = 0usize;
        let mut rezoned = HashSet::new();
        for u in &mut users {
            let Some(stored) = state.users.get(&u.id) else {
                continue;
            };
            if stored.time_zone == u.time_zone {
                continue;
            }
            if own_profiles.contains(&u.id) {
                zones_kept += 1;
                u.time_zone = stored.time_zone.clone();
                continue;
            }
            if !state.prefs.get(&u.id).is_some_and(has_windows) {
                continue;
            }
            if state.self_set.contains(&u.id) {
                zones_kept += 1;
                u.time_zone = stored.time_zone.clone();
            } else {
                rezoned.insert(u.id.clone());
            }
        }
        if zones_kept > 0 {
            tracing::info!(
                users = zones_kept,
                "directory time zones not applied: those users set their own zone, or their \
                 own preferences, whose collection windows are read in the zone they have"
            );
        }
        // Devices users registered or removed themselves are theirs: the
        // file does not bring a removed one back or replace a new secret.
        let managed = self.store.user_managed_devices()?;
        let listed = devices.len();
        devices.retain(|d| !managed.contains(&d.id));
        if devices.len() < listed {
            tracing::info!(
                devices = listed - devices.len(),
                "directory devices not applied: their users manage them"
            );
        }
        let (providers, baselines) = self.providers_to_apply(&state, providers)?;
        // The terms the file changes are held to what the API requires.
        for (p, _) in &providers {
            check_terms(p)?;
        }
        let mut dir = state.directory();
        upsert(&mut dir.users, &users, |u| &u.id);
        upsert(&mut dir.devices, &devices, |d| &d.id);
        let file_providers: Vec<Provider> = providers.iter().map(|(p, _)| p.clone()).collect();
        upsert(&mut dir.providers, &file_providers, |p| &p.id);
        // A user named twice: the last entry counts. The file's preferences
        // are moved, not copied: a seed may hold a million users.
        let mut seen = HashSet::new();
        let mut changed = Vec::new();
        let mut left_to_users = 0usize;
        for mut p in preferences.into_iter().rev() {
            if !seen.insert(p.user.clone()) {
                continue;
            }
            if state.self_set.contains(&p.user) {
                left_to_users += 1;
                continue;
            }
            let rezone = rezoned.remove(&p.user);
            let current = state.prefs.get(&p.user);
            let same = current.is_some_and(|c| {
                same_grants(&c.collect, &p.collect) && same_grants(&c.share, &p.share)
            });
            if !same {
                // The rules the API holds a user's own changes to.
                let empty = Preferences::default();
                let before = current.unwrap_or(&empty);
                crate::grant_rules::check_grants(before, &p, Some(Utc::now())).map_err(
                    |e| match e {
                        PrefError::Pointless { field, message } => PrefError::Pointless {
                            field,
                            message: format!("preferences of {:?}: {message}", p.user),
                        },
                        e => e,
                    },
                )?;
                p.version = current.map(|c| c.version).unwrap_or(0) + 1;
                p.receipt = self.new_receipt_id();
                changed.push(p);
            } else if rezone {
                p.version = current.map(|c| c.version).unwrap_or(0) + 1;
                p.receipt = self.new_receipt_id();
                changed.push(p);
            }
        }
        // Users the file gives a new zone but no preferences: the stored
        // ones, under a receipt that states the new zone.
        for user in rezoned {
            if let Some(current) = state.prefs.get(&user) {
                let mut p = current.clone();
                p.version += 1;
                p.receipt = self.new_receipt_id();
                changed.push(p);
            }
        }
        changed.reverse();
        // Preferences this import re-issues get receipts with the file's
        // terms; the others stay under the receipts their users have.
        let reissued: HashSet<&str> = changed.iter().map(|p| p.user.as_str()).collect();
        for (new, _) in &providers {
            let Some(old) = state.providers.iter().find(|p| p.id == new.id) else {
                continue;
            };
            let kept = state
                .prefs
                .values()
                .filter(|p| !reissued.contains(p.user.as_str()));
            if let Some(refusal) = consent_changes(old, new, kept) {
                return Err(PrefError::Exists(refusal));
            }
        }
        dir.preferences
            .retain(|c| !reissued.contains(c.user.as_str()));
        drop(reissued);
        let first_changed = dir.preferences.len();
        dir.preferences.extend(changed);
        let kinds = state.kinds.clone();
        // What the file takes away stops before the receipts' times are
        // taken, as in `change`; what it adds starts once committed.
        let interim = self.import_interim(&state, &dir, first_changed, &kinds)?;
        let previous = Arc::clone(&*self.act.load());
        let swapped = self.swap_in_all(&mut state, dir, kinds.clone(), |dir| {
            if let Some(interim) = interim {
                self.act.store_quietly(Arc::new(interim));
            }
            let by_id: HashMap<&str, &User> =
                dir.users.iter().map(|u| (u.id.as_str(), u)).collect();
            let changed = &dir.preferences[first_changed..];
            for p in changed {
                if !by_id.contains_key(p.user.as_str()) {
                    return Err(PrefError::UnknownUser(p.user.clone()));
                }
            }
            let mut login_rows = Vec::new();
            for l in &logins {
                let user = *by_id
                    .get(l.user.as_str())
                    .ok_or_else(|| PrefError::UnknownUser(l.user.clone()))?;
                let secret = totp_rs::Secret::Encoded(l.totp_secret.clone())
                    .to_bytes()
                    .map_err(|_| PrefError::BadLogin(l.user.clone()))?;
                login_rows.push((user.clone(), l.password_hash.clone(), secret));
            }
            self.store.transaction(|tx| {
                for u in &users {
                    tx.put_user(u, None, false)?;
                }
                for (u, hash, secret) in &login_rows {
                    tx.put_user(u, Some((hash, Some(secret))), false)?;
                }
                for d in &devices {
                    tx.put_device(d, false)?;
                }
                for (p, doc) in &providers {
                    tx.put_provider(p)?;
                    tx.note_imported_provider(&p.id, doc)?;
                }
                for (id, doc) in &baselines {
                    tx.note_imported_provider(id, doc)?;
                }
                // Each receipt is issued and stored before the next: a seed
                // of many users never holds all their receipts at once (at
                // 20k users that was ~250 MB, kept by the allocator after).
                for p in changed {
                    let receipt = match &self.issuer {
                        Some(i) => Some(
                            i.issue(
                                by_id[p.user.as_str()],
                                p,
                                Channel::Directory,
                                dir,
                                &kinds,
                                Utc::now(),
                            )
                            .map_err(PrefError::Receipt)?,
                        ),
                        None => None,
                    };
                    tx.replace_preferences(p.clone(), None, source, receipt.as_ref())?;
                }
                Ok::<_, PrefError>(())
            })?;
            Ok(())
        });
        let version = match swapped {
            Ok(v) => v,
            Err(e) => {
                // Nothing was committed: the interim goes, if it came in.
                self.act.store_quietly(previous);
                return Err(e);
            }
        };
        if left_to_users > 0 {
            // Not a warning: this is the rule, but an operator who edited
            // those users' entries should see why nothing changed.
            tracing::info!(
                users = left_to_users,
                "directory preferences not applied: those users set their own"
            );
        }
        tracing::info!(act_version = version, source, "directory imported");
        Ok(version)
    }
}

impl PreferenceManager {
    /// The ACT in force while an import commits, if the file takes
    /// anything away: each user it issues preferences for again keeps only
    /// the grants both versions hold unchanged, and none under a collection
    /// window if their zone moves (windows are read in it). `None` when it
    /// only adds, so a seed of many new users is compiled once.
    fn import_interim(
        &self,
        state: &State,
        dir: &Directory,
        first_changed: usize,
        kinds: &[Kind],
    ) -> Result<Option<Act>, PrefError> {
        let zones: HashMap<&str, &str> = dir
            .users
            .iter()
            .map(|u| (u.id.as_str(), u.time_zone.as_str()))
            .collect();
        let mut interims = HashMap::new();
        for new in &dir.preferences[first_changed..] {
            let Some(current) = state.prefs.get(&new.user) else {
                continue;
            };
            let mut interim = in_both(current, new).unwrap_or_else(|| current.clone());
            let moves = state.users.get(&new.user).is_some_and(|u| {
                zones
                    .get(new.user.as_str())
                    .is_some_and(|z| *z != u.time_zone)
            });
            if moves {
                interim.collect.retain(|g| g.windows.is_empty());
            }
            if interim != *current {
                interims.insert(new.user.clone(), interim);
            }
        }
        if interims.is_empty() {
            return Ok(None);
        }
        let mut in_force = state.directory();
        for p in &mut in_force.preferences {
            if let Some(interim) = interims.remove(&p.user) {
                *p = interim;
            }
        }
        let version = state.act_version + 1;
        let acl = Acl::new(self.acl.to_vec());
        Ok(Some(Act::compile(
            version,
            &self.templates,
            kinds,
            &in_force,
            acl,
        )?))
    }
}

/// The preferences `new` keeps of `old` unchanged, in force while a change
/// commits: `new` itself when it only takes grants away (it is then in
/// force under its own receipt); `None` when it takes nothing away. A grant
/// `new` changes is in neither until the change is committed.
fn in_both(old: &Preferences, new: &Preferences) -> Option<Preferences> {
    let kept_collect: Vec<_> = old
        .collect
        .iter()
        .filter(|g| new.collect.contains(g))
        .cloned()
        .collect();
    let kept_share: Vec<_> = old
        .share
        .iter()
        .filter(|g| new.share.contains(g))
        .cloned()
        .collect();
    if kept_collect.len() == old.collect.len() && kept_share.len() == old.share.len() {
        return None;
    }
    if kept_collect.len() == new.collect.len() && kept_share.len() == new.share.len() {
        return Some(new.clone());
    }
    Some(Preferences {
        collect: kept_collect,
        share: kept_share,
        ..old.clone()
    })
}

/// Whether any collection grant is limited to windows, which are read in
/// the user's time zone.
fn has_windows(p: &Preferences) -> bool {
    p.collect.iter().any(|g| !g.windows.is_empty())
}

/// Kinds declared through the API before such types were refused may give
/// a type that was never checked (on an opaque kind, or on a field with
/// fields inside it). Refusing to start over them would lock the operator
/// out of the API that could fix them, so the type goes, with a warning. A
/// kind of the configuration file is the operator's to fix: it fails.
/// Whether two declarations of a kind say the same: the order its fields
/// are listed in is no part of what users consented to.
fn same_definition(a: &Kind, b: &Kind) -> bool {
    fn fields(k: &Kind) -> std::collections::BTreeSet<&str> {
        k.fields.iter().map(String::as_str).collect()
    }
    let rest = |k: &Kind| Kind {
        fields: Vec::new(),
        ..k.clone()
    };
    fields(a) == fields(b) && rest(a) == rest(b)
}

/// A field `old` declares and `new` does not: data collected under `old`
/// may carry it, and a delivery does not minimize again.
fn dropped_field<'a>(old: &'a Kind, new: &Kind) -> Option<&'a str> {
    old.fields
        .iter()
        .find(|f| !new.fields.contains(f))
        .map(String::as_str)
}

/// Whether the preferences collect or share the kind: the user consented to it.
fn names_kind(p: &Preferences, kind: &str) -> bool {
    p.collect.iter().any(|g| g.kind == kind) || p.share.iter().any(|g| g.kind == kind)
}

fn drop_untypable_types(kinds: &mut [Kind], config_kinds: &[Kind]) {
    for k in kinds
        .iter_mut()
        .filter(|k| !config_kinds.iter().any(|c| c.name == k.name))
    {
        let untypable: Vec<(String, CompileError)> = crate::act::untypable(k)
            .into_iter()
            .map(|(field, why)| (field.to_string(), why))
            .collect();
        for (field, why) in untypable {
            tracing::warn!(kind = %k.name, reason = %why, "stored kind: a type no payload could be checked against is dropped");
            k.types.remove(&field);
        }
    }
}

impl PreferenceManager {
    /// Which of the file's providers an import applies, with their JSON;
    /// and the (id, JSON) of those it only records as what the file says.
    ///
    /// The rule: a provider the file says the same of as at the last import
    /// is not applied again, so a change the operator made since through
    /// the API stands until the file is edited for that provider (the
    /// latest edit wins). One the file names for the first time is applied
    /// if the store does not hold it; if the store holds a different one
    /// (made through the API, or a store from before import records were
    /// kept) the stored one stands and the file's entry becomes the
    /// baseline, so that no reload reverts it, and none fails forever on
    /// grants made to it. A provider named twice counts by its last entry.
    #[allow(clippy::type_complexity)]
    fn providers_to_apply(
        &self,
        state: &State,
        file: Vec<Provider>,
    ) -> Result<(Vec<(Provider, String)>, Vec<(String, String)>), PrefError> {
        let imported = self.store.imported_providers()?;
        let last: HashMap<String, usize> = file
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id.clone(), i))
            .collect();
        let mut apply = Vec::new();
        let mut baselines = Vec::new();
        let (mut kept, mut adopted) = (0usize, Vec::new());
        for (i, p) in file.into_iter().enumerate() {
            if last[&p.id] != i {
                continue;
            }
            let doc = serde_json::to_string(&p).map_err(StoreError::from)?;
            let stored = state
                .providers
                .iter()
                .find(|c| c.id == p.id)
                .map(|c| serde_json::to_string(c).map_err(StoreError::from))
                .transpose()?;
            match (imported.get(&p.id), stored) {
                (Some(before), Some(stored)) if *before == doc => {
                    kept += usize::from(stored != doc);
                }
                (None, Some(stored)) => {
                    if stored != doc {
                        adopted.push(p.id.clone());
                    }
                    baselines.push((p.id, doc));
                }
                _ => apply.push((p, doc)),
            }
        }
        if kept > 0 {
            tracing::info!(
                providers = kept,
                "directory providers not applied: unchanged in the file since the last \
                 import, so the changes made through the API stand"
            );
        }
        if !adopted.is_empty() {
            tracing::warn!(
                providers = ?adopted,
                "directory providers not applied: the store holds them as they were changed \
                 through the API, and the file had not been imported with them before; the \
                 stored ones stand, and an edit of their entries in the file will apply"
            );
        }
        Ok((apply, baselines))
    }
}

/// `p`'s terms as a user would read them ([`Provider::check_terms`]).
pub fn check_terms(p: &Provider) -> Result<(), PrefError> {
    p.check_terms().map_err(|terms| PrefError::BadTerms {
        provider: p.id.clone(),
        terms,
    })
}

/// The same grants, in any order: a file that lists them in another order
/// changes nobody's consent, so it issues no new version or receipt.
fn same_grants<T: PartialEq>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len() && a.iter().all(|g| b.contains(g)) && b.iter().all(|g| a.contains(g))
}

/// Why `new` may not replace `old`, if so: users whose share grants in
/// `prefs` name the provider consented to it as it was (X.1363 9.1 6),
/// 9.2 1)-2)), so while they do, neither who it is (its name, controller,
/// privacy policy, jurisdiction, and its role, which with the controller
/// decides whether the receipts call it a third party) nor
/// the terms of a purpose they granted (statement, category, core flag,
/// retention, termination) may change. Contact details may. A purpose
/// dropped, or no longer asking for a granted kind, is refused when the
/// ACT compiles; purposes nobody granted, and new ones, may change freely.
fn consent_changes<'p>(
    old: &Provider,
    new: &Provider,
    prefs: impl Iterator<Item = &'p Preferences> + Clone,
) -> Option<String> {
    let identity: Vec<&str> = [
        ("name", old.name != new.name),
        (
            "controller.company",
            old.controller.company != new.controller.company,
        ),
        ("privacy_policy", old.privacy_policy != new.privacy_policy),
        ("jurisdiction", old.jurisdiction != new.jurisdiction),
        ("role", old.role != new.role),
    ]
    .into_iter()
    .filter_map(|(field, changed)| changed.then_some(field))
    .collect();
    if !identity.is_empty() {
        let users = prefs
            .clone()
            .filter(|p| p.share.iter().any(|g| g.provider == old.id))
            .count();
        if users > 0 {
            return Some(format!(
                "{identity:?} of provider {:?} would change, and {users} user(s) share data with \
                 it as it is; register the new party under another provider id",
                old.id
            ));
        }
    }
    let changed: Vec<&str> = old
        .purposes
        .iter()
        .filter(|o| {
            new.purposes.iter().any(|n| {
                n.id == o.id
                    && (n.statement != o.statement
                        || n.category != o.category
                        || n.core != o.core
                        || n.retention_days != o.retention_days
                        || n.termination != o.termination)
            })
        })
        .map(|o| o.id.as_str())
        .collect();
    if changed.is_empty() {
        return None;
    }
    let users = prefs
        .filter(|p| {
            p.share
                .iter()
                .any(|g| g.provider == old.id && changed.contains(&g.purpose.as_str()))
        })
        .count();
    (users > 0).then(|| {
        format!(
            "purpose(s) {changed:?} of provider {:?} are named in the share grants of {users} \
             user(s), who consented to them as they are; publish the new terms under another \
             purpose id",
            old.id
        )
    })
}

/// Replaces the items of `into` that `from` names again, in place, and
/// appends the new ones, in `from`'s order; a later duplicate in `from` wins.
fn upsert<T: Clone>(into: &mut Vec<T>, from: &[T], id: impl Fn(&T) -> &String) {
    let mut at: HashMap<String, usize> = into
        .iter()
        .enumerate()
        .map(|(i, x)| (id(x).clone(), i))
        .collect();
    for item in from {
        match at.get(id(item)) {
            Some(&i) => into[i] = item.clone(),
            None => {
                at.insert(id(item).clone(), into.len());
                into.push(item.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsert_replaces_in_place_appends_new_and_lets_the_last_duplicate_win() {
        #[derive(Clone, Debug, PartialEq)]
        struct Item(String, u32);
        let item = |id: &str, v| Item(id.to_string(), v);
        let mut into = vec![item("a", 1), item("b", 1)];
        let from = [item("b", 2), item("c", 1), item("c", 2), item("a", 2)];
        upsert(&mut into, &from, |x| &x.0);
        assert_eq!(into, [item("a", 2), item("b", 2), item("c", 2)]);
    }
    use crate::act::{Delivery, Principal};
    use crate::model::ShareGrant;

    fn demo() -> (Directory, Vec<Kind>) {
        let dir: Directory = toml::from_str(include_str!("../config/demo.toml")).unwrap();
        let cfg: crate::config::Config =
            toml::from_str(include_str!("../config/consentry.toml")).unwrap();
        (dir, cfg.kinds)
    }

    fn manager() -> (PreferenceManager, Arc<ActHandle>) {
        let (dir, kinds) = demo();
        let (pm, act, _) = PreferenceManager::open(
            Store::in_memory(&[5; 32]).unwrap(),
            vec!["pii/{user}/{device}/{kind}".into()],
            &kinds,
            vec![],
            dir,
            None,
        )
        .unwrap();
        (pm, act)
    }

    /// A manager over a store file, seeded with `seed` when it is new.
    fn open_file(
        path: &std::path::Path,
        key: u8,
        seed: &Directory,
        kinds: &[Kind],
    ) -> (PreferenceManager, Arc<ActHandle>, SharedCredentials) {
        PreferenceManager::open(
            Store::open(path, &[key; 32]).unwrap(),
            vec!["pii/{user}/{device}/{kind}".into()],
            kinds,
            vec![],
            seed.clone(),
            None,
        )
        .unwrap()
    }

    /// `user`'s entry in a directory file.
    fn prefs_in<'f>(file: &'f mut Directory, user: &str) -> &'f mut Preferences {
        file.preferences
            .iter_mut()
            .find(|p| p.user == user)
            .expect("the user has preferences in the file")
    }

    /// Takes heart_rate out of every demo user's preferences.
    fn nobody_names_heart_rate(pm: &PreferenceManager) {
        for user in ["alice", "bob"] {
            pm.change(user, None, "test", |p| {
                p.collect.retain(|g| g.kind != "heart_rate");
                p.share.retain(|g| g.kind != "heart_rate");
                Ok(())
            })
            .unwrap();
        }
    }

    fn fitcoach_gets_heart_rate(act: &ActHandle) -> bool {
        matches!(
            act.load().deliver(
                &Principal::Provider {
                    id: "fitcoach".into()
                },
                "pii/alice/alice-watch/heart_rate",
                Utc::now()
            ),
            Ok(Delivery::Personal { .. })
        )
    }

    /// Looks at what the ACT in force allows when a receipt is issued: the
    /// moment the receipt's time is taken.
    struct Witness {
        act: std::sync::OnceLock<Arc<ActHandle>>,
        seen: Mutex<Vec<(bool, bool, bool)>>,
    }

    impl ReceiptIssuer for Witness {
        fn issue(
            &self,
            _user: &User,
            prefs: &Preferences,
            _channel: Channel,
            _dir: &Directory,
            _kinds: &[Kind],
            now: DateTime<Utc>,
        ) -> Result<StoredReceipt, String> {
            if let Some(act) = self.act.get() {
                let kind_shared = |kind: &str| {
                    matches!(
                        act.load().deliver(
                            &Principal::Provider {
                                id: "fitcoach".into()
                            },
                            &format!("pii/alice/alice-watch/{kind}"),
                            Utc::now()
                        ),
                        Ok(Delivery::Personal { .. })
                    )
                };
                let watch = Principal::Device {
                    id: "alice-watch".into(),
                    user: "alice".into(),
                };
                let topic =
                    crate::topic::TopicName::new("pii/alice/alice-watch/heart_rate").unwrap();
                let collected = act.load().ingress(&watch, topic, Utc::now()).is_ok();
                let seen = (kind_shared("heart_rate"), kind_shared("steps"), collected);
                self.seen.lock().unwrap().push(seen);
            }
            Ok(StoredReceipt {
                jti: prefs.receipt.clone().unwrap_or_default(),
                version: prefs.version,
                at: now,
                json: serde_json::Value::Null,
                jws: String::new(),
            })
        }
    }

    /// A manager over `dir` whose receipts record what the ACT allowed
    /// when each was issued.
    fn witnessed(
        dir: Directory,
        kinds: &[Kind],
    ) -> (PreferenceManager, Arc<ActHandle>, Arc<Witness>) {
        let witness = Arc::new(Witness {
            act: Default::default(),
            seen: Mutex::new(Vec::new()),
        });
        let (pm, act, _) = PreferenceManager::open(
            Store::in_memory(&[6; 32]).unwrap(),
            vec!["pii/{user}/{device}/{kind}".into()],
            kinds,
            vec![],
            dir,
            Some(witness.clone()),
        )
        .unwrap();
        witness.act.set(act.clone()).ok().unwrap();
        (pm, act, witness)
    }

    /// A collection window open all week but the day's last minute.
    fn all_day() -> crate::model::Window {
        crate::model::Window {
            days: vec![
                chrono::Weekday::Mon,
                chrono::Weekday::Tue,
                chrono::Weekday::Wed,
                chrono::Weekday::Thu,
                chrono::Weekday::Fri,
                chrono::Weekday::Sat,
                chrono::Weekday::Sun,
            ],
            from: chrono::NaiveTime::from_hms_opt(0, 0, 0).unwrap(),
            to: chrono::NaiveTime::from_hms_opt(23, 59, 0).unwrap(),
        }
    }

    /// Found by an outside review: a receipt's time was taken before the
    /// change was in force, so records of deliveries the change withdrew
    /// carried a later time than the withdrawal's receipt. What a change
    /// takes away now stops before the receipt's time is taken; what it
    /// adds starts once committed.
    #[test]
    fn what_a_change_withdraws_stops_before_its_receipt_is_issued() {
        let (dir, kinds) = demo();
        let (pm, act, witness) = witnessed(dir, &kinds);
        let share = |kind: &str| ShareGrant {
            provider: "fitcoach".into(),
            purpose: "coaching".into(),
            kind: kind.into(),
            mask: Default::default(),
            expires: None,
        };
        // A withdrawal: heart_rate stops before the receipt.
        pm.change("alice", None, "api", |p| {
            p.share.retain(|g| g.kind != "heart_rate");
            Ok(())
        })
        .unwrap();
        // An addition: heart_rate starts after it.
        pm.change("alice", None, "api", |p| {
            p.share.push(share("heart_rate"));
            Ok(())
        })
        .unwrap();
        // Both at once: what is taken stops, what is kept goes on.
        pm.change("alice", None, "api", |p| {
            p.share.retain(|g| g.kind != "heart_rate");
            p.share
                .iter_mut()
                .filter(|g| g.kind == "location")
                .for_each(|g| g.mask.clear());
            Ok(())
        })
        .unwrap();
        // In force after each, as it returns.
        assert!(!fitcoach_gets_heart_rate(&act));
        // A window on collection, then a move to another zone: collection
        // under the window stops while each commits.
        pm.change("alice", None, "api", |p| {
            for g in p.collect.iter_mut().filter(|g| g.kind == "heart_rate") {
                g.windows = vec![all_day()];
            }
            Ok(())
        })
        .unwrap();
        pm.set_time_zone("alice", "Asia/Tokyo").unwrap();
        let seen = witness.seen.lock().unwrap().clone();
        let shared: Vec<(bool, bool)> = seen.iter().map(|s| (s.0, s.1)).collect();
        assert_eq!(shared[..3], [(false, true), (false, true), (false, true)]);
        let collected: Vec<bool> = seen.iter().map(|s| s.2).collect();
        assert_eq!(collected, [true, true, true, false, false]);
    }

    /// The same for a directory import: what the file takes away from a
    /// user whose preferences are the file's stops before the receipt the
    /// import issues them; so does collection under windows when the file
    /// moves the user's zone.
    #[test]
    fn what_an_import_withdraws_stops_before_its_receipts_are_issued() {
        let (mut file, kinds) = demo();
        let (pm, act, witness) = witnessed(file.clone(), &kinds);
        fn alice(file: &mut Directory) -> &mut Preferences {
            let found = file.preferences.iter_mut().find(|p| p.user == "alice");
            found.unwrap()
        }
        alice(&mut file).share.retain(|g| g.kind != "heart_rate");
        pm.import(file.clone()).unwrap();
        assert!(!fitcoach_gets_heart_rate(&act));
        for g in alice(&mut file)
            .collect
            .iter_mut()
            .filter(|g| g.kind == "heart_rate")
        {
            g.windows = vec![all_day()];
        }
        pm.import(file.clone()).unwrap();
        let zone = &mut file.users.iter_mut().find(|u| u.id == "alice").unwrap();
        zone.time_zone = "Asia/Tokyo".into();
        pm.import(file).unwrap();
        assert_eq!(pm.user("alice").unwrap().time_zone, "Asia/Tokyo");
        let seen = witness.seen.lock().unwrap().clone();
        // Sharing heart_rate stopped before the first receipt; steps went on.
        assert_eq!(seen[0], (false, true, true));
        // Collection under the new window, and under it in the new zone,
        // started only once committed.
        let collected: Vec<bool> = seen.iter().map(|s| s.2).collect();
        assert_eq!(collected, [true, false, false]);
    }

    #[test]
    fn a_change_is_in_force_when_it_returns() {
        let (pm, act) = manager();
        assert!(fitcoach_gets_heart_rate(&act));
        let v = pm.preferences("alice").unwrap().version;
        let applied = pm
            .change("alice", Some(v), "test", |p| {
                p.share.retain(|g| g.kind != "heart_rate");
                Ok(())
            })
            .unwrap();
        assert_eq!(applied.preferences.version, v + 1);
        assert!(!fitcoach_gets_heart_rate(&act));
        assert_eq!(act.load().version, applied.act_version);
        // The store has it, with history.
        assert_eq!(pm.store().preferences("alice").unwrap().version, v + 1);
        assert_eq!(pm.store().history("alice").unwrap().len() as u64, v + 1);
    }

    #[test]
    fn stale_versions_and_invalid_grants_change_nothing() {
        let (pm, act) = manager();
        let before = act.load().version;
        let v = pm.preferences("alice").unwrap().version;
        assert!(matches!(
            pm.change("alice", Some(v + 7), "test", |_| Ok(())),
            Err(PrefError::Conflict { current }) if current == v
        ));
        // insureco's T&C never ask for location: purpose limitation.
        let err = pm
            .change("alice", Some(v), "test", |p| {
                p.share.push(ShareGrant {
                    provider: "insureco".into(),
                    purpose: "pricing".into(),
                    kind: "location".into(),
                    mask: Default::default(),
                    expires: None,
                });
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(
            err,
            PrefError::Invalid(CompileError::PurposeLimitation { .. })
        ));
        assert_eq!(act.load().version, before);
        assert_eq!(pm.preferences("alice").unwrap().version, v);
        assert!(matches!(
            pm.change("nobody", None, "test", |_| Ok(())),
            Err(PrefError::UnknownUser(_))
        ));
    }

    /// Re-importing a directory changes only the users whose preferences
    /// differ, and a user named twice is decided by the last entry.
    #[test]
    fn import_applies_each_users_last_entry_and_only_changes() {
        let (pm, act) = manager();
        let (mut file, _) = demo();
        let alice = pm.preferences("alice").unwrap();
        let others: Vec<(String, u64)> = file
            .preferences
            .iter()
            .filter(|p| p.user != "alice")
            .map(|p| (p.user.clone(), pm.preferences(&p.user).unwrap().version))
            .collect();
        assert!(!others.is_empty());

        // First entry stops sharing heart rate; the last is as stored: no change.
        let mut stop = alice.clone();
        stop.share.retain(|g| g.kind != "heart_rate");
        file.preferences.insert(0, stop.clone());
        file.preferences.push(alice.clone());
        pm.import(file.clone()).unwrap();
        assert_eq!(pm.preferences("alice").unwrap().version, alice.version);
        assert!(fitcoach_gets_heart_rate(&act));

        // Now the last entry is the change: it is applied, once.
        file.preferences.push(stop);
        pm.import(file).unwrap();
        let now = pm.preferences("alice").unwrap();
        assert_eq!(now.version, alice.version + 1);
        assert!(!fitcoach_gets_heart_rate(&act));
        assert_eq!(
            pm.store().history("alice").unwrap().len() as u64,
            alice.version + 1
        );
        for (user, version) in others {
            assert_eq!(pm.preferences(&user).unwrap().version, version, "{user}");
        }
    }

    #[test]
    fn a_kind_users_consented_to_cannot_be_redefined() {
        let (pm, act) = manager();
        let heart_rate = pm.kinds().into_iter().find(|k| k.name == "heart_rate");
        let heart_rate = heart_rate.unwrap();
        let mut wider = heart_rate.clone();
        wider.fields.push("x".into());
        let err = pm.put_kind(wider.clone()).unwrap_err();
        assert!(matches!(err, PrefError::Exists(_)), "{err}");
        assert_eq!(
            pm.kinds().iter().find(|k| k.name == "heart_rate"),
            Some(&heart_rate)
        );
        assert!(fitcoach_gets_heart_rate(&act));
        // Declaring it again as it is changes nothing and is no error.
        pm.put_kind(heart_rate.clone()).unwrap();
        // A kind nobody's preferences name may change; a new one may be added.
        let mut sleep = heart_rate.clone();
        sleep.name = "sleep".into();
        pm.put_kind(sleep.clone()).unwrap();
        sleep.fields.push("x".into());
        pm.put_kind(sleep.clone()).unwrap();
        assert!(pm.kinds().contains(&sleep));
        // Once nobody names heart_rate any more, it may change too.
        nobody_names_heart_rate(&pm);
        pm.put_kind(wider.clone()).unwrap();
        assert!(pm.kinds().contains(&wider));
    }

    /// The bug this guards: a grant taken out of the directory file while
    /// consentry was stopped stayed in force after the start, until a SIGHUP.
    #[test]
    fn the_directory_file_is_applied_at_each_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (mut seed, kinds) = demo();
        let (_, act, _) = open_file(&path, 4, &seed, &kinds);
        assert!(fitcoach_gets_heart_rate(&act));
        drop(act);
        prefs_in(&mut seed, "alice")
            .share
            .retain(|g| !(g.provider == "fitcoach" && g.kind == "heart_rate"));
        let (pm, act, _) = open_file(&path, 4, &seed, &kinds);
        assert!(!fitcoach_gets_heart_rate(&act));
        // A new version, with its history entry, as a reload would make.
        assert_eq!(pm.preferences("alice").unwrap().version, 2);
        drop((pm, act));
        // Started again with the same file: nothing new.
        let (pm, _, _) = open_file(&path, 4, &seed, &kinds);
        assert_eq!(pm.preferences("alice").unwrap().version, 2);
    }

    /// The bug this guards: a field added to a kind in the configuration
    /// file reached providers at the next start under grants users had
    /// given to the kind as it was (`put_kind` refused the same through the API).
    #[test]
    fn a_restart_does_not_redefine_a_kind_users_consented_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (seed, kinds) = demo();
        drop(open_file(&path, 4, &seed, &kinds));
        let reopen = |kinds: &[Kind]| {
            PreferenceManager::open(
                Store::open(&path, &[4; 32]).unwrap(),
                vec!["pii/{user}/{device}/{kind}".into()],
                kinds,
                vec![],
                seed.clone(),
                None,
            )
        };
        let mut wider = kinds.clone();
        let at = wider.iter().position(|k| k.name == "heart_rate").unwrap();
        wider[at].fields.push("spo2".into());
        let Err(err) = reopen(&wider) else {
            panic!("a redefined kind users consented to was applied at start")
        };
        assert!(matches!(err, PrefError::Exists(_)), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("\"heart_rate\"") && message.contains("user(s)"),
            "{message}"
        );
        // The same fields listed in another order are the same kind.
        let mut reordered = kinds.clone();
        let location = kinds.iter().position(|k| k.name == "location").unwrap();
        reordered[location].fields.reverse();
        assert_ne!(reordered[location].fields, kinds[location].fields);
        drop(reopen(&reordered).unwrap());
        // Nothing was written: the stored definition is still the old one.
        let (pm, _, _) = reopen(&kinds).unwrap();
        assert!(pm.kinds().contains(&kinds[at]));
        // Once nobody's preferences name it, the file's definition applies.
        nobody_names_heart_rate(&pm);
        drop(pm);
        let (pm, _, _) = reopen(&wider).unwrap();
        assert!(pm.kinds().contains(&wider[at]));
    }

    /// The bug this guards: an unchanged directory re-applied on SIGHUP gave
    /// back a grant the user had withdrawn through the API.
    #[test]
    fn import_leaves_preferences_users_set_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (seed, kinds) = demo();
        let open = || open_file(&path, 7, &seed, &kinds);
        let (pm, act, _) = open();
        let bob = pm.preferences("bob").unwrap();
        pm.change("alice", None, "api", |p| {
            p.share.clear();
            Ok(())
        })
        .unwrap();
        let alice = pm.preferences("alice").unwrap();

        // The same file again, with bob's entry changed by the operator.
        let mut file = seed.clone();
        let at = file
            .preferences
            .iter()
            .position(|p| p.user == "bob")
            .unwrap();
        file.preferences[at].collect.clear();
        pm.import(file.clone()).unwrap();
        assert_eq!(pm.preferences("alice").unwrap(), alice);
        assert!(!fitcoach_gets_heart_rate(&act));
        assert_eq!(pm.preferences("bob").unwrap().version, bob.version + 1);
        assert!(pm.preferences("bob").unwrap().collect.is_empty());

        // After a restart too: who set their own comes from the history.
        drop(pm);
        let (pm, act, _) = open();
        pm.import(seed).unwrap();
        assert_eq!(pm.preferences("alice").unwrap(), alice);
        assert!(!fitcoach_gets_heart_rate(&act));
        assert_eq!(pm.preferences("bob").unwrap().version, bob.version + 2);
        let sources: Vec<String> = pm
            .store()
            .history("alice")
            .unwrap()
            .into_iter()
            .map(|e| e.source)
            .collect();
        assert_eq!(sources, [IMPORT_SOURCE, "api"]);
    }

    /// The bug this guards (outside review, seventeenth session): a kind
    /// redefined without a field once no one named it any more; a retained
    /// message collected under the old definition then carried that field to
    /// providers who consented to the narrower kind, since deliveries do not
    /// minimize again.
    #[test]
    fn a_kind_users_ever_consented_to_never_loses_a_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (seed, kinds) = demo();
        let (pm, _, _) = open_file(&path, 9, &seed, &kinds);
        let mut vitals = kinds
            .iter()
            .find(|k| k.name == "heart_rate")
            .unwrap()
            .clone();
        vitals.name = "vitals".into();
        vitals.fields = vec!["bpm".into(), "diagnosis".into()];
        vitals.types.clear();
        pm.put_kind(vitals.clone()).unwrap();
        let mut narrow = vitals.clone();
        narrow.fields = vec!["bpm".into()];
        // Nobody consented yet: it may change freely.
        pm.put_kind(narrow.clone()).unwrap();
        pm.put_kind(vitals.clone()).unwrap();

        pm.change("alice", None, "api", |p| {
            p.collect.push(crate::model::CollectGrant {
                kind: "vitals".into(),
                windows: vec![],
            });
            Ok(())
        })
        .unwrap();
        pm.change("alice", None, "api", |p| {
            p.collect.retain(|g| g.kind != "vitals");
            Ok(())
        })
        .unwrap();
        let refused = pm.put_kind(narrow.clone()).unwrap_err();
        assert!(refused.to_string().contains("\"diagnosis\""), "{refused}");
        // A field more is not a field less.
        let mut wider = vitals.clone();
        wider.fields.push("spo2".into());
        pm.put_kind(wider).unwrap();

        // Known from the consent history in a store from before the record of it.
        drop(pm);
        let raw = rusqlite::Connection::open(&path).unwrap();
        raw.execute_batch("DELETE FROM consented_kinds; DELETE FROM consented_kinds_filled;")
            .unwrap();
        drop(raw);
        let (pm, _, _) = open_file(&path, 9, &seed, &kinds);
        assert!(pm.put_kind(narrow).is_err(), "forgotten after the backfill");
    }

    /// The bug this guards (outside review, seventeenth session): a reload
    /// that gave a user another time zone moved the collection windows they
    /// had consented to, with no new version and no receipt stating it.
    #[test]
    fn a_time_zone_from_the_file_never_moves_windows_without_a_receipt() {
        use chrono::{NaiveTime, TimeZone, Weekday};
        let (pm, act) = manager();
        let (seed, _) = demo();
        let night = crate::model::Window {
            days: vec![
                Weekday::Mon,
                Weekday::Tue,
                Weekday::Wed,
                Weekday::Thu,
                Weekday::Fri,
                Weekday::Sat,
                Weekday::Sun,
            ],
            from: NaiveTime::from_hms_opt(1, 0, 0).unwrap(),
            to: NaiveTime::from_hms_opt(5, 0, 0).unwrap(),
        };
        // alice sets her own window; bob's comes from the file.
        pm.change("alice", None, "api", |p| {
            p.collect[0].windows = vec![night.clone()];
            Ok(())
        })
        .unwrap();
        let mut file = seed.clone();
        let bob_at = file
            .preferences
            .iter()
            .position(|p| p.user == "bob")
            .unwrap();
        file.preferences[bob_at].collect[0].windows = vec![night];
        pm.import(file.clone()).unwrap();
        let alice = pm.preferences("alice").unwrap();
        let bob = pm.preferences("bob").unwrap();

        for u in &mut file.users {
            u.time_zone = "Pacific/Auckland".into();
        }
        pm.import(file.clone()).unwrap();
        assert_eq!(pm.user("alice").unwrap().time_zone, "Europe/Paris");
        assert_eq!(pm.preferences("alice").unwrap(), alice);
        // 13:30 UTC on 24 November 2026 is 02:30 in Auckland, 14:30 in Paris.
        let at = Utc.with_ymd_and_hms(2026, 11, 24, 13, 30, 0).unwrap();
        let topic = crate::topic::TopicName::new("pii/alice/alice-watch/heart_rate").unwrap();
        let watch = Principal::Device {
            id: "alice-watch".into(),
            user: "alice".into(),
        };
        assert!(
            act.load().ingress(&watch, topic, at).is_err(),
            "alice's window moved to Auckland time"
        );

        assert_eq!(pm.user("bob").unwrap().time_zone, "Pacific/Auckland");
        let rezoned = pm.preferences("bob").unwrap();
        assert_eq!(rezoned.version, bob.version + 1);
        assert!(same_grants(&rezoned.collect, &bob.collect));
        // The same file again changes nothing more.
        pm.import(file).unwrap();
        assert_eq!(pm.preferences("bob").unwrap().version, rezoned.version);
    }

    /// The bug this guards: a reload put back the file's provider over the
    /// operator's change through the API, and once users had granted a
    /// purpose only the API had added, every reload failed to compile.
    #[test]
    fn import_applies_a_provider_only_where_the_file_changed_it() {
        let (pm, act) = manager();
        let (seed, _) = demo();
        let fit = |pm: &PreferenceManager| {
            pm.providers()
                .into_iter()
                .find(|p| p.id == "fitcoach")
                .unwrap()
        };
        let mut changed = fit(&pm);
        changed.controller.email = "dpo@api.fitcoach.example".into();
        let mut extra = changed.purposes[0].clone();
        extra.id = "research".into();
        changed.purposes.push(extra.clone());
        pm.put_provider(changed.clone()).unwrap();
        let kind = extra.kinds[0].clone();
        pm.change("alice", None, "api", |p| {
            p.share.retain(|g| g.provider != "fitcoach");
            p.share.push(ShareGrant {
                provider: "fitcoach".into(),
                purpose: "research".into(),
                kind,
                mask: Default::default(),
                expires: None,
            });
            Ok(())
        })
        .unwrap();

        // The same file again: the API's provider stands, and the reload works.
        pm.import(seed.clone()).unwrap();
        assert_eq!(fit(&pm).controller.email, changed.controller.email);
        assert_eq!(fit(&pm).purposes.len(), changed.purposes.len());
        assert!(act.load().version > 1);

        // The file edited for that provider: the operator's latest word wins.
        let mut file = seed.clone();
        let at = file
            .providers
            .iter()
            .position(|p| p.id == "fitcoach")
            .unwrap();
        file.providers[at].controller.email = "dpo@file.fitcoach.example".into();
        file.providers[at].purposes = changed.purposes.clone();
        pm.import(file.clone()).unwrap();
        assert_eq!(fit(&pm).controller.email, "dpo@file.fitcoach.example");
        // And stays so on the next reload of that file.
        pm.import(file).unwrap();
        assert_eq!(fit(&pm).controller.email, "dpo@file.fitcoach.example");
    }

    #[test]
    fn an_import_cannot_restate_a_purpose_users_consented_to() {
        let (pm, _) = manager();
        let (seed, _) = demo();
        let granted = pm
            .preferences("alice")
            .unwrap()
            .share
            .iter()
            .find(|g| g.provider == "fitcoach")
            .unwrap()
            .purpose
            .clone();
        let mut file = seed.clone();
        let fit = file
            .providers
            .iter_mut()
            .find(|p| p.id == "fitcoach")
            .unwrap();
        let purpose = fit.purposes.iter_mut().find(|p| p.id == granted).unwrap();
        purpose.statement = "Sold to advertisers".into();
        let err = pm.import(file).unwrap_err();
        assert!(
            matches!(err, PrefError::Exists(ref m) if m.contains(&granted)),
            "{err:?}"
        );
        assert_ne!(
            pm.providers()
                .iter()
                .find(|p| p.id == "fitcoach")
                .unwrap()
                .purposes
                .iter()
                .find(|p| p.id == granted)
                .unwrap()
                .statement,
            "Sold to advertisers"
        );
        pm.import(seed).unwrap();
    }

    #[test]
    fn an_import_holds_a_providers_terms_to_the_apis_rules() {
        let (pm, _) = manager();
        let (seed, _) = demo();
        let mut newco = seed.providers[0].clone();
        newco.id = "newco".into();
        newco.purposes[0].statement = "\u{200b}".into();
        let mut file = seed.clone();
        file.providers.push(newco);
        let err = pm.import(file).unwrap_err();
        assert!(
            matches!(err, PrefError::BadTerms { ref provider, ref terms }
                if provider == "newco" && terms.field == "purposes[0].statement"),
            "{err:?}"
        );
        assert!(pm.providers().iter().all(|p| p.id != "newco"));
    }

    /// The file's preferences are held to the API's rules for grants:
    /// here, a window the receipt could not state.
    #[test]
    fn an_import_holds_windows_to_the_apis_rules() {
        let (pm, _) = manager();
        let (seed, _) = demo();
        let mut file = seed.clone();
        let bob = prefs_in(&mut file, "bob");
        bob.collect[0].windows = vec![crate::model::Window {
            days: vec![chrono::Weekday::Tue],
            from: chrono::NaiveTime::from_hms_opt(1, 0, 0).unwrap(),
            to: chrono::NaiveTime::from_hms_opt(1, 0, 59).unwrap(),
        }];
        let err = pm.import(file).unwrap_err();
        assert!(
            matches!(err, PrefError::Pointless { ref field, ref message }
                if field == "collect[0].windows[0]" && message.contains("bob")),
            "{err:?}"
        );
    }

    #[test]
    fn an_import_that_only_reorders_grants_issues_nothing() {
        let (pm, _) = manager();
        let (seed, _) = demo();
        let before = pm.preferences("alice").unwrap();
        assert!(before.share.len() > 1, "the demo gives alice two grants");
        let mut file = seed.clone();
        let alice = prefs_in(&mut file, "alice");
        alice.share.reverse();
        alice.collect.reverse();
        pm.import(file).unwrap();
        let after = pm.preferences("alice").unwrap();
        assert_eq!(after.version, before.version);
        assert_eq!(after.receipt, before.receipt);
    }

    #[test]
    fn an_import_holds_generalization_to_the_apis_range() {
        let (pm, _) = manager();
        let (seed, _) = demo();
        for decimals in [400, i32::MIN] {
            let mut file = seed.clone();
            let alice = prefs_in(&mut file, "alice");
            alice.share[0].mask.insert(
                "bpm".into(),
                crate::model::MaskMethod::Generalize { decimals },
            );
            let err = pm.import(file).unwrap_err();
            assert!(
                matches!(
                    err,
                    PrefError::Pointless { ref field, .. } if field == "share[0].mask.bpm"
                ),
                "{decimals}: {err:?}"
            );
        }
    }

    /// A store from before import records were kept: the first reload must
    /// neither revert the API's change nor fail on the grants made to it.
    #[test]
    fn the_first_import_without_records_keeps_what_the_store_holds() {
        let (pm, _) = manager();
        let (seed, _) = demo();
        let email_of = |pm: &PreferenceManager, id: &str| {
            pm.providers()
                .into_iter()
                .find(|p| p.id == id)
                .unwrap()
                .controller
                .email
        };
        let mut changed = pm
            .providers()
            .into_iter()
            .find(|p| p.id == "fitcoach")
            .unwrap();
        changed.controller.email = "dpo@api.fitcoach.example".into();
        pm.put_provider(changed).unwrap();
        pm.store().forget_imported_providers().unwrap();
        pm.import(seed.clone()).unwrap();
        assert_eq!(email_of(&pm, "fitcoach"), "dpo@api.fitcoach.example");
        // The file's entry is now the baseline: editing it applies.
        let mut file = seed;
        let at = file
            .providers
            .iter()
            .position(|p| p.id == "fitcoach")
            .unwrap();
        file.providers[at].controller.email = "dpo@edited.fitcoach.example".into();
        pm.import(file).unwrap();
        assert_eq!(email_of(&pm, "fitcoach"), "dpo@edited.fitcoach.example");
    }

    /// A kind stored by an earlier version with a type that can never be
    /// checked must not keep the server from starting.
    #[test]
    fn a_stored_kind_with_an_untypable_type_opens_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (seed, kinds) = demo();
        let (pm, _, _) = open_file(&path, 4, &seed, &kinds);
        let blob = Kind {
            name: "blob".into(),
            format: crate::model::PayloadFormat::Opaque,
            fields: vec!["x".into()],
            types: [("x".to_string(), crate::model::FieldType::Number)].into(),
            ..kinds[0].clone()
        };
        // As an earlier version stored it, past today's checks.
        pm.store().transaction(|tx| tx.put_kind(&blob)).unwrap();
        drop(pm);
        let (pm, _, _) = open_file(&path, 4, &seed, &kinds);
        let stored = pm.kinds().into_iter().find(|k| k.name == "blob").unwrap();
        assert!(stored.types.is_empty());
        drop(pm);
        // The same in the configuration file is the operator's to fix.
        let mut with_blob = kinds.clone();
        with_blob.push(blob);
        let refused = PreferenceManager::open(
            Store::open(&path, &[4; 32]).unwrap(),
            vec!["pii/{user}/{device}/{kind}".into()],
            &with_blob,
            vec![],
            seed.clone(),
            None,
        );
        assert!(refused.is_err());
    }

    /// Named twice in the file, a provider is its last entry, every reload.
    #[test]
    fn a_provider_named_twice_is_its_last_entry_every_time() {
        let (pm, _) = manager();
        let (mut file, _) = demo();
        let mut second = file.providers[0].clone();
        second.controller.email = "second@fitcoach.example".into();
        let id = second.id.clone();
        file.providers.push(second);
        for _ in 0..4 {
            pm.import(file.clone()).unwrap();
            let name = pm
                .providers()
                .into_iter()
                .find(|p| p.id == id)
                .unwrap()
                .controller
                .email;
            assert_eq!(name, "second@fitcoach.example");
        }
    }

    #[test]
    fn import_leaves_login_secrets_users_own() {
        let (pm, _) = manager();
        let (seed, _) = demo();
        let hash_of = |user: &str| pm.store().user_auth(user).unwrap().unwrap().password_hash;
        // The operator rotates alice's login in the file: applied, since
        // alice has not set her own.
        let mut file = seed.clone();
        let at = file.logins.iter().position(|l| l.user == "alice").unwrap();
        file.logins[at].password_hash = "$argon2id$rotated-by-the-operator".into();
        pm.import(file.clone()).unwrap();
        assert_eq!(
            hash_of("alice").as_deref(),
            Some("$argon2id$rotated-by-the-operator")
        );

        // She sets her own; the same file again leaves it, and changes
        // nothing for bob, who has not.
        pm.store()
            .set_own_password("alice", "$argon2id$her-own")
            .unwrap();
        let bob = hash_of("bob");
        file.logins[at].password_hash = "$argon2id$rotated-again".into();
        pm.import(file.clone()).unwrap();
        assert_eq!(hash_of("alice").as_deref(), Some("$argon2id$her-own"));
        assert_eq!(hash_of("bob"), bob);

        // A user who registered through the API owns their secrets from the
        // start.
        let carol = User {
            id: "carol".into(),
            time_zone: "UTC".into(),
            jurisdiction: None,
        };
        pm.register_user(carol.clone(), "$argon2id$carols", b"12345678901234567890")
            .unwrap();
        file.users.push(carol);
        file.logins.push(crate::model::UserLogin {
            user: "carol".into(),
            ..file.logins[at].clone()
        });
        pm.import(file).unwrap();
        assert_eq!(hash_of("carol").as_deref(), Some("$argon2id$carols"));
        assert!(matches!(
            pm.store().set_own_password("nobody", "x"),
            Err(StoreError::NotFound { .. })
        ));
    }

    #[test]
    fn a_removed_device_stays_removed_across_imports_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (seed, kinds) = demo();
        let open = || open_file(&path, 9, &seed, &kinds);
        let (pm, act, creds) = open();
        assert!(matches!(
            pm.remove_device("bob", "alice-watch"),
            Err(PrefError::UnknownDevice(_))
        ));
        assert!(matches!(
            pm.remove_device("alice", "nothing"),
            Err(PrefError::UnknownDevice(_))
        ));
        assert!(creds
            .load()
            .verify_password("alice-watch", b"alice-watch-secret")
            .is_ok());
        // The topics it may have left retained messages on, one per kind.
        let topics = pm.remove_device("alice", "alice-watch").unwrap();
        assert_eq!(topics.len(), kinds.len());
        assert!(topics.contains(&"pii/alice/alice-watch/heart_rate".to_string()));
        assert_eq!(act.load().device_user("alice-watch"), None);
        assert!(!fitcoach_gets_heart_rate(&act));
        assert!(creds
            .load()
            .verify_password("alice-watch", b"alice-watch-secret")
            .is_err());
        assert!(pm.devices_of("alice").is_empty());
        assert_eq!(pm.devices_of("bob"), ["bob-phone"]);

        pm.import(seed.clone()).unwrap();
        assert_eq!(act.load().device_user("alice-watch"), None);
        drop(pm);
        let (pm, act, creds) = open();
        pm.import(seed.clone()).unwrap();
        assert_eq!(act.load().device_user("alice-watch"), None);
        assert!(creds
            .load()
            .verify_password("alice-watch", b"alice-watch-secret")
            .is_err());

        // Registered again by its user: bound again, and imports keep it
        // with its new secret, not the file's old one.
        pm.register_device(Device {
            id: "alice-watch".into(),
            user: "alice".into(),
            password_hash: Some(crate::auth::hash_password("new secret")),
            cert_sha256: None,
        })
        .unwrap();
        pm.import(seed).unwrap();
        assert_eq!(act.load().device_user("alice-watch"), Some("alice"));
        assert!(fitcoach_gets_heart_rate(&act));
        assert!(creds
            .load()
            .verify_password("alice-watch", b"new secret")
            .is_ok());
        assert!(creds
            .load()
            .verify_password("alice-watch", b"alice-watch-secret")
            .is_err());
    }

    #[test]
    fn reopening_loads_what_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (seed, kinds) = demo();
        let open = || open_file(&path, 6, &seed, &kinds);
        {
            let (pm, _, _) = open();
            pm.change("alice", None, "test", |p| {
                p.share.clear();
                Ok(())
            })
            .unwrap();
        }
        let (pm, act, _) = open();
        assert!(pm.preferences("alice").unwrap().share.is_empty());
        assert!(!fitcoach_gets_heart_rate(&act));
    }
}

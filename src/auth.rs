//! Identity at CONNECT: username/password (argon2 PHC strings) or a client
//! certificate fingerprint, resolved to a [`Principal`].
//!
//! Argon2 is deliberately slow (tens of milliseconds), which is right for a
//! human login and ruinous for 20k devices reconnecting after a broker
//! restart. A successful verification is therefore remembered as a keyed
//! HMAC of the password under a per-process random key; the next CONNECT with
//! the same password is checked against that in constant time. The cache is
//! dropped whenever credentials change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use thiserror::Error;

use crate::act::Principal;
use crate::model::Directory;

#[derive(Debug, Error, PartialEq)]
pub enum AuthError {
    #[error("unknown user name or wrong password")]
    BadCredentials,
    #[error("credentials required")]
    Missing,
    #[error("certificate is not registered")]
    UnknownCertificate,
    #[error("{0:?} is both a device and a provider")]
    Ambiguous(String),
    #[error("stored password hash of {0:?} is not a valid PHC string")]
    BadHash(String),
    /// One certificate for two identities: whichever was loaded last would
    /// log in with it, a device as a provider, say.
    #[error("certificate {fingerprint} is registered for both {first} and {second}")]
    SharedCertificate {
        fingerprint: String,
        first: String,
        second: String,
    },
}

/// Registers `fp` for `principal`, refusing one already registered for
/// another.
fn add_cert(
    by_cert: &mut HashMap<String, Principal>,
    fp: &str,
    principal: &Principal,
) -> Result<(), AuthError> {
    let fp = fp.to_ascii_lowercase();
    if let Some(first) = by_cert.get(&fp).filter(|p| *p != principal) {
        let name = |p: &Principal| match p {
            Principal::Device { id, .. } => format!("device {id}"),
            Principal::Provider { id } => format!("provider {id}"),
            Principal::Anonymous => "anonymous".into(),
        };
        return Err(AuthError::SharedCertificate {
            fingerprint: fp,
            first: name(first),
            second: name(principal),
        });
    }
    by_cert.insert(fp, principal.clone());
    Ok(())
}

#[derive(Clone)]
struct Entry {
    principal: Principal,
    hash: Option<String>,
}

pub struct Credentials {
    by_name: HashMap<String, Entry>,
    by_cert: HashMap<String, Principal>,
    cache_key: [u8; 32],
    verified: Mutex<HashMap<String, [u8; 32]>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("principals", &self.by_name.len())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn from_directory(dir: &Directory) -> Result<Credentials, AuthError> {
        let mut by_name = HashMap::new();
        let mut by_cert = HashMap::new();
        let check_hash = |id: &str, h: &Option<String>| match h {
            Some(h) if PasswordHash::new(h).is_err() => Err(AuthError::BadHash(id.into())),
            _ => Ok(()),
        };
        for d in &dir.devices {
            check_hash(&d.id, &d.password_hash)?;
            let principal = Principal::Device {
                id: d.id.clone(),
                user: d.user.clone(),
            };
            if let Some(fp) = &d.cert_sha256 {
                add_cert(&mut by_cert, fp, &principal)?;
            }
            by_name.insert(
                d.id.clone(),
                Entry {
                    principal,
                    hash: d.password_hash.clone(),
                },
            );
        }
        for p in &dir.providers {
            check_hash(&p.id, &p.password_hash)?;
            let principal = Principal::Provider { id: p.id.clone() };
            if let Some(fp) = &p.cert_sha256 {
                add_cert(&mut by_cert, fp, &principal)?;
            }
            let prev = by_name.insert(
                p.id.clone(),
                Entry {
                    principal,
                    hash: p.password_hash.clone(),
                },
            );
            if prev.is_some() {
                return Err(AuthError::Ambiguous(p.id.clone()));
            }
        }
        let mut cache_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut cache_key);
        Ok(Credentials {
            by_name,
            by_cert,
            cache_key,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// These credentials plus one new device (its id must be new).
    pub fn with_device(&self, d: &crate::model::Device) -> Result<Credentials, AuthError> {
        if let Some(h) = &d.password_hash {
            if PasswordHash::new(h).is_err() {
                return Err(AuthError::BadHash(d.id.clone()));
            }
        }
        if self.by_name.contains_key(&d.id) {
            return Err(AuthError::Ambiguous(d.id.clone()));
        }
        let principal = Principal::Device {
            id: d.id.clone(),
            user: d.user.clone(),
        };
        let mut by_name = self.by_name.clone();
        let mut by_cert = self.by_cert.clone();
        if let Some(fp) = &d.cert_sha256 {
            add_cert(&mut by_cert, fp, &principal)?;
        }
        by_name.insert(
            d.id.clone(),
            Entry {
                principal,
                hash: d.password_hash.clone(),
            },
        );
        let verified = self.verified.lock().map(|m| m.clone()).unwrap_or_default();
        Ok(Credentials {
            by_name,
            by_cert,
            cache_key: self.cache_key,
            verified: Mutex::new(verified),
        })
    }

    /// These credentials without a device's password and certificates, and
    /// without its cached verification.
    pub fn without_device(&self, id: &str) -> Credentials {
        let is_it = |p: &Principal| matches!(p, Principal::Device { id: d, .. } if d == id);
        let mut by_name = self.by_name.clone();
        if by_name.get(id).is_some_and(|e| is_it(&e.principal)) {
            by_name.remove(id);
        }
        let mut by_cert = self.by_cert.clone();
        by_cert.retain(|_, p| !is_it(p));
        let mut verified = self.verified.lock().map(|m| m.clone()).unwrap_or_default();
        verified.remove(id);
        Credentials {
            by_name,
            by_cert,
            cache_key: self.cache_key,
            verified: Mutex::new(verified),
        }
    }

    /// What identifies `who`'s current registration, for a device: its
    /// password hash (salted, so new for each registration) or its
    /// certificate. A device removed and registered again under the same id
    /// has another; one removed, none.
    pub fn registration(&self, who: &Principal) -> Option<String> {
        let Principal::Device { id, .. } = who else {
            return None;
        };
        if let Some(Entry {
            principal,
            hash: Some(h),
        }) = self.by_name.get(id)
        {
            if principal == who {
                return Some(h.clone());
            }
        }
        self.by_cert
            .iter()
            .find(|(_, p)| *p == who)
            .map(|(cert, _)| format!("cert:{cert}"))
    }

    pub fn by_certificate(&self, sha256_hex: &str) -> Result<Principal, AuthError> {
        self.by_cert
            .get(&sha256_hex.to_ascii_lowercase())
            .cloned()
            .ok_or(AuthError::UnknownCertificate)
    }

    fn tag(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.cache_key).expect("any key size");
        mac.update(user.as_bytes());
        mac.update(&[0]);
        mac.update(password);
        mac.finalize().into_bytes().into()
    }

    /// The principal, if this very password was verified before: cheap (no
    /// argon2), so it need not wait for a core.
    pub fn verified_before(&self, user: &str, password: &[u8]) -> Option<Principal> {
        let entry = self.by_name.get(user)?;
        let tag = self.tag(user, password);
        let hit = self
            .verified
            .lock()
            .map(|m| m.get(user).is_some_and(|t| bool::from(t.ct_eq(&tag))))
            .unwrap_or(false);
        hit.then(|| entry.principal.clone())
    }

    /// Blocking: may run argon2. Call through [`crate::password_work`].
    pub fn verify_password(&self, user: &str, password: &[u8]) -> Result<Principal, AuthError> {
        if let Some(p) = self.verified_before(user, password) {
            return Ok(p);
        }
        let entry = self.by_name.get(user);
        let tag = self.tag(user, password);
        let ok = match entry.and_then(|e| e.hash.as_deref()) {
            Some(h) => PasswordHash::new(h)
                .map(|parsed| Argon2::default().verify_password(password, &parsed).is_ok())
                .unwrap_or(false),
            None => {
                // Spend the same effort for unknown names, so response time
                // does not tell which names exist.
                let _ = Argon2::default().verify_password(password, &dummy_hash());
                false
            }
        };
        match (ok, entry) {
            (true, Some(e)) => {
                if let Ok(mut m) = self.verified.lock() {
                    m.insert(user.to_string(), tag);
                }
                Ok(e.principal.clone())
            }
            _ => Err(AuthError::BadCredentials),
        }
    }
}

impl Credentials {
    /// The work of one password check against nothing, for unknown names.
    pub fn verify_dummy(password: &[u8]) -> bool {
        Argon2::default()
            .verify_password(password, &dummy_hash())
            .is_ok()
    }
}

fn dummy_hash() -> PasswordHash<'static> {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let s = HASH.get_or_init(|| hash_password("not a real password"));
    PasswordHash::new(s).expect("generated hash parses")
}

/// An argon2id PHC string for `password`, with a random salt.
pub fn hash_password(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .expect("argon2 with default parameters hashes any password")
}

pub type SharedCredentials = Arc<arc_swap::ArcSwap<Credentials>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Device, Provider, User};

    fn dir() -> Directory {
        Directory {
            users: vec![User {
                id: "alice".into(),
                time_zone: "UTC".into(),
                jurisdiction: None,
            }],
            devices: vec![Device {
                id: "alice-watch".into(),
                user: "alice".into(),
                password_hash: Some(hash_password("s3cret")),
                cert_sha256: Some("AB12".into()),
            }],
            providers: vec![Provider {
                id: "fitcoach".into(),
                name: "FitCoach".into(),
                role: Default::default(),
                password_hash: Some(hash_password("p")),
                cert_sha256: None,
                controller: Default::default(),
                jurisdiction: None,
                privacy_policy: None,
                purposes: vec![],
            }],
            preferences: vec![],
            logins: vec![],
        }
    }

    #[test]
    fn passwords() {
        let c = Credentials::from_directory(&dir()).unwrap();
        let dev = Principal::Device {
            id: "alice-watch".into(),
            user: "alice".into(),
        };
        assert_eq!(c.verify_password("alice-watch", b"s3cret"), Ok(dev.clone()));
        // Second time through the cache.
        assert_eq!(c.verify_password("alice-watch", b"s3cret"), Ok(dev));
        assert_eq!(
            c.verify_password("alice-watch", b"wrong"),
            Err(AuthError::BadCredentials)
        );
        assert_eq!(
            c.verify_password("nobody", b"s3cret"),
            Err(AuthError::BadCredentials)
        );
        assert_eq!(
            c.verify_password("fitcoach", b"p"),
            Ok(Principal::Provider {
                id: "fitcoach".into()
            })
        );
    }

    #[test]
    fn a_removed_device_is_refused_even_from_the_cache() {
        let c = Credentials::from_directory(&dir()).unwrap();
        assert!(c.verify_password("alice-watch", b"s3cret").is_ok());
        let c = c.without_device("alice-watch");
        assert_eq!(
            c.verify_password("alice-watch", b"s3cret"),
            Err(AuthError::BadCredentials)
        );
        assert_eq!(c.by_certificate("ab12"), Err(AuthError::UnknownCertificate));
        // Only devices go: a provider's name is not a device's.
        let c = c.without_device("fitcoach");
        assert!(c.verify_password("fitcoach", b"p").is_ok());
    }

    /// Found by an outside review: a provider given a device's fingerprint
    /// took its certificate over (providers load last), so the device's
    /// certificate logged in as the provider and received others' data.
    #[test]
    fn one_certificate_for_two_identities_is_refused() {
        let mut d = dir();
        d.providers[0].cert_sha256 = Some("ab12".into());
        match Credentials::from_directory(&d) {
            Err(AuthError::SharedCertificate { first, second, .. }) => {
                assert_eq!(
                    (first.as_str(), second.as_str()),
                    ("device alice-watch", "provider fitcoach")
                )
            }
            other => panic!("accepted: {other:?}"),
        }
        // A device registered later with a certificate already in use.
        let c = Credentials::from_directory(&dir()).unwrap();
        let twin = Device {
            id: "alice-ring".into(),
            user: "alice".into(),
            password_hash: None,
            cert_sha256: Some("aB12".into()),
        };
        assert!(matches!(
            c.with_device(&twin),
            Err(AuthError::SharedCertificate { .. })
        ));
    }

    #[test]
    fn certificates() {
        let c = Credentials::from_directory(&dir()).unwrap();
        assert!(c.by_certificate("ab12").is_ok());
        assert_eq!(c.by_certificate("ff"), Err(AuthError::UnknownCertificate));
    }

    #[test]
    fn bad_directory() {
        let mut d = dir();
        d.devices[0].password_hash = Some("plain".into());
        assert!(matches!(
            Credentials::from_directory(&d),
            Err(AuthError::BadHash(_))
        ));
        let mut d = dir();
        d.providers[0].id = "alice-watch".into();
        assert!(matches!(
            Credentials::from_directory(&d),
            Err(AuthError::Ambiguous(_))
        ));
    }
}

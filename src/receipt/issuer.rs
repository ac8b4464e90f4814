//! The preference manager's view of this module: [`Issuer`] implements
//! `prefs::ReceiptIssuer`, so every accepted change of preferences is
//! documented by a signed receipt stored with it, and serves the JWKS.

use std::sync::{RwLock, RwLockReadGuard};

use chrono::{DateTime, Utc};

use crate::model::{Directory, Kind, Preferences, User};
use crate::prefs::{Channel, ReceiptIssuer};
use crate::store::StoredReceipt;

use super::error::ReceiptError;
use super::jws::Jwks;
use super::keystore::{ReceiptKeys, SignedReceipt};
use super::mapping::Operator;

/// Signing keys and the operator's details, shared by the HTTP handlers.
#[derive(Debug)]
pub struct Issuer {
    // A lock so that keys can be rotated while the server runs; signing
    // only reads.
    keys: RwLock<ReceiptKeys>,
    operator: Operator,
}

impl Issuer {
    pub fn new(keys: ReceiptKeys, operator: Operator) -> Issuer {
        Issuer {
            keys: RwLock::new(keys),
            operator,
        }
    }

    fn keys(&self) -> RwLockReadGuard<'_, ReceiptKeys> {
        // A panic elsewhere cannot leave the keys half-changed (rotate
        // undoes itself on error), so a poisoned lock is still usable.
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn operator(&self) -> &Operator {
        &self.operator
    }

    /// The receipt for `prefs` at `now`, signed.
    pub fn sign(
        &self,
        user: &User,
        prefs: &Preferences,
        dir: &Directory,
        kinds: &[Kind],
        now: DateTime<Utc>,
    ) -> Result<SignedReceipt, ReceiptError> {
        super::issue(&self.keys(), &self.operator, user, prefs, dir, kinds, now)
    }

    /// `/.well-known/jwks.json`.
    pub fn jwks(&self) -> Jwks {
        self.keys().jwks()
    }

    /// Rotates the signing key (persisted when the keys came from a store);
    /// returns the new kid.
    pub fn rotate(&self) -> Result<String, ReceiptError> {
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .rotate()
    }
}

impl ReceiptIssuer for Issuer {
    fn issue(
        &self,
        user: &User,
        prefs: &Preferences,
        channel: Channel,
        dir: &Directory,
        kinds: &[Kind],
        now: DateTime<Utc>,
    ) -> Result<StoredReceipt, String> {
        let signed = match channel {
            Channel::User => self.sign(user, prefs, dir, kinds, now),
            Channel::Directory => {
                let operator = Operator {
                    collection_method: self.operator.import_method.clone(),
                    ..self.operator.clone()
                };
                super::issue(&self.keys(), &operator, user, prefs, dir, kinds, now)
            }
        }
        .map_err(|e| e.to_string())?;
        Ok(StoredReceipt {
            jti: signed.receipt.jti.clone(),
            version: prefs.version,
            at: now,
            json: serde_json::to_value(&signed.receipt).map_err(|e| e.to_string())?,
            jws: signed.jws,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::mapping;
    use super::super::tests::{demo, operator, t0};
    use super::*;

    #[test]
    fn issues_stored_receipts_that_verify() {
        let (dir, kinds) = demo();
        let issuer = Issuer::new(ReceiptKeys::generate(), operator());
        let issuer_dyn: &dyn ReceiptIssuer = &issuer;
        let stored = issuer_dyn
            .issue(
                &dir.users[0],
                &dir.preferences[0],
                Channel::User,
                &dir,
                &kinds,
                t0(),
            )
            .expect("issue");
        assert_eq!(stored.version, dir.preferences[0].version);
        assert_eq!(stored.json["moc"], mapping::DEFAULT_COLLECTION_METHOD);
        // A version the directory made says so, and verifies the same way.
        let imported = issuer_dyn
            .issue(
                &dir.users[0],
                &dir.preferences[0],
                Channel::Directory,
                &dir,
                &kinds,
                t0(),
            )
            .expect("issue");
        assert_eq!(imported.json["moc"], mapping::DEFAULT_IMPORT_METHOD);
        assert!(super::super::verify(&imported.jws, &issuer.jwks()).is_ok());
        assert_eq!(stored.at, t0());
        let v = super::super::verify(&stored.jws, &issuer.jwks()).expect("verifies");
        assert_eq!(v.receipt.jti, stored.jti);
        assert_eq!(serde_json::to_value(&v.receipt).ok(), Some(stored.json));

        let before = issuer.jwks();
        let kid = issuer.rotate().expect("rotate");
        assert_eq!(issuer.jwks().keys.len(), 2);
        assert_eq!(issuer.jwks().keys[0].kid.as_deref(), Some(kid.as_str()));
        // The old receipt still verifies against the new JWKS.
        assert!(super::super::verify(&stored.jws, &issuer.jwks()).is_ok());
        assert_ne!(before, issuer.jwks());

        let err = issuer_dyn
            .issue(
                &dir.users[1],
                &dir.preferences[0],
                Channel::User,
                &dir,
                &kinds,
                t0(),
            )
            .expect_err("mismatch");
        assert!(err.contains("not to \"bob\""), "{err}");
    }
}

//! Kantara consent receipts: every accepted change of a user's PII
//! preferences yields a receipt the user keeps, and can check without
//! trusting the operator.
//!
//! | file | holds |
//! | --- | --- |
//! | [`v08`] | the v0.8 Mode 2 JSON, every field; category names and numbers |
//! | [`mapping`] | [`Operator`] and [`receipt_for`]: consentry's model to a receipt |
//! | [`v11`] | the same receipt as Kantara v1.1 JSON |
//! | [`mode1`] | Mode 1: the 18 fields in Appendix C order, text and HTML |
//! | [`jws`] | compact JWS (EdDSA, Ed25519) and the JWKS |
//! | [`keystore`] | signing keys: generated, encrypted at rest, rotated |
//! | [`verify`] | signature + schema + completeness check of a receipt |
//! | [`issuer`] | [`Issuer`]: `prefs::ReceiptIssuer` for the preference manager, JWKS, rotation |
//!
//! The preference manager gets an `Arc<Issuer>` (from [`ReceiptKeys::open`]
//! on the data dir and the configured [`Operator`]) as its
//! `ReceiptIssuer`; the HTTP layer serves [`Issuer::jwks`] at
//! `/.well-known/jwks.json` and renders stored receipts with [`mode1::html`]
//! / [`mode1::text`] (after [`verify()`], or from their stored JSON).
//! `consentry receipt verify` calls [`Jwks::from_json`] and [`verify()`].

pub mod error;
pub mod issuer;
pub mod jws;
pub mod keystore;
pub mod mapping;
pub mod mode1;
pub mod v08;
pub mod v11;
pub mod verify;

#[cfg(test)]
mod tests;

use chrono::{DateTime, Utc};

use crate::model::{Directory, Kind, Preferences, User};

pub use error::ReceiptError;
pub use issuer::Issuer;
pub use jws::{Jwk, Jwks};
pub use keystore::{MasterKey, ReceiptKeys, SignedReceipt};
pub use mapping::{receipt_for, Operator};
pub use v08::ConsentReceipt;
pub use v11::ConsentReceiptV11;
pub use verify::{validate_v08, verify, VerifiedReceipt};

/// Builds the receipt for `prefs` as they stand at `now` and signs it with
/// the active key.
pub fn issue(
    keys: &ReceiptKeys,
    operator: &Operator,
    user: &User,
    prefs: &Preferences,
    dir: &Directory,
    kinds: &[Kind],
    now: DateTime<Utc>,
) -> Result<SignedReceipt, ReceiptError> {
    keys.sign(&receipt_for(operator, user, prefs, dir, kinds, now)?)
}

impl SignedReceipt {
    /// Mode 1 as plain text.
    pub fn mode1_text(&self) -> String {
        mode1::text(&self.receipt)
    }

    /// Mode 1 as a complete, escaped HTML page.
    pub fn mode1_html(&self) -> String {
        mode1::html(&self.receipt)
    }

    /// The v1.1 rendering (unsigned: the JWS carries the v0.8 payload).
    pub fn v1_1(&self) -> ConsentReceiptV11 {
        ConsentReceiptV11::from(&self.receipt)
    }
}

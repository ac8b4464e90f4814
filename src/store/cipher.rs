//! Column encryption for the store: AES-256-GCM with the key id in each
//! value and the value's place (table, column, row) as associated data, so a
//! ciphertext copied into another row or column does not decrypt.
//!
//! Nonces are random: the store encrypts orders of magnitude fewer values
//! than the 2^32 per key NIST SP 800-38D allows for random 96-bit nonces.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use super::StoreError;

pub struct Cipher {
    key_id: u32,
    /// The store's file, for an error about a value that does not decrypt.
    file: String,
    aead: Aes256Gcm,
    /// Keyed for [`Cipher::blind`], apart from the AEAD key.
    blind: Hmac<Sha256>,
}

impl Cipher {
    pub fn new(key_id: u32, key: &[u8; 32]) -> Cipher {
        let mut derive = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
        derive.update(b"consentry store blind index");
        let blind_key = derive.finalize().into_bytes();
        Cipher {
            key_id,
            file: "(in memory)".to_owned(),
            aead: Aes256Gcm::new(key.into()),
            blind: <Hmac<Sha256> as Mac>::new_from_slice(&blind_key).expect("any key length"),
        }
    }

    /// The cipher of the store in `path`, which its errors name.
    pub fn in_file(mut self, path: &std::path::Path) -> Cipher {
        self.file = path.display().to_string();
        self
    }

    /// A value's keyed digest, for looking it up without storing it in
    /// clear: equal values at one place have equal digests.
    pub fn blind(&self, place: &str, value: &[u8]) -> [u8; 32] {
        let mut m = self.blind.clone();
        m.update(place.as_bytes());
        m.update(&[0]);
        m.update(value);
        m.finalize().into_bytes().into()
    }

    pub fn seal(&self, place: &str, plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = self
            .aead
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: place.as_bytes(),
                },
            )
            .map_err(|_| StoreError::Crypto)?;
        let mut out = Vec::with_capacity(4 + 12 + ct.len());
        out.extend_from_slice(&self.key_id.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    pub fn open(&self, place: &str, sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
        let undecryptable = || StoreError::Undecryptable {
            file: self.file.clone(),
            place: place.to_owned(),
        };
        if sealed.len() < 16 + 16 {
            return Err(undecryptable());
        }
        let key_id = u32::from_be_bytes([sealed[0], sealed[1], sealed[2], sealed[3]]);
        if key_id != self.key_id {
            return Err(StoreError::UnknownKey(key_id));
        }
        self.aead
            .decrypt(
                Nonce::from_slice(&sealed[4..16]),
                Payload {
                    msg: &sealed[16..],
                    aad: place.as_bytes(),
                },
            )
            .map_err(|_| undecryptable())
    }
}

/// Where an encrypted value is, from its place (`table.column.key`), in the words of the schema:
/// the column, its table, and the key column and value that find its row.
pub(super) fn describe_place(place: &str) -> String {
    // (place prefix, column, table, key column); a user id may hold dots, so prefixes are
    // matched whole rather than split.
    const PLACES: [(&str, &str, &str, &str); 7] = [
        ("users.profile.", "profile", "users", "id"),
        ("users.totp.", "totp", "users", "id"),
        ("preferences.doc.", "doc", "preferences", "user_id"),
        ("consent_history.doc.", "doc", "consent_history", "seq"),
        ("receipts.doc.", "doc", "receipts", "jti"),
        ("disputes.detail.", "detail", "disputes", "id"),
        ("totp_pending.", "secret", "totp_pending", "user_id"),
    ];
    for (prefix, column, table, key) in PLACES {
        if let Some(row) = place.strip_prefix(prefix) {
            // Logs carry no user ids (README): a user's row is left for the
            // operator to find by trying the users' rows.
            if matches!(key, "id" | "user_id") && table != "disputes" {
                return format!("column {column} of table {table}, in one user's row,");
            }
            return format!("column {column} of table {table}, in the row where {key} = {row:?},");
        }
    }
    "a value of unknown place".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let c = Cipher::new(1, &[3; 32]);
        let sealed = c.seal("users.profile.alice", b"Europe/Paris").unwrap();
        assert_eq!(
            c.open("users.profile.alice", &sealed).unwrap(),
            b"Europe/Paris"
        );
        assert!(c.open("users.profile.bob", &sealed).is_err());
        assert!(Cipher::new(1, &[4; 32])
            .open("users.profile.alice", &sealed)
            .is_err());
        assert!(matches!(
            Cipher::new(2, &[3; 32]).open("users.profile.alice", &sealed),
            Err(StoreError::UnknownKey(1))
        ));
        assert_ne!(
            sealed,
            c.seal("users.profile.alice", b"Europe/Paris").unwrap()
        );
    }
}

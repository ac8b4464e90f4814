//! The receipt signing keys: Ed25519, generated on first run, kept encrypted
//! at rest, rotatable. The only I/O of the receipt module is here.
//!
//! `receipt-keys.json` (in the data dir, mode 0600) holds every key ever
//! used, oldest first, and which one signs:
//!
//! ```json
//! {"version":1,"active":"<kid>","keys":[
//!   {"kid":"<kid>","created":"…","x":"<public key, base64url>",
//!    "nonce":"<base64>","sealed":"<AES-256-GCM(seed), base64>"}]}
//! ```
//!
//! Each 32-byte private seed is sealed with AES-256-GCM under a
//! key-encryption key (KEK), with the kid as associated data so sealed blobs
//! cannot be swapped between entries. The public key is kept in clear so that
//! a decrypted seed can be checked against it.
//!
//! The KEK is derived (`secrets::derive`, HMAC-SHA-256, label
//! "receipt signing keys v1") from the operator's master key, the one the
//! rest of consentry uses: `CONSENTRY_MASTER_KEY` (hex) if set, otherwise
//! `master.key` in the data dir (mode 0600; the receipt module refuses one
//! that group or others can read), created by `secrets` on first run. A key
//! store found without any master key is an error, never a reason to make a
//! new master key. Keeping the master key in the environment (or on another
//! volume) is what makes the encryption worth having: with `master.key`
//! beside the store it protects copies of the store alone (backups), not the
//! whole data dir.
//!
//! Rotation adds a key and makes it the signing one; old keys stay in the
//! store and in the JWKS so that receipts signed with them still verify.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine;
use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use super::error::ReceiptError;
use super::jws::{self, Jwks};
use super::v08::ConsentReceipt;

pub use crate::secrets::{MASTER_KEY_ENV, MASTER_KEY_FILE};
pub const KEY_STORE_FILE: &str = "receipt-keys.json";

/// Label of the key-encryption key derived from the operator's master key
/// (`secrets::derive`), so the receipt keys share no key material with the
/// other uses of the master key.
const KEK_PURPOSE: &str = "receipt signing keys v1";
const AAD_PREFIX: &[u8] = b"consentry receipt signing key v1\0";

/// The key-encryption key of the receipt key store. `Debug` does not print
/// it.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A key-encryption key as it is (tests, or a caller with its own KEK).
    pub fn from_bytes(bytes: [u8; 32]) -> MasterKey {
        MasterKey(bytes)
    }

    /// The receipt KEK derived from the operator's master key.
    pub fn derive_from(master: &[u8; 32]) -> MasterKey {
        MasterKey(crate::secrets::derive(master, KEK_PURPOSE))
    }

    /// The operator's master key (`CONSENTRY_MASTER_KEY`, else `master.key`
    /// in `data_dir`, created on first run by `secrets`), turned into the
    /// receipt KEK. A `master.key` readable by group or others is refused.
    pub fn load_or_create(data_dir: &Path) -> Result<MasterKey, ReceiptError> {
        let file = data_dir.join(MASTER_KEY_FILE);
        if std::env::var_os(MASTER_KEY_ENV).is_none() && file.exists() {
            check_owner_only(&file)?;
        }
        let master = crate::secrets::master_key(data_dir)
            .map_err(|e| ReceiptError::MasterKey(format!("{e:#}")))?;
        Ok(MasterKey::derive_from(&master))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&self.0.into())
    }
}

#[cfg(unix)]
fn check_owner_only(path: &Path) -> Result<(), ReceiptError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| ReceiptError::io(format!("stat {}", path.display()), e))?
        .permissions()
        .mode();
    // A key others could read may already be compromised: refuse it rather
    // than keep signing with keys it protects.
    if mode & 0o077 != 0 {
        return Err(ReceiptError::MasterKey(format!(
            "{} is readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_owner_only(_: &Path) -> Result<(), ReceiptError> {
    Ok(())
}

fn owner_only(create_new: bool) -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.write(true);
    if create_new {
        o.create_new(true);
    } else {
        o.create(true).truncate(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o
}

fn fsync_dir(dir: &Path) -> Result<(), ReceiptError> {
    #[cfg(unix)]
    {
        let d = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(|e| ReceiptError::io(format!("fsync {}", d.display()), e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[derive(Serialize, Deserialize)]
struct StoreDoc {
    version: u32,
    active: String,
    keys: Vec<SealedKey>,
}

#[derive(Clone, Serialize, Deserialize)]
struct SealedKey {
    kid: String,
    created: DateTime<Utc>,
    x: String,
    nonce: String,
    sealed: String,
}

struct Key {
    kid: String,
    created: DateTime<Utc>,
    signing: SigningKey,
    sealed: Option<SealedKey>,
}

/// A receipt signed by [`ReceiptKeys::sign`]: the receipt as signed (with
/// `publicKey` set), the compact JWS to hand to the user, and the kid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedReceipt {
    pub receipt: ConsentReceipt,
    pub jws: String,
    pub kid: String,
}

/// The signing keys, oldest first; one is active.
pub struct ReceiptKeys {
    keys: Vec<Key>,
    active: usize,
    store: Option<(PathBuf, MasterKey)>,
}

impl fmt::Debug for ReceiptKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiptKeys")
            .field("kids", &self.kids())
            .field("active", &self.active_kid())
            .field("store", &self.store.as_ref().map(|(p, _)| p))
            .finish()
    }
}

fn new_key() -> Key {
    let signing = SigningKey::generate(&mut OsRng);
    Key {
        kid: jws::thumbprint(&signing.verifying_key()),
        created: Utc::now(),
        signing,
        sealed: None,
    }
}

impl ReceiptKeys {
    /// One fresh key, in memory only (tests, or an operator who wants no
    /// persistence).
    pub fn generate() -> ReceiptKeys {
        ReceiptKeys {
            keys: vec![new_key()],
            active: 0,
            store: None,
        }
    }

    /// Opens `receipt-keys.json` in `data_dir` with the KEK derived from the
    /// operator's master key (environment or `master.key`), creating the
    /// store, and the master key if there is none, on first run.
    pub fn open(data_dir: &Path) -> Result<ReceiptKeys, ReceiptError> {
        let path = data_dir.join(KEY_STORE_FILE);
        // A store without its master key must not be met with a fresh
        // master key: it could never decrypt the store, and other data
        // under the old one would be lost to the operator as well.
        if path.exists()
            && std::env::var_os(MASTER_KEY_ENV).is_none()
            && !data_dir.join(MASTER_KEY_FILE).exists()
        {
            return Err(ReceiptError::MasterKey(format!(
                "{} exists but there is no master key to decrypt it: set {MASTER_KEY_ENV} \
                 or restore {}",
                path.display(),
                data_dir.join(MASTER_KEY_FILE).display()
            )));
        }
        ReceiptKeys::open_with(&path, MasterKey::load_or_create(data_dir)?)
    }

    /// Opens the key store at `path`, or creates it with one new key.
    pub fn open_with(path: &Path, master: MasterKey) -> Result<ReceiptKeys, ReceiptError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(ReceiptError::io(format!("read {}", path.display()), e)),
        };
        let Some(text) = text else {
            let mut keys = ReceiptKeys {
                keys: vec![new_key()],
                active: 0,
                store: Some((path.to_path_buf(), master)),
            };
            keys.save()?;
            return Ok(keys);
        };
        let doc: StoreDoc = serde_json::from_str(&text)
            .map_err(|e| ReceiptError::store(path, format!("not a key store: {e}")))?;
        if doc.version != 1 {
            return Err(ReceiptError::store(
                path,
                format!("unsupported version {}", doc.version),
            ));
        }
        let cipher = master.cipher();
        let mut keys = Vec::with_capacity(doc.keys.len());
        for s in doc.keys {
            let signing = unseal(&cipher, &s, path)?;
            keys.push(Key {
                kid: s.kid.clone(),
                created: s.created,
                signing,
                sealed: Some(s),
            });
        }
        let active = keys
            .iter()
            .position(|k| k.kid == doc.active)
            .ok_or_else(|| {
                ReceiptError::store(
                    path,
                    format!("active key {:?} is not in the store", doc.active),
                )
            })?;
        Ok(ReceiptKeys {
            keys,
            active,
            store: Some((path.to_path_buf(), master)),
        })
    }

    /// Adds a new key and makes it the signing key; returns its kid. Persists
    /// when the keys came from a store. Fails, changing nothing, if the file
    /// holds other keys than these (someone else rotated meanwhile: reopen).
    pub fn rotate(&mut self) -> Result<String, ReceiptError> {
        if let Some((path, _)) = &self.store {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ReceiptError::io(format!("read {}", path.display()), e))?;
            let doc: StoreDoc = serde_json::from_str(&text)
                .map_err(|e| ReceiptError::store(path, format!("not a key store: {e}")))?;
            let on_disk: Vec<&str> = doc.keys.iter().map(|k| k.kid.as_str()).collect();
            if on_disk != self.kids() {
                return Err(ReceiptError::store(
                    path,
                    "changed on disk since it was opened (rotated elsewhere?); reopen it",
                ));
            }
        }
        let key = new_key();
        let kid = key.kid.clone();
        let previous = self.active;
        self.keys.push(key);
        self.active = self.keys.len() - 1;
        if let Err(e) = self.save() {
            self.keys.pop();
            self.active = previous;
            return Err(e);
        }
        Ok(kid)
    }

    pub fn active_kid(&self) -> &str {
        &self.keys[self.active].kid
    }

    /// Every kid, oldest first.
    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.kid.as_str()).collect()
    }

    /// When each key was made, oldest first.
    pub fn created(&self) -> Vec<(&str, DateTime<Utc>)> {
        self.keys
            .iter()
            .map(|k| (k.kid.as_str(), k.created))
            .collect()
    }

    /// Every public key, the signing one first, for `/.well-known/jwks.json`.
    pub fn jwks(&self) -> Jwks {
        let mut keys = vec![jws::jwk(&self.keys[self.active].signing.verifying_key())];
        keys.extend(
            self.keys
                .iter()
                .enumerate()
                .rev()
                .filter(|(i, _)| *i != self.active)
                .map(|(_, k)| jws::jwk(&k.signing.verifying_key())),
        );
        Jwks { keys }
    }

    /// Sets the receipt's `publicKey` to the signing key's JWK and signs it
    /// as a compact JWS.
    pub fn sign(&self, receipt: &ConsentReceipt) -> Result<SignedReceipt, ReceiptError> {
        let key = &self.keys[self.active];
        let mut receipt = receipt.clone();
        receipt.public_key = serde_json::to_string(&jws::jwk(&key.signing.verifying_key()))?;
        let payload = serde_json::to_vec(&receipt)?;
        let jws = jws::sign_compact(&key.signing, &key.kid, &payload)?;
        Ok(SignedReceipt {
            receipt,
            jws,
            kid: key.kid.clone(),
        })
    }

    /// Writes the store atomically (temporary file, fsync, rename).
    fn save(&mut self) -> Result<(), ReceiptError> {
        let Some((path, master)) = &self.store else {
            return Ok(());
        };
        let cipher = master.cipher();
        for k in &mut self.keys {
            if k.sealed.is_none() {
                k.sealed = Some(seal(&cipher, k)?);
            }
        }
        let doc = StoreDoc {
            version: 1,
            active: self.keys[self.active].kid.clone(),
            keys: self.keys.iter().filter_map(|k| k.sealed.clone()).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&doc)?;
        let tmp = path.with_extension("json.tmp");
        let mut f = owner_only(false)
            .open(&tmp)
            .map_err(|e| ReceiptError::io(format!("create {}", tmp.display()), e))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| ReceiptError::io(format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| ReceiptError::io(format!("rename to {}", path.display()), e))?;
        fsync_dir(path.parent().unwrap_or(Path::new(".")))
    }
}

fn aad(kid: &str) -> Vec<u8> {
    [AAD_PREFIX, kid.as_bytes()].concat()
}

fn seal(cipher: &Aes256Gcm, k: &Key) -> Result<SealedKey, ReceiptError> {
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let seed = k.signing.to_bytes();
    let sealed = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: &seed,
                aad: &aad(&k.kid),
            },
        )
        .map_err(|_| ReceiptError::MasterKey("AES-GCM encryption failed".into()))?;
    Ok(SealedKey {
        kid: k.kid.clone(),
        created: k.created,
        x: B64URL.encode(k.signing.verifying_key().as_bytes()),
        nonce: B64.encode(nonce),
        sealed: B64.encode(sealed),
    })
}

fn unseal(cipher: &Aes256Gcm, s: &SealedKey, path: &Path) -> Result<SigningKey, ReceiptError> {
    let bad = |why: &str| ReceiptError::store(path, format!("key {:?}: {why}", s.kid));
    let nonce = B64
        .decode(&s.nonce)
        .map_err(|_| bad("nonce is not base64"))?;
    if nonce.len() != 12 {
        return Err(bad("nonce is not 12 bytes"));
    }
    let sealed = B64
        .decode(&s.sealed)
        .map_err(|_| bad("sealed key is not base64"))?;
    let seed = cipher
        .decrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &sealed,
                aad: &aad(&s.kid),
            },
        )
        .map_err(|_| ReceiptError::WrongMasterKey {
            path: path.to_path_buf(),
            kid: s.kid.clone(),
        })?;
    let seed: [u8; 32] = seed.try_into().map_err(|_| bad("seed is not 32 bytes"))?;
    let signing = SigningKey::from_bytes(&seed);
    let x = B64URL.encode(signing.verifying_key().as_bytes());
    if x != s.x || jws::thumbprint(&signing.verifying_key()) != s.kid {
        return Err(bad("decrypted key does not match its public key or kid"));
    }
    Ok(signing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master() -> MasterKey {
        MasterKey::from_bytes([0x42; 32])
    }

    #[test]
    fn encrypted_at_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(KEY_STORE_FILE);
        let keys = ReceiptKeys::open_with(&path, master()).expect("create");
        let seed = keys.keys[0].signing.to_bytes();
        let file = std::fs::read(&path).expect("read");
        let text = String::from_utf8_lossy(&file);
        for needle in [
            hex::encode(seed),
            B64.encode(seed),
            B64URL.encode(seed),
            B64.encode(&seed[..24]),
        ] {
            assert!(!text.contains(&needle), "private key appears in the file");
        }
        assert!(!file.windows(32).any(|w| w == seed));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Reopening yields the same key.
        let again = ReceiptKeys::open_with(&path, master()).expect("reopen");
        assert_eq!(again.kids(), keys.kids());
        assert_eq!(again.keys[0].signing.to_bytes(), seed);
    }

    #[test]
    fn rotation_keeps_old_kids_in_jwks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(KEY_STORE_FILE);
        let mut keys = ReceiptKeys::open_with(&path, master()).expect("create");
        let first = keys.active_kid().to_string();
        let second = keys.rotate().expect("rotate");
        assert_ne!(first, second);
        assert_eq!(keys.active_kid(), second);
        let reopened = ReceiptKeys::open_with(&path, master()).expect("reopen");
        assert_eq!(reopened.active_kid(), second);
        let jwks: Vec<_> = reopened
            .jwks()
            .keys
            .into_iter()
            .filter_map(|k| k.kid)
            .collect();
        assert_eq!(jwks, vec![second.clone(), first.clone()]);

        // A stale handle may not rotate over a newer store.
        let mut stale = ReceiptKeys::open_with(&path, master()).expect("reopen");
        keys.rotate().expect("rotate again");
        assert!(matches!(stale.rotate(), Err(ReceiptError::KeyStore { .. })));
        assert_eq!(stale.kids().len(), 2, "failed rotation changes nothing");
    }

    #[test]
    fn wrong_master_key_fails_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(KEY_STORE_FILE);
        ReceiptKeys::open_with(&path, master()).expect("create");
        let err = ReceiptKeys::open_with(&path, MasterKey::from_bytes([0x43; 32]))
            .expect_err("must fail");
        assert!(matches!(err, ReceiptError::WrongMasterKey { .. }));
        assert!(err.to_string().contains("wrong master key"), "{err}");
    }

    #[test]
    fn swapped_sealed_blobs_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(KEY_STORE_FILE);
        let mut keys = ReceiptKeys::open_with(&path, master()).expect("create");
        keys.rotate().expect("rotate");
        let mut doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        let a = doc["keys"][0]["sealed"].clone();
        doc["keys"][0]["sealed"] = doc["keys"][1]["sealed"].clone();
        doc["keys"][1]["sealed"] = a;
        let a = doc["keys"][0]["nonce"].clone();
        doc["keys"][0]["nonce"] = doc["keys"][1]["nonce"].clone();
        doc["keys"][1]["nonce"] = a;
        std::fs::write(&path, serde_json::to_vec(&doc).expect("ser")).expect("write");
        assert!(ReceiptKeys::open_with(&path, master()).is_err());
    }

    #[test]
    fn kek_is_derived_not_the_master_key() {
        let m = [7u8; 32];
        let kek = MasterKey::derive_from(&m);
        assert_ne!(kek.0, m);
        assert_eq!(kek.0, MasterKey::derive_from(&m).0);
        assert_eq!(format!("{kek:?}"), "MasterKey(..)");
    }

    // The environment is process-wide: only this test touches it, and only
    // to check that it is absent before relying on the file.
    #[test]
    fn first_run_creates_master_key_file() {
        if std::env::var_os(MASTER_KEY_ENV).is_some() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = ReceiptKeys::open(dir.path()).expect("first run");
        let mk = dir.path().join(MASTER_KEY_FILE);
        assert!(mk.exists());
        let again = ReceiptKeys::open(dir.path()).expect("second run");
        assert_eq!(again.kids(), keys.kids());

        // Another master key in master.key: a clear error.
        let original = std::fs::read(&mk).expect("read");
        std::fs::remove_file(&mk).expect("rm");
        crate::secrets::write_private(&mk, &[0x99; 32]).expect("write");
        let err = ReceiptKeys::open(dir.path()).expect_err("must fail");
        assert!(matches!(err, ReceiptError::WrongMasterKey { .. }), "{err}");
        std::fs::remove_file(&mk).expect("rm");
        crate::secrets::write_private(&mk, &original).expect("write");
        ReceiptKeys::open(dir.path()).expect("right key again");

        // Store without its master key: a clear error, no new master key.
        std::fs::remove_file(&mk).expect("rm");
        let err = ReceiptKeys::open(dir.path()).expect_err("must fail");
        assert!(err.to_string().contains("no master key"), "{err}");
        assert!(!mk.exists());

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(&mk, [1u8; 32]).expect("write");
            std::fs::set_permissions(&mk, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let err = ReceiptKeys::open(dir.path()).expect_err("must fail");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
    }
}

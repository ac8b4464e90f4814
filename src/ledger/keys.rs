//! Key material: AES-256-GCM data keys (one active, older ones kept for reading), the HMAC key
//! of the blind index and the Ed25519 checkpoint signing key.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use aes_gcm::{Aes256Gcm, KeyInit};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chrono::{DateTime, Utc};
use ed25519_dalek::{SigningKey, VerifyingKey};
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::error::LedgerError;

/// Environment variable that may carry the key document instead of a file.
pub const KEYS_ENV: &str = "CONSENTRY_LEDGER_KEYS";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyId(pub u32);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Serialize, Deserialize)]
struct KeyDoc {
    version: u32,
    active: u32,
    data_keys: Vec<DataKeyDoc>,
    blind_key: String,
    signing_key: String,
}

#[derive(Serialize, Deserialize)]
struct DataKeyDoc {
    id: u32,
    key: String,
    created: DateTime<Utc>,
}

/// Where a keyring came from, so that an error about keys that do not fit a ledger can say
/// which file (or variable) to look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// [`Keyring::generate`]: in memory only.
    Generated,
    /// [`KEYS_ENV`].
    Env,
    /// A key file; `created` when this process has just created it because it did not exist.
    File { path: PathBuf, created: bool },
}

/// The ledger's secrets. `Debug` never prints them.
#[derive(Clone)]
pub struct Keyring {
    origin: Origin,
    active: KeyId,
    ciphers: BTreeMap<u32, Aes256Gcm>,
    // Pre-keyed so each blind-index computation skips the HMAC key schedule.
    blind: Hmac<Sha256>,
    signing: SigningKey,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("origin", &self.origin)
            .field("active", &self.active)
            .field("data_key_ids", &self.ciphers.keys().collect::<Vec<_>>())
            .field(
                "verifying_key",
                &hex::encode(self.verifying_key().as_bytes()),
            )
            .finish_non_exhaustive()
    }
}

fn random32() -> [u8; 32] {
    let mut k = [0u8; 32];
    OsRng.fill_bytes(&mut k);
    k
}

fn decode32(what: &str, s: &str) -> Result<[u8; 32], LedgerError> {
    let v = B64
        .decode(s.trim())
        .map_err(|_| LedgerError::KeyFile(format!("{what} is not valid base64")))?;
    v.try_into()
        .map_err(|_| LedgerError::KeyFile(format!("{what} must be 32 bytes")))
}

impl KeyDoc {
    fn generate() -> KeyDoc {
        KeyDoc {
            version: 1,
            active: 1,
            data_keys: vec![DataKeyDoc {
                id: 1,
                key: B64.encode(random32()),
                created: Utc::now(),
            }],
            blind_key: B64.encode(random32()),
            signing_key: B64.encode(random32()),
        }
    }

    fn keyring(&self, origin: Origin) -> Result<Keyring, LedgerError> {
        if self.version != 1 {
            return Err(LedgerError::KeyFile(format!(
                "unsupported key document version {}",
                self.version
            )));
        }
        let mut ciphers = BTreeMap::new();
        for k in &self.data_keys {
            let raw = decode32("data key", &k.key)?;
            let cipher = Aes256Gcm::new_from_slice(&raw)
                .map_err(|_| LedgerError::KeyFile("bad data key length".into()))?;
            if ciphers.insert(k.id, cipher).is_some() {
                return Err(LedgerError::KeyFile(format!(
                    "duplicate data key id {}",
                    k.id
                )));
            }
        }
        if !ciphers.contains_key(&self.active) {
            return Err(LedgerError::KeyFile(format!(
                "active data key {} is not in the key list",
                self.active
            )));
        }
        let blind = <Hmac<Sha256> as Mac>::new_from_slice(&decode32("blind key", &self.blind_key)?)
            .map_err(|_| LedgerError::KeyFile("bad blind key".into()))?;
        let signing = SigningKey::from_bytes(&decode32("signing key", &self.signing_key)?);
        Ok(Keyring {
            origin,
            active: KeyId(self.active),
            ciphers,
            blind,
            signing,
        })
    }

    /// Parses the document `source` (a key file, or [`KEYS_ENV`]) holds. Errors name it: an
    /// operator may hold several copies, and "not valid JSON" alone says not which to look at.
    fn parse(text: &str, source: &str) -> Result<KeyDoc, LedgerError> {
        serde_json::from_str(text).map_err(|e| {
            LedgerError::KeyFile(format!(
                "{source} is not a valid key document, not valid JSON ({e}): was it cut short \
                 or edited? Restore it from a backup"
            ))
        })
    }

    /// [`KeyDoc::keyring`], its errors naming `source`.
    fn keyring_from(&self, origin: Origin, source: &str) -> Result<Keyring, LedgerError> {
        self.keyring(origin).map_err(|e| match e {
            LedgerError::KeyFile(why) => LedgerError::KeyFile(format!("{source}: {why}")),
            other => other,
        })
    }
}

/// Parses a key file's text into a keyring.
fn keyring_in_file(text: &str, path: &Path, created: bool) -> Result<Keyring, LedgerError> {
    let source = path.display().to_string();
    KeyDoc::parse(text, &source)?.keyring_from(file_origin(path, created), &source)
}

fn read_key_file(path: &Path) -> Result<Option<String>, LedgerError> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LedgerError::io(format!("open {}", path.display()), e)),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = f
            .metadata()
            .map_err(|e| LedgerError::io(format!("stat {}", path.display()), e))?
            .permissions()
            .mode();
        // Refuse keys others could have read: they may already be compromised.
        if mode & 0o077 != 0 {
            return Err(LedgerError::InsecureKeyFile {
                path: path.display().to_string(),
                mode: mode & 0o777,
            });
        }
    }
    let mut s = String::new();
    f.read_to_string(&mut s)
        .map_err(|e| LedgerError::io(format!("read {}", path.display()), e))?;
    Ok(Some(s))
}

fn file_origin(path: &Path, created: bool) -> Origin {
    Origin::File {
        path: path.to_path_buf(),
        created,
    }
}

impl Keyring {
    /// Generates a fresh keyring in memory (nothing is written).
    pub fn generate() -> Result<Keyring, LedgerError> {
        KeyDoc::generate().keyring(Origin::Generated)
    }

    /// Loads the key file; a missing file is an error (for commands that read an existing
    /// ledger, where new keys could only mean the wrong directory).
    pub fn load(path: &Path) -> Result<Keyring, LedgerError> {
        match read_key_file(path)? {
            Some(text) => keyring_in_file(&text, path, false),
            None => Err(LedgerError::KeyFile(format!(
                "{} does not exist (and {KEYS_ENV} is not set)",
                path.display()
            ))),
        }
    }

    /// Loads the key file, or creates it (mode 0600) with fresh keys if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Keyring, LedgerError> {
        if let Some(text) = read_key_file(path)? {
            return keyring_in_file(&text, path, false);
        }
        let doc = KeyDoc::generate();
        let bytes = serde_json::to_vec_pretty(&doc)?;
        // Never a key file that exists but is empty or cut short (a full disk, a crash): every
        // later start would refuse it.
        match crate::secrets::publish_private(path, &bytes, false) {
            Ok(()) => doc.keyring(file_origin(path, true)),
            // Someone else created it first: use theirs, never overwrite keys.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = read_key_file(path)?.ok_or_else(|| {
                    LedgerError::KeyFile(format!("{} vanished while being created", path.display()))
                })?;
                keyring_in_file(&text, path, false)
            }
            Err(e) => Err(LedgerError::io(format!("create {}", path.display()), e)),
        }
    }

    /// Reads the key document from `CONSENTRY_LEDGER_KEYS`, if set.
    pub fn from_env() -> Result<Option<Keyring>, LedgerError> {
        match std::env::var(KEYS_ENV) {
            Ok(s) => Ok(Some(
                KeyDoc::parse(&s, KEYS_ENV)?.keyring_from(Origin::Env, KEYS_ENV)?,
            )),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(LedgerError::KeyFile(format!(
                "{KEYS_ENV} is not valid UTF-8"
            ))),
        }
    }

    /// Adds a new data key to the file and makes it active. Old keys stay so old records remain
    /// readable. A running ledger keeps its keys; the new key is used from the next open.
    pub fn rotate(path: &Path) -> Result<KeyId, LedgerError> {
        let text = read_key_file(path)?
            .ok_or_else(|| LedgerError::KeyFile(format!("{} does not exist", path.display())))?;
        let source = path.display().to_string();
        let mut doc = KeyDoc::parse(&text, &source)?;
        doc.keyring_from(Origin::Generated, &source)?;
        let id = doc
            .data_keys
            .iter()
            .map(|k| k.id)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| LedgerError::KeyFile("data key ids exhausted".into()))?;
        doc.data_keys.push(DataKeyDoc {
            id,
            key: B64.encode(random32()),
            created: Utc::now(),
        });
        doc.active = id;
        // Validate before replacing the file so a bad document never lands on disk.
        doc.keyring(Origin::Generated)?;
        let bytes = serde_json::to_vec_pretty(&doc)?;
        crate::secrets::publish_private(path, &bytes, true)
            .map_err(|e| LedgerError::io(format!("replace key file {}", path.display()), e))?;
        Ok(KeyId(id))
    }

    /// Serialises a keyring document for `CONSENTRY_LEDGER_KEYS` from an existing key file.
    pub fn export_env_document(path: &Path) -> Result<String, LedgerError> {
        let text = read_key_file(path)?
            .ok_or_else(|| LedgerError::KeyFile(format!("{} does not exist", path.display())))?;
        let source = path.display().to_string();
        let doc = KeyDoc::parse(&text, &source)?;
        doc.keyring_from(Origin::Generated, &source)?;
        Ok(serde_json::to_string(&doc)?)
    }

    pub(crate) fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Names where these keys came from, for an error message.
    pub(crate) fn source_name(&self) -> String {
        match &self.origin {
            Origin::Generated => "the keys given".to_owned(),
            Origin::Env => format!("the keys in {KEYS_ENV}"),
            Origin::File { path, .. } => format!("the key file {}", path.display()),
        }
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    pub fn active_key_id(&self) -> KeyId {
        self.active
    }

    pub(crate) fn cipher(&self, id: u32) -> Option<&Aes256Gcm> {
        self.ciphers.get(&id)
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// HMAC-SHA256 of the user id: lets the ledger find a user's records without storing the id.
    pub fn blind_index(&self, user: &str) -> [u8; 32] {
        let mut mac = self.blind.clone();
        mac.update(user.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

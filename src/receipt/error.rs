//! The one error type of the receipt module.

use std::path::PathBuf;

/// Everything that can go wrong building, signing, storing keys for or
/// verifying a consent receipt. Verification failures name the check that
/// failed (`Malformed`, `Signature`, `Schema`, `Incomplete`) so the CLI can
/// tell the user *which* part of a receipt is not to be trusted.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    /// The operator's description lacks a field Mode 1 makes mandatory.
    #[error("the operator's receipt details are incomplete: {0} must not be empty")]
    OperatorIncomplete(&'static str),
    #[error("preferences belong to user {prefs:?}, not to {user:?}")]
    UserMismatch { user: String, prefs: String },
    #[error("a share grant names provider {0:?}, which is not in the directory")]
    UnknownProvider(String),
    #[error(
        "a share grant names purpose {purpose:?}, which provider {provider:?} does not declare"
    )]
    UnknownPurpose { provider: String, purpose: String },
    #[error("a grant names kind {0:?}, which is not a declared kind")]
    UnknownKind(String),

    /// Verification: the input is not a compact JWS we can read.
    #[error("not a readable compact JWS: {0}")]
    Malformed(String),
    /// Verification: the signature does not hold against the JWKS.
    #[error("signature check failed: {0}")]
    Signature(String),
    /// Verification: the signed payload does not validate against the
    /// Kantara v0.8 JSON schema (each entry: instance path and reason).
    #[error("payload does not validate against the Kantara v0.8 schema: {}", .0.join("; "))]
    Schema(Vec<String>),
    /// Verification: valid against the (permissive) schema, but a field the
    /// v0.8 text requires is missing or inconsistent.
    #[error("payload is not a complete v0.8 consent receipt: {0}")]
    Incomplete(String),

    #[error("master key: {0}")]
    MasterKey(String),
    /// AES-GCM refused to decrypt: the master key is not the one the key
    /// store was written with (or the file was tampered with).
    #[error(
        "cannot decrypt receipt signing key {kid:?} in {}: wrong master key \
         (CONSENTRY_MASTER_KEY or master.key) or a tampered key file",
        path.display()
    )]
    WrongMasterKey { path: PathBuf, kid: String },
    #[error("receipt key store {}: {reason}", path.display())]
    KeyStore { path: PathBuf, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl ReceiptError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        ReceiptError::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn store(path: &std::path::Path, reason: impl Into<String>) -> Self {
        ReceiptError::KeyStore {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

use std::fmt;

/// How a ledger failed verification. Reported together with the first bad sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TamperKind {
    /// The record's bytes were changed (AEAD tag or hash chain no longer matches).
    Modified,
    /// A record is missing from the chain (gap in sequence numbers).
    Removed,
    /// A record appears out of order.
    Reordered,
    /// The chain ends before a signed checkpoint says it should, or ends in a partial record.
    Truncated,
    /// A checkpoint's head hash differs from the hash the chain produces at that sequence.
    CheckpointMismatch,
    /// A checkpoint is malformed or its Ed25519 signature does not verify.
    CheckpointInvalid,
}

impl fmt::Display for TamperKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            TamperKind::Modified => "modified",
            TamperKind::Removed => "removed",
            TamperKind::Reordered => "reordered",
            TamperKind::Truncated => "truncated",
            TamperKind::CheckpointMismatch => "checkpoint mismatch",
            TamperKind::CheckpointInvalid => "checkpoint invalid",
        };
        f.write_str(s)
    }
}

/// Every error the ledger module produces.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    // The OS error is in the message and deliberately not also the `source()`: printed with its
    // chain (`{:#}`, as anyhow does), it would otherwise appear twice.
    #[error("ledger I/O error ({context}): {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
    #[error("ledger encoding error: {0}")]
    Encoding(#[from] serde_json::Error),
    #[error("invalid key material: {0}")]
    KeyFile(String),
    /// The keys given are not the ones this ledger was written with (or there were none).
    #[error("{0}")]
    WrongKeys(String),
    #[error("key file {path} is readable by others (mode {mode:o}); it must be owner-only (0600)")]
    InsecureKeyFile { path: String, mode: u32 },
    #[error("record uses data key {0}, which is not in the keyring")]
    UnknownKey(u32),
    #[error("data key {0} has reached its encryption limit; rotate the keyring")]
    KeyExhausted(u32),
    #[error("encryption failure")]
    Crypto,
    #[error("invalid ledger configuration: {0}")]
    Config(String),
    #[error("ledger is unhealthy and refuses writes: {0}")]
    Unhealthy(String),
    #[error("ledger is shut down")]
    Closed,
    #[error("ledger queue is full")]
    Overloaded,
    #[error("ledger {0} is in use by another process (a running consentry?)")]
    Locked(String),
    #[error("ledger verification failed at seq {seq}: {kind} ({detail})")]
    Tampered {
        seq: u64,
        kind: TamperKind,
        detail: String,
    },
}

impl LedgerError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        LedgerError::Io {
            context: context.into(),
            error: source,
        }
    }

    pub(crate) fn tampered(seq: u64, kind: TamperKind, detail: impl Into<String>) -> Self {
        LedgerError::Tampered {
            seq,
            kind,
            detail: detail.into(),
        }
    }
}

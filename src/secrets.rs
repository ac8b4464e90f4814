//! Secrets generated on first run and kept in the data directory with
//! owner-only permissions, or supplied by the environment (hex), so that a
//! deployment can hold them in a secret manager instead of on disk.

use std::path::Path;

use anyhow::Context;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

pub const MASTER_KEY_ENV: &str = "CONSENTRY_MASTER_KEY";
pub const MASTER_KEY_FILE: &str = "master.key";

/// 32 random bytes kept in `path` (mode 0600), or taken from `env` as hex.
pub fn load_or_create(path: &Path, env: &str) -> anyhow::Result<[u8; 32]> {
    if let Ok(hex_key) = std::env::var(env) {
        let bytes = hex::decode(hex_key.trim()).with_context(|| format!("{env} is not hex"))?;
        return bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("{env} must hold 32 bytes"));
    }
    if let Ok(bytes) = std::fs::read(path) {
        return bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("{} must hold 32 bytes", path.display()));
    }
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    write_private(path, &key)?;
    Ok(key)
}

pub const PSEUDONYM_KEY_ENV: &str = "CONSENTRY_PSEUDONYM_KEY";
pub const PSEUDONYM_KEY_FILE: &str = "pseudonym.key";

/// The key every provider's pseudonyms are derived from (see [`load_or_create`]).
///
/// Pseudonyms reach providers only in deliveries, and each delivery is recorded in the share
/// ledger first: `ledger_head`, the ledger's last sequence number (`ledger_dir` its directory),
/// above 0 means some may be in providers' hands (and stays above 0 once retention purged
/// them). A missing key file is then not a first start but a lost key, and a new one would
/// give every user a new pseudonym at every provider without a word: refused, as a missing
/// master key is beside the data it decrypts.
pub fn pseudonym_key(
    data_dir: &Path,
    ledger_head: u64,
    ledger_dir: &Path,
) -> anyhow::Result<[u8; 32]> {
    let path = data_dir.join(PSEUDONYM_KEY_FILE);
    if ledger_head > 0 && std::env::var_os(PSEUDONYM_KEY_ENV).is_none() && !path.exists() {
        anyhow::bail!(
            "{} is missing, but the share ledger in {} has records up to seq {ledger_head}: \
             deliveries may have carried pseudonyms derived from that key to providers. A new \
             key would give every user a new pseudonym at every provider, who could no longer \
             link them to what they received before. Restore {} (or set {PSEUDONYM_KEY_ENV}) \
             from a backup; if it is lost for good, create a new one on purpose (`head -c 32 \
             /dev/urandom > {}`, mode 0600) and tell the providers their pseudonyms changed",
            path.display(),
            ledger_dir.display(),
            path.display(),
            path.display(),
        );
    }
    load_or_create(&path, PSEUDONYM_KEY_ENV)
}

/// The operator's master key; purpose keys are derived from it.
pub fn master_key(data_dir: &Path) -> anyhow::Result<[u8; 32]> {
    load_or_create(&data_dir.join(MASTER_KEY_FILE), MASTER_KEY_ENV)
}

/// A key for one purpose, so that no two uses share key material.
pub fn derive(master: &[u8; 32], purpose: &str) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(master).expect("HMAC takes any key size");
    mac.update(b"consentry key derivation v1\0");
    mac.update(purpose.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Creates the directory `dir` owner-only (0700) if it does not exist;
/// missing parents are created as `create_dir_all` would. A directory that
/// already exists keeps its mode: the operator chose it (a group that makes
/// backups, say), and what consentry writes in it is owner-only anyway.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    match builder.create(dir) {
        // Created meanwhile by someone else: theirs, as above.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        r => r,
    }
}

/// Creates `path` with mode 0600 holding `bytes`; never overwrites. Either
/// the whole file appears or none does (see [`publish_private`]).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    publish_private(path, bytes, false).with_context(|| format!("create {}", path.display()))
}

/// Writes `bytes` to `path`, owner-only (0600), so that `path` never exists
/// short of them: a key file created empty or cut off by a full disk or a
/// crash is not a missing one, and every later start would refuse it.
///
/// The bytes go to a temporary file in the same directory (0600 from its
/// creation), which is fsynced and then put in place: hard-linked when
/// `replace` is false, which fails with `AlreadyExists` instead of
/// overwriting what someone else created meanwhile, renamed when it is true.
/// The directory is fsynced so the new name survives a crash. On any error
/// the temporary file is removed.
pub(crate) fn publish_private(path: &Path, bytes: &[u8], replace: bool) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name")
    })?;
    remove_stale_temps(dir, &name.to_string_lossy());
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:08x}",
        name.to_string_lossy(),
        std::process::id(),
        rand::random::<u32>()
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    // Not inside the cleanup below: if this fails, the name may be someone else's file.
    let mut f = opts.open(&tmp)?;
    let result = (|| {
        #[cfg(test)]
        if let Some(room) = DISK_ROOM.with(|r| r.take()) {
            f.write_all(&bytes[..room.min(bytes.len())])?;
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        if replace {
            std::fs::rename(&tmp, path)?;
        } else {
            match std::fs::hard_link(&tmp, path) {
                Ok(()) => {}
                // A file system without hard links (vfat, some network ones): rename, which
                // would overwrite a file created between this check and the rename.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Unsupported | std::io::ErrorKind::PermissionDenied
                    ) && !path.exists() =>
                {
                    std::fs::rename(&tmp, path)?
                }
                Err(e) => return Err(e),
            }
            // `path` is complete and in place; a leftover second name for it is only clutter.
            let _ = std::fs::remove_file(&tmp);
        }
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes the temporary files of [`publish_private`] for `name` that a
/// process killed mid-write left behind: they hold key material. A
/// temporary file of a process still running is its own, and is kept.
fn remove_stale_temps(dir: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_exists(pid) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(
                    file = %entry.path().display(),
                    "removed a temporary key file an interrupted write left"
                ),
                Err(e) => tracing::warn!(
                    file = %entry.path().display(),
                    error = %e,
                    "could not remove a temporary key file an interrupted write left"
                ),
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn process_exists(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Without /proc, every other process's temporary file is taken as live.
#[cfg(not(target_os = "linux"))]
fn process_exists(_pid: u32) -> bool {
    true
}

#[cfg(test)]
thread_local! {
    /// Test hook: the next [`publish_private`] on this thread finds room for this many bytes,
    /// then fails as a full disk does.
    pub(crate) static DISK_ROOM: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// A new or renamed directory entry is only durable once its directory is fsynced.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_owner_only_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let a = load_or_create(&p, "CONSENTRY_TEST_UNSET_KEY").unwrap();
        let b = load_or_create(&p, "CONSENTRY_TEST_UNSET_KEY").unwrap();
        assert_eq!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0);
        }
        assert_ne!(derive(&a, "store"), derive(&a, "pseudonym"));
    }

    /// The bug this guards: a lost `pseudonym.key` beside a ledger with records was replaced by
    /// a new key at start, and every provider's pseudonyms changed without a word.
    #[test]
    fn a_lost_pseudonym_key_is_refused_once_pseudonyms_were_shared() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("ledger");
        // First start: nothing shared yet, the key is created.
        let a = pseudonym_key(dir.path(), 0, &ledger).unwrap();
        assert_eq!(pseudonym_key(dir.path(), 5, &ledger).unwrap(), a);
        std::fs::remove_file(dir.path().join(PSEUDONYM_KEY_FILE)).unwrap();
        let err = format!("{:#}", pseudonym_key(dir.path(), 5, &ledger).unwrap_err());
        for part in [
            &dir.path().join(PSEUDONYM_KEY_FILE).display().to_string(),
            &ledger.display().to_string(),
            "records up to seq 5",
            "new pseudonym at every provider",
            PSEUDONYM_KEY_ENV,
        ] {
            assert!(err.contains(part), "{part:?} not in {err}");
        }
        assert!(!dir.path().join(PSEUDONYM_KEY_FILE).exists(), "{err}");
        // Nothing shared yet (a first start that failed before the key was written): created.
        assert_ne!(pseudonym_key(dir.path(), 0, &ledger).unwrap(), a);
    }

    #[cfg(unix)]
    #[test]
    fn new_directories_are_owner_only_and_existing_ones_keep_their_mode() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let tmp = tempfile::tempdir().unwrap();
        let new = tmp.path().join("a/b/data");
        create_private_dir(&new).unwrap();
        assert_eq!(mode(&new), 0o700);
        create_private_dir(&new).unwrap();

        let theirs = tmp.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o750)).unwrap();
        create_private_dir(&theirs).unwrap();
        write_private(&theirs.join("k"), b"x").unwrap();
        assert_eq!(mode(&theirs), 0o750);
        assert_eq!(mode(&theirs.join("k")), 0o600);
    }

    /// A full disk at first start left an empty key file that every later start refused
    /// ("must hold 32 bytes"); now it leaves nothing, and the next start creates the key.
    #[test]
    fn a_full_disk_leaves_no_key_file_and_the_next_start_creates_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("master.key");
        for room in [0, 7] {
            DISK_ROOM.with(|r| r.set(Some(room)));
            let err = load_or_create(&p, "CONSENTRY_TEST_UNSET_KEY").expect_err("disk full");
            assert!(format!("{err:#}").contains("No space left"), "{err:#}");
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert!(left.is_empty(), "left behind: {left:?}");
        }
        let a = load_or_create(&p, "CONSENTRY_TEST_UNSET_KEY").expect("room again");
        assert_eq!(a, load_or_create(&p, "CONSENTRY_TEST_UNSET_KEY").unwrap());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    /// `keys rotate` killed between writing its temporary file and renaming
    /// it left a copy of the key file beside it for good.
    #[cfg(target_os = "linux")]
    #[test]
    fn temporary_key_files_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ledger-keys.json");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = dir
            .path()
            .join(format!(".ledger-keys.json.tmp-{dead}-0badc0de"));
        let live = dir.path().join(format!(
            ".ledger-keys.json.tmp-{}-0badc0de",
            std::process::id()
        ));
        let other = dir.path().join(format!(".master.key.tmp-{dead}-0badc0de"));
        for f in [&stale, &live, &other] {
            std::fs::write(f, b"old keys").unwrap();
        }
        publish_private(&p, b"new keys", true).unwrap();
        assert!(!stale.exists(), "a dead process's temporary file stayed");
        assert!(
            live.exists(),
            "a running process's temporary file was removed"
        );
        assert!(other.exists(), "another file's temporary file was removed");
        assert_eq!(std::fs::read(&p).unwrap(), b"new keys");
    }

    #[test]
    fn write_private_never_overwrites_and_replace_does() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_private(&p, b"first").unwrap();
        let err = write_private(&p, b"second").expect_err("exists");
        assert_eq!(
            err.downcast_ref::<std::io::Error>().map(|e| e.kind()),
            Some(std::io::ErrorKind::AlreadyExists)
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        publish_private(&p, b"third", true).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"third");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
    }
}

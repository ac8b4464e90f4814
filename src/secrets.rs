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

/// Creates `path` with mode 0600 and writes `bytes`; never overwrites.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        create_private_dir(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
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
}

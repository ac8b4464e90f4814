//! End to end: what an operator meets running consentry — the modes of the
//! files it creates, the metrics it serves, and `consentry check` agreeing
//! with `consentry serve`.

mod common;

use common::Server;

#[cfg(unix)]
#[tokio::test]
async fn a_fresh_data_directory_and_its_database_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::demo();
    let data = server.data_dir();
    let mode = |name: &str| {
        let p = data.join(name);
        let m = std::fs::metadata(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode();
        m & 0o777
    };
    assert_eq!(mode(""), 0o700, "data directory");
    // The WAL and shared-memory files exist while the store is open.
    for f in [
        "consentry.db",
        "consentry.db-wal",
        "consentry.db-shm",
        "master.key",
        "operator.key",
        "pseudonym.key",
        "ledger-keys.json",
        "receipt-keys.json",
    ] {
        assert_eq!(mode(f), 0o600, "{f}");
    }
}

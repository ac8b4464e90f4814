//! End to end: what an operator meets running consentry — the modes of the
//! files it creates, the metrics it serves, and `consentry check` agreeing
//! with `consentry serve`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{v4, Server};

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

/// The metric names the README's Operating section lists.
fn readme_metrics() -> Vec<String> {
    let readme = include_str!("../README.md");
    let start = readme
        .find("- Prometheus metrics on")
        .expect("README lists the metrics");
    let section = &readme[start..];
    let end = section[2..].find("\n- ").map_or(section.len(), |e| e + 2);
    let mut names: Vec<String> = section[..end]
        .split('`')
        .filter(|w| {
            w.starts_with("consentry_") && w.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .map(String::from)
        .collect();
    names.sort();
    names.dedup();
    names
}

fn exported(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn every_metric_the_readme_lists_is_described_and_exported_from_the_start() {
    let server = Server::demo();
    let text = server.metrics_text();
    let listed = readme_metrics();
    assert!(listed.len() >= 15, "README lists {listed:?}");
    for name in &listed {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP line:\n{text}"
        );
        let sample = text.lines().any(|l| {
            !l.starts_with('#')
                && [name.clone(), format!("{name}_count")]
                    .iter()
                    .any(|n| l.starts_with(&format!("{n} ")) || l.starts_with(&format!("{n}{{")))
        });
        assert!(sample, "{name} has no sample at start:\n{text}");
    }
    // And the README lists everything exported.
    assert_eq!(exported(&text), listed);
}

#[tokio::test]
async fn deliveries_to_a_device_carry_its_role_and_no_provider_id() {
    let server = Server::demo();
    let mut dev = v4::connect(server.mqtt, "d", "alice-watch", "alice-watch-secret").await;
    dev.subscribe("public/#", v4::QoS::AtMostOnce).await;
    let mut fit = v4::connect(server.mqtt, "f", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("public/#", v4::QoS::AtMostOnce).await;
    dev.client
        .publish("public/x", v4::QoS::AtMostOnce, false, "x")
        .await
        .unwrap();
    assert_eq!(dev.next_publish().await.topic, "public/x");
    assert_eq!(fit.next_publish().await.topic, "public/x");
    // A delivery is counted once written, which a client can see first.
    for role in ["device", "provider"] {
        server
            .wait_for_metric(
                "consentry_deliveries_total",
                &[("role", role), ("result", "delivered")],
                1.0,
            )
            .await;
    }
    let text = server.metrics_text();
    let deliveries: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("consentry_deliveries_total{"))
        .collect();
    let device = deliveries
        .iter()
        .find(|l| l.contains("role=\"device\"") && l.ends_with(" 1"))
        .unwrap_or_else(|| panic!("no device delivery counted: {deliveries:#?}"));
    assert!(!device.contains("provider="), "{device}");
    assert!(
        deliveries.iter().any(|l| l.contains("role=\"provider\"")
            && l.contains("provider=\"fitcoach\"")
            && l.ends_with(" 1")),
        "{deliveries:#?}"
    );
    // Labels name roles, results, reasons and providers: never a user,
    // a device or a topic.
    for needle in ["alice", "public/", "pii/"] {
        assert!(!text.contains(needle), "{needle} in metrics:\n{text}");
    }
}

/// A configuration as the tests' servers get it, in a folder of its own,
/// with `replace` applied to the shipped file's text.
fn write_config(replace: &[(&str, &str)], directory: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let directory_path = dir.path().join("directory.toml");
    std::fs::write(&directory_path, directory).unwrap();
    let mut text = common::SHIPPED_CONFIG.replace(
        "directory = \"demo.toml\"",
        &format!("directory = {:?}", directory_path.display().to_string()),
    );
    for (from, to) in replace {
        assert!(text.contains(from), "config has no {from:?}");
        text = text.replace(from, to);
    }
    let config = dir.path().join("consentry.toml");
    std::fs::write(&config, text).unwrap();
    (dir, config)
}

fn run(config: &Path, args: &[&str], data_dir: &Path) -> (bool, String, String) {
    let out = Command::new(common::bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .env("CONSENTRY_DATA_DIR", data_dir)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_reports_what_the_configuration_holds() {
    let (dir, config) = write_config(&[], common::DEMO_DIRECTORY);
    let data = dir.path().join("data");
    let (ok, out, err) = run(&config, &["check"], &data);
    assert!(ok, "{err}");
    assert!(
        out.contains("configuration OK: 1 topic template, 3 kinds, 0 ACL rules")
            && out.contains("2 users, 2 devices, 2 providers, preferences of 2 users"),
        "{out}"
    );
    assert!(!out.contains("ACT version"), "{out}");
    assert!(!data.exists(), "check touched the data directory");
}

#[test]
fn check_refuses_what_serve_refuses_and_serve_refuses_before_touching_the_store() {
    for (from, to, key) in [
        (
            "checkpoint_every = 10000",
            "checkpoint_every = 0",
            "ledger.checkpoint_every",
        ),
        (
            "login_attempts = 5",
            "login_attempts = 0",
            "api.login_attempts",
        ),
        (
            "session_ttl_secs = 3600",
            "session_ttl_secs = 0",
            "api.session_ttl_secs",
        ),
        ("segment_mib = 64", "segment_mib = 0", "ledger.segment_mib"),
        (
            "blocked_flush_secs = 60",
            "blocked_flush_secs = 0",
            "ledger.blocked_flush_secs",
        ),
        (
            "retention_days = 1825",
            "retention_days = 0",
            "ledger.retention_days",
        ),
        (
            "connect_timeout_secs = 10",
            "connect_timeout_secs = 0",
            "server.connect_timeout_secs",
        ),
    ] {
        let (dir, config) = write_config(&[(from, to)], common::DEMO_DIRECTORY);
        let data = dir.path().join("data");
        let (ok, _, err) = run(&config, &["check"], &data);
        assert!(!ok && err.contains(key), "check with {to}: {err}");
        let named = format!("{}: {key}", config.display());
        assert!(err.contains(&named), "check with {to} names no file: {err}");
        let (ok, _, err) = run(
            &config,
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--api-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ],
            &data,
        );
        assert!(!ok && err.contains(key), "serve with {to}: {err}");
        assert!(!data.exists(), "serve with {to} created the data directory");
    }
}

/// Certificates, keys and CAs load in `check` as in `serve`, and an error
/// names the section that points at them.
#[test]
fn check_loads_the_tls_material_serve_would() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let cert_of = |key: &rcgen::KeyPair| {
        rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(key)
            .unwrap()
            .pem()
    };
    let (a, b) = (
        rcgen::KeyPair::generate().unwrap(),
        rcgen::KeyPair::generate().unwrap(),
    );
    let cert = write("a.pem", &cert_of(&a));
    let (key_a, key_b) = (
        write("a.key", &a.serialize_pem()),
        write("b.key", &b.serialize_pem()),
    );
    let api_tls = |key: &str| {
        (
            "totp_issuer = \"consentry\"".to_string(),
            format!("totp_issuer = \"consentry\"\n[api.tls]\ncert = {cert:?}\nkey = {key:?}"),
        )
    };
    let check = |replace: &[(String, String)]| {
        let pairs: Vec<(&str, &str)> = replace
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let (dir, config) = write_config(&pairs, common::DEMO_DIRECTORY);
        let (ok, _, err) = run(&config, &["check"], &dir.path().join("data"));
        (ok, err)
    };
    let (ok, err) = check(&[api_tls(&key_a)]);
    assert!(ok, "{err}");
    let (ok, err) = check(&[api_tls(&key_b)]);
    assert!(
        !ok && err.contains("[api.tls]") && err.contains("are not a pair"),
        "a key of another certificate: {err}"
    );
    // A key where the certificate should be: said as such, not as rustls's
    // "peer sent no certificates".
    let key_as_cert = (
        "totp_issuer = \"consentry\"".to_string(),
        format!("totp_issuer = \"consentry\"\n[api.tls]\ncert = {key_a:?}\nkey = {key_a:?}"),
    );
    let (ok, err) = check(&[key_as_cert]);
    assert!(
        !ok && err.contains("holds no PEM certificate"),
        "a key file as the certificate: {err}"
    );
    let (ok, err) = check(&[
        (
            "upstream = \"embedded\"".into(),
            "upstream = \"mqtts://localhost:8883\"".into(),
        ),
        (
            "# ca = \"broker-ca.pem\"".into(),
            "ca = \"no-such-ca.pem\"".into(),
        ),
    ]);
    assert!(
        !ok && err.contains("[broker]") && err.contains("no-such-ca.pem"),
        "{err}"
    );
    // A CA file with no certificate in it verifies no broker at all.
    let empty = write("empty-ca.pem", "");
    let (ok, err) = check(&[
        (
            "upstream = \"embedded\"".into(),
            "upstream = \"mqtts://localhost:8883\"".into(),
        ),
        ("# ca = \"broker-ca.pem\"".into(), format!("ca = {empty:?}")),
    ]);
    assert!(!ok && err.contains("holds no certificate"), "{err}");
}

#[test]
fn check_names_the_file_a_semantic_error_is_in() {
    let bad_directory = common::DEMO_DIRECTORY.replacen(
        "collect = [{ kind = \"heart_rate\" }",
        "collect = [{ kind = \"heart_ratex\" }",
        1,
    );
    assert_ne!(bad_directory, common::DEMO_DIRECTORY);
    let (dir, config) = write_config(&[], &bad_directory);
    let (ok, _, err) = run(&config, &["check"], &dir.path().join("data"));
    assert!(!ok);
    assert!(
        err.contains("directory.toml: ") && err.contains("unknown kind \"heart_ratex\""),
        "{err}"
    );

    // An error in the configuration's own part names the configuration.
    let (dir, config) = write_config(
        &[(
            "templates = [\"pii/{user}/{device}/{kind}\"]",
            "templates = [\"pii/{user}/{device}\"]",
        )],
        common::DEMO_DIRECTORY,
    );
    let (ok, _, err) = run(&config, &["check"], &dir.path().join("data"));
    assert!(!ok && err.contains("consentry.toml: template"), "{err}");

    // One certificate for two identities (found by an outside review: the
    // device's certificate logged in as the provider).
    let fp = "6db0b6060000000000000000000000000000000000000000000000000000003d80";
    let shared = common::DEMO_DIRECTORY
        .replacen(
            "id = \"alice-watch\"",
            &format!("id = \"alice-watch\"\ncert_sha256 = \"{fp}\""),
            1,
        )
        .replacen(
            "id = \"fitcoach\"",
            &format!("id = \"fitcoach\"\ncert_sha256 = \"{}\"", fp.to_uppercase()),
            1,
        );
    assert_eq!(
        shared.matches(fp).count(),
        1,
        "both fingerprints were written"
    );
    let (dir, config) = write_config(&[], &shared);
    let (ok, _, err) = run(&config, &["check"], &dir.path().join("data"));
    assert!(
        !ok && err.contains("registered for both device alice-watch and provider fitcoach"),
        "{err}"
    );

    // A file that does not parse is named, and the parser's words are
    // said once, not again as the error's cause.
    let (dir, config) = write_config(
        &[("retention_days = 1825", "retention_days = [")],
        common::DEMO_DIRECTORY,
    );
    let (ok, _, err) = run(&config, &["check"], &dir.path().join("data"));
    assert!(
        !ok && err.contains("consentry.toml: TOML parse error"),
        "{err}"
    );
    assert_eq!(err.matches("TOML parse error").count(), 1, "{err}");

    // Grants an import would refuse (as the API would): check says so, as
    // for a first start, which imports the whole file.
    let seconds = common::DEMO_DIRECTORY.replacen(
        "collect = [{ kind = \"heart_rate\" }, { kind = \"steps\" }]",
        "collect = [{ kind = \"heart_rate\", windows = [{ days = [\"Tue\"], from = \"01:00:00\", to = \"01:00:59\" }] }]",
        1,
    );
    assert_ne!(seconds, common::DEMO_DIRECTORY);
    let (dir, config) = write_config(&[], &seconds);
    let data = dir.path().join("data");
    let (ok, _, err) = run(&config, &["check"], &data);
    assert!(
        !ok && err.contains("directory.toml: ") && err.contains("whole minutes"),
        "{err}"
    );
}

/// README: logs carry no topics or user ids, at the default filter and at
/// the README's own example of a more verbose one. The embedded rumqttd and
/// rumqttc name topics in their own lines, so they stay at warn unless the
/// filter names them.
#[tokio::test]
async fn a_verbose_log_still_names_no_topic_or_user() {
    use common::v5;
    let server = Server::start(common::Setup {
        env: vec![("CONSENTRY_LOG".into(), "info,consentry=debug".into())],
        ..Default::default()
    });
    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("pii/alice/#", v5::QoS::AtLeastOnce).await;
    let mut watch = v5::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    watch
        .publish_acked("pii/alice/alice-watch/heart_rate", br#"{"bpm":70}"#)
        .await;
    assert_eq!(
        fit.next_publish().await.topic,
        &b"pii/alice/alice-watch/heart_rate"[..]
    );
    let log = server.log();
    assert!(log.contains("DEBUG"), "the filter did not apply:\n{log}");
    assert!(!log.contains("pii/"), "a topic in the log:\n{log}");
}

/// A listener that cannot bind stops the start with an error naming the
/// address (the metrics endpoint's named none).
#[test]
fn a_taken_metrics_port_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (dir, config) = write_config(&[], common::DEMO_DIRECTORY);
    let data = dir.path().join("data");
    let args = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        &addr,
    ];
    let (ok, _, err) = run(&config, &args, &data);
    assert!(!ok, "started on a taken metrics port");
    assert!(
        err.contains(&format!("start the metrics endpoint on {addr}")),
        "{err}"
    );
}

/// `consentry hash-password` makes a PHC string for a directory file, and
/// refuses an empty password, whose hash would let in anyone who knows
/// the name.
#[test]
fn hash_password_refuses_an_empty_password() {
    let (dir, config) = write_config(&[], common::DEMO_DIRECTORY);
    let data = dir.path().join("data");
    let (ok, out, err) = run(&config, &["hash-password", "a long enough secret"], &data);
    assert!(ok, "{err}");
    assert!(out.starts_with("$argon2id$"), "{out}");
    let (ok, out, err) = run(&config, &["hash-password", ""], &data);
    assert!(!ok, "hashed an empty password: {out}");
    assert!(err.contains("empty password"), "{err}");
}

/// The bug this guards: a lost `pseudonym.key` beside a ledger with records was replaced by a
/// new key at start, silently, and every user's pseudonym changed at every provider. It now
/// stops the start, naming the file; a data directory that shared nothing yet (a first start
/// that failed before writing the key) still gets one.
#[tokio::test]
async fn a_lost_pseudonym_key_stops_the_start_once_anything_was_shared() {
    use common::v5;
    let mut server = Server::demo();
    server.stop();
    let key = server.data_dir().join("pseudonym.key");
    std::fs::remove_file(&key).unwrap();
    server.restart();
    assert!(key.exists(), "no key made before anything was shared");

    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("pii/#", v5::QoS::AtLeastOnce).await;
    let mut alice = v5::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    alice
        .publish_acked("pii/alice/alice-watch/heart_rate", br#"{"bpm":72}"#)
        .await;
    fit.next_publish().await;
    server.stop();
    std::fs::remove_file(&key).unwrap();
    for _ in 0..2 {
        let log = server.restart_refused();
        assert!(
            log.contains(&format!("{} is missing", key.display()))
                && log.contains("new pseudonym at every provider")
                && log.contains("CONSENTRY_PSEUDONYM_KEY"),
            "{log}"
        );
        assert!(!key.exists(), "a new key was left behind");
    }
}

/// A store file damaged at its start stopped the start with "open the store … (is its disk
/// full or read-only?): database: file is not a database": nothing said the file itself was
/// the problem.
#[tokio::test]
async fn a_store_that_is_not_a_database_is_called_corrupt() {
    let mut server = Server::demo();
    server.stop();
    let db = server.data_dir().join("consentry.db");
    for f in ["consentry.db-wal", "consentry.db-shm"] {
        let _ = std::fs::remove_file(server.data_dir().join(f));
    }
    let mut bytes = std::fs::read(&db).unwrap();
    bytes[..100].fill(0x5a);
    std::fs::write(&db, bytes).unwrap();
    let log = server.restart_refused();
    assert!(
        log.contains(&db.display().to_string())
            && log.contains("corrupt or is not a consentry store")
            && !log.contains("disk full"),
        "{log}"
    );
}

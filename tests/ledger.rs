//! End to end: the share ledger as the gateway writes it — exactly the
//! expected records for the demo scenario, encrypted on disk, verifiable,
//! and complete after a SIGKILL.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{v4, v5, Server};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const HR: &str = "pii/alice/alice-watch/heart_rate";
const LOC: &str = "pii/alice/alice-watch/location";

fn show(server: &Server, user: &str) -> Vec<Value> {
    let out = server.cli(&["ledger", "show", "--user", user, "--actor", "test-operator"]);
    assert!(
        out.status.success(),
        "ledger show failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn verify(server: &Server) -> String {
    let out = server.cli(&["ledger", "verify"]);
    assert!(
        out.status.success(),
        "ledger verify failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn demo_scenario_writes_exactly_the_expected_records() {
    let mut server = Server::demo();
    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    let mut ins = v5::connect(server.mqtt, "ins", "insureco", "insureco-secret").await;
    for c in [&mut fit, &mut ins] {
        c.subscribe("pii/#", v5::QoS::AtLeastOnce).await;
        c.subscribe("public/#", v5::QoS::AtLeastOnce).await;
    }
    let mut alice = v5::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    alice.publish_acked(HR, br#"{"bpm":72}"#).await;
    alice
        .publish_acked(LOC, br#"{"lat":48.85661,"lon":2.35222}"#)
        .await;
    alice.publish_acked("public/marker", b"m").await;
    let got = fit.publishes_until("public/marker").await;
    assert_eq!(got.len(), 3);
    assert_eq!(ins.publishes_until("public/marker").await.len(), 1);
    // The receipt documenting alice's preferences in force, as she reads it.
    let token = common::demo_alice_token(&server);
    let (_, receipts) = common::http(&server, "GET", "/v1/me/receipts", Some(&token), &[], None);
    let receipts = common::json_of(&receipts);
    let in_force = receipts.as_array().unwrap().last().unwrap()["jti"].clone();
    assert!(in_force.is_string(), "{receipts}");
    server.stop();

    let entries = show(&server, "alice");
    let shares: Vec<&Value> = entries.iter().filter(|e| e["type"] == "share").collect();
    assert_eq!(shares.len(), 2, "{entries:#?}");
    let hr = shares[0];
    assert_eq!(hr["provider"], "fitcoach");
    assert_eq!(hr["user"], "alice");
    assert_eq!(hr["device"], "alice-watch");
    assert_eq!(hr["kind"], "heart_rate");
    assert_eq!(hr["pii_category"], "Health");
    assert_eq!(hr["purpose"], "coaching");
    assert_eq!(hr["action"], json!({"t": "Delivered"}));
    assert_eq!(hr["qos"], 1);
    assert_eq!(hr["creator"], "consentry demo operator");
    assert_eq!(hr["receipt_id"], in_force);
    // The digest is of the payload as fitcoach received it.
    assert_eq!(
        hr["payload_sha256"],
        hex::encode(Sha256::digest(&got[0].payload))
    );
    let loc = shares[1];
    assert_eq!(loc["kind"], "location");
    assert_eq!(loc["receipt_id"], in_force);
    assert_eq!(
        loc["action"],
        json!({"t": "Masked", "fields": [
            {"field": "lat", "method": "generalize"},
            {"field": "lon", "method": "generalize"}
        ]})
    );
    assert_eq!(
        loc["payload_sha256"],
        hex::encode(Sha256::digest(&got[1].payload))
    );

    // insureco got nothing: no share record, only aggregate refusals.
    assert!(shares.iter().all(|s| s["provider"] != "insureco"));
    let blocked: Vec<(String, String, String, u64)> = entries
        .iter()
        .filter(|e| e["type"] == "blocked")
        .map(|e| {
            (
                e["provider"].as_str().unwrap().to_string(),
                e["kind"].as_str().unwrap().to_string(),
                e["reason"].as_str().unwrap().to_string(),
                e["count"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut blocked_sorted = blocked.clone();
    blocked_sorted.sort();
    assert_eq!(
        blocked_sorted,
        vec![
            (
                "insureco".into(),
                "heart_rate".into(),
                "no_share_consent".into(),
                1
            ),
            (
                "insureco".into(),
                "location".into(),
                "no_share_consent".into(),
                1
            ),
        ]
    );
    // Reading was itself recorded as an extract, and the next read shows it.
    let again = show(&server, "alice");
    let extracts: Vec<&Value> = again.iter().filter(|e| e["type"] == "extract").collect();
    assert_eq!(extracts.len(), 2);
    assert_eq!(extracts[0]["actor"], "test-operator");
    // --from and --to take a date, meaning its start (UTC), or a time.
    let day = hr["time"].as_str().unwrap()[..10].to_string();
    let next = (chrono::NaiveDate::parse_from_str(&day, "%Y-%m-%d").unwrap()
        + chrono::Days::new(1))
    .to_string();
    let shares_in = |range: &[&str]| {
        let mut args = vec!["ledger", "show", "--user", "alice"];
        args.extend_from_slice(range);
        let out = server.cli(&args);
        assert!(
            out.status.success(),
            "ledger show {range:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"type\":\"share\""))
            .count()
    };
    assert_eq!(shares_in(&["--from", &day]), 2);
    assert_eq!(shares_in(&["--from", &day, "--to", &next]), 2);
    assert_eq!(shares_in(&["--to", &day]), 0);
    assert_eq!(shares_in(&["--from", &next]), 0);
    assert_eq!(shares_in(&["--from", &format!("{day}T00:00:00Z")]), 2);
    let out = server.cli(&["ledger", "show", "--user", "alice", "--from", "23/11/2026"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("or a date (2026-11-23)"));
    // bob's history holds none of alice's records.
    let bob = show(&server, "bob");
    assert!(bob.iter().all(|e| e["user"] == "bob"), "{bob:#?}");
    assert!(bob.iter().all(|e| e["type"] != "share"));

    // On disk nothing names alice, her device or her data in clear.
    for f in std::fs::read_dir(server.data_dir().join("ledger")).unwrap() {
        let bytes = std::fs::read(f.unwrap().path()).unwrap();
        for needle in [&b"alice"[..], b"heart_rate", b"coaching", b"bpm"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} found in clear",
                String::from_utf8_lossy(needle)
            );
        }
    }
    assert!(verify(&server).starts_with("ledger OK"));
}

#[tokio::test]
async fn ledger_commands_refuse_to_run_beside_a_live_server() {
    let server = Server::demo();
    let out = server.cli(&["ledger", "show", "--user", "alice"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another process"));
}

/// A mistyped data directory is an error, not an empty ledger that verifies: nothing is
/// created there, and a ledger whose checkpoint file was removed fails.
#[tokio::test]
async fn ledger_commands_need_an_existing_ledger() {
    let mut server = Server::demo();
    server.stop();
    let missing = server.data_dir().join("no-such-dir");
    let missing_arg = common::path_str(&missing);
    for args in [
        vec!["ledger", "verify", "--data-dir", &missing_arg],
        vec![
            "ledger",
            "show",
            "--user",
            "alice",
            "--data-dir",
            &missing_arg,
        ],
    ] {
        let out = server.cli(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no share ledger at"), "{args:?}: {err}");
    }
    assert!(!missing.exists(), "the mistyped directory was created");

    assert!(verify(&server).starts_with("ledger OK"));
    std::fs::remove_file(server.data_dir().join("ledger").join("checkpoints.jsonl")).unwrap();
    let out = server.cli(&["ledger", "verify"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no signed checkpoint"), "{err}");
}

/// `ledger show` for a user the store does not know is an error, and writes
/// no extract record: a mistyped name must not read as an empty history.
/// And a reader that stops early (`| head`) ends the output quietly.
#[tokio::test]
async fn ledger_show_refuses_unknown_users_and_stops_at_a_closed_pipe() {
    let mut server = Server::demo();
    server.stop();
    let before = verify(&server);
    let out = server.cli(&["ledger", "show", "--user", "alcie"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no user \"alcie\" in the store"), "{err}");
    assert_eq!(verify(&server), before, "an extract was recorded");

    // No reader at all: the first write fails with a broken pipe.
    let mut child = std::process::Command::new(common::bin())
        .arg("--config")
        .arg(&server.config)
        .args(["ledger", "show", "--user", "alice"])
        .env("CONSENTRY_DATA_DIR", server.data_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn every_message_received_before_a_sigkill_has_its_record() {
    let mut server = Server::demo();
    let mut fit = v4::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("pii/+/+/heart_rate", v4::QoS::AtLeastOnce)
        .await;
    let alice = v4::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    let publisher = alice.client.clone();
    let total = 3000u32;
    let sender = tokio::spawn(async move {
        for i in 0..total {
            if publisher
                .publish(HR, v4::QoS::AtLeastOnce, false, format!("{{\"bpm\":{i}}}"))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut received = HashSet::new();
    // Kill the server mid-stream, while deliveries are in flight.
    while received.len() < 300 {
        received.insert(Sha256::digest(&fit.next_publish().await.payload).to_vec());
    }
    server.kill9();
    // Whatever was already on the wire before the kill counts too.
    while let Ok(Some(p)) =
        tokio::time::timeout(std::time::Duration::from_millis(500), fit.events.recv()).await
    {
        if let v4::Packet::Publish(p) = p {
            received.insert(Sha256::digest(&p.payload).to_vec());
        }
    }
    sender.abort();
    assert!(
        (received.len() as u32) < total,
        "the kill came too late to test anything"
    );

    // Recovery at restart, then a clean stop.
    server.restart();
    server.stop();
    assert!(verify(&server).starts_with("ledger OK"));
    let recorded: HashSet<Vec<u8>> = show(&server, "alice")
        .iter()
        .filter(|e| e["type"] == "share")
        .map(|e| hex::decode(e["payload_sha256"].as_str().unwrap()).unwrap())
        .collect();
    let missing = received.difference(&recorded).count();
    assert_eq!(
        missing, 0,
        "{missing} received messages have no ledger record"
    );
}

/// A share ledger that failed a write stays closed, and says so: personal
/// data stops, and `consentry_ledger_healthy` drops to 0 (README,
/// "Operating"). The failure is real: the ledger's directory is replaced by
/// a file, so opening its next segment fails in the kernel.
#[tokio::test]
async fn a_failed_ledger_write_stops_deliveries_and_shows_in_the_gauge() {
    let server = Server::start(common::Setup {
        replace: vec![("segment_mib = 64".into(), "segment_mib = 1".into())],
        ..Default::default()
    });
    server
        .wait_for_metric("consentry_ledger_healthy", &[], 1.0)
        .await;
    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("pii/+/+/heart_rate", v5::QoS::AtMostOnce)
        .await;
    let mut watch = v5::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    watch.publish_acked(HR, br#"{"bpm":60}"#).await;
    assert_eq!(fit.next_publish().await.topic, HR.as_bytes());

    let dir = server.data_dir().join("ledger");
    std::fs::rename(&dir, server.data_dir().join("ledger-moved")).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    // Enough records to fill the 1 MiB segment and need the next one.
    let mut sent = 0;
    while server.metric("consentry_ledger_healthy", &[]) == 1.0 {
        assert!(sent < 200_000, "the ledger never needed a new segment");
        for _ in 0..500 {
            watch
                .client
                .publish(HR, v5::QoS::AtMostOnce, false, &br#"{"bpm":61}"#[..])
                .await
                .unwrap();
        }
        sent += 500;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(server.metric("consentry_ledger_append_failures_total", &[]) >= 1.0);
    // Nothing personal is delivered any more, to a new subscriber either:
    // it is told the server is unavailable, and the reading is refused.
    let late = v5::connect_with(v5::options(
        server.mqtt,
        "late",
        Some(("fitcoach", "fitcoach-secret")),
    ))
    .await;
    assert!(
        matches!(&late, Err(e) if e.contains("ServerUnavailable")),
        "{:?}",
        late.err()
    );
    assert_eq!(
        watch.publish_acked(HR, br#"{"bpm":62}"#).await,
        v5::PubAckReason::UnspecifiedError
    );
    // The subscriber of before was told the server is busy, and got no reading.
    loop {
        match fit.next().await {
            v5::Packet::Disconnect(d) => {
                assert_eq!(
                    d.reason_code,
                    rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::ServerBusy
                );
                break;
            }
            v5::Packet::Publish(p) => assert_ne!(p.payload, &br#"{"bpm":62}"#[..]),
            _ => {}
        }
    }
    assert_eq!(server.metric("consentry_ledger_healthy", &[]), 0.0);
}

/// The bug this guards: with `consentry.db` lost (deleted, emptied, or its
/// WAL gone before a checkpoint), the next start took the empty store for a
/// first start and seeded it from the directory file, bringing back
/// consents users had withdrawn. A ledger with records beside an empty
/// store now stops the start, twice in a row.
#[tokio::test]
async fn a_lost_store_beside_a_ledger_with_records_stops_the_start() {
    let mut server = Server::demo();
    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("pii/#", v5::QoS::AtLeastOnce).await;
    let mut alice = v5::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    alice.publish_acked(HR, br#"{"bpm":72}"#).await;
    fit.next_publish().await;
    server.stop();
    for f in ["consentry.db", "consentry.db-wal", "consentry.db-shm"] {
        let _ = std::fs::remove_file(server.data_dir().join(f));
    }
    for _ in 0..2 {
        let log = server.restart_refused();
        assert!(
            log.contains("holds no users, providers or consents")
                && log.contains("was lost")
                && log.contains("Restore it from a backup"),
            "{log}"
        );
    }
}

/// The bug this guards: a store copied back alone from an older backup
/// started as if current, and a grant alice withdrew after the backup was
/// in force again, with no warning. Such a store now stops the start, until
/// the operator deletes the consent mark on purpose.
#[tokio::test]
async fn a_store_copied_back_from_an_older_backup_stops_the_start() {
    let mut server = Server::demo();
    server.stop();
    let db_files = ["consentry.db", "consentry.db-wal", "consentry.db-shm"];
    let backup = server.data_dir().join("store-backup");
    std::fs::create_dir(&backup).unwrap();
    for f in db_files {
        let _ = std::fs::copy(server.data_dir().join(f), backup.join(f));
    }
    server.restart();
    let t = common::demo_alice_token(&server);
    let (s, body) = common::http(
        &server,
        "DELETE",
        "/v1/me/preferences/share/fitcoach/heart_rate",
        Some(&t),
        &[],
        None,
    );
    assert_eq!(s, 200, "{body}");
    server.stop();
    for f in db_files {
        let _ = std::fs::remove_file(server.data_dir().join(f));
        let _ = std::fs::copy(backup.join(f), server.data_dir().join(f));
    }
    for _ in 0..2 {
        let log = server.restart_refused();
        assert!(
            log.contains("copied back from an older backup") && log.contains("consent-mark"),
            "{log}"
        );
    }
    // The operator accepts the older store on purpose: alice's withdrawn
    // grant is back, as the error said it would be.
    std::fs::remove_file(server.data_dir().join("consent-mark")).unwrap();
    server.restart();
    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("pii/#", v5::QoS::AtLeastOnce).await;
    let mut alice = v5::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    alice.publish_acked(HR, br#"{"bpm":72}"#).await;
    assert_eq!(fit.next_publish().await.topic, HR.as_bytes());
    // And the mark follows the restored store from there.
    server.stop();
    server.restart();
}

/// A store deleted beside a ledger that holds no records yet (nothing was
/// shared) is not taken for a first start either: the consent mark knows
/// consents were given, and the error says the store was lost.
#[tokio::test]
async fn a_lost_store_beside_an_empty_ledger_stops_the_start() {
    let mut server = Server::demo();
    server.stop();
    for f in ["consentry.db", "consentry.db-wal", "consentry.db-shm"] {
        let _ = std::fs::remove_file(server.data_dir().join(f));
    }
    let log = server.restart_refused();
    assert!(
        log.contains("holds no consent changes") && log.contains("lost or replaced"),
        "{log}"
    );
}

/// Fails the ledger's next write for real: the kernel refuses to grow any
/// file of the process (RLIMIT_FSIZE, which consentry meets with EFBIG, as
/// it would a full disk, since it ignores SIGXFSZ).
fn refuse_file_growth(server: &Server) {
    let limit = libc::rlimit {
        rlim_cur: 1,
        rlim_max: 1,
    };
    // SAFETY: sets a resource limit of a child process; no memory is shared.
    let rc = unsafe {
        libc::prlimit(
            server.pid() as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Once a ledger write has failed, nothing can be shared until a restart,
/// and with the embedded broker what was accepted meanwhile would be lost
/// at that restart. So personal data is refused at ingress (MQTT 5: PUBACK
/// 0x80; 3.1.1, which has no failing PUBACK: the connection is closed, the
/// message not acknowledged) and providers get CONNACK "Server unavailable"
/// rather than a session ended at its first delivery.
#[tokio::test]
async fn after_a_failed_ledger_write_personal_data_is_refused_at_ingress() {
    let server = Server::demo();
    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("pii/#", v5::QoS::AtLeastOnce).await;
    let mut alice = v5::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    alice.publish_acked(HR, br#"{"bpm":70}"#).await;
    fit.next_publish().await;

    refuse_file_growth(&server);
    // Accepted before the failure was known; its delivery is withheld.
    alice.publish_acked(HR, br#"{"bpm":71}"#).await;
    server
        .wait_for_metric("consentry_ledger_healthy", &[], 0.0)
        .await;
    // Counted as what happened to it: withheld, not delivered.
    let withheld = [("result", "dropped"), ("reason", "ledger_unavailable")];
    server
        .wait_for_metric("consentry_deliveries_total", &withheld, 1.0)
        .await;
    let delivered = [("result", "delivered"), ("reason", "consent")];
    assert_eq!(server.metric("consentry_deliveries_total", &delivered), 1.0);

    assert_eq!(
        alice.publish_acked(HR, br#"{"bpm":72}"#).await,
        v5::PubAckReason::UnspecifiedError
    );
    // Data that is not personal still flows.
    assert_eq!(
        alice.publish_acked("public/marker", b"m").await,
        v5::PubAckReason::Success
    );
    let refused = [("result", "dropped"), ("reason", "ledger_unavailable")];
    assert_eq!(server.metric("consentry_publishes_total", &refused), 1.0);

    let mut bob = v4::connect(server.mqtt, "b", "bob-phone", "bob-phone-secret").await;
    bob.client
        .publish(
            "pii/bob/bob-phone/heart_rate",
            v4::QoS::AtLeastOnce,
            false,
            br#"{"bpm":60}"#.to_vec(),
        )
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), bob.events.recv()).await {
            Ok(Some(v4::Packet::PubAck(_))) => panic!("a 3.1.1 publish was acknowledged"),
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(_) => panic!("the 3.1.1 connection stayed open"),
        }
    }

    let refused = v5::connect_with(v5::options(
        server.mqtt,
        "fit2",
        Some(("fitcoach", "fitcoach-secret")),
    ))
    .await;
    assert!(refused.is_err(), "a provider got a session");
    let unavailable = [("role", "provider"), ("result", "unavailable")];
    server
        .wait_for_metric("consentry_connections_total", &unavailable, 1.0)
        .await;
}

/// A quiet gateway with retention: once every record was purged, `ledger verify` failed
/// ("a signed checkpoint covers seq 3 but the chain ends at 0") while the server itself started
/// on the same ledger. It verifies, saying what was purged, before and after another start.
#[tokio::test]
async fn a_ledger_purged_of_every_record_verifies() {
    use consentry::ledger::{Keyring, Ledger, LedgerConfig, ShareAction, ShareRecord};
    let mut server = Server::start(common::Setup {
        extra: common::MARKER_ACL.into(),
        replace: vec![("retention_days = 1825".into(), "retention_days = 1".into())],
        ..Default::default()
    });
    server.stop();
    // A new ledger of three records four days old, written as the gateway writes them (in a
    // ledger that has seen a later time, older stamps are taken for a clock set back).
    let data = server.data_dir();
    let keys = Keyring::load(&data.join("ledger-keys.json")).unwrap();
    let dir = data.join("ledger");
    std::fs::remove_dir_all(&dir).unwrap();
    let ledger = Ledger::open(
        LedgerConfig {
            dir: dir.clone(),
            ..LedgerConfig::default()
        },
        keys,
    )
    .unwrap();
    for i in 0..3u8 {
        let rec = ShareRecord {
            time: chrono::Utc::now() - chrono::TimeDelta::days(4),
            creator: String::new(),
            recipient: "fitcoach".into(),
            user: "alice".into(),
            device: "alice-watch".into(),
            kind: "heart_rate".into(),
            pii_category: "Health".into(),
            purpose: "coaching".into(),
            action: ShareAction::Delivered,
            payload_digest: [i; 32],
            qos: 1,
            receipt_id: None,
        };
        ledger.submit(rec).unwrap().await.unwrap();
    }
    ledger.shutdown().await;
    assert!(verify(&server).starts_with("ledger OK: 3 records"));

    // The server closes their segment for its age and purges it at start.
    server.restart();
    let first = dir.join(format!("seg-{:020}.log", 1));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while first.exists() {
        assert!(std::time::Instant::now() < deadline, "never purged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop();
    let out = verify(&server);
    assert!(out.starts_with("ledger OK: 0 records"), "{out}");
    assert!(out.contains("up to seq 3 purged by retention"), "{out}");

    server.restart();
    server.stop();
    let out = verify(&server);
    assert!(out.starts_with("ledger OK: 0 records"), "{out}");
}

/// The newest segment file of the server's ledger.
fn newest_segment(server: &Server) -> std::path::PathBuf {
    let dir = server.data_dir().join("ledger");
    let mut segs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seg-"))
        })
        .collect();
    segs.sort();
    segs.pop().expect("a segment")
}

fn torn_files(server: &Server) -> Vec<(String, u64)> {
    std::fs::read_dir(server.data_dir().join("ledger"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("torn-"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect()
}

/// `ledger verify` on a ledger a crash left with a record cut short at its end said "ledger
/// verification FAILED … segment ends inside a record" and exited 1, as for tampering, while
/// the server cuts such a tail off at its next start as a crash's ordinary leftover. It now
/// verifies the records before it, says what the tail is, and succeeds. And a start that
/// could not keep the tail (the disk full) said "write quarantine file: File too large",
/// naming no file, and left a partial `torn-*.bin` behind.
#[tokio::test]
async fn a_torn_tail_verifies_and_a_failed_quarantine_leaves_nothing() {
    use std::os::unix::process::CommandExt;
    let mut server = Server::demo();
    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("pii/#", v5::QoS::AtLeastOnce).await;
    let mut alice = v5::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    for bpm in 70..73 {
        alice
            .publish_acked(HR, format!("{{\"bpm\":{bpm}}}").as_bytes())
            .await;
        fit.next_publish().await;
    }
    server.stop();
    let intact = verify(&server);
    // `head -c 120 SEG >> SEG`: a record's first 120 bytes, as a crash mid-append leaves them.
    let seg = newest_segment(&server);
    let whole = std::fs::read(&seg).unwrap();
    let mut torn = whole.clone();
    torn.extend_from_slice(&whole[..120]);
    std::fs::write(&seg, &torn).unwrap();

    let out = server.cli(&["ledger", "verify"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout, intact, "the records before it verify as before");
    for part in [
        "incomplete record",
        &seg.display().to_string(),
        "120 bytes",
        "next start",
        "torn-",
    ] {
        assert!(stderr.contains(part), "{part:?} not in {stderr}");
    }
    assert!(!stderr.contains("FAILED"), "{stderr}");

    // A start that cannot write the quarantine file (here: no file may grow past one byte,
    // which the kernel refuses as it would a full disk) names it, and leaves none behind.
    let mut show = std::process::Command::new(common::bin());
    show.arg("--config")
        .arg(&server.config)
        .args(["ledger", "show", "--user", "alice"])
        .env("CONSENTRY_DATA_DIR", server.data_dir());
    // SAFETY: runs in the child between fork and exec, and only calls setrlimit, which is
    // async-signal-safe.
    unsafe {
        show.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1,
                rlim_max: 1,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = show.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("quarantine file") && stderr.contains("/torn-"),
        "{stderr}"
    );
    assert_eq!(torn_files(&server), vec![], "{stderr}");
    assert_eq!(std::fs::read(&seg).unwrap(), torn, "nothing was cut");

    // The server's next start cuts it and keeps it; verify says nothing more about it.
    server.restart();
    server.stop();
    let kept = torn_files(&server);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].1, 120);
    let out = server.cli(&["ledger", "verify"]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("incomplete record"));

    // Records missing in the middle still fail.
    let whole = std::fs::read(&seg).unwrap();
    let frame_end =
        |off: usize| off + 4 + u32::from_le_bytes(whole[off..off + 4].try_into().unwrap()) as usize;
    let second = frame_end(0);
    let mut cut = whole[..second].to_vec();
    cut.extend_from_slice(&whole[frame_end(second)..]);
    std::fs::write(&seg, cut).unwrap();
    let out = server.cli(&["ledger", "verify"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("FAILED") && stderr.contains("removed"),
        "{stderr}"
    );
}

//! End to end: what an operator meets running consentry — the modes of the
//! files it creates, the metrics it serves, and `consentry check` agreeing
//! with `consentry serve`.

mod common;

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

//! Smoke run of the end-to-end benchmark harness (bench/e2e): seconds, a
//! tiny load, every system that is installed. It checks that the harness
//! still runs and writes well-formed results — never how fast anything is.

#[path = "../bench/e2e/harness/mod.rs"]
#[allow(dead_code)]
mod harness;

use std::process::Command;

const CHILD_ENV: &str = "CONSENTRY_E2E_SERVE_RUMQTTD";

/// The bare-rumqttd child: this test binary re-executed with only this test
/// selected and the ports in the environment. Without the variable it is a
/// no-op, so a normal test run passes over it.
#[test]
fn serve_rumqttd_child() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        let parts: Vec<&str> = spec.splitn(3, ' ').collect();
        harness::rumqttd::serve(
            parts[0].parse().unwrap(),
            parts[1].parse().unwrap(),
            std::path::Path::new(parts[2]),
        );
    }
}

#[test]
fn fsync_histogram_is_read_from_prometheus_text() {
    use harness::systems::Fsyncs;
    let text = "\
# HELP consentry_ledger_fsync_seconds fsync time
# TYPE consentry_ledger_fsync_seconds histogram
consentry_ledger_fsync_seconds_bucket{le=\"0.001\"} 90
consentry_ledger_fsync_seconds_bucket{le=\"0.005\"} 97
consentry_ledger_fsync_seconds_bucket{le=\"0.01\"} 99
consentry_ledger_fsync_seconds_bucket{le=\"+Inf\"} 100
consentry_ledger_fsync_seconds_sum 0.2
consentry_ledger_fsync_seconds_count 100
consentry_ledger_appends_total 400
";
    let f = Fsyncs::parse(text).expect("parsed");
    assert_eq!((f.count, f.over_5ms, f.over_10ms), (100, 3, 1));
    let later = Fsyncs {
        count: 150,
        over_5ms: 4,
        over_10ms: 1,
    };
    let d = later.since(f);
    assert_eq!((d.count, d.over_5ms, d.over_10ms), (50, 1, 0));
    // No histogram yet (no fsync so far) or another exporter: no figure.
    assert!(Fsyncs::parse("consentry_ledger_appends_total 0\n").is_none());
}

#[test]
fn tcp_segments_are_read_from_proc_net_snmp() {
    use harness::tcp::in_segs;
    let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
        Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs\n\
        Tcp: 1 200 120000 -1 10 5 0 0 3 123456 120000\n\
        Udp: InDatagrams\nUdp: 7\n";
    assert_eq!(in_segs(snmp), Some(123_456));
    assert_eq!(in_segs("Tcp: RtoAlgorithm\nTcp: 1\n"), None);
    assert_eq!(in_segs("Udp: InSegs\nUdp: 7\n"), None);
    // Linux always has the file; elsewhere the report's column reads "–".
    if cfg!(target_os = "linux") {
        assert!(harness::tcp::segments_received().is_some());
    }
}

#[test]
fn payload_is_256_bytes_of_json_with_a_timestamp() {
    let p = harness::load::payload(123_456_789, 7);
    assert_eq!(p.len(), harness::load::PAYLOAD_BYTES);
    let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
    assert_eq!(v["ts"], 123_456_789);
    assert_eq!(harness::load::parse_ts(&p), Some(123_456_789));
    // consentry's masking writes keys back in another order.
    assert_eq!(
        harness::load::parse_ts(br#"{"pad":"x","seq":1,"ts":42,"val":70}"#),
        Some(42)
    );
}

#[test]
fn quick_run_completes_and_writes_results() {
    let out = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut opts = harness::Options::full(
        env!("CARGO_BIN_EXE_consentry").into(),
        Box::new(move |v4, v5, auth| {
            let mut c = Command::new(&exe);
            c.args([
                "serve_rumqttd_child",
                "--exact",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, format!("{v4} {v5} {}", auth.display()));
            c
        }),
    );
    opts.make_quick();
    opts.out_dir = out.path().to_path_buf();
    opts.work_dir = out.path().join("work");
    opts.command = "tests/bench_smoke.rs (quick)".into();
    let mosquitto = opts.mosquitto_bin.is_some();
    harness::run_all(&opts).expect("the harness completed");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("latest.json")).unwrap()).unwrap();
    let runs = json["runs"].as_array().expect("runs");
    let mut systems: Vec<&str> = runs.iter().filter_map(|r| r["system"].as_str()).collect();
    systems.sort();
    systems.dedup();
    let mut want = vec!["consentry", "rumqttd"];
    if mosquitto {
        want.push("mosquitto");
        want.sort();
    }
    assert_eq!(systems, want);
    for scenario in ["allow_all", "masked", "overload", "idle"] {
        for system in &want {
            let delivered: u64 = runs
                .iter()
                .filter(|r| r["scenario"] == scenario && r["system"] == *system)
                .filter_map(|r| r["delivered"].as_u64())
                .sum();
            assert!(delivered > 0, "{system} delivered nothing in {scenario}");
        }
    }
    // Overload: one run per system, its loss bookkeeping present and
    // consistent (the numbers themselves are not judged here).
    for system in &want {
        let o = runs
            .iter()
            .find(|r| r["scenario"] == "overload" && r["system"] == *system)
            .map(|r| &r["overload"])
            .unwrap_or_else(|| panic!("no overload run for {system}"));
        let n = |k: &str| {
            o[k].as_u64()
                .unwrap_or_else(|| panic!("overload.{k} for {system}"))
        };
        assert!(n("acked") <= n("went_out") && n("went_out") <= n("sent") + 1);
        assert!(n("lost") <= n("acked"));
        assert!(o["rss_samples"].as_array().is_some_and(|s| !s.is_empty()));
    }
    // consentry's ledger fsyncs are read from its metrics for every
    // throughput run (each delivery waits for one); the brokers have none.
    // (The idle fleet's trickle is not a throughput run.)
    let throughput = |r: &&serde_json::Value| {
        (r["mode"] == "max" || r["mode"] == "rate") && r["scenario"] != "idle"
    };
    for r in runs.iter().filter(throughput) {
        let f = &r["ledger_fsyncs"];
        if r["system"] == "consentry" {
            let count = f["count"]
                .as_u64()
                .unwrap_or_else(|| panic!("consentry run has ledger_fsyncs: {r}"));
            assert!(count > 0 || r["delivered"] == 0, "no fsyncs counted: {r}");
            assert!(f["over_5ms"].as_u64() <= Some(count));
        } else {
            assert!(f.is_null(), "{} has no ledger", r["system"]);
        }
        // Over loopback every message delivered crossed at least one segment.
        if cfg!(target_os = "linux") {
            let segs = r["tcp_segments"]
                .as_u64()
                .unwrap_or_else(|| panic!("no tcp_segments: {r}"));
            assert!(segs > 0 || r["delivered"] == 0, "{r}");
        }
        // CPU by thread: every system's throughput run names its threads,
        // and no group can exceed the process's own CPU time.
        let threads = r["cpu_by_thread_s"]
            .as_object()
            .unwrap_or_else(|| panic!("no cpu_by_thread_s: {r}"));
        assert!(!threads.is_empty(), "{r}");
        let sum: f64 = threads.values().filter_map(|v| v.as_f64()).sum();
        assert!(sum <= r["cpu_s"].as_f64().unwrap() + 0.05, "{r}");
        if r["system"] == "consentry" {
            assert!(threads.contains_key("tokio-rt-worker"), "{r}");
            assert!(threads.contains_key("consentry-ledge"), "{r}");
        }
    }
    // One round each in a quick run: the round's ratio is the headline ratio.
    let summary = json["summary"].as_array().expect("summary");
    let max_consentry: Vec<_> = summary
        .iter()
        .filter(|x| x["system"] == "consentry" && x["label"] == "max")
        .collect();
    assert!(!max_consentry.is_empty());
    for x in max_consentry {
        let rounds = x["ratio_vs_rumqttd_by_round"].as_array().expect("by round");
        match x["ratio_vs_rumqttd"].as_f64() {
            Some(r) => {
                assert_eq!(rounds.len(), 1, "{x}");
                assert!((rounds[0].as_f64().unwrap() - r).abs() < 1e-9, "{x}");
            }
            None => assert!(rounds.is_empty(), "{x}"),
        }
    }
    // Two rounds of every fixed-rate load in a quick run: medians over both,
    // and consentry's added p99 against bare rumqttd's run of each round.
    let rate_rows: Vec<_> = summary
        .iter()
        .filter(|x| x["label"] != "max" && x["scenario"] != "idle" && x["scenario"] != "overload")
        .collect();
    assert!(!rate_rows.is_empty());
    for x in rate_rows {
        assert_eq!(x["runs"], 2, "{x}");
        if x["system"] == "consentry" && x["added_p99_us_vs_rumqttd"].is_number() {
            let rounds = x["added_p99_us_by_round"].as_array().expect("by round");
            assert_eq!(rounds.len(), 2, "{x}");
            assert!(rounds.iter().all(|d| d.as_f64().is_some()), "{x}");
        }
    }
    // The load generator's share of the machine is given for every load
    // (in clock ticks: a tiny run may round to zero, not all of them).
    let shares: Vec<f64> = summary
        .iter()
        .map(|x| x["harness_cpu_share"].as_f64().expect("harness_cpu_share"))
        .collect();
    assert!(shares.iter().all(|h| (0.0..64.0).contains(h)), "{shares:?}");
    assert!(shares.iter().any(|h| *h > 0.0), "{shares:?}");
    assert!(json["fd_limit"]["hard"].as_u64().is_some());
    assert!(json["summary"].as_array().is_some_and(|s| !s.is_empty()));
    let svg = std::fs::read_to_string(out.path().join("latest.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("</svg>"));
    let md = std::fs::read_to_string(out.path().join("latest.md")).unwrap();
    assert!(md.contains("### Maximum rate"));
    assert!(md.contains("### Overload"));
    assert!(md.contains("### Fixed offered rate (median of 2 rounds)"));
    assert!(md.contains("≤ 1 ms in"), "added p99 round by round");
    assert!(md.contains("### consentry's CPU by thread at fixed rates"));
}

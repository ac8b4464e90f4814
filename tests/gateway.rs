//! End to end: the real binary, real MQTT clients, the demo data.

mod common;

use std::time::Duration;

use common::{v4, v5, Server};
use serde_json::{json, Value};

fn as_json(payload: &[u8]) -> Value {
    serde_json::from_slice(payload).unwrap()
}

const HR: &str = "pii/alice/alice-watch/heart_rate";
const LOC: &str = "pii/alice/alice-watch/location";

#[tokio::test]
async fn demo_scenario_mqtt5() {
    let server = Server::demo();
    let mut fit = v5::connect(server.mqtt, "fit-1", "fitcoach", "fitcoach-secret").await;
    let mut ins = v5::connect(server.mqtt, "ins-1", "insureco", "insureco-secret").await;
    let mut alice = v5::connect(server.mqtt, "watch-1", "alice-watch", "alice-watch-secret").await;
    let mut bob = v5::connect(server.mqtt, "phone-1", "bob-phone", "bob-phone-secret").await;
    for c in [&mut fit, &mut ins] {
        let codes = c.subscribe("pii/#", v5::QoS::AtLeastOnce).await;
        assert_eq!(
            codes,
            vec![v5::SubscribeReasonCode::Success(v5::QoS::AtLeastOnce)]
        );
        let codes = c.subscribe("public/#", v5::QoS::AtLeastOnce).await;
        assert_eq!(
            codes,
            vec![v5::SubscribeReasonCode::Success(v5::QoS::AtLeastOnce)]
        );
    }

    // Undeclared fields never get past ingress.
    let r = alice
        .publish_acked(HR, br#"{"bpm":72,"name":"Alice"}"#)
        .await;
    assert_eq!(r, v5::PubAckReason::Success);
    let r = alice
        .publish_acked(LOC, br#"{"lat":48.85661,"lon":2.35222}"#)
        .await;
    assert_eq!(r, v5::PubAckReason::Success);
    // Misattribution: alice's watch publishing as bob.
    let r = alice
        .publish_acked("pii/bob/bob-phone/heart_rate", br#"{"bpm":1}"#)
        .await;
    assert_eq!(r, v5::PubAckReason::NotAuthorized);
    // bob never consented to location collection.
    let r = bob
        .publish_acked("pii/bob/bob-phone/location", br#"{"lat":1,"lon":2}"#)
        .await;
    assert_eq!(r, v5::PubAckReason::NotAuthorized);
    // A topic in the personal-data space with an undeclared kind.
    let r = alice
        .publish_acked("pii/alice/alice-watch/mood", b"{}")
        .await;
    assert_eq!(r, v5::PubAckReason::NotAuthorized);
    // bob's heart rate is collected but shared with nobody.
    let r = bob
        .publish_acked("pii/bob/bob-phone/heart_rate", br#"{"bpm":60}"#)
        .await;
    assert_eq!(r, v5::PubAckReason::Success);
    alice.publish_acked("public/marker", b"m").await;

    let got = fit.publishes_until("public/marker").await;
    let topics: Vec<_> = got
        .iter()
        .map(|p| String::from_utf8_lossy(&p.topic).to_string())
        .collect();
    assert_eq!(topics, vec![HR, LOC, "public/marker"]);
    assert_eq!(as_json(&got[0].payload), json!({"bpm": 72}));
    assert_eq!(as_json(&got[1].payload), json!({"lat": 48.86, "lon": 2.35}));

    let got = ins.publishes_until("public/marker").await;
    assert_eq!(got.len(), 1, "insureco received personal data: {got:?}");

    assert_eq!(
        server.metric(
            "consentry_publishes_total",
            &[("result", "dropped"), ("reason", "misattributed")]
        ),
        1.0
    );
    assert_eq!(
        server.metric(
            "consentry_publishes_total",
            &[("result", "dropped"), ("reason", "no_collect_consent")]
        ),
        1.0
    );
    assert_eq!(
        server.metric(
            "consentry_deliveries_total",
            &[("provider", "fitcoach"), ("result", "masked")]
        ),
        1.0
    );
    assert_eq!(
        server.metric(
            "consentry_deliveries_total",
            &[("provider", "insureco"), ("result", "dropped")]
        ),
        3.0
    );
    // Labels never carry a user id or a topic.
    let text = server.metrics_text();
    assert!(!text.contains("alice") && !text.contains("pii/"), "{text}");
}

#[tokio::test]
async fn demo_scenario_mqtt311_with_qos_flows() {
    let server = Server::demo();
    let mut fit = v4::connect(server.mqtt, "fit-4", "fitcoach", "fitcoach-secret").await;
    let mut alice = v4::connect(server.mqtt, "watch-4", "alice-watch", "alice-watch-secret").await;
    fit.subscribe("pii/+/+/heart_rate", v4::QoS::ExactlyOnce)
        .await;
    fit.subscribe("public/#", v4::QoS::AtLeastOnce).await;

    // A refused QoS 1 message is still acknowledged…
    alice
        .client
        .publish(
            "pii/bob/bob-phone/heart_rate",
            v4::QoS::AtLeastOnce,
            false,
            "{\"bpm\":1}",
        )
        .await
        .unwrap();
    assert!(matches!(alice.next().await, v4::Packet::PubAck(_)));
    // …and a refused QoS 2 one goes through PUBREC, PUBREL, PUBCOMP.
    alice
        .client
        .publish(
            "pii/bob/bob-phone/heart_rate",
            v4::QoS::ExactlyOnce,
            false,
            "{\"bpm\":2}",
        )
        .await
        .unwrap();
    assert!(matches!(alice.next().await, v4::Packet::PubRec(_)));
    assert!(matches!(alice.next().await, v4::Packet::PubComp(_)));
    // Allowed at QoS 2 end to end.
    alice
        .client
        .publish(HR, v4::QoS::ExactlyOnce, false, "{\"bpm\":80}")
        .await
        .unwrap();
    assert!(matches!(alice.next().await, v4::Packet::PubRec(_)));
    assert!(matches!(alice.next().await, v4::Packet::PubComp(_)));
    alice
        .client
        .publish("public/marker", v4::QoS::AtLeastOnce, false, "m")
        .await
        .unwrap();

    let got = fit.publishes_until("public/marker").await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].topic, HR);
    assert_eq!(got[0].qos, v4::QoS::ExactlyOnce);
    assert_eq!(as_json(&got[0].payload), json!({"bpm": 80}));

    // Clean session ends are not errors in the operator's log (the embedded
    // rumqttd reports each as a connection "already gone").
    alice.disconnect().await;
    fit.disconnect().await;
    server
        .wait_for_metric("consentry_broker_connections", &[], 0.0)
        .await;
    for _ in 0..10 {
        let log = server.log();
        assert!(
            !log.lines().any(|l| l.contains(" ERROR ")),
            "an error logged for a clean run:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// argon2 runs one per core with a bounded queue; with no queue at all,
/// a burst of CONNECTs needing a check gets "Server busy" (0x89) for those
/// that find every core taken. The server stays usable: a device whose
/// password was verified before connects without a check.
#[tokio::test]
async fn password_checks_past_the_queue_are_answered_busy() {
    let server = Server::start(common::Setup {
        replace: vec![(
            "max_waiting_password_checks = 128".into(),
            "max_waiting_password_checks = 0".into(),
        )],
        ..Default::default()
    });
    // Verified once: later CONNECTs with this password need no argon2.
    v5::connect(server.mqtt, "w0", "alice-watch", "alice-watch-secret")
        .await
        .disconnect()
        .await;
    let burst: Vec<_> = (0..40)
        .map(|i| {
            tokio::spawn(v5::connect_with(v5::options(
                server.mqtt,
                &format!("guess-{i}"),
                Some(("alice-watch", &format!("guess {i}"))),
            )))
        })
        .collect();
    let mut busy = 0;
    for r in burst {
        let e = r
            .await
            .unwrap()
            .err()
            .expect("a wrong password never connects");
        if e.contains("ServerBusy") {
            busy += 1;
        } else {
            assert!(e.contains("BadUserNamePassword"), "{e}");
        }
    }
    assert!(
        busy > 0,
        "40 checks at once on a machine's cores, none busy"
    );
    server
        .wait_for_metric(
            "consentry_connections_total",
            &[("result", "busy")],
            busy as f64,
        )
        .await;
    assert_eq!(
        server.metric("consentry_password_checks_total", &[("result", "busy")]),
        busy as f64
    );
    v5::connect(server.mqtt, "w1", "alice-watch", "alice-watch-secret")
        .await
        .disconnect()
        .await;
}

#[tokio::test]
async fn credentials_are_checked() {
    let server = Server::demo();
    let bad = v5::connect_with(v5::options(
        server.mqtt,
        "x",
        Some(("alice-watch", "wrong")),
    ))
    .await;
    assert!(bad.is_err_and(|e| e.contains("BadUserNamePassword")));
    let bad = v4::connect_with(v4::options(server.mqtt, "x", Some(("nobody", "x")))).await;
    assert!(bad.is_err_and(|e| e.contains("BadUserNamePassword")));
    // Anonymous clients are refused unless the operator allows them.
    let anon = v4::connect_with(v4::options(server.mqtt, "x", None)).await;
    assert!(anon.is_err_and(|e| e.contains("NotAuthorized")));
    server
        .wait_for_metric("consentry_connections_total", &[("result", "refused")], 3.0)
        .await;
}

#[tokio::test]
async fn subscriptions_are_limited_to_declared_purposes() {
    let server = Server::demo();
    let mut ins = v5::connect(server.mqtt, "ins", "insureco", "insureco-secret").await;
    let na = v5::SubscribeReasonCode::NotAuthorized;
    let ok = v5::SubscribeReasonCode::Success(v5::QoS::AtMostOnce);
    assert_eq!(
        ins.subscribe("pii/+/+/location", v5::QoS::AtMostOnce).await,
        vec![na]
    );
    assert_eq!(
        ins.subscribe("$share/g/pii/+/+/location", v5::QoS::AtMostOnce)
            .await,
        vec![na]
    );
    assert_eq!(ins.subscribe("$SYS/#", v5::QoS::AtMostOnce).await, vec![na]);
    assert_eq!(
        ins.subscribe("pii/+/+/steps", v5::QoS::AtMostOnce).await,
        vec![ok]
    );
    assert_eq!(
        ins.subscribe("$share/g/pii/+/+/steps", v5::QoS::AtMostOnce)
            .await,
        vec![ok]
    );
    // Mixed: the refused filter is answered here, the other by the broker.
    ins.client
        .subscribe_many(vec![
            rumqttc::v5::mqttbytes::v5::Filter::new("pii/+/+/location", v5::QoS::AtMostOnce),
            rumqttc::v5::mqttbytes::v5::Filter::new("pii/+/+/heart_rate", v5::QoS::AtLeastOnce),
        ])
        .await
        .unwrap();
    let codes = loop {
        if let v5::Packet::SubAck(a) = ins.next().await {
            break a.return_codes;
        }
    };
    assert_eq!(
        codes,
        vec![na, v5::SubscribeReasonCode::Success(v5::QoS::AtLeastOnce)]
    );
    // A device has no business in the personal-data space as a reader.
    let mut alice = v4::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    assert_eq!(
        alice.subscribe("pii/#", v4::QoS::AtMostOnce).await,
        vec![rumqttc::SubscribeReasonCode::Failure]
    );
    assert_eq!(
        server.metric(
            "consentry_subscriptions_total",
            &[("result", "refused"), ("reason", "purpose_limited")]
        ),
        3.0
    );
}

/// A provider whose session ends with its connection gets consentry's own
/// QoS 1 flow (src/own_flow.rs): never more unacknowledged deliveries than
/// the Receive Maximum it asked for, the rest following as it acknowledges,
/// in order, none lost and none twice.
#[tokio::test]
async fn clean_session_deliveries_respect_the_receive_maximum() {
    use std::time::Duration;
    let server = Server::demo();
    let mut o = v5::options(server.mqtt, "fit-rm", Some(("fitcoach", "fitcoach-secret")));
    o.set_manual_acks(true);
    o.set_receive_maximum(Some(2));
    let mut fit = v5::connect_with(o).await.unwrap();
    fit.subscribe("pii/+/+/heart_rate", v5::QoS::AtLeastOnce)
        .await;
    let mut alice = v5::connect(server.mqtt, "watch-rm", "alice-watch", "alice-watch-secret").await;
    for bpm in 0..6 {
        let r = alice
            .publish_acked(HR, format!("{{\"bpm\":{bpm}}}").as_bytes())
            .await;
        assert_eq!(
            r,
            v5::PubAckReason::Success,
            "the device's publish is acked"
        );
    }

    let mut got = Vec::new();
    let mut held = vec![fit.next_publish().await, fit.next_publish().await];
    assert_ne!(held[0].pkid, held[1].pkid);
    assert!(
        tokio::time::timeout(Duration::from_millis(700), fit.events.recv())
            .await
            .is_err(),
        "a third delivery arrived before any acknowledgement"
    );
    while got.len() < 6 {
        let p = held.remove(0);
        fit.client.ack(&p).await.unwrap();
        got.push(as_json(&p.payload)["bpm"].as_i64().unwrap());
        if got.len() + held.len() < 6 {
            let next = fit.next_publish().await;
            assert!(
                held.iter().all(|h| h.pkid != next.pkid),
                "packet id reused while in flight"
            );
            held.push(next);
        }
        assert!(held.len() <= 2);
    }
    assert_eq!(got, vec![0, 1, 2, 3, 4, 5]);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), fit.events.recv())
            .await
            .is_err(),
        "a delivery came twice"
    );
}

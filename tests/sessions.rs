//! End to end: what a session costs at the broker, and who holds a client id.

mod common;

use std::time::Duration;

use common::{v4, v5, Server, Setup, MARKER_ACL};

fn broker_connections(server: &Server) -> f64 {
    server.metric("consentry_broker_connections", &[])
}

async fn wait_for_broker_connections(server: &Server, want: f64) {
    server
        .wait_for_metric("consentry_broker_connections", &[], want)
        .await;
}

#[tokio::test]
async fn an_idle_clean_session_holds_no_broker_connection() {
    let server = Server::start(Setup {
        extra: MARKER_ACL.into(),
        replace: vec![(
            "upstream_idle_secs = 300".into(),
            "upstream_idle_secs = 1".into(),
        )],
        ..Default::default()
    });
    let mut fit = v5::connect(server.mqtt, "fit-idle", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("public/#", v5::QoS::AtLeastOnce).await;
    wait_for_broker_connections(&server, 1.0).await;

    // Devices that only connect need nothing from the broker.
    let mut v5_dev = v5::connect(server.mqtt, "idle-1", "alice-watch", "alice-watch-secret").await;
    let v4_dev = v4::connect(server.mqtt, "idle-2", "bob-phone", "bob-phone-secret").await;
    assert_eq!(broker_connections(&server), 1.0);

    // The first publish opens the device's broker connection on the way.
    let r = v5_dev.publish_acked("public/a", b"one").await;
    assert_eq!(r, v5::PubAckReason::Success);
    assert_eq!(fit.next_publish().await.payload.as_ref(), b"one");
    assert_eq!(broker_connections(&server), 2.0);

    // With nothing in flight for upstream_idle_secs it is given back, and
    // the next publish opens a new one.
    wait_for_broker_connections(&server, 1.0).await;
    let r = v5_dev.publish_acked("public/b", b"two").await;
    assert_eq!(r, v5::PubAckReason::Success);
    assert_eq!(fit.next_publish().await.payload.as_ref(), b"two");

    // A will stays with consentry (README, "Wills"): a session with one is
    // no different while it is idle.
    wait_for_broker_connections(&server, 1.0).await;
    let mut o = v4::options(
        server.mqtt,
        "with-will",
        Some(("bob-phone", "bob-phone-secret")),
    );
    o.set_last_will(v4::LastWill::new(
        "public/will",
        "gone",
        v4::QoS::AtLeastOnce,
        false,
    ));
    let willing = v4::connect_with(o).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(broker_connections(&server), 1.0);
    // ... and the will still goes when the device drops.
    willing.kill();
    assert_eq!(fit.next_publish().await.payload.as_ref(), b"gone");

    // A DISCONNECT from a device without a broker connection opens none.
    wait_for_broker_connections(&server, 1.0).await;
    v4_dev.disconnect().await;
    v5_dev.disconnect().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(broker_connections(&server), 1.0);
}

#[tokio::test]
async fn a_new_connection_with_the_same_client_id_takes_the_session_over() {
    let server = Server::start(Setup {
        extra: MARKER_ACL.into(),
        ..Default::default()
    });
    let mut fit = v5::connect(server.mqtt, "fit-to", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("public/#", v5::QoS::AtLeastOnce).await;

    // Neither session has a broker connection: consentry itself must see
    // the second CONNECT take the first one's place (MQTT 5 reason 0x8E).
    let mut first = v5::connect(server.mqtt, "same", "alice-watch", "alice-watch-secret").await;
    let mut second = v5::connect(server.mqtt, "same", "alice-watch", "alice-watch-secret").await;
    let reason = loop {
        if let v5::Packet::Disconnect(d) = first.next().await {
            break d.reason_code;
        }
    };
    assert_eq!(reason, v5::DisconnectReasonCode::SessionTakenOver);
    let r = second.publish_acked("public/x", b"still here").await;
    assert_eq!(r, v5::PubAckReason::Success);
    assert_eq!(fit.next_publish().await.payload.as_ref(), b"still here");

    // The same client id under another login is another session.
    let _bob = v4::connect(server.mqtt, "same", "bob-phone", "bob-phone-secret").await;
    let r = second.publish_acked("public/y", b"not taken").await;
    assert_eq!(r, v5::PubAckReason::Success);

    // MQTT 3.1.1 has no DISCONNECT from the server: the connection closes.
    let mut old = v4::connect(server.mqtt, "v4-same", "bob-phone", "bob-phone-secret").await;
    let _new = v4::connect(server.mqtt, "v4-same", "bob-phone", "bob-phone-secret").await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while old.events.recv().await.is_some() {}
    })
    .await;
    assert!(
        closed.is_ok(),
        "the taken-over 3.1.1 connection stayed open"
    );
}

/// rumqttd 0.20 can end a new connection when another client's clean
/// disconnect reaches it at the wrong moment (README, "Embedded rumqttd");
/// clients coming and going over both MQTT versions are not dropped.
#[tokio::test]
async fn clients_coming_and_going_are_not_dropped() {
    const ROUNDS: usize = 40;
    let server = Server::demo();
    let addr = server.mqtt;
    let logins = [
        ("alice-watch", "alice-watch-secret", 4),
        ("bob-phone", "bob-phone-secret", 5),
        ("fitcoach", "fitcoach-secret", 4),
        ("insureco", "insureco-secret", 5),
    ];
    let clients: Vec<_> = logins
        .into_iter()
        .map(|(user, pass, version)| {
            tokio::spawn(async move {
                let topic = format!("public/churn/{user}");
                for n in 0..ROUNDS {
                    // Each publish opens the session's broker connection;
                    // each DISCONNECT ends it.
                    if version == 4 {
                        let mut c = v4::connect(addr, user, user, pass).await;
                        c.client
                            .publish(&topic, v4::QoS::AtLeastOnce, false, n.to_string())
                            .await
                            .unwrap();
                        while !matches!(c.next().await, v4::Packet::PubAck(_)) {}
                        c.disconnect().await;
                    } else {
                        let mut c = v5::connect(addr, user, user, pass).await;
                        c.client
                            .publish(&topic, v5::QoS::AtLeastOnce, false, n.to_string())
                            .await
                            .unwrap();
                        while !matches!(c.next().await, v5::Packet::PubAck(_)) {}
                        c.disconnect().await;
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.await.expect("a client's session was dropped");
    }
    let dropped = server.metric("consentry_protocol_errors_total", &[("kind", "upstream")]);
    assert_eq!(dropped, 0.0, "{}", server.log());
    assert_eq!(
        server.metric("consentry_connections_total", &[("result", "accepted")]),
        (4 * ROUNDS) as f64
    );
}

/// The bug this guards: rumqttd 0.20 does not remove a `$share/…`
/// subscription on UNSUBSCRIBE, so a provider kept getting what it had
/// unsubscribed from. A session that is not persistent knows its filters,
/// and consentry drops what matches none of them.
#[tokio::test]
async fn an_unsubscribed_shared_filter_delivers_no_more() {
    let server = Server::demo();
    let hr = "pii/alice/alice-watch/heart_rate";
    let shared = "$share/g/pii/+/+/heart_rate";
    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    fit.subscribe(shared, v5::QoS::AtLeastOnce).await;
    fit.subscribe("public/marker", v5::QoS::AtMostOnce).await;
    let mut watch = v5::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    watch.publish_acked(hr, br#"{"bpm":70}"#).await;
    assert_eq!(fit.next_publish().await.topic, hr.as_bytes());

    fit.client.unsubscribe(shared).await.unwrap();
    loop {
        if let v5::Packet::UnsubAck(_) = fit.next().await {
            break;
        }
    }
    watch.publish_acked(hr, br#"{"bpm":71}"#).await;
    watch.publish_acked("public/marker", b"m").await;
    let got = fit.publishes_until("public/marker").await;
    assert_eq!(got.len(), 1, "delivered after UNSUBSCRIBE: {got:?}");
    let unsubscribed = [("result", "dropped"), ("reason", "unsubscribed")];
    assert_eq!(
        server.metric("consentry_deliveries_total", &unsubscribed),
        1.0,
        "rumqttd no longer sends it: the check may be unneeded"
    );
}

/// fitcoach connecting with clean start 0 and `expiry` (`None`: 0).
async fn fitcoach_resuming(server: &Server, id: &str, expiry: Option<u32>) -> v5::Client {
    let mut o = v5::options(server.mqtt, id, Some(("fitcoach", "fitcoach-secret")));
    o.set_clean_start(false);
    o.set_session_expiry_interval(expiry);
    v5::connect_with(o).await.unwrap()
}

/// The bug this guards: a session resumed with clean start 0 and session
/// expiry 0 is not persistent, but holds the filters of the session it
/// resumed; consentry took it for one that knows all its filters, and
/// dropped (and acknowledged to the broker) every message on them, those
/// queued while the client was away among them, as `unsubscribed`.
#[tokio::test]
async fn a_session_resumed_with_expiry_0_gets_what_it_subscribed_to_before() {
    let server = Server::demo();
    let hr = "pii/alice/alice-watch/heart_rate";
    let mut fit = fitcoach_resuming(&server, "fit-resume", Some(300)).await;
    fit.subscribe("pii/alice/+/heart_rate", v5::QoS::AtLeastOnce)
        .await;
    fit.disconnect().await;

    let mut watch = v5::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    watch.publish_acked(hr, br#"{"bpm":61}"#).await;

    let mut fit = fitcoach_resuming(&server, "fit-resume", None).await;
    assert_eq!(fit.next_publish().await.payload, &br#"{"bpm":61}"#[..]);
    watch.publish_acked(hr, br#"{"bpm":62}"#).await;
    assert_eq!(fit.next_publish().await.payload, &br#"{"bpm":62}"#[..]);
    let unsubscribed = [("result", "dropped"), ("reason", "unsubscribed")];
    assert_eq!(
        server.metric("consentry_deliveries_total", &unsubscribed),
        0.0
    );
}

/// The bug this guards: a session resumed with clean start 0 and session
/// expiry 0 was answered "no subscription existed" (0x11) on UNSUBSCRIBE of
/// a filter it held from the session it resumed.
#[tokio::test]
async fn a_session_resumed_with_expiry_0_is_told_its_unsubscribe_succeeded() {
    let server = Server::demo();
    let filter = "pii/alice/+/heart_rate";
    let mut fit = fitcoach_resuming(&server, "fit-unsub", Some(300)).await;
    fit.subscribe(filter, v5::QoS::AtLeastOnce).await;
    fit.disconnect().await;

    let mut fit = fitcoach_resuming(&server, "fit-unsub", None).await;
    fit.client.unsubscribe(filter).await.unwrap();
    loop {
        if let v5::Packet::UnsubAck(a) = fit.next().await {
            assert_eq!(
                a.reasons,
                vec![rumqttc::v5::mqttbytes::v5::UnsubAckReason::Success]
            );
            break;
        }
    }
}

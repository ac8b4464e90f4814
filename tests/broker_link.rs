//! End to end: sessions reach the embedded rumqttd in memory (the default)
//! or over loopback TCP, and what rumqttd's own listener did for a
//! connection the in-memory bridge does too.

mod common;

use std::time::Duration;

use common::{v5, Server, Setup, MARKER_ACL};

const BOB: (&str, &str) = ("bob-phone", "bob-phone-secret");

fn will_after(delay: Option<u32>) -> v5::LastWill {
    v5::LastWill::new(
        "public/will",
        "gone",
        v5::QoS::AtLeastOnce,
        false,
        delay.map(v5::will_delay),
    )
}

fn server_with(replace: &[(&str, &str)]) -> Server {
    Server::start(Setup {
        extra: MARKER_ACL.into(),
        replace: replace
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        ..Default::default()
    })
}

/// A provider session that sees every message on `public/#` at QoS 1.
async fn watch_public(server: &Server) -> v5::Client {
    let mut watcher = v5::connect(server.mqtt, "watch", "fitcoach", "fitcoach-secret").await;
    watcher.subscribe("public/#", v5::QoS::AtLeastOnce).await;
    watcher
}

/// A device session with a will, so that it has a broker connection from
/// its CONNECT on.
async fn device_with_will(server: &Server, id: &str, delay: Option<u32>) -> v5::Client {
    let mut o = v5::options(server.mqtt, id, Some(("bob-phone", "bob-phone-secret")));
    o.set_last_will(will_after(delay));
    v5::connect_with(o).await.unwrap()
}

/// A local link has no socket for rumqttd to see close: unless the bridge
/// ends the router's connection, every session would stay in the router for
/// good, and the router refuses connections past `broker.max_connections`.
#[tokio::test]
async fn ended_sessions_leave_the_router() {
    let server = server_with(&[("max_connections = 100000", "max_connections = 4")]);
    let mut watcher = watch_public(&server).await;
    for i in 0..12 {
        let mut dev = device_with_will(&server, &format!("churn-{i}"), None).await;
        let topic = format!("public/churn/{i}");
        assert_eq!(
            dev.publish_acked(&topic, b"x").await,
            v5::PubAckReason::Success,
            "session {i}"
        );
        assert_eq!(watcher.next_publish().await.topic, topic.as_bytes());
        if i % 2 == 0 {
            dev.disconnect().await;
        } else {
            // Without DISCONNECT: the will is published, then the link ends.
            dev.kill();
            assert_eq!(watcher.next_publish().await.topic, &b"public/will"[..]);
        }
    }
}

#[tokio::test]
async fn a_will_waits_its_delay_and_a_resumed_session_cancels_it() {
    let server = server_with(&[]);
    let mut watcher = watch_public(&server).await;
    let mut marker = v5::connect(server.mqtt, "mark", "alice-watch", "alice-watch-secret").await;

    // Killed with a 2 s will delay and a session that outlives it: a
    // message published right after comes first, the will after it.
    let mut o = v5::options(
        server.mqtt,
        "dying",
        Some(("bob-phone", "bob-phone-secret")),
    );
    o.set_session_expiry_interval(Some(60));
    o.set_last_will(will_after(Some(2)));
    v5::connect_with(o).await.unwrap().kill();
    marker.publish_acked("public/marker/1", b"m").await;
    assert_eq!(watcher.next_publish().await.topic, &b"public/marker/1"[..]);
    assert_eq!(watcher.next_publish().await.topic, &b"public/will"[..]);

    // A will delay longer than the session: the session ends with the
    // connection, and the will goes then, before the marker.
    device_with_will(&server, "short-lived", Some(30))
        .await
        .kill();
    let will = watcher.next_publish().await;
    assert_eq!(will.topic, &b"public/will"[..]);
    marker.publish_acked("public/marker/0", b"m").await;
    assert_eq!(watcher.next_publish().await.topic, &b"public/marker/0"[..]);

    // Killed again, and back within the delay resuming its session: the
    // will is not published (MQTT 5 3.1.3.2.2).
    let mut o = v5::options(
        server.mqtt,
        "dying-2",
        Some(("bob-phone", "bob-phone-secret")),
    );
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(60));
    o.set_last_will(will_after(Some(2)));
    v5::connect_with(o.clone()).await.unwrap().kill();
    let back = v5::connect_with(o).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    marker.publish_acked("public/marker/2", b"m").await;
    assert_eq!(watcher.next_publish().await.topic, &b"public/marker/2"[..]);
    back.disconnect().await;
}

/// `broker.embedded_transport = "tcp"` keeps the loopback relay working.
#[tokio::test]
async fn the_loopback_transport_still_relays() {
    let server = server_with(&[(
        "embedded_transport = \"link\"",
        "embedded_transport = \"tcp\"",
    )]);
    assert!(server
        .log()
        .contains("embedded rumqttd listening on loopback"));
    let mut watcher = watch_public(&server).await;
    let mut dev = device_with_will(&server, "tcp-dev", None).await;
    assert_eq!(
        dev.publish_acked("public/over-tcp", b"x").await,
        v5::PubAckReason::Success
    );
    assert_eq!(watcher.next_publish().await.topic, &b"public/over-tcp"[..]);
    dev.kill();
    assert_eq!(watcher.next_publish().await.topic, &b"public/will"[..]);
    assert!(server.log().contains("in_memory=false"));
}

#[tokio::test]
async fn a_qos_2_will_is_published() {
    let server = server_with(&[]);
    let mut watcher = v5::connect(server.mqtt, "watch", "fitcoach", "fitcoach-secret").await;
    watcher.subscribe("public/#", v5::QoS::ExactlyOnce).await;
    let mut o = v5::options(
        server.mqtt,
        "dying",
        Some(("bob-phone", "bob-phone-secret")),
    );
    o.set_last_will(v5::LastWill::new(
        "public/will",
        "gone",
        v5::QoS::ExactlyOnce,
        false,
        None,
    ));
    v5::connect_with(o).await.unwrap().kill();
    let will = watcher.next_publish().await;
    assert_eq!(
        (will.topic.as_ref(), will.qos),
        (&b"public/will"[..], v5::QoS::ExactlyOnce)
    );
}

/// rumqttd's MQTT 3.1.1 encoder panics on a packet with properties; an MQTT
/// 5 publisher's user property must not cost a 3.1.1 subscriber its
/// connection or the message.
#[tokio::test]
async fn an_mqtt5_publish_with_properties_reaches_an_mqtt311_subscriber() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let server = server_with(&[]);
    let mut old = common::v4::connect(server.mqtt, "old", "fitcoach", "fitcoach-secret").await;
    old.subscribe("public/#", common::v4::QoS::AtLeastOnce)
        .await;
    let mut publ = v5::connect(server.mqtt, "new", "alice-watch", "alice-watch-secret").await;
    let props = PublishProperties {
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    publ.client
        .publish_with_properties("public/p", v5::QoS::AtLeastOnce, false, &b"one"[..], props)
        .await
        .unwrap();
    assert_eq!(old.next_publish().await.payload.as_ref(), b"one");
    publ.publish_acked("public/q", b"two").await;
    assert_eq!(old.next_publish().await.payload.as_ref(), b"two");
}

/// A subscriber whose receive window is full goes on publishing: consentry
/// stops reading its deliveries but not its publishes, so the in-memory
/// pipe's two ways must never wait on each other.
#[tokio::test]
async fn a_full_receive_window_does_not_stall_the_subscribers_publishes() {
    let server = server_with(&[]);
    let mut o = v5::options(server.mqtt, "slow", Some(("fitcoach", "fitcoach-secret")));
    o.set_receive_maximum(Some(1));
    o.set_manual_acks(true);
    let mut fit = v5::connect_with(o).await.unwrap();
    fit.subscribe("public/x", v5::QoS::AtLeastOnce).await;
    let publ = v5::connect(server.mqtt, "bulk", "alice-watch", "alice-watch-secret").await;
    const N: usize = 300;
    let big = vec![b'a'; 10_000];
    for _ in 0..N {
        publ.client
            .publish("public/x", v5::QoS::AtLeastOnce, false, big.clone())
            .await
            .unwrap();
    }
    let first = fit.next_publish().await;
    // 3 MB from the subscriber while its one delivery waits for its ack.
    for _ in 0..N {
        fit.client
            .publish("public/y", v5::QoS::AtMostOnce, false, big.clone())
            .await
            .unwrap();
    }
    fit.client.ack(&first).await.unwrap();
    for _ in 1..N {
        let p = fit.next_publish().await;
        fit.client.ack(&p).await.unwrap();
    }
}

/// A connection taken over by its client id ends without DISCONNECT: its
/// own will is published (MQTT 3.1.1 3.1.2.5), not the newcomer's.
#[tokio::test]
async fn a_taken_over_connection_leaves_its_will() {
    use common::v4;
    let server = server_with(&[]);
    let mut watcher = watch_public(&server).await;
    let with_will = |payload: &str| {
        let mut o = v4::options(
            server.mqtt,
            "twice",
            Some(("bob-phone", "bob-phone-secret")),
        );
        o.set_clean_session(false);
        o.set_last_will(v4::LastWill::new(
            "public/will",
            payload,
            v4::QoS::AtLeastOnce,
            false,
        ));
        o
    };
    let _old = v4::connect_with(with_will("old")).await.unwrap();
    let _new = v4::connect_with(with_will("new")).await.unwrap();
    let will = watcher.next_publish().await;
    assert_eq!(will.payload.as_ref(), b"old");
}

/// Two wills of one client id due at once: a takeover's old connection
/// and the newcomer, both ending without DISCONNECT. Their links share an
/// id at the router, so each must be read before the next takes it.
#[tokio::test]
async fn two_wills_of_one_client_id_due_at_once_are_both_published() {
    use std::collections::HashSet;
    let server = server_with(&[]);
    let mut watcher = watch_public(&server).await;
    let with_will = |payload: String| {
        let mut o = v5::options(
            server.mqtt,
            "racing",
            Some(("bob-phone", "bob-phone-secret")),
        );
        o.set_last_will(v5::LastWill::new(
            "public/will",
            payload,
            v5::QoS::AtLeastOnce,
            false,
            None,
        ));
        o
    };
    let mut want = HashSet::new();
    for i in 0..20 {
        let a = v5::connect_with(with_will(format!("a{i}"))).await.unwrap();
        let b = v5::connect_with(with_will(format!("b{i}"))).await.unwrap();
        b.kill();
        a.kill();
        want.extend([format!("a{i}"), format!("b{i}")]);
    }
    let mut got = HashSet::new();
    while got.len() < want.len() {
        let p = watcher.next_publish().await;
        got.insert(String::from_utf8(p.payload.to_vec()).unwrap());
    }
    assert_eq!(got, want);
}

/// MQTT 5 3.14.2.1: a DISCONNECT with reason 0x04 ends the connection and
/// still publishes the will; a DISCONNECT may also shorten the session
/// expiry, and the will then waits no longer than the session.
#[tokio::test]
async fn a_disconnect_that_asks_for_the_will_gets_it() {
    let server = server_with(&[]);
    let mut watcher = watch_public(&server).await;

    v5::disconnect_with_will(
        server.mqtt,
        "asks",
        BOB,
        (None, None),
        will_after(None),
        async {},
    )
    .await;
    assert_eq!(watcher.next_publish().await.topic, &b"public/will"[..]);

    // A 60 s session and a 30 s will delay, the session ended by the
    // DISCONNECT: the will goes at once. (`next_publish` gives up after
    // 10 s, so a will that waited its delay fails here. A marker published
    // after the DISCONNECT raced the will's own link to the router.)
    v5::disconnect_with_will(
        server.mqtt,
        "asks-2",
        BOB,
        (Some(60), Some(0)),
        will_after(Some(30)),
        async {},
    )
    .await;
    assert_eq!(watcher.next_publish().await.topic, &b"public/will"[..]);
}

/// A clean return with no will and nothing to send gets no broker
/// connection yet (README, "Lazy broker connections"), but it still ends
/// the earlier session: a will waiting out its delay goes at once (MQTT 5
/// 3.1.2.4, 3.1.3.2.2), not when its delay ends.
#[tokio::test]
async fn a_lazy_clean_return_publishes_the_waiting_will() {
    let server = server_with(&[]);
    let mut watcher = watch_public(&server).await;
    let mut marker = v5::connect(server.mqtt, "mark", "alice-watch", "alice-watch-secret").await;

    let creds = Some(("bob-phone", "bob-phone-secret"));
    let mut o = v5::options(server.mqtt, "comes-back", creds);
    o.set_session_expiry_interval(Some(60));
    o.set_last_will(will_after(Some(30)));
    v5::connect_with(o).await.unwrap().kill();
    // The will waits: a marker published now arrives alone.
    marker.publish_acked("public/marker/0", b"m").await;
    assert_eq!(watcher.next_publish().await.topic, &b"public/marker/0"[..]);

    // Back with a clean start, no will, no session expiry: the will goes
    // now. (`next_publish` gives up long before the 30 s delay.)
    let back = v5::connect_with(v5::options(server.mqtt, "comes-back", creds))
        .await
        .unwrap();
    assert_eq!(watcher.next_publish().await.topic, &b"public/will"[..]);
    back.disconnect().await;
}

/// The wills of one client id go in the order they fell due: ten
/// connections, each taking over the one before with a retained will, leave
/// the last one's will as the retained value (MQTT 5 3.3.1.3).
#[tokio::test]
async fn the_wills_of_one_client_id_go_in_order() {
    let server = server_with(&[]);
    let mut watcher = watch_public(&server).await;
    v5::takeovers_with_retained_wills(server.mqtt, "in-turn", BOB, "public/state", 10).await;
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(String::from_utf8(watcher.next_publish().await.payload.to_vec()).unwrap());
    }
    let want: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
    assert_eq!(got, want);
    let mut late = v5::connect(server.mqtt, "late", "insureco", "insureco-secret").await;
    late.subscribe("public/state", v5::QoS::AtLeastOnce).await;
    assert_eq!(late.next_publish().await.payload.as_ref(), b"w9");
}

/// MQTT lets a client id be any UTF-8 string up to 65 535 bytes; rumqttd
/// refuses `+ $ # /` in one, and consentry's namespaced id (and its will
/// connection's) is longer than the client's. Both still reach the broker.
#[tokio::test]
async fn any_client_id_reaches_the_embedded_broker() {
    let server = server_with(&[]);
    let mut watcher = watch_public(&server).await;
    for id in ["a/b/+/#".to_string(), "$SYS".into(), "x".repeat(65_000)] {
        let mut o = v5::options(server.mqtt, &id, Some(BOB));
        o.set_last_will(v5::LastWill::new(
            "public/will",
            "gone",
            v5::QoS::AtLeastOnce,
            false,
            None,
        ));
        let mut dev = v5::connect_with(o).await.unwrap();
        let short = &id[..id.len().min(8)];
        assert_eq!(
            dev.publish_acked("public/odd", short.as_bytes()).await,
            v5::PubAckReason::Success,
            "{short}"
        );
        assert_eq!(
            watcher.next_publish().await.payload.as_ref(),
            short.as_bytes()
        );
        dev.kill();
        assert_eq!(
            watcher.next_publish().await.payload.as_ref(),
            b"gone",
            "{short}: the will"
        );
    }
}

/// A DISCONNECT may not set a Session Expiry Interval when the CONNECT had
/// none (MQTT-3.14.2-2): the server answers DISCONNECT 0x82, and since the
/// connection did not end with a valid DISCONNECT, the will is published
/// (an outside review found the will dropped as after a normal one).
#[tokio::test]
async fn a_disconnect_that_sets_an_expiry_the_connect_did_not_is_a_protocol_error() {
    use bytes::BytesMut;
    use rumqttc::v5::mqttbytes::v5::{
        Connect, Disconnect, DisconnectProperties, DisconnectReasonCode, Login, Packet,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = server_with(&[]);
    let mut watcher = watch_public(&server).await;
    let mut s = tokio::net::TcpStream::connect(server.mqtt).await.unwrap();
    let mut out = BytesMut::new();
    Packet::Connect(
        Connect {
            keep_alive: 30,
            client_id: "expiry-later".into(),
            clean_start: true,
            properties: None,
        },
        Some(will_after(None)),
        Some(Login::new(BOB.0, BOB.1)),
    )
    .write(&mut out, None)
    .unwrap();
    Packet::Disconnect(Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
        properties: Some(DisconnectProperties {
            session_expiry_interval: Some(100),
            reason_string: None,
            user_properties: vec![],
            server_reference: None,
        }),
    })
    .write(&mut out, None)
    .unwrap();
    s.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    loop {
        if let Ok(p) = Packet::read(&mut buf, None) {
            got.push(p);
            continue;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read_buf(&mut buf))
            .await
            .expect("answered and closed within 10 s");
        if !n.is_ok_and(|n| n > 0) {
            break;
        }
    }
    assert!(matches!(got.first(), Some(Packet::ConnAck(_))), "{got:?}");
    match got.get(1) {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, DisconnectReasonCode::ProtocolError)
        }
        other => panic!("expected DISCONNECT 0x82, got {other:?}"),
    }
    assert_eq!(watcher.next_publish().await.topic, &b"public/will"[..]);
}

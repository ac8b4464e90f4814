//! End to end: sessions reach the embedded rumqttd in memory (the default)
//! or over loopback TCP, and what rumqttd's own listener did for a
//! connection the in-memory bridge does too.

mod common;

use std::time::Duration;

use common::{v5, Server, Setup, MARKER_ACL};
use rumqttc::v5::mqttbytes::v5::LastWillProperties;

fn will_after(delay: Option<u32>) -> v5::LastWill {
    v5::LastWill::new(
        "public/will",
        "gone",
        v5::QoS::AtLeastOnce,
        false,
        delay.map(|d| LastWillProperties {
            delay_interval: Some(d),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: vec![],
        }),
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
    let mut watcher = v5::connect(server.mqtt, "watch", "fitcoach", "fitcoach-secret").await;
    watcher.subscribe("public/#", v5::QoS::AtLeastOnce).await;
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
    let mut watcher = v5::connect(server.mqtt, "watch", "fitcoach", "fitcoach-secret").await;
    watcher.subscribe("public/#", v5::QoS::AtLeastOnce).await;
    let mut marker = v5::connect(server.mqtt, "mark", "alice-watch", "alice-watch-secret").await;

    // Killed with a 2 s will delay: a message published right after comes
    // first, the will after it.
    device_with_will(&server, "dying", Some(2)).await.kill();
    marker.publish_acked("public/marker/1", b"m").await;
    assert_eq!(watcher.next_publish().await.topic, &b"public/marker/1"[..]);
    assert_eq!(watcher.next_publish().await.topic, &b"public/will"[..]);

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
    let mut watcher = v5::connect(server.mqtt, "watch", "fitcoach", "fitcoach-secret").await;
    watcher.subscribe("public/#", v5::QoS::AtLeastOnce).await;
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

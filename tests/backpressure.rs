//! End to end: a subscriber that falls behind holds the publishers its
//! messages come from, instead of the embedded broker growing or evicting
//! acknowledged messages; a subscriber that reads nothing at all is
//! disconnected so that it cannot hold them forever.

mod common;

use std::time::Duration;

use common::{v5, Server, Setup, MARKER_ACL};

const MESSAGES: usize = 3000;
const PAYLOAD: usize = 1024;

/// Limits small enough for a test: 1 MiB of lag is about 1000 messages here.
fn server(slow_subscriber_secs: u64) -> Server {
    Server::start(Setup {
        extra: MARKER_ACL.into(),
        replace: vec![
            ("log_segment_mib = 16".into(), "log_segment_mib = 1".into()),
            (
                "max_subscriber_lag_mib = 32".into(),
                "max_subscriber_lag_mib = 1".into(),
            ),
            (
                "slow_subscriber_secs = 10".into(),
                format!("slow_subscriber_secs = {slow_subscriber_secs}"),
            ),
        ],
        ..Default::default()
    })
}

/// A provider that takes one message and acknowledges nothing until told:
/// consentry may not send a client more than its Receive Maximum, so it
/// stops reading the broker on the provider's behalf.
async fn stalled_provider(server: &Server) -> v5::Client {
    let mut o = v5::options(
        server.mqtt,
        "slow-fit",
        Some(("fitcoach", "fitcoach-secret")),
    );
    o.set_manual_acks(true);
    o.set_receive_maximum(Some(1));
    let mut fit = v5::connect_with(o).await.unwrap();
    let codes = fit.subscribe("public/#", v5::QoS::AtLeastOnce).await;
    assert_eq!(
        codes,
        vec![v5::SubscribeReasonCode::Success(v5::QoS::AtLeastOnce)]
    );
    fit
}

/// Queues `MESSAGES` QoS 1 publishes and returns the device.
async fn flood(server: &Server) -> v5::Client {
    let dev = v5::connect(server.mqtt, "flood", "alice-watch", "alice-watch-secret").await;
    let payload = vec![b'x'; PAYLOAD];
    for i in 0..MESSAGES {
        dev.client
            .publish(
                format!("public/{i}"),
                v5::QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .await
            .unwrap();
    }
    dev
}

/// Counts the device's PUBACKs until `want` or until none came for `quiet`.
async fn count_acks(dev: &mut v5::Client, have: &mut usize, want: usize, quiet: Duration) {
    while *have < want {
        match tokio::time::timeout(quiet, dev.events.recv()).await {
            Ok(Some(v5::Packet::PubAck(a))) => {
                assert_eq!(a.reason, v5::PubAckReason::Success);
                *have += 1;
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("device connection closed"),
            Err(_) => return,
        }
    }
}

#[tokio::test]
async fn a_lagging_subscriber_holds_the_publisher_and_nothing_acknowledged_is_lost() {
    let server = server(600);
    let mut fit = stalled_provider(&server).await;
    let mut dev = flood(&server).await;

    let mut acked = 0;
    count_acks(&mut dev, &mut acked, MESSAGES, Duration::from_secs(2)).await;
    assert!(
        acked < MESSAGES,
        "all {MESSAGES} publishes were acknowledged while the subscriber read nothing"
    );
    assert!(
        acked > 0,
        "the publisher was held before anything got through"
    );
    assert!(server.metric("consentry_publisher_holds_total", &[]) >= 1.0);

    // The subscriber catches up: every message arrives once, in order, and
    // the held publisher gets every acknowledgement.
    let mut got = Vec::new();
    while got.len() < MESSAGES {
        let p = fit.next_publish().await;
        got.push(String::from_utf8(p.topic.to_vec()).unwrap());
        fit.client.ack(&p).await.unwrap();
    }
    let want: Vec<String> = (0..MESSAGES).map(|i| format!("public/{i}")).collect();
    assert_eq!(got, want);
    count_acks(&mut dev, &mut acked, MESSAGES, Duration::from_secs(10)).await;
    assert_eq!(acked, MESSAGES);
    assert_eq!(
        server.metric("consentry_slow_consumers_disconnected_total", &[]),
        0.0
    );
}

#[tokio::test]
async fn a_subscriber_that_reads_nothing_is_disconnected_and_releases_the_publisher() {
    let server = server(1);
    let mut fit = stalled_provider(&server).await;
    let mut dev = flood(&server).await;

    let mut acked = 0;
    count_acks(&mut dev, &mut acked, MESSAGES, Duration::from_secs(20)).await;
    assert_eq!(acked, MESSAGES, "the publisher stayed held");
    // The stalled provider was told why (MQTT 5 reason 0x97).
    let reason = loop {
        match fit.next().await {
            v5::Packet::Disconnect(d) => break d.reason_code,
            _ => continue,
        }
    };
    assert_eq!(reason, v5::DisconnectReasonCode::QuotaExceeded);
    assert_eq!(
        server.metric("consentry_slow_consumers_disconnected_total", &[]),
        1.0
    );
    // consentry says why it cut the subscriber off; its broker connection,
    // with the broker's unread messages in it, is closed without a reset,
    // so the embedded broker has no error to log.
    assert!(server.log().contains("disconnecting a slow consumer"));
    for _ in 0..10 {
        let log = server.log();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
        assert!(errors.is_empty(), "errors logged: {errors:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

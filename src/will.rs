//! Wills, kept by consentry: the broker never holds one.
//!
//! A will is personal data collected when it is published, not when the
//! device connects (X.1363 10.1). By then the user may have withdrawn that
//! collection, its window may have closed, the device may be unbound. A
//! broker that held the will would publish it whatever consentry would
//! decide then; and in front of an external broker, if consentry itself
//! died, the broker would publish the wills of all its sessions undecided.
//!
//! So a session sends the broker its CONNECT without the will and keeps
//! the will itself. When the will is due (the connection ended without a
//! DISCONNECT that drops it, and its delay passed unless the client id came
//! back first, MQTT 5 3.1.2.5 and 3.1.3.2.2), consentry decides it again
//! and publishes it over a broker connection of its own. If consentry dies,
//! the wills it keeps are lost rather than published undecided, as they
//! are with the embedded broker, which dies with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill, PubRel, Publish,
    PublishProperties,
};
use rumqttc::v5::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::act::Principal;
use crate::broker::Conn;
use crate::client_ids::Claim;
use crate::codec::{Packet, Version};
use crate::metrics as m;
use crate::session::{decide_ingress, linger, Shared};
use crate::topic::TopicName;

/// How long publishing a due will may take, from dialling the broker to
/// its last acknowledgement.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The packet id of a will's PUBLISH, on a connection of its own.
const PKID: u16 = 1;

/// A will as the session keeps it.
#[derive(Debug, Clone)]
pub struct Will {
    topic: String,
    /// As ingress let it through at CONNECT: minimized.
    payload: Bytes,
    qos: QoS,
    retain: bool,
    properties: Option<PublishProperties>,
    /// Seconds (MQTT 5): the will waits no longer than either.
    delay: u32,
    session_expiry: u32,
}

impl Will {
    /// `will` from a CONNECT whose session expiry is `session_expiry`
    /// seconds, with the payload ingress let through.
    pub fn new(will: LastWill, topic: &str, payload: Bytes, session_expiry: u32) -> Will {
        let delay = will
            .properties
            .as_ref()
            .and_then(|p| p.delay_interval)
            .unwrap_or(0);
        let properties = will.properties.map(|p| PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            ..Default::default()
        });
        Will {
            topic: topic.to_string(),
            payload,
            qos: will.qos,
            retain: will.retain,
            properties,
            delay,
            session_expiry,
        }
    }

    /// A DISCONNECT that asks for the will (MQTT 5 reason 0x04) may also
    /// set the session expiry, and the will waits no longer than the
    /// session.
    pub fn set_session_expiry(&mut self, secs: u32) {
        self.session_expiry = secs;
    }

    /// How long after the connection's end the will is due.
    pub fn wait(&self) -> Duration {
        Duration::from_secs(self.delay.min(self.session_expiry).into())
    }

    fn publish(&self, payload: Bytes) -> Publish {
        let mut p = Publish::new(
            self.topic.as_str(),
            self.qos,
            payload,
            self.properties.clone(),
        );
        p.retain = self.retain;
        if self.qos != QoS::AtMostOnce {
            p.pkid = PKID;
        }
        p
    }
}

/// One will of a client id is published at a time: their connections
/// share an id derived from the client id, and at a broker the second
/// would take the first over.
#[derive(Debug, Default)]
pub struct Turns(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl Turns {
    fn of(&self, client_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut turns = self.0.lock().unwrap_or_else(|e| e.into_inner());
        turns.entry(client_id.to_string()).or_default().clone()
    }

    /// Forgets `client_id`'s turn once nobody else waits for it.
    fn done(&self, client_id: &str, turn: Arc<tokio::sync::Mutex<()>>) {
        let mut turns = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // The map's and this one.
        if Arc::strong_count(&turn) == 2 {
            turns.remove(client_id);
        }
    }
}

/// Takes over the will of a session that ended without a DISCONNECT that
/// drops it: waits until it is due, decides it again and publishes it.
/// `claim` is the session's claim on its client id, held meanwhile so that
/// a connection taking the id over is seen.
pub async fn keep(shared: Arc<Shared>, who: Principal, version: Version, claim: Claim, will: Will) {
    let wait = will.wait();
    let due = if wait.is_zero() {
        true
    } else if !shared.client_ids.holds(&claim) {
        // Taken over already: a new session ends this one and its will
        // goes now; a resumed one was back before the delay ended.
        !claim.successor_resumed()
    } else {
        tokio::select! {
            () = tokio::time::sleep(wait) => true,
            () = claim.taken_over.notified() => !claim.successor_resumed(),
        }
    };
    shared.client_ids.release(&claim);
    if !due {
        tracing::debug!(
            client_id = claim.id,
            "will dropped: the session was resumed"
        );
        return;
    }
    let decided = match TopicName::new(&will.topic) {
        Some(name) => decide_ingress(&shared, &who, name, &will.payload),
        None => Err(crate::act::Deny::Invalid.as_str()),
    };
    let payload = match decided {
        Ok(p) => p,
        Err(deny) => {
            tracing::info!(
                client_id = claim.id,
                reason = deny,
                "will message refused when due"
            );
            metrics::counter!(m::PUBLISHES, "result" => "dropped", "reason" => deny).increment(1);
            return;
        }
    };
    let turn = shared.wills.of(&claim.id);
    let sent = {
        let _turn = turn.lock().await;
        let publish = will.publish(payload);
        tokio::time::timeout(SEND_TIMEOUT, send(&shared, version, &claim.id, publish)).await
    };
    shared.wills.done(&claim.id, turn);
    match sent {
        Ok(Ok(())) => shared.hot.forwarded.increment(1),
        Ok(Err(e)) => not_sent(&claim.id, &e.to_string()),
        Err(_) => not_sent(&claim.id, "timed out"),
    }
}

fn not_sent(client_id: &str, error: &str) {
    tracing::warn!(
        client_id,
        error,
        "will not published: the broker did not take it"
    );
    metrics::counter!(m::PUBLISHES, "result" => "dropped", "reason" => "broker_unavailable")
        .increment(1);
}

/// Publishes `publish` as `client_id`'s will over a connection of its own,
/// through the whole QoS flow, and lets the broker close it.
async fn send(
    shared: &Shared,
    version: Version,
    client_id: &str,
    publish: Publish,
) -> std::io::Result<()> {
    let connect = rumqttc::v5::mqttbytes::v5::Connect {
        keep_alive: 30,
        // Unlike every session's, which start with the role.
        client_id: format!("will:{client_id}"),
        clean_start: true,
        properties: None,
    };
    let (mut up, mut buf, ack) = shared.upstream.dial(version, connect).await?;
    if ack.code != ConnectReturnCode::Success {
        return Err(std::io::Error::other(format!(
            "broker refused CONNECT: {:?}",
            ack.code
        )));
    }
    let qos = publish.qos;
    write(&mut up, version, &Packet::Publish(publish)).await?;
    match qos {
        QoS::AtMostOnce => {}
        QoS::AtLeastOnce => {
            answer(&mut up, &mut buf, version, |p| {
                matches!(p, Packet::PubAck(_))
            })
            .await?;
        }
        QoS::ExactlyOnce => {
            answer(&mut up, &mut buf, version, |p| {
                matches!(p, Packet::PubRec(_))
            })
            .await?;
            write(&mut up, version, &Packet::PubRel(PubRel::new(PKID, None))).await?;
            answer(&mut up, &mut buf, version, |p| {
                matches!(p, Packet::PubComp(_))
            })
            .await?;
        }
    }
    let bye = Disconnect::new(DisconnectReasonCode::NormalDisconnection);
    write(&mut up, version, &Packet::Disconnect(bye)).await?;
    // Held in the turn until the broker closes: the next will of this
    // client id must not take over a connection still in use.
    linger(up).await;
    Ok(())
}

async fn write(up: &mut Conn, version: Version, p: &Packet) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    version
        .write(p, &mut out)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    up.write_all(&out).await
}

/// Reads until the broker sends the packet `wanted` looks for; a refusal
/// in it is the broker's to log, the will was handed over either way.
async fn answer(
    up: &mut Conn,
    buf: &mut BytesMut,
    version: Version,
    wanted: impl Fn(&Packet) -> bool,
) -> std::io::Result<()> {
    loop {
        while let Some(p) = version
            .read(buf, usize::MAX >> 4)
            .map_err(|e| std::io::Error::other(e.to_string()))?
        {
            if wanted(&p) {
                return Ok(());
            }
        }
        if up.read_buf(buf).await? == 0 {
            return Err(std::io::Error::other("broker closed before acknowledging"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::LastWillProperties;

    fn will(delay: Option<u32>, qos: QoS) -> LastWill {
        LastWill::new(
            "public/will",
            "gone",
            qos,
            true,
            Some(LastWillProperties {
                delay_interval: delay,
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                content_type: Some("text/plain".into()),
                response_topic: None,
                correlation_data: None,
                user_properties: vec![("k".into(), "v".into())],
            }),
        )
    }

    #[test]
    fn a_will_keeps_its_qos_retain_and_properties() {
        let w = Will::new(
            will(Some(5), QoS::AtLeastOnce),
            "public/will",
            Bytes::from_static(b"min"),
            60,
        );
        let p = w.publish(Bytes::from_static(b"decided"));
        assert_eq!(p.topic, "public/will");
        assert_eq!(p.payload, "decided");
        assert_eq!((p.qos, p.retain, p.pkid), (QoS::AtLeastOnce, true, PKID));
        let props = p.properties.unwrap();
        assert_eq!(props.message_expiry_interval, Some(60));
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(props.user_properties, vec![("k".into(), "v".into())]);

        let w = Will::new(
            LastWill::new("public/w0", "", QoS::AtMostOnce, false, None),
            "public/w0",
            Bytes::new(),
            0,
        );
        let p = w.publish(Bytes::new());
        assert_eq!((p.qos, p.retain, p.pkid), (QoS::AtMostOnce, false, 0));
        assert!(p.properties.is_none());
    }

    #[test]
    fn a_will_waits_its_delay_but_no_longer_than_the_session() {
        let secs = |delay, expiry| {
            Will::new(
                will(delay, QoS::AtMostOnce),
                "public/will",
                Bytes::new(),
                expiry,
            )
            .wait()
            .as_secs()
        };
        assert_eq!(secs(Some(5), 60), 5);
        assert_eq!(secs(Some(30), 10), 10);
        assert_eq!(
            secs(Some(30), 0),
            0,
            "a session that ends with the connection"
        );
        assert_eq!(secs(None, 60), 0);
        let mut w = Will::new(
            will(Some(30), QoS::AtMostOnce),
            "public/will",
            Bytes::new(),
            60,
        );
        w.set_session_expiry(0);
        assert_eq!(
            w.wait(),
            Duration::ZERO,
            "a DISCONNECT that ends the session"
        );
    }
}

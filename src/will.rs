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
//! and publishes it over a broker connection of its own: the wills of one
//! client id in the order they fell due, a broker that cannot take one
//! tried again for a while. If consentry dies, the wills it keeps are lost
//! rather than published undecided, as they are with the embedded broker,
//! which dies with it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, LastWill, PubRel, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;

use tokio::sync::Semaphore;

use crate::act::{Deny, Principal};
use crate::client_ids::{Claim, Ticket};
use crate::codec::{Packet, Version};
use crate::metrics as m;
use crate::session::{decide_ingress, puback_failed, pubrec_failed, strip_free_properties, Shared};
use crate::topic::TopicName;
use crate::upstream_conn::{Conn, Inbox};

/// How long one try at publishing a due will may take, from dialling the
/// broker to its last acknowledgement.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a due will is tried again while the broker cannot take it (a
/// broker restarting, say), unless its message expiry is sooner.
const RETRY_FOR: Duration = Duration::from_secs(600);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(30);

/// Will connections open at once.
const MAX_SENDING: usize = 64;

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
    /// The device's registration when the will was set
    /// ([`crate::auth::Credentials::registration`]): a will outlives its
    /// session, and must not be published for a registration made after it.
    registration: Option<String>,
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
            registration: None,
        }
    }

    /// Ties the will to the device registration of the session that set it.
    pub fn registered_as(mut self, registration: Option<String>) -> Will {
        self.registration = registration;
        self
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

    /// The will as a PUBLISH, `waited` after it fell due: its message
    /// expiry counts from then (MQTT 5 3.3.2.3.3). `None` once it expired.
    fn publish(&self, payload: Bytes, waited: Duration) -> Option<Publish> {
        let mut properties = self.properties.clone();
        if let Some(expiry) = properties
            .as_mut()
            .and_then(|p| p.message_expiry_interval.as_mut())
        {
            let waited = u32::try_from(waited.as_secs()).unwrap_or(u32::MAX);
            *expiry = expiry.checked_sub(waited).filter(|&left| left > 0)?;
        }
        let mut p = Publish::new(self.topic.as_str(), self.qos, payload, properties);
        p.retain = self.retain;
        if self.qos != QoS::AtMostOnce {
            p.pkid = PKID;
        }
        Some(p)
    }
}

/// Whether a will refused at CONNECT for `reason` is kept and decided when
/// it is due instead: the reasons of the moment (a collection the user has
/// not consented to yet or withdrew, a collection window that is closed),
/// which may be gone by then, unlike a topic the device may never publish
/// or a payload that does not fit its kind. A device is not kept from
/// connecting at night because its will could not be collected at night.
pub fn decided_when_due(reason: &str) -> bool {
    reason == crate::session::LEDGER_UNAVAILABLE
        || [Deny::NoCollectConsent, Deny::OutsideWindow]
            .iter()
            .any(|d| d.as_str() == reason)
}

/// Wills on their way to the broker.
#[derive(Debug)]
pub struct Outbox {
    /// Bounds the will connections open at once: when thousands of devices
    /// drop together, each will waits its turn here, not while its own
    /// connection times out among thousands of others.
    sending: Semaphore,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            sending: Semaphore::new(MAX_SENDING),
        }
    }
}

/// Takes over the will of a session that ended without a DISCONNECT that
/// drops it. `claim` is the session's claim on its client id, kept while
/// the will waits out its delay so that a connection taking the id over
/// is seen.
///
/// `session` is the ended session's number, which the will's log lines
/// carry: never its client id, which names the device (`d:{device}:…`)
/// and is whatever the client chose after it.
pub fn session_ended(
    shared: &Arc<Shared>,
    who: Principal,
    version: Version,
    claim: Claim,
    will: Will,
    session: u64,
) {
    let due_now = if will.wait().is_zero() {
        Some(true)
    } else if !shared.client_ids.holds(&claim) {
        // Taken over already: a new session ends this one and its will
        // goes now; a resumed one was back before the delay ended.
        Some(!claim.successor_resumed())
    } else {
        None
    };
    let shared = shared.clone();
    match due_now {
        Some(true) => {
            let ticket = shared.client_ids.will_due(claim);
            tokio::spawn(publish(shared, who, version, ticket, will, session));
        }
        Some(false) => resumed(&shared, claim, session),
        None => {
            tokio::spawn(async move {
                let due = tokio::select! {
                    () = tokio::time::sleep(will.wait()) => true,
                    () = claim.taken_over.notified() => !claim.successor_resumed(),
                };
                if due {
                    let ticket = shared.client_ids.will_due(claim);
                    publish(shared, who, version, ticket, will, session).await;
                } else {
                    resumed(&shared, claim, session);
                }
            });
        }
    }
}

fn resumed(shared: &Shared, claim: Claim, session: u64) {
    tracing::debug!(session, "will dropped: the session was resumed");
    shared.client_ids.release(&claim);
}

/// Decides a due will and publishes it, in its turn. A broker that cannot
/// take it is tried again, for [`RETRY_FOR`] or until the will's message
/// expiry, and the will is decided again before each try: it is collected
/// when it is published.
async fn publish(
    shared: Arc<Shared>,
    who: Principal,
    version: Version,
    ticket: Ticket,
    will: Will,
    session: u64,
) {
    let due = Instant::now();
    ticket.turn().await;
    let client_id = ticket.client_id();
    let mut pause = FIRST_RETRY;
    loop {
        if let Some(set_by) = &will.registration {
            if shared.creds.load().registration(&who).as_ref() != Some(set_by) {
                tracing::info!(
                    session,
                    "will dropped: the device that set it was removed, or its credentials replaced, since"
                );
                metrics::counter!(m::PUBLISHES, "result" => "dropped", "reason" => "device_removed")
                    .increment(1);
                return;
            }
        }
        let decided = match TopicName::new(&will.topic) {
            Some(name) => decide_ingress(&shared, &who, name, &will.payload),
            None => Err(Deny::Invalid.as_str()),
        };
        let (payload, personal) = match decided {
            Ok(p) => p,
            Err(deny) => {
                tracing::info!(session, reason = deny, "will message refused when due");
                metrics::counter!(m::PUBLISHES, "result" => "dropped", "reason" => deny)
                    .increment(1);
                return;
            }
        };
        let Some(mut publish) = will.publish(payload, due.elapsed()) else {
            not_sent(
                session,
                "its message expiry passed while the broker was unavailable",
            );
            return;
        };
        if personal {
            strip_free_properties(&mut publish.properties);
        }
        let sent = {
            let _permit = shared.wills.sending.acquire().await;
            tokio::time::timeout(SEND_TIMEOUT, send(&shared, version, client_id, publish)).await
        };
        let error = match sent {
            Ok(Ok(Sent::Taken)) => {
                shared.hot.forwarded.increment(1);
                return;
            }
            Ok(Ok(Sent::Refused(reason))) => {
                tracing::warn!(session, reason, "will refused by the broker");
                metrics::counter!(m::PUBLISHES, "result" => "dropped", "reason" => "broker_refused")
                    .increment(1);
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        if due.elapsed() + pause > RETRY_FOR {
            not_sent(session, &error);
            return;
        }
        if pause == FIRST_RETRY {
            tracing::warn!(session, error, "will not published yet; trying again");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_RETRY_PAUSE);
    }
}

fn not_sent(session: u64, error: &str) {
    tracing::warn!(
        session,
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
) -> std::io::Result<Sent> {
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
    let refused = match qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce => match answer(&mut up, &mut buf, version, |p| {
            matches!(p, Packet::PubAck(_))
        })
        .await?
        {
            Packet::PubAck(a) if puback_failed(&a) => Some(format!("{:?}", a.reason)),
            _ => None,
        },
        QoS::ExactlyOnce => match answer(&mut up, &mut buf, version, |p| {
            matches!(p, Packet::PubRec(_))
        })
        .await?
        {
            Packet::PubRec(r) if pubrec_failed(&r) => Some(format!("{:?}", r.reason)),
            _ => {
                write(&mut up, version, &Packet::PubRel(PubRel::new(PKID, None))).await?;
                answer(&mut up, &mut buf, version, |p| {
                    matches!(p, Packet::PubComp(_))
                })
                .await?;
                None
            }
        },
    };
    // Awaited in the turn until the broker closes: the next will of this
    // client id must not take over a connection still in use.
    up.say_goodbye(version).await?;
    Ok(match refused {
        None => Sent::Taken,
        Some(reason) => Sent::Refused(reason),
    })
}

/// What the broker made of a will it was handed.
enum Sent {
    Taken,
    /// It answered with a failure (its ACL, say); trying again would not
    /// change its mind.
    Refused(String),
}

async fn write(up: &mut Conn, version: Version, p: &Packet) -> std::io::Result<()> {
    up.send_one(version, p).await
}

/// Reads until the broker sends the packet `wanted` looks for.
async fn answer(
    up: &mut Conn,
    inbox: &mut Inbox,
    version: Version,
    wanted: impl Fn(&Packet) -> bool,
) -> std::io::Result<Packet> {
    loop {
        while let Some(p) = inbox
            .next(version)
            .map_err(|e| std::io::Error::other(e.to_string()))?
        {
            if wanted(&p) {
                return Ok(p);
            }
        }
        if up.receive(inbox).await? == 0 {
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
        let p = w
            .publish(Bytes::from_static(b"decided"), Duration::ZERO)
            .unwrap();
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
        let p = w.publish(Bytes::new(), Duration::from_secs(3600)).unwrap();
        assert_eq!((p.qos, p.retain, p.pkid), (QoS::AtMostOnce, false, 0));
        assert!(p.properties.is_none(), "no expiry: it never expires");
    }

    #[test]
    fn a_will_that_waited_for_the_broker_expires_by_as_much() {
        let w = Will::new(will(None, QoS::AtLeastOnce), "public/will", Bytes::new(), 0);
        let left = |secs| {
            w.publish(Bytes::new(), Duration::from_secs(secs))
                .map(|p| p.properties.unwrap().message_expiry_interval.unwrap())
        };
        assert_eq!(left(0), Some(60));
        assert_eq!(left(45), Some(15));
        assert_eq!(left(60), None);
        assert_eq!(left(u64::MAX), None);
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

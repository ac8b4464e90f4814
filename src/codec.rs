//! MQTT framing for both protocol versions over rumqttc's codecs.
//!
//! The gateway reasons about one packet model, rumqttc's v5 types: a 3.1.1
//! packet is lifted into it on read and lowered back on write. A session
//! speaks the client's version on both of its sockets (client and upstream),
//! so lowering only ever drops what 3.1.1 could not have carried in the first
//! place (properties, reason codes on acks).

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5, QoS};
use thiserror::Error;

pub use v5::Packet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("packet of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("unsupported protocol level {0}")]
    Protocol(u8),
    #[error("{0} cannot be sent over MQTT 3.1.1")]
    NotInV4(&'static str),
}

impl Version {
    pub fn as_str(&self) -> &'static str {
        match self {
            Version::V4 => "3.1.1",
            Version::V5 => "5",
        }
    }

    /// Reads the protocol level out of a CONNECT that is still in the buffer.
    /// `Ok(None)`: not enough bytes yet.
    pub fn detect(buf: &[u8], max: usize) -> Result<Option<Version>, CodecError> {
        // Refuse at the first byte: a stranger (an HTTP request, say) should
        // not hold a connection open until the connect timeout.
        if buf.first().is_some_and(|b| *b != 0x10) {
            return Err(CodecError::Malformed("first packet is not CONNECT".into()));
        }
        match m5::v5::check(buf.iter(), Some(max as u32)) {
            Ok(_) => {}
            Err(m5::Error::InsufficientBytes(_)) => return Ok(None),
            Err(m5::Error::PayloadSizeLimitExceeded { pkt_size, .. }) => {
                return Err(CodecError::TooLarge {
                    size: pkt_size,
                    max,
                })
            }
            Err(e) => return Err(CodecError::Malformed(e.to_string())),
        };
        // Fixed header (type byte and 1–4 length bytes, already validated by
        // `check`), then a 2-byte length and the protocol name, then the level.
        let at = 1
            + buf[1..]
                .iter()
                .take(4)
                .take_while(|b| *b & 0x80 != 0)
                .count()
            + 1;
        let name_len = match buf.get(at..at + 2) {
            Some(b) => u16::from_be_bytes([b[0], b[1]]) as usize,
            None => return Err(CodecError::Malformed("short CONNECT".into())),
        };
        match buf.get(at + 2 + name_len) {
            Some(4) => Ok(Some(Version::V4)),
            Some(5) => Ok(Some(Version::V5)),
            Some(&l) => Err(CodecError::Protocol(l)),
            None => Err(CodecError::Malformed("short CONNECT".into())),
        }
    }

    /// Takes one packet off the front of `buf`. `Ok(None)`: need more bytes.
    /// `max` bounds the whole packet, fixed header included, as MQTT 5's
    /// Maximum Packet Size does.
    pub fn read(self, buf: &mut BytesMut, max: usize) -> Result<Option<Packet>, CodecError> {
        let before = buf.len();
        let p = self.read_remaining_at_most(buf, max)?;
        // rumqttc bounds the remaining length only: a packet up to 5 bytes
        // over passes it (found by an outside review).
        let size = before - buf.len();
        if p.is_some() && size > max {
            return Err(CodecError::TooLarge { size, max });
        }
        Ok(p)
    }

    fn read_remaining_at_most(
        self,
        buf: &mut BytesMut,
        max: usize,
    ) -> Result<Option<Packet>, CodecError> {
        match self {
            // MQTT 5 §3.14.2.1: a DISCONNECT may stop after its reason code,
            // or omit even that (meaning 0x00). rumqttc 0.25 refuses both
            // short forms, and they are the ones mosquitto clients send.
            Version::V5 if buf.starts_with(&[0xE0, 0x00]) => {
                let _ = buf.split_to(2);
                Ok(Some(Packet::Disconnect(v5::Disconnect::new(
                    v5::DisconnectReasonCode::NormalDisconnection,
                ))))
            }
            Version::V5 if buf.len() >= 3 && buf.starts_with(&[0xE0, 0x01]) => {
                let frame = buf.split_to(3);
                let code = v5::DisconnectReasonCode::try_from(frame[2])
                    .map_err(|e| CodecError::Malformed(e.to_string()))?;
                Ok(Some(Packet::Disconnect(v5::Disconnect::new(code))))
            }
            Version::V5 => match v5::Packet::read(buf, Some(max as u32)) {
                Ok(p) => Ok(Some(p)),
                Err(m5::Error::InsufficientBytes(_)) => Ok(None),
                Err(m5::Error::PayloadSizeLimitExceeded { pkt_size, .. }) => {
                    Err(CodecError::TooLarge {
                        size: pkt_size,
                        max,
                    })
                }
                Err(e) => Err(CodecError::Malformed(e.to_string())),
            },
            Version::V4 => match v4::Packet::read(buf, max) {
                Ok(p) => Ok(Some(lift(p))),
                Err(m4::Error::InsufficientBytes(_)) => Ok(None),
                Err(m4::Error::PayloadSizeLimitExceeded(size)) => {
                    Err(CodecError::TooLarge { size, max })
                }
                Err(e) => Err(CodecError::Malformed(e.to_string())),
            },
        }
    }

    pub fn write(self, p: &Packet, out: &mut BytesMut) -> Result<(), CodecError> {
        let r = match self {
            // rumqttc 0.25 frames a DISCONNECT that has a reason code but no
            // properties (or empty ones) wrongly; with a reason string, which
            // also helps whoever reads the client's log, it is framed right.
            // Sessions give their own (`End::reason_string`); a DISCONNECT
            // relayed from the broker without one gets the code's meaning.
            Version::V5 => match p {
                Packet::Disconnect(d)
                    if d.properties.is_none()
                        && d.reason_code != v5::DisconnectReasonCode::NormalDisconnection =>
                {
                    Packet::Disconnect(v5::Disconnect {
                        reason_code: d.reason_code,
                        properties: Some(v5::DisconnectProperties {
                            session_expiry_interval: None,
                            reason_string: Some(reason_sentence(d.reason_code).into()),
                            user_properties: vec![],
                            server_reference: None,
                        }),
                    })
                    .write(out, None)
                }
                _ => p.write(out, None),
            }
            .map_err(|e| CodecError::Malformed(e.to_string())),
            Version::V4 => lower(p)?
                .write(out, usize::MAX)
                .map_err(|e| CodecError::Malformed(e.to_string())),
        };
        r.map(|_| ())
    }
}

/// What a DISCONNECT reason code means (MQTT 5 §3.14.2.1), as a phrase
/// for a reason string.
fn reason_sentence(code: v5::DisconnectReasonCode) -> &'static str {
    use v5::DisconnectReasonCode as C;
    match code {
        C::NormalDisconnection => "normal disconnection",
        C::DisconnectWithWillMessage => "disconnect with will message",
        C::UnspecifiedError => "unspecified error",
        C::MalformedPacket => "malformed packet",
        C::ProtocolError => "protocol error",
        C::ImplementationSpecificError => "implementation specific error",
        C::NotAuthorized => "not authorized",
        C::ServerBusy => "server busy",
        C::ServerShuttingDown => "server shutting down",
        C::KeepAliveTimeout => "keep-alive timeout",
        C::SessionTakenOver => "session taken over",
        C::TopicFilterInvalid => "topic filter invalid",
        C::TopicNameInvalid => "topic name invalid",
        C::ReceiveMaximumExceeded => "receive maximum exceeded",
        C::TopicAliasInvalid => "topic alias invalid",
        C::PacketTooLarge => "packet too large",
        C::MessageRateTooHigh => "message rate too high",
        C::QuotaExceeded => "quota exceeded",
        C::AdministrativeAction => "administrative action",
        C::PayloadFormatInvalid => "payload format invalid",
        C::RetainNotSupported => "retain not supported",
        C::QoSNotSupported => "QoS not supported",
        C::UseAnotherServer => "use another server",
        C::ServerMoved => "server moved",
        C::SharedSubscriptionNotSupported => "shared subscriptions not supported",
        C::ConnectionRateExceeded => "connection rate exceeded",
        C::MaximumConnectTime => "maximum connect time",
        C::SubscriptionIdentifiersNotSupported => "subscription identifiers not supported",
        C::WildcardSubscriptionsNotSupported => "wildcard subscriptions not supported",
    }
}

fn qos_up(q: m4::QoS) -> QoS {
    match q {
        m4::QoS::AtMostOnce => QoS::AtMostOnce,
        m4::QoS::AtLeastOnce => QoS::AtLeastOnce,
        m4::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_down(q: QoS) -> m4::QoS {
    match q {
        QoS::AtMostOnce => m4::QoS::AtMostOnce,
        QoS::AtLeastOnce => m4::QoS::AtLeastOnce,
        QoS::ExactlyOnce => m4::QoS::ExactlyOnce,
    }
}

fn lift(p: v4::Packet) -> Packet {
    match p {
        v4::Packet::Connect(c) => Packet::Connect(
            v5::Connect {
                keep_alive: c.keep_alive,
                client_id: c.client_id,
                clean_start: c.clean_session,
                properties: None,
            },
            c.last_will.map(|w| v5::LastWill {
                topic: Bytes::from(w.topic),
                message: w.message,
                qos: qos_up(w.qos),
                retain: w.retain,
                properties: None,
            }),
            c.login.map(|l| v5::Login {
                username: l.username,
                password: l.password,
            }),
        ),
        v4::Packet::ConnAck(a) => Packet::ConnAck(v5::ConnAck {
            session_present: a.session_present,
            code: match a.code {
                v4::ConnectReturnCode::Success => v5::ConnectReturnCode::Success,
                v4::ConnectReturnCode::RefusedProtocolVersion => {
                    v5::ConnectReturnCode::UnsupportedProtocolVersion
                }
                v4::ConnectReturnCode::BadClientId => {
                    v5::ConnectReturnCode::ClientIdentifierNotValid
                }
                v4::ConnectReturnCode::ServiceUnavailable => {
                    v5::ConnectReturnCode::ServerUnavailable
                }
                v4::ConnectReturnCode::BadUserNamePassword => {
                    v5::ConnectReturnCode::BadUserNamePassword
                }
                v4::ConnectReturnCode::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
            },
            properties: None,
        }),
        v4::Packet::Publish(p) => Packet::Publish(v5::Publish {
            dup: p.dup,
            qos: qos_up(p.qos),
            retain: p.retain,
            topic: Bytes::from(p.topic),
            pkid: p.pkid,
            payload: p.payload,
            properties: None,
        }),
        v4::Packet::PubAck(a) => Packet::PubAck(v5::PubAck::new(a.pkid, None)),
        v4::Packet::PubRec(a) => Packet::PubRec(v5::PubRec::new(a.pkid, None)),
        v4::Packet::PubRel(a) => Packet::PubRel(v5::PubRel::new(a.pkid, None)),
        v4::Packet::PubComp(a) => Packet::PubComp(v5::PubComp::new(a.pkid, None)),
        v4::Packet::Subscribe(s) => Packet::Subscribe(v5::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| v5::Filter::new(f.path, qos_up(f.qos)))
                .collect(),
            properties: None,
        }),
        v4::Packet::SubAck(a) => Packet::SubAck(v5::SubAck {
            pkid: a.pkid,
            return_codes: a
                .return_codes
                .into_iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(q) => {
                        v5::SubscribeReasonCode::Success(qos_up(q))
                    }
                    v4::SubscribeReasonCode::Failure => v5::SubscribeReasonCode::Unspecified,
                })
                .collect(),
            properties: None,
        }),
        v4::Packet::Unsubscribe(u) => Packet::Unsubscribe(v5::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
            properties: None,
        }),
        v4::Packet::UnsubAck(a) => Packet::UnsubAck(v5::UnsubAck {
            pkid: a.pkid,
            reasons: vec![],
            properties: None,
        }),
        v4::Packet::PingReq => Packet::PingReq(v5::PingReq),
        v4::Packet::PingResp => Packet::PingResp(v5::PingResp),
        v4::Packet::Disconnect => Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::NormalDisconnection,
        )),
    }
}

fn lower(p: &Packet) -> Result<v4::Packet, CodecError> {
    Ok(match p {
        Packet::Connect(c, will, login) => v4::Packet::Connect(v4::Connect {
            protocol: m4::Protocol::V4,
            keep_alive: c.keep_alive,
            client_id: c.client_id.clone(),
            clean_session: c.clean_start,
            last_will: will.as_ref().map(|w| v4::LastWill {
                topic: String::from_utf8_lossy(&w.topic).into_owned(),
                message: w.message.clone(),
                qos: qos_down(w.qos),
                retain: w.retain,
            }),
            login: login.as_ref().map(|l| v4::Login {
                username: l.username.clone(),
                password: l.password.clone(),
            }),
        }),
        Packet::ConnAck(a) => v4::Packet::ConnAck(v4::ConnAck {
            session_present: a.session_present,
            code: match a.code {
                v5::ConnectReturnCode::Success => v4::ConnectReturnCode::Success,
                v5::ConnectReturnCode::UnsupportedProtocolVersion
                | v5::ConnectReturnCode::RefusedProtocolVersion => {
                    v4::ConnectReturnCode::RefusedProtocolVersion
                }
                v5::ConnectReturnCode::ClientIdentifierNotValid
                | v5::ConnectReturnCode::BadClientId => v4::ConnectReturnCode::BadClientId,
                v5::ConnectReturnCode::BadUserNamePassword => {
                    v4::ConnectReturnCode::BadUserNamePassword
                }
                v5::ConnectReturnCode::NotAuthorized | v5::ConnectReturnCode::Banned => {
                    v4::ConnectReturnCode::NotAuthorized
                }
                _ => v4::ConnectReturnCode::ServiceUnavailable,
            },
        }),
        Packet::Publish(p) => v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: qos_down(p.qos),
            retain: p.retain,
            topic: String::from_utf8(p.topic.to_vec())
                .map_err(|_| CodecError::Malformed("topic is not UTF-8".into()))?,
            pkid: p.pkid,
            payload: p.payload.clone(),
        }),
        // 3.1.1 acknowledges without a reason: a refused message is simply
        // acknowledged, which is what keeps the client from resending it.
        Packet::PubAck(a) => v4::Packet::PubAck(v4::PubAck::new(a.pkid)),
        Packet::PubRec(a) => v4::Packet::PubRec(v4::PubRec::new(a.pkid)),
        Packet::PubRel(a) => v4::Packet::PubRel(v4::PubRel::new(a.pkid)),
        Packet::PubComp(a) => v4::Packet::PubComp(v4::PubComp::new(a.pkid)),
        Packet::Subscribe(s) => v4::Packet::Subscribe(v4::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .iter()
                .map(|f| v4::SubscribeFilter::new(f.path.clone(), qos_down(f.qos)))
                .collect(),
        }),
        Packet::SubAck(a) => v4::Packet::SubAck(v4::SubAck::new(
            a.pkid,
            a.return_codes
                .iter()
                .map(|c| match c {
                    v5::SubscribeReasonCode::Success(q) => {
                        v4::SubscribeReasonCode::Success(qos_down(*q))
                    }
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Packet::Unsubscribe(u) => v4::Packet::Unsubscribe(v4::Unsubscribe {
            pkid: u.pkid,
            topics: u.filters.clone(),
        }),
        Packet::UnsubAck(a) => v4::Packet::UnsubAck(v4::UnsubAck { pkid: a.pkid }),
        Packet::PingReq(_) => v4::Packet::PingReq,
        Packet::PingResp(_) => v4::Packet::PingResp,
        Packet::Disconnect(_) => v4::Packet::Disconnect,
        Packet::Auth(_) => return Err(CodecError::NotInV4("AUTH")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(v: Version, p: Packet) -> Packet {
        let mut buf = BytesMut::new();
        v.write(&p, &mut buf).unwrap();
        let got = v.read(&mut buf, 1 << 20).unwrap().unwrap();
        assert!(buf.is_empty());
        got
    }

    #[test]
    fn detects_versions() {
        for (v, level) in [(Version::V4, 4u8), (Version::V5, 5u8)] {
            let mut buf = BytesMut::new();
            v.write(
                &Packet::Connect(
                    v5::Connect {
                        keep_alive: 30,
                        client_id: "c".into(),
                        clean_start: true,
                        properties: None,
                    },
                    None,
                    None,
                ),
                &mut buf,
            )
            .unwrap();
            assert_eq!(
                Version::detect(&buf, 1024).unwrap(),
                Some(v),
                "level {level}"
            );
            assert_eq!(Version::detect(&buf[..3], 1024).unwrap(), None);
        }
        assert!(Version::detect(&[0x30, 0x00], 1024).is_err());
    }

    #[test]
    fn v4_roundtrips_through_the_v5_model() {
        let publish = Packet::Publish(v5::Publish {
            dup: false,
            qos: QoS::ExactlyOnce,
            retain: true,
            topic: Bytes::from_static(b"a/b"),
            pkid: 7,
            payload: Bytes::from_static(b"{}"),
            properties: None,
        });
        assert_eq!(roundtrip(Version::V4, publish.clone()), publish);
        let suback = Packet::SubAck(v5::SubAck {
            pkid: 3,
            return_codes: vec![
                v5::SubscribeReasonCode::Success(QoS::AtLeastOnce),
                v5::SubscribeReasonCode::NotAuthorized,
            ],
            properties: None,
        });
        match roundtrip(Version::V4, suback) {
            Packet::SubAck(a) => assert_eq!(
                a.return_codes,
                vec![
                    v5::SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    v5::SubscribeReasonCode::Unspecified
                ]
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v5_disconnect_without_reason_code() {
        let mut buf = BytesMut::from(&[0xE0u8, 0x00, 0xC0, 0x00][..]);
        assert!(matches!(
            Version::V5.read(&mut buf, 100).unwrap(),
            Some(Packet::Disconnect(d)) if d.reason_code == v5::DisconnectReasonCode::NormalDisconnection
        ));
        assert!(matches!(
            Version::V5.read(&mut buf, 100).unwrap(),
            Some(Packet::PingReq(_))
        ));
    }

    #[test]
    fn v5_disconnect_with_reason_is_framed_right() {
        let mut buf = BytesMut::new();
        let d = Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::TopicNameInvalid,
        ));
        Version::V5.write(&d, &mut buf).unwrap();
        let mut expect = vec![0xE0, 23, 0x90, 21, 0x1F, 0, 18];
        expect.extend_from_slice(b"topic name invalid");
        assert_eq!(&buf[..], &expect[..]);
        let mut short = BytesMut::from(&[0xE0u8, 0x01, 0x8E][..]);
        assert!(matches!(
            Version::V5.read(&mut short, 100).unwrap(),
            Some(Packet::Disconnect(d)) if d.reason_code == v5::DisconnectReasonCode::SessionTakenOver
        ));
    }

    #[test]
    fn oversized_and_garbage() {
        let mut buf = BytesMut::new();
        Version::V5
            .write(
                &Packet::Publish(v5::Publish::new(
                    "t",
                    QoS::AtMostOnce,
                    vec![0u8; 2000],
                    None,
                )),
                &mut buf,
            )
            .unwrap();
        assert!(matches!(
            Version::V5.read(&mut buf.clone(), 100),
            Err(CodecError::TooLarge { .. })
        ));
        assert!(matches!(
            Version::V4.read(&mut buf, 100),
            Err(CodecError::TooLarge { .. })
        ));
        let mut junk = BytesMut::from(&[0xF0u8, 0x02, 0x00, 0x00][..]);
        assert!(Version::V4.read(&mut junk, 100).is_err());
    }
}

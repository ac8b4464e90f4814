//! Packets between a session's model (rumqttc's v5 types) and rumqttd's
//! router, which has types of its own.
//!
//! The packets of a message's path (a publish without properties, the
//! success acks, pings) are converted field by field. Everything else (a
//! SUBSCRIBE, a CONNACK, anything with MQTT 5 properties) is rare, so it is
//! encoded with one crate's MQTT 5 codec and decoded with the other's: one
//! wire format both already agree on, and no property mapping to keep in
//! step with two crates.
//!
//! rumqttd keeps a publish's QoS and packet id to itself; its
//! MQTT-independent serialization (`Publish::serialize`/`deserialize`) is
//! the only public way to set or read them.

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5 as c;
use rumqttc::v5::mqttbytes::QoS;
use rumqttd::protocol::{self as d, v5::V5, Protocol};

use crate::codec::{CodecError, Packet, Version};

/// `p` as the router takes it. `v4`: the session speaks MQTT 3.1.1, whose
/// packets carry no properties. A publish is copied into `arena`, from which
/// one allocation serves many.
pub fn to_router(p: &Packet, v4: bool, arena: &mut BytesMut) -> Result<d::Packet, CodecError> {
    if v4 && matches!(p, Packet::Auth(_)) {
        return Err(CodecError::NotInV4("AUTH"));
    }
    let fast = match p {
        Packet::Publish(publish) if publish.properties.is_none() => {
            Some(d::Packet::Publish(router_publish(publish, arena)?, None))
        }
        Packet::PubAck(a) if a.properties.is_none() && a.reason == c::PubAckReason::Success => {
            Some(d::Packet::PubAck(
                d::PubAck {
                    pkid: a.pkid,
                    reason: d::PubAckReason::Success,
                },
                None,
            ))
        }
        Packet::PubRec(a) if a.properties.is_none() && a.reason == c::PubRecReason::Success => {
            Some(d::Packet::PubRec(
                d::PubRec {
                    pkid: a.pkid,
                    reason: d::PubRecReason::Success,
                },
                None,
            ))
        }
        Packet::PubRel(a) if a.properties.is_none() && a.reason == c::PubRelReason::Success => {
            Some(d::Packet::PubRel(
                d::PubRel {
                    pkid: a.pkid,
                    reason: d::PubRelReason::Success,
                },
                None,
            ))
        }
        Packet::PubComp(a) if a.properties.is_none() && a.reason == c::PubCompReason::Success => {
            Some(d::Packet::PubComp(
                d::PubComp {
                    pkid: a.pkid,
                    reason: d::PubCompReason::Success,
                },
                None,
            ))
        }
        Packet::PingReq(_) => Some(d::Packet::PingReq(d::PingReq)),
        _ => None,
    };
    let p = match fast {
        Some(p) => p,
        None => {
            let mut wire = BytesMut::new();
            Version::V5.write(p, &mut wire)?;
            V5.read_mut(&mut wire, usize::MAX >> 4)
                .map_err(|e| CodecError::Malformed(format!("{e:?}")))?
        }
    };
    Ok(if v4 { without_properties(p) } else { p })
}

/// What the router sent, in the session's model.
pub fn from_router(p: d::Packet, v4: bool) -> Result<Packet, CodecError> {
    let p = if v4 { without_properties(p) } else { p };
    Ok(match p {
        // QoS 0 is the one QoS rumqttd shows: its `len` counts a packet id
        // only for QoS 1 and 2. A QoS 0 publish has neither id nor DUP.
        d::Packet::Publish(publish, None)
            if publish.len() == 2 + publish.topic.len() + publish.payload.len() =>
        {
            Packet::Publish(c::Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: publish.retain,
                topic: publish.topic,
                pkid: 0,
                payload: publish.payload,
                properties: None,
            })
        }
        d::Packet::Publish(publish, None) => Packet::Publish(session_publish(&publish)?),
        d::Packet::PubAck(a, None) if a.reason == d::PubAckReason::Success => {
            Packet::PubAck(c::PubAck {
                pkid: a.pkid,
                reason: c::PubAckReason::Success,
                properties: None,
            })
        }
        d::Packet::PubRec(a, None) if a.reason == d::PubRecReason::Success => {
            Packet::PubRec(c::PubRec {
                pkid: a.pkid,
                reason: c::PubRecReason::Success,
                properties: None,
            })
        }
        d::Packet::PubRel(a, None) if a.reason == d::PubRelReason::Success => {
            Packet::PubRel(c::PubRel {
                pkid: a.pkid,
                reason: c::PubRelReason::Success,
                properties: None,
            })
        }
        d::Packet::PubComp(a, None) if a.reason == d::PubCompReason::Success => {
            Packet::PubComp(c::PubComp {
                pkid: a.pkid,
                reason: c::PubCompReason::Success,
                properties: None,
            })
        }
        d::Packet::PingResp(_) => Packet::PingResp(c::PingResp),
        p => {
            let mut wire = BytesMut::new();
            V5.write(p, &mut wire)
                .map_err(|e| CodecError::Malformed(format!("{e:?}")))?;
            Version::V5
                .read(&mut wire, usize::MAX >> 4)?
                .ok_or_else(|| CodecError::Malformed("rumqttd encoded a partial packet".into()))?
        }
    })
}

/// rumqttd's serialization of a publish: the MQTT fixed header's first byte,
/// packet id, topic length, topic, payload. Whatever the QoS, the packet id
/// is there.
const SERIAL_HEAD: usize = 1 + 2 + 2;

/// Room taken for the arena at a time. What the router keeps of a publish
/// (its commit log does, for a while) keeps its whole block allocated, as
/// a socket's read buffer would: small blocks, so that an idle device's one
/// message holds little.
const ARENA: usize = 4 * 1024;

fn router_publish(p: &c::Publish, arena: &mut BytesMut) -> Result<d::Publish, CodecError> {
    let topic_len = u16::try_from(p.topic.len())
        .map_err(|_| CodecError::Malformed("topic longer than 65 535 bytes".into()))?;
    let len = SERIAL_HEAD + p.topic.len() + p.payload.len();
    if arena.capacity() < len {
        arena.reserve(len.max(ARENA));
    }
    let mut o = arena.split_off(0);
    o.put_u8(0x30 | p.retain as u8 | (p.qos as u8) << 1 | (p.dup as u8) << 3);
    o.put_u16(p.pkid);
    o.put_u16(topic_len);
    o.extend_from_slice(&p.topic);
    o.extend_from_slice(&p.payload);
    // What was not used goes back for the next one.
    let rest = o.split_off(len);
    *arena = rest;
    Ok(d::Publish::deserialize(o.freeze()))
}

fn session_publish(p: &d::Publish) -> Result<c::Publish, CodecError> {
    let s: Bytes = p.serialize();
    let short = || CodecError::Malformed("short publish from the router".into());
    let head = s.get(..SERIAL_HEAD).ok_or_else(short)?;
    let qos = match (head[0] >> 1) & 0b11 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        q => return Err(CodecError::Malformed(format!("QoS {q} from the router"))),
    };
    let pkid = u16::from_be_bytes([head[1], head[2]]);
    let topic_end = SERIAL_HEAD + u16::from_be_bytes([head[3], head[4]]) as usize;
    if s.len() < topic_end {
        return Err(short());
    }
    Ok(c::Publish {
        dup: head[0] & 0b1000 != 0,
        qos,
        retain: head[0] & 1 != 0,
        topic: s.slice(SERIAL_HEAD..topic_end),
        pkid,
        payload: s.slice(topic_end..),
        properties: None,
    })
}

/// `p` without MQTT 5 properties.
pub fn without_properties(p: d::Packet) -> d::Packet {
    use d::Packet as P;
    match p {
        P::ConnAck(a, _) => P::ConnAck(a, None),
        P::Publish(a, _) => P::Publish(a, None),
        P::PubAck(a, _) => P::PubAck(a, None),
        P::SubAck(a, _) => P::SubAck(a, None),
        P::PubRec(a, _) => P::PubRec(a, None),
        P::PubRel(a, _) => P::PubRel(a, None),
        P::PubComp(a, _) => P::PubComp(a, None),
        P::UnsubAck(a, _) => P::UnsubAck(a, None),
        P::Disconnect(a, _) => P::Disconnect(a, None),
        P::Subscribe(a, _) => P::Subscribe(a, None),
        P::Unsubscribe(a, _) => P::Unsubscribe(a, None),
        p => p,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(qos: QoS, pkid: u16, retain: bool, dup: bool) -> c::Publish {
        c::Publish {
            dup,
            qos,
            retain,
            topic: Bytes::from_static(b"pii/alice/watch/heart_rate"),
            pkid,
            payload: Bytes::from_static(b"{\"bpm\":72}"),
            properties: None,
        }
    }

    /// The field-by-field paths must agree with the wire: what the fast
    /// conversion makes is what rumqttd's own decoder makes of the same
    /// packet's bytes.
    #[test]
    fn publish_to_router_matches_rumqttds_decoder() {
        for (qos, pkid, retain, dup) in [
            (QoS::AtMostOnce, 0, false, false),
            (QoS::AtLeastOnce, 7, true, false),
            (QoS::ExactlyOnce, 65535, false, true),
        ] {
            let p = Packet::Publish(publish(qos, pkid, retain, dup));
            let mut wire = BytesMut::new();
            Version::V5.write(&p, &mut wire).unwrap();
            let decoded = V5.read_mut(&mut wire, 1 << 20).unwrap();
            assert_eq!(
                to_router(&p, false, &mut BytesMut::new()).unwrap(),
                decoded,
                "{qos:?}"
            );
        }
    }

    #[test]
    fn publish_round_trips_through_the_router_model() {
        for (qos, pkid, retain, dup) in [
            (QoS::AtMostOnce, 0, true, false),
            (QoS::AtLeastOnce, 300, false, true),
            (QoS::ExactlyOnce, 1, true, true),
        ] {
            let p = Packet::Publish(publish(qos, pkid, retain, dup));
            let back =
                from_router(to_router(&p, false, &mut BytesMut::new()).unwrap(), false).unwrap();
            assert_eq!(back, p);
        }
    }

    #[test]
    fn acks_round_trip_and_failures_keep_their_reason() {
        let failed = Packet::PubAck(c::PubAck {
            pkid: 9,
            reason: c::PubAckReason::NotAuthorized,
            properties: None,
        });
        let router = to_router(&failed, false, &mut BytesMut::new()).unwrap();
        assert!(matches!(
            &router,
            d::Packet::PubAck(a, _) if a.reason == d::PubAckReason::NotAuthorized && a.pkid == 9
        ));
        assert_eq!(from_router(router, false).unwrap(), failed);
        for p in [
            Packet::PubAck(c::PubAck::new(1, None)),
            Packet::PubRec(c::PubRec::new(2, None)),
            Packet::PubRel(c::PubRel::new(3, None)),
            Packet::PubComp(c::PubComp::new(4, None)),
            Packet::PingReq(c::PingReq),
        ] {
            let router = to_router(&p, false, &mut BytesMut::new()).unwrap();
            let mut wire = BytesMut::new();
            Version::V5.write(&p, &mut wire).unwrap();
            assert_eq!(router, V5.read_mut(&mut wire, 1 << 20).unwrap());
        }
    }

    #[test]
    fn properties_go_through_the_wire_and_not_to_a_3_1_1_session() {
        let mut p = publish(QoS::AtLeastOnce, 5, false, false);
        p.properties = Some(c::PublishProperties {
            message_expiry_interval: Some(60),
            ..Default::default()
        });
        let p = Packet::Publish(p);
        let router = to_router(&p, false, &mut BytesMut::new()).unwrap();
        assert!(
            matches!(&router, d::Packet::Publish(_, Some(props)) if props.message_expiry_interval == Some(60))
        );
        assert_eq!(from_router(router.clone(), false).unwrap(), p);
        let Packet::Publish(lowered) = from_router(router, true).unwrap() else {
            panic!("not a publish")
        };
        assert_eq!(lowered.properties, None);
        assert_eq!(lowered.pkid, 5);
        assert!(matches!(
            to_router(&p, true, &mut BytesMut::new()).unwrap(),
            d::Packet::Publish(_, None)
        ));
    }

    #[test]
    fn subscribe_goes_through_the_wire() {
        let sub = Packet::Subscribe(c::Subscribe::new(
            c::Filter::new("pii/+/+/heart_rate", QoS::AtLeastOnce),
            None,
        ));
        match to_router(&sub, true, &mut BytesMut::new()).unwrap() {
            d::Packet::Subscribe(s, None) => {
                assert_eq!(s.filters.len(), 1);
                assert_eq!(s.filters[0].path, "pii/+/+/heart_rate");
            }
            other => panic!("{other:?}"),
        }
    }
}

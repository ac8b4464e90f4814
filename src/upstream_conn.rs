//! A session's connection to its broker, and what waits to go each way.
//!
//! To an external broker (or the embedded one over loopback TCP) a session
//! speaks MQTT bytes; to the embedded broker in memory it hands packets to
//! the router ([`crate::broker_link::Local`]). [`Outbox`] and [`Inbox`] hold
//! either, so the session's logic is the same over both.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::{Disconnect, DisconnectReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::broker_link::Local;
use crate::codec::{CodecError, Packet, Version};
use crate::link_packets::to_router;

/// Bytes read from the broker at a time.
pub const READ_CHUNK: usize = 64 * 1024;
/// Reads from the broker shorter than this are acknowledged at once (see
/// [`ack_at_once`]). A flood arrives in full segments, which Nagle does not
/// hold, and there the extra ACKs and system calls cost throughput
/// (bench/HISTORY.md, fourth session).
const QUICKACK_BELOW: usize = 16 * 1024;
/// How long a client of the broker waits, after its DISCONNECT, for the
/// broker to close the connection before closing it itself.
pub const DISCONNECT_LINGER: Duration = Duration::from_secs(2);

/// A session's connection to the broker.
#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Local(Local),
}

/// What the broker sent that was not handled yet.
#[derive(Debug, Default)]
pub struct Inbox {
    bytes: BytesMut,
    packets: VecDeque<Packet>,
}

impl Inbox {
    pub fn new(bytes: BytesMut) -> Inbox {
        Inbox {
            bytes,
            packets: VecDeque::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty() && self.packets.is_empty()
    }

    /// The next whole packet, if one came.
    pub fn next(&mut self, version: Version) -> Result<Option<Packet>, CodecError> {
        if let Some(p) = self.packets.pop_front() {
            return Ok(Some(p));
        }
        // The broker's packets are as large as it allows, not as we do.
        version.read(&mut self.bytes, usize::MAX >> 4)
    }
}

/// What is bound for the broker, not yet sent: bytes for a socket, or
/// packets for the embedded broker's router.
#[derive(Debug)]
pub struct Outbox {
    version: Version,
    bytes: BytesMut,
    /// `Some` when the broker is reached in memory: packets converted for
    /// its router as they are queued.
    packets: Option<Vec<rumqttd::protocol::Packet>>,
    /// Where the router's publishes are copied to.
    arena: BytesMut,
}

impl Outbox {
    pub fn new(version: Version, in_memory: bool) -> Outbox {
        Outbox {
            version,
            bytes: BytesMut::new(),
            packets: in_memory.then(Vec::new),
            arena: BytesMut::new(),
        }
    }

    pub fn push(&mut self, p: &Packet) -> Result<(), CodecError> {
        match &mut self.packets {
            Some(packets) => {
                packets.push(to_router(p, self.version == Version::V4, &mut self.arena)?);
                Ok(())
            }
            None => self.version.write(p, &mut self.bytes),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty() && self.packets.as_ref().is_none_or(Vec::is_empty)
    }

    fn clear(&mut self) {
        self.bytes.clear();
        if let Some(p) = &mut self.packets {
            p.clear();
        }
        // A burst (a large packet, a long run of acks) should not stay
        // allocated for the rest of the session.
        if self.bytes.capacity() > 4 * READ_CHUNK {
            self.bytes = BytesMut::new();
        }
    }
}

impl Conn {
    /// Sends what `out` holds and empties it.
    pub async fn send(&mut self, out: &mut Outbox) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.write_all(&out.bytes).await?,
            Conn::Tls(s) => s.write_all(&out.bytes).await?,
            Conn::Local(l) => {
                if let Some(packets) = &mut out.packets {
                    l.send(packets).await?;
                }
            }
        }
        out.clear();
        Ok(())
    }

    /// Sends one packet at once.
    pub async fn send_one(&mut self, version: Version, p: &Packet) -> std::io::Result<()> {
        let mut out = Outbox::new(version, matches!(self, Conn::Local(_)));
        out.push(p).map_err(codec_error)?;
        self.send(&mut out).await
    }

    /// Waits for what the broker sends and appends it to `inbox`. Returns
    /// 0 when the broker closed the connection. Cancel-safe.
    pub async fn receive(&mut self, inbox: &mut Inbox) -> std::io::Result<usize> {
        if !matches!(self, Conn::Local(_))
            && inbox.bytes.capacity() - inbox.bytes.len() < READ_CHUNK
        {
            inbox.bytes.reserve(READ_CHUNK);
        }
        let n = match self {
            Conn::Tcp(s) => s.read_buf(&mut inbox.bytes).await?,
            Conn::Tls(s) => s.read_buf(&mut inbox.bytes).await?,
            Conn::Local(l) => return Ok(l.receive(&mut inbox.packets).await?),
        };
        if n > 0 && n < QUICKACK_BELOW {
            self.ack_at_once();
        }
        Ok(n)
    }

    /// Asks the kernel to acknowledge what was just read without delay.
    ///
    /// rumqttd does not set TCP_NODELAY on its connections (nor does
    /// Mosquitto by default), so a delivery it writes while an earlier one
    /// is still unacknowledged waits in its Nagle buffer for our ACK, which
    /// Linux delays by up to 40 ms when we have nothing to send back, as
    /// with QoS 0. That wait was most of consentry's QoS 0 latency at
    /// moderate rates (measured in bench/HISTORY.md, fourth session). Linux
    /// drops out of quick-ACK mode by itself, so it is asked again after
    /// every read. Other systems have no TCP_QUICKACK; their delayed ACKs
    /// stay.
    fn ack_at_once(&self) {
        #[cfg(target_os = "linux")]
        {
            let s = match self {
                Conn::Tcp(s) => s,
                Conn::Tls(s) => s.get_ref().0,
                Conn::Local(_) => return,
            };
            if let Err(e) = socket2::SockRef::from(s).set_tcp_quickack(true) {
                tracing::debug!(error = %e, "TCP_QUICKACK not set");
            }
        }
    }

    /// Keeps a connection we sent DISCONNECT on open until the broker
    /// closes it, for at most [`DISCONNECT_LINGER`].
    ///
    /// rumqttd 0.20 takes a DISCONNECT followed by the client's close as
    /// two disconnections. By the time the second one reaches its router,
    /// the connection id may belong to a new connection, which it then
    /// ends; a session whose broker connection ends that way ends too.
    /// When the broker closes first there is no second one. Other brokers
    /// close on DISCONNECT as well (MQTT 3.1.1 3.14.4, MQTT 5 3.14.4), so
    /// they lose nothing by it. A link in memory sends nothing after its
    /// DISCONNECT and has nothing to wait for.
    pub async fn linger(self) {
        let mut sink = [0u8; 512];
        let _ = tokio::time::timeout(DISCONNECT_LINGER, async {
            match self {
                Conn::Tcp(mut s) => while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {},
                Conn::Tls(mut s) => while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {},
                Conn::Local(_) => {}
            }
        })
        .await;
    }

    /// Ends the connection with a normal DISCONNECT, then lets the broker
    /// close first.
    pub async fn say_goodbye(mut self, version: Version) -> std::io::Result<()> {
        let disconnect = Disconnect::new(DisconnectReasonCode::NormalDisconnection);
        self.send_one(version, &Packet::Disconnect(disconnect))
            .await?;
        self.linger().await;
        Ok(())
    }

    /// Closes the connection of a session that ended without the client's
    /// DISCONNECT: the broker sees the connection end, as if the socket had
    /// been dropped. Half-closing and reading until the broker closes,
    /// rather than dropping it, spares a reset when the broker had sent
    /// more than the session read (a cut-off slow consumer's backlog, say),
    /// which rumqttd would log as an error. A link in memory ends the
    /// router's connection when dropped.
    pub async fn hang_up(mut self) {
        let _ = match &mut self {
            Conn::Tcp(s) => s.shutdown().await,
            Conn::Tls(s) => s.shutdown().await,
            Conn::Local(_) => return,
        };
        self.linger().await;
    }
}

fn codec_error(e: CodecError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

//! The in-process transport to the embedded rumqttd.
//!
//! A session speaks MQTT bytes to its broker connection whatever the broker
//! is. For the embedded rumqttd that connection used to be a loopback TCP
//! socket to rumqttd's listener, whose single thread then handed each
//! packet to the router: two kernel socket hops and a thread per message,
//! which made a message at a moderate rate cost consentry several times
//! what it costs in a flood (bench/README.md). Here the session gets one
//! end of a pair of in-memory pipes instead, and a bridge task on consentry's own
//! runtime plays the part of rumqttd's network link at the other end: it
//! decodes the session's packets with rumqttd's own codec and hands them to
//! the router over a local link, and encodes the router's notifications back.
//!
//! rumqttd's `LinkTx::publish` only makes QoS 0 publishes, but a packet
//! decoded by rumqttd's codec carries its QoS and packet id, and the router
//! treats a link's packets exactly as its network link's. What the network
//! link does besides, the bridge does too: it answers the CONNECT with the
//! router's CONNACK, wakes the router when a full outgoing buffer was read
//! (`Unschedule`), and ends the router's connection when the pipe closes.
//! Wills never reach it: sessions keep them (`crate::will`).

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{self, v4::V4, v5::V5, ConnAck, ConnectReturnCode, Packet, Protocol};
use rumqttd::Notification;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::codec::Version;

/// Bytes in flight each way in a session's pipe before the writer waits,
/// as a socket's buffer would make it.
const PIPE_BYTES: usize = 256 << 10;

type Built = Result<(LinkTx, LinkRx, Notification), LinkError>;

/// A link to open: client id, clean session, and where the answer goes.
type Open = (String, bool, tokio::sync::oneshot::Sender<Built>);

/// Opens local links to one router. The router's channel names a type
/// private to rumqttd, so only the opener thread and `router_full` hold it.
#[derive(Clone)]
pub struct Linker {
    /// Links are opened on a thread of their own: the router answers a new
    /// link on a channel that `LinkBuilder::build` blocks on, and it takes
    /// connections one at a time anyway. A burst of connections then costs
    /// no thread each, as `spawn_blocking` would.
    opener: std::sync::mpsc::Sender<Open>,
    /// Whether the router's event channel is full: a link's send would
    /// then block a runtime thread until the router caught up.
    router_full: Arc<dyn Fn() -> bool + Send + Sync>,
    max_packet: usize,
}

impl std::fmt::Debug for Linker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linker")
            .field("max_packet", &self.max_packet)
            .finish_non_exhaustive()
    }
}

impl Linker {
    /// Starts rumqttd as `Broker::start` does, a router and a thread per
    /// listener, keeping the router's channel for local links.
    pub fn start(config: rumqttd::Config) -> std::io::Result<Linker> {
        let tx = rumqttd::Router::new(config.id, config.router.clone()).spawn();
        let mut max_packet = 0;
        for (settings, v5) in config
            .v4
            .iter()
            .flat_map(|m| m.values().map(|s| (s.clone(), false)))
            .chain(
                config
                    .v5
                    .iter()
                    .flat_map(|m| m.values().map(|s| (s.clone(), true))),
            )
        {
            max_packet = max_packet.max(settings.connections.max_payload_size);
            let tx = tx.clone();
            std::thread::Builder::new()
                .name(settings.name.clone())
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, "embedded broker listener not started");
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let ended = if v5 {
                            rumqttd::Server::new(settings, tx, V5)
                                .start(rumqttd::LinkType::Remote)
                                .await
                        } else {
                            rumqttd::Server::new(settings, tx, V4)
                                .start(rumqttd::LinkType::Remote)
                                .await
                        };
                        if let Err(e) = ended {
                            tracing::error!(error = %e, "embedded broker listener stopped");
                        }
                    });
                })?;
        }
        let full = tx.clone();
        let (opener, requests) = std::sync::mpsc::channel::<Open>();
        std::thread::Builder::new()
            .name("rumqttd-links".into())
            .spawn(move || {
                for (client_id, clean, answer) in requests {
                    let built = rumqttd::local::LinkBuilder::new(&client_id, tx.clone())
                        .clean_session(clean)
                        // As the listeners are configured: a publish to a
                        // topic nobody subscribed to yet is kept.
                        .dynamic_filters(true)
                        .build();
                    let _ = answer.send(built);
                }
            })?;
        Ok(Linker {
            opener,
            router_full: Arc::new(move || full.is_full()),
            max_packet,
        })
    }

    /// A new broker connection speaking `version`: the session's ends of
    /// the pipe. The bridge runs until either end closes.
    pub fn connect(&self, version: Version) -> Pipe {
        // One pipe each way, so that the bridge can wait on both at once
        // without a lock around a shared one.
        let (up, from_session) = tokio::io::duplex(PIPE_BYTES);
        let (to_session, down) = tokio::io::duplex(PIPE_BYTES);
        let linker = self.clone();
        let task = async move {
            let ended = match version {
                Version::V4 => {
                    Bridge::new(linker, V4, true, from_session, to_session)
                        .run()
                        .await
                }
                Version::V5 => {
                    Bridge::new(linker, V5, false, from_session, to_session)
                        .run()
                        .await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "broker link ended");
            }
        };
        tokio::spawn(task);
        tokio::io::join(down, up)
    }

    /// Asks the opener thread for a link of `client_id`.
    fn opening(&self, client_id: &str, clean: bool) -> Opening {
        let (answer, built) = tokio::sync::oneshot::channel();
        let asked = self.opener.send((client_id.to_string(), clean, answer));
        Opening(asked.ok().map(|()| built))
    }
}

/// A link being built for a connection.
/// `None` if the opener thread is gone.
struct Opening(Option<tokio::sync::oneshot::Receiver<Built>>);

impl Opening {
    async fn open(self) -> Result<(LinkTx, LinkRx, Notification), BridgeError> {
        let gone = || std::io::Error::other("the embedded broker's link opener stopped");
        let built = self.0.ok_or_else(gone)?;
        Ok(built.await.map_err(|_| gone())??)
    }
}

/// A session's connection to the embedded broker: it reads what the
/// bridge writes down one pipe and writes up the other.
pub type Pipe = tokio::io::Join<DuplexStream, DuplexStream>;

#[derive(Debug, thiserror::Error)]
enum BridgeError {
    #[error("pipe: {0}")]
    Io(#[from] std::io::Error),
    #[error("codec: {0:?}")]
    Codec(protocol::Error),
    /// Boxed: rumqttd's error holds the router's whole event.
    #[error("router: {0}")]
    Link(Box<LinkError>),
    #[error("expected CONNECT, got {0:?}")]
    NotConnect(Box<Packet>),
}

impl From<LinkError> for BridgeError {
    fn from(e: LinkError) -> Self {
        BridgeError::Link(Box::new(e))
    }
}

impl From<protocol::Error> for BridgeError {
    fn from(e: protocol::Error) -> Self {
        BridgeError::Codec(e)
    }
}

struct Bridge<P> {
    linker: Linker,
    codec: P,
    /// MQTT 3.1.1 has no properties; rumqttd's 3.1.1 encoder panics on a
    /// packet that carries some (an MQTT 5 publisher's, say).
    v4: bool,
    from_session: DuplexStream,
    to_session: DuplexStream,
    read: BytesMut,
    /// Encoded for the session, not yet taken by the pipe.
    write: BytesMut,
}

/// How the session's side ended.
enum End {
    /// It sent DISCONNECT: the router drops the connection.
    Disconnect,
    /// It closed without one.
    Closed,
    /// The router ended the connection (a takeover, or a refused packet).
    Router,
}

impl<P: Protocol> Bridge<P> {
    fn new(
        linker: Linker,
        codec: P,
        v4: bool,
        from_session: DuplexStream,
        to_session: DuplexStream,
    ) -> Self {
        Bridge {
            linker,
            codec,
            v4,
            from_session,
            to_session,
            read: BytesMut::with_capacity(4096),
            write: BytesMut::with_capacity(4096),
        }
    }

    /// Appends `p`, as the session's protocol version can carry it.
    fn encode(&mut self, p: Packet) -> Result<(), BridgeError> {
        let p = if self.v4 { without_properties(p) } else { p };
        self.codec.write(p, &mut self.write)?;
        Ok(())
    }

    /// The pipe took `n` more of `write`, of which `written` were taken
    /// before; once it took all, `write` starts over.
    fn taken(&mut self, written: &mut usize, n: usize) {
        *written += n;
        if *written == self.write.len() {
            self.write.clear();
            *written = 0;
        }
    }

    /// The next whole packet in what was read, if any.
    fn parse(&mut self) -> Result<Option<Packet>, BridgeError> {
        match self.codec.read_mut(&mut self.read, self.linker.max_packet) {
            Ok(p) => Ok(Some(p)),
            Err(protocol::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn send(&mut self, p: Packet) -> Result<(), BridgeError> {
        self.encode(p)?;
        self.to_session.write_all(&self.write).await?;
        self.write.clear();
        Ok(())
    }

    async fn run(mut self) -> Result<(), BridgeError> {
        let connect = loop {
            if let Some(p) = self.parse()? {
                break p;
            }
            if self.from_session.read_buf(&mut self.read).await? == 0 {
                return Ok(());
            }
        };
        // Sessions keep wills themselves and send CONNECT without one.
        let Packet::Connect(connect, ..) = connect else {
            return Err(BridgeError::NotConnect(Box::new(connect)));
        };
        let (client_id, clean) = (connect.client_id, connect.clean_session);
        if client_id.is_empty() && !clean {
            let ack = ConnAck {
                session_present: false,
                code: ConnectReturnCode::ClientIdentifierNotValid,
            };
            return self.send(Packet::ConnAck(ack, None)).await;
        }
        let asked = std::time::Instant::now();
        let (mut tx, mut rx, ack) = self.linker.opening(&client_id, clean).open().await?;
        tracing::debug!(
            us = asked.elapsed().as_micros() as u64,
            "broker link opened"
        );
        let end = match Option::<Packet>::from(ack) {
            Some(ack) => match self.send(ack).await {
                Ok(()) => self.relay(&mut tx, &mut rx).await,
                Err(e) => Err(e),
            },
            None => Ok(End::Router),
        };
        if !matches!(end, Ok(End::Router | End::Disconnect)) {
            // The router's connection must end too, or it stays in the
            // router for good; DISCONNECT is the only way a local link can
            // end it.
            let _ = push(&self.linker, &mut tx, vec![disconnect()]).await;
        }
        end.map(|_| ())
    }

    /// Carries packets both ways until one side ends. What the session
    /// writes is read at all times, also while it is not reading: the
    /// session may be waiting to write before it reads again, and the
    /// router never blocks on a link, so the pipe's two ways cannot wait on
    /// each other. What the router sends is taken only as the pipe takes
    /// it: the router holds the rest, as it would for a slow socket.
    async fn relay(&mut self, tx: &mut LinkTx, rx: &mut LinkRx) -> Result<End, BridgeError> {
        let mut batch = Vec::new();
        let mut written = 0;
        loop {
            let pending = written < self.write.len();
            tokio::select! {
                n = self.from_session.read_buf(&mut self.read) => {
                    if n? == 0 {
                        return Ok(End::Closed);
                    }
                    let mut bye = None;
                    while let Some(p) = self.parse()? {
                        if let Packet::Disconnect(..) = &p {
                            bye = Some(End::Disconnect);
                        }
                        batch.push(p);
                        if bye.is_some() {
                            break;
                        }
                    }
                    if !batch.is_empty() {
                        push(&self.linker, tx, std::mem::take(&mut batch)).await?;
                    }
                    if let Some(end) = bye {
                        return Ok(end);
                    }
                }
                n = self.to_session.write(&self.write[written..]), if pending => {
                    self.taken(&mut written, wrote(n)?);
                }
                n = rx.next(), if !pending => {
                    // `None` is a wake-up that found nothing new.
                    let first = match n {
                        Ok(Some(first)) => first,
                        Ok(None) => continue,
                        Err(_) => return Ok(End::Router),
                    };
                    let mut unscheduled = false;
                    let mut next = Some(first);
                    while let Some(n) = next {
                        match Option::<Packet>::from(n) {
                            Some(p) => self.encode(p)?,
                            None => unscheduled = true,
                        }
                        next = ready_now(rx.next()).and_then(|r| r.ok().flatten());
                    }
                    // The pipe mostly takes it all at once; what it does
                    // not take waits for the branch above.
                    while written < self.write.len() {
                        match ready_now(self.to_session.write(&self.write[written..])) {
                            Some(n) => self.taken(&mut written, wrote(n)?),
                            None => break,
                        }
                    }
                    if unscheduled {
                        rx.wake().await?;
                    }
                }
            }
        }
    }
}

/// A write's count, where nothing written means the session's end is gone.
fn wrote(n: std::io::Result<usize>) -> std::io::Result<usize> {
    match n? {
        0 => Err(std::io::ErrorKind::WriteZero.into()),
        n => Ok(n),
    }
}

fn disconnect() -> Packet {
    Packet::Disconnect(
        protocol::Disconnect {
            reason_code: protocol::DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}

/// `p` without MQTT 5 properties.
fn without_properties(p: Packet) -> Packet {
    match p {
        Packet::ConnAck(a, _) => Packet::ConnAck(a, None),
        Packet::Publish(a, _) => Packet::Publish(a, None),
        Packet::PubAck(a, _) => Packet::PubAck(a, None),
        Packet::SubAck(a, _) => Packet::SubAck(a, None),
        Packet::PubRec(a, _) => Packet::PubRec(a, None),
        Packet::PubRel(a, _) => Packet::PubRel(a, None),
        Packet::PubComp(a, _) => Packet::PubComp(a, None),
        Packet::UnsubAck(a, _) => Packet::UnsubAck(a, None),
        Packet::Disconnect(a, _) => Packet::Disconnect(a, None),
        Packet::Subscribe(a, _) => Packet::Subscribe(a, None),
        Packet::Unsubscribe(a, _) => Packet::Unsubscribe(a, None),
        p => p,
    }
}

/// Hands packets to the router: all but the last straight into the link's
/// buffer, the last with the one event that makes the router read them.
async fn push(
    linker: &Linker,
    tx: &mut LinkTx,
    mut packets: Vec<Packet>,
) -> Result<(), BridgeError> {
    let Some(last) = packets.pop() else {
        return Ok(());
    };
    tx.buffer().extend(packets);
    // `LinkTx::send` blocks while the router's channel is full; waiting here
    // keeps the runtime's threads free meanwhile.
    let mut waits = 0u32;
    while (linker.router_full)() {
        waits += 1;
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    if waits > 0 {
        tracing::debug!(waits, "router channel was full");
    }
    tx.send(last).await?;
    Ok(())
}

/// `f`'s output if it is ready at once.
fn ready_now<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

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
//! (`Unschedule`), ends the router's connection when the pipe closes, and
//! publishes the will of a connection that ended without DISCONNECT, after
//! its will delay unless the client id came back first (as rumqttd's
//! listener does; a local link cannot ask the router to do it).

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{
    self, v4::V4, v5::V5, ConnAck, ConnectReturnCode, LastWill, LastWillProperties, Packet,
    Protocol,
};
use rumqttd::Notification;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::codec::Version;

/// Bytes in flight each way in a session's pipe before the writer waits,
/// as a socket's buffer would make it.
const PIPE_BYTES: usize = 256 << 10;

/// How long a will's link waits for the router to read it and drop it.
const WILL_LINK_WAIT: Duration = Duration::from_secs(5);

/// The packet id of a will's PUBLISH, on a link of its own.
const WILL_PKID: u16 = 1;

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
    ids: Arc<Mutex<HashMap<String, IdState>>>,
    /// Held while a client id's will is published: its link's id is the
    /// client id's, and a second link with it would replace the first
    /// before the router read the first one's will.
    will_turns: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl std::fmt::Debug for Linker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linker")
            .field("max_packet", &self.max_packet)
            .finish_non_exhaustive()
    }
}

/// A client id's connections, as far as wills must know them.
#[derive(Default)]
struct IdState {
    /// Counts the id's connections.
    epoch: u64,
    /// Whether the latest one started clean.
    latest_clean: bool,
    /// Its bridges still running.
    live: usize,
    /// A will waiting out its delay, to be told whether to go now (the id
    /// came back clean) or never (it resumed the session).
    waiting: Option<tokio::sync::oneshot::Sender<bool>>,
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
            ids: Arc::default(),
            will_turns: Arc::default(),
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

    /// A connection of `client_id` begins: returns its epoch, and its link
    /// to the router once built. A will still waiting from an earlier
    /// connection is published now if this one starts clean, and dropped
    /// if it resumes the session (MQTT 5 3.1.3.2.2), as rumqttd's listener
    /// does.
    ///
    /// The link is asked for under the same lock that hands out epochs, and
    /// one thread builds links in the order asked: the router sees the
    /// connections of one id in the order of their epochs, so the one it
    /// keeps after a takeover is the one with the latest epoch.
    fn arrive(&self, client_id: &str, clean: bool) -> (u64, Opening) {
        let mut ids = self.ids.lock().expect("ids lock");
        let opening = self.opening(client_id, clean);
        let id = ids.entry(client_id.to_string()).or_default();
        id.epoch += 1;
        id.latest_clean = clean;
        id.live += 1;
        if let Some(w) = id.waiting.take() {
            let _ = w.send(clean);
        }
        (id.epoch, opening)
    }

    /// A clean start of `client_id` that opens no link yet: a session with
    /// no will and nothing for the broker gets its broker connection only
    /// when it first has something to send. It still ends the session the
    /// id had (MQTT 5 3.1.2.4), so a will waiting out its delay from that
    /// session is published now, and one the earlier connection leaves
    /// later is published at once, as after any clean return.
    pub fn started_clean(&self, client_id: &str) {
        let mut ids = self.ids.lock().expect("ids lock");
        let Some(id) = ids.get_mut(client_id) else {
            return;
        };
        id.epoch += 1;
        id.latest_clean = true;
        if let Some(w) = id.waiting.take() {
            let _ = w.send(true);
        }
        if id.live == 0 {
            ids.remove(client_id);
        }
    }

    /// Asks the opener thread for a link of `client_id`.
    fn opening(&self, client_id: &str, clean: bool) -> Opening {
        let (answer, built) = tokio::sync::oneshot::channel();
        let asked = self.opener.send((client_id.to_string(), clean, answer));
        Opening(asked.ok().map(|()| built))
    }

    /// The connection of `client_id` from `epoch` ended, leaving `will`
    /// due. If the id already came back (a takeover can end the old
    /// connection after the new one began), the new connection decides at
    /// once what `arrived` would have.
    fn left(&self, client_id: &str, epoch: u64, will: Option<PendingWill>) {
        let mut ids = self.ids.lock().expect("ids lock");
        let Some(id) = ids.get_mut(client_id) else {
            return;
        };
        id.live -= 1;
        let due = match will {
            None => None,
            Some(w) if w.delay == 0 => Some((w, None)),
            Some(w) if id.epoch != epoch => id.latest_clean.then_some((w, None)),
            Some(w) => {
                let (tell, told) = tokio::sync::oneshot::channel();
                id.waiting = Some(tell);
                Some((w, Some(told)))
            }
        };
        if id.live == 0 && id.waiting.is_none() {
            ids.remove(client_id);
        }
        drop(ids);
        if let Some((w, told)) = due {
            self.publish_will(client_id.to_string(), w, told);
        }
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

/// The will of a connection, kept by the bridge to publish if the
/// connection ends without DISCONNECT.
struct PendingWill {
    will: LastWill,
    properties: Option<LastWillProperties>,
    /// Seconds: the will delay, or the session expiry if sooner.
    delay: u32,
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
    /// It sent DISCONNECT: the router drops the connection. The will is
    /// dropped too, unless the DISCONNECT asked for it (MQTT 5 reason
    /// 0x04); the DISCONNECT may also shorten the session expiry, and with
    /// it the will's delay.
    Disconnect {
        with_will: bool,
        session_expiry: Option<u32>,
    },
    /// It closed without one: the will is due.
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
        let Packet::Connect(connect, props, will, will_props, _login) = connect else {
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
        let (epoch, opening) = self.linker.arrive(&client_id, clean);
        let opened = opening.open().await;
        let (mut tx, mut rx, ack) = match opened {
            Ok(link) => link,
            Err(e) => {
                self.linker.left(&client_id, epoch, None);
                return Err(e);
            }
        };
        tracing::debug!(
            us = asked.elapsed().as_micros() as u64,
            "broker link opened"
        );
        // As rumqttd's listener: the will waits for its delay or for the
        // session's end, whichever comes first (MQTT 5 3.1.3.2.2).
        let mut session_expiry = props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0);
        let end = match Option::<Packet>::from(ack) {
            Some(ack) => match self.send(ack).await {
                Ok(()) => self.relay(&mut tx, &mut rx).await,
                Err(e) => Err(e),
            },
            None => Ok(End::Router),
        };
        // A DISCONNECT from the session is the one end without a will,
        // unless it asks for the will.
        let will = match end {
            Ok(End::Disconnect {
                with_will: false, ..
            }) => None,
            Ok(End::Disconnect {
                with_will: true,
                session_expiry: Some(e),
            }) => {
                session_expiry = e;
                will
            }
            _ => will,
        };
        let will = will.map(|will| PendingWill {
            delay: will_props
                .as_ref()
                .and_then(|p| p.delay_interval)
                .unwrap_or(0)
                .min(session_expiry),
            will,
            properties: will_props,
        });
        self.linker.left(&client_id, epoch, will);
        if !matches!(end, Ok(End::Router | End::Disconnect { .. })) {
            // The router's connection must end too, or it stays in the
            // router for good; DISCONNECT is the only way a local link can
            // end it, and it drops the router's copy of the will.
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
                        if let Packet::Disconnect(d, props) = &p {
                            bye = Some(End::Disconnect {
                                with_will: d.reason_code
                                    == protocol::DisconnectReasonCode::DisconnectWithWillMessage,
                                session_expiry: props
                                    .as_ref()
                                    .and_then(|p| p.session_expiry_interval),
                            });
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

impl Linker {
    /// Publishes a will through a link of its own: now, or when its delay
    /// ends unless `told` says otherwise first.
    fn publish_will(
        &self,
        client_id: String,
        w: PendingWill,
        told: Option<tokio::sync::oneshot::Receiver<bool>>,
    ) {
        let linker = self.clone();
        tokio::spawn(async move {
            if let Some(mut told) = told {
                let delay = Duration::from_secs(w.delay.into());
                let fire = match tokio::time::timeout(delay, &mut told).await {
                    Ok(fire) => fire.unwrap_or(false),
                    Err(_) => linker.delay_over(&client_id, &mut told),
                };
                if !fire {
                    return;
                }
            }
            if let Err(e) = linker.send_will(&client_id, w).await {
                tracing::warn!(client_id, error = %e, "will not published");
            }
        });
    }

    /// A will's delay ended: it goes, unless the id came back just now.
    fn delay_over(&self, client_id: &str, told: &mut tokio::sync::oneshot::Receiver<bool>) -> bool {
        let mut ids = self.ids.lock().expect("ids lock");
        if let Ok(fire) = told.try_recv() {
            return fire;
        }
        if let Some(id) = ids.get_mut(client_id) {
            id.waiting = None;
            if id.live == 0 {
                ids.remove(client_id);
            }
        }
        true
    }

    async fn send_will(&self, client_id: &str, w: PendingWill) -> Result<(), BridgeError> {
        let exactly_once = w.will.qos == protocol::QoS::ExactlyOnce;
        let publish = will_publish(w)?;
        let mut packets = vec![publish];
        if exactly_once {
            // The router keeps a QoS 2 publish until its PUBREL, which a
            // link that ends at once must send itself.
            packets.push(Packet::PubRel(
                protocol::PubRel {
                    pkid: WILL_PKID,
                    reason: protocol::PubRelReason::Success,
                },
                None,
            ));
        }
        packets.push(disconnect());
        // An id no session's can be (theirs start with the role), one per
        // client id, as rumqttd keeps a little state per id it has seen.
        let turn = self
            .will_turns
            .lock()
            .expect("will turns lock")
            .entry(client_id.to_string())
            .or_default()
            .clone();
        let sent = {
            let _turn = turn.lock().await;
            match self
                .opening(&format!("will:{client_id}"), true)
                .open()
                .await
            {
                Ok((mut tx, mut rx, _)) => {
                    let pushed = push(self, &mut tx, packets).await;
                    // The router has read the link once it drops it, on
                    // the DISCONNECT; only then may the next link take the id.
                    let dropped = async { while let Ok(Some(_)) | Ok(None) = rx.next().await {} };
                    let _ = tokio::time::timeout(WILL_LINK_WAIT, dropped).await;
                    pushed
                }
                Err(e) => Err(e),
            }
        };
        let mut turns = self.will_turns.lock().expect("will turns lock");
        if Arc::strong_count(&turn) == 2 {
            turns.remove(client_id);
        }
        sent
    }
}

/// The will as a PUBLISH. rumqttd's `Publish` keeps its QoS private, so it
/// is written with consentry's codec and read back with rumqttd's.
fn will_publish(w: PendingWill) -> Result<Packet, BridgeError> {
    use rumqttc::v5::mqttbytes::v5 as c;
    let qos = match w.will.qos {
        protocol::QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        protocol::QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        protocol::QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    };
    let properties = w.properties.map(|p| c::PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        content_type: p.content_type,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        ..Default::default()
    });
    let mut publish = c::Publish::new(
        std::str::from_utf8(&w.will.topic).unwrap_or_default(),
        qos,
        w.will.message,
        properties,
    );
    publish.retain = w.will.retain;
    if qos != rumqttc::v5::mqttbytes::QoS::AtMostOnce {
        publish.pkid = WILL_PKID;
    }
    let mut bytes = BytesMut::new();
    crate::codec::Version::V5
        .write(&crate::codec::Packet::Publish(publish), &mut bytes)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(V5.read_mut(&mut bytes, usize::MAX >> 4)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::mqttbytes::QoS;

    /// rumqttd's `Publish` hides its QoS, so the will is read back through
    /// consentry's codec to see what the router will get.
    fn round_trip(w: PendingWill) -> rumqttc::v5::mqttbytes::v5::Publish {
        let mut bytes = BytesMut::new();
        V5.write(will_publish(w).unwrap(), &mut bytes).unwrap();
        match Version::V5.read(&mut bytes, usize::MAX >> 4).unwrap() {
            Some(crate::codec::Packet::Publish(p)) => p,
            other => panic!("not a publish: {other:?}"),
        }
    }

    #[test]
    fn a_will_keeps_its_qos_retain_and_properties() {
        let p = round_trip(PendingWill {
            will: LastWill {
                topic: "public/will".into(),
                message: "gone".into(),
                qos: protocol::QoS::AtLeastOnce,
                retain: true,
            },
            properties: Some(LastWillProperties {
                delay_interval: Some(5),
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                content_type: Some("text/plain".into()),
                response_topic: None,
                correlation_data: None,
                user_properties: vec![("k".into(), "v".into())],
            }),
            delay: 5,
        });
        assert_eq!(p.topic, "public/will");
        assert_eq!(p.payload, "gone");
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert!(p.retain);
        assert_ne!(p.pkid, 0);
        let props = p.properties.unwrap();
        assert_eq!(props.message_expiry_interval, Some(60));
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(props.user_properties, vec![("k".into(), "v".into())]);

        let p = round_trip(PendingWill {
            will: LastWill {
                topic: "public/w0".into(),
                message: "".into(),
                qos: protocol::QoS::AtMostOnce,
                retain: false,
            },
            properties: None,
            delay: 0,
        });
        assert_eq!((p.qos, p.retain, p.pkid), (QoS::AtMostOnce, false, 0));
    }
}

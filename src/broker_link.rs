//! The in-process transport to the embedded rumqttd.
//!
//! For the embedded rumqttd a session's broker connection used to be a
//! loopback TCP socket to rumqttd's listener, and later a pair of in-memory
//! pipes to a bridge task that decoded what the session encoded and handed
//! it to the router: per message two encodings, two decodings, two pipe
//! copies and a task hop, about a tenth of consentry's CPU at 100k msg/s
//! (bench/HISTORY.md, nineteenth session). Now a session holds a local link
//! to the router itself ([`Local`]) and hands it packets: rumqttd's own
//! types, converted from the session's model (`crate::link_packets`).
//!
//! The router treats a local link's packets exactly as its network link's,
//! QoS and packet ids included. What rumqttd's network link does besides,
//! [`Local`] does too: it opens the link for the session's CONNECT and
//! returns the router's CONNACK, wakes the router when it read a full
//! outgoing buffer (`Unschedule`), and ends the router's connection when it
//! is dropped. Wills never reach it: sessions keep them (`crate::will`).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5 as c;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{self, v4::V4, v5::V5, Packet};
use rumqttd::Notification;

use crate::codec::{self, Version};
use crate::link_packets::from_router;

type Built = Result<(Opened, Notification), LinkError>;

/// A link the router opened, on its way to the session that asked for it.
/// Dropped before the session took it (the dial was given up: a will's send
/// timed out, say), it ends the router's connection, which nothing else
/// would: only a DISCONNECT ends a local link's connection.
struct Opened(Option<(LinkTx, LinkRx)>);

impl Drop for Opened {
    fn drop(&mut self) {
        if let Some((mut tx, rx)) = self.0.take() {
            // `LinkTx::send` does not await; on a full router channel it
            // blocks until the router reads, which it does without waiting
            // on anyone.
            let _ = ready_now(tx.send(disconnect()));
            drop(rx);
        }
    }
}

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
}

impl std::fmt::Debug for Linker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linker").finish_non_exhaustive()
    }
}

impl Linker {
    /// Starts rumqttd as `Broker::start` does, a router and a thread per
    /// listener, keeping the router's channel for local links.
    pub fn start(config: rumqttd::Config) -> std::io::Result<Linker> {
        let tx = rumqttd::Router::new(config.id, config.router.clone()).spawn();
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
                        .build()
                        .map(|(tx, rx, ack)| (Opened(Some((tx, rx))), ack));
                    // Not taken, it ends its connection (`Opened`).
                    let _ = answer.send(built);
                }
            })?;
        Ok(Linker {
            opener,
            router_full: Arc::new(move || full.is_full()),
        })
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
    async fn open(self) -> Result<(Opened, Notification), LocalError> {
        let built = self.0.ok_or(LocalError::OpenerGone)?;
        Ok(built.await.map_err(|_| LocalError::OpenerGone)??)
    }
}

/// A session's connection to the embedded broker's router.
pub struct Local {
    linker: Linker,
    /// Taken when the connection is dropped, to end it at the router.
    link: Option<(LinkTx, LinkRx)>,
    v4: bool,
    /// The router was sent DISCONNECT, or dropped the link: nothing more
    /// goes to it. A second DISCONNECT could reach a newer connection that
    /// reuses the router's connection id.
    ended: bool,
    /// The router paused this connection (its outgoing buffer was full)
    /// and is not yet told it was read.
    wake_owed: bool,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local")
            .field("v4", &self.v4)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{0}")]
    Codec(#[from] codec::CodecError),
    /// Boxed: rumqttd's error holds the router's whole event.
    #[error("router: {0}")]
    Link(Box<LinkError>),
    #[error("the embedded broker's link opener stopped")]
    OpenerGone,
    #[error("the router answered CONNECT with no CONNACK")]
    NoConnAck,
}

impl From<LinkError> for LocalError {
    fn from(e: LinkError) -> Self {
        LocalError::Link(Box::new(e))
    }
}

impl From<LocalError> for std::io::Error {
    fn from(e: LocalError) -> Self {
        std::io::Error::other(e.to_string())
    }
}

impl Linker {
    /// Opens a connection to the router for `connect`, as a client
    /// speaking `version`, and returns it with the router's CONNACK.
    pub async fn dial(
        &self,
        version: Version,
        connect: &c::Connect,
    ) -> Result<(Local, c::ConnAck), LocalError> {
        let v4 = version == Version::V4;
        // rumqttd would accept it and keep a session nobody can resume.
        if connect.client_id.is_empty() && !connect.clean_start {
            let refused = c::ConnAck {
                session_present: false,
                code: c::ConnectReturnCode::ClientIdentifierNotValid,
                properties: None,
            };
            let none = Local {
                linker: self.clone(),
                link: None,
                v4,
                ended: true,
                wake_owed: false,
            };
            return Ok((none, refused));
        }
        let asked = std::time::Instant::now();
        let (mut opened, ack) = self
            .opening(&connect.client_id, connect.clean_start)
            .open()
            .await?;
        tracing::debug!(
            us = asked.elapsed().as_micros() as u64,
            "broker link opened"
        );
        // From here on, dropping `local` ends the router's connection.
        let local = Local {
            linker: self.clone(),
            link: opened.0.take(),
            v4,
            ended: false,
            wake_owed: false,
        };
        match Option::<Packet>::from(ack).map(|p| from_router(p, v4)) {
            Some(Ok(codec::Packet::ConnAck(ack))) => Ok((local, ack)),
            Some(Err(e)) => Err(e.into()),
            _ => Err(LocalError::NoConnAck),
        }
    }
}

impl Local {
    /// Hands `packets` to the router, in order, and empties it.
    pub async fn send(&mut self, packets: &mut Vec<Packet>) -> Result<(), LocalError> {
        if self.ended {
            packets.clear();
            return Ok(());
        }
        if let Some(bye) = packets
            .iter()
            .position(|p| matches!(p, Packet::Disconnect(..)))
        {
            // The router drops the connection on it; nothing after it may
            // reach a connection that reuses its id.
            packets.truncate(bye + 1);
            self.ended = true;
        }
        match self.link.as_mut() {
            Some((tx, _)) => push(&self.linker, tx, packets).await,
            None => {
                packets.clear();
                Ok(())
            }
        }
    }

    /// Waits for what the router sends and appends it to `into`, with all
    /// that is ready besides. Returns how many packets came; 0 when the
    /// router ended the connection.
    ///
    /// Cancel-safe: a notification is taken and converted with no await in
    /// between, and a wake-up owed to the router is sent at the next call
    /// if this one is cancelled before it.
    pub async fn receive(
        &mut self,
        into: &mut VecDeque<codec::Packet>,
    ) -> Result<usize, LocalError> {
        let Some((_, rx)) = self.link.as_mut() else {
            return Ok(0);
        };
        loop {
            if self.wake_owed {
                rx.wake().await?;
                self.wake_owed = false;
            }
            let first = match rx.next().await {
                Ok(Some(first)) => first,
                // A wake-up that found nothing new.
                Ok(None) => continue,
                Err(_) => {
                    self.ended = true;
                    return Ok(0);
                }
            };
            let mut n = 0;
            let mut next = Some(first);
            while let Some(note) = next {
                match Option::<Packet>::from(note) {
                    Some(p) => {
                        into.push_back(from_router(p, self.v4)?);
                        n += 1;
                    }
                    None => self.wake_owed = true,
                }
                next = ready_now(rx.next()).and_then(|r| r.ok().flatten());
            }
            if self.wake_owed {
                rx.wake().await?;
                self.wake_owed = false;
            }
            if n > 0 {
                return Ok(n);
            }
        }
    }
}

impl Drop for Local {
    /// The router's connection must end too, or it stays in the router for
    /// good; DISCONNECT is the only way a local link can end it.
    fn drop(&mut self) {
        let Some((mut tx, rx)) = self.link.take() else {
            return;
        };
        if self.ended {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let linker = self.linker.clone();
        runtime.spawn(async move {
            let _ = push(&linker, &mut tx, &mut vec![disconnect()]).await;
            drop(rx);
        });
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

/// Hands packets to the router: all but the last straight into the link's
/// buffer, the last with the one event that makes the router read them.
async fn push(
    linker: &Linker,
    tx: &mut LinkTx,
    packets: &mut Vec<Packet>,
) -> Result<(), LocalError> {
    let Some(last) = packets.pop() else {
        return Ok(());
    };
    tx.buffer().extend(packets.drain(..));
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

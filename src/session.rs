//! One client session: the client's socket on one side, a connection of its
//! own to the upstream broker on the other, and the ACT between them.
//!
//! rumqttd has no publish, subscribe or delivery hook, so consentry owns the
//! MQTT session and relays: every PUBLISH from the client passes `ingress`,
//! every SUBSCRIBE passes `subscribe`, and every PUBLISH from the broker
//! passes `deliver` — at delivery time, so a revoked consent also stops
//! retained and queued messages. Packet ids are the client's on the way up.
//! On the way down they are the broker's for a persistent session, acked end
//! to end; a session that ends with its connection gets consentry's own flow
//! instead (`own_flow`). Where consentry drops a QoS 1/2 message it completes
//! the acknowledgement flow itself, so neither side resends forever.
//!
//! A personal-data delivery is written to the client only once its ledger
//! record is durable (invariant 2). Deliveries read off the broker in one go
//! are decided together and wait on the ledger together, which is how group
//! commit reaches the session.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use rumqttc::v5::mqttbytes::v5::{
    self, ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, PubAck,
    PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, Publish, SubAck,
    SubscribeReasonCode, UnsubAckReason,
};
use rumqttc::v5::mqttbytes::QoS;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::act::{ActHandle, Delivery, Deny, Ingress, Principal, View};
use crate::api::login_limiter::Source;
use crate::auth::SharedCredentials;
use crate::backpressure::{Backpressure, Held, Lag};
use crate::broker::Upstream;
use crate::client_ids::{self, Claim, ClientIds};
use crate::codec::{CodecError, Packet, Version};
use crate::config::ServerConfig;
use crate::ledger::{Ledger, MaskedFields, ShareRef, Ticket};
use crate::logging::Throttle;
use crate::mask;
use crate::metrics as m;
use crate::model::Undeclared;
use crate::own_flow::{Answer, OwnFlow};
use crate::password_work::{PasswordWork, WorkError};
use crate::topic::{self, TopicName};
use crate::upstream_conn::{Conn, Inbox, Outbox, READ_CHUNK};
use crate::will::{self, Will};

/// Topic aliases a client may set up with us (MQTT 5). They never reach the
/// broker: every forwarded PUBLISH carries its full topic.
const ALIAS_MAX: u16 = 64;
/// Our own keep-alive towards the broker, independent of the client's
/// (which may legally be 0, and which rumqttd would refuse).
const UPSTREAM_KEEP_ALIVE: u16 = 60;

/// Deliveries waiting for their ledger records before a session stops
/// reading from the broker (backpressure: the broker holds the rest).
const MAX_PENDING_CHUNKS: usize = 64;
/// Bytes a session may hold decided for its client but not yet written to
/// its socket (waiting for their ledger records, or for a slow client to
/// take them) before it stops decoding what the broker sent. Those are
/// delivered even if the user withdraws meanwhile: their records are
/// written. What the broker still holds is decided when its turn comes.
/// An outside review saw 3.4 MB held for a provider that read slowly,
/// delivered seconds after a withdrawal; a group commit's worth at full
/// speed is tens of KB.
const MAX_DECIDED_AHEAD: usize = 1 << 20;
/// How often a held publisher looks whether its subscribers caught up.
const HOLD_POLL: Duration = Duration::from_millis(2);
/// A client's read buffer; grown for large packets and given back after.
const CLIENT_BUF: usize = 1024;
/// In a graceful stop, a session ends once the broker has sent it nothing
/// for this long: what devices published before the stop has reached it.
const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// A provider's session waits at least this much longer: the wills of
/// devices whose sessions end in the drain are published then, and are for
/// it to receive.
const DRAIN_WILLS: Duration = Duration::from_millis(750);

/// Client-bound bytes and the ledger records they wait for.
struct Chunk {
    bytes: BytesMut,
    /// The newest of its ledger records; `None` when it holds none.
    ticket: Option<Ticket>,
    delivered: Delivered,
    read_at: Instant,
}

/// Deliveries staged for the client, by what let them through. They are
/// counted once written: a delivery whose ledger record fails is withheld,
/// not delivered.
#[derive(Clone, Copy, Default)]
struct Delivered {
    plain: u64,
    consented: u64,
    masked: u64,
}

impl Delivered {
    fn total(&self) -> u64 {
        self.plain + self.consented + self.masked
    }
}

/// Waits until the chunk's records are durable. Cancel-safe: the ticket is
/// cleared only once it is durable, with no await in between.
async fn durable(ledger: &Ledger, chunk: Option<&mut Chunk>) -> Result<(), End> {
    let Some(chunk) = chunk else { return Ok(()) };
    if let Some(ticket) = chunk.ticket {
        if let Err(e) = ledger.durable(ticket).await {
            tracing::error!(error = %e, "ledger append failed; delivery withheld");
            return Err(End::Ledger);
        }
        chunk.ticket = None;
    }
    Ok(())
}

/// The two acknowledgement stages of a message from the broker.
#[derive(Clone, Copy)]
enum Stage {
    /// PUBACK (QoS 1) or PUBREC (QoS 2).
    Publish,
    /// PUBCOMP (QoS 2).
    Release,
}

/// What every session shares.
pub struct Shared {
    pub act: Arc<ActHandle>,
    pub creds: SharedCredentials,
    pub ledger: Ledger,
    pub upstream: Upstream,
    pub server: ServerConfig,
    pub creator: String,
    pub pseudonym_master: [u8; 32],
    /// Shifts the clock the ACT sees; for testing collection windows.
    pub clock_offset: chrono::Duration,
    /// Masked views shared between subscribers that get the same view.
    pub views: mask::ViewCache,
    pub hot: m::Hot,
    pub backpressure: Backpressure,
    pub client_ids: ClientIds,
    pub wills: will::Outbox,
    /// argon2 runs, bounded; shared with the API.
    pub password_work: Arc<PasswordWork>,
}

impl Shared {
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.clock_offset
    }
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Codec(#[from] CodecError),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("topic alias invalid: 0 or above the maximum of {ALIAS_MAX}")]
    Alias,
    #[error("topic name invalid: {0}")]
    TopicName(&'static str),
    #[error("no CONNECT within the connect timeout")]
    ConnectTimeout,
    #[error("keep-alive expired")]
    KeepAlive,
    #[error("upstream broker: {0}")]
    Upstream(String),
    #[error("share ledger unavailable")]
    Ledger,
    #[error("server shutting down")]
    Shutdown,
    #[error("slow consumer: too far behind and reading nothing")]
    SlowConsumer,
    #[error("another connection took the client id over")]
    TakenOver,
    #[error("this device was removed from its user's account")]
    DeviceRemoved,
}

impl End {
    fn kind(&self) -> &'static str {
        match self {
            End::Io(_) => "io",
            End::Codec(CodecError::TooLarge { .. }) => "too_large",
            End::Codec(_) => "malformed",
            End::Protocol(_) => "protocol",
            End::Alias => "topic_alias",
            End::TopicName(_) => "topic_name",
            End::ConnectTimeout => "connect_timeout",
            End::KeepAlive => "keep_alive",
            End::Upstream(_) => "upstream",
            End::Ledger => "ledger",
            End::Shutdown => "shutdown",
            End::SlowConsumer => "slow_consumer",
            End::TakenOver => "taken_over",
            End::DeviceRemoved => "device_removed",
        }
    }

    fn reason(&self) -> Option<DisconnectReasonCode> {
        Some(match self {
            End::Codec(CodecError::TooLarge { .. }) => DisconnectReasonCode::PacketTooLarge,
            End::Codec(_) => DisconnectReasonCode::MalformedPacket,
            End::Protocol(_) => DisconnectReasonCode::ProtocolError,
            End::Alias => DisconnectReasonCode::TopicAliasInvalid,
            End::TopicName(_) => DisconnectReasonCode::TopicNameInvalid,
            End::KeepAlive => DisconnectReasonCode::KeepAliveTimeout,
            End::Upstream(_) => DisconnectReasonCode::UnspecifiedError,
            End::Ledger => DisconnectReasonCode::ServerBusy,
            End::Shutdown => DisconnectReasonCode::ServerShuttingDown,
            End::SlowConsumer => DisconnectReasonCode::QuotaExceeded,
            End::TakenOver => DisconnectReasonCode::SessionTakenOver,
            End::DeviceRemoved => DisconnectReasonCode::AdministrativeAction,
            End::Io(_) | End::ConnectTimeout => return None,
        })
    }

    /// The reason string of the DISCONNECT: a sentence for whoever reads
    /// the client's log. The broker's own troubles are not the client's
    /// business beyond their existence.
    fn reason_string(&self) -> String {
        match self {
            End::Upstream(_) => "the broker connection failed".into(),
            other => other.to_string(),
        }
    }
}

/// Why a topic name that [`TopicName::new`] (or UTF-8 decoding) refused is
/// invalid, for the DISCONNECT's reason string. Only on the error path.
fn topic_name_fault(topic: &[u8]) -> &'static str {
    match std::str::from_utf8(topic) {
        Err(_) => "not UTF-8",
        Ok("") => "empty",
        Ok(t) if t.contains(['+', '#']) => "contains a wildcard",
        Ok(_) => "contains a NUL character",
    }
}

/// Serves one accepted connection until it ends. Never panics on input.
pub async fn serve<S>(
    shared: Arc<Shared>,
    mut client: S,
    peer: std::net::SocketAddr,
    peer_cert_sha256: Option<String>,
    id: u64,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut buf = BytesMut::with_capacity(CLIENT_BUF);
    let timeout = Duration::from_secs(shared.server.connect_timeout_secs);
    let first = tokio::select! {
        r = tokio::time::timeout(timeout, read_connect(&mut client, &mut buf, shared.server.max_packet_size)) => {
            r.unwrap_or(Err(End::ConnectTimeout))
        }
        _ = shutdown.changed() => Err(End::Shutdown),
    };
    let (version, packet) = match first {
        Ok(x) => x,
        Err(End::Codec(CodecError::Protocol(level))) => {
            // MQTT 3.1 (level 3) or another level we do not speak. MQTT
            // 3.1.1 §3.1.2.2: answer CONNACK 0x01 (unacceptable protocol
            // version), then close. rumqttc's parsers refuse such a CONNECT
            // (InvalidProtocolLevel) before any of it can be read, so
            // `Version::detect` reads the level byte from the raw header;
            // the answer is written by rumqttc's 3.1.1 codec, MQTT 3.1's
            // CONNACK being the same four bytes.
            metrics::counter!(m::CONNECTIONS, "role" => "unknown", "result" => "unsupported_protocol")
                .increment(1);
            tracing::info!(
                session = id,
                level,
                "CONNECT refused: unsupported protocol level (3.1.1 and 5 are spoken)"
            );
            let refusal = connack(ConnectReturnCode::UnsupportedProtocolVersion, None);
            let _ = write_packet(&mut client, Version::V4, &refusal).await;
            let _ = client.shutdown().await;
            return;
        }
        Err(e) => {
            metrics::counter!(m::PROTOCOL_ERRORS, "kind" => e.kind()).increment(1);
            tracing::debug!(session = id, error = %e, "connection closed before CONNECT");
            return;
        }
    };
    let Packet::Connect(connect, will, login) = packet else {
        return;
    };
    let who = match authenticate(&shared, login.as_ref(), peer_cert_sha256.as_deref(), peer).await {
        Ok(p) => p,
        Err(code) => {
            let result = match code {
                ConnectReturnCode::ServerBusy => "busy",
                _ => "refused",
            };
            metrics::counter!(m::CONNECTIONS, "role" => "unknown", "result" => result).increment(1);
            // A flood of wrong passwords is thousands a second: one line a
            // second says it, with the address to look for.
            static REFUSALS: std::sync::Mutex<Throttle> =
                std::sync::Mutex::new(Throttle::new(Duration::from_secs(1)));
            let logged = REFUSALS
                .lock()
                .map_or(Some(0), |mut t| t.allow(Instant::now()));
            if let Some(left_out) = logged {
                tracing::info!(
                    session = id,
                    %peer,
                    ?code,
                    refusals_left_out = left_out,
                    "CONNECT refused (logged at most once a second; \
                     consentry_connections_total counts each)"
                );
            }
            let _ = write_packet(&mut client, version, &connack(code, None)).await;
            return;
        }
    };
    let role = who.role();
    let mut session = Session {
        shared: shared.clone(),
        id,
        version,
        counters: DeliveryCounters::new(&who),
        who,
        aliases: HashMap::new(),
        refused_qos2_from_client: HashSet::new(),
        dropped_qos2_from_broker: HashSet::new(),
        acks_publish: VecDeque::new(),
        acks_release: VecDeque::new(),
        own_unsubscribes: HashSet::new(),
        downgraded_qos2: HashSet::new(),
        pending_subacks: HashMap::new(),
        subs: Vec::new(),
        // Grown on first use: an idle device should cost little.
        to_client: BytesMut::new(),
        to_broker: Outbox::new(version, shared.upstream.link.is_some()),
        ticket: None,
        delivered: Delivered::default(),
        pseudonym_key: None,
        own: None,
        knows_all_filters: false,
        expiry_at_connect: 0,
        pending_bytes: 0,
        lag: None,
        lag_filters: Vec::new(),
        pending_lag: HashMap::new(),
        held: Held::default(),
        claim: None,
        lazy: None,
        up_open: false,
        awaiting_broker: 0,
        up_flows: HashSet::new(),
        qos2_in: HashSet::new(),
        client_max_packet: None,
        will: None,
    };
    let upstream = match session.open_upstream(&mut client, connect, will).await {
        Ok(Opened::Session(up)) => *up,
        Ok(Opened::Refused) => {
            metrics::counter!(m::CONNECTIONS, "role" => role, "result" => "refused").increment(1);
            return;
        }
        Ok(Opened::Unavailable) => {
            metrics::counter!(m::CONNECTIONS, "role" => role, "result" => "unavailable")
                .increment(1);
            return;
        }
        Err(e) => {
            metrics::counter!(m::CONNECTIONS, "role" => role, "result" => "error").increment(1);
            tracing::warn!(session = id, error = %e, "could not open the upstream session");
            session.close_with(&mut client, &e).await;
            return;
        }
    };
    metrics::counter!(m::CONNECTIONS, "role" => role, "result" => "accepted").increment(1);
    metrics::gauge!(m::CONNECTED, "role" => role).increment(1.0);
    let (mut up, up_buf, keep_alive) = upstream;
    let result = session
        .run(&mut client, &mut up, buf, up_buf, keep_alive, &mut shutdown)
        .await;
    if let Some(u) = up.take() {
        tokio::spawn(u.hang_up());
    }
    // Still here: the session ended without a DISCONNECT that drops it.
    if let (Some(w), Some(claim)) = (session.will.take(), session.claim.take()) {
        let who = session.who.clone();
        will::session_ended(&shared, who, session.version, claim, w, session.id);
    }
    metrics::gauge!(m::CONNECTED, "role" => role).decrement(1.0);
    if let Err(e) = result {
        if !matches!(e, End::Io(_)) {
            metrics::counter!(m::PROTOCOL_ERRORS, "kind" => e.kind()).increment(1);
        }
        if matches!(e, End::Upstream(_)) {
            // Not the client's doing: the broker ended its side.
            tracing::warn!(session = id, role, error = %e, "session ended");
        } else {
            tracing::debug!(session = id, role, error = %e, "session ended");
        }
        session.close_with(&mut client, &e).await;
    }
}

/// How a CONNECT ended: a session, or a failing CONNACK already sent.
enum Opened {
    Session(Box<(Option<Conn>, Inbox, Option<Duration>)>),
    /// consentry or the broker refused the client.
    Refused,
    /// The broker could not be reached or refused consentry itself.
    Unavailable,
}

/// A broker's refusal of the credentials or client id consentry logs in
/// with, not of the client, whom consentry authenticated itself.
fn upstream_login_refused(code: ConnectReturnCode) -> bool {
    matches!(
        code,
        ConnectReturnCode::BadUserNamePassword
            | ConnectReturnCode::NotAuthorized
            | ConnectReturnCode::BadAuthenticationMethod
            | ConnectReturnCode::Banned
    )
}

async fn read_connect<S: AsyncRead + Unpin>(
    client: &mut S,
    buf: &mut BytesMut,
    max: usize,
) -> Result<(Version, Packet), End> {
    loop {
        if let Some(v) = Version::detect(buf, max)? {
            return match v.read(buf, max)? {
                Some(p @ Packet::Connect(..)) => Ok((v, p)),
                _ => Err(End::Protocol("first packet must be CONNECT")),
            };
        }
        if client.read_buf(buf).await? == 0 {
            return Err(End::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

async fn authenticate(
    shared: &Shared,
    login: Option<&v5::Login>,
    cert: Option<&str>,
    peer: std::net::SocketAddr,
) -> Result<Principal, ConnectReturnCode> {
    let creds = shared.creds.load_full();
    if let Some(fp) = cert {
        if let Ok(p) = creds.by_certificate(fp) {
            return Ok(p);
        }
    }
    match login {
        Some(l) => {
            if let Some(p) = creds.verified_before(&l.username, l.password.as_bytes()) {
                return Ok(p);
            }
            let (user, pass) = (l.username.clone(), l.password.clone());
            match shared
                .password_work
                .run(Source::of(Some(peer.ip())), move || {
                    creds.verify_password(&user, pass.as_bytes())
                })
                .await
            {
                Ok(verified) => verified.map_err(|_| ConnectReturnCode::BadUserNamePassword),
                Err(WorkError::Busy) => Err(ConnectReturnCode::ServerBusy),
                Err(WorkError::Failed) => Err(ConnectReturnCode::ServerUnavailable),
            }
        }
        None if shared.server.allow_anonymous => Ok(Principal::Anonymous),
        None => Err(ConnectReturnCode::NotAuthorized),
    }
}

fn connack(code: ConnectReturnCode, properties: Option<ConnAckProperties>) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present: false,
        code,
        properties,
    })
}

async fn write_packet<S: AsyncWrite + Unpin>(s: &mut S, v: Version, p: &Packet) -> Result<(), End> {
    let mut out = BytesMut::new();
    v.write(p, &mut out)?;
    s.write_all(&out).await?;
    Ok(())
}

/// The reason personal data is refused at ingress while the share ledger is
/// closed (a failed write): it could not be shared, and with the embedded
/// broker what was accepted would be lost at the restart the ledger needs.
pub(crate) const LEDGER_UNAVAILABLE: &str = "ledger_unavailable";
/// Why an empty publish on a personal topic that is not a retained clear
/// is refused (0x99).
pub(crate) const EMPTY_PAYLOAD: &str = "empty_payload";

/// Whether an ingress refusal is the payload's fault, which MQTT 5 answers
/// with 0x99 Payload format invalid rather than 0x87 Not authorized.
fn payload_at_fault(reason: &str) -> bool {
    matches!(
        reason,
        "undecodable" | "undeclared_field" | "field_type" | "repeated_key" | EMPTY_PAYLOAD
    )
}

/// The MQTT 5 properties of a PUBLISH of personal data that carry
/// whatever its publisher put in them (user properties, content type,
/// response topic, correlation data) are removed: they would take data past
/// minimization and past every mask (a raw position in a user property
/// beside a generalized one in the payload). What the broker and the
/// protocol set (message expiry, payload format, subscription identifiers)
/// stays.
pub(crate) fn strip_free_properties(properties: &mut Option<v5::PublishProperties>) {
    if let Some(p) = properties.as_mut() {
        p.user_properties = Vec::new();
        p.content_type = None;
        p.response_topic = None;
        p.correlation_data = None;
    }
}

/// What ingress makes of `who` publishing `payload` on `topic` now: the
/// payload to forward (minimized) and whether it is personal data (whose
/// free-form properties the caller removes, [`strip_free_properties`]), or
/// why not.
pub(crate) fn decide_ingress(
    shared: &Shared,
    who: &Principal,
    topic: TopicName,
    payload: &Bytes,
) -> Result<(Bytes, bool), &'static str> {
    let started = m::time_this_decision().then(Instant::now);
    let act = shared.act.load();
    let decision = act.ingress(who, topic, shared.now());
    if let Some(started) = started {
        let took = started.elapsed().as_secs_f64();
        shared.hot.ingress_decision.record(took);
    }
    match decision {
        Err(deny) => Err(deny.as_str()),
        Ok(Ingress::Plain) => Ok((payload.clone(), false)),
        Ok(Ingress::Personal { .. }) if !shared.ledger.is_healthy() => Err(LEDGER_UNAVAILABLE),
        // Only a retained clear may be empty, and it does not come here.
        // Any other empty publish would be acknowledged and then reach no
        // provider: at delivery an empty payload cannot be told from a
        // clear, which shares nothing.
        Ok(Ingress::Personal { .. }) if payload.is_empty() => Err(EMPTY_PAYLOAD),
        Ok(Ingress::Personal { kind, .. }) => {
            let strict = kind.undeclared == Undeclared::Reject;
            match mask::minimize(kind.format, payload, &kind.fields, &kind.types, strict) {
                Ok(min) => {
                    if !min.removed.is_empty() {
                        tracing::debug!(removed = min.removed.len(), "undeclared fields removed");
                    }
                    Ok((min.payload, true))
                }
                Err(mask::MaskError::Undeclared(_)) => Err("undeclared_field"),
                Err(mask::MaskError::Type { .. }) => Err("field_type"),
                Err(mask::MaskError::RepeatedKey(_)) => Err("repeated_key"),
                Err(_) => Err("undecodable"),
            }
        }
    }
}

struct Session {
    shared: Arc<Shared>,
    id: u64,
    version: Version,
    who: Principal,
    aliases: HashMap<u16, Bytes>,
    /// QoS 2 publishes we refused: their PUBREL is answered here.
    refused_qos2_from_client: HashSet<u16>,
    /// QoS 2 deliveries we dropped or downgraded: the broker's PUBREL is
    /// answered here.
    dropped_qos2_from_broker: HashSet<u16>,
    /// Messages from the broker awaiting their PUBACK/PUBREC, in arrival
    /// order, with the ack once someone (client or consentry) gave it.
    acks_publish: VecDeque<(u16, Option<Packet>)>,
    /// The same for PUBREL → PUBCOMP.
    acks_release: VecDeque<(u16, Option<Packet>)>,
    /// UNSUBSCRIBEs consentry sent on its own (see `recheck_subscriptions`).
    own_unsubscribes: HashSet<u16>,
    /// QoS 2 messages delivered at QoS 1 (the subscription's QoS).
    downgraded_qos2: HashSet<u16>,
    /// SUBSCRIBE packet id → per-filter answer decided here (`None`: the
    /// broker's answer, in order).
    pending_subacks: HashMap<u16, Vec<Option<SubscribeReasonCode>>>,
    /// Filters held, with their granted QoS: rumqttd 0.20 does not downgrade
    /// a delivery to the subscription's QoS, so the session does.
    subs: Vec<(String, QoS)>,
    to_client: BytesMut,
    to_broker: Outbox,
    /// The newest ledger record of what `to_client` holds.
    ticket: Option<Ticket>,
    /// Publishes written to the client in the current batch.
    delivered: Delivered,
    /// This provider's pseudonymization key, derived on first use.
    pseudonym_key: Option<[u8; 32]>,
    /// Per-delivery counters, registered once per session rather than
    /// looked up (and their label allocated) per message.
    counters: DeliveryCounters,
    /// Set when the session is not persistent: consentry then completes the
    /// broker's QoS flow at once and runs its own towards the client.
    own: Option<OwnFlow>,
    /// Set when the session began empty and ends with its connection (clean
    /// start, not persistent): every filter it holds came in a SUBSCRIBE on
    /// this connection, so `subs` is all of them. A session resumed with
    /// clean start 0 and expiry 0 is not persistent, but holds the filters
    /// of the session it resumed.
    knows_all_filters: bool,
    /// The Session Expiry Interval the CONNECT asked for (0 in MQTT 3.1.1).
    expiry_at_connect: u32,
    /// Bytes in the chunks waiting to be written to the client
    /// ([`MAX_DECIDED_AHEAD`]).
    pending_bytes: usize,
    /// This session's place in the backpressure count, while it holds
    /// filters the broker acknowledged (`lag_filters`).
    lag: Option<Arc<Lag>>,
    lag_filters: Vec<String>,
    /// Filters of SUBSCRIBEs sent to the broker, by packet id, until its SUBACK.
    pending_lag: HashMap<u16, Vec<String>>,
    /// Subscribers this session, as a publisher, waits for.
    held: Held,
    claim: Option<Claim>,
    /// For a session that ends with its connection: the CONNECT to send
    /// the broker when there is something to send.
    lazy: Option<v5::Connect>,
    /// Whether the broker connection is open.
    up_open: bool,
    /// Publishes a lazy session passed at ingress while its broker
    /// connection was not open yet: counted forwarded once it opens, dropped
    /// if it cannot.
    awaiting_broker: u64,
    /// The client's will. The broker never gets it: it passed ingress at
    /// CONNECT, but it is collected when it is published, so consentry
    /// keeps it and decides it again when it is due (`will::session_ended`).
    will: Option<Will>,
    /// The client's QoS 1/2 publishes the broker has not finished
    /// acknowledging (tracked for lazy sessions only).
    up_flows: HashSet<u16>,
    /// The client's QoS 2 publishes the broker has not completed: a PUBREL
    /// for any other id is a retransmission the broker may not know.
    qos2_in: HashSet<u16>,
    /// The client's Maximum Packet Size (MQTT 5), if it set one.
    client_max_packet: Option<usize>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.backpressure.remove(&mut self.lag);
        if let Some(c) = &self.claim {
            self.shared.client_ids.release(c);
        }
        self.set_up_open(false);
    }
}

struct DeliveryCounters {
    plain: metrics::Counter,
    delivered: metrics::Counter,
    masked: metrics::Counter,
}

impl DeliveryCounters {
    fn new(who: &Principal) -> Self {
        let c = |result, reason| m::delivery_counter(who, result, reason);
        DeliveryCounters {
            plain: c("delivered", "acl"),
            delivered: c("delivered", "consent"),
            masked: c("masked", "consent"),
        }
    }
}

impl Session {
    /// Connects to the broker on behalf of the client, or answers the
    /// CONNECT with a failing CONNACK.
    async fn open_upstream<S: AsyncWrite + Unpin>(
        &mut self,
        client: &mut S,
        mut connect: v5::Connect,
        will: Option<v5::LastWill>,
    ) -> Result<Opened, End> {
        if matches!(self.who, Principal::Provider { .. }) && !self.shared.ledger.is_healthy() {
            // No delivery of personal data can be recorded until a restart:
            // a provider let in would be disconnected at its first one.
            tracing::warn!(session = self.id, "provider refused: the share ledger is closed after a failed write; restart consentry once the disk is fixed");
            let unavailable = connack(ConnectReturnCode::ServerUnavailable, None);
            write_packet(client, self.version, &unavailable).await?;
            return Ok(Opened::Unavailable);
        }
        if self.version == Version::V4 && connect.client_id.is_empty() && !connect.clean_start {
            // MQTT 3.1.1 cannot tell a client an id made up for it, so such a
            // persistent session could never be resumed, and the broker
            // would keep it, queueing for it, for good (MQTT-3.1.3-8).
            tracing::info!(
                session = self.id,
                "CONNECT refused: persistent session without a client id"
            );
            let rejected = connack(ConnectReturnCode::ClientIdentifierNotValid, None);
            write_packet(client, self.version, &rejected).await?;
            return Ok(Opened::Refused);
        }
        let props = connect.properties.as_ref();
        let session_expiry = match self.version {
            Version::V4 => 0,
            Version::V5 => props.and_then(|p| p.session_expiry_interval).unwrap_or(0),
        };
        self.expiry_at_connect = session_expiry;
        // The will is a publish that happens later: it passes ingress now,
        // under the same rules, or the CONNECT is refused.
        if let Some(w) = will {
            // A topic that is not UTF-8 is refused like any invalid one, with
            // a CONNACK: there is no session yet to DISCONNECT.
            let topic = std::str::from_utf8(&w.topic)
                .unwrap_or_default()
                .to_string();
            let checked = match TopicName::new(&topic) {
                Some(name) => self.check_ingress(name, &w.message),
                None => Err(Deny::Invalid.as_str()),
            };
            let payload = match checked {
                // Its free-form properties go when it is due and decided
                // again (`will::publish`).
                Ok((payload, _)) => payload,
                Err(deny) if will::decided_when_due(deny) => {
                    // Not collectable now, perhaps by the time it is due.
                    tracing::debug!(session = self.id, reason = deny, "will kept undecided");
                    w.message.clone()
                }
                Err(deny) => {
                    tracing::info!(session = self.id, reason = deny, "will message refused");
                    metrics::counter!(m::PUBLISHES, "result" => "dropped", "reason" => deny)
                        .increment(1);
                    // MQTT 3.1.1 has no code for the payload: "not authorized".
                    let code = match self.version {
                        Version::V5 if payload_at_fault(deny) => {
                            ConnectReturnCode::PayloadFormatInvalid
                        }
                        _ => ConnectReturnCode::NotAuthorized,
                    };
                    write_packet(client, self.version, &connack(code, None)).await?;
                    return Ok(Opened::Refused);
                }
            };
            let registration = self.shared.creds.load().registration(&self.who);
            self.will =
                Some(Will::new(w, &topic, payload, session_expiry).registered_as(registration));
        }

        let mut assigned = None;
        if connect.client_id.is_empty() {
            let id = format!("auto-{:016x}", rand::random::<u64>());
            connect.client_id = id.clone();
            assigned = Some(id);
        }
        let client_keep_alive = connect.keep_alive;
        let props = connect.properties.as_ref();
        let persistent = match self.version {
            Version::V4 => !connect.clean_start,
            Version::V5 => session_expiry > 0,
        };
        if !persistent {
            self.own = Some(OwnFlow::new(props.and_then(|p| p.receive_maximum)));
        }
        self.knows_all_filters = connect.clean_start && !persistent;
        if self.version == Version::V5 {
            self.client_max_packet = props.and_then(|p| p.max_packet_size).map(|n| n as usize);
        }
        // Client ids are namespaced by identity so that a device cannot take
        // over a provider's broker session by choosing its client id.
        connect.client_id = client_ids::at_broker(&self.namespace(), &connect.client_id);
        connect.keep_alive = UPSTREAM_KEEP_ALIVE;
        if let Some(props) = connect.properties.as_mut() {
            // Aliases stop at the gateway in both directions.
            props.topic_alias_max = None;
            // consentry authenticated the client itself; the broker's only
            // login is consentry's, which has no authentication method.
            props.authentication_method = None;
            props.authentication_data = None;
        }
        self.claim = Some(self.shared.client_ids.claim(
            &connect.client_id,
            self.id,
            connect.clean_start,
            self.will.is_some(),
        ));
        // A client that asked for no keep-alive gets server.min_keep_alive_secs
        // when it speaks MQTT 5, whose CONNACK can tell it so (Server Keep
        // Alive, §3.2.2.3.14); MQTT 3.1.1 cannot, so there 0 stays 0.
        let min = self.shared.server.min_keep_alive_secs;
        let server_keep_alive =
            (self.version == Version::V5 && client_keep_alive == 0 && min > 0).then_some(min);
        let granted = server_keep_alive.unwrap_or(client_keep_alive);
        let keep_alive = (granted > 0).then(|| Duration::from_millis(granted as u64 * 1500));

        // A clean session has no state at the broker until it publishes or
        // subscribes (its will stays here), so it gets no broker connection
        // until then: an idle device costs one socket, not three.
        if connect.clean_start && !persistent {
            let mut ack = ConnAck {
                session_present: false,
                code: ConnectReturnCode::Success,
                properties: None,
            };
            self.own_connack_properties(&mut ack, assigned, server_keep_alive);
            self.lazy = Some(connect);
            write_packet(client, self.version, &Packet::ConnAck(ack)).await?;
            tracing::debug!(
                session = self.id,
                role = self.who.role(),
                version = self.version.as_str(),
                "session open, broker connection deferred"
            );
            return Ok(Opened::Session(Box::new((
                None,
                Inbox::default(),
                keep_alive,
            ))));
        }

        // The client passed consentry's checks; a broker that cannot be
        // reached, or that refuses consentry's own login, is the server's
        // trouble: CONNACK "Server unavailable", never a DISCONNECT before
        // any CONNACK (MQTT-3.2.0-1) nor "Not authorized" for the client.
        let unavailable = connack(ConnectReturnCode::ServerUnavailable, None);
        let (up, buf, mut ack) = match self.dial(connect).await {
            Ok(dialed) => dialed,
            Err(e) => {
                tracing::warn!(session = self.id, error = %e, "could not open the upstream session");
                write_packet(client, self.version, &unavailable).await?;
                return Ok(Opened::Unavailable);
            }
        };
        if ack.code != ConnectReturnCode::Success {
            if upstream_login_refused(ack.code) {
                tracing::warn!(session = self.id, code = ?ack.code, "upstream refused consentry's login; check [broker] username, password and the broker's ACL for client ids");
                write_packet(client, self.version, &unavailable).await?;
                return Ok(Opened::Unavailable);
            }
            tracing::warn!(session = self.id, code = ?ack.code, "upstream refused CONNECT");
            write_packet(client, self.version, &Packet::ConnAck(ack)).await?;
            return Ok(Opened::Refused);
        }
        self.own_connack_properties(&mut ack, assigned, server_keep_alive);
        write_packet(client, self.version, &Packet::ConnAck(ack)).await?;
        self.set_up_open(true);
        tracing::debug!(
            session = self.id,
            role = self.who.role(),
            version = self.version.as_str(),
            "session open"
        );
        // `buf` may already hold what the broker sent right after CONNACK:
        // a persistent session's queued messages.
        Ok(Opened::Session(Box::new((Some(up), buf, keep_alive))))
    }

    /// This session's identity in the names it uses at the broker: client
    /// ids and shared subscription groups.
    fn namespace(&self) -> String {
        match &self.who {
            Principal::Device { id, .. } => format!("d:{id}:"),
            Principal::Provider { id } => format!("p:{id}:"),
            Principal::Anonymous => "a:".to_string(),
        }
    }

    /// `filters` as the broker gets them (`client_ids::filter_at_broker`).
    fn filters_at_broker(&self, filters: Vec<String>) -> Vec<String> {
        let namespace = self.namespace();
        filters
            .into_iter()
            .map(|f| client_ids::filter_at_broker(&namespace, &f))
            .collect()
    }

    /// What consentry, not the broker, decides in an MQTT 5 CONNACK.
    fn own_connack_properties(
        &self,
        ack: &mut ConnAck,
        assigned: Option<String>,
        server_keep_alive: Option<u16>,
    ) {
        if self.version == Version::V5 {
            let props = ack.properties.get_or_insert_with(empty_connack_properties);
            props.topic_alias_max = Some(ALIAS_MAX);
            props.max_packet_size = Some(self.shared.server.max_packet_size as u32);
            // The broker's, if any, is about consentry's own connection.
            props.server_keep_alive = server_keep_alive;
            if assigned.is_some() {
                props.assigned_client_identifier = assigned;
            }
        }
    }

    /// Opens a broker connection and returns it with its CONNACK and
    /// whatever the broker sent after it.
    ///
    /// An external broker that has not answered within `server.connect_timeout_secs`
    /// (stopped, wedged, unreachable behind a firewall that drops packets)
    /// counts as one that cannot be reached: the session would otherwise
    /// wait for it for good, reading nothing from its client meanwhile.
    async fn dial(&self, connect: v5::Connect) -> Result<(Conn, Inbox, ConnAck), End> {
        let dial = self.shared.upstream.dial(self.version, connect);
        if self.shared.upstream.embedded {
            // In the same process: it answers unless it is gone.
            return dial.await.map_err(|e| End::Upstream(e.to_string()));
        }
        let limit = Duration::from_secs(self.shared.server.connect_timeout_secs);
        match tokio::time::timeout(limit, dial).await {
            Ok(dialed) => dialed.map_err(|e| End::Upstream(e.to_string())),
            Err(_) => Err(End::Upstream(format!(
                "the broker did not answer CONNECT within {}s",
                limit.as_secs()
            ))),
        }
    }

    /// Opens the deferred broker connection of a lazy session. The client
    /// was told CONNACK already; a broker that refuses now ends the session,
    /// and what the client sent is not acknowledged, so nothing is lost.
    async fn go_up(&mut self, up_buf: &mut Inbox) -> Result<Conn, End> {
        let Some(connect) = self.lazy.clone() else {
            return Err(End::Upstream("no broker connection".into()));
        };
        let (up, buf, ack) = self.dial(connect).await?;
        if ack.code != ConnectReturnCode::Success {
            return Err(End::Upstream(format!(
                "broker refused CONNECT: {:?}",
                ack.code
            )));
        }
        *up_buf = buf;
        self.set_up_open(true);
        tracing::debug!(session = self.id, "broker connection opened");
        Ok(up)
    }

    fn set_up_open(&mut self, open: bool) {
        if open != self.up_open {
            self.up_open = open;
            let g = metrics::gauge!(m::BROKER_CONNECTIONS);
            if open {
                g.increment(1.0)
            } else {
                g.decrement(1.0)
            }
        }
    }

    /// Whether a lazy session's broker connection carries nothing that
    /// would be lost by closing it.
    fn up_idle(&self, pending: &VecDeque<Chunk>, up_buf: &Inbox) -> bool {
        self.lazy.is_some()
            && self.up_open
            && self.subs.is_empty()
            && self.lag_filters.is_empty()
            && self.pending_lag.is_empty()
            && self.pending_subacks.is_empty()
            && self.own_unsubscribes.is_empty()
            && self.acks_publish.is_empty()
            && self.acks_release.is_empty()
            && self.up_flows.is_empty()
            && self.own.as_ref().is_none_or(|o| o.in_flight() == 0)
            && self.to_broker.is_empty()
            && pending.is_empty()
            && up_buf.is_empty()
    }

    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        client: &mut S,
        up: &mut Option<Conn>,
        client_buf: BytesMut,
        up_buf: Inbox,
        keep_alive: Option<Duration>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), End> {
        // Client-bound bytes waiting for their ledger records, in order. The
        // session keeps reading from the broker meanwhile, so the next group
        // commit fills while this one syncs; past MAX_PENDING_CHUNKS it stops
        // reading and the broker holds the rest.
        let mut pending: VecDeque<Chunk> = VecDeque::new();
        let result = self
            .serve_client(
                client,
                up,
                client_buf,
                up_buf,
                keep_alive,
                shutdown,
                &mut pending,
            )
            .await;
        if matches!(result, Err(End::Ledger)) {
            // Decided, but never written: their records did not become durable.
            let withheld =
                pending.iter().map(|c| c.delivered.total()).sum::<u64>() + self.delivered.total();
            m::delivery_counter(&self.who, "dropped", "ledger_unavailable").increment(withheld);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve_client<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        client: &mut S,
        up: &mut Option<Conn>,
        mut client_buf: BytesMut,
        mut up_buf: Inbox,
        keep_alive: Option<Duration>,
        shutdown: &mut watch::Receiver<bool>,
        pending: &mut VecDeque<Chunk>,
    ) -> Result<(), End> {
        let max = self.shared.server.max_packet_size;
        // Its own handle: the select below borrows `self` mutably in its arms.
        let ledger = self.shared.ledger.clone();
        let mut last_client = Instant::now();
        let mut act_changes = self.shared.act.subscribe_changes();
        let taken_over = self.claim.as_ref().map(|c| c.taken_over.clone());
        let go_on = self.on_broker_bytes(&mut up_buf)?;
        self.stage(pending, Instant::now());
        self.flush_broker(up, &mut up_buf).await?;
        if !go_on {
            return self.drain(client, pending).await;
        }
        let ping_every = Duration::from_secs(UPSTREAM_KEEP_ALIVE as u64 / 2);
        let mut last_up_write = Instant::now();
        // Our own pings keep the broker connection alive but do not make
        // it busy: idleness is measured from the last time it carried
        // anything of the client's.
        let mut last_busy = Instant::now();
        let up_idle = Duration::from_secs(self.shared.server.upstream_idle_secs);
        let mut client_read = CLIENT_BUF;
        let mut client_quiet = true;
        // Set by a graceful stop: the time from which the broker's silence
        // counts, and the time by which the session stops waiting for it.
        let mut stopping: Option<(Instant, Instant)> = None;
        let mut last_from_broker = Instant::now();
        loop {
            // Packets that arrived together with CONNECT are handled first.
            // A held publisher's packets wait where they are.
            while !self.held.is_held() {
                let Some(p) = self.version.read(&mut client_buf, max)? else {
                    break;
                };
                if stopping.is_some() && matches!(p, Packet::Publish(_)) {
                    // Not accepted during a stop: neither forwarded nor
                    // acknowledged, so the client sends it again later.
                    self.stage(pending, Instant::now());
                    self.flush_broker(up, &mut up_buf).await?;
                    return self.stopped(client, pending).await;
                }
                if !self.on_client_packet(p)? {
                    self.stage(pending, Instant::now());
                    self.flush_broker(up, &mut up_buf).await?;
                    // The client's DISCONNECT went up with the rest.
                    if let Some(u) = up.take() {
                        tokio::spawn(u.linger());
                    }
                    return self.drain(client, pending).await;
                }
            }
            // Broker bytes left undecoded while the client's window was full.
            if !up_buf.is_empty() && self.may_decide() {
                let go_on = self.on_broker_bytes(&mut up_buf)?;
                self.stage(pending, Instant::now());
                if !go_on {
                    self.flush_broker(up, &mut up_buf).await?;
                    return self.drain(client, pending).await;
                }
            }
            if !self.to_broker.is_empty() {
                last_up_write = Instant::now();
            }
            self.stage(pending, Instant::now());
            self.flush_broker(up, &mut up_buf).await?;
            // What waits on no record goes out at once if nothing is ahead.
            self.write_ready(client, pending).await?;

            // While held, the client's silence is ours: we are not reading.
            let held = self.held.is_held();
            let client_deadline = keep_alive.filter(|_| !held).map(|k| last_client + k);
            let lag = self.lag.clone();
            let idle = self.up_idle(pending, &up_buf);
            if !idle {
                last_busy = Instant::now();
            }
            let room = up.is_some() && pending.len() < MAX_PENDING_CHUNKS && self.may_decide();
            if !room {
                // Not reading is not the broker's silence.
                last_from_broker = Instant::now();
            }
            let stop_at =
                stopping.map(|(began, until)| until.min(last_from_broker.max(began) + DRAIN_QUIET));
            // Without a broker connection there is nothing to ping.
            let wake = [
                client_deadline,
                up.is_some().then(|| last_up_write + ping_every),
                idle.then(|| last_busy + up_idle),
                stop_at,
            ]
            .into_iter()
            .flatten()
            .min();
            // The read size follows the client: it doubles while reads fill
            // it, and an idle client's buffer goes back to the small size.
            if client_buf.is_empty() && client_read > CLIENT_BUF && client_quiet {
                client_read = CLIENT_BUF;
                client_buf = BytesMut::with_capacity(CLIENT_BUF);
            }
            if client_buf.capacity() - client_buf.len() < client_read {
                client_buf.reserve(client_read);
            }
            // At most `client_read` per read, whatever the allocator gave:
            // what one read brings is decoded and re-encoded for the broker
            // in one go, so it bounds both buffers.
            let client_spare = client_read.min(client_buf.capacity() - client_buf.len());
            let mut client_room = (&mut client_buf).limit(client_read);
            tokio::select! {
                n = client.read_buf(&mut client_room), if !held => {
                    let n = n?;
                    if n == 0 {
                        tracing::debug!(session = self.id, "client closed the connection without DISCONNECT");
                        return Ok(());
                    }
                    if n == client_spare && client_read < READ_CHUNK {
                        client_read *= 2;
                    }
                    client_quiet = n < CLIENT_BUF;
                    last_client = Instant::now();
                }
                n = async { match up.as_mut() { Some(u) => u.receive(&mut up_buf).await, None => std::future::pending().await } }, if room => {
                    let n = n?;
                    if n == 0 {
                        // A newer connection with this client id makes the
                        // broker drop this one, at times before the takeover
                        // notice reaches this session: that is a takeover,
                        // not a broker fault.
                        if self.claim.as_ref().is_some_and(|c| !self.shared.client_ids.holds(c)) {
                            return Err(End::TakenOver);
                        }
                        return Err(End::Upstream("broker closed the connection".into()));
                    }
                    let read_at = Instant::now();
                    last_from_broker = read_at;
                    let go_on = self.on_broker_bytes(&mut up_buf)?;
                    self.stage(pending, read_at);
                    self.flush_broker(up, &mut up_buf).await?;
                    if !go_on {
                        return self.drain(client, pending).await;
                    }
                }
                r = durable(&ledger, pending.front_mut()), if !pending.is_empty() => {
                    r?;
                    self.write_ready(client, pending).await?;
                }
                _ = async { match wake { Some(w) => tokio::time::sleep_until(w.into()).await, None => std::future::pending().await } } => {
                    if stop_at.is_some_and(|t| Instant::now() >= t) {
                        return self.stopped(client, pending).await;
                    }
                    if client_deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(End::KeepAlive);
                    }
                    if idle && last_busy.elapsed() >= up_idle {
                        self.go_down(up, &mut up_buf).await;
                    } else if up.is_some() && last_up_write.elapsed() >= ping_every {
                        self.to_broker.push(&Packet::PingReq(v5::PingReq))?;
                        last_up_write = Instant::now();
                    }
                }
                _ = tokio::time::sleep(HOLD_POLL), if held => {
                    let kicked = self.shared.backpressure.recheck(&mut self.held);
                    if kicked > 0 {
                        metrics::counter!(m::SLOW_CONSUMERS).increment(kicked as u64);
                    }
                    if !self.held.is_held() {
                        last_client = Instant::now();
                    }
                }
                _ = async { match &lag { Some(l) => l.kicked().await, None => std::future::pending().await } } => {
                    tracing::warn!(session = self.id, behind = lag.as_ref().map(|l| l.owed()), "disconnecting a slow consumer");
                    return Err(End::SlowConsumer);
                }
                _ = async { match &taken_over { Some(t) => t.notified().await, None => std::future::pending().await } } => {
                    tracing::info!(session = self.id, "client id taken over by a new connection");
                    return Err(End::TakenOver);
                }
                Ok(()) = act_changes.changed() => {
                    self.recheck_binding()?;
                    self.recheck_subscriptions()?;
                }
                _ = shutdown.changed(), if stopping.is_none() => {
                    // A graceful stop delivers what the broker already has
                    // for this session (what devices were told was accepted)
                    // before it ends, within most of the drain time; the
                    // rest of it is for the last ledger records to sync.
                    let now = Instant::now();
                    let budget = Duration::from_secs(self.shared.server.drain_secs) * 3 / 4;
                    let wills = match self.who {
                        Principal::Provider { .. } => DRAIN_WILLS.min(budget),
                        _ => Duration::ZERO,
                    };
                    stopping = Some((now + wills, now + budget));
                }
            }
        }
    }

    /// Ends a session in a graceful stop: what was decided goes out once
    /// durable, then DISCONNECT "Server shutting down".
    async fn stopped<S: AsyncWrite + Unpin>(
        &mut self,
        client: &mut S,
        pending: &mut VecDeque<Chunk>,
    ) -> Result<(), End> {
        self.drain(client, pending).await?;
        Err(End::Shutdown)
    }

    /// Closes a lazy session's idle broker connection; the next thing to
    /// send opens a new one.
    async fn go_down(&mut self, up: &mut Option<Conn>, up_buf: &mut Inbox) {
        if let Some(s) = up.take() {
            let version = self.version;
            tokio::spawn(async move {
                let _ = s.say_goodbye(version).await;
            });
        }
        *up_buf = Inbox::default();
        self.set_up_open(false);
        tracing::debug!(session = self.id, "idle broker connection closed");
    }

    /// Decides every complete packet the broker sent. Returns false when the
    /// broker ended the session.
    ///
    /// Stops early, leaving bytes in `buf`, while the client's window for
    /// our own QoS flow is full.
    fn on_broker_bytes(&mut self, buf: &mut Inbox) -> Result<bool, End> {
        while self.may_decide() {
            let Some(p) = buf.next(self.version)? else {
                break;
            };
            if !self.on_broker_packet(p)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn sync_lag(&mut self) {
        self.shared
            .backpressure
            .set_filters(self.id, &mut self.lag, self.lag_filters.clone());
    }

    fn own_room(&self) -> bool {
        self.own.as_ref().is_none_or(OwnFlow::has_room)
    }

    /// Whether the next packet from the broker may be decided now: the
    /// client's window has room, and not too much is decided ahead of it.
    fn may_decide(&self) -> bool {
        self.own_room() && self.pending_bytes + self.to_client.len() < MAX_DECIDED_AHEAD
    }

    /// Queues what is bound for the client behind what is already queued,
    /// with the ledger records it waits on, so the client sees packets in
    /// the order they were decided.
    fn stage(&mut self, pending: &mut VecDeque<Chunk>, read_at: Instant) {
        if self.to_client.is_empty() {
            return;
        }
        self.pending_bytes += self.to_client.len();
        pending.push_back(Chunk {
            bytes: self.to_client.split(),
            ticket: self.ticket.take(),
            delivered: std::mem::take(&mut self.delivered),
            read_at,
        });
    }

    /// Writes every chunk at the front whose records are all durable.
    async fn write_ready<S: AsyncWrite + Unpin>(
        &mut self,
        client: &mut S,
        pending: &mut VecDeque<Chunk>,
    ) -> Result<(), End> {
        let ledger = &self.shared.ledger;
        while pending
            .front()
            .is_some_and(|c| c.ticket.is_none_or(|t| ledger.is_durable(t)))
        {
            if let Some(c) = pending.pop_front() {
                self.pending_bytes -= c.bytes.len();
                client.write_all(&c.bytes).await?;
                self.counters.plain.increment(c.delivered.plain);
                self.counters.delivered.increment(c.delivered.consented);
                self.counters.masked.increment(c.delivered.masked);
                if c.delivered.total() > 0 {
                    self.shared
                        .hot
                        .latency
                        .record(c.read_at.elapsed().as_secs_f64());
                }
            }
        }
        Ok(())
    }

    /// At the end of a session what was decided still goes out, once durable.
    async fn drain<S: AsyncWrite + Unpin>(
        &mut self,
        client: &mut S,
        pending: &mut VecDeque<Chunk>,
    ) -> Result<(), End> {
        while !pending.is_empty() {
            durable(&self.shared.ledger, pending.front_mut()).await?;
            self.write_ready(client, pending).await?;
        }
        Ok(())
    }

    async fn flush_broker(&mut self, up: &mut Option<Conn>, up_buf: &mut Inbox) -> Result<(), End> {
        if self.to_broker.is_empty() {
            return Ok(());
        }
        let stream = match up {
            Some(s) => s,
            None => {
                let opened = self.go_up(up_buf).await;
                let waiting = std::mem::take(&mut self.awaiting_broker);
                match opened {
                    Ok(s) => {
                        self.shared.hot.forwarded.increment(waiting);
                        up.insert(s)
                    }
                    Err(e) => {
                        metrics::counter!(m::PUBLISHES, "result" => "dropped", "reason" => "broker_unavailable")
                            .increment(waiting);
                        return Err(e);
                    }
                }
            }
        };
        stream.send(&mut self.to_broker).await?;
        Ok(())
    }

    async fn close_with<S: AsyncWrite + Unpin>(&mut self, client: &mut S, e: &End) {
        if self.version == Version::V5 {
            if let Some(code) = e.reason() {
                let disconnect = Disconnect {
                    reason_code: code,
                    properties: Some(v5::DisconnectProperties {
                        session_expiry_interval: None,
                        reason_string: Some(e.reason_string()),
                        user_properties: vec![],
                        server_reference: None,
                    }),
                };
                let _ = write_packet(client, self.version, &Packet::Disconnect(disconnect)).await;
            }
        }
        let _ = client.shutdown().await;
    }

    fn send_client(&mut self, p: &Packet) -> Result<(), End> {
        Ok(self.version.write(p, &mut self.to_client)?)
    }

    fn send_broker(&mut self, p: &Packet) -> Result<(), End> {
        Ok(self.to_broker.push(p)?)
    }

    /// Collection check plus data minimization. Returns the payload to
    /// forward, and whether it is personal data.
    fn check_ingress(
        &self,
        topic: TopicName,
        payload: &Bytes,
    ) -> Result<(Bytes, bool), &'static str> {
        decide_ingress(&self.shared, &self.who, topic, payload)
    }

    /// Returns false when the client asked to disconnect.
    fn on_client_packet(&mut self, p: Packet) -> Result<bool, End> {
        if let Some(own) = self.own.as_mut() {
            let answer = match &p {
                Packet::PubAck(a) => Some(own.on_puback(a.pkid)),
                Packet::PubRec(a) => Some(own.on_pubrec(a.pkid, pubrec_failed(a))),
                Packet::PubComp(a) => Some(own.on_pubcomp(a.pkid)),
                _ => None,
            };
            match answer {
                None => {}
                Some(Answer::Done) => return Ok(true),
                Some(Answer::Release(pkid)) => {
                    self.send_client(&Packet::PubRel(v5::PubRel::new(pkid, None)))?;
                    return Ok(true);
                }
                Some(Answer::Unknown) => {
                    self.unknown_ack(&p)?;
                    return Ok(true);
                }
            }
        }
        match p {
            Packet::Publish(publish) => self.client_publish(publish)?,
            Packet::PubRel(rel) => {
                if self.refused_qos2_from_client.remove(&rel.pkid) {
                    self.send_client(&Packet::PubComp(PubComp::new(rel.pkid, None)))?;
                } else if self.qos2_in.contains(&rel.pkid) || self.broker_may_know_qos2() {
                    self.send_broker(&Packet::PubRel(rel))?;
                } else {
                    // A retransmission of a completed flow (MQTT 4.3.3:
                    // answered with PUBCOMP, 0x92 in MQTT 5). Passed on,
                    // rumqttd ends the connection for an unknown id.
                    let mut comp = PubComp::new(rel.pkid, None);
                    comp.reason = PubCompReason::PacketIdentifierNotFound;
                    self.send_client(&Packet::PubComp(comp))?;
                }
            }
            // Acks of deliveries go to the broker in the order the broker
            // sent the messages, interleaved with consentry's own acks of
            // the messages it dropped (MQTT §4.6; rumqttd enforces it).
            Packet::PubAck(a) if self.downgraded_qos2.remove(&a.pkid) => {
                self.dropped_qos2_from_broker.insert(a.pkid);
                let rec = Packet::PubRec(PubRec::new(a.pkid, None));
                self.ack_in_order(Stage::Publish, a.pkid, rec)?
            }
            Packet::PubAck(a) => {
                let pkid = a.pkid;
                self.ack_in_order(Stage::Publish, pkid, Packet::PubAck(a))?
            }
            Packet::PubRec(a) => {
                let pkid = a.pkid;
                self.ack_in_order(Stage::Publish, pkid, Packet::PubRec(a))?
            }
            Packet::PubComp(a) => {
                let pkid = a.pkid;
                self.ack_in_order(Stage::Release, pkid, Packet::PubComp(a))?
            }
            Packet::Subscribe(sub) => self.client_subscribe(sub)?,
            Packet::Unsubscribe(unsub) => {
                // rumqttd answers one UNSUBACK per filter it removed and
                // none for a filter it did not have, which leaves a client
                // waiting for good; consentry answers its own broker's
                // UNSUBSCRIBEs itself, one UNSUBACK, a reason per filter.
                let own_answer = self.shared.upstream.embedded.then(|| v5::UnsubAck {
                    pkid: unsub.pkid,
                    reasons: unsub
                        .filters
                        .iter()
                        .map(|f| {
                            // A persistent or resumed session may hold
                            // filters from earlier connections that this
                            // one never saw.
                            if !self.knows_all_filters || self.subs.iter().any(|(g, _)| g == f) {
                                UnsubAckReason::Success
                            } else {
                                UnsubAckReason::NoSubscriptionExisted
                            }
                        })
                        .collect(),
                    properties: None,
                });
                self.subs.retain(|(f, _)| !unsub.filters.contains(f));
                self.lag_filters.retain(|f| !unsub.filters.contains(f));
                self.sync_lag();
                let mut unsub = unsub;
                unsub.filters = self.filters_at_broker(std::mem::take(&mut unsub.filters));
                self.send_broker(&Packet::Unsubscribe(unsub))?;
                if let Some(ack) = own_answer {
                    self.send_client(&Packet::UnsubAck(ack))?;
                }
            }
            Packet::PingReq(_) => self.send_client(&Packet::PingResp(v5::PingResp))?,
            Packet::Disconnect(mut d) => {
                tracing::debug!(session = self.id, "client sent DISCONNECT");
                let expiry = d
                    .properties
                    .as_ref()
                    .and_then(|p| p.session_expiry_interval);
                if self.expiry_at_connect == 0 && expiry.is_some_and(|s| s > 0) {
                    // Not a valid DISCONNECT, so the connection ends
                    // abnormally: the will stays due.
                    return Err(End::Protocol(
                        "DISCONNECT sets a Session Expiry Interval where CONNECT had 0 \
                         (MQTT-3.14.2-2)",
                    ));
                }
                if d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage {
                    // The will stays due (`will::session_ended`); the broker holds none.
                    d.reason_code = DisconnectReasonCode::NormalDisconnection;
                    if let (Some(w), Some(secs)) = (self.will.as_mut(), expiry) {
                        w.set_session_expiry(secs);
                    }
                } else {
                    self.will = None;
                }
                // Not worth opening a broker connection for.
                if self.up_open {
                    self.send_broker(&Packet::Disconnect(d))?;
                }
                return Ok(false);
            }
            Packet::Connect(..) => return Err(End::Protocol("second CONNECT")),
            Packet::Auth(_) => {
                return Err(End::Protocol("enhanced authentication is not supported"))
            }
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp(_) => {
                return Err(End::Protocol("server-only packet from a client"))
            }
        }
        Ok(true)
    }

    /// An acknowledgement for no delivery in flight. Passed on, rumqttd
    /// would end the connection (and log an error) for it; MQTT leaves it
    /// to the receiver, and Mosquitto ignores it too. A PUBREC gets the
    /// PUBREL MQTT 5 has for it (0x92), so a client that lost track of a
    /// flow can close it.
    fn unknown_ack(&mut self, p: &Packet) -> Result<(), End> {
        tracing::debug!(session = self.id, packet = ?p, "acknowledgement for no delivery in flight ignored");
        if let (Packet::PubRec(rec), Version::V5) = (p, self.version) {
            let mut rel = v5::PubRel::new(rec.pkid, None);
            rel.reason = v5::PubRelReason::PacketIdentifierNotFound;
            self.send_client(&Packet::PubRel(rel))?;
        }
        Ok(())
    }

    fn client_publish(&mut self, mut publish: Publish) -> Result<(), End> {
        // MQTT-3.3.4-6. rumqttd would end the connection as if the packet
        // were malformed, after logging two errors.
        if publish
            .properties
            .as_ref()
            .is_some_and(|p| !p.subscription_identifiers.is_empty())
        {
            return Err(End::Protocol(
                "a PUBLISH from a client carries a Subscription Identifier",
            ));
        }
        if let Some(alias) = publish
            .properties
            .as_mut()
            .and_then(|p| p.topic_alias.take())
        {
            if alias == 0 || alias > ALIAS_MAX {
                return Err(End::Alias);
            }
            if publish.topic.is_empty() {
                publish.topic = self
                    .aliases
                    .get(&alias)
                    .cloned()
                    .ok_or(End::Protocol("unknown topic alias"))?;
            } else {
                self.aliases.insert(alias, publish.topic.clone());
            }
        }
        let fault = || End::TopicName(topic_name_fault(&publish.topic));
        let topic = std::str::from_utf8(&publish.topic).map_err(|_| fault())?;
        let name = TopicName::new(topic).ok_or_else(fault)?;
        // An empty retained PUBLISH clears the retained message: no data
        // to minimize, only whether this device may erase there. Its
        // properties go as personal data's do.
        let clears = publish.retain
            && publish.payload.is_empty()
            && self.shared.act.load().may_clear_retained(&self.who, name);
        let checked = match clears {
            true => Ok((publish.payload.clone(), true)),
            false => self.check_ingress(name, &publish.payload),
        };
        match checked {
            Ok((payload, personal)) => {
                if personal {
                    strip_free_properties(&mut publish.properties);
                }
                if self.lazy.is_some() && !self.up_open {
                    self.awaiting_broker += 1;
                } else {
                    self.shared.hot.forwarded.increment(1);
                }
                let was_held = self.held.is_held();
                let bytes = (publish.topic.len() + payload.len()) as u64;
                self.shared
                    .backpressure
                    .forwarded(self.id, topic, bytes, &mut self.held);
                if !was_held && self.held.is_held() {
                    metrics::counter!(m::HOLDS).increment(1);
                }
                publish.payload = payload;
                if self.lazy.is_some() && publish.qos != QoS::AtMostOnce {
                    self.up_flows.insert(publish.pkid);
                }
                if publish.qos == QoS::ExactlyOnce {
                    self.qos2_in.insert(publish.pkid);
                }
                self.send_broker(&Packet::Publish(publish))
            }
            Err(reason) => {
                metrics::counter!(m::PUBLISHES, "result" => "dropped", "reason" => reason)
                    .increment(1);
                tracing::debug!(
                    session = self.id,
                    role = self.who.role(),
                    reason,
                    "publish dropped at ingress"
                );
                if reason == LEDGER_UNAVAILABLE
                    && self.version == Version::V4
                    && publish.qos != QoS::AtMostOnce
                {
                    // MQTT 3.1.1 has no failing PUBACK, and a PUBACK would
                    // say it was accepted: the client keeps it and sends it
                    // again on its next connection.
                    return Err(End::Ledger);
                }
                let (ack, rec) = if payload_at_fault(reason) {
                    (
                        PubAckReason::PayloadFormatInvalid,
                        PubRecReason::PayloadFormatInvalid,
                    )
                } else if reason == LEDGER_UNAVAILABLE {
                    (
                        PubAckReason::UnspecifiedError,
                        PubRecReason::UnspecifiedError,
                    )
                } else {
                    (PubAckReason::NotAuthorized, PubRecReason::NotAuthorized)
                };
                match publish.qos {
                    QoS::AtMostOnce => Ok(()),
                    QoS::AtLeastOnce => self.send_client(&Packet::PubAck(PubAck {
                        pkid: publish.pkid,
                        reason: ack,
                        properties: None,
                    })),
                    QoS::ExactlyOnce => {
                        // MQTT 5 ends the flow at a failing PUBREC; 3.1.1 goes on
                        // to PUBREL, which we answer ourselves.
                        if self.version == Version::V4 {
                            self.refused_qos2_from_client.insert(publish.pkid);
                        }
                        self.send_client(&Packet::PubRec(PubRec {
                            pkid: publish.pkid,
                            reason: rec,
                            properties: None,
                        }))
                    }
                }
            }
        }
    }

    /// A device whose user removed it (or that now belongs to another user)
    /// no longer speaks for the user it logged in as: its connection ends,
    /// and its credentials no longer let it back in.
    fn recheck_binding(&self) -> Result<(), End> {
        if let Principal::Device { id, user } = &self.who {
            if self.shared.act.load().device_user(id) != Some(user.as_str()) {
                tracing::info!(
                    session = self.id,
                    "device no longer bound to its user; disconnecting"
                );
                return Err(End::DeviceRemoved);
            }
        }
        Ok(())
    }

    /// A new ACT may no longer allow what this session holds (a provider's
    /// T&C lost a purpose, say): such subscriptions are dropped at the
    /// broker, so it stops sending what every delivery would refuse anyway.
    /// MQTT has no way to tell the client; it simply receives no more.
    fn recheck_subscriptions(&mut self) -> Result<(), End> {
        let act = self.shared.act.load();
        let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.subs)
            .into_iter()
            .partition(|(f, _)| act.subscribe(&self.who, f).is_ok());
        self.subs = keep;
        if gone.is_empty() {
            return Ok(());
        }
        self.lag_filters
            .retain(|f| !gone.iter().any(|(g, _)| g == f));
        self.sync_lag();
        metrics::counter!(m::SUBSCRIPTIONS, "result" => "revoked", "reason" => "act_changed")
            .increment(gone.len() as u64);
        tracing::info!(
            session = self.id,
            count = gone.len(),
            "subscriptions dropped after an ACT change"
        );
        // Packet ids from the top of the range, where clients rarely go; the
        // UNSUBACK is recognised by them and not passed on.
        let pkid = (1..=u16::MAX)
            .rev()
            .find(|id| {
                !self.own_unsubscribes.contains(id) && !self.pending_subacks.contains_key(id)
            })
            .unwrap_or(u16::MAX);
        // The embedded broker's UNSUBACKs are all dropped anyway, and it
        // may send none (or several) for one UNSUBSCRIBE.
        if !self.shared.upstream.embedded {
            self.own_unsubscribes.insert(pkid);
        }
        let filters = self.filters_at_broker(gone.into_iter().map(|(f, _)| f).collect());
        self.send_broker(&Packet::Unsubscribe(v5::Unsubscribe {
            pkid,
            filters,
            properties: None,
        }))
    }

    fn client_subscribe(&mut self, mut sub: v5::Subscribe) -> Result<(), End> {
        let act = self.shared.act.load();
        let mut answers = Vec::with_capacity(sub.filters.len());
        let mut forward = Vec::new();
        for f in sub.filters.drain(..) {
            match act.subscribe(&self.who, &f.path) {
                Ok(()) => {
                    metrics::counter!(m::SUBSCRIPTIONS, "result" => "accepted", "reason" => "allowed").increment(1);
                    answers.push(None);
                    self.subs.retain(|(p, _)| *p != f.path);
                    self.subs.push((f.path.clone(), f.qos));
                    forward.push(f);
                }
                Err(deny) => {
                    metrics::counter!(m::SUBSCRIPTIONS, "result" => "refused", "reason" => deny.as_str()).increment(1);
                    tracing::debug!(
                        session = self.id,
                        role = self.who.role(),
                        reason = deny.as_str(),
                        "subscription refused"
                    );
                    answers.push(Some(match deny {
                        Deny::Invalid => SubscribeReasonCode::TopicFilterInvalid,
                        _ => SubscribeReasonCode::NotAuthorized,
                    }));
                }
            }
        }
        if forward.is_empty() {
            let codes = answers.into_iter().flatten().collect();
            return self.send_client(&Packet::SubAck(SubAck {
                pkid: sub.pkid,
                return_codes: codes,
                properties: None,
            }));
        }
        if answers.iter().any(Option::is_some) {
            self.pending_subacks.insert(sub.pkid, answers);
        }
        if self.shared.backpressure.enabled() {
            self.pending_lag
                .insert(sub.pkid, forward.iter().map(|f| f.path.clone()).collect());
        }
        let namespace = self.namespace();
        for f in &mut forward {
            f.path = client_ids::filter_at_broker(&namespace, &f.path);
        }
        sub.filters = forward;
        self.send_broker(&Packet::Subscribe(sub))
    }

    /// Returns false when the broker ended the session.
    fn on_broker_packet(&mut self, p: Packet) -> Result<bool, End> {
        match p {
            Packet::Publish(publish) => {
                if let Some(lag) = &self.lag {
                    let bytes = (publish.topic.len() + publish.payload.len()) as u64;
                    self.shared.backpressure.delivered(lag, bytes);
                }
                if publish.qos != QoS::AtMostOnce {
                    self.acks_publish.push_back((publish.pkid, None));
                }
                self.deliver(publish)?
            }
            Packet::PubRel(rel) => {
                self.acks_release.push_back((rel.pkid, None));
                if self.dropped_qos2_from_broker.remove(&rel.pkid) {
                    let done = Packet::PubComp(PubComp::new(rel.pkid, None));
                    self.ack_in_order(Stage::Release, rel.pkid, done)?;
                } else {
                    self.send_client(&Packet::PubRel(rel))?;
                }
            }
            Packet::SubAck(mut ack) => {
                if let Some(filters) = self.pending_lag.remove(&ack.pkid) {
                    for (f, code) in filters.into_iter().zip(&ack.return_codes) {
                        if matches!(code, SubscribeReasonCode::Success(_))
                            && !self.lag_filters.contains(&f)
                        {
                            self.lag_filters.push(f);
                        }
                    }
                    self.sync_lag();
                }
                if let Some(answers) = self.pending_subacks.remove(&ack.pkid) {
                    let mut from_broker = ack.return_codes.into_iter();
                    ack.return_codes = answers
                        .into_iter()
                        .map(|a| {
                            a.or_else(|| from_broker.next())
                                .unwrap_or(SubscribeReasonCode::Unspecified)
                        })
                        .collect();
                }
                self.send_client(&Packet::SubAck(ack))?;
            }
            // Our own keep-alive.
            Packet::PingResp(_) => {}
            // The answer to consentry's own UNSUBSCRIBE is not the client's.
            Packet::UnsubAck(a) if self.own_unsubscribes.remove(&a.pkid) => {}
            // The embedded broker's, answered already (see the client's
            // UNSUBSCRIBE).
            Packet::UnsubAck(_) if self.shared.upstream.embedded => {}
            p @ (Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubComp(_)
            | Packet::UnsubAck(_)) => {
                let refused = match &p {
                    Packet::PubAck(a) => puback_failed(a).then(|| format!("{:?}", a.reason)),
                    Packet::PubRec(a) => pubrec_failed(a).then(|| format!("{:?}", a.reason)),
                    _ => None,
                };
                if let Some(code) = refused {
                    // Counted as forwarded when it went up; the broker's
                    // refusal (its ACL, say) is the operator's to see too.
                    metrics::counter!(m::PUBLISHES, "result" => "dropped", "reason" => "broker_refused")
                        .increment(1);
                    tracing::info!(session = self.id, role = self.who.role(), %code, "the broker refused a publish");
                }
                match &p {
                    Packet::PubRec(a) if pubrec_failed(a) => {
                        self.qos2_in.remove(&a.pkid);
                    }
                    Packet::PubComp(a) => {
                        self.qos2_in.remove(&a.pkid);
                    }
                    _ => {}
                }
                if self.lazy.is_some() {
                    match &p {
                        Packet::PubAck(a) => {
                            self.up_flows.remove(&a.pkid);
                        }
                        Packet::PubRec(a) if pubrec_failed(a) => {
                            self.up_flows.remove(&a.pkid);
                        }
                        Packet::PubComp(a) => {
                            self.up_flows.remove(&a.pkid);
                        }
                        _ => {}
                    }
                }
                self.send_client(&p)?
            }
            p @ Packet::Disconnect(_) => {
                if self.version == Version::V5 {
                    self.send_client(&p)?;
                }
                return Ok(false);
            }
            _ => return Err(End::Upstream("unexpected packet from the broker".into())),
        }
        Ok(true)
    }

    /// Completes the broker's QoS flow for a message the client will not get.
    fn ack_broker(&mut self, qos: QoS, pkid: u16) -> Result<(), End> {
        match qos {
            QoS::AtMostOnce => Ok(()),
            QoS::AtLeastOnce => self.ack_in_order(
                Stage::Publish,
                pkid,
                Packet::PubAck(PubAck::new(pkid, None)),
            ),
            QoS::ExactlyOnce => {
                self.dropped_qos2_from_broker.insert(pkid);
                self.ack_in_order(
                    Stage::Publish,
                    pkid,
                    Packet::PubRec(PubRec::new(pkid, None)),
                )
            }
        }
    }

    /// Whether the broker may hold a QoS 2 flow of this client that this
    /// session did not see: one from an earlier connection of a persistent
    /// session, at a broker that keeps them.
    fn broker_may_know_qos2(&self) -> bool {
        self.own.is_none() && !self.shared.upstream.embedded
    }

    /// Records the ack for `pkid` and sends every ack at the front of the
    /// queue that is ready. An ack for a message the queue does not know
    /// (e.g. one redelivered from an earlier session) goes straight through.
    fn ack_in_order(&mut self, stage: Stage, pkid: u16, ack: Packet) -> Result<(), End> {
        let queue = match stage {
            Stage::Publish => &mut self.acks_publish,
            Stage::Release => &mut self.acks_release,
        };
        match queue.iter_mut().find(|(id, a)| *id == pkid && a.is_none()) {
            Some(slot) => slot.1 = Some(ack),
            None => return self.send_broker(&ack),
        }
        while queue.front().is_some_and(|(_, a)| a.is_some()) {
            if let Some((_, Some(ack))) = queue.pop_front() {
                self.to_broker.push(&ack)?;
            }
        }
        Ok(())
    }

    fn deliver(&mut self, mut publish: Publish) -> Result<(), End> {
        let started = m::time_this_decision().then(Instant::now);
        let act = self.shared.act.load();
        // The record is stamped by the real clock; only decisions take the
        // test offset.
        let wall = Utc::now();
        let now = wall + self.shared.clock_offset;
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return self.drop_delivery(&publish, "invalid_topic");
        };
        // A session that began clean and is not persistent knows every
        // filter it holds, and what matches none is not the client's to
        // get, though rumqttd 0.20 sends it after some UNSUBSCRIBEs (a
        // `$share/…` filter's: it looks the subscription up without the
        // prefix). A persistent session, or one resumed with clean start 0,
        // may hold filters from earlier connections that this one never saw.
        let granted = self.granted_qos(topic);
        if self.knows_all_filters && granted.is_none() {
            return self.drop_delivery(&publish, "unsubscribed");
        }
        let decision = act.deliver(&self.who, topic, now);
        if let Some(started) = started {
            let took = started.elapsed().as_secs_f64();
            self.shared.hot.deliver_decision.record(took);
        }
        let (kind, resolved, rule, receipt) = match decision {
            Ok(Delivery::Plain) => {
                if self.too_large_for_client(&publish) {
                    return self.drop_delivery(&publish, "too_large_for_client");
                }
                self.delivered.plain += 1;
                return self.write_delivery(publish, granted);
            }
            Ok(Delivery::Personal {
                kind,
                resolved,
                rule,
                receipt,
            }) => {
                // Also for what reached the broker some other way (a will
                // set before this check, an external broker's own clients).
                strip_free_properties(&mut publish.properties);
                (kind, resolved, rule, receipt)
            }
            Err(deny) => {
                if let (Principal::Provider { id }, Some(r)) = (&self.who, act.resolve(topic)) {
                    self.shared
                        .ledger
                        .record_blocked(r.user, id, r.kind, deny.as_str());
                }
                return self.drop_delivery(&publish, deny.as_str());
            }
        };
        let Principal::Provider { id: provider } = &self.who else {
            return self.drop_delivery(&publish, "not_a_provider");
        };
        if publish.payload.is_empty() {
            // A cleared retained message: nothing to share.
            return self.drop_delivery(&publish, "cleared");
        }
        let masked = match rule.view.as_ref() {
            View::Deliver => None,
            View::Mask(rules) => {
                let key = *self.pseudonym_key.get_or_insert_with(|| {
                    mask::provider_key(&self.shared.pseudonym_master, provider)
                });
                match self
                    .shared
                    .views
                    .mask(kind.format, &publish.payload, rules, &key)
                {
                    Ok((p, shared)) => {
                        if shared {
                            self.shared.hot.views_shared.increment(1);
                        }
                        publish.payload = p
                    }
                    Err(e) => {
                        tracing::debug!(session = self.id, error = %e, "payload could not be masked");
                        return self.drop_delivery(&publish, "undecodable");
                    }
                }
                Some(rules as &dyn MaskedFields)
            }
        };
        // Not shared, so not recorded: the client could not take it.
        if self.too_large_for_client(&publish) {
            return self.drop_delivery(&publish, "too_large_for_client");
        }
        let mut receipt_buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let record = ShareRef {
            time: wall,
            creator: &self.shared.creator,
            recipient: provider,
            user: resolved.user,
            device: resolved.device,
            kind: &kind.name,
            pii_category: kind.category.as_str(),
            purpose: &rule.purpose,
            masked,
            payload_digest: Sha256::digest(&publish.payload).into(),
            qos: publish.qos as u8,
            receipt_id: receipt.map(|id| &*id.hyphenated().encode_lower(&mut receipt_buf)),
        };
        match self.shared.ledger.queue_share(&record) {
            Ok(ticket) => self.ticket = Some(ticket),
            Err(e) => {
                tracing::error!(session = self.id, error = %e, "ledger refused a record; delivery withheld");
                m::delivery_counter(&self.who, "dropped", "ledger_unavailable").increment(1);
                return Err(End::Ledger);
            }
        }
        match masked {
            Some(_) => self.delivered.masked += 1,
            None => self.delivered.consented += 1,
        }
        self.write_delivery(publish, granted)
    }

    /// Whether `publish` exceeds the Maximum Packet Size the client set: it
    /// must then be discarded as if it had been sent (MQTT 5 3.1.2.25).
    fn too_large_for_client(&self, publish: &Publish) -> bool {
        let Some(max) = self.client_max_packet else {
            return false;
        };
        let mut encoded = BytesMut::new();
        match self
            .version
            .write(&Packet::Publish(publish.clone()), &mut encoded)
        {
            Ok(()) => encoded.len() > max,
            Err(_) => true,
        }
    }

    fn drop_delivery(&mut self, publish: &Publish, reason: &'static str) -> Result<(), End> {
        m::delivery_counter(&self.who, "dropped", reason).increment(1);
        tracing::debug!(
            session = self.id,
            role = self.who.role(),
            reason,
            "delivery dropped"
        );
        self.ack_broker(publish.qos, publish.pkid)
    }

    /// The highest QoS of the filters this connection subscribed with that
    /// `topic` matches; `None` if it matches none of them.
    fn granted_qos(&self, topic: &str) -> Option<QoS> {
        self.subs
            .iter()
            .filter(|(f, _)| {
                topic::strip_shared(f).is_some_and(|f| topic::filter_matches(f, topic))
            })
            .map(|(_, q)| *q)
            .max_by_key(|q| *q as u8)
    }

    /// Writes a delivery at no more than `granted`, the QoS its
    /// subscription granted ([`Session::granted_qos`]).
    fn write_delivery(&mut self, mut publish: Publish, granted: Option<QoS>) -> Result<(), End> {
        let (from_broker, broker_pkid) = (publish.qos, publish.pkid);
        if publish.qos != QoS::AtMostOnce {
            match (granted, publish.qos) {
                (Some(QoS::AtMostOnce), _) => {
                    self.ack_broker(publish.qos, publish.pkid)?;
                    publish.qos = QoS::AtMostOnce;
                    publish.pkid = 0;
                    // MQTT-3.3.1-2: never set on QoS 0.
                    publish.dup = false;
                }
                // The client acks with PUBACK; consentry turns that into the
                // broker's PUBREC and completes PUBREL/PUBCOMP itself.
                (Some(QoS::AtLeastOnce), QoS::ExactlyOnce) => {
                    if self.own.is_none() {
                        self.downgraded_qos2.insert(publish.pkid);
                    }
                    publish.qos = QoS::AtLeastOnce;
                }
                _ => {}
            }
        }
        if publish.qos != QoS::AtMostOnce && self.own.is_some() {
            // consentry is the sender now, and this its first attempt
            // (MQTT-3.3.1-1), whatever the publisher's was: rumqttd passes
            // a publisher's DUP flag on.
            publish.dup = false;
            self.ack_broker(from_broker, broker_pkid)?;
            publish.pkid = self
                .own
                .as_mut()
                .and_then(|o| o.start(publish.qos))
                // `on_broker_bytes` decodes no publish without room.
                .ok_or(End::Protocol("no packet id free towards the client"))?;
        }
        if let Some(props) = publish.properties.as_mut() {
            props.topic_alias = None;
        }
        self.send_client(&Packet::Publish(publish))
    }
}

/// A PUBACK with a reason code ≥ 0x80: the receiver did not take the message.
pub(crate) fn puback_failed(ack: &PubAck) -> bool {
    !matches!(
        ack.reason,
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
    )
}

/// A PUBREC with a reason code ≥ 0x80 ends its QoS 2 flow (MQTT 5 §4.3.3).
pub(crate) fn pubrec_failed(rec: &PubRec) -> bool {
    !matches!(
        rec.reason,
        PubRecReason::Success | PubRecReason::NoMatchingSubscribers
    )
}

fn empty_connack_properties() -> ConnAckProperties {
    ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: vec![],
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

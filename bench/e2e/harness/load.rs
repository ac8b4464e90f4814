//! The load generator: real rumqttc clients (MQTT 3.1.1) in the harness
//! process. Devices publish 256-byte JSON carrying a send timestamp in the
//! declared field `ts`; providers subscribe and record end-to-end latency.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::systems::{device_id, device_user, provider_id, SystemKind, PASSWORD};

pub const PAYLOAD_BYTES: usize = 256;

/// Timestamps are nanoseconds since this instant; publisher and subscriber
/// live in the same process, so no clock is compared across processes.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

pub fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// `{"ts":…,"seq":…,"val":…,"pad":"xxx…"}`, padded to exactly 256 bytes.
pub fn payload(ts: u64, seq: u64) -> Vec<u8> {
    let head = format!(
        "{{\"ts\":{ts},\"seq\":{seq},\"val\":{},\"pad\":\"",
        60 + seq % 40
    );
    let mut p = Vec::with_capacity(PAYLOAD_BYTES);
    p.extend_from_slice(head.as_bytes());
    p.resize(PAYLOAD_BYTES - 2, b'x');
    p.extend_from_slice(b"\"}");
    p
}

/// Finds `"ts":` wherever a re-encoding put it (consentry's masking writes
/// the keys back sorted).
pub fn parse_ts(p: &[u8]) -> Option<u64> {
    parse_field(p, b"\"ts\":")
}

/// The `seq` field. In the overload scenario it is `device << 32 | k`, the
/// k-th publish of that device (see [`tracked_seq`]).
pub fn parse_seq(p: &[u8]) -> Option<u64> {
    parse_field(p, b"\"seq\":")
}

/// The `seq` a tracked device puts in its k-th message: unique over the run
/// without relying on the topic a system delivers it on.
pub fn tracked_seq(device: usize, k: u64) -> u64 {
    ((device as u64) << 32) | (k & 0xffff_ffff)
}

fn parse_field(p: &[u8], key: &[u8]) -> Option<u64> {
    let at = p.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = p[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut v: u64 = 0;
    let mut any = false;
    for d in digits {
        v = v.checked_mul(10)?.checked_add((d - b'0') as u64)?;
        any = true;
    }
    any.then_some(v)
}

pub fn topic(i: usize, kind: &str) -> String {
    format!("pii/{}/{}/{kind}", device_user(i), device_id(i))
}

async fn connect(
    addr: SocketAddr,
    client_id: String,
    user: String,
    nodelay: bool,
) -> Result<(AsyncClient, EventLoop), String> {
    let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    o.set_credentials(user, PASSWORD);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_inflight(100);
    let (client, mut el) = AsyncClient::new(o, 64);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(nodelay);
    net.set_connection_timeout(15);
    el.set_network_options(net);
    let connack = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    match connack {
        Ok(Ok(())) => Ok((client, el)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no CONNACK within 20 s".into()),
    }
}

/// A set of `k` (a device's publish numbers), as a bitmap.
#[derive(Default, Clone, Debug)]
pub struct SeqSet {
    bits: Vec<u64>,
}

impl SeqSet {
    /// Adds `k`; false when it was already there.
    pub fn insert(&mut self, k: u32) -> bool {
        let (w, b) = (k as usize / 64, 1u64 << (k % 64));
        if w >= self.bits.len() {
            self.bits.resize(w + 1, 0);
        }
        let new = self.bits[w] & b == 0;
        self.bits[w] |= b;
        new
    }

    pub fn len(&self) -> u64 {
        self.bits.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// How many of `self` are not in `other`.
    pub fn missing_from(&self, other: &SeqSet) -> u64 {
        self.bits
            .iter()
            .enumerate()
            .map(|(i, w)| (w & !other.bits.get(i).copied().unwrap_or(0)).count_ones() as u64)
            .sum()
    }
}

/// Counters over a tracked fleet (the overload scenario), updated live.
#[derive(Default, Debug)]
pub struct AckCounters {
    /// Publishes `AsyncClient::publish` accepted.
    pub handed: AtomicU64,
    /// Of those, written to the network (rumqttc's `Outgoing::Publish`).
    pub out: AtomicU64,
    /// PUBACKs received for them (MQTT 3.1.1: a PUBACK is a success).
    pub acked: AtomicU64,
    /// PUBACKs whose packet id had no publish in flight (should stay 0).
    pub unmatched: AtomicU64,
    /// When the last PUBACK arrived, as `now_ns()`.
    pub last_ack_ns: AtomicU64,
}

/// One tracked device: the `k`s handed to `publish()` that have not gone
/// out yet, in order, and the `k`s acknowledged.
#[derive(Default)]
pub struct Track {
    pending: Mutex<VecDeque<u32>>,
    pub acked: Mutex<SeqSet>,
}

/// The event loop of a tracked device. rumqttc takes requests in the order
/// `publish()` queued them and emits `Outgoing::Publish(pkid)` as it writes
/// each one (also when it later sends a publish that collided on its packet
/// id: it stops taking requests until then), so the n-th `Outgoing::Publish`
/// is the n-th queued publish; a PUBACK is mapped back through its packet id
/// to the `k` that publish carried.
async fn tracked_loop(
    mut el: EventLoop,
    track: Arc<Track>,
    counters: Arc<AckCounters>,
) -> Result<(), String> {
    let mut by_pkid: Vec<Option<u32>> = Vec::new();
    loop {
        match el.poll().await.map_err(|e| e.to_string())? {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let k = track.pending.lock().unwrap().pop_front();
                if let Some(k) = k {
                    counters.out.fetch_add(1, Ordering::Relaxed);
                    let at = pkid as usize;
                    if at >= by_pkid.len() {
                        by_pkid.resize(at + 1, None);
                    }
                    by_pkid[at] = Some(k);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                match by_pkid.get_mut(ack.pkid as usize).and_then(Option::take) {
                    Some(k) => {
                        track.acked.lock().unwrap().insert(k);
                        counters.acked.fetch_add(1, Ordering::Relaxed);
                        counters.last_ack_ns.store(now_ns(), Ordering::Relaxed);
                    }
                    None => {
                        counters.unmatched.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Connected devices, each with its event loop polled by a task of its own.
pub struct Fleet {
    pub clients: Vec<(usize, AsyncClient)>,
    tasks: Vec<JoinHandle<()>>,
    pub errors: Arc<AtomicU64>,
    pub first_error: Arc<std::sync::Mutex<Option<String>>>,
    /// Tracked fleets only: per device index, what it published and what
    /// was acknowledged.
    pub tracks: Vec<Arc<Track>>,
    pub counters: Arc<AckCounters>,
}

impl Fleet {
    /// Connects devices `0..n`, at most 64 CONNECTs in flight.
    pub async fn connect(addr: SocketAddr, n: usize, nodelay: bool) -> Result<Fleet, String> {
        Self::connect_inner(addr, n, nodelay, false).await
    }

    /// As [`Fleet::connect`], and every QoS 1 publish's PUBACK is recorded:
    /// [`drive`] then puts [`tracked_seq`] in each message.
    pub async fn connect_tracked(
        addr: SocketAddr,
        n: usize,
        nodelay: bool,
    ) -> Result<Fleet, String> {
        Self::connect_inner(addr, n, nodelay, true).await
    }

    async fn connect_inner(
        addr: SocketAddr,
        n: usize,
        nodelay: bool,
        tracked: bool,
    ) -> Result<Fleet, String> {
        let gate = Arc::new(Semaphore::new(64));
        let mut set = JoinSet::new();
        for i in 0..n {
            let gate = gate.clone();
            set.spawn(async move {
                let _permit = gate.acquire_owned().await;
                connect(addr, device_user(i), device_id(i), nodelay)
                    .await
                    .map(|c| (i, c))
            });
        }
        let errors = Arc::new(AtomicU64::new(0));
        let first_error = Arc::new(std::sync::Mutex::new(None));
        let mut fleet = Fleet {
            clients: Vec::with_capacity(n),
            tasks: Vec::with_capacity(n),
            errors: errors.clone(),
            first_error: first_error.clone(),
            tracks: if tracked {
                (0..n).map(|_| Arc::new(Track::default())).collect()
            } else {
                Vec::new()
            },
            counters: Arc::new(AckCounters::default()),
        };
        let mut failure = None;
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok((i, (client, mut el)))) => {
                    let (errors, first_error) = (errors.clone(), first_error.clone());
                    let track = fleet.tracks.get(i).cloned();
                    let counters = fleet.counters.clone();
                    fleet.tasks.push(tokio::spawn(async move {
                        let e = match track {
                            Some(track) => tracked_loop(el, track, counters).await,
                            None => loop {
                                if let Err(e) = el.poll().await {
                                    break Err(e.to_string());
                                }
                            },
                        };
                        if let Err(e) = e {
                            errors.fetch_add(1, Ordering::Relaxed);
                            first_error.lock().unwrap().get_or_insert(e);
                        }
                        // No reconnect: a lost device is a result.
                    }));
                    fleet.clients.push((i, client));
                }
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(e) => {
                    failure.get_or_insert(e.to_string());
                }
            }
        }
        fleet.clients.sort_by_key(|(i, _)| *i);
        match failure {
            Some(e) => Err(format!(
                "{} of {n} devices could not connect: {e}",
                n - fleet.clients.len()
            )),
            None => Ok(fleet),
        }
    }

    /// "N devices lost their connection: <first error>", if any did.
    pub fn lost_connections(&self) -> Option<String> {
        let n = self.errors.load(Ordering::Relaxed);
        (n > 0).then(|| {
            let first = self.first_error.lock().unwrap().clone().unwrap_or_default();
            format!("{n} devices lost their connection: {first}")
        })
    }

    pub fn close(self) {
        for t in self.tasks {
            t.abort();
        }
    }

    /// Stops every event loop and waits until they are gone, so a tracked
    /// fleet's `tracks` and `counters` no longer change.
    pub async fn stop(&mut self) {
        for t in std::mem::take(&mut self.tasks) {
            t.abort();
            let _ = t.await;
        }
    }
}

/// Provider subscribers and what they received.
pub struct Receivers {
    pub delivered: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<(Vec<u32>, Option<String>)>>,
}

pub struct Received {
    pub latencies_us: Vec<u32>,
    pub errors: Vec<String>,
}

/// Provider `j` connected (with a client id of its own) and subscribed to
/// `filter`, SUBACK received.
async fn subscriber(
    addr: SocketAddr,
    system: SystemKind,
    j: usize,
    filter: &str,
    qos: QoS,
    nodelay: bool,
) -> Result<(AsyncClient, EventLoop), String> {
    let id = format!("{}-{}", provider_id(j), rand::random::<u32>());
    let (client, mut el) = connect(addr, id, provider_id(j), nodelay).await?;
    client
        .subscribe(filter, qos)
        .await
        .map_err(|e| e.to_string())?;
    let ack = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(a))) => return Ok(a),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no SUBACK within 10 s".to_string())??;
    if ack
        .return_codes
        .iter()
        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
    {
        return Err(format!("{} refused {filter}", system.name()));
    }
    Ok((client, el))
}

impl Receivers {
    pub async fn connect(
        addr: SocketAddr,
        system: SystemKind,
        providers: usize,
        filter: &str,
        qos: QoS,
        nodelay: bool,
    ) -> Result<Receivers, String> {
        let delivered = Arc::new(AtomicU64::new(0));
        let (stop, _) = watch::channel(false);
        let mut tasks = Vec::new();
        for j in 0..providers {
            let (client, mut el) = subscriber(addr, system, j, filter, qos, nodelay).await?;
            let delivered = delivered.clone();
            let mut stopped = stop.subscribe();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1 << 16);
                let _client = client;
                loop {
                    tokio::select! {
                        _ = stopped.changed() => return (lat, None),
                        ev = el.poll() => match ev {
                            Ok(Event::Incoming(Packet::Publish(p))) => {
                                let now = now_ns();
                                if let Some(ts) = parse_ts(&p.payload) {
                                    lat.push((now.saturating_sub(ts) / 1000).min(u32::MAX as u64) as u32);
                                }
                                delivered.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(_) => {}
                            Err(e) => return (lat, Some(e.to_string())),
                        }
                    }
                }
            }));
        }
        Ok(Receivers {
            delivered,
            stop,
            tasks,
        })
    }

    /// Waits until `expected` arrived, or nothing arrived for `quiet`, or
    /// `limit` passed. Returns when the last delivery was seen.
    pub async fn drain(&self, expected: u64, quiet: Duration, limit: Duration) -> Instant {
        let started = Instant::now();
        let mut seen = self.delivered.load(Ordering::Relaxed);
        let mut changed = Instant::now();
        loop {
            let d = self.delivered.load(Ordering::Relaxed);
            if d != seen {
                seen = d;
                changed = Instant::now();
            }
            if d >= expected || changed.elapsed() >= quiet || started.elapsed() >= limit {
                return changed;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn finish(self) -> Received {
        let _ = self.stop.send(true);
        let mut out = Received {
            latencies_us: Vec::new(),
            errors: Vec::new(),
        };
        for t in self.tasks {
            if let Ok((lat, err)) = t.await {
                out.latencies_us.extend(lat);
                out.errors.extend(err);
            }
        }
        out
    }
}

/// How far a [`PacedReceiver`] may fall behind its schedule and catch up.
const PACE_BURST: Duration = Duration::from_millis(20);

/// Live counts of a [`PacedReceiver`].
#[derive(Default, Debug)]
pub struct RecvCounters {
    /// Publishes received, duplicates included.
    pub total: AtomicU64,
    /// Distinct `(device, k)` received.
    pub distinct: AtomicU64,
    pub duplicates: AtomicU64,
    /// Publishes without a readable `seq` (should stay 0).
    pub foreign: AtomicU64,
    /// When the last publish arrived, as `now_ns()`.
    pub last_ns: AtomicU64,
}

/// What a [`PacedReceiver`] got: per device, the set of `k` received.
pub struct PacedReceived {
    pub by_device: Vec<SeqSet>,
    pub latencies_us: Vec<u32>,
    pub error: Option<String>,
}

/// One subscriber that consumes at a set pace (the overload scenario). It
/// polls its event loop — which is when rumqttc reads the socket and
/// acknowledges QoS 1 publishes, up to 10 packets a read — for at most
/// `rate` publishes a second, or as fast as it can once the rate is 0. What
/// it has not read waits in the socket buffers and then in the system.
pub struct PacedReceiver {
    pub counts: Arc<RecvCounters>,
    rate: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    task: JoinHandle<PacedReceived>,
}

impl PacedReceiver {
    pub async fn connect(
        addr: SocketAddr,
        system: SystemKind,
        filter: &str,
        qos: QoS,
        rate: f64,
    ) -> Result<PacedReceiver, String> {
        let (client, mut el) = subscriber(addr, system, 0, filter, qos, false).await?;
        let counts = Arc::new(RecvCounters::default());
        let rate = Arc::new(AtomicU64::new(rate.to_bits()));
        let (stop, mut stopped) = watch::channel(false);
        let (c, r) = (counts.clone(), rate.clone());
        let task = tokio::spawn(async move {
            let _client = client;
            let mut got = PacedReceived {
                by_device: Vec::new(),
                latencies_us: Vec::with_capacity(1 << 16),
                error: None,
            };
            // Publishes consumed since `base`, when the current rate was set.
            let (mut n, mut base, mut current) = (0u64, Instant::now(), f64::NAN);
            loop {
                let want = f64::from_bits(r.load(Ordering::Relaxed));
                if want.to_bits() != current.to_bits() {
                    (n, base, current) = (0, Instant::now(), want);
                }
                if current > 0.0 {
                    let now = Instant::now();
                    let due = base + Duration::from_secs_f64(n as f64 / current);
                    if due > now {
                        tokio::select! {
                            _ = stopped.changed() => return got,
                            _ = tokio::time::sleep_until(due.into()) => {}
                        }
                        continue;
                    }
                    // Behind schedule (nothing to read for a while, or woken
                    // late): no credit beyond a short burst, or a subscriber
                    // kept waiting would then read at full speed.
                    if now.duration_since(due) > PACE_BURST {
                        (n, base) = (0, now.checked_sub(PACE_BURST).unwrap_or(now));
                    }
                }
                tokio::select! {
                    _ = stopped.changed() => return got,
                    ev = el.poll() => match ev {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            n += 1;
                            let now = now_ns();
                            c.total.fetch_add(1, Ordering::Relaxed);
                            c.last_ns.store(now, Ordering::Relaxed);
                            if let Some(ts) = parse_ts(&p.payload) {
                                got.latencies_us
                                    .push((now.saturating_sub(ts) / 1000).min(u32::MAX as u64) as u32);
                            }
                            let Some(seq) = parse_seq(&p.payload).filter(|s| s >> 32 < 1 << 20) else {
                                c.foreign.fetch_add(1, Ordering::Relaxed);
                                continue;
                            };
                            let device = (seq >> 32) as usize;
                            if device >= got.by_device.len() {
                                got.by_device.resize(device + 1, SeqSet::default());
                            }
                            if got.by_device[device].insert(seq as u32) {
                                c.distinct.fetch_add(1, Ordering::Relaxed);
                            } else {
                                c.duplicates.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            got.error = Some(e.to_string());
                            return got;
                        }
                    }
                }
            }
        });
        Ok(PacedReceiver {
            counts,
            rate,
            stop,
            task,
        })
    }

    /// Publishes per second from now on; 0 = as fast as it can.
    pub fn set_rate(&self, rate: f64) {
        self.rate.store(rate.to_bits(), Ordering::Relaxed);
    }

    pub async fn finish(self) -> PacedReceived {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_else(|e| PacedReceived {
            by_device: Vec::new(),
            latencies_us: Vec::new(),
            error: Some(e.to_string()),
        })
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// As fast as the client library accepts them.
    Max,
    /// Messages per second over all devices, on a fixed schedule.
    Rate(f64),
}

/// What one drive sent, by kind index.
#[derive(Default, Debug)]
pub struct Sent {
    pub by_kind: [u64; 3],
    /// Sends more than 5 ms behind their schedule (a generator that cannot
    /// keep up, not a broker that is slow).
    pub late: u64,
}

/// How long after the end of the publishing time a publish may still wait
/// for room in rumqttc's request queue (inflight window full, broker not
/// acking) before the device gives up.
const PUBLISH_GRACE: Duration = Duration::from_secs(10);

/// Each device publishes from a task of its own until `duration` is over or
/// `cap` messages went out; `kind(device, seq)` picks the kind's index. On a
/// tracked fleet the k-th message carries `seq` = [`tracked_seq`]`(device, k)`
/// and k is recorded for the PUBACK bookkeeping.
/// Each device publishes once, on a collected kind the run's providers do
/// not subscribe to, and the fleet waits a moment. A device that published
/// lately has its broker connection open in consentry (see
/// `server.upstream_idle_secs`); a fresh one opens it on its first publish,
/// and a run's latency should not count a hundred CONNECTs at once.
pub async fn warm_up(fleet: &Fleet, kind: &str) {
    for (i, client) in &fleet.clients {
        let _ = client
            .publish(topic(*i, kind), QoS::AtLeastOnce, false, payload(0, 0))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
}

pub async fn drive(
    fleet: &Fleet,
    pace: Pace,
    qos: QoS,
    duration: Duration,
    cap: u64,
    kind: fn(usize, u64) -> usize,
    kinds: &'static [&'static str; 3],
) -> (Sent, Instant) {
    let n = fleet.clients.len().max(1) as u64;
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + duration;
    let mut set = JoinSet::new();
    for (i, client) in fleet.clients.iter().cloned() {
        let topics: Vec<String> = kinds.iter().map(|k| topic(i, k)).collect();
        let track = fleet.tracks.get(i).cloned();
        let counters = fleet.counters.clone();
        set.spawn(async move {
            let mut sent = Sent::default();
            tokio::time::sleep_until(start.into()).await;
            for k in 0..cap {
                let now = match pace {
                    Pace::Max => Instant::now(),
                    Pace::Rate(r) => {
                        let due = start + Duration::from_secs_f64((k * n + i as u64) as f64 / r);
                        if due >= end {
                            break;
                        }
                        tokio::time::sleep_until(due.into()).await;
                        let now = Instant::now();
                        if now.duration_since(due) > Duration::from_millis(5) {
                            sent.late += 1;
                        }
                        now
                    }
                };
                if now >= end {
                    break;
                }
                let kd = kind(i, k);
                let seq = if track.is_some() {
                    tracked_seq(i, k)
                } else {
                    k
                };
                let body = payload(now_ns(), seq);
                if let Some(t) = &track {
                    // Before publish(): the event loop may take the request
                    // (and look for its k) before publish() returns.
                    t.pending.lock().unwrap().push_back(k as u32);
                }
                // Bounded: a broker that stops acking must not hang the run.
                // A publish abandoned here leaves its k last in `pending`,
                // where nothing reads it (this device sends no more).
                let accepted = tokio::time::timeout_at(
                    (end + PUBLISH_GRACE).into(),
                    client.publish(topics[kd].as_str(), qos, false, body),
                )
                .await;
                if !matches!(accepted, Ok(Ok(()))) {
                    break;
                }
                counters.handed.fetch_add(1, Ordering::Relaxed);
                sent.by_kind[kd] += 1;
            }
            sent
        });
    }
    let mut total = Sent::default();
    while let Some(r) = set.join_next().await {
        if let Ok(s) = r {
            for (t, v) in total.by_kind.iter_mut().zip(s.by_kind) {
                *t += v;
            }
            total.late += s.late;
        }
    }
    (total, start)
}

/// A trickle over a large fleet: one scheduler picks a different device for
/// each message, spread over the whole fleet.
pub async fn trickle(
    fleet: &Fleet,
    rate: f64,
    qos: QoS,
    duration: Duration,
    kind: usize,
    kinds: &'static [&'static str; 3],
) -> (Sent, Instant) {
    let n = fleet.clients.len().max(1);
    let start = Instant::now() + Duration::from_millis(20);
    let total = (rate * duration.as_secs_f64()) as u64;
    let mut sent = Sent::default();
    for k in 0..total {
        let due = start + Duration::from_secs_f64(k as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        if due.elapsed() > Duration::from_millis(5) {
            sent.late += 1;
        }
        // A stride coprime with most fleet sizes walks every device.
        let (i, client) = &fleet.clients[(k as usize).wrapping_mul(7919) % n];
        if client
            .publish(topic(*i, kinds[kind]), qos, false, payload(now_ns(), k))
            .await
            .is_ok()
        {
            sent.by_kind[kind] += 1;
        }
    }
    (sent, start)
}

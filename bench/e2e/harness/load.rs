//! The load generator: real rumqttc clients (MQTT 3.1.1) in the harness
//! process. Devices publish 256-byte JSON carrying a send timestamp in the
//! declared field `ts`; providers subscribe and record end-to-end latency.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS};
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
    let key = b"\"ts\":";
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

/// Connected devices, each with its event loop polled by a task of its own.
pub struct Fleet {
    pub clients: Vec<(usize, AsyncClient)>,
    tasks: Vec<JoinHandle<()>>,
    pub errors: Arc<AtomicU64>,
    pub first_error: Arc<std::sync::Mutex<Option<String>>>,
}

impl Fleet {
    /// Connects devices `0..n`, at most 64 CONNECTs in flight.
    pub async fn connect(addr: SocketAddr, n: usize, nodelay: bool) -> Result<Fleet, String> {
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
        };
        let mut failure = None;
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok((i, (client, mut el)))) => {
                    let (errors, first_error) = (errors.clone(), first_error.clone());
                    fleet.tasks.push(tokio::spawn(async move {
                        loop {
                            if let Err(e) = el.poll().await {
                                errors.fetch_add(1, Ordering::Relaxed);
                                first_error
                                    .lock()
                                    .unwrap()
                                    .get_or_insert_with(|| e.to_string());
                                // No reconnect: a lost device is a result.
                                return;
                            }
                        }
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

    pub fn close(self) {
        for t in self.tasks {
            t.abort();
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

/// Each device publishes from a task of its own until `duration` is over or
/// `cap` messages went out; `kind(device, seq)` picks the kind's index.
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
                let body = payload(now_ns(), k);
                if client
                    .publish(topics[kd].as_str(), qos, false, body)
                    .await
                    .is_err()
                {
                    break;
                }
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

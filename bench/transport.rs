//! The gateway's architecture choice, measured: how consentry could hand a
//! message to the embedded rumqttd — its in-process `Broker::link` or a
//! loopback TCP connection per client (what consentry does) — compared in
//! the same run on the same broker configuration. One publisher, one
//! subscriber on `pii/#`, N 256-byte QoS 0 messages; messages/s through the
//! broker, median of 3 runs.
//!
//! `cargo bench --bench transport` (`-- --quick` for a tiny run). QoS 0
//! only: rumqttd 0.20's link builds every publish itself with QoS 0 and
//! keeps `qos`/`pkid` crate-private, so QoS 1/2 cannot be carried through
//! it at all — which is the other half of the choice.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Notification};

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn payload() -> Vec<u8> {
    let mut p = br#"{"bpm":72,"pad":""#.to_vec();
    p.resize(254, b'x');
    p.extend_from_slice(br#""}"#);
    p
}

/// Loopback TCP: rumqttc client → rumqttd v4 listener → rumqttc client.
fn via_tcp(addr: SocketAddr, auth: (&str, &str), n: usize) -> f64 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let opts = |id: &str| {
            let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
            o.set_credentials(auth.0, auth.1);
            o.set_max_packet_size(1 << 20, 1 << 20);
            o
        };
        let (sub, mut sub_events) = AsyncClient::new(opts("tcp-sub"), 1000);
        sub.subscribe("pii/#", QoS::AtMostOnce).await.unwrap();
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = sub_events.poll().await {
                break;
            }
        }
        let (publ, mut pub_events) = AsyncClient::new(opts("tcp-pub"), 1000);
        tokio::spawn(async move { while pub_events.poll().await.is_ok() {} });
        let body = payload();
        let started = Instant::now();
        tokio::spawn(async move {
            for _ in 0..n {
                publ.publish("pii/u1/d1/heart_rate", QoS::AtMostOnce, false, body.clone())
                    .await
                    .unwrap();
            }
        });
        let mut got = 0;
        while got < n {
            match tokio::time::timeout(Duration::from_secs(5), sub_events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(_)))) => got += 1,
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
        got as f64 / started.elapsed().as_secs_f64()
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let quick =
        std::env::args().any(|a| a == "--quick") || !std::env::args().any(|a| a == "--bench");
    let (n, rounds) = if quick { (2_000, 1) } else { (200_000, 3) };
    let defaults: consentry::config::Config =
        toml::from_str(include_str!("../config/consentry.toml")).expect("shipped config parses");
    let (v4, v5) = (free_port(), free_port());
    let auth = HashMap::from([("bench".to_string(), "bench-pass".to_string())]);
    let mut broker = Broker::new(consentry::broker::rumqttd_config(&defaults, v4, v5, auth));
    // `start` blocks and takes the broker: every link is made before it.
    let mut links: Vec<_> = (0..rounds)
        .map(|r| {
            let sub = broker.link(&format!("link-sub-{r}")).unwrap();
            let publ = broker.link(&format!("link-pub-{r}")).unwrap();
            (sub, publ)
        })
        .collect();
    std::thread::spawn(move || {
        let _ = broker.start();
    });
    while std::net::TcpStream::connect(v4).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Interleaved, so both see the same machine state.
    let (mut link_results, mut tcp_results) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let ((sub_tx, sub_rx), (pub_tx, pub_rx)) = links.remove(0);
        link_results.push(run_link(sub_tx, sub_rx, pub_tx, pub_rx, n));
        tcp_results.push(via_tcp(v4, ("bench", "bench-pass"), n));
    }
    let (link, tcp) = (median(link_results.clone()), median(tcp_results.clone()));
    println!("{n} messages x 256 B, QoS 0, one publisher, one subscriber, rumqttd 0.20 with consentry's settings");
    println!("in-process link: {link:>10.0} msg/s  runs {link_results:.0?}");
    println!("loopback TCP:    {tcp:>10.0} msg/s  runs {tcp_results:.0?}");
    println!("link / TCP:      {:.2}x", link / tcp);
}

fn run_link(
    mut sub_tx: rumqttd::local::LinkTx,
    mut sub_rx: rumqttd::local::LinkRx,
    mut pub_tx: rumqttd::local::LinkTx,
    mut pub_rx: rumqttd::local::LinkRx,
    n: usize,
) -> f64 {
    sub_tx.subscribe("pii/#").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let body = payload();
    let started = Instant::now();
    let publisher = std::thread::spawn(move || {
        for _ in 0..n {
            // `publish` blocks on the router's channel, but the link's own
            // buffer is unbounded (and `try_publish` leaves failed packets
            // in it): keep it short so a slow router cannot eat the memory.
            let queued = pub_tx
                .publish("pii/u1/d1/heart_rate", body.clone())
                .unwrap_or(0);
            if queued > 1_000 {
                while pub_tx.buffer().len() > 100 {
                    std::thread::yield_now();
                }
            }
        }
        pub_tx
    });
    // The publisher's own link gets notifications too; the router pauses a
    // link (Unschedule) until it says it is ready again, as rumqttd's
    // network links do after each write.
    let drain = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            match pub_rx.recv_deadline(Instant::now() + Duration::from_millis(200)) {
                Ok(Some(Notification::Unschedule)) => {
                    let _ = pub_rx.ready();
                }
                Ok(_) => {}
                Err(_) => {
                    if publisher_done() {
                        break;
                    }
                }
            }
        }
    });
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < n && Instant::now() < deadline {
        match sub_rx.recv_deadline(Instant::now() + Duration::from_millis(500)) {
            Ok(Some(Notification::Forward(_))) => got += 1,
            Ok(Some(Notification::Unschedule)) => {
                let _ = sub_rx.ready();
            }
            _ => {}
        }
    }
    let rate = got as f64 / started.elapsed().as_secs_f64();
    let _pub_tx = publisher.join().unwrap();
    DONE.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = drain.join();
    DONE.store(false, std::sync::atomic::Ordering::Relaxed);
    rate
}

static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn publisher_done() -> bool {
    DONE.load(std::sync::atomic::Ordering::Relaxed)
}

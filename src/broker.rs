//! The broker consentry relays to: the embedded rumqttd, or any MQTT broker
//! named by `broker.upstream`.
//!
//! The embedded rumqttd listens on loopback ports chosen at start and
//! requires a password generated for this process only, so the broker is
//! reachable through the gateway alone. `Broker::start` blocks and has no
//! shutdown API, so it runs on a named thread that ends with the process.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use rand::distributions::{Alphanumeric, DistString};
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
use thiserror::Error;

use crate::codec::{Packet, Version};
use crate::config::Config as ConsentryConfig;

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error("cannot reserve a loopback port for the embedded broker: {0}")]
    Port(std::io::Error),
    #[error("embedded broker did not start listening on {0} within 10 s")]
    NotListening(SocketAddr),
}

/// Where sessions open their upstream connection, and how they log in.
#[derive(Clone)]
pub struct Upstream {
    pub v4: String,
    pub v5: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("v4", &self.v4)
            .field("v5", &self.v5)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn addr(&self, v: Version) -> &str {
        match v {
            Version::V4 => &self.v4,
            Version::V5 => &self.v5,
        }
    }

    pub fn external(cfg: &ConsentryConfig, host_port: &str) -> Upstream {
        Upstream {
            v4: host_port.to_string(),
            v5: host_port.to_string(),
            username: cfg.broker.username.clone(),
            password: cfg.broker.password.clone(),
        }
    }
}

/// A full MQTT login, so the broker's log shows no half-open probe.
fn answers_connect(addr: SocketAddr, version: Version, user: &str, password: &str) -> bool {
    use rumqttc::v5::mqttbytes::v5::{Connect, Disconnect, DisconnectReasonCode, Login};
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut out = bytes::BytesMut::new();
    let connect = Packet::Connect(
        Connect {
            keep_alive: 10,
            client_id: format!("consentry-probe-{}", rand::random::<u32>()),
            clean_start: true,
            properties: None,
        },
        None,
        Some(Login::new(user, password)),
    );
    if version.write(&connect, &mut out).is_err() || s.write_all(&out).is_err() {
        return false;
    }
    let mut buf = bytes::BytesMut::new();
    let mut chunk = [0u8; 256];
    loop {
        match version.read(&mut buf, 1 << 16) {
            Ok(Some(Packet::ConnAck(_))) => break,
            Ok(None) => {}
            _ => return false,
        }
        match s.read(&mut chunk) {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return false,
        }
    }
    out.clear();
    let bye = Packet::Disconnect(Disconnect::new(DisconnectReasonCode::NormalDisconnection));
    let _ = version.write(&bye, &mut out);
    let _ = s.write_all(&out);
    true
}

fn free_port() -> Result<SocketAddr, BrokerError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(BrokerError::Port)?;
    l.local_addr().map_err(BrokerError::Port)
}

/// The embedded rumqttd's configuration: one 3.1.1 and one 5 listener on
/// the given loopback addresses, logins from `auth`. The benchmark's bare
/// rumqttd baseline runs exactly this, so the two cannot drift apart.
pub fn rumqttd_config(
    cfg: &ConsentryConfig,
    v4: SocketAddr,
    v5: SocketAddr,
    auth: HashMap<String, String>,
) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        // Room for the fixed header and topic around the largest payload.
        max_payload_size: cfg.server.max_packet_size + 1024,
        max_inflight_count: cfg.broker.max_inflight,
        auth: Some(auth),
        external_auth: None,
        // Without this a publish to a topic nobody subscribed to yet
        // disconnects the publisher.
        dynamic_filters: true,
    };
    let server = |name: &str, listen| ServerSettings {
        name: name.into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: cfg.broker.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: cfg.broker.log_segment_mib * 1024 * 1024,
            max_segment_count: cfg.broker.log_segments,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server("v4", v4))])),
        v5: Some(HashMap::from([("1".to_string(), server("v5", v5))])),
        ..Default::default()
    }
}

/// Starts rumqttd with one 3.1.1 and one 5 listener on loopback.
pub fn start_embedded(cfg: &ConsentryConfig) -> Result<Upstream, BrokerError> {
    let user = "consentry-gateway".to_string();
    let password = Alphanumeric.sample_string(&mut rand::rngs::OsRng, 32);
    let (v4, v5) = (free_port()?, free_port()?);
    let config = rumqttd_config(
        cfg,
        v4,
        v5,
        HashMap::from([(user.clone(), password.clone())]),
    );
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Port)?;
    for (addr, version) in [(v4, Version::V4), (v5, Version::V5)] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !answers_connect(addr, version, &user, &password) {
            if Instant::now() > deadline {
                return Err(BrokerError::NotListening(addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    tracing::info!(%v4, %v5, "embedded rumqttd listening on loopback");
    Ok(Upstream {
        v4: v4.to_string(),
        v5: v5.to_string(),
        username: Some(user),
        password: Some(password),
    })
}

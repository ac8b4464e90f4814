//! The broker consentry relays to: the embedded rumqttd, or any MQTT broker
//! named by `broker.upstream`.
//!
//! Sessions reach the embedded rumqttd in memory (`broker_link`), or, with
//! `broker.embedded_transport = "tcp"`, on loopback ports chosen at start
//! that require a password generated for this process only; either way the
//! broker is reachable through the gateway alone. rumqttd's router and
//! listeners have no shutdown API, so they run on named threads that end
//! with the process (`broker_link::Linker::start`).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio_rustls::{rustls, TlsConnector};

use rand::distributions::{Alphanumeric, DistString};
use rumqttc::v5::mqttbytes::v5::{ConnAck, Connect, Login};
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
use thiserror::Error;

use tokio::net::TcpStream;

use crate::broker_link::Linker;
use crate::codec::{Packet, Version};
use crate::config::{Config as ConsentryConfig, EmbeddedTransport};
use crate::upstream_conn::{Conn, Inbox, DISCONNECT_LINGER};

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
    /// Set for the embedded broker reached in memory: sessions then use it
    /// instead of the addresses (which consentry's notice client still uses).
    pub link: Option<Linker>,
    /// Set for an `mqtts://` upstream.
    pub tls: Option<UpstreamTls>,
    /// The embedded rumqttd, over either transport: it keeps no state of a
    /// client's QoS 2 publish once completed, nor across connections.
    pub embedded: bool,
}

/// How connections to an `mqtts://` upstream are encrypted and whom they
/// must reach.
#[derive(Clone)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

/// The CA bundle at `ca` (the configuration's key `what`) as trust
/// anchors; one without a certificate is refused, saying `why` it matters.
pub(crate) fn ca_roots(ca: &Path, what: &str, why: &str) -> anyhow::Result<rustls::RootCertStore> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("read {what} {}", ca.display()))?
    {
        roots
            .add(c.with_context(|| format!("parse {what} {}", ca.display()))?)
            .with_context(|| format!("{what} {}", ca.display()))?;
    }
    if roots.is_empty() {
        anyhow::bail!("{what} {} holds no certificate: {why}", ca.display());
    }
    Ok(roots)
}

impl UpstreamTls {
    /// Trusts the CA bundle at `ca` for the broker named `host` (bare, as
    /// [`crate::config::split_host_port`] gives it).
    fn new(ca: &Path, host: &str) -> anyhow::Result<UpstreamTls> {
        let roots = ca_roots(ca, "broker.ca", "no broker could be verified")?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let server_name = ServerName::try_from(host.to_string())
            .with_context(|| format!("broker.upstream host {host:?}"))?;
        Ok(UpstreamTls {
            config: Arc::new(config),
            server_name,
        })
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("v4", &self.v4)
            .field("v5", &self.v5)
            .field("username", &self.username)
            .field("link", &self.link.is_some())
            .field("tls", &self.tls.is_some())
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

    /// Opens a socket to the broker for a session speaking `v`.
    async fn open(&self, v: Version) -> std::io::Result<Conn> {
        let addr = self.addr(v);
        let up = TcpStream::connect(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("connect {addr}: {e}")))?;
        up.set_nodelay(true)?;
        match &self.tls {
            None => Ok(Conn::Tcp(up)),
            Some(tls) => {
                let connector = TlsConnector::from(tls.config.clone());
                let up = connector
                    .connect(tls.server_name.clone(), up)
                    .await
                    .map_err(|e| std::io::Error::new(e.kind(), format!("TLS to {addr}: {e}")))?;
                Ok(Conn::Tls(Box::new(up)))
            }
        }
    }

    /// consentry's own login to the broker, if it has one.
    pub fn login(&self) -> Option<Login> {
        self.username
            .as_ref()
            .map(|u| Login::new(u.clone(), self.password.clone().unwrap_or_default()))
    }

    /// Opens a connection and sends `connect` with consentry's login.
    /// Returns the connection with the broker's CONNACK and whatever the
    /// broker sent right after it (a persistent session's queued messages).
    pub async fn dial(
        &self,
        v: Version,
        connect: Connect,
    ) -> std::io::Result<(Conn, Inbox, ConnAck)> {
        if let Some(link) = &self.link {
            let (local, ack) = link.dial(v, &connect).await?;
            return Ok((Conn::Local(local), Inbox::default(), ack));
        }
        let mut up = self.open(v).await?;
        up.send_one(v, &Packet::Connect(connect, None, self.login()))
            .await?;
        let mut inbox = Inbox::default();
        let answer = loop {
            if let Some(p) = inbox
                .next(v)
                .map_err(|e| std::io::Error::other(e.to_string()))?
            {
                break p;
            }
            if up.receive(&mut inbox).await? == 0 {
                return Err(std::io::Error::other("closed during CONNECT"));
            }
        };
        match answer {
            Packet::ConnAck(ack) => Ok((up, inbox, ack)),
            _ => Err(std::io::Error::other("expected CONNACK")),
        }
    }

    pub fn external(cfg: &ConsentryConfig, host_port: &str) -> anyhow::Result<Upstream> {
        let tls = match (cfg.upstream_tls(), &cfg.broker.ca) {
            (false, _) => None,
            (true, Some(ca)) => {
                let (host, _) = crate::config::split_host_port(host_port)
                    .ok_or_else(|| anyhow::anyhow!("broker.upstream {host_port:?} has no port"))?;
                Some(UpstreamTls::new(ca, host)?)
            }
            (true, None) => anyhow::bail!("broker.upstream is mqtts:// but broker.ca is not set"),
        };
        Ok(Upstream {
            v4: host_port.to_string(),
            v5: host_port.to_string(),
            username: cfg.broker.username.clone(),
            password: cfg.broker.password.clone(),
            link: None,
            tls,
            embedded: false,
        })
    }
}

/// A full MQTT login, so the broker's log shows no half-open probe.
fn answers_connect(addr: SocketAddr, version: Version, user: &str, password: &str) -> bool {
    let Some(mut s) = login(addr, version, user, password) else {
        return false;
    };
    disconnect(&mut s, version);
    true
}

/// A connection to the broker that got its CONNACK.
fn login(
    addr: SocketAddr,
    version: Version,
    user: &str,
    password: &str,
) -> Option<std::net::TcpStream> {
    use rumqttc::v5::mqttbytes::v5::{Connect, Login};
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
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
    version.write(&connect, &mut out).ok()?;
    s.write_all(&out).ok()?;
    let mut buf = bytes::BytesMut::new();
    let mut chunk = [0u8; 256];
    loop {
        match version.read(&mut buf, 1 << 16) {
            Ok(Some(Packet::ConnAck(_))) => return Some(s),
            Ok(None) => {}
            _ => return None,
        }
        match s.read(&mut chunk) {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// Sends DISCONNECT and lets the broker close first, as sessions do
/// (`session::linger`).
fn disconnect(s: &mut std::net::TcpStream, version: Version) {
    use std::io::Read;
    if send_disconnect(s, version) {
        let _ = s.set_read_timeout(Some(DISCONNECT_LINGER));
        let mut sink = [0u8; 256];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    }
}

fn send_disconnect(s: &mut std::net::TcpStream, version: Version) -> bool {
    use rumqttc::v5::mqttbytes::v5::{Disconnect, DisconnectReasonCode};
    use std::io::Write;
    let mut out = bytes::BytesMut::new();
    let bye = Packet::Disconnect(Disconnect::new(DisconnectReasonCode::NormalDisconnection));
    version.write(&bye, &mut out).is_ok() && s.write_all(&out).is_ok()
}

/// Two free loopback ports, distinct: both are held while the second is
/// chosen, or the kernel may hand out the first one again.
fn free_ports() -> Result<(SocketAddr, SocketAddr), BrokerError> {
    let a = TcpListener::bind("127.0.0.1:0").map_err(BrokerError::Port)?;
    let b = TcpListener::bind("127.0.0.1:0").map_err(BrokerError::Port)?;
    Ok((
        a.local_addr().map_err(BrokerError::Port)?,
        b.local_addr().map_err(BrokerError::Port)?,
    ))
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

/// Starts the embedded rumqttd: its router, and one 3.1.1 and one 5
/// listener on loopback (for consentry's own notice client, and for
/// sessions with `broker.embedded_transport = "tcp"`). Sessions reach it
/// in memory otherwise.
pub fn start_embedded(cfg: &ConsentryConfig) -> Result<Upstream, BrokerError> {
    let user = "consentry-gateway".to_string();
    let password = Alphanumeric.sample_string(&mut rand::rngs::OsRng, 32);
    let (v4, v5) = free_ports()?;
    let config = rumqttd_config(
        cfg,
        v4,
        v5,
        HashMap::from([(user.clone(), password.clone())]),
    );
    let linker = Linker::start(config).map_err(BrokerError::Port)?;
    for (addr, version) in [(v4, Version::V4), (v5, Version::V5)] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !answers_connect(addr, version, &user, &password) {
            if Instant::now() > deadline {
                return Err(BrokerError::NotListening(addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let link = (cfg.broker.embedded_transport == EmbeddedTransport::Link).then_some(linker);
    tracing::info!(%v4, %v5, in_memory = link.is_some(), "embedded rumqttd listening on loopback");
    Ok(Upstream {
        v4: v4.to_string(),
        v5: v5.to_string(),
        username: Some(user),
        password: Some(password),
        link,
        tls: None,
        embedded: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many fresh connections the broker closed around their CONNACK
    /// while other clients were connecting and disconnecting: eight
    /// clients, half of them on each listener (each listener runs on its own
    /// thread), `rounds` connections each.
    fn fresh_connections_closed(rounds: usize, linger: bool) -> usize {
        use std::io::Read;
        let cfg: ConsentryConfig =
            toml::from_str(include_str!("../config/consentry.toml")).unwrap();
        let up = start_embedded(&cfg).unwrap();
        let (user, password) = (up.username.clone().unwrap(), up.password.clone().unwrap());
        let clients: Vec<_> = (0..8)
            .map(|i| {
                let (user, password) = (user.clone(), password.clone());
                let version = if i % 2 == 0 { Version::V4 } else { Version::V5 };
                let addr: SocketAddr = up.addr(version).parse().unwrap();
                std::thread::spawn(move || {
                    let mut closed = 0;
                    for _ in 0..rounds {
                        // Closed before its CONNACK, or right after it.
                        let Some(mut s) = login(addr, version, &user, &password) else {
                            closed += 1;
                            continue;
                        };
                        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                        if matches!(s.read(&mut [0u8; 16]), Ok(0)) {
                            closed += 1;
                            continue;
                        }
                        if linger {
                            disconnect(&mut s, version);
                        } else {
                            assert!(send_disconnect(&mut s, version));
                        }
                    }
                    closed
                })
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).sum()
    }

    #[test]
    fn a_disconnect_does_not_end_the_next_connection() {
        assert_eq!(fresh_connections_closed(50, true), 0);
    }

    /// What the test above guards against, shown: rumqttd 0.20 ends new
    /// connections when clients close right after DISCONNECT. Ignored
    /// because it depends on a race; run with `--ignored`.
    #[test]
    #[ignore]
    fn closing_right_after_disconnect_ends_later_connections() {
        assert!(fresh_connections_closed(50, false) > 0);
    }

    /// A dial given up while the router opens its link (a will's send
    /// timing out does that) must not leave the link's connection in the
    /// router: nothing else would ever end it, and the router refuses
    /// connections past `broker.max_connections`.
    #[tokio::test]
    async fn a_dial_given_up_leaves_no_connection_in_the_router() {
        let toml = include_str!("../config/consentry.toml")
            .replace("max_connections = 100000", "max_connections = 1");
        let cfg: ConsentryConfig = toml::from_str(&toml).unwrap();
        let up = start_embedded(&cfg).unwrap();
        // Until the router has ended the connections that checked its
        // listeners.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let connect = |id: &str| Connect {
            keep_alive: 30,
            client_id: id.into(),
            clean_start: true,
            properties: None,
        };
        // Polled once, so that the link is asked for, then dropped. The
        // router may answer before that first poll looks: then the dial is
        // done, its connection ends as it is dropped, and another is tried.
        let mut given_up = false;
        for attempt in 0..20 {
            let mut dial =
                std::pin::pin!(up.dial(Version::V5, connect(&format!("gone-{attempt}"))));
            given_up = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(std::future::Future::poll(dial.as_mut(), cx).is_pending())
            })
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            if given_up {
                break;
            }
        }
        assert!(given_up, "no dial was still waiting after its first poll");
        let (_conn, _inbox, ack) = up
            .dial(Version::V5, connect("next"))
            .await
            .expect("the router had no room for a new connection");
        assert_eq!(
            ack.code,
            rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
        );
    }
}

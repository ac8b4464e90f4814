//! Wiring: loads configuration and keys, starts the broker, the ledger, the
//! metrics endpoint and the MQTT listeners, and shuts them down together.
//!
//! [`Server::start`] is what `consentry serve`, the tests and the benchmark
//! harness all run, so they exercise the same code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use crate::acl::Acl;
use crate::act::{Act, ActHandle};
use crate::auth::Credentials;
use crate::broker::{self, Upstream};
use crate::config::{Config, TlsConfig};
use crate::ledger::{Keyring, Ledger, LedgerConfig};
use crate::session::{self, Shared};

/// A running consentry.
pub struct Server {
    pub mqtt_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    config: Config,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// Compiles the ACT and credentials from the configuration's directory.
pub fn compile(cfg: &Config, version: u64) -> anyhow::Result<(Act, Credentials)> {
    let dir = cfg.load_directory()?;
    let act = Act::compile(
        version,
        &cfg.templates,
        &cfg.kinds,
        &dir,
        Acl::new(cfg.acl.rules.clone()),
    )?;
    let creds = Credentials::from_directory(&dir)?;
    Ok((act, creds))
}

/// 32 random bytes kept in `path` (owner-only), or taken from `env` as hex.
fn load_or_create_secret(path: &Path, env: &str) -> anyhow::Result<[u8; 32]> {
    if let Ok(hex_key) = std::env::var(env) {
        let bytes = hex::decode(hex_key.trim()).with_context(|| format!("{env} is not hex"))?;
        return bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("{env} must hold 32 bytes"));
    }
    if let Ok(bytes) = std::fs::read(path) {
        return bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("{} must hold 32 bytes", path.display()));
    }
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    write_private(path, &key)?;
    Ok(key)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

pub fn ledger_paths(cfg: &Config) -> (PathBuf, PathBuf) {
    let data = &cfg.storage.data_dir;
    (data.join("ledger"), data.join("ledger-keys.json"))
}

pub fn ledger_config(cfg: &Config) -> LedgerConfig {
    LedgerConfig {
        dir: ledger_paths(cfg).0,
        checkpoint_every: cfg.ledger.checkpoint_every,
        segment_bytes: cfg.ledger.segment_mib * 1024 * 1024,
        retention: cfg
            .ledger
            .retention_days
            .map(|d| Duration::from_secs(d as u64 * 86_400)),
        creator: cfg.ledger.creator.clone(),
        ..LedgerConfig::default()
    }
}

pub fn open_keyring(cfg: &Config) -> anyhow::Result<Keyring> {
    let (_, keys) = ledger_paths(cfg);
    Ok(match Keyring::from_env()? {
        Some(k) => k,
        None => Keyring::load_or_create(&keys)?,
    })
}

fn tls_acceptor(tls: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .with_context(|| format!("read {}", tls.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse {}", tls.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("read {}", tls.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = match &tls.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)? {
                roots.add(c?)?;
            }
            // Certificates are optional: providers and password devices log
            // in without one on the same listener.
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .allow_unauthenticated()
                    .build()?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(certs, key)?,
    };
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl Server {
    /// Starts everything; returns once the listeners are bound.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        let data = &config.storage.data_dir;
        std::fs::create_dir_all(data)
            .with_context(|| format!("create data dir {}", data.display()))?;
        let (act, creds) = compile(&config, 1)?;
        let upstream = match config.upstream_addr() {
            Some(addr) => Upstream::external(&config, addr),
            None => broker::start_embedded(&config)?,
        };
        let ledger = Ledger::open(ledger_config(&config), open_keyring(&config)?)?;
        let pseudonym_master =
            load_or_create_secret(&data.join("pseudonym.key"), "CONSENTRY_PSEUDONYM_KEY")?;
        let act = Arc::new(ActHandle::new(act));
        metrics::gauge!("consentry_act_version").set(1.0);
        let shared = Arc::new(Shared {
            act,
            creds: Arc::new(ArcSwap::from_pointee(creds)),
            ledger,
            upstream,
            server: config.server.clone(),
            creator: config.ledger.creator.clone(),
            pseudonym_master,
            clock_offset: chrono::Duration::seconds(config.server.clock_offset_secs),
        });

        let (shutdown, _) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(config.server.max_connections));
        let ids = Arc::new(AtomicU64::new(1));
        let mut tasks = JoinSet::new();

        let plain = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("bind MQTT listener {}", config.server.listen))?;
        let mqtt_addr = plain.local_addr()?;
        tasks.spawn(accept_loop(
            plain,
            None,
            shared.clone(),
            limit.clone(),
            ids.clone(),
            shutdown.subscribe(),
        ));
        let mut tls_addr = None;
        if let Some(tls) = &config.server.tls {
            let acceptor = tls_acceptor(tls)?;
            let l = TcpListener::bind(tls.listen)
                .await
                .with_context(|| format!("bind MQTT/TLS listener {}", tls.listen))?;
            tls_addr = Some(l.local_addr()?);
            tasks.spawn(accept_loop(
                l,
                Some(acceptor),
                shared.clone(),
                limit,
                ids,
                shutdown.subscribe(),
            ));
        }
        tracing::info!(%mqtt_addr, ?tls_addr, upstream = ?shared.upstream, "consentry listening");
        Ok(Server {
            mqtt_addr,
            tls_addr,
            shared,
            config,
            shutdown,
            tasks,
        })
    }

    /// Re-reads the directory and swaps in a new ACT and credentials. On an
    /// error the ACT in force stays.
    pub fn reload(&self) -> anyhow::Result<u64> {
        let version = self.shared.act.load().version + 1;
        let (act, creds) = compile(&self.config, version)?;
        self.shared.creds.store(Arc::new(creds));
        self.shared.act.store(act);
        tracing::info!(version, "ACT reloaded");
        Ok(version)
    }

    pub fn ledger(&self) -> &Ledger {
        &self.shared.ledger
    }

    /// Stops accepting, tells every session to end, waits up to the drain
    /// time, then closes the ledger (flushing its aggregates and checkpoint).
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let drain = Duration::from_secs(self.config.server.drain_secs);
        let _ = tokio::time::timeout(drain, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
        // Any clone closes the ledger for all: sessions still draining get
        // `Closed` and withhold their deliveries.
        self.shared.ledger.clone().shutdown().await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    ids: Arc<AtomicU64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut sessions = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; refusing");
            metrics::counter!(crate::metrics::CONNECTIONS, "role" => "unknown", "result" => "over_limit").increment(1);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let tls = tls.clone();
        let rx = shutdown.clone();
        sessions.spawn(async move {
            let _permit = permit;
            match tls {
                None => session::serve(shared, stream, None, id, rx).await,
                Some(acceptor) => serve_tls(acceptor, stream, shared, id, rx).await,
            }
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(shared.server.drain_secs), async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
}

async fn serve_tls(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    shared: Arc<Shared>,
    id: u64,
    rx: watch::Receiver<bool>,
) {
    let handshake = tokio::time::timeout(
        Duration::from_secs(shared.server.connect_timeout_secs),
        acceptor.accept(stream),
    )
    .await;
    let tls = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(session = id, error = %e, "TLS handshake failed");
            metrics::counter!(crate::metrics::PROTOCOL_ERRORS, "kind" => "tls").increment(1);
            return;
        }
        Err(_) => return,
    };
    let fingerprint = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| hex::encode(Sha256::digest(c.as_ref())));
    session::serve(shared, tls, fingerprint, id, rx).await
}

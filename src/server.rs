//! Wiring: loads configuration and keys, starts the broker, the ledger, the
//! metrics endpoint and the MQTT listeners, and shuts them down together.
//!
//! [`Server::start`] is what `consentry serve`, the tests and the benchmark
//! harness all run, so they exercise the same code.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use crate::api::ApiState;
use crate::broker::{self, Upstream};
use crate::config::Config;
use crate::ledger::{Keyring, Ledger, LedgerConfig};
use crate::notice::Notifier;
use crate::prefs::{self, PrefError, PreferenceManager, ReceiptIssuer};
use crate::receipt::{Issuer, ReceiptKeys};
use crate::secrets;
use crate::session::{self, Shared};
use crate::store::{ConsentMark, Store, StoreError};
use axum::serve::ListenerExt;

use crate::api::bounded::{Bounded, Idle};

/// A running consentry.
pub struct Server {
    pub mqtt_addr: Option<SocketAddr>,
    pub api_addr: Option<SocketAddr>,
    prefs: Arc<PreferenceManager>,
    pub tls_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    config: Config,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// What `consentry check` found in a valid configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub templates: usize,
    pub kinds: usize,
    pub acl_rules: usize,
    pub directory: Option<PathBuf>,
    pub users: usize,
    pub devices: usize,
    pub providers: usize,
    pub preferences: usize,
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |count: usize, one: &str, many: &str| {
            format!("{count} {}", if count == 1 { one } else { many })
        };
        write!(
            f,
            "configuration OK: {}, {}, {}; ",
            n(self.templates, "topic template", "topic templates"),
            n(self.kinds, "kind", "kinds"),
            n(self.acl_rules, "ACL rule", "ACL rules"),
        )?;
        match &self.directory {
            Some(path) => write!(
                f,
                "directory {}: {}, {}, {}, preferences of {}",
                path.display(),
                n(self.users, "user", "users"),
                n(self.devices, "device", "devices"),
                n(self.providers, "provider", "providers"),
                n(self.preferences, "user", "users"),
            ),
            None => write!(f, "no directory file"),
        }
    }
}

/// Compiles the ACT from the configuration and its directory file alone,
/// without the store: what `consentry check` validates. The configuration
/// is compiled on its own first, so that an error names the file it is in:
/// `config` (templates, kinds, ACL) or the directory file. The file is also
/// held to the rules an import applies to what it changes (those the API
/// applies too), as on a first start, which imports all of it; a later
/// start re-checks only what changed since.
pub fn check(cfg: &Config, config: &Path) -> anyhow::Result<CheckReport> {
    let (templates, kinds, acl) = (&cfg.templates, &cfg.kinds, &cfg.acl.rules);
    prefs::compile(templates, kinds, &Default::default(), acl, 1)
        .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
    let dir = cfg.load_directory()?;
    let in_file = |e: &dyn std::fmt::Display| match &cfg.directory {
        Some(path) => anyhow::anyhow!("{}: {e}", path.display()),
        None => anyhow::anyhow!("{e}"),
    };
    prefs::compile(templates, kinds, &dir, acl, 1).map_err(|e| in_file(&e))?;
    // What an import holds the file to besides, as the API does its users
    // and operator (a first start imports all of it).
    for p in &dir.providers {
        prefs::check_terms(p).map_err(|e| in_file(&e))?;
    }
    for p in &dir.preferences {
        crate::grant_rules::check_grants(&Default::default(), p, None)
            .map_err(|e| in_file(&format!("preferences of {:?}: {e}", p.user)))?;
    }
    // Certificates and keys, as `serve` loads them.
    tls_material(cfg)?;
    Ok(CheckReport {
        templates: templates.len(),
        kinds: kinds.len(),
        acl_rules: acl.len(),
        directory: cfg.directory.clone(),
        users: dir.users.len(),
        devices: dir.devices.len(),
        providers: dir.providers.len(),
        preferences: dir.preferences.len(),
    })
}

/// The operator's API key: `CONSENTRY_OPERATOR_KEY`, or generated on first
/// run into `operator.key` (owner-only) in the data directory.
pub fn operator_key(cfg: &Config) -> anyhow::Result<String> {
    let env = std::env::var("CONSENTRY_OPERATOR_KEY").ok();
    operator_key_from(env, &cfg.storage.data_dir.join("operator.key"))
}

/// [`operator_key`] with the environment's value given. An empty key (a
/// variable set to "", an emptied file) is refused rather than used: the
/// operator API would then open to anyone sending an empty `X-Operator-Key`.
fn operator_key_from(env: Option<String>, path: &Path) -> anyhow::Result<String> {
    if let Some(k) = env {
        anyhow::ensure!(
            !k.trim().is_empty(),
            "CONSENTRY_OPERATOR_KEY is set but empty: unset it (a key is then generated in \
             {}) or give it a key",
            path.display()
        );
        return Ok(k);
    }
    if let Ok(text) = std::fs::read_to_string(path) {
        let key = text.trim();
        anyhow::ensure!(
            !key.is_empty(),
            "the operator key file {} is empty: remove it (a new key is then generated) or \
             write a key in it",
            path.display()
        );
        return Ok(key.to_string());
    }
    let mut raw = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
    let key = hex::encode(raw);
    secrets::write_private(path, key.as_bytes())?;
    tracing::info!(path = %path.display(), "operator API key generated");
    Ok(key)
}

/// The data directory, created owner-only (0700) if it does not exist. One
/// the operator created keeps its mode (see [`secrets::create_private_dir`]).
pub fn data_dir(cfg: &Config) -> anyhow::Result<&Path> {
    let data = &cfg.storage.data_dir;
    secrets::create_private_dir(data)
        .with_context(|| format!("create data dir {}", data.display()))?;
    Ok(data)
}

/// The store's file name in the data directory.
pub const STORE_FILE: &str = "consentry.db";

/// The store's file and its key, derived from the master key.
pub fn open_store(cfg: &Config) -> anyhow::Result<Store> {
    let data = data_dir(cfg)?;
    let key = secrets::derive(&secrets::master_key(data)?, "store v1");
    let path = data.join(STORE_FILE);
    owner_only_database(&path)?;
    // SQLite words a full or read-only disk as an I/O error of its own
    // (e.g. in xShmMap); the operator needs the likely cause. A file that is
    // not a store says so itself, and no disk is to blame.
    Store::open(&path, &key).map_err(|e| match e {
        e @ StoreError::NotAStore { .. } => anyhow::Error::new(e),
        e => anyhow::Error::new(e).context(format!(
            "open the store {} (is its disk full or read-only?)",
            path.display()
        )),
    })
}

/// Refuses a store with fewer consent changes than consentry committed
/// (see [`ConsentMark`]), and has the store raise the mark from now on.
fn check_consent_mark(store: &Store, data: &Path) -> anyhow::Result<()> {
    let (mark, marked) = ConsentMark::open(data)?;
    let held = store.last_consent_seq()?;
    if let Some(marked) = marked.filter(|m| held < *m) {
        if held == 0 {
            anyhow::bail!(
                "the store {} holds no consent changes, but consentry committed {marked} ({}): \
                 the store was lost or replaced. Started on, it would forget what users \
                 consented to and withdrew. Restore the whole data directory from one backup \
                 (README, on backing up the data directory); to start afresh on purpose, move \
                 the data directory away",
                data.join(STORE_FILE).display(),
                mark.path().display(),
            );
        }
        anyhow::bail!(
            "the store {} holds consent changes up to #{held}, but consentry committed up to \
             #{marked} ({}): the store was copied back from an older backup without the rest \
             of the data directory. Started on, it would put back in force what users changed \
             since, grants they withdrew among them. Restore the whole data directory from one \
             backup (README, on backing up the data directory); to start on the older store anyway, delete {} and tell \
             the users whose consents went back",
            data.join(STORE_FILE).display(),
            mark.path().display(),
            mark.path().display(),
        );
    }
    // A first start, or the first of a version that keeps the mark.
    mark.raise(held)
        .with_context(|| format!("write {}", mark.path().display()))?;
    store.keep_consent_mark(mark);
    Ok(())
}

/// The store holds user ids and device password hashes. SQLite creates a
/// database 0644 (less the umask) and gives its `-wal` and `-shm` files the
/// database's mode, so the database is created 0600 before SQLite opens it
/// (an empty file is an empty database to SQLite). Files an earlier version
/// left readable by others are made owner-only.
fn owner_only_database(db: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        // Only a new database is created here: opening an existing one for
        // writing would report a read-only disk as "create" failing.
        if !db.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(db)
                .with_context(|| format!("create {}", db.display()))?;
        }
        let beside = |suffix: &str| {
            let mut name = db.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        for f in [db.to_path_buf(), beside("-wal"), beside("-shm")] {
            let f = f.as_path();
            let Ok(meta) = std::fs::metadata(f) else {
                continue;
            };
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                std::fs::set_permissions(f, std::fs::Permissions::from_mode(mode & 0o700))
                    .with_context(|| format!("make {} owner-only", f.display()))?;
                tracing::warn!(
                    path = %f.display(),
                    mode = %format!("{:o}", mode & 0o777),
                    "store file was readable by others; made owner-only"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = db;
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
        blocked_flush_every: Duration::from_secs(cfg.ledger.blocked_flush_secs.max(1)),
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

/// A warning when the directory file gives logins the demo's published
/// passwords (`config/demo.toml`, whose secrets its comments and the README
/// print): fine for trying consentry, never for a deployment. Compared by
/// hash, so a copy of the demo under another name is caught too.
fn demo_secrets(dir: &crate::model::Directory) -> Option<String> {
    let demo: crate::model::Directory = toml::from_str(include_str!("../config/demo.toml")).ok()?;
    let hashes = |d: &crate::model::Directory| -> Vec<String> {
        let devices = d.devices.iter().filter_map(|x| x.password_hash.clone());
        let providers = d.providers.iter().filter_map(|x| x.password_hash.clone());
        let logins = d.logins.iter().map(|x| x.password_hash.clone());
        devices.chain(providers).chain(logins).collect()
    };
    let published = hashes(&demo);
    let n = hashes(dir).iter().filter(|h| published.contains(h)).count();
    (n > 0).then(|| {
        format!(
            "{n} login(s) in the directory file use the demo's published passwords \
             (config/demo.toml): anyone can log in with them. Fine for trying consentry; \
             for a deployment, give every device, provider and user its own"
        )
    })
}

/// A warning when a listener without TLS takes connections from beyond
/// this host: passwords, TOTP codes, session tokens, the operator key and
/// personal data then cross the network in clear (X.1363 asks for PII
/// encrypted in transit). Behind a TLS-terminating proxy on the same host,
/// listen on loopback and the warning goes.
fn in_clear(mqtt: Option<SocketAddr>, api: Option<SocketAddr>) -> Option<String> {
    let exposed: Vec<String> = [("MQTT", mqtt), ("HTTP API", api)]
        .into_iter()
        .filter_map(|(what, addr)| addr.map(|a| (what, a)))
        .filter(|(_, a)| !a.ip().is_loopback())
        .map(|(what, a)| format!("{what} on {a}"))
        .collect();
    (!exposed.is_empty()).then(|| {
        format!(
            "listening without TLS beyond this host ({}): logins and personal data cross \
             the network in clear; configure [server.tls] / [api.tls], or listen on loopback \
             behind a TLS proxy",
            exposed.join(", ")
        )
    })
}

/// A warning when the external upstream is reached without TLS other than
/// over loopback. The upstream sees all that consentry collects, before
/// masking and before any share grant: every device's minimized data, in
/// clear on that network. A name other than `localhost` counts as not
/// loopback.
fn upstream_in_clear(upstream: &str) -> Option<String> {
    let addr = upstream.strip_prefix("mqtt://")?;
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let local = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    (!local).then(|| {
        format!(
            "broker.upstream {upstream} is reached without TLS and not over loopback: \
             everything devices publish crosses that network in clear, before masking and \
             share grants; use mqtts:// with broker.ca, or keep the network private to \
             consentry and the broker"
        )
    })
}

/// Loads every certificate, key and CA the configuration names, as `serve`
/// would; an error names the section.
fn tls_material(cfg: &Config) -> anyhow::Result<()> {
    if let Some(t) = &cfg.server.tls {
        tls_acceptor(&t.cert, &t.key, t.client_ca.as_deref()).context("[server.tls]")?;
    }
    if let Some(t) = &cfg.api.tls {
        tls_acceptor(&t.cert, &t.key, None).context("[api.tls]")?;
    }
    if let Some(addr) = cfg.upstream_addr() {
        Upstream::external(cfg, addr).context("[broker]")?;
    }
    Ok(())
}

fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> anyhow::Result<TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse {}", cert.display()))?;
    // rustls words these as a peer's failures ("peer sent no certificates",
    // "no root trust anchors"); here they are files that hold the wrong thing.
    if certs.is_empty() {
        anyhow::bail!("cert {} holds no PEM certificate", cert.display());
    }
    let key_path = key;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("read {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mismatch = || {
        format!(
            "cert {} and key {} are not a pair",
            cert.display(),
            key_path.display()
        )
    };
    let config = match client_ca {
        Some(ca) => {
            let roots = crate::broker::ca_roots(
                ca,
                "client_ca",
                "no client certificate could be verified",
            )?;
            // Certificates are optional: providers and password devices log
            // in without one on the same listener.
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .allow_unauthenticated()
                    .build()?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)
                .with_context(mismatch)?
        }
        None => builder
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .with_context(mismatch)?,
    };
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves HTTP (the API, `/metrics`) on `listener` until shutdown: stops accepting, lets
/// each connection finish the request it is on, and returns once all are
/// closed.
///
/// hyper's connections are driven here rather than by `axum::serve` for
/// one setting it does not expose: a deadline for a request's headers.
/// The idle bound (`api::bounded`) closes a connection that sends nothing,
/// not one that sends a byte every few seconds; without the deadline such
/// clients could hold the API's connection slots.
pub(crate) async fn serve_http<L>(
    mut listener: L,
    app: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    use axum::extract::ConnectInfo;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(crate::api::bounded::HEADERS);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => break,
        };
        // The peer address counts failed logins per source.
        let app = app
            .clone()
            .map_request(move |r: axum::http::Request<hyper::body::Incoming>| {
                let mut r = r.map(axum::body::Body::new);
                r.extensions_mut().insert(ConnectInfo(peer));
                r
            });
        let builder = builder.clone();
        let mut stop = shutdown.clone();
        connections.spawn(async move {
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(app));
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.changed() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
        // Finished connections' results are not kept.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

impl Server {
    /// Starts everything; returns once the listeners are bound.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        let data = data_dir(&config)?;
        let issuer = match &config.operator {
            Some(op) => Some(Arc::new(Issuer::new(
                ReceiptKeys::open(data)?,
                op.clone().stating_retention(config.ledger.retention_days),
            ))),
            None => {
                tracing::warn!("no [operator] configured: consent receipts are not issued");
                None
            }
        };
        let store = open_store(&config)?;
        let ledger = Ledger::open(ledger_config(&config), open_keyring(&config)?)?;
        // A ledger with records beside an empty store means the store was
        // lost (deleted, emptied, its WAL gone): seeding it again from the
        // directory file would bring back consents users had withdrawn.
        if ledger.durable_seq() > 0 && store.is_empty()? {
            anyhow::bail!(
                "the store {} holds no users, providers or consents, but the share ledger \
                 in {} holds {} records: the store that held users' preferences was lost. \
                 Restore it from a backup; to start afresh on purpose, move the ledger \
                 directory away too",
                data.join(STORE_FILE).display(),
                ledger_paths(&config).0.display(),
                ledger.durable_seq(),
            );
        }
        check_consent_mark(&store, data)?;
        let directory = config.load_directory()?;
        if let Some(warning) = demo_secrets(&directory) {
            tracing::warn!("{warning}");
        }
        let (pm, act, creds) = PreferenceManager::open(
            store,
            config.templates.clone(),
            &config.kinds,
            config.acl.rules.clone(),
            directory,
            issuer.clone().map(|i| i as Arc<dyn ReceiptIssuer>),
        )?;
        let upstream = match config.upstream_addr() {
            Some(addr) => Upstream::external(&config, addr).context("[broker]")?,
            None => broker::start_embedded(&config)?,
        };
        let pseudonym_master =
            crate::secrets::pseudonym_key(data, ledger.durable_seq(), &ledger_paths(&config).0)?;
        metrics::gauge!(crate::metrics::ACT_VERSION).set(act.load().version as f64);
        crate::metrics::register_providers(pm.providers().iter().map(|p| p.id.as_str()));
        let shared = Arc::new(Shared {
            act,
            creds,
            ledger,
            upstream,
            server: config.server.clone(),
            creator: config.ledger.creator.clone(),
            pseudonym_master,
            clock_offset: chrono::Duration::seconds(config.server.clock_offset_secs),
            // Subscribers of one message get it close together: a short memory suffices.
            views: crate::mask::ViewCache::new(64),
            hot: crate::metrics::Hot::register(),
            // External brokers bound their own queues (and drop from them),
            // which this count would not see.
            client_ids: Default::default(),
            wills: Default::default(),
            password_work: Arc::new(
                crate::password_work::PasswordWork::per_core(
                    config.server.max_waiting_password_checks,
                )
                .per_source(config.server.max_password_checks_per_address),
            ),
            backpressure: crate::backpressure::Backpressure::new(
                match config.upstream_addr() {
                    None => config.broker.max_subscriber_lag_mib as u64 * 1024 * 1024,
                    Some(_) => 0,
                },
                Duration::from_secs(config.broker.slow_subscriber_secs),
            ),
        });

        let (shutdown, _) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(config.server.max_connections));
        let ids = Arc::new(AtomicU64::new(1));
        let mut tasks = JoinSet::new();

        let mut mqtt_addr = None;
        if let Some(listen) = config.server.listen {
            let plain = TcpListener::bind(listen)
                .await
                .with_context(|| format!("bind MQTT listener {listen}"))?;
            mqtt_addr = Some(plain.local_addr()?);
            tasks.spawn(accept_loop(
                plain,
                None,
                shared.clone(),
                limit.clone(),
                ids.clone(),
                shutdown.subscribe(),
            ));
        }
        let mut tls_addr = None;
        if let Some(tls) = &config.server.tls {
            let acceptor = tls_acceptor(&tls.cert, &tls.key, tls.client_ca.as_deref())
                .context("[server.tls]")?;
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
        let prefs = Arc::new(pm);
        let mut api_addr = None;
        if let Some(listen) = config.api.listen {
            let state = ApiState::new(prefs.clone(), config.api.clone(), &operator_key(&config)?)
                .with_password_work(shared.password_work.clone())
                .with_receipts(issuer.clone())
                .with_ledger(shared.ledger.clone(), Notifier::start(&shared.upstream)?);
            let l = TcpListener::bind(listen)
                .await
                .with_context(|| format!("bind HTTP API listener {listen}"))?;
            api_addr = Some(l.local_addr()?);
            let app = crate::api::router(state);
            let rx = shutdown.subscribe();
            // Responses are small and one write each: no reason to let
            // Nagle hold them. (axum also hands peer addresses to tapped
            // listeners of any kind, which the TLS one needs.)
            match &config.api.tls {
                Some(tls) => {
                    let acceptor = tls_acceptor(&tls.cert, &tls.key, None).context("[api.tls]")?;
                    let l = crate::api::tls::TlsListener::new(l, acceptor)?;
                    let l = Bounded::new(l, "api").tap_io(
                        |s: &mut Idle<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>| {
                            let _ = s.get_ref().get_ref().0.set_nodelay(true);
                        },
                    );
                    tasks.spawn(serve_http(l, app, rx));
                }
                None => {
                    let l = Bounded::new(crate::accept::Tcp::new(l, "api"), "api").tap_io(
                        |s: &mut Idle<tokio::net::TcpStream>| {
                            let _ = s.get_ref().set_nodelay(true);
                        },
                    );
                    tasks.spawn(serve_http(l, app, rx));
                }
            }
        }
        if let Some(warning) = in_clear(mqtt_addr, api_addr.filter(|_| config.api.tls.is_none())) {
            tracing::warn!("{warning}");
        }
        if let Some(warning) = upstream_in_clear(&config.broker.upstream) {
            tracing::warn!("{warning}");
        }
        tracing::info!(?mqtt_addr, ?tls_addr, ?api_addr, upstream = ?shared.upstream, "consentry listening");
        Ok(Server {
            mqtt_addr,
            api_addr,
            prefs,
            tls_addr,
            shared,
            config,
            shutdown,
            tasks,
        })
    }

    /// Re-applies the directory file through the preference manager. On an
    /// error nothing changes and the ACT in force stays.
    pub fn reload(&self) -> anyhow::Result<u64> {
        let dir = self.config.load_directory()?;
        let version = self.prefs.import(dir).map_err(|e| {
            match (&e, &self.config.directory) {
                // What is wrong is in the file: say which.
                (
                    PrefError::Invalid(_) | PrefError::Credentials(_) | PrefError::BadLogin(_),
                    Some(path),
                ) => anyhow::anyhow!("{}: {e}", path.display()),
                _ => e.into(),
            }
        })?;
        tracing::info!(version, "directory reloaded");
        Ok(version)
    }

    pub fn prefs(&self) -> &Arc<PreferenceManager> {
        &self.prefs
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
        if !self.shared.ledger.is_healthy() {
            tracing::warn!(
                "the share ledger has been closed since a write failed: no closing checkpoint \
                 can be signed; the next start checks its tail, cuts off a record a failed \
                 write left incomplete, and signs one"
            );
        }
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
    let mut failures = crate::accept::Failures::new(match tls {
        None => "mqtt",
        Some(_) => "mqtts",
    });
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                failures.after(&e).await;
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
                None => session::serve(shared, stream, peer, None, id, rx).await,
                Some(acceptor) => serve_tls(acceptor, stream, peer, shared, id, rx).await,
            }
        });
    }
    // Closed now, so that a client connecting during the drain is refused
    // rather than left without an answer.
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(shared.server.drain_secs), async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
}

async fn serve_tls(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
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
    session::serve(shared, tls, peer, fingerprint, id, rx).await
}

#[cfg(test)]
mod tests {
    use super::{in_clear, operator_key_from, upstream_in_clear};

    #[test]
    fn the_demos_published_passwords_are_warned_of() {
        let demo: crate::model::Directory =
            toml::from_str(include_str!("../config/demo.toml")).unwrap();
        let w = super::demo_secrets(&demo).unwrap();
        assert!(w.starts_with("6 login(s)"), "{w}");
        let mut own = demo.clone();
        own.devices.iter_mut().for_each(|d| d.password_hash = None);
        own.providers
            .iter_mut()
            .for_each(|p| p.password_hash = None);
        own.logins.clear();
        assert_eq!(super::demo_secrets(&own), None);
        assert_eq!(super::demo_secrets(&Default::default()), None);
    }

    #[test]
    fn plain_listeners_beyond_loopback_are_warned_of() {
        let at = |s: &str| Some(s.parse().unwrap());
        assert_eq!(in_clear(at("127.0.0.1:1883"), at("[::1]:8080")), None);
        assert_eq!(in_clear(None, None), None);
        let w = in_clear(at("0.0.0.0:1883"), at("127.0.0.1:8080")).unwrap();
        assert!(w.contains("(MQTT on 0.0.0.0:1883)"), "{w}");
        let w = in_clear(at("127.0.0.1:1883"), at("192.0.2.7:8080")).unwrap();
        assert!(w.contains("(HTTP API on 192.0.2.7:8080)"), "{w}");
        assert!(w.contains("[api.tls]"), "{w}");
    }

    #[test]
    fn a_plain_upstream_beyond_loopback_is_warned_of() {
        for quiet in [
            "embedded",
            "mqtt://127.0.0.1:1883",
            "mqtt://[::1]:1883",
            "mqtt://localhost:1883",
            "mqtts://broker.example:8883",
        ] {
            assert_eq!(upstream_in_clear(quiet), None, "{quiet}");
        }
        for loud in [
            "mqtt://192.0.2.2:1883",
            "mqtt://mosquitto:1883",
            "mqtt://[2001:db8::1]:1883",
        ] {
            let w = upstream_in_clear(loud).unwrap_or_else(|| panic!("{loud}"));
            assert!(w.contains(loud) && w.contains("mqtts://"), "{w}");
        }
    }

    #[test]
    fn an_empty_operator_key_is_refused_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("operator.key");
        // Set but empty (or blank) in the environment: refused, nothing written.
        for empty in ["", "  ", "\n"] {
            let err = operator_key_from(Some(empty.into()), &path).unwrap_err();
            assert!(err
                .to_string()
                .contains("CONSENTRY_OPERATOR_KEY is set but empty"));
        }
        assert!(!path.exists());
        // A key in the environment is used as given.
        assert_eq!(operator_key_from(Some("k1".into()), &path).unwrap(), "k1");
        // An emptied key file: refused, not an open operator API.
        std::fs::write(&path, "\n").unwrap();
        let err = operator_key_from(None, &path).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
        // Otherwise the file's key, trimmed, or a generated one.
        std::fs::write(&path, "abc\n").unwrap();
        assert_eq!(operator_key_from(None, &path).unwrap(), "abc");
        std::fs::remove_file(&path).unwrap();
        let generated = operator_key_from(None, &path).unwrap();
        assert_eq!(generated.len(), 64);
        assert_eq!(operator_key_from(None, &path).unwrap(), generated);
    }
}

//! `config/consentry.toml`: every listen address, path and limit, with the
//! defaults a fresh install runs with. Each key is documented in the shipped
//! file; this module holds the types and the loading rules.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::acl::AclRule;
use crate::model::{Directory, Kind};

#[derive(Debug, Error)]
// The messages hold the underlying error's text, so it is not also given
// as the error's source: `Error: …` and then `Caused by: …` would repeat it.
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
    #[error("{path}: {error}")]
    ParseJson {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub broker: BrokerConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub ledger: LedgerSection,
    #[serde(default)]
    pub acl: AclConfig,
    /// The data service provider, as named on consent receipts (the
    /// Kantara data controller). Without it no receipts are issued.
    #[serde(default)]
    pub operator: Option<crate::receipt::Operator>,
    #[serde(default)]
    pub templates: Vec<String>,
    #[serde(default)]
    pub kinds: Vec<Kind>,
    /// Users, devices, providers and preferences; relative paths are read
    /// from the config file's folder.
    #[serde(default)]
    pub directory: Option<PathBuf>,
}

/// `host:port` as (host, port), the host without the brackets an IPv6
/// address takes in a URL: socket addresses and TLS server names want it
/// bare.
pub fn split_host_port(addr: &str) -> Option<(&str, &str)> {
    let (host, port) = addr.rsplit_once(':')?;
    Some((host.trim_start_matches('[').trim_end_matches(']'), port))
}

/// A number of days, or "forever" for `None`. A key left out keeps its
/// default, so keeping forever takes a value of its own.
fn retention<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    struct Days;
    impl serde::de::Visitor<'_> for Days {
        type Value = Option<u32>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a whole number of days or \"forever\"")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Option<u32>, E> {
            u32::try_from(v).map(Some).map_err(|_| {
                E::custom(format!(
                    "{v} is not a number of days (1 or more), nor \"forever\""
                ))
            })
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Option<u32>, E> {
            self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<u32>, E> {
            match v {
                "forever" => Ok(None),
                _ => Err(E::custom(format!(
                    "a whole number of days or \"forever\", not {v:?}"
                ))),
            }
        }
    }
    d.deserialize_any(Days)
}

/// A listener's address, or "" for none: in the configuration and in the
/// flags that override it. A key left out keeps its default listener, and
/// an image that sets a flag must be able to turn its listener off, so off
/// takes a value of its own.
#[derive(Debug, Clone)]
pub struct Listen(pub Option<SocketAddr>);

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Listen, String> {
        if s.trim().is_empty() {
            return Ok(Listen(None));
        }
        s.parse()
            .map(|a| Listen(Some(a)))
            .map_err(|_| format!("{s:?} is not an address:port (\"\" turns the listener off)"))
    }
}

fn listen_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse::<Listen>()
        .map(|l| l.0)
        .map_err(serde::de::Error::custom)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Plain MQTT listener; "" turns it off (e.g. with `tls` set).
    #[serde(deserialize_with = "listen_addr")]
    pub listen: Option<SocketAddr>,
    pub tls: Option<TlsConfig>,
    /// Largest MQTT packet accepted from a client, in bytes.
    pub max_packet_size: usize,
    pub max_connections: usize,
    /// Password checks (argon2, 19 MiB each) that may wait for a core, MQTT
    /// and API together; past that a CONNECT or login is answered busy.
    pub max_waiting_password_checks: usize,
    /// Password checks one address (IPv6: one /64) may have waiting or
    /// running at once, MQTT and API logins together; 0: no bound.
    pub max_password_checks_per_address: usize,
    /// Time a new connection has to send CONNECT.
    pub connect_timeout_secs: u64,
    /// Clients without credentials may connect (they only reach ACL topics).
    pub allow_anonymous: bool,
    /// Keep-alive consentry grants an MQTT 5 client that asked for 0
    /// (none), in its CONNACK's Server Keep Alive; 0 leaves it none. MQTT
    /// 3.1.1 has no way to tell a client, so it applies to MQTT 5 only.
    pub min_keep_alive_secs: u16,
    /// Time a shutdown waits for sessions to drain.
    pub drain_secs: u64,
    /// A clean session without a will opens its broker connection when it
    /// first has something to send, and closes it after this long with
    /// nothing in flight.
    pub upstream_idle_secs: u64,
    /// Shifts the clock collection windows and grant expiry are judged by;
    /// share records keep the real time. For testing only.
    pub clock_offset_secs: i64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: Some(([127, 0, 0, 1], 1883).into()),
            tls: None,
            max_packet_size: 256 * 1024,
            max_connections: 50_000,
            max_waiting_password_checks: 128,
            max_password_checks_per_address: 32,
            connect_timeout_secs: 10,
            allow_anonymous: false,
            min_keep_alive_secs: 0,
            drain_secs: 5,
            upstream_idle_secs: 300,
            clock_offset_secs: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle for client certificates; when set, devices may log in with
    /// a certificate whose SHA-256 is registered for them.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Prometheus scrape address; "" turns the endpoint off.
    #[serde(deserialize_with = "listen_addr")]
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: Some(([127, 0, 0, 1], 9464).into()),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// HTTP API of the preference manager; "" turns it off.
    #[serde(deserialize_with = "listen_addr")]
    pub listen: Option<SocketAddr>,
    /// Largest request body accepted, in bytes (larger: 413).
    pub max_body_bytes: usize,
    /// Lifetime of a login session, in seconds.
    pub session_ttl_secs: u64,
    /// Failed logins allowed within `login_window_secs` before further
    /// attempts get 429: wrong passwords per user name and peer address,
    /// wrong codes after the right password per user name (`api::login_limiter`).
    pub login_attempts: u32,
    pub login_window_secs: u64,
    /// Issuer shown in authenticator apps for TOTP enrolment.
    pub totp_issuer: String,
    /// When set, the API speaks HTTPS only.
    pub tls: Option<ApiTlsConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: Some(([127, 0, 0, 1], 8080).into()),
            max_body_bytes: 64 * 1024,
            session_ttl_secs: 3600,
            login_attempts: 5,
            login_window_secs: 900,
            totp_issuer: "consentry".into(),
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `embedded`, or `mqtt://host:port` / `mqtts://host:port` of an
    /// external broker.
    pub upstream: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// CA bundle (PEM) that an `mqtts://` upstream's certificate must chain
    /// to; its host name must match the certificate.
    pub ca: Option<PathBuf>,
    /// Limits of the embedded rumqttd.
    pub max_connections: usize,
    pub max_inflight: usize,
    /// The embedded rumqttd keeps, per subscription filter, a ring of
    /// `log_segments` segments of `log_segment_mib`: memory is bounded by
    /// that times the number of distinct filters.
    pub log_segment_mib: usize,
    pub log_segments: usize,
    /// Publishers are held while a subscriber their messages go to is more
    /// than this far behind (embedded broker only; 0 turns it off). Must
    /// stay below what the ring keeps, or rumqttd evicts acknowledged
    /// messages the subscriber has not read.
    pub max_subscriber_lag_mib: usize,
    /// A subscriber that far behind which reads nothing for this long is
    /// disconnected, so that it cannot hold publishers forever.
    pub slow_subscriber_secs: u64,
    /// How sessions reach the embedded rumqttd.
    pub embedded_transport: EmbeddedTransport,
}

/// How sessions reach the embedded rumqttd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddedTransport {
    /// In memory, through a local link to rumqttd's router (`broker_link`).
    Link,
    /// A loopback TCP connection to rumqttd's listeners per session.
    Tcp,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            upstream: "embedded".into(),
            username: None,
            password: None,
            ca: None,
            max_connections: 100_000,
            max_inflight: 100,
            log_segment_mib: 16,
            log_segments: 4,
            max_subscriber_lag_mib: 32,
            slow_subscriber_secs: 10,
            embedded_transport: EmbeddedTransport::Link,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Keys, ledger and other state. Relative paths are taken from the
    /// working directory.
    pub data_dir: PathBuf,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: "data".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerSection {
    pub checkpoint_every: u64,
    /// Days a record is kept; `None` ("forever" in the file) keeps it.
    #[serde(deserialize_with = "retention")]
    pub retention_days: Option<u32>,
    pub segment_mib: u64,
    /// Name of the data service provider written as each record's creator.
    pub creator: String,
    /// How often hourly counts of refused deliveries are written (seconds).
    pub blocked_flush_secs: u64,
}

impl Default for LedgerSection {
    fn default() -> Self {
        Self {
            checkpoint_every: 10_000,
            retention_days: Some(5 * 365),
            segment_mib: 64,
            creator: "consentry".into(),
            blocked_flush_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AclConfig {
    pub rules: Vec<AclRule>,
}

/// MQTT's largest packet (the Remaining Length's maximum plus its header).
const MQTT_MAX_PACKET: usize = 268_435_455;

/// Longest duration a `*_secs` key may hold: 100 years. Far beyond any
/// sensible setting, and far enough from the clock types' limits that
/// adding it to an instant cannot overflow.
const MAX_SECS: u64 = 100 * 365 * 86_400;

fn at_least_one(key: &str, value: u64, why: &str) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::Invalid(format!(
            "{key} must be at least 1, not 0 ({why})"
        )));
    }
    Ok(())
}

fn seconds(key: &str, value: u64, min: u64, why: &str) -> Result<(), ConfigError> {
    if value < min {
        return Err(ConfigError::Invalid(format!(
            "{key} must be at least {min}, not {value} ({why})"
        )));
    }
    if value > MAX_SECS {
        return Err(ConfigError::Invalid(format!(
            "{key} must be at most {MAX_SECS} seconds (100 years), not {value}"
        )));
    }
    Ok(())
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.into(),
            error,
        })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.into(),
            error,
        })?;
        if let (Some(dir), Some(base)) = (&cfg.directory, path.parent()) {
            if dir.is_relative() {
                cfg.directory = Some(base.join(dir));
            }
        }
        // Every rule names its key; the file is named here.
        cfg.validate().map_err(|e| match e {
            ConfigError::Invalid(why) => ConfigError::Invalid(format!("{}: {why}", path.display())),
            other => other,
        })?;
        Ok(cfg)
    }

    /// Every rule a configuration must meet, so that `consentry check`
    /// refuses what `consentry serve` would, and `serve` refuses it before
    /// touching the data directory. Errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.templates.is_empty() {
            return invalid("at least one personal-data topic template is required".into());
        }
        let s = &self.server;
        if s.listen.is_none() && s.tls.is_none() {
            return invalid(
                "server.listen is off and there is no [server.tls]: no MQTT client could connect"
                    .into(),
            );
        }
        if !(64..=MQTT_MAX_PACKET).contains(&s.max_packet_size) {
            return invalid(format!(
                "server.max_packet_size must be between 64 and {MQTT_MAX_PACKET} bytes (the largest MQTT packet), not {}",
                s.max_packet_size
            ));
        }
        at_least_one(
            "server.max_connections",
            s.max_connections as u64,
            "no client could connect",
        )?;
        seconds(
            "server.connect_timeout_secs",
            s.connect_timeout_secs,
            1,
            "every connection would time out",
        )?;
        seconds("server.drain_secs", s.drain_secs, 0, "")?;
        seconds("server.upstream_idle_secs", s.upstream_idle_secs, 0, "")?;
        if s.clock_offset_secs.unsigned_abs() > MAX_SECS {
            return invalid(format!(
                "server.clock_offset_secs must be within ±{MAX_SECS} seconds (100 years), not {}",
                s.clock_offset_secs
            ));
        }

        let a = &self.api;
        at_least_one(
            "api.max_body_bytes",
            a.max_body_bytes as u64,
            "every request body would be refused",
        )?;
        seconds(
            "api.session_ttl_secs",
            a.session_ttl_secs,
            1,
            "every login session would expire at once",
        )?;
        at_least_one(
            "api.login_attempts",
            a.login_attempts as u64,
            "every login would be refused",
        )?;
        seconds(
            "api.login_window_secs",
            a.login_window_secs,
            1,
            "failed logins would never be counted",
        )?;

        let b = &self.broker;
        at_least_one(
            "broker.max_connections",
            b.max_connections as u64,
            "the broker would refuse every session",
        )?;
        at_least_one(
            "broker.max_inflight",
            b.max_inflight as u64,
            "no QoS 1 or 2 message could be in flight",
        )?;
        if b.log_segment_mib == 0 || b.log_segments < 2 {
            return invalid(
                "broker.log_segment_mib must be at least 1 and broker.log_segments at least 2"
                    .into(),
            );
        }
        // rumqttd drops the oldest whole segment when it needs a new one,
        // so only segments - 1 of them are sure to be kept.
        let kept = b
            .log_segment_mib
            .checked_mul(b.log_segments - 1)
            .filter(|k| k.checked_mul(1 << 20).is_some());
        let Some(kept) = kept else {
            return invalid("broker.log_segment_mib × broker.log_segments is too large".into());
        };
        if b.max_subscriber_lag_mib > kept {
            return invalid(format!(
                "broker.max_subscriber_lag_mib ({}) must not exceed log_segment_mib × (log_segments − 1) = {kept} MiB, \
                 or the embedded broker evicts messages a lagging subscriber has not read",
                b.max_subscriber_lag_mib,
            ));
        }
        seconds(
            "broker.slow_subscriber_secs",
            b.slow_subscriber_secs,
            1,
            "any lagging subscriber would be cut off at once (max_subscriber_lag_mib = 0 turns backpressure off)",
        )?;
        let has_host = |a: &str| split_host_port(a).is_some_and(|(h, _)| !h.is_empty());
        let known =
            self.broker.upstream == "embedded" || self.upstream_addr().is_some_and(has_host);
        if !known {
            return invalid(format!(
                "broker.upstream must be \"embedded\", mqtt://host:port or mqtts://host:port, not {:?}",
                self.broker.upstream
            ));
        }
        if self.upstream_tls() && self.broker.ca.is_none() {
            return invalid(
                "broker.upstream is mqtts:// but broker.ca is not set: the broker's certificate could not be verified"
                    .into(),
            );
        }

        let l = &self.ledger;
        at_least_one(
            "ledger.checkpoint_every",
            l.checkpoint_every,
            "it counts the records between signed checkpoints",
        )?;
        at_least_one(
            "ledger.segment_mib",
            l.segment_mib,
            "a ledger segment file is closed at this size",
        )?;
        if l.segment_mib.checked_mul(1 << 20).is_none() {
            return invalid(format!(
                "ledger.segment_mib ({}) is too large",
                l.segment_mib
            ));
        }
        match l.retention_days {
            Some(0) => {
                return invalid(
                    "ledger.retention_days must be at least 1 (0 would purge every record); \
                     \"forever\" keeps records forever"
                        .into(),
                )
            }
            Some(d) if d as u64 * 86_400 > MAX_SECS => {
                return invalid(format!(
                    "ledger.retention_days must be at most {} (100 years); \"forever\" keeps records forever",
                    MAX_SECS / 86_400
                ))
            }
            _ => {}
        }
        seconds(
            "ledger.blocked_flush_secs",
            l.blocked_flush_secs,
            1,
            "refusal counts would be written continuously",
        )?;
        Ok(())
    }

    pub fn load_directory(&self) -> Result<Directory, ConfigError> {
        let Some(path) = &self.directory else {
            return Ok(Directory::default());
        };
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.clone(),
            error,
        })?;
        // TOML for directories people write; JSON for the ones programs
        // write. A TOML document is parsed into a tree first, which for a
        // seed of 20k users took ~30 times the file's size (1.5 GB for
        // 49 MB), and the allocator kept it; JSON is read straight into the
        // directory.
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        {
            return serde_json::from_str(&text).map_err(|error| ConfigError::ParseJson {
                path: path.clone(),
                error,
            });
        }
        // The TOML tree is built and dropped on a thread of its own, and
        // the directory crosses back as JSON text: the tree's allocations
        // stay in that thread's malloc arena, which is left empty (and
        // trimmed) instead of fragmenting the main heap.
        let relay = |e: serde_json::Error| {
            ConfigError::Invalid(format!("{}: re-reading the directory: {e}", path.display()))
        };
        let parse = || -> Result<Result<Vec<u8>, serde_json::Error>, toml::de::Error> {
            let dir: Directory = toml::from_str(&text)?;
            Ok(serde_json::to_vec(&dir))
        };
        let parsed = std::thread::scope(|s| {
            match std::thread::Builder::new()
                .name("directory-parse".into())
                .spawn_scoped(s, parse)
            {
                Ok(t) => t.join().map_err(|_| "the parser thread failed".to_string()),
                Err(e) => Err(format!("cannot start the parser thread: {e}")),
            }
        });
        let json = match parsed {
            Ok(Ok(json)) => json.map_err(relay)?,
            Ok(Err(error)) => {
                return Err(ConfigError::Parse {
                    path: path.clone(),
                    error,
                })
            }
            Err(why) => return Err(ConfigError::Invalid(format!("{}: {why}", path.display()))),
        };
        drop(text);
        serde_json::from_slice(&json).map_err(relay)
    }

    /// `host:port` of an external upstream, or `None` for the embedded broker.
    pub fn upstream_addr(&self) -> Option<&str> {
        let u = &self.broker.upstream;
        u.strip_prefix("mqtt://")
            .or_else(|| u.strip_prefix("mqtts://"))
    }

    /// Whether the external upstream is reached over TLS.
    pub fn upstream_tls(&self) -> bool {
        self.broker.upstream.starts_with("mqtts://")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> Config {
        toml::from_str(include_str!("../config/consentry.toml")).unwrap()
    }

    #[test]
    fn the_shipped_configuration_is_valid() {
        shipped().validate().unwrap();
    }

    #[test]
    fn upstreams() {
        let with = |upstream: &str, ca: &str| {
            let mut c = shipped();
            c.broker.upstream = upstream.into();
            c.broker.ca = (!ca.is_empty()).then(|| ca.into());
            c.validate()
                .map(|()| (c.upstream_addr().map(String::from), c.upstream_tls()))
        };
        assert_eq!(with("embedded", "").unwrap(), (None, false));
        assert_eq!(
            with("mqtt://b:1883", "").unwrap(),
            (Some("b:1883".into()), false)
        );
        assert_eq!(
            with("mqtts://b:8883", "ca.pem").unwrap(),
            (Some("b:8883".into()), true)
        );
        let e = with("mqtts://b:8883", "").unwrap_err().to_string();
        assert!(e.contains("broker.ca is not set"), "{e}");
        for bad in ["tcp://b:1883", "mqtt://b", "mqtts://:8883", "b:1883"] {
            let e = with(bad, "ca.pem").unwrap_err().to_string();
            assert!(e.contains("broker.upstream must be"), "{bad}: {e}");
        }
    }

    #[test]
    fn ledger_retention_is_days_or_forever() {
        let with = |v: &str| {
            toml::from_str::<Config>(&format!(
                "templates = [\"pii/{{user}}/{{device}}/{{kind}}\"]\n[ledger]\n{v}"
            ))
            .map(|c| c.ledger.retention_days)
        };
        assert_eq!(with("").unwrap(), Some(1825), "left out: the default");
        assert_eq!(with("retention_days = 30").unwrap(), Some(30));
        assert_eq!(with("retention_days = \"forever\"").unwrap(), None);
        for bad in ["\"never\"", "-1", "1.5", "true"] {
            let e = with(&format!("retention_days = {bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("days") && e.contains("forever"), "{bad}: {e}");
        }
    }

    /// A listener key left out keeps its default; "" turns it off.
    #[test]
    fn listeners_turn_off_with_an_empty_address() {
        let with = |extra: &str| {
            toml::from_str::<Config>(&format!(
                "templates = [\"pii/{{user}}/{{device}}/{{kind}}\"]\n{extra}"
            ))
        };
        let c = with("").unwrap();
        assert_eq!(c.server.listen, Some(([127, 0, 0, 1], 1883).into()));
        assert!(c.api.listen.is_some() && c.metrics.listen.is_some());
        let c = with("[api]\nlisten = \"\"\n[metrics]\nlisten = \"\"").unwrap();
        assert_eq!((c.api.listen, c.metrics.listen), (None, None));
        let e = with("[api]\nlisten = \"8080\"").unwrap_err().to_string();
        assert!(e.contains("not an address:port"), "{e}");

        let off = with("[server]\nlisten = \"\"").unwrap();
        assert_eq!(off.server.listen, None);
        let e = off.validate().unwrap_err().to_string();
        assert!(e.contains("no MQTT client could connect"), "{e}");
        let tls_only = with(
            "[server]\nlisten = \"\"\n[server.tls]\nlisten = \"127.0.0.1:8883\"\ncert = \"c.pem\"\nkey = \"k.pem\"",
        )
        .unwrap();
        tls_only.validate().unwrap();
    }

    /// The shipped file says every key is listed with its default. serde
    /// names every field a section accepts when it meets an unknown one;
    /// each must appear in the shipped file, set or commented out.
    #[test]
    fn the_shipped_configuration_lists_every_key() {
        let text = include_str!("../config/consentry.toml");
        let listed = |key: &str| {
            text.lines().any(|l| {
                let l = l.trim_start_matches(['#', ' ']);
                let header = l.starts_with('[')
                    && l.trim_matches(['[', ']'])
                        .split('.')
                        .any(|part| part == key);
                l.starts_with(&format!("{key} =")) || header
            })
        };
        for probe in [
            "unknown_key = 1",
            "[server]\nunknown_key = 1",
            "[server.tls]\nunknown_key = 1",
            "[metrics]\nunknown_key = 1",
            "[api]\nunknown_key = 1",
            "[broker]\nunknown_key = 1",
            "[storage]\nunknown_key = 1",
            "[ledger]\nunknown_key = 1",
            "[acl]\nunknown_key = 1",
            "[[acl.rules]]\nunknown_key = 1",
            "[operator]\nunknown_key = 1",
            "[[kinds]]\nunknown_key = 1",
        ] {
            let e = toml::from_str::<Config>(probe).unwrap_err().to_string();
            let expected = e
                .split_once("expected one of ")
                .or_else(|| e.split_once("expected "))
                .unwrap_or_else(|| panic!("{probe}: {e}"))
                .1;
            let keys: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            assert!(!keys.is_empty(), "{probe}: {e}");
            for key in keys {
                assert!(
                    listed(key),
                    "{key} (from {probe:?}) is not in config/consentry.toml"
                );
            }
        }
    }

    #[test]
    fn a_lag_limit_beyond_what_the_broker_keeps_is_refused() {
        let mut c = shipped();
        c.broker.log_segment_mib = 4;
        c.broker.log_segments = 3;
        c.broker.max_subscriber_lag_mib = 8;
        c.validate().unwrap();
        c.broker.max_subscriber_lag_mib = 9;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("max_subscriber_lag_mib"), "{e}");
        c.broker.log_segments = 1;
        c.broker.max_subscriber_lag_mib = 0;
        assert!(c.validate().is_err(), "one segment keeps nothing for sure");
    }

    #[test]
    fn values_that_make_no_sense_are_refused_naming_the_key() {
        type Set = fn(&mut Config);
        let cases: [(&str, Set); 17] = [
            ("server.max_connections", |c| c.server.max_connections = 0),
            ("server.connect_timeout_secs", |c| {
                c.server.connect_timeout_secs = 0
            }),
            ("server.upstream_idle_secs", |c| {
                c.server.upstream_idle_secs = u64::MAX
            }),
            ("server.clock_offset_secs", |c| {
                c.server.clock_offset_secs = i64::MIN
            }),
            ("server.max_packet_size", |c| {
                c.server.max_packet_size = usize::MAX
            }),
            ("api.max_body_bytes", |c| c.api.max_body_bytes = 0),
            ("api.session_ttl_secs", |c| c.api.session_ttl_secs = 0),
            ("api.login_attempts", |c| c.api.login_attempts = 0),
            ("api.login_window_secs", |c| c.api.login_window_secs = 0),
            ("broker.max_connections", |c| c.broker.max_connections = 0),
            ("broker.max_inflight", |c| c.broker.max_inflight = 0),
            ("broker.slow_subscriber_secs", |c| {
                c.broker.slow_subscriber_secs = 0
            }),
            ("broker.log_segment_mib", |c| {
                c.broker.log_segment_mib = usize::MAX
            }),
            ("ledger.checkpoint_every", |c| c.ledger.checkpoint_every = 0),
            ("ledger.segment_mib", |c| c.ledger.segment_mib = u64::MAX),
            ("ledger.retention_days", |c| {
                c.ledger.retention_days = Some(0)
            }),
            ("ledger.blocked_flush_secs", |c| {
                c.ledger.blocked_flush_secs = 0
            }),
        ];
        for (key, set) in cases {
            let mut c = shipped();
            set(&mut c);
            let e = c.validate().expect_err(key).to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        // Zero where it has a meaning stays allowed.
        let mut c = shipped();
        c.server.drain_secs = 0;
        c.server.upstream_idle_secs = 0;
        c.broker.max_subscriber_lag_mib = 0;
        c.ledger.retention_days = None;
        c.validate().unwrap();
    }

    #[test]
    fn a_directory_reads_the_same_as_toml_or_json() {
        let tmp = tempfile::tempdir().unwrap();
        let toml_path = tmp.path().join("demo.toml");
        std::fs::write(&toml_path, include_str!("../config/demo.toml")).unwrap();
        let mut c = shipped();
        c.directory = Some(toml_path);
        let from_toml = c.load_directory().unwrap();
        assert!(!from_toml.users.is_empty() && !from_toml.preferences.is_empty());

        let json_path = tmp.path().join("demo.JSON");
        std::fs::write(&json_path, serde_json::to_vec(&from_toml).unwrap()).unwrap();
        c.directory = Some(json_path.clone());
        let from_json = c.load_directory().unwrap();
        assert_eq!(
            serde_json::to_value(&from_json).unwrap(),
            serde_json::to_value(&from_toml).unwrap()
        );

        // Unknown fields are refused in JSON as in TOML, naming the file.
        std::fs::write(&json_path, br#"{"users": [], "colour": "blue"}"#).unwrap();
        let e = c.load_directory().unwrap_err();
        assert!(matches!(e, ConfigError::ParseJson { .. }), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("demo.JSON") && e.contains("colour"), "{e}");
    }
}

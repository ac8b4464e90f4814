//! The three systems under test, each started as a child process on
//! loopback ports of its own, and the `/proc` readings taken from them.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, SaltString};
use base64::Engine as _;
use serde::Serialize;
use sha2::{Digest, Sha512};

/// Every device and provider logs in with this password.
pub const PASSWORD: &str = "bench-secret";
/// Kinds the generated configuration declares; see `Plan` for who may do what.
pub const KINDS: [&str; 3] = ["heart_rate", "steps", "location"];
pub const PROVIDERS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SystemKind {
    Rumqttd,
    Consentry,
    Mosquitto,
}

impl SystemKind {
    pub fn name(self) -> &'static str {
        match self {
            SystemKind::Rumqttd => "rumqttd",
            SystemKind::Consentry => "consentry",
            SystemKind::Mosquitto => "mosquitto",
        }
    }
}

/// How to start the bare-rumqttd child: the harness binary re-executes
/// itself, the smoke test re-executes its own test binary.
pub type RumqttdCommand = dyn Fn(u16, u16, &Path) -> Command + Send + Sync;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("reserve a loopback port")
}

pub fn device_user(i: usize) -> String {
    format!("u{i}")
}
pub fn device_id(i: usize) -> String {
    format!("d{i}")
}
pub fn provider_id(j: usize) -> String {
    format!("p{j}")
}

/// The same users, devices and providers, written in each system's own
/// terms, for `users` device/user pairs.
pub struct Credentials {
    pub dir: PathBuf,
    pub consentry_config: PathBuf,
    pub rumqttd_auth: PathBuf,
    pub mosquitto_passwd: PathBuf,
    pub mosquitto_acl: PathBuf,
}

impl Credentials {
    pub fn write(dir: &Path, users: usize) -> anyhow::Result<Credentials> {
        std::fs::create_dir_all(dir)?;
        let creds = Credentials {
            dir: dir.to_path_buf(),
            consentry_config: dir.join("consentry.toml"),
            rumqttd_auth: dir.join("rumqttd-auth.txt"),
            mosquitto_passwd: dir.join("mosquitto.passwd"),
            mosquitto_acl: dir.join("mosquitto.acl"),
        };
        let directory = dir.join("directory.json");
        std::fs::write(&directory, consentry_directory(users))?;
        std::fs::write(&creds.consentry_config, consentry_config(&directory))?;
        let mut auth = String::new();
        let mut passwd = String::new();
        let names = (0..users)
            .map(device_id)
            .chain((0..PROVIDERS).map(provider_id));
        for name in names {
            let _ = writeln!(auth, "{name}:{PASSWORD}");
            let _ = writeln!(passwd, "{name}:{}", mosquitto_hash(PASSWORD));
        }
        std::fs::write(&creds.rumqttd_auth, auth)?;
        std::fs::write(&creds.mosquitto_passwd, passwd)?;
        std::fs::write(&creds.mosquitto_acl, mosquitto_acl())?;
        Ok(creds)
    }
}

/// One argon2id hash with tiny parameters (8 KiB, 1 pass), reused for every
/// device: with consentry's default parameters each of thousands of CONNECTs
/// would cost ~15 ms of CPU, which would measure argon2, not the gateway.
fn cheap_phc() -> String {
    let params = argon2::Params::new(8, 1, 1, None).expect("valid argon2 parameters");
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon
        .hash_password(PASSWORD.as_bytes(), &salt)
        .expect("hash the bench password")
        .to_string()
}

/// Mosquitto 2's `$6$` password-file format: base64 salt, base64
/// SHA-512(password ‖ salt). Also one hash per CONNECT, as cheap as ours.
fn mosquitto_hash(password: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let salt: [u8; 12] = rand::random();
    let mut h = Sha512::new();
    h.update(password.as_bytes());
    h.update(salt);
    format!("$6${}${}", b64.encode(salt), b64.encode(h.finalize()))
}

/// Users may be collected `heart_rate` and `steps` but not `location`;
/// every provider gets `heart_rate` as it is and `steps` with `val`
/// generalized to tens (so `ts`, the latency stamp, is never masked).
///
/// Written as JSON, which consentry reads straight into its directory: what
/// README advises for large directories. From TOML the idle scenario's
/// 18k-user directory alone took consentry's start-up peak to ~550 MiB (the
/// toml crate's document tree), and that peak, not the devices, would be the
/// scenario's "peak RSS".
fn consentry_directory(users: usize) -> String {
    use serde_json::json;
    let hash = cheap_phc();
    let providers: Vec<_> = (0..PROVIDERS)
        .map(|j| {
            json!({
                "id": provider_id(j),
                "name": format!("Provider {j}"),
                "role": "application",
                "password_hash": hash,
                "purposes": [{
                    "id": "analytics",
                    "statement": "Benchmark analytics.",
                    "category": "Improve Performance",
                    "kinds": ["heart_rate", "steps", "location"],
                    "retention_days": 30,
                }],
            })
        })
        .collect();
    let share: Vec<_> = (0..PROVIDERS)
        .flat_map(|j| {
            let p = provider_id(j);
            [
                json!({ "provider": p, "purpose": "analytics", "kind": "heart_rate" }),
                json!({
                    "provider": p, "purpose": "analytics", "kind": "steps",
                    "mask": { "val": { "method": "generalize", "decimals": -1 } },
                }),
            ]
        })
        .collect();
    let (mut people, mut devices, mut preferences) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..users {
        let (u, d) = (device_user(i), device_id(i));
        people.push(json!({ "id": u, "time_zone": "UTC" }));
        devices.push(json!({ "id": d, "user": u, "password_hash": hash }));
        preferences.push(json!({
            "user": u,
            "version": 1,
            "collect": [{ "kind": "heart_rate" }, { "kind": "steps" }],
            "share": share,
        }));
    }
    json!({
        "providers": providers,
        "users": people,
        "devices": devices,
        "preferences": preferences,
    })
    .to_string()
}

/// Shipped defaults (config/consentry.toml) except the directory, the
/// ledger's creator, a shorter drain, and no bound on password checks per
/// address (the load generator is one address standing for a whole fleet);
/// metrics stay on as in production.
fn consentry_config(directory: &Path) -> String {
    let mut s = format!(
        "directory = {dir:?}\ntemplates = [\"pii/{{user}}/{{device}}/{{kind}}\"]\n\n\
         [server]\nlisten = \"127.0.0.1:1883\"\nmax_packet_size = 262144\nmax_connections = 50000\n\
         connect_timeout_secs = 10\nallow_anonymous = false\ndrain_secs = 2\nclock_offset_secs = 0\n\
         max_password_checks_per_address = 0\n\n\
         [metrics]\nlisten = \"127.0.0.1:9464\"\n\n\
         [broker]\nupstream = \"embedded\"\nmax_connections = 100000\nmax_inflight = 100\n\n\
         [ledger]\ncheckpoint_every = 10000\nretention_days = 1825\nsegment_mib = 64\ncreator = \"bench\"\n\n",
        dir = directory.display().to_string()
    );
    for (kind, category) in [
        ("heart_rate", "Health"),
        ("steps", "Behavioral"),
        ("location", "Behavioral"),
    ] {
        let _ = write!(
            s,
            "[[kinds]]\nname = \"{kind}\"\ncategory = \"{category}\"\nformat = \"json\"\n\
             fields = [\"ts\", \"seq\", \"val\", \"pad\"]\n\n"
        );
    }
    s
}

/// The same rules as consentry's collection grants: a device writes only
/// under its own user and device (client id = user, username = device), and
/// only `heart_rate` and `steps`; providers read everything.
fn mosquitto_acl() -> String {
    let mut s = String::new();
    for j in 0..PROVIDERS {
        let _ = writeln!(s, "user {}\ntopic read pii/#\n", provider_id(j));
    }
    s.push_str("pattern write pii/%c/%u/heart_rate\npattern write pii/%c/%u/steps\n");
    s
}

/// A running system under test.
pub struct System {
    pub kind: SystemKind,
    pub addr: SocketAddr,
    child: Child,
    pub log: PathBuf,
    /// consentry's Prometheus endpoint.
    metrics: Option<SocketAddr>,
}

/// consentry's ledger fsyncs so far, from its `consentry_ledger_fsync_seconds`
/// histogram: every delivery waits for one, so slow ones show in latency.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Fsyncs {
    pub count: u64,
    pub over_5ms: u64,
    pub over_10ms: u64,
}

impl Fsyncs {
    pub fn plus(self, other: Fsyncs) -> Fsyncs {
        Fsyncs {
            count: self.count + other.count,
            over_5ms: self.over_5ms + other.over_5ms,
            over_10ms: self.over_10ms + other.over_10ms,
        }
    }

    pub fn since(self, before: Fsyncs) -> Fsyncs {
        Fsyncs {
            count: self.count.saturating_sub(before.count),
            over_5ms: self.over_5ms.saturating_sub(before.over_5ms),
            over_10ms: self.over_10ms.saturating_sub(before.over_10ms),
        }
    }

    /// Reads the histogram out of a Prometheus text exposition.
    pub fn parse(text: &str) -> Option<Fsyncs> {
        let name = "consentry_ledger_fsync_seconds";
        let count_series = format!("{name}_count");
        let mut count = None;
        let (mut le_5ms, mut le_10ms) = (None, None);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if series == count_series {
                count = Some(value as u64);
            } else if let Some(le) = series
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix("_bucket{le=\""))
                .and_then(|r| r.strip_suffix("\"}"))
                .and_then(|le| le.parse::<f64>().ok())
            {
                if (le - 0.005).abs() < 1e-9 {
                    le_5ms = Some(value as u64);
                } else if (le - 0.01).abs() < 1e-9 {
                    le_10ms = Some(value as u64);
                }
            }
        }
        let count = count?;
        Some(Fsyncs {
            count,
            over_5ms: count.saturating_sub(le_5ms?),
            over_10ms: count.saturating_sub(le_10ms?),
        })
    }
}

impl System {
    pub fn start(
        kind: SystemKind,
        creds: &Credentials,
        consentry_bin: &Path,
        mosquitto_bin: Option<&Path>,
        rumqttd_cmd: &RumqttdCommand,
    ) -> anyhow::Result<System> {
        let log = creds.dir.join(format!("{}.log", kind.name()));
        let stderr = || -> anyhow::Result<Stdio> {
            Ok(std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?
                .into())
        };
        let mut metrics = None;
        let (child, addr) = match kind {
            SystemKind::Rumqttd => {
                let (v4, v5) = (free_port(), free_port());
                let child = rumqttd_cmd(v4, v5, &creds.rumqttd_auth)
                    .stdout(Stdio::null())
                    .stderr(stderr()?)
                    .spawn()?;
                (child, SocketAddr::from(([127, 0, 0, 1], v4)))
            }
            SystemKind::Mosquitto => {
                let bin = mosquitto_bin.ok_or_else(|| anyhow::anyhow!("no mosquitto"))?;
                let port = free_port();
                let conf = creds.dir.join("mosquitto.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "per_listener_settings false\nlistener {port} 127.0.0.1\n\
                         allow_anonymous false\npassword_file {}\nacl_file {}\n\
                         persistence false\nmax_inflight_messages 100\nmax_queued_messages 1000\n\
                         max_connections -1\n\
                         log_dest stderr\nlog_type error\nlog_type warning\n",
                        creds.mosquitto_passwd.display(),
                        creds.mosquitto_acl.display()
                    ),
                )?;
                let child = Command::new(bin)
                    .arg("-c")
                    .arg(&conf)
                    .stdout(Stdio::null())
                    .stderr(stderr()?)
                    .spawn()?;
                (child, SocketAddr::from(([127, 0, 0, 1], port)))
            }
            SystemKind::Consentry => {
                let endpoint = SocketAddr::from(([127, 0, 0, 1], free_port()));
                metrics = Some(endpoint);
                let data = creds.dir.join(format!("data-{}", rand::random::<u32>()));
                let mut child = Command::new(consentry_bin)
                    .arg("--config")
                    .arg(&creds.consentry_config)
                    .arg("serve")
                    .arg("--listen")
                    .arg("127.0.0.1:0")
                    .arg("--metrics-listen")
                    .arg(endpoint.to_string())
                    // Not the default 8080: runs may overlap with others.
                    .arg("--api-listen")
                    .arg("127.0.0.1:0")
                    .arg("--data-dir")
                    .arg(&data)
                    .env("CONSENTRY_LOG", "warn")
                    .stdout(Stdio::piped())
                    .stderr(stderr()?)
                    .spawn()?;
                let lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    for line in lines.map_while(Result::ok) {
                        if let Some(a) = line.strip_prefix("consentry listening mqtt=") {
                            let _ = tx.send(a.to_string());
                        }
                    }
                });
                let addr = match rx.recv_timeout(Duration::from_secs(60)) {
                    Ok(a) => a.parse()?,
                    Err(_) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        anyhow::bail!(
                            "consentry did not start: {}",
                            std::fs::read_to_string(&log).unwrap_or_default()
                        );
                    }
                };
                (child, addr)
            }
        };
        let mut sys = System {
            kind,
            addr,
            child,
            log,
            metrics,
        };
        // rumqttd and Mosquitto print nothing when ready: wait for the port.
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(sys.addr).is_err() {
            if let Ok(Some(status)) = sys.child.try_wait() {
                anyhow::bail!(
                    "{} exited at start ({status}): {}",
                    kind.name(),
                    std::fs::read_to_string(&sys.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                sys.stop();
                anyhow::bail!("{} did not listen within 30 s", kind.name());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(sys)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// consentry's ledger fsyncs so far; `None` for the brokers, or when the
    /// scrape fails (then the run simply has no such figure).
    pub fn fsyncs(&self) -> Option<Fsyncs> {
        let addr = self.metrics?;
        let text = ureq::get(&format!("http://{addr}/metrics"))
            .timeout(Duration::from_secs(5))
            .call()
            .ok()?
            .into_string()
            .ok()?;
        // The histogram appears with the first fsync; before it there were none.
        Some(Fsyncs::parse(&text).unwrap_or_default())
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stop(&mut self) {
        if !self.alive() {
            return;
        }
        // rumqttd has no clean shutdown; the other two flush on SIGTERM.
        if self.kind != SystemKind::Rumqttd {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.pid().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if !self.alive() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for System {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Seconds of user + system CPU a process (all its threads) has used.
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| stat_cpu(&text).map(|(_, secs)| secs))
        .unwrap_or(f64::NAN)
}

/// The command name and user + system CPU seconds of a `/proc/…/stat` line.
fn stat_cpu(text: &str) -> Option<(&str, f64)> {
    let (open, close) = (text.find('(')?, text.rfind(')')?);
    // Fields after the parenthesized command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Some((
        &text[open + 1..close],
        (ticks(11) + ticks(12)) / clock_ticks(),
    ))
}

/// CPU seconds of each thread of `pid`, summed by thread name (`comm`),
/// for the threads alive now: a thread that has exited is no longer listed,
/// and its time is only in [`cpu_seconds`].
pub fn cpu_by_thread(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        if let Some((name, secs)) = stat_cpu(&text) {
            *out.entry(name.to_string()).or_insert(0.0) += secs;
        }
    }
    out
}

fn clock_ticks() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// `VmHWM` (peak RSS) and `VmRSS` of a process, in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Open file descriptors of a process (`/proc/PID/fd`).
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// Resets `VmHWM` to the current RSS, so each run's peak is its own.
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

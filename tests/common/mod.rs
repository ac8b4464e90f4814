//! Starts the real `consentry` binary on free ports with a configuration
//! written for the test, and gives tests real MQTT clients (rumqttc, 3.1.1
//! and 5) to talk to it.
#![allow(dead_code, unused_imports)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::sync::mpsc;

pub const DEMO_DIRECTORY: &str = include_str!("../../config/demo.toml");
pub const SHIPPED_CONFIG: &str = include_str!("../../config/consentry.toml");
/// Every test config opens `public/#` to everybody: tests publish a marker
/// there after the message under test, so "nothing arrived" is checked by
/// the marker arriving first, not by waiting.
pub const MARKER_ACL: &str = r#"
[[acl.rules]]
filter = "public/#"
clients = "any"
access = "readwrite"
"#;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Default, Clone)]
pub struct Setup {
    /// Directory TOML; the demo data when `None`.
    pub directory: Option<String>,
    /// The directory file's name; `directory.toml` when `None` (a name
    /// ending in `.json` makes consentry read it as JSON).
    pub directory_file: Option<String>,
    /// Appended to the shipped configuration (ACL rules, kinds…).
    pub extra: String,
    /// `(key, value)` pairs replaced in the shipped configuration's text,
    /// e.g. `("clock_offset_secs = 0", "clock_offset_secs = 3600")`.
    pub replace: Vec<(String, String)>,
    pub upstream: Option<String>,
    pub env: Vec<(String, String)>,
    /// No `--listen` flag: the configuration's `server.listen` decides.
    pub config_listen: bool,
}

pub struct Server {
    child: Option<Child>,
    pub mqtt: SocketAddr,
    pub mqtts: Option<SocketAddr>,
    pub api: Option<SocketAddr>,
    pub metrics: SocketAddr,
    pub dir: TempDir,
    pub config: PathBuf,
    pub directory: PathBuf,
    setup: Setup,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_consentry")
}

impl Server {
    pub fn demo() -> Server {
        Server::start(Setup {
            extra: MARKER_ACL.into(),
            ..Default::default()
        })
    }

    pub fn start(setup: Setup) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let directory = dir
            .path()
            .join(setup.directory_file.as_deref().unwrap_or("directory.toml"));
        std::fs::write(
            &directory,
            setup.directory.as_deref().unwrap_or(DEMO_DIRECTORY),
        )
        .unwrap();
        let mut text = SHIPPED_CONFIG.replace(
            "directory = \"demo.toml\"",
            &format!("directory = {:?}", directory.display().to_string()),
        );
        for (from, to) in &setup.replace {
            assert!(text.contains(from.as_str()), "config has no {from:?}");
            text = text.replace(from.as_str(), to);
        }
        text.push_str(&setup.extra);
        let config = dir.path().join("consentry.toml");
        std::fs::write(&config, text).unwrap();
        let mut s = Server {
            child: None,
            mqtt: "127.0.0.1:0".parse().unwrap(),
            mqtts: None,
            api: None,
            metrics: "127.0.0.1:0".parse().unwrap(),
            dir,
            config,
            directory,
            setup,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("consentry did not start:\n{log}");
        }
    }

    /// Starts consentry; `Err` with its log if it exits before it is ready.
    fn try_spawn(&mut self) -> Result<(), String> {
        let metrics_port = free_port();
        let mut cmd = Command::new(bin());
        cmd.arg("--config").arg(&self.config).arg("serve");
        if !self.setup.config_listen {
            cmd.arg("--listen").arg("127.0.0.1:0");
        }
        cmd.arg("--api-listen")
            .arg("127.0.0.1:0")
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .env("CONSENTRY_LOG", "info,consentry=debug,rumqttd=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.path().join("stderr.log"))
                    .unwrap(),
            ));
        if let Some(u) = &self.setup.upstream {
            cmd.arg("--upstream").arg(u);
        }
        for (k, v) in &self.setup.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start consentry");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.by_ref().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("consentry listening ") {
                    if let Some((what, addr)) = rest.split_once('=') {
                        let _ = tx.send((what.to_string(), addr.to_string()));
                    }
                }
            }
            let _ = tx.send(("exit".to_string(), String::new()));
        });
        self.child = Some(child);
        self.metrics = format!("127.0.0.1:{metrics_port}").parse().unwrap();
        // main prints every listener, the MQTT one first, then its "ready".
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok((what, addr)) => match what.as_str() {
                    "mqtt" => self.mqtt = addr.parse().unwrap(),
                    "mqtts" => self.mqtts = Some(addr.parse().unwrap()),
                    "api" => self.api = Some(addr.parse().unwrap()),
                    "ready" => return Ok(()),
                    _ => {
                        if let Some(mut c) = self.child.take() {
                            let _ = c.kill();
                            let _ = c.wait();
                        }
                        return Err(self.log());
                    }
                },
                Err(_) => panic!("consentry neither started nor exited:\n{}", self.log()),
            }
        }
    }

    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Rewrites the directory and reloads it (SIGHUP); returns once the new
    /// ACT is in force, as the metrics report.
    pub fn reload(&self, directory: &str) {
        let before = self.act_version();
        std::fs::write(&self.directory, directory).unwrap();
        self.signal("HUP");
        for _ in 0..200 {
            if self.act_version() > before {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("ACT was not reloaded:\n{}", self.log());
    }

    pub fn metrics_text(&self) -> String {
        ureq::get(&format!("http://{}/metrics", self.metrics))
            .call()
            .expect("scrape /metrics")
            .into_string()
            .unwrap()
    }

    /// Sum of a metric's samples whose label set contains every `labels` pair.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics_text(), name, labels)
    }

    /// Polls a metric until it reads `want` (up to 15 s); panics with the
    /// last value otherwise.
    pub async fn wait_for_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let got = self.metric(name, labels);
            if got == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} {labels:?} stayed at {got}, expected {want}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn act_version(&self) -> f64 {
        self.metric("consentry_act_version", &[])
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            self.signal_pid(c.id(), "TERM");
            let status = c.wait().unwrap();
            assert!(status.success(), "unclean exit {status}:\n{}", self.log());
        }
    }

    /// Waits up to `limit` for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Starts the same configuration and data again (after stop or kill9).
    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        self.spawn();
    }

    /// Starts the same configuration and data again, expecting consentry
    /// to refuse to start; returns its log.
    pub fn restart_refused(&mut self) -> String {
        assert!(self.child.is_none());
        match self.try_spawn() {
            Ok(()) => panic!("consentry started:\n{}", self.log()),
            Err(log) => log,
        }
    }

    fn signal_pid(&self, pid: u32, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status();
    }

    /// Runs `consentry` with this server's configuration and data.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("CONSENTRY_DATA_DIR", self.data_dir())
            .output()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- consentry's log ---\n{}", self.log());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, lbls) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| lbls.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// A real HTTP request to the server's API; `(status, body)`, 4xx/5xx included.
pub fn http(
    server: &Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<serde_json::Value>,
) -> (u16, String) {
    let url = format!("http://{}{}", server.api.expect("API listening"), path);
    let mut req = ureq::request(method, &url);
    if let Some(t) = token {
        req = req.set("authorization", &format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let resp = match body {
        Some(b) => req
            .set("content-type", "application/json")
            .send_string(&b.to_string()),
        None => req.call(),
    };
    let resp = match resp {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    (resp.status(), resp.into_string().unwrap_or_default())
}

/// The demo's alice (config/demo.toml) logged in through the API, at the
/// current TOTP step: her session token.
pub fn demo_alice_token(server: &Server) -> String {
    let login = serde_json::json!({
        "user": "alice",
        "password": "alice-api-secret",
        "totp": totp_now("CNFOSFDCDDJIUQAT6P2EOM7JSUQFFACA", "alice"),
    });
    let (s, session) = http(server, "POST", "/v1/sessions", None, &[], Some(login));
    assert_eq!(s, 201, "{session}");
    json_of(&session)["token"]
        .as_str()
        .expect("a session token")
        .to_string()
}

pub fn json_of(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|_| panic!("not JSON: {s}"))
}

/// The current code of an authenticator enrolled with `secret_b32`.
pub fn totp_now(secret_b32: &str, _user: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    totp_at(secret_b32, now)
}

/// The code of that authenticator at `unix_secs`.
pub fn totp_at(secret_b32: &str, unix_secs: u64) -> String {
    let secret = totp_rs::Secret::Encoded(secret_b32.into())
        .to_bytes()
        .unwrap();
    totp_rs::TOTP::new(
        totp_rs::Algorithm::SHA1,
        6,
        1,
        30,
        secret,
        Some("consentry".into()),
        "test".into(),
    )
    .unwrap()
    .generate(unix_secs)
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

// === MQTT 3.1.1 client ===

pub mod v4 {
    use super::*;
    pub use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, Publish, QoS};

    pub struct Client {
        pub client: AsyncClient,
        pub events: mpsc::UnboundedReceiver<Packet>,
        task: tokio::task::JoinHandle<()>,
    }

    pub fn options(addr: SocketAddr, id: &str, login: Option<(&str, &str)>) -> MqttOptions {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        if let Some((u, p)) = login {
            o.set_credentials(u, p);
        }
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Connects and waits for CONNACK; `Err` carries the refusal.
    pub async fn connect_with(o: MqttOptions) -> Result<Client, String> {
        let (client, mut el) = AsyncClient::new(o, 100);
        let (tx, events) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(p)) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Err(e.to_string()));
                        }
                        return;
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(Client {
                client,
                events,
                task,
            }),
            Ok(Ok(Err(e))) => Err(e),
            _ => Err("no CONNACK".into()),
        }
    }

    pub async fn connect(addr: SocketAddr, id: &str, user: &str, pass: &str) -> Client {
        connect_with(options(addr, id, Some((user, pass))))
            .await
            .unwrap_or_else(|e| panic!("{user} could not connect: {e}"))
    }

    impl Client {
        /// Drops the connection without DISCONNECT, as a crashed device would.
        pub fn kill(self) {
            self.task.abort();
        }

        /// Sends DISCONNECT and waits for the connection to close.
        pub async fn disconnect(mut self) {
            let _ = self.client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while self.events.recv().await.is_some() {}
            })
            .await;
        }

        pub async fn subscribe(
            &mut self,
            filter: &str,
            qos: QoS,
        ) -> Vec<rumqttc::SubscribeReasonCode> {
            self.client.subscribe(filter, qos).await.unwrap();
            loop {
                if let Packet::SubAck(a) = self.next().await {
                    return a.return_codes;
                }
            }
        }

        pub async fn next(&mut self) -> Packet {
            tokio::time::timeout(Duration::from_secs(10), self.events.recv())
                .await
                .expect("timed out waiting for a packet")
                .expect("connection closed")
        }

        pub async fn next_publish(&mut self) -> Publish {
            loop {
                if let Packet::Publish(p) = self.next().await {
                    return p;
                }
            }
        }

        /// Publishes until (and including) the one on `marker`, in order.
        pub async fn publishes_until(&mut self, marker: &str) -> Vec<Publish> {
            let mut got = Vec::new();
            loop {
                let p = self.next_publish().await;
                let done = p.topic == marker;
                got.push(p);
                if done {
                    return got;
                }
            }
        }
    }
}

// === MQTT 5 client ===

pub mod v5 {
    use super::*;
    pub use rumqttc::v5::mqttbytes::v5::{
        ConnectReturnCode, DisconnectReasonCode, LastWill, Packet, PubAckReason, Publish,
        PublishProperties, SubscribeReasonCode,
    };
    pub use rumqttc::v5::mqttbytes::QoS;
    pub use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};

    pub struct Client {
        pub client: AsyncClient,
        pub events: mpsc::UnboundedReceiver<Packet>,
        task: tokio::task::JoinHandle<()>,
    }

    pub fn options(addr: SocketAddr, id: &str, login: Option<(&str, &str)>) -> MqttOptions {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        if let Some((u, p)) = login {
            o.set_credentials(u, p);
        }
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Connects `id` `n` times, each connection taking over the one before
    /// and carrying the retained will `w{i}` on `topic`; then drops the
    /// last. The wills are due in the order `w0` … `w{n-1}`.
    pub async fn takeovers_with_retained_wills(
        addr: SocketAddr,
        id: &str,
        login: (&str, &str),
        topic: &str,
        n: usize,
    ) {
        let mut held = Vec::new();
        for i in 0..n {
            let mut o = options(addr, id, Some(login));
            o.set_last_will(LastWill::new(
                topic,
                format!("w{i}"),
                QoS::AtLeastOnce,
                true,
                None,
            ));
            held.push(connect_with(o).await.unwrap());
        }
        if let Some(last) = held.pop() {
            last.kill();
        }
    }

    /// alice-watch's options with a QoS 1 will of heart rate 0 on its own
    /// heart-rate topic.
    pub fn alice_watch_with_will(addr: SocketAddr, id: &str, retain: bool) -> MqttOptions {
        let mut o = options(addr, id, Some(("alice-watch", "alice-watch-secret")));
        o.set_last_will(LastWill::new(
            "pii/alice/alice-watch/heart_rate",
            r#"{"bpm":0}"#,
            QoS::AtLeastOnce,
            retain,
            None,
        ));
        o
    }

    /// Will properties with a will delay of `secs` and nothing else.
    pub fn will_delay(secs: u32) -> rumqttc::v5::mqttbytes::v5::LastWillProperties {
        rumqttc::v5::mqttbytes::v5::LastWillProperties {
            delay_interval: Some(secs),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: vec![],
        }
    }

    /// Connects `id` with `login` over a raw socket with `will`, awaits
    /// `before_disconnect`, then sends an
    /// MQTT 5 DISCONNECT with reason 0x04, "disconnect with will message",
    /// and `session_expiry` in its properties, if any. rumqttc's client has no
    /// way to send that reason, so its codec writes the packets.
    pub async fn disconnect_with_will(
        addr: SocketAddr,
        id: &str,
        login: (&str, &str),
        session_expiry: (Option<u32>, Option<u32>),
        will: LastWill,
        before_disconnect: impl std::future::Future<Output = ()>,
    ) {
        use bytes::BytesMut;
        use rumqttc::v5::mqttbytes::v5::{
            ConnectProperties, Disconnect, DisconnectProperties, DisconnectReasonCode, Packet,
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut out = BytesMut::new();
        let properties = session_expiry.0.map(|e| ConnectProperties {
            session_expiry_interval: Some(e),
            ..ConnectProperties::new()
        });
        Packet::Connect(
            rumqttc::v5::mqttbytes::v5::Connect {
                keep_alive: 30,
                client_id: id.into(),
                clean_start: true,
                properties,
            },
            Some(will),
            Some(rumqttc::v5::mqttbytes::v5::Login::new(login.0, login.1)),
        )
        .write(&mut out, None)
        .unwrap();
        s.write_all(&out).await.unwrap();
        let mut buf = BytesMut::new();
        let connack = loop {
            if let Ok(p) = Packet::read(&mut buf, None) {
                break p;
            }
            assert_ne!(
                s.read_buf(&mut buf).await.unwrap(),
                0,
                "closed before CONNACK"
            );
        };
        assert!(
            matches!(connack, Packet::ConnAck(ref a) if a.code == ConnectReturnCode::Success),
            "{connack:?}"
        );
        before_disconnect.await;
        out.clear();
        Packet::Disconnect(Disconnect {
            reason_code: DisconnectReasonCode::DisconnectWithWillMessage,
            properties: session_expiry.1.map(|e| DisconnectProperties {
                session_expiry_interval: Some(e),
                reason_string: None,
                user_properties: vec![],
                server_reference: None,
            }),
        })
        .write(&mut out, None)
        .unwrap();
        s.write_all(&out).await.unwrap();
        // The server closes the connection after a DISCONNECT.
        while s.read_buf(&mut buf).await.is_ok_and(|n| n > 0) {}
    }

    pub async fn connect_with(o: MqttOptions) -> Result<Client, String> {
        let (client, mut el) = AsyncClient::new(o, 100);
        let (tx, events) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(p)) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    // rumqttc turns a server's DISCONNECT into an error;
                    // tests want to see its reason code.
                    Err(ConnectionError::MqttState(
                        rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
                    )) => {
                        let _ = tx.send(Packet::Disconnect(
                            rumqttc::v5::mqttbytes::v5::Disconnect::new(reason_code),
                        ));
                        return;
                    }
                    Err(e) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Err(format!("{e:?}")));
                        }
                        return;
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(Client {
                client,
                events,
                task,
            }),
            Ok(Ok(Err(e))) => Err(e),
            _ => Err("no CONNACK".into()),
        }
    }

    pub async fn connect(addr: SocketAddr, id: &str, user: &str, pass: &str) -> Client {
        connect_with(options(addr, id, Some((user, pass))))
            .await
            .unwrap_or_else(|e| panic!("{user} could not connect: {e}"))
    }

    impl Client {
        /// Drops the connection without DISCONNECT, as a crashed device would.
        pub fn kill(self) {
            self.task.abort();
        }

        /// Sends DISCONNECT and waits for the connection to close.
        pub async fn disconnect(mut self) {
            let _ = self.client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while self.events.recv().await.is_some() {}
            })
            .await;
        }

        pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
            self.client.subscribe(filter, qos).await.unwrap();
            loop {
                if let Packet::SubAck(a) = self.next().await {
                    return a.return_codes;
                }
            }
        }

        pub async fn next(&mut self) -> Packet {
            tokio::time::timeout(Duration::from_secs(10), self.events.recv())
                .await
                .expect("timed out waiting for a packet")
                .expect("connection closed")
        }

        pub async fn next_publish(&mut self) -> Publish {
            loop {
                if let Packet::Publish(p) = self.next().await {
                    return p;
                }
            }
        }

        pub async fn publishes_until(&mut self, marker: &str) -> Vec<Publish> {
            let mut got = Vec::new();
            loop {
                let p = self.next_publish().await;
                let done = p.topic == marker.as_bytes();
                got.push(p);
                if done {
                    return got;
                }
            }
        }

        /// Publishes at QoS 1 and returns the PUBACK's reason.
        pub async fn publish_acked(&mut self, topic: &str, payload: &[u8]) -> PubAckReason {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
                .await
                .unwrap();
            loop {
                if let Packet::PubAck(a) = self.next().await {
                    return a.reason;
                }
            }
        }
    }
}

/// Asserts that `t` is an RFC 3339 time with the offset Paris had at that
/// moment (the demo's alice and the test users live there).
pub fn assert_paris_time(t: &serde_json::Value) {
    use chrono::{Offset, TimeZone};
    let text = t.as_str().unwrap_or_else(|| panic!("not a time: {t}"));
    let at = chrono::DateTime::parse_from_rfc3339(text).expect("RFC 3339");
    let paris: chrono_tz::Tz = "Europe/Paris".parse().unwrap();
    let expected = paris.offset_from_utc_datetime(&at.naive_utc()).fix();
    assert_eq!(*at.offset(), expected, "{text} is not Paris time");
}

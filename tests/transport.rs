//! End to end: MQTT over TLS with client-certificate login, and consentry in
//! front of Mosquitto as its upstream broker.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{free_port, v4, v5, Server, Setup, DEMO_DIRECTORY, MARKER_ACL};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_rustls::rustls;

const HR: &str = "pii/alice/alice-watch/heart_rate";

struct Pki {
    ca_pem: String,
    server_cert: String,
    server_key: String,
    device_cert_der: Vec<u8>,
    device_cert_pem: String,
    device_key_pem: String,
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate for a
/// device, all generated now.
fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec![
        "127.0.0.1".to_string(),
        "::1".to_string(),
        "localhost".to_string(),
    ])
    .unwrap()
    .signed_by(&server_key, &ca)
    .unwrap();
    let device_key = KeyPair::generate().unwrap();
    let device_cert = CertificateParams::new(vec!["alice-watch".to_string()])
        .unwrap()
        .signed_by(&device_key, &ca)
        .unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        device_cert_der: device_cert.der().to_vec(),
        device_cert_pem: device_cert.pem(),
        device_key_pem: device_key.serialize_pem(),
    }
}

/// Writes the CA and the server's certificate and key into `dir`; returns
/// their paths.
fn pki_files(pki: &Pki, dir: &std::path::Path) -> (String, String, String) {
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    (
        write("ca.pem", &pki.ca_pem),
        write("server.pem", &pki.server_cert),
        write("server.key", &pki.server_key),
    )
}

fn tls_client(pki: &Pki, with_client_cert: bool) -> rumqttc::TlsConfiguration {
    rumqttc::TlsConfiguration::Rustls(rustls_client(pki, with_client_cert))
}

/// A client trusting the test CA, with the device's certificate if asked.
fn rustls_client(pki: &Pki, with_client_cert: bool) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = if with_client_cert {
        builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(pki.device_cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(pki.device_key_pem.as_bytes()).unwrap(),
            )
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    Arc::new(config)
}

#[tokio::test]
async fn tls_with_passwords_and_client_certificates() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki_files(&pki, dir.path());
    let fingerprint = hex::encode(Sha256::digest(&pki.device_cert_der));
    let device = "id = \"alice-watch\"\nuser = \"alice\"\n";
    assert!(DEMO_DIRECTORY.contains(device));
    let directory = DEMO_DIRECTORY.replacen(
        device,
        &format!("{device}cert_sha256 = \"{fingerprint}\"\n"),
        1,
    );
    let server = Server::start(Setup {
        directory: Some(directory),
        extra: format!(
            "{MARKER_ACL}\n[server.tls]\nlisten = \"127.0.0.1:0\"\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {ca:?}\n"
        ),
        ..Default::default()
    });
    let tls_addr = server.mqtts.expect("TLS listener announced");

    // A provider logs in with its password over TLS.
    let mut o = v4::options(tls_addr, "fit-tls", Some(("fitcoach", "fitcoach-secret")));
    o.set_transport(rumqttc::Transport::tls_with_config(tls_client(&pki, false)));
    let mut fit = v4::connect_with(o).await.expect("provider over TLS");
    fit.subscribe("pii/#", v4::QoS::AtLeastOnce).await;

    // The device logs in by certificate alone.
    let mut o = v4::options(tls_addr, "watch-tls", None);
    o.set_transport(rumqttc::Transport::tls_with_config(tls_client(&pki, true)));
    let alice = v4::connect_with(o)
        .await
        .expect("device by client certificate");
    alice
        .client
        .publish(HR, v4::QoS::AtLeastOnce, false, "{\"bpm\":64}")
        .await
        .unwrap();
    let p = fit.next_publish().await;
    assert_eq!(p.topic, HR);
    assert_eq!(
        serde_json::from_slice::<Value>(&p.payload).unwrap(),
        json!({"bpm": 64})
    );

    // The certificate identifies alice's watch: it cannot speak for bob.
    alice
        .client
        .publish(
            "pii/bob/bob-phone/heart_rate",
            v4::QoS::AtMostOnce,
            false,
            "{\"bpm\":1}",
        )
        .await
        .unwrap();
    // Without a certificate or password the TLS listener refuses too.
    let mut o = v4::options(tls_addr, "nobody-tls", None);
    o.set_transport(rumqttc::Transport::tls_with_config(tls_client(&pki, false)));
    assert!(v4::connect_with(o)
        .await
        .is_err_and(|e| e.contains("NotAuthorized")));
    // Plain MQTT to the TLS port does not get in.
    assert!(v4::connect_with(v4::options(
        tls_addr,
        "plain",
        Some(("fitcoach", "fitcoach-secret"))
    ))
    .await
    .is_err());
    assert_eq!(
        server.metric(
            "consentry_publishes_total",
            &[("result", "dropped"), ("reason", "misattributed")]
        ),
        1.0
    );
}

/// With the plain listener off (`server.listen = ""`), MQTT reaches
/// consentry over TLS only (X.1363 9.1.1: PII encrypted in transit).
#[tokio::test]
async fn the_plain_listener_can_be_turned_off() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = pki_files(&pki, dir.path());
    let server = Server::start(Setup {
        replace: vec![("listen = \"127.0.0.1:1883\"".into(), "listen = \"\"".into())],
        config_listen: true,
        extra: format!(
            "{MARKER_ACL}\n[server.tls]\nlisten = \"127.0.0.1:0\"\ncert = {cert:?}\nkey = {key:?}\n"
        ),
        ..Default::default()
    });
    assert_eq!(server.mqtt.port(), 0, "a plain MQTT listener was announced");
    assert!(server.log().contains("mqtt_addr=None"), "{}", server.log());
    let mut o = v4::options(
        server.mqtts.expect("TLS listener announced"),
        "fit-tls",
        Some(("fitcoach", "fitcoach-secret")),
    );
    o.set_transport(rumqttc::Transport::tls_with_config(tls_client(&pki, false)));
    let mut fit = v4::connect_with(o).await.expect("provider over TLS");
    fit.subscribe("public/#", v4::QoS::AtLeastOnce).await;
}

/// A server whose API speaks HTTPS with a certificate from `pki`, and an
/// agent that trusts it.
fn https_api(pki: &Pki, dir: &std::path::Path) -> (Server, ureq::Agent) {
    let (_, cert, key) = pki_files(pki, dir);
    let server = Server::start(Setup {
        extra: format!("\n[api.tls]\ncert = {cert:?}\nkey = {key:?}\n"),
        ..Default::default()
    });
    let agent = ureq::AgentBuilder::new()
        .tls_config(rustls_client(pki, false))
        .build();
    (server, agent)
}

fn https_providers(agent: &ureq::Agent, api: SocketAddr) -> ureq::Response {
    agent
        .get(&format!("https://localhost:{}/v1/providers", api.port()))
        .call()
        .expect("HTTPS request")
}

/// With `[api.tls]` the API speaks HTTPS, and only HTTPS: logins, tokens
/// and receipts are personal data in transit (X.1363 9.1.1).
#[tokio::test]
async fn the_api_over_https_only() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (server, agent) = https_api(&pki, dir.path());
    let api = server.api.expect("API announced");
    let resp = https_providers(&agent, api);
    assert_eq!(resp.status(), 200);
    assert!(resp.into_string().unwrap().contains("fitcoach"));
    // A login over HTTPS, as users make them.
    let login = serde_json::json!({
        "user": "alice",
        "password": "alice-api-secret",
        "totp": common::totp_now("CNFOSFDCDDJIUQAT6P2EOM7JSUQFFACA", "alice"),
    });
    let resp = agent
        .post(&format!("https://localhost:{}/v1/sessions", api.port()))
        .set("content-type", "application/json")
        .send_string(&login.to_string())
        .expect("login over HTTPS");
    assert_eq!(resp.status(), 201);
    // Plain HTTP to the same port gets no answer.
    let plain = ureq::get(&format!("http://{api}/v1/providers"))
        .timeout(Duration::from_secs(15))
        .call();
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
}

/// Silent sockets to the HTTPS API hold a handshake each for up to 10 s;
/// past 256 under way new ones are closed at once, so they cannot take the
/// process's file descriptors. The API answers once they are gone.
#[tokio::test]
async fn the_https_api_bounds_handshakes_under_way() {
    use tokio::io::AsyncReadExt;
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (server, agent) = https_api(&pki, dir.path());
    let api = server.api.expect("API announced");
    let mut silent = Vec::new();
    for _ in 0..256 {
        silent.push(tokio::net::TcpStream::connect(api).await.unwrap());
    }
    // Past the bound: closed without waiting for the 10 s handshake timeout.
    let mut over = tokio::net::TcpStream::connect(api).await.unwrap();
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), over.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "a handshake past the bound was kept: {closed:?}"
    );
    drop(silent);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(https_providers(&agent, api).status(), 200);
}

struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mosquitto() -> Mosquitto {
    mosquitto_at("127.0.0.1", "")
}

/// Mosquitto listening on `host`, with `listener_conf` added to its one
/// listener's settings.
fn mosquitto_at(host: &str, listener_conf: &str) -> Mosquitto {
    mosquitto_on(host, free_port(), listener_conf)
}

fn mosquitto_on(host: &str, port: u16, listener_conf: &str) -> Mosquitto {
    let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("mosquitto is installed (tests/run.sh installs it)");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} {host}\n{listener_conf}allow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = SocketAddr::new(host.parse().unwrap(), port);
    // Owned from here on, so Drop reaps it on every path, panics included.
    let m = Mosquitto {
        child,
        addr,
        _dir: dir,
    };
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return m;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("mosquitto did not start");
}

/// `mqtts://`: personal data leaves consentry for the broker encrypted,
/// and only to a broker whose certificate chains to `broker.ca`.
#[tokio::test]
async fn in_front_of_mosquitto_over_tls() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki_files(&pki, dir.path());
    let conf = format!("cafile {ca}\ncertfile {cert}\nkeyfile {key}\n");
    // IPv6 too: a URL writes its host in brackets, a TLS name does not.
    for host in ["127.0.0.1", "::1"] {
        if host == "::1" && std::net::TcpListener::bind("[::1]:0").is_err() {
            eprintln!("this machine has no IPv6 loopback: the ::1 case is skipped");
            continue;
        }
        let m = mosquitto_at(host, &conf);
        let server = Server::start(Setup {
            extra: MARKER_ACL.into(),
            upstream: Some(format!("mqtts://{}", m.addr)),
            replace: vec![("# ca = \"broker-ca.pem\"".into(), format!("ca = {ca:?}"))],
            ..Default::default()
        });
        let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
        fit.subscribe("pii/#", v5::QoS::AtLeastOnce).await;
        fit.subscribe("consentry/notices/fitcoach", v5::QoS::AtLeastOnce)
            .await;
        let mut alice = v5::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
        assert_eq!(
            alice.publish_acked(HR, br#"{"bpm":72}"#).await,
            v5::PubAckReason::Success
        );
        let p = fit.next_publish().await;
        assert_eq!(p.topic, HR.as_bytes());
        assert_eq!(
            serde_json::from_slice::<Value>(&p.payload).unwrap(),
            json!({"bpm": 72})
        );
        // consentry's notice client reaches the broker over TLS as well:
        // alice disputes that delivery, and fitcoach hears of it.
        let token = common::demo_alice_token(&server);
        let (_, history) = common::http(&server, "GET", "/v1/me/history", Some(&token), &[], None);
        let history = common::json_of(&history);
        let seq = history["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == "share")
            .and_then(|e| e["seq"].as_u64())
            .unwrap_or_else(|| panic!("no share in {history}"));
        let (s, d) = common::http(
            &server,
            "POST",
            "/v1/me/disputes",
            Some(&token),
            &[],
            Some(json!({"seq": seq, "reason": "not me"})),
        );
        assert_eq!(s, 201, "{d}");
        let notice = fit.next_publish().await;
        assert_eq!(notice.topic, &b"consentry/notices/fitcoach"[..], "{host}");
    }

    // A broker whose certificate consentry cannot verify gets nothing: the
    // session is refused rather than relayed in the clear or unverified.
    let other_dir = tempfile::tempdir().unwrap();
    let other = pki_files(&self::pki(), other_dir.path()).0;
    let m = mosquitto_at("127.0.0.1", &conf);
    let wrong = Server::start(Setup {
        extra: MARKER_ACL.into(),
        upstream: Some(format!("mqtts://{}", m.addr)),
        replace: vec![("# ca = \"broker-ca.pem\"".into(), format!("ca = {other:?}"))],
        ..Default::default()
    });
    // A persistent session opens its broker connection at CONNECT.
    let mut o = v5::options(wrong.mqtt, "fit-p", Some(("fitcoach", "fitcoach-secret")));
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(60));
    let refused = v5::connect_with(o).await;
    assert!(refused.is_err(), "connected through an unverified broker");
    assert!(
        wrong.log().contains("invalid peer certificate"),
        "{}",
        wrong.log()
    );
}

fn in_front_of(m: &Mosquitto) -> Server {
    Server::start(Setup {
        extra: MARKER_ACL.into(),
        upstream: Some(format!("mqtt://{}", m.addr)),
        ..Default::default()
    })
}

#[tokio::test]
async fn in_front_of_mosquitto_the_demo_holds() {
    let m = mosquitto();
    let server = in_front_of(&m);
    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    let mut ins = v5::connect(server.mqtt, "ins", "insureco", "insureco-secret").await;
    for c in [&mut fit, &mut ins] {
        c.subscribe("pii/#", v5::QoS::AtLeastOnce).await;
        c.subscribe("public/#", v5::QoS::AtLeastOnce).await;
    }
    let mut alice = v5::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    assert_eq!(
        alice.publish_acked(HR, br#"{"bpm":72,"name":"x"}"#).await,
        v5::PubAckReason::Success
    );
    alice
        .publish_acked(
            "pii/alice/alice-watch/location",
            br#"{"lat":48.85661,"lon":2.35222}"#,
        )
        .await;
    assert_eq!(
        alice
            .publish_acked("pii/bob/bob-phone/heart_rate", br#"{"bpm":1}"#)
            .await,
        v5::PubAckReason::NotAuthorized
    );
    alice.publish_acked("public/marker", b"m").await;
    let got = fit.publishes_until("public/marker").await;
    assert_eq!(got.len(), 3);
    assert_eq!(
        serde_json::from_slice::<Value>(&got[0].payload).unwrap(),
        json!({"bpm": 72})
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&got[1].payload).unwrap(),
        json!({"lat": 48.86, "lon": 2.35})
    );
    assert_eq!(ins.publishes_until("public/marker").await.len(), 1);
}

#[tokio::test]
async fn in_front_of_mosquitto_queued_messages_stop_after_revocation() {
    let m = mosquitto();
    let server = in_front_of(&m);
    let fit_opts = || {
        let mut o = v5::options(server.mqtt, "fit-p", Some(("fitcoach", "fitcoach-secret")));
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(3600));
        o
    };
    let mut fit = v5::connect_with(fit_opts()).await.unwrap();
    fit.subscribe("pii/+/+/heart_rate", v5::QoS::AtLeastOnce)
        .await;
    fit.subscribe("public/#", v5::QoS::AtLeastOnce).await;
    fit.disconnect().await;

    let mut alice = v5::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    alice.publish_acked(HR, br#"{"bpm":90}"#).await;
    let mut fit = v5::connect_with(fit_opts()).await.unwrap();
    let p = fit.next_publish().await;
    assert_eq!(
        serde_json::from_slice::<Value>(&p.payload).unwrap(),
        json!({"bpm": 90})
    );
    fit.disconnect().await;

    alice.publish_acked(HR, br#"{"bpm":91}"#).await;
    let grant = "[[preferences.share]]\nprovider = \"fitcoach\"\npurpose = \"coaching\"\nkind = \"heart_rate\"\n";
    server.reload(&DEMO_DIRECTORY.replacen(grant, "", 1));
    let mut fit = v5::connect_with(fit_opts()).await.unwrap();
    alice.publish_acked("public/marker", b"m").await;
    let got = fit.publishes_until("public/marker").await;
    assert_eq!(
        got.len(),
        1,
        "queued message delivered after revocation: {got:?}"
    );
}

#[tokio::test]
async fn in_front_of_mosquitto_open_topics_keep_mqtt5_features() {
    let m = mosquitto();
    let server = in_front_of(&m);
    let mut sub = v5::connect(server.mqtt, "sub", "fitcoach", "fitcoach-secret").await;
    sub.subscribe("$share/g/public/#", v5::QoS::AtLeastOnce)
        .await;
    let publ = v5::connect(server.mqtt, "pub", "alice-watch", "alice-watch-secret").await;
    let props = v5::PublishProperties {
        user_properties: vec![("trace".into(), "abc".into())],
        message_expiry_interval: Some(60),
        content_type: Some("text/plain".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"corr")),
        response_topic: Some("public/reply".into()),
        ..Default::default()
    };
    publ.client
        .publish_with_properties(
            "public/x",
            v5::QoS::AtLeastOnce,
            false,
            &b"hello"[..],
            props,
        )
        .await
        .unwrap();
    let p = sub.next_publish().await;
    let got = p.properties.expect("properties delivered");
    assert_eq!(
        got.user_properties,
        vec![("trace".to_string(), "abc".to_string())]
    );
    assert_eq!(got.content_type.as_deref(), Some("text/plain"));
    assert_eq!(got.response_topic.as_deref(), Some("public/reply"));
    assert_eq!(got.correlation_data.as_deref(), Some(&b"corr"[..]));
    assert!(got.message_expiry_interval.is_some_and(|e| e <= 60));
}

#[tokio::test]
async fn in_front_of_mosquitto_subscription_options_and_retained_pass_through() {
    use rumqttc::v5::mqttbytes::v5::Filter;
    let m = mosquitto();
    let server = in_front_of(&m);
    // Retained on an open topic, then a late subscriber gets it.
    let mut publ = v5::connect(server.mqtt, "pub", "alice-watch", "alice-watch-secret").await;
    publ.client
        .publish("public/state", v5::QoS::AtLeastOnce, true, &b"on"[..])
        .await
        .unwrap();
    loop {
        if let v5::Packet::PubAck(_) = publ.next().await {
            break;
        }
    }
    let mut late = v5::connect(server.mqtt, "late", "fitcoach", "fitcoach-secret").await;
    late.subscribe("public/state", v5::QoS::AtLeastOnce).await;
    let p = late.next_publish().await;
    assert!(p.retain);
    assert_eq!(&p.payload[..], b"on");

    // No Local (MQTT 5 subscription option): a client does not get its own messages.
    let mut me = v5::connect(server.mqtt, "me", "insureco", "insureco-secret").await;
    let mut f = Filter::new("public/chat", v5::QoS::AtMostOnce);
    f.nolocal = true;
    me.client.subscribe_many(vec![f]).await.unwrap();
    loop {
        if let v5::Packet::SubAck(_) = me.next().await {
            break;
        }
    }
    // "mine" is acknowledged by the broker, so queued to subscribers, before
    // "theirs" is published: were No Local lost, "mine" would arrive first.
    me.client
        .publish("public/chat", v5::QoS::AtLeastOnce, false, &b"mine"[..])
        .await
        .unwrap();
    loop {
        match me.next().await {
            v5::Packet::PubAck(_) => break,
            v5::Packet::Publish(_) => panic!("own message delivered despite No Local"),
            _ => {}
        }
    }
    publ.client
        .publish("public/chat", v5::QoS::AtMostOnce, false, &b"theirs"[..])
        .await
        .unwrap();
    let p = me.next_publish().await;
    assert_eq!(
        &p.payload[..],
        b"theirs",
        "own message delivered despite No Local"
    );
}

#[tokio::test]
async fn in_front_of_mosquitto_will_delay_is_kept() {
    let m = mosquitto();
    let server = in_front_of(&m);
    let mut watcher = v5::connect(server.mqtt, "watch", "fitcoach", "fitcoach-secret").await;
    watcher.subscribe("public/#", v5::QoS::AtMostOnce).await;
    let mut o = v5::options(
        server.mqtt,
        "dying",
        Some(("bob-phone", "bob-phone-secret")),
    );
    o.set_clean_start(true);
    o.set_session_expiry_interval(Some(60));
    o.set_last_will(v5::LastWill::new(
        "public/will",
        "gone",
        v5::QoS::AtMostOnce,
        false,
        Some(v5::will_delay(3)),
    ));
    let dying = v5::connect_with(o).await.unwrap();
    dying.kill();
    // Published after the crash but well inside the 3 s delay: it comes first.
    let publ = v5::connect(server.mqtt, "pub", "alice-watch", "alice-watch-secret").await;
    publ.client
        .publish("public/marker", v5::QoS::AtMostOnce, false, &b"m"[..])
        .await
        .unwrap();
    assert_eq!(watcher.next_publish().await.topic, &b"public/marker"[..]);
    // And then the will, once its delay has passed.
    let will = tokio::time::timeout(Duration::from_secs(8), watcher.next_publish())
        .await
        .expect("the delayed will arrives");
    assert_eq!(will.topic, &b"public/will"[..]);
}

/// In front of an external broker the broker never holds a will, so if
/// consentry dies no will goes out undecided. (The broker used to hold each
/// will from CONNECT on, and published them all when consentry's
/// connections dropped.) The control: with consentry alive, the will goes.
#[tokio::test]
async fn in_front_of_mosquitto_a_dead_consentry_leaves_no_will() {
    let m = mosquitto();
    let mut server = in_front_of(&m);
    // Straight at the broker: whatever it publishes, decided or not.
    let mut raw = v5::connect_with(v5::options(m.addr, "raw", None))
        .await
        .unwrap();
    raw.subscribe("pii/#", v5::QoS::AtLeastOnce).await;
    let bpm = |p: &v5::Publish| serde_json::from_slice::<Value>(&p.payload).unwrap()["bpm"].clone();
    let device = |id: &str| v5::alice_watch_with_will(server.mqtt, id, false);

    let mut alive = v5::connect_with(device("w1")).await.unwrap();
    alive.publish_acked(HR, br#"{"bpm":70}"#).await;
    assert_eq!(bpm(&raw.next_publish().await), json!(70));
    alive.kill();
    assert_eq!(
        bpm(&raw.next_publish().await),
        json!(0),
        "control: the will"
    );

    let mut orphan = v5::connect_with(device("w2")).await.unwrap();
    orphan.publish_acked(HR, br#"{"bpm":71}"#).await;
    assert_eq!(bpm(&raw.next_publish().await), json!(71));
    server.kill9();
    // The broker sees consentry's connections close at once; a will it held
    // would follow within milliseconds.
    let late = tokio::time::timeout(Duration::from_secs(3), raw.next_publish()).await;
    assert!(late.is_err(), "published after consentry died: {late:?}");
    drop(orphan);
}

/// A will that falls due while the broker is down (restarting, say) is
/// not lost: consentry tries again, deciding it again each time, and it
/// goes once the broker is back.
#[tokio::test]
async fn in_front_of_mosquitto_a_will_waits_for_the_broker_to_come_back() {
    let m = mosquitto();
    let port = m.addr.port();
    let server = in_front_of(&m);
    // Retained, so a subscriber that comes after the will still sees it.
    let o = v5::alice_watch_with_will(server.mqtt, "w", true);
    // A clean session that has sent nothing has no broker connection to
    // lose, so it outlives the broker.
    let alice = v5::connect_with(o).await.unwrap();
    drop(m);
    alice.kill();
    let retrying = [("result", "dropped"), ("reason", "broker_unavailable")];
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(server
        .log()
        .contains("will not published yet; trying again"));
    let m = mosquitto_on("127.0.0.1", port, "");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let will = loop {
        let mut raw = v5::connect_with(v5::options(m.addr, "raw", None))
            .await
            .unwrap();
        raw.subscribe(HR, v5::QoS::AtLeastOnce).await;
        if let Ok(p) = tokio::time::timeout(Duration::from_secs(2), raw.next_publish()).await {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "the will never came");
    };
    assert_eq!(
        serde_json::from_slice::<Value>(&will.payload).unwrap(),
        json!({"bpm": 0})
    );
    assert_eq!(server.metric("consentry_publishes_total", &retrying), 0.0);
}

/// The wills of one client id reach the broker in the order they fell
/// due, so the last one is the retained value (a will's connection takes
/// longer to reach Mosquitto than the in-memory link, which gives a race
/// more room).
#[tokio::test]
async fn in_front_of_mosquitto_wills_keep_their_order() {
    let m = mosquitto();
    let server = in_front_of(&m);
    for round in 0..5 {
        let topic = format!("public/state/{round}");
        let mut raw = v5::connect_with(v5::options(m.addr, "raw", None))
            .await
            .unwrap();
        raw.subscribe(&topic, v5::QoS::AtLeastOnce).await;
        let login = ("bob-phone", "bob-phone-secret");
        v5::takeovers_with_retained_wills(server.mqtt, "in-turn", login, &topic, 10).await;
        let mut got = Vec::new();
        for _ in 0..10 {
            got.push(String::from_utf8(raw.next_publish().await.payload.to_vec()).unwrap());
        }
        let want: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
        assert_eq!(got, want, "round {round}");
        raw.disconnect().await;
    }
}

/// A broker that refuses a will (its ACL, say) is not asked again: the
/// will is dropped and counted, not retried for ten minutes.
#[tokio::test]
async fn in_front_of_mosquitto_a_will_the_broker_refuses_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "topic readwrite pii/#\ntopic readwrite consentry/#\n").unwrap();
    let m = mosquitto_at("127.0.0.1", &format!("acl_file {}\n", acl.display()));
    let server = in_front_of(&m);
    let mut o = v5::options(server.mqtt, "w", Some(("bob-phone", "bob-phone-secret")));
    o.set_last_will(v5::LastWill::new(
        "public/closed",
        "gone",
        v5::QoS::AtLeastOnce,
        false,
        None,
    ));
    v5::connect_with(o).await.unwrap().kill();
    let refused = [("result", "dropped"), ("reason", "broker_refused")];
    server
        .wait_for_metric("consentry_publishes_total", &refused, 1.0)
        .await;
    assert!(server.log().contains("will refused by the broker"));
    assert!(!server.log().contains("trying again"));
}

/// The broker's own refusal of a publish (its ACL) reaches the device as the
/// broker gave it, and the operator sees it: counted as dropped, reason
/// `broker_refused`, and logged, not only counted as forwarded.
#[tokio::test]
async fn a_publish_the_broker_refuses_is_relayed_counted_and_logged() {
    let acl_dir = tempfile::tempdir().unwrap();
    let acl = acl_dir.path().join("acl");
    std::fs::write(&acl, "topic read #\ntopic write pii/#\n").unwrap();
    let m = mosquitto_at("127.0.0.1", &format!("acl_file {}\n", acl.display()));
    let server = in_front_of(&m);
    let mut alice = v5::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    assert_eq!(
        alice.publish_acked("public/marker", b"m").await,
        v5::PubAckReason::NotAuthorized
    );
    let allowed = alice.publish_acked(HR, br#"{"bpm":72}"#).await;
    assert!(
        matches!(
            allowed,
            v5::PubAckReason::Success | v5::PubAckReason::NoMatchingSubscribers
        ),
        "{allowed:?}"
    );
    let refused = [("result", "dropped"), ("reason", "broker_refused")];
    server
        .wait_for_metric("consentry_publishes_total", &refused, 1.0)
        .await;
    assert!(
        server.log().contains("the broker refused a publish"),
        "{}",
        server.log()
    );
}

/// A broker that refuses consentry's own login refuses consentry, not the
/// client, whom consentry authenticated: a persistent session gets CONNACK
/// "Server unavailable" (0x88), not "Bad user name or password", and it is
/// counted as an error, not as a refused client.
#[tokio::test]
async fn a_broker_refusing_consentrys_login_is_server_unavailable_to_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwd");
    let made = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwords)
        .args(["consentry", &format!("right-{}", rand::random::<u64>())])
        .status()
        .unwrap();
    assert!(made.success());
    let m = mosquitto_at(
        "127.0.0.1",
        &format!("password_file {}\n", passwords.display()),
    );
    let server = Server::start(Setup {
        extra: MARKER_ACL.into(),
        upstream: Some(format!("mqtt://{}", m.addr)),
        replace: vec![
            (
                "# username = \"consentry\"".into(),
                "username = \"consentry\"".into(),
            ),
            ("# password = \"...\"".into(), "password = \"wrong\"".into()),
        ],
        ..Default::default()
    });
    let mut o = v5::options(server.mqtt, "fit", Some(("fitcoach", "fitcoach-secret")));
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(60));
    let refused = v5::connect_with(o).await;
    assert!(
        matches!(&refused, Err(e) if e.contains("ServerUnavailable")),
        "{:?}",
        refused.err()
    );
    // Counted once the session has ended, which may be just after the
    // client read its CONNACK.
    let unavailable = [("role", "provider"), ("result", "unavailable")];
    server
        .wait_for_metric("consentry_connections_total", &unavailable, 1.0)
        .await;
    assert!(server.log().contains("upstream refused consentry's login"));
}

/// consentry authenticates clients itself, by password or certificate, and
/// speaks no enhanced authentication: an Authentication Method in a
/// CONNECT is not the broker's to judge. Passed on, Mosquitto refused it
/// (0x8C), so a persistent session got CONNACK 0x88 with a log blaming
/// consentry's own broker login, and a clean one lost its session at its
/// first publish, where the embedded broker lets both in.
#[tokio::test]
async fn in_front_of_mosquitto_an_authentication_method_is_not_passed_on() {
    let m = mosquitto();
    let server = in_front_of(&m);
    for persistent in [true, false] {
        let mut o = v5::options(
            server.mqtt,
            "am",
            Some(("alice-watch", "alice-watch-secret")),
        );
        o.set_authentication_method(Some("SCRAM-SHA-1".into()));
        if persistent {
            o.set_clean_start(false);
            o.set_session_expiry_interval(Some(60));
        }
        let mut c = v5::connect_with(o)
            .await
            .unwrap_or_else(|e| panic!("persistent {persistent}: {e}"));
        let reason = c.publish_acked("public/x", b"x").await;
        assert!(
            matches!(
                reason,
                v5::PubAckReason::Success | v5::PubAckReason::NoMatchingSubscribers
            ),
            "persistent {persistent}: {reason:?}"
        );
        c.disconnect().await;
    }
}

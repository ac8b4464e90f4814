//! End to end over HTTP and MQTT: a user reads their share history, exports
//! it, disputes a record (the provider is notified), and gets consent
//! receipts that validate against the Kantara schemas and verify with an
//! independent JWS implementation.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{json_of, totp_now, v5, Server, Setup, MARKER_ACL};
use serde_json::{json, Value};

const OPERATOR_KEY: &str = "history-test-operator-key";

fn http(
    server: &Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    let operator: &[(&str, &str)] = if path.starts_with("/v1/operator") {
        &[("x-operator-key", OPERATOR_KEY)]
    } else {
        &[]
    };
    common::http(server, method, path, token, operator, body)
}

/// Registers and logs in; returns the session token.
fn user(server: &Server, id: &str) -> String {
    let (s, reg) = http(
        server,
        "POST",
        "/v1/users",
        None,
        Some(json!({"id": id, "password": "correct horse battery", "time_zone": "Europe/Paris"})),
    );
    assert_eq!(s, 201, "{reg}");
    let code = totp_now(json_of(&reg)["totp_secret"].as_str().unwrap(), id);
    let (s, sess) = http(
        server,
        "POST",
        "/v1/sessions",
        None,
        Some(json!({"user": id, "password": "correct horse battery", "totp": code})),
    );
    assert_eq!(s, 201, "{sess}");
    json_of(&sess)["token"].as_str().unwrap().to_string()
}

fn server() -> Server {
    Server::start(Setup {
        extra: MARKER_ACL.into(),
        replace: vec![(
            "blocked_flush_secs = 60".into(),
            "blocked_flush_secs = 1".into(),
        )],
        env: vec![("CONSENTRY_OPERATOR_KEY".into(), OPERATOR_KEY.into())],
        ..Default::default()
    })
}

#[tokio::test]
async fn history_export_and_disputes() {
    let server = server();
    let t = user(&server, "ivan");
    let (_, dev) = http(
        &server,
        "POST",
        "/v1/me/devices",
        Some(&t),
        Some(json!({"id": "ivan-band"})),
    );
    let dev = json_of(&dev);
    let (s, _) = http(
        &server,
        "PUT",
        "/v1/me/preferences",
        Some(&t),
        Some(json!({"version": 0,
        "collect": [{"kind": "heart_rate"}],
        "share": [{"provider": "fitcoach", "purpose": "coaching", "kind": "heart_rate"}]})),
    );
    assert_eq!(s, 200);

    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("pii/+/+/heart_rate", v5::QoS::AtLeastOnce)
        .await;
    fit.subscribe("consentry/notices/fitcoach", v5::QoS::AtLeastOnce)
        .await;
    let mut ins = v5::connect(server.mqtt, "ins", "insureco", "insureco-secret").await;
    ins.subscribe("pii/+/+/heart_rate", v5::QoS::AtLeastOnce)
        .await;
    // Another provider's notices are not for insureco.
    assert_eq!(
        ins.subscribe("consentry/notices/fitcoach", v5::QoS::AtLeastOnce)
            .await,
        vec![v5::SubscribeReasonCode::NotAuthorized]
    );
    let mut band = v5::connect(
        server.mqtt,
        "b",
        "ivan-band",
        dev["mqtt_password"].as_str().unwrap(),
    )
    .await;
    for bpm in [60, 61, 62] {
        band.publish_acked(
            "pii/ivan/ivan-band/heart_rate",
            format!("{{\"bpm\":{bpm}}}").as_bytes(),
        )
        .await;
        fit.next_publish().await;
    }
    // The refused deliveries to insureco are counted within a flush interval.
    let mut page = Value::Null;
    for _ in 0..40 {
        let (_, body) = http(&server, "GET", "/v1/me/history", Some(&t), None);
        page = json_of(&body);
        if page["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "blocked")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let entries = page["entries"].as_array().unwrap();
    let shares: Vec<&Value> = entries.iter().filter(|e| e["type"] == "share").collect();
    assert_eq!(shares.len(), 3, "{page:#}");
    assert!(shares
        .iter()
        .all(|e| e["provider"] == "fitcoach" && e["kind"] == "heart_rate"));
    // Times are in the user's zone (Paris is UTC+1 in November, +2 in summer).
    let t0 = shares[0]["time"].as_str().unwrap();
    assert!(t0.ends_with("+01:00") || t0.ends_with("+02:00"), "{t0}");
    let blocked: Vec<&Value> = entries.iter().filter(|e| e["type"] == "blocked").collect();
    assert_eq!(
        blocked
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum::<u64>(),
        3
    );
    assert!(blocked
        .iter()
        .all(|b| b["provider"] == "insureco" && b["reason"] == "no_share_consent"));

    // Filters and pages.
    let (_, body) = http(
        &server,
        "GET",
        "/v1/me/history?provider=insureco",
        Some(&t),
        None,
    );
    assert!(json_of(&body)["entries"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["provider"] == "insureco"));
    let (_, p1) = http(&server, "GET", "/v1/me/history?limit=2", Some(&t), None);
    let p1 = json_of(&p1);
    assert_eq!(p1["entries"].as_array().unwrap().len(), 2);
    let after = p1["next_after"].as_u64().unwrap();
    let (_, p2) = http(
        &server,
        "GET",
        &format!("/v1/me/history?limit=2&after={after}"),
        Some(&t),
        None,
    );
    let p2 = json_of(&p2);
    assert!(p2["entries"][0]["seq"].as_u64().unwrap() > after);
    let (s, _) = http(&server, "GET", "/v1/me/history?limit=0", Some(&t), None);
    assert_eq!(s, 422);

    // Export.
    let (s, csv) = http(
        &server,
        "GET",
        "/v1/me/history/export?format=csv",
        Some(&t),
        None,
    );
    assert_eq!(s, 200);
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().starts_with("seq,type,time,provider"));
    assert_eq!(lines.filter(|l| l.contains(",share,")).count(), 3);
    let (_, all) = http(&server, "GET", "/v1/me/history/export", Some(&t), None);
    assert_eq!(json_of(&all).as_array().unwrap().len(), entries.len());

    // Someone else sees none of it.
    let other = user(&server, "judy");
    let (_, body) = http(&server, "GET", "/v1/me/history", Some(&other), None);
    assert_eq!(json_of(&body)["entries"], json!([]));

    // Redress: dispute a share; the provider hears of it.
    let seq = shares[1]["seq"].as_u64().unwrap();
    let (s, d) = http(
        &server,
        "POST",
        "/v1/me/disputes",
        Some(&other),
        Some(json!({"seq": seq, "reason": "not mine"})),
    );
    assert_eq!(s, 404, "cannot dispute another user's record: {d}");
    let (s, d) = http(
        &server,
        "POST",
        "/v1/me/disputes",
        Some(&t),
        Some(json!({"seq": seq, "reason": "I never allowed this"})),
    );
    assert_eq!(s, 201, "{d}");
    let d = json_of(&d);
    assert_eq!(d["state"], "open");
    common::assert_paris_time(&d["created_at"]);
    let notice = fit.next_publish().await;
    assert_eq!(notice.topic, &b"consentry/notices/fitcoach"[..]);
    let notice: Value = serde_json::from_slice(&notice.payload).unwrap();
    assert_eq!(notice["ledger_seq"], seq);
    assert!(
        !notice.to_string().contains("ivan"),
        "the notice names the user: {notice}"
    );

    // The operator resolves it; the user sees the outcome.
    let (s, all) = http(&server, "GET", "/v1/operator/disputes", None, None);
    assert_eq!(s, 200);
    assert_eq!(json_of(&all).as_array().unwrap().len(), 1);
    let id = d["id"].as_i64().unwrap();
    let resolve = |state: &str, resolution: &str| {
        http(
            &server,
            "POST",
            &format!("/v1/operator/disputes/{id}/resolve"),
            None,
            Some(json!({"state": state, "resolution": resolution})),
        )
    };
    let (s, r) = resolve("rejected", " ");
    assert_eq!(s, 422, "a resolution says what was decided: {r}");
    let (s, r) = resolve("upheld", "fitcoach deleted the record");
    assert_eq!(s, 200, "{r}");
    // Once: a second resolution would erase the first.
    let (s, r) = resolve("rejected", "");
    assert_eq!(s, 422, "{r}");
    let (s, r) = resolve("rejected", "changed our mind");
    assert_eq!(s, 409, "{r}");
    let (_, mine) = http(&server, "GET", "/v1/me/disputes", Some(&t), None);
    assert_eq!(json_of(&mine)[0]["state"], "upheld");
    // In the user's zone, as the history that shows the record.
    common::assert_paris_time(&json_of(&mine)[0]["created_at"]);
    common::assert_paris_time(&json_of(&mine)[0]["resolved_at"]);
    assert_eq!(
        json_of(&mine)[0]["resolution"],
        "fitcoach deleted the record"
    );
    // The operator's reads of ivan's data are in ivan's history.
    let (_, body) = http(&server, "GET", "/v1/me/history?limit=1000", Some(&t), None);
    let extracts = json_of(&body)["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "extract")
        .count();
    assert_eq!(extracts, 2);

    // A reason's limit is in characters, not bytes.
    let seq = shares[0]["seq"].as_u64().unwrap();
    let (s, d) = http(
        &server,
        "POST",
        "/v1/me/disputes",
        Some(&t),
        Some(json!({"seq": seq, "reason": "é".repeat(1500)})),
    );
    assert_eq!(s, 201, "{d}");
}

fn schema(rel: &str) -> jsonschema::Validator {
    let path = format!("{}/../shared/spec/{rel}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    jsonschema::draft4::new(&serde_json::from_str::<Value>(&text).unwrap()).unwrap()
}

#[tokio::test]
async fn receipts_validate_and_verify_independently() {
    let server = server();
    let t = user(&server, "kim");
    let (s, changed) = http(
        &server,
        "PUT",
        "/v1/me/preferences",
        Some(&t),
        Some(json!({"version": 0,
        "collect": [{"kind": "heart_rate"}, {"kind": "location"}],
        "share": [{"provider": "fitcoach", "purpose": "coaching", "kind": "heart_rate"},
                  {"provider": "fitcoach", "purpose": "coaching", "kind": "location",
                   "mask": {"lat": {"method": "generalize", "decimals": 2}}}]})),
    );
    assert_eq!(s, 200);
    let jti = json_of(&changed)["receipt"]["jti"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, list) = http(&server, "GET", "/v1/me/receipts", Some(&t), None);
    assert_eq!(json_of(&list)[0]["jti"], jti);

    let (_, stored) = http(
        &server,
        "GET",
        &format!("/v1/me/receipts/{jti}"),
        Some(&t),
        None,
    );
    let stored = json_of(&stored);
    // In the user's zone, as the list gives it.
    common::assert_paris_time(&stored["at"]);
    assert_eq!(stored["at"], json_of(&list)[0]["at"]);
    let receipt = &stored["json"];
    let v08 = schema("kantara-cr-v0.8/kantara-cr-v0.8-schema.json");
    let errors: Vec<String> = v08.iter_errors(receipt).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "v0.8: {errors:?}");
    assert_eq!(receipt["sub"], "kim");
    assert_eq!(receipt["sensitive"], true, "heart rate is Health");
    let (_, v11) = http(
        &server,
        "GET",
        &format!("/v1/me/receipts/{jti}?format=v1.1"),
        Some(&t),
        None,
    );
    let v11 = json_of(&v11);
    let s11 = schema("kantara-cr-v1.1/kantara-consent-receipt-v1_1-schema.stripped.json");
    let errors: Vec<String> = s11.iter_errors(&v11).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "v1.1: {errors:?}");

    // The JWS verifies with jsonwebtoken against the published JWKS.
    let (_, jws) = http(
        &server,
        "GET",
        &format!("/v1/me/receipts/{jti}?format=jws"),
        Some(&t),
        None,
    );
    let (_, jwks) = http(&server, "GET", "/.well-known/jwks.json", None, None);
    {
        use jsonwebtoken::{
            decode, decode_header, jwk::JwkSet, Algorithm, DecodingKey, Validation,
        };
        let set: JwkSet = serde_json::from_str(&jwks).unwrap();
        let kid = decode_header(&jws).unwrap().kid.unwrap();
        let key = DecodingKey::from_jwk(set.find(&kid).unwrap()).unwrap();
        let mut v = Validation::new(Algorithm::EdDSA);
        v.required_spec_claims.clear();
        v.validate_exp = false;
        let claims = decode::<Value>(&jws, &key, &v).unwrap().claims;
        assert_eq!(&claims, receipt);
    }

    // Mode 1, as text and HTML.
    let (_, text) = http(
        &server,
        "GET",
        &format!("/v1/me/receipts/{jti}?format=text"),
        Some(&t),
        None,
    );
    assert!(text.contains("FitCoach") && text.contains(&jti), "{text}");
    let url = format!("http://{}/v1/me/receipts/{jti}", server.api.unwrap());
    let html = ureq::get(&url)
        .set("authorization", &format!("Bearer {t}"))
        .set("accept", "text/html")
        .call()
        .unwrap();
    assert!(html.content_type().starts_with("text/html"));
    assert!(html.into_string().unwrap().contains("<"));

    // `consentry receipt verify`: passes as issued, fails when altered.
    let dir = tempfile::tempdir().unwrap();
    let (jws_path, jwks_path, bad_path) = (
        dir.path().join("r.jws"),
        dir.path().join("jwks.json"),
        dir.path().join("bad.jws"),
    );
    std::fs::write(&jws_path, &jws).unwrap();
    std::fs::write(&jwks_path, &jwks).unwrap();
    let mut parts: Vec<String> = jws.split('.').map(String::from).collect();
    let payload = String::from_utf8(base64_decode(&parts[1]))
        .unwrap()
        .replace("kim", "kit");
    parts[1] = base64_encode(payload.as_bytes());
    std::fs::write(&bad_path, parts.join(".")).unwrap();
    let run = |f: &std::path::Path| {
        Command::new(common::bin())
            .args(["receipt", "verify"])
            .arg(f)
            .arg("--jwks")
            .arg(&jwks_path)
            .output()
            .unwrap()
    };
    let ok = run(&jws_path);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = run(&bad_path);
    assert!(!bad.status.success());
    let why = String::from_utf8_lossy(&bad.stderr);
    assert!(why.to_lowercase().contains("signature"), "{why}");
    assert!(why.contains("bad.jws"), "names the receipt: {why}");
    // A bad JWKS is blamed on the JWKS, not on the receipt.
    std::fs::write(&jwks_path, "not json").unwrap();
    let out = run(&jws_path);
    assert!(!out.status.success());
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(
        why.contains(&format!("--jwks {}", jwks_path.display())) && why.contains("not a JWK set"),
        "{why}"
    );
    assert!(!why.contains("compact JWS"), "{why}");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap()
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn login(server: &Server, user: &str, password: &str, totp_secret: &str) -> String {
    let code = totp_now(totp_secret, user);
    let (s, sess) = http(
        server,
        "POST",
        "/v1/sessions",
        None,
        Some(json!({"user": user, "password": password, "totp": code})),
    );
    assert_eq!(s, 201, "{sess}");
    json_of(&sess)["token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn demo_users_read_their_own_history_through_the_api() {
    let server = server();
    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    let mut ins = v5::connect(server.mqtt, "ins", "insureco", "insureco-secret").await;
    for c in [&mut fit, &mut ins] {
        c.subscribe("pii/#", v5::QoS::AtLeastOnce).await;
    }
    let mut alice = v5::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    alice
        .publish_acked("pii/alice/alice-watch/heart_rate", br#"{"bpm":72}"#)
        .await;
    alice
        .publish_acked(
            "pii/alice/alice-watch/location",
            br#"{"lat":48.85661,"lon":2.35222}"#,
        )
        .await;
    fit.next_publish().await;
    fit.next_publish().await;

    // The demo secrets of config/demo.toml.
    let a = login(
        &server,
        "alice",
        "alice-api-secret",
        "CNFOSFDCDDJIUQAT6P2EOM7JSUQFFACA",
    );
    let b = login(
        &server,
        "bob",
        "bob-api-secret",
        "GWF4BT7TP5ZQX5NWSFRNH5MLC4TBNSBE",
    );
    let mut entries = Vec::new();
    for _ in 0..40 {
        let (_, body) = http(&server, "GET", "/v1/me/history", Some(&a), None);
        entries = json_of(&body)["entries"].as_array().unwrap().clone();
        if entries.iter().filter(|e| e["type"] == "blocked").count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let shares: Vec<&Value> = entries.iter().filter(|e| e["type"] == "share").collect();
    assert_eq!(shares.len(), 2, "{entries:#?}");
    assert_eq!(
        (shares[0]["provider"].as_str(), shares[0]["kind"].as_str()),
        (Some("fitcoach"), Some("heart_rate"))
    );
    assert_eq!(shares[0]["action"], json!({"t": "Delivered"}));
    assert_eq!(shares[1]["kind"], "location");
    assert_eq!(shares[1]["action"]["t"], "Masked");
    let blocked: Vec<(&str, &str)> = entries
        .iter()
        .filter(|e| e["type"] == "blocked")
        .map(|e| (e["provider"].as_str().unwrap(), e["kind"].as_str().unwrap()))
        .collect();
    assert!(blocked.iter().all(|(p, _)| *p == "insureco"), "{blocked:?}");
    // bob reads his own history: none of alice's records.
    let (_, body) = http(&server, "GET", "/v1/me/history", Some(&b), None);
    assert_eq!(json_of(&body)["entries"], json!([]));
    // And alice's receipts from the demo import are hers to read.
    let (_, list) = http(&server, "GET", "/v1/me/receipts", Some(&a), None);
    assert!(!json_of(&list).as_array().unwrap().is_empty());
    let (_, list) = http(&server, "GET", "/v1/me/receipts", Some(&b), None);
    let jti = json_of(&list)[0]["jti"].as_str().unwrap().to_string();
    let (s, _) = http(
        &server,
        "GET",
        &format!("/v1/me/receipts/{jti}"),
        Some(&a),
        None,
    );
    assert_eq!(s, 404, "alice can read bob's receipt");
}

/// `server.clock_offset_secs` shifts the clock decisions are taken by, for
/// tests of windows; it stamped share records too, and a record dated a
/// year back was then purged as past retention (outside review, seventeenth
/// session). Records keep the real time.
#[tokio::test]
async fn share_records_keep_the_real_time_under_a_clock_offset() {
    let year_back = -366 * 24 * 3600;
    let server = Server::start(Setup {
        extra: MARKER_ACL.into(),
        replace: vec![(
            "clock_offset_secs = 0".into(),
            format!("clock_offset_secs = {year_back}"),
        )],
        ..Default::default()
    });
    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("pii/#", v5::QoS::AtLeastOnce).await;
    let mut alice = v5::connect(server.mqtt, "w", "alice-watch", "alice-watch-secret").await;
    let before = chrono::Utc::now();
    alice
        .publish_acked("pii/alice/alice-watch/heart_rate", br#"{"bpm":72}"#)
        .await;
    fit.next_publish().await;
    let a = login(
        &server,
        "alice",
        "alice-api-secret",
        "CNFOSFDCDDJIUQAT6P2EOM7JSUQFFACA",
    );
    let (_, body) = http(&server, "GET", "/v1/me/history", Some(&a), None);
    let entries = json_of(&body)["entries"].as_array().unwrap().clone();
    let share = entries
        .iter()
        .find(|e| e["type"] == "share")
        .unwrap_or_else(|| panic!("no share record: {entries:#?}"));
    let time: chrono::DateTime<chrono::FixedOffset> =
        share["time"].as_str().unwrap().parse().unwrap();
    let late = (before - time.with_timezone(&chrono::Utc)).num_seconds();
    assert!(
        late < 60,
        "the record is dated {time}, {late} s before the delivery"
    );
}

/// A user moves to another time zone through the API: their windows are
/// then read in it, at once, under a new version whose receipt states the
/// zone; and a directory reload does not move them back.
#[tokio::test]
async fn a_user_moves_to_another_time_zone_and_a_receipt_states_it() {
    use chrono::Timelike;
    let server = server();
    let t = user(&server, "carol");
    let (s, d) = http(
        &server,
        "POST",
        "/v1/me/devices",
        Some(&t),
        Some(json!({"id": "carol-band"})),
    );
    assert_eq!(s, 201, "{d}");
    let band_secret = json_of(&d)["mqtt_password"].as_str().unwrap().to_string();
    // A two-hour window that is open now in Auckland, and not in Paris,
    // twelve hours behind.
    let hour = chrono::Utc::now()
        .with_timezone(&chrono_tz::Pacific::Auckland)
        .hour();
    let window = json!({"windows": [{
        "days": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"],
        "from": format!("{hour:02}:00:00"),
        "to": format!("{:02}:00:00", (hour + 2) % 24),
    }]});
    let (s, c) = http(
        &server,
        "PUT",
        "/v1/me/preferences/collect/heart_rate",
        Some(&t),
        Some(window),
    );
    assert_eq!(s, 200, "{c}");
    let version = json_of(&c)["preferences"]["version"].as_u64().unwrap();
    let mut band = v5::connect(server.mqtt, "band", "carol-band", &band_secret).await;
    let topic = "pii/carol/carol-band/heart_rate";
    assert_eq!(
        band.publish_acked(topic, br#"{"bpm":60}"#).await,
        v5::PubAckReason::NotAuthorized,
        "collected outside the window in Paris"
    );

    let (s, z) = http(
        &server,
        "PUT",
        "/v1/me/time_zone",
        Some(&t),
        Some(json!({"time_zone": "Pacific/Auckland"})),
    );
    assert_eq!(s, 200, "{z}");
    let z = json_of(&z);
    assert_eq!(z["preferences"]["preferences"]["version"], version + 1);
    let jti = z["preferences"]["receipt"]["jti"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, text) = http(
        &server,
        "GET",
        &format!("/v1/me/receipts/{jti}?format=text"),
        Some(&t),
        None,
    );
    assert!(text.contains("Pacific/Auckland"), "{text}");
    assert_eq!(
        band.publish_acked(topic, br#"{"bpm":61}"#).await,
        v5::PubAckReason::Success,
        "not collected inside the window in Auckland"
    );
    let (_, got) = http(&server, "GET", "/v1/me/time_zone", Some(&t), None);
    assert_eq!(json_of(&got)["time_zone"], "Pacific/Auckland");

    // The same zone again changes nothing; an unknown one is refused.
    let (s, z) = http(
        &server,
        "PUT",
        "/v1/me/time_zone",
        Some(&t),
        Some(json!({"time_zone": "Pacific/Auckland"})),
    );
    assert_eq!((s, json_of(&z)["preferences"].clone()), (200, Value::Null));
    let (s, p) = http(
        &server,
        "PUT",
        "/v1/me/time_zone",
        Some(&t),
        Some(json!({"time_zone": "Mars/Olympus_Mons"})),
    );
    assert_eq!((s, json_of(&p)["field"].clone()), (422, json!("time_zone")));

    // A directory file naming carol in Paris does not move her back, nor
    // dave, who registered in Paris and has no preferences, to Tokyo: their
    // profiles are their own.
    let d = user(&server, "dave");
    let directory = std::fs::read_to_string(&server.directory).unwrap();
    server.reload(&format!(
        "{directory}\n[[users]]\nid = \"carol\"\ntime_zone = \"Europe/Paris\"\n\
         \n[[users]]\nid = \"dave\"\ntime_zone = \"Asia/Tokyo\"\n"
    ));
    let (_, got) = http(&server, "GET", "/v1/me/time_zone", Some(&t), None);
    assert_eq!(json_of(&got)["time_zone"], "Pacific/Auckland");
    let (_, got) = http(&server, "GET", "/v1/me/time_zone", Some(&d), None);
    assert_eq!(json_of(&got)["time_zone"], "Europe/Paris");
}

/// Found by an outside review: a device removed and registered again under
/// the same id within its will delay had the removed session's will
/// published, as the new registration's data.
#[tokio::test]
async fn a_removed_devices_will_is_not_published_for_its_new_registration() {
    let server = server();
    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("pii/#", v5::QoS::AtLeastOnce).await;
    let mut o = v5::options(
        server.mqtt,
        "watch",
        Some(("alice-watch", "alice-watch-secret")),
    );
    o.set_last_will(v5::LastWill::new(
        "pii/alice/alice-watch/heart_rate",
        r#"{"bpm":999}"#,
        v5::QoS::AtLeastOnce,
        false,
        Some(v5::will_delay(2)),
    ));
    o.set_session_expiry_interval(Some(60));
    let mut watch = v5::connect_with(o).await.unwrap();
    watch
        .publish_acked("pii/alice/alice-watch/heart_rate", br#"{"bpm":70}"#)
        .await;
    assert_eq!(&fit.next_publish().await.payload[..], br#"{"bpm":70}"#);

    let a = login(
        &server,
        "alice",
        "alice-api-secret",
        "CNFOSFDCDDJIUQAT6P2EOM7JSUQFFACA",
    );
    let (s, b) = http(
        &server,
        "DELETE",
        "/v1/me/devices/alice-watch",
        Some(&a),
        None,
    );
    assert_eq!(s, 204, "{b}");
    let (s, b) = http(
        &server,
        "POST",
        "/v1/me/devices",
        Some(&a),
        Some(json!({"id": "alice-watch"})),
    );
    assert_eq!(s, 201, "{b}");
    watch.kill();
    let removed = [("result", "dropped"), ("reason", "device_removed")];
    server
        .wait_for_metric("consentry_publishes_total", &removed, 1.0)
        .await;
    let late = tokio::time::timeout(Duration::from_millis(500), fit.next_publish()).await;
    assert!(
        late.is_err(),
        "the removed session's will was delivered: {late:?}"
    );
}

#[tokio::test]
async fn receipt_keys_rotate_and_old_receipts_still_verify() {
    let mut server = server();
    let t = user(&server, "lena");
    let put = |server: &Server, t: &str, version: u64| {
        let (s, c) = http(
            server,
            "PUT",
            "/v1/me/preferences",
            Some(t),
            Some(json!({"version": version,
            "collect": [{"kind": "steps"}],
            "share": [{"provider": "insureco", "purpose": "pricing", "kind": "steps"}]})),
        );
        assert_eq!(s, 200, "{c}");
        json_of(&c)["receipt"]["jti"].as_str().unwrap().to_string()
    };
    let old_jti = put(&server, &t, 0);
    let (_, old_jws) = http(
        &server,
        "GET",
        &format!("/v1/me/receipts/{old_jti}?format=jws"),
        Some(&t),
        None,
    );
    server.stop();
    let out = server.cli(&["keys", "rotate-receipts"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.restart();
    // Sessions are in the store, so the token outlives the restart.
    let new_jti = put(&server, &t, 1);
    let (_, new_jws) = http(
        &server,
        "GET",
        &format!("/v1/me/receipts/{new_jti}?format=jws"),
        Some(&t),
        None,
    );
    let kid = |jws: &str| {
        let header = jws.split('.').next().unwrap();
        json_of(&String::from_utf8(base64_decode(header)).unwrap())["kid"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_ne!(kid(&old_jws), kid(&new_jws), "the new key signs");
    // Both verify against the JWKS the server publishes now, fetched by URL.
    let url = format!("http://{}/.well-known/jwks.json", server.api.unwrap());
    let dir = tempfile::tempdir().unwrap();
    for (name, jws) in [("old.jws", &old_jws), ("new.jws", &new_jws)] {
        let f = dir.path().join(name);
        std::fs::write(&f, jws).unwrap();
        let out = Command::new(common::bin())
            .args(["receipt", "verify"])
            .arg(&f)
            .args(["--jwks", &url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

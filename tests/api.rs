//! The preference manager's HTTP API: the router tested directly with
//! `oneshot`, and a real listener with real MQTT clients for live
//! enforcement.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use consentry::api::{router, ApiState};
use consentry::config::ApiConfig;
use consentry::model::{Directory, Kind};
use consentry::prefs::PreferenceManager;
use consentry::store::Store;
use serde_json::{json, Value};
use tower::ServiceExt;

/// The demo user alice's TOTP secret, from the shipped demo directory.
const ALICE_TOTP: &str = "CNFOSFDCDDJIUQAT6P2EOM7JSUQFFACA";
const OPERATOR_KEY: &str = "test-operator-key-generated-for-this-test";

fn demo() -> (Directory, Vec<Kind>) {
    let cfg: consentry::config::Config = toml::from_str(common::SHIPPED_CONFIG).unwrap();
    (toml::from_str(common::DEMO_DIRECTORY).unwrap(), cfg.kinds)
}

struct Api {
    app: axum::Router,
}

impl Api {
    fn new() -> Api {
        Api::with_store(Store::in_memory(&rand::random()).unwrap())
    }

    fn with_store(store: Store) -> Api {
        let (dir, kinds) = demo();
        let (pm, _, _) = PreferenceManager::open(
            store,
            vec!["pii/{user}/{device}/{kind}".into()],
            &kinds,
            vec![],
            dir,
            None,
        )
        .unwrap();
        let state = ApiState::new(Arc::new(pm), ApiConfig::default(), OPERATOR_KEY);
        Api { app: router(state) }
    }

    async fn call(&self, req: Request<Body>) -> (StatusCode, Value, String) {
        let (status, headers, body) = self.call_with_headers(req).await;
        let ctype = headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (status, body, ctype)
    }

    async fn call_with_headers(&self, req: Request<Body>) -> (StatusCode, HeaderMap, Value) {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, body)
    }

    async fn json(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let (s, v, _) = self
            .call(b.body(Body::from(body.to_string())).unwrap())
            .await;
        (s, v)
    }

    /// An operator call: `body` posted to `path` with the operator key.
    async fn operator(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let req = Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", "application/json")
            .header("x-operator-key", OPERATOR_KEY)
            .body(Body::from(body.to_string()))
            .unwrap();
        let (s, v, _) = self.call(req).await;
        (s, v)
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut b = Request::builder().uri(path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let (s, v, _) = self.call(b.body(Body::empty()).unwrap()).await;
        (s, v)
    }

    /// Registers `id` and logs in with password and TOTP; returns the token.
    async fn user(&self, id: &str) -> String {
        let (s, reg) = self
            .json(
                "POST",
                "/v1/users",
                None,
                json!({"id": id, "password": "correct horse battery", "time_zone": "Europe/Berlin"}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{reg}");
        assert!(reg["totp_uri"]
            .as_str()
            .unwrap()
            .starts_with("otpauth://totp/"));
        let code = totp_now(reg["totp_secret"].as_str().unwrap(), id);
        let (s, sess) = self
            .json(
                "POST",
                "/v1/sessions",
                None,
                json!({"user": id, "password": "correct horse battery", "totp": code}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{sess}");
        sess["token"].as_str().unwrap().to_string()
    }
}

use common::totp_now;

/// The scheme is case-insensitive, and a 401 says how to authenticate.
#[tokio::test]
async fn bearer_tokens_are_read_as_http_says_and_401_carries_a_challenge() {
    let api = Api::new();
    let token = api.user("rita").await;
    let with = |auth: Option<String>| {
        let mut b = Request::builder().uri("/v1/me/preferences");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(Body::empty()).unwrap()
    };
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let (s, _, p) = api
            .call_with_headers(with(Some(format!("{scheme} {token}"))))
            .await;
        assert_eq!(s, StatusCode::OK, "{scheme}: {p}");
    }
    let (s, h, _) = api.call_with_headers(with(None)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(h["www-authenticate"], r#"Bearer realm="consentry""#);
    // Every 401 says how to authenticate, a failed login's too.
    let wrong = json!({"user": "rita", "password": "wrong", "totp": "000000"});
    let (s, h, _) = api
        .call_with_headers(from_addr("192.0.2.1", "POST", "/v1/sessions", None, wrong))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(h.contains_key("www-authenticate"));
    for auth in [format!("Basic {token}"), "Bearer not-a-token".into()] {
        let (s, h, _) = api.call_with_headers(with(Some(auth.clone()))).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{auth}");
        assert!(
            h["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer realm="),
            "{auth}"
        );
    }
}

#[tokio::test]
async fn registration_and_two_factor_login() {
    let api = Api::new();
    let body =
        json!({"id": "carol", "password": "correct horse battery", "time_zone": "Europe/Berlin"});
    let (s, reg) = api.json("POST", "/v1/users", None, body.clone()).await;
    assert_eq!(s, StatusCode::CREATED);
    let secret = reg["totp_secret"].as_str().unwrap().to_string();
    let (s, p) = api.json("POST", "/v1/users", None, body).await;
    assert_eq!(s, StatusCode::CONFLICT, "{p}");

    let login =
        |password: &str, code: String| json!({"user": "carol", "password": password, "totp": code});
    let (s, _) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            login("correct horse battery", "000000".into()),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a wrong code is refused");
    let (s, _) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            login("wrong password!!", totp_now(&secret, "carol")),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a wrong password is refused");
    let (s, sess) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            login("correct horse battery", totp_now(&secret, "carol")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let token = sess["token"].as_str().unwrap();
    let (s, prefs) = api.get("/v1/me/preferences", Some(token)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(prefs["user"], "carol");
    assert_eq!(prefs["version"], 0);

    // Failed logins are rate-limited per user name.
    for _ in 0..5 {
        api.json(
            "POST",
            "/v1/sessions",
            None,
            login("nope nope nope", "1".into()),
        )
        .await;
    }
    let (s, p) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            login("correct horse battery", totp_now(&secret, "carol")),
        )
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{p}");
}

#[tokio::test]
async fn every_error_class_is_a_problem_document() {
    let api = Api::new();
    let req = |body: &str, ctype: &str| {
        Request::builder()
            .method("POST")
            .uri("/v1/users")
            .header("content-type", ctype)
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let (s, p, ct) = api.call(req("{\"id\": ", "application/json")).await;
    assert_eq!(
        (s, ct.as_str()),
        (StatusCode::BAD_REQUEST, "application/problem+json")
    );
    assert_eq!(p["status"], 400);
    let (s, p, _) = api
        .call(req(
            r#"{"id": "x", "password": 5, "time_zone": "UTC"}"#,
            "application/json",
        ))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(p["field"], "password", "{p}");
    let (s, _, _) = api.call(req("{}", "text/plain")).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let big = format!(r#"{{"id": "{}"}}"#, "x".repeat(200_000));
    let (s, _, _) = api.call(req(&big, "application/json")).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    let (s, p) = api
        .json(
            "POST",
            "/v1/users",
            None,
            json!({"id": "Bad Id", "password": "correct horse battery", "time_zone": "UTC"}),
        )
        .await;
    assert_eq!(
        (s, p["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("id"))
    );
    // Ids are path segments: "." and ".." would name no reachable resource.
    for id in [".", "..", "-x", "_x", ".hidden"] {
        let (s, p) = api
            .json(
                "POST",
                "/v1/users",
                None,
                json!({"id": id, "password": "correct horse battery", "time_zone": "UTC"}),
            )
            .await;
        assert_eq!(
            (s, p["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("id")),
            "{id}"
        );
    }
    let (s, p) = api
        .json(
            "POST",
            "/v1/users",
            None,
            json!({"id": "dave", "password": "correct horse battery", "time_zone": "Mars/Olympus"}),
        )
        .await;
    assert_eq!(
        (s, p["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("time_zone"))
    );
    let (s, _) = api.get("/v1/me/preferences", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = api.get("/v1/me/preferences", Some("forged-token")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = api.get("/v1/nothing/here", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn preferences_versioning_and_validation() {
    let api = Api::new();
    let t = api.user("erin").await;
    let doc = |version: u64, share: Value| json!({"version": version, "collect": [{"kind": "heart_rate"}, {"kind": "steps"}], "share": share});
    let hr_fit = json!([{"provider": "fitcoach", "purpose": "coaching", "kind": "heart_rate"}]);
    let (s, c) = api
        .json(
            "PUT",
            "/v1/me/preferences",
            Some(&t),
            doc(0, hr_fit.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["preferences"]["version"], 1);
    // Stale version: 409 with the current one.
    let (s, p) = api
        .json(
            "PUT",
            "/v1/me/preferences",
            Some(&t),
            doc(0, hr_fit.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(p["current_version"], 1);
    // Unknown kind, unknown provider, purpose limitation: 422 naming the
    // field by its path in the document.
    let cases = [
        (
            json!([{"provider": "fitcoach", "purpose": "coaching", "kind": "mood"}]),
            "share[0].kind",
        ),
        (
            json!([{"provider": "nobody", "purpose": "coaching", "kind": "steps"}]),
            "share[0].provider",
        ),
        (
            json!([{"provider": "insureco", "purpose": "pricing", "kind": "location"}]),
            "share[0].purpose",
        ),
        (
            json!([{"provider": "fitcoach", "purpose": "coaching", "kind": "location", "mask": {"alt": {"method": "remove"}}}]),
            "share[0].mask.alt",
        ),
        (
            json!([{"provider": "fitcoach", "purpose": "coaching", "kind": "steps"},
                   {"provider": "insureco", "purpose": "pricing", "kind": "location"}]),
            "share[1].purpose",
        ),
        (
            json!([{"provider": "fitcoach", "purpose": "coaching", "kind": "steps"},
                   {"provider": "fitcoach", "purpose": "coaching", "kind": "heart_rate",
                    "expires": "2001-01-01T00:00:00Z"}]),
            "share[1].expires",
        ),
    ];
    for (share, field) in cases {
        let (s, p) = api
            .json("PUT", "/v1/me/preferences", Some(&t), doc(1, share))
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
        assert_eq!(p["field"], field, "{p}");
    }
    let (_, now) = api.get("/v1/me/preferences", Some(&t)).await;
    assert_eq!(now["version"], 1, "refused changes changed nothing");

    // Single grants.
    let (s, c) = api
        .json(
            "PUT",
            "/v1/me/preferences/share/fitcoach/location",
            Some(&t),
            json!({"purpose": "coaching", "mask": {"lat": {"method": "generalize", "decimals": 2}}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["preferences"]["share"].as_array().unwrap().len(), 2);
    // A single grant's errors name the field of its own body, or the
    // path's parameter, not a place in the whole document.
    for (uri, body, field) in [
        (
            "/v1/me/preferences/share/insureco/location",
            json!({"purpose": "pricing"}),
            "purpose",
        ),
        (
            "/v1/me/preferences/share/fitcoach/mood",
            json!({"purpose": "coaching"}),
            "kind",
        ),
        (
            "/v1/me/preferences/share/fitcoach/location",
            json!({"purpose": "coaching", "mask": {"alt": {"method": "remove"}}}),
            "mask.alt",
        ),
        (
            "/v1/me/preferences/collect/steps",
            json!({"windows": [{"days": [], "from": "09:00:00", "to": "17:00:00"}]}),
            "windows[0].days",
        ),
    ] {
        let (s, p) = api.json("PUT", uri, Some(&t), body).await;
        assert_eq!(
            (s, p["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(field)),
            "{uri}: {p}"
        );
    }
    let (s, _) = api
        .json(
            "DELETE",
            "/v1/me/preferences/share/insureco/steps",
            Some(&t),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, c) = api
        .json(
            "DELETE",
            "/v1/me/preferences/share/fitcoach/heart_rate",
            Some(&t),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(c["preferences"]["version"], 3);
    let (s, c) = api
        .json(
            "PUT",
            "/v1/me/preferences/collect/location",
            Some(&t),
            json!({"windows": [{"days": ["Mon", "Fri"], "from": "09:00:00", "to": "17:30:00"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    let (s, c) = api
        .json("DELETE", "/v1/me/preferences", Some(&t), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(c["preferences"]["collect"], json!([]));
    assert_eq!(c["preferences"]["share"], json!([]));
    let (_, h) = api.get("/v1/me/preferences/history", Some(&t)).await;
    let versions: Vec<u64> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn users_only_see_their_own() {
    let api = Api::new();
    let a = api.user("frank").await;
    let b = api.user("grace").await;
    api.json(
        "PUT",
        "/v1/me/preferences",
        Some(&a),
        json!({"version": 0, "collect": [{"kind": "steps"}]}),
    )
    .await;
    let (_, pb) = api.get("/v1/me/preferences", Some(&b)).await;
    assert_eq!(pb["user"], "grace");
    assert_eq!(pb["collect"], json!([]));
    let (_, hb) = api.get("/v1/me/preferences/history", Some(&b)).await;
    assert_eq!(hb, json!([]));
    // A device id already taken by someone else cannot be registered again.
    let (s, d) = api
        .json(
            "POST",
            "/v1/me/devices",
            Some(&a),
            json!({"id": "frank-band"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{d}");
    assert!(d["mqtt_password"].as_str().unwrap().len() >= 20);
    let (s, _) = api
        .json(
            "POST",
            "/v1/me/devices",
            Some(&b),
            json!({"id": "frank-band"}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = api
        .json(
            "POST",
            "/v1/me/devices",
            Some(&b),
            json!({"id": "fitcoach"}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
}

#[tokio::test]
async fn providers_are_public_and_operator_endpoints_need_the_key() {
    let api = Api::new();
    let (s, list) = api.get("/v1/providers", None).await;
    assert_eq!(s, StatusCode::OK);
    let text = list.to_string();
    assert!(text.contains("fitcoach") && text.contains("Personalized Experience"));
    assert!(!text.contains("argon2"), "secrets leak: {text}");
    let (s, one) = api.get("/v1/providers/insureco", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(one["purposes"][0]["retention_days"], 1825);

    let provider = json!({
        "id": "sleepwell", "name": "SleepWell", "mqtt_password": "sleepwell-pass",
        "controller": {"company": "SleepWell GmbH", "email": "dpo@sleepwell.example"},
        "purposes": [{"id": "sleep", "statement": "Sleep analysis", "category": "Improve Performance",
                      "kinds": ["heart_rate"], "retention_days": 30}]
    });
    let post = |key: Option<&str>| {
        let mut b = Request::builder()
            .method("POST")
            .uri("/v1/operator/providers")
            .header("content-type", "application/json");
        if let Some(k) = key {
            b = b.header("x-operator-key", k);
        }
        b.body(Body::from(provider.to_string())).unwrap()
    };
    assert_eq!(api.call(post(None)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(api.call(post(Some("wrong"))).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        api.call(post(Some(OPERATOR_KEY))).await.0,
        StatusCode::CREATED
    );
    let (_, list) = api.get("/v1/providers", None).await;
    assert!(list.to_string().contains("SleepWell GmbH"));
    // A purpose naming an undeclared kind is refused whole.
    let bad = json!({"name": "mood", "category": "Health"});
    let mut b = Request::builder()
        .method("POST")
        .uri("/v1/operator/kinds")
        .header("content-type", "application/json")
        .header("x-operator-key", OPERATOR_KEY);
    b = b.header("accept", "application/json");
    let (s, _, _) = api.call(b.body(Body::from(bad.to_string())).unwrap()).await;
    assert_eq!(s, StatusCode::CREATED);
    // Posted again, the same provider and kind are updates (and no change).
    assert_eq!(api.call(post(Some(OPERATOR_KEY))).await.0, StatusCode::OK);
    let again = Request::builder()
        .method("POST")
        .uri("/v1/operator/kinds")
        .header("content-type", "application/json")
        .header("x-operator-key", OPERATOR_KEY)
        .body(Body::from(bad.to_string()))
        .unwrap();
    assert_eq!(api.call(again).await.0, StatusCode::OK);
    // A type for a field the kind does not declare, or an unknown type.
    let kind = |body: Value| {
        Request::builder()
            .method("POST")
            .uri("/v1/operator/kinds")
            .header("content-type", "application/json")
            .header("x-operator-key", OPERATOR_KEY)
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let (s, p, _) = api
        .call(kind(json!({"name": "sleep", "category": "Health",
            "fields": ["hours"], "types": {"minutes": "number"}})))
        .await;
    assert_eq!(
        (s, p["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("types.minutes")),
        "{p}"
    );
    let (s, p, _) = api
        .call(kind(json!({"name": "sleep", "category": "Health",
            "fields": ["hours"], "types": {"hours": "float"}})))
        .await;
    assert_eq!(
        (s, p["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("types.hours")),
        "{p}"
    );
    // A type that could never be checked: on an opaque kind, or a scalar
    // type on a field that has fields of its own.
    for (body, field) in [
        (
            json!({"name": "sleep", "category": "Health", "format": "opaque",
                "fields": ["hours"], "types": {"hours": "number"}}),
            "types.hours",
        ),
        (
            json!({"name": "sleep", "category": "Health",
                "fields": ["pos", "pos.lat"], "types": {"pos": "number", "pos.lat": "number"}}),
            "types.pos",
        ),
    ] {
        let (s, p, _) = api.call(kind(body)).await;
        assert_eq!(
            (s, p["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(field)),
            "{p}"
        );
    }
    let (s, p, _) = api
        .call(kind(json!({"name": "sleep", "category": "Health",
            "fields": ["hours"], "types": {"hours": "number"}})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
}

#[tokio::test]
async fn openapi_document_is_served_and_lists_the_api() {
    let api = Api::new();
    let (s, doc) = api.get("/v1/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/users",
        "/v1/sessions",
        "/v1/sessions/current",
        "/v1/me/sessions",
        "/v1/me/password",
        "/v1/me/totp",
        "/v1/me/devices/{id}",
        "/v1/me/preferences",
        "/v1/providers",
        "/v1/operator/kinds",
        "/v1/operator/users/{id}/login-reset",
        "/v1/me/account-events",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    // Generated from the handlers: the request schema has the real fields.
    let schema = &doc["components"]["schemas"]["PreferencesDocument"];
    assert!(schema["properties"].get("version").is_some(), "{schema}");
    // Errors as they are sent: problem+json, Retry-After on 429, and a
    // default problem response for the errors an operation does not list.
    let login = &doc["paths"]["/v1/sessions"]["post"]["responses"];
    assert!(
        login["429"]["content"]
            .get("application/problem+json")
            .is_some(),
        "{login}"
    );
    assert!(
        login["429"]["headers"].get("Retry-After").is_some(),
        "{login}"
    );
    assert!(login["401"]["content"].get("application/json").is_none());
    assert_eq!(
        login["default"]["$ref"], "#/components/responses/Problem",
        "{login}"
    );
    let default = &doc["components"]["responses"]["Problem"];
    assert!(
        default["content"].get("application/problem+json").is_some(),
        "{default}"
    );
    let history = &doc["paths"]["/v1/me/history"]["get"]["responses"];
    assert!(history.get("400").is_some(), "{history}");
}

/// A problem document's status, content type and `field`.
fn problem_of(s: StatusCode, p: &Value, ctype: &str) -> (u16, String, Option<String>) {
    assert_eq!(p["status"], s.as_u16(), "{p}");
    (
        s.as_u16(),
        ctype.to_string(),
        p["field"].as_str().map(str::to_string),
    )
}

fn problem(status: u16, field: Option<&str>) -> (u16, String, Option<String>) {
    (
        status,
        "application/problem+json".to_string(),
        field.map(str::to_string),
    )
}

#[tokio::test]
async fn query_and_path_parameters_that_do_not_parse_are_problems_naming_them() {
    let api = Api::new();
    let t = api.user("ivan").await;
    let get = |uri: &str, header: (&str, &str)| {
        Request::builder()
            .uri(uri)
            .header(header.0, header.1)
            .body(Body::empty())
            .unwrap()
    };
    let bearer = format!("Bearer {t}");
    let cases = [
        ("/v1/me/history?limit=abc", "limit"),
        ("/v1/me/history?from=yesterday", "from"),
        ("/v1/me/history?to=2024-13-01T00:00:00Z", "to"),
        ("/v1/me/history?after=-1", "after"),
        ("/v1/me/history/export?format=json&format=csv", "format"),
        ("/v1/me/receipts/x?format=json&format=jws", "format"),
        // A parameter the endpoint does not take is named, not ignored.
        (
            "/v1/me/history/export?format=csv&provider=insureco",
            "provider",
        ),
        ("/v1/me/history?foo=bar", "foo"),
        ("/v1/me/receipts/x?fromat=text", "fromat"),
    ];
    for (uri, field) in cases {
        let (s, p, ct) = api.call(get(uri, ("authorization", &bearer))).await;
        assert_eq!(
            problem_of(s, &p, &ct),
            problem(400, Some(field)),
            "{uri}: {p}"
        );
        assert!(p["detail"].as_str().unwrap().contains(field), "{p}");
    }
    // Path parameters: a dispute id that is not a number, bytes that are
    // not UTF-8 in a single parameter and in one of two.
    let (s, p, ct) = api
        .call(
            Request::builder()
                .method("POST")
                .uri("/v1/operator/disputes/abc/resolve")
                .header("x-operator-key", OPERATOR_KEY)
                .header("content-type", "application/json")
                .body(Body::from(r#"{"state": "upheld", "resolution": "ok"}"#))
                .unwrap(),
        )
        .await;
    assert_eq!(problem_of(s, &p, &ct), problem(400, Some("id")), "{p}");
    let (s, p, ct) = api.call(get("/v1/providers/%FF", ("accept", "*/*"))).await;
    assert_eq!(problem_of(s, &p, &ct), problem(400, Some("id")), "{p}");
    let (s, p, ct) = api
        .call(
            Request::builder()
                .method("DELETE")
                .uri("/v1/me/preferences/share/fitcoach/%C3%28")
                .header("authorization", &bearer)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(problem_of(s, &p, &ct), problem(400, Some("kind")), "{p}");
}

#[tokio::test]
async fn json_bodies_missing_a_field_name_it() {
    let api = Api::new();
    let (s, p) = api
        .json(
            "POST",
            "/v1/users",
            None,
            json!({"id": "judy", "password": "correct horse battery"}),
        )
        .await;
    assert_eq!(
        (s, p["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("time_zone")),
        "{p}"
    );
    let t = api.user("judy").await;
    let cases = [
        (json!({"collect": []}), "version"),
        (
            json!({"version": 0, "share": [{"provider": "fitcoach", "kind": "steps"}]}),
            "share[0].purpose",
        ),
        (
            json!({"version": 0, "collect": [{"kind": "steps"}], "collect ": []}),
            "collect ",
        ),
    ];
    for (doc, field) in cases {
        let (s, p) = api.json("PUT", "/v1/me/preferences", Some(&t), doc).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
        assert_eq!(p["field"], field, "{p}");
    }
    let (s, p) = api
        .json("POST", "/v1/sessions", None, json!({"user": "judy"}))
        .await;
    assert_eq!(
        (s, p["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("password")),
        "{p}"
    );
    // An array is not read as an object by position: `[0, [], []]` is not
    // a preferences document.
    for (method, uri, token, body) in [
        (
            "PUT",
            "/v1/me/preferences",
            Some(t.as_str()),
            json!([0, [], []]),
        ),
        ("POST", "/v1/sessions", None, json!([])),
        (
            "PUT",
            "/v1/me/time_zone",
            Some(t.as_str()),
            json!("Europe/Paris"),
        ),
    ] {
        let (s, p) = api.json(method, uri, token, body).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{uri}: {p}");
        assert!(
            p["detail"]
                .as_str()
                .unwrap()
                .contains("must be a JSON object"),
            "{uri}: {p}"
        );
    }
    let (_, now) = api.get("/v1/me/preferences", Some(&t)).await;
    assert_eq!(
        now["version"], 0,
        "the array changed the preferences: {now}"
    );
}

#[tokio::test]
async fn wrong_methods_and_unknown_paths_are_problems() {
    let api = Api::new();
    let req = |method: &str, uri: &str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap()
    };
    for (method, uri, allow) in [
        ("PATCH", "/v1/me/preferences", "GET,HEAD,PUT,DELETE"),
        ("DELETE", "/v1/sessions", "POST"),
        ("GET", "/v1/users", "POST"),
        ("POST", "/v1/providers/fitcoach", "GET,HEAD"),
    ] {
        let (s, h, p) = api.call_with_headers(req(method, uri)).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
        assert_eq!(h["content-type"], "application/problem+json");
        assert_eq!(h["allow"], allow, "{method} {uri}");
        assert_eq!(p["status"], 405, "{p}");
        assert!(p["detail"].as_str().unwrap().contains(method), "{p}");
    }
    for uri in ["/v1/nothing/here", "/", "/v1/providers/fitcoach/extra"] {
        let (s, h, p) = api.call_with_headers(req("GET", uri)).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(h["content-type"], "application/problem+json");
        assert_eq!(p["status"], 404, "{p}");
    }
}

#[tokio::test]
async fn a_rate_limited_login_says_when_to_retry() {
    let api = Api::new();
    api.user("kate").await;
    let attempt = || {
        Request::builder()
            .method("POST")
            .uri("/v1/sessions")
            .header("content-type", "application/json")
            .body(Body::from(
                json!({"user": "kate", "password": "nope nope nope", "totp": "1"}).to_string(),
            ))
            .unwrap()
    };
    let window = ApiConfig::default().login_window_secs;
    for _ in 0..ApiConfig::default().login_attempts {
        let (s, h, _) = api.call_with_headers(attempt()).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(h.get("retry-after").is_none());
    }
    let (s, h, p) = api.call_with_headers(attempt()).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{p}");
    assert_eq!(h["content-type"], "application/problem+json");
    let secs: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (window - 5..=window).contains(&secs),
        "Retry-After {secs}, window {window}"
    );
    // Another user name is not locked out.
    let (s, h, _) = api
        .call_with_headers(
            Request::builder()
                .method("POST")
                .uri("/v1/sessions")
                .header("content-type", "application/json")
                .body(Body::from(
                    json!({"user": "nobody", "password": "x", "totp": "1"}).to_string(),
                ))
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(h.get("retry-after").is_none());
}

/// A JSON request as if it came from `from` (the listener records the
/// peer address; `oneshot` has none unless the request carries it).
fn from_addr(
    from: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> Request<Body> {
    let peer: std::net::SocketAddr = format!("{from}:40000").parse().unwrap();
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .extension(axum::extract::ConnectInfo(peer));
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(Body::from(body.to_string())).unwrap()
}

/// Registers `id`; returns the TOTP secret.
/// Registers `id` with password "correct horse battery"; the TOTP secret.
async fn register(api: &Api, id: &str) -> String {
    registration(api, id).await["totp_secret"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Registers `id` with password "correct horse battery"; the answer.
async fn registration(api: &Api, id: &str) -> Value {
    let (s, reg) = api
        .json(
            "POST",
            "/v1/users",
            None,
            json!({"id": id, "password": "correct horse battery", "time_zone": "UTC"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{reg}");
    reg
}

#[tokio::test]
async fn wrong_passwords_from_one_address_do_not_lock_out_the_owner() {
    let api = Api::new();
    let secret = register(&api, "olga").await;
    let guess = json!({"user": "olga", "password": "guessed wrong", "totp": "000000"});
    for _ in 0..ApiConfig::default().login_attempts {
        let (s, _, p) = api
            .call(from_addr(
                "203.0.113.9",
                "POST",
                "/v1/sessions",
                None,
                guess.clone(),
            ))
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{p}");
    }
    let (s, _, p) = api
        .call(from_addr(
            "203.0.113.9",
            "POST",
            "/v1/sessions",
            None,
            guess,
        ))
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{p}");
    // The guesser's address is locked out, also with the right secrets ...
    let right =
        |code: String| json!({"user": "olga", "password": "correct horse battery", "totp": code});
    let now = unix_now();
    let (s, _, p) = api
        .call(from_addr(
            "203.0.113.9",
            "POST",
            "/v1/sessions",
            None,
            right(common::totp_at(&secret, now)),
        ))
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{p}");
    // ... but olga, elsewhere, logs in.
    let (s, _, p) = api
        .call(from_addr(
            "198.51.100.20",
            "POST",
            "/v1/sessions",
            None,
            right(common::totp_at(&secret, now)),
        ))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
}

#[tokio::test]
async fn wrong_codes_after_the_right_password_lock_the_name_everywhere() {
    let api = Api::new();
    let secret = register(&api, "pia").await;
    // A code that is surely not the current one, nor within the skew.
    let wrong = common::totp_at(&secret, unix_now() - 3600);
    let attempt = json!({"user": "pia", "password": "correct horse battery", "totp": wrong});
    for i in 0..ApiConfig::default().login_attempts {
        let (s, _, p) = api
            .call(from_addr(
                &format!("192.0.2.{}", i + 1),
                "POST",
                "/v1/sessions",
                None,
                attempt.clone(),
            ))
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{p}");
    }
    let right = json!({"user": "pia", "password": "correct horse battery",
        "totp": common::totp_now(&secret, "pia")});
    let (s, h, p) = api
        .call_with_headers(from_addr(
            "198.51.100.77",
            "POST",
            "/v1/sessions",
            None,
            right,
        ))
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{p}");
    assert!(h.get("retry-after").is_some());
}

#[tokio::test]
async fn logging_out_ends_one_session_and_logging_out_everywhere_ends_all() {
    let api = Api::new();
    let secret = register(&api, "quinn").await;
    let now = unix_now_early_in_a_step().await;
    let mut tokens = vec![];
    for t in [now, now + 30] {
        let (s, sess) = api
            .json(
                "POST",
                "/v1/sessions",
                None,
                json!({"user": "quinn", "password": "correct horse battery",
                    "totp": common::totp_at(&secret, t)}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{sess}");
        tokens.push(sess["token"].as_str().unwrap().to_string());
    }
    let (s, _) = api.get("/v1/me/preferences", Some(&tokens[0])).await;
    assert_eq!(s, StatusCode::OK);
    let (s, p) = api
        .json(
            "DELETE",
            "/v1/sessions/current",
            Some(&tokens[0]),
            json!(null),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{p}");
    let (s, p) = api.get("/v1/me/preferences", Some(&tokens[0])).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{p}");
    let (s, _) = api
        .json(
            "DELETE",
            "/v1/sessions/current",
            Some(&tokens[0]),
            json!(null),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "an ended session cannot end again"
    );
    // The other session is untouched, until the user logs out everywhere.
    let other = api.user("rosa").await;
    let (s, _) = api.get("/v1/me/preferences", Some(&tokens[1])).await;
    assert_eq!(s, StatusCode::OK);
    let (s, p) = api
        .json("DELETE", "/v1/me/sessions", Some(&tokens[1]), json!(null))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{p}");
    let (s, _) = api.get("/v1/me/preferences", Some(&tokens[1])).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Somebody else's session is not theirs to end.
    let (s, _) = api.get("/v1/me/preferences", Some(&other)).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn a_password_change_asks_both_factors_and_ends_the_other_sessions() {
    let api = Api::new();
    let secret = register(&api, "sam").await;
    let now = unix_now_early_in_a_step().await;
    let login =
        |password: &str, code: String| json!({"user": "sam", "password": password, "totp": code});
    let mut tokens = vec![];
    for t in [now - 30, now] {
        let (s, sess) = api
            .json(
                "POST",
                "/v1/sessions",
                None,
                login("correct horse battery", common::totp_at(&secret, t)),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{sess}");
        tokens.push(sess["token"].as_str().unwrap().to_string());
    }
    let change = |password: &str, code: String, new: &str| json!({"password": password, "totp": code, "new_password": new});
    // A session token alone is not enough: the password and a fresh code are
    // asked again.
    let (s, p) = api
        .json(
            "PUT",
            "/v1/me/password",
            Some(&tokens[1]),
            change(
                "not the password",
                common::totp_at(&secret, now + 30),
                "a brand new passphrase",
            ),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{p}");
    let (s, p) = api
        .json(
            "PUT",
            "/v1/me/password",
            Some(&tokens[1]),
            change(
                "correct horse battery",
                common::totp_at(&secret, now),
                "a brand new passphrase",
            ),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a used code: {p}");
    let (s, p) = api
        .json(
            "PUT",
            "/v1/me/password",
            Some(&tokens[1]),
            change(
                "correct horse battery",
                common::totp_at(&secret, now + 30),
                "short",
            ),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    assert_eq!(p["field"], "new_password");
    let (s, p) = api
        .json(
            "PUT",
            "/v1/me/password",
            Some(&tokens[1]),
            change(
                "correct horse battery",
                common::totp_at(&secret, now + 30),
                "a brand new passphrase",
            ),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{p}");
    // This session goes on; the other one has ended.
    let (s, _) = api.get("/v1/me/preferences", Some(&tokens[1])).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = api.get("/v1/me/preferences", Some(&tokens[0])).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Which password passes the first factor shows, without waiting for the
    // next code, in how failures count: a wrong password locks only its
    // address, the right one with a used code locks the name everywhere.
    let used = common::totp_at(&secret, now + 30);
    let attempts = ApiConfig::default().login_attempts;
    for i in 0..attempts {
        let (s, _, p) = api
            .call(from_addr(
                &format!("192.0.2.{}", i + 1),
                "POST",
                "/v1/sessions",
                None,
                login("correct horse battery", used.clone()),
            ))
            .await;
        assert_eq!(
            s,
            StatusCode::UNAUTHORIZED,
            "the old password (the reset ended the lockout): {p}"
        );
    }
    for i in 0..attempts {
        let (s, _, p) = api
            .call(from_addr(
                &format!("198.51.100.{}", i + 1),
                "POST",
                "/v1/sessions",
                None,
                login("a brand new passphrase", used.clone()),
            ))
            .await;
        assert_eq!(
            s,
            StatusCode::UNAUTHORIZED,
            "old password failures locked the name: {p}"
        );
    }
    let (s, _, p) = api
        .call(from_addr(
            "203.0.113.1",
            "POST",
            "/v1/sessions",
            None,
            login("a brand new passphrase", used),
        ))
        .await;
    assert_eq!(
        s,
        StatusCode::TOO_MANY_REQUESTS,
        "the new password passes: {p}"
    );
}

/// A POST of `body` to the server's API over a socket bound to `source`,
/// so that the server sees that peer address; the status.
async fn post_from(server: &common::Server, source: &str, path: &str, body: Value) -> u16 {
    post_to(server.api, source, path, body).await.0
}

async fn post_to(
    api: Option<std::net::SocketAddr>,
    source: &str,
    path: &str,
    body: Value,
) -> (u16, Option<String>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(api.expect("API listening")).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method("POST")
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let r = sender.send_request(req).await.unwrap();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (r.status().as_u16(), retry_after)
}

#[tokio::test]
async fn the_listener_counts_wrong_passwords_per_peer_address() {
    let server = common::Server::demo();
    let guess = json!({"user": "alice", "password": "guessed wrong", "totp": "000000"});
    for _ in 0..ApiConfig::default().login_attempts {
        assert_eq!(
            post_from(&server, "127.0.0.2", "/v1/sessions", guess.clone()).await,
            401
        );
    }
    assert_eq!(
        post_from(&server, "127.0.0.2", "/v1/sessions", guess.clone()).await,
        429
    );
    // Another address is not locked out (a wrong guess from it is a 401).
    assert_eq!(
        post_from(&server, "127.0.0.3", "/v1/sessions", guess).await,
        401
    );
}

/// Each request is checked against the limit before its slow password
/// check and counted after it; parallel requests must not get more guesses
/// between them than the limit allows one after another.
#[tokio::test]
async fn parallel_code_guesses_get_no_more_than_the_limit() {
    let server = common::Server::demo();
    let wrong = common::totp_at(ALICE_TOTP, unix_now() - 3600);
    let guess = json!({"user": "alice", "password": "alice-api-secret", "totp": wrong});
    let mut set = tokio::task::JoinSet::new();
    for i in 0..30 {
        let (server, guess) = (server.api, guess.clone());
        set.spawn(async move {
            post_to(server, &format!("127.0.1.{}", i + 1), "/v1/sessions", guess)
                .await
                .0
        });
    }
    let mut answers = std::collections::BTreeMap::<u16, u32>::new();
    while let Some(s) = set.join_next().await {
        *answers.entry(s.unwrap()).or_default() += 1;
    }
    let limit = ApiConfig::default().login_attempts;
    assert!(
        answers.get(&401).copied().unwrap_or(0) <= limit,
        "more wrong codes judged than the limit: {answers:?}"
    );
    assert_eq!(
        answers.keys().copied().collect::<Vec<_>>(),
        [401, 429],
        "{answers:?}"
    );
}

/// With no queue for password checks, a burst of logins gets 503 with
/// Retry-After for those that find every core taken.
#[tokio::test]
async fn password_checks_past_the_queue_are_503() {
    let server = common::Server::start(common::Setup {
        replace: vec![(
            "max_waiting_password_checks = 128".into(),
            "max_waiting_password_checks = 0".into(),
        )],
        ..Default::default()
    });
    let guess = json!({"user": "bob", "password": "not bob's", "totp": "000000"});
    let mut set = tokio::task::JoinSet::new();
    for i in 0..40 {
        let (api, guess) = (server.api, guess.clone());
        set.spawn(async move {
            post_to(api, &format!("127.0.2.{}", i + 1), "/v1/sessions", guess).await
        });
    }
    let mut busy = 0;
    while let Some(s) = set.join_next().await {
        match s.unwrap() {
            (503, retry) => {
                assert_eq!(retry.as_deref(), Some("1"));
                busy += 1
            }
            (s, _) => assert_eq!(s, 401),
        }
    }
    assert!(
        busy > 0,
        "40 checks at once on a machine's cores, none busy"
    );
    // The server still logs users in.
    common::demo_alice_token(&server);
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn a_totp_code_is_good_for_one_login() {
    let api = Api::new();
    let reg = registration(&api, "liam").await;
    let secret = reg["totp_secret"].as_str().unwrap();
    let now = unix_now();
    let login =
        |code: String| json!({"user": "liam", "password": "correct horse battery", "totp": code});
    let (s, p) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            login(common::totp_at(secret, now)),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    // The same code again: refused, and counted as a wrong one is; the
    // answer says why (only the holder of both factors can see it).
    let (s, p) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            login(common::totp_at(secret, now)),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{p}");
    assert_eq!(
        p["detail"],
        "this code, or a later one, was already used; wait for the authenticator's next one"
    );
    // The previous step's code (within the allowed skew) is older still.
    let (s, _) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            login(common::totp_at(secret, now - 30)),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // The next step's code is new.
    let (s, p) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            login(common::totp_at(secret, now + 30)),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
}

#[tokio::test]
async fn a_used_totp_code_stays_used_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("consentry.db");
    let key = rand::random();
    let api = Api::with_store(Store::open(&path, &key).unwrap());
    let (s, reg) = api
        .json(
            "POST",
            "/v1/users",
            None,
            json!({"id": "mia", "password": "correct horse battery", "time_zone": "UTC"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let secret = reg["totp_secret"].as_str().unwrap().to_string();
    let now = unix_now();
    let login =
        |code: String| json!({"user": "mia", "password": "correct horse battery", "totp": code});
    let (s, p) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            login(common::totp_at(&secret, now)),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    drop(api);

    let api = Api::with_store(Store::open(&path, &key).unwrap());
    let (s, _) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            login(common::totp_at(&secret, now)),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "replayed after a restart");
    let (s, p) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            login(common::totp_at(&secret, now + 30)),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
}

// === live enforcement through a real listener ===

fn http(
    server: &common::Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let (status, text) = common::http(server, method, path, token, &[], body);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn revocation_through_the_api_stops_the_next_delivery() {
    use common::v5;
    let server = common::Server::demo();
    let (s, reg) = http(
        &server,
        "POST",
        "/v1/users",
        None,
        Some(
            json!({"id": "heidi", "password": "correct horse battery", "time_zone": "Europe/Paris"}),
        ),
    );
    assert_eq!(s, 201, "{reg}");
    let code = totp_now(reg["totp_secret"].as_str().unwrap(), "heidi");
    let (_, sess) = http(
        &server,
        "POST",
        "/v1/sessions",
        None,
        Some(json!({"user": "heidi", "password": "correct horse battery", "totp": code})),
    );
    let t = sess["token"].as_str().unwrap().to_string();
    let (s, dev) = http(
        &server,
        "POST",
        "/v1/me/devices",
        Some(&t),
        Some(json!({"id": "heidi-band"})),
    );
    assert_eq!(s, 201);
    let (s, _) = http(
        &server,
        "PUT",
        "/v1/me/preferences",
        Some(&t),
        Some(json!({"version": 0, "collect": [{"kind": "heart_rate"}],
                    "share": [{"provider": "fitcoach", "purpose": "coaching", "kind": "heart_rate"}]})),
    );
    assert_eq!(s, 200);

    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("pii/+/+/heart_rate", v5::QoS::AtLeastOnce)
        .await;
    fit.subscribe("public/#", v5::QoS::AtLeastOnce).await;
    let mut band = v5::connect(
        server.mqtt,
        "band",
        "heidi-band",
        dev["mqtt_password"].as_str().unwrap(),
    )
    .await;
    let topic = "pii/heidi/heidi-band/heart_rate";
    assert_eq!(
        band.publish_acked(topic, br#"{"bpm":70}"#).await,
        v5::PubAckReason::Success
    );
    assert_eq!(fit.next_publish().await.topic, topic.as_bytes());

    // Revoke, and publish the moment the response is in.
    let (s, _) = http(
        &server,
        "DELETE",
        "/v1/me/preferences/share/fitcoach/heart_rate",
        Some(&t),
        None,
    );
    assert_eq!(s, 200);
    band.publish_acked(topic, br#"{"bpm":71}"#).await;
    band.publish_acked("public/marker", b"m").await;
    assert_eq!(
        fit.publishes_until("public/marker").await.len(),
        1,
        "delivered after revocation"
    );

    // Re-granting restores delivery.
    let (s, _) = http(
        &server,
        "PUT",
        "/v1/me/preferences/share/fitcoach/heart_rate",
        Some(&t),
        Some(json!({"purpose": "coaching"})),
    );
    assert_eq!(s, 200);
    band.publish_acked(topic, br#"{"bpm":72}"#).await;
    let p = fit.next_publish().await;
    assert_eq!(p.topic, topic.as_bytes());

    // A grant that expires stops delivery once it has.
    let expires = chrono::Utc::now() + chrono::Duration::seconds(2);
    let (s, _) = http(
        &server,
        "PUT",
        "/v1/me/preferences/share/fitcoach/heart_rate",
        Some(&t),
        Some(json!({"purpose": "coaching", "expires": expires})),
    );
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    band.publish_acked(topic, br#"{"bpm":73}"#).await;
    band.publish_acked("public/marker", b"m").await;
    assert_eq!(
        fit.publishes_until("public/marker").await.len(),
        1,
        "delivered after expiry"
    );
}

/// Like `http`, with the response headers (lower-case names).
fn http_with_headers(
    server: &common::Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, std::collections::HashMap<String, String>, Value) {
    let url = format!("http://{}{}", server.api.expect("API listening"), path);
    let mut req = ureq::request(method, &url);
    if let Some(t) = token {
        req = req.set("authorization", &format!("Bearer {t}"));
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
    let headers = resp
        .headers_names()
        .into_iter()
        .filter_map(|n| Some((n.to_ascii_lowercase(), resp.header(&n)?.to_string())))
        .collect();
    let status = resp.status();
    let text = resp.into_string().unwrap_or_default();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

/// Registers `id` with password "correct horse battery" through the real
/// listener; the answer.
fn register_on(server: &common::Server, id: &str) -> Value {
    let body = json!({"id": id, "password": "correct horse battery", "time_zone": "UTC"});
    let (s, reg) = http(server, "POST", "/v1/users", None, Some(body));
    assert_eq!(s, 201, "{reg}");
    reg
}

#[tokio::test]
async fn errors_through_a_real_listener_are_problems_with_their_headers() {
    let server = common::Server::demo();
    let reg = register_on(&server, "noah");
    let code = totp_now(reg["totp_secret"].as_str().unwrap(), "noah");
    let login = json!({"user": "noah", "password": "correct horse battery", "totp": code});
    let (s, sess) = http(&server, "POST", "/v1/sessions", None, Some(login.clone()));
    assert_eq!(s, 201, "{sess}");
    let t = sess["token"].as_str().unwrap();

    let problem = |h: &std::collections::HashMap<String, String>| {
        assert_eq!(h["content-type"], "application/problem+json", "{h:?}");
    };
    let (s, h, p) = http_with_headers(&server, "GET", "/v1/me/history?limit=abc", Some(t), None);
    assert_eq!((s, p["field"].as_str()), (400, Some("limit")), "{p}");
    problem(&h);
    let (s, h, p) = http_with_headers(&server, "PATCH", "/v1/me/preferences", Some(t), None);
    assert_eq!(s, 405, "{p}");
    assert_eq!(h["allow"], "GET,HEAD,PUT,DELETE");
    problem(&h);
    let (s, h, _) = http_with_headers(&server, "GET", "/v1/nothing/here", None, None);
    assert_eq!(s, 404);
    problem(&h);
    // The code just used is refused, and so counts as a failed login.
    let (s, _, _) = http_with_headers(&server, "POST", "/v1/sessions", None, Some(login.clone()));
    assert_eq!(s, 401, "a TOTP code is good for one login");
    for _ in 0..5 {
        http_with_headers(&server, "POST", "/v1/sessions", None, Some(login.clone()));
    }
    let (s, h, p) = http_with_headers(&server, "POST", "/v1/sessions", None, Some(login));
    assert_eq!(s, 429, "{p}");
    problem(&h);
    let secs: u64 = h["retry-after"].parse().unwrap();
    assert!((1..=900).contains(&secs), "Retry-After {secs}");
}

/// Registers device `id` for the user of `token`: its MQTT password.
fn register_device(server: &common::Server, token: &str, id: &str) -> String {
    let (s, dev) = http(
        server,
        "POST",
        "/v1/me/devices",
        Some(token),
        Some(json!({"id": id})),
    );
    assert_eq!(s, 201, "{dev}");
    dev["mqtt_password"].as_str().unwrap().to_string()
}

/// Publishes a retained `payload` on `topic` at QoS 1 and waits for its PUBACK.
async fn publish_retained(c: &mut common::v5::Client, topic: &str, payload: &[u8]) {
    c.client
        .publish(topic, common::v5::QoS::AtLeastOnce, true, payload.to_vec())
        .await
        .unwrap();
    assert!(matches!(c.next().await, common::v5::Packet::PubAck(_)));
}

/// A removed device's retained messages are cleared on every topic it
/// could have used, one per kind: with more kinds than the notice client's
/// queue holds, the clearings wait for room rather than being dropped.
#[tokio::test]
async fn a_removed_device_leaves_no_retained_message_with_many_kinds() {
    use common::v5;
    // 300 kinds before heart_rate, so its clearing comes after the queue
    // (256) is full.
    let many: String = (0..300)
        .map(|i| {
            format!(
                "[[kinds]]\nname = \"k{i:03}\"\ncategory = \"Behavioral\"\nformat = \"opaque\"\n\n"
            )
        })
        .collect();
    let first = "[[kinds]]\nname = \"heart_rate\"";
    let server = common::Server::start(common::Setup {
        extra: common::MARKER_ACL.into(),
        replace: vec![(first.into(), format!("{many}{first}"))],
        ..Default::default()
    });
    let t = common::demo_alice_token(&server);
    let topic = "pii/alice/alice-watch/heart_rate";
    let mut watch = v5::connect(server.mqtt, "watch", "alice-watch", "alice-watch-secret").await;
    publish_retained(&mut watch, topic, br#"{"bpm":70}"#).await;
    let (s, p) = http(
        &server,
        "DELETE",
        "/v1/me/devices/alice-watch",
        Some(&t),
        None,
    );
    assert_eq!(s, 204, "{p}");
    let password = register_device(&server, &t, "alice-watch");
    let mut watch = v5::connect(server.mqtt, "watch-new", "alice-watch", &password).await;
    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("pii/+/+/heart_rate", v5::QoS::AtLeastOnce)
        .await;
    watch.publish_acked(topic, br#"{"bpm":71}"#).await;
    let got = fit.next_publish().await;
    assert_eq!(
        (got.payload.as_ref(), got.retain),
        (&br#"{"bpm":71}"#[..], false),
        "a reading retained before the removal came back"
    );
    assert_eq!(server.metric("consentry_notices_dropped_total", &[]), 0.0);
}

#[tokio::test]
async fn a_removed_device_is_disconnected_locked_out_and_stays_removed() {
    use common::v5;
    let server = common::Server::demo();
    let t = common::demo_alice_token(&server);
    let (s, list) = http(&server, "GET", "/v1/me/devices", Some(&t), None);
    assert_eq!((s, list), (200, json!({"devices": ["alice-watch"]})));

    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("pii/+/+/heart_rate", v5::QoS::AtLeastOnce)
        .await;
    let mut watch = v5::connect(server.mqtt, "watch", "alice-watch", "alice-watch-secret").await;
    let topic = "pii/alice/alice-watch/heart_rate";
    // A retained reading: shared now, and not to come back with the id.
    publish_retained(&mut watch, topic, br#"{"bpm":70}"#).await;
    assert_eq!(fit.next_publish().await.topic, topic.as_bytes());

    // Only her own devices are hers to remove; another's is not found.
    let (s, p) = http(
        &server,
        "DELETE",
        "/v1/me/devices/bob-phone",
        Some(&t),
        None,
    );
    assert_eq!(s, 404, "{p}");
    let (s, p) = http(
        &server,
        "DELETE",
        "/v1/me/devices/alice-watch",
        Some(&t),
        None,
    );
    assert_eq!(s, 204, "{p}");

    // The open connection is closed as an administrative action ...
    closed_by_administrative_action(&mut watch).await;
    // ... its password no longer lets it in ...
    let again = || alice_watch_connects_again(&server);
    assert!(again().await.is_err(), "a removed device connected");
    let (s, list) = http(&server, "GET", "/v1/me/devices", Some(&t), None);
    assert_eq!((s, list), (200, json!({"devices": []})));
    // ... and reloading the directory file, which still lists it, does not
    // bring it back.
    server.reload(common::DEMO_DIRECTORY);
    assert!(again().await.is_err(), "the directory brought it back");
    assert!(server.log().contains("their users manage them"));
    // The log tells what happened, not to whom (README: logs carry no ids).
    let log = server.log();
    assert!(log.contains("device removed by its user"), "{log}");
    assert!(
        !log.contains("alice"),
        "the log names the user or her device:\n{log}"
    );

    // Registering the id again is alice's own choice, with a new password.
    let password = register_device(&server, &t, "alice-watch");
    let mut watch = v5::connect(server.mqtt, "watch-new", "alice-watch", &password).await;
    // A provider subscribing now gets no retained reading from before the
    // removal, only what the device sends from now on.
    let mut fit2 = v5::connect(server.mqtt, "fit2", "fitcoach", "fitcoach-secret").await;
    fit2.subscribe("pii/+/+/heart_rate", v5::QoS::AtLeastOnce)
        .await;
    assert_eq!(
        watch.publish_acked(topic, br#"{"bpm":71}"#).await,
        v5::PubAckReason::Success
    );
    assert_eq!(fit.next_publish().await.payload.as_ref(), br#"{"bpm":71}"#);
    let first = fit2.next_publish().await;
    assert_eq!(
        (first.payload.as_ref(), first.retain),
        (&br#"{"bpm":71}"#[..], false),
        "a reading retained before the removal came back"
    );
    // The file's old secret stays dead after another reload.
    server.reload(common::DEMO_DIRECTORY);
    assert!(
        again().await.is_err(),
        "the directory restored the old secret"
    );
}

/// The operator can take any device out of service (reported stolen, say),
/// with the same effects as its user's own removal; the user sees that it
/// happened, and the log says what happened without naming whose.
#[tokio::test]
async fn the_operator_removes_a_device_and_its_user_is_told() {
    use common::v5;
    let key = format!("op-{}", uuid::Uuid::new_v4());
    let server = common::Server::start(common::Setup {
        env: vec![("CONSENTRY_OPERATOR_KEY".into(), key.clone())],
        ..Default::default()
    });
    let op = [("x-operator-key", key.as_str())];
    let remove = |id: &str, headers: &[(&str, &str)]| {
        let path = format!("/v1/operator/devices/{id}");
        common::http(&server, "DELETE", &path, None, headers, None)
    };
    let mut fit = v5::connect(server.mqtt, "fit", "fitcoach", "fitcoach-secret").await;
    fit.subscribe("pii/+/+/heart_rate", v5::QoS::AtLeastOnce)
        .await;
    let mut watch = v5::connect(server.mqtt, "watch", "alice-watch", "alice-watch-secret").await;
    let topic = "pii/alice/alice-watch/heart_rate";
    publish_retained(&mut watch, topic, br#"{"bpm":70}"#).await;
    assert_eq!(fit.next_publish().await.topic, topic.as_bytes());

    // Only the operator may, and only a device that exists.
    assert_eq!(remove("alice-watch", &[]).0, 401);
    assert_eq!(remove("alice-watch", &[("x-operator-key", "wrong")]).0, 403);
    let (s, p) = remove("no-such-device", &op);
    assert_eq!(s, 404, "{p}");
    assert!(p.contains("no such device"), "{p}");
    let (s, p) = remove("alice-watch", &op);
    assert_eq!(s, 204, "{p}");

    // The open connection is closed as an administrative action, and the
    // password no longer lets it in, also after a reload of the file.
    closed_by_administrative_action(&mut watch).await;
    let again = || alice_watch_connects_again(&server);
    assert!(again().await.is_err(), "a removed device connected");
    server.reload(common::DEMO_DIRECTORY);
    assert!(again().await.is_err(), "the directory brought it back");
    assert_eq!(remove("alice-watch", &op).0, 404);

    // Alice sees the removal among her account events, and her devices.
    let t = common::demo_alice_token(&server);
    let (s, events) = http(&server, "GET", "/v1/me/account-events", Some(&t), None);
    assert_eq!(s, 200, "{events}");
    let names: Vec<&str> = events
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|e| e["event"].as_str())
        .collect();
    assert_eq!(
        names.last(),
        Some(&"device_removed_by_operator"),
        "{events}"
    );
    let (s, list) = http(&server, "GET", "/v1/me/devices", Some(&t), None);
    assert_eq!((s, list), (200, json!({"devices": []})));

    // A provider subscribing now gets no retained reading of the device.
    let mut fit2 = v5::connect(server.mqtt, "fit2", "fitcoach", "fitcoach-secret").await;
    fit2.subscribe("pii/+/+/heart_rate", v5::QoS::AtLeastOnce)
        .await;
    let password = register_device(&server, &t, "alice-band");
    let mut band = v5::connect(server.mqtt, "band", "alice-band", &password).await;
    let marker = "pii/alice/alice-band/heart_rate";
    assert_eq!(
        band.publish_acked(marker, br#"{"bpm":60}"#).await,
        v5::PubAckReason::Success
    );
    let first = fit2.next_publish().await;
    assert_eq!(
        first.topic,
        marker.as_bytes(),
        "a reading the removed device had retained was delivered"
    );
    let log = server.log();
    assert!(log.contains("device removed by the operator"), "{log}");
    assert!(
        !log.contains("alice-watch"),
        "the log names the device:\n{log}"
    );
}

/// Every response about a user states its times in the user's zone, with
/// the offset in force then, as the share history does: the same moment
/// does not read two ways on one account.
#[tokio::test]
async fn times_about_a_user_are_in_their_zone() {
    let key = format!("op-{}", uuid::Uuid::new_v4());
    let server = common::Server::start(common::Setup {
        env: vec![("CONSENTRY_OPERATOR_KEY".into(), key.clone())],
        ..Default::default()
    });
    let in_paris = common::assert_paris_time;
    let t = common::demo_alice_token(&server);
    let (s, changed) = http(
        &server,
        "DELETE",
        "/v1/me/preferences/share/fitcoach/heart_rate",
        Some(&t),
        None,
    );
    assert_eq!(s, 200, "{changed}");
    in_paris(&changed["receipt"]["at"]);
    let (s, receipts) = http(&server, "GET", "/v1/me/receipts", Some(&t), None);
    assert_eq!(s, 200, "{receipts}");
    let receipts = receipts.as_array().expect("a list");
    assert!(receipts.len() >= 2, "{receipts:?}");
    receipts.iter().for_each(|r| in_paris(&r["at"]));
    let (s, versions) = http(&server, "GET", "/v1/me/preferences/history", Some(&t), None);
    assert_eq!(s, 200, "{versions}");
    versions
        .as_array()
        .expect("a list")
        .iter()
        .for_each(|v| in_paris(&v["at"]));
    let (s, p) = common::http(
        &server,
        "POST",
        "/v1/me/devices",
        Some(&t),
        &[],
        Some(json!({"id": "alice-ring"})),
    );
    assert_eq!(s, 201, "{p}");
    let (s, p) = common::http(
        &server,
        "DELETE",
        "/v1/operator/devices/alice-ring",
        None,
        &[("x-operator-key", key.as_str())],
        None,
    );
    assert_eq!(s, 204, "{p}");
    let (s, events) = http(&server, "GET", "/v1/me/account-events", Some(&t), None);
    assert_eq!(s, 200, "{events}");
    let events = events.as_array().expect("a list");
    assert!(!events.is_empty());
    events.iter().for_each(|e| in_paris(&e["at"]));
}

/// The removed device's open connection ends with DISCONNECT 0x98.
async fn closed_by_administrative_action(client: &mut common::v5::Client) {
    match client.next().await {
        common::v5::Packet::Disconnect(d) => assert_eq!(
            d.reason_code,
            rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::AdministrativeAction
        ),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

/// Whether the demo's `alice-watch` password still lets it in.
async fn alice_watch_connects_again(server: &common::Server) -> Result<common::v5::Client, String> {
    common::v5::connect_with(common::v5::options(
        server.mqtt,
        "watch-again",
        Some(("alice-watch", "alice-watch-secret")),
    ))
    .await
}

/// Waits, if need be, until the current TOTP step has at least 10 s left, so
/// that codes of the steps around "now" stay within the allowed skew for
/// the rest of a short test; returns the time.
async fn unix_now_early_in_a_step() -> u64 {
    let now = unix_now();
    if now % 30 >= 20 {
        tokio::time::sleep(Duration::from_secs(30 - now % 30)).await;
        return unix_now();
    }
    now
}

#[tokio::test]
async fn a_new_authenticator_replaces_the_old_only_once_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("consentry.db");
    let key = rand::random();
    let api = Api::with_store(Store::open(&path, &key).unwrap());
    let old = register(&api, "tara").await;
    let now = unix_now_early_in_a_step().await;
    let (s, sess) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            json!({"user": "tara", "password": "correct horse battery",
                "totp": common::totp_at(&old, now - 30)}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{sess}");
    let t = sess["token"].as_str().unwrap().to_string();
    // A second session, made directly in the store (each login through the
    // API would use up one of the few codes within the skew).
    let other = "another-session-token-of-tara";
    Store::open(&path, &key)
        .unwrap()
        .create_session(
            &<sha2::Sha256 as sha2::Digest>::digest(other.as_bytes()).into(),
            "tara",
            chrono::Utc::now() + chrono::Duration::hours(1),
        )
        .unwrap();
    let (s, _) = api.get("/v1/me/preferences", Some(other)).await;
    assert_eq!(s, StatusCode::OK);

    // Nothing pending yet.
    let (s, p) = api
        .json("PUT", "/v1/me/totp", Some(&t), json!({"totp": "123456"}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{p}");
    // Starting asks both factors.
    let (s, p) = api
        .json(
            "POST",
            "/v1/me/totp",
            Some(&t),
            json!({"password": "wrong password!", "totp": common::totp_at(&old, now)}),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{p}");
    let (s, pending) = api
        .json(
            "POST",
            "/v1/me/totp",
            Some(&t),
            json!({"password": "correct horse battery", "totp": common::totp_at(&old, now)}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{pending}");
    assert!(pending["totp_uri"]
        .as_str()
        .unwrap()
        .starts_with("otpauth://totp/"));
    let new = pending["totp_secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);

    // A code that is not the new authenticator's is refused, and changes
    // nothing.
    let (s, p) = api
        .json(
            "PUT",
            "/v1/me/totp",
            Some(&t),
            json!({"totp": common::totp_at(&old, now + 30)}),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{p}");
    let (s, p) = api
        .json(
            "PUT",
            "/v1/me/totp",
            Some(&t),
            json!({"totp": common::totp_at(&new, now - 30)}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{p}");
    // This session goes on, the other has ended, and nothing is pending.
    let (s, _) = api.get("/v1/me/preferences", Some(&t)).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = api.get("/v1/me/preferences", Some(other)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = api
        .json(
            "PUT",
            "/v1/me/totp",
            Some(&t),
            json!({"totp": common::totp_at(&new, now)}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The old authenticator's next code no longer logs in; the new one's does.
    let login =
        |code: String| json!({"user": "tara", "password": "correct horse battery", "totp": code});
    let (s, p) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            login(common::totp_at(&old, now + 30)),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{p}");
    let (s, p) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            login(common::totp_at(&new, now + 30)),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
}

/// The names of the account events the user of `token` sees, oldest first.
async fn account_events(api: &Api, token: &str) -> Vec<String> {
    let (s, events) = api.get("/v1/me/account-events", Some(token)).await;
    assert_eq!(s, StatusCode::OK, "{events}");
    let events = events.as_array().expect("a list");
    events
        .iter()
        .map(|e| e["event"].as_str().expect("an event name").to_string())
        .collect()
}

#[tokio::test]
async fn the_operator_resets_a_lost_login_and_every_session_ends() {
    let api = Api::new();
    let old = register(&api, "uma").await;
    let now = unix_now();
    let (s, sess) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            json!({"user": "uma", "password": "correct horse battery",
                "totp": common::totp_at(&old, now)}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{sess}");
    let t = sess["token"].as_str().unwrap().to_string();
    let reset = |id: &str, key: Option<&str>| {
        let mut b = Request::builder()
            .method("POST")
            .uri(format!("/v1/operator/users/{id}/login-reset"));
        if let Some(k) = key {
            b = b.header("x-operator-key", k);
        }
        b.body(Body::empty()).unwrap()
    };
    // uma, having lost her authenticator, guesses codes until she is locked out.
    let guess = json!({"user": "uma", "password": "correct horse battery",
        "totp": common::totp_at(&old, now - 3600)});
    for _ in 0..ApiConfig::default().login_attempts {
        let (s, p) = api.json("POST", "/v1/sessions", None, guess.clone()).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{p}");
    }
    let (s, p) = api.json("POST", "/v1/sessions", None, guess).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{p}");
    let (s, _, _) = api.call(reset("uma", None)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = api.call(reset("uma", Some("not the key"))).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // An id no user can have is no user either (the authenticator's label
    // refuses a colon: that was a 500).
    for nobody in ["nobody", "a:b", "x%3Ay"] {
        let (s, p, _) = api.call(reset(nobody, Some(OPERATOR_KEY))).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{nobody}: {p}");
    }
    let (s, r, _) = api.call(reset("uma", Some(OPERATOR_KEY))).await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let (password, secret) = (
        r["password"].as_str().unwrap(),
        r["totp_secret"].as_str().unwrap(),
    );
    assert_ne!(secret, old);

    let (s, _) = api.get("/v1/me/preferences", Some(&t)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a session outlived the reset");
    let (s, p) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            json!({"user": "uma", "password": "correct horse battery",
                "totp": common::totp_at(secret, now + 30)}),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "the old password (the reset ended the lockout): {p}"
    );
    // In the same 30 s as her last login with the old secret: the new
    // secret's code is no replay of that one.
    let (s, p) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            json!({"user": "uma", "password": password,
                "totp": common::totp_at(secret, now)}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    // New recovery codes came with the reset.
    let codes = r["recovery_codes"].as_array().unwrap();
    assert_eq!(codes.len(), 10);
    let (s, p) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            json!({"user": "uma", "password": password, "recovery_code": codes[0]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");

    // Whoever holds the reset's secrets can act as uma: she can see that a
    // reset happened, and when, next to her own changes.
    let t = p["token"].as_str().unwrap().to_string();
    let (s, p) = api
        .json(
            "PUT",
            "/v1/me/password",
            Some(&t),
            json!({"password": password, "recovery_code": codes[1],
                "new_password": "uma's own passphrase"}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{p}");
    assert_eq!(
        account_events(&api, &t).await,
        [
            "login_reset_by_operator",
            "recovery_codes_replaced",
            "recovery_code_used",
            "recovery_code_used",
            "password_changed",
        ]
    );
    let (_, events) = api.get("/v1/me/account-events", Some(&t)).await;
    let at = events[0]["at"].as_str().unwrap();
    let at = chrono::DateTime::parse_from_rfc3339(at).expect("a time");
    assert!((at.timestamp() - now as i64).abs() < 300, "{at}");
}

/// A user who lost their authenticator gets back in with a recovery code
/// (and the password), enrols a new authenticator, and renews the codes;
/// each code works once, and wrong ones count as wrong TOTP codes do.
#[tokio::test]
async fn recovery_codes_let_a_user_who_lost_the_authenticator_back_in() {
    let api = Api::new();
    let reg = registration(&api, "vera").await;
    let codes: Vec<String> = serde_json::from_value(reg["recovery_codes"].clone()).unwrap();
    assert_eq!(codes.len(), 10);
    let with_code = |code: &str| json!({"user": "vera", "password": "correct horse battery", "recovery_code": code});

    // Typed sloppily, it still reads; the session says how many are left.
    let typed = codes[0].to_lowercase().replace('-', " ");
    let (s, sess) = api
        .json("POST", "/v1/sessions", None, with_code(&typed))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{sess}");
    assert_eq!(sess["recovery_codes_left"], 9);
    let token = sess["token"].as_str().unwrap().to_string();
    let (s, p) = api
        .json("POST", "/v1/sessions", None, with_code(&codes[0]))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a used code: {p}");
    // The wrong password with a good code gets nowhere, and does not use it.
    let (s, _) = api
        .json(
            "POST",
            "/v1/sessions",
            None,
            json!({"user": "vera", "password": "wrong horse battery", "recovery_code": codes[1]}),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Exactly one second factor.
    for (body, field) in [
        (
            json!({"user": "vera", "password": "correct horse battery"}),
            "totp",
        ),
        (
            json!({"user": "vera", "password": "correct horse battery",
                "totp": "000000", "recovery_code": codes[1]}),
            "recovery_code",
        ),
    ] {
        let (s, p) = api.json("POST", "/v1/sessions", None, body).await;
        assert_eq!(
            (s, p["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(field)),
            "{p}"
        );
    }

    // A new authenticator, asked for with a recovery code in place of TOTP.
    let (s, pending) = api
        .json(
            "POST",
            "/v1/me/totp",
            Some(&token),
            json!({"password": "correct horse battery", "recovery_code": codes[1]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{pending}");
    let new_secret = pending["totp_secret"].as_str().unwrap().to_string();
    let (s, p) = api
        .json(
            "PUT",
            "/v1/me/totp",
            Some(&token),
            json!({"totp": common::totp_now(&new_secret, "vera")}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{p}");
    let (s, left) = api.get("/v1/me/recovery-codes", Some(&token)).await;
    assert_eq!((s, left), (StatusCode::OK, json!({"left": 8})));

    // A new set replaces the old.
    let (s, renewed) = api
        .json(
            "POST",
            "/v1/me/recovery-codes",
            Some(&token),
            json!({"password": "correct horse battery", "recovery_code": codes[2]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{renewed}");
    let new_codes: Vec<String> = serde_json::from_value(renewed["recovery_codes"].clone()).unwrap();
    assert_eq!(new_codes.len(), 10);
    let (s, _) = api
        .json("POST", "/v1/sessions", None, with_code(&codes[3]))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a code of the old set");
    let (s, _) = api
        .json("POST", "/v1/sessions", None, with_code(&new_codes[0]))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    // vera can see each code she used and each change they let her make;
    // the first set, at registration, replaced nothing.
    assert_eq!(
        account_events(&api, &token).await,
        [
            "recovery_code_used",
            "recovery_code_used",
            "authenticator_changed",
            "recovery_code_used",
            "recovery_codes_replaced",
            "recovery_code_used",
        ]
    );

    // Wrong codes count against the name as wrong TOTP codes do (the
    // login just made cleared the count): after the limit even a good code
    // is refused for the window.
    for _ in 0..ApiConfig::default().login_attempts {
        let (s, _) = api
            .json(
                "POST",
                "/v1/sessions",
                None,
                with_code("AAAA-AAAA-AAAA-AAAA"),
            )
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let (s, p) = api
        .json("POST", "/v1/sessions", None, with_code(&new_codes[1]))
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{p}");
}

/// Through the real listener: a registered user who lost the authenticator
/// logs in with a recovery code and sees how many are left.
#[tokio::test]
async fn a_recovery_code_logs_in_through_the_real_listener() {
    let server = common::Server::demo();
    let reg = register_on(&server, "wren");
    let code = reg["recovery_codes"][0].as_str().unwrap();
    let login = json!({"user": "wren", "password": "correct horse battery", "recovery_code": code});
    let (s, sess) = http(&server, "POST", "/v1/sessions", None, Some(login.clone()));
    assert_eq!(s, 201, "{sess}");
    assert_eq!(sess["recovery_codes_left"], 9);
    let token = sess["token"].as_str().unwrap();
    let (s, left) = http(&server, "GET", "/v1/me/recovery-codes", Some(token), None);
    assert_eq!((s, left), (200, json!({"left": 9})));
    let (s, _) = http(&server, "POST", "/v1/sessions", None, Some(login));
    assert_eq!(s, 401, "a used code");
}

/// X.1363 9.1 6), 9.2 1)-2): users consent to a provider's purpose as it is
/// stated. Once a grant names it, its statement, category and retention
/// are fixed; new terms go under a new purpose id, which needs new consent.
#[tokio::test]
async fn a_purpose_users_consented_to_keeps_its_terms() {
    let api = Api::new();
    let provider = |statement: &str, days: u32, kinds: &[&str]| {
        json!({
            "id": "acme", "name": "Acme", "mqtt_password": "acme-secret-123",
            "controller": {"company": "Acme Ltd", "email": "dpo@acme.example"},
            "purposes": [{"id": "stats", "statement": statement,
                          "category": "Contracted Service", "kinds": kinds,
                          "retention_days": days}]
        })
    };
    let (s, p) = api
        .operator(
            "/v1/operator/providers",
            provider("Steps for stats", 30, &["steps"]),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    // Nobody granted it yet: its terms may still change (an update: 200).
    let (s, p) = api
        .operator(
            "/v1/operator/providers",
            provider("Steps for statistics", 30, &["steps"]),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    // So may its role, and an update that leaves the role out keeps it.
    let mut own = provider("Steps for statistics", 30, &["steps"]);
    own["role"] = json!("data");
    for update in [
        own.clone(),
        provider("Steps for statistics", 30, &["steps"]),
    ] {
        let (s, p) = api.operator("/v1/operator/providers", update).await;
        assert_eq!(s, StatusCode::OK, "{p}");
        let (_, one) = api.get("/v1/providers/acme", None).await;
        assert_eq!(one["role"], "data", "{one}");
    }
    own["role"] = json!("application");
    let (s, p) = api.operator("/v1/operator/providers", own).await;
    assert_eq!(s, StatusCode::OK, "{p}");

    let t = api.user("carol").await;
    let (s, c) = api
        .json(
            "PUT",
            "/v1/me/preferences/share/acme/steps",
            Some(&t),
            json!({"purpose": "stats"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");

    for (statement, days) in [
        ("Your steps are sold to advertisers", 30),
        ("Steps for statistics", 36500),
    ] {
        let (s, p) = api
            .operator(
                "/v1/operator/providers",
                provider(statement, days, &["steps"]),
            )
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{statement}, {days} days: {p}");
        assert!(p["detail"].as_str().unwrap().contains("stats"), "{p}");
    }
    let (_, one) = api.get("/v1/providers/acme", None).await;
    assert_eq!(one["purposes"][0]["statement"], "Steps for statistics");
    assert_eq!(one["purposes"][0]["retention_days"], 30);
    // Nor who the provider is: its receipts name it and its company.
    let mut renamed = provider("Steps for statistics", 30, &["steps"]);
    renamed["name"] = json!("DataBroker");
    let mut sold = provider("Steps for statistics", 30, &["steps"]);
    sold["controller"]["company"] = json!("DataBroker Inc");
    let mut policy = provider("Steps for statistics", 30, &["steps"]);
    policy["privacy_policy"] = json!("https://databroker.example/anything");
    for changed in [renamed, sold, policy] {
        let (s, p) = api.operator("/v1/operator/providers", changed).await;
        assert_eq!(s, StatusCode::CONFLICT, "{p}");
    }
    // A new address for its data protection officer is not a new party.
    let mut moved = provider("Steps for statistics", 30, &["steps"]);
    moved["controller"]["email"] = json!("privacy@acme.example");
    let (s, p) = api.operator("/v1/operator/providers", moved.clone()).await;
    assert_eq!(s, StatusCode::OK, "{p}");
    // Nor its role: with its company, it decides whether the receipts
    // call it a third party.
    let (_, one) = api.get("/v1/providers/acme", None).await;
    assert_eq!(one["role"], "application", "{one}");
    let mut own = moved.clone();
    own["role"] = json!("data");
    let (s, p) = api.operator("/v1/operator/providers", own).await;
    assert_eq!(s, StatusCode::CONFLICT, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("role"), "{p}");
    let (_, one) = api.get("/v1/providers/acme", None).await;
    assert_eq!(one["role"], "application", "{one}");
    // Asking for one more kind changes nothing the user granted.
    let (s, p) = api
        .operator(
            "/v1/operator/providers",
            provider("Steps for statistics", 30, &["steps", "heart_rate"]),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
}

/// Found by an outside review: a withdrawal of one grant read the
/// preferences' version before its change and asked for it, so a change
/// made meanwhile (another grant, another device) turned the withdrawal
/// into a 409 the client never asked for, and sharing went on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_is_never_refused_for_a_change_made_meanwhile() {
    let api = Arc::new(Api::new());
    let t = api.user("wendy").await;
    let grant = |api: Arc<Api>, t: String| async move {
        let (s, b) = api
            .json(
                "PUT",
                "/v1/me/preferences/share/fitcoach/heart_rate",
                Some(&t),
                json!({"purpose": "coaching"}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    };
    let (s, b) = api
        .json(
            "PUT",
            "/v1/me/preferences/collect/heart_rate",
            Some(&t),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let toggler = {
        let (api, t, stop) = (api.clone(), t.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for method in ["PUT", "DELETE"] {
                    api.json(
                        method,
                        "/v1/me/preferences/collect/steps",
                        Some(&t),
                        json!({}),
                    )
                    .await;
                }
            }
        })
    };
    for _ in 0..60 {
        grant(api.clone(), t.clone()).await;
        let (s, b) = api
            .json(
                "DELETE",
                "/v1/me/preferences/share/fitcoach/heart_rate",
                Some(&t),
                json!({}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "withdrawal refused: {b}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    toggler.await.unwrap();
    // Withdrawing what is not held is still a 404.
    let (s, _) = api
        .json(
            "DELETE",
            "/v1/me/preferences/share/fitcoach/heart_rate",
            Some(&t),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

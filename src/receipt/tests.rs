//! End-to-end tests of the receipt module on the demo directory: both
//! Kantara schemas, verification by an independent JWS implementation
//! (`jsonwebtoken`, on ring), Mode 1 order and escaping.

use chrono::{DateTime, TimeZone, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::*;
use crate::model::{Contact, Directory, Kind};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

pub(crate) fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 14, 15, 9, 26)
        .single()
        .expect("valid date")
}

/// `config/demo.toml` and the kinds of `config/consentry.toml`.
pub(crate) fn demo() -> (Directory, Vec<Kind>) {
    #[derive(Deserialize)]
    struct Kinds {
        kinds: Vec<Kind>,
    }
    let read = |p: &str| {
        std::fs::read_to_string(format!("{ROOT}/config/{p}")).expect("read demo configuration")
    };
    let dir: Directory = toml::from_str(&read("demo.toml")).expect("demo directory");
    let kinds: Kinds = toml::from_str(&read("consentry.toml")).expect("kinds");
    (dir, kinds.kinds)
}

pub(crate) fn operator() -> Operator {
    Operator {
        name: "Demo IoT Hub".into(),
        jurisdiction: "FR".into(),
        controller: Contact {
            company: "Demo Hub SAS".into(),
            name: "Data Protection Officer".into(),
            address: "2 avenue de l'Exemple, 69000 Lyon".into(),
            email: "dpo@hub.example".into(),
            phone: "+33 4 00 00 00 00".into(),
        },
        on_behalf: false,
        policy_uri: "https://hub.example/privacy".into(),
        collection_method: mapping::DEFAULT_COLLECTION_METHOD.into(),
        import_method: mapping::DEFAULT_IMPORT_METHOD.into(),
        collection_termination: mapping::DEFAULT_COLLECTION_TERMINATION.into(),
    }
}

fn spec(rel: &str) -> Value {
    let path = format!("{ROOT}/../shared/spec/{rel}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn schema(rel: &str) -> jsonschema::Validator {
    let s = spec(rel);
    // Both schemas declare draft-04.
    assert_eq!(s["$schema"], "http://json-schema.org/draft-04/schema#");
    jsonschema::draft4::new(&s).expect("schema compiles")
}

fn assert_valid(v: &jsonschema::Validator, instance: &Value, what: &str) {
    let errors: Vec<String> = v
        .iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{what}: {errors:#?}\n{instance:#}");
}

/// Demo receipts in every shape: alice (collection + sensitive sharing),
/// bob (collection only), alice with everything withdrawn, and a
/// non-core purpose with no termination text and a hostile statement.
fn demo_receipts(keys: &ReceiptKeys) -> Vec<SignedReceipt> {
    let (mut dir, kinds) = demo();
    let op = operator();
    let mut out = Vec::new();
    for i in 0..2 {
        let (user, prefs) = (&dir.users[i], &dir.preferences[i]);
        out.push(issue(keys, &op, user, prefs, &dir, &kinds, t0()).expect("issue"));
    }
    let mut none = dir.preferences[0].clone();
    none.collect.clear();
    none.share.clear();
    out.push(issue(keys, &op, &dir.users[0], &none, &dir, &kinds, t0()).expect("issue"));

    let p = &mut dir.providers[1].purposes[0];
    p.core = false;
    p.termination.clear();
    p.statement = "<script>alert('x')</script> & \"more\"".into();
    let mut prefs = dir.preferences[1].clone();
    prefs.share.push(crate::model::ShareGrant {
        provider: "insureco".into(),
        purpose: "pricing".into(),
        kind: "heart_rate".into(),
        mask: Default::default(),
        expires: Some(t0() + chrono::Duration::days(7)),
    });
    out.push(issue(keys, &op, &dir.users[1], &prefs, &dir, &kinds, t0()).expect("issue"));
    out
}

#[test]
fn embedded_schema_is_the_shared_one() {
    let embedded: Value = serde_json::from_str(verify::V08_SCHEMA).expect("json");
    assert_eq!(
        embedded,
        spec("kantara-cr-v0.8/kantara-cr-v0.8-schema.json")
    );
}

#[test]
fn validators_accept_the_published_examples() {
    // Guards against a validator that accepts everything.
    let v08 = schema("kantara-cr-v0.8/kantara-cr-v0.8-schema.json");
    assert_valid(
        &v08,
        &spec("kantara-cr-v0.8/kantara-cr-v0.8-example.json"),
        "v0.8 example",
    );
    assert!(!v08.is_valid(&serde_json::json!({"iat": "yesterday"})));
    let v11 = schema("kantara-cr-v1.1/kantara-consent-receipt-v1_1-schema.stripped.json");
    assert_valid(
        &v11,
        &spec("kantara-cr-v1.1/kantara-consent-receipt-v1_1-example.json"),
        "v1.1 example",
    );
    assert!(!v11.is_valid(&serde_json::json!({"version": "KI-CR-v1.1.0"})));
}

#[test]
fn demo_receipts_validate_against_both_schemas() {
    let v08 = schema("kantara-cr-v0.8/kantara-cr-v0.8-schema.json");
    let v11 = schema("kantara-cr-v1.1/kantara-consent-receipt-v1_1-schema.stripped.json");
    let keys = ReceiptKeys::generate();
    for (i, r) in demo_receipts(&keys).iter().enumerate() {
        let json = serde_json::to_value(&r.receipt).expect("ser");
        assert_valid(&v08, &json, &format!("v0.8 receipt {i}"));
        // Every field, not only those the permissive schema would accept
        // missing.
        for field in [
            "version",
            "jurisdiction",
            "iat",
            "moc",
            "jti",
            "publicKey",
            "dataController",
            "policyUri",
            "services",
            "sub",
            "sensitive",
            "spiCat",
        ] {
            assert!(json.get(field).is_some(), "receipt {i} lacks {field}");
        }
        let v11_json = serde_json::to_value(r.v1_1()).expect("ser");
        assert_valid(&v11, &v11_json, &format!("v1.1 receipt {i}"));
        assert_eq!(v11_json["consentReceiptID"], json["jti"]);
    }
}

#[test]
fn alice_receipt_in_detail() {
    let keys = ReceiptKeys::generate();
    let r = &demo_receipts(&keys)[0];
    let json = serde_json::to_value(&r.receipt).expect("ser");
    let fit = &json["services"][1]["purposes"][0];
    assert_eq!(fit["3rdPartyName"], "FitCoach SAS");
    assert_eq!(fit["thirdPartyDisclosure"], true);
    assert_eq!(fit["consentType"], "EXPLICIT");
    assert_eq!(
        fit["purposeCategory"],
        serde_json::json!(["Personalized Experience"])
    );
    assert_eq!(json["spiCat"], serde_json::json!(["Health"]));
    assert_eq!(json["dataController"]["company"], "Demo Hub SAS");
    // publicKey is the signing key's JWK.
    let jwk: Jwk = serde_json::from_str(&r.receipt.public_key).expect("jwk");
    assert_eq!(jwk.kid.as_deref(), Some(keys.active_kid()));

    let v11 = serde_json::to_value(r.v1_1()).expect("ser");
    let fit = &v11["services"][1]["purposes"][0];
    assert_eq!(
        fit["purposeCategory"],
        serde_json::json!(["5 - Personalized Experience"])
    );
    assert_eq!(
        fit["piiCategory"],
        serde_json::json!(["6 - Health", "15 - Behavioral"])
    );
    assert_eq!(fit["primaryPurpose"], true);
    assert_eq!(fit["thirdPartyName"], "FitCoach SAS");
    // The v1.1 schema really constrains us: a disclosure needs its name.
    let mut unnamed = v11.clone();
    unnamed["services"][1]["purposes"][0]
        .as_object_mut()
        .expect("object")
        .remove("thirdPartyName");
    let schema11 = schema("kantara-cr-v1.1/kantara-consent-receipt-v1_1-schema.stripped.json");
    assert!(schema11.is_valid(&v11));
    assert!(!schema11.is_valid(&unnamed));
    assert_eq!(
        v11["piiControllers"][0]["address"]["streetAddress"],
        "2 avenue de l'Exemple, 69000 Lyon"
    );
}

/// jsonwebtoken's view of our JWKS and token.
fn independent_decode(token: &str, jwks_json: &str) -> Result<Value, jsonwebtoken::errors::Error> {
    use jsonwebtoken::{decode, decode_header, jwk::JwkSet, Algorithm, DecodingKey, Validation};
    let set: JwkSet = serde_json::from_str(jwks_json).expect("jsonwebtoken reads our JWKS");
    let header = decode_header(token)?;
    let kid = header.kid.expect("kid in header");
    let jwk = set.find(&kid).expect("kid in JWKS");
    let key = DecodingKey::from_jwk(jwk)?;
    let mut v = Validation::new(Algorithm::EdDSA);
    // A receipt is a record, not a session token: it has no exp.
    v.required_spec_claims.clear();
    v.validate_exp = false;
    Ok(decode::<Value>(token, &key, &v)?.claims)
}

fn tamper(token: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
    use base64::Engine;
    let parts: Vec<&str> = token.split('.').collect();
    let payload = B64URL.decode(parts[1]).expect("b64");
    let text = String::from_utf8(payload).expect("utf8");
    let forged = text.replace("\"sensitive\":true", "\"sensitive\":false");
    assert_ne!(text, forged);
    format!("{}.{}.{}", parts[0], B64URL.encode(forged), parts[2])
}

#[test]
fn jws_verifies_with_jsonwebtoken() {
    let keys = ReceiptKeys::generate();
    let r = &demo_receipts(&keys)[0];
    let jwks = keys.jwks().to_json();
    let claims = independent_decode(&r.jws, &jwks).expect("jsonwebtoken verifies");
    assert_eq!(claims, serde_json::to_value(&r.receipt).expect("ser"));

    assert!(independent_decode(&tamper(&r.jws), &jwks).is_err());

    // The right kid, another key: same kid in a JWKS with a foreign x.
    let other = ReceiptKeys::generate();
    let mut wrong = other.jwks();
    wrong.keys[0].kid = Some(keys.active_kid().to_string());
    assert!(independent_decode(&r.jws, &wrong.to_json()).is_err());
}

#[test]
fn verify_accepts_ours_and_says_what_failed() {
    let keys = ReceiptKeys::generate();
    let jwks = keys.jwks();
    let r = &demo_receipts(&keys)[0];
    let ok = verify(&format!("  {}\n", r.jws), &jwks).expect("verifies");
    assert_eq!(ok.receipt, r.receipt);
    assert_eq!(ok.kid, keys.active_kid());

    let err = verify(&tamper(&r.jws), &jwks).expect_err("tampered");
    assert!(matches!(err, ReceiptError::Signature(_)), "{err}");
    assert!(err.to_string().contains("signature"), "{err}");

    let other = ReceiptKeys::generate();
    let err = verify(&r.jws, &other.jwks()).expect_err("wrong key");
    assert!(err.to_string().contains("not in the JWKS"), "{err}");
    let mut wrong = other.jwks();
    wrong.keys[0].kid = Some(keys.active_kid().to_string());
    assert!(matches!(
        verify(&r.jws, &wrong),
        Err(ReceiptError::Signature(_))
    ));

    assert!(matches!(
        verify("not a jws", &jwks),
        Err(ReceiptError::Malformed(_))
    ));
}

/// Validly signed payloads that are not good receipts fail on content.
#[test]
fn verify_checks_schema_and_completeness() {
    use ed25519_dalek::SigningKey;
    let key = SigningKey::from_bytes(&[5u8; 32]);
    let jwk = jws::jwk(&key.verifying_key());
    let kid = jwk.kid.clone().expect("kid");
    let jwks = Jwks { keys: vec![jwk] };
    let sign = |v: Value| jws::sign_compact(&key, &kid, v.to_string().as_bytes()).expect("sign");

    let keys = ReceiptKeys::generate();
    let good = serde_json::to_value(&demo_receipts(&keys)[0].receipt).expect("ser");

    let mut bad = good.clone();
    bad["iat"] = "yesterday".into();
    bad["services"][0]["purposes"][0]["thirdPartyDisclosure"] = "no".into();
    match verify(&sign(bad), &jwks) {
        Err(ReceiptError::Schema(errs)) => {
            assert_eq!(errs.len(), 2, "{errs:?}");
            assert!(
                errs[0].contains("/iat") || errs[1].contains("/iat"),
                "{errs:?}"
            );
        }
        other => panic!("expected a schema error, got {other:?}"),
    }

    let mut missing = good.clone();
    missing.as_object_mut().expect("object").remove("moc");
    let err = verify(&sign(missing), &jwks).expect_err("incomplete");
    assert!(matches!(err, ReceiptError::Incomplete(_)), "{err}");
    assert!(err.to_string().contains("moc"), "{err}");

    // Signed by `key`, but claiming the other key in publicKey.
    let err = verify(&sign(good), &jwks).expect_err("mismatch");
    assert!(err.to_string().contains("publicKey"), "{err}");
}

#[test]
fn old_receipts_verify_after_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(keystore::KEY_STORE_FILE);
    let mut keys = ReceiptKeys::open_with(&path, MasterKey::from_bytes([1; 32])).expect("create");
    let old = demo_receipts(&keys).remove(0);
    keys.rotate().expect("rotate");
    let new = demo_receipts(&keys).remove(0);
    assert_ne!(old.kid, new.kid);
    let jwks = ReceiptKeys::open_with(&path, MasterKey::from_bytes([1; 32]))
        .expect("reopen")
        .jwks();
    assert_eq!(verify(&old.jws, &jwks).expect("old").kid, old.kid);
    assert_eq!(verify(&new.jws, &jwks).expect("new").kid, new.kid);
    let json = jwks.to_json();
    assert!(independent_decode(&old.jws, &json).is_ok());
    assert!(independent_decode(&new.jws, &json).is_ok());
}

#[test]
fn mode1_text_has_the_18_fields_in_order() {
    let keys = ReceiptKeys::generate();
    for r in demo_receipts(&keys) {
        let text = r.mode1_text();
        let mut at = 0;
        for (i, name) in mode1::FIELD_NAMES.iter().enumerate() {
            let label = format!("{:>2}. {name} (", i + 1);
            let found = text[at..].find(&label).unwrap_or_else(|| {
                panic!("field {} {name:?} missing or out of order:\n{text}", i + 1)
            });
            at += found + label.len();
        }
        assert!(text.contains(&r.receipt.jti));
        assert!(text.contains("2026-03-14 15:09:26 UTC"));
    }
    let text = demo_receipts(&keys)[0].mode1_text();
    assert!(
        text.contains("FitCoach — purpose 2: Fitness coaching"),
        "{text}"
    );
    assert!(
        text.contains("FitCoach, purpose 2: Yes, to FitCoach SAS"),
        "{text}"
    );
    assert!(text.contains("Yes, to FitCoach SAS"), "{text}");
    assert!(text.contains("sensitive categories: Health"), "{text}");
    let withdrawn = demo_receipts(&keys)[2].mode1_text();
    assert!(withdrawn.contains("None: you currently consent to no collection or sharing."));
}

#[test]
fn mode1_html_escapes_a_hostile_purpose() {
    let keys = ReceiptKeys::generate();
    let r = &demo_receipts(&keys)[3];
    let html = r.mode1_html();
    assert!(!html.contains("<script>"), "{html}");
    assert!(
        html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;more&quot;"),
        "{html}"
    );
    for name in mode1::FIELD_NAMES {
        assert!(html.contains(&format!("<strong>{}</strong>", mode1::escape(name))));
    }
    // The only tags are ours.
    let tags: std::collections::BTreeSet<&str> = html
        .split('<')
        .skip(1)
        .filter_map(|t| t.split(['>', ' ']).next())
        .collect();
    let ours = [
        "!DOCTYPE", "html", "head", "meta", "title", "/title", "/head", "body", "h1", "/h1", "ol",
        "li", "strong", "/strong", "small", "/small", "ul", "/li", "/ul", "/ol", "/body", "/html",
    ];
    for t in tags {
        assert!(ours.contains(&t), "unexpected tag {t:?}");
    }
    // A newline in configuration text cannot fake a Mode 1 line.
    let mut receipt = r.receipt.clone();
    receipt.services[0].service_name = "X\n 9. Sensitive Data Y/N (forged)".into();
    let text = mode1::text(&receipt);
    assert_eq!(
        text.lines().filter(|l| l.starts_with(" 9. ")).count(),
        1,
        "{text}"
    );
    assert!(text.contains("X  9. Sensitive Data Y/N (forged)"), "{text}");
}

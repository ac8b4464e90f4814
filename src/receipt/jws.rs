//! Compact JWS (RFC 7515) with EdDSA over Ed25519 (RFC 8037), and the JWKS
//! (RFC 7517) that publishes the verifying keys.
//!
//! Only the framing is done here (base64url parts joined by dots); signing
//! and verifying are `ed25519-dalek`'s. Verification accepts `alg: EdDSA`
//! and nothing else, whatever the header claims, so a token cannot talk the
//! verifier into a weaker algorithm.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::ReceiptError;

pub const ALG: &str = "EdDSA";

/// One public key of the JWKS. Fields other than these are ignored, and
/// keys of other types may be present (they are skipped when verifying).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
}

/// The document served at `/.well-known/jwks.json`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

impl Jwks {
    /// Parses a JWKS document (e.g. a file given to `receipt verify --jwks`).
    pub fn from_json(text: &str) -> Result<Jwks, ReceiptError> {
        serde_json::from_str(text)
            .map_err(|e| ReceiptError::Malformed(format!("the JWKS is not a JWK set: {e}")))
    }

    pub fn to_json(&self) -> String {
        // A struct of strings always serializes.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    fn find(&self, kid: &str) -> Option<&Jwk> {
        self.keys.iter().find(|k| k.kid.as_deref() == Some(kid))
    }
}

/// RFC 7638 JWK thumbprint of an Ed25519 key (RFC 8037 section A.3): used as
/// the `kid`, so a key id cannot be reused for another key.
pub fn thumbprint(key: &VerifyingKey) -> String {
    // Members in lexicographic order, no whitespace, as RFC 7638 requires.
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        B64URL.encode(key.as_bytes())
    );
    B64URL.encode(Sha256::digest(canonical.as_bytes()))
}

/// The public JWK of `key`.
pub fn jwk(key: &VerifyingKey) -> Jwk {
    Jwk {
        kty: "OKP".into(),
        crv: Some("Ed25519".into()),
        x: Some(B64URL.encode(key.as_bytes())),
        kid: Some(thumbprint(key)),
        use_: Some("sig".into()),
        alg: Some(ALG.into()),
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

/// Signs `payload` (JSON bytes) as a compact JWS with `kid` in the header.
/// `typ` is JWT: the v0.8 receipt is a JWT claims set by design (`iat`,
/// `jti`, `sub` are JWT's names).
pub fn sign_compact(key: &SigningKey, kid: &str, payload: &[u8]) -> Result<String, ReceiptError> {
    let header = serde_json::to_vec(&Header {
        alg: ALG.into(),
        kid: Some(kid.into()),
        typ: Some("JWT".into()),
    })?;
    let input = format!("{}.{}", B64URL.encode(header), B64URL.encode(payload));
    let sig = key.sign(input.as_bytes());
    Ok(format!("{input}.{}", B64URL.encode(sig.to_bytes())))
}

/// Checks a compact JWS against `jwks`; returns the kid that verified it and
/// the payload bytes.
pub fn verify_compact(token: &str, jwks: &Jwks) -> Result<(String, Vec<u8>), ReceiptError> {
    let token = token.trim();
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ReceiptError::Malformed(
            "expected three base64url parts separated by dots".into(),
        ));
    };
    let part = |name: &str, v: &str| {
        B64URL
            .decode(v)
            .map_err(|e| ReceiptError::Malformed(format!("{name} is not base64url: {e}")))
    };
    let header: Header = serde_json::from_slice(&part("header", h)?)
        .map_err(|e| ReceiptError::Malformed(format!("header is not a JWS header: {e}")))?;
    if header.alg != ALG {
        return Err(ReceiptError::Signature(format!(
            "algorithm {:?} is not accepted (only EdDSA)",
            header.alg
        )));
    }
    let kid = header
        .kid
        .ok_or_else(|| ReceiptError::Signature("the header names no key (kid)".into()))?;
    let jwk = jwks
        .find(&kid)
        .ok_or_else(|| ReceiptError::Signature(format!("key {kid:?} is not in the JWKS")))?;
    let key = verifying_key(jwk)
        .map_err(|why| ReceiptError::Signature(format!("JWKS key {kid:?}: {why}")))?;
    let sig_bytes: [u8; 64] = part("signature", s)?
        .try_into()
        .map_err(|_| ReceiptError::Malformed("signature is not 64 bytes".into()))?;
    let input_len = h.len() + 1 + p.len();
    // verify_strict also rejects small-order keys and non-canonical
    // signatures, so one receipt has exactly one valid signature per key.
    key.verify_strict(
        &token.as_bytes()[..input_len],
        &Signature::from_bytes(&sig_bytes),
    )
    .map_err(|_| {
        ReceiptError::Signature(format!(
            "the signature does not match the payload under key {kid:?} \
             (the receipt was altered or signed by another key)"
        ))
    })?;
    Ok((kid, part("payload", p)?))
}

/// The Ed25519 key of an OKP JWK.
pub fn verifying_key(jwk: &Jwk) -> Result<VerifyingKey, String> {
    if jwk.kty != "OKP" || jwk.crv.as_deref() != Some("Ed25519") {
        return Err(format!(
            "not an Ed25519 key (kty {:?}, crv {:?})",
            jwk.kty, jwk.crv
        ));
    }
    let x = jwk.x.as_deref().ok_or("no x")?;
    let bytes: [u8; 32] = B64URL
        .decode(x)
        .map_err(|e| format!("x is not base64url: {e}"))?
        .try_into()
        .map_err(|_| "x is not 32 bytes".to_string())?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| "x is not a valid Ed25519 point".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc8037_thumbprint() {
        // RFC 8037, A.3: the thumbprint of the A.2 public key.
        let x = B64URL
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .expect("b64");
        let key = VerifyingKey::from_bytes(&x.try_into().expect("32")).expect("key");
        assert_eq!(
            thumbprint(&key),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn rfc8037_signature() {
        // RFC 8037, A.4: Ed25519 over "Example of Ed25519 signing".
        let d = B64URL
            .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
            .expect("b64");
        let key = SigningKey::from_bytes(&d.try_into().expect("32"));
        let input = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc";
        let sig = B64URL.encode(key.sign(input.as_bytes()).to_bytes());
        assert_eq!(
            sig,
            "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
        );
        // And our verifier accepts the RFC's token (no kid there: add one
        // by looking it up as the only key is impossible, so check the error).
        let jwks = Jwks {
            keys: vec![jwk(&key.verifying_key())],
        };
        let token = format!("{input}.{sig}");
        assert!(matches!(
            verify_compact(&token, &jwks),
            Err(ReceiptError::Signature(m)) if m.contains("kid")
        ));
    }

    #[test]
    fn rejects_other_algorithms_and_garbage() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let jwks = Jwks {
            keys: vec![jwk(&key.verifying_key())],
        };
        // alg none with an empty signature.
        let h = B64URL.encode(br#"{"alg":"none","kid":"x"}"#);
        let p = B64URL.encode(b"{}");
        assert!(matches!(
            verify_compact(&format!("{h}.{p}."), &jwks),
            Err(ReceiptError::Signature(m)) if m.contains("none")
        ));
        assert!(matches!(
            verify_compact("a.b", &jwks),
            Err(ReceiptError::Malformed(_))
        ));
        assert!(matches!(
            verify_compact("!!.b.c", &jwks),
            Err(ReceiptError::Malformed(_))
        ));
    }
}

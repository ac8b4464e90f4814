//! Verifying a receipt the way its holder would: the signature against the
//! operator's published JWKS, then the payload against the Kantara v0.8
//! schema, then the fields the v0.8 text requires but its schema does not.
//! The first check that fails is the error, and says why.

use std::sync::LazyLock;

use serde_json::Value;

use super::error::ReceiptError;
use super::jws::{self, Jwk, Jwks};
use super::v08::{ConsentReceipt, VERSION};

/// The General JSON Schema of section 4, as extracted to
/// shared/spec/kantara-cr-v0.8/ (a test checks that the copies agree). It is
/// embedded so that verifying needs no file but the receipt and the JWKS.
pub const V08_SCHEMA: &str = include_str!("kantara-cr-v0.8-schema.json");

// Compiled once: the schema is a constant, and compiling it costs more than
// validating a receipt.
static V08_VALIDATOR: LazyLock<Result<jsonschema::Validator, String>> = LazyLock::new(|| {
    let schema: Value =
        serde_json::from_str(V08_SCHEMA).map_err(|e| format!("embedded schema: {e}"))?;
    // The schema declares draft-04.
    jsonschema::draft4::new(&schema).map_err(|e| format!("embedded schema: {e}"))
});

/// A receipt whose signature and content checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedReceipt {
    /// The JWKS key that signed it.
    pub kid: String,
    pub receipt: ConsentReceipt,
}

/// Validates a JSON value against the v0.8 schema; the error lists every
/// violation as `instance path: reason`.
pub fn validate_v08(value: &Value) -> Result<(), ReceiptError> {
    let validator = V08_VALIDATOR
        .as_ref()
        .map_err(|e| ReceiptError::Schema(vec![e.clone()]))?;
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| {
            let path = e.instance_path().to_string();
            format!("{}: {e}", if path.is_empty() { "/" } else { &path })
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ReceiptError::Schema(errors))
    }
}

/// Checks a receipt against `jwks`: signature first (nothing in an unsigned
/// payload is trusted), then the v0.8 schema, then completeness.
///
/// `input` is the compact JWS (surrounding whitespace ignored), or a JSON
/// object with the JWS in its `jws` member, as the preference manager's API
/// returns receipts, so that a user can verify the file they saved.
pub fn verify(input: &str, jwks: &Jwks) -> Result<VerifiedReceipt, ReceiptError> {
    let input = input.trim();
    let token = if input.starts_with('{') {
        let wrapper: Value = serde_json::from_str(input)
            .map_err(|e| ReceiptError::Malformed(format!("not a JWS, nor JSON: {e}")))?;
        match wrapper.get("jws").and_then(Value::as_str) {
            Some(t) => t.to_string(),
            None => {
                return Err(ReceiptError::Malformed(
                    "a JSON document without a \"jws\" string: the signed receipt is the \
                     compact JWS (header.payload.signature)"
                        .into(),
                ))
            }
        }
    } else {
        input.to_string()
    };
    let (kid, payload) = jws::verify_compact(&token, jwks)?;
    let value: Value = serde_json::from_slice(&payload)
        .map_err(|e| ReceiptError::Malformed(format!("the payload is not JSON: {e}")))?;
    validate_v08(&value)?;
    let receipt: ConsentReceipt =
        serde_json::from_value(value).map_err(|e| ReceiptError::Incomplete(e.to_string()))?;
    if receipt.version != VERSION {
        return Err(ReceiptError::Incomplete(format!(
            "version is {:?}, not {VERSION:?}",
            receipt.version
        )));
    }
    if receipt.jti.trim().is_empty() || receipt.sub.trim().is_empty() {
        return Err(ReceiptError::Incomplete(
            "the receipt ID (jti) and PII principal ID (sub) must not be empty".into(),
        ));
    }
    // A receipt that names its signing key as a JWK must name the key that
    // actually signed it. (Other receipts may carry a URL there.)
    if let Ok(named) = serde_json::from_str::<Jwk>(&receipt.public_key) {
        let signer = jwks
            .keys
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid.as_str()));
        if signer.map(|k| &k.x) != Some(&named.x) {
            return Err(ReceiptError::Signature(format!(
                "the receipt's publicKey is not key {kid:?} that signed it"
            )));
        }
    }
    Ok(VerifiedReceipt { kid, receipt })
}

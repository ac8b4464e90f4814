//! Recovery codes: the way back into an account for a user who lost their
//! authenticator, without asking the operator, so that losing a phone does
//! not take away the means to withdraw consent. Ten one-time codes, shown
//! once (at registration, on request, and with an operator's login reset);
//! one stands in for a TOTP code, with the password, and is used up.
//!
//! A code carries 80 random bits, so its SHA-256 digest (bound to the user)
//! cannot be reversed by search, and guessing one online is bounded by the
//! login limits like guessing a TOTP code.

use axum::http::StatusCode;
use axum::Json;
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::users::Factors;
use super::{AuthUser, Body, Peer, Problem, State};

pub const COUNT: usize = 10;
/// Characters of a code, without the dashes.
const LEN: usize = 16;

/// A new set of codes: the codes to show once, and the digests to keep.
pub struct Fresh {
    pub codes: Vec<String>,
    pub digests: Vec<[u8; 32]>,
}

pub fn generate(user: &str) -> Fresh {
    let mut codes = Vec::with_capacity(COUNT);
    let mut digests = Vec::with_capacity(COUNT);
    for _ in 0..COUNT {
        let mut raw = [0u8; LEN * 5 / 8];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let plain = data_encoding::BASE32_NOPAD.encode(&raw);
        digests.push(digest(user, &plain));
        let groups: Vec<&str> = (0..LEN).step_by(4).map(|i| &plain[i..i + 4]).collect();
        codes.push(groups.join("-"));
    }
    Fresh { codes, digests }
}

/// The digest of a code as the user typed it (any case, dashes and spaces
/// anywhere), or `None` if it cannot be a code.
pub fn digest_of_typed(user: &str, typed: &str) -> Option<[u8; 32]> {
    let plain: String = typed
        .chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let valid = plain.len() == LEN
        && plain
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b));
    valid.then(|| digest(user, &plain))
}

fn digest(user: &str, plain: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"consentry recovery code v1\0");
    h.update(user.as_bytes());
    h.update([0]);
    h.update(plain.as_bytes());
    h.finalize().into()
}

/// Stores a new set for `user`, replacing the old; returns the codes.
/// `first`: the set made at registration.
pub async fn replace(
    state: &super::ApiState,
    user: &str,
    first: bool,
) -> Result<Vec<String>, Problem> {
    let fresh = generate(user);
    let (name, digests) = (user.to_string(), fresh.digests);
    state
        .with_store(move |s| s.replace_recovery_codes(&name, &digests, first))
        .await?;
    Ok(fresh.codes)
}

#[derive(Serialize, ToSchema)]
pub struct RecoveryCodes {
    /// Each good for one login in place of a TOTP code. Shown once: keep
    /// them somewhere other than the authenticator's device.
    recovery_codes: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RecoveryCodesLeft {
    left: usize,
}

/// A new set of recovery codes; the old ones stop working. Both factors are
/// asked again (a recovery code may stand in for the TOTP code).
#[utoipa::path(post, path = "/v1/me/recovery-codes", request_body = Factors, security(("session" = [])),
    responses((status = 201, body = RecoveryCodes),
        (status = 401, body = Problem, description = "wrong password or code"),
        (status = 429, body = Problem, description = "too many failed attempts, as for login",
            headers(("Retry-After" = u64, description = "Whole seconds until the lockout ends")))))]
pub async fn renew(
    state: State,
    AuthUser(user): AuthUser,
    Peer(peer): Peer,
    Body(f): Body<Factors>,
) -> Result<(StatusCode, Json<RecoveryCodes>), Problem> {
    f.check(&state, &user, peer).await?;
    let recovery_codes = replace(&state, &user, false).await?;
    tracing::info!("recovery codes renewed");
    Ok((StatusCode::CREATED, Json(RecoveryCodes { recovery_codes })))
}

/// How many unused recovery codes the user has.
#[utoipa::path(get, path = "/v1/me/recovery-codes", security(("session" = [])),
    responses((status = 200, body = RecoveryCodesLeft)))]
pub async fn left(
    state: State,
    AuthUser(user): AuthUser,
) -> Result<Json<RecoveryCodesLeft>, Problem> {
    let left = state
        .with_store(move |s| s.recovery_codes_left(&user))
        .await?;
    Ok(Json(RecoveryCodesLeft { left }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_read_back_however_they_are_typed() {
        let fresh = generate("alice");
        assert_eq!(fresh.codes.len(), COUNT);
        let code = &fresh.codes[0];
        assert_eq!(code.len(), LEN + 3);
        assert_eq!(digest_of_typed("alice", code), Some(fresh.digests[0]));
        let sloppy = format!(" {} ", code.to_lowercase().replace('-', " "));
        assert_eq!(digest_of_typed("alice", &sloppy), Some(fresh.digests[0]));
        // Bound to the user, and nothing else reads as a code.
        assert_ne!(digest_of_typed("bob", code), Some(fresh.digests[0]));
        for not_a_code in ["123456", "AAAA-AAAA-AAAA-AAA0", "AAAA-AAAA-AAAA-AAA", ""] {
            assert_eq!(digest_of_typed("alice", not_a_code), None, "{not_a_code}");
        }
        let distinct: std::collections::HashSet<_> = fresh.digests.iter().collect();
        assert_eq!(distinct.len(), COUNT);
    }
}

//! Accounts: registration with TOTP enrolment, two-factor login, devices.

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, Secret, TOTP};
use utoipa::ToSchema;

use super::{AuthUser, Body, Problem, State};
use crate::model::{Device, User};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// Login name: 1–64 of a–z, 0–9, `-`, `_`, `.`.
    id: String,
    /// At least 12 characters.
    password: String,
    /// IANA time zone; collection windows are read in it.
    time_zone: String,
    jurisdiction: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Registered {
    id: String,
    /// Scan into an authenticator app; its codes are the second factor.
    totp_uri: String,
    /// The same secret, base32, for typing in.
    totp_secret: String,
}

pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

fn totp(secret: Vec<u8>, issuer: &str, user: &str) -> Result<TOTP, Problem> {
    TOTP::new(
        Algorithm::SHA1,
        6,
        1,
        30,
        secret,
        Some(issuer.to_string()),
        user.to_string(),
    )
    .map_err(|e| Problem::internal_logged(&e))
}

/// The time step whose code `code` is, within the allowed skew around now;
/// the latest if more than one matches.
fn code_step(t: &TOTP, code: &str) -> Option<u64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    let current = now / t.step;
    let skew = u64::from(t.skew);
    (current.saturating_sub(skew)..=current + skew)
        .rev()
        .find(|step| bool::from(t.generate(step * t.step).as_bytes().ct_eq(code.as_bytes())))
}

async fn hash(password: String) -> Result<String, Problem> {
    tokio::task::spawn_blocking(move || crate::auth::hash_password(&password))
        .await
        .map_err(|_| Problem::internal())
}

/// Register a user (the PII principal) and enrol TOTP.
#[utoipa::path(post, path = "/v1/users", request_body = Registration,
    responses((status = 201, body = Registered), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn register(
    state: State,
    Body(r): Body<Registration>,
) -> Result<(StatusCode, Json<Registered>), Problem> {
    if !valid_id(&r.id) {
        return Err(Problem::unprocessable("use 1–64 of a–z, 0–9, '-', '_', '.'").field("id"));
    }
    if r.password.chars().count() < 12 {
        return Err(Problem::unprocessable("at least 12 characters").field("password"));
    }
    if r.time_zone.parse::<chrono_tz::Tz>().is_err() {
        return Err(Problem::unprocessable("not an IANA time zone").field("time_zone"));
    }
    let secret = Secret::generate_secret()
        .to_bytes()
        .map_err(|e| Problem::internal_logged(&e))?;
    let t = totp(secret.clone(), &state.config.totp_issuer, &r.id)?;
    let password_hash = hash(r.password).await?;
    let user = User {
        id: r.id.clone(),
        time_zone: r.time_zone,
        jurisdiction: r.jurisdiction,
    };
    let prefs = state.prefs.clone();
    tokio::task::spawn_blocking(move || prefs.register_user(user, &password_hash, &secret))
        .await
        .map_err(|_| Problem::internal())??;
    Ok((
        StatusCode::CREATED,
        Json(Registered {
            id: r.id,
            totp_uri: t.get_url(),
            totp_secret: t.get_secret_base32(),
        }),
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    user: String,
    password: String,
    /// The current 6-digit code of the enrolled authenticator.
    totp: String,
}

#[derive(Serialize, ToSchema)]
pub struct Session {
    /// Send as `Authorization: Bearer <token>`.
    token: String,
    expires_at: DateTime<Utc>,
}

/// Log in with password and TOTP code (two factors, X.1363 10.2).
#[utoipa::path(post, path = "/v1/sessions", request_body = Login,
    responses((status = 201, body = Session),
        (status = 401, body = Problem, description = "wrong user name, password or code, or a code already used"),
        (status = 429, body = Problem, description = "too many failed logins for this user name",
            headers(("Retry-After" = u64, description = "Whole seconds until the lockout ends")))))]
pub async fn login(
    state: State,
    Body(l): Body<Login>,
) -> Result<(StatusCode, Json<Session>), Problem> {
    if let Some(left) = state.limiter.locked_for(&l.user) {
        // Whole seconds, rounded up: retrying after them is not refused again.
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        let secs = secs.max(1);
        return Err(Problem::too_many(format!(
            "too many failed logins for this user; try again in {secs} s"
        ))
        .retry_after(secs));
    }
    let prefs = state.prefs.clone();
    let user = l.user.clone();
    let issuer = state.config.totp_issuer.clone();
    let ok = tokio::task::spawn_blocking(move || -> Result<bool, Problem> {
        let auth = prefs
            .store()
            .user_auth(&user)
            .map_err(|e| Problem::internal_logged(&e))?;
        let Some(auth) = auth else {
            // Same work for unknown names, so timing does not tell.
            let _ = crate::auth::Credentials::verify_dummy(l.password.as_bytes());
            return Ok(false);
        };
        let password_ok = auth
            .password_hash
            .as_deref()
            .and_then(|h| PasswordHash::new(h).ok())
            .is_some_and(|h| {
                argon2::Argon2::default()
                    .verify_password(l.password.as_bytes(), &h)
                    .is_ok()
            });
        let step = match auth.totp_secret {
            Some(secret) => code_step(&totp(secret, &issuer, &user)?, l.totp.trim()),
            None => None,
        };
        let Some(step) = step.filter(|_| password_ok) else {
            return Ok(false);
        };
        // RFC 6238 §5.2: a code is good for one login. Both factors were
        // right; the code still counts as wrong if its step, or a later one,
        // was accepted before.
        prefs
            .store()
            .accept_totp_step(&user, step)
            .map_err(|e| Problem::internal_logged(&e))
    })
    .await
    .map_err(|_| Problem::internal())??;
    if !ok {
        state.limiter.failed(&l.user);
        tracing::info!("failed login");
        return Err(Problem::unauthorized("wrong user name, password or code"));
    }
    state.limiter.succeeded(&l.user);
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let expires_at = Utc::now() + chrono::Duration::seconds(state.config.session_ttl_secs as i64);
    let prefs = state.prefs.clone();
    let user = l.user.clone();
    tokio::task::spawn_blocking(move || prefs.store().create_session(&hash, &user, expires_at))
        .await
        .map_err(|_| Problem::internal())?
        .map_err(|e| Problem::internal_logged(&e))?;
    Ok((StatusCode::CREATED, Json(Session { token, expires_at })))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    /// The device's MQTT user name: 1–64 of a–z, 0–9, `-`, `_`, `.`.
    id: String,
}

#[derive(Serialize, ToSchema)]
pub struct DeviceCredentials {
    id: String,
    mqtt_username: String,
    /// Shown once; only its hash is kept.
    mqtt_password: String,
}

/// Register a device bound to the logged-in user; returns its MQTT credentials once.
#[utoipa::path(post, path = "/v1/me/devices", request_body = NewDevice, security(("session" = [])),
    responses((status = 201, body = DeviceCredentials), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn register_device(
    state: State,
    AuthUser(user): AuthUser,
    Body(d): Body<NewDevice>,
) -> Result<(StatusCode, Json<DeviceCredentials>), Problem> {
    if !valid_id(&d.id) {
        return Err(Problem::unprocessable("use 1–64 of a–z, 0–9, '-', '_', '.'").field("id"));
    }
    let mut raw = [0u8; 18];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let password = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let device = Device {
        id: d.id.clone(),
        user,
        password_hash: Some(hash(password.clone()).await?),
        cert_sha256: None,
    };
    let prefs = state.prefs.clone();
    tokio::task::spawn_blocking(move || prefs.register_device(device))
        .await
        .map_err(|_| Problem::internal())??;
    Ok((
        StatusCode::CREATED,
        Json(DeviceCredentials {
            mqtt_username: d.id.clone(),
            id: d.id,
            mqtt_password: password,
        }),
    ))
}

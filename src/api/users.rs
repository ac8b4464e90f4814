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

use super::login_limiter::{Locked, Source};
use super::{ApiState, AuthUser, Body, CurrentSession, Path, Peer, Problem, State};
use crate::model::{valid_id, Device, User, ID_RULE};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// Login name: 1–64 of a–z, 0–9, `-`, `_`, `.`, starting with a letter or digit.
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
    /// One-time codes that stand in for a TOTP code if the authenticator is
    /// lost. Shown once.
    recovery_codes: Vec<String>,
}

/// The second factor of a request: a TOTP code, or a recovery code.
pub enum SecondFactor {
    Totp(String),
    Recovery(String),
}

/// The second factor from a body's `totp` and `recovery_code`: exactly one.
fn second_factor(
    totp: Option<String>,
    recovery_code: Option<String>,
) -> Result<SecondFactor, Problem> {
    match (totp, recovery_code) {
        (Some(t), None) => Ok(SecondFactor::Totp(t)),
        (None, Some(r)) => Ok(SecondFactor::Recovery(r)),
        (None, None) => Err(
            Problem::unprocessable("a TOTP code, or a recovery code, is required").field("totp"),
        ),
        (Some(_), Some(_)) => Err(Problem::unprocessable(
            "send either a TOTP code or a recovery code, not both",
        )
        .field("recovery_code")),
    }
}

pub(super) fn totp(secret: Vec<u8>, issuer: &str, user: &str) -> Result<TOTP, Problem> {
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

/// The time step whose code `code` is, within the allowed skew around now
/// (the latest if more than one matches), and the latest step any code is
/// accepted for now.
fn code_step(t: &TOTP, code: &str) -> Option<(u64, u64)> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    let current = now / t.step;
    let skew = u64::from(t.skew);
    let newest = current + skew;
    (current.saturating_sub(skew)..=newest)
        .rev()
        .find(|step| bool::from(t.generate(step * t.step).as_bytes().ct_eq(code.as_bytes())))
        .map(|step| (step, newest))
}

/// Register a user (the PII principal) and enrol TOTP.
#[utoipa::path(post, path = "/v1/users", request_body = Registration,
    responses((status = 201, body = Registered), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn register(
    state: State,
    Body(r): Body<Registration>,
) -> Result<(StatusCode, Json<Registered>), Problem> {
    if !valid_id(&r.id) {
        return Err(Problem::unprocessable(ID_RULE).field("id"));
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
    let password_hash = state.hash_password(r.password).await?;
    let user = User {
        id: r.id.clone(),
        time_zone: r.time_zone,
        jurisdiction: r.jurisdiction,
    };
    let prefs = state.prefs.clone();
    tokio::task::spawn_blocking(move || prefs.register_user(user, &password_hash, &secret))
        .await
        .map_err(|_| Problem::internal())??;
    let recovery_codes = super::recovery::replace(&state, &r.id, true).await?;
    Ok((
        StatusCode::CREATED,
        Json(Registered {
            id: r.id,
            totp_uri: t.get_url(),
            totp_secret: t.get_secret_base32(),
            recovery_codes,
        }),
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    user: String,
    password: String,
    /// The current 6-digit code of the enrolled authenticator; or, instead,
    /// `recovery_code`.
    totp: Option<String>,
    /// One of the user's unused recovery codes, instead of `totp`.
    recovery_code: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Session {
    /// Send as `Authorization: Bearer <token>`.
    token: String,
    expires_at: DateTime<Utc>,
    /// When a recovery code was used: how many are left.
    #[serde(skip_serializing_if = "Option::is_none")]
    recovery_codes_left: Option<usize>,
}

/// The 429 for a lockout.
fn locked(Locked(left): Locked) -> Problem {
    // Whole seconds, rounded up: retrying after them is not refused again.
    let secs = (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1);
    Problem::too_many(format!(
        "too many failed logins for this user; try again in {secs} s"
    ))
    .retry_after(secs)
}

/// What passed [`check_factors`].
pub struct Passed {
    /// A recovery code was used: how many the user has left.
    pub recovery_codes_left: Option<usize>,
}

/// Checks `user`'s password and second factor, both factors of X.1363
/// 10.2, within the login limits; a code that passes is used up (RFC 6238
/// §5.2). A failure is counted, and answered with `wrong`.
pub(super) async fn check_factors(
    state: &ApiState,
    user: &str,
    password: String,
    second: SecondFactor,
    from: Source,
    wrong: &'static str,
) -> Result<Passed, Problem> {
    // The place is taken before the slow check, so parallel guesses count.
    let attempt = state.limiter.try_password(user, from).map_err(locked)?;
    let prefs = state.prefs.clone();
    let name = user.to_string();
    // The TOTP secret if the password is right (None: the user has none).
    let secret = state
        .password_work(from, move || -> Result<Option<Option<Vec<u8>>>, Problem> {
            let auth = prefs
                .store()
                .user_auth(&name)
                .map_err(|e| Problem::internal_logged(&e))?;
            let Some(auth) = auth else {
                // Same work for unknown names, so timing does not tell.
                let _ = crate::auth::Credentials::verify_dummy(password.as_bytes());
                return Ok(None);
            };
            let password_ok = auth
                .password_hash
                .as_deref()
                .and_then(|h| PasswordHash::new(h).ok())
                .is_some_and(|h| {
                    argon2::Argon2::default()
                        .verify_password(password.as_bytes(), &h)
                        .is_ok()
                });
            Ok(password_ok.then_some(auth.totp_secret))
        })
        .await??;
    let Some(secret) = secret else {
        attempt.failed();
        tracing::info!(factor = "password", "failed login");
        return Err(Problem::unauthorized(wrong));
    };
    drop(attempt);
    let attempt = state.limiter.try_code(user).map_err(locked)?;
    match judge_second(state, user, secret, second).await? {
        Second::Passed {
            recovery_codes_left,
        } => {
            drop(attempt);
            state.limiter.succeeded(user, from);
            if let Some(left) = recovery_codes_left {
                tracing::info!(left, "recovery code used");
            }
            Ok(Passed {
                recovery_codes_left,
            })
        }
        Second::Wrong => {
            attempt.failed();
            tracing::info!(factor = "second", "failed login");
            Err(Problem::unauthorized(wrong))
        }
        Second::Used => {
            attempt.failed();
            tracing::info!(factor = "second", "failed login: code already used");
            // Only someone with the password and a current code gets here, so
            // saying why tells a guesser nothing, and tells a user to wait.
            Err(Problem::unauthorized(
                "this code, or a later one, was already used; wait for the authenticator's next one",
            ))
        }
    }
}

/// What a second factor came to, once the password was right.
enum Second {
    Passed {
        recovery_codes_left: Option<usize>,
    },
    Wrong,
    /// A current TOTP code whose step, or a later one, was accepted before.
    Used,
}

/// Judges `user`'s second factor against their TOTP `secret` (None: they
/// have none) or their recovery codes; one that passes is used up.
async fn judge_second(
    state: &ApiState,
    user: &str,
    secret: Option<Vec<u8>>,
    second: SecondFactor,
) -> Result<Second, Problem> {
    let name = user.to_string();
    match second {
        SecondFactor::Recovery(typed) => {
            let Some(digest) = super::recovery::digest_of_typed(user, &typed) else {
                return Ok(Second::Wrong);
            };
            let left = state
                .with_store(move |s| s.use_recovery_code(&name, &digest))
                .await?;
            Ok(match left {
                Some(left) => Second::Passed {
                    recovery_codes_left: Some(left),
                },
                None => Second::Wrong,
            })
        }
        SecondFactor::Totp(code) => {
            let step = match secret {
                Some(secret) => {
                    code_step(&totp(secret, &state.config.totp_issuer, user)?, code.trim())
                }
                None => None,
            };
            let Some((step, newest)) = step else {
                return Ok(Second::Wrong);
            };
            let fresh = state
                .with_store(move |s| s.accept_totp_step(&name, step, newest))
                .await?;
            Ok(if fresh {
                Second::Passed {
                    recovery_codes_left: None,
                }
            } else {
                Second::Used
            })
        }
    }
}

/// Log in with password and TOTP code (two factors, X.1363 10.2).
///
/// A wrong password counts against the name from the address it came from;
/// the right password with a wrong or used code counts against the name from
/// everywhere. Either way, after `api.login_attempts` within
/// `api.login_window_secs` the answer is 429.
#[utoipa::path(post, path = "/v1/sessions", request_body = Login,
    responses((status = 201, body = Session),
        (status = 401, body = Problem, description = "wrong user name, password or code, or a code already used"),
        (status = 429, body = Problem, description = "too many failed logins for this user name from this address, or with wrong codes from anywhere",
            headers(("Retry-After" = u64, description = "Whole seconds until the lockout ends")))))]
pub async fn login(
    state: State,
    Peer(peer): Peer,
    Body(l): Body<Login>,
) -> Result<(StatusCode, Json<Session>), Problem> {
    let passed = check_factors(
        &state,
        &l.user,
        l.password,
        second_factor(l.totp, l.recovery_code)?,
        Source::of(peer),
        "wrong user name, password or code",
    )
    .await?;
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
    Ok((
        StatusCode::CREATED,
        Json(Session {
            token,
            expires_at,
            recovery_codes_left: passed.recovery_codes_left,
        }),
    ))
}

/// Log out: the token of this request stops working at once.
#[utoipa::path(delete, path = "/v1/sessions/current", security(("session" = [])),
    responses((status = 204, description = "the session has ended"),
        (status = 401, body = Problem, description = "no session, or one that has already ended")))]
pub async fn logout(state: State, session: CurrentSession) -> Result<StatusCode, Problem> {
    let prefs = state.prefs.clone();
    tokio::task::spawn_blocking(move || prefs.store().delete_session(&session.token_hash))
        .await
        .map_err(|_| Problem::internal())?
        .map_err(|e| Problem::internal_logged(&e))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Log out everywhere: every session of the user ends, this one included
/// (e.g. after losing a phone that was logged in).
#[utoipa::path(delete, path = "/v1/me/sessions", security(("session" = [])),
    responses((status = 204, description = "every session of the user has ended")))]
pub async fn logout_everywhere(
    state: State,
    AuthUser(user): AuthUser,
) -> Result<StatusCode, Problem> {
    let prefs = state.prefs.clone();
    let ended = tokio::task::spawn_blocking(move || prefs.store().delete_sessions(&user, None))
        .await
        .map_err(|_| Problem::internal())?
        .map_err(|e| Problem::internal_logged(&e))?;
    tracing::info!(ended, "logged out everywhere");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    /// The current password.
    password: String,
    /// The current code of the enrolled authenticator; or `recovery_code`.
    totp: Option<String>,
    /// One of the user's unused recovery codes, instead of `totp`.
    recovery_code: Option<String>,
    /// At least 12 characters.
    new_password: String,
}

/// Change the password. Both current factors are asked again, so that a
/// session token alone cannot take the account; every other session ends.
/// From then on the password is the user's own: reloading a directory file
/// that lists a login for this user no longer replaces it.
#[utoipa::path(put, path = "/v1/me/password", request_body = PasswordChange, security(("session" = [])),
    responses((status = 204, description = "changed; the user's other sessions have ended"),
        (status = 401, body = Problem, description = "wrong password or code, or a code already used"),
        (status = 422, body = Problem, description = "the new password is too short"),
        (status = 429, body = Problem, description = "too many failed attempts, as for login",
            headers(("Retry-After" = u64, description = "Whole seconds until the lockout ends")))))]
pub async fn change_password(
    state: State,
    session: CurrentSession,
    Peer(peer): Peer,
    Body(c): Body<PasswordChange>,
) -> Result<StatusCode, Problem> {
    if c.new_password.chars().count() < 12 {
        return Err(Problem::unprocessable("at least 12 characters").field("new_password"));
    }
    check_factors(
        &state,
        &session.user,
        c.password,
        second_factor(c.totp, c.recovery_code)?,
        Source::of(peer),
        "wrong password or code",
    )
    .await?;
    let new_hash = state.hash_password(c.new_password).await?;
    let prefs = state.prefs.clone();
    let ended = tokio::task::spawn_blocking(move || -> Result<usize, crate::store::StoreError> {
        prefs.store().set_own_password(&session.user, &new_hash)?;
        prefs
            .store()
            .delete_sessions(&session.user, Some(&session.token_hash))
    })
    .await
    .map_err(|_| Problem::internal())?
    .map_err(|e| Problem::internal_logged(&e))?;
    tracing::info!(other_sessions_ended = ended, "password changed");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    /// The device's MQTT user name: 1–64 of a–z, 0–9, `-`, `_`, `.`, starting with a
    /// letter or digit.
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
        return Err(Problem::unprocessable(ID_RULE).field("id"));
    }
    let mut raw = [0u8; 18];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let password = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let device = Device {
        id: d.id.clone(),
        user,
        password_hash: Some(state.hash_password(password.clone()).await?),
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

#[derive(Serialize, ToSchema)]
pub struct DeviceList {
    /// The ids (MQTT user names) of the user's devices, sorted.
    devices: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AccountEventItem {
    /// In the user's zone.
    at: chrono::DateTime<chrono::FixedOffset>,
    event: crate::store::AccountEvent,
}

/// Changes to how the logged-in user logs in, oldest first: their password
/// and authenticator changes, every login reset by the operator, whose
/// new secrets let whoever holds them act as the user, and each of their
/// devices the operator removed.
#[utoipa::path(get, path = "/v1/me/account-events", security(("session" = [])),
    responses((status = 200, body = Vec<AccountEventItem>)))]
pub async fn account_events(
    state: State,
    AuthUser(user): AuthUser,
) -> Result<Json<Vec<AccountEventItem>>, Problem> {
    let tz = super::local_time::zone(&state, &user);
    let prefs = state.prefs.clone();
    let events = tokio::task::spawn_blocking(move || prefs.store().account_events(&user))
        .await
        .map_err(|_| Problem::internal())?
        .map_err(|e| Problem::internal_logged(&e))?;
    Ok(Json(
        events
            .into_iter()
            .map(|(at, event)| AccountEventItem {
                at: super::local_time::local(at, tz),
                event,
            })
            .collect(),
    ))
}

/// The logged-in user's devices.
#[utoipa::path(get, path = "/v1/me/devices", security(("session" = [])),
    responses((status = 200, body = DeviceList)))]
pub async fn list_devices(state: State, AuthUser(user): AuthUser) -> Json<DeviceList> {
    Json(DeviceList {
        devices: state.prefs.devices_of(&user),
    })
}

/// Remove one of the logged-in user's devices (sold, lost, replaced). Its
/// MQTT credentials stop working, its open connection is closed (MQTT 5:
/// DISCONNECT 0x98, administrative action), nothing it publishes is
/// collected for the user any more, and reloading a directory file that
/// still lists it does not bring it back. Registering the id again does,
/// without the retained messages it had left: they are cleared.
#[utoipa::path(delete, path = "/v1/me/devices/{id}", security(("session" = [])),
    params(("id" = String, Path, description = "the device's id")),
    responses((status = 204, description = "removed"),
        (status = 404, body = Problem, description = "the user has no such device")))]
pub async fn remove_device(
    state: State,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    let prefs = state.prefs.clone();
    let device = id.clone();
    let topics = tokio::task::spawn_blocking(move || prefs.remove_device(&user, &device))
        .await
        .map_err(|_| Problem::internal())??;
    // The ACT already keeps them from anyone; this keeps them from coming
    // back if the id is registered again.
    if let Some(n) = &state.notifier {
        n.clear_retained(topics);
    }
    // No id: device ids often name their owner (README, logs carry no ids).
    tracing::info!("device removed by its user");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Factors {
    /// The current password.
    password: String,
    /// The current code of the enrolled authenticator; or `recovery_code`.
    totp: Option<String>,
    /// One of the user's unused recovery codes, instead of `totp`.
    recovery_code: Option<String>,
}

impl Factors {
    /// Checks both factors again for a logged-in `user` (a session token
    /// alone must not be enough to take over the account).
    pub(super) async fn check(
        self,
        state: &ApiState,
        user: &str,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Passed, Problem> {
        let second = second_factor(self.totp, self.recovery_code)?;
        let wrong = "wrong password or code";
        check_factors(state, user, self.password, second, Source::of(peer), wrong).await
    }
}

#[derive(Serialize, ToSchema)]
pub struct PendingTotp {
    /// Scan into the new authenticator app, then confirm with one of its codes.
    totp_uri: String,
    /// The same secret, base32, for typing in.
    totp_secret: String,
    /// Confirm before this, or start again.
    confirm_by: DateTime<Utc>,
}

/// How long a new authenticator may wait for its confirming code.
const ENROL_WITHIN_SECS: i64 = 600;

/// Start moving TOTP to a new authenticator (a new phone, say). Both current
/// factors are asked; the answer is a new secret, which replaces the old
/// one only once `PUT /v1/me/totp` confirms it with one of its codes. Until
/// then the old authenticator goes on working.
#[utoipa::path(post, path = "/v1/me/totp", request_body = Factors, security(("session" = [])),
    responses((status = 201, body = PendingTotp),
        (status = 401, body = Problem, description = "wrong password or code, or a code already used"),
        (status = 429, body = Problem, description = "too many failed attempts, as for login",
            headers(("Retry-After" = u64, description = "Whole seconds until the lockout ends")))))]
pub async fn start_totp_enrolment(
    state: State,
    AuthUser(user): AuthUser,
    Peer(peer): Peer,
    Body(f): Body<Factors>,
) -> Result<(StatusCode, Json<PendingTotp>), Problem> {
    f.check(&state, &user, peer).await?;
    let secret = Secret::generate_secret()
        .to_bytes()
        .map_err(|e| Problem::internal_logged(&e))?;
    let t = totp(secret.clone(), &state.config.totp_issuer, &user)?;
    let confirm_by = Utc::now() + chrono::Duration::seconds(ENROL_WITHIN_SECS);
    let prefs = state.prefs.clone();
    tokio::task::spawn_blocking(move || prefs.store().set_pending_totp(&user, &secret, confirm_by))
        .await
        .map_err(|_| Problem::internal())?
        .map_err(|e| Problem::internal_logged(&e))?;
    Ok((
        StatusCode::CREATED,
        Json(PendingTotp {
            totp_uri: t.get_url(),
            totp_secret: t.get_secret_base32(),
            confirm_by,
        }),
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TotpConfirmation {
    /// The current code of the new authenticator.
    totp: String,
}

/// Confirm the new authenticator with one of its codes: it replaces the old
/// one, and every other session of the user ends. A wrong code counts as a
/// failed login with the right password would (for the name, everywhere).
#[utoipa::path(put, path = "/v1/me/totp", request_body = TotpConfirmation, security(("session" = [])),
    responses((status = 204, description = "the new authenticator is in use; the user's other sessions have ended"),
        (status = 401, body = Problem, description = "not a current code of the new authenticator"),
        (status = 404, body = Problem, description = "no enrolment pending (never started, confirmed, or expired)"),
        (status = 429, body = Problem, description = "too many failed attempts",
            headers(("Retry-After" = u64, description = "Whole seconds until the lockout ends")))))]
pub async fn confirm_totp_enrolment(
    state: State,
    session: CurrentSession,
    Peer(peer): Peer,
    Body(c): Body<TotpConfirmation>,
) -> Result<StatusCode, Problem> {
    let from = Source::of(peer);
    let attempt = state.limiter.try_code(&session.user).map_err(locked)?;
    let prefs = state.prefs.clone();
    let user = session.user.clone();
    let pending = tokio::task::spawn_blocking(move || prefs.store().pending_totp(&user))
        .await
        .map_err(|_| Problem::internal())?
        .map_err(|e| Problem::internal_logged(&e))?
        .ok_or_else(|| {
            Problem::not_found("no new authenticator is waiting to be confirmed; start with POST")
        })?;
    let t = totp(pending.clone(), &state.config.totp_issuer, &session.user)?;
    let Some((step, _)) = code_step(&t, c.totp.trim()) else {
        attempt.failed();
        return Err(Problem::unauthorized(
            "not a current code of the new authenticator",
        ));
    };
    let prefs = state.prefs.clone();
    let user = session.user.clone();
    let ended = tokio::task::spawn_blocking(move || -> Result<usize, crate::store::StoreError> {
        prefs.store().activate_totp(&session.user, &pending, step)?;
        prefs
            .store()
            .delete_sessions(&session.user, Some(&session.token_hash))
    })
    .await
    .map_err(|_| Problem::internal())?
    .map_err(|e| Problem::internal_logged(&e))?;
    drop(attempt);
    // A right code from the user's new authenticator ends what wrong ones counted.
    state.limiter.succeeded(&user, from);
    tracing::info!(
        other_sessions_ended = ended,
        "new TOTP authenticator enrolled"
    );
    Ok(StatusCode::NO_CONTENT)
}

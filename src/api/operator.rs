//! Operator endpoints: register providers (with their T&C) and kinds.

use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use base64::Engine;
use rand::RngCore;

use super::users::totp;
use super::{Body, Operator, Path, Problem, State};
use crate::model::{valid_id, Contact, Kind, Provider, ProviderRole, Purpose, ID_RULE};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProvider {
    id: String,
    name: String,
    /// application (the default for a new provider) or data. Left out when
    /// updating a provider, its current role stays.
    role: Option<ProviderRole>,
    /// Its MQTT password; only an argon2 hash is kept. Left out when
    /// updating a provider, its current MQTT login stays.
    mqtt_password: Option<String>,
    controller: Contact,
    jurisdiction: Option<String>,
    privacy_policy: Option<String>,
    purposes: Vec<Purpose>,
}

#[derive(Serialize, ToSchema)]
pub struct Created {
    id: String,
}

/// Register or update a provider and its T&C.
#[utoipa::path(post, path = "/v1/operator/providers", request_body = NewProvider, security(("operator" = [])),
    responses((status = 201, description = "registered", body = Created), (status = 200, description = "updated", body = Created), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn put_provider(
    state: State,
    _: Operator,
    Body(p): Body<NewProvider>,
) -> Result<(StatusCode, Json<Created>), Problem> {
    if !valid_id(&p.id) {
        return Err(Problem::unprocessable(ID_RULE).field("id"));
    }
    let role = match p.role {
        Some(role) => role,
        None => state
            .prefs
            .providers()
            .into_iter()
            .find(|old| old.id == p.id)
            .map(|old| old.role)
            .unwrap_or_default(),
    };
    let mut provider = Provider {
        id: p.id.clone(),
        name: p.name,
        role,
        password_hash: None,
        cert_sha256: None,
        controller: p.controller,
        jurisdiction: p.jurisdiction,
        privacy_policy: p.privacy_policy,
        purposes: p.purposes,
    };
    // Checked again where every provider change is; here first so that a
    // refused one costs no password hash.
    if let Err(bad) = provider.check_terms() {
        return Err(Problem::unprocessable(bad.message).field(bad.field));
    }
    if let Some(pw) = p.mqtt_password {
        provider.password_hash = Some(state.hash_password(pw).await?);
    }
    let prefs = state.prefs.clone();
    let created = tokio::task::spawn_blocking(move || prefs.put_provider(provider))
        .await
        .map_err(|_| Problem::internal())??;
    Ok((created_or_ok(created), Json(Created { id: p.id })))
}

/// Declare a kind of data, or change one that no user's preferences name
/// (409 otherwise: users consented to it as it is).
#[utoipa::path(post, path = "/v1/operator/kinds", request_body = Kind, security(("operator" = [])),
    responses((status = 201, description = "declared", body = Created), (status = 200, description = "updated, or unchanged", body = Created), (status = 403, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn put_kind(
    state: State,
    _: Operator,
    Body(k): Body<Kind>,
) -> Result<(StatusCode, Json<Created>), Problem> {
    if !valid_id(&k.name) {
        return Err(Problem::unprocessable(ID_RULE).field("name"));
    }
    let name = k.name.clone();
    let prefs = state.prefs.clone();
    let created = tokio::task::spawn_blocking(move || prefs.put_kind(k))
        .await
        .map_err(|_| Problem::internal())??;
    Ok((created_or_ok(created), Json(Created { id: name })))
}

/// 201 for what a request created, 200 for what it updated.
fn created_or_ok(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

#[derive(Serialize, ToSchema)]
pub struct LoginReset {
    user: String,
    /// A new random password, shown once: hand it to the user, who should
    /// change it (`PUT /v1/me/password`).
    password: String,
    /// The new authenticator secret, shown once, for the user to scan.
    totp_uri: String,
    totp_secret: String,
    /// New recovery codes, shown once; the old ones stop working (whoever
    /// held the lost factor may hold them too).
    recovery_codes: Vec<String>,
}

/// Reset a user's login for a user who lost their password or authenticator,
/// once the operator has verified who is asking (outside consentry): a new
/// random password, TOTP secret and recovery codes replace the old ones,
/// and every session of the user ends. Preferences, devices and history are untouched.
#[utoipa::path(post, path = "/v1/operator/users/{id}/login-reset", security(("operator" = [])),
    params(("id" = String, Path, description = "the user's id")),
    responses((status = 201, body = LoginReset), (status = 403, body = Problem),
        (status = 404, body = Problem, description = "no such user")))]
pub async fn reset_login(
    state: State,
    _: Operator,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<LoginReset>), Problem> {
    // Before any work: an id no user can have (the TOTP label refuses a
    // colon, say) is not a server fault, and argon2 is not spent on nobody.
    if !crate::model::valid_id(&id) || state.prefs.user(&id).is_none() {
        return Err(Problem::not_found(format!("no such user {id:?}")));
    }
    let mut raw = [0u8; 18];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let password = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let secret = totp_rs::Secret::generate_secret()
        .to_bytes()
        .map_err(|e| Problem::internal_logged(&e))?;
    let t = totp(secret.clone(), &state.config.totp_issuer, &id)?;
    let hash = state.hash_password(password.clone()).await?;
    let prefs = state.prefs.clone();
    let user = id.clone();
    tokio::task::spawn_blocking(move || prefs.store().reset_login(&user, &hash, &secret))
        .await
        .map_err(|_| Problem::internal())?
        .map_err(|e| match e {
            crate::store::StoreError::NotFound { .. } => {
                Problem::not_found(format!("no such user {id:?}"))
            }
            e => Problem::internal_logged(&e),
        })?;
    let recovery_codes = super::recovery::replace(&state, &id, false).await?;
    // The user's lockout ends with their old secrets.
    state.limiter.clear(&id);
    tracing::info!("login reset by the operator");
    Ok((
        StatusCode::CREATED,
        Json(LoginReset {
            user: id,
            password,
            totp_uri: t.get_url(),
            totp_secret: t.get_secret_base32(),
            recovery_codes,
        }),
    ))
}

/// Remove a device, whoever's it is (reported stolen, or taken out of
/// service), as its user can: its MQTT credentials stop working, its open
/// connection is closed (MQTT 5: DISCONNECT 0x98), nothing it publishes is
/// collected any more, its retained messages are cleared, and a directory
/// file that still lists it does not bring it back (its user can register
/// the id again). The user sees the removal in their account events.
#[utoipa::path(delete, path = "/v1/operator/devices/{id}", security(("operator" = [])),
    params(("id" = String, Path, description = "the device's id")),
    responses((status = 204, description = "removed"), (status = 403, body = Problem),
        (status = 404, body = Problem, description = "no such device")))]
pub async fn remove_device(
    state: State,
    _: Operator,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    let prefs = state.prefs.clone();
    let topics = tokio::task::spawn_blocking(move || prefs.remove_device_as_operator(&id))
        .await
        .map_err(|_| Problem::internal())??;
    if let Some(n) = &state.notifier {
        n.clear_retained(topics);
    }
    // No id: device ids often name their owner (README, logs carry no ids).
    tracing::info!("device removed by the operator");
    Ok(StatusCode::NO_CONTENT)
}

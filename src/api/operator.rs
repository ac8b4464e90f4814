//! Operator endpoints: register providers (with their T&C) and kinds.

use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::users::valid_id;
use super::{Body, Operator, Problem, State};
use crate::model::{Contact, Kind, Provider, ProviderRole, Purpose};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProvider {
    id: String,
    name: String,
    #[serde(default)]
    role: ProviderRole,
    /// Its MQTT password; only an argon2 hash is kept.
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
    responses((status = 201, body = Created), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn put_provider(
    state: State,
    _: Operator,
    Body(p): Body<NewProvider>,
) -> Result<(StatusCode, Json<Created>), Problem> {
    if !valid_id(&p.id) {
        return Err(Problem::unprocessable("use 1–64 of a–z, 0–9, '-', '_', '.'").field("id"));
    }
    if p.purposes.is_empty() {
        return Err(
            Problem::unprocessable("a provider declares at least one purpose").field("purposes"),
        );
    }
    let password_hash = match p.mqtt_password {
        Some(pw) => Some(
            tokio::task::spawn_blocking(move || crate::auth::hash_password(&pw))
                .await
                .map_err(|_| Problem::internal())?,
        ),
        None => None,
    };
    let provider = Provider {
        id: p.id.clone(),
        name: p.name,
        role: p.role,
        password_hash,
        cert_sha256: None,
        controller: p.controller,
        jurisdiction: p.jurisdiction,
        privacy_policy: p.privacy_policy,
        purposes: p.purposes,
    };
    let prefs = state.prefs.clone();
    tokio::task::spawn_blocking(move || prefs.put_provider(provider))
        .await
        .map_err(|_| Problem::internal())??;
    Ok((StatusCode::CREATED, Json(Created { id: p.id })))
}

/// Declare a kind of data, or change one that no user's preferences name
/// (409 otherwise: users consented to it as it is).
#[utoipa::path(post, path = "/v1/operator/kinds", request_body = Kind, security(("operator" = [])),
    responses((status = 201, body = Created), (status = 403, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn put_kind(
    state: State,
    _: Operator,
    Body(k): Body<Kind>,
) -> Result<(StatusCode, Json<Created>), Problem> {
    if !valid_id(&k.name) {
        return Err(Problem::unprocessable("use 1–64 of a–z, 0–9, '-', '_', '.'").field("name"));
    }
    let name = k.name.clone();
    let prefs = state.prefs.clone();
    tokio::task::spawn_blocking(move || prefs.put_kind(k))
        .await
        .map_err(|_| Problem::internal())??;
    Ok((StatusCode::CREATED, Json(Created { id: name })))
}

//! Providers and their T&C, public so users can read them before consenting
//! (X.1363 9.2.1). Secrets are never part of the view.

use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::{Path, Problem, State};
use crate::model::{Contact, Provider, ProviderRole, Purpose};

#[derive(Serialize, ToSchema)]
pub struct ProviderView {
    id: String,
    name: String,
    role: ProviderRole,
    controller: Contact,
    jurisdiction: Option<String>,
    privacy_policy: Option<String>,
    purposes: Vec<Purpose>,
}

impl From<Provider> for ProviderView {
    fn from(p: Provider) -> Self {
        ProviderView {
            id: p.id,
            name: p.name,
            role: p.role,
            controller: p.controller,
            jurisdiction: p.jurisdiction,
            privacy_policy: p.privacy_policy,
            purposes: p.purposes,
        }
    }
}

/// Every registered provider with its full T&C.
#[utoipa::path(get, path = "/v1/providers", responses((status = 200, body = Vec<ProviderView>)))]
pub async fn list(state: State) -> Json<Vec<ProviderView>> {
    Json(
        state
            .prefs
            .providers()
            .into_iter()
            .map(Into::into)
            .collect(),
    )
}

/// One provider's T&C.
#[utoipa::path(get, path = "/v1/providers/{id}", params(("id" = String, Path)),
    responses((status = 200, body = ProviderView), (status = 404, body = Problem)))]
pub async fn get_one(state: State, Path(id): Path<String>) -> Result<Json<ProviderView>, Problem> {
    state
        .prefs
        .providers()
        .into_iter()
        .find(|p| p.id == id)
        .map(|p| Json(p.into()))
        .ok_or_else(|| Problem::not_found(format!("no provider {id:?}")))
}

//! A user's consent receipts, in every form the Kantara spec knows: the
//! Mode 2 JSON, the signed compact JWS, and Mode 1 plain language as text
//! or HTML — chosen by `?format=` or the Accept header.

use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{AuthUser, Path, Problem, Query, State};
use crate::receipt::{mode1, ConsentReceipt, ConsentReceiptV11};

#[derive(Serialize, ToSchema)]
pub struct ReceiptSummary {
    jti: String,
    version: u64,
    /// When it was issued, in the user's zone.
    at: DateTime<FixedOffset>,
}

/// The logged-in user's receipts, oldest first.
#[utoipa::path(get, path = "/v1/me/receipts", security(("session" = [])),
    responses((status = 200, body = Vec<ReceiptSummary>)))]
pub async fn list(
    state: State,
    AuthUser(user): AuthUser,
) -> Result<Json<Vec<ReceiptSummary>>, Problem> {
    let tz = super::local_time::zone(&state, &user);
    let prefs = state.prefs.clone();
    let all = tokio::task::spawn_blocking(move || prefs.store().receipts(&user))
        .await
        .map_err(|_| Problem::internal())?
        .map_err(|e| Problem::internal_logged(&e))?;
    Ok(Json(
        all.into_iter()
            .map(|r| ReceiptSummary {
                jti: r.jti,
                version: r.version,
                at: super::local_time::local(r.at, tz),
            })
            .collect(),
    ))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct Format {
    /// json (default: Kantara v0.8 with its JWS), v1.1 (the Kantara v1.1
    /// rendering), jws, text or html; otherwise the Accept header decides.
    format: Option<String>,
}

/// A receipt as `?format=json` answers: as issued, with its time in the
/// user's zone like every other time the API gives about a user.
#[derive(Serialize)]
struct StoredReceiptView<'a> {
    jti: &'a str,
    version: u64,
    at: DateTime<FixedOffset>,
    json: &'a serde_json::Value,
    jws: &'a str,
}

/// One receipt as JSON (Mode 2, with its JWS), compact JWS, or Mode 1 text/HTML.
#[utoipa::path(get, path = "/v1/me/receipts/{jti}", params(("jti" = String, Path), Format),
    security(("session" = [])),
    responses((status = 200, description = "the receipt"), (status = 404, body = Problem)))]
pub async fn get_one(
    state: State,
    AuthUser(user): AuthUser,
    Path(jti): Path<String>,
    Query(q): Query<Format>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let tz = super::local_time::zone(&state, &user);
    let prefs = state.prefs.clone();
    let stored = tokio::task::spawn_blocking(move || prefs.store().receipt(&user, &jti))
        .await
        .map_err(|_| Problem::internal())?
        .map_err(|e| Problem::internal_logged(&e))?
        .ok_or_else(|| Problem::not_found("no such receipt"))?;
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = q.format.unwrap_or_else(|| {
        if accept.contains("application/jose") {
            "jws".into()
        } else if accept.contains("text/html") {
            "html".into()
        } else if accept.contains("text/plain") {
            "text".into()
        } else {
            "json".into()
        }
    });
    let receipt = || -> Result<ConsentReceipt, Problem> {
        serde_json::from_value(stored.json.clone()).map_err(|e| Problem::internal_logged(&e))
    };
    Ok(match format.as_str() {
        "json" => Json(StoredReceiptView {
            jti: &stored.jti,
            version: stored.version,
            at: super::local_time::local(stored.at, tz),
            json: &stored.json,
            jws: &stored.jws,
        })
        .into_response(),
        "v1.1" => Json(ConsentReceiptV11::from(&receipt()?)).into_response(),
        "jws" => (
            [(header::CONTENT_TYPE, "application/jose")],
            stored.jws.clone(),
        )
            .into_response(),
        "text" => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            mode1::text(&receipt()?),
        )
            .into_response(),
        "html" => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            mode1::html(&receipt()?),
        )
            .into_response(),
        other => {
            return Err(Problem::unprocessable(format!(
                "unknown format {other:?}: use json, v1.1, jws, text or html"
            ))
            .field("format"))
        }
    })
}

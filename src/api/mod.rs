//! The preference manager's HTTP API (X.1363 10.2): JSON under `/v1`.
//!
//! `router(state)` is the whole API, tested with `oneshot` and served by
//! `consentry serve`. Users see and change only their own data; operator
//! endpoints need the operator key; only provider listings, the JWKS and the
//! OpenAPI document are public. Errors are `application/problem+json`
//! (RFC 9457) naming the offending field, never internals.

mod error;
mod history;
mod local_time;
pub(crate) mod login_limiter;
mod operator;
mod preferences;
mod providers;
mod receipts;
mod recovery;
mod users;

pub mod bounded;
pub mod tls;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, RawPathParams, Request,
};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::OpenApi;

use crate::password_work::{PasswordWork, WorkError};
pub use error::{Challenge, Problem};
use login_limiter::{LoginLimiter, Source};

use crate::config::ApiConfig;
use crate::ledger::Ledger;
use crate::notice::Notifier;
use crate::prefs::PreferenceManager;
use crate::receipt::Issuer;

/// Everything the handlers share.
pub struct ApiState {
    pub prefs: Arc<PreferenceManager>,
    pub config: ApiConfig,
    /// SHA-256 of the operator key.
    pub operator_key_sha256: [u8; 32],
    /// Signs consent receipts; its JWKS is served as it is now, so a key
    /// rotation shows at once.
    pub receipts: Option<Arc<Issuer>>,
    pub ledger: Option<Ledger>,
    pub notifier: Option<Notifier>,
    limiter: LoginLimiter,
    /// argon2 runs, bounded; the broker's own when served with it.
    password_work: Arc<PasswordWork>,
}

impl ApiState {
    pub fn new(prefs: Arc<PreferenceManager>, config: ApiConfig, operator_key: &str) -> ApiState {
        ApiState {
            prefs,
            limiter: LoginLimiter::new(
                config.login_attempts,
                Duration::from_secs(config.login_window_secs),
            ),
            config,
            operator_key_sha256: Sha256::digest(operator_key.as_bytes()).into(),
            receipts: None,
            ledger: None,
            notifier: None,
            password_work: Arc::new(
                PasswordWork::per_core(
                    crate::config::ServerConfig::default().max_waiting_password_checks,
                )
                .per_source(crate::config::ServerConfig::default().max_password_checks_per_address),
            ),
        }
    }

    /// Shares the bound on argon2 runs with the MQTT listener.
    pub fn with_password_work(mut self, work: Arc<PasswordWork>) -> ApiState {
        self.password_work = work;
        self
    }

    /// Runs `f` (argon2) for a caller at `from` within the bounds; busy is
    /// 503 with Retry-After.
    pub(crate) async fn password_work<T, F>(&self, from: Source, f: F) -> Result<T, Problem>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.password_work.run(from, f).await.map_err(|e| match e {
            WorkError::Busy => Problem::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "too many password checks are waiting; try again shortly",
            )
            .retry_after(1),
            WorkError::Failed => Problem::internal(),
        })
    }

    /// Runs `f` on the store off the async workers (SQLite blocks).
    pub(crate) async fn with_store<T, F>(&self, f: F) -> Result<T, Problem>
    where
        T: Send + 'static,
        F: FnOnce(&crate::store::Store) -> Result<T, crate::store::StoreError> + Send + 'static,
    {
        let prefs = self.prefs.clone();
        tokio::task::spawn_blocking(move || f(prefs.store()))
            .await
            .map_err(|_| Problem::internal())?
            .map_err(|e| Problem::internal_logged(&e))
    }

    /// An argon2id hash of `password`, within the bound.
    pub(crate) async fn hash_password(&self, password: String) -> Result<String, Problem> {
        // Hashing a new password follows an authenticated call or a
        // registration, not a guess: bounded by the queue alone.
        self.password_work(Source::Unknown, move || {
            crate::auth::hash_password(&password)
        })
        .await
    }

    pub fn with_receipts(mut self, issuer: Option<Arc<Issuer>>) -> ApiState {
        self.receipts = issuer;
        self
    }

    pub fn with_ledger(mut self, ledger: Ledger, notifier: Notifier) -> ApiState {
        self.ledger = Some(ledger);
        self.notifier = Some(notifier);
        self
    }
}

pub type State = axum::extract::State<Arc<ApiState>>;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "consentry preference manager",
        description = "PII preferences, devices and consent receipts (ITU-T X.1363, Kantara Consent Receipt).\n\n\
            Every error is `application/problem+json` (RFC 9457), with `field` naming the request \
            field, path or query parameter at fault where there is one: also 404 for an unknown \
            path and 405 (with `Allow`) for a method a path does not have."
    ),
    paths(
        users::register,
        users::login,
        users::logout,
        users::logout_everywhere,
        users::change_password,
        users::start_totp_enrolment,
        users::confirm_totp_enrolment,
        recovery::renew,
        recovery::left,
        users::register_device,
        users::list_devices,
        users::remove_device,
        users::account_events,
        preferences::get_time_zone,
        preferences::put_time_zone,
        preferences::get_preferences,
        preferences::put_preferences,
        preferences::withdraw_all,
        preferences::put_share_grant,
        preferences::delete_share_grant,
        preferences::put_collect_grant,
        preferences::delete_collect_grant,
        preferences::history,
        history::history,
        history::export,
        history::open_dispute,
        history::my_disputes,
        history::all_disputes,
        history::resolve,
        receipts::list,
        receipts::get_one,
        providers::list,
        providers::get_one,
        operator::put_provider,
        operator::put_kind,
        operator::reset_login,
        operator::remove_device,
    ),
    components(schemas(Problem)),
    modifiers(&SecuritySchemes, &ProblemResponses)
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "session",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "operator",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-operator-key"))),
        );
    }
}

/// Problem documents as they are sent (`application/problem+json`, where
/// `body = Problem` alone says JSON), and a `default` response on every
/// operation for the errors it does not list.
struct ProblemResponses;

impl utoipa::Modify for ProblemResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        const PROBLEM: &str = "application/problem+json";
        let problem_schema = Ref::from_schema_name("Problem");
        let components = openapi.components.get_or_insert_with(Default::default);
        components.responses.insert(
            "Problem".to_string(),
            ResponseBuilder::new()
                .description(
                    "Any other error (e.g. 400 for a path or query parameter that does not \
                     parse, 401, 413, 415, 422 for a body that does not fit), naming the \
                     field at fault",
                )
                .content(
                    PROBLEM,
                    ContentBuilder::new()
                        .schema(Some(problem_schema.clone()))
                        .build(),
                )
                .build()
                .into(),
        );
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
                &mut item.head,
                &mut item.options,
            ];
            for op in operations.into_iter().flatten() {
                for response in op.responses.responses.values_mut() {
                    let RefOr::T(response) = response else {
                        continue;
                    };
                    let is_problem = response.content.get("application/json").is_some_and(
                        |c| matches!(&c.schema, Some(RefOr::Ref(r)) if *r == problem_schema),
                    );
                    if is_problem {
                        if let Some(content) = response.content.shift_remove("application/json") {
                            response.content.insert(PROBLEM.to_string(), content);
                        }
                    }
                }
                op.responses
                    .responses
                    .entry("default".to_string())
                    .or_insert_with(|| RefOr::Ref(Ref::new("#/components/responses/Problem")));
            }
        }
    }
}

pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

pub fn router(state: ApiState) -> Router {
    let state = Arc::new(state);
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/v1/users", post(users::register))
        .route("/v1/sessions", post(users::login))
        .route("/v1/sessions/current", delete(users::logout))
        .route("/v1/me/sessions", delete(users::logout_everywhere))
        .route("/v1/me/password", put(users::change_password))
        .route(
            "/v1/me/totp",
            post(users::start_totp_enrolment).put(users::confirm_totp_enrolment),
        )
        .route(
            "/v1/me/recovery-codes",
            get(recovery::left).post(recovery::renew),
        )
        .route(
            "/v1/me/devices",
            get(users::list_devices).post(users::register_device),
        )
        .route("/v1/me/devices/{id}", delete(users::remove_device))
        .route("/v1/me/account-events", get(users::account_events))
        .route(
            "/v1/me/preferences",
            get(preferences::get_preferences)
                .put(preferences::put_preferences)
                .delete(preferences::withdraw_all),
        )
        .route(
            "/v1/me/preferences/share/{provider}/{kind}",
            put(preferences::put_share_grant).delete(preferences::delete_share_grant),
        )
        .route(
            "/v1/me/preferences/collect/{kind}",
            put(preferences::put_collect_grant).delete(preferences::delete_collect_grant),
        )
        .route("/v1/me/preferences/history", get(preferences::history))
        .route(
            "/v1/me/time_zone",
            get(preferences::get_time_zone).put(preferences::put_time_zone),
        )
        .route("/v1/me/history", get(history::history))
        .route("/v1/me/history/export", get(history::export))
        .route(
            "/v1/me/disputes",
            get(history::my_disputes).post(history::open_dispute),
        )
        .route("/v1/operator/disputes", get(history::all_disputes))
        .route("/v1/operator/disputes/{id}/resolve", post(history::resolve))
        .route("/v1/me/receipts", get(receipts::list))
        .route("/v1/me/receipts/{jti}", get(receipts::get_one))
        .route("/v1/providers", get(providers::list))
        .route("/v1/providers/{id}", get(providers::get_one))
        .route("/v1/operator/providers", post(operator::put_provider))
        .route("/v1/operator/kinds", post(operator::put_kind))
        .route("/v1/operator/devices/{id}", delete(operator::remove_device))
        .route(
            "/v1/operator/users/{id}/login-reset",
            post(operator::reset_login),
        )
        .route("/v1/openapi.json", get(|| async { Json(openapi()) }))
        .route("/.well-known/jwks.json", get(jwks))
        // After every route: it is set on the routes registered so far. The
        // router still adds the `Allow` header to its answer.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn not_found() -> Problem {
    Problem::not_found("no such resource")
}

async fn method_not_allowed(method: Method) -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on this resource; the Allow header lists what is"),
    )
}

async fn jwks(state: State) -> Result<Json<crate::receipt::Jwks>, Problem> {
    state
        .receipts
        .as_ref()
        .map(|i| Json(i.jwks()))
        .ok_or_else(|| Problem::not_found("consent receipts are not enabled"))
}

/// A JSON body whose rejections are problem documents: malformed JSON is a
/// 400, a well-formed body of the wrong shape a 422 naming the field.
pub struct Body<T>(pub T);

impl<S, T> FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // axum checks the content type and the syntax. Every body here is an
        // object: serde would also read a struct from an array, by position,
        // and `[0, [], []]` would pass for a preferences document.
        let Json(raw) = Json::<Box<serde_json::value::RawValue>>::from_request(req, state)
            .await
            .map_err(Problem::from_json_rejection)?;
        if !raw.get().starts_with('{') {
            return Err(Problem::unprocessable("the body must be a JSON object"));
        }
        let mut json = serde_json::Deserializer::from_str(raw.get());
        serde_path_to_error::deserialize(&mut json)
            .map(Body)
            .map_err(|e| Problem::from_json_data_error(&e))
    }
}

/// Query parameters whose rejections are problem documents: 400 naming the
/// parameter.
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| Query(q.0))
            .map_err(Problem::from_query_rejection)
    }
}

/// Path parameters whose rejections are problem documents: 400 naming the
/// parameter.
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(p) => Ok(Path(p.0)),
            Err(rejection) => {
                let names: Vec<String> = RawPathParams::from_request_parts(parts, state)
                    .await
                    .map(|raw| raw.iter().map(|(name, _)| name.to_string()).collect())
                    .unwrap_or_default();
                Err(Problem::from_path_rejection(rejection, &names))
            }
        }
    }
}

/// The user a request is authenticated as (bearer session token).
pub struct AuthUser(pub String);

impl FromRequestParts<Arc<ApiState>> for AuthUser {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        let s = CurrentSession::from_request_parts(parts, state).await?;
        Ok(AuthUser(s.user))
    }
}

/// The session a request is authenticated with: its user, and the hash of
/// its token (the store keeps no tokens).
pub struct CurrentSession {
    pub user: String,
    pub token_hash: [u8; 32],
}

impl FromRequestParts<Arc<ApiState>> for CurrentSession {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim_start().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token)
            .ok_or_else(|| {
                Problem::unauthorized("a session token is required (Authorization: Bearer …)")
                    .challenge(Challenge::Bearer)
            })?;
        let hash: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        let prefs = state.prefs.clone();
        let ttl = state.config.session_ttl_secs;
        let user = tokio::task::spawn_blocking(move || prefs.store().session_user(&hash, ttl))
            .await
            .map_err(|_| Problem::internal())?
            .map_err(|e| Problem::internal_logged(&e))?;
        user.map(|user| CurrentSession {
            user,
            token_hash: hash,
        })
        .ok_or_else(|| {
            Problem::unauthorized("the session token is unknown, expired or ended")
                .challenge(Challenge::InvalidToken)
        })
    }
}

/// The address a request came from, when the listener recorded it.
pub struct Peer(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

/// The operator, by key.
pub struct Operator;

impl FromRequestParts<Arc<ApiState>> for Operator {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        let key = parts
            .headers
            .get("x-operator-key")
            .map(|v| v.as_bytes())
            .ok_or_else(|| {
                Problem::unauthorized("the operator key is required (X-Operator-Key)")
                    .challenge(Challenge::OperatorKey)
            })?;
        let hash: [u8; 32] = Sha256::digest(key).into();
        if bool::from(hash.ct_eq(&state.operator_key_sha256)) {
            Ok(Operator)
        } else {
            Err(Problem::forbidden("wrong operator key"))
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    /// The rejections that know a parameter only by position, or not at
    /// all, are named from the route.
    #[tokio::test]
    async fn path_rejections_name_the_parameter_by_position() {
        let app: Router = Router::new()
            .route(
                "/pair/{a}/{b}",
                get(|Path(_): Path<(String, u32)>| async {}),
            )
            .route("/one/{n}", get(|Path(_): Path<u32>| async {}));
        for (uri, field) in [("/pair/x/y", "b"), ("/one/z", "n"), ("/pair/%FF/1", "a")] {
            let resp = app
                .clone()
                .oneshot(Request::builder().uri(uri).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{uri}");
            let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
                .await
                .unwrap();
            let p: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(p["field"], field, "{uri}: {p}");
        }
    }
}

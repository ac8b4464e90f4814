//! RFC 9457 problem documents. A handler's error names what was wrong and,
//! for bad input, which field; causes inside consentry are logged, not sent.

use axum::extract::path::ErrorKind;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::act::CompileError;
use crate::prefs::PrefError;

/// When to try again after the store could not write.
const STORE_RETRY_SECS: u64 = 30;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// Always `about:blank`: the status and title say it all.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    /// The request field at fault, as a dotted path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For 409: the version the preferences are at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
    /// For 429: whole seconds until the client may try again, sent as the
    /// `Retry-After` header (not in the body).
    #[serde(skip)]
    pub retry_after: Option<u32>,
    /// For 401: the `WWW-Authenticate` challenge (RFC 9110 §11.6.1).
    #[serde(skip)]
    pub challenge: Option<Challenge>,
}

/// What a 401 asks for (RFC 6750 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// No bearer token was sent.
    Bearer,
    /// The token sent is unknown, expired or ended.
    InvalidToken,
    /// Operator endpoints take a key in a header of their own, which no
    /// registered scheme describes; the challenge names it.
    OperatorKey,
}

impl Challenge {
    fn header(self) -> &'static str {
        match self {
            Challenge::Bearer => r#"Bearer realm="consentry""#,
            Challenge::InvalidToken => r#"Bearer realm="consentry", error="invalid_token""#,
            Challenge::OperatorKey => r#"X-Operator-Key realm="consentry operator""#,
        }
    }
}

impl Problem {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Problem {
        Problem {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: detail.into(),
            field: None,
            current_version: None,
            retry_after: None,
            challenge: None,
        }
    }

    pub fn field(mut self, field: impl Into<String>) -> Problem {
        self.field = Some(field.into());
        self
    }

    /// For an endpoint whose body is one grant (`PUT …/share/{provider}/{kind}`):
    /// a field in the whole document (`share[3].purpose`) named as it is in
    /// that body (`purpose`), or as the path's parameter (`kind`).
    pub fn within_grant(mut self, list: &str) -> Problem {
        let inner = self
            .field
            .as_deref()
            .and_then(|f| f.strip_prefix(list)?.strip_prefix('[')?.split_once("]."))
            .map(|(_, rest)| rest.to_string());
        if inner.is_some() {
            self.field = inner;
        }
        self
    }

    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, detail)
    }
    pub fn unprocessable(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, detail)
    }
    /// A 401 always says how to authenticate (RFC 9110 §15.5.2).
    pub fn unauthorized(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNAUTHORIZED, detail).challenge(Challenge::Bearer)
    }
    pub fn forbidden(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::FORBIDDEN, detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::CONFLICT, detail)
    }
    pub fn too_many(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::TOO_MANY_REQUESTS, detail)
    }
    /// Adds `Retry-After: secs` to the response.
    pub fn retry_after(mut self, secs: u64) -> Problem {
        self.retry_after = Some(u32::try_from(secs).unwrap_or(u32::MAX));
        self
    }
    /// Adds `WWW-Authenticate: challenge` to the response.
    pub fn challenge(mut self, challenge: Challenge) -> Problem {
        self.challenge = Some(challenge);
        self
    }
    pub fn internal() -> Problem {
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
    /// Logs the cause; the client only learns that it was ours. A store
    /// that cannot write for now (disk full, read-only, locked) is 503
    /// with `Retry-After` instead: the request was not carried out, and may
    /// succeed later.
    pub fn internal_logged<E: std::fmt::Display + 'static>(e: &E) -> Problem {
        tracing::error!(error = %e, "API request failed");
        let store = (e as &dyn std::any::Any).downcast_ref::<crate::store::StoreError>();
        if store.is_some_and(crate::store::StoreError::is_unavailable) {
            return Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the store cannot record changes at the moment (full, read-only or \
                 busy); nothing was changed, try again later",
            )
            .retry_after(STORE_RETRY_SECS);
        }
        Problem::internal()
    }

    /// A well-formed body of the wrong shape: 422 naming the field
    /// ("share[0].kind: unknown variant …", "missing field `version` …").
    pub fn from_json_data_error(de: &serde_path_to_error::Error<serde_json::Error>) -> Problem {
        let field = serde_field(de.path(), &de.inner().to_string());
        let mut p = Problem::unprocessable(de.to_string());
        p.field = field;
        p
    }

    pub fn from_json_rejection(r: JsonRejection) -> Problem {
        match r {
            JsonRejection::JsonDataError(e) => {
                match find_source::<serde_path_to_error::Error<serde_json::Error>>(&e) {
                    Some(de) => Problem::from_json_data_error(de),
                    None => Problem::unprocessable(e.body_text()),
                }
            }
            JsonRejection::JsonSyntaxError(e) => Problem::bad_request(e.body_text()),
            JsonRejection::MissingJsonContentType(_) => Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send JSON with Content-Type: application/json",
            ),
            JsonRejection::BytesRejection(e) => Problem::new(e.status(), e.body_text()),
            other => Problem::bad_request(other.body_text()),
        }
    }

    /// A query string that does not fit its parameters: 400 naming the
    /// parameter, e.g. `limit` for `?limit=abc`.
    pub fn from_query_rejection(r: QueryRejection) -> Problem {
        type De = serde_path_to_error::Error<serde_urlencoded::de::Error>;
        let status = r.status();
        match find_source::<De>(&r) {
            Some(de) => {
                let field = serde_field(de.path(), &de.inner().to_string());
                let mut p = Problem::new(status, de.to_string());
                p.field = field;
                p
            }
            None => Problem::new(status, r.body_text()),
        }
    }

    /// A path segment that does not fit its parameter: 400 naming it.
    /// `names` are the route's parameter names in order, for the rejections
    /// that only know an index (tuples) or nothing (a single value).
    pub fn from_path_rejection(r: PathRejection, names: &[String]) -> Problem {
        let status = r.status();
        if status.is_server_error() {
            // A route and its extractor disagree: ours to fix, not the client's.
            return Problem::internal_logged(&r);
        }
        let field = match &r {
            PathRejection::FailedToDeserializePathParams(e) => match e.kind() {
                ErrorKind::ParseErrorAtKey { key, .. }
                | ErrorKind::InvalidUtf8InPathParam { key }
                | ErrorKind::DeserializeError { key, .. } => Some(key.clone()),
                ErrorKind::ParseErrorAtIndex { index, .. } => names.get(*index).cloned(),
                ErrorKind::ParseError { .. } if names.len() == 1 => Some(names[0].clone()),
                _ => None,
            },
            _ => None,
        };
        let mut p = Problem::new(status, r.body_text());
        p.field = field;
        p
    }
}

/// The first error of type `E` in `e`'s source chain (`e` included): axum's
/// rejections wrap the deserializer's error.
fn find_source<'a, E: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        cur = err.source();
    }
    None
}

/// The field a deserialization error is about, as a dotted path: where it
/// happened, plus the field's name when serde reports a missing or repeated
/// field, which it does from the struct that lacks it (path `share[0]`,
/// "missing field `purpose`" → `share[0].purpose`).
fn serde_field(path: &serde_path_to_error::Path, message: &str) -> Option<String> {
    let at = (path.iter().len() > 0).then(|| path.to_string());
    let named = ["missing field `", "duplicate field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix)?.split_once('`'))
        .map(|(name, _)| name.to_string());
    match (at, named) {
        (Some(at), Some(name)) => Some(format!("{at}.{name}")),
        (at, name) => name.or(at),
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut resp = (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(c) = self.challenge {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(c.header()),
            );
        }
        resp
    }
}

impl From<PrefError> for Problem {
    fn from(e: PrefError) -> Problem {
        match e {
            PrefError::Conflict { current } => {
                let mut p = Problem::conflict(format!(
                    "the preferences changed meanwhile; they are at version {current}"
                ))
                .field("version");
                p.current_version = Some(current);
                p
            }
            PrefError::UnknownUser(u) => Problem::not_found(format!("no such user {u:?}")),
            PrefError::Exists(what) => Problem::conflict(what),
            PrefError::UnknownDevice(d) => Problem::not_found(format!("no such device {d:?}")),
            PrefError::NoSuchGrant(what) => Problem::not_found(what),
            PrefError::Invalid(c) => compile_problem(c),
            PrefError::Credentials(e) => Problem::unprocessable(e.to_string()),
            PrefError::BadLogin(user) => {
                Problem::unprocessable(format!("login of {user:?}: totp_secret is not base32"))
                    .field("totp_secret")
            }
            PrefError::Receipt(e) => Problem::internal_logged(&e),
            PrefError::Store(e) => Problem::internal_logged(&e),
            PrefError::Pointless { field, message } => Problem::unprocessable(message).field(field),
            PrefError::BadTerms { terms, .. } => {
                Problem::unprocessable(terms.message).field(terms.field)
            }
        }
    }
}

fn compile_problem(c: CompileError) -> Problem {
    // A grant's errors name it by its place in the document.
    let field: String = match &c {
        CompileError::PrefKind { at, .. } => format!("{at}.kind"),
        CompileError::PrefProvider { at, .. } => format!("{at}.provider"),
        CompileError::PurposeLimitation { at, .. } => format!("{at}.purpose"),
        CompileError::DuplicateShare { at, .. } => at.clone(),
        CompileError::MaskField { at, field, .. } => format!("{at}.mask.{field}"),
        CompileError::MaskOpaque { at, .. } => format!("{at}.mask"),
        CompileError::TimeZone { .. } => "time_zone".into(),
        CompileError::PurposeKind { .. } => "purposes.kinds".into(),
        CompileError::DeviceUser { .. } => "user".into(),
        CompileError::Duplicate { .. } | CompileError::DuplicateKind(_) => "id".into(),
        CompileError::TypedField { field, .. }
        | CompileError::TypedOpaque { field, .. }
        | CompileError::TypedParent { field, .. } => format!("types.{field}"),
        CompileError::PrefUser(_) => "user".into(),
        CompileError::Template(_) => "templates".into(),
        CompileError::Receipt { .. } => "receipt".into(),
    };
    Problem::unprocessable(c.to_string()).field(field)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    fn sqlite(code: std::ffi::c_int) -> StoreError {
        StoreError::Db(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            None,
        ))
    }

    #[test]
    fn a_store_that_cannot_write_is_503_with_retry_after() {
        for code in [
            rusqlite::ffi::SQLITE_FULL,
            rusqlite::ffi::SQLITE_READONLY,
            rusqlite::ffi::SQLITE_BUSY,
        ] {
            let p = Problem::internal_logged(&sqlite(code));
            assert_eq!(p.status, 503, "{code}");
            assert_eq!(p.retry_after, Some(STORE_RETRY_SECS as u32), "{code}");
        }
        // Anything else stays ours: 500, and nothing to wait for.
        for e in [sqlite(rusqlite::ffi::SQLITE_CORRUPT), StoreError::Crypto] {
            let p = Problem::internal_logged(&e);
            assert_eq!((p.status, p.retry_after), (500, None), "{e}");
        }
        let p = Problem::internal_logged(&"not a store error");
        assert_eq!(p.status, 500);
    }
}

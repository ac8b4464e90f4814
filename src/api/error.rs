//! RFC 9457 problem documents. A handler's error names what was wrong and,
//! for bad input, which field; causes inside consentry are logged, not sent.

use axum::extract::rejection::JsonRejection;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::act::CompileError;
use crate::prefs::PrefError;

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
        }
    }

    pub fn field(mut self, field: impl Into<String>) -> Problem {
        self.field = Some(field.into());
        self
    }

    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, detail)
    }
    pub fn unprocessable(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNAUTHORIZED, detail)
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
    pub fn internal() -> Problem {
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
    /// Logs the cause; the client only learns that it was ours.
    pub fn internal_logged(e: &dyn std::fmt::Display) -> Problem {
        tracing::error!(error = %e, "API request failed");
        Problem::internal()
    }

    pub fn from_json_rejection(r: JsonRejection) -> Problem {
        match r {
            JsonRejection::JsonDataError(e) => {
                // serde's message starts with the path, e.g. "share[0].kind: …".
                let text = e.body_text();
                let detail = text
                    .strip_prefix("Failed to deserialize the JSON body into the target type: ")
                    .unwrap_or(&text)
                    .to_string();
                let field = detail
                    .split_once(": ")
                    .map(|(f, _)| f.to_string())
                    .filter(|f| !f.contains(' '));
                let mut p = Problem::unprocessable(detail);
                p.field = field;
                p
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
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response()
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
            PrefError::Invalid(c) => compile_problem(c),
            PrefError::Credentials(e) => Problem::unprocessable(e.to_string()),
            PrefError::BadLogin(user) => {
                Problem::unprocessable(format!("login of {user:?}: totp_secret is not base32"))
                    .field("totp_secret")
            }
            PrefError::Receipt(e) => Problem::internal_logged(&e),
            PrefError::Store(e) => Problem::internal_logged(&e),
            PrefError::Pointless { field, message } => Problem::unprocessable(message).field(field),
        }
    }
}

fn compile_problem(c: CompileError) -> Problem {
    let field = match &c {
        CompileError::PrefKind { .. } => "kind",
        CompileError::PrefProvider { .. } => "provider",
        CompileError::PurposeLimitation { .. } => "purpose",
        CompileError::DuplicateShare { .. } => "share",
        CompileError::MaskField { field, .. } => {
            return Problem::unprocessable(c.to_string()).field(format!("mask.{field}"))
        }
        CompileError::MaskOpaque { .. } => "mask",
        CompileError::TimeZone { .. } => "time_zone",
        CompileError::PurposeKind { .. } => "purposes.kinds",
        CompileError::DeviceUser { .. } => "user",
        CompileError::Duplicate { .. } | CompileError::DuplicateKind(_) => "id",
        CompileError::PrefUser(_) => "user",
        CompileError::Template(_) => "templates",
        CompileError::Receipt { .. } => "receipt",
    };
    Problem::unprocessable(c.to_string()).field(field)
}

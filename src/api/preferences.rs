//! A user's own PII preferences: read, replace whole (optimistic versioning),
//! change one grant, withdraw everything. Each accepted change is in force
//! and documented by a receipt before the response is sent.

use std::collections::BTreeMap;

use axum::Json;
use chrono::{DateTime, FixedOffset, Utc};
use chrono_tz::Tz;

use super::local_time::{local, zone};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{AuthUser, Body, Path, Problem, State};
use crate::model::{CollectGrant, MaskMethod, Preferences, ShareGrant, Window};
use crate::prefs::{Applied, PrefError};
use crate::store::HistoryEntry;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreferencesDocument {
    /// The version this document replaces; a stale one gets 409.
    version: u64,
    #[serde(default)]
    collect: Vec<CollectGrant>,
    #[serde(default)]
    share: Vec<ShareGrant>,
}

#[derive(Serialize, ToSchema)]
pub struct Changed {
    preferences: Preferences,
    /// The consent receipt documenting this change, when receipts are on.
    receipt: Option<ReceiptRef>,
}

#[derive(Serialize, ToSchema)]
pub struct ReceiptRef {
    jti: String,
    /// In the user's zone.
    at: DateTime<FixedOffset>,
}

impl Changed {
    fn new(a: Applied, tz: Tz) -> Changed {
        Changed {
            receipt: a.receipt.map(|r| ReceiptRef {
                jti: r.jti,
                at: local(r.at, tz),
            }),
            preferences: a.preferences,
        }
    }
}

/// Runs a change on the blocking pool: it compiles the ACT and writes the
/// store.
async fn change(
    state: &State,
    user: String,
    expected: Option<u64>,
    f: impl FnOnce(&mut Preferences) -> Result<(), PrefError> + Send + 'static,
) -> Result<Json<Changed>, Problem> {
    let tz = zone(state, &user);
    let prefs = state.prefs.clone();
    let applied = tokio::task::spawn_blocking(move || {
        prefs.change(&user, expected, "api", |p| {
            let before = p.clone();
            f(p)?;
            crate::grant_rules::check_grants(&before, p, Some(Utc::now()))
        })
    })
    .await
    .map_err(|_| Problem::internal())??;
    Ok(Json(Changed::new(applied, tz)))
}

#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    /// IANA time zone; collection windows are read in it.
    time_zone: String,
}

#[derive(Serialize, ToSchema)]
pub struct ZoneChanged {
    time_zone: String,
    /// Present when preferences with a collection window were issued again,
    /// with a receipt stating the new zone.
    preferences: Option<Changed>,
}

/// The logged-in user's time zone.
#[utoipa::path(get, path = "/v1/me/time_zone", security(("session" = [])),
    responses((status = 200, body = Zone)))]
pub async fn get_time_zone(state: State, AuthUser(user): AuthUser) -> Result<Json<Zone>, Problem> {
    let u = state
        .prefs
        .user(&user)
        .ok_or_else(|| Problem::from(PrefError::UnknownUser(user)))?;
    Ok(Json(Zone {
        time_zone: u.time_zone,
    }))
}

/// Move to another time zone. Collection windows are read in it, so
/// preferences with a window become a new version, with a receipt that
/// states the new zone; a directory reload no longer changes the zone.
#[utoipa::path(put, path = "/v1/me/time_zone", request_body = Zone, security(("session" = [])),
    responses((status = 200, body = ZoneChanged), (status = 422, body = Problem)))]
pub async fn put_time_zone(
    state: State,
    AuthUser(user): AuthUser,
    Body(z): Body<Zone>,
) -> Result<Json<ZoneChanged>, Problem> {
    let Ok(tz) = z.time_zone.parse::<Tz>() else {
        return Err(Problem::unprocessable("not an IANA time zone").field("time_zone"));
    };
    let prefs = state.prefs.clone();
    let zone = z.time_zone.clone();
    let applied = tokio::task::spawn_blocking(move || prefs.set_time_zone(&user, &zone))
        .await
        .map_err(|_| Problem::internal())??;
    Ok(Json(ZoneChanged {
        time_zone: z.time_zone,
        preferences: applied.map(|a| Changed::new(a, tz)),
    }))
}

/// The logged-in user's preferences.
#[utoipa::path(get, path = "/v1/me/preferences", security(("session" = [])),
    responses((status = 200, body = Preferences), (status = 401, body = Problem)))]
pub async fn get_preferences(
    state: State,
    AuthUser(user): AuthUser,
) -> Result<Json<Preferences>, Problem> {
    Ok(Json(state.prefs.preferences(&user)?))
}

/// Replace the whole preference document.
#[utoipa::path(put, path = "/v1/me/preferences", request_body = PreferencesDocument, security(("session" = [])),
    responses((status = 200, body = Changed), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn put_preferences(
    state: State,
    AuthUser(user): AuthUser,
    Body(doc): Body<PreferencesDocument>,
) -> Result<Json<Changed>, Problem> {
    change(&state, user, Some(doc.version), move |p| {
        p.collect = doc.collect;
        p.share = doc.share;
        Ok(())
    })
    .await
}

/// Withdraw every consent at once: nothing is collected or shared any more.
#[utoipa::path(delete, path = "/v1/me/preferences", security(("session" = [])),
    responses((status = 200, body = Changed)))]
pub async fn withdraw_all(
    state: State,
    AuthUser(user): AuthUser,
) -> Result<Json<Changed>, Problem> {
    change(&state, user, None, |p| {
        p.collect.clear();
        p.share.clear();
        Ok(())
    })
    .await
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShareSetting {
    /// A purpose of the provider's T&C that asks for this kind.
    purpose: String,
    /// Field → masking method; fields not named are delivered as they are.
    #[serde(default)]
    mask: BTreeMap<String, MaskMethod>,
    expires: Option<DateTime<Utc>>,
}

/// Share one kind with one provider (replacing any grant for that pair).
#[utoipa::path(put, path = "/v1/me/preferences/share/{provider}/{kind}", request_body = ShareSetting,
    params(("provider" = String, Path), ("kind" = String, Path)), security(("session" = [])),
    responses((status = 200, body = Changed), (status = 422, body = Problem)))]
pub async fn put_share_grant(
    state: State,
    AuthUser(user): AuthUser,
    Path((provider, kind)): Path<(String, String)>,
    Body(s): Body<ShareSetting>,
) -> Result<Json<Changed>, Problem> {
    change(&state, user, None, move |p| {
        p.share
            .retain(|g| !(g.provider == provider && g.kind == kind));
        p.share.push(ShareGrant {
            provider,
            purpose: s.purpose,
            kind,
            mask: s.mask,
            expires: s.expires,
        });
        Ok(())
    })
    .await
    .map_err(|e| e.within_grant("share"))
}

/// Stop sharing one kind with one provider.
#[utoipa::path(delete, path = "/v1/me/preferences/share/{provider}/{kind}",
    params(("provider" = String, Path), ("kind" = String, Path)), security(("session" = [])),
    responses((status = 200, body = Changed), (status = 404, body = Problem)))]
pub async fn delete_share_grant(
    state: State,
    AuthUser(user): AuthUser,
    Path((provider, kind)): Path<(String, String)>,
) -> Result<Json<Changed>, Problem> {
    // Checked on the preferences the change applies to, not read before
    // it: a concurrent change must not turn a withdrawal into a 409.
    change(&state, user, None, move |p| {
        let held = p.share.len();
        p.share
            .retain(|g| !(g.provider == provider && g.kind == kind));
        if p.share.len() == held {
            return Err(PrefError::NoSuchGrant(format!(
                "no grant shares {kind:?} with {provider:?}"
            )));
        }
        Ok(())
    })
    .await
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CollectSetting {
    /// When collection is allowed, in the user's time zone; empty: always.
    #[serde(default)]
    windows: Vec<Window>,
}

/// Allow collection of one kind, optionally only in time windows.
#[utoipa::path(put, path = "/v1/me/preferences/collect/{kind}", request_body = CollectSetting,
    params(("kind" = String, Path)), security(("session" = [])),
    responses((status = 200, body = Changed), (status = 422, body = Problem)))]
pub async fn put_collect_grant(
    state: State,
    AuthUser(user): AuthUser,
    Path(kind): Path<String>,
    Body(s): Body<CollectSetting>,
) -> Result<Json<Changed>, Problem> {
    change(&state, user, None, move |p| {
        p.collect.retain(|g| g.kind != kind);
        p.collect.push(CollectGrant {
            kind,
            windows: s.windows,
        });
        Ok(())
    })
    .await
    .map_err(|e| e.within_grant("collect"))
}

/// Stop collection of one kind.
#[utoipa::path(delete, path = "/v1/me/preferences/collect/{kind}",
    params(("kind" = String, Path)), security(("session" = [])),
    responses((status = 200, body = Changed), (status = 404, body = Problem)))]
pub async fn delete_collect_grant(
    state: State,
    AuthUser(user): AuthUser,
    Path(kind): Path<String>,
) -> Result<Json<Changed>, Problem> {
    change(&state, user, None, move |p| {
        let held = p.collect.len();
        p.collect.retain(|g| g.kind != kind);
        if p.collect.len() == held {
            return Err(PrefError::NoSuchGrant(format!(
                "no grant collects {kind:?}"
            )));
        }
        Ok(())
    })
    .await
}

#[derive(Serialize, ToSchema)]
pub struct HistoryItem {
    version: u64,
    /// In the user's zone.
    at: DateTime<FixedOffset>,
    source: String,
    preferences: Preferences,
    receipt_jti: Option<String>,
}

impl HistoryItem {
    fn new(e: HistoryEntry, tz: Tz) -> Self {
        HistoryItem {
            version: e.version,
            at: local(e.at, tz),
            source: e.source,
            preferences: e.preferences,
            receipt_jti: e.receipt_jti,
        }
    }
}

/// Every version of the user's preferences, oldest first; never rewritten.
#[utoipa::path(get, path = "/v1/me/preferences/history", security(("session" = [])),
    responses((status = 200, body = Vec<HistoryItem>)))]
pub async fn history(
    state: State,
    AuthUser(user): AuthUser,
) -> Result<Json<Vec<HistoryItem>>, Problem> {
    let tz = zone(&state, &user);
    let prefs = state.prefs.clone();
    let h = tokio::task::spawn_blocking(move || prefs.store().history(&user))
        .await
        .map_err(|_| Problem::internal())?
        .map_err(|e| Problem::internal_logged(&e))?;
    Ok(Json(
        h.into_iter().map(|e| HistoryItem::new(e, tz)).collect(),
    ))
}

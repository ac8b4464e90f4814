//! A user's own PII preferences: read, replace whole (optimistic versioning),
//! change one grant, withdraw everything. Each accepted change is in force
//! and documented by a receipt before the response is sent.

use std::collections::BTreeMap;

use axum::Json;
use chrono::{DateTime, Timelike, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{AuthUser, Body, Path, Problem, State};
use crate::mask::{past_max_decimals, MAX_DECIMALS};
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
    at: DateTime<Utc>,
}

impl From<Applied> for Changed {
    fn from(a: Applied) -> Changed {
        Changed {
            receipt: a.receipt.map(|r| ReceiptRef {
                jti: r.jti,
                at: r.at,
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
    let prefs = state.prefs.clone();
    let applied = tokio::task::spawn_blocking(move || {
        prefs.change(&user, expected, "api", |p| {
            let before = p.clone();
            f(p)?;
            check_grants(&before, p, Utc::now())
        })
    })
    .await
    .map_err(|_| Problem::internal())??;
    Ok(Json(applied.into()))
}

/// What the ACT would accept but a user cannot have meant. Only grants the
/// change adds are held to the expiry rule: a document read back and sent
/// again may carry a grant that has expired since.
fn check_grants(
    before: &Preferences,
    after: &Preferences,
    now: DateTime<Utc>,
) -> Result<(), PrefError> {
    let pointless = |field, message: String| Err(PrefError::Pointless { field, message });
    for (i, g) in after.collect.iter().enumerate() {
        if after.collect[..i].iter().any(|o| o.kind == g.kind) {
            return pointless(
                "collect",
                format!(
                    "kind {:?} is collected twice: give one grant with all its windows",
                    g.kind
                ),
            );
        }
        if g.windows.iter().any(|w| w.days.is_empty()) {
            return pointless(
                "collect.windows.days",
                format!("a window of kind {:?} names no day", g.kind),
            );
        }
        // Held to the rest only where the change adds or alters the grant,
        // as expiry below: stored windows stay readable and re-sendable.
        if before.collect.contains(g) {
            continue;
        }
        // The ACT reads from == to as a whole day (a window that wraps past
        // midnight back to where it began); nobody writes that meaning so.
        if g.windows.iter().any(|w| w.from == w.to) {
            return pointless(
                "collect.windows",
                format!(
                    "a window of kind {:?} closes when it opens; to collect at any time, give \
                     no windows",
                    g.kind
                ),
            );
        }
        // Whole minutes, as the receipt states them ("Mon 09:00-17:30"): a
        // window of 01:00:00-01:00:59 would read 01:00-01:00 there. This
        // also refuses chrono's leap second, "23:59:60".
        let whole = |t: chrono::NaiveTime| t.second() == 0 && t.nanosecond() == 0;
        if g.windows.iter().any(|w| !whole(w.from) || !whole(w.to)) {
            return pointless(
                "collect.windows",
                format!(
                    "a window of kind {:?} is not in whole minutes (give hh:mm or hh:mm:00)",
                    g.kind
                ),
            );
        }
    }
    for g in &after.share {
        let generalized = past_max_decimals(&g.mask);
        if let Some((field, _)) = generalized.filter(|_| !before.share.contains(g)) {
            return pointless(
                "share.mask",
                format!(
                    "{field:?} of {:?} generalized past {MAX_DECIMALS} decimals either way: a \
                     number has no more digits to keep or drop",
                    g.kind
                ),
            );
        }
        if g.expires.is_some_and(|e| e <= now) && !before.share.contains(g) {
            return pointless(
                "share.expires",
                format!(
                    "the grant of {:?} to {:?} would expire before it is given",
                    g.kind, g.provider
                ),
            );
        }
    }
    Ok(())
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
    let current = state.prefs.preferences(&user)?;
    if !current
        .share
        .iter()
        .any(|g| g.provider == provider && g.kind == kind)
    {
        return Err(Problem::not_found(format!(
            "no grant shares {kind:?} with {provider:?}"
        )));
    }
    change(&state, user, Some(current.version), move |p| {
        p.share
            .retain(|g| !(g.provider == provider && g.kind == kind));
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
    let current = state.prefs.preferences(&user)?;
    if !current.collect.iter().any(|g| g.kind == kind) {
        return Err(Problem::not_found(format!("no grant collects {kind:?}")));
    }
    change(&state, user, Some(current.version), move |p| {
        p.collect.retain(|g| g.kind != kind);
        Ok(())
    })
    .await
}

#[derive(Serialize, ToSchema)]
pub struct HistoryItem {
    version: u64,
    at: DateTime<Utc>,
    source: String,
    preferences: Preferences,
    receipt_jti: Option<String>,
}

impl From<HistoryEntry> for HistoryItem {
    fn from(e: HistoryEntry) -> Self {
        HistoryItem {
            version: e.version,
            at: e.at,
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
    let prefs = state.prefs.clone();
    let h = tokio::task::spawn_blocking(move || prefs.store().history(&user))
        .await
        .map_err(|_| Problem::internal())?
        .map_err(|e| Problem::internal_logged(&e))?;
    Ok(Json(h.into_iter().map(Into::into).collect()))
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveTime, Weekday};

    use super::*;

    fn window(days: Vec<Weekday>) -> Window {
        Window {
            days,
            from: NaiveTime::from_hms_opt(9, 0, 0).unwrap(),
            to: NaiveTime::from_hms_opt(17, 0, 0).unwrap(),
        }
    }

    fn collect(kind: &str, windows: Vec<Window>) -> CollectGrant {
        CollectGrant {
            kind: kind.into(),
            windows,
        }
    }

    fn share(kind: &str, expires: Option<DateTime<Utc>>) -> ShareGrant {
        ShareGrant {
            provider: "fitcoach".into(),
            purpose: "coaching".into(),
            kind: kind.into(),
            mask: BTreeMap::new(),
            expires,
        }
    }

    fn field(r: Result<(), PrefError>) -> Option<&'static str> {
        match r {
            Ok(()) => None,
            Err(PrefError::Pointless { field, .. }) => Some(field),
            Err(e) => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn pointless_grants_are_refused_and_sensible_ones_pass() {
        let now = Utc::now();
        let past = now - chrono::Duration::hours(1);
        let future = now + chrono::Duration::hours(1);
        let empty = Preferences::default();
        let with = |collect, share| Preferences {
            collect,
            share,
            ..Default::default()
        };
        let ok = with(
            vec![
                collect("heart_rate", vec![window(vec![Weekday::Mon])]),
                collect("steps", vec![]),
            ],
            vec![share("heart_rate", Some(future)), share("steps", None)],
        );
        assert_eq!(field(check_grants(&empty, &ok, now)), None);

        let twice = with(
            vec![collect("steps", vec![]), collect("steps", vec![])],
            vec![],
        );
        assert_eq!(field(check_grants(&empty, &twice, now)), Some("collect"));

        let no_day = with(vec![collect("steps", vec![window(vec![])])], vec![]);
        assert_eq!(
            field(check_grants(&empty, &no_day, now)),
            Some("collect.windows.days")
        );

        let mut closed = window(vec![Weekday::Tue]);
        closed.to = closed.from;
        let closed = with(vec![collect("steps", vec![closed])], vec![]);
        assert_eq!(
            field(check_grants(&empty, &closed, now)),
            Some("collect.windows")
        );
        // Already stored (say, imported): sent back unchanged, it stands.
        assert_eq!(field(check_grants(&closed, &closed, now)), None);
        // A leap second, seconds, a fraction: the receipt shows minutes.
        for to in [
            NaiveTime::from_hms_milli_opt(23, 59, 59, 1_500).unwrap(),
            NaiveTime::from_hms_opt(9, 0, 59).unwrap(),
            NaiveTime::from_hms_nano_opt(9, 0, 0, 1).unwrap(),
        ] {
            let mut w = window(vec![Weekday::Tue]);
            w.to = to;
            let w = with(vec![collect("steps", vec![w])], vec![]);
            assert_eq!(
                field(check_grants(&empty, &w, now)),
                Some("collect.windows"),
                "{to}"
            );
        }

        for decimals in [16, -16, 400, i32::MIN] {
            let mut g = share("location", None);
            g.mask
                .insert("lat".into(), MaskMethod::Generalize { decimals });
            let far = with(vec![], vec![g]);
            assert_eq!(
                field(check_grants(&empty, &far, now)),
                Some("share.mask"),
                "{decimals}"
            );
        }
        let mut g = share("location", None);
        g.mask
            .insert("lat".into(), MaskMethod::Generalize { decimals: -15 });
        assert_eq!(
            field(check_grants(&empty, &with(vec![], vec![g]), now)),
            None
        );

        let expired = with(vec![], vec![share("steps", Some(past))]);
        assert_eq!(
            field(check_grants(&empty, &expired, now)),
            Some("share.expires")
        );
        // The same grant sent back after it expired is not a new one.
        assert_eq!(field(check_grants(&expired, &expired, now)), None);
    }
}

//! The history log of data sharing (X.1363 §6, 9.2.3), read by the user it
//! is about: filtered, paginated, in the user's time zone, exportable; and
//! redress: disputing a record, which notifies the provider.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use super::{AuthUser, Body, Operator, Path, Problem, Query, State};
use crate::ledger::{Entry, ExtractRecord, Ledger, ReadFilter};
use crate::store::Dispute;

// A parameter the endpoint does not know is refused (400 naming it), not
// ignored: a filter spelt wrong would otherwise answer with everything.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Inclusive. An RFC 3339 time (a `+` in its offset may arrive as a
    /// space, as an unencoded `+` does), a local time without an offset, or
    /// a date (its first moment), the last two in the user's time zone. A
    /// local time the clocks skip means the moment they skip to; one they
    /// pass twice, the earlier for `from` and the later for `to`.
    from: Option<String>,
    /// Exclusive; written as `from` is.
    to: Option<String>,
    provider: Option<String>,
    kind: Option<String>,
    /// Continue after this sequence number (from `next_after`).
    after: Option<u64>,
    /// Page size, 1–1000 (default 100).
    limit: Option<usize>,
}

#[derive(Serialize, ToSchema)]
pub struct HistoryPage {
    entries: Vec<Value>,
    /// Pass as `after` for the next page; absent on the last page.
    next_after: Option<u64>,
}

fn ledger(state: &State) -> Result<Ledger, Problem> {
    state
        .ledger
        .clone()
        .ok_or_else(|| Problem::not_found("the share ledger is not available here"))
}

use super::local_time::zone;

/// Which moment a local time that happens twice (clocks going back) means:
/// the bounds of a range take the wider reading.
#[derive(Clone, Copy)]
enum Edge {
    Earliest,
    Latest,
}

/// A history bound as users write it: the times the history shows them
/// (RFC 3339 with their offset), or a local time or date in their zone.
fn time_arg(field: &str, s: &str, tz: Tz, edge: Edge) -> Result<DateTime<Utc>, Problem> {
    use chrono::{LocalResult, NaiveDate, NaiveDateTime, TimeZone, Timelike};
    let s = s.trim();
    let bad = |why: String| Problem::bad_request(format!("{field}: {why}")).field(field);
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    // `?from=2026-11-24T14:50:34+01:00` unencoded: the query's `+` is a space.
    if let Some(t) = s
        .rfind(' ')
        .map(|i| format!("{}+{}", &s[..i], &s[i + 1..]))
        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
    {
        return Ok(t.with_timezone(&Utc));
    }
    // A date means its first moment, whichever bound it is.
    let (local, edge) = match NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        Ok(d) => (d.and_time(chrono::NaiveTime::MIN), Edge::Earliest),
        Err(_) => (
            NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M"))
                .map_err(|_| {
                    bad(format!(
                        "{s:?} is not an RFC 3339 time, a local time (2026-11-24T14:50) or a \
                         date (2026-11-24)"
                    ))
                })?,
            edge,
        ),
    };
    // A local time the clocks skip (some zones skip midnight) means the
    // moment they skip to. Offsets change by whole quarter hours.
    let mut at = local;
    for _ in 0..=16 {
        match tz.from_local_datetime(&at) {
            LocalResult::Single(t) => return Ok(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(a, b) => {
                return Ok(match edge {
                    Edge::Earliest => a.min(b),
                    Edge::Latest => a.max(b),
                }
                .with_timezone(&Utc))
            }
            LocalResult::None => {
                // On to the next quarter hour.
                let into = i64::from(at.minute() % 15) * 60 + i64::from(at.second());
                at = at.with_nanosecond(0).unwrap_or(at) + chrono::Duration::seconds(900 - into);
            }
        }
    }
    Err(bad(format!("{local} does not exist in {tz}")))
}

/// One entry for the user it is about, times in their zone. The user and
/// device ids are theirs already; nothing about other users is in it.
fn entry_view(seq: u64, e: &Entry, tz: Tz) -> Value {
    let local = |t: DateTime<Utc>| super::local_time::local(t, tz).to_rfc3339();
    match e {
        Entry::Share(r) => json!({
            "seq": seq, "type": "share", "time": local(r.time),
            "provider": r.recipient, "device": r.device, "kind": r.kind,
            "pii_category": r.pii_category, "purpose": r.purpose, "action": r.action,
            "creator": r.creator, "payload_sha256": hex::encode(r.payload_digest),
            "qos": r.qos, "receipt_id": r.receipt_id,
        }),
        Entry::Blocked(b) => json!({
            "seq": seq, "type": "blocked", "time": local(b.hour_start),
            "provider": b.recipient, "kind": b.kind, "reason": b.reason,
            "hour_start": local(b.hour_start), "count": b.count,
        }),
        Entry::Extract(x) => json!({
            "seq": seq, "type": "extract", "time": local(x.time),
            "actor": x.actor, "what": x.what, "purpose": x.purpose,
        }),
    }
}

async fn read(state: &State, user: &str, filter: ReadFilter) -> Result<Vec<(u64, Entry)>, Problem> {
    let ledger = ledger(state)?;
    let user = user.to_string();
    tokio::task::spawn_blocking(move || ledger.read_user(&user, &filter))
        .await
        .map_err(|_| Problem::internal())?
        .map_err(|e| Problem::internal_logged(&e))
}

/// Every share of the user's data, refused shares in hourly counts, and
/// extracts of their data by others.
#[utoipa::path(get, path = "/v1/me/history", params(HistoryQuery), security(("session" = [])),
    responses((status = 200, body = HistoryPage),
        (status = 400, body = Problem, description = "a query parameter does not parse; `field` names it"),
        (status = 422, body = Problem, description = "`limit` is out of range")))]
pub async fn history(
    state: State,
    AuthUser(user): AuthUser,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<HistoryPage>, Problem> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::unprocessable("between 1 and 1000").field("limit"));
    }
    let tz = zone(&state, &user);
    let filter = ReadFilter {
        from: q
            .from
            .map(|t| time_arg("from", &t, tz, Edge::Earliest))
            .transpose()?,
        to: q
            .to
            .map(|t| time_arg("to", &t, tz, Edge::Latest))
            .transpose()?,
        recipient: q.provider,
        kind: q.kind,
        after_seq: q.after,
        // One more than asked tells whether there is a next page.
        limit: limit + 1,
    };
    let mut rows = read(&state, &user, filter).await?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    Ok(Json(HistoryPage {
        next_after: if more {
            rows.last().map(|(s, _)| *s)
        } else {
            None
        },
        entries: rows.iter().map(|(s, e)| entry_view(*s, e, tz)).collect(),
    }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// json (default) or csv.
    format: Option<String>,
}

/// The whole history as one JSON document or CSV file.
#[utoipa::path(get, path = "/v1/me/history/export", params(ExportQuery), security(("session" = [])),
    responses((status = 200, description = "application/json or text/csv")))]
pub async fn export(
    state: State,
    AuthUser(user): AuthUser,
    Query(q): Query<ExportQuery>,
) -> Result<Response, Problem> {
    let rows = read(&state, &user, ReadFilter::default()).await?;
    let tz = zone(&state, &user);
    let entries: Vec<Value> = rows.iter().map(|(s, e)| entry_view(*s, e, tz)).collect();
    match q.format.as_deref().unwrap_or("json") {
        "json" => Ok(Json(entries).into_response()),
        "csv" => {
            let cols = [
                "seq",
                "type",
                "time",
                "provider",
                "device",
                "kind",
                "pii_category",
                "purpose",
                "action",
                "reason",
                "count",
                "actor",
                "what",
                "payload_sha256",
                "qos",
                "receipt_id",
            ];
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_record(cols)
                .map_err(|e| Problem::internal_logged(&e))?;
            for e in &entries {
                let row = cols.iter().map(|c| match &e[*c] {
                    Value::Null => String::new(),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                w.write_record(row)
                    .map_err(|e| Problem::internal_logged(&e))?;
            }
            let body = w.into_inner().map_err(|e| Problem::internal_logged(&e))?;
            Ok((
                [
                    (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                    (
                        header::CONTENT_DISPOSITION,
                        "attachment; filename=\"share-history.csv\"",
                    ),
                ],
                body,
            )
                .into_response())
        }
        other => Err(
            Problem::unprocessable(format!("unknown format {other:?}: use json or csv"))
                .field("format"),
        ),
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDispute {
    /// The `seq` of a share record in the user's history.
    seq: u64,
    /// What is wrong, e.g. "this is not my data" or "I never allowed this".
    reason: String,
}

/// Dispute one share record; the provider is notified on its notice topic.
#[utoipa::path(post, path = "/v1/me/disputes", request_body = NewDispute, security(("session" = [])),
    responses((status = 201, body = Dispute), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn open_dispute(
    state: State,
    AuthUser(user): AuthUser,
    Body(d): Body<NewDispute>,
) -> Result<(StatusCode, Json<Dispute>), Problem> {
    if !text_up_to(&d.reason, 2000) {
        return Err(Problem::unprocessable("1–2000 characters").field("reason"));
    }
    let filter = ReadFilter {
        after_seq: d.seq.checked_sub(1),
        limit: 1,
        ..Default::default()
    };
    let record = read(&state, &user, filter)
        .await?
        .into_iter()
        .find(|(s, _)| *s == d.seq);
    let Some((seq, Entry::Share(r))) = record else {
        return Err(
            Problem::not_found("no share record with this seq in your history").field("seq"),
        );
    };
    let prefs = state.prefs.clone();
    let (u, provider, kind, reason) = (user.clone(), r.recipient.clone(), r.kind.clone(), d.reason);
    let dispute = tokio::task::spawn_blocking(move || {
        prefs
            .store()
            .add_dispute(&u, seq, &provider, &kind, &reason)
    })
    .await
    .map_err(|_| Problem::internal())?
    .map_err(|e| Problem::internal_logged(&e))?;
    if let Some(n) = &state.notifier {
        // What the provider needs to find the delivery, and no more: not
        // the user's id, nor the reason in their words.
        let notice = json!({
            "type": "dispute", "dispute_id": dispute.id, "ledger_seq": seq,
            "kind": r.kind, "delivered_at": r.time,
            "payload_sha256": hex::encode(r.payload_digest),
        });
        if let Err(e) = n.notify(&r.recipient, &notice) {
            tracing::warn!(error = %e, "dispute notice not sent");
        }
    }
    Ok((
        StatusCode::CREATED,
        Json(dispute.in_zone(&zone(&state, &user))),
    ))
}

/// The user's disputes and their state.
#[utoipa::path(get, path = "/v1/me/disputes", security(("session" = [])),
    responses((status = 200, body = Vec<Dispute>)))]
pub async fn my_disputes(
    state: State,
    AuthUser(user): AuthUser,
) -> Result<Json<Vec<Dispute>>, Problem> {
    let tz = zone(&state, &user);
    let prefs = state.prefs.clone();
    let mine = tokio::task::spawn_blocking(move || prefs.store().disputes(Some(&user)))
        .await
        .map_err(|_| Problem::internal())?
        .map_err(|e| Problem::internal_logged(&e))?;
    Ok(Json(mine.into_iter().map(|d| d.in_zone(&tz)).collect()))
}

/// All disputes, for the operator. Reading them is an extract of users' data
/// by someone other than the user, so it is recorded in the ledger first.
#[utoipa::path(get, path = "/v1/operator/disputes", security(("operator" = [])),
    responses((status = 200, body = Vec<Dispute>)))]
pub async fn all_disputes(state: State, _: Operator) -> Result<Json<Vec<Dispute>>, Problem> {
    let prefs = state.prefs.clone();
    let all = tokio::task::spawn_blocking(move || prefs.store().disputes(None))
        .await
        .map_err(|_| Problem::internal())?
        .map_err(|e| Problem::internal_logged(&e))?;
    record_operator_extracts(&state, all.iter().map(|d| d.user.as_str()), "disputes").await?;
    Ok(Json(all))
}

async fn record_operator_extracts<'a>(
    state: &State,
    users: impl Iterator<Item = &'a str>,
    what: &str,
) -> Result<(), Problem> {
    let ledger = ledger(state)?;
    let mut seen = std::collections::BTreeSet::new();
    for user in users {
        if !seen.insert(user.to_string()) {
            continue;
        }
        ledger
            .record_extract(ExtractRecord {
                actor: "operator (API)".into(),
                user: user.into(),
                what: what.into(),
                purpose: "redress (X.1363 9.2.3)".into(),
                time: Utc::now(),
            })
            .map_err(|e| Problem::internal_logged(&e))?
            .await
            .map_err(|e| Problem::internal_logged(&e))?;
    }
    Ok(())
}

/// Text that is not blank and has at most `max` characters (not bytes:
/// "é" is one).
fn text_up_to(text: &str, max: usize) -> bool {
    !text.trim().is_empty() && text.chars().count() <= max
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resolution {
    /// upheld or rejected.
    state: String,
    resolution: String,
}

/// Resolve a dispute.
#[utoipa::path(post, path = "/v1/operator/disputes/{id}/resolve", request_body = Resolution,
    params(("id" = i64, Path)), security(("operator" = [])),
    responses((status = 200, body = Dispute),
        (status = 400, body = Problem, description = "`id` is not an integer"),
        (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn resolve(
    state: State,
    _: Operator,
    Path(id): Path<i64>,
    Body(r): Body<Resolution>,
) -> Result<Json<Dispute>, Problem> {
    if r.state != "upheld" && r.state != "rejected" {
        return Err(Problem::unprocessable("upheld or rejected").field("state"));
    }
    if !text_up_to(&r.resolution, 2000) {
        return Err(
            Problem::unprocessable("1–2000 characters: what was decided, for the user")
                .field("resolution"),
        );
    }
    let prefs = state.prefs.clone();
    let d = tokio::task::spawn_blocking(move || {
        prefs.store().resolve_dispute(id, &r.state, &r.resolution)
    })
    .await
    .map_err(|_| Problem::internal())?
    .map_err(|e| match e {
        crate::store::StoreError::NotFound { .. } => Problem::not_found(format!("no dispute {id}")),
        crate::store::StoreError::Exists { .. } => {
            Problem::conflict(format!("dispute {id} is already resolved"))
        }
        e => Problem::internal_logged(&e),
    })?;
    record_operator_extracts(
        &state,
        std::iter::once(d.user.as_str()),
        "dispute resolution",
    )
    .await?;
    Ok(Json(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(field: &str, s: &str, edge: Edge) -> Result<String, String> {
        time_arg(field, s, chrono_tz::Europe::Paris, edge)
            .map(|t| t.to_rfc3339())
            .map_err(|p| format!("{p:?}"))
    }

    /// Found by an outside review: the times the history shows could not be
    /// given back as bounds (an unencoded `+` arrives as a space), nor could
    /// a date or a local time.
    #[test]
    fn bounds_are_read_as_users_write_them() {
        let utc = "2026-11-24T13:50:34.660+00:00";
        for s in [
            "2026-11-24T14:50:34.66+01:00",
            "2026-11-24T14:50:34.66 01:00",
            "2026-11-24T13:50:34.66Z",
            "2026-11-24T14:50:34.66",
        ] {
            assert_eq!(at("from", s, Edge::Earliest).as_deref(), Ok(utc), "{s}");
        }
        assert_eq!(
            at("from", "2026-11-24", Edge::Earliest).as_deref(),
            Ok("2026-11-23T23:00:00+00:00")
        );
        assert_eq!(
            at("to", "2026-11-24T15:00", Edge::Latest).as_deref(),
            Ok("2026-11-24T14:00:00+00:00")
        );
        // 02:30 on 25 October 2026 happens twice in Paris: a range takes both.
        assert_eq!(
            at("from", "2026-10-25T02:30", Edge::Earliest).as_deref(),
            Ok("2026-10-25T00:30:00+00:00")
        );
        assert_eq!(
            at("to", "2026-10-25T02:30", Edge::Latest).as_deref(),
            Ok("2026-10-25T01:30:00+00:00")
        );
        // 02:30 on 29 March 2026 never happens there: the clocks skip to
        // 03:00 CEST, 01:00 UTC.
        assert_eq!(
            at("from", "2026-03-29T02:30", Edge::Earliest).as_deref(),
            Ok("2026-03-29T01:00:00+00:00")
        );
        // In Santiago the clocks skip midnight on 6 September 2026: the
        // date's first moment is 01:00 local (04:00 UTC), for either bound.
        let santiago = |field, s, edge| {
            time_arg(field, s, chrono_tz::America::Santiago, edge).map(|t| t.to_rfc3339())
        };
        for (field, edge) in [("from", Edge::Earliest), ("to", Edge::Latest)] {
            assert_eq!(
                santiago(field, "2026-09-06", edge).ok().as_deref(),
                Some("2026-09-06T04:00:00+00:00")
            );
        }
        let bad = at("to", "yesterday", Edge::Latest).unwrap_err();
        assert!(bad.contains("to: \\\"yesterday\\\""), "{bad}");
    }
}

//! Rules for grants that the ACT would accept but nobody can have meant:
//! the same kind collected twice, windows on no day, or that close when
//! they open, or that the receipt cannot state (not in whole minutes),
//! generalization past a number's digits, a grant that expires before it
//! is given. The API holds users' changes to them, and a directory import
//! the preferences it issues.

use chrono::{DateTime, Timelike, Utc};

use crate::mask::{past_max_decimals, MAX_DECIMALS};
use crate::model::Preferences;
use crate::prefs::PrefError;

/// What the ACT would accept but a user cannot have meant, in the grants
/// `after` adds to or changes from `before`. Only grants the change adds are
/// held to the expiry rule, and only with a `now` the change takes effect
/// at: a document read back and sent again may carry a grant that has
/// expired since, and a file checked on its own takes effect at no moment.
pub fn check_grants(
    before: &Preferences,
    after: &Preferences,
    now: Option<DateTime<Utc>>,
) -> Result<(), PrefError> {
    let pointless = |field: String, message: String| Err(PrefError::Pointless { field, message });
    for (i, g) in after.collect.iter().enumerate() {
        if after.collect[..i].iter().any(|o| o.kind == g.kind) {
            return pointless(
                format!("collect[{i}]"),
                format!(
                    "kind {:?} is collected twice: give one grant with all its windows",
                    g.kind
                ),
            );
        }
        if let Some(j) = g.windows.iter().position(|w| w.days.is_empty()) {
            return pointless(
                format!("collect[{i}].windows[{j}].days"),
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
        if let Some(j) = g.windows.iter().position(|w| w.from == w.to) {
            return pointless(
                format!("collect[{i}].windows[{j}]"),
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
        if let Some(j) = g
            .windows
            .iter()
            .position(|w| !whole(w.from) || !whole(w.to))
        {
            return pointless(
                format!("collect[{i}].windows[{j}]"),
                format!(
                    "a window of kind {:?} is not in whole minutes (give hh:mm or hh:mm:00)",
                    g.kind
                ),
            );
        }
    }
    // Only grants the change adds or alters, as for collection above.
    for (i, g) in after.share.iter().enumerate() {
        if before.share.contains(g) {
            continue;
        }
        if let Some((field, _)) = past_max_decimals(&g.mask) {
            return pointless(
                format!("share[{i}].mask.{field}"),
                format!(
                    "{field:?} of {:?} generalized past {MAX_DECIMALS} decimals either way: a \
                     number has no more digits to keep or drop",
                    g.kind
                ),
            );
        }
        if g.expires.zip(now).is_some_and(|(e, now)| e <= now) {
            return pointless(
                format!("share[{i}].expires"),
                format!(
                    "the grant of {:?} to {:?} would expire before it is given",
                    g.kind, g.provider
                ),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::{NaiveTime, Weekday};

    use super::*;
    use crate::model::{CollectGrant, MaskMethod, ShareGrant, Window};

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

    fn field(r: Result<(), PrefError>) -> Option<String> {
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
        assert_eq!(field(check_grants(&empty, &ok, Some(now))), None);

        let twice = with(
            vec![collect("steps", vec![]), collect("steps", vec![])],
            vec![],
        );
        assert_eq!(
            field(check_grants(&empty, &twice, Some(now))),
            Some("collect[1]".into())
        );

        let no_day = with(vec![collect("steps", vec![window(vec![])])], vec![]);
        assert_eq!(
            field(check_grants(&empty, &no_day, Some(now))),
            Some("collect[0].windows[0].days".into())
        );

        let mut closed = window(vec![Weekday::Tue]);
        closed.to = closed.from;
        let closed = with(vec![collect("steps", vec![closed])], vec![]);
        assert_eq!(
            field(check_grants(&empty, &closed, Some(now))),
            Some("collect[0].windows[0]".into())
        );
        // Already stored (say, imported): sent back unchanged, it stands.
        assert_eq!(field(check_grants(&closed, &closed, Some(now))), None);
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
                field(check_grants(&empty, &w, Some(now))),
                Some("collect[0].windows[0]".into()),
                "{to}"
            );
        }

        for decimals in [16, -16, 400, i32::MIN] {
            let mut g = share("location", None);
            g.mask
                .insert("lat".into(), MaskMethod::Generalize { decimals });
            let far = with(vec![], vec![g]);
            assert_eq!(
                field(check_grants(&empty, &far, Some(now))),
                Some("share[0].mask.lat".into()),
                "{decimals}"
            );
        }
        let mut g = share("location", None);
        g.mask
            .insert("lat".into(), MaskMethod::Generalize { decimals: -15 });
        assert_eq!(
            field(check_grants(&empty, &with(vec![], vec![g]), Some(now))),
            None
        );

        let expired = with(vec![], vec![share("steps", Some(past))]);
        assert_eq!(
            field(check_grants(&empty, &expired, Some(now))),
            Some("share[0].expires".into())
        );
        // A file checked on its own takes effect at no moment.
        assert_eq!(field(check_grants(&empty, &expired, None)), None);
        // The same grant sent back after it expired is not a new one.
        assert_eq!(field(check_grants(&expired, &expired, Some(now))), None);
    }
}

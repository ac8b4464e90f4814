//! From consentry's model (X.1363 PII preferences) to a Kantara v0.8 receipt.
//!
//! How the X.1363 roles map onto the receipt:
//! - The **operator** running consentry is the data service provider: it
//!   collects the user's PII from the devices and is the receipt's
//!   `dataController` (it issues and signs the receipt).
//! - Its own collection is one service, named after the operator, with one
//!   purpose: collection, category "Core Function" (Appendix A #1: carrying out
//!   the core function of the service, the appendix's default purpose),
//!   `nonCorePurpose: false`, and `thirdPartyDisclosure: false`, since
//!   collecting is not disclosing. Its PII categories are those of the
//!   collected kinds; the purpose text names the kinds and their collection
//!   windows, since those windows are part of what the user agreed to.
//! - Each **application service provider** the user shares with is a service
//!   of its own (`serviceName` = the provider's name), with one purpose entry
//!   per (provider, purpose) that has at least one kind shared: the
//!   provider's statement, category and termination, and the PII categories
//!   of the kinds shared. Receiving a copy makes the provider a PII controller
//!   of that copy, which the spec's terminology calls a *disclosure* to a
//!   third party: `thirdPartyDisclosure: true` and `3rdPartyName` = the
//!   provider's controller company (its name if no company is configured).
//!   A provider whose controller company is the operator's, or of role
//!   "data" (the operator's own processing) naming no company, is inside
//!   the controller: sharing with it discloses nothing (`false`, no name).
//! - `consentType` is "EXPLICIT": every grant is an opt-in the user made,
//!   in consentry's preference manager or, for preferences the directory
//!   file sets, outside consentry as the operator (the controller signing
//!   the receipt) states; `moc` says which.
//! - The receipt describes the **whole state after the change**, not a diff:
//!   withdrawing consent shows as the purpose (or service) being absent.
//!   Share grants already expired at `now` are left out for the same reason.
//! - `sensitive`/`spiCat` come from the kinds flagged sensitive among those
//!   collected or shared.
//! - `jurisdiction` is the operator's: the receipt is issued by the data
//!   controller under the law it operates in.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{
    CollectGrant, Contact, Directory, Kind, Preferences, Provider, ProviderRole, User, Window,
};

use super::error::ReceiptError;
use super::v08::{
    pii_category_number, purpose_category_name, ConsentReceipt, DataController, PurposeEntry,
    Service, CONSENT_EXPLICIT, VERSION,
};

/// The data service provider running consentry, as named on its receipts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operator {
    /// Service name of the operator's own collection, e.g. "Acme IoT hub".
    pub name: String,
    /// ISO 3166 two-letter code where there is one, else a description.
    pub jurisdiction: String,
    /// The Kantara `dataController`: company, contact name, address, email,
    /// phone. Mode 1 requires them all.
    pub controller: Contact,
    /// True when the operator acts on behalf of another controller.
    #[serde(default)]
    pub on_behalf: bool,
    /// Privacy policy in force when consent is given.
    pub policy_uri: String,
    /// Kantara `moc`.
    #[serde(default = "default_collection_method")]
    pub collection_method: String,
    /// Kantara `moc` of the versions a directory import made: preferences
    /// the user did not set in consentry.
    #[serde(default = "default_import_method")]
    pub import_method: String,
    /// Termination of the operator's own collection purpose.
    #[serde(default = "default_collection_termination")]
    pub collection_termination: String,
}

impl Operator {
    /// This operator with its collection purpose's termination also saying
    /// how long its own records about the user's data are kept
    /// (`ledger.retention_days`; `None`, forever): the user is told the
    /// retention of every party's copy (X.1363 9.2.1), the operator's too.
    pub fn stating_retention(mut self, ledger_days: Option<u32>) -> Operator {
        let shares = match ledger_days {
            Some(1) => "for 1 day, then deleted within a day".to_string(),
            Some(d) => format!("for {d} days, then deleted within a day"),
            None => "without a time limit".to_string(),
        };
        self.collection_termination.push_str(&format!(
            " The record of each share of your data with a provider is kept {shares}; \
             your consent history and receipts are kept as the evidence of your consent."
        ));
        self
    }
}

pub const DEFAULT_COLLECTION_METHOD: &str =
    "PII preferences set by you in the consentry preference manager";
pub const DEFAULT_IMPORT_METHOD: &str =
    "PII preferences loaded by the operator from its directory file, not set by you in consentry: the operator states that you opted in to them outside consentry";
pub const DEFAULT_COLLECTION_TERMINATION: &str =
    "Until you withdraw it: collection of a kind of data stops as soon as you remove it from your preferences.";

fn default_collection_method() -> String {
    DEFAULT_COLLECTION_METHOD.to_string()
}

fn default_import_method() -> String {
    DEFAULT_IMPORT_METHOD.to_string()
}

fn default_collection_termination() -> String {
    DEFAULT_COLLECTION_TERMINATION.to_string()
}

impl Operator {
    /// Mode 1 makes every one of these fields mandatory on a receipt.
    fn check(&self) -> Result<(), ReceiptError> {
        let c = &self.controller;
        for (field, value) in [
            ("operator name", &self.name),
            ("jurisdiction", &self.jurisdiction),
            ("policy URI", &self.policy_uri),
            ("collection method", &self.collection_method),
            ("controller company", &c.company),
            ("controller contact name", &c.name),
            ("controller address", &c.address),
            ("controller email", &c.email),
            ("controller phone", &c.phone),
        ] {
            if value.trim().is_empty() {
                return Err(ReceiptError::OperatorIncomplete(field));
            }
        }
        Ok(())
    }
}

/// The receipt for `user`'s preferences `prefs` as they stand at `now`,
/// unsigned (`publicKey` is filled in by signing). `jti` is a fresh UUID v4
/// from the `uuid` crate (OS randomness).
pub fn receipt_for(
    operator: &Operator,
    user: &User,
    prefs: &Preferences,
    dir: &Directory,
    kinds: &[Kind],
    now: DateTime<Utc>,
) -> Result<ConsentReceipt, ReceiptError> {
    // The preference manager picks the id before it compiles the version
    // (the ACT carries it into the share records); otherwise a new one.
    let jti = prefs
        .receipt
        .as_deref()
        .and_then(|id| Uuid::parse_str(id).ok())
        .unwrap_or_else(Uuid::new_v4);
    receipt_with_id(operator, user, prefs, dir, kinds, now, jti)
}

/// [`receipt_for`] with a given receipt ID (deterministic, for tests).
pub fn receipt_with_id(
    operator: &Operator,
    user: &User,
    prefs: &Preferences,
    dir: &Directory,
    kinds: &[Kind],
    now: DateTime<Utc>,
    jti: Uuid,
) -> Result<ConsentReceipt, ReceiptError> {
    operator.check()?;
    if prefs.user != user.id {
        return Err(ReceiptError::UserMismatch {
            user: user.id.clone(),
            prefs: prefs.user.clone(),
        });
    }
    let kind = |name: &str| {
        kinds
            .iter()
            .find(|k| k.name == name)
            .ok_or_else(|| ReceiptError::UnknownKind(name.to_string()))
    };

    let mut services = Vec::new();
    // Every kind the receipt covers, for `sensitive`/`spiCat`.
    let mut covered: Vec<&Kind> = Vec::new();

    if !prefs.collect.is_empty() {
        let collected = prefs
            .collect
            .iter()
            .map(|g| kind(&g.kind))
            .collect::<Result<Vec<_>, _>>()?;
        covered.extend(&collected);
        services.push(Service {
            service_name: operator.name.clone(),
            purposes: vec![PurposeEntry {
                purpose: collection_statement(&prefs.collect, &user.time_zone),
                consent_type: CONSENT_EXPLICIT.to_string(),
                purpose_category: vec![purpose_category_name(
                    crate::model::PurposeCategory::CoreFunction,
                )
                .to_string()],
                pii_category: categories(collected.iter().copied()),
                non_core_purpose: false,
                purpose_termination: operator.collection_termination.clone(),
                third_party_disclosure: false,
                third_party_name: None,
            }],
        });
    }

    // Check every share grant up front so that a bad one is an error rather
    // than silently missing from the receipt.
    for g in &prefs.share {
        let p = dir
            .providers
            .iter()
            .find(|p| p.id == g.provider)
            .ok_or_else(|| ReceiptError::UnknownProvider(g.provider.clone()))?;
        if !p.purposes.iter().any(|pu| pu.id == g.purpose) {
            return Err(ReceiptError::UnknownPurpose {
                provider: g.provider.clone(),
                purpose: g.purpose.clone(),
            });
        }
        kind(&g.kind)?;
    }
    let live = |g: &&crate::model::ShareGrant| g.expires.is_none_or(|e| e > now);

    // Directory order, then the provider's purpose order: stable receipts.
    for provider in &dir.providers {
        let disclosed = is_third_party(provider, &operator.controller);
        let mut purposes = Vec::new();
        for purpose in &provider.purposes {
            let grants: Vec<_> = prefs
                .share
                .iter()
                .filter(live)
                .filter(|g| g.provider == provider.id && g.purpose == purpose.id)
                .collect();
            if grants.is_empty() {
                continue;
            }
            let mut shared: Vec<&Kind> = Vec::new();
            for g in &grants {
                let k = kind(&g.kind)?;
                if !shared.iter().any(|s| s.name == k.name) {
                    shared.push(k);
                }
            }
            covered.extend(&shared);
            let mut termination = if purpose.termination.trim().is_empty() {
                format!(
                    "Data is deleted {} days after collection, or when you withdraw consent.",
                    purpose.retention_days
                )
            } else {
                purpose.termination.clone()
            };
            let ends: Vec<String> = grants
                .iter()
                .filter_map(|g| g.expires.map(|e| format!("{} at {}", g.kind, end_time(e))))
                .collect();
            if !ends.is_empty() {
                termination.push_str(&format!(
                    " Your consent ends by itself for {}.",
                    ends.join(", ")
                ));
            }
            purposes.push(PurposeEntry {
                purpose: purpose.statement.clone(),
                consent_type: CONSENT_EXPLICIT.to_string(),
                purpose_category: vec![purpose_category_name(purpose.category).to_string()],
                pii_category: categories(shared.iter().copied()),
                non_core_purpose: !purpose.core,
                purpose_termination: termination,
                third_party_disclosure: disclosed,
                third_party_name: disclosed.then(|| third_party_name(provider)),
            });
        }
        if !purposes.is_empty() {
            services.push(Service {
                service_name: provider.name.clone(),
                purposes,
            });
        }
    }

    let spi_cat = categories(covered.iter().copied().filter(|k| k.sensitive));
    let c = &operator.controller;
    Ok(ConsentReceipt {
        version: VERSION.to_string(),
        jurisdiction: operator.jurisdiction.clone(),
        iat: now.timestamp(),
        moc: operator.collection_method.clone(),
        jti: jti.hyphenated().to_string(),
        public_key: String::new(),
        data_controller: DataController {
            on_behalf: operator.on_behalf,
            contact: c.name.clone(),
            company: c.company.clone(),
            address: c.address.clone(),
            email: c.email.clone(),
            phone: c.phone.clone(),
        },
        policy_uri: operator.policy_uri.clone(),
        services,
        sub: user.id.clone(),
        sensitive: !spi_cat.is_empty(),
        spi_cat,
    })
}

/// Kantara 3.1.14: a disclosure is one outside the PII controller. A
/// provider whose controller company is the operator's stays inside it, and
/// so does the operator's own processing (role "data") naming no company.
fn is_third_party(p: &Provider, operator: &Contact) -> bool {
    let company = p.controller.company.trim();
    let inside = if company.is_empty() {
        p.role == ProviderRole::Data
    } else {
        company == operator.company.trim()
    };
    !inside
}

fn third_party_name(p: &Provider) -> String {
    if p.controller.company.trim().is_empty() {
        p.name.clone()
    } else {
        p.controller.company.clone()
    }
}

/// Distinct Appendix B categories, in the appendix's order.
fn categories<'a>(kinds: impl Iterator<Item = &'a Kind>) -> Vec<String> {
    let set: BTreeSet<(u8, &'static str)> = kinds
        .map(|k| (pii_category_number(k.category), k.category.as_str()))
        .collect();
    set.into_iter().map(|(_, name)| name.to_string()).collect()
}

fn collection_statement(grants: &[CollectGrant], time_zone: &str) -> String {
    let what: Vec<String> = grants
        .iter()
        .map(|g| {
            if g.windows.is_empty() {
                format!("{} (at any time)", g.kind)
            } else {
                let w: Vec<String> = g.windows.iter().map(window).collect();
                format!("{} ({}, {})", g.kind, w.join("; "), zone_time(time_zone))
            }
        })
        .collect();
    format!(
        "Collecting your data from your devices, to relay it only as your preferences allow: {}",
        what.join(", ")
    )
}

/// The zone windows are read in, as a receipt states it. `Etc/GMT+5` is
/// five hours behind UTC (POSIX signs), which its name says the wrong way
/// round to most readers, so those zones also state their offset.
fn zone_time(time_zone: &str) -> String {
    use chrono::{Offset, TimeZone};
    let signed = time_zone
        .strip_prefix("Etc/GMT")
        .is_some_and(|n| n.starts_with(['+', '-']));
    match time_zone.parse::<chrono_tz::Tz>() {
        Ok(tz) if signed => {
            let offset = tz.offset_from_utc_datetime(&DateTime::UNIX_EPOCH.naive_utc());
            format!("{time_zone} time, UTC{}", offset.fix())
        }
        _ => format!("{time_zone} time"),
    }
}

fn window(w: &Window) -> String {
    let days: Vec<String> = w.days.iter().map(|d| d.to_string()).collect();
    format!(
        "{} {}-{}",
        days.join(","),
        w.from.format("%H:%M"),
        w.to.format("%H:%M")
    )
}

/// When a grant ends, to the minute when it ends on one; otherwise as
/// precisely as it was given, so the receipt never states an end earlier
/// than the one enforced.
fn end_time(e: DateTime<Utc>) -> String {
    use chrono::Timelike;
    let format = if e.nanosecond() != 0 {
        "%Y-%m-%d %H:%M:%S%.f UTC"
    } else if e.second() != 0 {
        "%Y-%m-%d %H:%M:%S UTC"
    } else {
        "%Y-%m-%d %H:%M UTC"
    };
    e.format(format).to_string()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{demo, operator, t0};
    use super::*;

    #[test]
    fn windows_state_the_offset_of_zones_named_with_posix_signs() {
        let window = Window {
            days: vec![chrono::Weekday::Mon],
            from: chrono::NaiveTime::from_hms_opt(8, 0, 0).unwrap(),
            to: chrono::NaiveTime::from_hms_opt(20, 0, 0).unwrap(),
        };
        let grant = CollectGrant {
            kind: "heart_rate".into(),
            windows: vec![window],
        };
        let stated = |zone| collection_statement(std::slice::from_ref(&grant), zone);
        assert!(
            stated("Etc/GMT+5")
                .ends_with("heart_rate (Mon 08:00-20:00, Etc/GMT+5 time, UTC-05:00)"),
            "{}",
            stated("Etc/GMT+5")
        );
        assert!(stated("Etc/GMT-14").contains("Etc/GMT-14 time, UTC+14:00)"));
        assert!(stated("Europe/Paris").contains("(Mon 08:00-20:00, Europe/Paris time)"));
        assert!(stated("UTC").contains("UTC time)"));
    }

    #[test]
    fn the_operators_retention_is_stated() {
        let (dir, kinds) = demo();
        let termination = |days| {
            let r = receipt_for(
                &operator().stating_retention(days),
                &dir.users[0],
                &dir.preferences[0],
                &dir,
                &kinds,
                t0(),
            )
            .expect("receipt");
            r.services[0].purposes[0].purpose_termination.clone()
        };
        let kept = termination(Some(1825));
        assert!(
            kept.starts_with(&operator().collection_termination),
            "{kept}"
        );
        assert!(
            kept.contains("kept for 1825 days, then deleted within a day"),
            "{kept}"
        );
        assert!(termination(Some(1)).contains("kept for 1 day,"));
        assert!(termination(None).contains("kept without a time limit"));
    }

    /// Inside the controller: any provider of the operator's company, and
    /// the operator's own processing naming none. Another company is outside.
    #[test]
    fn providers_of_the_operators_company_are_no_third_party() {
        let (mut dir, kinds) = demo();
        let op = operator();
        let fit = dir
            .providers
            .iter()
            .position(|p| p.id == "fitcoach")
            .unwrap();
        let own = op.controller.company.clone();
        use ProviderRole::{Application, Data};
        // (role, controller company, the third party named, if one is)
        let cases = [
            (
                Data,
                "FitCoach SAS".to_string(),
                Some("FitCoach SAS"),
                "another company",
            ),
            (Data, format!(" {own} "), None, "the operator's company"),
            (Data, String::new(), None, "no company of its own"),
            (
                Application,
                String::new(),
                Some("FitCoach"),
                "an application provider of no stated company",
            ),
            (
                Application,
                own.clone(),
                None,
                "an application provider of the operator's company",
            ),
        ];
        for (role, company, named, why) in cases {
            dir.providers[fit].role = role;
            dir.providers[fit].controller.company = company;
            let r = receipt_for(&op, &dir.users[0], &dir.preferences[0], &dir, &kinds, t0())
                .expect("receipt");
            let p = &r.services[1].purposes[0];
            assert_eq!(
                (p.third_party_disclosure, p.third_party_name.as_deref()),
                (named.is_some(), named),
                "{why}"
            );
        }
    }

    #[test]
    fn demo_alice_maps_collection_and_fitcoach() {
        let (dir, kinds) = demo();
        let r = receipt_for(
            &operator(),
            &dir.users[0],
            &dir.preferences[0],
            &dir,
            &kinds,
            t0(),
        )
        .expect("receipt");
        assert_eq!(r.sub, "alice");
        assert_eq!(r.iat, t0().timestamp());
        assert!(Uuid::parse_str(&r.jti).is_ok_and(|u| u.get_version_num() == 4));
        assert_eq!(r.services.len(), 2, "collection + fitcoach, not insureco");
        let col = &r.services[0];
        assert_eq!(col.service_name, "Demo IoT Hub");
        assert!(!col.purposes[0].third_party_disclosure);
        assert_eq!(col.purposes[0].purpose_category, vec!["Core Function"]);
        assert_eq!(col.purposes[0].pii_category, vec!["Health", "Behavioral"]);
        let fit = &r.services[1];
        assert_eq!(fit.service_name, "FitCoach");
        let p = &fit.purposes[0];
        assert_eq!(p.purpose_category, vec!["Personalized Experience"]);
        assert_eq!(p.pii_category, vec!["Health", "Behavioral"]);
        assert!(p.third_party_disclosure);
        assert_eq!(p.third_party_name.as_deref(), Some("FitCoach SAS"));
        assert!(!p.non_core_purpose);
        assert_eq!(p.consent_type, "EXPLICIT");
        assert!(r.sensitive);
        assert_eq!(r.spi_cat, vec!["Health"]);
    }

    #[test]
    fn bob_has_no_sharing_and_expired_grants_vanish() {
        let (mut dir, kinds) = demo();
        let r = receipt_for(
            &operator(),
            &dir.users[1],
            &dir.preferences[1],
            &dir,
            &kinds,
            t0(),
        )
        .expect("receipt");
        assert_eq!(r.services.len(), 1);

        // Alice's grants all expire before t0: only collection remains.
        for g in &mut dir.preferences[0].share {
            g.expires = Some(t0() - chrono::Duration::seconds(1));
        }
        let r = receipt_for(
            &operator(),
            &dir.users[0],
            &dir.preferences[0],
            &dir,
            &kinds,
            t0(),
        )
        .expect("receipt");
        assert_eq!(r.services.len(), 1);

        // A future expiry is stated in the termination.
        for g in &mut dir.preferences[0].share {
            g.expires = Some(t0() + chrono::Duration::days(30));
        }
        let r = receipt_for(
            &operator(),
            &dir.users[0],
            &dir.preferences[0],
            &dir,
            &kinds,
            t0(),
        )
        .expect("receipt");
        assert!(r.services[1].purposes[0]
            .purpose_termination
            .contains("ends by itself for heart_rate at"));
    }

    /// Found by an outside review: an end given to the second was stated to
    /// the minute, so data went on being shared after the stated end.
    #[test]
    fn an_end_is_stated_as_precisely_as_it_was_given() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(end_time(at("2026-11-24T13:52:00Z")), "2026-11-24 13:52 UTC");
        assert_eq!(
            end_time(at("2026-11-24T13:52:18Z")),
            "2026-11-24 13:52:18 UTC"
        );
        assert_eq!(
            end_time(at("2026-11-24T13:52:18.5Z")),
            "2026-11-24 13:52:18.500 UTC"
        );
    }

    #[test]
    fn non_sensitive_receipt_has_empty_spicat() {
        let (dir, kinds) = demo();
        let mut prefs = dir.preferences[1].clone();
        prefs.collect.retain(|g| g.kind == "steps");
        let r =
            receipt_for(&operator(), &dir.users[1], &prefs, &dir, &kinds, t0()).expect("receipt");
        assert!(!r.sensitive);
        assert!(r.spi_cat.is_empty());
    }

    #[test]
    fn bad_input_is_an_error() {
        let (dir, kinds) = demo();
        let alice = &dir.users[0];
        let mut prefs = dir.preferences[0].clone();
        let err = |prefs: &Preferences, op: &Operator| {
            receipt_for(op, alice, prefs, &dir, &kinds, t0()).err()
        };

        prefs.share[0].provider = "nobody".into();
        assert!(matches!(
            err(&prefs, &operator()),
            Some(ReceiptError::UnknownProvider(p)) if p == "nobody"
        ));
        prefs.share[0].provider = "fitcoach".into();
        prefs.share[0].purpose = "spying".into();
        assert!(matches!(
            err(&prefs, &operator()),
            Some(ReceiptError::UnknownPurpose { .. })
        ));
        prefs.share[0].purpose = "coaching".into();
        prefs.collect[0].kind = "dna".into();
        assert!(
            matches!(err(&prefs, &operator()), Some(ReceiptError::UnknownKind(k)) if k == "dna")
        );

        let mut op = operator();
        op.controller.phone.clear();
        assert!(matches!(
            err(&dir.preferences[0], &op),
            Some(ReceiptError::OperatorIncomplete("controller phone"))
        ));
        assert!(matches!(
            err(&dir.preferences[1], &operator()),
            Some(ReceiptError::UserMismatch { .. })
        ));
    }
}

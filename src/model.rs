//! The X.1363 vocabulary as data: users (PII principals), their devices,
//! application service providers with their T&C, kinds of data, and the
//! users' PII preferences. These are the *sources* of the ACT; the gateway
//! never reads them directly on the hot path (see `act`).

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveTime, Utc, Weekday};
use serde::{Deserialize, Serialize};

/// Kantara Consent Receipt v0.8, Appendix B. Kept as a closed set so that a
/// typo in configuration is an error rather than a new category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum PiiCategory {
    Biographical,
    Contact,
    Biometric,
    #[serde(rename = "Communications/Social")]
    CommunicationsSocial,
    #[serde(rename = "Network/Service")]
    NetworkService,
    Health,
    Financial,
    #[serde(rename = "Official/Government Identifiers")]
    OfficialIdentifiers,
    #[serde(rename = "Government Services")]
    GovernmentServices,
    Judicial,
    #[serde(rename = "Property/Asset")]
    PropertyAsset,
    #[serde(rename = "Employee Personal Information")]
    EmployeePersonalInformation,
    #[serde(rename = "Psychological/Attitudinal")]
    PsychologicalAttitudinal,
    Membership,
    Behavioral,
}

impl PiiCategory {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Biographical => "Biographical",
            Self::Contact => "Contact",
            Self::Biometric => "Biometric",
            Self::CommunicationsSocial => "Communications/Social",
            Self::NetworkService => "Network/Service",
            Self::Health => "Health",
            Self::Financial => "Financial",
            Self::OfficialIdentifiers => "Official/Government Identifiers",
            Self::GovernmentServices => "Government Services",
            Self::Judicial => "Judicial",
            Self::PropertyAsset => "Property/Asset",
            Self::EmployeePersonalInformation => "Employee Personal Information",
            Self::PsychologicalAttitudinal => "Psychological/Attitudinal",
            Self::Membership => "Membership",
            Self::Behavioral => "Behavioral",
        }
    }
}

/// Kantara Consent Receipt v0.8, Appendix A purpose categories.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum PurposeCategory {
    #[serde(rename = "Core Function")]
    CoreFunction,
    #[serde(rename = "Contracted Service")]
    ContractedService,
    Delivery,
    #[serde(rename = "Contact Requested")]
    ContactRequested,
    #[serde(rename = "Personalized Experience")]
    PersonalizedExperience,
    Marketing,
    #[serde(rename = "Marketing Third Parties")]
    MarketingThirdParties,
    #[serde(rename = "Use for Delivery")]
    UseForDelivery,
    #[serde(rename = "Disclosure for Marketing")]
    DisclosureForMarketing,
    #[serde(rename = "3rd Party Disclosure for Core Function")]
    ThirdPartyDisclosureForCoreFunction,
    #[serde(rename = "Legally Required Data Retention")]
    LegallyRequiredDataRetention,
    #[serde(rename = "Required by Law Enforcement or Government")]
    RequiredByLaw,
    #[serde(rename = "Protecting Your Health")]
    ProtectingYourHealth,
    #[serde(rename = "Protecting Our Interests")]
    ProtectingOurInterests,
    #[serde(rename = "Improve Performance")]
    ImprovePerformance,
    Membership,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    #[default]
    Json,
    Msgpack,
    /// The gateway cannot look inside: the kind is shared whole or not at all.
    Opaque,
}

/// What ingress does with fields a payload carries that its kind does not
/// declare (X.1363 9.1.6, data minimization).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Undeclared {
    #[default]
    Strip,
    Reject,
}

/// The type a declared field's value must have at ingress. A declared field
/// without one may hold any value, a whole object included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// Any number.
    Number,
    /// A whole number.
    Integer,
    String,
    Boolean,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Kind {
    pub name: String,
    pub category: PiiCategory,
    #[serde(default)]
    pub sensitive: bool,
    #[serde(default)]
    pub format: PayloadFormat,
    /// Dotted paths of the fields this kind carries, e.g. `bpm` or `pos.lat`.
    #[serde(default)]
    pub fields: Vec<String>,
    /// Types of declared fields, by path (e.g. `bpm = "number"`). A payload
    /// whose field has another type is refused at ingress, so that a
    /// declared field cannot carry other data past minimization.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub types: BTreeMap<String, FieldType>,
    #[serde(default)]
    pub undeclared: Undeclared,
    /// Produced by the data service provider rather than collected from a
    /// device (X.1363 10.1: "outputs of data handling").
    #[serde(default)]
    pub derived: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub id: String,
    /// IANA zone; collection windows are read in it.
    pub time_zone: String,
    #[serde(default)]
    pub jurisdiction: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub id: String,
    pub user: String,
    /// argon2 PHC string of the MQTT password.
    #[serde(default)]
    pub password_hash: Option<String>,
    /// SHA-256 (hex) of the DER client certificate, for mutual-TLS devices.
    #[serde(default)]
    pub cert_sha256: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProviderRole {
    Data,
    #[default]
    Application,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Contact {
    pub company: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub email: String,
    #[serde(default)]
    pub phone: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Purpose {
    pub id: String,
    pub statement: String,
    pub category: PurposeCategory,
    pub kinds: Vec<String>,
    #[serde(default = "yes")]
    pub core: bool,
    pub retention_days: u32,
    #[serde(default)]
    pub termination: String,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub role: ProviderRole,
    #[serde(default)]
    pub password_hash: Option<String>,
    #[serde(default)]
    pub cert_sha256: Option<String>,
    #[serde(default)]
    pub controller: Contact,
    #[serde(default)]
    pub jurisdiction: Option<String>,
    #[serde(default)]
    pub privacy_policy: Option<String>,
    #[serde(default)]
    pub purposes: Vec<Purpose>,
}

/// A span of local time on some days of the week. `to` before `from` wraps
/// past midnight (e.g. 22:00–06:00).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Mon, Tue, Wed, Thu, Fri, Sat, Sun.
    #[serde(with = "weekdays")]
    #[schema(value_type = Vec<String>, example = json!(["Mon", "Tue"]))]
    pub days: Vec<Weekday>,
    /// Local time in the user's time zone, HH:MM:SS.
    #[schema(value_type = String, example = "09:00:00")]
    pub from: NaiveTime,
    #[schema(value_type = String, example = "17:30:00")]
    pub to: NaiveTime,
}

mod weekdays {
    use chrono::Weekday;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(days: &[Weekday], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(days.iter().map(|d| d.to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Weekday>, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        names
            .iter()
            .map(|n| {
                n.parse::<Weekday>()
                    .map_err(|_| D::Error::custom(format!("unknown weekday {n:?}")))
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CollectGrant {
    pub kind: String,
    /// Empty means at any time.
    #[serde(default)]
    pub windows: Vec<Window>,
}

/// How one field is shown to a provider.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash, utoipa::ToSchema)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub enum MaskMethod {
    /// The field is taken out.
    Remove,
    /// The field stays, its value replaced by a constant.
    Redact,
    /// Numbers rounded to `decimals` places (negative: to tens, hundreds…).
    Generalize { decimals: i32 },
    /// Keyed HMAC per provider, so two providers cannot join on it.
    Pseudonymize,
}

impl MaskMethod {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Remove => "remove",
            Self::Redact => "redact",
            Self::Generalize { .. } => "generalize",
            Self::Pseudonymize => "pseudonymize",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShareGrant {
    pub provider: String,
    pub purpose: String,
    pub kind: String,
    /// Fields not named here are delivered as they are.
    #[serde(default)]
    pub mask: BTreeMap<String, MaskMethod>,
    #[serde(default)]
    pub expires: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Preferences {
    pub user: String,
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub collect: Vec<CollectGrant>,
    #[serde(default)]
    pub share: Vec<ShareGrant>,
    /// The id (jti) of the consent receipt documenting this version; each
    /// share record in the ledger names it. Set by consentry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<String>,
}

/// API login secrets for a user of a directory file (the demo's users),
/// so they can read their history and receipts without registering.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserLogin {
    pub user: String,
    /// argon2 PHC string.
    pub password_hash: String,
    /// Base32 TOTP secret (RFC 6238, SHA-1, 6 digits, 30 s).
    pub totp_secret: String,
}

/// Everything the ACT is compiled from.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Directory {
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub devices: Vec<Device>,
    #[serde(default)]
    pub providers: Vec<Provider>,
    #[serde(default)]
    pub preferences: Vec<Preferences>,
    #[serde(default)]
    pub logins: Vec<UserLogin>,
}

/// What [`valid_id`] accepts, as an error's detail says it.
pub const ID_RULE: &str = "use 1–64 of a–z, 0–9, '-', '_', '.', starting with a letter or digit";

/// 1–64 of a–z, 0–9, '-', '_' and '.', starting with a letter or digit: an
/// id is a path segment of the API (`.` and `..` would name no resource a
/// client can reach) and a level of MQTT topics.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// Why a provider's terms cannot be published: the field at fault
/// (`purposes[1].kinds`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadTerms {
    pub field: String,
    pub message: String,
}

impl Provider {
    /// Checks what a user would read and consent to: an id for each
    /// purpose, a statement that says something, and the kinds it asks
    /// for, each once. The API and directory imports both hold providers
    /// to it.
    pub fn check_terms(&self) -> Result<(), BadTerms> {
        if self.purposes.is_empty() {
            return Err(BadTerms {
                field: "purposes".into(),
                message: "a provider declares at least one purpose".into(),
            });
        }
        for (i, u) in self.purposes.iter().enumerate() {
            let bad = |field: &str, message: String| {
                Err(BadTerms {
                    field: format!("purposes[{i}].{field}"),
                    message,
                })
            };
            if !valid_id(&u.id) {
                return bad("id", ID_RULE.into());
            }
            // A grant names its purpose by id: two under one id could not
            // say which one the user agreed to.
            if self.purposes[..i].iter().any(|o| o.id == u.id) {
                return bad("id", format!("purpose {:?} is declared twice", u.id));
            }
            // trim() keeps a zero-width space; a statement has words.
            if !u.statement.chars().any(char::is_alphanumeric) {
                return bad(
                    "statement",
                    format!(
                        "purpose {:?} says nothing: users consent to its statement",
                        u.id
                    ),
                );
            }
            if u.kinds.is_empty() {
                return bad(
                    "kinds",
                    format!(
                        "purpose {:?} asks for no kind of data: a purpose names what it needs",
                        u.id
                    ),
                );
            }
            if let Some((_, k)) = u
                .kinds
                .iter()
                .enumerate()
                .find(|(j, k)| u.kinds[..*j].contains(k))
            {
                return bad(
                    "kinds",
                    format!("purpose {:?} names kind {k:?} twice", u.id),
                );
            }
        }
        Ok(())
    }
}

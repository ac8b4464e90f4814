//! The Kantara Consent Receipt v0.8 Mode 2 JSON (section 4 of the spec),
//! with every field, and the names and numbers of the Appendix A/B
//! categories.
//!
//! Field order follows the spec's example (Appendix D) so that a receipt
//! reads the same way as the one in the spec. Every field is required on
//! deserialization (except `3rdPartyName`, which the spec makes conditional):
//! the published schema lists no `required` at all, so this struct is what
//! checks that a receipt is complete. Unknown properties are ignored, as the
//! spec asks of receivers ("SHOULD ignore extension properties").

use serde::{Deserialize, Serialize};

use crate::model::{PiiCategory, PurposeCategory};

/// `version` of a v0.8 receipt.
pub const VERSION: &str = "0.8";

/// `consentType` for consent given by the user acting in the preference
/// manager: opt-in, which the spec ranks as Expressed/Explicit. Spelled as in
/// the v1.1 example; the v0.8 text gives no case.
pub const CONSENT_EXPLICIT: &str = "EXPLICIT";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsentReceipt {
    pub version: String,
    pub jurisdiction: String,
    /// Consent time-stamp, seconds since the epoch (UTC).
    pub iat: i64,
    /// Collection method.
    pub moc: String,
    /// Receipt ID: a UUID v4.
    pub jti: String,
    /// The public key that signs this receipt, as an RFC 7517 JWK (compact
    /// JSON). Set when the receipt is signed; empty before.
    pub public_key: String,
    pub data_controller: DataController,
    pub policy_uri: String,
    pub services: Vec<Service>,
    /// PII principal ID.
    pub sub: String,
    pub sensitive: bool,
    /// Sensitive PII categories; non-empty whenever `sensitive` is true.
    pub spi_cat: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataController {
    pub on_behalf: bool,
    pub contact: String,
    pub company: String,
    pub address: String,
    pub email: String,
    pub phone: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub service_name: String,
    pub purposes: Vec<PurposeEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PurposeEntry {
    pub purpose: String,
    pub consent_type: String,
    pub purpose_category: Vec<String>,
    pub pii_category: Vec<String>,
    pub non_core_purpose: bool,
    pub purpose_termination: String,
    pub third_party_disclosure: bool,
    #[serde(
        rename = "3rdPartyName",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub third_party_name: Option<String>,
}

/// Appendix A short code.
pub fn purpose_category_name(c: PurposeCategory) -> &'static str {
    use PurposeCategory::*;
    match c {
        CoreFunction => "Core Function",
        ContractedService => "Contracted Service",
        Delivery => "Delivery",
        ContactRequested => "Contact Requested",
        PersonalizedExperience => "Personalized Experience",
        Marketing => "Marketing",
        MarketingThirdParties => "Marketing Third Parties",
        UseForDelivery => "Use for Delivery",
        DisclosureForMarketing => "Disclosure for Marketing",
        ThirdPartyDisclosureForCoreFunction => "3rd Party Disclosure for Core Function",
        LegallyRequiredDataRetention => "Legally Required Data Retention",
        RequiredByLaw => "Required by Law Enforcement or Government",
        ProtectingYourHealth => "Protecting Your Health",
        ProtectingOurInterests => "Protecting Our Interests",
        ImprovePerformance => "Improve Performance",
        Membership => "Membership",
    }
}

/// Appendix A number. The appendix skips 11; the v1.1 example keeps the same
/// numbers ("12 - Legally Required Data Retention").
pub fn purpose_category_number(c: PurposeCategory) -> u8 {
    use PurposeCategory::*;
    match c {
        CoreFunction => 1,
        ContractedService => 2,
        Delivery => 3,
        ContactRequested => 4,
        PersonalizedExperience => 5,
        Marketing => 6,
        MarketingThirdParties => 7,
        UseForDelivery => 8,
        DisclosureForMarketing => 9,
        ThirdPartyDisclosureForCoreFunction => 10,
        LegallyRequiredDataRetention => 12,
        RequiredByLaw => 13,
        ProtectingYourHealth => 14,
        ProtectingOurInterests => 15,
        ImprovePerformance => 16,
        Membership => 17,
    }
}

/// Appendix B number (1–15).
pub fn pii_category_number(c: PiiCategory) -> u8 {
    use PiiCategory::*;
    match c {
        Biographical => 1,
        Contact => 2,
        Biometric => 3,
        CommunicationsSocial => 4,
        NetworkService => 5,
        Health => 6,
        Financial => 7,
        OfficialIdentifiers => 8,
        GovernmentServices => 9,
        Judicial => 10,
        PropertyAsset => 11,
        EmployeePersonalInformation => 12,
        PsychologicalAttitudinal => 13,
        Membership => 14,
        Behavioral => 15,
    }
}

const ALL_PII: [PiiCategory; 15] = {
    use PiiCategory::*;
    [
        Biographical,
        Contact,
        Biometric,
        CommunicationsSocial,
        NetworkService,
        Health,
        Financial,
        OfficialIdentifiers,
        GovernmentServices,
        Judicial,
        PropertyAsset,
        EmployeePersonalInformation,
        PsychologicalAttitudinal,
        Membership,
        Behavioral,
    ]
};

const ALL_PURPOSES: [PurposeCategory; 16] = {
    use PurposeCategory::*;
    [
        CoreFunction,
        ContractedService,
        Delivery,
        ContactRequested,
        PersonalizedExperience,
        Marketing,
        MarketingThirdParties,
        UseForDelivery,
        DisclosureForMarketing,
        ThirdPartyDisclosureForCoreFunction,
        LegallyRequiredDataRetention,
        RequiredByLaw,
        ProtectingYourHealth,
        ProtectingOurInterests,
        ImprovePerformance,
        Membership,
    ]
};

/// The Appendix B category a v0.8 string names, if it is one.
pub fn pii_category_from_name(name: &str) -> Option<PiiCategory> {
    ALL_PII.into_iter().find(|c| c.as_str() == name)
}

/// The Appendix A category a v0.8 string names, if it is one.
pub fn purpose_category_from_name(name: &str) -> Option<PurposeCategory> {
    ALL_PURPOSES
        .into_iter()
        .find(|c| purpose_category_name(*c) == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_model_serde() {
        for c in ALL_PII {
            assert_eq!(pii_category_from_name(c.as_str()), Some(c));
        }
        for c in ALL_PURPOSES {
            let name = purpose_category_name(c);
            assert_eq!(purpose_category_from_name(name), Some(c));
            // The configuration spelling (model's serde) is the spec's.
            assert_eq!(serde_json::to_value(c).ok(), Some(name.into()));
        }
        let numbers: Vec<u8> = ALL_PII.into_iter().map(pii_category_number).collect();
        assert_eq!(numbers, (1..=15).collect::<Vec<_>>());
    }
}

//! The same receipt rendered as Kantara Consent Receipt v1.1
//! (`KI-CR-v1.1.0`), for consumers of the newer format.
//!
//! A pure renaming of the v0.8 receipt (see the README beside the v1.1 schema
//! in shared/spec) with three changes of form, all taken from the published
//! v1.1 example:
//! - categories carry their appendix number: "6 - Health",
//!   "5 - Personalized Experience" (a string that is not an appendix category
//!   is kept as it is);
//! - `dataController` becomes a one-element `piiControllers` array whose
//!   `address` is an object: the one-line address goes in `streetAddress`;
//! - `primaryPurpose` is the negation of v0.8's `nonCorePurpose`.
//!
//! `language` is "en": the texts consentry writes into receipts are English.

use serde::Serialize;

use super::v08::{
    pii_category_from_name, pii_category_number, purpose_category_from_name,
    purpose_category_number, ConsentReceipt,
};

pub const VERSION: &str = "KI-CR-v1.1.0";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsentReceiptV11 {
    pub version: String,
    pub jurisdiction: String,
    pub consent_timestamp: i64,
    pub collection_method: String,
    #[serde(rename = "consentReceiptID")]
    pub consent_receipt_id: String,
    pub public_key: String,
    pub language: String,
    pub pii_principal_id: String,
    pub pii_controllers: Vec<PiiController>,
    pub policy_url: String,
    pub services: Vec<ServiceV11>,
    pub sensitive: bool,
    pub spi_cat: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PiiController {
    pub pii_controller: String,
    pub on_behalf: bool,
    pub contact: String,
    pub address: PostalAddress,
    pub email: String,
    pub phone: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PostalAddress {
    pub street_address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceV11 {
    pub service: String,
    pub purposes: Vec<PurposeV11>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PurposeV11 {
    pub purpose: String,
    pub purpose_category: Vec<String>,
    pub consent_type: String,
    pub pii_category: Vec<String>,
    pub primary_purpose: bool,
    pub termination: String,
    pub third_party_disclosure: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub third_party_name: Option<String>,
}

fn numbered_pii(names: &[String]) -> Vec<String> {
    names
        .iter()
        .map(|n| match pii_category_from_name(n) {
            Some(c) => format!("{} - {}", pii_category_number(c), n),
            None => n.clone(),
        })
        .collect()
}

fn numbered_purpose(names: &[String]) -> Vec<String> {
    names
        .iter()
        .map(|n| match purpose_category_from_name(n) {
            Some(c) => format!("{} - {}", purpose_category_number(c), n),
            None => n.clone(),
        })
        .collect()
}

impl From<&ConsentReceipt> for ConsentReceiptV11 {
    fn from(r: &ConsentReceipt) -> Self {
        let dc = &r.data_controller;
        ConsentReceiptV11 {
            version: VERSION.to_string(),
            jurisdiction: r.jurisdiction.clone(),
            consent_timestamp: r.iat,
            collection_method: r.moc.clone(),
            consent_receipt_id: r.jti.clone(),
            public_key: r.public_key.clone(),
            language: "en".to_string(),
            pii_principal_id: r.sub.clone(),
            pii_controllers: vec![PiiController {
                pii_controller: dc.company.clone(),
                on_behalf: dc.on_behalf,
                contact: dc.contact.clone(),
                address: PostalAddress {
                    street_address: dc.address.clone(),
                },
                email: dc.email.clone(),
                phone: dc.phone.clone(),
            }],
            policy_url: r.policy_uri.clone(),
            services: r
                .services
                .iter()
                .map(|s| ServiceV11 {
                    service: s.service_name.clone(),
                    purposes: s
                        .purposes
                        .iter()
                        .map(|p| PurposeV11 {
                            purpose: p.purpose.clone(),
                            purpose_category: numbered_purpose(&p.purpose_category),
                            consent_type: p.consent_type.clone(),
                            pii_category: numbered_pii(&p.pii_category),
                            primary_purpose: !p.non_core_purpose,
                            termination: p.purpose_termination.clone(),
                            third_party_disclosure: p.third_party_disclosure,
                            third_party_name: p.third_party_name.clone(),
                        })
                        .collect(),
                })
                .collect(),
            sensitive: r.sensitive,
            spi_cat: numbered_pii(&r.spi_cat),
        }
    }
}

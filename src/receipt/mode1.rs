//! Mode 1: the receipt for people. The 18 required fields (section 3.1.2),
//! in the order of Appendix C ("CX Order"), each with its Appendix C name
//! and a plain-language explanation, as text and as HTML.
//!
//! Several fields belong to a purpose rather than to the receipt (PII
//! category, purpose category, third party, consent type, termination).
//! They keep their place in the order and list one line per purpose: field 1
//! numbers the purposes ("FitCoach — purpose 2: Fitness coaching…"), the
//! later fields refer to them as "FitCoach, purpose 2: …".

use chrono::DateTime;

use super::v08::{ConsentReceipt, PurposeEntry, Service};

/// One Mode 1 field: its Appendix C name, what it means, and its value(s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub explanation: &'static str,
    pub values: Vec<String>,
}

/// The Appendix C names, in order.
pub const FIELD_NAMES: [&str; 18] = [
    "Service",
    "PII Principal ID",
    "PII Controller",
    "On Behalf",
    "Contact Address",
    "Contact Email",
    "Contact Phone",
    "PII Category",
    "Sensitive Data Y/N",
    "Purpose Category",
    "3rd Party Disclosure Y/N",
    "Consent Type",
    "Collection Method",
    "Jurisdiction",
    "Privacy Policy",
    "Consent ID",
    "Consent Time-Stamp",
    "Purpose Termination/ Duration/ Renewal",
];

fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

fn or_none(v: Vec<String>, none: &str) -> Vec<String> {
    if v.is_empty() {
        vec![none.to_string()]
    } else {
        v
    }
}

fn consent_type(t: &str) -> String {
    match t.to_ascii_uppercase().as_str() {
        // Explicit, but not necessarily given in consentry: `moc` says
        // where, and the text must not say more.
        "EXPLICIT" => "Explicit: an opt-in (Method of Collection says where)".to_string(),
        "IMPLICIT" => "Implicit".to_string(),
        "N/A" => "Not applicable: required by law".to_string(),
        _ => t.to_string(),
    }
}

/// The 18 fields of `r`, in Appendix C order.
pub fn fields(r: &ConsentReceipt) -> Vec<Field> {
    // Purposes are numbered across services in field 1; the per-purpose
    // fields refer to them by service and number rather than repeating
    // the statements.
    let purposes: Vec<(usize, &Service, &PurposeEntry)> = r
        .services
        .iter()
        .flat_map(|s| s.purposes.iter().map(move |p| (s, p)))
        .enumerate()
        .map(|(i, (s, p))| (i + 1, s, p))
        .collect();
    let per_purpose = |f: &dyn Fn(&PurposeEntry) -> String| -> Vec<String> {
        purposes
            .iter()
            .map(|(n, s, p)| format!("{}, purpose {n}: {}", s.service_name, f(p)))
            .collect()
    };
    let dc = &r.data_controller;
    let time = DateTime::from_timestamp(r.iat, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| format!("{} seconds after 1970-01-01 UTC", r.iat));
    let mut spi = vec![yes_no(r.sensitive).to_string()];
    if r.sensitive {
        spi.push(if r.spi_cat.is_empty() {
            "sensitive categories: see the privacy policy".to_string()
        } else {
            format!("sensitive categories: {}", r.spi_cat.join(", "))
        });
    }
    let f = |name, explanation, values| Field {
        name,
        explanation,
        values,
    };
    let fields = vec![
        f(
            "Service",
            "What you gave consent for.",
            or_none(
                purposes
                    .iter()
                    .map(|(n, s, p)| format!("{} — purpose {n}: {}", s.service_name, p.purpose))
                    .collect(),
                "None: you currently consent to no collection or sharing.",
            ),
        ),
        f(
            "PII Principal ID",
            "You, as the service knows you.",
            vec![r.sub.clone()],
        ),
        f(
            "PII Controller",
            "Who is accountable for your data.",
            vec![dc.company.clone(), format!("contact: {}", dc.contact)],
        ),
        f(
            "On Behalf",
            "Whether the controller acts for someone else.",
            vec![yes_no(dc.on_behalf).to_string()],
        ),
        f(
            "Contact Address",
            "Where to write to the controller.",
            vec![dc.address.clone()],
        ),
        f(
            "Contact Email",
            "Where to email about this consent.",
            vec![dc.email.clone()],
        ),
        f(
            "Contact Phone",
            "Whom to call about this consent.",
            vec![dc.phone.clone()],
        ),
        f(
            "PII Category",
            "The kinds of information about you concerned.",
            or_none(per_purpose(&|p| p.pii_category.join(", ")), "None"),
        ),
        f(
            "Sensitive Data Y/N",
            "Whether any of it is sensitive (e.g. health).",
            spi,
        ),
        f(
            "Purpose Category",
            "What your information is used for.",
            or_none(per_purpose(&|p| p.purpose_category.join(", ")), "None"),
        ),
        f(
            "3rd Party Disclosure Y/N",
            "Whether your information goes to another organization, and to whom.",
            or_none(
                per_purpose(
                    &|p| match (&p.third_party_disclosure, &p.third_party_name) {
                        (true, Some(name)) => format!("Yes, to {name}"),
                        (true, None) => "Yes".to_string(),
                        (false, _) => "No".to_string(),
                    },
                ),
                "No",
            ),
        ),
        f(
            "Consent Type",
            "How your consent was given.",
            or_none(per_purpose(&|p| consent_type(&p.consent_type)), "None"),
        ),
        f(
            "Collection Method",
            "Where and how consent was recorded.",
            vec![r.moc.clone()],
        ),
        f(
            "Jurisdiction",
            "Whose law applies.",
            vec![r.jurisdiction.clone()],
        ),
        f(
            "Privacy Policy",
            "The privacy policy in force when you consented.",
            vec![r.policy_uri.clone()],
        ),
        f(
            "Consent ID",
            "The number of this receipt.",
            vec![r.jti.clone()],
        ),
        f(
            "Consent Time-Stamp",
            "When this consent was recorded.",
            vec![time],
        ),
        f(
            "Purpose Termination/ Duration/ Renewal",
            "When each consent ends, and how to end it.",
            or_none(per_purpose(&|p| p.purpose_termination.clone()), "None"),
        ),
    ];
    debug_assert!(fields.iter().map(|f| f.name).eq(FIELD_NAMES));
    fields
}

/// Plain text: one numbered field per line, its values indented below.
pub fn text(r: &ConsentReceipt) -> String {
    let mut out = String::from("CONSENT RECEIPT\n\n");
    for (i, f) in fields(r).iter().enumerate() {
        out.push_str(&format!("{:>2}. {} ({})\n", i + 1, f.name, f.explanation));
        for v in &f.values {
            out.push_str(&format!("    {}\n", one_line(v)));
        }
    }
    out
}

/// A complete HTML page. Everything taken from the receipt is escaped: the
/// purpose statements and names come from providers' configuration and
/// must not be able to inject markup into the user's receipt.
pub fn html(r: &ConsentReceipt) -> String {
    let mut out = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>Consent receipt</title>\n</head>\n<body>\n<h1>Consent receipt</h1>\n<ol>\n",
    );
    for f in fields(r) {
        out.push_str(&format!(
            "<li><strong>{}</strong> <small>{}</small>\n<ul>\n",
            escape(f.name),
            escape(f.explanation)
        ));
        for v in &f.values {
            out.push_str(&format!("<li>{}</li>\n", escape(v)));
        }
        out.push_str("</ul></li>\n");
    }
    out.push_str("</ol>\n</body>\n</html>\n");
    out
}

/// A value on one line: configuration text could hold newlines that would
/// break the numbered layout (and fake a field).
fn one_line(s: &str) -> String {
    s.split(['\n', '\r']).collect::<Vec<_>>().join(" ")
}

/// HTML escaping for text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

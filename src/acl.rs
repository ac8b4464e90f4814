//! The plain ACL for topics outside every personal-data template (commands,
//! firmware, status). The default is to deny everything: an operator opens
//! what the deployment needs.

use serde::{Deserialize, Serialize};

use crate::act::Principal;
use crate::topic;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Clients {
    /// Everybody, including anonymous clients (if `allow_anonymous`).
    Any,
    /// Any client that logged in as a device or a provider.
    Authenticated,
    Anonymous,
    Devices,
    Providers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// An MQTT topic filter; wildcards allowed.
    pub filter: String,
    pub clients: Clients,
    pub access: Access,
}

#[derive(Debug, Clone, Default)]
pub struct Acl {
    rules: Vec<AclRule>,
}

impl Acl {
    pub fn new(rules: Vec<AclRule>) -> Self {
        Self { rules }
    }

    pub fn deny_all() -> Self {
        Self::default()
    }

    fn rules_for<'a>(
        &'a self,
        who: &'a Principal,
        access: Access,
    ) -> impl Iterator<Item = &'a AclRule> + 'a {
        self.rules.iter().filter(move |r| {
            let client_ok = match r.clients {
                Clients::Any => true,
                Clients::Authenticated => !matches!(who, Principal::Anonymous),
                Clients::Anonymous => matches!(who, Principal::Anonymous),
                Clients::Devices => matches!(who, Principal::Device { .. }),
                Clients::Providers => matches!(who, Principal::Provider { .. }),
            };
            let access_ok = r.access == Access::ReadWrite || r.access == access;
            client_ok && access_ok
        })
    }

    pub fn allows(&self, who: &Principal, topic: &str, access: Access) -> bool {
        self.rules_for(who, access)
            .any(|r| topic::filter_matches(&r.filter, topic))
    }

    /// A subscription is held when some readable rule could deliver through
    /// it; every delivery is still checked with [`Acl::allows`].
    pub fn may_subscribe(&self, who: &Principal, filter: &str) -> bool {
        self.rules_for(who, Access::Read)
            .any(|r| filters_overlap(&r.filter, filter))
    }
}

/// Is there a topic both filters match? `$`-topics are only reached by a
/// filter that names the `$` level literally.
fn filters_overlap(a: &str, b: &str) -> bool {
    let dollar = |f: &str| f.starts_with('$');
    let wild = |f: &str| f.starts_with('+') || f.starts_with('#');
    if (dollar(a) && wild(b)) || (dollar(b) && wild(a)) {
        return false;
    }
    let mut al = a.split('/');
    let mut bl = b.split('/');
    loop {
        match (al.next(), bl.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (None, _) | (_, None) => return false,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap() {
        assert!(filters_overlap("status/#", "#"));
        assert!(filters_overlap("status/+", "+/x"));
        assert!(!filters_overlap("status/+", "cmd/x"));
        assert!(!filters_overlap("status/+", "status/a/b"));
        assert!(filters_overlap("status/+/b", "status/a/#"));
        assert!(!filters_overlap("$SYS/#", "#"));
        assert!(filters_overlap("$SYS/#", "$SYS/broker"));
    }

    #[test]
    fn clients_and_access() {
        let acl = Acl::new(vec![
            AclRule {
                filter: "status/#".into(),
                clients: Clients::Devices,
                access: Access::Write,
            },
            AclRule {
                filter: "status/#".into(),
                clients: Clients::Providers,
                access: Access::Read,
            },
            AclRule {
                filter: "public/#".into(),
                clients: Clients::Any,
                access: Access::ReadWrite,
            },
        ]);
        let d = Principal::Device {
            id: "d".into(),
            user: "u".into(),
        };
        let p = Principal::Provider { id: "p".into() };
        assert!(acl.allows(&d, "status/d", Access::Write));
        assert!(!acl.allows(&d, "status/d", Access::Read));
        assert!(acl.allows(&p, "status/d", Access::Read));
        assert!(!acl.allows(&p, "status/d", Access::Write));
        assert!(acl.allows(&Principal::Anonymous, "public/x", Access::Write));
        assert!(!acl.allows(&Principal::Anonymous, "status/x", Access::Read));
        assert!(acl.may_subscribe(&p, "status/+"));
        assert!(!acl.may_subscribe(&d, "status/+"));
        assert!(!Acl::deny_all().allows(&p, "x", Access::Read));
    }
}

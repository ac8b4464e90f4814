//! Topic templates: how a topic name says whose data it carries.
//!
//! A template such as `pii/{user}/{device}/{kind}` declares a personal-data
//! topic space. Its literal prefix (`pii/`) claims the space: any topic under
//! it that does not resolve to a (user, device, kind) is refused rather than
//! treated as ordinary traffic, so a misspelt topic can never leak data past
//! the ACT.

use thiserror::Error;

use crate::short_eq;

#[derive(Debug, Error, PartialEq)]
pub enum TemplateError {
    #[error("template {0:?} is empty")]
    Empty(String),
    #[error("template {0:?} must contain {{user}}, {{device}} and {{kind}} exactly once each")]
    Placeholders(String),
    #[error(
        "template {0:?} must start with a literal level, so that its topic space can be told apart"
    )]
    NoPrefix(String),
    #[error("template {0:?} contains a wildcard or an empty level")]
    BadLevel(String),
    #[error("unknown placeholder {1:?} in template {0:?}")]
    Unknown(String, String),
}

#[derive(Debug, Clone, PartialEq)]
enum Level {
    Literal(String),
    User,
    Device,
    Kind,
}

#[derive(Debug, Clone)]
pub struct Template {
    source: String,
    levels: Vec<Level>,
    /// Number of literal levels before the first placeholder.
    prefix_len: usize,
    /// Those literal levels joined, with the `/` that ends them: resolving
    /// (once per decision) checks the whole prefix with one comparison.
    prefix: String,
}

/// The parts of a personal-data topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved<'a> {
    pub user: &'a str,
    pub device: &'a str,
    pub kind: &'a str,
}

impl Template {
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        if source.is_empty() {
            return Err(TemplateError::Empty(source.into()));
        }
        let mut levels = Vec::new();
        for part in source.split('/') {
            let level = match part {
                "{user}" => Level::User,
                "{device}" => Level::Device,
                "{kind}" => Level::Kind,
                p if p.starts_with('{') => {
                    return Err(TemplateError::Unknown(source.into(), p.into()))
                }
                p if p.is_empty() || p.contains(['+', '#', '{', '}']) => {
                    return Err(TemplateError::BadLevel(source.into()))
                }
                p => Level::Literal(p.into()),
            };
            levels.push(level);
        }
        for ph in [Level::User, Level::Device, Level::Kind] {
            if levels.iter().filter(|l| **l == ph).count() != 1 {
                return Err(TemplateError::Placeholders(source.into()));
            }
        }
        let prefix_len = levels
            .iter()
            .take_while(|l| matches!(l, Level::Literal(_)))
            .count();
        if prefix_len == 0 {
            return Err(TemplateError::NoPrefix(source.into()));
        }
        let mut prefix = String::new();
        for level in &levels[..prefix_len] {
            if let Level::Literal(lit) = level {
                prefix.push_str(lit);
                prefix.push('/');
            }
        }
        Ok(Template {
            source: source.into(),
            levels,
            prefix_len,
            prefix,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The topic this template gives `device` of `user` for `kind`: the
    /// inverse of [`Template::resolve`].
    pub fn topic(&self, user: &str, device: &str, kind: &str) -> String {
        let parts: Vec<&str> = self
            .levels
            .iter()
            .map(|l| match l {
                Level::Literal(lit) => lit.as_str(),
                Level::User => user,
                Level::Device => device,
                Level::Kind => kind,
            })
            .collect();
        parts.join("/")
    }

    /// Does `topic` fall in the space this template claims?
    pub fn claims(&self, topic: &str) -> bool {
        let mut parts = levels(topic);
        self.levels[..self.prefix_len].iter().all(|l| match l {
            Level::Literal(lit) => parts.next() == Some(lit.as_str()),
            _ => false,
        })
    }

    pub fn resolve<'a>(&self, topic: &'a str) -> Option<Resolved<'a>> {
        let (mut user, mut device, mut kind) = (None, None, None);
        let mut parts = levels(short_eq::strip_prefix(topic, &self.prefix)?);
        for level in &self.levels[self.prefix_len..] {
            let part = parts.next()?;
            match level {
                Level::Literal(lit) if short_eq::same(lit.as_bytes(), part.as_bytes()) => {}
                Level::Literal(_) => return None,
                // An empty id would let `pii//x/k` name nobody in particular.
                _ if part.is_empty() => return None,
                Level::User => user = Some(part),
                Level::Device => device = Some(part),
                Level::Kind => kind = Some(part),
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some(Resolved {
            user: user?,
            device: device?,
            kind: kind?,
        })
    }

    /// Could a subscription with `filter` receive a topic of this template
    /// carrying `kind`? Placeholders for user and device match any level;
    /// the kind placeholder matches only the kind's own name.
    pub fn filter_may_match(&self, filter: &str, kind: &str) -> bool {
        let mut f = levels(filter);
        for level in &self.levels {
            match f.next() {
                None => return false,
                Some("#") => return true,
                Some("+") => {}
                Some(lit) => {
                    let ok = match level {
                        Level::Literal(l) => short_eq::same(l.as_bytes(), lit.as_bytes()),
                        Level::Kind => short_eq::same(lit.as_bytes(), kind.as_bytes()),
                        Level::User | Level::Device => true,
                    };
                    if !ok {
                        return false;
                    }
                }
            }
        }
        // `pii/+/+/k/#` also matches `pii/a/b/k` (the `#` matches the parent).
        matches!(f.next(), None | Some("#"))
    }

    /// Could `filter` match anything in this template's topic space?
    pub fn filter_overlaps_space(&self, filter: &str) -> bool {
        let mut f = levels(filter);
        for level in &self.levels[..self.prefix_len] {
            match (f.next(), level) {
                (None, _) => return false,
                (Some("#"), _) => return true,
                (Some("+"), _) => {}
                (Some(lit), Level::Literal(l)) if lit == l => {}
                _ => return false,
            }
        }
        true
    }
}

/// `s.split('/')` for the per-message paths: levels are a few bytes long,
/// and a plain byte scan finds the separator sooner than the general char
/// searcher, which sets up a memchr call per level.
fn levels(s: &str) -> Levels<'_> {
    Levels(Some(s))
}

struct Levels<'a>(Option<&'a str>);

impl<'a> Iterator for Levels<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let rest = self.0?;
        // `/` is ASCII, so it never occurs inside a multi-byte character and
        // both cuts fall on character boundaries.
        match rest.bytes().position(|b| b == b'/') {
            Some(i) => {
                self.0 = Some(&rest[i + 1..]);
                Some(&rest[..i])
            }
            None => {
                self.0 = None;
                Some(rest)
            }
        }
    }
}

/// MQTT topic-filter matching (OASIS MQTT 3.1.1 §4.7, 5.0 §4.7), used for the
/// plain ACL of non-personal topics. `$`-topics are not matched by a leading
/// wildcard.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = levels(topic);
    for f in levels(filter) {
        match f {
            "#" => return true,
            "+" => {
                if t.next().is_none() {
                    return false;
                }
            }
            lit => {
                if t.next() != Some(lit) {
                    return false;
                }
            }
        }
    }
    t.next().is_none()
}

/// Does filter `a` cover every topic that filter `b` can match? Used to ask
/// whether an ACL rule grants a whole subscription.
pub fn filter_covers(a: &str, b: &str) -> bool {
    let mut bl = levels(b);
    for fa in levels(a) {
        match (fa, bl.next()) {
            ("#", _) => return true,
            (_, None) => return false,
            ("+", Some("#")) => return false,
            ("+", Some(_)) => {}
            (lit, Some(x)) if lit == x => {}
            _ => return false,
        }
    }
    bl.next().is_none()
}

/// `$share/{group}/{filter}` is judged by the filter it shares. `None` for
/// a malformed one: MQTT 5 4.8.2 wants a group of at least one character
/// without `+` or `#`, and a filter after it.
pub fn strip_shared(filter: &str) -> Option<&str> {
    match filter.strip_prefix("$share/") {
        Some(rest) => rest
            .split_once('/')
            .filter(|(group, f)| !group.is_empty() && !group.contains(['+', '#']) && !f.is_empty())
            .map(|(_, f)| f),
        None => Some(filter),
    }
}

/// A topic name that passed [`valid_topic_name`]. The session checks each
/// PUBLISH's name once, to answer a bad one with the protocol's error, and
/// the ACT takes this as the proof rather than scanning the name again.
#[derive(Clone, Copy, Debug)]
pub struct TopicName<'a>(&'a str);

impl<'a> TopicName<'a> {
    pub fn new(topic: &'a str) -> Option<Self> {
        valid_topic_name(topic).then_some(Self(topic))
    }

    pub fn as_str(self) -> &'a str {
        self.0
    }
}

pub fn valid_topic_name(topic: &str) -> bool {
    // Bytes rather than chars: the three are ASCII, which UTF-8 never uses
    // inside a multi-byte character. memchr compares 16 or 32 bytes at a
    // time, and this runs on every publish.
    !topic.is_empty() && memchr::memchr3(b'+', b'#', 0, topic.as_bytes()).is_none()
}

/// A wildcard must fill its level alone, and `#` must be the last level.
/// One pass over the bytes, each wildcard checked against its neighbours:
/// every SUBSCRIBE runs this, and splitting into levels cost a third of a
/// subscription decision.
pub fn valid_filter(filter: &str) -> bool {
    let b = filter.as_bytes();
    let alone = |i: usize, last_only: bool| {
        let starts = i == 0 || b[i - 1] == b'/';
        let ends = i + 1 == b.len() || (!last_only && b[i + 1] == b'/');
        starts && ends
    };
    !b.is_empty()
        && b.iter().enumerate().all(|(i, &c)| match c {
            0 => false,
            b'+' => alone(i, false),
            b'#' => alone(i, true),
            _ => true,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> Template {
        Template::parse("pii/{user}/{device}/{kind}").unwrap()
    }

    #[test]
    fn a_templates_topic_resolves_back_to_its_parts() {
        for source in ["pii/{user}/{device}/{kind}", "a/{kind}/b/{device}/{user}/c"] {
            let t = Template::parse(source).unwrap();
            let topic = t.topic("alice", "alice-watch", "heart_rate");
            assert_eq!(
                t.resolve(&topic),
                Some(Resolved {
                    user: "alice",
                    device: "alice-watch",
                    kind: "heart_rate"
                }),
                "{topic}"
            );
        }
        assert_eq!(demo().topic("u", "d", "k"), "pii/u/d/k");
    }

    #[test]
    fn resolves_demo_topics() {
        let t = demo();
        assert_eq!(
            t.resolve("pii/alice/alice-watch/heart_rate"),
            Some(Resolved {
                user: "alice",
                device: "alice-watch",
                kind: "heart_rate"
            })
        );
        assert_eq!(t.resolve("pii/alice/alice-watch"), None);
        assert_eq!(t.resolve("pii/alice/alice-watch/heart_rate/x"), None);
        assert_eq!(t.resolve("pii//alice-watch/heart_rate"), None);
        assert_eq!(t.resolve("other/alice/alice-watch/heart_rate"), None);
        assert_eq!(t.resolve("pii/alice/alice-watch/heart_rate/"), None);
        assert_eq!(t.resolve("pii/alice/alice-watch/"), None);
        assert_eq!(t.resolve("pii/"), None);
        assert_eq!(t.resolve("pii"), None);
        assert_eq!(t.resolve("piii/alice/alice-watch/heart_rate"), None);
        let r = t.resolve("pii/zoë/montre/fréquence").unwrap();
        assert_eq!((r.user, r.device, r.kind), ("zoë", "montre", "fréquence"));
    }

    #[test]
    fn resolves_with_longer_prefixes() {
        let t = Template::parse("org/pii/{user}/{device}/{kind}").unwrap();
        let r = t.resolve("org/pii/u/d/k").unwrap();
        assert_eq!((r.user, r.device, r.kind), ("u", "d", "k"));
        assert_eq!(t.resolve("org/pi/u/d/k"), None);
        assert_eq!(t.resolve("org/pii/u/d"), None);
        assert!(t.claims("org/pii/x"));
        assert!(!t.claims("org/x"));
    }

    #[test]
    fn levels_split_like_str_split() {
        for s in ["", "/", "//", "a", "a/", "/a", "a//b", "pii/u/d/k", "é/ü/€"] {
            assert_eq!(
                levels(s).collect::<Vec<_>>(),
                s.split('/').collect::<Vec<_>>(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn claims_prefix_space() {
        let t = demo();
        assert!(t.claims("pii/anything"));
        assert!(t.claims("pii"));
        assert!(!t.claims("piix/a"));
        assert!(!t.claims("status/a"));
    }

    #[test]
    fn placeholders_in_other_orders() {
        let t = Template::parse("home/{device}/{kind}/of/{user}").unwrap();
        let r = t.resolve("home/d1/steps/of/bob").unwrap();
        assert_eq!((r.user, r.device, r.kind), ("bob", "d1", "steps"));
    }

    #[test]
    fn rejects_bad_templates() {
        assert!(matches!(
            Template::parse("{user}/{device}/{kind}"),
            Err(TemplateError::NoPrefix(_))
        ));
        assert!(matches!(
            Template::parse("pii/{user}/{kind}"),
            Err(TemplateError::Placeholders(_))
        ));
        assert!(matches!(
            Template::parse("pii/{user}/{user}/{device}/{kind}"),
            Err(TemplateError::Placeholders(_))
        ));
        assert!(matches!(
            Template::parse("pii/+/{user}/{device}/{kind}"),
            Err(TemplateError::BadLevel(_))
        ));
        assert!(matches!(
            Template::parse("pii/{who}/{device}/{kind}"),
            Err(TemplateError::Unknown(_, _))
        ));
    }

    #[test]
    fn filter_may_match_kinds() {
        let t = demo();
        assert!(t.filter_may_match("pii/#", "location"));
        assert!(t.filter_may_match("#", "location"));
        assert!(t.filter_may_match("pii/+/+/location", "location"));
        assert!(!t.filter_may_match("pii/+/+/location", "heart_rate"));
        assert!(t.filter_may_match("pii/alice/+/+", "steps"));
        assert!(t.filter_may_match("pii/+/+/steps/#", "steps"));
        assert!(!t.filter_may_match("pii/+/+", "steps"));
        assert!(!t.filter_may_match("pii/+/+/steps/x", "steps"));
        assert!(!t.filter_may_match("status/#", "steps"));
    }

    #[test]
    fn overlap_with_space() {
        let t = demo();
        assert!(t.filter_overlaps_space("#"));
        assert!(t.filter_overlaps_space("+/a/b/c"));
        assert!(t.filter_overlaps_space("pii/x"));
        assert!(!t.filter_overlaps_space("status/#"));
    }

    #[test]
    fn mqtt_filter_matching() {
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(filter_matches("#", "a/b"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(filter_matches("$SYS/#", "$SYS/x"));
        assert!(filter_matches("+/+", "/x"));
    }

    #[test]
    fn covering() {
        assert!(filter_covers("status/#", "status/+/x"));
        assert!(filter_covers("status/+", "status/a"));
        assert!(!filter_covers("status/+", "status/#"));
        assert!(!filter_covers("status/a", "status/+"));
        assert!(filter_covers("#", "anything/#"));
    }

    #[test]
    fn shared_subscriptions() {
        assert_eq!(strip_shared("$share/g/pii/#"), Some("pii/#"));
        assert_eq!(strip_shared("pii/#"), Some("pii/#"));
        assert_eq!(strip_shared("$share/g"), None);
        assert_eq!(strip_shared("$share/g/"), None);
        assert_eq!(strip_shared("$share//pii/#"), None);
        assert_eq!(strip_shared("$share/g+/pii/#"), None);
        assert_eq!(strip_shared("$share/#/pii/#"), None);
    }

    #[test]
    fn validity() {
        assert_eq!(TopicName::new("a/b").map(TopicName::as_str), Some("a/b"));
        assert!(TopicName::new("a/+").is_none());
        assert!(valid_topic_name("a/b"));
        assert!(!valid_topic_name("a/+"));
        assert!(!valid_topic_name(""));
        assert!(!valid_topic_name("a/#"));
        assert!(!valid_topic_name("a\0b"));
        assert!(valid_topic_name("caf\u{e9}/\u{1f600}"));
        assert!(valid_filter("a/+/#"));
        assert!(!valid_filter("a/#/b"));
        assert!(!valid_filter("a/b+"));
    }

    /// The definition `valid_filter` implements in one pass, by levels.
    fn valid_filter_by_levels(filter: &str) -> bool {
        if filter.is_empty() || filter.contains('\0') {
            return false;
        }
        let levels: Vec<&str> = filter.split('/').collect();
        levels.iter().enumerate().all(|(i, l)| match *l {
            "#" => i + 1 == levels.len(),
            "+" => true,
            l => !l.contains(['+', '#']),
        })
    }

    #[test]
    fn valid_filter_agrees_with_its_definition_by_levels() {
        // Every string of up to six of these bytes.
        let alphabet = ['a', '/', '+', '#', '\0'];
        let mut strings = vec![String::new()];
        for _ in 0..6 {
            let longer: Vec<String> = strings
                .iter()
                .filter(|s| s.len() == strings.last().map_or(0, |l| l.len()))
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            strings.extend(longer);
        }
        assert!(strings.len() > 19_000);
        for f in &strings {
            assert_eq!(valid_filter(f), valid_filter_by_levels(f), "{f:?}");
        }
    }
}

//! Payload rewriting: data minimization at ingress (X.1363 9.1.6) and the
//! masking views at egress (X.1363 9.1.4: "encrypted or masked if shared").
//!
//! JSON and MessagePack documents are handled through one small [`Doc`]
//! trait, so each rule is written once. Any payload that cannot be decoded,
//! or a rule that cannot be applied to the value it meets, is an error: the
//! caller does not forward or deliver it (fail closed).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

use crate::model::{FieldType, MaskMethod, PayloadFormat};

#[derive(Debug, Clone, Error, PartialEq)]
pub enum MaskError {
    #[error("payload is not valid {0}")]
    Decode(&'static str),
    #[error("payload must be a map of fields")]
    NotAMap,
    #[error("field {0:?} is not declared for this kind")]
    Undeclared(String),
    #[error("field {field:?} must be of type {want:?}")]
    Type { field: String, want: FieldType },
    /// A map names one key twice. Parsers disagree on which copy wins, so
    /// a check or mask applied to one copy says nothing of what a provider
    /// reads: such a payload is refused, never forwarded.
    #[error("key {0:?} appears more than once in one map")]
    RepeatedKey(String),
    #[error("field {0:?} is not a number and cannot be generalized")]
    NotANumber(String),
    #[error("could not encode the rewritten payload")]
    Encode,
}

pub const REDACTED: &str = "[redacted]";

/// The fields ingress removed, for logs and metrics.
#[derive(Debug, PartialEq)]
pub struct Minimized {
    pub payload: Bytes,
    pub removed: Vec<String>,
}

/// Keep only the declared field paths, and check the typed ones. With
/// `strict`, an undeclared field is an error instead of being removed.
pub fn minimize(
    format: PayloadFormat,
    payload: &Bytes,
    declared: &[String],
    types: &BTreeMap<String, FieldType>,
    strict: bool,
) -> Result<Minimized, MaskError> {
    let untouched = || Minimized {
        payload: payload.clone(),
        removed: vec![],
    };
    match format {
        PayloadFormat::Opaque => Ok(untouched()),
        PayloadFormat::Json => {
            let padded = longer_than_plain(payload.len(), declared, types);
            match json_flat_check(payload, declared, types) {
                Flat::Clean if !padded => Ok(untouched()),
                Flat::Mismatch(field, want) => Err(MaskError::Type { field, want }),
                Flat::Clean | Flat::General => {
                    let mut doc = decode_json(payload)?;
                    let removed = keep_declared(&mut doc, declared, strict)?;
                    check_types(&mut doc, types)?;
                    let payload = if removed.is_empty() && !padded {
                        payload.clone()
                    } else {
                        encode_json(&doc)?
                    };
                    Ok(Minimized { payload, removed })
                }
            }
        }
        PayloadFormat::Msgpack => {
            let mut doc = decode_msgpack(payload)?;
            let removed = keep_declared(&mut doc, declared, strict)?;
            check_types(&mut doc, types)?;
            let payload = if removed.is_empty() {
                payload.clone()
            } else {
                encode_msgpack(&doc)?
            };
            Ok(Minimized { payload, removed })
        }
    }
}

/// Apply a masking view. `key` is the pseudonymization key of the provider
/// that will receive the result.
pub fn mask(
    format: PayloadFormat,
    payload: &Bytes,
    rules: &[(String, MaskMethod)],
    key: &[u8; 32],
) -> Result<Bytes, MaskError> {
    match format {
        // The ACT refuses masks on opaque kinds at compile time; should one
        // arrive anyway, nothing partial is ever delivered.
        PayloadFormat::Opaque => Err(MaskError::Decode("structured data")),
        PayloadFormat::Json => {
            if let Some(done) = mask_flat_json(payload, rules, key) {
                return done;
            }
            let mut doc = decode_json(payload)?;
            apply_rules(&mut doc, rules, key)?;
            encode_json(&doc)
        }
        PayloadFormat::Msgpack => {
            let mut doc = decode_msgpack(payload)?;
            apply_rules(&mut doc, rules, key)?;
            encode_msgpack(&doc)
        }
    }
}

/// Whether `payload` is a JSON object whose top-level keys are all declared
/// fields, checked in one pass that builds nothing: then minimization has
/// nothing to do, and the common case skips building a document. Anything
/// else (nested declarations, escaped keys, invalid JSON) says false and
/// takes the full path, which decides it.
/// What one pass over a flat JSON object found.
enum Flat {
    /// Every key declared, every typed value of its type: forward as it is.
    Clean,
    /// A top-level field of the wrong type.
    Mismatch(String, FieldType),
    /// Anything else (undeclared or escaped keys, nested typed paths, not
    /// one well-formed object): the general path decides.
    General,
}

fn json_flat_check(
    payload: &[u8],
    declared: &[String],
    types: &BTreeMap<String, FieldType>,
) -> Flat {
    use serde::de::{DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, Visitor};

    if types.keys().any(|path| path.contains('.')) {
        return Flat::General;
    }
    /// Reads one value and says whether it is of the type.
    struct Typed(FieldType);
    impl<'de> DeserializeSeed<'de> for Typed {
        type Value = bool;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Typed {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
            Ok(self.0 == FieldType::Boolean)
        }
        fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
            Ok(matches!(self.0, FieldType::Number | FieldType::Integer))
        }
        fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
            Ok(matches!(self.0, FieldType::Number | FieldType::Integer))
        }
        fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
            Ok(self.0 == FieldType::Number)
        }
        fn visit_str<E>(self, _: &str) -> Result<bool, E> {
            Ok(self.0 == FieldType::String)
        }
        fn visit_unit<E>(self) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(false)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(false)
        }
    }
    struct Check<'d>(&'d [String], &'d BTreeMap<String, FieldType>);
    impl<'de> Visitor<'de> for Check<'_> {
        type Value = Flat;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Flat, A::Error> {
            let mut mismatch = None;
            // Which declared fields were met, without allocating per
            // message; a kind with more than 64 fields takes the general path.
            let mut seen = 0u64;
            while let Some(key) = map.next_key::<&'de str>()? {
                // Undeclared, dotted and repeated keys alike are the
                // general path's to remove or refuse.
                if key.contains('.') {
                    return Ok(Flat::General);
                }
                match self.0.iter().position(|d| d == key) {
                    Some(i) if i < 64 && seen & (1 << i) == 0 => seen |= 1 << i,
                    _ => return Ok(Flat::General),
                }
                match self.1.get(key) {
                    Some(&want) => {
                        if !map.next_value_seed(Typed(want))? && mismatch.is_none() {
                            mismatch = Some((key.to_string(), want));
                        }
                    }
                    // An untyped field holding a map or an array: its keys,
                    // at any depth, are the general path's to check.
                    // (Skipped as raw text: parsing it as a value costs more.)
                    None => {
                        let raw = map.next_value::<&'de serde_json::value::RawValue>()?;
                        if matches!(raw.get().as_bytes().first(), Some(b'{' | b'[')) {
                            return Ok(Flat::General);
                        }
                    }
                }
            }
            Ok(match mismatch {
                Some((field, want)) => Flat::Mismatch(field, want),
                None => Flat::Clean,
            })
        }
    }
    let mut de = serde_json::Deserializer::from_slice(payload);
    match de.deserialize_map(Check(declared, types)) {
        // Only a whole, well-formed object is judged here.
        Ok(flat) if de.end().is_ok() => flat,
        _ => Flat::General,
    }
}

/// Each typed field that is present must hold a value of its type.
fn check_types<D: Doc>(doc: &mut D, types: &BTreeMap<String, FieldType>) -> Result<(), MaskError> {
    for (path, &want) in types {
        let mut node = Some(&mut *doc);
        for segment in path.split('.') {
            node = node.and_then(|n| n.child_mut(segment));
        }
        if let Some(value) = node {
            if !value.has_type(want) {
                return Err(MaskError::Type {
                    field: path.clone(),
                    want,
                });
            }
        }
    }
    Ok(())
}

/// [`mask`] for the common case: a JSON object and rules that name only
/// top-level fields. Values the rules do not touch are copied as they came,
/// never parsed into a document or re-escaped; each masked value is parsed
/// and rewritten by the same [`Doc`] operations as the general path. Keeps
/// the payload's field order (the general path sorts). `None` hands the
/// payload to the general path: nested rule paths, escaped or repeated keys,
/// or anything that is not one well-formed JSON object.
fn mask_flat_json(
    payload: &[u8],
    rules: &[(String, MaskMethod)],
    key: &[u8; 32],
) -> Option<Result<Bytes, MaskError>> {
    use serde::de::{Deserializer as _, MapAccess, Visitor};
    use serde_json::value::RawValue;

    if rules.iter().any(|(path, _)| path.contains('.')) {
        return None;
    }
    struct Fields;
    impl<'de> Visitor<'de> for Fields {
        type Value = Vec<(&'de str, &'de RawValue)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
            while let Some(k) = map.next_key::<&'de str>()? {
                fields.push((k, map.next_value::<&'de RawValue>()?));
            }
            Ok(fields)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(payload);
    let fields = de.deserialize_map(Fields).ok()?;
    de.end().ok()?;
    // A repeated key is the general path's business (it refuses it).
    if first_repeat(fields.len(), |i| Some(fields[i].0)).is_some() {
        return None;
    }

    let mut out = Vec::with_capacity(payload.len() + 16);
    out.push(b'{');
    // The error of the first failing rule, in rule order, as the general path reports it.
    let mut failed: Option<(usize, MaskError)> = None;
    for (name, raw) in fields {
        let mut value: Option<serde_json::Value> = None;
        let mut removed = false;
        for (i, (path, method)) in rules.iter().enumerate() {
            if path != name || removed {
                continue;
            }
            if matches!(method, MaskMethod::Remove) {
                removed = true;
                continue;
            }
            let v = match &mut value {
                Some(v) => v,
                None => value.insert(serde_json::from_str(raw.get()).ok()?),
            };
            if let Err(e) = apply_one(v, path, method, key) {
                if failed.as_ref().is_none_or(|(j, _)| i < *j) {
                    failed = Some((i, e));
                }
            }
        }
        if removed {
            continue;
        }
        if out.len() > 1 {
            out.push(b',');
        }
        // A key borrowed from the payload had no escapes, so it needs none.
        out.push(b'"');
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        match value {
            Some(v) => serde_json::to_writer(&mut out, &v).ok()?,
            None => out.extend_from_slice(raw.get().as_bytes()),
        }
    }
    out.push(b'}');
    Some(match failed {
        Some((_, e)) => Err(e),
        None => Ok(Bytes::from(out)),
    })
}

/// Reads JSON as `serde_json::Value` does, except that a repeated key in
/// any object (compared after unescaping, so `"b\u0070m"` repeats `"bpm"`)
/// is [`MaskError::RepeatedKey`] rather than the last copy silently winning.
fn decode_json(payload: &[u8]) -> Result<serde_json::Value, MaskError> {
    use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
    use std::cell::RefCell;

    #[derive(Clone, Copy)]
    struct NoRepeats<'r>(&'r RefCell<Option<String>>);
    impl<'de> DeserializeSeed<'de> for NoRepeats<'_> {
        type Value = serde_json::Value;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for NoRepeats<'_> {
        type Value = serde_json::Value;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
            Ok(b.into())
        }
        fn visit_i64<E>(self, i: i64) -> Result<Self::Value, E> {
            Ok(i.into())
        }
        fn visit_u64<E>(self, u: u64) -> Result<Self::Value, E> {
            Ok(u.into())
        }
        fn visit_f64<E>(self, f: f64) -> Result<Self::Value, E> {
            Ok(serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, Into::into))
        }
        fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
            Ok(s.into())
        }
        fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
            Ok(s.into())
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(serde_json::Value::Null)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
            while let Some(v) = seq.next_element_seed(self)? {
                items.push(v);
            }
            Ok(items.into())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut fields = serde_json::Map::new();
            while let Some(k) = map.next_key::<String>()? {
                let v = map.next_value_seed(self)?;
                if fields.contains_key(&k) {
                    *self.0.borrow_mut() = Some(k);
                    return Err(A::Error::custom("repeated key"));
                }
                fields.insert(k, v);
            }
            Ok(fields.into())
        }
    }
    let repeated = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(payload);
    let doc = NoRepeats(&repeated).deserialize(&mut de).and_then(|doc| {
        de.end()?;
        Ok(doc)
    });
    match (doc, repeated.into_inner()) {
        (_, Some(key)) => Err(MaskError::RepeatedKey(key)),
        (Ok(doc), None) => Ok(doc),
        (Err(_), None) => Err(MaskError::Decode("JSON")),
    }
}

/// Room a field takes beyond its path when it is a number, integer or
/// boolean written plainly: the longest shortest form of an f64 is 24 bytes
/// (`-2.2250738585072014e-308`), plus quotes, colon, comma and a little
/// whitespace.
const PLAIN_FIELD: usize = 40;

/// Whether a JSON payload is longer than `declared` can be written when
/// each field is a number, integer or boolean; never when one may be a
/// string or is untyped, whose length says nothing.
///
/// A payload that passes the checks goes on byte for byte, so without this
/// the digits of a number past an f64's precision (`1.000…0417…`, which
/// parses as 1.0) or whitespace between tokens could carry anything, 256 KB
/// of it per message, past minimization (found by an outside review). Such
/// a payload is written again, plainly.
fn longer_than_plain(len: usize, declared: &[String], types: &BTreeMap<String, FieldType>) -> bool {
    // Every field's room is at least PLAIN_FIELD: the common case needs no look-ups.
    if len <= PLAIN_FIELD * declared.len() {
        return false;
    }
    let mut room = 2;
    for path in declared {
        match types.get(path) {
            Some(FieldType::Number | FieldType::Integer | FieldType::Boolean) => {
                // Each level of nesting: its quotes, colon and braces.
                room += path.len() + PLAIN_FIELD + 6 * path.split('.').count();
            }
            Some(FieldType::String) | None => return false,
        }
    }
    len > room
}

fn encode_json(doc: &serde_json::Value) -> Result<Bytes, MaskError> {
    serde_json::to_vec(doc)
        .map(Bytes::from)
        .map_err(|_| MaskError::Encode)
}

fn decode_msgpack(payload: &[u8]) -> Result<rmpv::Value, MaskError> {
    let mut rd = payload;
    let v = rmpv::decode::read_value(&mut rd).map_err(|_| MaskError::Decode("MessagePack"))?;
    if !rd.is_empty() {
        return Err(MaskError::Decode("MessagePack"));
    }
    match repeated_msgpack_key(&v) {
        Some(key) => Err(MaskError::RepeatedKey(key)),
        None => Ok(v),
    }
}

/// The first string key that some map in `doc` names twice. Keys that are
/// not strings are never declared, so minimization removes or refuses them
/// whatever they repeat. Walks with its own stack: a hostile document can
/// nest as deep as the decoder allows.
fn repeated_msgpack_key(doc: &rmpv::Value) -> Option<String> {
    // Allocated only when something nests: most payloads are one flat map.
    let mut todo = Vec::new();
    let mut next = Some(doc);
    while let Some(v) = next.take().or_else(|| todo.pop()) {
        let nested = |v: &&rmpv::Value| matches!(v, rmpv::Value::Array(_) | rmpv::Value::Map(_));
        match v {
            rmpv::Value::Array(items) => todo.extend(items.iter().filter(nested)),
            rmpv::Value::Map(entries) => {
                let key = |i: usize| match &entries[i].0 {
                    rmpv::Value::String(s) => Some(s.as_bytes()),
                    _ => None,
                };
                if let Some(k) = first_repeat(entries.len(), key) {
                    return Some(String::from_utf8_lossy(k).into_owned());
                }
                todo.extend(entries.iter().map(|(_, v)| v).filter(nested));
            }
            _ => {}
        }
    }
    None
}

/// The first key of `key(0..len)` met a second time (`None` keys are not
/// compared). A device's handful of fields is compared pairwise; past that
/// a (SipHash) set keeps the check linear, since a 256 KiB payload can
/// carry tens of thousands of keys.
fn first_repeat<K: Eq + std::hash::Hash>(
    len: usize,
    key: impl Fn(usize) -> Option<K>,
) -> Option<K> {
    if len <= 16 {
        return (1..len).find_map(|i| {
            let k = key(i)?;
            (0..i).any(|j| key(j).as_ref() == Some(&k)).then_some(k)
        });
    }
    let mut seen = std::collections::HashSet::with_capacity(len);
    (0..len).find_map(|i| {
        let k = key(i)?;
        if seen.contains(&k) {
            Some(k)
        } else {
            seen.insert(k);
            None
        }
    })
}

fn encode_msgpack(doc: &rmpv::Value) -> Result<Bytes, MaskError> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, doc).map_err(|_| MaskError::Encode)?;
    Ok(Bytes::from(out))
}

/// The operations rules need, over JSON and MessagePack alike.
trait Doc: Sized {
    fn is_map(&self) -> bool;
    /// Keeps the entries with string keys that `keep` says to keep (and
    /// every entry whose key is not a string), in one pass.
    fn retain_entries(&mut self, keep: &mut dyn FnMut(&str, &mut Self) -> bool);
    fn child_mut(&mut self, key: &str) -> Option<&mut Self>;
    fn remove(&mut self, key: &str) -> bool;
    fn as_number(&self) -> Option<Number>;
    fn set_number(&mut self, n: Number);
    fn set_text(&mut self, s: &str);
    /// Stable bytes of the value, to pseudonymize it.
    fn fingerprint(&self) -> Vec<u8>;
    /// Removes map entries whose key is not a string; returns how many.
    fn drop_non_string_keys(&mut self) -> usize;
    fn has_type(&self, t: FieldType) -> bool;
}

#[derive(Debug, Clone, Copy)]
enum Number {
    Int(i64),
    Float(f64),
}

impl Doc for serde_json::Value {
    fn is_map(&self) -> bool {
        self.is_object()
    }
    fn retain_entries(&mut self, keep: &mut dyn FnMut(&str, &mut Self) -> bool) {
        if let Some(m) = self.as_object_mut() {
            m.retain(|k, v| keep(k, v));
        }
    }
    fn child_mut(&mut self, key: &str) -> Option<&mut Self> {
        self.as_object_mut()?.get_mut(key)
    }
    fn remove(&mut self, key: &str) -> bool {
        self.as_object_mut()
            .is_some_and(|m| m.remove(key).is_some())
    }
    fn as_number(&self) -> Option<Number> {
        match self {
            serde_json::Value::Number(n) => n
                .as_i64()
                .map(Number::Int)
                .or_else(|| n.as_f64().map(Number::Float)),
            _ => None,
        }
    }
    fn set_number(&mut self, n: Number) {
        *self = match n {
            Number::Int(i) => serde_json::Value::from(i),
            Number::Float(f) => serde_json::Number::from_f64(f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
        };
    }
    fn set_text(&mut self, s: &str) {
        *self = serde_json::Value::String(s.into());
    }
    fn fingerprint(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
    fn drop_non_string_keys(&mut self) -> usize {
        0
    }
    fn has_type(&self, t: FieldType) -> bool {
        match (self, t) {
            (serde_json::Value::Number(_), FieldType::Number) => true,
            (serde_json::Value::Number(n), FieldType::Integer) => n.is_i64() || n.is_u64(),
            (serde_json::Value::String(_), FieldType::String) => true,
            (serde_json::Value::Bool(_), FieldType::Boolean) => true,
            _ => false,
        }
    }
}

impl Doc for rmpv::Value {
    fn is_map(&self) -> bool {
        self.is_map()
    }
    fn retain_entries(&mut self, keep: &mut dyn FnMut(&str, &mut Self) -> bool) {
        if let rmpv::Value::Map(m) = self {
            m.retain_mut(|(k, v)| match k.as_str() {
                Some(k) => keep(k, v),
                None => true,
            });
        }
    }
    fn child_mut(&mut self, key: &str) -> Option<&mut Self> {
        match self {
            rmpv::Value::Map(m) => m
                .iter_mut()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
    fn remove(&mut self, key: &str) -> bool {
        match self {
            rmpv::Value::Map(m) => {
                let before = m.len();
                m.retain(|(k, _)| k.as_str() != Some(key));
                m.len() != before
            }
            _ => false,
        }
    }
    fn as_number(&self) -> Option<Number> {
        match self {
            rmpv::Value::Integer(i) => i.as_i64().map(Number::Int),
            rmpv::Value::F32(f) => Some(Number::Float(*f as f64)),
            rmpv::Value::F64(f) => Some(Number::Float(*f)),
            _ => None,
        }
    }
    fn set_number(&mut self, n: Number) {
        *self = match n {
            Number::Int(i) => rmpv::Value::from(i),
            Number::Float(f) => rmpv::Value::F64(f),
        };
    }
    fn set_text(&mut self, s: &str) {
        *self = rmpv::Value::from(s);
    }
    fn fingerprint(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = rmpv::encode::write_value(&mut out, self);
        out
    }
    fn drop_non_string_keys(&mut self) -> usize {
        match self {
            rmpv::Value::Map(m) => {
                let before = m.len();
                // A string key that is not UTF-8 cannot name a declared
                // field either (`retain_entries` passes it by), so it goes too.
                m.retain(|(k, _)| k.as_str().is_some());
                before - m.len()
            }
            _ => 0,
        }
    }
    fn has_type(&self, t: FieldType) -> bool {
        match (self, t) {
            (
                rmpv::Value::Integer(_) | rmpv::Value::F32(_) | rmpv::Value::F64(_),
                FieldType::Number,
            ) => true,
            (rmpv::Value::Integer(_), FieldType::Integer) => true,
            (rmpv::Value::String(v), FieldType::String) => v.is_str(),
            (rmpv::Value::Boolean(_), FieldType::Boolean) => true,
            _ => false,
        }
    }
}

/// Removes every field not on a declared path; returns the removed paths.
/// A field with no declaration but a non-map value on a map-typed root is
/// still undeclared: the rule is by path, not by type.
fn keep_declared<D: Doc>(
    doc: &mut D,
    declared: &[String],
    strict: bool,
) -> Result<Vec<String>, MaskError> {
    if !doc.is_map() {
        return Err(MaskError::NotAMap);
    }
    let mut removed = Vec::new();
    prune(doc, "", declared, strict, &mut removed)?;
    Ok(removed)
}

/// One pass over `node`'s entries, whatever their number: a payload may
/// carry tens of thousands of undeclared keys.
fn prune<D: Doc>(
    node: &mut D,
    prefix: &str,
    declared: &[String],
    strict: bool,
    removed: &mut Vec<String>,
) -> Result<(), MaskError> {
    let path_of = |key: &str| {
        if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        }
    };
    let mut failed = None;
    node.retain_entries(&mut |key, child| {
        if failed.is_some() {
            return true;
        }
        // A key with a dot in it would read as the path of a nested field
        // ("pos.lat" beside "pos": {"lat": …}) that the type checks and
        // masks, which walk the nesting, never reach: it is never declared.
        if !key.contains('.') {
            if declared.iter().any(|d| is_path(d, prefix, key)) {
                return true;
            }
            let path = path_of(key);
            let below = format!("{path}.");
            if child.is_map() && declared.iter().any(|d| d.starts_with(&below)) {
                if let Err(e) = prune(child, &path, declared, strict, removed) {
                    failed = Some(e);
                }
                return true;
            }
        }
        if strict {
            failed = Some(MaskError::Undeclared(path_of(key)));
            return true;
        }
        removed.push(path_of(key));
        false
    });
    if let Some(e) = failed {
        return Err(e);
    }
    // Keys that are not strings (MessagePack allows any) are never declared.
    let foreign = node.drop_non_string_keys();
    if foreign > 0 {
        let path = format!("{prefix}<non-string key>");
        if strict {
            return Err(MaskError::Undeclared(path));
        }
        removed.push(path);
    }
    Ok(())
}

/// Whether `declared` is the path `prefix.key` (or `key` at the top).
fn is_path(declared: &str, prefix: &str, key: &str) -> bool {
    if prefix.is_empty() {
        return declared == key;
    }
    declared.len() == prefix.len() + 1 + key.len()
        && declared.starts_with(prefix)
        && declared.as_bytes()[prefix.len()] == b'.'
        && declared.ends_with(key)
}

fn apply_rules<D: Doc>(
    doc: &mut D,
    rules: &[(String, MaskMethod)],
    key: &[u8; 32],
) -> Result<(), MaskError> {
    if !doc.is_map() {
        return Err(MaskError::NotAMap);
    }
    for (path, method) in rules {
        let (parent_path, leaf) = match path.rsplit_once('.') {
            Some((p, l)) => (Some(p), l),
            None => (None, path.as_str()),
        };
        let mut parent = Some(&mut *doc);
        if let Some(pp) = parent_path {
            for part in pp.split('.') {
                parent = parent.and_then(|n| n.child_mut(part));
            }
        }
        let Some(parent) = parent else { continue };
        if matches!(method, MaskMethod::Remove) {
            parent.remove(leaf);
            continue;
        }
        let Some(value) = parent.child_mut(leaf) else {
            continue;
        };
        apply_one(value, path, method, key)?;
    }
    Ok(())
}

/// One rule on the value it names (removal is the parent's business).
fn apply_one<D: Doc>(
    value: &mut D,
    path: &str,
    method: &MaskMethod,
    key: &[u8; 32],
) -> Result<(), MaskError> {
    match method {
        MaskMethod::Remove => {}
        MaskMethod::Redact => value.set_text(REDACTED),
        MaskMethod::Generalize { decimals } => {
            let n = value
                .as_number()
                .ok_or_else(|| MaskError::NotANumber(path.to_string()))?;
            value.set_number(generalize(n, *decimals));
        }
        MaskMethod::Pseudonymize => {
            let mut mac =
                <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|_| MaskError::Encode)?;
            mac.update(path.as_bytes());
            mac.update(&[0]);
            mac.update(&value.fingerprint());
            let tag = mac.finalize().into_bytes();
            value.set_text(&hex::encode(&tag[..16]));
        }
    }
    Ok(())
}

/// The most decimals a generalization keeps or drops: a double holds 15–17
/// significant digits, and past about 308 the scale overflows, which would
/// turn a masked number into null. The API refuses more; a stored grant
/// from before that is held to it here.
pub const MAX_DECIMALS: u32 = 15;

/// A field of `mask` generalized past [`MAX_DECIMALS`], and to how many.
pub fn past_max_decimals<'m>(
    mask: impl IntoIterator<Item = (&'m String, &'m MaskMethod)>,
) -> Option<(&'m str, i32)> {
    mask.into_iter().find_map(|(field, m)| match *m {
        MaskMethod::Generalize { decimals } if decimals.unsigned_abs() > MAX_DECIMALS => {
            Some((field.as_str(), decimals))
        }
        _ => None,
    })
}

fn generalize(n: Number, decimals: i32) -> Number {
    let max = MAX_DECIMALS as i32;
    let decimals = decimals.clamp(-max, max);
    let scale = 10f64.powi(decimals);
    match n {
        Number::Float(f) => Number::Float((f * scale).round() / scale),
        Number::Int(i) if decimals < 0 => {
            let step = 10i64.saturating_pow(decimals.unsigned_abs());
            Number::Int(((i as f64 / step as f64).round() as i64).saturating_mul(step))
        }
        Number::Int(i) => Number::Int(i),
    }
}

/// Recently masked payloads, so that subscribers who get the same view of
/// the same message (several sessions of one provider, providers with equal
/// masks) share one masking. Entries are compared in full — payload, view
/// and, when the view pseudonymizes, the provider key — never by a hash
/// alone, so one subscriber can never receive another's view. It holds
/// plaintext payloads in memory only, a bounded few.
pub struct ViewCache {
    capacity: usize,
    /// Payload hashes only pick candidates; equality is always checked in full.
    hasher: foldhash::quality::RandomState,
    entries: std::sync::Mutex<std::collections::VecDeque<CachedView>>,
}

/// The rules of one masking view, as the ACT shares them between grants.
pub type MaskRules = Arc<[(String, MaskMethod)]>;

/// A share record names the fields a view masked and how.
impl crate::ledger::MaskedFields for MaskRules {
    fn count(&self) -> usize {
        self.len()
    }
    fn each(&self, f: &mut dyn FnMut(&str, &str)) {
        for (field, method) in self.iter() {
            f(field, method.name());
        }
    }
}

struct CachedView {
    hash: u64,
    payload: Bytes,
    format: PayloadFormat,
    rules: MaskRules,
    key: Option<[u8; 32]>,
    /// Filled by whichever subscriber gets there first; the others (even
    /// ones that arrive while it is being computed) take the result.
    masked: Arc<OnceLock<Result<Bytes, MaskError>>>,
}

impl ViewCache {
    pub fn new(capacity: usize) -> ViewCache {
        ViewCache {
            capacity,
            hasher: Default::default(),
            entries: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(capacity)),
        }
    }

    /// [`mask`], done once for equal inputs while they stay in the cache.
    /// Returns the payload and whether another subscriber's work was reused.
    pub fn mask(
        &self,
        format: PayloadFormat,
        payload: &Bytes,
        rules: &MaskRules,
        key: &[u8; 32],
    ) -> Result<(Bytes, bool), MaskError> {
        use std::hash::BuildHasher;
        // Only pseudonyms depend on who receives the view.
        let key = rules
            .iter()
            .any(|(_, m)| matches!(m, MaskMethod::Pseudonymize))
            .then_some(*key);
        let hash = self.hasher.hash_one(&payload[..]);
        let (cell, shared) = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            let found = entries
                .iter()
                .rev()
                .find(|e| {
                    e.hash == hash
                        && e.format == format
                        && e.key == key
                        && e.payload == *payload
                        && (Arc::ptr_eq(&e.rules, rules) || e.rules == *rules)
                })
                .map(|e| e.masked.clone());
            match found {
                Some(cell) => (cell, true),
                None => {
                    if entries.len() >= self.capacity {
                        entries.pop_front();
                    }
                    let cell = Arc::new(OnceLock::new());
                    entries.push_back(CachedView {
                        hash,
                        payload: payload.clone(),
                        format,
                        rules: rules.clone(),
                        key,
                        masked: cell.clone(),
                    });
                    (cell, false)
                }
            }
        };
        let masked = cell
            .get_or_init(|| mask(format, payload, rules, &key.unwrap_or(*KEYLESS)))
            .clone()?;
        Ok((masked, shared))
    }
}

/// Views without pseudonyms do not use the key; any constant will do.
static KEYLESS: &[u8; 32] = &[0; 32];

/// Pseudonymization key for one provider: an HMAC of the provider id under
/// the operator's master key, so keys differ per provider and need no storage.
pub fn provider_key(master: &[u8; 32], provider: &str) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(master).expect("HMAC takes any key size");
    mac.update(b"consentry pseudonym v1\0");
    mac.update(provider.as_bytes());
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// No typed fields.
    fn none() -> BTreeMap<String, FieldType> {
        BTreeMap::new()
    }

    fn typed(t: &[(&str, FieldType)]) -> BTreeMap<String, FieldType> {
        t.iter().map(|(f, t)| (f.to_string(), *t)).collect()
    }

    #[test]
    fn typed_fields_refuse_other_values_in_json_and_msgpack() {
        use FieldType::*;
        let declared: Vec<std::string::String> = ["bpm", "note", "ok", "n", "pos.lat"]
            .map(std::string::String::from)
            .to_vec();
        let types = typed(&[
            ("bpm", Number),
            ("note", String),
            ("ok", Boolean),
            ("n", Integer),
            ("pos.lat", Number),
        ]);
        let good = json!({"bpm": 72.5, "note": "x", "ok": true, "n": 3, "pos": {"lat": 1}});
        let partial = json!({"bpm": 72});
        for f in [PayloadFormat::Json, PayloadFormat::Msgpack] {
            let enc = |v: &serde_json::Value| match f {
                PayloadFormat::Json => j(v.clone()),
                _ => mp(v.clone()),
            };
            for ok in [&good, &partial] {
                let m = minimize(f, &enc(ok), &declared, &types, false).unwrap();
                assert!(m.removed.is_empty(), "{f:?} {ok}");
            }
            for (field, bad) in [
                ("bpm", json!({"bpm": "high"})),
                ("bpm", json!({"bpm": {"name": "smuggled"}})),
                ("bpm", json!({"bpm": [1, 2]})),
                ("bpm", json!({"bpm": null})),
                ("note", json!({"note": 1})),
                ("ok", json!({"ok": "yes"})),
                ("n", json!({"n": 2.5})),
                ("pos.lat", json!({"pos": {"lat": "north"}})),
            ] {
                let want = types[field];
                assert_eq!(
                    minimize(f, &enc(&bad), &declared, &types, false),
                    Err(MaskError::Type {
                        field: field.into(),
                        want
                    }),
                    "{f:?} {bad}"
                );
            }
        }
        // The flat JSON path, typed keys only at the top: refused there too,
        // also with an undeclared field to strip beside it.
        let flat = typed(&[("bpm", Number)]);
        let d = vec!["bpm".to_string()];
        assert!(matches!(
            minimize(
                PayloadFormat::Json,
                &j(json!({"bpm": "x"})),
                &d,
                &flat,
                false
            ),
            Err(MaskError::Type { .. })
        ));
        assert!(matches!(
            minimize(
                PayloadFormat::Json,
                &j(json!({"bpm": "x", "extra": 1})),
                &d,
                &flat,
                false
            ),
            Err(MaskError::Type { .. })
        ));
        // A repeated key is never judged by one of its values alone.
        let twice = Bytes::from_static(br#"{"bpm": 1, "bpm": "x"}"#);
        assert!(minimize(PayloadFormat::Json, &twice, &d, &flat, false).is_err());
    }

    /// A MessagePack map written entry by entry, so it can repeat a key.
    fn mp_entries(entries: Vec<(rmpv::Value, rmpv::Value)>) -> Bytes {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &rmpv::Value::Map(entries)).unwrap();
        Bytes::from(out)
    }

    #[test]
    fn repeated_keys_are_refused_wherever_they_hide() {
        let declared: Vec<String> = ["bpm", "name", "pos.lat"].map(String::from).to_vec();
        let types = typed(&[("bpm", FieldType::Number)]);
        fn repeated<T>(k: &str) -> Result<T, MaskError> {
            Err(MaskError::RepeatedKey(k.into()))
        }
        let json_cases: [&[u8]; 5] = [
            // Both copies well typed: the one-pass check must not call it clean.
            br#"{"bpm":74,"name":"x","bpm":75}"#,
            // An escape spells the same key.
            br#"{"bpm":{"name":"Alice"},"b\u0070m":73}"#,
            br#"{"b\u0070m":73,"bpm":"Alice"}"#,
            br#"{"pos":{"lat":1,"lat":"Alice"}}"#,
            br#"{"bpm":1,"extra":[{"a":1,"a":2}]}"#,
        ];
        for (payload, key) in json_cases
            .into_iter()
            .zip(["bpm", "bpm", "bpm", "lat", "a"])
        {
            let payload = Bytes::from_static(payload);
            for strict in [false, true] {
                let got = minimize(PayloadFormat::Json, &payload, &declared, &types, strict);
                // Strict mode may meet the undeclared "extra" first.
                if !(strict && key == "a") {
                    assert_eq!(got, repeated(key), "{payload:?}");
                }
            }
            // Top-level rules take the one-pass path, which copies values it
            // does not mask as they came; a nested rule takes the general one.
            let top = rules(&[("name", MaskMethod::Redact)]);
            let nested = rules(&[("pos.lat", MaskMethod::Redact)]);
            let rules = if key == "bpm" { top } else { nested };
            assert_eq!(
                mask(PayloadFormat::Json, &payload, &rules, &[7; 32]),
                repeated(key),
                "{payload:?}"
            );
        }

        let s = |x: &str| rmpv::Value::from(x);
        let msgpack_cases = [
            (
                mp_entries(vec![(s("bpm"), 72.into()), (s("bpm"), s("Alice Smith"))]),
                "bpm",
            ),
            (
                mp_entries(vec![
                    (s("bpm"), 72.into()),
                    (
                        s("pos"),
                        rmpv::Value::Map(vec![(s("lat"), 1.into()), (s("lat"), s("Alice"))]),
                    ),
                ]),
                "lat",
            ),
        ];
        for (payload, key) in msgpack_cases {
            assert_eq!(
                minimize(PayloadFormat::Msgpack, &payload, &declared, &types, false),
                repeated(key)
            );
            let rules = rules(&[("bpm", MaskMethod::Redact), ("pos.lat", MaskMethod::Redact)]);
            assert_eq!(
                mask(PayloadFormat::Msgpack, &payload, &rules, &[7; 32]),
                repeated(key)
            );
        }
        // Past sixteen entries the check takes a set; it must find the same.
        let mut many: Vec<_> = (0..40).map(|i| (s(&format!("k{i}")), i.into())).collect();
        many.push((s("k3"), s("again")));
        assert_eq!(
            minimize(
                PayloadFormat::Msgpack,
                &mp_entries(many),
                &declared,
                &none(),
                false
            ),
            repeated("k3")
        );
        // Past 64 declared fields the one-pass check steps aside; the
        // general path still takes clean payloads and refuses repeats.
        let wide: Vec<String> = (0..70).map(|i| format!("f{i}")).collect();
        let clean = Bytes::from_static(br#"{"f1":1,"f66":2}"#);
        let m = minimize(PayloadFormat::Json, &clean, &wide, &none(), true).unwrap();
        assert_eq!((m.payload, m.removed.len()), (clean, 0));
        let twice = Bytes::from_static(br#"{"f66":1,"f66":2}"#);
        assert_eq!(
            minimize(PayloadFormat::Json, &twice, &wide, &none(), true),
            repeated("f66")
        );
        let mut many_json = String::from("{");
        for i in 0..40 {
            many_json.push_str(&format!("\"k{i}\":{i},"));
        }
        many_json.push_str("\"k3\":0}");
        assert_eq!(
            minimize(
                PayloadFormat::Json,
                &Bytes::from(many_json),
                &declared,
                &none(),
                false
            ),
            repeated("k3")
        );
    }

    /// A literal "pos.lat" key is not the nested field pos.lat: the type
    /// check and the masks walk the nesting and would never see it.
    #[test]
    fn a_key_with_a_dot_is_never_a_declared_field() {
        let declared: Vec<String> = ["pos.lat", "bpm"].map(String::from).to_vec();
        let types = typed(&[("pos.lat", FieldType::Number)]);
        let payload = json!({"pos": {"lat": 48.85}, "pos.lat": "Alice Smith, 12 rue X", "bpm": 72});
        for (f, p) in both(payload) {
            let m = minimize(f, &p, &declared, &types, false).unwrap();
            assert_eq!(
                back(f, &m.payload),
                json!({"pos": {"lat": 48.85}, "bpm": 72})
            );
            assert_eq!(m.removed, vec!["pos.lat".to_string()]);
            assert_eq!(
                minimize(f, &p, &declared, &types, true),
                Err(MaskError::Undeclared("pos.lat".into()))
            );
        }
        // Also nested: {"pos": {"lat.x": …}} has no declared "pos.lat.x".
        let nested = j(json!({"pos": {"lat": 1.0, "a.b": "x"}}));
        let m = minimize(PayloadFormat::Json, &nested, &declared, &types, false).unwrap();
        assert_eq!(m.removed, vec!["pos.a.b".to_string()]);
    }

    /// Keys nested inside a declared, untyped field are checked for repeats
    /// too, whichever path the payload takes.
    #[test]
    fn repeated_keys_inside_a_declared_field_are_refused() {
        let declared = vec!["bpm".to_string(), "name".to_string()];
        for p in [
            &br#"{"bpm":72,"name":{"a":"Alice","a":"x"}}"#[..],
            br#"{"bpm":72,"name":[{"a":1,"a":2}]}"#,
        ] {
            assert_eq!(
                minimize(
                    PayloadFormat::Json,
                    &Bytes::from_static(p),
                    &declared,
                    &none(),
                    false
                ),
                Err(MaskError::RepeatedKey("a".into()))
            );
        }
    }

    #[test]
    fn msgpack_keys_that_are_not_utf8_are_removed_as_undeclared() {
        let declared = vec!["bpm".to_string()];
        // {"bpm": 72, "bpm\xff": "Alice"}, written by hand: rmpv will not
        // build a string that is not UTF-8.
        let payload = Bytes::from_static(b"\x82\xa3bpm\x48\xa4bpm\xff\xa5Alice");
        let m = minimize(PayloadFormat::Msgpack, &payload, &declared, &none(), false).unwrap();
        assert_eq!(back(PayloadFormat::Msgpack, &m.payload), json!({"bpm": 72}));
        assert!(matches!(
            minimize(PayloadFormat::Msgpack, &payload, &declared, &none(), true),
            Err(MaskError::Undeclared(_))
        ));
    }

    fn j(v: serde_json::Value) -> Bytes {
        Bytes::from(serde_json::to_vec(&v).unwrap())
    }

    fn mp(v: serde_json::Value) -> Bytes {
        Bytes::from(rmp_from_json(&v))
    }

    fn rmp_from_json(v: &serde_json::Value) -> Vec<u8> {
        fn conv(v: &serde_json::Value) -> rmpv::Value {
            match v {
                serde_json::Value::Null => rmpv::Value::Nil,
                serde_json::Value::Bool(b) => rmpv::Value::from(*b),
                serde_json::Value::Number(n) if n.is_i64() => {
                    rmpv::Value::from(n.as_i64().unwrap())
                }
                serde_json::Value::Number(n) => rmpv::Value::F64(n.as_f64().unwrap()),
                serde_json::Value::String(s) => rmpv::Value::from(s.as_str()),
                serde_json::Value::Array(a) => rmpv::Value::Array(a.iter().map(conv).collect()),
                serde_json::Value::Object(m) => rmpv::Value::Map(
                    m.iter()
                        .map(|(k, v)| (rmpv::Value::from(k.as_str()), conv(v)))
                        .collect(),
                ),
            }
        }
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &conv(v)).unwrap();
        out
    }

    fn back(format: PayloadFormat, b: &Bytes) -> serde_json::Value {
        match format {
            PayloadFormat::Json => serde_json::from_slice(b).unwrap(),
            _ => {
                let v = rmpv::decode::read_value(&mut &b[..]).unwrap();
                serde_json::to_value(rmpv::ext::from_value::<serde_json::Value>(v).unwrap())
                    .unwrap()
            }
        }
    }

    const KEY: [u8; 32] = [7; 32];

    fn rules(r: &[(&str, MaskMethod)]) -> Vec<(String, MaskMethod)> {
        r.iter().map(|(f, m)| (f.to_string(), m.clone())).collect()
    }

    fn both(v: serde_json::Value) -> [(PayloadFormat, Bytes); 2] {
        [
            (PayloadFormat::Json, j(v.clone())),
            (PayloadFormat::Msgpack, mp(v)),
        ]
    }

    #[test]
    fn minimize_strips_undeclared() {
        let declared = vec!["bpm".to_string(), "pos.lat".to_string()];
        for (f, p) in both(json!({"bpm": 72, "name": "Alice", "pos": {"lat": 1.5, "alt": 3}})) {
            let m = minimize(f, &p, &declared, &none(), false).unwrap();
            assert_eq!(back(f, &m.payload), json!({"bpm": 72, "pos": {"lat": 1.5}}));
            assert_eq!(m.removed, vec!["name".to_string(), "pos.alt".to_string()]);
        }
    }

    #[test]
    fn numbers_and_whitespace_cannot_smuggle_data_past_minimization() {
        let declared: Vec<String> = vec!["bpm".into(), "pos.lat".into()];
        let types: BTreeMap<String, FieldType> = [
            ("bpm".to_string(), FieldType::Number),
            ("pos.lat".to_string(), FieldType::Number),
        ]
        .into();
        let run = |p: String| {
            minimize(
                PayloadFormat::Json,
                &Bytes::from(p),
                &declared,
                &types,
                false,
            )
            .unwrap()
            .payload
        };
        // Digits past an f64's precision: the value is 1.0, and so is what goes on.
        let long = format!(r#"{{"bpm":1.{}417}}"#, "0".repeat(2000));
        assert_eq!(&run(long)[..], br#"{"bpm":1.0}"#);
        let padded = format!(
            "{{\"bpm\":{}72, \"pos\": {{\"lat\": 1.5}}}}",
            " \t\n".repeat(100)
        );
        assert_eq!(&run(padded)[..], br#"{"bpm":72,"pos":{"lat":1.5}}"#);
        // The plainly written longest values still pass byte for byte.
        let plain =
            r#"{ "bpm" : -2.2250738585072014e-308, "pos" : { "lat" : -1.7976931348623157e308 } }"#;
        assert_eq!(&run(plain.to_string())[..], plain.as_bytes());
        // A string or untyped field may be long: its payload is left as it is.
        let mut with_note = declared.clone();
        with_note.push("note".into());
        let p = Bytes::from(format!(r#"{{"bpm":72,   "note":"{}"}}"#, "x".repeat(5000)));
        let m = minimize(PayloadFormat::Json, &p, &with_note, &types, false).unwrap();
        assert_eq!(m.payload, p);
    }

    #[test]
    fn minimize_untouched_payload_is_not_reencoded() {
        let p = Bytes::from_static(b"{ \"bpm\" : 72 }");
        let m = minimize(PayloadFormat::Json, &p, &["bpm".into()], &none(), false).unwrap();
        assert_eq!(m.payload, p);
        assert!(m.removed.is_empty());
    }

    #[test]
    fn the_one_pass_check_passes_only_what_needs_no_minimizing() {
        let declared: Vec<String> = vec!["bpm".into(), "pos.lat".into()];
        let untyped = none();
        let yes = |p: &[u8]| matches!(json_flat_check(p, &declared, &untyped), Flat::Clean);
        assert!(yes(br#"{"bpm": 72}"#));
        assert!(yes(br#" {} "#));
        assert!(
            !yes(br#"{"bpm": {"deep": [1, "x"]}}"#),
            "a map or array in a declared field has its keys checked"
        );
        assert!(!yes(br#"{"bpm": [1, 2]}"#));
        assert!(!yes(br#"{"pos.lat": 1}"#), "a dotted key is never clean");
        assert!(!yes(br#"{"bpm": 72, "name": "A"}"#));
        assert!(
            !yes(br#"{"pos": {"lat": 1}}"#),
            "nested declarations take the full path"
        );
        assert!(!yes(br#"{"bpm": 72} trailing"#));
        assert!(!yes(br#"{"bpm": 72"#));
        assert!(
            !yes(br#"{"b\u0070m": 72}"#),
            "escaped keys take the full path"
        );
        assert!(!yes(br#"[1, 2]"#));
        // And the full path still decides those.
        let p = Bytes::from_static(br#"{"bpm": 72} trailing"#);
        assert_eq!(
            minimize(PayloadFormat::Json, &p, &declared, &none(), false),
            Err(MaskError::Decode("JSON"))
        );
        let p = Bytes::from_static(br#"{"b\u0070m": 72}"#);
        let m = minimize(PayloadFormat::Json, &p, &declared, &none(), false).unwrap();
        assert!(m.removed.is_empty(), "the escaped key is the declared bpm");
    }

    #[test]
    fn minimize_strict_rejects() {
        for (f, p) in both(json!({"bpm": 72, "name": "Alice"})) {
            assert_eq!(
                minimize(f, &p, &["bpm".into()], &none(), true),
                Err(MaskError::Undeclared("name".into()))
            );
        }
    }

    #[test]
    fn undecodable_and_non_map_payloads_fail() {
        let bad = Bytes::from_static(b"{\"bpm\": ");
        assert_eq!(
            minimize(PayloadFormat::Json, &bad, &[], &none(), false),
            Err(MaskError::Decode("JSON"))
        );
        assert_eq!(
            minimize(
                PayloadFormat::Msgpack,
                // A map announcing two entries, cut short.
                &Bytes::from_static(&[0x82, 0xa1]),
                &[],
                &none(),
                false
            ),
            Err(MaskError::Decode("MessagePack"))
        );
        assert_eq!(
            minimize(PayloadFormat::Json, &j(json!([1, 2])), &[], &none(), false),
            Err(MaskError::NotAMap)
        );
        // Trailing garbage after one MessagePack value is not a valid payload.
        let mut two = rmp_from_json(&json!({"a": 1}));
        two.push(0x01);
        assert!(minimize(
            PayloadFormat::Msgpack,
            &Bytes::from(two),
            &["a".into()],
            &none(),
            false
        )
        .is_err());
    }

    #[test]
    fn msgpack_non_string_keys_are_undeclared() {
        let doc = rmpv::Value::Map(vec![
            (rmpv::Value::from("bpm"), rmpv::Value::from(70)),
            (rmpv::Value::from(1), rmpv::Value::from("secret")),
        ]);
        let mut raw = Vec::new();
        rmpv::encode::write_value(&mut raw, &doc).unwrap();
        let raw = Bytes::from(raw);
        let m = minimize(
            PayloadFormat::Msgpack,
            &raw,
            &["bpm".into()],
            &none(),
            false,
        )
        .unwrap();
        assert_eq!(back(PayloadFormat::Msgpack, &m.payload), json!({"bpm": 70}));
        assert!(minimize(PayloadFormat::Msgpack, &raw, &["bpm".into()], &none(), true).is_err());
    }

    #[test]
    fn opaque_passes_whole() {
        let p = Bytes::from_static(b"\x00\x01binary");
        let m = minimize(PayloadFormat::Opaque, &p, &[], &none(), true).unwrap();
        assert_eq!(m.payload, p);
        assert!(mask(PayloadFormat::Opaque, &p, &[], &KEY).is_err());
    }

    #[test]
    fn remove_and_redact() {
        let rules = vec![
            ("lat".to_string(), MaskMethod::Remove),
            ("lon".to_string(), MaskMethod::Redact),
        ];
        for (f, p) in both(json!({"lat": 48.8566, "lon": 2.3522, "acc": 5})) {
            let out = mask(f, &p, &rules, &KEY).unwrap();
            assert_eq!(back(f, &out), json!({"lon": REDACTED, "acc": 5}));
        }
    }

    #[test]
    fn generalize_to_about_a_kilometre() {
        let rules = vec![
            ("lat".to_string(), MaskMethod::Generalize { decimals: 2 }),
            ("lon".to_string(), MaskMethod::Generalize { decimals: 2 }),
            ("count".to_string(), MaskMethod::Generalize { decimals: -2 }),
        ];
        for (f, p) in both(json!({"lat": 48.85661, "lon": 2.35222, "count": 1234})) {
            let out = mask(f, &p, &rules, &KEY).unwrap();
            assert_eq!(
                back(f, &out),
                json!({"lat": 48.86, "lon": 2.35, "count": 1200})
            );
        }
    }

    /// A grant stored before the API refused such decimals still masks to
    /// a number, never to null.
    #[test]
    fn generalize_far_past_a_doubles_digits_stays_a_number() {
        for decimals in [400, 100_000, -400, i32::MIN, i32::MAX] {
            let rules = vec![("bpm".to_string(), MaskMethod::Generalize { decimals })];
            for (f, p) in both(json!({"bpm": 72.456})) {
                let out = back(f, &mask(f, &p, &rules, &KEY).unwrap());
                assert!(out["bpm"].is_number(), "{decimals}: {out}");
            }
        }
    }

    #[test]
    fn generalize_refuses_non_numbers() {
        let rules = vec![("lat".to_string(), MaskMethod::Generalize { decimals: 2 })];
        let p = j(json!({"lat": "48.8"}));
        assert_eq!(
            mask(PayloadFormat::Json, &p, &rules, &KEY),
            Err(MaskError::NotANumber("lat".into()))
        );
    }

    #[test]
    fn pseudonyms_are_stable_per_provider_and_differ_between_providers() {
        let master = [9u8; 32];
        let (k1, k2) = (
            provider_key(&master, "fitcoach"),
            provider_key(&master, "insureco"),
        );
        assert_ne!(k1, k2);
        let rules = vec![("id".to_string(), MaskMethod::Pseudonymize)];
        for (f, p) in both(json!({"id": "alice-1234", "bpm": 70})) {
            let a = back(f, &mask(f, &p, &rules, &k1).unwrap());
            let a2 = back(f, &mask(f, &p, &rules, &k1).unwrap());
            let b = back(f, &mask(f, &p, &rules, &k2).unwrap());
            assert_eq!(a, a2);
            assert_ne!(a["id"], b["id"]);
            assert_ne!(a["id"], json!("alice-1234"));
            assert_eq!(a["id"].as_str().unwrap().len(), 32);
            assert_eq!(a["bpm"], json!(70));
        }
    }

    #[test]
    fn view_cache_shares_equal_views_only() {
        let cache = ViewCache::new(4);
        let p = j(json!({"lat": 48.85661, "id": "x"}));
        let gen: MaskRules = rules(&[("lat", MaskMethod::Generalize { decimals: 2 })]).into();
        let (a, hit) = cache.mask(PayloadFormat::Json, &p, &gen, &[1; 32]).unwrap();
        assert!(!hit);
        // Another provider, same view without pseudonyms: shared, also when
        // its grant holds its own copy of the rules.
        let (b, hit) = cache.mask(PayloadFormat::Json, &p, &gen, &[2; 32]).unwrap();
        assert!(hit);
        assert_eq!(a, b);
        let gen_copy: MaskRules = rules(&[("lat", MaskMethod::Generalize { decimals: 2 })]).into();
        let (b, hit) = cache
            .mask(PayloadFormat::Json, &p, &gen_copy, &[3; 32])
            .unwrap();
        assert!(hit);
        assert_eq!(a, b);
        // Other rules, other view.
        let coarser: MaskRules = rules(&[("lat", MaskMethod::Generalize { decimals: 1 })]).into();
        let (f, hit) = cache
            .mask(PayloadFormat::Json, &p, &coarser, &[1; 32])
            .unwrap();
        assert!(!hit);
        assert_ne!(a, f);
        // With pseudonyms the provider key is part of the view.
        let pse: MaskRules = rules(&[("id", MaskMethod::Pseudonymize)]).into();
        let (c, _) = cache.mask(PayloadFormat::Json, &p, &pse, &[1; 32]).unwrap();
        let (d, hit) = cache.mask(PayloadFormat::Json, &p, &pse, &[2; 32]).unwrap();
        assert!(!hit);
        assert_ne!(c, d);
        // A different payload is never served from another's entry.
        let q = j(json!({"lat": 1.0, "id": "x"}));
        let (e, hit) = cache.mask(PayloadFormat::Json, &q, &gen, &[1; 32]).unwrap();
        assert!(!hit);
        assert_eq!(back(PayloadFormat::Json, &e)["lat"], json!(1.0));
        // Bounded.
        assert!(cache.entries.lock().unwrap().len() <= 4);
    }

    /// The flat JSON path must give what the general path gives, value for
    /// value and error for error, or step aside.
    #[test]
    fn flat_json_path_agrees_with_the_general_path() {
        use MaskMethod::*;
        let general = |p: &[u8], rules: &[(String, MaskMethod)]| {
            let mut doc = decode_json(p)?;
            apply_rules(&mut doc, rules, &KEY)?;
            encode_json(&doc)
        };
        let payloads: [&[u8]; 6] = [
            br#"{"ts": 17, "val": 72.46, "id": "alice-1", "pad": "x\"y\u00e9", "pos": {"lat": 1.5}}"#,
            br#"{"val":-1234,"id":{"b":[1,2,{"c":null}],"a":true}}"#,
            br#"{"val":"high","id":3}"#,
            br#"{}"#,
            br#" { "id" : [ 1 , 2 ] , "val" : 1e3 } "#,
            br#"{"val":7}"#,
        ];
        let rule_sets = [
            rules(&[("val", Generalize { decimals: -1 })]),
            rules(&[("val", Generalize { decimals: 1 }), ("id", Pseudonymize)]),
            rules(&[("id", Redact), ("pad", Remove), ("pos", Remove)]),
            rules(&[
                ("id", Pseudonymize),
                ("val", Redact),
                ("val", Generalize { decimals: 0 }),
            ]),
            rules(&[("val", Remove), ("val", Generalize { decimals: 0 })]),
            rules(&[("absent", Redact)]),
        ];
        let mut flat_taken = 0;
        for p in payloads {
            for rules in &rule_sets {
                let want = general(p, rules);
                let Some(got) = mask_flat_json(p, rules, &KEY) else {
                    continue;
                };
                flat_taken += 1;
                match (got, want) {
                    (Ok(g), Ok(w)) => {
                        let g: serde_json::Value = serde_json::from_slice(&g).unwrap();
                        let w: serde_json::Value = serde_json::from_slice(&w).unwrap();
                        assert_eq!(g, w, "{} under {rules:?}", String::from_utf8_lossy(p));
                    }
                    (g, w) => assert_eq!(g, w, "{} under {rules:?}", String::from_utf8_lossy(p)),
                }
            }
        }
        assert_eq!(flat_taken, payloads.len() * rule_sets.len());
        // Field order is the device's, untouched values byte for byte.
        let out = mask_flat_json(br#"{"z":1,"a":"\u0041"}"#, &rules(&[("z", Redact)]), &KEY);
        assert_eq!(
            out.unwrap().unwrap(),
            Bytes::from_static(br#"{"z":"[redacted]","a":"\u0041"}"#)
        );
    }

    #[test]
    fn flat_json_path_steps_aside() {
        let gen = vec![("val".to_string(), MaskMethod::Generalize { decimals: 0 })];
        let nested = vec![("pos.lat".to_string(), MaskMethod::Redact)];
        for (p, rules) in [
            (&br#"{"val":1,"val":2}"#[..], &gen),
            (br#"{"v\u0061l":1}"#, &gen),
            (br#"[1,2]"#, &gen),
            (br#"{"val":1} x"#, &gen),
            (br#"{"val":"#, &gen),
            (br#"{"pos":{"lat":1}}"#, &nested),
        ] {
            assert!(
                mask_flat_json(p, rules, &KEY).is_none(),
                "{}",
                String::from_utf8_lossy(p)
            );
        }
        // Many fields: still linear, still finds a repeat.
        let many: String = (0..20_000).map(|i| format!("\"f{i}\":{i},")).collect();
        let with_repeat = format!("{{{many}\"f19999\":1}}");
        assert!(mask_flat_json(with_repeat.as_bytes(), &gen, &KEY).is_none());
        let without = format!("{{{many}\"val\":14}}");
        let out = mask_flat_json(without.as_bytes(), &gen, &KEY)
            .unwrap()
            .unwrap();
        assert_eq!(back(PayloadFormat::Json, &out)["val"], json!(14));
        // The general path decides them: it refuses a repeated key.
        let out = mask(
            PayloadFormat::Json,
            &Bytes::from_static(br#"{"val":1,"val":2.4}"#),
            &gen,
            &KEY,
        );
        assert_eq!(out, Err(MaskError::RepeatedKey("val".into())));
    }

    #[test]
    fn nested_paths_and_missing_fields() {
        let rules = vec![
            ("pos.lat".to_string(), MaskMethod::Redact),
            ("absent".to_string(), MaskMethod::Redact),
            ("gone.deeper".to_string(), MaskMethod::Remove),
        ];
        for (f, p) in both(json!({"pos": {"lat": 1.0, "lon": 2.0}})) {
            let out = mask(f, &p, &rules, &KEY).unwrap();
            assert_eq!(back(f, &out), json!({"pos": {"lat": REDACTED, "lon": 2.0}}));
        }
    }
}

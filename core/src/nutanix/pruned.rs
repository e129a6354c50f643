//! Reading a JSON document into a [`Value`] that holds only the members its
//! reader looks at.
//!
//! A notification is 4–8 KB, of which decoding reads a few hundred bytes;
//! building all of it as a `Value` took an allocation per member, each
//! freed again at once, and that allocator work slowed every request
//! handler beside it. What is not kept is still read and checked as
//! `serde_json` checks a `Value` (strings' escapes and UTF-8, numbers'
//! range, nesting depth): every value goes through `deserialize_any`, never
//! `deserialize_ignored_any`, which skips escapes and numbers unchecked. So
//! a body is refused or accepted the same either way; the rest is only not
//! built.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Which parts of a document to build. Where it says to build less than
/// all, the result has the document's shape: the same type at every place
/// it keeps, each object and array as empty as it was, scalars as they were;
/// what it drops is gone, except that an object or array whose members
/// were all dropped keeps its first one, as `null`, only so that it is not
/// mistaken for an empty one. So a reader may look members up, test types
/// and emptiness and read what is kept, but not list or count what is not,
/// nor serialise the result.
#[derive(Debug)]
pub enum Keep {
    /// The whole value.
    All,
    /// Of an object, these members, each kept as said.
    Members(&'static [(&'static str, Keep)]),
    /// Of an array, each element, kept as said.
    Each(&'static Keep),
}

/// `body` read as one JSON document, keeping what `keep` says.
///
/// A document that cannot be read this way is read whole, so that what is
/// returned, and every error, is what `serde_json::from_slice` gives: one
/// that is not UTF-8 (checking the bytes once up front spares checking
/// every string as it is read), one that is not JSON, and one with a member
/// named as `serde_json`'s private markers (`$serde_json::private::…`),
/// which a `Value` read takes as an instruction (with the `raw_value`
/// feature, `{"$serde_json::private::RawValue": "[1]"}` reads as `[1]`).
pub fn read(body: &[u8], keep: &'static Keep) -> serde_json::Result<Value> {
    if !matches!(keep, Keep::All) {
        if let Ok(text) = std::str::from_utf8(body) {
            let mut de = serde_json::Deserializer::from_str(text);
            if let Ok(value) = Pruned(keep).deserialize(&mut de) {
                if de.end().is_ok() {
                    return Ok(value);
                }
            }
        }
    }
    serde_json::from_slice(body)
}

/// How a member's name starts when `serde_json` reads it as a marker.
const MARKER: &str = "$serde_json::private::";

struct Pruned(&'static Keep);

impl<'de> DeserializeSeed<'de> for Pruned {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        match self.0 {
            Keep::All => Value::deserialize(deserializer),
            keep => deserializer.deserialize_any(Reader(Some(keep))),
        }
    }
}

/// A value read and checked as any `Value` is, then dropped.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Reader(None))?;
        Ok(Checked)
    }
}

/// A member's name, borrowed from the document unless it held escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl<'de> Visitor<'de> for Name {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, name: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(name)))
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(name.to_owned())))
            }
        }
        deserializer.deserialize_any(Name)
    }
}

/// Reads any value as its [`Keep`] says (never `All`, which is read as a
/// `Value`); with `None`, checks it and answers `null`.
struct Reader(Option<&'static Keep>);

impl Reader {
    /// A scalar, kept as it is unless everything is dropped.
    fn scalar(&self, value: impl FnOnce() -> Value) -> Value {
        self.0.map_or(Value::Null, |_| value())
    }
}

impl<'de> Visitor<'de> for Reader {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let members = match self.0 {
            Some(Keep::Members(members)) => *members,
            _ => &[],
        };
        let mut kept = Map::new();
        let mut dropped = None;
        while let Some(Key(name)) = map.next_key()? {
            if name.starts_with(MARKER) {
                return Err(de::Error::custom("a marker member: read it whole"));
            }
            match members.iter().find(|(wanted, _)| *wanted == name) {
                // A repeated member replaces the earlier one, as in a `Value`.
                Some((_, keep)) => {
                    kept.insert(name.into_owned(), map.next_value_seed(Pruned(keep))?);
                }
                None => {
                    map.next_value::<Checked>()?;
                    dropped.get_or_insert(name);
                }
            }
        }
        if self.0.is_none() {
            return Ok(Value::Null);
        }
        if let (true, Some(name)) = (kept.is_empty(), dropped) {
            kept.insert(name.into_owned(), Value::Null);
        }
        Ok(Value::Object(kept))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        match self.0 {
            None => {
                while seq.next_element::<Checked>()?.is_some() {}
                Ok(Value::Null)
            }
            Some(Keep::Each(keep)) => {
                let mut kept = Vec::new();
                while let Some(element) = seq.next_element_seed(Pruned(keep))? {
                    kept.push(element);
                }
                Ok(Value::Array(kept))
            }
            Some(_) => {
                let mut kept = Vec::new();
                while seq.next_element::<Checked>()?.is_some() {
                    if kept.is_empty() {
                        kept.push(Value::Null);
                    }
                }
                Ok(Value::Array(kept))
            }
        }
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        Ok(self.scalar(|| Value::Bool(b)))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Value, E> {
        Ok(self.scalar(|| Value::from(n)))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Value, E> {
        Ok(self.scalar(|| Value::from(n)))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Value, E> {
        // As a `Value` reads it: a float JSON cannot hold is null.
        Ok(self.scalar(|| serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        Ok(self.scalar(|| Value::String(s.to_owned())))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEEP: Keep = Keep::Members(&[
        ("a", Keep::All),
        ("b", Keep::Members(&[("c", Keep::All)])),
        ("e", Keep::Each(&Keep::Members(&[("f", Keep::All)]))),
    ]);

    #[test]
    fn only_the_members_asked_for_are_built_and_a_repeat_replaces_the_first() {
        let body = br#"{"a": [1, {"x": 2}], "z": {"deep": [true]}, "b": {"c": "one", "d": 4}, "b": {"c": "two"}}"#;
        assert_eq!(
            read(body, &KEEP).unwrap(),
            json!({ "a": [1, { "x": 2 }], "b": { "c": "two" } })
        );
    }

    #[test]
    fn an_object_with_only_dropped_members_is_not_read_as_empty() {
        let body = br#"{"a": 1, "b": {"d": 4, "e": 5}}"#;
        assert_eq!(
            read(body, &KEEP).unwrap(),
            json!({ "a": 1, "b": { "d": null } })
        );
        assert_eq!(
            read(br#"{"a": 1, "b": {}}"#, &KEEP).unwrap(),
            json!({ "a": 1, "b": {} })
        );
    }

    #[test]
    fn each_element_of_an_array_is_kept_as_asked() {
        let body = br#"{"e": [{"f": 1, "g": 2}, {"g": 3}, {}, 4, [5, 6], []]}"#;
        assert_eq!(
            read(body, &KEEP).unwrap(),
            json!({ "e": [{ "f": 1 }, { "g": null }, {}, 4, [null], []] })
        );
    }

    /// Types, emptiness and scalars survive where another shape was
    /// expected: a reader tells `[]` from `[1]` and `""` from `"c"` as it
    /// would in the whole document.
    #[test]
    fn an_unexpected_shape_keeps_its_type_and_emptiness() {
        let body = br#"{"b": [1, 2], "e": {"x": 1}, "z": 1}"#;
        assert_eq!(
            read(body, &KEEP).unwrap(),
            json!({ "b": [null], "e": { "x": null } })
        );
        let body = br#"{"b": "c", "e": 2.5, "a": null}"#;
        assert_eq!(
            read(body, &KEEP).unwrap(),
            json!({ "b": "c", "e": 2.5, "a": null })
        );
        let body = br#"{"b": [], "e": {}}"#;
        assert_eq!(read(body, &KEEP).unwrap(), json!({ "b": [], "e": {} }));
    }

    /// What `serde_json` refuses in a `Value` is refused where it is
    /// dropped, with the same message: each case sits in a member nobody
    /// keeps, and `deserialize_ignored_any` would have let the first three
    /// through.
    #[test]
    fn what_is_dropped_is_checked_as_strictly_as_a_value() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let cases: [Vec<u8>; 6] = [
            br#"{"z": "\ud800"}"#.to_vec(),
            br#"{"z": 1e999}"#.to_vec(),
            br#"{"z": {"\udc00": 1}}"#.to_vec(),
            b"{\"z\": \"a\x01\"}".to_vec(),
            format!(r#"{{"z": {deep}}}"#).into_bytes(),
            br#"{"z": [1,]}"#.to_vec(),
        ];
        for body in cases {
            let whole = serde_json::from_slice::<Value>(&body).unwrap_err();
            let pruned = read(&body, &KEEP).unwrap_err();
            assert_eq!(
                pruned.to_string(),
                whole.to_string(),
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    /// Both reads' answers, errors as their messages.
    fn both(body: &[u8]) -> [Result<Value, String>; 2] {
        [
            read(body, &KEEP).map_err(|e| e.to_string()),
            serde_json::from_slice::<Value>(body).map_err(|e| e.to_string()),
        ]
    }

    #[test]
    fn a_body_that_is_not_utf8_is_refused_as_serde_json_refuses_it() {
        let [pruned, whole] = both(b"{\"z\": \"\xff\"}");
        assert!(whole.is_err());
        assert_eq!(pruned, whole);
    }

    /// `serde_json` reads a member named `$serde_json::private::RawValue`
    /// (with its `raw_value` feature) as JSON text to parse in the object's
    /// place. Found by the `prism_answers` fuzz target: such a member,
    /// dropped, let a page through that the whole read refused.
    #[test]
    fn a_member_named_as_a_serde_json_marker_is_read_whole() {
        for body in [
            &br#"{"z": {"$serde_json::private::RawValue": "66666666ROR"}}"#[..],
            br#"{"z": {"$serde_json::private::RawValue": "[1]"}, "a": 2}"#,
            br#"{"$serde_json::private::RawValue": "{\"a\": 1}"}"#,
            br#"{"b": {"$serde_json::private::Number": "1"}}"#,
        ] {
            let [pruned, whole] = both(body);
            assert_eq!(pruned, whole, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn trailing_characters_are_refused() {
        assert!(read(br#"{"a": 1} x"#, &KEEP).is_err());
    }
}

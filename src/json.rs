//! JSON values checked and normalised without building a tree.
//!
//! Building a `serde_json::Value` to check a value costs ~16× its size (one heap node per
//! element); a put of a 15 MiB array would hold ~240 MiB while it is checked. [`validate`]
//! walks the same grammar through serde's visitor interface and keeps nothing, so checking
//! costs at most the largest escaped string it meets. [`compact`] removes the whitespace a
//! person may leave in a key file, so that every value travels as one line.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Checks that `json` is one JSON value every client can read back: what serde_json's
/// building parser enforces and capturing raw text does not — nesting at most 128 deep,
/// numbers within `f64`, no lone UTF-16 surrogates — plus no trailing characters.
///
/// # Errors
/// The first problem, as serde_json words it (with line and column).
pub fn validate(json: &str) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(json);
    Check.deserialize(&mut de)?;
    de.end()
}

/// A visitor that accepts every JSON value and keeps none of it. `deserialize_any` makes
/// serde_json parse numbers (rejecting those out of `f64` range) and decode strings
/// (rejecting lone surrogates), and it counts nesting against serde_json's limit of 128.
#[derive(Clone, Copy)]
struct Check;

impl<'de> DeserializeSeed<'de> for Check {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Check)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(Check)?.is_some() {
            map.next_value_seed(Check)?;
        }
        Ok(())
    }
}

/// `json` without whitespace outside strings. `json` must be valid JSON (see [`validate`]);
/// the result is then the same value on one line. Borrows when there is nothing to remove.
pub fn compact(json: &str) -> Cow<'_, str> {
    let bytes = json.as_bytes();
    let is_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let mut in_string = false;
    let mut escaped = false;
    let mut needs_work = false;
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if is_space(b) {
            needs_work = true;
            break;
        }
    }
    if !needs_work {
        return Cow::Borrowed(json);
    }
    let mut out = Vec::with_capacity(bytes.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            out.push(b);
        } else if b == b'"' {
            in_string = true;
            out.push(b);
        } else if !is_space(b) {
            out.push(b);
        }
    }
    // Only ASCII whitespace outside strings was removed, so the bytes are still UTF-8.
    Cow::Owned(
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str, ok: bool) {
        assert_eq!(validate(json).is_ok(), ok, "{json}");
        let tree = serde_json::from_str::<serde_json::Value>(json);
        assert_eq!(tree.is_ok(), ok, "the tree parser agrees on {json}");
    }

    #[test]
    fn accepts_what_the_tree_parser_accepts() {
        for json in [
            "1",
            "-0.5e3",
            "\"a\\u00e9\"",
            "[1,[2,{\"a\":null}]]",
            "{}",
            " true ",
            "18446744073709551615",
        ] {
            check(json, true);
        }
        for json in [
            "",
            "1e400",
            "\"\\ud800\"",
            "[1,",
            "{\"a\"}",
            "1 2",
            "nul",
            "[1]x",
        ] {
            check(json, false);
        }
        check(&format!("{}{}", "[".repeat(127), "]".repeat(127)), true);
        check(&format!("{}{}", "[".repeat(128), "]".repeat(128)), false);
    }

    #[test]
    fn compacts_outside_strings_only() {
        assert_eq!(
            compact("{\n  \"a b\": [1, 2],\n \"c\\\"\\t\": \" x \"\n}\n"),
            "{\"a b\":[1,2],\"c\\\"\\t\":\" x \"}"
        );
        assert!(matches!(compact("{\"a\":\"b c\"}"), Cow::Borrowed(_)));
    }
}

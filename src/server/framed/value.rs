//! Values between the framed protocol (bytes) and the store (JSON text), both ways. The only
//! place the mapping is decided; docs/PROTOCOL.md ("Framed protocol") states it.
//!
//! In: bytes that are JSON are stored as that JSON value (so line clients see `{"on":true}` as
//! an object); other UTF-8 bytes are stored as a JSON string of exactly those bytes; bytes that
//! are not UTF-8 are refused. Out: a JSON string gives its contents, unquoted; any other value
//! gives its JSON text. So a framed put of `hello` or of `{"on":true}` reads back as sent.

use std::borrow::Cow;
use std::fmt;

use crate::store::Value;

/// Why framed bytes cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueError {
    /// An empty value: upstream's client library cannot read an empty base64 field back.
    Empty,
    NotUtf8 {
        at: usize,
    },
    TooLarge {
        len: usize,
        max: usize,
    },
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueError::Empty => {
                f.write_str("value is empty; framed clients cannot read an empty value back")
            }
            ValueError::NotUtf8 { at } => {
                write!(f, "value is not UTF-8 (at byte {at}); nkv stores JSON text")
            }
            ValueError::TooLarge { len, max } => write!(
                f,
                "value is {len} bytes as JSON, the limit is {max} (--max-value-bytes)"
            ),
        }
    }
}

impl std::error::Error for ValueError {}

/// The stored value for the bytes of a framed `PUT`.
///
/// # Errors
/// The bytes are empty or not UTF-8, or their JSON text is over `max` bytes.
pub fn from_bytes(bytes: &[u8], max: usize) -> Result<Value, ValueError> {
    if bytes.is_empty() {
        return Err(ValueError::Empty);
    }
    let text = std::str::from_utf8(bytes).map_err(|e| ValueError::NotUtf8 {
        at: e.valid_up_to(),
    })?;
    let trimmed = text.trim_matches(|c| matches!(c, ' ' | '\t' | '\r' | '\n'));
    // serde_json's building parser is the readability test the line protocol uses too: it
    // caps nesting and refuses lone surrogates, so every client can read the value back.
    let json = if !trimmed.is_empty() && serde_json::from_str::<serde_json::Value>(trimmed).is_ok()
    {
        if trimmed.contains(['\n', '\r']) {
            one_line(trimmed)
        } else {
            trimmed.to_owned()
        }
    } else {
        // Serialising a &str cannot fail.
        serde_json::to_string(text).unwrap_or_default()
    };
    if json.len() > max {
        return Err(ValueError::TooLarge {
            len: json.len(),
            max,
        });
    }
    Ok(Value::from(json))
}

/// The bytes a framed client gets for a stored value (a GET reply, an `UPDATE`). Never empty:
/// upstream's client library fails on an empty base64 field, so the empty string (which only a
/// line client can store) is sent as its JSON text, `""`.
pub fn to_bytes(value: &str) -> Cow<'_, [u8]> {
    if value.starts_with('"') && value != "\"\"" {
        if let Ok(text) = serde_json::from_str::<Cow<'_, str>>(value) {
            return match text {
                Cow::Borrowed(text) => Cow::Borrowed(text.as_bytes()),
                Cow::Owned(text) => Cow::Owned(text.into_bytes()),
            };
        }
    }
    Cow::Borrowed(value.as_bytes())
}

/// Valid JSON with its whitespace between tokens removed: a line-protocol response carries a
/// value on one line, and raw line breaks can only be such whitespace (inside strings they are
/// escaped).
fn one_line(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if !matches!(c, ' ' | '\t' | '\r' | '\n') {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(bytes: &[u8]) -> String {
        from_bytes(bytes, 1 << 20).unwrap().to_string()
    }

    #[test]
    fn json_bytes_are_stored_as_json_and_other_text_as_a_string() {
        assert_eq!(stored(br#"{"on":true}"#), r#"{"on":true}"#);
        assert_eq!(stored(b"42"), "42");
        assert_eq!(stored(b"\"quoted\""), "\"quoted\"");
        assert_eq!(stored(b" [1, 2]\n"), "[1, 2]", "trimmed, inner spaces kept");
        assert_eq!(
            stored(b"{\n  \"a\": \"x y\\\"\\n\",\n  \"b\": [1, 2]\n}\n"),
            r#"{"a":"x y\"\n","b":[1,2]}"#,
            "a multi-line JSON text is stored on one line"
        );
        assert_eq!(stored(b"hello world"), "\"hello world\"");
        assert_eq!(
            stored(b" padded "),
            "\" padded \"",
            "a string keeps its spaces"
        );
        assert_eq!(stored(b"{\"a\":"), "\"{\\\"a\\\":\"", "broken JSON is text");
        assert_eq!(stored("tab\there\u{1}".as_bytes()), "\"tab\\there\\u0001\"");
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(
            stored(deep.as_bytes()).starts_with('"'),
            "unreadable JSON is text"
        );
    }

    #[test]
    fn empty_non_utf8_and_oversized_values_are_refused() {
        assert_eq!(from_bytes(b"", 100), Err(ValueError::Empty));
        assert_eq!(
            from_bytes(&[b'a', 0xff], 100),
            Err(ValueError::NotUtf8 { at: 1 })
        );
        assert_eq!(
            from_bytes(b"\"abc\"", 4),
            Err(ValueError::TooLarge { len: 5, max: 4 })
        );
    }

    proptest::proptest! {
        /// Whatever a framed client sends, what is stored is one line of JSON that every
        /// client can read, and text that was not JSON reads back byte for byte.
        #[test]
        fn any_text_is_stored_as_one_readable_json_line(text in "(?s).{1,64}|[ \n{}\\[\\]\":,0-9a-z]{1,64}") {
            let stored = from_bytes(text.as_bytes(), 1 << 20).unwrap();
            proptest::prop_assert!(!stored.contains('\n') && !stored.contains('\r'), "{stored:?}");
            proptest::prop_assert!(serde_json::from_str::<serde_json::Value>(&stored).is_ok(), "{stored:?}");
            let trimmed = text.trim_matches(|c| matches!(c, ' ' | '\t' | '\r' | '\n'));
            if serde_json::from_str::<serde_json::Value>(trimmed).is_err() || trimmed.is_empty() {
                proptest::prop_assert_eq!(&*to_bytes(&stored), text.as_bytes());
            }
        }
    }

    #[test]
    fn stored_values_read_back_as_framed_clients_sent_them() {
        for sent in [
            &b"hello world"[..],
            br#"{"on":true}"#,
            b"42",
            b"line\nbreak \"q\" \\ \xc3\xa9",
            b"null",
            b"\"\"",
        ] {
            assert_eq!(&*to_bytes(&stored(sent)), sent, "{sent:?}");
        }
        assert_eq!(&*to_bytes("\"a\\u0041\""), b"aA");
        assert_eq!(&*to_bytes("[1,2]"), b"[1,2]");
        assert_eq!(&*to_bytes("\"\""), b"\"\"", "never an empty field");
    }
}

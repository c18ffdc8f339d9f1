//! Property tests of the pure boundary code: key validation against an independent oracle, the
//! key ↔ file-name mapping, and request parsing on arbitrary and generated lines.

use std::ffi::OsStr;
use std::path::{Component, Path};

use nkv::disk::{file_name, key_of};
use nkv::key::{Key, Target};
use nkv::protocol::{parse_request, Request, Response};
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::Value;

const CASES: u32 = 2_000;
const MAX_VALUE: usize = 1 << 20;

fn config() -> Config {
    Config {
        cases: CASES,
        // Keep failures out of the source tree; a failure prints its minimal input.
        failure_persistence: None,
        ..Config::default()
    }
}

/// The key grammar of docs/PROTOCOL.md, written without looking at `nkv::key`: one or more
/// `.`-separated non-empty segments of ASCII letters, digits and `_ - + : @ #`, at most 200 bytes.
fn oracle_key(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 200
        && text.split('.').all(|segment| {
            !segment.is_empty()
                && segment.chars().all(|c| {
                    matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '-' | '+' | ':' | '@' | '#')
                })
        })
}

/// A key, `*`, or `<key>.*`.
fn oracle_target(text: &str) -> bool {
    text == "*" || text.strip_suffix(".*").map_or(oracle_key(text), oracle_key)
}

fn segment(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9_+:@#-]{{1,{max}}}")).expect("regex")
}

/// Strings built from the grammar (before the length rule, so some are too long).
fn grammar_key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(segment(12), 1..8),
        prop::collection::vec(segment(70), 1..5),
    ]
    .prop_map(|segments| segments.join("."))
}

/// Keys that satisfy the grammar, the length rule included.
fn valid_key() -> impl Strategy<Value = Key> {
    grammar_key().prop_map(|mut text| {
        text.truncate(200);
        // Truncation may leave a trailing '.'; drop it.
        while text.ends_with('.') {
            text.pop();
        }
        Key::parse(&text).expect("grammar key")
    })
}

/// Short strings over an alphabet of legal and near-legal characters.
fn near_miss() -> impl Strategy<Value = String> {
    let alphabet = vec![
        'a', 'Z', '0', '9', '_', '-', '+', ':', '@', '#', '.', '.', '.', '*', '/', '\\', ' ', '\0',
        '\t', '\n', '"', '%', '~', '$', '=', 'é', 'ÿ', '\u{200b}', '\u{ff0e}',
    ];
    prop::collection::vec(prop::sample::select(alphabet), 0..24).prop_map(String::from_iter)
}

/// A grammar key with one character inserted or replaced.
fn mutated_key() -> impl Strategy<Value = String> {
    (
        grammar_key(),
        any::<prop::sample::Index>(),
        any::<char>(),
        any::<bool>(),
    )
        .prop_map(|(key, at, ch, replace)| {
            let mut chars: Vec<char> = key.chars().collect();
            let i = at.index(chars.len() + 1);
            if replace && i < chars.len() {
                chars[i] = ch;
            } else {
                chars.insert(i, ch);
            }
            chars.into_iter().collect()
        })
}

fn any_key_text() -> impl Strategy<Value = String> {
    prop_oneof![
        grammar_key(),
        near_miss(),
        mutated_key(),
        any::<String>(),
        "[a-z]{195,205}",
        "(\\.|[a-z]){1,8}",
    ]
}

/// JSON values of every kind, nested a little.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // Short decimals: serde_json without `float_roundtrip` reads these back exactly.
        (any::<i32>(), 0..6i32).prop_map(|(m, e)| Value::from(f64::from(m) / 10f64.powi(e))),
        any::<String>().prop_map(Value::String),
        near_miss().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A request line as the server gets it: no `\n`, and a trailing `\r` already means `\r\n`.
fn as_line(bytes: &[u8]) -> Option<&[u8]> {
    (!bytes.contains(&b'\n')).then_some(bytes)
}

/// JSON that `nkv::Client` can read back: `serde_json::Value` accepts it, which is stricter than
/// the grammar (numbers within `f64`, no lone surrogate escapes, nesting at most 128 deep).
fn readable(text: &str) -> bool {
    serde_json::from_str::<Value>(text).is_ok()
}

/// Whatever `parse_request` returns, the line written for it is one line of readable JSON.
fn check_parse(bytes: &[u8]) {
    let mut out = Vec::new();
    match parse_request(bytes, MAX_VALUE) {
        Ok(envelope) => {
            if let Request::Put { value, .. } = &envelope.request {
                assert!(readable(value), "stored value is not JSON: {value:?}");
            }
            Response::Ok.write(envelope.id.as_deref(), &mut out);
        }
        Err(err) => {
            let (response, id) = err.into_response();
            response.write(id.as_deref(), &mut out);
        }
    }
    let text = String::from_utf8(out).expect("response is UTF-8");
    let body = text.strip_suffix('\n').expect("response ends with \\n");
    if as_line(bytes).is_some() {
        assert!(!body.contains('\n'), "more than one line: {text:?}");
    }
    assert!(readable(body), "response is not JSON: {body:?}");
}

fn request_line() -> impl Strategy<Value = Vec<u8>> {
    let verb = prop::sample::select(vec![
        "PUT", "put", "GET", "DEL", "DELETE", "KEYS", "SUB", "UNSUB", "HELLO", "TRACE", "STATS",
        "HEALTH", "QUIT", "HELP", "VERSION", "",
    ]);
    let op = || {
        prop::sample::select(vec![
            "put", "GET", "del", "keys", "sub", "unsub", "hello", "trace", "stats", "nope",
        ])
    };
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        (verb, any_key_text(), any::<String>())
            .prop_map(|(v, k, rest)| format!("{v} {k} {rest}").into_bytes()),
        (op(), any_key_text(), json_value(), json_value()).prop_map(|(op, key, value, id)| {
            serde_json::json!({"op": op, "key": key, "value": value, "id": id})
                .to_string()
                .into_bytes()
        }),
        (op(), any_key_text(), json_value()).prop_map(|(op, key, id)| {
            serde_json::json!({"op": op, "key": key, "id": id})
                .to_string()
                .into_bytes()
        }),
        (json_value(), any::<prop::sample::Index>()).prop_map(|(v, cut)| {
            // A JSON request cut short, which must still echo the id when it can.
            let text = serde_json::json!({"op": "put", "key": "a", "id": v}).to_string();
            text.as_bytes()[..cut.index(text.len() + 1)].to_vec()
        }),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn key_parse_agrees_with_the_grammar(text in any_key_text()) {
        let parsed = Key::parse(&text);
        prop_assert_eq!(parsed.is_ok(), oracle_key(&text), "Key::parse({:?}) = {:?}", text, parsed);
        if let Ok(key) = parsed {
            prop_assert_eq!(key.as_str(), text.as_str());
        }
    }

    #[test]
    fn target_parse_agrees_with_the_grammar(text in prop_oneof![
        any_key_text(),
        any_key_text().prop_map(|k| format!("{k}.*")),
        Just("*".to_owned()),
    ]) {
        let parsed = Target::parse(&text);
        prop_assert_eq!(parsed.is_ok(), oracle_target(&text), "Target::parse({:?}) = {:?}", text, parsed);
        if let Ok(target) = parsed {
            prop_assert_eq!(target.to_string(), text);
        }
    }

    #[test]
    fn grammar_keys_are_accepted(key in valid_key()) {
        prop_assert!(oracle_key(key.as_str()));
    }

    #[test]
    fn file_name_is_one_safe_component_and_round_trips(key in valid_key()) {
        let name = file_name(&key);
        prop_assert!(!name.is_empty() && name.len() <= 255, "{:?}: bad length", name);
        prop_assert!(!name.contains('/') && !name.contains('\0'), "{:?}: '/' or NUL", name);
        prop_assert!(name != "." && name != ".." && !name.starts_with('.'), "{:?}: dot name", name);
        let data_dir = Path::new("/var/lib/nkv/data");
        let path = data_dir.join(&name);
        prop_assert_eq!(path.parent(), Some(data_dir));
        prop_assert_eq!(
            path.components().next_back(),
            Some(Component::Normal(OsStr::new(&name)))
        );
        prop_assert_eq!(key_of(&name), Some(key));
    }

    #[test]
    fn key_of_ignores_dot_files(name in prop_oneof![
        any::<String>().prop_map(|s| format!(".{s}")),
        valid_key().prop_map(|k| format!(".{k}.json")),
        valid_key().prop_map(|k| format!(".{k}.tmp")),
        valid_key().prop_map(|k| format!(".{}", file_name(&k))),
        Just(".rev".to_owned()),
        Just(".lock".to_owned()),
        Just(".json".to_owned()),
        Just("..json".to_owned()),
    ]) {
        prop_assert_eq!(key_of(&name), None, "{:?}", name);
    }

    #[test]
    fn key_of_recognises_only_file_names(name in prop_oneof![
        any::<String>(),
        any_key_text().prop_map(|k| format!("{k}.json")),
        any_key_text(),
    ]) {
        if let Some(key) = key_of(&name) {
            prop_assert_eq!(file_name(&key), name);
        }
    }

    #[test]
    fn parse_request_never_panics(bytes in request_line()) {
        check_parse(&bytes);
    }

    #[test]
    fn text_put_of_json_stores_that_json(
        key in valid_key(),
        value in json_value(),
        pad in "[ \t]{0,2}",
        cr in any::<bool>(),
    ) {
        let line = format!("PUT {key} {pad}{value}{pad}{}", if cr { "\r" } else { "" });
        let envelope = parse_request(line.as_bytes(), MAX_VALUE).expect("valid PUT");
        let Request::Put { key: got_key, value: stored, .. } = envelope.request else {
            panic!("{line:?} is not a put");
        };
        prop_assert_eq!(got_key, key);
        let parsed: Value = serde_json::from_str(&stored).expect("stored value is JSON");
        prop_assert_eq!(parsed, value);
    }

    #[test]
    fn text_put_of_any_text_stores_json(key in valid_key(), text in prop_oneof![
        "[^\n\r\0]{0,40}",
        near_miss().prop_map(|s| s.replace(['\n', '\0'], "")),
        "[-+0-9eE.\"\\\\u\\[\\]{},: tfnrl]{0,12}",
    ]) {
        let line = format!("PUT {key} {text}");
        let envelope = parse_request(line.as_bytes(), MAX_VALUE).expect("valid PUT");
        let Request::Put { value: stored, .. } = envelope.request else {
            panic!("{line:?} is not a put");
        };
        prop_assert!(readable(&stored), "{:?} -> {:?}", text, stored);
        // JSON whitespace only: PROTOCOL.md stores the value as JSON "if it parses as JSON".
        let trimmed = text.trim_matches([' ', '\t']);
        if readable(trimmed) {
            prop_assert_eq!(stored.as_ref(), trimmed);
        } else {
            prop_assert_eq!(serde_json::from_str::<Value>(&stored).ok(), Some(Value::String(text)));
        }
    }

    #[test]
    fn json_put_stores_the_value(key in valid_key(), value in json_value(), id in json_value()) {
        let line = serde_json::json!({"op": "put", "key": key.as_str(), "value": value, "id": id})
            .to_string();
        let envelope = parse_request(line.as_bytes(), MAX_VALUE).expect("valid JSON put");
        let Request::Put { key: got_key, value: stored, .. } = envelope.request else {
            panic!("{line:?} is not a put");
        };
        prop_assert_eq!(got_key, key);
        prop_assert_eq!(serde_json::from_str::<Value>(&stored).ok(), Some(value));
        let echoed = envelope.id.expect("id");
        prop_assert_eq!(serde_json::from_str::<Value>(&echoed).ok(), Some(id));
    }
}

/// Values that serde_json's grammar accepts but `serde_json::Value` does not (numbers beyond
/// `f64`, lone UTF-16 surrogate escapes, deep nesting) are stored as text (text form) or refused
/// (JSON form), so `nkv::Client` can read back every value, one key or a pattern.
#[test]
fn accepted_values_parse_with_serde_json_value() {
    let server = crate::support::Server::start();
    let mut raw = server.raw();
    let mut client = server.client();
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let mut failures = Vec::new();
    for (i, value) in ["1e400", "-1E+999", "\"\\ud800\"", "[\"\\udc00x\"]", &deep]
        .into_iter()
        .enumerate()
    {
        let key = format!("odd.k{i}");
        for line in [
            format!("PUT {key} {value}"),
            format!(r#"{{"op":"put","key":"{key}","value":{value}}}"#),
        ] {
            if raw.request(&line)["ok"] == true {
                if let Err(err) = client.get(&key) {
                    failures.push(format!("{line} accepted, then get: {err}"));
                }
            }
        }
    }
    if let Err(err) = client.get_matching("*") {
        failures.push(format!("get_matching(\"*\"): {err}"));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// PROTOCOL.md: the value is stored as JSON "if it parses as JSON". `\u{a0}42` does not (JSON
/// whitespace is space, tab, CR and LF), so it is stored as a string.
#[test]
fn text_put_json_test_uses_json_whitespace() {
    for text in ["\u{a0}42", "42\u{2003}", "\u{3000}{}"] {
        let line = format!("PUT a {text}");
        let envelope = parse_request(line.as_bytes(), MAX_VALUE).expect("valid PUT");
        let Request::Put { value, .. } = envelope.request else {
            panic!("{line:?} is not a put");
        };
        assert_eq!(
            serde_json::from_str::<Value>(&value).ok(),
            Some(Value::String(text.to_owned())),
            "{line:?} stored {value:?}"
        );
    }
}

/// A well-formed request's `id` must be readable JSON (else `bad_request`), but when the request
/// fails to deserialise the `id` is still echoed verbatim: `{"op":1,"id":1e400}` is answered with
/// `…,"id":1e400}`, a response line `serde_json::Value` (and so `nkv::Client`) cannot parse.
#[test]
fn error_responses_echo_only_readable_ids() {
    let mut unreadable = Vec::new();
    for line in [
        r#"{"op":1,"id":1e400}"#,
        r#"{"op":"get","bogus":1,"id":"\ud800"}"#,
        r#"{"op":"put","key":"a","id":-1E999"#,
    ] {
        let err = parse_request(line.as_bytes(), MAX_VALUE).expect_err("a bad request");
        let (response, id) = err.into_response();
        let mut out = Vec::new();
        response.write(id.as_deref(), &mut out);
        let text = String::from_utf8(out).expect("UTF-8");
        if !readable(text.trim_end()) {
            unreadable.push(format!("{line} -> {}", text.trim_end()));
        }
    }
    assert!(unreadable.is_empty(), "{unreadable:#?}");
}

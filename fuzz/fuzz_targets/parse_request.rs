//! Arbitrary bytes as one request line: parsing never panics, a stored value is one JSON text,
//! and every line written from the result (error response, GET response, event) is one line of
//! JSON.
//!
//! "Valid JSON" means what `nkv::Client` can read: `serde_json::Value` accepts it (stricter than
//! the RFC 8259 grammar: numbers within `f64`, no lone surrogate escapes, nesting ≤ 128).

#![no_main]

use libfuzzer_sys::fuzz_target;
use nkv::key::Key;
use nkv::protocol::{parse_request, Event, EventKind, Request, Response};

const MAX_VALUE: usize = 1 << 20;

fn is_json(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text).is_ok()
}

/// `out` is one `\n`-terminated line (when `single` holds) of valid JSON.
fn check_line(out: &[u8], single: bool, what: &str) {
    let text = std::str::from_utf8(out).unwrap_or_else(|e| panic!("{what}: not UTF-8: {e}"));
    let body = text
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("{what}: no final newline: {text:?}"));
    if single {
        assert!(!body.contains('\n'), "{what}: more than one line: {text:?}");
    }
    assert!(is_json(body), "{what}: not JSON: {body:?}");
}

fuzz_target!(|data: &[u8]| {
    // The server's line reader never hands over a '\n'; only such inputs must give one line.
    let single = !data.contains(&b'\n');
    match parse_request(data, MAX_VALUE) {
        Ok(envelope) => {
            let id = envelope.id.as_deref();
            if let Request::Put { key, value } = &envelope.request {
                assert!(is_json(value), "stored value is not JSON: {value:?}");
                assert!(value.len() <= MAX_VALUE, "value over the limit");
                assert!(
                    Key::parse(key.as_str()).is_ok(),
                    "key {key:?} does not re-parse"
                );
                let mut out = Vec::new();
                Response::Value {
                    key: key.clone(),
                    value: value.clone(),
                    rev: 1,
                }
                .write(id, &mut out);
                check_line(&out, single, "GET response");
                let mut out = Vec::new();
                Event {
                    kind: EventKind::Put,
                    key: key.clone(),
                    value: Some(value.clone()),
                    rev: 1,
                }
                .write(&mut out);
                check_line(&out, single, "put event");
            }
            let mut out = Vec::new();
            Response::Ok.write(id, &mut out);
            check_line(&out, single, "ok response");
        }
        Err(err) => {
            let (response, id) = err.into_response();
            let mut out = Vec::new();
            response.write(id.as_deref(), &mut out);
            check_line(&out, single, "error response");
        }
    }
});

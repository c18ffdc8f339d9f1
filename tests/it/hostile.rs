//! Hostile clients over raw sockets: every malformed request gets its documented error code on
//! a connection that stays usable, over-long lines are refused without being buffered, clients
//! that vanish or never read hurt no one, and nothing is written outside the data directory.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{proc_status, wait_until, Raw, Server};

/// How long one response may take before the test calls it a hang (shorter than the harness's
/// `DEADLINE`: the corpus goes on after a hang, to list every mismatch at once).
const ANSWER: Duration = Duration::from_secs(10);

/// Reads what is left on `stream` until the server closes it (end of stream, or a reset when
/// the server closed with our unread bytes in its queue).
fn read_to_close(stream: &mut UnixStream) -> Vec<u8> {
    stream.set_read_timeout(Some(ANSWER)).expect("timeout");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return out,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("expected the server to close the connection, got {e}"),
        }
    }
}

fn names_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("list dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// Keys that break the key rules and can be written in the text form.
fn hostile_text_keys() -> Vec<String> {
    let mut keys: Vec<String> = [
        "../x",
        "/etc/passwd",
        "a/b",
        "a..b",
        ".a",
        "a.",
        ".",
        "..",
        "..json",
        "é",
        "ключ.a",
        "a.ü",
        "🔑",
        "a\\b",
        "a\tb",
        "~root",
        "$HOME",
        "a;b",
        "a\"b",
        "a%2fb",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    keys.push("k".repeat(201));
    keys.push(format!("{}.b", "a".repeat(199)));
    keys.push("k".repeat(300));
    keys
}

/// Keys that only the JSON form can carry.
fn hostile_json_keys() -> Vec<&'static str> {
    vec!["", "a b", " a", "a ", "a\nb", "a\u{0}b", "a\rb", "a.\u{7f}"]
}

fn json_line(v: Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

/// Every hostile line (without `\n`) with the error code it must get.
fn corpus() -> Vec<(Vec<u8>, &'static str)> {
    let mut cases: Vec<(Vec<u8>, &'static str)> = Vec::new();
    let mut bad = |line: &[u8]| cases.push((line.to_vec(), "bad_request"));
    // Invalid UTF-8 and NUL bytes.
    for line in [
        &b"GET \xff"[..],
        b"\xff\xfe",
        b"PUT a \xc3\x28",
        b"PUT a \xed\xa0\x80",
        b"GET \xc0\xaf",
        b"GET a\0",
        b"\0",
        b"PUT a \"x\0\"",
        b"{\"op\":\"health\"}\0",
    ] {
        bad(line);
    }
    // Empty and blank lines (`\r` alone is an empty `\r\n` line).
    for line in ["", " ", "   ", "\r", " \r", "\t"] {
        bad(line.as_bytes());
    }
    // Unknown verbs.
    for line in [
        "FOO",
        "GETT a",
        "G a",
        "PUTS a 1",
        "*",
        "[1]",
        "\"GET\" a",
        "123",
        " GET a",
        "GET\ta",
        "SELECT * FROM kv",
    ] {
        bad(line.as_bytes());
    }
    // Missing arguments.
    for line in [
        "GET", "PUT", "PUT a", "DEL", "DELETE", "SUB", "UNSUB", "TRACE", "HELLO",
    ] {
        bad(line.as_bytes());
    }
    // Trailing garbage.
    for line in [
        "GET a b",
        "HEALTH x",
        "STATS x",
        "VERSION 1",
        "HELP me",
        "QUIT now",
        "DEL a b",
        "KEYS a.* b",
        "TRACE a b",
        "SUB a b",
        "HELLO a b",
        "HELLO a/b",
    ] {
        bad(line.as_bytes());
    }
    // Broken JSON.
    for line in [
        "{",
        "{\"op\"",
        "{\"op\":\"get\"",
        "{\"op\":}",
        "{op:\"get\"}",
        "{'op':'health'}",
        "{\"op\":\"get\",\"key\":\"a\"}}",
        "{\"op\":\"get\",\"key\":\"a\",}",
        "{\"op\":\"health\"} x",
        "{\"op\":\"put\",\"key\":\"a\",\"value\":tru}",
        "{\"op\":\"put\",\"key\":\"a\",\"value\":01}",
        "{\"op\":\"put\",\"key\":\"a\",\"value\":\"unterminated}",
        "{\"op\":\"health\",\"op\":\"health\"}",
    ] {
        bad(line.as_bytes());
    }
    // Deeply nested JSON: 100k `[`, in the value, the id and the op.
    let open = "[".repeat(100_000);
    bad(format!("{{\"op\":\"put\",\"key\":\"deep\",\"value\":{open}").as_bytes());
    bad(format!("{{\"op\":\"health\",\"id\":{open}").as_bytes());
    bad(format!("{{\"op\":{open}").as_bytes());
    // Wrong JSON types, missing or misplaced fields, unknown fields and ops.
    for v in [
        json!({"op": "get", "key": 5}),
        json!({"op": 1}),
        json!({"op": null}),
        json!({"op": ["get"]}),
        json!({"op": {"x": 1}}),
        json!({"op": true}),
        json!({"op": "get", "key": ["a"]}),
        json!({"op": "get", "key": {"k": "a"}}),
        json!({"op": "hello", "name": 7}),
        json!({}),
        json!({"key": "a"}),
        json!({"op": "get", "key": "a", "extra": 1}),
        json!({"op": "health", "x": null}),
        json!({"op": "put", "key": "a", "value": 1, "ttl": 5}),
        json!({"OP": "health"}),
        json!({"op": "health", "Id": 1}),
        json!({"op": "health", "key": "a"}),
        json!({"op": "get", "key": "a", "value": 1}),
        json!({"op": "put", "key": "a"}),
        json!({"op": "get"}),
        json!({"op": "hello"}),
        json!({"op": "get", "key": "a", "name": "x"}),
        json!({"op": "frobnicate"}),
        json!({"op": ""}),
    ] {
        bad(&json_line(v));
    }

    let mut invalid = |line: Vec<u8>| cases.push((line, "invalid_key"));
    // Hostile keys, text form, with every verb that takes a key.
    for key in hostile_text_keys() {
        for verb in ["GET", "DEL", "KEYS", "SUB", "UNSUB", "TRACE"] {
            invalid(format!("{verb} {key}").into_bytes());
        }
        invalid(format!("PUT {key} 1").into_bytes());
    }
    // The empty key, text form.
    invalid(b"GET ".to_vec());
    invalid(b"PUT  1".to_vec());
    // Hostile keys, JSON form.
    let mut json_keys: Vec<String> = hostile_text_keys();
    json_keys.extend(hostile_json_keys().iter().map(|s| s.to_string()));
    for key in &json_keys {
        for op in ["get", "del", "keys", "sub", "unsub", "trace"] {
            invalid(json_line(json!({"op": op, "key": key})));
        }
        invalid(json_line(json!({"op": "put", "key": key, "value": 1})));
    }
    // `*` where it is not allowed.
    for line in [
        "PUT a.* 1",
        "PUT * 1",
        "PUT a* 1",
        "TRACE *",
        "TRACE a.*",
        "GET *.a",
        "GET a*",
        "GET a.*.b",
        "GET **",
        "GET a.**",
        "GET .*",
        "GET *.*",
        "DEL *a",
        "SUB a.b*",
        "KEYS *.*",
        "UNSUB a.*.*",
    ] {
        invalid(line.as_bytes().to_vec());
    }
    for v in [
        json!({"op": "put", "key": "a.*", "value": 1}),
        json!({"op": "put", "key": "*", "value": 1}),
        json!({"op": "trace", "key": "*"}),
        json!({"op": "get", "key": "a*"}),
    ] {
        invalid(json_line(v));
    }
    cases
}

fn show(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    if text.chars().count() > 60 {
        format!(
            "{:?}... ({} bytes)",
            text.chars().take(60).collect::<String>(),
            line.len()
        )
    } else {
        format!("{text:?}")
    }
}

/// Runs the whole corpus on one connection (reconnecting only if a case broke it) and returns
/// every mismatch.
fn run_corpus(server: &Server) -> Vec<String> {
    let mut failures = Vec::new();
    let mut conn = corpus_conn(server);
    for (line, code) in corpus() {
        let what = show(&line);
        match conn.try_request(&line) {
            Ok(v) => {
                let message_ok = v["message"].as_str().is_some_and(|m| !m.is_empty());
                if v["ok"] != false || v["error"] != code || !message_ok {
                    let got = show(v.to_string().as_bytes());
                    failures.push(format!("{what}: expected {code}, got {got}"));
                }
            }
            Err(e) => {
                let got = show(e.as_bytes());
                failures.push(format!("{what}: expected {code}, got {got}"));
            }
        }
        if !conn.healthy() {
            failures.push(format!("{what}: connection unusable afterwards"));
            conn = corpus_conn(server);
        }
    }
    failures
}

/// A connection for the corpus, whose reads give up after `ANSWER`.
fn corpus_conn(server: &Server) -> Raw {
    let conn = server.raw();
    conn.set_read_timeout(ANSWER);
    conn
}

#[test]
fn malformed_requests_get_their_error_code_and_the_connection_stays_usable() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("srv");
    std::fs::create_dir(&dir).expect("server dir");
    let mut server = Server::new_in(&dir, &[]);
    server.spawn_and_wait();

    let failures = run_corpus(&server);
    assert!(
        failures.is_empty(),
        "{} hostile requests were mishandled:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Keys at the limits are fine, and a text value that is not JSON is stored as a string.
    let mut conn = server.raw();
    let longest = "k".repeat(200);
    let put = conn.request(&format!("PUT {longest} 1"));
    assert_eq!(put["ok"], true, "200-byte key: {put}");
    let open = "[".repeat(100_000);
    let put = conn.request(&format!("PUT deep {open}"));
    assert_eq!(put["ok"], true, "text PUT of unparsable nesting: {put}");
    let got = conn.request("GET deep");
    assert_eq!(got["value"], Value::String(open), "stored as a string");

    // Nothing but the two keys was stored, and nothing was written outside the data dir.
    let keys = conn.request("KEYS");
    assert_eq!(keys, json!({"ok": true, "keys": ["deep", longest]}));
    assert!(conn.healthy());
    assert!(
        !server.log_text().contains("panicked"),
        "a connection thread panicked:\n{}",
        server.log_text()
    );
    let expected: BTreeSet<String> = ["deep.json".to_string(), format!("{longest}.json")].into();
    let data = names_in(&server.data);
    let (hidden, visible): (BTreeSet<String>, BTreeSet<String>) =
        data.into_iter().partition(|n| n.starts_with('.'));
    assert_eq!(visible, expected, "key files in the data dir");
    assert!(
        hidden
            .iter()
            .all(|n| [".rev", ".reserve", ".tombstone-log", ".epoch"].contains(&n.as_str())),
        "unexpected bookkeeping files: {hidden:?}"
    );
    assert_eq!(names_in(tmp.path()), BTreeSet::from(["srv".to_string()]));
    assert_eq!(
        names_in(&dir),
        ["data", "nkv.sock", "server.log"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    assert!(!Path::new("/etc/passwd.json").exists());
    server.stop();
}

/// serde_json caps nesting at 128 levels when it builds values, but a `RawValue` field skips
/// nested input without that cap: a JSON-form PUT (or `id`) nested 100k deep is accepted and
/// echoed, and then no client can parse the response (nkv's own `Client`, Python's `json`, jq
/// all fail). The text form of the same PUT stores a string instead.
#[test]
fn deeply_nested_json_values_and_ids_are_rejected() {
    let server = Server::start();
    let mut conn = server.raw();
    let closed = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    for line in [
        format!("{{\"op\":\"put\",\"key\":\"deep\",\"value\":{closed}}}"),
        format!("{{\"op\":\"health\",\"id\":{closed}}}"),
        format!("{{\"op\":\"put\",\"key\":\"deep\",\"value\":{{\"a\":{closed}}}}}"),
    ] {
        let v = conn.try_request(&line);
        assert!(
            matches!(&v, Ok(v) if v["error"] == "bad_request"),
            "{}: {}",
            show(line.as_bytes()),
            show(format!("{v:?}").as_bytes())
        );
        assert!(conn.healthy());
    }
    assert_eq!(conn.request("KEYS"), json!({"ok": true, "keys": []}));
}

#[test]
fn json_errors_echo_the_request_id() {
    let server = Server::start();
    let mut conn = server.raw();
    for (line, code, id) in [
        (
            json!({"op": "get", "key": "a", "bogus": 1, "id": 9}),
            "bad_request",
            json!(9),
        ),
        (
            json!({"op": "get", "key": "../x", "id": "q"}),
            "invalid_key",
            json!("q"),
        ),
        (
            json!({"op": "nope", "id": [1, 2]}),
            "bad_request",
            json!([1, 2]),
        ),
        (
            json!({"op": "get", "key": "missing", "id": null}),
            "not_found",
            Value::Null,
        ),
    ] {
        let text = line.to_string();
        conn.send(&text);
        let response = conn.line().expect("a response");
        let v: Value = serde_json::from_str(&response).unwrap();
        assert_eq!(v["error"], code, "{text} -> {response}");
        assert_eq!(v["id"], id, "{text} -> {response}");
        assert!(
            response.trim_end().ends_with(&format!(",\"id\":{id}}}")),
            "id is the last field: {response}"
        );
        assert!(conn.healthy());
    }
}

#[test]
fn oversized_values_are_refused_and_the_connection_stays_usable() {
    let server = Server::start_with(&["--max-value-bytes", "1000"]);
    let mut conn = server.raw();
    let fits = format!("\"{}\"", "x".repeat(998));
    let over = format!("\"{}\"", "x".repeat(999));
    assert_eq!(conn.request(&format!("PUT fits {fits}"))["ok"], true);
    let v = conn.request(&format!("PUT over {over}"));
    assert_eq!(v["error"], "too_large", "{v}");
    assert!(conn.healthy());
    let v = conn.request(
        &json!({"op": "put", "key": "over", "value": "x".repeat(999), "id": 1}).to_string(),
    );
    assert_eq!(
        (&v["error"], &v["id"]),
        (&json!("too_large"), &json!(1)),
        "{v}"
    );
    assert!(conn.healthy());
    // The longest acceptable line (value limit + 64 KiB) is read whole and answered.
    let max_line = 1000 + 64 * 1024;
    let line = format!("PUT over \"{}\"", "y".repeat(max_line - 11));
    assert_eq!(line.len(), max_line);
    let v = conn.request(&line);
    assert_eq!(v["error"], "too_large", "{v}");
    assert!(conn.healthy(), "a line at the limit keeps the connection");
    assert_eq!(
        conn.request("GET over")["error"],
        "not_found",
        "nothing stored"
    );
    // One byte more and the connection is closed after the error.
    let line = format!("PUT over \"{}\"\n", "y".repeat(max_line - 10));
    let mut stream = conn.reader.into_inner();
    stream.write_all(line.as_bytes()).unwrap();
    let rest = read_to_close(&mut stream);
    let text = String::from_utf8(rest).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one error line, then closed: {text:?}");
    let v: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["error"], "too_large", "{v}");
    assert!(server.raw().healthy());
}

#[test]
fn an_endless_line_is_refused_without_buffering_it() {
    const SENT: usize = 10 << 20;
    let server = Server::start_with(&["--max-value-bytes", "1000"]);
    let pid = server.pid();
    assert!(server.raw().healthy());
    let rss_before = proc_status(pid, "VmRSS");

    let mut stream = UnixStream::connect(&server.socket).unwrap();
    let mut writer = stream.try_clone().unwrap();
    // The server stops reading after the limit, so this write fails once it closes.
    let sender = thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while sent < SENT {
            if writer.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let answer = read_to_close(&mut stream);
    let sent = sender.join().unwrap();
    let text = String::from_utf8(answer).unwrap();
    let v: Value =
        serde_json::from_str(text.trim_end()).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert_eq!(v["error"], "too_large", "{v}");
    assert!(
        sent < SENT,
        "the server read all {sent} bytes of an over-long line instead of closing"
    );
    let peak = proc_status(pid, "VmHWM");
    let grown = peak.saturating_sub(rss_before);
    eprintln!("endless line: server peak RSS {peak} KiB, {grown} KiB above the idle RSS");
    assert!(
        grown < 4 * 1024,
        "the server's peak RSS grew by {grown} KiB for a {SENT}-byte line"
    );
    assert!(server.raw().healthy());
}

#[test]
fn clients_that_vanish_mid_request_do_not_hurt_the_server() {
    let server = Server::start();
    let mut conn = server.raw();
    assert_eq!(conn.request("PUT k 1")["rev"], 1);
    // A partial line, then gone.
    for partial in [
        &b"PUT k"[..],
        b"{\"op\":\"put\",\"key\":\"k\",\"val",
        b"GET \xff",
        b"PUT k 2\nPUT k 3\nGET",
    ] {
        let mut s = UnixStream::connect(&server.socket).unwrap();
        s.write_all(partial).unwrap();
        drop(s);
    }
    // Many requests pipelined, then gone without reading a single response.
    let mut s = UnixStream::connect(&server.socket).unwrap();
    let mut burst = Vec::new();
    for i in 0..5000 {
        burst.extend_from_slice(format!("GET k\nPUT v.{} {i}\n", i % 10).as_bytes());
    }
    s.write_all(&burst).unwrap();
    drop(s);
    // A subscriber that vanishes.
    let mut s = UnixStream::connect(&server.socket).unwrap();
    s.write_all(b"SUB k\nSUB v\n").unwrap();
    drop(s);

    // Accepting may lag behind the connects: wait for the end state, not for a moment of it.
    wait_until("the vanished connections to be closed", || {
        let stats = conn.request("STATS");
        stats["connections"] == 1 && stats["subscribers"] == 0
    });
    assert!(conn.healthy());
    assert!(
        !server.log_text().contains("panicked"),
        "{}",
        server.log_text()
    );
}

#[test]
fn a_client_that_never_reads_does_not_block_others() {
    let server = Server::start();
    let mut conn = server.raw();
    let value = json!("v".repeat(1000));
    assert_eq!(conn.request(&format!("PUT k {value}"))["ok"], true);
    let mut sub = server.raw();
    assert_eq!(sub.request("SUB k"), json!({"ok": true}));
    assert_eq!(sub.json()["event"], "init");
    assert_eq!(sub.json()["event"], "ready");

    // Pipeline GETs without reading until the socket is full both ways: the server's
    // connection thread is then stuck writing responses nobody reads.
    let flood = UnixStream::connect(&server.socket).unwrap();
    flood.set_nonblocking(true).unwrap();
    let requests = b"GET k\n".repeat(1000);
    let mut sent = 0usize;
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match (&flood).write(&requests) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("flood: {e}"),
        }
        assert!(Instant::now() < end, "the flood never filled the socket");
    }
    assert!(sent > 0);

    // Everyone else is served promptly.
    let started = Instant::now();
    let mut other = server.raw();
    assert_eq!(other.request("GET k")["value"], value);
    let put = other.request("PUT k 2");
    assert_eq!(put["ok"], true, "{put}");
    assert!(other.healthy());
    let event = sub.json();
    assert_eq!(event["event"], "put", "{event}");
    assert_eq!(event["value"], 2, "{event}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "other clients waited {took:?} behind a client that does not read"
    );
    drop(flood);
    assert!(conn.healthy());
}

/// Responses to pipelined requests are batched until the server has parsed everything it has
/// read; with large values that batch has no bound: 16 KiB of `GET big` lines for a 64 KiB value
/// make the server hold 128 MiB (and a 16 MiB value would make it 32 GiB) for one connection,
/// whether or not the client reads.
#[test]
fn pipelined_requests_do_not_buffer_responses_without_bound() {
    const REQUESTS: usize = 2048;
    let server = Server::start();
    let pid = server.pid();
    let mut conn = server.raw();
    let value = json!("b".repeat(64 * 1024 - 2));
    assert_eq!(conn.request(&format!("PUT big {value}"))["ok"], true);
    let rss_before = proc_status(pid, "VmRSS");

    let stream = UnixStream::connect(&server.socket).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || writer.write_all(&b"GET big\n".repeat(REQUESTS)));
    stream.set_read_timeout(Some(ANSWER)).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    for i in 0..REQUESTS {
        line.clear();
        reader.read_until(b'\n', &mut line).unwrap();
        assert!(
            line.starts_with(b"{\"ok\":true,\"key\":\"big\""),
            "response {i}"
        );
    }
    sender.join().unwrap().unwrap();
    let grown = proc_status(pid, "VmHWM").saturating_sub(rss_before);
    assert!(
        grown < 16 * 1024,
        "the server's peak RSS grew by {grown} KiB serving {REQUESTS} pipelined GETs of a 64 KiB value"
    );
}

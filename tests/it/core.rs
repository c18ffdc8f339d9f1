//! The core issue: every command and error code over raw socket lines and socat, the line
//! rules, concurrency, persistence across restarts, hostile keys, and the Rust client.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use serde::Serialize;
use serde_json::{json, Value};

use crate::support::{parse, Server};

/// The response lines of a socat session.
fn lines(out: &str) -> Vec<&str> {
    assert!(
        out.ends_with('\n'),
        "output must end with a newline: {out:?}"
    );
    out.lines().collect()
}

/// Asserts `response` is an error with `code`, and returns its message.
#[track_caller]
fn expect_error(response: &Value, code: &str) -> String {
    assert_eq!(response["ok"], false, "expected an error: {response}");
    assert_eq!(response["error"], code, "wrong code: {response}");
    let message = response["message"].as_str().expect("a message");
    assert!(!message.is_empty(), "empty message: {response}");
    message.to_owned()
}

/// The contents of a key's file, parsed.
fn key_file(server: &Server, key: &str) -> Value {
    let path = server.data.join(format!("{key}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    parse(&text)
}

/// Every path under `root` (relative, not following symlinks).
fn tree(root: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let entry = entry.expect("dir entry");
            let path = entry.path();
            out.insert(path.strip_prefix(root).expect("under root").to_owned());
            if entry.file_type().expect("file type").is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

#[test]
fn smoke_put_get_over_every_interface() {
    let server = Server::start();
    let mut client = server.client();
    assert_eq!(client.put("a.b", &json!({"x": 1})).unwrap(), 1);
    assert_eq!(client.get("a.b").unwrap(), Some(json!({"x": 1})));
    let out = server.socat("GET a.b\n");
    assert_eq!(
        out,
        "{\"ok\":true,\"key\":\"a.b\",\"value\":{\"x\":1},\"rev\":1,\"class\":\"persistent\"}\n"
    );
    let out = server.cli(&["get", "a.b"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "{\"x\":1}\n");
    let mut raw = server.raw();
    assert_eq!(raw.request("GET a.b")["rev"], 1);
}

#[test]
fn put_text_form_stores_json_strings_and_quoted_strings() {
    let server = Server::start();
    let mut raw = server.raw();
    // (request value text, what GET returns as the value's JSON text)
    let cases = [
        ("n", "42", "42"),
        ("f", "-1.50", "-1.50"),
        ("t", "true", "true"),
        ("z", "null", "null"),
        ("o", r#"{"b":1, "a":[1,"x"]}"#, r#"{"b":1, "a":[1,"x"]}"#),
        ("arr", "[1,2,3]", "[1,2,3]"),
        ("q", r#""text""#, r#""text""#),
        ("q2", r#""with \"quotes\"""#, r#""with \"quotes\"""#),
        ("s", "hello world", r#""hello world""#),
        ("s2", "{not json", r#""{not json""#),
        ("s3", r#"say "hi""#, r#""say \"hi\"""#),
        ("lead", "  two spaces", r#""  two spaces""#),
        ("dev:1.temp@room#2", "21.5", "21.5"),
    ];
    for (i, (key, value, _)) in cases.iter().enumerate() {
        let line = format!("PUT {key} {value}");
        assert_eq!(
            raw.request(&line),
            json!({"ok": true, "rev": i + 1}),
            "{line}"
        );
    }
    for (i, (key, _, stored)) in cases.iter().enumerate() {
        raw.send(&format!("GET {key}"));
        let line = raw.line().expect("response");
        let expected = format!(
            "{{\"ok\":true,\"key\":\"{key}\",\"value\":{stored},\"rev\":{},\"class\":\"persistent\"}}",
            i + 1
        );
        assert_eq!(line, expected);
        // The file is `<key>.json` holding `{"rev":N,"value":...}`.
        let record = key_file(&server, key);
        assert_eq!(
            record,
            json!({"rev": i + 1, "value": parse(stored)}),
            "{key}"
        );
    }
    // The verb is case-insensitive; overwriting takes the next revision.
    assert_eq!(raw.request("put n 43"), json!({"ok": true, "rev": 14}));
    assert_eq!(
        raw.request("Get n"),
        json!({"ok": true, "key": "n", "value": 43, "rev": 14, "class": "persistent"})
    );
    assert_eq!(key_file(&server, "n"), json!({"rev": 14, "value": 43}));
    // The same over socat.
    let out = server.socat("PUT sc {\"on\":true}\nGET sc\n");
    assert_eq!(
        out,
        "{\"ok\":true,\"rev\":15}\n{\"ok\":true,\"key\":\"sc\",\"value\":{\"on\":true},\"rev\":15,\"class\":\"persistent\"}\n"
    );
}

#[test]
fn get_patterns_are_sorted_and_strictly_below_the_prefix() {
    let server = Server::start();
    let setup =
        "PUT a.c.d 3\nPUT a 0\nPUT ab.x 9\nPUT a.b 2\nPUT b 7\nPUT a.a \"s\"\nPUT a_b.c 1\n";
    assert_eq!(lines(&server.socat(setup)).len(), 7);
    let out = server.socat("GET a.*\nGET *\nGET a.c.*\nGET zz.*\nGET a\n");
    assert_eq!(
        lines(&out),
        [
            r#"{"ok":true,"values":{"a.a":"s","a.b":2,"a.c.d":3}}"#,
            r#"{"ok":true,"values":{"a":0,"a.a":"s","a.b":2,"a.c.d":3,"a_b.c":1,"ab.x":9,"b":7}}"#,
            r#"{"ok":true,"values":{"a.c.d":3}}"#,
            r#"{"ok":true,"values":{}}"#,
            r#"{"ok":true,"key":"a","value":0,"rev":2,"class":"persistent"}"#,
        ]
    );
    // Patterns with `*` anywhere but the whole last segment are invalid keys.
    let mut raw = server.raw();
    for bad in [
        "GET a*",
        "GET *.a",
        "GET a.*.b",
        "GET a.b*",
        "GET **",
        "PUT a.* 1",
    ] {
        expect_error(&raw.request(bad), "invalid_key");
    }
}

#[test]
fn del_key_returns_its_rev_and_del_pattern_its_count() {
    let server = Server::start();
    let mut raw = server.raw();
    for (i, key) in ["a", "a.b", "a.c.d", "ab.x", "b", "c"].iter().enumerate() {
        assert_eq!(raw.request(&format!("PUT {key} {i}"))["rev"], i + 1);
    }
    // A delete takes the next revision.
    assert_eq!(raw.request("DEL b"), json!({"ok": true, "rev": 7}));
    expect_error(&raw.request("GET b"), "not_found");
    expect_error(&raw.request("DEL b"), "not_found");
    assert!(!server.data.join("b.json").exists(), "b's file removed");
    // DELETE is accepted too, in any case.
    assert_eq!(raw.request("delete c"), json!({"ok": true, "rev": 8}));
    // A pattern delete: only keys strictly below `a`.
    assert_eq!(raw.request("DEL a.*"), json!({"ok": true, "deleted": 2}));
    assert_eq!(
        raw.request("KEYS"),
        json!({"ok": true, "keys": ["a", "ab.x"]})
    );
    assert!(!server.data.join("a.b.json").exists());
    assert!(!server.data.join("a.c.d.json").exists());
    assert!(server.data.join("a.json").exists());
    // Nothing matching is not an error.
    assert_eq!(raw.request("DEL zz.*"), json!({"ok": true, "deleted": 0}));
    // Every delete of a pattern took its own revision: the next put is after them all.
    assert_eq!(raw.request("PUT n 1"), json!({"ok": true, "rev": 11}));
    let out = server.socat("DEL *\nKEYS\nDEL *\n");
    assert_eq!(
        lines(&out),
        [
            r#"{"ok":true,"deleted":3}"#,
            r#"{"ok":true,"keys":[]}"#,
            r#"{"ok":true,"deleted":0}"#
        ]
    );
}

#[test]
fn keys_with_and_without_pattern() {
    let server = Server::start();
    let mut raw = server.raw();
    assert_eq!(raw.request("KEYS"), json!({"ok": true, "keys": []}));
    for key in ["z", "a.b.c", "a", "ab.x", "a.b", "M.x", "0"] {
        assert_eq!(raw.request(&format!("PUT {key} 1"))["ok"], true);
    }
    let out = server.socat("KEYS\nKEYS *\nKEYS a.*\nKEYS a.b.*\nKEYS q.*\n");
    assert_eq!(
        lines(&out),
        [
            r#"{"ok":true,"keys":["0","M.x","a","a.b","a.b.c","ab.x","z"]}"#,
            r#"{"ok":true,"keys":["0","M.x","a","a.b","a.b.c","ab.x","z"]}"#,
            r#"{"ok":true,"keys":["a.b","a.b.c"]}"#,
            r#"{"ok":true,"keys":["a.b.c"]}"#,
            r#"{"ok":true,"keys":[]}"#,
        ]
    );
    expect_error(&raw.request("KEYS a..*"), "invalid_key");
    expect_error(&raw.request("KEYS a.* b"), "bad_request");
}

#[test]
fn health_version_help_and_quit() {
    let server = Server::start();
    let out = server.socat("HEALTH\nVERSION\nHELP\nhealth\n");
    let got = lines(&out);
    assert_eq!(got[0], r#"{"ok":true,"status":"ok"}"#);
    assert_eq!(
        got[1],
        format!(r#"{{"ok":true,"version":"{}"}}"#, env!("CARGO_PKG_VERSION"))
    );
    let help = parse(got[2]);
    assert_eq!(help["ok"], true);
    let text = help["help"].as_str().expect("help text");
    for verb in [
        "PUT", "GET", "DEL", "KEYS", "SUB", "HEALTH", "VERSION", "QUIT",
    ] {
        assert!(text.contains(verb), "HELP mentions {verb}: {text}");
    }
    assert_eq!(got[3], got[0]);

    // QUIT answers and closes, even with more requests behind it.
    let mut raw = server.raw();
    raw.send_bytes(b"HEALTH\nQUIT\nGET a\n");
    assert_eq!(
        raw.lines_until_closed(),
        [r#"{"ok":true,"status":"ok"}"#, r#"{"ok":true}"#]
    );
    // The JSON form too, echoing the id.
    let mut raw = server.raw();
    raw.send(r#"{"op":"quit","id":9}"#);
    assert_eq!(raw.lines_until_closed(), [r#"{"ok":true,"id":9}"#]);
    // Over socat the session ends at QUIT.
    assert_eq!(
        server.socat("QUIT\nPUT after 1\n"),
        "{\"ok\":true}\n",
        "nothing after QUIT is run"
    );
    expect_error(&server.raw().request("GET after"), "not_found");
}

#[test]
fn json_form_echoes_the_id_on_success_and_on_error() {
    let server = Server::start();
    let mut raw = server.raw();
    let mut check = |request: &str, expected: &str| {
        raw.send(request);
        assert_eq!(raw.line().expect("response"), expected, "{request}");
    };
    check(
        r#"{"op":"put","key":"a.b","value":{"x":1},"id":7}"#,
        r#"{"ok":true,"rev":1,"id":7}"#,
    );
    check(
        r#"{"op":"get","key":"a.b","id":"s"}"#,
        r#"{"ok":true,"key":"a.b","value":{"x":1},"rev":1,"class":"persistent","id":"s"}"#,
    );
    check(
        r#"{"id":{"n":[1]},"key":"a.*","op":"GET"}"#,
        r#"{"ok":true,"values":{"a.b":{"x":1}},"id":{"n":[1]}}"#,
    );
    check(
        r#"{"op":"keys","id":null}"#,
        r#"{"ok":true,"keys":["a.b"],"id":null}"#,
    );
    check(
        r#"{"op":"keys","key":"a.*","id":1}"#,
        r#"{"ok":true,"keys":["a.b"],"id":1}"#,
    );
    check(
        r#"{"op":"health","id":2}"#,
        r#"{"ok":true,"status":"ok","id":2}"#,
    );
    check(
        r#"{"op":"version","id":3}"#,
        &format!(
            r#"{{"ok":true,"version":"{}","id":3}}"#,
            env!("CARGO_PKG_VERSION")
        ),
    );
    check(
        r#"{"op":"delete","key":"a.b","id":4}"#,
        r#"{"ok":true,"rev":2,"id":4}"#,
    );
    check(
        r#"{"op":"del","key":"a.*","id":5}"#,
        r#"{"ok":true,"deleted":0,"id":5}"#,
    );
    // Without an id, no id.
    check(
        r#"{"op":"put","key":"k","value":null}"#,
        r#"{"ok":true,"rev":3}"#,
    );
    check(
        r#"{"op":"get","key":"k"}"#,
        r#"{"ok":true,"key":"k","value":null,"rev":3,"class":"persistent"}"#,
    );
    // help
    raw.send(r#"{"op":"help","id":6}"#);
    let help = parse(&raw.line().unwrap());
    assert_eq!(help["id"], 6);
    assert!(help["help"].as_str().is_some_and(|h| !h.is_empty()));

    // Errors echo the id as the last field whenever it can be found.
    let errors = [
        (
            r#"{"op":"get","key":"nope","id":10}"#,
            "not_found",
            json!(10),
        ),
        (
            r#"{"op":"del","key":"nope","id":"d"}"#,
            "not_found",
            json!("d"),
        ),
        (
            r#"{"op":"get","key":"a..b","id":11}"#,
            "invalid_key",
            json!(11),
        ),
        (
            r#"{"op":"put","key":"../x","value":1,"id":12}"#,
            "invalid_key",
            json!(12),
        ),
        (r#"{"op":"nope","id":13}"#, "bad_request", json!(13)),
        (
            r#"{"op":"get","key":"a","extra":1,"id":14}"#,
            "bad_request",
            json!(14),
        ),
        (r#"{"op":"get","key":5,"id":15}"#, "bad_request", json!(15)),
        (r#"{"op":5,"id":16}"#, "bad_request", json!(16)),
        (r#"{"key":"a","id":17}"#, "bad_request", json!(17)),
        (
            r#"{"op":"put","key":"a","id":18}"#,
            "bad_request",
            json!(18),
        ),
        (r#"{"op":"get","id":19}"#, "bad_request", json!(19)),
    ];
    for (request, code, id) in errors {
        raw.send(request);
        let line = raw.line().expect("response");
        let response = parse(&line);
        expect_error(&response, code);
        assert_eq!(response["id"], id, "{request} -> {line}");
        assert!(
            line.ends_with(&format!(",\"id\":{id}}}")),
            "id is the last field: {line}"
        );
    }
    // Broken JSON: there is no id to echo, and the connection stays usable.
    for broken in [r#"{"op":"get""#, r#"{"op":"get","key":"a","id":1"#, "{"] {
        let response = raw.request(broken);
        expect_error(&response, "bad_request");
        assert!(response.get("id").is_none(), "{broken} -> {response}");
    }
    assert_eq!(raw.request("HEALTH")["ok"], true);
}

#[test]
fn json_form_carries_newlines_and_leading_spaces() {
    let server = Server::start();
    let mut raw = server.raw();
    let value = json!({"text": "line 1\nline 2\r\n\ttab", "n": [1, 2]});
    let request = json!({"op": "put", "key": "m.a", "value": value}).to_string();
    assert_eq!(raw.request(&request)["rev"], 1);
    let request = json!({"op": "put", "key": "m.b", "value": "  lead\nnext"}).to_string();
    assert_eq!(raw.request(&request)["rev"], 2);
    // One response line each, the newlines escaped inside it.
    let out = server.socat("GET m.a\nGET m.b\nGET m.*\n");
    let got = lines(&out);
    assert_eq!(got.len(), 3, "{out:?}");
    assert_eq!(parse(got[0])["value"], value);
    assert_eq!(parse(got[1])["value"], "  lead\nnext");
    assert_eq!(
        parse(got[2]),
        json!({"ok": true, "values": {"m.a": value, "m.b": "  lead\nnext"}})
    );
    assert_eq!(
        key_file(&server, "m.b"),
        json!({"rev": 2, "value": "  lead\nnext"})
    );
}

#[test]
fn malformed_lines_get_bad_request_and_the_connection_stays_usable() {
    let server = Server::start();
    let mut raw = server.raw();
    assert_eq!(raw.request("PUT k 1")["rev"], 1);
    let bad: [&[u8]; 16] = [
        b"\n",
        b"   \n",
        b"FROB k\n",
        b"GET\n",
        b"GET a b\n",
        b"PUT\n",
        b"PUT k\n",
        b"DEL\n",
        b"DEL a b\n",
        b"KEYS a.* b\n",
        b"HEALTH now\n",
        b"VERSION 1\n",
        b"GET \xff\xfe\n",
        b"PUT k \xc3\n",
        b"PUT a\0b 1\n",
        b"GET k\0\n",
    ];
    for line in bad {
        raw.send_bytes(line);
        let response = raw.json();
        let message = expect_error(&response, "bad_request");
        assert!(response.get("id").is_none());
        assert!(!message.ends_with('.'), "lowercase, no period: {message}");
        // Still usable, and nothing was changed.
        assert_eq!(
            raw.request("GET k"),
            json!({"ok": true, "key": "k", "value": 1, "rev": 1, "class": "persistent"}),
            "after {:?}",
            String::from_utf8_lossy(line)
        );
    }
    assert_eq!(raw.request("KEYS"), json!({"ok": true, "keys": ["k"]}));
    // not_found and invalid_key
    assert_eq!(
        raw.request("GET nope")["error"],
        "not_found",
        "GET of a missing key"
    );
    let message = expect_error(&raw.request("GET a/b"), "invalid_key");
    assert!(message.contains('/'), "names the character: {message}");
    let message = expect_error(&raw.request("GET a..b"), "invalid_key");
    assert!(message.contains("segment"), "names the rule: {message}");
}

#[test]
fn too_large_values_and_lines() {
    let server = Server::start_with(&["--max-value-bytes", "1000"]);
    let mut raw = server.raw();
    // The limit is on the value's JSON text: 998 chars + 2 quotes fit, one more does not.
    let fits = "x".repeat(998);
    assert_eq!(raw.request(&format!("PUT s {fits}"))["rev"], 1);
    let response = raw.request(&format!("PUT s {fits}y"));
    expect_error(&response, "too_large");
    let response = raw.request(&format!("PUT n {}", "1".repeat(1001)));
    expect_error(&response, "too_large");
    let request = json!({"op": "put", "key": "j", "value": "y".repeat(2000), "id": 5});
    let response = raw.request(&request.to_string());
    expect_error(&response, "too_large");
    assert_eq!(response["id"], 5);
    // Nothing stored; the connection is still usable.
    expect_error(&raw.request("GET n"), "not_found");
    expect_error(&raw.request("GET j"), "not_found");
    assert_eq!(raw.request("GET s")["value"], fits);
    assert_eq!(raw.request("KEYS"), json!({"ok": true, "keys": ["s"]}));

    // A line over the line limit (value limit + 64 KiB): too_large, then the connection closes.
    let mut raw = server.raw();
    let mut line = b"PUT big ".to_vec();
    line.extend(std::iter::repeat_n(b'z', 1000 + 64 * 1024 + 100));
    line.push(b'\n');
    // The server may close before reading it all; a failed write is expected then.
    let _ = raw.stream().write_all(&line);
    let got = raw.lines_until_closed();
    assert_eq!(got.len(), 1, "one response, then closed: {got:?}");
    expect_error(&parse(&got[0]), "too_large");
    expect_error(&server.raw().request("GET big"), "not_found");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = Server::start();
    let raw = server.raw();
    let n = 400;
    let mut batch = String::new();
    for i in 0..n {
        batch.push_str(&format!("PUT p.{i} {i}\nGET p.{i}\n"));
    }
    batch.push_str("KEYS p.*\n");
    // Write from another thread: the responses fill our receive buffer while we write.
    let mut writer = raw.stream().try_clone().expect("clone");
    let sender = std::thread::spawn(move || writer.write_all(batch.as_bytes()).expect("send"));
    let mut raw = raw;
    for i in 0..n {
        assert_eq!(raw.json(), json!({"ok": true, "rev": i + 1}));
        assert_eq!(
            raw.json(),
            json!({"ok": true, "key": format!("p.{i}"), "value": i, "rev": i + 1, "class": "persistent"})
        );
    }
    assert_eq!(raw.json()["keys"].as_array().map(Vec::len), Some(n));
    sender.join().expect("sender");

    // The same through socat, mixing forms.
    let mut input = String::new();
    for i in 0..100 {
        input.push_str(&format!(
            "{{\"op\":\"get\",\"key\":\"p.{i}\",\"id\":{i}}}\nDEL p.{i}\n"
        ));
    }
    let out = server.socat(&input);
    let got = lines(&out);
    assert_eq!(got.len(), 200);
    for i in 0..100 {
        let get = parse(got[2 * i]);
        assert_eq!(get["id"], i);
        assert_eq!(get["value"], i);
        assert_eq!(parse(got[2 * i + 1]), json!({"ok": true, "rev": n + i + 1}));
    }
}

#[test]
fn half_close_unterminated_last_line_and_crlf() {
    let server = Server::start();
    // Half-close: the server answers everything sent, then closes.
    let mut raw = server.raw();
    raw.send_bytes(b"PUT h 1\nGET h\nKEYS\n");
    raw.stream().shutdown(Shutdown::Write).expect("shutdown");
    assert_eq!(
        raw.lines_until_closed(),
        [
            r#"{"ok":true,"rev":1}"#,
            r#"{"ok":true,"key":"h","value":1,"rev":1,"class":"persistent"}"#,
            r#"{"ok":true,"keys":["h"]}"#
        ]
    );
    // A final line without `\n` was cut off (its client died mid-way): it is refused and
    // changes nothing; the complete lines before it are executed.
    let mut raw = server.raw();
    raw.send_bytes(b"PUT u hello\nPUT u {\"mode\":\"fast\",\"lim");
    raw.stream().shutdown(Shutdown::Write).expect("shutdown");
    let answers = raw.lines_until_closed();
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[0], r#"{"ok":true,"rev":2}"#);
    let refused = parse(&answers[1]);
    assert_eq!(refused["error"], "bad_request", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("line not terminated"),
        "{refused}"
    );
    // socat sends what echo printed: echo ends its line.
    assert_eq!(
        server.socat("GET u\n"),
        "{\"ok\":true,\"key\":\"u\",\"value\":\"hello\",\"rev\":2,\"class\":\"persistent\"}\n"
    );
    assert_eq!(
        server.socat("HEALTH\n"),
        "{\"ok\":true,\"status\":\"ok\"}\n"
    );
    // `\r\n` is accepted: the `\r` is not part of the value or key.
    let out = server.socat(
        "PUT c hello world\r\nGET c\r\nPUT d 5\r\nGET d\r\n{\"op\":\"get\",\"key\":\"c\",\"id\":1}\r\nKEYS\r\nGET d\r\n",
    );
    assert_eq!(
        lines(&out),
        [
            r#"{"ok":true,"rev":3}"#,
            r#"{"ok":true,"key":"c","value":"hello world","rev":3,"class":"persistent"}"#,
            r#"{"ok":true,"rev":4}"#,
            r#"{"ok":true,"key":"d","value":5,"rev":4,"class":"persistent"}"#,
            r#"{"ok":true,"key":"c","value":"hello world","rev":3,"class":"persistent","id":1}"#,
            r#"{"ok":true,"keys":["c","d","h","u"]}"#,
            r#"{"ok":true,"key":"d","value":5,"rev":4,"class":"persistent"}"#,
        ]
    );
    assert_eq!(
        key_file(&server, "c"),
        json!({"rev": 3, "value": "hello world"})
    );
}

#[test]
fn fifty_concurrent_clients_see_their_own_writes() {
    let server = Server::start();
    let clients = 50;
    let per_client = 10;
    let barrier = Arc::new(Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let socket = server.socket.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut client = nkv::Client::connect(&socket).expect("connect");
                barrier.wait();
                let mut revs = Vec::new();
                let mut shared_revs = Vec::new();
                for j in 0..per_client {
                    let key = format!("c{c}.k{j}");
                    let value = json!({"client": c, "j": j});
                    let rev = client.put(&key, &value).expect("put");
                    revs.push(rev);
                    let entry = client.get_entry(&key).expect("get").expect("own key");
                    assert_eq!(entry.value, value);
                    assert_eq!(entry.rev, rev, "nobody else writes {key}");
                    let rev = client.put("shared", &c).expect("put shared");
                    revs.push(rev);
                    shared_revs.push(rev);
                    assert!(client.get("shared").expect("get shared").is_some());
                }
                (c, revs, shared_revs)
            })
        })
        .collect();
    let mut all_revs = Vec::new();
    let mut last_shared = (0, 0); // (rev, client)
    for thread in threads {
        let (c, revs, shared_revs) = thread.join().expect("client thread");
        assert!(revs.windows(2).all(|w| w[0] < w[1]), "revs grow per client");
        all_revs.extend(revs);
        let max = *shared_revs.iter().max().unwrap();
        if max > last_shared.0 {
            last_shared = (max, c);
        }
    }
    // Every change took its own revision, with no gaps.
    all_revs.sort_unstable();
    let total = clients * per_client * 2;
    assert_eq!(all_revs, (1..=total as u64).collect::<Vec<_>>());
    // Every client's keys are all there; the shared key holds the last write.
    let mut client = server.client();
    for c in 0..clients {
        let got = client.get_matching(&format!("c{c}.*")).unwrap();
        let expected: BTreeMap<String, Value> = (0..per_client)
            .map(|j| (format!("c{c}.k{j}"), json!({"client": c, "j": j})))
            .collect();
        assert_eq!(got, expected);
    }
    let shared = client.get_entry("shared").unwrap().unwrap();
    assert_eq!(shared.rev, last_shared.0);
    assert_eq!(shared.value, json!(last_shared.1));
    assert_eq!(client.keys(None).unwrap().len(), clients * per_client + 1);
}

#[test]
fn restart_keeps_values_and_revisions_moving_forward() {
    let mut server = Server::start();
    let mut raw = server.raw();
    assert_eq!(raw.request("PUT a 1")["rev"], 1);
    assert_eq!(raw.request(r#"PUT b {"x":[1,"two"]}"#)["rev"], 2);
    assert_eq!(raw.request("PUT c hello")["rev"], 3);
    assert_eq!(raw.request("PUT c.d 4")["rev"], 4);
    // Delete the key with the highest revision.
    assert_eq!(raw.request("DEL c.d")["rev"], 5);
    drop(raw);

    server.restart(); // SIGKILL, then start again
    let mut raw = server.raw();
    assert_eq!(
        server.socat("GET *\nGET a\nGET b\nGET c\n"),
        concat!(
            "{\"ok\":true,\"values\":{\"a\":1,\"b\":{\"x\":[1,\"two\"]},\"c\":\"hello\"}}\n",
            "{\"ok\":true,\"key\":\"a\",\"value\":1,\"rev\":1,\"class\":\"persistent\"}\n",
            "{\"ok\":true,\"key\":\"b\",\"value\":{\"x\":[1,\"two\"]},\"rev\":2,\"class\":\"persistent\"}\n",
            "{\"ok\":true,\"key\":\"c\",\"value\":\"hello\",\"rev\":3,\"class\":\"persistent\"}\n",
        )
    );
    expect_error(&raw.request("GET c.d"), "not_found");
    let rev = raw.request("PUT e 1")["rev"].as_u64().unwrap();
    assert!(
        rev > 5,
        "rev {rev} after restart must pass the deleted key's 5"
    );

    // Delete by pattern the newest keys, then stop cleanly and start again.
    assert!(raw.request("PUT x.1 1")["rev"].as_u64().unwrap() > rev);
    let last = raw.request("PUT x.2 2")["rev"].as_u64().unwrap();
    assert_eq!(raw.request("DEL x.*"), json!({"ok": true, "deleted": 2}));
    drop(raw);
    assert!(server.stop().success());
    server.spawn_and_wait();
    let mut raw = server.raw();
    assert_eq!(
        raw.request("KEYS"),
        json!({"ok": true, "keys": ["a", "b", "c", "e"]})
    );
    assert_eq!(raw.request("GET e")["rev"], rev);
    let next = raw.request("PUT a 2")["rev"].as_u64().unwrap();
    assert!(
        next > last + 2,
        "rev {next} must pass the two pattern deletes after {last}"
    );
    assert_eq!(key_file(&server, "a"), json!({"rev": next, "value": 2}));
}

#[test]
fn stray_temp_files_removed_and_unparsable_files_quarantined() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut server = Server::new_in(tmp.path(), &[]);
    std::fs::create_dir_all(&server.data).unwrap();
    let write = |name: &str, text: &str| std::fs::write(server.data.join(name), text).unwrap();
    write(".x.tmp", "{\"rev\":99,\"val");
    write(".good.tmp", "half written");
    write("bad.json", "this is not a record");
    write("torn.json", "{\"rev\":9,\"value\":{\"a\":");
    write("good.json", "{\"rev\":7,\"value\":\"g\"}\n");
    write("other.json", "{\"rev\":3,\"value\":[1,2]}\n");
    server.spawn_and_wait();

    assert!(
        !server.data.join(".x.tmp").exists(),
        "stray temp file removed"
    );
    assert!(
        !server.data.join(".good.tmp").exists(),
        "stray temp file removed"
    );
    assert!(
        !server.data.join("bad.json").exists(),
        "moved out of the way"
    );
    assert_eq!(
        std::fs::read_to_string(server.data.join(".quarantine/bad.json")).unwrap(),
        "this is not a record",
        "an unparsable file is kept, as it was, in the quarantine folder"
    );
    assert!(server.data.join(".quarantine/torn.json").exists());
    let log = server.log_text();
    assert!(
        log.contains("bad.json"),
        "the log names the bad file:\n{log}"
    );
    // The other keys are served; the bad one is not a key.
    let mut raw = server.raw();
    assert_eq!(
        raw.request("GET good"),
        json!({"ok": true, "key": "good", "value": "g", "rev": 7, "class": "persistent"})
    );
    assert_eq!(
        raw.request("KEYS"),
        json!({"ok": true, "keys": ["good", "other"]})
    );
    expect_error(&raw.request("GET bad"), "not_found");
    assert_eq!(
        raw.request("PUT n 1")["rev"],
        10,
        "revisions continue from the files, the torn one's revision 9 included"
    );
    drop(raw);
    drop(server);
}

#[test]
fn hostile_keys_are_rejected_and_nothing_is_written_outside_the_data_dir() {
    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path().join("srv");
    std::fs::create_dir(&dir).unwrap();
    let mut server = Server::new_in(&dir, &[]);
    server.spawn_and_wait();
    let before = tree(root.path());
    let long = "k".repeat(201);
    let hostile: Vec<&str> = vec![
        "../x",
        "../../x",
        "a/b",
        "/etc",
        "/etc/passwd",
        "a..b",
        ".a",
        "a.",
        ".",
        "..",
        "",
        &long,
        "a b",
        " a",
        "a\0b",
        "\0",
        "é",
        "ключ",
        "a\\b",
        "~",
        "a\nb",
        "data/../../x",
    ];
    let mut raw = server.raw();
    let mut client = server.client();
    for key in &hostile {
        for op in ["put", "get", "del", "keys", "sub"] {
            let request = if op == "put" {
                json!({"op": op, "key": key, "value": 1, "id": 1})
            } else {
                json!({"op": op, "key": key, "id": 1})
            };
            let response = raw.request(&request.to_string());
            expect_error(&response, "invalid_key");
            assert_eq!(response["id"], 1, "{op} {key:?}");
        }
        let err = client.put(key, &1).expect_err("invalid key");
        assert_eq!(
            err.code(),
            Some(nkv::ErrorCode::InvalidKey),
            "{key:?}: {err}"
        );
        // The text form, where the key can be written on one line without spaces.
        if key.is_empty() || key.contains([' ', '\n']) {
            continue;
        }
        let code = if key.contains('\0') {
            "bad_request"
        } else {
            "invalid_key"
        };
        for verb in ["PUT {} 1", "GET {}", "DEL {}", "KEYS {}"] {
            let line = verb.replace("{}", key);
            expect_error(&raw.request(&line), code);
        }
        // Absolute keys must not reach the root of the file system.
        if key.starts_with('/') {
            assert!(!Path::new(&format!("{key}.json")).exists(), "{key}.json");
        }
    }
    // A valid key in the same session is stored as `<key>.json` in the data dir.
    assert_eq!(raw.request("PUT ok.x 1")["rev"], 1);
    let after = tree(root.path());
    let added: Vec<_> = after.difference(&before).collect();
    let removed: Vec<_> = before.difference(&after).collect();
    assert_eq!(added, [&Path::new("srv/data/ok.x.json").to_owned()]);
    assert!(removed.is_empty(), "{removed:?}");
    // Nothing under the temp dir is named after a hostile key.
    let allowed: BTreeSet<&str> = [
        "srv",
        "data",
        "nkv.sock",
        "server.log",
        ".rev",
        ".reserve",
        ".tombstone-log",
        ".epoch",
        "ok.x.json",
    ]
    .into();
    for path in &after {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(allowed.contains(name), "unexpected file {}", path.display());
    }
    assert_eq!(raw.request("KEYS"), json!({"ok": true, "keys": ["ok.x"]}));
}

#[derive(Serialize)]
struct Reading {
    temp: f64,
    unit: &'static str,
    tags: Vec<String>,
    at: Option<u64>,
}

#[test]
fn rust_client_api() {
    let server = Server::start_with(&["--max-value-bytes", "1000"]);
    let mut client = nkv::Client::connect(&server.socket).expect("connect");
    assert_eq!(client.get("a").unwrap(), None);
    assert_eq!(client.get_entry("a").unwrap(), None);
    assert_eq!(client.delete("a").unwrap(), None);
    assert_eq!(client.keys(None).unwrap(), Vec::<String>::new());

    let reading = Reading {
        temp: 21.5,
        unit: "C",
        tags: vec!["kitchen".into()],
        at: None,
    };
    let map: HashMap<&str, Vec<i32>> = [("xs", vec![1, 2])].into();
    assert_eq!(client.put("s.int", &42).unwrap(), 1);
    assert_eq!(client.put("s.str", "hello").unwrap(), 2);
    assert_eq!(client.put("s.string", &String::from("a\nb")).unwrap(), 3);
    assert_eq!(client.put("s.struct", &reading).unwrap(), 4);
    assert_eq!(client.put("s.map", &map).unwrap(), 5);
    assert_eq!(client.put("s.tuple", &(1, "two", false)).unwrap(), 6);
    assert_eq!(client.put("s.none", &None::<u8>).unwrap(), 7);
    assert_eq!(client.put("s.float", &-0.25f64).unwrap(), 8);
    assert_eq!(client.put("t", &json!({"k": [true]})).unwrap(), 9);

    assert_eq!(client.get("s.int").unwrap(), Some(json!(42)));
    assert_eq!(client.get("s.str").unwrap(), Some(json!("hello")));
    assert_eq!(client.get("s.string").unwrap(), Some(json!("a\nb")));
    assert_eq!(
        client.get("s.struct").unwrap(),
        Some(json!({"temp": 21.5, "unit": "C", "tags": ["kitchen"], "at": null}))
    );
    assert_eq!(client.get("s.map").unwrap(), Some(json!({"xs": [1, 2]})));
    assert_eq!(
        client.get("s.tuple").unwrap(),
        Some(json!([1, "two", false]))
    );
    assert_eq!(client.get("s.none").unwrap(), Some(Value::Null));
    assert_eq!(client.get("s.float").unwrap(), Some(json!(-0.25)));
    assert_eq!(
        client.get_entry("t").unwrap(),
        Some(nkv::Entry {
            value: json!({"k": [true]}),
            rev: 9
        })
    );
    // The client's writes are visible to everyone.
    assert_eq!(
        parse(server.socat("GET s.int\n").trim_end()),
        json!({"ok": true, "key": "s.int", "value": 42, "rev": 1, "class": "persistent"})
    );

    let matching = client.get_matching("s.*").unwrap();
    assert_eq!(
        matching.keys().collect::<Vec<_>>(),
        ["s.float", "s.int", "s.map", "s.none", "s.str", "s.string", "s.struct", "s.tuple"]
    );
    assert_eq!(matching["s.tuple"], json!([1, "two", false]));
    assert_eq!(client.get_matching("zz.*").unwrap(), BTreeMap::new());
    assert_eq!(client.get_matching("*").unwrap().len(), 9);
    assert_eq!(
        client.keys(Some("s.*")).unwrap(),
        matching.keys().cloned().collect::<Vec<_>>()
    );
    assert_eq!(client.keys(None).unwrap().len(), 9);

    assert_eq!(client.delete("t").unwrap(), Some(10));
    assert_eq!(client.delete("t").unwrap(), None);
    assert_eq!(client.get("t").unwrap(), None);
    assert_eq!(client.delete_matching("s.*").unwrap(), 8);
    assert_eq!(client.delete_matching("s.*").unwrap(), 0);
    assert_eq!(client.keys(None).unwrap(), Vec::<String>::new());

    client.health().unwrap();
    assert_eq!(client.version().unwrap(), env!("CARGO_PKG_VERSION"));
    assert_eq!(client.put("after", &1).unwrap(), 19);
    let stats = client.stats().unwrap();
    assert_eq!(stats["keys"], 1);
    assert_eq!(stats["rev"], 19);
    assert!(stats["connections"] >= 1, "{stats:?}");
    for field in ["subscribers", "events", "coalesced"] {
        assert!(stats.contains_key(field), "stats has {field}: {stats:?}");
    }

    // Server errors carry their code.
    let code = |result: Result<(), nkv::Error>| match result {
        Err(e @ nkv::Error::Server { .. }) => {
            assert!(!e.to_string().is_empty());
            e.code()
        }
        other => panic!("expected a server error, got {other:?}"),
    };
    use nkv::ErrorCode::{InvalidKey, TooLarge};
    assert_eq!(code(client.get("a..b").map(drop)), Some(InvalidKey));
    assert_eq!(code(client.get_entry("a/b").map(drop)), Some(InvalidKey));
    assert_eq!(code(client.put("a.*", &1).map(drop)), Some(InvalidKey));
    assert_eq!(code(client.delete("../x").map(drop)), Some(InvalidKey));
    assert_eq!(
        code(client.delete_matching("a.*.b").map(drop)),
        Some(InvalidKey)
    );
    assert_eq!(code(client.get_matching("a*").map(drop)), Some(InvalidKey));
    assert_eq!(code(client.keys(Some("x..y")).map(drop)), Some(InvalidKey));
    assert_eq!(
        code(client.put("big", &"x".repeat(1000)).map(drop)),
        Some(TooLarge)
    );
    let err = client.put("big", &"x".repeat(1000)).unwrap_err();
    assert!(err.to_string().contains("too_large"), "{err}");
    assert!(!err.is_not_found());
    assert_eq!(client.get("big").unwrap(), None, "nothing stored");
    // Still usable after errors.
    assert_eq!(client.get("after").unwrap(), Some(json!(1)));

    // A socket nobody listens on is an I/O error.
    match nkv::Client::connect(server.dir.join("nothing.sock")) {
        Err(nkv::Error::Io(_)) => {}
        Err(other) => panic!("expected an I/O error, got {other:?}"),
        Ok(_) => panic!("connected to nothing"),
    }
}

/// A client that pipelines may split a request across writes and wait for the answers to the
/// complete ones before sending the rest: they must not be held back behind the partial line.
#[test]
fn responses_are_not_held_behind_a_partial_line() {
    let server = Server::start();
    let mut raw = server.raw();
    raw.send_bytes(b"PUT a 1\nHEALTH\nGET");
    assert_eq!(raw.json()["rev"], 1);
    assert_eq!(raw.json()["status"], "ok");
    raw.send_bytes(b" a\n");
    assert_eq!(raw.json()["value"], 1);
}

//! The framed protocol of the nkv this project replaces, on the same socket as the line
//! protocol: upstream's `nkv-client` binary, unchanged, for every command it has; upstream's
//! Rust client library in mixed framed/line scenarios (the `nkv-upstream-mixed` helper under
//! tests/upstream-client/); and raw frames, byte for byte, for what those clients never send.
//!
//! The upstream binaries are built by `.ci/build-upstream.sh` into `target/foreign/release/`
//! (or wherever `NKV_UPSTREAM_CLIENT` / `NKV_UPSTREAM_MIXED` point); a missing one fails the
//! test, it is never skipped.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::json;

use crate::support::{
    libc_sigterm, output_within, wait_until, BoundedOutput, Server, COMMAND_DEADLINE, DEADLINE,
};

// ---------------------------------------------------------------------------------------------
// Upstream binaries
// ---------------------------------------------------------------------------------------------

/// An upstream binary: `$var`, else its default place under `target/foreign/release/`, built
/// there on first use by `.ci/build-upstream.sh` (so the README's plain `cargo test` works on a
/// fresh clone); a binary that still is not there fails the test.
fn upstream_bin(var: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        build_upstream_once();
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/foreign/release/{name}"))
    });
    assert!(
        path.is_file(),
        "{name} not found at {} (set {var}, or build it with .ci/build-upstream.sh)",
        path.display()
    );
    path
}

/// Runs `.ci/build-upstream.sh` once per test run, unless both tools are already built.
fn build_upstream_once() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let release = root.join("target/foreign/release");
        if release.join("nkv-client").is_file() && release.join("nkv-upstream-mixed").is_file() {
            return;
        }
        let out = Command::new("bash")
            .arg(root.join(".ci/build-upstream.sh"))
            .bounded_output()
            .expect("run .ci/build-upstream.sh");
        assert!(
            out.status.success(),
            ".ci/build-upstream.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

fn upstream_client() -> PathBuf {
    upstream_bin("NKV_UPSTREAM_CLIENT", "nkv-client")
}

/// Runs upstream's `nkv-client --addr <socket> <args>`; returns its stdout, asserting success
/// and that it did not complain about the server (a version mismatch or a wrong response).
fn upstream(server: &Server, args: &[&str]) -> String {
    let mut cmd = Command::new(upstream_client());
    cmd.arg("--addr").arg(&server.socket).args(args);
    let out = output_within(&mut cmd, b"", "upstream nkv-client", COMMAND_DEADLINE);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "nkv-client {args:?} failed: {}\nstdout: {text}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for complaint in ["missmatch", "WARN", "Wrong response", "panicked"] {
        assert!(!text.contains(complaint), "nkv-client {args:?}: {text}");
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Raw frames
// ---------------------------------------------------------------------------------------------

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// Reads one frame's text (without its `\n`); `None` at end of stream.
fn read_frame(stream: &mut UnixStream) -> Option<String> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            return None
        }
        Err(e) => panic!("reading a frame: {e}"),
    }
    let len = u32::from_le_bytes(len) as usize;
    assert!(len <= 8 << 20, "frame of {len} bytes");
    let mut payload = vec![0; len];
    stream.read_exact(&mut payload).expect("frame payload");
    let text = String::from_utf8(payload).expect("frames are UTF-8");
    Some(
        text.strip_suffix('\n')
            .expect("frames end in \\n")
            .to_owned(),
    )
}

/// One framed request on a new connection (as upstream clients do); the reply's text.
fn request(server: &Server, payload: &[u8]) -> String {
    let mut stream = connect(server);
    stream.write_all(&frame(payload)).expect("send frame");
    let reply = read_frame(&mut stream).expect("a reply frame");
    assert_eq!(
        read_frame(&mut stream),
        None,
        "one reply, then the server closes"
    );
    reply
}

fn connect(server: &Server) -> UnixStream {
    let stream = UnixStream::connect(&server.socket).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream
}

/// A framed subscription: sends `SUB` and returns the stream (nothing is read yet).
fn subscribe(server: &Server, client: &str, key: &str) -> UnixStream {
    let mut stream = connect(server);
    let sub = format!("SUB {client} {client} {key}\n");
    stream.write_all(&frame(sub.as_bytes())).expect("send SUB");
    stream
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn put(server: &Server, key: &str, value: &[u8]) -> String {
    request(
        server,
        format!("PUT r1 t1 {key} {}\n", b64(value)).as_bytes(),
    )
}

// ---------------------------------------------------------------------------------------------
// Upstream's nkv-client, unchanged
// ---------------------------------------------------------------------------------------------

#[test]
fn upstream_client_put_get_tree_delete_trace_and_health_work_unchanged() {
    let server = Server::start();
    assert!(upstream(&server, &["put", "svc.a.k1", r#"{"on":true}"#]).contains(" OK"));
    assert!(upstream(&server, &["put", "svc.a.k2", "hello"]).contains(" OK"));
    assert!(upstream(&server, &["put", "svc.b", "42"]).contains(" OK"));

    // Line clients see the framed puts as JSON: an object, a string, a number.
    let mut raw = server.raw();
    assert_eq!(raw.request("GET svc.a.k1")["value"], json!({"on": true}));
    assert_eq!(raw.request("GET svc.a.k2")["value"], json!("hello"));
    assert_eq!(raw.request("GET svc.b")["value"], json!(42));

    let get = upstream(&server, &["get", "svc.a.k1"]);
    assert!(
        get.contains(" OK") && get.contains("svc.a.k1 {\n  \"on\": true\n}"),
        "{get}"
    );
    let get = upstream(&server, &["get", "svc.a.k2"]);
    assert!(
        get.contains("svc.a.k2 hello"),
        "a string reads back unquoted: {get}"
    );
    assert!(upstream(&server, &["get", "svc.none"]).contains(" FAILED"));

    let tree = upstream(&server, &["tree", "svc.*"]);
    for part in [" OK", "svc", "a", "k1", "k2", "b"] {
        assert!(tree.contains(part), "tree lacks {part}: {tree}");
    }

    assert!(upstream(&server, &["health"]).contains(" OK"));
    assert!(
        upstream(&server, &["trace", "svc.a.k1"]).contains(" FAILED"),
        "no subscriber: FAILED, as upstream"
    );
    raw.subscribe("svc.a");
    raw.request("HELLO line-watcher");
    let trace = upstream(&server, &["trace", "svc.a.k1"]);
    assert!(
        trace.contains(" OK") && trace.contains("line-watcher"),
        "{trace}"
    );

    assert!(upstream(&server, &["delete", "svc.a.k1"]).contains(" OK"));
    assert_eq!(
        raw.json()["event"],
        "del",
        "the line subscriber saw the framed delete"
    );
    assert!(upstream(&server, &["get", "svc.a.k1"]).contains(" FAILED"));
    assert!(
        upstream(&server, &["delete", "svc.a.k1"]).contains(" OK"),
        "idempotent, as upstream"
    );
}

/// Collects a child's stdout in the background, for polling.
fn collect(mut out: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

#[test]
fn upstream_client_subscribe_gets_line_and_framed_changes() {
    let server = Server::start();
    let mut raw = server.raw();
    raw.request("PUT feed.x 1");
    let mut child = Command::new(upstream_client())
        .arg("--addr")
        .arg(&server.socket)
        .args(["subscribe", "feed"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run upstream nkv-client subscribe");
    let out = collect(child.stdout.take().expect("stdout"));
    let seen = |part: &str| out.lock().unwrap().contains(part);
    // Subscribed once TRACE (line protocol) lists it.
    wait_until("the upstream subscriber to register", || {
        raw.request("TRACE feed.x")["subscribers"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    });
    // The client keeps only the latest message it was handed, so each step waits for its own.
    raw.request("PUT feed.y {\"on\":true}");
    wait_until("UPDATE feed.y", || seen("UPDATE feed.y 11"));
    assert!(put(&server, "feed.z", b"framed").ends_with(" OK"));
    wait_until("UPDATE feed.z", || seen("UPDATE feed.z 6"));
    raw.request("DEL feed.y");
    wait_until("CLOSE feed.y", || seen("CLOSE feed.y"));
    child.kill().expect("kill nkv-client");
    child.wait().expect("reap nkv-client");
    let text = out.lock().unwrap().clone();
    assert!(
        !text.contains("missmatch") && !text.contains("Disconnected"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Raw frames: mapping, errors, limits
// ---------------------------------------------------------------------------------------------

#[test]
fn values_map_between_bytes_and_json_both_ways() {
    let server = Server::start();
    let mut raw = server.raw();
    raw.subscribe("m");
    assert_eq!(put(&server, "m.obj", br#"{"on":true}"#), "base r1 OK");
    let event = raw.json();
    assert_eq!(
        (event["key"].clone(), event["value"].clone()),
        (json!("m.obj"), json!({"on": true}))
    );
    assert_eq!(put(&server, "m.text", b"hello world"), "base r1 OK");
    assert_eq!(raw.json()["value"], json!("hello world"));
    assert_eq!(
        put(&server, "m.bad", b"\xff\xfe"),
        "base r1 FAILED",
        "not UTF-8"
    );
    let mut writer = server.raw();
    writer.request("PUT m.line {\"a\":[1,2]}");
    writer.request("PUT m.str some words");
    let reply = request(&server, b"GET r2 t1 m.*\n");
    let mut fields: Vec<&str> = reply.split(' ').collect();
    assert_eq!(fields.drain(..3).collect::<Vec<_>>(), ["data", "r2", "OK"]);
    let pairs: Vec<(&str, String)> = fields.chunks(2).map(|p| (p[0], p[1].to_owned())).collect();
    assert_eq!(
        pairs,
        [
            ("m.line", b64(br#"{"a":[1,2]}"#)),
            ("m.obj", b64(br#"{"on":true}"#)),
            ("m.str", b64(b"some words")),
            ("m.text", b64(b"hello world")),
        ],
        "sorted, JSON as its text, strings unquoted; nothing stored for the refused put"
    );
}

#[test]
fn wildcards_and_keys_follow_upstream_and_our_key_rules() {
    let server = Server::start();
    for key in ["w", "w.a", "w.a.b", "wx"] {
        assert_eq!(put(&server, key, key.as_bytes()), "base r1 OK");
    }
    let keys = |reply: String| -> Vec<String> {
        reply
            .split(' ')
            .skip(3)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        keys(request(&server, b"GET r t w.*\n")),
        ["w", "w.a", "w.a.b"],
        "a.* includes a"
    );
    assert_eq!(keys(request(&server, b"GET r t w\n")), ["w"]);
    assert_eq!(keys(request(&server, b"GET r t *\n")).len(), 4);
    for bad in ["a..b", "a/b", "../x", "a.*.b", ".a"] {
        assert_eq!(put(&server, bad, b"1"), "base r1 FAILED", "{bad}");
        assert_eq!(
            request(&server, format!("GET r3 t {bad}\n").as_bytes()),
            "data r3 FAILED"
        );
    }
    assert_eq!(request(&server, b"DEL r4 t w.a.*\n"), "base r4 OK");
    assert_eq!(keys(request(&server, b"GET r t *\n")), ["w", "wx"]);
    assert_eq!(server.raw().request("KEYS")["keys"], json!(["w", "wx"]));
}

#[test]
fn every_bad_request_is_answered_failed_and_nothing_panics() {
    let server = Server::start();
    for (payload, reply) in [
        (&b"NOPE r1 c k\n"[..], "base r1 FAILED"),
        (b"GET r2 c\n", "data r2 FAILED"),
        (b"PUT r3 c k not*base64\n", "base r3 FAILED"),
        (b"TRACE r4 c a b\n", "trace r4 FAILED"),
        (b"GET r5 c \xff\n", "data r5 FAILED"),
        (b"\n", "base - FAILED"),
        (b"UNSUB r6 nobody k\n", "base r6 FAILED"),
        (b"VERSION r7 c DISCARDME\n", "version r7 OK 0.1.1"),
        (b"HEALTH r8 c HK\n", "base r8 OK"),
        (b"HEALTH r9 c\n", "base r9 OK"),
    ] {
        assert_eq!(
            request(&server, payload),
            reply,
            "{:?}",
            String::from_utf8_lossy(payload)
        );
    }
    assert!(server.raw().healthy());
}

#[test]
fn frames_over_8_mib_are_refused_both_ways() {
    let server = Server::start();
    // A request frame over the limit: FAILED after its first bytes; the rest is never read.
    let mut stream = connect(&server);
    let mut head = ((8u32 << 20) + 1).to_le_bytes().to_vec();
    head.extend_from_slice(b"PUT big1 c k.big ");
    stream.write_all(&head).expect("send head");
    stream.write_all(&[b'A'; 4096]).expect("send some");
    assert_eq!(read_frame(&mut stream).as_deref(), Some("base big1 FAILED"));
    // A value line clients may store but no framed reply can carry.
    let big = "x".repeat(7 << 20);
    let mut raw = server.raw();
    raw.send(&format!("PUT k.big {big}"));
    assert_eq!(raw.json()["ok"], true);
    assert_eq!(request(&server, b"GET r1 c k.big\n"), "data r1 FAILED");
    assert_eq!(put(&server, "k.small", b"1"), "base r1 OK");
    assert_eq!(
        request(&server, b"GET r2 c k.small\n"),
        format!("data r2 OK k.small {}", b64(b"1"))
    );
}

// ---------------------------------------------------------------------------------------------
// Raw framed subscriptions
// ---------------------------------------------------------------------------------------------

#[test]
fn a_framed_sub_gets_hello_the_full_snapshot_then_changes() {
    let server = Server::start();
    let mut raw = server.raw();
    raw.request("PUT s 0");
    raw.request("PUT s.a {\"x\":1}");
    raw.request("PUT s.b two");
    raw.request("PUT sx 9");
    let mut sub = subscribe(&server, "c1", "s");
    assert_eq!(read_frame(&mut sub).as_deref(), Some("HELLO"));
    for (key, value) in [("s", &b"0"[..]), ("s.a", br#"{"x":1}"#), ("s.b", b"two")] {
        assert_eq!(
            read_frame(&mut sub),
            Some(format!("UPDATE {key} {}", b64(value)))
        );
    }
    raw.request("PUT s.c [1]");
    assert_eq!(
        read_frame(&mut sub),
        Some(format!("UPDATE s.c {}", b64(b"[1]")))
    );
    assert_eq!(put(&server, "s.d", b"framed"), "base r1 OK");
    assert_eq!(
        read_frame(&mut sub),
        Some(format!("UPDATE s.d {}", b64(b"framed")))
    );
    raw.request("DEL s.a");
    assert_eq!(read_frame(&mut sub).as_deref(), Some("CLOSE s.a"));
    assert_eq!(request(&server, b"DEL r c s.*\n"), "base r OK");
    let mut closed: Vec<String> = (0..4).filter_map(|_| read_frame(&mut sub)).collect();
    closed.sort();
    assert_eq!(closed, ["CLOSE s", "CLOSE s.b", "CLOSE s.c", "CLOSE s.d"]);
    raw.request("PUT s.e 1");
    assert_eq!(
        read_frame(&mut sub),
        Some(format!("UPDATE s.e {}", b64(b"1"))),
        "the sub survives deletes"
    );
}

#[test]
fn unsub_ends_only_the_client_and_key_it_names() {
    let server = Server::start();
    let mut a_k = subscribe(&server, "A", "u.k");
    let mut a_k2 = subscribe(&server, "A", "u.k2");
    let mut b_k = subscribe(&server, "B", "u.k");
    for s in [&mut a_k, &mut a_k2, &mut b_k] {
        assert_eq!(read_frame(s).as_deref(), Some("HELLO"));
    }
    let mut line = server.raw();
    line.subscribe("u.k");
    assert_eq!(request(&server, b"UNSUB x1 A u.k\n"), "base x1 OK");
    assert_eq!(read_frame(&mut a_k).as_deref(), Some("CLOSE u.k"));
    assert_eq!(
        request(&server, b"UNSUB x2 A u.k\n"),
        "base x2 FAILED",
        "already gone"
    );
    let trace = request(&server, b"TRACE t1 c u.k\n");
    assert!(
        trace.starts_with("trace t1 OK") && trace.contains(" B") && !trace.contains(" A"),
        "{trace}"
    );
    assert_eq!(request(&server, b"TRACE t2 c u.k2\n"), "trace t2 OK A");

    let mut writer = server.raw();
    writer.request("PUT u.k 1");
    assert_eq!(line.json()["event"], "put");
    assert_eq!(
        read_frame(&mut b_k),
        Some(format!("UPDATE u.k {}", b64(b"1")))
    );
    writer.request("PUT u.k2 2");
    assert_eq!(
        read_frame(&mut a_k2),
        Some(format!("UPDATE u.k2 {}", b64(b"2")))
    );
    // A's ended stream stays open and silent (so upstream's library does not resubscribe).
    a_k.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    let err = a_k.read(&mut byte).expect_err("nothing after CLOSE");
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
}

#[test]
fn a_stalled_framed_subscriber_blocks_no_one_and_still_converges() {
    let server = Server::start();
    let mut stalled = subscribe(&server, "slow", "st");
    let value = "v".repeat(8 << 10);
    let mut raw = server.raw();
    // Pipelined in batches, reading the responses between them (our own socket is finite too).
    for batch in 0..20 {
        for i in batch * 100..(batch + 1) * 100 {
            raw.send(&format!("PUT st.k{} {i}-{value}", i % 10));
        }
        for _ in 0..100 {
            assert_eq!(raw.json()["ok"], true);
        }
    }
    raw.request("PUT st.end done");
    // Now read everything: each key's last UPDATE is its final value.
    let mut last = std::collections::HashMap::new();
    while !last.contains_key("st.end") {
        let text = read_frame(&mut stalled).expect("stream open");
        if let Some(rest) = text.strip_prefix("UPDATE ") {
            let (key, value) = rest.split_once(' ').expect("UPDATE key value");
            last.insert(key.to_owned(), value.to_owned());
        }
    }
    for k in 0..10 {
        let want = format!("{}-{value}", 1990 + k);
        assert_eq!(
            last[&format!("st.k{k}")],
            b64(want.as_bytes()),
            "key st.k{k}"
        );
    }
    assert!(
        raw.request("STATS")["coalesced"].as_u64() > Some(0),
        "the stalled mailbox coalesced"
    );
}

#[test]
fn a_stream_ignores_input_skips_unsendable_values_and_ends_with_its_client() {
    let server = Server::start();
    let mut sub = subscribe(&server, "watcher", "big");
    assert_eq!(read_frame(&mut sub).as_deref(), Some("HELLO"));
    sub.write_all(b"\x05\x00\x00\x00junk\ngarbage")
        .expect("send junk");
    let mut raw = server.raw();
    // A value a line client may store but no frame can carry: skipped for framed subscribers.
    raw.send(&format!("PUT big.huge {}", "x".repeat(7 << 20)));
    assert_eq!(raw.json()["ok"], true);
    raw.request("PUT big.small 1");
    assert_eq!(
        read_frame(&mut sub),
        Some(format!("UPDATE big.small {}", b64(b"1")))
    );
    let trace = request(&server, b"TRACE t c big.small\n");
    assert_eq!(trace, "trace t OK watcher");
    drop(sub);
    wait_until("the closed stream to leave the subscription table", || {
        request(&server, b"TRACE t c big.small\n") == "trace t FAILED"
    });
    assert!(server.log_text().contains("does not fit in an 8 MiB frame"));
}

#[test]
fn a_silent_connection_times_out_once_not_twice() {
    let server = Server::start_with(&["--idle-timeout", "1"]);
    let started = std::time::Instant::now();
    let mut raw = server.raw();
    let v = raw.json();
    assert_eq!(v["error"], "timeout", "{v}");
    raw.assert_closed();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(1900),
        "timed out after {waited:?} with --idle-timeout 1"
    );
}

#[test]
fn shutdown_delivers_what_is_queued_then_closes_framed_streams() {
    let mut server = Server::start();
    let mut sub = subscribe(&server, "c", "z");
    assert_eq!(read_frame(&mut sub).as_deref(), Some("HELLO"));
    // More than the sockets hold is still queued for the subscriber when the server stops
    // (little enough to drain within the server's 500 ms grace, even in a debug build).
    let mut raw = server.raw();
    let value = "v".repeat(40 << 10);
    for round in 0..2 {
        for k in 0..10 {
            raw.send(&format!("PUT z.k{k} {round}-{value}"));
            assert_eq!(raw.json()["ok"], true);
        }
    }
    server.signal(libc_sigterm());
    let mut last = std::collections::HashMap::new();
    while let Some(text) = read_frame(&mut sub) {
        let rest = text
            .strip_prefix("UPDATE ")
            .expect("only UPDATEs, no line-protocol text");
        let (key, value) = rest.split_once(' ').expect("UPDATE key value");
        last.insert(key.to_owned(), value.to_owned());
    }
    let want = b64(format!("1-{value}").as_bytes());
    assert_eq!(last.len(), 10);
    let stale: Vec<&String> = last
        .iter()
        .filter(|(_, v)| **v != want)
        .map(|(k, _)| k)
        .collect();
    assert!(
        stale.is_empty(),
        "keys without their final value: {stale:?}\n{}",
        server
            .log_text()
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(server.wait_exit(DEADLINE).success());
}

// ---------------------------------------------------------------------------------------------
// Upstream's Rust client library, mixed with line clients
// ---------------------------------------------------------------------------------------------

fn mixed(scenario: &str) {
    let server = Server::start();
    let mut cmd = Command::new(upstream_bin("NKV_UPSTREAM_MIXED", "nkv-upstream-mixed"));
    cmd.arg(&server.socket).arg(scenario);
    let out: Output = output_within(&mut cmd, b"", "nkv-upstream-mixed", COMMAND_DEADLINE);
    assert!(
        out.status.success(),
        "scenario {scenario} failed ({}):\nstdout: {}\nstderr: {}\nserver log tail: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server
            .log_text()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("ok {scenario}")), "{text}");
}

#[test]
fn upstream_library_snapshot_and_mixing() {
    mixed("snapshot");
}

#[test]
fn upstream_library_isolation() {
    mixed("isolation");
}

#[test]
fn upstream_library_convergence_under_concurrent_writers() {
    mixed("convergence");
}

/// A framed subscription gives back every descriptor it held (its socket pair and the
/// mailbox's eventfd) once its client leaves.
#[test]
fn ended_framed_subscriptions_leave_no_descriptor_behind() {
    let server = Server::start();
    let open_fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
            .unwrap()
            .count()
    };
    let mut probe = server.raw();
    assert!(probe.healthy());
    let baseline = open_fds();
    for i in 0..50 {
        let mut sub = subscribe(&server, "leaky", &format!("f.k{i}"));
        assert_eq!(read_frame(&mut sub).as_deref(), Some("HELLO"));
    }
    wait_until("the framed subscribers' descriptors to be closed", || {
        probe.request("STATS")["connections"] == 1 && open_fds() <= baseline
    });
}

// ---------------------------------------------------------------------------------------------
// Split, cut short, trickled and refused frames
// ---------------------------------------------------------------------------------------------

/// Sends `bytes` in parts, pausing `pause` between them (a client that pauses mid-frame).
fn send_split(stream: &mut UnixStream, bytes: &[u8], at: usize, pause: Duration) {
    stream.write_all(&bytes[..at]).expect("send first part");
    thread::sleep(pause);
    stream.write_all(&bytes[at..]).expect("send the rest");
}

#[test]
fn a_frame_header_split_after_a_newline_byte_is_still_a_frame() {
    let server = Server::start();
    // Length 10 is 0a 00 00 00: its first byte alone looks like an empty line.
    let health = frame(b"HEALTH a b");
    assert_eq!(health[0], b'\n');
    let mut stream = connect(&server);
    send_split(&mut stream, &health, 1, Duration::from_millis(200));
    assert_eq!(read_frame(&mut stream).as_deref(), Some("base a OK"));
    assert_eq!(read_frame(&mut stream), None);
    // Length 266 is 0a 01 00 00: two bytes without a NUL, one of them `\n`.
    let get = frame(format!("GET 1 c {}\n", "k".repeat(257)).as_bytes());
    assert_eq!(&get[..2], b"\n\x01");
    let mut stream = connect(&server);
    send_split(&mut stream, &get, 2, Duration::from_millis(200));
    assert_eq!(read_frame(&mut stream).as_deref(), Some("data 1 FAILED"));

    // A complete line shorter than a frame header is still answered as a line: at once when
    // the client half-closes, after the short wait when it does not.
    for half_close in [true, false] {
        let mut raw = server.raw();
        let started = std::time::Instant::now();
        raw.send_bytes(b"Q\n");
        if half_close {
            raw.stream().shutdown(std::net::Shutdown::Write).unwrap();
        }
        let v = raw.json();
        assert_eq!(v["error"], "bad_request", "{v}");
        let waited = started.elapsed();
        let bound = if half_close { 900 } else { 1900 };
        assert!(
            waited < Duration::from_millis(bound),
            "half-close {half_close}: answered after {waited:?}"
        );
        if !half_close {
            assert!(raw.healthy(), "the line connection stays usable");
        }
    }
}

#[test]
fn a_frame_cut_short_is_answered_failed_not_dropped() {
    let server = Server::start_with(&["--idle-timeout", "1"]);
    let cases: [(&[u8], bool, &str); 5] = [
        // Header says 100 bytes, 11 arrive, then the client stalls.
        (b"\x64\x00\x00\x00HEALTH 5 c\n", false, "base 5 FAILED"),
        // The same, but the client half-closes: answered at once.
        (b"\x64\x00\x00\x00GET 7 c a.b", true, "data 7 FAILED"),
        // A cut id is not echoed: only whole fields count.
        (b"\x64\x00\x00\x00TRACE r12", false, "trace - FAILED"),
        // An oversized frame followed by fewer than the 512 bytes read of its start.
        (b"\x01\x00\x80\x00PUT 4 c k AAAA\n", false, "base 4 FAILED"),
        // The header itself cut short.
        (b"\x64\x00", false, "base - FAILED"),
    ];
    for (bytes, half_close, want) in cases {
        let mut stream = connect(&server);
        let started = std::time::Instant::now();
        stream.write_all(bytes).expect("send");
        if half_close {
            stream.shutdown(std::net::Shutdown::Write).unwrap();
        }
        assert_eq!(read_frame(&mut stream).as_deref(), Some(want), "{bytes:?}");
        assert_eq!(read_frame(&mut stream), None, "then closed");
        let waited = started.elapsed();
        let (low, high) = if half_close { (0, 900) } else { (900, 1900) };
        assert!(
            waited >= Duration::from_millis(low) && waited < Duration::from_millis(high),
            "{bytes:?} answered after {waited:?} with --idle-timeout 1"
        );
    }
}

#[test]
fn the_idle_timeout_bounds_a_trickled_frame_as_a_whole() {
    let server = Server::start_with(&["--idle-timeout", "1"]);
    let mut stream = connect(&server);
    let mut writer = stream.try_clone().unwrap();
    let full = frame(format!("HEALTH 7 {}\n", "c".repeat(20)).as_bytes());
    let started = std::time::Instant::now();
    // One byte each 300 ms after the id: each read comes well within the idle timeout, the
    // whole frame would take 6 s. The writer stops once the server has closed.
    let trickle = thread::spawn(move || {
        let head = 4 + "HEALTH 7 ".len();
        let _ = writer.write_all(&full[..head]);
        for byte in &full[head..] {
            thread::sleep(Duration::from_millis(300));
            if writer.write_all(&[*byte]).is_err() {
                break;
            }
        }
    });
    assert_eq!(read_frame(&mut stream).as_deref(), Some("base 7 FAILED"));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(1900),
        "a trickled frame held the connection {waited:?} with --idle-timeout 1"
    );
    assert_eq!(read_frame(&mut stream), None);
    drop(stream);
    trickle.join().unwrap();
}

#[test]
fn over_max_connections_a_framed_client_gets_a_framed_failed() {
    let server = Server::start_with(&["--max-connections", "2"]);
    // Two line connections admitted (the start-up probe's may still be closing).
    let held: Vec<_> = (0..2)
        .map(|_| {
            let mut admitted = None;
            wait_until("a connection to be admitted", || {
                let mut raw = server.raw();
                let ok = raw.try_request("HEALTH").is_ok_and(|v| v["ok"] == true);
                admitted = ok.then_some(raw);
                ok
            });
            admitted
        })
        .collect();
    assert_eq!(request(&server, b"HEALTH h1 c\n"), "base h1 FAILED");
    assert_eq!(request(&server, b"GET g1 c a.b\n"), "data g1 FAILED");
    // A line client is still refused in its own protocol.
    let mut raw = server.raw();
    let v = raw.json();
    assert_eq!(v["error"], "too_many_connections", "{v}");
    drop(held);
    wait_until("a framed request to be served again", || {
        request(&server, b"HEALTH h2 c\n") == "base h2 OK"
    });
}

#[test]
fn empty_values_are_refused_framed_and_never_sent_as_an_empty_field() {
    let server = Server::start();
    assert_eq!(request(&server, b"PUT r1 c e.x \n"), "base r1 FAILED");
    assert_eq!(request(&server, b"GET r2 c e.x\n"), "data r2 FAILED");
    // A line client may store the empty string; framed clients get its JSON text, `""`.
    let mut raw = server.raw();
    assert_eq!(
        raw.request(r#"{"op":"put","key":"e.s","value":""}"#)["ok"],
        true
    );
    assert_eq!(
        request(&server, b"GET r3 c e.s\n"),
        format!("data r3 OK e.s {}", b64(b"\"\""))
    );
    let mut sub = subscribe(&server, "c1", "e");
    assert_eq!(read_frame(&mut sub).as_deref(), Some("HELLO"));
    assert_eq!(
        read_frame(&mut sub),
        Some(format!("UPDATE e.s {}", b64(b"\"\"")))
    );
    // Upstream's unchanged client reads it (it panicked on an empty field).
    assert!(upstream(&server, &["get", "e.*"]).contains(" OK"));
    // A framed put of `""` round-trips as `""`.
    assert_eq!(put(&server, "e.q", b"\"\""), "base r1 OK");
    assert_eq!(raw.request("GET e.q")["value"], json!(""));
}

#[test]
fn a_length_of_16_mib_or_more_is_read_as_a_line() {
    let server = Server::start();
    // 0x01020304 has no NUL: not a frame (no framed client sends over 8 MiB), so the line
    // protocol answers it, and refuses it.
    let mut raw = server.raw();
    let mut bytes = 0x0102_0304u32.to_le_bytes().to_vec();
    bytes.extend_from_slice(format!("PUT 4 c k {}\n", "QUFB".repeat(200)).as_bytes());
    raw.send_bytes(&bytes);
    raw.stream().shutdown(std::net::Shutdown::Write).unwrap();
    let v = raw.json();
    assert_eq!(v["error"], "bad_request", "{v}");
    raw.assert_closed();
    // Just under 16 MiB has a NUL: a frame, over the limit, FAILED.
    let mut stream = connect(&server);
    let mut bytes = 0x00ff_ffffu32.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"PUT 5 c k QUFB\n");
    stream.write_all(&bytes).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_frame(&mut stream).as_deref(), Some("base 5 FAILED"));
    assert_eq!(raw_keys(&server), json!([]));
}

fn raw_keys(server: &Server) -> serde_json::Value {
    server.raw().request("KEYS")["keys"].clone()
}

#[test]
fn a_framed_sub_that_half_closes_gets_hello_and_its_snapshot_then_the_end() {
    let server = Server::start();
    assert_eq!(put(&server, "h.k", b"v0"), "base r1 OK");
    assert_eq!(put(&server, "h.k2", b"v1"), "base r1 OK");
    let mut sub = subscribe(&server, "hc", "h");
    sub.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_frame(&mut sub).as_deref(), Some("HELLO"));
    assert_eq!(
        read_frame(&mut sub),
        Some(format!("UPDATE h.k {}", b64(b"v0")))
    );
    assert_eq!(
        read_frame(&mut sub),
        Some(format!("UPDATE h.k2 {}", b64(b"v1")))
    );
    assert_eq!(
        read_frame(&mut sub),
        None,
        "the stream ends after the snapshot"
    );
    wait_until("the ended stream to leave the subscription table", || {
        request(&server, b"TRACE t c h.k\n") == "trace t FAILED"
    });
}

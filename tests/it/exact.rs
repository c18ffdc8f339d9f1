//! `nkv-client` prints, dumps, restores, compares and hands to `watch` the exact JSON text the
//! server stores: no number rounded, no object key reordered or dropped, any nesting depth the
//! server accepts (found by the issue-11 adversary).

use std::io::{BufRead, BufReader};
use std::process::{Output, Stdio};

use crate::support::{wait_until, Server};

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

#[track_caller]
fn ok(out: Output, expected: &str) {
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), expected, "{out:?}");
}

/// Stores `value` (JSON text) under `key` through a raw socket, as any client may.
fn put_raw(server: &Server, key: &str, value: &str) {
    let mut raw = server.raw();
    raw.send(&format!(
        "{{\"op\":\"put\",\"key\":\"{key}\",\"value\":{value}}}"
    ));
    let reply = raw.line().expect("a reply");
    assert!(reply.starts_with("{\"ok\":true"), "{reply}");
}

/// The value text the server returns for `key`, read from the raw response line.
fn stored(server: &Server, key: &str) -> String {
    let mut raw = server.raw();
    raw.send(&format!("{{\"op\":\"get\",\"key\":\"{key}\"}}"));
    let line = raw.line().expect("a reply");
    let start = line.find("\"value\":").expect("a value") + "\"value\":".len();
    let end = line.rfind(",\"rev\":").expect("a rev");
    line[start..end].to_owned()
}

const BIG: &str = "12345678901234567890123";
const DUPS: &str = r#"{"b":1,"a":2,"a":3}"#;

fn deep(n: usize) -> String {
    format!("{}{}", "[".repeat(n), "]".repeat(n))
}

fn exact_store() -> Server {
    let server = Server::start();
    put_raw(&server, "p.big", BIG);
    put_raw(&server, "p.dups", DUPS);
    put_raw(&server, "p.exp", "1e2");
    put_raw(&server, "p.s", "\"text\"");
    server
}

#[test]
fn get_and_dump_print_values_exactly_as_stored() {
    let server = exact_store();
    ok(server.cli(&["get", "p.big"]), &format!("{BIG}\n"));
    ok(server.cli(&["get", "p.dups"]), &format!("{DUPS}\n"));
    ok(server.cli(&["get", "p.exp"]), "1e2\n");
    ok(server.cli(&["get", "p.s"]), "text\n");
    let listing = format!("p.big {BIG}\np.dups {DUPS}\np.exp 1e2\np.s text\n");
    ok(server.cli(&["get", "p.*"]), &listing);
    let dump = format!(
        "{{\"key\":\"p.big\",\"value\":{BIG}}}\n{{\"key\":\"p.dups\",\"value\":{DUPS}}}\n\
         {{\"key\":\"p.exp\",\"value\":1e2}}\n{{\"key\":\"p.s\",\"value\":\"text\"}}\n"
    );
    ok(server.cli(&["dump"]), &dump);
    ok(server.cli(&["dump", "p"]), &dump);
    // A pattern dumps what it matches instead of failing with "missing field key".
    ok(server.cli(&["dump", "p.*"]), &dump);
    ok(server.cli(&["dump", "*"]), &dump);
    ok(server.cli(&["wait", "p.big"]), &format!("{BIG}\n"));
}

#[test]
fn put_sends_the_value_as_typed() {
    let server = Server::start();
    ok(server.cli(&["put", "q.big", BIG]), "");
    ok(server.cli(&["put", "q.dups", DUPS]), "");
    ok(server.cli(&["put", "q.exp", "1e2"]), "");
    ok(server.cli(&["put", "q.sp", "{ \"a\" : [1, 2] }"]), "");
    assert_eq!(stored(&server, "q.big"), BIG);
    assert_eq!(stored(&server, "q.dups"), DUPS);
    assert_eq!(stored(&server, "q.exp"), "1e2");
    assert_eq!(stored(&server, "q.sp"), r#"{"a":[1,2]}"#);
}

#[test]
fn subscribe_prints_values_exactly_as_stored() {
    let server = exact_store();
    let mut child = server
        .cli_command(&["subscribe", "p"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("nkv-client subscribe");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut got = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("a line");
        if line.starts_with("ready") {
            break;
        }
        got.push(line);
    }
    put_raw(&server, "p.big", "-12345678901234567890123.5e-3");
    let change = lines.next().expect("the put").expect("a line");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        got,
        [
            format!("init p.big {BIG}"),
            format!("init p.dups {DUPS}"),
            "init p.exp 1e2".to_owned(),
            "init p.s text".to_owned(),
        ]
    );
    assert_eq!(change, "put p.big -12345678901234567890123.5e-3");
}

#[test]
fn dump_then_restore_reproduces_the_store() {
    let server = exact_store();
    put_raw(&server, "p.deep", &deep(127));
    let dump = server.cli(&["dump"]);
    assert_eq!(dump.status.code(), Some(0), "{dump:?}");
    let dump = stdout(&dump);
    let copy = Server::start();
    let restored = copy.cli_with_stdin(&["restore"], &dump);
    assert_eq!(restored.status.code(), Some(0), "{restored:?}");
    ok(copy.cli(&["dump"]), &dump);
    for key in ["p.big", "p.dups", "p.exp", "p.s", "p.deep"] {
        assert_eq!(stored(&copy, key), stored(&server, key), "{key}");
    }
}

#[test]
fn values_nested_as_deep_as_the_server_allows_print_and_dump() {
    let server = Server::start();
    let value = deep(127);
    put_raw(&server, "d.a", &value);
    ok(server.cli(&["get", "d.a"]), &format!("{value}\n"));
    ok(server.cli(&["get", "d.*"]), &format!("d.a {value}\n"));
    let line = format!("{{\"key\":\"d.a\",\"value\":{value}}}\n");
    ok(server.cli(&["dump"]), &line);
    ok(server.cli(&["dump", "d"]), &line);
    ok(server.cli(&["wait", "d.a"]), &format!("{value}\n"));
}

#[test]
fn wait_equals_compares_the_exact_json_text() {
    let server = Server::start();
    put_raw(&server, "w.big", "12345678901234567890124");
    put_raw(&server, "w.one", "1");
    put_raw(&server, "w.obj", r#"{"a":1,"b":[true]}"#);
    let missed = server.cli(&["--timeout", "0.3", "wait", "w.big", "--equals", BIG]);
    assert_eq!(missed.status.code(), Some(1), "{missed:?}");
    let why = String::from_utf8_lossy(&missed.stderr);
    assert!(why.contains("did not get the --equals value"), "{why}");
    assert!(!why.contains("did not appear"), "{why}");
    ok(
        server.cli(&["wait", "w.big", "--equals", "12345678901234567890124"]),
        "12345678901234567890124\n",
    );
    let float = server.cli(&["--timeout", "0.3", "wait", "w.one", "--equals", "1.0"]);
    assert_eq!(float.status.code(), Some(1), "1.0 is not 1: {float:?}");
    ok(server.cli(&["wait", "w.one", "--equals", "1"]), "1\n");
    // Whitespace outside strings does not count; key order does.
    ok(
        server.cli(&["wait", "w.obj", "--equals", "{ \"a\": 1, \"b\": [ true ] }"]),
        "{\"a\":1,\"b\":[true]}\n",
    );
    let reordered = server.cli(&[
        "--timeout",
        "0.3",
        "wait",
        "w.obj",
        "--equals",
        r#"{"b":[true],"a":1}"#,
    ]);
    assert_eq!(reordered.status.code(), Some(1), "{reordered:?}");
    let absent = server.cli(&["--timeout", "0.3", "wait", "w.none"]);
    assert_eq!(absent.status.code(), Some(1), "{absent:?}");
    assert!(String::from_utf8_lossy(&absent.stderr).contains("did not appear"));
}

#[test]
fn watch_hands_a_value_too_long_for_the_environment_in_a_file_and_goes_on() {
    let server = Server::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let script = format!(
        "if [ -n \"$NKV_VALUE_FILE\" ]; then echo \"file $NKV_KEY $(wc -c < \"$NKV_VALUE_FILE\") \
         ${{NKV_VALUE-unset}} $NKV_VALUE_FILE\"; else echo \"env $NKV_KEY $NKV_VALUE\"; fi >> {}",
        out.display()
    );
    let mut child = server
        .cli_command(&["watch", "x", "--no-init", "--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nkv-client watch");
    wait_until("watch subscribed", || {
        server
            .client()
            .server_stats()
            .is_ok_and(|s| s.subscribers == 1)
    });
    let big = format!("\"{}\"", "v".repeat(200_000 - 2));
    put_raw(&server, "x.big", &big);
    put_raw(&server, "x.small", "7");
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    wait_until("both changes ran CMD", || read().lines().count() >= 2);
    let still_running = child.try_wait().expect("try_wait").is_none();
    let _ = child.kill();
    let _ = child.wait();
    let text = read();
    let lines: Vec<&str> = text.lines().collect();
    let first: Vec<&str> = lines[0].split(' ').collect();
    assert_eq!(&first[..4], ["file", "x.big", "200000", "unset"], "{text}");
    assert!(
        !std::path::Path::new(first[4]).exists(),
        "the value file is removed after the run"
    );
    assert_eq!(lines[1], "env x.small 7", "{text}");
    assert!(still_running, "the watch goes on");
}

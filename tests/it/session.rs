//! `nkv-client` sessions and one-shot commands as scripts lean on them: standard input read
//! once, reconnecting across a server restart, the worst status as the exit status, values
//! that start with `-`, `--timeout`, `stats`, `trace`, `dump` and `restore`.

use std::io::Write;
use std::process::{Child, ChildStdin, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{wait_until, BoundedOutput, Server, DEADLINE};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits for `child` to exit within `DEADLINE`, killing it (and failing) if it does not.
fn output_within_deadline(mut child: Child, what: &str) -> Output {
    let end = Instant::now() + DEADLINE;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > end {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("{what} did not finish (hangs): {out:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A session whose standard input the test writes line by line.
struct Session {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
}

impl Session {
    fn start(server: &Server) -> Session {
        let mut child = server
            .cli_command(&[])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nkv-client session");
        let stdin = child.stdin.take();
        Session {
            child: Some(child),
            stdin,
        }
    }

    fn line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to the session");
        stdin.flush().expect("flush");
    }

    /// Ends the input and waits for the session to exit.
    fn finish(mut self) -> Output {
        drop(self.stdin.take());
        output_within_deadline(self.child.take().expect("running"), "the session")
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn put_dash_in_a_piped_session_is_refused_and_the_session_goes_on() {
    // `printf 'put p.b -\nget p.a\n' | nkv-client` used to hang: stdin locked twice.
    let server = Server::start();
    server.client().put("p.a", &1).unwrap();
    let mut child = server
        .cli_command(&[])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"put p.b -\nget p.a\n").unwrap();
    drop(stdin);
    let out = output_within_deadline(child, "printf 'put p.b -\\nget p.a\\n' | nkv-client");
    assert_eq!(out.status.code(), Some(2), "the refused put fails: {out:?}");
    assert!(stderr(&out).contains("standard input"), "says why: {out:?}");
    assert_eq!(stdout(&out), "1\n", "the next line still ran");
    assert_eq!(server.client().get("p.b").unwrap(), None);
}

#[test]
fn a_session_reconnects_after_the_server_restarts() {
    let mut server = Server::start();
    let mut session = Session::start(&server);
    session.line("put s.a 1");
    let mut client = server.client();
    wait_until("the first put", || {
        client.get("s.a").ok().flatten() == Some(json!(1))
    });
    server.restart();
    // The session's connection died with the old server: the next put must not be lost.
    session.line("put s.b 2");
    session.line("get s.b");
    let out = session.finish();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), "2\n");
    assert_eq!(server.client().get("s.b").unwrap(), Some(json!(2)));
}

#[test]
fn a_session_reports_a_lost_server_and_exits_with_the_worst_status() {
    let mut server = Server::start();
    let mut session = Session::start(&server);
    session.line("get missing");
    session.line("put w.a 1");
    let mut client = server.client();
    wait_until("the put", || {
        client.get("w.a").ok().flatten() == Some(json!(1))
    });
    server.kill();
    session.line("put w.b 2");
    let out = session.finish();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("not_found"), "{err}");
    assert!(err.contains("nkv.sock"), "names the socket: {err}");

    // Not found alone: status 1, not 0.
    server.spawn_and_wait();
    let out = server.cli_with_stdin(&[], "put w.c 3\nget nothing\nget w.c\n");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(stdout(&out), "3\n");
}

#[test]
fn session_lines_use_the_command_line_grammar() {
    let server = Server::start();
    let out = server.cli_with_stdin(
        &[],
        "put g.a   two  spaces \nPUT g.n -5\nget g.a\nget g.n\nset g.s x\ndel g.s\nfrob\nkeys g\n",
    );
    assert_eq!(out.status.code(), Some(2), "frob fails: {out:?}");
    // The value is the rest of the line after the one space that follows the key, exactly.
    assert_eq!(stdout(&out), "  two  spaces \n-5\ng.a\ng.n\n");
    assert!(stderr(&out).contains("frob"), "{out:?}");
    // A missing argument is clap's usage error, and the session goes on.
    let out = server.cli_with_stdin(&[], "get\nwait\nhealth\n");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(stdout(&out), "ok\n");
    assert!(stderr(&out).contains("<KEY>"), "{out:?}");
}

#[test]
fn values_starting_with_a_dash_are_values() {
    let server = Server::start();
    let out = server.cli(&["put", "d.n", "-5"]);
    assert!(out.status.success(), "{out:?}");
    let out = server.cli(&["put", "d.s", "-x", "--y"]);
    assert!(out.status.success(), "{out:?}");
    let mut client = server.client();
    assert_eq!(client.get("d.n").unwrap(), Some(json!(-5)));
    assert_eq!(client.get("d.s").unwrap(), Some(json!("-x --y")));
    let out = server.cli(&["wait", "d.n", "--equals", "-5", "--timeout", "5"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), "-5\n");
}

#[test]
fn timeout_bounds_a_server_that_does_not_answer() {
    // A listener that accepts and never answers.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mute.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let held = std::thread::spawn(move || {
        let conn = listener.accept();
        std::thread::sleep(Duration::from_secs(3));
        drop(conn);
    });
    let started = Instant::now();
    let out = std::process::Command::new(crate::support::CLIENT)
        .args([
            "--socket",
            path.to_str().unwrap(),
            "--timeout",
            "0.3",
            "get",
            "a",
        ])
        .bounded_output()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(stderr(&out).contains("no response within"), "{out:?}");
    held.join().unwrap();
}

#[test]
fn stats_shows_counters_and_hello_names() {
    let server = Server::start();
    let mut named = server.raw();
    assert_eq!(named.request("HELLO svc-a"), json!({"ok": true}));
    let mut client = server.client();
    client.hello("svc-b").unwrap();
    let stats = client.server_stats().unwrap();
    assert_eq!(stats.names, ["svc-a", "svc-b"]);
    let out = server.cli(&["stats"]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    for line in ["keys 0", "names svc-a svc-b", "subscribers 0"] {
        assert!(text.lines().any(|l| l == line), "{line:?} in {text:?}");
    }
    let out = server.cli(&["--json", "stats"]);
    let line: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(line["names"], json!(["svc-a", "svc-b"]));
    // A name goes with its connection.
    drop(named);
    wait_until("svc-a's connection to close", || {
        client.server_stats().unwrap().names == ["svc-b"]
    });
}

#[test]
fn trace_lists_subscribers_by_name() {
    let server = Server::start();
    let mut sub = server.raw();
    assert_eq!(sub.request("HELLO watcher"), json!({"ok": true}));
    sub.subscribe("t");
    let out = server.cli(&["trace", "t.x"]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains(" watcher [\"t\"]"), "{text:?}");
}

#[test]
fn dump_and_restore_round_trip_and_restore_stops_at_the_first_bad_line() {
    let server = Server::start();
    let mut client = server.client();
    client.put("app.a", &json!({"x": [1, "two"]})).unwrap();
    client.put("app.b.c", "text with\nnewline").unwrap();
    client.put("app", &Value::Null).unwrap();
    client.put("other", &1).unwrap();
    let out = server.cli(&["dump", "app"]);
    assert!(out.status.success(), "{out:?}");
    let dump = stdout(&out);
    assert_eq!(
        dump,
        "{\"key\":\"app\",\"value\":null}\n\
         {\"key\":\"app.a\",\"value\":{\"x\":[1,\"two\"]}}\n\
         {\"key\":\"app.b.c\",\"value\":\"text with\\nnewline\"}\n"
    );
    let all = stdout(&server.cli(&["dump"]));
    assert_eq!(all.lines().count(), 4, "{all}");

    let target = Server::start();
    let out = target.cli_with_stdin(&["restore"], &all);
    assert!(out.status.success(), "{out:?}");
    let mut restored = target.client();
    for key in ["app", "app.a", "app.b.c", "other"] {
        assert_eq!(
            restored.get(key).unwrap(),
            client.get(key).unwrap(),
            "{key}"
        );
    }

    let bad = "{\"key\":\"r.a\",\"value\":1}\n\n{\"key\":\"r..b\",\"value\":2}\n{\"key\":\"r.c\",\"value\":3}\n";
    let out = target.cli_with_stdin(&["restore"], bad);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("line 3"), "{out:?}");
    assert!(stderr(&out).contains("invalid_key"), "{out:?}");
    assert_eq!(restored.get("r.a").unwrap(), Some(json!(1)));
    assert_eq!(restored.get("r.c").unwrap(), None, "stopped at line 3");
    let out = target.cli_with_stdin(&["restore"], "not json\n");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("line 1"), "{out:?}");
}

/// A session's put value is the rest of the line after the one space that follows the key,
/// kept exactly, and words like `--help` are values (issue-11 adversary).
#[test]
fn session_put_keeps_the_rest_of_the_line_exactly() {
    let server = Server::start();
    let lines = [
        "put s.a a ",
        "put s.b  two  spaces ",
        "put s.c --help",
        "put s.d -h",
        "put s.e --",
        "put s.f -- --json",
        "put s.g -5",
        "put s.h #hash",
    ];
    let out = server.cli_with_stdin(&[], &(lines.join("\n") + "\n"));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), "", "{}", stderr(&out));
    let got = server.client().get_matching("s.*").unwrap();
    let expected = json!({
        "s.a": "a ", "s.b": " two  spaces ", "s.c": "--help", "s.d": "-h",
        "s.e": "--", "s.f": "--json", "s.g": -5, "s.h": "#hash",
    });
    assert_eq!(serde_json::to_value(&got).unwrap(), expected);
}

//! `nkv-client`: one-shot commands, exit codes, `--json`, `--help`, the piped interactive
//! mode and `subscribe`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{wait_until, BoundedOutput, Server, CLIENT, DEADLINE};

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).expect("utf-8 stderr")
}

/// Asserts a successful run that printed exactly `expected`.
#[track_caller]
fn ok(out: Output, expected: &str) {
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), expected, "stderr: {}", stderr(&out));
}

/// Asserts a failed run with `code` that printed nothing on stdout and an error naming each of
/// `mentions` on stderr.
#[track_caller]
fn fails(out: Output, code: i32, mentions: &[&str]) {
    assert_eq!(out.status.code(), Some(code), "{out:?}");
    assert_eq!(stdout(&out), "", "nothing on stdout");
    let err = stderr(&out);
    for word in mentions {
        assert!(err.contains(word), "stderr {err:?} mentions {word:?}");
    }
}

#[test]
fn get_prints_strings_raw_and_other_json_as_json() {
    let server = Server::start();
    let mut client = server.client();
    client.put("v.s", "hello world").unwrap();
    client.put("v.q", "say \"hi\"").unwrap();
    client.put("v.ml", "line 1\nline 2").unwrap();
    client.put("v.n", &42).unwrap();
    client.put("v.f", &1.5).unwrap();
    client.put("v.o", &json!({"a": [1, true, null]})).unwrap();
    client.put("v.z", &Value::Null).unwrap();
    client.put("v.b", &false).unwrap();
    client.put("v.e", "").unwrap();
    ok(server.cli(&["get", "v.s"]), "hello world\n");
    ok(server.cli(&["get", "v.q"]), "say \"hi\"\n");
    ok(server.cli(&["get", "v.ml"]), "line 1\nline 2\n");
    ok(server.cli(&["get", "v.n"]), "42\n");
    ok(server.cli(&["get", "v.f"]), "1.5\n");
    ok(server.cli(&["get", "v.o"]), "{\"a\":[1,true,null]}\n");
    ok(server.cli(&["get", "v.z"]), "null\n");
    ok(server.cli(&["get", "v.b"]), "false\n");
    ok(server.cli(&["get", "v.e"]), "\n");
    // A pattern prints `key value` lines, sorted.
    client.put("w.b", &json!([1])).unwrap();
    client.put("w.a", "x y").unwrap();
    client.put("w", &0).unwrap();
    ok(server.cli(&["get", "w.*"]), "w.a x y\nw.b [1]\n");
    ok(server.cli(&["get", "nothing.*"]), "");
}

#[test]
fn put_stores_json_or_a_string_and_reads_stdin_for_dash() {
    let server = Server::start();
    let mut client = server.client();
    let cases = [
        ("42", json!(42)),
        ("{\"a\":1}", json!({"a": 1})),
        ("[1, \"two\"]", json!([1, "two"])),
        ("true", json!(true)),
        ("null", Value::Null),
        ("hello world", json!("hello world")),
        ("\"quoted\"", json!("quoted")),
        ("{broken", json!("{broken")),
        ("", json!("")),
    ];
    for (i, (arg, expected)) in cases.iter().enumerate() {
        let key = format!("p.k{i}");
        let out = server.cli(&["put", &key, arg]);
        assert_eq!(out.status.code(), Some(0), "put {arg:?}: {out:?}");
        assert_eq!(
            client.get(&key).unwrap().as_ref(),
            Some(expected),
            "{arg:?}"
        );
    }
    // `-` reads standard input; one trailing newline is dropped.
    let stdin_cases = [
        ("{\"z\":[1,2]}\n", json!({"z": [1, 2]})),
        ("plain text\n", json!("plain text")),
        ("two\nlines\n", json!("two\nlines")),
        ("7", json!(7)),
    ];
    for (i, (input, expected)) in stdin_cases.iter().enumerate() {
        let key = format!("in.k{i}");
        let out = server.cli_with_stdin(&["put", &key, "-"], input);
        assert_eq!(out.status.code(), Some(0), "put - {input:?}: {out:?}");
        assert_eq!(
            client.get(&key).unwrap().as_ref(),
            Some(expected),
            "{input:?}"
        );
    }
    // Overwrite.
    ok(server.cli(&["put", "p.k0", "43"]), "");
    assert_eq!(client.get("p.k0").unwrap(), Some(json!(43)));
}

#[test]
fn delete_and_keys() {
    let server = Server::start();
    let mut client = server.client();
    for key in ["a", "a.b", "a.c.d", "ab.x", "z"] {
        client.put(key, &1).unwrap();
    }
    ok(server.cli(&["keys"]), "a\na.b\na.c.d\nab.x\nz\n");
    ok(server.cli(&["keys", "a.*"]), "a.b\na.c.d\n");
    ok(server.cli(&["keys", "q.*"]), "");

    ok(server.cli(&["delete", "z"]), "");
    assert_eq!(client.get("z").unwrap(), None);
    fails(server.cli(&["delete", "z"]), 1, &["not_found"]);
    fails(server.cli(&["del", "z"]), 1, &["not_found"]);

    // A pattern deletes every matching key and says how many.
    let out = server.cli(&["delete", "a.*"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).contains('2'), "reports the count: {out:?}");
    assert_eq!(client.keys(None).unwrap(), ["a", "ab.x"]);
    ok(server.cli(&["keys"]), "a\nab.x\n");
}

#[test]
fn health_and_version() {
    let server = Server::start();
    let out = server.cli(&["health"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).contains("ok"), "{out:?}");
    ok(
        server.cli(&["version"]),
        &format!("{}\n", env!("CARGO_PKG_VERSION")),
    );
    let out = server.cli(&["--version"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).contains(env!("CARGO_PKG_VERSION")), "{out:?}");
}

#[test]
fn exit_codes_and_errors_on_stderr() {
    let mut server = Server::start();
    fails(
        server.cli(&["get", "missing"]),
        1,
        &["not_found", "missing"],
    );
    fails(server.cli(&["get", "a..b"]), 2, &["invalid_key"]);
    fails(server.cli(&["get", "a/b"]), 2, &["invalid_key", "'/'"]);
    fails(server.cli(&["put", "../x", "1"]), 2, &["invalid_key"]);
    fails(server.cli(&["delete", "a.*.b"]), 2, &["invalid_key"]);
    fails(server.cli(&["keys", "a..*"]), 2, &["invalid_key"]);
    // Usage errors.
    let out = server.cli(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(!stderr(&out).is_empty());
    let out = server.cli(&["put", "k"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(server.client().get("k").unwrap(), None);

    // The server not running: every command fails with 2, naming the socket.
    assert!(server.stop().success());
    let socket = server.socket.display().to_string();
    for args in [
        &["get", "a"][..],
        &["put", "a", "1"],
        &["delete", "a"],
        &["keys"],
        &["health"],
        &["version"],
    ] {
        fails(server.cli(args), 2, &[&socket]);
    }
    let out = Command::new(CLIENT)
        .args(["--socket", "/nonexistent/nkv.sock", "health"])
        .bounded_output()
        .expect("run nkv-client");
    fails(out, 2, &["/nonexistent/nkv.sock"]);
}

#[test]
fn json_flag_prints_the_response_line_as_is() {
    let server = Server::start();
    ok(
        server.cli(&["--json", "put", "a", "{\"x\":1}"]),
        "{\"ok\":true,\"rev\":1}\n",
    );
    ok(
        server.cli(&["--json", "get", "a"]),
        "{\"ok\":true,\"key\":\"a\",\"value\":{\"x\":1},\"rev\":1,\"class\":\"persistent\"}\n",
    );
    // The same bytes as the server sends to socat.
    assert_eq!(
        stdout(&server.cli(&["get", "a", "--json"])),
        server.socat("GET a\n")
    );
    ok(
        server.cli(&["--json", "get", "*"]),
        "{\"ok\":true,\"values\":{\"a\":{\"x\":1}}}\n",
    );
    ok(
        server.cli(&["--json", "keys"]),
        "{\"ok\":true,\"keys\":[\"a\"]}\n",
    );
    ok(
        server.cli(&["--json", "health"]),
        "{\"ok\":true,\"status\":\"ok\"}\n",
    );
    ok(
        server.cli(&["--json", "version"]),
        &format!(
            "{{\"ok\":true,\"version\":\"{}\"}}\n",
            env!("CARGO_PKG_VERSION")
        ),
    );
    ok(
        server.cli(&["--json", "delete", "a"]),
        "{\"ok\":true,\"rev\":2}\n",
    );
    // Errors: the error line on stdout, the same exit codes.
    let out = server.cli(&["--json", "get", "a"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let line: Value = serde_json::from_str(&stdout(&out)).expect("a JSON line");
    assert_eq!(line["ok"], false);
    assert_eq!(line["error"], "not_found");
    let out = server.cli(&["--json", "get", "a..b"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let line: Value = serde_json::from_str(&stdout(&out)).expect("a JSON line");
    assert_eq!(line["error"], "invalid_key");
}

#[test]
fn help_lists_the_flags_of_every_command() {
    // No server needed for help.
    let help = |args: &[&str]| {
        let out = Command::new(CLIENT)
            .args(["--socket", "/nonexistent/nkv.sock"])
            .args(args)
            .bounded_output()
            .expect("run nkv-client");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        stdout(&out)
    };
    let top = help(&["--help"]);
    let commands = [
        "get",
        "put",
        "delete",
        "keys",
        "subscribe",
        "health",
        "version",
        "stats",
        "trace",
    ];
    for word in commands
        .iter()
        .chain(&["--socket", "--json", "--help", "--version"])
    {
        assert!(top.contains(word), "top-level help lists {word}:\n{top}");
    }
    let short = help(&["-h"]);
    for word in commands.iter().chain(&["--socket", "--json", "--help"]) {
        assert!(short.contains(word), "-h lists {word}:\n{short}");
    }
    for command in commands {
        for flag in ["--help", "-h"] {
            let text = help(&[command, flag]);
            let usage = format!("Usage: nkv-client {command}");
            assert!(text.contains(&usage), "{command} {flag}:\n{text}");
            for word in ["--socket", "--json", "--help"] {
                assert!(
                    text.contains(word),
                    "{command} {flag} lists {word}:\n{text}"
                );
            }
        }
        assert_eq!(help(&["help", command]), help(&[command, "--help"]));
    }
}

#[test]
fn piped_interactive_session_runs_until_quit() {
    let server = Server::start();
    let input = "put a 1\nget a\nput b hello world\nget b\nput c {\"x\": [1]}\nget c\n\
                 keys\ndelete a\nkeys\nhelp\nhealth\nquit\nput after 1\n";
    let out = server.cli_with_stdin(&[], input);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    let (before_help, help) = text
        .split_once("a\nb\nc\nb\nc\n")
        .unwrap_or_else(|| panic!("keys before and after the delete: {text:?}"));
    assert_eq!(before_help, "1\nhello world\n{\"x\":[1]}\n");
    for word in ["get", "put", "delete", "keys", "quit"] {
        assert!(help.contains(word), "help lists {word}: {help:?}");
    }
    assert!(help.ends_with("ok\n"), "health after help: {help:?}");
    // The session stopped at quit.
    let mut client = server.client();
    assert_eq!(client.keys(None).unwrap(), ["b", "c"]);
    assert_eq!(client.get("b").unwrap(), Some(json!("hello world")));

    // End of input also ends the session; a failed command makes it fail.
    let out = server.cli_with_stdin(&[], "get a..b\nput d 4\n");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("invalid_key"), "{out:?}");
    assert_eq!(
        client.get("d").unwrap(),
        Some(json!(4)),
        "later lines still run"
    );
    // --json in a session prints response lines.
    let out = server.cli_with_stdin(&["--json"], "get d\nquit\n");
    assert_eq!(
        stdout(&out),
        "{\"ok\":true,\"key\":\"d\",\"value\":4,\"rev\":5,\"class\":\"persistent\"}\n"
    );
}

/// A running `nkv-client subscribe`, killed if the test fails; stdout lines arrive on `lines`.
struct Subscriber {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Subscriber {
    fn spawn(server: &Server, args: &[&str]) -> Subscriber {
        let mut child = server
            .cli_command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nkv-client subscribe");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Subscriber { child, lines }
    }

    /// The next stdout line; panics after the deadline.
    #[track_caller]
    fn line(&self) -> String {
        self.lines
            .recv_timeout(DEADLINE)
            .expect("a line from nkv-client subscribe")
    }

    fn interrupt_and_wait(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
        let end = Instant::now() + Duration::from_secs(5);
        let mut status = None;
        wait_until("nkv-client to exit after SIGINT", || {
            status = self.child.try_wait().expect("try_wait");
            assert!(Instant::now() < end, "nkv-client ignored SIGINT");
            status.is_some()
        });
        status.expect("exited")
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn subscribe_prints_init_ready_and_change_lines() {
    let server = Server::start();
    let mut client = server.client();
    client.put("a.x", &1).unwrap();
    client.put("a.s", "some text").unwrap();
    client.put("ab", &0).unwrap();
    let sub = Subscriber::spawn(&server, &["subscribe", "a"]);
    assert_eq!(sub.line(), "init a.s some text");
    assert_eq!(sub.line(), "init a.x 1");
    assert_eq!(sub.line(), "ready a 2");
    client.put("a.y", &json!({"v": [1]})).unwrap();
    assert_eq!(sub.line(), "put a.y {\"v\":[1]}");
    // Not covered: `ab` is not below `a`. The next line is the next covered change.
    client.put("ab", &1).unwrap();
    client.put("b", &1).unwrap();
    client.delete("a.x").unwrap();
    assert_eq!(sub.line(), "del a.x");
    client.put("a", "self").unwrap();
    assert_eq!(sub.line(), "put a self");
}

#[test]
fn subscribe_exits_130_on_sigint() {
    let server = Server::start();
    let mut client = server.client();
    let sub = Subscriber::spawn(&server, &["subscribe", "a"]);
    assert_eq!(sub.line(), "ready a 0");
    client.put("a.b", &1).unwrap();
    assert_eq!(sub.line(), "put a.b 1");
    // The shell's convention (128 + SIGINT), so that a loop around it stops.
    let status = sub.interrupt_and_wait();
    assert_eq!(
        status.code(),
        Some(130),
        "exit status after SIGINT: {status:?}"
    );
}

#[test]
fn subscribe_with_json_prints_event_lines() {
    let server = Server::start();
    let mut client = server.client();
    client.put("k.a", &1).unwrap();
    let sub = Subscriber::spawn(&server, &["--json", "sub", "k.*"]);
    assert_eq!(
        sub.line(),
        "{\"event\":\"init\",\"key\":\"k.a\",\"value\":1,\"rev\":1}"
    );
    let epoch = std::fs::read_to_string(server.data.join(".epoch"))
        .unwrap()
        .trim_end()
        .to_owned();
    assert_eq!(
        sub.line(),
        format!(
            "{{\"event\":\"ready\",\"sub\":\"k.*\",\"count\":1,\"rev\":1,\"epoch\":\"{epoch}\"}}"
        )
    );
    let rev = client.put("k.b", "t").unwrap();
    assert_eq!(
        sub.line(),
        format!("{{\"event\":\"put\",\"key\":\"k.b\",\"value\":\"t\",\"rev\":{rev}}}")
    );
}

#[test]
fn completions_and_man_page_are_generated_without_a_server() {
    for (shell, marker) in [
        ("bash", "complete"),
        ("zsh", "#compdef nkv-client"),
        ("fish", "complete -c nkv-client"),
    ] {
        let out = Command::new(CLIENT)
            .args(["--socket", "/nonexistent/nkv.sock", "completions", shell])
            .bounded_output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = stdout(&out);
        assert!(
            script.contains(marker),
            "{shell} completion lacks {marker:?}"
        );
        assert!(
            script.contains("subscribe"),
            "{shell} completion lacks the subcommands"
        );
    }
    let out = Command::new(CLIENT).arg("man").bounded_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let page = stdout(&out);
    assert!(
        page.contains(".TH nkv-client 1"),
        "{}",
        &page[..page.len().min(300)]
    );
    assert!(page.contains("subscribe"));
}

#[test]
fn keys_output_is_one_key_per_line_when_piped() {
    let server = Server::start();
    for key in ["a", "a.b.c", "b.x"] {
        ok(server.cli(&["put", key, "1"]), "");
    }
    ok(server.cli(&["keys"]), "a\na.b.c\nb.x\n");
}

/// On a terminal, `keys` draws the key tree; a segment that is only a branch ends with `.`.
#[test]
fn keys_output_is_a_tree_on_a_terminal() {
    let status = Command::new("script")
        .arg("--version")
        .bounded_output()
        .expect("script (util-linux) is needed for the terminal test: apt-get install util-linux");
    assert!(status.status.success());
    let server = Server::start();
    for key in ["a", "a.b.c", "a.b.d", "b.x"] {
        ok(server.cli(&["put", key, "1"]), "");
    }
    // `script` runs the command on a pseudo-terminal.
    let command = format!("{CLIENT} --socket {} keys", server.socket.display());
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .bounded_output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out).replace("\r\n", "\n"),
        "a\n  b.\n    c\n    d\nb.\n  x\n"
    );
}

/// Everything after KEY is the value, even words clap would take for flags (issue-11
/// adversary: `put k --help` printed help and stored nothing).
#[test]
fn put_takes_every_word_after_the_key_as_the_value() {
    let server = Server::start();
    for word in [
        "--help",
        "-h",
        "--json",
        "--timeout",
        "--version",
        "--socket=x",
        "--",
        "-5x",
    ] {
        ok(server.cli(&["put", "h.v", word]), "");
        ok(server.cli(&["get", "h.v"]), &format!("{word}\n"));
    }
    ok(server.cli(&["put", "h.n", "-5"]), "");
    ok(
        server.cli(&["--json", "get", "h.n"]),
        "{\"ok\":true,\"key\":\"h.n\",\"value\":-5,\"rev\":9,\"class\":\"persistent\"}\n",
    );
    ok(server.cli(&["put", "h.w", "-5", "--json", "--help"]), "");
    ok(server.cli(&["get", "h.w"]), "-5 --json --help\n");
    // A `--` after the key that is followed by more words only ends the flags.
    ok(server.cli(&["put", "h.d", "--", "--json"]), "");
    ok(server.cli(&["get", "h.d"]), "--json\n");
    // Flags before the key still work.
    ok(
        server.cli(&["--timeout", "5", "set", "h.t", "--timeout", "4"]),
        "",
    );
    ok(server.cli(&["get", "h.t"]), "--timeout 4\n");
    let help = server.cli(&["put", "--help"]);
    assert_eq!(help.status.code(), Some(0), "{help:?}");
    assert!(stdout(&help).contains("Store a value"), "{help:?}");
}

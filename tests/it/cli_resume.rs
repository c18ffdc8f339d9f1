//! `nkv-client`'s issue-12 features against the real server: `put`/`delete --if-rev` (exit 3 on
//! a conflict, naming the current revision), racing CLI writers, `put --session` held until
//! interrupted, and `subscribe`/`wait` that survive a server restart and converge.

use std::io::{BufRead, BufReader};
use std::process::{Child, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;

use crate::support::{wait_until, BoundedOutput, Server, DEADLINE};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A background `nkv-client`, killed if the test fails; its stdout lines arrive on `lines`,
/// its stderr is collected when it exits.
struct Background {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Background {
    fn spawn(server: &Server, args: &[&str]) -> Background {
        let mut child = server
            .cli_command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nkv-client");
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(err), &mut text);
            text
        });
        Background {
            child,
            lines,
            stderr,
        }
    }

    #[track_caller]
    fn line(&self) -> String {
        self.lines
            .recv_timeout(DEADLINE)
            .expect("a line from nkv-client")
    }

    /// The next `n` lines.
    #[track_caller]
    fn lines(&self, n: usize) -> Vec<String> {
        (0..n).map(|_| self.line()).collect()
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("kill");
    }

    /// Waits for the exit (failing after the deadline); the status and what went to stderr.
    fn wait(mut self) -> (ExitStatus, String) {
        let end = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(Instant::now() < end, "nkv-client did not exit");
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
        (status, stderr.join().unwrap_or_default())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn subscribers(server: &Server) -> usize {
    server.client().server_stats().unwrap().subscribers
}

#[test]
fn put_and_delete_if_rev_exit_3_on_a_conflict_naming_the_current_revision() {
    let server = Server::start();
    let out = server.cli(&["put", "--if-rev", "0", "lock", "me"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let rev = server.client().get_entry("lock").unwrap().unwrap().rev;

    let out = server.cli(&["put", "--if-rev", "0", "lock", "you"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        stderr(&out).contains(&format!("lock is at revision {rev}, not 0")),
        "{out:?}"
    );
    assert_eq!(server.client().get("lock").unwrap(), Some(json!("me")));
    // The value may look like a flag: everything after the key is the value.
    let out = server.cli(&["put", "--if-rev", &rev.to_string(), "lock", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(server.client().get("lock").unwrap(), Some(json!("--json")));

    let out = server.cli(&["delete", "--if-rev", &rev.to_string(), "lock"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        stderr(&out).contains(&format!("revision {}", rev + 1)),
        "{out:?}"
    );
    // --json prints the server's conflict line as it came.
    let out = server.cli(&["--json", "del", "--if-rev", "1000", "lock"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let line: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(
        (line["error"].clone(), line["rev"].clone()),
        (json!("conflict"), json!(rev + 1))
    );

    let out = server.cli(&["delete", "--if-rev", &(rev + 1).to_string(), "lock"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = server.cli(&["delete", "--if-rev", "5", "lock"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        stderr(&out).contains("does not exist (current revision 0)"),
        "{out:?}"
    );
    // `--if-rev 0` of a missing key: nothing to delete, not found (exit 1).
    let out = server.cli(&["delete", "--if-rev", "0", "lock"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // And in a session, a conflict makes the session's status 3, other lines going on.
    let out = server.cli_with_stdin(&[], "put --if-rev 7 s 1\nput s 2\n");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(server.client().get("s").unwrap(), Some(json!(2)));
}

#[test]
fn racing_cli_writers_at_one_revision_have_one_winner() {
    const WRITERS: usize = 6;
    let server = Server::start();
    let mut client = server.client();
    let mut rev = client.put("leader", &"none").unwrap();
    for round in 0..3 {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let mut cmd = server.cli_command(&[
                    "put",
                    "--if-rev",
                    &rev.to_string(),
                    "leader",
                    &format!("w{w}"),
                ]);
                std::thread::spawn(move || cmd.bounded_output().expect("nkv-client"))
            })
            .collect();
        let outs: Vec<Output> = writers.into_iter().map(|t| t.join().unwrap()).collect();
        let codes: Vec<Option<i32>> = outs.iter().map(|o| o.status.code()).collect();
        let winners: Vec<usize> = (0..WRITERS).filter(|&w| codes[w] == Some(0)).collect();
        assert_eq!(winners.len(), 1, "round {round}: {outs:?}");
        assert!(
            codes.iter().all(|c| *c == Some(0) || *c == Some(3)),
            "round {round}: {outs:?}"
        );
        let entry = client.get_entry("leader").unwrap().unwrap();
        assert_eq!(entry.value, json!(format!("w{}", winners[0])));
        assert_eq!(entry.rev, rev + 1, "one revision taken");
        rev = entry.rev;
    }
}

#[test]
fn put_session_holds_the_key_until_interrupted_then_it_is_deleted() {
    let server = Server::start();
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        let mut sub = server.raw();
        sub.subscribe("svc");
        let holder = Background::spawn(&server, &["put", "--session", "svc.alive", "{\"pid\": 7}"]);
        let put = sub.json();
        assert_eq!(
            (
                put["event"].clone(),
                put["key"].clone(),
                put["value"].clone()
            ),
            (json!("put"), json!("svc.alive"), json!({"pid": 7}))
        );
        let stats = server.client().server_stats().unwrap();
        assert_eq!(stats.sessions, 1);
        holder.signal(signal);
        let (status, err) = holder.wait();
        assert_eq!(status.code(), Some(0), "{signal}: {status:?} {err}");
        let del = sub.json();
        assert_eq!(
            (del["event"].clone(), del["key"].clone()),
            (json!("del"), json!("svc.alive")),
            "{signal}"
        );
        assert_eq!(server.client().get("svc.alive").unwrap(), None);
    }
    // Killed outright, the same: the server sees the connection close.
    let holder = Background::spawn(&server, &["put", "--session", "svc.alive", "1"]);
    wait_until("the session key", || {
        server.client().get("svc.alive").unwrap().is_some()
    });
    drop(holder);
    wait_until("the session key to go", || {
        server.client().get("svc.alive").unwrap().is_none()
    });
}

#[test]
fn put_session_puts_the_key_again_when_the_server_returns() {
    let mut server = Server::start();
    let holder = Background::spawn(&server, &["put", "--session", "svc.alive", "1"]);
    wait_until("the session key", || {
        server.client().get("svc.alive").unwrap().is_some()
    });
    server.restart();
    wait_until("the session key to be put again", || {
        server.client().get("svc.alive").unwrap().is_some()
    });
    holder.signal(Signal::SIGTERM);
    let (status, err) = holder.wait();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("putting it again"), "{err}");
    wait_until("the session key to go", || {
        server.client().get("svc.alive").unwrap().is_none()
    });
}

#[test]
fn put_session_in_a_session_lives_with_the_session() {
    let server = Server::start();
    let out = server.cli_with_stdin(&[], "put --session s.k 1\nget s.k\n");
    assert_eq!(
        (out.status.code(), stdout(&out)),
        (Some(0), "1\n".into()),
        "{out:?}"
    );
    // The server ends the session when it sees the connection close, which may be just after
    // the CLI has exited.
    wait_until("the session key to go with the session", || {
        server.client().get("s.k").unwrap().is_none()
    });
}

/// Keys below `a` (and `b`, not covered).
fn fill(server: &Server) {
    let mut client = server.client();
    client.put("a.k0", &0).unwrap();
    client.put("a.k1", &1).unwrap();
    client.put("a.gone", &"soon").unwrap();
    client.put("b", &0).unwrap();
}

/// What changes while the subscriber is away.
fn change_while_away(server: &Server) {
    let mut client = server.client();
    client.put("a.k1", &json!({"changed": true})).unwrap();
    client.put("a.new", &1).unwrap();
    client.delete("a.gone").unwrap();
    client.put("a.tmp", &1).unwrap();
    client.delete("a.tmp").unwrap();
    client.put("b", &1).unwrap();
}

/// A stopped `subscribe` reads nothing while the server restarts and changes: when continued,
/// it finds its connection gone and resumes. (SIGSTOP makes the gap certain.)
fn restart_while_stopped(server: &mut Server, sub: &Background, crash: bool) {
    sub.signal(Signal::SIGSTOP);
    if crash {
        server.restart();
    } else {
        assert!(server.stop().success());
        server.spawn_and_wait();
    }
    change_while_away(server);
    sub.signal(Signal::SIGCONT);
}

#[test]
fn subscribe_resumes_across_a_clean_restart_with_the_missed_changes() {
    let mut server = Server::start();
    fill(&server);
    let sub = Background::spawn(&server, &["subscribe", "a"]);
    assert_eq!(
        sub.lines(4),
        [
            "init a.gone soon",
            "init a.k0 0",
            "init a.k1 1",
            "ready a 3"
        ]
    );
    restart_while_stopped(&mut server, &sub, false);
    let mut resumed = sub.lines(3);
    resumed.sort();
    assert_eq!(
        resumed,
        ["del a.gone", "put a.k1 {\"changed\":true}", "put a.new 1"],
        "exactly the missed changes"
    );
    assert!(sub.line().starts_with("ready a "));
    let rev = server.client().put("a.live", &2).unwrap();
    assert_eq!(sub.line(), "put a.live 2", "live again at rev {rev}");
    sub.signal(Signal::SIGINT);
    let (status, err) = sub.wait();
    assert_eq!(status.code(), Some(130));
    assert!(
        err.contains("reconnecting") && err.contains("resuming after rev"),
        "{err}"
    );
}

#[test]
fn subscribe_after_a_crash_prints_reset_and_drops_the_key_deleted_meanwhile() {
    // `a.mem` is memory class: after a crash a resume of `a` cannot be answered from the
    // delete history (a crash loses memory keys without a record), so it gets a reset.
    let mut server = Server::start_with(&["--class", "a.mem=memory"]);
    fill(&server);
    let sub = Background::spawn(&server, &["--json", "subscribe", "a"]);
    assert!(sub.lines(4)[3].contains("\"ready\""));
    restart_while_stopped(&mut server, &sub, true);
    let reset: serde_json::Value = serde_json::from_str(&sub.line()).unwrap();
    assert_eq!(reset, json!({"event": "reset", "sub": "a"}));
    let mut keys = std::collections::BTreeMap::new();
    loop {
        let event: serde_json::Value = serde_json::from_str(&sub.line()).unwrap();
        match event["event"].as_str().unwrap() {
            "init" => {
                keys.insert(
                    event["key"].as_str().unwrap().to_owned(),
                    event["value"].clone(),
                );
            }
            "del" => {
                assert_eq!(event, json!({"event": "del", "key": "a.gone", "rev": 0}));
                keys.remove("a.gone");
            }
            "ready" => break,
            other => panic!("unexpected {other}: {event}"),
        }
    }
    assert_eq!(
        keys,
        std::collections::BTreeMap::from([
            ("a.k0".to_owned(), json!(0)),
            ("a.k1".to_owned(), json!({"changed": true})),
            ("a.new".to_owned(), json!(1)),
        ]),
        "converged on the server's state"
    );
}

#[test]
fn wait_waits_across_a_restart() {
    let mut server = Server::start();
    let waiter = Background::spawn(&server, &["wait", "svc.up", "--equals", "yes"]);
    wait_until("the waiter to subscribe", || subscribers(&server) == 1);
    server.client().put("svc.up", &"no").unwrap();
    server.restart();
    wait_until("the waiter to subscribe again", || {
        subscribers(&server) == 1
    });
    server.client().put("svc.up", &"yes").unwrap();
    assert_eq!(waiter.line(), "yes");
    let (status, err) = waiter.wait();
    assert_eq!(status.code(), Some(0), "{err}");
}

#[test]
fn wait_timeout_bounds_the_wait_for_the_server_to_return() {
    let mut server = Server::start();
    let waiter = Background::spawn(&server, &["--timeout", "1", "wait", "svc.up"]);
    wait_until("the waiter to subscribe", || subscribers(&server) == 1);
    server.kill();
    let (status, err) = waiter.wait();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("--timeout"), "{err}");
}

//! `nkv-client subscribe`, `wait` and `watch`: built on one subscription, with the exit
//! statuses scripts and `ExecStartPre=` rely on.

use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{wait_until, BoundedOutput, Server, DEADLINE};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A background `nkv-client` whose output is collected when it exits.
struct Running(Option<Child>);

impl Running {
    fn spawn(server: &Server, args: &[&str]) -> Running {
        let child = server
            .cli_command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nkv-client");
        Running(Some(child))
    }

    fn exited(&mut self) -> bool {
        self.0
            .as_mut()
            .expect("running")
            .try_wait()
            .expect("try_wait")
            .is_some()
    }

    /// Waits for the exit (failing after `DEADLINE`) and returns the output.
    fn finish(mut self) -> Output {
        wait_until("nkv-client to exit", || self.exited());
        self.0.take().unwrap().wait_with_output().expect("output")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The server's `subscribers` count reaches `n`: a follower is subscribed.
fn wait_subscribers(server: &Server, n: usize) {
    let mut client = server.client();
    wait_until("the follower to subscribe", || {
        client.server_stats().unwrap().subscribers == n
    });
}

#[test]
fn wait_prints_an_existing_value_at_once() {
    let server = Server::start();
    server
        .client()
        .put("svc.ready", &json!({"port": 80}))
        .unwrap();
    let out = server.cli(&["wait", "svc.ready"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), "{\"port\":80}\n");
}

#[test]
fn wait_blocks_until_the_key_has_the_value() {
    let server = Server::start();
    let mut client = server.client();
    client.put("svc.state", "starting").unwrap();
    // A key below does not count; nor does another value.
    let waiter = Running::spawn(&server, &["wait", "svc.state", "--equals", "up"]);
    wait_subscribers(&server, 1);
    client.put("svc.state.sub", "up").unwrap();
    client.put("svc.state", "degraded").unwrap();
    client.put("svc.state", "up").unwrap();
    let out = waiter.finish();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), "up\n");

    let waiter = Running::spawn(&server, &["wait", "new.key", "--timeout", "30"]);
    wait_subscribers(&server, 1);
    client.put("new.key", &7).unwrap();
    let out = waiter.finish();
    assert_eq!((out.status.code(), stdout(&out)), (Some(0), "7\n".into()));
}

#[test]
fn wait_exits_1_on_timeout_and_2_on_errors() {
    let mut server = Server::start();
    let started = Instant::now();
    let out = server.cli(&["wait", "never", "--timeout", "0.3"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(stderr(&out).contains("--timeout"), "{out:?}");
    assert_eq!(stdout(&out), "");
    let out = server.cli(&["wait", "a..b"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = server.cli(&["wait", "a.*"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // With --no-reconnect the server stopping is an error for a waiter: the key never came.
    // (Without, it waits for the server to return: `wait_waits_across_a_restart`.)
    let waiter = Running::spawn(&server, &["wait", "--no-reconnect", "never"]);
    wait_subscribers(&server, 1);
    assert!(server.stop().success());
    let out = waiter.finish();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("stopped"), "{out:?}");
}

#[test]
fn subscribe_no_reconnect_exits_0_on_shutdown_and_2_when_the_connection_is_lost() {
    let mut server = Server::start();
    let sub = Running::spawn(&server, &["subscribe", "--no-reconnect", "a"]);
    wait_subscribers(&server, 1);
    assert!(server.stop().success());
    let out = sub.finish();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), "ready a 0\nshutdown\n");

    server.spawn_and_wait();
    let sub = Running::spawn(&server, &["--json", "subscribe", "--no-reconnect", "a"]);
    wait_subscribers(&server, 1);
    assert!(server.stop().success());
    let out = sub.finish();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let epoch = std::fs::read_to_string(server.data.join(".epoch"))
        .unwrap()
        .trim_end()
        .to_owned();
    assert_eq!(
        stdout(&out),
        format!("{{\"event\":\"ready\",\"sub\":\"a\",\"count\":0,\"rev\":0,\"epoch\":\"{epoch}\"}}\n{{\"event\":\"shutdown\"}}\n")
    );

    server.spawn_and_wait();
    let sub = Running::spawn(&server, &["subscribe", "--no-reconnect", "a"]);
    wait_subscribers(&server, 1);
    server.kill();
    let out = sub.finish();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("lost"), "{out:?}");
}

#[test]
fn a_subscribing_client_holds_one_connection() {
    let server = Server::start();
    let _sub = Running::spawn(&server, &["subscribe", "a"]);
    let mut client = server.client();
    wait_until("the subscriber", || {
        client.server_stats().unwrap().subscribers == 1
    });
    // This client's connection plus the subscriber's: no idle request connection beside it.
    // (Connections close asynchronously, so the count settles; a held one never would.)
    wait_until("two connections", || {
        client.server_stats().unwrap().connections == 2
    });
}

/// A watch command that logs its environment to `log` and, while `gate` is absent, waits.
fn logging_command(dir: &std::path::Path) -> Vec<String> {
    let script = format!(
        "printf '%s %s %s %s\\n' \"$NKV_EVENT\" \"$NKV_KEY\" \"${{NKV_VALUE-unset}}\" \"$NKV_REV\" >> {log}; \
         while [ ! -e {gate} ]; do sleep 0.01; done; \
         [ \"$NKV_KEY\" != w.fail ]",
        log = dir.join("log").display(),
        gate = dir.join("gate").display()
    );
    vec!["sh".into(), "-c".into(), script]
}

fn log_lines(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn watch_runs_the_command_serially_coalescing_per_key() {
    let mut server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut client = server.client();
    client.put("w.old", &0).unwrap();
    let mut args = vec!["watch", "w", "--no-init", "--no-reconnect", "--"];
    let command = logging_command(dir.path());
    args.extend(command.iter().map(String::as_str));
    let mut watch = Running::spawn(&server, &args);
    wait_subscribers(&server, 1);
    let first = client.put("w.k", &0).unwrap();
    wait_until("the first run", || log_lines(dir.path()).len() == 1);
    // While that run waits, w.k changes five times and w.m once.
    let mut last = 0;
    for n in 1..=5 {
        last = client.put("w.k", &n).unwrap();
    }
    let m = client.put("w.m", "text").unwrap();
    let events_before = client.server_stats().unwrap().events;
    assert!(events_before >= 7, "the server queued the events");
    std::fs::write(dir.path().join("gate"), "").unwrap();
    wait_until("the coalesced runs", || log_lines(dir.path()).len() >= 3);
    let del = client.delete("w.k").unwrap().unwrap();
    client.put("w.fail", &1).unwrap();
    wait_until("the delete's and the failing run", || {
        log_lines(dir.path()).len() >= 5
    });
    assert_eq!(
        log_lines(dir.path()),
        [
            format!("put w.k 0 {first}"),
            format!("put w.k 5 {last}"),
            format!("put w.m \"text\" {m}"),
            format!("del w.k unset {del}"),
            format!("put w.fail 1 {}", del + 1),
        ]
    );
    // A failed run is reported; the watch goes on until the server stops (--no-reconnect).
    assert!(!watch.exited(), "the watch goes on after a failed run");
    assert!(server.stop().success());
    let out = watch.finish();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stderr(&out).contains("failed for put w.fail"), "{out:?}");
}

#[test]
fn watch_runs_for_the_initial_values_unless_no_init() {
    let mut server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gate"), "").unwrap();
    let mut client = server.client();
    let rev = client.put("w.a", &json!([1])).unwrap();
    client.put("x.b", &1).unwrap();
    let command = logging_command(dir.path());
    let mut args = vec!["watch", "--no-reconnect", "w", "--"];
    args.extend(command.iter().map(String::as_str));
    let watch = Running::spawn(&server, &args);
    wait_until("the init run", || log_lines(dir.path()).len() == 1);
    assert_eq!(log_lines(dir.path()), [format!("init w.a [1] {rev}")]);
    server.kill();
    let out = watch.finish();
    assert_eq!(out.status.code(), Some(2), "connection lost: {out:?}");
    let out = server.cli(&["watch", "w"]);
    assert_eq!(out.status.code(), Some(2), "no command: {out:?}");
}

#[test]
fn watch_stops_when_the_command_cannot_be_started() {
    let server = Server::start();
    server.client().put("w.a", &1).unwrap();
    let start = Instant::now();
    let out = server.cli(&["watch", "w", "--", "/nonexistent/cmd"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("/nonexistent/cmd"), "{out:?}");
    assert!(start.elapsed() < DEADLINE);
}

/// `wait --timeout` against a server that accepts and never answers is a timeout (exit 1),
/// like a key that never comes, not an error (issue-11 adversary).
#[test]
fn wait_times_out_with_1_when_the_server_never_answers() {
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
            "wait",
            "a",
        ])
        .bounded_output()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(
        stderr(&out).contains("no answer from the server"),
        "{out:?}"
    );
    held.join().unwrap();
}

/// Stops (SIGSTOP) or continues (SIGCONT) a background client: while stopped it reads nothing,
/// so a restart meanwhile is certain to be a gap it must resume over.
fn pause(running: &Running, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(running.0.as_ref().expect("running").id() as i32);
    nix::sys::signal::kill(pid, signal).expect("kill");
}

#[test]
fn watch_resumes_across_restarts_and_runs_for_what_changed_meanwhile() {
    use nix::sys::signal::Signal;
    // `w.mem` is memory class, so after the crash below the resume of `w` gets a reset.
    let mut server = Server::start_with(&["--class", "w.mem=memory"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gate"), "").unwrap();
    let mut client = server.client();
    client.put("w.a", &1).unwrap();
    client.put("w.b", &1).unwrap();
    let command = logging_command(dir.path());
    let mut args = vec!["watch", "w", "--no-init", "--"];
    args.extend(command.iter().map(String::as_str));
    let mut watch = Running::spawn(&server, &args);
    wait_subscribers(&server, 1);

    // A clean restart: the server's history answers, only the missed changes run.
    pause(&watch, Signal::SIGSTOP);
    assert!(server.stop().success());
    server.spawn_and_wait();
    let mut client = server.client();
    let a = client.put("w.a", &2).unwrap();
    let c = client.put("w.c", &3).unwrap();
    pause(&watch, Signal::SIGCONT);
    wait_until("the missed changes' runs", || {
        log_lines(dir.path()).len() >= 2
    });
    let mut runs = log_lines(dir.path());
    runs.sort();
    assert_eq!(runs, [format!("put w.a 2 {a}"), format!("put w.c 3 {c}")]);

    // A crash: reset; every key runs as init (any may have changed), the deleted one as del.
    pause(&watch, Signal::SIGSTOP);
    server.restart();
    let mut client = server.client();
    let b = client.delete("w.b").unwrap().unwrap();
    pause(&watch, Signal::SIGCONT);
    wait_until("the reset's runs", || log_lines(dir.path()).len() >= 5);
    let mut runs = log_lines(dir.path())[2..].to_vec();
    runs.sort();
    assert_eq!(
        runs,
        [
            "del w.b unset 0".to_owned(),
            format!("init w.a 2 {a}"),
            format!("init w.c 3 {c}"),
        ],
        "(w.b deleted at {b})"
    );
    assert!(!watch.exited(), "the watch goes on");
    let live = client.put("w.d", &4).unwrap();
    wait_until("the live run", || log_lines(dir.path()).len() >= 6);
    assert_eq!(log_lines(dir.path())[5], format!("put w.d 4 {live}"));
}

//! Polling for a sequential client's next request (`--spin`): bounded, off on request, and an
//! idle connection costs the server no CPU.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{BoundedOutput, Server, SERVER};

/// The server's CPU time (user + system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit(") ").next().expect("stat fields");
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[test]
fn a_connection_waiting_for_its_client_costs_the_server_no_cpu() {
    let server = Server::start();
    let mut raw = server.raw();
    // A fast sequential client first, so the connection polls, then silence.
    for i in 0..2_000 {
        assert_eq!(raw.request(&format!("PUT s.k {i}"))["ok"], true);
    }
    let before = cpu_ticks(server.pid());
    let quiet_from = Instant::now();
    while quiet_from.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let spent = cpu_ticks(server.pid()) - before;
    // A poller that never stops would burn ~100 ticks (one CPU for a second); a 50 µs window
    // rounds to nothing.
    assert!(
        spent <= 5,
        "the server used {spent} ticks of CPU in a second with one silent connection"
    );
    assert_eq!(raw.request("GET s.k")["value"], 1999);
}

#[test]
fn spin_is_configurable_validated_and_logged() {
    let server = Server::start_with(&["--spin", "0"]);
    assert!(
        server.log_text().contains("spin=0us (flag)"),
        "{}",
        server.log_text()
    );
    let mut raw = server.raw();
    assert_eq!(raw.request("PUT s.k 1")["ok"], true);
    assert_eq!(raw.request("GET s.k")["value"], 1);

    let server = Server::start_with_env(&[], &[("NKV_SPIN", "200")]);
    assert!(
        server.log_text().contains("spin=200us (env)"),
        "{}",
        server.log_text()
    );
    let server = Server::start();
    assert!(
        server.log_text().contains("spin=50us (default)"),
        "{}",
        server.log_text()
    );

    for (args, env) in [(&["--spin", "20000"][..], None), (&[][..], Some("abc"))] {
        let mut cmd = Command::new(SERVER);
        cmd.args(args).args(["--socket", "/nonexistent/x.sock"]);
        if let Some(v) = env {
            cmd.env("NKV_SPIN", v);
        }
        let out = cmd.bounded_output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--spin") && err.contains("NKV_SPIN"), "{err}");
        assert!(!err.contains("error: error:"), "{err}");
    }
}

#[test]
fn a_partial_line_trickled_faster_than_the_window_still_times_out() {
    // The longest window: a poll that found a byte must not start another one.
    let server = Server::start_with(&["--idle-timeout", "1", "--spin", "10000"]);
    let mut raw = server.raw();
    assert_eq!(raw.request("PUT t.k 1")["ok"], true);
    let before = cpu_ticks(server.pid());
    let started = Instant::now();
    let mut closed_at = None;
    {
        use std::io::Write;
        let mut stream = raw.stream();
        stream.write_all(b"PUT t.k \"").unwrap();
        while started.elapsed() < Duration::from_secs(4) {
            if stream.write_all(b"x").is_err() {
                closed_at = Some(started.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let closed_at = closed_at.unwrap_or_else(|| {
        panic!("a partial line trickled for 4 s with --idle-timeout 1 was not cut off")
    });
    assert!(
        closed_at < Duration::from_millis(2500),
        "cut off after {closed_at:?}, not about 1 s"
    );
    let reply = raw.json();
    assert_eq!(reply["error"], "timeout", "{reply}");
    let spent = cpu_ticks(server.pid()) - before;
    assert!(
        spent <= 20,
        "the server used {spent} ticks of CPU on one trickling client"
    );
}

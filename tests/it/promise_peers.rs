//! Issue 9, second round: breaks an adversary found in subscriber delivery after the first
//! round (a partial request line, slow readers at shutdown, idle memory, huge reply ids). Each
//! test runs against the real server.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{libc_sigterm, proc_status, wait_until, Server};

/// Waits until `value` has not changed for `polls` consecutive polls (5 ms apart).
fn wait_stable(what: &str, polls: u32, mut value: impl FnMut() -> u64) {
    let (mut last, mut unchanged) = (u64::MAX, 0);
    wait_until(what, || {
        let now = value();
        unchanged = if now == last { unchanged + 1 } else { 0 };
        last = now;
        unchanged >= polls
    });
}

/// A subscriber holding a partial request line (`HEAL` without `\n`) still gets the
/// `shutdown` event as its last line, after the events of every change.
#[test]
fn a_partial_request_line_does_not_cost_the_shutdown_event() {
    let mut server = Server::start();
    let mut sub = server.raw();
    sub.subscribe("p");
    sub.send_bytes(b"HEAL");
    let mut writer = server.raw();
    for i in 0..5 {
        assert_eq!(writer.request(&format!("PUT p.k{i} {i}"))["ok"], true);
    }
    for _ in 0..5 {
        assert_eq!(sub.json()["event"], "put");
    }
    server.signal(libc_sigterm());
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    let rest = sub.lines_until_closed();
    assert_eq!(
        rest.iter()
            .map(|l| crate::support::parse(l))
            .collect::<Vec<_>>(),
        vec![json!({"event": "shutdown"})],
        "what followed the events"
    );
}

/// A subscriber holding a partial request line and not reading is dropped by
/// `--send-timeout` like any other (its connection thread does not sit in `read`).
#[test]
fn a_partial_request_line_does_not_escape_the_send_timeout() {
    let server = Server::start_with(&["--idle-timeout", "0", "--send-timeout", "1"]);
    let mut held = server.raw();
    held.request("HELLO held");
    held.subscribe("b");
    held.send_bytes(b"HEAL");
    let mut writer = server.raw();
    let value = format!("\"{}\"", "y".repeat(2000));
    // Far more than the socket holds, on few keys (the queue coalesces, the socket stays full).
    let mut batch = String::new();
    for k in 0..2000 {
        batch.push_str(&format!("PUT b.k{} {value}\n", k % 50));
    }
    writer.send_bytes(batch.as_bytes());
    for _ in 0..2000 {
        assert_eq!(writer.json()["ok"], true);
    }
    let mut probe = server.raw();
    wait_until("the held subscriber to be dropped", || {
        probe.request("STATS")["dropped_slow"].as_u64() == Some(1)
    });
    let trace = probe.request("TRACE b.k1");
    assert_eq!(trace["subscribers"], json!([]), "{trace}");
}

/// On a subscriber connection a partial request line is still bounded by `--idle-timeout`.
#[test]
fn a_partial_request_line_on_a_subscriber_times_out() {
    let server = Server::start_with(&["--idle-timeout", "1"]);
    let mut sub = server.raw();
    sub.subscribe("p");
    sub.send_bytes(b"HEAL");
    let started = Instant::now();
    let reply = sub.json();
    assert_eq!(reply["error"], "timeout", "{reply}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    sub.assert_closed();
}

/// On SIGTERM a subscriber that keeps reading, but slowly (far behind), gets every
/// acknowledged change and then `shutdown` as its last line: it is not cut off by a fixed
/// grace period.
#[test]
fn shutdown_waits_for_a_slow_reader_that_makes_progress() {
    let mut server = Server::start();
    let sub = server.raw();
    let mut sub = sub;
    sub.subscribe("t");
    let stream = sub.reader.into_inner();
    // ~800 KB/s: 8 KiB every 10 ms.
    let reader = std::thread::spawn(move || {
        let mut stream = stream;
        let mut all = Vec::new();
        let mut buf = vec![0; 8192];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let mut writer = server.raw();
    let pad = "p".repeat(5000);
    let mut acked = HashMap::new();
    let mut batch = String::new();
    for k in 0..400 {
        batch.push_str(&format!("PUT t.k{k} \"{pad}{k}\"\n"));
    }
    writer.send_bytes(batch.as_bytes());
    for k in 0..400 {
        let reply = writer.json();
        acked.insert(format!("t.k{k}"), reply["rev"].as_u64().unwrap());
    }
    server.signal(libc_sigterm());
    let status = server.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status}");
    let bytes = reader.join().unwrap();
    let text = String::from_utf8(bytes).unwrap();
    assert!(
        text.ends_with('\n'),
        "torn last line: ...{:?}",
        &text[text.len().saturating_sub(80)..]
    );
    let lines: Vec<Value> = text.lines().map(crate::support::parse).collect();
    assert_eq!(lines.last(), Some(&json!({"event": "shutdown"})));
    let mut seen = HashMap::new();
    for line in &lines {
        if line["event"] == "put" {
            seen.insert(
                line["key"].as_str().unwrap().to_owned(),
                line["rev"].as_u64().unwrap(),
            );
        }
    }
    for (key, rev) in &acked {
        assert!(
            seen.get(key).is_some_and(|s| s >= rev),
            "{key}: acknowledged rev {rev}, delivered {:?}",
            seen.get(key)
        );
    }
}

/// A subscriber that does not read cannot make the server hold its replies' bytes without
/// bound: replies echoing a huge `id` stop the reading of requests by bytes, not only by count.
#[test]
fn unread_replies_with_huge_ids_are_bounded_in_bytes() {
    let server = Server::start();
    let before_kib = proc_status(server.pid(), "VmRSS");
    let id = "i".repeat(1 << 20);
    let line = format!("{{\"op\":\"health\",\"id\":\"{id}\"}}\n");
    let written = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..6 {
        let mut c = server.raw();
        c.subscribe("x");
        let stream: UnixStream = c.stream().try_clone().unwrap();
        let (line, written) = (line.clone(), written.clone());
        writers.push(std::thread::spawn(move || {
            let mut stream = stream;
            for _ in 0..40 {
                if stream.write_all(line.as_bytes()).is_err() {
                    return;
                }
                written.fetch_add(1, Ordering::Relaxed);
            }
        }));
        clients.push(c);
    }
    // The server has stopped reading them once nothing more is written for a while.
    wait_stable("the clients' writes to stop", 200, || {
        written.load(Ordering::Relaxed) as u64
    });
    let grown_mib = proc_status(server.pid(), "VmRSS").saturating_sub(before_kib) / 1024;
    // Unbounded in bytes, 6 × 32 replies of 1 MiB would be ~200 MiB.
    assert!(grown_mib < 60, "server RSS grew {grown_mib} MiB");
    for c in &clients {
        let _ = c.stream().shutdown(Shutdown::Both);
    }
    for w in writers {
        w.join().unwrap();
    }
}

/// Idle subscribers that have read a 1,000-key snapshot cost little: their queue, send buffer
/// and allocator arenas are given back once the mailbox drains.
#[test]
fn idle_subscribers_after_a_snapshot_give_their_memory_back() {
    let server = Server::start();
    let mut setup = server.raw();
    let mut batch = String::new();
    for k in 0..1000 {
        batch.push_str(&format!("PUT s.k{k} {k}\n"));
    }
    setup.send_bytes(batch.as_bytes());
    for _ in 0..1000 {
        assert_eq!(setup.json()["ok"], true);
    }
    let pid = server.pid();
    wait_stable("the server's RSS to settle", 40, || {
        proc_status(pid, "VmRSS")
    });
    let base = proc_status(pid, "VmRSS");
    let n = 200;
    let subs: Vec<_> = (0..n)
        .map(|_| {
            let mut sub = server.raw();
            assert_eq!(sub.subscribe("s"), 1000);
            sub
        })
        .collect();
    wait_stable("the server's RSS to settle", 40, || {
        proc_status(pid, "VmRSS")
    });
    let each = (proc_status(pid, "VmRSS").saturating_sub(base)) / n;
    eprintln!("idle subscribers after a 1,000-key snapshot: {each} KiB each");
    // Target 32 KiB, met by the release build (the benchmark's footprint section: ~28 KiB);
    // a debug build's stacks and allocations are larger (86 KiB before memory was given
    // back, ~52 after). Generous bounds for a noisy machine.
    let bound = if cfg!(debug_assertions) { 68 } else { 40 };
    assert!(
        each <= bound,
        "{each} KiB per idle subscriber (bound {bound})"
    );
    drop(subs);
}

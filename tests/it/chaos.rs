//! Chaos: writers (one never reads its replies), subscribers that keep up, stall, reconnect,
//! half-close and flood requests, on overlapping prefixes, for a bounded time. Afterwards every
//! live subscriber has converged and passed the watch-property checker, and threads and RSS are
//! back near idle.

use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{fanout_threads, proc_status, wait_until, Server};
use crate::watchcheck::Watch;

/// How long the writers write.
const CHAOS_FOR: Duration = Duration::from_secs(8);

#[test]
fn subscribers_converge_through_chaos() {
    let server = Server::start_with(&["--send-timeout", "4"]);
    let idle_threads = server.started_threads();
    let idle_rss = proc_status(server.pid(), "VmRSS");
    let stop = Arc::new(AtomicBool::new(false));

    let steady = [
        ("c", Watch::start(&server, &["c"])),
        ("c.a", Watch::start(&server, &["c.a"])),
        ("*", Watch::start(&server, &["*"])),
        ("c.b + c.a", Watch::start(&server, &["c.b", "c.a.k1"])),
    ];
    let mut stalled = server.raw();
    stalled.send("SUB c");

    let mut threads = Vec::new();
    // Two writers that read their replies, pipelining bursts; puts, deletes, large values.
    for w in 0..2u64 {
        let mut raw = server.raw();
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let big = format!("\"{}\"", "b".repeat(64 * 1024));
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut burst = String::new();
                for _ in 0..50 {
                    let space = if i.is_multiple_of(3) { "a" } else { "b" };
                    let key = format!("c.{space}.k{}", (i * 7 + w) % 40);
                    match i % 17 {
                        0 => burst.push_str(&format!("DEL {key}\n")),
                        5 => burst.push_str(&format!("PUT {key} {big}\n")),
                        _ => burst.push_str(&format!("PUT {key} {i}\n")),
                    }
                    i += 1;
                }
                raw.send_bytes(burst.as_bytes());
                for _ in 0..50 {
                    raw.json();
                }
            }
        }));
    }
    // A writer that never reads its replies.
    let hog = UnixStream::connect(&server.socket).unwrap();
    {
        let mut hog = hog.try_clone().unwrap();
        threads.push(std::thread::spawn(move || {
            for i in 0..200_000u64 {
                if hog
                    .write_all(format!("PUT c.h.k{} {i}\n", i % 100).as_bytes())
                    .is_err()
                {
                    return;
                }
            }
        }));
    }
    // A subscriber that reconnects again and again.
    {
        let stop = stop.clone();
        let socket = server.socket.clone();
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut raw = crate::support::Raw::connect(&socket);
                raw.send("SUB c.b");
                for _ in 0..20 {
                    if raw.try_line().is_err() {
                        break;
                    }
                }
            }
        }));
    }
    // Subscribers that half-close and never read.
    let half_closed: Vec<_> = (0..3)
        .map(|_| {
            let raw = server.raw();
            raw.stream().write_all(b"SUB *\n").unwrap();
            raw.stream().shutdown(Shutdown::Write).unwrap();
            raw
        })
        .collect();
    // A subscriber that floods requests and reads nothing.
    let flooder = server.raw();
    flooder.stream().write_all(b"SUB c.a\n").unwrap();
    {
        let flood = flooder.stream().try_clone().unwrap();
        flood.set_nonblocking(true).unwrap();
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let chunk = b"HEALTH\n".repeat(1000);
            while !stop.load(Ordering::Relaxed) {
                match (&flood).write(&chunk) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::yield_now(),
                    Err(_) => return,
                }
            }
        }));
    }

    let start = Instant::now();
    let mut peak_rss = 0;
    let mut stalled = Some(stalled);
    let mut resumed = None;
    while start.elapsed() < CHAOS_FOR {
        peak_rss = peak_rss.max(proc_status(server.pid(), "VmRSS"));
        // The stalled subscriber starts reading halfway (before its send timeout).
        if start.elapsed() > CHAOS_FOR / 4 {
            if let Some(raw) = stalled.take() {
                resumed = Some(Watch::on(raw, &[]));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = hog.shutdown(Shutdown::Both);
    for t in threads {
        t.join().unwrap();
    }
    drop(flooder);
    drop(half_closed);

    let mut probe = server.raw();
    for line in server.log_text().lines() {
        if line.contains("WARN") || line.contains("ERROR") {
            eprintln!("server: {line}");
        }
    }
    for (target, watch) in &steady {
        let pattern = match *target {
            "*" => "*".to_owned(),
            "c.b + c.a" => "c.b.*".to_owned(),
            t => format!("{t}.*"),
        };
        watch.wait_converged(&mut probe, &pattern);
        watch.assert_ok(target);
    }
    let resumed = resumed.expect("the stalled subscriber resumed");
    resumed.wait_converged(&mut probe, "c.*");
    resumed.assert_ok("stalled, then resumed");

    let live = steady.len() + 2; // the resumed subscriber and the probe
    wait_until("the chaos connections to be gone", || {
        probe.request("STATS")["connections"] == live
    });
    // Finished connection threads linger briefly for the next connection, then end. The
    // fan-out threads (one per further CPU, started by a large fan-out) stay, as they would
    // in any busy server: they are not per client.
    let threads_ended = || {
        proc_status(server.pid(), "Threads") - fanout_threads(server.pid())
            <= idle_threads + live as u64
    };
    let end = std::time::Instant::now() + crate::support::DEADLINE;
    while !threads_ended() {
        if std::time::Instant::now() >= end {
            // Name what is left (thread name, state, where it waits) for the next reader.
            let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", server.pid()))
                .map(|d| {
                    d.filter_map(|e| {
                        let dir = e.ok()?.path();
                        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
                        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                        let wchan = std::fs::read_to_string(dir.join("wchan")).unwrap_or_default();
                        let state = stat.rsplit(") ").next()?.chars().next()?;
                        Some(format!("{} {state} {wchan}", comm.trim()))
                    })
                    .collect()
                })
                .unwrap_or_default();
            panic!(
                "timed out waiting for the chaos threads to end: {} threads, {idle_threads} idle + {live} live expected; {tasks:?}; stats {}",
                tasks.len(),
                probe.request("STATS")
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let rss = proc_status(server.pid(), "VmRSS");
    eprintln!(
        "chaos: peak RSS {} MiB, now {} MiB (idle {} MiB); stats {}",
        peak_rss / 1024,
        rss / 1024,
        idle_rss / 1024,
        probe.request("STATS")
    );
    assert!(peak_rss < idle_rss + 256 * 1024, "peak RSS {peak_rss} KiB");
}

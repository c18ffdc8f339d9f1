//! Issue 9: the subscription promise under hostile and unlucky peers. One test per way the
//! promise was broken (items 1–8), each against the real server.

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{fanout_threads, proc_status, wait_until, Server};
use crate::watchcheck::Watch;

/// Item 1: a client that pipelines puts and never reads its replies does not withhold its
/// changes from subscribers.
#[test]
fn a_writer_that_does_not_read_its_replies_does_not_withhold_its_changes() {
    let server = Server::start();
    let watch = Watch::start(&server, &["w"]);
    let hog = UnixStream::connect(&server.socket).unwrap();
    let writer = {
        let hog = hog.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut hog = hog;
            let mut batch = String::new();
            // A long id makes every reply long, so the hog's unread replies fill its socket
            // (and block the server's writes to it) after a few thousand puts.
            let id = "i".repeat(200);
            for i in 0..60_000 {
                batch.push_str(&format!(
                    "{{\"op\":\"put\",\"key\":\"w.k{}\",\"value\":{i},\"id\":\"{id}\"}}\n",
                    i % 500
                ));
                if batch.len() > 16 * 1024 {
                    if hog.write_all(batch.as_bytes()).is_err() {
                        return;
                    }
                    batch.clear();
                }
            }
            let _ = hog.write_all(batch.as_bytes());
        })
    };
    // The server stops reading the hog once its replies fill the socket; whatever it applied
    // by then must reach the subscriber.
    // (It has stopped once its revision has not moved for 50 polls: a put takes far less.)
    let mut probe = server.raw();
    let (mut last_rev, mut unchanged) = (0, 0);
    wait_until("the hog's changes to stop", || {
        let rev = probe.request("STATS")["rev"].as_u64().unwrap();
        unchanged = if rev == last_rev { unchanged + 1 } else { 0 };
        last_rev = rev;
        rev >= 500 && unchanged >= 50
    });
    watch.wait_converged(&mut probe, "w.*");
    watch.assert_ok("subscriber");
    let _ = hog.shutdown(Shutdown::Both);
    writer.join().unwrap();
}

/// Item 2: per-key order and whole snapshots under a burst of large values (the byte budget),
/// with a second `SUB` of a big keyspace arriving mid-burst; every subscriber is checked by the
/// watch-property checker and converges.
#[test]
fn per_key_order_holds_in_a_burst_of_large_values() {
    let server = Server::start();
    let mut setup = server.raw();
    // A keyspace bigger than the queue, for the second snapshot.
    let mut batch = String::new();
    for i in 0..5000 {
        batch.push_str(&format!("PUT s.k{i} {i}\n"));
    }
    setup.send_bytes(batch.as_bytes());
    for _ in 0..5000 {
        assert_eq!(setup.json()["ok"], true);
    }
    let watches: Vec<Watch> = (0..3).map(|_| Watch::start(&server, &["b"])).collect();
    let big = format!("\"{}\"", "x".repeat(1 << 20));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let mut raw = server.raw();
            let big = big.clone();
            std::thread::spawn(move || {
                for i in 0..40 {
                    let value = if i % 2 == 0 {
                        big.clone()
                    } else {
                        format!("{i}")
                    };
                    raw.send(&format!("PUT b.w{w}.k{} {value}", i % 4));
                }
                for _ in 0..40 {
                    assert_eq!(raw.json()["ok"], true);
                }
            })
        })
        .collect();
    watches[0].send("SUB s");
    for w in writers {
        w.join().unwrap();
    }
    let mut probe = server.raw();
    for (i, watch) in watches.iter().enumerate() {
        watch.wait_converged(&mut probe, "b.*");
        watch.assert_ok(&format!("subscriber {i}"));
    }
    watches[0].wait_converged(&mut probe, "s.*");
    watches[0].assert_ok("subscriber 0 after its second SUB");
    let rss_mib = proc_status(server.pid(), "VmRSS") / 1024;
    assert!(rss_mib < 200, "server RSS {rss_mib} MiB after the burst");
}

/// Item 3: a subscriber connection that sends requests without reading is throttled (the server
/// stops reading it), not buffered without bound.
#[test]
fn a_subscriber_flooding_requests_without_reading_is_throttled() {
    let server = Server::start();
    let mut sub = server.raw();
    sub.subscribe("x");
    let before = proc_status(server.pid(), "VmRSS");
    let flood = sub.stream().try_clone().unwrap();
    flood.set_nonblocking(true).unwrap();
    let chunk = b"HEALTH\n".repeat(10_000);
    let mut sent_lines = 0u64;
    let mut blocked_since: Option<Instant> = None;
    let end = Instant::now() + Duration::from_secs(20);
    let mut offset = 0;
    // 2,000,000 requests, or until the server has stopped reading us for a second.
    while sent_lines < 2_000_000 {
        match (&flood).write(&chunk[offset..]) {
            Ok(n) => {
                blocked_since = None;
                offset = (offset + n) % chunk.len();
                sent_lines += (n / 7) as u64;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(1) {
                    break;
                }
                std::thread::yield_now();
            }
            Err(e) => panic!("flood: {e}"),
        }
        assert!(Instant::now() < end, "flood did not finish");
    }
    let grown_mib = proc_status(server.pid(), "VmRSS").saturating_sub(before) / 1024;
    eprintln!("sent {sent_lines} HEALTH lines unread; server RSS grew {grown_mib} MiB");
    assert!(
        sent_lines < 2_000_000,
        "the server read all 2,000,000 requests of a client that reads nothing"
    );
    assert!(grown_mib < 16, "server RSS grew {grown_mib} MiB");
    // Reading again lets it go on: the replies arrive in order and the connection works.
    flood.set_nonblocking(false).unwrap();
    assert_eq!(sub.json(), json!({"ok": true, "status": "ok"}));
}

/// Item 4: a subscriber that half-closes and never reads keeps its connection slot (its thread
/// is counted) until `--send-timeout` drops it, counted in `dropped_slow`.
#[test]
fn stalled_half_closed_subscribers_count_and_are_dropped_after_the_send_timeout() {
    let server = Server::start_with(&["--max-connections", "4", "--send-timeout", "6"]);
    let mut writer = server.raw();
    let subs: Vec<_> = (0..3)
        .map(|_| {
            let mut raw = server.raw();
            raw.subscribe("h");
            raw
        })
        .collect();
    let big = json!("y".repeat(200_000));
    for i in 0..40 {
        assert_eq!(writer.request(&format!("PUT h.k{i} {big}"))["ok"], true);
    }
    for sub in &subs {
        sub.stream().shutdown(Shutdown::Write).unwrap();
    }
    // Their sockets are full: the connections stay, and count.
    // The fan-out threads are the server's, not the clients' (started by this fan-out).
    let threads_base = proc_status(server.pid(), "Threads") - fanout_threads(server.pid());
    let refused = server.raw().line().expect("a reply");
    assert!(
        refused.contains("too_many_connections"),
        "a fifth connection was accepted while 3 stalled subscribers hold their slots: {refused}"
    );
    let s = writer.request("STATS");
    assert_eq!(s["connections"], 4, "{s}");
    assert!(s["behind"].as_u64() >= Some(3), "{s}");
    assert!(
        threads_base <= 4 + 3,
        "{threads_base} threads for 4 connections"
    );
    wait_until("the stalled subscribers to be dropped", || {
        writer.request("STATS")["dropped_slow"] == 3
    });
    // Counted as dropped first, then their threads end and give their slots back.
    wait_until("the dropped subscribers' slots to be free", || {
        writer.request("STATS")["connections"] == 1
    });
    assert!(server.raw().healthy(), "slots are free again");
    assert!(server.log_text().contains("--send-timeout"));
    drop(subs);
}

/// Item 5: resuming stalled subscribers of a big store, and `GET *` to clients that do not
/// read, never format the store into one buffer per reader.
#[test]
fn resuming_stalled_subscribers_and_unread_get_all_do_not_copy_the_store() {
    let server = Server::start();
    let mut setup = server.raw();
    let value = json!("v".repeat(512 * 1024));
    for i in 0..64 {
        assert_eq!(setup.request(&format!("PUT big.k{i} {value}"))["ok"], true);
    }
    // The store is 32 MiB.
    let before = proc_status(server.pid(), "VmRSS");
    let mut stalled: Vec<_> = (0..8).map(|_| server.raw()).collect();
    for raw in &mut stalled {
        raw.send("SUB *");
    }
    let mut getters: Vec<_> = (0..4).map(|_| server.raw()).collect();
    for raw in &mut getters {
        raw.send("GET *");
    }
    wait_until("the stalled snapshots to be queued", || {
        setup.request("STATS")["events"].as_u64() >= Some(8 * 64)
    });
    // Now they all read: the snapshots go out in batches.
    for raw in &mut stalled {
        assert_eq!(raw.json(), json!({"ok": true}));
    }
    let readers: Vec<_> = stalled
        .into_iter()
        .map(|mut raw| {
            std::thread::spawn(move || {
                let mut n = 0;
                while n < 64 {
                    let v = raw.json();
                    assert_eq!(v["event"], "init");
                    n += 1;
                }
                assert_eq!(raw.json()["event"], "ready");
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    let peak_mib = proc_status(server.pid(), "VmHWM").saturating_sub(before) / 1024;
    eprintln!("peak RSS over the loaded store: +{peak_mib} MiB (store 32 MiB, 8 + 4 readers)");
    assert!(
        peak_mib < 64,
        "+{peak_mib} MiB: the store was copied per reader"
    );
    for mut raw in getters {
        assert_eq!(raw.json()["values"].as_object().map(|m| m.len()), Some(64));
    }
}

/// Item 6: the last line before a close is never lost: after `QUIT` on a busy subscription the
/// acknowledgement is the last line, every time.
#[test]
fn the_quit_ack_is_the_last_line_of_a_busy_subscription() {
    let server = Server::start();
    let mut writer = server.raw();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        let mut raw = server.raw();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                raw.send(&format!("PUT q.k{} {i}", i % 8));
                assert_eq!(raw.json()["ok"], true);
                i += 1;
            }
        })
    };
    for round in 0..300 {
        let mut sub = server.raw();
        sub.subscribe("q");
        sub.send(&format!("{{\"op\":\"quit\",\"id\":{round}}}"));
        let lines = sub.lines_until_closed();
        assert_eq!(
            lines.last().map(String::as_str),
            Some(format!("{{\"ok\":true,\"id\":{round}}}").as_str()),
            "round {round}: the QUIT ack is not the last line ({} lines)",
            lines.len()
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
    assert!(writer.healthy());
}

/// Item 7: on SIGTERM, in-flight writes finish and are announced, then `shutdown` is the last
/// line every subscriber gets.
#[test]
fn shutdown_announces_every_acknowledged_change_then_nothing_after() {
    let mut server = Server::start();
    let watches: Vec<Watch> = (0..3).map(|_| Watch::start(&server, &["t"])).collect();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(HashMap::<String, u64>::new()));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let raw = server.raw();
            let acked = acked.clone();
            let mut reader = raw.stream().try_clone().unwrap();
            let mut raw = raw;
            // Pipelined: the writes are sent from one thread, the replies read here.
            std::thread::spawn(move || {
                let sender = std::thread::spawn(move || {
                    let mut batch = String::new();
                    for i in 0..20_000 {
                        batch.push_str(&format!("PUT t.w{w}.k{} {i}\n", i % 20));
                    }
                    let _ = reader.write_all(batch.as_bytes());
                });
                for i in 0..20_000 {
                    let Ok(Some(line)) = raw.try_line() else {
                        break;
                    };
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    if let Some(rev) = v["rev"].as_u64() {
                        acked
                            .lock()
                            .unwrap()
                            .insert(format!("t.w{w}.k{}", i % 20), rev);
                    }
                }
                let _ = sender.join();
            })
        })
        .collect();
    wait_until("the writes to be under way", || {
        acked.lock().unwrap().len() >= 40
    });
    server.signal(crate::support::libc_sigterm());
    let status = server.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    for (i, watch) in watches.into_iter().enumerate() {
        let seen = watch.wait_closed();
        let seen = seen.lock().unwrap();
        assert!(seen.shutdown, "subscriber {i} got no shutdown event");
        assert!(
            seen.violations.is_empty(),
            "subscriber {i}: {:?}",
            &seen.violations[..1]
        );
        for (key, rev) in &acked {
            let got = seen.revs.get(key).copied().unwrap_or(0);
            assert!(
                got >= *rev,
                "subscriber {i}: {key} acknowledged at rev {rev}, announced only up to {got}"
            );
        }
    }
}

/// Item 8: a publishing thread's share of the sending is bounded: a writer whose change touches
/// a subscriber with a large backlog is answered without sending that backlog itself.
#[test]
fn a_publisher_is_not_captured_by_another_changes_backlog() {
    let server = Server::start();
    let mut watch_raw = server.raw();
    watch_raw.subscribe("p");
    let big = json!("z".repeat(256 * 1024));
    // Fill the subscriber's queue with a backlog while it does not read.
    let mut bulk = server.raw();
    for i in 0..64 {
        bulk.send(&format!("PUT p.bulk{i} {big}"));
    }
    for _ in 0..64 {
        assert_eq!(bulk.json()["ok"], true);
    }
    // The subscriber now reads as fast as it can; a second writer's small put must not wait
    // for the 16 MiB backlog to go out through its own thread.
    let reader = std::thread::spawn(move || {
        let mut n = 0;
        while n < 65 {
            let v = watch_raw.json();
            if v["event"] == "put" {
                n += 1;
            }
        }
    });
    let mut writer = server.raw();
    let start = Instant::now();
    assert_eq!(writer.request("PUT p.small 1")["ok"], true);
    writer.request("HEALTH");
    let took = start.elapsed();
    reader.join().unwrap();
    eprintln!("small put answered in {took:?} beside a 16 MiB backlog");
    assert!(took < Duration::from_millis(500), "{took:?}");
}

//! The model check: `loom` runs the real turn-taking code (`Mailbox` on its real `Queue`, with
//! `loom`'s mutex) under every interleaving of a publisher's push + kick, a second publisher,
//! and the connection thread's replies, close or shutdown and its own turns, up to a bounded
//! number of preemptions (`LOOM_MAX_PREEMPTIONS`, 3 unless set). The socket is an in-memory
//! buffer of a few dozen bytes, so sends hit "full" and hand over in the middle of lines.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test --release --lib mailbox::loom_tests`.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering as StdOrdering};

use loom::sync::atomic::{AtomicUsize as LoomUsize, Ordering};
use loom::sync::Arc;

use super::*;
use crate::key::Key;
use crate::protocol::{Event, EventKind};
use crate::store::Value;

/// Runs `model` under every interleaving (up to the preemption bound) and reports how many
/// it explored.
fn explore(name: &str, model: impl Fn() + Sync + Send + 'static) {
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    builder().check(move || {
        counted.fetch_add(1, StdOrdering::Relaxed);
        model();
    });
    eprintln!(
        "loom: {name}: {} interleavings explored (preemption bound {:?})",
        runs.load(StdOrdering::Relaxed),
        builder().preemption_bound
    );
}

struct ModelPort {
    socket: loom::sync::Mutex<Vec<u8>>,
    capacity: usize,
    rings: LoomUsize,
}

impl Port for ModelPort {
    fn send(&self, bytes: &[u8]) -> io::Result<usize> {
        let mut socket = self.socket.lock().unwrap();
        let room = self.capacity - socket.len();
        if room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = room.min(bytes.len());
        socket.extend_from_slice(&bytes[..n]);
        Ok(n)
    }

    fn wake(&self) {
        self.rings.fetch_add(1, Ordering::SeqCst);
    }

    fn clear_wake(&self) {
        self.rings.store(0, Ordering::SeqCst);
    }
}

fn change(key: &str, rev: u64) -> Item {
    Item::Change(Published::new(Event {
        kind: EventKind::Put,
        key: Key::parse(key).unwrap(),
        value: Some(Value::from("1")),
        rev,
    }))
}

fn mailbox() -> Arc<Mailbox<ModelPort>> {
    let port = ModelPort {
        socket: loom::sync::Mutex::new(Vec::new()),
        capacity: 40,
        rings: LoomUsize::new(0),
    };
    // A queue of one item: the second push of a key coalesces.
    Arc::new(Mailbox::on_port(port, 1, usize::MAX))
}

/// The connection thread's loop, as `serve_subscriber` runs it, with the client reading
/// whatever the socket holds each round.
fn connection_thread(mb: &Mailbox<ModelPort>) -> Vec<u8> {
    let mut delivered = Vec::new();
    loop {
        mb.woken();
        mb.send();
        delivered.append(&mut mb.port.socket.lock().unwrap());
        mb.writable();
        if mb.status().finished {
            // A kick may have sent the last bytes after this round's read.
            delivered.append(&mut mb.port.socket.lock().unwrap());
            return delivered;
        }
        loom::thread::yield_now();
    }
}

/// Checks the delivered stream; `accepted` is each publisher push that was not refused.
fn check(delivered: &[u8], accepted: &[(String, u64)], last_line: Option<&str>) {
    let text = std::str::from_utf8(delivered).expect("whole UTF-8 lines");
    assert!(text.ends_with('\n'), "a line was cut short: {text:?}");
    let lines: Vec<&str> = text.lines().collect();
    let mut last: HashMap<String, u64> = HashMap::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON lines");
        if let (Some(key), Some(rev)) = (v["key"].as_str(), v["rev"].as_u64()) {
            let prev = last.insert(key.to_owned(), rev);
            assert!(prev < Some(rev), "per-key order: {text}");
        }
    }
    match last_line {
        Some(line) => assert_eq!(lines.last(), Some(&line), "the last line: {text}"),
        None => assert!(lines.contains(&"{\"ok\":true}"), "the reply: {text}"),
    }
    let mut newest: HashMap<&str, u64> = HashMap::new();
    for (key, rev) in accepted {
        let entry = newest.entry(key).or_default();
        *entry = (*entry).max(*rev);
    }
    for (key, rev) in newest {
        assert_eq!(
            last.get(key),
            Some(&rev),
            "latest of {key} delivered: {text}"
        );
    }
}

fn builder() -> loom::model::Builder {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder
}

fn publisher(
    mb: &Arc<Mailbox<ModelPort>>,
    key: &'static str,
    revs: &'static [u64],
) -> loom::thread::JoinHandle<Vec<(String, u64)>> {
    let mb = mb.clone();
    loom::thread::spawn(move || {
        let mut accepted = Vec::new();
        for &rev in revs {
            if mb.push(change(key, rev)) != Pushed::Closed {
                accepted.push((key.to_owned(), rev));
            }
            mb.kick();
        }
        accepted
    })
}

/// Two publishers' pushes and kicks race the connection thread's own turns (with a socket
/// that fills mid-line); a reply is queued meanwhile, then the mailbox is closed. Per-key
/// order, the latest state of every key delivered, the reply delivered, nothing cut short.
#[test]
fn turns_keep_order_and_deliver_the_latest() {
    explore("turns_keep_order_and_deliver_the_latest", || {
        let mb = mailbox();
        let a = publisher(&mb, "a", &[1, 3]);
        let b = publisher(&mb, "b", &[2]);
        let conn = {
            let mb = mb.clone();
            loom::thread::spawn(move || connection_thread(&mb))
        };
        mb.push(Item::Reply(b"{\"ok\":true}\n".to_vec().into()));
        let mut accepted = a.join().unwrap();
        accepted.extend(b.join().unwrap());
        mb.close();
        let delivered = conn.join().unwrap();
        check(&delivered, &accepted, None);
    });
}

/// The last reply before a close (a `QUIT` acknowledgement, queued once the connection left
/// the subscription table) is the last line, while a kick may hold the turn.
#[test]
fn the_last_reply_before_close_is_sent_last() {
    explore("the_last_reply_before_close_is_sent_last", || {
        let mb = mailbox();
        let a = publisher(&mb, "a", &[1, 3]);
        let accepted = a.join().unwrap();
        let kicker = {
            let mb = mb.clone();
            loom::thread::spawn(move || mb.kick())
        };
        mb.push(Item::Reply(b"{\"ok\":true}\n".to_vec().into()));
        mb.close();
        let delivered = connection_thread(&mb);
        kicker.join().unwrap();
        check(&delivered, &accepted, Some("{\"ok\":true}"));
    });
}

/// The server stops while publishers publish: `shutdown` is the last line, whatever the
/// interleaving, and every change accepted before it is delivered before it.
#[test]
fn shutdown_is_the_last_line() {
    explore("shutdown_is_the_last_line", || {
        let mb = mailbox();
        let a = publisher(&mb, "a", &[1, 3]);
        mb.push(Item::Shutdown);
        let delivered = connection_thread(&mb);
        let accepted = a.join().unwrap();
        check(&delivered, &accepted, Some("{\"event\":\"shutdown\"}"));
    });
}

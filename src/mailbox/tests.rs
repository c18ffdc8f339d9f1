use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use super::*;
use crate::key::Key;
use crate::protocol::{Event, EventKind};
use crate::store::Value;

fn change(key: &str, rev: u64, value: Value) -> Item {
    Item::Change(Published::new(Event {
        kind: EventKind::Put,
        key: Key::parse(key).unwrap(),
        value: Some(value),
        rev,
    }))
}

fn put(key: &str, rev: u64) -> Item {
    change(key, rev, Value::from(rev.to_string()))
}

/// A mailbox on one end of a socket pair, and a reader of the other end.
fn pair(items: usize) -> (Arc<Mailbox>, BufReader<UnixStream>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mailbox = Mailbox::with_capacity(ours, items, QUEUE_BYTES).unwrap();
    (mailbox, BufReader::new(theirs))
}

/// `key+rev` of each event line, or the line itself.
fn read(reader: &mut BufReader<UnixStream>, lines: usize) -> Vec<String> {
    (0..lines)
        .map(|_| {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            match (&v["key"], &v["rev"]) {
                (serde_json::Value::String(k), serde_json::Value::Number(r)) => {
                    format!("{k}{r}")
                }
                _ => line.trim_end().to_owned(),
            }
        })
        .collect()
}

#[test]
fn a_kick_sends_everything_in_order_while_there_is_room() {
    let (mb, mut reader) = pair(8);
    for rev in 1..=5 {
        assert_eq!(mb.push(put("a", rev)), Pushed::Queued);
    }
    mb.kick();
    assert_eq!(read(&mut reader, 5), ["a1", "a2", "a3", "a4", "a5"]);
    assert_eq!(mb.pending(), 0);
}

#[test]
fn over_capacity_keeps_the_latest_per_key_in_place() {
    let (mb, mut reader) = pair(2);
    let pushes = [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("a", 5), ("b", 6)];
    let results: Vec<_> = pushes.iter().map(|(k, r)| mb.push(put(k, *r))).collect();
    // a1 b2 queued; a3 replaces a1, c4 appended, a5 replaces a3, b6 replaces b2.
    assert_eq!(
        results,
        [
            Pushed::Queued,
            Pushed::Queued,
            Pushed::Coalesced,
            Pushed::Queued,
            Pushed::Coalesced,
            Pushed::Coalesced
        ]
    );
    assert_eq!(mb.send(), Turn::Drained);
    assert_eq!(read(&mut reader, 3), ["a5", "b6", "c4"]);
}

#[test]
fn an_event_never_moves_ahead_of_a_reply() {
    let (mb, mut reader) = pair(1);
    mb.push(put("a", 1));
    mb.push(Item::Reply(b"{\"ok\":true}\n".to_vec().into()));
    // Over capacity: a1 is before the reply, so it is dropped and a2 goes after the reply.
    assert_eq!(mb.push(put("a", 2)), Pushed::Coalesced);
    assert_eq!(mb.push(put("a", 3)), Pushed::Coalesced);
    assert_eq!(mb.send(), Turn::Drained);
    assert_eq!(read(&mut reader, 2), ["{\"ok\":true}", "a3"]);
}

#[test]
fn replies_and_snapshots_hold_back_requests() {
    let (mb, _reader) = pair(4);
    for _ in 0..MAX_REPLIES - 1 {
        mb.push(Item::Reply(b"{\"ok\":true}\n".to_vec().into()));
    }
    assert!(mb.status().accepts_requests);
    mb.push(Item::Reply(b"{\"ok\":true}\n".to_vec().into()));
    assert!(!mb.status().accepts_requests, "too many replies pending");
    assert_eq!(mb.send(), Turn::Drained);
    assert!(mb.status().accepts_requests);
    mb.push(Item::Ready {
        target: crate::key::Target::parse("a").unwrap(),
        count: 0,
        rev: 0,
        epoch: crate::disk::Epoch::random(),
    });
    assert!(!mb.status().accepts_requests, "a snapshot pending");
    mb.send();
    assert!(mb.status().accepts_requests);
}

/// Issue 9, item 8: a kick sends at most its budget and hands the rest on, however fast the
/// subscriber reads.
#[test]
fn a_kick_sends_at_most_its_budget() {
    let (mb, reader) = pair(QUEUE_ITEMS);
    let value = Value::from(format!("\"{}\"", "x".repeat(1000)));
    for rev in 1..=1000 {
        mb.push(change(&format!("k{rev}"), rev, value.clone()));
    }
    let total: usize = 1000 * 1040;
    let drain = std::thread::spawn(move || {
        let mut reader = reader;
        let mut buf = vec![0; 1 << 16];
        let mut got = 0;
        while got < total {
            match reader.get_mut().read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    });
    mb.kick();
    let left = mb.pending();
    assert!(
        left > 0,
        "the kick sent everything: its share is not bounded"
    );
    assert!(
        left >= 1000 - 2 * KICK_BUDGET / 1000,
        "the kick sent more than its budget: {left} of 1000 left"
    );
    // The connection thread's turn sends the rest.
    for _ in 0..100_000 {
        if mb.send() == Turn::Drained {
            break;
        }
    }
    mb.close();
    assert!(mb.status().finished);
    drop(mb);
    assert!(drain.join().unwrap() >= total - 1000 * 40);
}

/// Issue 9, item 6: the last line pushed before a close is always sent, whoever sends.
#[test]
fn the_last_line_before_close_is_sent() {
    for round in 0..200 {
        let (mb, mut reader) = pair(4);
        let pusher = {
            let mb = mb.clone();
            std::thread::spawn(move || {
                for rev in 1..=20 {
                    mb.push(put("a", rev));
                    mb.kick();
                }
            })
        };
        mb.push(Item::Reply(
            format!("{{\"ok\":true,\"round\":{round}}}\n")
                .into_bytes()
                .into(),
        ));
        pusher.join().unwrap();
        mb.close();
        while !mb.status().finished {
            mb.send();
        }
        drop(mb);
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        assert!(text.contains(&format!("\"round\":{round}")), "{text}");
        assert!(text.ends_with("\"rev\":20}\n") || text.contains("\"rev\":20}"));
    }
}

/// Issue 9, item 2: per-key order with concurrent publishers and kicks, at small capacities and
/// with values over the byte budget.
#[test]
fn per_key_order_holds_under_concurrent_sends() {
    for (items, bytes) in [(1, QUEUE_BYTES), (3, QUEUE_BYTES), (QUEUE_ITEMS, 3000)] {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mb = Mailbox::with_capacity(ours, items, bytes).unwrap();
        let reader = std::thread::spawn(move || {
            let mut last: HashMap<String, u64> = HashMap::new();
            for line in BufReader::new(theirs).lines() {
                let line = line.unwrap();
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                if let Some(k) = v["key"].as_str() {
                    let rev = v["rev"].as_u64().unwrap();
                    let prev = last.insert(k.to_owned(), rev);
                    assert!(prev < Some(rev), "{k}: {rev} after {prev:?}");
                }
            }
            last
        });
        let value = Value::from(format!("\"{}\"", "y".repeat(1500)));
        let publishers: Vec<_> = (0..2u64)
            .map(|p| {
                let mb = mb.clone();
                let value = value.clone();
                std::thread::spawn(move || {
                    // Each publisher owns its keys (as a stripe lock would), revisions increase.
                    for i in 0..2000u64 {
                        let rev = i * 2 + p + 1;
                        mb.push(change(&format!("p{p}.k{}", i % 7), rev, value.clone()));
                        mb.kick();
                    }
                })
            })
            .collect();
        for p in publishers {
            p.join().unwrap();
        }
        mb.close();
        while !mb.status().finished {
            if mb.send() == Turn::Blocked {
                mb.writable();
                std::thread::yield_now();
            }
        }
        drop(mb);
        let last = reader.join().unwrap();
        assert_eq!(last.len(), 14, "every key's latest state arrived");
        for p in 0..2u64 {
            for k in 0..7u64 {
                let newest = (0..2000u64).filter(|i| i % 7 == k).max().unwrap() * 2 + p + 1;
                assert_eq!(last[&format!("p{p}.k{k}")], newest);
            }
        }
    }
}

#[test]
fn a_change_larger_than_a_batch_is_sent_from_its_shared_bytes() {
    let (mb, mut reader) = pair(16);
    let big = Value::from(format!("\"{}\"", "z".repeat(3 * BATCH_BYTES)));
    mb.push(put("a", 1));
    mb.push(change("b", 2, big));
    mb.push(put("c", 3));
    let t = std::thread::spawn(move || read(&mut reader, 3));
    while mb.send() != Turn::Drained {
        mb.writable();
    }
    assert_eq!(t.join().unwrap(), ["a1", "b2", "c3"]);
}

#[test]
fn nothing_is_accepted_after_shutdown() {
    let (mb, mut reader) = pair(4);
    mb.push(put("a", 1));
    assert_eq!(mb.push(Item::Shutdown), Pushed::Queued);
    assert_eq!(mb.push(put("a", 2)), Pushed::Closed);
    mb.send();
    assert!(mb.status().finished);
    assert_eq!(read(&mut reader, 2), ["a1", "{\"event\":\"shutdown\"}"]);
}

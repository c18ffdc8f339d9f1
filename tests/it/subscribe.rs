//! Subscriptions: snapshot and marker, prefix boundaries, the delivery guarantees of
//! docs/PROTOCOL.md under load (final state, per-key order, no loss without backlog, isolation
//! of a stalled subscriber), UNSUB and disconnect, subscriber-mode rules, the Rust client and
//! socat as subscribers, shutdown, and notification latency.
//!
//! Every wait reads with a deadline (the harness's socket read timeout, `DEADLINE`) or polls a
//! condition; a subscriber is known to be complete when the event of a sentinel key, written
//! after everything else, arrives.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    fanout_threads, libc_sigterm, parse, rss_kib, wait_until, Raw, Server, DEADLINE,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The next line on `raw` as JSON; panics at end of stream or after the read deadline.
fn next(raw: &mut Raw) -> Value {
    raw.json()
}

/// Checks an event has exactly the fields its kind has on the wire.
fn check_shape(ev: &Value) {
    let obj = ev
        .as_object()
        .unwrap_or_else(|| panic!("event not an object: {ev}"));
    // `skipped` (a change that replaced earlier ones of its key) is counted, never 0.
    let mut fields: Vec<&str> = obj
        .keys()
        .map(String::as_str)
        .filter(|f| *f != "skipped")
        .collect();
    fields.sort_unstable();
    if let Some(n) = obj.get("skipped") {
        assert!(
            ev["event"] != "init" && n.as_u64().is_some_and(|n| n > 0),
            "skipped of {ev}"
        );
    }
    let expected: &[&str] = match ev["event"].as_str() {
        Some("init") | Some("put") => &["event", "key", "rev", "value"],
        Some("del") => &["event", "key", "rev"],
        _ => panic!("not a key event: {ev}"),
    };
    assert_eq!(fields, expected, "fields of {ev}");
    assert!(ev["key"].is_string(), "key of {ev}");
    assert!(ev["rev"].as_u64().is_some_and(|r| r > 0), "rev of {ev}");
}

/// What one subscriber has seen, per key.
#[derive(Default, Debug)]
struct View {
    /// Last known value of every key that exists as far as the subscriber knows.
    values: BTreeMap<String, Value>,
    /// Every revision seen per key, init included, in arrival order.
    history: HashMap<String, Vec<u64>>,
    /// The revision of each key's `init` event.
    inits: HashMap<String, u64>,
    /// Key events received (init, put, del).
    events: u64,
}

impl View {
    /// Applies one key event; asserts its shape and that the key's revisions strictly increase.
    /// Returns the key.
    fn apply(&mut self, ev: &Value) -> String {
        check_shape(ev);
        let key = ev["key"].as_str().expect("checked").to_owned();
        let rev = ev["rev"].as_u64().expect("checked");
        let history = self.history.entry(key.clone()).or_default();
        if let Some(&last) = history.last() {
            assert!(
                rev > last,
                "per-key order broken for {key}: rev {rev} after {last} ({ev})"
            );
        }
        history.push(rev);
        self.events += 1;
        match ev["event"].as_str() {
            Some("init") => {
                self.inits.insert(key.clone(), rev);
                self.values.insert(key.clone(), ev["value"].clone());
            }
            Some("put") => {
                self.values.insert(key.clone(), ev["value"].clone());
            }
            _ => {
                self.values.remove(&key);
            }
        }
        key
    }

    /// Reads events until the one for `sentinel` arrives (panics after `DEADLINE`).
    fn follow_until(&mut self, raw: &mut Raw, sentinel: &str) {
        self.follow_until_by(raw, sentinel, Instant::now() + DEADLINE);
    }

    /// Reads events until the one for `sentinel` arrives (panics at `end`).
    /// A sentinel already seen (in a snapshot taken after it was written) ends it at once.
    fn follow_until_by(&mut self, raw: &mut Raw, sentinel: &str, end: Instant) {
        if self.history.contains_key(sentinel) {
            return;
        }
        let mut last = Value::Null;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let mut line = String::new();
            let read = if left.is_zero() {
                Ok(0)
            } else {
                raw.set_read_timeout(left);
                raw.reader.read_line(&mut line)
            };
            if !matches!(read, Ok(n) if n > 0) {
                panic!(
                    "no event for {sentinel} by the deadline ({read:?}) after {} events; \
                     last {last}",
                    self.events
                );
            }
            last = parse(line.trim_end());
            if self.apply(&last) == sentinel {
                return;
            }
        }
    }
}

/// Sends `SUB target` on `raw`, checks `{"ok":true}`, the `init` events and the `ready` marker,
/// and returns the view of the snapshot.
fn subscribe_on(raw: &mut Raw, target: &str) -> View {
    raw.send(&format!("SUB {target}"));
    read_snapshot(raw, target)
}

/// Reads what follows a `SUB target`: the ack, the inits and the marker.
fn read_snapshot(raw: &mut Raw, target: &str) -> View {
    assert_eq!(next(raw), json!({"ok": true}), "ack of SUB {target}");
    let mut view = View::default();
    loop {
        let ev = next(raw);
        match ev["event"].as_str() {
            Some("init") => {
                view.apply(&ev);
            }
            Some("ready") => {
                assert_eq!(
                    ev,
                    json!({"event": "ready", "sub": target, "count": view.events, "rev": ev["rev"].as_u64().expect("ready carries rev"), "epoch": ev["epoch"].as_str().expect("ready carries epoch")}),
                    "marker of SUB {target}"
                );
                return view;
            }
            _ => panic!("expected init or ready after SUB {target}, got {ev}"),
        }
    }
}

/// A new raw subscriber connection to `target` with its snapshot.
fn subscriber(server: &Server, target: &str) -> (Raw, View) {
    let mut raw = server.raw();
    let view = subscribe_on(&mut raw, target);
    (raw, view)
}

/// A server whose data directory (and socket) is on tmpfs when the host has `/dev/shm`.
///
/// Every put replaces a file; on an ext4 disk that costs about a millisecond, which would make
/// the load tests measure the disk instead of the subscription machinery and run for minutes.
struct MemServer {
    // Field order is drop order: the server is killed before its directory is removed.
    server: Server,
    _dir: tempfile::TempDir,
}

impl MemServer {
    fn start() -> MemServer {
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("temp dir");
        let mut server = Server::new_in(dir.path(), &[]);
        server.spawn_and_wait();
        MemServer { server, _dir: dir }
    }
}

impl std::ops::Deref for MemServer {
    type Target = Server;

    fn deref(&self) -> &Server {
        &self.server
    }
}

/// `GET pattern` as a map.
fn get_all(client: &mut nkv::Client, pattern: &str) -> BTreeMap<String, Value> {
    client.get_matching(pattern).expect("GET pattern")
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// `STATS` as numbers.
fn stats(client: &mut nkv::Client) -> BTreeMap<String, u64> {
    client.stats().expect("STATS")
}

/// The names of the subscribers `TRACE key` lists.
fn trace_names(client: &mut nkv::Client, key: &str) -> Vec<String> {
    let response = parse(&client.raw(&format!("TRACE {key}")).expect("TRACE"));
    assert_eq!(response["ok"], true, "{response}");
    response["subscribers"]
        .as_array()
        .expect("subscribers")
        .iter()
        .map(|s| s["name"].as_str().expect("name").to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Snapshot, marker, live events
// ---------------------------------------------------------------------------------------------

#[test]
fn snapshot_then_marker_then_live_events() {
    let server = Server::start();
    let mut client = server.client();
    for (i, key) in ["a", "a.b", "a.b.c", "ab", "b"].iter().enumerate() {
        assert_eq!(client.put(key, &json!(i + 1)).unwrap(), i as u64 + 1);
    }

    let mut sub = server.raw();
    sub.send("SUB a");
    let lines: Vec<String> = (0..5).map(|_| sub.line().expect("line")).collect();
    assert_eq!(
        lines,
        [
            r#"{"ok":true}"#,
            r#"{"event":"init","key":"a","value":1,"rev":1}"#,
            r#"{"event":"init","key":"a.b","value":2,"rev":2}"#,
            r#"{"event":"init","key":"a.b.c","value":3,"rev":3}"#,
            &format!(
                r#"{{"event":"ready","sub":"a","count":3,"rev":5,"epoch":"{}"}}"#,
                epoch_of(&server)
            ),
        ]
    );

    // Live: a put, a change outside the subscription (no event), a delete, a put of `a` itself.
    assert_eq!(client.put("a.b.c", &json!({"x": 2})).unwrap(), 6);
    assert_eq!(
        sub.line().unwrap(),
        r#"{"event":"put","key":"a.b.c","value":{"x":2},"rev":6}"#
    );
    assert_eq!(client.put("ab", &json!("no")).unwrap(), 7);
    assert_eq!(client.delete("a.b").unwrap(), Some(8));
    assert_eq!(
        sub.line().unwrap(),
        r#"{"event":"del","key":"a.b","rev":8}"#
    );
    assert_eq!(client.put("a", &json!([1, "two"])).unwrap(), 9);
    assert_eq!(
        sub.line().unwrap(),
        r#"{"event":"put","key":"a","value":[1,"two"],"rev":9}"#
    );
    // A text-form PUT of a non-JSON value arrives as a JSON string.
    assert_eq!(
        parse(&client.raw("PUT a.t hello world").unwrap()),
        json!({"ok": true, "rev": 10})
    );
    assert_eq!(
        sub.line().unwrap(),
        r#"{"event":"put","key":"a.t","value":"hello world","rev":10}"#
    );

    // `a.*` excludes `a`; `*` covers everything. State: a=[1,"two"] a.b.c={"x":2} a.t ab b.
    let (_below, view) = subscriber(&server, "a.*");
    assert_eq!(
        view.values.keys().collect::<Vec<_>>(),
        ["a.b.c", "a.t"],
        "SUB a.* snapshot"
    );
    assert_eq!(view.inits["a.b.c"], 6);
    let (mut all, view) = subscriber(&server, "*");
    assert_eq!(
        view.values.keys().collect::<Vec<_>>(),
        ["a", "a.b.c", "a.t", "ab", "b"],
        "SUB * snapshot"
    );
    assert_eq!(view.values["ab"], json!("no"));
    assert_eq!(client.put("zz", &json!(null)).unwrap(), 11);
    assert_eq!(
        all.line().unwrap(),
        r#"{"event":"put","key":"zz","value":null,"rev":11}"#
    );

    // The JSON form echoes the id on the ack; an empty prefix gives count 0.
    let mut empty = server.raw();
    empty.send(r#"{"op":"sub","key":"nothing.here","id":"s1"}"#);
    assert_eq!(next(&mut empty), json!({"ok": true, "id": "s1"}));
    assert_eq!(
        next(&mut empty),
        json!({"event": "ready", "sub": "nothing.here", "count": 0, "rev": 11, "epoch": epoch_of(&server)})
    );
}

/// Puts `count` keys `prefix.kNNNNN` with `value`, pipelined in chunks on one raw connection.
fn fill(server: &Server, prefix: &str, count: usize, value: &str) {
    let mut raw = server.raw();
    for chunk in (0..count).collect::<Vec<_>>().chunks(500) {
        let lines: String = chunk
            .iter()
            .map(|i| format!("PUT {prefix}.k{i:05} {value}\n"))
            .collect();
        raw.send_bytes(lines.as_bytes());
        for _ in chunk {
            assert_eq!(raw.json()["ok"], true);
        }
    }
}

#[test]
fn marker_count_holds_when_the_snapshot_overflows_the_queue() {
    // More initial values than the subscriber's queue (4096 items) and socket buffer hold, so
    // the tail of the snapshot and the marker wait in the mailbox's overflow table.
    const KEYS: usize = 20_000;
    let server = MemServer::start();
    fill(&server, "a", KEYS, "\"some value\"");
    let mut client = server.client();

    let mut sub = server.raw();
    sub.send("SUB a");
    wait_until("the snapshot to be queued", || {
        stats(&mut client)["events"] >= KEYS as u64
    });
    // A change of the last key in the snapshot, while its init is still queued.
    let last = format!("a.k{:05}", KEYS - 1);
    let rev = client.put(&last, &json!("changed")).unwrap();
    let coalesced = stats(&mut client)["coalesced"];

    assert_eq!(next(&mut sub), json!({"ok": true}));
    let mut view = View::default();
    let marker = loop {
        let ev = next(&mut sub);
        if ev["event"] == "ready" {
            break ev;
        }
        assert_eq!(ev["event"], "init", "before the marker: {ev}");
        view.apply(&ev);
    };
    eprintln!(
        "overflowing snapshot: {} init events before the marker {marker}; coalesced {coalesced}",
        view.events
    );
    assert_eq!(
        marker,
        json!({"event": "ready", "sub": "a", "count": view.events, "rev": marker["rev"].as_u64().expect("ready carries rev"), "epoch": marker["epoch"]}),
        "the marker counts the init events sent before it"
    );
    assert_eq!(view.events, KEYS as u64, "every key has its init event");
    assert_eq!(
        next(&mut sub),
        json!({"event": "put", "key": last, "value": "changed", "rev": rev})
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Prefix boundaries
// ---------------------------------------------------------------------------------------------

#[test]
fn prefix_boundaries_are_segment_boundaries() {
    let server = Server::start();
    let mut client = server.client();
    // Keys that share the text prefix `a` but not the segment, including characters that sort
    // right before and after `.`.
    let outside = [
        "ab", "ab.x", "a-b", "a-b.x", "a+x", "a#x", "a:x", "a@x", "a_x", "a0", "b.a", "ba",
    ];
    for key in outside {
        client.put(key, &json!(key)).unwrap();
    }
    let (mut sub, view) = subscriber(&server, "a");
    assert!(view.values.is_empty(), "snapshot of a: {:?}", view.values);

    for key in outside {
        client.put(key, &json!("again")).unwrap();
        client.delete(key).unwrap();
    }
    let rev = client.put("a.x", &json!(1)).unwrap();
    // Had any outside key been delivered, it would come before a.x.
    assert_eq!(
        next(&mut sub),
        json!({"event": "put", "key": "a.x", "value": 1, "rev": rev})
    );
    client.put("ab.x", &json!(2)).unwrap();
    let rev = client.put("a", &json!(3)).unwrap();
    assert_eq!(
        next(&mut sub),
        json!({"event": "put", "key": "a", "value": 3, "rev": rev})
    );
    client.put("ab", &json!(4)).unwrap();
    let rev = client.put("a.b.c.d", &json!(5)).unwrap();
    assert_eq!(
        next(&mut sub),
        json!({"event": "put", "key": "a.b.c.d", "value": 5, "rev": rev})
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Snapshot atomicity under concurrent writes
// ---------------------------------------------------------------------------------------------

/// One acknowledged change: its revision and whether it was a delete.
type Change = (u64, bool);

#[test]
fn snapshot_and_registration_are_atomic() {
    const WRITERS: usize = 4;
    const KEYS_PER_WRITER: usize = 10;
    const SUBSCRIBERS: u64 = 4;
    /// Writers may run at most this many changes ahead of the last `SUB` sent.
    const STEP: u64 = 400;
    const TOTAL: u64 = (SUBSCRIBERS + 1) * STEP;
    // Everything a subscriber can be sent fits in its queue (4096 items): no coalescing may
    // happen, so "no loss" applies and every acknowledged change must arrive.
    const _: () = assert!(TOTAL + (WRITERS * KEYS_PER_WRITER) as u64 + 3 < 4096);

    let server = MemServer::start();
    // Changes claimed by writers, changes acknowledged, and `SUB`s sent. The gate keeps the
    // writers busy around every `SUB` (they are released the moment it is sent) without
    // letting them finish before the last subscriber arrives.
    let issued = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let released = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let mut client = server.client();
            let (issued, acked, released) = (issued.clone(), acked.clone(), released.clone());
            thread::spawn(move || {
                let mut history: HashMap<String, Vec<Change>> = HashMap::new();
                let mut exists = [false; KEYS_PER_WRITER];
                for n in 0.. {
                    let i = issued.fetch_add(1, Ordering::Relaxed);
                    if i >= TOTAL {
                        break;
                    }
                    wait_until("the next SUB", || {
                        i < (released.load(Ordering::Relaxed) + 1) * STEP
                    });
                    let k = n % KEYS_PER_WRITER;
                    let key = format!("a.w{w}.k{k}");
                    // Every third visit to an existing key deletes it.
                    let change = if exists[k] && (n / KEYS_PER_WRITER) % 3 == 2 {
                        exists[k] = false;
                        (client.delete(&key).unwrap().expect("key exists"), true)
                    } else {
                        exists[k] = true;
                        (client.put(&key, &json!({"w": w, "n": n})).unwrap(), false)
                    };
                    history.entry(key).or_default().push(change);
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                history
            })
        })
        .collect();

    // Subscribers join while the writers run; each reads on its own thread.
    let readers: Vec<_> = (0..SUBSCRIBERS)
        .map(|s| {
            wait_until("writers to make progress", || {
                acked.load(Ordering::Relaxed) >= s * STEP + STEP / 2
            });
            let mut raw = server.raw();
            raw.send("SUB a");
            released.fetch_add(1, Ordering::Relaxed);
            thread::spawn(move || {
                let mut view = read_snapshot(&mut raw, "a");
                let snapshot = view.inits.clone();
                view.follow_until(&mut raw, "a.sentinel");
                (snapshot, view)
            })
        })
        .collect();

    let mut history: HashMap<String, Vec<Change>> = HashMap::new();
    for writer in writers {
        history.extend(writer.join().expect("writer"));
    }
    let mut client = server.client();
    client.put("a.sentinel", &json!("done")).unwrap();
    let expected = get_all(&mut client, "a.*");

    for (s, reader) in readers.into_iter().enumerate() {
        let (snapshot, view) = reader.join().expect("subscriber");
        assert_eq!(
            view.values, expected,
            "subscriber {s}: final view differs from GET a.*"
        );
        for (key, changes) in &history {
            let seen = view.history.get(key).cloned().unwrap_or_default();
            // Where the snapshot cut this key's history: after its init revision, or (key
            // absent from the snapshot) after its last delete or before its first change.
            let after: Vec<u64> = match snapshot.get(key) {
                Some(&init) => {
                    let i = changes
                        .iter()
                        .position(|&(rev, del)| rev == init && !del)
                        .unwrap_or_else(|| {
                            panic!("subscriber {s}: init rev {init} of {key} is not a put of it")
                        });
                    changes[i + 1..].iter().map(|c| c.0).collect()
                }
                None => {
                    let first = seen.first().copied().unwrap_or(u64::MAX);
                    let i = changes.iter().position(|c| c.0 >= first);
                    let i = i.unwrap_or(changes.len());
                    assert!(
                        i == 0 || changes[i - 1].1,
                        "subscriber {s}: {key} was absent from the snapshot but its change \
                         before the first one delivered (rev {:?}) was a put; missed changes: \
                         seen {seen:?}, history {changes:?}",
                        changes[i - 1]
                    );
                    changes[i..].iter().map(|c| c.0).collect()
                }
            };
            let seen_after: Vec<u64> = match snapshot.get(key) {
                Some(_) => seen[1..].to_vec(),
                None => seen.clone(),
            };
            assert_eq!(
                seen_after,
                after,
                "subscriber {s}: changes of {key} after the snapshot (snapshot rev {:?})",
                snapshot.get(key)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Burst with ten subscribers, one slow
// ---------------------------------------------------------------------------------------------

#[test]
fn burst_converges_at_every_subscriber() {
    const WRITERS: usize = 4;
    const PUTS: usize = 10_000;
    const KEYS: usize = 100;
    const SUBSCRIBERS: usize = 10;
    let server = MemServer::start();

    // Subscriber 0 is the slow one: it reads nothing until the writers are done.
    let mut slow = server.raw();
    subscribe_on(&mut slow, "a");
    let fast: Vec<_> = (1..SUBSCRIBERS)
        .map(|_| {
            let (mut raw, mut view) = subscriber(&server, "a");
            thread::spawn(move || {
                view.follow_until(&mut raw, "a.sentinel");
                view
            })
        })
        .collect();

    let padding = "x".repeat(64);
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let mut client = server.client();
            let padding = padding.clone();
            thread::spawn(move || {
                for n in 0..PUTS / WRITERS {
                    let key = format!("a.k{}", (n * 7 + w * 13) % KEYS);
                    client
                        .put(&key, &json!({"w": w, "n": n, "pad": padding}))
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("writer");
    }
    let write_time = started.elapsed();
    let mut client = server.client();
    client.put("a.sentinel", &json!("done")).unwrap();
    let expected = get_all(&mut client, "a.*");
    assert_eq!(expected.len(), KEYS + 1);

    let mut received = Vec::new();
    let mut slow_view = View::default();
    slow_view.follow_until(&mut slow, "a.sentinel");
    for (i, view) in std::iter::once(slow_view)
        .chain(fast.into_iter().map(|r| r.join().expect("subscriber")))
        .enumerate()
    {
        assert_eq!(view.values, expected, "subscriber {i} final state");
        received.push(view.events);
    }
    let stats = stats(&mut client);
    eprintln!(
        "burst: {PUTS} puts by {WRITERS} writers over {KEYS} keys in {write_time:.2?}; \
         STATS events={} coalesced={}; events received per subscriber (0 = slow): {received:?}",
        stats["events"], stats["coalesced"]
    );
    // Nine subscribers kept up or coalesced; none may receive more than every change.
    assert!(received.iter().all(|&n| n <= PUTS as u64 + 1));
}

// ---------------------------------------------------------------------------------------------
// 5. No backlog, no loss
// ---------------------------------------------------------------------------------------------

#[test]
fn a_subscriber_that_keeps_up_sees_every_change() {
    // Fewer changes than the queue holds, so the subscriber cannot fall behind far enough for
    // coalescing to be allowed, however slowly this test's reader runs.
    const CHANGES: usize = 3000;
    let server = MemServer::start();
    let (mut raw, mut view) = subscriber(&server, "a");
    let reader = thread::spawn(move || {
        view.follow_until(&mut raw, "a.sentinel");
        view
    });
    let mut client = server.client();
    let mut expected: HashMap<String, Vec<u64>> = HashMap::new();
    for n in 0..CHANGES {
        let key = format!("a.k{}", n % 3);
        let rev = if n % 10 == 9 {
            client.delete(&key).unwrap().expect("exists")
        } else {
            client.put(&key, &json!(n)).unwrap()
        };
        expected.entry(key).or_default().push(rev);
    }
    client.put("a.sentinel", &json!(0)).unwrap();
    let view = reader.join().expect("subscriber");
    for (key, revs) in &expected {
        assert_eq!(&view.history[key], revs, "every change of {key}, in order");
    }
    assert_eq!(view.events, CHANGES as u64 + 1);
    assert_eq!(view.values, get_all(&mut client, "a.*"));
    assert_eq!(stats(&mut client)["coalesced"], 0);
}

// ---------------------------------------------------------------------------------------------
// 6. A stalled subscriber never blocks writers, holds bounded memory, and converges
// ---------------------------------------------------------------------------------------------

#[test]
fn stalled_subscriber_is_isolated_and_converges() {
    const WRITERS: usize = 4;
    const PUTS: usize = 100_000;
    const KEYS: usize = 1000;
    let server = MemServer::start();
    let pid = server.pid();

    let mut stalled = server.raw();
    subscribe_on(&mut stalled, "a");
    // A subscriber that keeps reading, to show the stalled one does not hold it up either.
    let (mut live, mut live_view) = subscriber(&server, "a");
    // Its deadline covers the writers' run as well as the catching up.
    let live_end = Instant::now() + 3 * DEADLINE;
    let live_reader = thread::spawn(move || {
        live_view.follow_until_by(&mut live, "a.sentinel", live_end);
        live_view
    });

    let rss_before = rss_kib(pid);
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let mut client = server.client();
            thread::spawn(move || {
                let mut max_latency = Duration::ZERO;
                let mut max_rss = 0;
                for n in 0..PUTS / WRITERS {
                    let key = format!("a.k{}", (n + w * 250) % KEYS);
                    let t = Instant::now();
                    client.put(&key, &json!({"w": w, "n": n})).unwrap();
                    max_latency = max_latency.max(t.elapsed());
                    if w == 0 && n % 1000 == 0 {
                        max_rss = max_rss.max(rss_kib(pid));
                    }
                }
                (max_latency, max_rss)
            })
        })
        .collect();
    let mut max_latency = Duration::ZERO;
    let mut max_rss = rss_before;
    for writer in writers {
        let (latency, rss) = writer.join().expect("writer");
        max_latency = max_latency.max(latency);
        max_rss = max_rss.max(rss);
    }
    let write_time = started.elapsed();
    max_rss = max_rss.max(rss_kib(pid));
    let mut client = server.client();
    let stalled_stats = stats(&mut client);
    client.put("a.sentinel", &json!("done")).unwrap();
    let expected = get_all(&mut client, "a.*");
    assert_eq!(expected.len(), KEYS + 1);

    let resumed = Instant::now();
    let mut view = View::default();
    view.follow_until(&mut stalled, "a.sentinel");
    let catch_up = resumed.elapsed();
    let live_view = live_reader.join().expect("live subscriber");
    let growth = max_rss.saturating_sub(rss_before);
    eprintln!(
        "stalled: {PUTS} puts by {WRITERS} writers over {KEYS} keys in {write_time:.2?} \
         ({:.0} puts/s); max put latency {max_latency:.2?}; server RSS {rss_before} KiB before, \
         max {max_rss} KiB (growth {growth} KiB); STATS events={} coalesced={}; stalled \
         subscriber caught up with {} events in {catch_up:.2?}; live subscriber got {}",
        PUTS as f64 / write_time.as_secs_f64(),
        stalled_stats["events"],
        stalled_stats["coalesced"],
        view.events,
        live_view.events,
    );
    assert_eq!(view.values, expected, "stalled subscriber's final state");
    assert_eq!(live_view.values, expected, "live subscriber's final state");
    assert!(
        max_latency < Duration::from_secs(1),
        "a put took {max_latency:?} while a subscriber was stalled"
    );
    assert!(
        growth < 64 * 1024,
        "server RSS grew by {growth} KiB while a subscriber was stalled"
    );
    assert!(
        stalled_stats["coalesced"] > 0,
        "a stalled subscriber's mailbox should have coalesced: {stalled_stats:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. UNSUB and disconnect isolation
// ---------------------------------------------------------------------------------------------

#[test]
fn unsub_and_disconnect_affect_only_their_connection() {
    let server = Server::start();
    let mut client = server.client();

    let mut leaver = server.raw();
    assert_eq!(leaver.request("HELLO leaver"), json!({"ok": true}));
    subscribe_on(&mut leaver, "a");
    let mut keeper = server.raw();
    assert_eq!(keeper.request("HELLO keeper"), json!({"ok": true}));
    subscribe_on(&mut keeper, "a");

    let rev = client.put("a.x", &json!(1)).unwrap();
    let event = json!({"event": "put", "key": "a.x", "value": 1, "rev": rev});
    assert_eq!(next(&mut leaver), event);
    assert_eq!(next(&mut keeper), event);

    assert_eq!(leaver.request("UNSUB a"), json!({"ok": true}));
    let rev = client.put("a.y", &json!(2)).unwrap();
    assert_eq!(
        next(&mut keeper),
        json!({"event": "put", "key": "a.y", "value": 2, "rev": rev})
    );
    // Responses are ordered with events: had a.y reached the leaver it would come first.
    assert_eq!(
        leaver.request("HEALTH"),
        json!({"ok": true, "status": "ok"})
    );
    for target in ["a", "b", "a.*"] {
        let err = leaver.request(&format!("UNSUB {target}"));
        assert_eq!(err["ok"], false, "UNSUB {target}: {err}");
        assert_eq!(err["error"], "not_found", "UNSUB {target}: {err}");
    }
    let err = leaver.request(r#"{"op":"unsub","key":"a","id":3}"#);
    assert_eq!(
        (&err["error"], &err["id"]),
        (&json!("not_found"), &json!(3))
    );
    assert_eq!(trace_names(&mut client, "a.x"), ["keeper"]);

    // The keeper saw none of that and keeps streaming.
    let rev = client.delete("a.x").unwrap().unwrap();
    assert_eq!(
        next(&mut keeper),
        json!({"event": "del", "key": "a.x", "rev": rev})
    );

    // A third subscriber to the same key disconnects.
    let mut gone = server.raw();
    assert_eq!(gone.request("HELLO gone"), json!({"ok": true}));
    subscribe_on(&mut gone, "a");
    assert_eq!(trace_names(&mut client, "a.z"), ["keeper", "gone"]);
    drop(gone);
    wait_until("the disconnected subscriber to be forgotten", || {
        trace_names(&mut client, "a.z") == ["keeper"]
    });
    let rev = client.put("a.z", &json!(3)).unwrap();
    assert_eq!(
        next(&mut keeper),
        json!({"event": "put", "key": "a.z", "value": 3, "rev": rev})
    );
    // The keeper's own UNSUB works too.
    assert_eq!(keeper.request("UNSUB a"), json!({"ok": true}));
    assert!(trace_names(&mut client, "a.z").is_empty());
}

// ---------------------------------------------------------------------------------------------
// 8. Wildcard delete
// ---------------------------------------------------------------------------------------------

#[test]
fn wildcard_delete_sends_one_del_per_key() {
    let server = Server::start();
    let mut client = server.client();
    for key in ["a", "a.1", "a.2", "a.3.x", "ab.1", "b.1"] {
        client.put(key, &json!(key)).unwrap();
    }
    let (mut sub, _) = subscriber(&server, "a");
    let (mut everything, _) = subscriber(&server, "*");

    let response = parse(&client.raw("DEL a.*").unwrap());
    assert_eq!(response, json!({"ok": true, "deleted": 3}));
    for raw in [&mut sub, &mut everything] {
        let mut view = View::default();
        let mut keys = Vec::new();
        for _ in 0..3 {
            let ev = next(raw);
            assert_eq!(ev["event"], "del", "{ev}");
            keys.push(view.apply(&ev));
        }
        keys.sort();
        assert_eq!(keys, ["a.1", "a.2", "a.3.x"]);
    }
    // Nothing else was deleted: the next event is the sentinel's.
    let rev = client.put("a.sentinel", &json!(1)).unwrap();
    assert_eq!(next(&mut sub)["rev"], rev);
    assert_eq!(next(&mut everything)["rev"], rev);
    client.delete("a.sentinel").unwrap();
    assert_eq!(next(&mut sub)["event"], "del");
    assert_eq!(next(&mut everything)["event"], "del");
    assert_eq!(
        client.keys(None).unwrap(),
        ["a", "ab.1", "b.1"],
        "DEL a.* removed only keys below a"
    );

    // DEL * reaches the `*` subscriber once per key; a match-nothing delete sends nothing.
    assert_eq!(
        parse(&client.raw("DEL nothing.*").unwrap()),
        json!({"ok": true, "deleted": 0})
    );
    assert_eq!(
        parse(&client.raw("DEL *").unwrap()),
        json!({"ok": true, "deleted": 3})
    );
    let mut keys: Vec<String> = (0..3)
        .map(|_| {
            let ev = next(&mut everything);
            assert_eq!(ev["event"], "del", "{ev}");
            ev["key"].as_str().unwrap().to_owned()
        })
        .collect();
    keys.sort();
    assert_eq!(keys, ["a", "ab.1", "b.1"]);
    assert_eq!(next(&mut sub)["key"], "a");
}

// ---------------------------------------------------------------------------------------------
// 9. Subscriber-mode rules, several SUBs, HELLO, TRACE, STATS
// ---------------------------------------------------------------------------------------------

#[test]
fn subscriber_connection_rules_trace_and_stats() {
    let server = Server::start();
    let mut client = server.client();
    client.put("a.x", &json!(1)).unwrap();
    client.put("b.y", &json!(2)).unwrap();
    assert_eq!(stats(&mut client)["subscribers"], 0);

    let mut sub = server.raw();
    assert_eq!(sub.request("HELLO watcher"), json!({"ok": true}));
    let view = subscribe_on(&mut sub, "a");
    assert_eq!(view.inits["a.x"], 1);

    for request in [
        "GET a.x",
        "PUT a.x 5",
        "DEL a.x",
        "KEYS",
        "STATS",
        "TRACE a.x",
    ] {
        let err = sub.request(request);
        assert_eq!(err["ok"], false, "{request}: {err}");
        assert_eq!(err["error"], "wrong_mode", "{request}: {err}");
    }
    let err = sub.request(r#"{"op":"get","key":"a.x","id":"g"}"#);
    assert_eq!(
        (&err["error"], &err["id"]),
        (&json!("wrong_mode"), &json!("g"))
    );
    assert_eq!(client.get("a.x").unwrap(), Some(json!(1)), "PUT refused");
    assert_eq!(client.keys(None).unwrap(), ["a.x", "b.y"], "DEL refused");

    // Still streaming.
    let rev = client.put("a.x", &json!(3)).unwrap();
    assert_eq!(
        next(&mut sub),
        json!({"event": "put", "key": "a.x", "value": 3, "rev": rev})
    );

    // A second and a third SUB, each with its own ack, snapshot and marker.
    let view = subscribe_on(&mut sub, "b");
    assert_eq!(view.values, BTreeMap::from([("b.y".to_owned(), json!(2))]));
    let view = subscribe_on(&mut sub, "a.x");
    assert_eq!(view.values, BTreeMap::from([("a.x".to_owned(), json!(3))]));
    let rev = client.put("b.y", &json!(4)).unwrap();
    assert_eq!(next(&mut sub)["rev"], rev);
    // a.x is covered twice (by `a` and `a.x`) but sent once per change.
    let rev = client.put("a.x", &json!(5)).unwrap();
    assert_eq!(next(&mut sub)["rev"], rev);
    assert_eq!(sub.request("HEALTH"), json!({"ok": true, "status": "ok"}));

    // TRACE shows the name given before subscribing, then after a rename.
    let trace = parse(&client.raw("TRACE a.x").unwrap());
    let subs = trace["subscribers"].as_array().expect("subscribers");
    assert_eq!(subs.len(), 1, "{trace}");
    assert_eq!(trace["key"], "a.x");
    assert_eq!(subs[0]["name"], "watcher");
    assert_eq!(subs[0]["subscriptions"], json!(["a", "b", "a.x"]));
    assert!(subs[0]["id"].as_u64().is_some(), "{trace}");
    assert_eq!(sub.request("HELLO renamed"), json!({"ok": true}));
    assert_eq!(trace_names(&mut client, "a.x"), ["renamed"]);
    assert_eq!(trace_names(&mut client, "b"), ["renamed"]);
    assert_eq!(trace_names(&mut client, "b.y.z"), ["renamed"]);
    assert!(trace_names(&mut client, "c").is_empty());

    // A second subscriber connection (unnamed: pid:<peer pid>), covering a.x too.
    let (other, _) = subscriber(&server, "*");
    assert_eq!(stats(&mut client)["subscribers"], 2);
    let names = trace_names(&mut client, "a.x");
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(names[0], "renamed");
    assert_eq!(names[1], format!("pid:{}", std::process::id()));
    drop(other);
    wait_until("STATS to count one subscriber", || {
        stats(&mut client)["subscribers"] == 1
    });

    // QUIT ends the subscriber connection cleanly.
    assert_eq!(sub.request("QUIT"), json!({"ok": true}));
    assert_eq!(sub.line(), None);
    wait_until("STATS to count no subscriber", || {
        stats(&mut client)["subscribers"] == 0
    });
}

// ---------------------------------------------------------------------------------------------
// 10. The Rust client and socat as subscribers
// ---------------------------------------------------------------------------------------------

#[test]
fn rust_client_subscription_yields_typed_events() {
    use nkv::Event;
    let server = Server::start();
    let mut client = server.client();
    let r1 = client.put("a", &json!(1)).unwrap();
    let r2 = client.put("a.b", &json!({"x": true})).unwrap();
    let r3 = client.put("ab", &json!(0)).unwrap();

    let mut sub = client.subscribe("a").unwrap();
    let mut next_event = || sub.next().expect("an event").expect("a good event");
    assert_eq!(
        next_event(),
        Event::Init {
            key: "a".into(),
            value: json!(1),
            rev: r1
        }
    );
    assert_eq!(
        next_event(),
        Event::Init {
            key: "a.b".into(),
            value: json!({"x": true}),
            rev: r2
        }
    );
    match next_event() {
        Event::Ready {
            sub,
            count,
            rev,
            epoch,
        } => {
            assert_eq!((sub.as_str(), count, rev), ("a", 2, r3));
            assert_eq!(epoch.map(|e| e.len()), Some(32), "ready carries the epoch");
        }
        other => panic!("not ready: {other:?}"),
    }
    // The client stays usable for requests while its subscription streams.
    let r3 = client.put("a.b", &json!("two")).unwrap();
    assert_eq!(
        next_event(),
        Event::Put {
            key: "a.b".into(),
            value: json!("two"),
            rev: r3
        }
    );
    let r4 = client.delete("a").unwrap().unwrap();
    assert_eq!(
        next_event(),
        Event::Del {
            key: "a".into(),
            rev: r4
        }
    );
}

#[test]
fn socat_subscriber_streams_events() {
    let server = Server::start();
    let mut client = server.client();
    let r1 = client.put("a.b", &json!(1)).unwrap();

    let mut socat = server
        .socat_command()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("socat must be installed (apt-get install socat)");
    let mut stdin = socat.stdin.take().expect("stdin");
    let stdout = socat.stdout.take().expect("stdout");
    // A pipe has no read timeout: a thread forwards lines, the test receives with a deadline.
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = || rx.recv_timeout(DEADLINE).expect("a line from socat");

    stdin.write_all(b"SUB a\n").expect("write to socat");
    stdin.flush().expect("flush");
    assert_eq!(line(), r#"{"ok":true}"#);
    assert_eq!(
        line(),
        format!(r#"{{"event":"init","key":"a.b","value":1,"rev":{r1}}}"#)
    );
    assert_eq!(
        line(),
        format!(
            r#"{{"event":"ready","sub":"a","count":1,"rev":{r1},"epoch":"{}"}}"#,
            epoch_of(&server)
        )
    );
    let r2 = client.put("a.c", &json!({"on": true})).unwrap();
    assert_eq!(
        line(),
        format!(r#"{{"event":"put","key":"a.c","value":{{"on":true}},"rev":{r2}}}"#)
    );
    let r3 = client.delete("a.b").unwrap().unwrap();
    assert_eq!(
        line(),
        format!(r#"{{"event":"del","key":"a.b","rev":{r3}}}"#)
    );

    let _ = socat.kill();
    let _ = socat.wait();
}

// ---------------------------------------------------------------------------------------------
// 11. Shutdown
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_tells_every_subscriber_then_closes() {
    let mut server = Server::start();
    let mut client = server.client();
    client.put("a.x", &json!(1)).unwrap();
    // Many subscribers, so a writer thread that has not run yet when the server exits shows.
    let mut subs: Vec<Raw> = (0..20).map(|_| subscriber(&server, "a").0).collect();
    let mut typed = client.subscribe("*").unwrap();
    assert!(matches!(typed.next(), Some(Ok(nkv::Event::Init { .. }))));
    assert!(matches!(typed.next(), Some(Ok(nkv::Event::Ready { .. }))));
    // One event queued to every subscriber when the signal arrives.
    let rev = client.put("a.y", &json!(2)).unwrap();
    let event = json!({"event": "put", "key": "a.y", "value": 2, "rev": rev});

    server.signal(libc_sigterm());
    for (i, sub) in subs.iter_mut().enumerate() {
        let lines: Vec<Value> = sub.lines_until_closed().iter().map(|l| parse(l)).collect();
        assert_eq!(
            lines,
            [event.clone(), json!({"event": "shutdown"})],
            "subscriber {i}: the queued event, the shutdown event, then end of stream"
        );
    }
    let events: Vec<nkv::Event> = typed.map(|e| e.expect("a good event")).collect();
    assert!(
        matches!(
            events.as_slice(),
            [nkv::Event::Put { .. }, nkv::Event::Shutdown]
        ),
        "typed subscriber: {events:?}"
    );
    let status = server.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "server exit status {status}");
    assert!(!server.socket.exists(), "socket file removed");
}

// ---------------------------------------------------------------------------------------------
// Notification latency
// ---------------------------------------------------------------------------------------------

#[test]
fn notification_latency_figures() {
    const PUTS: u64 = 200;
    let server = MemServer::start();
    let mut report = Vec::new();
    for subscribers in [1usize, 10, 100] {
        let prefix = format!("lat{subscribers}");
        let readers: Vec<_> = (0..subscribers)
            .map(|_| {
                let (mut raw, _) = subscriber(&server, &prefix);
                thread::spawn(move || {
                    (0..PUTS)
                        .map(|_| {
                            let ev = next(&mut raw);
                            (ev["rev"].as_u64().expect("rev"), Instant::now())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut writer = server.raw();
        let mut acked = HashMap::new();
        for n in 0..PUTS {
            let response = writer.request(&format!("PUT {prefix}.k {n}"));
            acked.insert(response["rev"].as_u64().expect("rev"), Instant::now());
        }
        let mut latencies: Vec<Duration> = readers
            .into_iter()
            .flat_map(|r| r.join().expect("reader"))
            .map(|(rev, at)| at.saturating_duration_since(acked[&rev]))
            .collect();
        latencies.sort_unstable();
        let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
        report.push(format!(
            "{subscribers} subscriber(s): p50 {p50:.2?} p99 {p99:.2?}"
        ));
        assert!(
            p99 < Duration::from_millis(500),
            "{subscribers} subscribers: p99 {p99:?}"
        );
    }
    eprintln!(
        "notification latency (put acknowledged -> event read), {PUTS} sequential puts: {}",
        report.join("; ")
    );
}

/// The server's history epoch, as every `ready` carries it (from its `.epoch` file).
fn epoch_of(server: &Server) -> String {
    let text = std::fs::read_to_string(server.data.join(".epoch")).expect(".epoch");
    text.trim_end().to_owned()
}

/// A fan-out large enough to be split between the publisher and the fan-out threads
/// (`mailbox::fanout`) keeps every subscriber's per-key order and latest state, with two
/// publishers at once.
#[test]
fn a_large_fan_out_shared_between_threads_keeps_every_promise() {
    fan_out_through_the_helpers_keeps_every_promise(80);
}

/// A small fan-out, handed whole to a fan-out thread while the publisher goes back to its
/// client, keeps the same promises.
#[test]
fn a_small_fan_out_handed_to_a_helper_keeps_every_promise() {
    fan_out_through_the_helpers_keeps_every_promise(5);
}

fn fan_out_through_the_helpers_keeps_every_promise(subscribers: usize) {
    let server = Server::start();
    let watches: Vec<_> = (0..subscribers)
        .map(|_| crate::watchcheck::Watch::start(&server, &["f"]))
        .collect();
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let mut raw = server.raw();
            thread::spawn(move || {
                for burst in 0..15u64 {
                    let mut lines = String::new();
                    for i in 0..100u64 {
                        let n = burst * 100 + i;
                        let key = format!("f.k{}", (n * 7 + w) % 25);
                        if n % 23 == 0 {
                            lines.push_str(&format!("DEL {key}\n"));
                        } else {
                            lines.push_str(&format!("PUT {key} {{\"w\":{w},\"n\":{n}}}\n"));
                        }
                    }
                    raw.send_bytes(lines.as_bytes());
                    for _ in 0..100 {
                        let reply = raw.json();
                        assert!(
                            reply["ok"] == true || reply["error"] == "not_found",
                            "{reply}"
                        );
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let mut probe = server.raw();
    for (i, watch) in watches.iter().enumerate() {
        watch.wait_converged(&mut probe, "f.*");
        watch.assert_ok(&format!("subscriber {i}"));
    }
    // The fan-out was shared (on more than one CPU, as in CI).
    let shared = fanout_threads(server.pid()) > 0;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(
        shared,
        cpus > 1,
        "fan-out thread present: {shared}, {cpus} CPUs"
    );
}

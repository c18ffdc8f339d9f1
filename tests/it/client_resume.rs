//! The Rust client's issue-12 features against the real server: compare-and-set with a typed
//! outcome, session keys that live with the client, and a [`nkv::Watch`] that reconnects
//! across server restarts, resumes, surfaces `reset`, and converges (deletes included).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};

use nkv::client::Connection;
use nkv::{Cas, Event, Watch};

use crate::support::{Server, DEADLINE};

#[test]
fn put_if_and_delete_if_report_a_conflict_with_the_current_revision() {
    let server = Server::start();
    let mut client = server.client();
    let created = client.put_if("lock", &json!("me"), 0).unwrap();
    let Cas::Done(rev) = created else {
        panic!("create-if-absent of a new key: {created:?}")
    };
    assert_eq!(
        client.put_if("lock", &json!("you"), 0).unwrap(),
        Cas::Conflict(rev)
    );
    assert_eq!(
        client.put_if("lock", &json!("you"), rev + 5).unwrap(),
        Cas::Conflict(rev)
    );
    assert_eq!(
        client.get("lock").unwrap(),
        Some(json!("me")),
        "a conflict changes nothing"
    );
    let next = client.put_if("lock", &json!("again"), rev).unwrap();
    assert_eq!(next, Cas::Done(rev + 1));
    assert_eq!(
        client.delete_if("lock", rev).unwrap(),
        Cas::Conflict(rev + 1)
    );
    assert_eq!(
        client.delete_if("lock", rev + 1).unwrap().done(),
        Some(rev + 2)
    );
    assert_eq!(client.get("lock").unwrap(), None);
    // Absent: a conflict at revision 0; `delete_if(k, 0)` of a missing key is not_found.
    assert_eq!(client.delete_if("lock", rev).unwrap(), Cas::Conflict(0));
    assert_eq!(client.put_if("lock", &1, 7).unwrap(), Cas::Conflict(0));
    assert!(client.delete_if("lock", 0).unwrap_err().is_not_found());
    // Other failures stay errors.
    assert!(client.put_if("a..b", &1, 0).is_err());
}

#[test]
fn racing_put_if_writers_have_one_winner_per_revision() {
    const WRITERS: usize = 4;
    const INCREMENTS: u64 = 25;
    let server = Server::start();
    server.client().put("counter", &0).unwrap();
    // Every successful put_if, by the revision it expected.
    let won: Arc<Mutex<HashMap<u64, usize>>> = Arc::default();
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let mut client = server.client();
            let won = won.clone();
            std::thread::spawn(move || {
                let mut done = 0;
                let mut conflicts = 0;
                while done < INCREMENTS {
                    let entry = client.get_entry("counter").unwrap().expect("counter");
                    let n = entry.value.as_u64().unwrap();
                    match client.put_if("counter", &(n + 1), entry.rev).unwrap() {
                        Cas::Done(rev) => {
                            assert!(rev > entry.rev);
                            *won.lock().unwrap().entry(entry.rev).or_default() += 1;
                            done += 1;
                        }
                        Cas::Conflict(current) => {
                            assert_ne!(current, entry.rev, "writer {w}: conflict at its own rev");
                            conflicts += 1;
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    let conflicts: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let total = WRITERS as u64 * INCREMENTS;
    let won = won.lock().unwrap();
    assert!(
        won.values().all(|&n| n == 1),
        "two winners at a revision: {won:?}"
    );
    assert_eq!(won.len() as u64, total);
    assert_eq!(server.client().get("counter").unwrap(), Some(json!(total)));
    println!("{total} increments by {WRITERS} writers, {conflicts} conflicts");
}

#[test]
fn a_session_key_lives_as_long_as_its_client() {
    let server = Server::start();
    let mut watcher = server.client().watch("svc").unwrap();
    assert!(matches!(next(&mut watcher), Event::Ready { .. }));
    let mut owner = server.client();
    let rev = owner.put_session("svc.alive", &json!({"pid": 1})).unwrap();
    assert_eq!(
        next(&mut watcher),
        Event::Put {
            key: "svc.alive".into(),
            value: json!({"pid": 1}),
            rev
        }
    );
    assert_eq!(owner.connections(), 1);
    let mut other = server.client();
    assert_eq!(other.get("svc.alive").unwrap(), Some(json!({"pid": 1})));
    // Requests on the owner's connection keep it, and the key, alive.
    owner.health().unwrap();
    assert_eq!(other.get("svc.alive").unwrap(), Some(json!({"pid": 1})));
    drop(owner);
    let Event::Del { key, .. } = next(&mut watcher) else {
        panic!("the session key's del")
    };
    assert_eq!(key, "svc.alive");
    assert_eq!(other.get("svc.alive").unwrap(), None);
}

#[test]
fn wait_closed_returns_when_the_server_goes_and_the_session_key_with_it() {
    let mut server = Server::start();
    let mut owner = server.client();
    owner.put_session("svc.alive", &1).unwrap();
    let waiting = std::thread::spawn(move || {
        owner.wait_closed().unwrap();
        owner
    });
    server.restart();
    let mut owner = waiting.join().unwrap();
    assert_eq!(
        server.client().get("svc.alive").unwrap(),
        None,
        "memory only"
    );
    // The next request opens a new connection, which the client counts.
    owner.put_session("svc.alive", &2).unwrap();
    assert_eq!(owner.connections(), 2);
    assert_eq!(server.client().get("svc.alive").unwrap(), Some(json!(2)));
}

/// The next event of `watch`, within the test deadline.
fn next(watch: &mut Watch) -> Event {
    let delivery = watch
        .next_delivery(Some(Instant::now() + DEADLINE))
        .expect("an event in time")
        .expect("the watch goes on");
    delivery.event.into_event().expect("a value that parses")
}

/// What a consumer of a watch holds: every key it was given and not told deleted.
#[derive(Default)]
struct Model {
    keys: BTreeMap<String, Value>,
    resets: usize,
    /// The events after the last `ready`'s predecessor, in order.
    log: Vec<Event>,
}

impl Model {
    /// Applies events until a `ready`; returns the events it applied (the `ready` included).
    fn until_ready(&mut self, watch: &mut Watch) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            let event = next(watch);
            match &event {
                Event::Init { key, value, .. } | Event::Put { key, value, .. } => {
                    self.keys.insert(key.clone(), value.clone());
                }
                Event::Del { key, .. } => {
                    self.keys.remove(key);
                }
                Event::Reset { .. } => self.resets += 1,
                Event::Ready { .. } => {
                    events.push(event);
                    self.log.extend(events.iter().cloned());
                    return events;
                }
                Event::Shutdown => panic!("a reconnecting watch passes no shutdown on"),
            }
            events.push(event);
        }
    }
}

fn state(server: &Server, prefix: &str) -> BTreeMap<String, Value> {
    let mut client = server.client();
    client
        .keys(Some(prefix))
        .unwrap()
        .into_iter()
        .map(|k| {
            let v = client.get(&k).unwrap().unwrap();
            (k, v)
        })
        .collect()
}

/// Keys `a.k0..a.k4`, one more below `a.gone`, and `b` (not covered).
fn fill(server: &Server) {
    let mut client = server.client();
    for i in 0..5 {
        client.put(&format!("a.k{i}"), &i).unwrap();
    }
    client.put("a.gone", &"soon").unwrap();
    client.put("b", &0).unwrap();
}

/// The changes a watch misses while it is not reading: a changed, a new, a deleted key, and a
/// key created and deleted meanwhile.
fn change_while_away(server: &Server) {
    let mut client = server.client();
    client.put("a.k1", &json!({"changed": true})).unwrap();
    client.put("a.new", &1).unwrap();
    client.delete("a.gone").unwrap();
    client.put("a.tmp", &1).unwrap();
    client.delete("a.tmp").unwrap();
    client.put("b", &1).unwrap();
}

/// What a watch told of its connection.
type Told = Arc<Mutex<Vec<Connection>>>;

fn connections_log() -> (Told, impl FnMut(&Connection) + Send + 'static) {
    let told = Told::default();
    let log = told.clone();
    (told, move |c: &Connection| {
        log.lock().unwrap().push(c.clone())
    })
}

#[test]
fn a_watch_resumes_after_a_clean_restart_with_exactly_the_missed_changes() {
    let mut server = Server::start();
    fill(&server);
    let (told, tell) = connections_log();
    let mut watch = server.client().watch("a").unwrap().on_connection(tell);
    let mut model = Model::default();
    assert_eq!(model.until_ready(&mut watch).len(), 7, "6 inits and ready");
    let before = watch.resume_rev().expect("a resume point after ready");
    assert!(server.stop().success());
    server.spawn_and_wait();
    change_while_away(&server);

    let resumed = model.until_ready(&mut watch);
    assert_eq!(model.keys, state(&server, "a"), "converged: {resumed:?}");
    assert_eq!(
        model.resets, 0,
        "the history survives a clean stop: {resumed:?}"
    );
    let kinds: Vec<(&str, &str)> = resumed
        .iter()
        .filter_map(|e| match e {
            Event::Put { key, .. } => Some(("put", key.as_str())),
            Event::Del { key, .. } => Some(("del", key.as_str())),
            Event::Init { key, .. } => Some(("init", key.as_str())),
            _ => None,
        })
        .collect();
    let mut sorted = kinds.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [("del", "a.gone"), ("put", "a.k1"), ("put", "a.new")],
        "only what changed: no restated key, no del of a key it never had"
    );
    assert_eq!(watch.reconnects(), 1);
    assert!(watch.resume_rev().unwrap() > before);
    assert!(
        matches!(told.lock().unwrap().as_slice(), [Connection::Lost(_), Connection::Resumed { from_rev: Some(r) }] if *r == before),
        "{:?}",
        told.lock().unwrap()
    );
    // Live again.
    let rev = server.client().put("a.k0", &"live").unwrap();
    assert_eq!(
        next(&mut watch),
        Event::Put {
            key: "a.k0".into(),
            value: json!("live"),
            rev
        }
    );
}

#[test]
fn a_watch_after_a_crash_surfaces_reset_and_drops_keys_deleted_meanwhile() {
    // `a.mem` is memory class: a crash loses such keys without a record, so after a SIGKILL a
    // resume of `a` cannot be answered from the delete history.
    let mut server = Server::start_with(&["--class", "a.mem=memory"]);
    fill(&server);
    let mut watch = server.client().watch("a").unwrap();
    let mut model = Model::default();
    model.until_ready(&mut watch);
    // SIGKILL: the resume of a target that may hold memory keys gets a reset.
    server.restart();
    change_while_away(&server);

    let resumed = model.until_ready(&mut watch);
    assert!(
        matches!(resumed.first(), Some(Event::Reset { sub }) if sub == "a"),
        "{resumed:?}"
    );
    assert_eq!(model.resets, 1);
    assert_eq!(watch.resets(), 1);
    assert_eq!(model.keys, state(&server, "a"), "converged: {resumed:?}");
    // Every key of the snapshot is passed on, even at a revision the consumer has.
    let inits = resumed
        .iter()
        .filter(|e| matches!(e, Event::Init { .. }))
        .count();
    assert_eq!(inits, state(&server, "a").len());
    assert!(
        resumed.contains(&Event::Del {
            key: "a.gone".into(),
            rev: 0
        }),
        "the key deleted while away is reported gone: {resumed:?}"
    );
}

#[test]
fn a_watch_past_the_tombstone_horizon_gets_reset_and_converges() {
    let mut server = Server::start_with(&["--tombstones", "1"]);
    fill(&server);
    let mut watch = server.client().watch("a").unwrap();
    let mut model = Model::default();
    model.until_ready(&mut watch);
    assert!(server.stop().success());
    server.spawn_and_wait();
    change_while_away(&server);
    // Two more deletes push the one-tombstone history past the watch's resume point.
    let mut client = server.client();
    client.delete("a.k3").unwrap();
    client.delete("a.k4").unwrap();
    let resumed = model.until_ready(&mut watch);
    assert!(
        matches!(resumed.first(), Some(Event::Reset { .. })),
        "{resumed:?}"
    );
    assert_eq!(model.keys, state(&server, "a"));
    assert!(!model.keys.contains_key("a.gone") && !model.keys.contains_key("a.k3"));
}

/// Stops the server, removes its data directory and starts another on the same socket, which
/// then writes other keys under `a` until its revision reaches `rev`: another history, whose
/// revisions up to `rev` mean other changes.
fn replace_history(server: &mut Server, rev: u64) {
    assert!(server.stop().success());
    std::fs::remove_dir_all(&server.data).unwrap();
    server.spawn_and_wait();
    let mut client = server.client();
    let mut now = client.put("a.y", &2).unwrap();
    while now < rev {
        now = client.put("other", &now).unwrap();
    }
}

#[test]
fn a_watch_survives_its_socket_file_being_replaced() {
    let mut server = Server::start();
    fill(&server);
    let mut watch = server.client().watch("a").unwrap();
    let mut model = Model::default();
    model.until_ready(&mut watch);
    let (rev, epoch) = (
        watch.resume_rev().unwrap(),
        watch.resume_epoch().unwrap().to_owned(),
    );
    // Another server takes the path over with a wiped data directory, and reaches the
    // watch's resume point (the watch does not read meanwhile, so it resumes only now): the
    // same revision numbers, another history.
    replace_history(&mut server, rev);
    let resumed = model.until_ready(&mut watch);
    assert!(
        matches!(resumed.first(), Some(Event::Reset { .. })),
        "{resumed:?}"
    );
    assert_eq!(model.keys, state(&server, "a"), "no stale key: {resumed:?}");
    assert_eq!(model.keys, BTreeMap::from([("a.y".to_owned(), json!(2))]));
    assert_ne!(
        watch.resume_epoch(),
        Some(epoch.as_str()),
        "the new history's epoch"
    );
    assert_eq!(
        watch.resume_rev(),
        Some(rev),
        "the same revision, another history"
    );
}

#[test]
fn watch_from_epoch_of_a_replaced_history_gets_a_reset() {
    let mut server = Server::start();
    fill(&server);
    let mut model = Model::default();
    let (rev, epoch) = {
        let mut watch = server.client().watch("a").unwrap();
        model.until_ready(&mut watch);
        (
            watch.resume_rev().unwrap(),
            watch.resume_epoch().unwrap().to_owned(),
        )
    };
    // The same history: resumed without a reset.
    let mut watch = server.client().watch_from_epoch("a", rev, &epoch).unwrap();
    assert_eq!(model.until_ready(&mut watch), [ready_of(&watch)]);
    drop(watch);
    replace_history(&mut server, rev);
    let mut watch = server.client().watch_from_epoch("a", rev, &epoch).unwrap();
    let mut snapshot = Model::default();
    let resumed = snapshot.until_ready(&mut watch);
    assert!(
        matches!(resumed.first(), Some(Event::Reset { .. })),
        "{resumed:?}"
    );
    assert_eq!(snapshot.keys, state(&server, "a"));
}

/// The `ready` a resume with nothing missed ends with.
fn ready_of(watch: &Watch) -> Event {
    Event::Ready {
        sub: "a".into(),
        count: 0,
        rev: watch.resume_rev().unwrap(),
        epoch: watch.resume_epoch().map(str::to_owned),
    }
}

#[test]
fn an_interrupted_watch_ends_even_while_reconnecting() {
    let mut server = Server::start();
    let mut watch = server.client().watch("a").unwrap();
    assert!(matches!(next(&mut watch), Event::Ready { .. }));
    server.kill();
    let interrupter = watch.interrupter();
    let reader = std::thread::spawn(move || {
        let end = watch.next_delivery(None).map(|d| d.is_none());
        (end, watch)
    });
    // The reader is in its backoff loop (no server): interrupting ends it.
    interrupter.interrupt();
    let (end, watch) = reader.join().unwrap();
    assert!(end.unwrap(), "ended");
    assert!(watch.interrupted());
}

/// Writes, deletes and restarts (clean and crash) while the watch reads little: per-key
/// revisions only go forward between resets, and once the writes stop the consumer's model
/// equals the server's state. (The resume point's `skipped` rule is checked offline, in
/// `src/client/watch/tests.rs`: a queue that coalesces takes more writes than this test's
/// budget.)
#[test]
fn a_watch_converges_through_restarts_coalescing_and_deletes() {
    let mut server = Server::start_with(&["--tombstones", "50"]);
    let mut watch = server.client().watch("c").unwrap();
    let mut model = Model::default();
    model.until_ready(&mut watch);
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut violations = Vec::new();
    let mut skipped = 0;
    // Reads up to `n` events (stopping early when none comes for a while).
    let mut read = |watch: &mut Watch, model: &mut Model, n: usize| {
        for _ in 0..n {
            let deadline = Instant::now() + std::time::Duration::from_millis(300);
            let delivery = match watch.next_delivery(Some(deadline)) {
                Ok(Some(d)) => d,
                Ok(None) => panic!("the watch ended"),
                Err(nkv::Error::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => return,
                Err(e) => panic!("{e}"),
            };
            skipped += delivery.skipped;
            let event = delivery.event.into_event().unwrap();
            match &event {
                Event::Reset { .. } => {
                    last.clear();
                    model.resets += 1;
                }
                Event::Init { key, value, rev } | Event::Put { key, value, rev } => {
                    if last.get(key).is_some_and(|r| r >= rev) {
                        violations.push(format!("{key} went back to {rev}: {event:?}"));
                    }
                    last.insert(key.clone(), *rev);
                    model.keys.insert(key.clone(), value.clone());
                }
                Event::Del { key, rev } => {
                    if *rev != 0 && last.get(key).is_some_and(|r| r >= rev) {
                        violations.push(format!("{key} deleted at an old {rev}"));
                    }
                    last.insert(key.clone(), *rev);
                    model.keys.remove(key);
                }
                Event::Ready { .. } => {}
                Event::Shutdown => panic!("shutdown passed on"),
            }
        }
    };
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut writes = |server: &Server, n: usize| {
        let mut client = server.client();
        for _ in 0..n {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let key = format!("c.k{}", seed % 40);
            if seed.is_multiple_of(5) {
                client.delete(&key).unwrap();
            } else {
                client.put(&key, &(seed % 1000)).unwrap();
            }
        }
    };
    for phase in 0..3 {
        writes(&server, 1200);
        read(&mut watch, &mut model, 100);
        writes(&server, 300);
        match phase {
            0 => {
                assert!(server.stop().success());
                server.spawn_and_wait();
            }
            1 => server.restart(),
            _ => {}
        }
    }
    writes(&server, 300);
    let expected = state(&server, "c");
    let end = Instant::now() + DEADLINE;
    while model.keys != expected {
        assert!(
            Instant::now() < end,
            "no convergence: {} vs {} keys",
            model.keys.len(),
            expected.len()
        );
        read(&mut watch, &mut model, 1000);
    }
    assert!(violations.is_empty(), "{violations:#?}");
    // Both restarts may fall in one disconnected stretch.
    assert!(watch.reconnects() >= 1, "{}", watch.reconnects());
    println!(
        "converged after {} reconnects, {} resets, {skipped} skipped changes",
        watch.reconnects(),
        watch.resets()
    );
}

#[test]
fn watch_from_a_kept_resume_point_gets_the_changes_since_or_a_reset() {
    let server = Server::start_with(&["--tombstones", "2"]);
    fill(&server);
    let mut model = Model::default();
    let kept = {
        let mut watch = server.client().watch("a").unwrap();
        model.until_ready(&mut watch);
        watch.resume_rev().unwrap()
    };
    // The program is gone; the world changes; it comes back with its model and `kept`.
    change_while_away(&server);
    let mut watch = server.client().watch_from("a", kept).unwrap();
    let resumed = model.until_ready(&mut watch);
    assert_eq!(model.resets, 0, "{resumed:?}");
    assert_eq!(model.keys, state(&server, "a"), "{resumed:?}");
    assert!(
        resumed
            .iter()
            .any(|e| matches!(e, Event::Del { key, .. } if key == "a.gone")),
        "a delete of a key this watch never delivered is passed on: {resumed:?}"
    );
    let kept = watch.resume_rev().unwrap();
    drop(watch);
    // More deletes than the history keeps: the resume gets a reset, which the consumer
    // applies itself (the watch does not know its keys).
    let mut client = server.client();
    for key in ["a.k0", "a.k1", "a.k2"] {
        client.delete(key).unwrap();
    }
    let mut watch = server.client().watch_from("a", kept).unwrap();
    let mut snapshot = Model::default();
    let resumed = snapshot.until_ready(&mut watch);
    assert!(
        matches!(resumed.first(), Some(Event::Reset { .. })),
        "{resumed:?}"
    );
    assert_eq!(snapshot.keys, state(&server, "a"));
}

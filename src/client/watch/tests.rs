//! The watch's bookkeeping, offline: the resume point, what a resumption passes on, and what a
//! reset makes of the keys the consumer has.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};

use serde_json::value::RawValue;

use super::*;

fn detached() -> Watch {
    Watch {
        path: PathBuf::from("/nonexistent"),
        timeouts: Timeouts::default(),
        target: "a".into(),
        conn: None,
        reconnect: true,
        ended: false,
        resume_rev: None,
        resume_epoch: None,
        resuming: Some(Resuming {
            reset: false,
            present: HashSet::new(),
        }),
        seen: HashMap::new(),
        blind: false,
        pending: VecDeque::new(),
        stop: Arc::new(Stop {
            stopped: AtomicBool::new(false),
            stream: Mutex::new(None),
            wake: Condvar::new(),
        }),
        on_connection: None,
        reconnects: 0,
        resets: 0,
        delivered: false,
        backoff: FIRST_BACKOFF,
    }
}

fn value() -> Box<RawValue> {
    RawValue::from_string("1".into()).unwrap()
}

fn init(key: &str, rev: u64) -> RawEvent {
    wire::Event::Init {
        key: key.into(),
        value: value(),
        rev,
    }
}

fn put(key: &str, rev: u64) -> RawEvent {
    wire::Event::Put {
        key: key.into(),
        value: value(),
        rev,
    }
}

fn del(key: &str, rev: u64) -> RawEvent {
    wire::Event::Del {
        key: key.into(),
        rev,
    }
}

fn ready(rev: u64) -> RawEvent {
    wire::Event::Ready {
        sub: "a".into(),
        count: 0,
        rev,
        epoch: None,
    }
}

fn feed(watch: &mut Watch, events: Vec<(RawEvent, u64)>) -> Vec<String> {
    for (event, skipped) in events {
        watch.absorb(event, skipped, String::new());
    }
    watch
        .pending
        .drain(..)
        .map(|d| match d.event {
            wire::Event::Init { key, rev, .. } => format!("init {key} {rev}"),
            wire::Event::Put { key, rev, .. } => format!("put {key} {rev}"),
            wire::Event::Del { key, rev } => format!("del {key} {rev}"),
            wire::Event::Ready { rev, .. } => format!("ready {rev}"),
            wire::Event::Reset { .. } => "reset".into(),
            wire::Event::Shutdown => "shutdown".into(),
        })
        .collect()
}

/// As the server would answer a reconnect from the watch's resume point.
fn reconnected(watch: &mut Watch) {
    watch.resuming = Some(Resuming {
        reset: watch.resume_rev.is_none(),
        present: HashSet::new(),
    });
}

#[test]
fn the_resume_point_is_the_last_ready_raised_by_events_that_skipped_nothing() {
    let mut watch = detached();
    feed(&mut watch, vec![(init("a.x", 3), 0), (ready(10), 0)]);
    assert_eq!(watch.resume_rev(), Some(10));
    feed(&mut watch, vec![(put("a.x", 11), 0)]);
    assert_eq!(watch.resume_rev(), Some(11));
    // It replaced earlier changes and may have overtaken other keys' changes (12..14).
    feed(&mut watch, vec![(put("a.y", 15), 2)]);
    assert_eq!(watch.resume_rev(), Some(11));
    feed(&mut watch, vec![(del("a.z", 16), 1)]);
    assert_eq!(watch.resume_rev(), Some(11));
    feed(&mut watch, vec![(del("a.x", 17), 0)]);
    assert_eq!(watch.resume_rev(), Some(17));
}

#[test]
fn a_resumption_passes_on_only_what_the_consumer_lacks() {
    let mut watch = detached();
    feed(
        &mut watch,
        vec![(init("a.x", 3), 0), (init("a.y", 4), 0), (ready(4), 0)],
    );
    feed(&mut watch, vec![(put("a.y", 6), 3)]);
    reconnected(&mut watch);
    let got = feed(
        &mut watch,
        vec![
            (put("a.y", 6), 0),   // restated: the consumer has it
            (put("a.x", 7), 0),   // missed
            (del("a.tmp", 8), 0), // created and deleted while away: never delivered
            (del("a.y", 9), 0),   // missed
            (ready(9), 0),
        ],
    );
    assert_eq!(got, ["put a.x 7", "del a.y 9", "ready 9"]);
    assert_eq!(watch.resume_rev(), Some(9));
    assert_eq!(watch.seen, HashMap::from([("a.x".to_owned(), 7)]));
    // Live events after ready pass as they come.
    assert_eq!(
        feed(&mut watch, vec![(del("a.new", 10), 0)]),
        ["del a.new 10"]
    );
}

#[test]
fn after_a_reset_every_init_passes_and_keys_the_snapshot_lacks_are_deleted() {
    let mut watch = detached();
    feed(
        &mut watch,
        vec![
            (init("a.b", 1), 0),
            (init("a.x", 2), 0),
            (init("a.a", 3), 0),
            (ready(3), 0),
        ],
    );
    reconnected(&mut watch);
    let got = feed(
        &mut watch,
        vec![
            (wire::Event::Reset { sub: "a".into() }, 0),
            (init("a.x", 2), 0), // the same revision: passed on all the same
            (init("a.new", 1), 0),
            (ready(2), 0),
        ],
    );
    assert_eq!(
        got,
        [
            "reset",
            "init a.x 2",
            "init a.new 1",
            "del a.a 0",
            "del a.b 0",
            "ready 2"
        ]
    );
    assert_eq!(watch.resets(), 1);
    // Revisions started again: the resume point follows the new server's.
    assert_eq!(watch.resume_rev(), Some(2));
}

#[test]
fn lost_before_the_first_ready_the_whole_snapshot_again_replaces_the_partial_one() {
    let mut watch = detached();
    feed(&mut watch, vec![(init("a.x", 1), 0), (init("a.y", 2), 0)]);
    reconnected(&mut watch);
    let got = feed(&mut watch, vec![(init("a.y", 2), 0), (ready(2), 0)]);
    assert_eq!(got, ["init a.y 2", "del a.x 0", "ready 2"]);
}

#[test]
fn started_from_a_kept_revision_deletes_of_unknown_keys_pass_until_a_full_snapshot() {
    let mut watch = detached();
    watch.blind = true;
    watch.resume_rev = Some(5);
    let got = feed(&mut watch, vec![(del("a.old", 6), 0), (ready(6), 0)]);
    assert_eq!(
        got,
        ["del a.old 6", "ready 6"],
        "the consumer may hold a.old"
    );
    reconnected(&mut watch);
    let reset = wire::Event::Reset { sub: "a".into() };
    feed(
        &mut watch,
        vec![(reset, 0), (init("a.x", 1), 0), (ready(1), 0)],
    );
    assert!(
        !watch.blind,
        "a full snapshot: the watch knows the consumer's keys"
    );
    reconnected(&mut watch);
    assert_eq!(
        feed(&mut watch, vec![(del("a.never", 2), 0), (ready(2), 0)]),
        ["ready 2"]
    );
}

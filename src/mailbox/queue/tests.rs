//! A model check of the queue: random sequences of publishes, snapshots, replies, sends and
//! shutdowns, checked against the delivery promises (per-key order, latest state delivered, no
//! line reordered against the events around it, nothing after close, bounded memory, no gap
//! while the subscriber keeps up).

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::{Pushed, Queue};
use crate::key::{Key, Target};
use crate::mailbox::item::{Item, Published};
use crate::protocol::{Event, EventKind};
use crate::store::Value;

#[derive(Debug, Clone)]
enum Op {
    /// A change of key `0..4`: a put with a value of `len` bytes, or a delete.
    Change {
        key: u8,
        len: Option<u8>,
    },
    /// A `SUB *`: ack, one `init` per existing key, `ready`.
    Sub,
    Reply,
    /// The subscriber reads `n` items.
    Take(u8),
    Shutdown,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..4, proptest::option::weighted(0.8, 0u8..24))
            .prop_map(|(key, len)| Op::Change { key, len }),
        1 => Just(Op::Sub),
        1 => Just(Op::Reply),
        3 => (1u8..6).prop_map(Op::Take),
        1 => Just(Op::Shutdown),
    ]
}

/// What the subscriber saw: events as (key, rev, push tag), lines as their push tag.
#[derive(Debug, PartialEq)]
enum Seen {
    Event {
        key: String,
        rev: u64,
        init: bool,
        skipped: u64,
    },
    Line,
}

/// Each item's push tag is its `rev` (events) or its text (replies): the push order.
fn tag_of(item: &Item) -> u64 {
    match item {
        Item::Change(p) | Item::Skipped(p, _) => p.event.rev,
        Item::Init(e) => e.rev * 1_000_000 + tag_suffix(&e.value),
        Item::Reset(_) => 0,
        Item::Reply(line) => std::str::from_utf8(line).unwrap().trim().parse().unwrap(),
        Item::Ready { count, .. } => *count as u64,
        Item::Shutdown => u64::MAX,
    }
}

fn tag_suffix(value: &Option<Value>) -> u64 {
    value.as_ref().map_or(0, |v| v.parse().unwrap_or(0))
}

/// What the subscriber sees of an item.
fn seen_of(item: &Item) -> Seen {
    match item {
        Item::Change(p) | Item::Skipped(p, _) => Seen::Event {
            key: p.event.key.to_string(),
            rev: p.event.rev,
            init: false,
            skipped: item.skipped(),
        },
        Item::Init(e) => Seen::Event {
            key: e.key.to_string(),
            rev: e.rev,
            init: true,
            skipped: 0,
        },
        _ => Seen::Line,
    }
}

fn key(k: u8) -> Key {
    Key::parse(&format!("k{k}")).unwrap()
}

fn run(cap_items: usize, cap_bytes: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut queue = Queue::new(cap_items, cap_bytes);
    // Every pushed item gets a tag from this counter; the queue must deliver lines in tag order
    // with respect to everything else.
    let mut tag = 0u64;
    let mut store: BTreeMap<u8, u64> = BTreeMap::new();
    let mut pushed_rev: HashMap<String, u64> = HashMap::new();
    let mut delivered: Vec<(u64, Seen)> = Vec::new();
    let mut coalesced = false;
    let mut closed = false;
    let mut all_events = 0usize;
    // Every change accepted, by key, in push (= revision) order: what `skipped` counts.
    let mut pushed_changes: HashMap<String, Vec<u64>> = HashMap::new();
    for op in ops {
        match op {
            Op::Change { key: k, len } => {
                tag += 1;
                let rev = tag;
                let value = len.map(|n| Value::from("x".repeat(n as usize)));
                match len {
                    Some(_) => store.insert(k, rev),
                    None => store.remove(&k),
                };
                let kind = if len.is_some() {
                    EventKind::Put
                } else {
                    EventKind::Del
                };
                let pushed = queue.push(Item::Change(Published::new(Event {
                    kind,
                    key: key(k),
                    value,
                    rev,
                })));
                match pushed {
                    Pushed::Closed => prop_assert!(closed, "refused while open"),
                    Pushed::Coalesced => coalesced = true,
                    Pushed::Queued => {}
                }
                if pushed != Pushed::Closed {
                    all_events += 1;
                    pushed_rev.insert(format!("k{k}"), rev);
                    pushed_changes.entry(format!("k{k}")).or_default().push(rev);
                }
            }
            Op::Sub => {
                tag += 1;
                let ack = queue.push(Item::Reply(format!("{tag}\n").into_bytes().into()));
                prop_assert!(ack != Pushed::Coalesced);
                let mut count = 0;
                for (k, rev) in &store {
                    count += 1;
                    let p = queue.push(Item::Init(Event {
                        kind: EventKind::Init,
                        key: key(*k),
                        value: Some(Value::from("1")),
                        rev: *rev,
                    }));
                    if p == Pushed::Coalesced {
                        coalesced = true;
                    }
                    if p != Pushed::Closed {
                        all_events += 1;
                        pushed_rev.insert(format!("k{k}"), *rev);
                    }
                }
                tag += 1;
                queue.push(Item::Ready {
                    target: Target::parse("*").unwrap(),
                    count,
                    rev: tag,
                    epoch: crate::disk::Epoch::random(),
                });
            }
            Op::Reply => {
                tag += 1;
                queue.push(Item::Reply(format!("{tag}\n").into_bytes().into()));
            }
            Op::Take(n) => {
                for _ in 0..n {
                    let Some(item) = queue.pop() else { break };
                    prop_assert!(
                        !matches!(delivered.last(), Some((u64::MAX, _))),
                        "an item after shutdown"
                    );
                    let seen = seen_of(&item);
                    let t = match &item {
                        Item::Reply(_) => tag_of(&item),
                        Item::Shutdown => u64::MAX,
                        _ => 0,
                    };
                    delivered.push((t, seen));
                }
            }
            Op::Shutdown => {
                tag += 1;
                if !closed {
                    prop_assert_eq!(queue.push(Item::Shutdown), Pushed::Queued);
                }
                closed = true;
            }
        }
        // The memory bound: capacity, one event per key, one init per key of the pending
        // snapshots, and the lines.
        let bound = cap_items + 4 + 4 * queue.snapshots() + queue.replies() + queue.snapshots() + 1;
        prop_assert!(
            queue.len() <= bound,
            "{} items pending > {bound}",
            queue.len()
        );
    }
    while let Some(item) = queue.pop() {
        let seen = seen_of(&item);
        let t = match &item {
            Item::Reply(_) => tag_of(&item),
            Item::Shutdown => u64::MAX,
            _ => 0,
        };
        delivered.push((t, seen));
    }
    // Per-key order (an init may restate the revision already seen) and latest state.
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut events = 0usize;
    for (_, seen) in &delivered {
        if let Seen::Event {
            key,
            rev,
            init,
            skipped,
        } = seen
        {
            events += 1;
            if !*init {
                // `skipped` is exactly the changes of the key between the one delivered before
                // (or the state an `init` restated) and this one.
                let since = last.get(key).copied().unwrap_or(0);
                let missed = pushed_changes.get(key).map_or(0, |revs| {
                    revs.iter().filter(|r| **r > since && *r < rev).count()
                });
                prop_assert_eq!(
                    *skipped,
                    missed as u64,
                    "{}@{}: skipped {} but {} changes were not delivered",
                    key,
                    rev,
                    skipped,
                    missed
                );
            }
            if let Some(prev) = last.get(key) {
                prop_assert!(
                    rev > prev || (*init && rev == prev),
                    "{key}: rev {rev} after {prev}"
                );
            }
            let newest = last.get(key).map_or(*rev, |prev| (*prev).max(*rev));
            last.insert(key.clone(), newest);
        }
    }
    prop_assert_eq!(&last, &pushed_rev, "latest state of every key delivered");
    if !coalesced {
        prop_assert_eq!(events, all_events, "no gap while nothing was coalesced");
        let skipped = delivered
            .iter()
            .filter(|(_, s)| matches!(s, Seen::Event { skipped, .. } if *skipped > 0))
            .count();
        prop_assert_eq!(skipped, 0, "nothing skipped while nothing was coalesced");
    }
    // Lines keep their place: a change is delivered before a reply exactly when it was pushed
    // before it (a change's rev is its push tag).
    for (i, (_, seen)) in delivered.iter().enumerate() {
        let Seen::Event {
            rev, init: false, ..
        } = seen
        else {
            continue;
        };
        for (j, (t, _)) in delivered.iter().enumerate() {
            if *t != 0 && *t != u64::MAX {
                prop_assert_eq!(i < j, rev < t, "change {} and reply {} reordered", rev, t);
            }
        }
    }
    // Reply tags increase, shutdown is last.
    let line_tags: Vec<u64> = delivered
        .iter()
        .filter(|(t, _)| *t != 0)
        .map(|(t, _)| *t)
        .collect();
    prop_assert!(
        line_tags.windows(2).all(|w| w[0] < w[1]),
        "replies in order"
    );
    if let Some(pos) = delivered.iter().position(|(t, _)| *t == u64::MAX) {
        prop_assert_eq!(pos, delivered.len() - 1, "shutdown is the last item");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_queue_keeps_its_promises(
        cap_items in 0usize..6,
        cap_bytes in prop_oneof![Just(usize::MAX), 8usize..64],
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        run(cap_items, cap_bytes, ops)?;
    }
}

/// Events pushed after a line are never delivered before it, and events pushed before it are
/// never delivered after it (checked with explicit tags, at every capacity).
#[test]
fn lines_are_not_reordered_against_events() {
    for cap in 0..4 {
        let mut queue = Queue::new(cap, usize::MAX);
        let change = |rev| {
            Item::Change(Published::new(Event {
                kind: EventKind::Put,
                key: key((rev % 2) as u8),
                value: Some(Value::from("1")),
                rev,
            }))
        };
        queue.push(change(1));
        queue.push(change(2));
        queue.push(Item::Reply(b"L\n".to_vec().into()));
        queue.push(change(3));
        queue.push(change(4));
        queue.push(change(5));
        let mut order = Vec::new();
        while let Some(item) = queue.pop() {
            order.push(match item {
                Item::Change(p) | Item::Skipped(p, _) => p.event.rev,
                _ => 0,
            });
        }
        let line = order.iter().position(|r| *r == 0).unwrap();
        assert!(
            order[..line].iter().all(|r| *r <= 2),
            "cap {cap}: {order:?}"
        );
        assert!(
            order[line + 1..].iter().all(|r| *r >= 3),
            "cap {cap}: {order:?}"
        );
        assert!(
            order.contains(&4) && order.contains(&5),
            "cap {cap}: latest delivered"
        );
    }
}

#[test]
fn value_bytes_are_accounted_exactly() {
    let mut queue = Queue::new(1, 10);
    for rev in 1..=20 {
        queue.push(Item::Change(Published::new(Event {
            kind: EventKind::Put,
            key: key((rev % 3) as u8),
            value: Some(Value::from("x".repeat(rev as usize))),
            rev,
        })));
    }
    while queue.pop().is_some() {}
    assert_eq!(queue.value_bytes(), 0);
}

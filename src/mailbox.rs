//! One subscriber's queue: bounded, and never losing the latest state of a key.
//!
//! Publishers [`Mailbox::push`] without ever blocking. Items go into a bounded
//! `crossbeam-channel` queue while it has room (the common case: the subscriber keeps up and sees
//! every change). When the queue is full, or holds too many value bytes, further items go to an
//! *overflow* table that keeps only the latest event per key: a newer event of a key replaces the
//! pending one in place. Once the overflow is non-empty every new item goes there too, until the
//! writer has taken it, so an older event of a key can never overtake a newer one.
//!
//! Lines (responses, `ready` markers) are never replaced and are barriers: an event is never
//! merged into one queued before a line, so a change made after a snapshot is still delivered
//! after that snapshot's marker.
//!
//! The writer ([`Inbox`]) drains the queue, then the overflow, then the queue again. Memory held
//! for a subscriber is therefore bounded by the queue plus one event per distinct key for each
//! line pending in the overflow; the connection's own requests wait ([`Mailbox::wait_caught_up`])
//! while its overflow is not empty, so those lines cannot pile up either.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::{Condvar, Mutex};

use crate::key::Key;
use crate::protocol::Event;

/// Items the queue holds before overflowing into the per-key table.
pub const QUEUE_ITEMS: usize = 4096;
/// Value bytes the queue holds before overflowing, so large values cannot pile up in it.
pub const QUEUE_BYTES: usize = 8 << 20;

/// What a subscriber connection's writer sends.
#[derive(Debug)]
pub enum Outgoing {
    /// A change of a key; the only kind of item that may be coalesced.
    Event(Event),
    /// A response or marker line, `\n` included; never dropped.
    Line(Vec<u8>),
    /// Send what is queued before this, then close the connection.
    Close,
}

impl Outgoing {
    fn weight(&self) -> usize {
        match self {
            Outgoing::Event(ev) => ev.value.as_ref().map_or(0, |v| v.len()),
            Outgoing::Line(line) => line.len(),
            Outgoing::Close => 0,
        }
    }
}

/// Whether a push replaced an older pending event of the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    Coalesced,
    /// The writer is gone; the item was dropped.
    Closed,
}

/// The publishing side of a subscriber's queue. When every `Mailbox` is gone the writer sees
/// the queue disconnect and stops.
pub struct Mailbox {
    tx: Sender<Outgoing>,
    state: Arc<State>,
}

/// What the publishers and the writer share besides the queue itself.
struct State {
    /// Value bytes in the queue: added by publishers, taken off by the writer.
    queued_bytes: AtomicUsize,
    /// Items that did not fit in the queue. Publishers and the writer touch it under this mutex;
    /// the choice "queue or overflow" is made under it too, which is what keeps per-key order.
    overflow: Mutex<Overflow>,
    /// Signalled when the writer empties the overflow or stops.
    drained: Condvar,
    /// Set by the writer when it stops; pushes after that are dropped.
    closed: AtomicBool,
}

/// The writing side: owned by the subscriber connection's writer thread.
pub struct Inbox {
    rx: Receiver<Outgoing>,
    state: Arc<State>,
}

/// Pending items in order; after the last line, at most one event per key.
#[derive(Default)]
struct Overflow {
    next_seq: u64,
    items: BTreeMap<u64, Outgoing>,
    /// The position of each key's latest pending event.
    seq_of_key: HashMap<Key, u64>,
    /// The position of the last pending line: events before it are not merged into.
    barrier: Option<u64>,
}

impl Overflow {
    fn insert(&mut self, item: Outgoing) -> Pushed {
        if let Outgoing::Event(event) = &item {
            if let Some(&old) = self.seq_of_key.get(&event.key) {
                if self.barrier.is_none_or(|barrier| old > barrier) {
                    self.items.insert(old, item);
                    return Pushed::Coalesced;
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        match &item {
            Outgoing::Event(event) => {
                self.seq_of_key.insert(event.key.clone(), seq);
            }
            Outgoing::Line(_) | Outgoing::Close => self.barrier = Some(seq),
        }
        self.items.insert(seq, item);
        Pushed::Queued
    }

    fn take(&mut self) -> BTreeMap<u64, Outgoing> {
        self.seq_of_key.clear();
        self.barrier = None;
        std::mem::take(&mut self.items)
    }
}

/// A new mailbox and the inbox its writer drains.
pub fn mailbox() -> (Arc<Mailbox>, Inbox) {
    mailbox_with_capacity(QUEUE_ITEMS)
}

pub fn mailbox_with_capacity(items: usize) -> (Arc<Mailbox>, Inbox) {
    let (tx, rx) = crossbeam_channel::bounded(items);
    let state = Arc::new(State {
        queued_bytes: AtomicUsize::new(0),
        overflow: Mutex::new(Overflow::default()),
        drained: Condvar::new(),
        closed: AtomicBool::new(false),
    });
    (
        Arc::new(Mailbox {
            tx,
            state: state.clone(),
        }),
        Inbox { rx, state },
    )
}

impl Mailbox {
    /// Queues `item` without blocking.
    pub fn push(&self, item: Outgoing) -> Pushed {
        let state = &*self.state;
        if state.closed.load(Ordering::Acquire) {
            return Pushed::Closed;
        }
        let mut overflow = state.overflow.lock();
        if !overflow.items.is_empty() {
            return overflow.insert(item);
        }
        let weight = item.weight();
        if state.queued_bytes.load(Ordering::Acquire) + weight > QUEUE_BYTES && weight > 0 {
            return overflow.insert(item);
        }
        state.queued_bytes.fetch_add(weight, Ordering::AcqRel);
        match self.tx.try_send(item) {
            Ok(()) => Pushed::Queued,
            Err(TrySendError::Full(item)) => {
                state.queued_bytes.fetch_sub(weight, Ordering::AcqRel);
                overflow.insert(item)
            }
            Err(TrySendError::Disconnected(_)) => Pushed::Closed,
        }
    }

    /// Blocks until the writer has emptied the overflow (or stopped). The subscriber's own
    /// connection calls this before queueing more for it (a new snapshot): a client that sends
    /// requests but does not read is held back instead of growing the server's memory.
    pub fn wait_caught_up(&self) {
        let mut overflow = self.state.overflow.lock();
        while !overflow.items.is_empty() && !self.state.closed.load(Ordering::Acquire) {
            self.state.drained.wait(&mut overflow);
        }
    }

    /// Items waiting in the queue and the overflow (for tests and diagnostics).
    pub fn pending(&self) -> usize {
        self.tx.len() + self.state.overflow.lock().items.len()
    }
}

impl Inbox {
    /// Waits for the next batch and hands each item to `send`, in order: first the queue, then
    /// the overflow, repeated until both are empty. Returns `false` once the mailbox is closed
    /// (a [`Outgoing::Close`] was taken, or every publisher is gone).
    pub fn drain(&self, mut send: impl FnMut(Outgoing) -> bool) -> bool {
        let Ok(first) = self.rx.recv() else {
            return false;
        };
        let mut open = self.deliver(first, &mut send);
        while open {
            let mut progressed = false;
            while let Ok(item) = self.rx.try_recv() {
                progressed = true;
                open = self.deliver(item, &mut send);
                if !open {
                    return false;
                }
            }
            let batch = self.state.overflow.lock().take();
            self.state.drained.notify_all();
            if batch.is_empty() && !progressed {
                break;
            }
            for item in batch.into_values() {
                if !send_one(item, &mut send) {
                    return false;
                }
            }
        }
        open
    }

    fn deliver(&self, item: Outgoing, send: &mut impl FnMut(Outgoing) -> bool) -> bool {
        self.state
            .queued_bytes
            .fetch_sub(item.weight(), Ordering::AcqRel);
        send_one(item, send)
    }

    /// Marks the mailbox closed: later pushes are dropped instead of piling up.
    pub fn close(&self) {
        self.state.closed.store(true, Ordering::Release);
        self.state.overflow.lock().take();
        self.state.drained.notify_all();
    }
}

fn send_one(item: Outgoing, send: &mut impl FnMut(Outgoing) -> bool) -> bool {
    match item {
        Outgoing::Close => false,
        item => send(item),
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::EventKind;
    use crate::store::Value;

    fn put(key: &str, rev: u64) -> Outgoing {
        Outgoing::Event(Event {
            kind: EventKind::Put,
            key: Key::parse(key).unwrap(),
            value: Some(Value::from(rev.to_string())),
            rev,
        })
    }

    fn drained(inbox: &Inbox) -> Vec<(String, u64)> {
        let mut seen = Vec::new();
        inbox.drain(|item| {
            if let Outgoing::Event(ev) = item {
                seen.push((ev.key.to_string(), ev.rev));
            }
            true
        });
        seen
    }

    #[test]
    fn keeps_every_event_while_there_is_room() {
        let (mb, inbox) = mailbox_with_capacity(8);
        for rev in 1..=5 {
            assert_eq!(mb.push(put("a", rev)), Pushed::Queued);
        }
        let seen = drained(&inbox);
        assert_eq!(
            seen,
            (1..=5).map(|r| ("a".to_string(), r)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn overflow_keeps_the_latest_per_key_in_order() {
        let (mb, inbox) = mailbox_with_capacity(2);
        let pushes = [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("a", 5), ("b", 6)];
        let results: Vec<_> = pushes.iter().map(|(k, r)| mb.push(put(k, *r))).collect();
        assert_eq!(
            results.iter().filter(|p| **p == Pushed::Coalesced).count(),
            1
        );
        // Queue: a1 b2. Overflow: a3 c4, then a5 replaces a3 in place and b6 joins: a5 c4 b6.
        let seen = drained(&inbox);
        let expect = [("a", 1), ("b", 2), ("a", 5), ("c", 4), ("b", 6)];
        assert_eq!(
            seen,
            expect
                .iter()
                .map(|(k, r)| (k.to_string(), *r))
                .collect::<Vec<_>>()
        );
        assert_eq!(mb.pending(), 0);
    }

    #[test]
    fn events_are_not_merged_across_a_line() {
        let (mb, inbox) = mailbox_with_capacity(1);
        mb.push(put("x", 1));
        mb.push(put("a", 2)); // overflow
        mb.push(Outgoing::Line(b"ready\n".to_vec()));
        assert_eq!(
            mb.push(put("a", 3)),
            Pushed::Queued,
            "not merged across the marker"
        );
        assert_eq!(
            mb.push(put("a", 4)),
            Pushed::Coalesced,
            "merged after the marker"
        );
        let mut order = Vec::new();
        inbox.drain(|item| {
            order.push(match item {
                Outgoing::Event(ev) => format!("{}{}", ev.key, ev.rev),
                Outgoing::Line(_) => "ready".into(),
                Outgoing::Close => "close".into(),
            });
            true
        });
        assert_eq!(order, ["x1", "a2", "ready", "a4"]);
        mb.wait_caught_up();
    }

    #[test]
    fn lines_are_never_coalesced_and_close_stops() {
        let (mb, inbox) = mailbox_with_capacity(1);
        mb.push(put("a", 1));
        mb.push(Outgoing::Line(b"x\n".to_vec()));
        mb.push(Outgoing::Line(b"y\n".to_vec()));
        mb.push(Outgoing::Close);
        let mut lines = 0;
        assert!(!inbox.drain(|item| {
            lines += matches!(item, Outgoing::Line(_)) as usize;
            true
        }));
        assert_eq!(lines, 2);
        drop(inbox);
        assert_eq!(mb.push(put("a", 2)), Pushed::Closed);
    }
}

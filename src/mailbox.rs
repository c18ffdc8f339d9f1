//! One subscriber's queue and its delivery: bounded, never blocking a publisher, never losing the
//! latest state of a key.
//!
//! # Queueing
//!
//! [`Mailbox::push`] never blocks. Items go into a bounded `crossbeam-channel` queue while it has
//! room (the common case: the subscriber keeps up and sees every change). When the queue is full,
//! or holds too many value bytes, further items go to an *overflow* table that keeps only the
//! latest event per key: a newer event of a key replaces the pending one in place. Once the
//! overflow is non-empty every new item goes there too, until it has been taken, so an older
//! event of a key can never overtake a newer one.
//!
//! Lines (responses, `ready` markers) are never replaced and are barriers: an event is never
//! merged into one queued before a line, so a change made after a snapshot is still delivered
//! after that snapshot's marker.
//!
//! # Delivery
//!
//! Whoever holds the *sink* (the socket plus any half-sent bytes) sends: the queue first, then the
//! overflow, then the queue again, so order is the same whoever sends. After queueing, the
//! publishing thread [`kick`](Mailbox::kick)s: it takes the sink if it is free and sends what it
//! can *without blocking* — no thread switch on the hot path, which is what keeps put→event
//! latency low. Whatever cannot be sent at once (the subscriber is slow, or someone else holds
//! the sink) is left to the subscriber's own writer thread ([`Writer`]), woken by a one-slot
//! doorbell, which sends with blocking writes. A stalled subscriber therefore only ever blocks
//! its own writer thread.
//!
//! Memory held for a subscriber is bounded by the queue plus one event per distinct key for each
//! line pending in the overflow; the connection's own requests wait ([`Mailbox::wait_caught_up`])
//! while its overflow is not empty, so those lines cannot pile up either.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use nix::sys::socket::{send, MsgFlags};
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::key::Key;
use crate::protocol::Event;

/// Items the queue holds before overflowing into the per-key table.
pub const QUEUE_ITEMS: usize = 4096;
/// Value bytes the queue holds before overflowing, so large values cannot pile up in it.
pub const QUEUE_BYTES: usize = 8 << 20;
/// Bytes gathered from the queue before they are sent.
const BATCH_BYTES: usize = 64 * 1024;

/// What a subscriber connection is sent.
#[derive(Debug)]
pub enum Outgoing {
    /// A change of a key; the only kind of item that may be coalesced.
    Event(Event),
    /// A response or marker line, `\n` included; never dropped.
    Line(Vec<u8>),
}

impl Outgoing {
    fn weight(&self) -> usize {
        match self {
            Outgoing::Event(ev) => ev.value.as_ref().map_or(0, |v| v.len()),
            Outgoing::Line(line) => line.len(),
        }
    }

    fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            Outgoing::Event(event) => event.write(out),
            Outgoing::Line(line) => out.extend_from_slice(line),
        }
    }
}

/// Whether a push replaced an older pending event of the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    Coalesced,
    /// The subscriber is gone; the item was dropped.
    Closed,
}

/// A subscriber's queue and the means to send it. Shared by the publishers (through the
/// subscription table), the subscriber's connection thread and its writer thread.
pub struct Mailbox {
    tx: Sender<Outgoing>,
    /// Taken from only by whoever holds `sink`, which is what keeps the sending order.
    rx: Receiver<Outgoing>,
    /// Value bytes in the queue: added by publishers, taken off by the sender.
    queued_bytes: AtomicUsize,
    /// Items that did not fit in the queue. The choice "queue or overflow" is made under this
    /// mutex, which is what keeps per-key order. Lock order: sink, then overflow.
    overflow: Mutex<Overflow>,
    /// Signalled when the overflow is emptied or the mailbox dies.
    drained: Condvar,
    /// The socket and the bytes taken from the queue but not yet sent.
    sink: Mutex<Sink>,
    /// Wakes the writer thread; one slot, so ringing never blocks and never piles up.
    doorbell: Sender<()>,
    /// No more items will come: the writer stops once everything queued is sent.
    closing: AtomicBool,
    /// The socket is broken or the writer stopped: pushes are dropped.
    dead: AtomicBool,
}

struct Sink {
    stream: UnixStream,
    out: Vec<u8>,
    /// How much of `out` has been sent.
    sent: usize,
}

/// The subscriber's writer thread's side: see [`Writer::run`].
pub struct Writer {
    mailbox: Arc<Mailbox>,
    doorbell: Receiver<()>,
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
            Outgoing::Line(_) => self.barrier = Some(seq),
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

/// How a delivery attempt ended.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    /// Everything queued was sent.
    Done,
    /// The socket is full; the rest is still queued.
    WouldBlock,
    /// The socket is broken.
    Broken,
}

/// A mailbox sending to `stream`, and the writer its thread runs.
pub fn mailbox(stream: UnixStream) -> (Arc<Mailbox>, Writer) {
    mailbox_with_capacity(stream, QUEUE_ITEMS)
}

pub fn mailbox_with_capacity(stream: UnixStream, items: usize) -> (Arc<Mailbox>, Writer) {
    let (tx, rx) = crossbeam_channel::bounded(items);
    let (doorbell, bell) = crossbeam_channel::bounded(1);
    let mailbox = Arc::new(Mailbox {
        tx,
        rx,
        queued_bytes: AtomicUsize::new(0),
        overflow: Mutex::new(Overflow::default()),
        drained: Condvar::new(),
        sink: Mutex::new(Sink {
            stream,
            out: Vec::new(),
            sent: 0,
        }),
        doorbell,
        closing: AtomicBool::new(false),
        dead: AtomicBool::new(false),
    });
    let writer = Writer {
        mailbox: mailbox.clone(),
        doorbell: bell,
    };
    (mailbox, writer)
}

impl Mailbox {
    /// Queues `item` without blocking. Nothing is sent until [`kick`](Mailbox::kick).
    pub fn push(&self, item: Outgoing) -> Pushed {
        if self.dead.load(Ordering::Acquire) {
            return Pushed::Closed;
        }
        let mut overflow = self.overflow.lock();
        if !overflow.items.is_empty() {
            return overflow.insert(item);
        }
        let weight = item.weight();
        if weight > 0 && self.queued_bytes.load(Ordering::Acquire) + weight > QUEUE_BYTES {
            return overflow.insert(item);
        }
        self.queued_bytes.fetch_add(weight, Ordering::AcqRel);
        match self.tx.try_send(item) {
            Ok(()) => Pushed::Queued,
            Err(TrySendError::Full(item)) | Err(TrySendError::Disconnected(item)) => {
                self.queued_bytes.fetch_sub(weight, Ordering::AcqRel);
                overflow.insert(item)
            }
        }
    }

    /// Sends what is queued from the calling thread, as far as the socket takes it without
    /// blocking; leaves the rest to the writer thread. Never blocks on the subscriber.
    pub fn kick(&self) {
        if self.dead.load(Ordering::Acquire) {
            return;
        }
        let Some(mut sink) = self.sink.try_lock() else {
            // The sink's holder may be finishing just before our item arrived: let the writer
            // look again.
            self.ring();
            return;
        };
        match self.deliver(&mut sink, MsgFlags::MSG_DONTWAIT) {
            Delivery::Done => {}
            Delivery::WouldBlock => self.ring(),
            Delivery::Broken => {
                drop(sink);
                self.die();
            }
        }
    }

    /// No more items will be queued: the writer sends what is queued, then closes the socket.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.ring();
    }

    fn ring(&self) {
        // Full means a wake-up is already pending, which is all we need.
        let _ = self.doorbell.try_send(());
    }

    /// Sends queue, overflow, queue… until both are empty or the socket says stop.
    fn deliver(&self, sink: &mut MutexGuard<'_, Sink>, flags: MsgFlags) -> Delivery {
        loop {
            while sink.sent < sink.out.len() {
                let Sink { stream, out, sent } = &mut **sink;
                match send_some(stream, &out[*sent..], flags) {
                    Ok(n) => *sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Delivery::WouldBlock,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Delivery::Broken,
                }
            }
            sink.out.clear();
            sink.sent = 0;
            if sink.out.capacity() > 4 * BATCH_BYTES {
                sink.out.shrink_to(BATCH_BYTES);
            }
            if !self.gather(&mut sink.out) {
                return Delivery::Done;
            }
        }
    }

    /// Moves the next batch into `out`: from the queue while it has items, else the whole
    /// overflow. False when there was nothing.
    fn gather(&self, out: &mut Vec<u8>) -> bool {
        while out.len() < BATCH_BYTES {
            let Ok(item) = self.rx.try_recv() else { break };
            self.queued_bytes.fetch_sub(item.weight(), Ordering::AcqRel);
            item.write_to(out);
        }
        if !out.is_empty() {
            return true;
        }
        let batch = self.overflow.lock().take();
        self.drained.notify_all();
        for item in batch.values() {
            item.write_to(out);
        }
        !out.is_empty()
    }

    /// The socket is broken or the writer has stopped: drop what is pending and refuse more.
    fn die(&self) {
        self.dead.store(true, Ordering::Release);
        self.overflow.lock().take();
        while self.rx.try_recv().is_ok() {}
        self.drained.notify_all();
        self.ring();
    }

    /// Blocks until the overflow is empty (or the subscriber is gone). The subscriber's own
    /// connection calls this before queueing more for it (a new snapshot): a client that sends
    /// requests but does not read is held back instead of growing the server's memory.
    pub fn wait_caught_up(&self) {
        let mut overflow = self.overflow.lock();
        while !overflow.items.is_empty() && !self.dead.load(Ordering::Acquire) {
            self.drained.wait(&mut overflow);
        }
    }

    /// Items waiting in the queue and the overflow (for tests and diagnostics).
    pub fn pending(&self) -> usize {
        self.rx.len() + self.overflow.lock().items.len()
    }
}

/// Mailboxes that were given events and still need a [kick](Mailbox::kick). Whoever makes a
/// change collects them and kicks once its own reply is on its way, so a writer's
/// acknowledgement never waits for the fan-out. Dropping it kicks what is left: events are
/// never left queued without someone to send them.
#[derive(Default)]
pub struct Kicks(Vec<Arc<Mailbox>>);

impl Kicks {
    pub fn add(&mut self, touched: Vec<Arc<Mailbox>>) {
        self.0.extend(touched);
        // A long pipelined batch touches the same subscribers again and again.
        if self.0.len() > 1024 {
            self.dedup();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Kicks every collected mailbox once.
    pub fn run(&mut self) {
        self.dedup();
        for mailbox in self.0.drain(..) {
            mailbox.kick();
        }
    }

    fn dedup(&mut self) {
        self.0.sort_unstable_by_key(|m| Arc::as_ptr(m) as usize);
        self.0.dedup_by(|a, b| Arc::ptr_eq(a, b));
    }
}

impl Drop for Kicks {
    fn drop(&mut self) {
        self.run();
    }
}

/// One `send`; `MSG_NOSIGNAL` because a vanished subscriber must be an error, not a signal.
fn send_some(stream: &UnixStream, bytes: &[u8], flags: MsgFlags) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    send(stream.as_raw_fd(), bytes, flags | MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
}

impl Writer {
    /// The writer thread's loop: waits for the doorbell, then sends with blocking writes until
    /// everything queued is out. Returns when the mailbox is closed and drained, or the socket
    /// breaks; then closes the socket.
    pub fn run(self) {
        let mailbox = &self.mailbox;
        while self.doorbell.recv().is_ok() {
            if mailbox.dead.load(Ordering::Acquire) {
                break;
            }
            let mut sink = mailbox.sink.lock();
            match mailbox.deliver(&mut sink, MsgFlags::empty()) {
                Delivery::Done if mailbox.closing.load(Ordering::Acquire) => break,
                Delivery::Done | Delivery::WouldBlock => {}
                Delivery::Broken => break,
            }
        }
        mailbox.die();
        let _ = mailbox.sink.lock().stream.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::EventKind;
    use crate::value::Value;
    use std::io::{BufRead, BufReader};

    fn put(key: &str, rev: u64) -> Outgoing {
        Outgoing::Event(Event {
            kind: EventKind::Put,
            key: Key::parse(key).unwrap(),
            value: Some(Value::from(rev.to_string())),
            rev,
        })
    }

    /// A mailbox on one end of a socket pair, and a reader of the other end.
    fn pair(capacity: usize) -> (Arc<Mailbox>, Writer, BufReader<UnixStream>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (mailbox, writer) = mailbox_with_capacity(ours, capacity);
        (mailbox, writer, BufReader::new(theirs))
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
        let (mb, _writer, mut reader) = pair(8);
        for rev in 1..=5 {
            assert_eq!(mb.push(put("a", rev)), Pushed::Queued);
        }
        mb.kick();
        assert_eq!(read(&mut reader, 5), ["a1", "a2", "a3", "a4", "a5"]);
        assert_eq!(mb.pending(), 0);
    }

    #[test]
    fn overflow_keeps_the_latest_per_key_in_order() {
        let (mb, _writer, mut reader) = pair(2);
        let pushes = [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("a", 5), ("b", 6)];
        let results: Vec<_> = pushes.iter().map(|(k, r)| mb.push(put(k, *r))).collect();
        assert_eq!(
            results.iter().filter(|p| **p == Pushed::Coalesced).count(),
            1
        );
        // Queue: a1 b2. Overflow: a3 c4, then a5 replaces a3 in place and b6 joins: a5 c4 b6.
        mb.kick();
        assert_eq!(read(&mut reader, 5), ["a1", "b2", "a5", "c4", "b6"]);
    }

    #[test]
    fn events_are_not_merged_across_a_line() {
        let (mb, _writer, mut reader) = pair(1);
        mb.push(put("x", 1));
        mb.push(put("a", 2)); // overflow
        mb.push(Outgoing::Line(b"{\"event\":\"ready\"}\n".to_vec()));
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
        mb.kick();
        assert_eq!(
            read(&mut reader, 4),
            ["x1", "a2", "{\"event\":\"ready\"}", "a4"]
        );
        mb.wait_caught_up();
    }

    #[test]
    fn a_full_socket_leaves_the_rest_to_the_writer_thread() {
        let (mb, writer, mut reader) = pair(16);
        let thread = std::thread::spawn(move || writer.run());
        // Far more than a socket buffer holds: the kick stops at WouldBlock, the writer
        // thread finishes once the reader reads.
        let big = Value::from(format!("\"{}\"", "x".repeat(64 * 1024)));
        for rev in 1..=64 {
            mb.push(Outgoing::Event(Event {
                kind: EventKind::Put,
                key: Key::parse(&format!("k{}", rev % 8)).unwrap(),
                value: Some(big.clone()),
                rev,
            }));
            mb.kick();
        }
        mb.close();
        let mut last = HashMap::new();
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 0 {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let rev = v["rev"].as_u64().unwrap();
            let previous = last.insert(v["key"].as_str().unwrap().to_owned(), rev);
            assert!(previous < Some(rev), "per-key order");
            line.clear();
        }
        thread.join().unwrap();
        assert_eq!(last.len(), 8, "every key's latest state arrived");
        assert!(last.values().all(|rev| *rev > 56));
        assert_eq!(mb.push(put("a", 99)), Pushed::Closed);
    }
}

//! One subscriber's mailbox: a bounded, coalescing queue of typed items and the means to send
//! it, with every decision made under one lock.
//!
//! # One lock, one sender at a time
//!
//! [`State`] holds the queue (see [`queue`] for what is kept, replaced and taken next), the bytes
//! taken from it but not yet sent, and the *turn*: at most one thread sends at a time, and only
//! the turn holder takes from the queue. Taking a batch, giving the turn back, "closed and
//! empty", "may the connection read another request" are each decided under the lock, so a push
//! either lands before the decision (and is seen by it) or after (and is then sent by whoever
//! kicks next). Sending itself happens with the lock released.
//!
//! # Who sends
//!
//! - The thread that made a change [`kick`](Mailbox::kick)s each mailbox it pushed to once its
//!   own reply is written (or about to block): it sends at most [`KICK_BUDGET`] bytes, never
//!   blocking (`MSG_DONTWAIT`), and skips a socket already known to be full. Whatever it leaves
//!   is handed to the subscriber's connection thread by ringing its wake-up descriptor. So a
//!   publisher's share of the fan-out is bounded, and no thread switch sits on the fast path.
//! - A change that reaches several subscribers is kicked by a fan-out thread instead, so the
//!   publisher goes back to its client at once; one that reaches many is kicked on several CPUs
//!   at once, the publisher taking one part ([`fanout`]).
//! - The subscriber's own connection thread (`server/connection.rs`) polls its socket and the
//!   wake-up descriptor; it sends everything it can, and waits for the socket to become
//!   writable when it is full. There is no second thread per subscriber.
//!
//! Items are formatted when they are sent, in batches of at most [`BATCH_BYTES`] (a single
//! change larger than that is sent straight from its shared bytes), so the memory formatted for
//! one send is bounded whatever the store size.

#[cfg(not(loom))]
mod fanout;
mod item;
#[cfg(all(test, loom))]
mod loom_tests;
mod port;
mod queue;
mod sync;

use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

pub use item::{Item, Published};
pub use port::{send_some, Port, SocketPort};
pub use queue::{Pushed, Queue};
use sync::{Mutex, MutexGuard};

/// Items the queue holds before it coalesces.
pub const QUEUE_ITEMS: usize = 4096;
/// Value bytes the queue holds before it coalesces, so large values cannot pile up in it.
pub const QUEUE_BYTES: usize = 8 << 20;
/// Bytes formatted for one send.
pub const BATCH_BYTES: usize = 64 * 1024;
/// Items formatted for one send.
const BATCH_ITEMS: usize = 1024;
/// What a publishing thread sends to one subscriber per kick, at most.
pub const KICK_BUDGET: usize = 64 * 1024;
/// Pending replies at which the subscriber's connection stops reading requests.
pub const MAX_REPLIES: usize = 32;
/// Bytes of pending replies at which it stops too: replies echo the request's `id`, so 32 of
/// them could otherwise pin 32 request lines' worth of memory. So the pending replies hold at
/// most this plus one reply.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;
/// Items a queue must have held for its drain to give freed memory back to the system.
const TRIM_AFTER: usize = 256;
/// Capacity the send buffer keeps between batches; more is given back.
const KEEP_CAPACITY: usize = 4096;

/// How a turn at sending ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Everything pending was sent.
    Drained,
    /// The budget is spent; more is pending.
    Pending,
    /// The socket is full; more is pending.
    Blocked,
    /// Another thread holds the turn (it will send what is pending, or hand it on).
    Busy,
    /// The socket is broken or the subscriber was dropped; nothing more is sent.
    Dead,
}

/// What the subscriber's connection thread needs to know to decide what to wait for.
#[derive(Debug, Clone, Copy)]
pub struct Status {
    /// Closed and everything sent, or dead: the connection can end.
    pub finished: bool,
    /// Fewer than [`MAX_REPLIES`] replies of fewer than [`MAX_REPLY_BYTES`] and no snapshot
    /// pending: the next request may be
    /// read. Otherwise the connection stops reading (which throttles a client that keeps sending
    /// without reading).
    pub accepts_requests: bool,
    /// The socket was full at the last send: wait until it is writable.
    pub blocked: bool,
    /// Since when data has been pending without the socket accepting any of it.
    pub stalled_since: Option<Instant>,
}

/// Bytes taken from the queue and not yet sent.
#[derive(Default)]
struct Out {
    buf: Vec<u8>,
    /// A change too large to copy into `buf`: sent from its shared bytes.
    big: Option<Arc<Published>>,
    sent: usize,
}

impl Out {
    fn bytes(&self) -> &[u8] {
        match &self.big {
            Some(p) => p.line(),
            None => &self.buf,
        }
    }

    fn remaining(&self) -> &[u8] {
        &self.bytes()[self.sent..]
    }

    fn is_empty(&self) -> bool {
        self.remaining().is_empty()
    }

    fn reset(&mut self) {
        self.big = None;
        self.sent = 0;
        self.buf.clear();
        // shrink_to, not a new Vec: see `Connection::flush` (glibc's mmap threshold).
        self.buf.shrink_to(KEEP_CAPACITY);
    }

    fn fill(&mut self, batch: &mut Vec<Item>) {
        self.reset();
        if let [Item::Change(p)] = batch.as_slice() {
            if p.line().len() > BATCH_BYTES {
                self.big = Some(p.clone());
                batch.clear();
                return;
            }
        }
        for item in batch.drain(..) {
            item.write_to(&mut self.buf);
        }
    }
}

/// Everything about a mailbox that a decision reads or writes; behind [`Mailbox::state`].
struct State {
    queue: Queue,
    /// Owned by the turn holder while it sends (taken out of here), back here between turns.
    out: Out,
    /// A thread holds the turn.
    sending: bool,
    /// The last send found the socket full: kicks leave it to the connection thread, which
    /// clears this when the socket is writable again.
    blocked: bool,
    /// The subscriber is gone: everything pending was dropped, pushes are refused.
    dead: bool,
    /// The wake-up descriptor has been written and not yet read.
    rung: bool,
    /// The connection thread saw `accepts_requests` false and waits to be told otherwise:
    /// whoever takes the last blocking reply or snapshot out rings it.
    wants_room: bool,
    stalled_since: Option<Instant>,
}

/// A subscriber's queue and the means to send it. Shared by the publishers (through the
/// subscription table) and the subscriber's connection thread.
pub struct Mailbox<P: Port = SocketPort> {
    /// The one lock: see the module doc.
    state: Mutex<State>,
    /// The subscriber's socket (sends only, always non-blocking) and the wake-up its
    /// connection thread polls.
    port: P,
}

impl Mailbox<SocketPort> {
    /// A mailbox sending to `stream`.
    ///
    /// # Errors
    /// The wake-up descriptor cannot be created (out of descriptors).
    pub fn new(stream: UnixStream) -> io::Result<Arc<Mailbox>> {
        Mailbox::with_capacity(stream, QUEUE_ITEMS, QUEUE_BYTES)
    }

    /// A mailbox with a smaller queue (tests).
    ///
    /// # Errors
    /// As for [`Mailbox::new`].
    pub fn with_capacity(
        stream: UnixStream,
        items: usize,
        bytes: usize,
    ) -> io::Result<Arc<Mailbox>> {
        Ok(Arc::new(Mailbox::on_port(
            SocketPort::new(stream)?,
            items,
            bytes,
        )))
    }

    /// The descriptor the connection thread polls to be woken.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.port.wake_fd()
    }
}

impl<P: Port> Mailbox<P> {
    /// A mailbox sending to `port`.
    pub fn on_port(port: P, items: usize, bytes: usize) -> Mailbox<P> {
        Mailbox {
            state: Mutex::new(State {
                queue: Queue::new(items, bytes),
                out: Out::default(),
                sending: false,
                blocked: false,
                dead: false,
                rung: false,
                wants_room: false,
                stalled_since: None,
            }),
            port,
        }
    }

    /// Queues `item` without blocking. Nothing is sent until a kick or the connection thread.
    pub fn push(&self, item: Item) -> Pushed {
        let mut state = self.state.lock();
        if state.dead {
            return Pushed::Closed;
        }
        state.queue.push(item)
    }

    /// A publishing thread's turn: sends at most [`KICK_BUDGET`] bytes without blocking, and
    /// hands the rest to the connection thread.
    pub fn kick(&self) {
        self.turn(KICK_BUDGET, true);
    }

    /// The connection thread's turn: sends until everything is out or the socket is full.
    pub fn send(&self) -> Turn {
        self.turn(usize::MAX, false)
    }

    fn turn(&self, budget: usize, kick: bool) -> Turn {
        let mut state = self.state.lock();
        let result = if state.dead {
            Turn::Dead
        } else if state.sending {
            Turn::Busy
        } else if kick && state.blocked {
            Turn::Blocked
        } else {
            self.take_turn(&mut state, budget)
        };
        match result {
            Turn::Dead => self.die_locked(&mut state),
            // The connection thread must carry on: it waits for the socket or the end.
            Turn::Pending | Turn::Blocked if kick => self.ring_locked(&mut state),
            Turn::Drained if kick && state.queue.is_closed() => self.ring_locked(&mut state),
            _ => {}
        }
        // The connection may read again, and it is waiting for exactly that.
        if kick && state.wants_room && accepts_requests(&state.queue) {
            state.wants_room = false;
            self.ring_locked(&mut state);
        }
        result
    }

    /// Holds the turn: takes batches under the lock, sends them with the lock released.
    fn take_turn(&self, state: &mut MutexGuard<'_, State>, budget: usize) -> Turn {
        state.sending = true;
        let mut out = std::mem::take(&mut state.out);
        let mut batch = Vec::new();
        let mut spent = 0;
        let result = loop {
            if out.is_empty() && state.queue.is_empty() {
                // An idle subscriber holds no send buffer.
                out = Out::default();
                state.stalled_since = None;
                if state.queue.take_high_water() >= TRIM_AFTER {
                    MutexGuard::unlocked(state, give_back_freed_memory);
                }
                break Turn::Drained;
            }
            if spent >= budget {
                break Turn::Pending;
            }
            if out.is_empty() {
                take_batch(&mut state.queue, &mut batch);
            }
            let sent = MutexGuard::unlocked(state, || {
                if !batch.is_empty() {
                    out.fill(&mut batch);
                }
                self.send_out(&mut out, budget - spent)
            });
            match sent {
                Ok(n) => {
                    spent += n;
                    if n > 0 {
                        state.stalled_since = None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    state.blocked = true;
                    state.stalled_since.get_or_insert_with(Instant::now);
                    break Turn::Blocked;
                }
                Err(_) => break Turn::Dead,
            }
        };
        state.out = out;
        state.sending = false;
        result
    }

    /// Sends from `out` until it is empty, `budget` is spent or the socket is full. Returns the
    /// bytes sent (an error only when nothing was).
    fn send_out(&self, out: &mut Out, budget: usize) -> io::Result<usize> {
        let mut spent = 0;
        while !out.is_empty() && spent < budget {
            let remaining = out.remaining();
            let chunk = &remaining[..remaining.len().min(budget - spent)];
            match self.port.send(chunk) {
                Ok(n) => {
                    out.sent += n;
                    spent += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if spent == 0 => return Err(e),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(spent),
                Err(e) => return Err(e),
            }
        }
        Ok(spent)
    }

    /// No more items will be queued (the connection is ending): what is pending is still sent.
    pub fn close(&self) {
        let mut state = self.state.lock();
        state.queue.close();
        self.ring_locked(&mut state);
    }

    /// Drops the subscriber: everything pending is dropped, nothing more is sent.
    pub fn die(&self) {
        self.die_locked(&mut self.state.lock());
    }

    fn die_locked(&self, state: &mut State) {
        state.dead = true;
        state.queue.clear();
        if !state.sending {
            state.out = Out::default();
        }
        self.ring_locked(state);
    }

    /// Wakes the connection thread (once until it reads the wake-up).
    pub fn ring(&self) {
        self.ring_locked(&mut self.state.lock());
    }

    fn ring_locked(&self, state: &mut State) {
        if !state.rung {
            state.rung = true;
            self.port.wake();
        }
    }

    /// The connection thread read its wake-up.
    pub fn woken(&self) {
        let mut state = self.state.lock();
        self.port.clear_wake();
        state.rung = false;
    }

    /// The connection thread saw the socket writable again.
    pub fn writable(&self) {
        self.state.lock().blocked = false;
    }

    /// The connection thread's view before it waits. Not reading because of it
    /// (`accepts_requests` false) registers the wish to be woken once it changes.
    pub fn status(&self) -> Status {
        let mut state = self.state.lock();
        state.wants_room = !accepts_requests(&state.queue);
        let empty = state.queue.is_empty() && state.out.is_empty() && !state.sending;
        Status {
            finished: state.dead || (state.queue.is_closed() && empty),
            accepts_requests: accepts_requests(&state.queue),
            blocked: state.blocked,
            stalled_since: state.stalled_since,
        }
    }

    /// Coalescing, or the socket is full.
    pub fn is_behind(&self) -> bool {
        let state = self.state.lock();
        !state.dead && (state.blocked || state.queue.is_over())
    }

    /// Items waiting (for tests and diagnostics).
    pub fn pending(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// Items waiting, and changes replaced by a later one of their key since the start (for
    /// `TRACE` and `STATS`).
    pub fn lag(&self) -> (usize, u64) {
        let state = self.state.lock();
        (state.queue.len(), state.queue.coalesced())
    }
}

/// Returns the free pages of every allocator arena to the system. A snapshot or a burst leaves
/// thousands of small blocks freed in the connection thread's arena between blocks other
/// connections still hold; glibc keeps those pages (it trims only the top of a heap), so
/// without this an idle subscriber that once read a 1,000-key snapshot would keep ~50 KiB.
/// Called only after a drain of at least [`TRIM_AFTER`] items, with the mailbox unlocked.
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu", not(loom)))]
    // SAFETY: malloc_trim only returns free memory; it is thread-safe (it locks each arena).
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Whether the connection may read its next request: its replies cannot pile up, and a new
/// snapshot waits until the previous one has been sent.
fn accepts_requests(queue: &Queue) -> bool {
    queue.replies() < MAX_REPLIES && queue.reply_bytes() < MAX_REPLY_BYTES && queue.snapshots() == 0
}

/// Takes the next batch: at most [`BATCH_ITEMS`] items and about [`BATCH_BYTES`], and a change
/// larger than a batch on its own.
fn take_batch(queue: &mut Queue, batch: &mut Vec<Item>) {
    let mut size = 0;
    while batch.len() < BATCH_ITEMS && size < BATCH_BYTES {
        let Some(front) = queue.front() else { break };
        let hint = front.size_hint();
        if hint > BATCH_BYTES && !batch.is_empty() {
            break;
        }
        size += hint;
        batch.extend(queue.pop());
    }
}

/// Mailboxes that were given events and still need a [kick](Mailbox::kick). Whoever makes a
/// change collects them and kicks before it waits on its own client, so the fan-out never waits
/// for a writer that does not read. Dropping it kicks what is left: events are never left
/// queued without someone to send them.
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

    /// Kicks every collected mailbox once (a large fan-out shared with helper threads: see
    /// [`fanout`]).
    pub fn run(&mut self) {
        self.dedup();
        #[cfg(not(loom))]
        fanout::kick_all(&mut self.0);
        for mailbox in self.0.drain(..) {
            mailbox.kick();
        }
        if self.0.capacity() > 1024 {
            self.0 = Vec::new();
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

#[cfg(all(test, not(loom)))]
mod tests;

//! A subscription that survives its connection: [`Watch`].
//!
//! When the connection is lost (the server restarts, its socket file is replaced, it sends
//! `shutdown`) the watch reconnects, backing off from 10 ms to at most 1 s between attempts,
//! and resumes with `from_rev` and the `epoch` of the last `ready` (so that a server whose data
//! directory was wiped or replaced answers with a reset, however far its revisions have
//! gone). The resume point is the `rev` of the last `ready`, raised by
//! every later `put` or `del` without `skipped` (an event standing for skipped changes may have
//! overtaken older changes of other keys, so it does not move the point; docs/PROTOCOL.md,
//! "Resuming a subscription"). What the consumer then sees:
//!
//! - a resume the server answers from its history: the changes it missed (`put`, `del`), then
//!   `ready`. A change it already has (same key, same revision) is not passed on again, nor a
//!   `del` of a key it was never given;
//! - a resume the server cannot answer: [`Event::Reset`], then every key of the snapshot as
//!   `init` — even at a revision the consumer has, since the server's revisions may have
//!   started again — then, before `ready`, a `del` with revision 0 for every key the consumer
//!   had that the snapshot lacks (deleted while it was away; the delete's revision is unknown).
//!
//! Either way the consumer converges on the server's state, deletes included: it never keeps a
//! stale key. To do that the watch remembers the keys it delivered (and their revisions).
//!
//! [`Event::Reset`]: crate::wire::Event::Reset

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{parse_raw_event, subscribe_on, Conn, Event, Interrupter, Interrupts, RawEvent};
use crate::error::Error;
use crate::wire;
use crate::Timeouts;

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// One event as a [`Watch`] delivers it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event: RawEvent,
    /// How many earlier changes of its key a `put` or `del` stands for (0: none skipped).
    pub skipped: u64,
    /// The line the server sent, as is; `None` for a `del` the watch made up after a reset.
    pub line: Option<String>,
}

/// A change of a [`Watch`]'s connection, told to its [`Watch::on_connection`] callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// The connection was lost (why); the watch is reconnecting.
    Lost(String),
    /// Connected again and resumed from this revision (`None`: before any snapshot was
    /// complete, so the whole snapshot again).
    Resumed { from_rev: Option<u64> },
}

/// What stops a watch from another thread: a flag, the current connection to shut down, and a
/// condition to end a backoff pause.
pub(crate) struct Stop {
    stopped: AtomicBool,
    stream: Mutex<Option<UnixStream>>,
    wake: Condvar,
}

impl Stop {
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stream) = stream.take() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        self.wake.notify_all();
    }

    fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Keeps a handle on the current connection, to shut it down on [`Stop::stop`].
    fn watch_stream(&self, stream: Option<UnixStream>) {
        let mut current = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        *current = stream;
        if self.stopped() {
            if let Some(stream) = current.take() {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Waits `pause`, or less if stopped meanwhile.
    fn pause(&self, pause: Duration) {
        let guard = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self
            .wake
            .wait_timeout_while(guard, pause, |_| !self.stopped())
            .unwrap_or_else(|e| e.into_inner());
    }
}

/// What [`Watch::on_connection`] keeps.
type OnConnection = Box<dyn FnMut(&Connection) + Send>;

/// A resumption (or the first snapshot) until its `ready`.
struct Resuming {
    /// The server answered `reset`: a full snapshot follows.
    reset: bool,
    /// The keys the full snapshot restated.
    present: HashSet<String>,
}

/// A subscription to one target that reconnects and resumes on its own (see the module
/// documentation); made by [`crate::Client::watch`]. Iterate it for [`Event`]s, or call
/// [`Watch::next_delivery`] for the exact text and the `skipped` counts. It ends only when
/// interrupted ([`Watch::interrupter`]), or — with [`Watch::reconnecting`]`(false)` — when its
/// one connection ends.
pub struct Watch {
    path: PathBuf,
    timeouts: Timeouts,
    target: String,
    conn: Option<Conn>,
    reconnect: bool,
    ended: bool,
    resume_rev: Option<u64>,
    /// The history `resume_rev` belongs to: the `epoch` of the last `ready` (`None` before
    /// one, or from a server that sends none).
    resume_epoch: Option<String>,
    resuming: Option<Resuming>,
    /// Every key delivered and not deleted since, with its revision.
    seen: HashMap<String, u64>,
    /// Started from a revision the caller kept ([`crate::Client::watch_from`]): the consumer
    /// holds keys `seen` does not know, until a full snapshot (after a `reset`) is complete.
    /// Meanwhile a resumption's `del` is passed on even for a key `seen` lacks.
    blind: bool,
    pending: VecDeque<Delivery>,
    stop: Arc<Stop>,
    on_connection: Option<OnConnection>,
    reconnects: u64,
    resets: u64,
    /// Whether the current connection delivered anything (a connection that is dropped at
    /// once must not make the watch reconnect in a tight loop).
    delivered: bool,
    backoff: Duration,
}

impl Watch {
    pub(crate) fn open(
        path: &Path,
        timeouts: Timeouts,
        target: &str,
        mut conn: Conn,
        from_rev: Option<u64>,
        epoch: Option<&str>,
    ) -> Result<Watch, Error> {
        subscribe_on(&mut conn, target, from_rev, epoch)?;
        let stop = Arc::new(Stop {
            stopped: AtomicBool::new(false),
            stream: Mutex::new(None),
            wake: Condvar::new(),
        });
        stop.watch_stream(conn.reader.get_ref().try_clone().ok());
        Ok(Watch {
            path: path.to_owned(),
            timeouts,
            target: target.to_owned(),
            conn: Some(conn),
            reconnect: true,
            ended: false,
            resume_rev: from_rev,
            resume_epoch: from_rev.and(epoch).map(str::to_owned),
            resuming: Some(Resuming {
                reset: false,
                present: HashSet::new(),
            }),
            seen: HashMap::new(),
            blind: from_rev.is_some(),
            pending: VecDeque::new(),
            stop,
            on_connection: None,
            reconnects: 0,
            resets: 0,
            delivered: false,
            backoff: FIRST_BACKOFF,
        })
    }

    /// Whether to reconnect when the connection is lost (the default). Without, the watch is
    /// a plain subscription: it delivers `shutdown` and ends, and a lost connection is an error.
    pub fn reconnecting(mut self, reconnect: bool) -> Watch {
        self.reconnect = reconnect;
        self
    }

    /// Calls `f` when the connection is lost and when the watch has resumed (from the thread
    /// reading the watch, before the next event is returned).
    pub fn on_connection(mut self, f: impl FnMut(&Connection) + Send + 'static) -> Watch {
        self.on_connection = Some(Box::new(f));
        self
    }

    /// The revision a resumption would start from (`None` before the first `ready`).
    pub fn resume_rev(&self) -> Option<u64> {
        self.resume_rev
    }

    /// The history [`Watch::resume_rev`] belongs to: the `epoch` of the last `ready` (`None`
    /// before the first, or from a server that sends none). Keep it with the revision to
    /// resume later with [`crate::Client::watch_from_epoch`].
    pub fn resume_epoch(&self) -> Option<&str> {
        self.resume_epoch.as_deref()
    }

    /// How many times the watch connected again.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// How many resumptions the server answered with `reset` (a full snapshot).
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Whether the watch goes on after a lost connection (it reconnects and has not ended).
    pub fn goes_on(&self) -> bool {
        self.reconnect && !self.ended && !self.stop.stopped()
    }

    /// Whether a connection is open now.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// A handle that ends the watch from another thread: a blocked read or backoff returns
    /// and the watch ends (`None` from [`Watch::next_delivery`]).
    pub fn interrupter(&self) -> Interrupter {
        Interrupter(Interrupts::Watch(self.stop.clone()))
    }

    /// Whether [`Watch::interrupter`] ended the watch.
    pub fn interrupted(&self) -> bool {
        self.stop.stopped()
    }

    /// The next event, waiting until `deadline` at most (`None`: for ever) — reconnecting
    /// meanwhile as needed. `Ok(None)` when the watch has ended.
    ///
    /// # Errors
    /// The deadline passed ([`io::ErrorKind::TimedOut`]; the watch stays usable); a line that
    /// is not an event (the connection is dropped and the next call reconnects); without
    /// reconnecting, the connection was lost.
    pub fn next_delivery(&mut self, deadline: Option<Instant>) -> Result<Option<Delivery>, Error> {
        loop {
            if let Some(delivery) = self.pending.pop_front() {
                return Ok(Some(delivery));
            }
            if self.ended || self.stop.stopped() {
                return Ok(None);
            }
            let Some(conn) = self.conn.as_mut() else {
                self.reconnect(deadline)?;
                continue;
            };
            let timeout = match deadline {
                None => None,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(timed_out("no event before the deadline"));
                    }
                    Some(left)
                }
            };
            conn.reader.get_ref().set_read_timeout(timeout)?;
            let line = match conn.read_line() {
                Ok(line) => line,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(timed_out("no event before the deadline"));
                }
                Err(_) if self.stop.stopped() => return Ok(None),
                Err(e) => {
                    self.lose(e.to_string());
                    if !self.reconnect {
                        self.ended = true;
                        return Err(Error::Io(e));
                    }
                    continue;
                }
            };
            match parse_raw_event(&line) {
                Ok(None) => {}
                Ok(Some((wire::Event::Shutdown, _))) if self.reconnect => {
                    self.lose("the server is stopping".into());
                }
                Ok(Some((event, skipped))) => self.absorb(event, skipped, line),
                Err(e) => {
                    self.lose(e.to_string());
                    if !self.reconnect {
                        self.ended = true;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Takes in one event of the connection: updates what the watch knows and queues what the
    /// consumer gets.
    fn absorb(&mut self, event: RawEvent, skipped: u64, line: String) {
        self.delivered = true;
        self.backoff = FIRST_BACKOFF;
        let resuming = self.resuming.is_some();
        match &event {
            wire::Event::Reset { .. } => {
                if let Some(r) = &mut self.resuming {
                    r.reset = true;
                }
                self.resets += 1;
            }
            wire::Event::Init { key, rev, .. } => {
                if let Some(r) = &mut self.resuming {
                    r.present.insert(key.clone());
                }
                self.seen.insert(key.clone(), *rev);
            }
            wire::Event::Put { key, rev, .. } => {
                let restated = self
                    .resuming
                    .as_ref()
                    .is_some_and(|r| !r.reset && self.seen.get(key) == Some(rev));
                if restated {
                    return;
                }
                self.seen.insert(key.clone(), *rev);
                if !resuming && skipped == 0 {
                    self.raise(*rev);
                }
            }
            wire::Event::Del { key, rev } => {
                if resuming && !self.blind && !self.seen.contains_key(key) {
                    return;
                }
                self.seen.remove(key);
                if !resuming && skipped == 0 {
                    self.raise(*rev);
                }
            }
            wire::Event::Ready { rev, epoch, .. } => {
                if let Some(r) = self.resuming.take() {
                    if r.reset {
                        self.forget_missing(&r.present);
                        self.blind = false;
                    }
                }
                self.resume_rev = Some(*rev);
                self.resume_epoch = epoch.clone();
            }
            wire::Event::Shutdown => {
                // Only without reconnecting: the server closes the connection after it.
                self.ended = true;
                self.conn = None;
                self.stop.watch_stream(None);
            }
        }
        self.pending.push_back(Delivery {
            event,
            skipped,
            line: Some(line),
        });
    }

    /// After a full snapshot: the keys the consumer has that it did not restate are gone.
    fn forget_missing(&mut self, present: &HashSet<String>) {
        let mut gone: Vec<String> = self
            .seen
            .keys()
            .filter(|key| !present.contains(*key))
            .cloned()
            .collect();
        gone.sort();
        for key in gone {
            self.seen.remove(&key);
            self.pending.push_back(Delivery {
                event: wire::Event::Del { key, rev: 0 },
                skipped: 0,
                line: None,
            });
        }
    }

    fn raise(&mut self, rev: u64) {
        if self.resume_rev.is_some_and(|r| rev > r) {
            self.resume_rev = Some(rev);
        }
    }

    fn lose(&mut self, why: String) {
        self.conn = None;
        self.stop.watch_stream(None);
        self.tell(&Connection::Lost(why));
    }

    fn tell(&mut self, change: &Connection) {
        if let Some(f) = &mut self.on_connection {
            f(change);
        }
    }

    /// Connects again, backing off between attempts, until connected, stopped, or `deadline`.
    fn reconnect(&mut self, deadline: Option<Instant>) -> Result<(), Error> {
        if !self.reconnect {
            self.ended = true;
            return Ok(());
        }
        let mut pause = !self.delivered;
        loop {
            if self.stop.stopped() {
                return Ok(());
            }
            if pause {
                let mut wait = self.backoff;
                if let Some(deadline) = deadline {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(timed_out("not connected again before the deadline"));
                    }
                    wait = wait.min(left);
                }
                self.stop.pause(wait);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                if self.stop.stopped() {
                    return Ok(());
                }
            }
            pause = true;
            match self.connect() {
                Ok(conn) => {
                    self.stop
                        .watch_stream(conn.reader.get_ref().try_clone().ok());
                    self.conn = Some(conn);
                    self.delivered = false;
                    self.reconnects += 1;
                    self.resuming = Some(Resuming {
                        // Lost before the first snapshot was complete: a full one again,
                        // after which what it lacks is gone.
                        reset: self.resume_rev.is_none(),
                        present: HashSet::new(),
                    });
                    let from_rev = self.resume_rev;
                    self.tell(&Connection::Resumed { from_rev });
                    return Ok(());
                }
                Err(e) => log::debug!("watch {}: reconnecting: {e}", self.target),
            }
        }
    }

    fn connect(&self) -> Result<Conn, Error> {
        let mut conn = Conn::open(&self.path, self.timeouts)?;
        let epoch = self.resume_epoch.as_deref();
        subscribe_on(&mut conn, &self.target, self.resume_rev, epoch)?;
        Ok(conn)
    }
}

fn timed_out(what: &str) -> Error {
    Error::Io(io::Error::new(io::ErrorKind::TimedOut, what.to_owned()))
}

impl RawEvent {
    /// The event with its value parsed into a tree (see [`crate::Client::get`] for what that
    /// loses).
    ///
    /// # Errors
    /// A value that does not parse into a tree (deeper than serde_json's limit).
    pub fn into_event(self) -> Result<Event, Error> {
        let value = |raw: Box<serde_json::value::RawValue>| -> Result<Value, Error> {
            serde_json::from_str(raw.get()).map_err(|e| Error::Protocol(format!("a value: {e}")))
        };
        Ok(match self {
            wire::Event::Init { key, value: v, rev } => wire::Event::Init {
                key,
                value: value(v)?,
                rev,
            },
            wire::Event::Put { key, value: v, rev } => wire::Event::Put {
                key,
                value: value(v)?,
                rev,
            },
            wire::Event::Del { key, rev } => wire::Event::Del { key, rev },
            wire::Event::Ready {
                sub,
                count,
                rev,
                epoch,
            } => wire::Event::Ready {
                sub,
                count,
                rev,
                epoch,
            },
            wire::Event::Reset { sub } => wire::Event::Reset { sub },
            wire::Event::Shutdown => wire::Event::Shutdown,
        })
    }
}

impl Iterator for Watch {
    type Item = Result<Event, Error>;

    /// The next event, waiting for ever (reconnecting as needed); `None` once ended.
    fn next(&mut self) -> Option<Self::Item> {
        match self.next_delivery(None) {
            Ok(Some(delivery)) => Some(delivery.event.into_event()),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests;

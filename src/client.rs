//! The blocking Rust client.
//!
//! ```no_run
//! use nkv::Client;
//!
//! # fn main() -> Result<(), nkv::Error> {
//! let mut client = Client::connect("/tmp/nkv/nkv.sock")?;
//! client.put("service.topicA.key1", &serde_json::json!({"on": true}))?;
//! let value = client.get("service.topicA.key1")?; // Some(json!({"on": true}))
//! println!("{value:?}");
//!
//! for event in client.subscribe("service")? {
//!     match event? {
//!         nkv::Event::Put { key, value, .. } => println!("{key} = {value}"),
//!         nkv::Event::Ready { .. } => println!("initial state complete"),
//!         other => println!("{other:?}"),
//!     }
//! #   break;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Compare-and-set, session keys, resuming
//!
//! [`Client::put_if`] and [`Client::delete_if`] change a key only at an expected revision and
//! return a [`Cas`]: done, or a conflict carrying the current revision. [`Client::put_session`]
//! ties a key to the client's connection (the server deletes it when the connection closes).
//! [`Client::watch`] is a subscription that reconnects and resumes on its own, surfacing
//! `reset` and never leaving a stale key ([`Watch`]); [`Client::subscribe`] stays one
//! connection that ends with it, and [`Client::subscribe_from`] resumes by hand.
//!
//! # Retries and timeouts
//!
//! A request is sent again on a new connection only when it cannot have been applied: its
//! write failed (the server had closed the connection, so it never read the line), or the
//! server answered that it closed the connection for idleness before reading it. A PUT or DEL
//! whose connection breaks after it was sent is *not* retried — it may have been applied — and
//! fails with an error that says so; reads are retried once. [`Timeouts`] bound connecting and
//! waiting for each response.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::error::{Error, ErrorCode};
use crate::wire::{self, JsonRequest, Op, Reply};

pub use crate::wire::{Stats, Subscriber};
pub use cas::{cas_outcome, Cas};
pub use subscription::{parse_raw_event, Interrupter, Subscription};
pub use watch::{Connection, Delivery, Watch};

use subscription::{subscribe_on, Interrupts};

mod cas;
mod subscription;
mod watch;

/// A key's value with the revision of its last change.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub value: Value,
    pub rev: u64,
}

/// An event on a subscription, as the client reads it.
pub type Event = wire::Event<String, Value>;

/// An event whose value is kept as the JSON text the server sent (see [`RawEvent::parse`]).
pub type RawEvent = wire::Event<String, Box<RawValue>>;

/// A key's value as the JSON text the server stores, with the revision of its last change.
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub value: Box<RawValue>,
    pub rev: u64,
}

/// How long the client waits; `None` waits forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// For the connection to be accepted (the server's backlog may be full).
    pub connect: Option<Duration>,
    /// For each response once its request is sent (and for the request to be written).
    pub request: Option<Duration>,
}

impl Default for Timeouts {
    /// 10 s to connect, 30 s per response: long enough for a busy server with `--fsync`,
    /// short enough that a stuck one does not hang a script forever.
    fn default() -> Timeouts {
        Timeouts {
            connect: Some(Duration::from_secs(10)),
            request: Some(Duration::from_secs(30)),
        }
    }
}

impl Timeouts {
    /// The same timeout for connecting and for each response.
    pub fn all(timeout: Option<Duration>) -> Timeouts {
        Timeouts {
            connect: timeout,
            request: timeout,
        }
    }
}

/// One persistent connection to an nkv server; requests are answered in order on it. The
/// connection is opened again (once, for the next request) when the server has closed it.
pub struct Client {
    path: PathBuf,
    conn: Option<Conn>,
    timeouts: Timeouts,
    /// Connections opened so far (see [`Client::connections`]).
    opened: u64,
}

pub(crate) struct Conn {
    pub(crate) reader: BufReader<UnixStream>,
    /// Requests answered on this connection (0: nothing proves the server still reads it).
    answered: u64,
}

/// Connects to `path`, waiting at most `timeout` for the server to accept.
fn open_stream(path: &Path, timeout: Option<Duration>) -> io::Result<UnixStream> {
    use nix::sys::socket::{
        connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr,
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // A Unix stream connect waits for room in a full backlog for at most the send timeout.
    let tv = nix::sys::time::TimeVal::from(libc_timeval(timeout));
    setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    let addr = UnixAddr::new(path)?;
    use std::os::fd::AsRawFd;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(nix::errno::Errno::EAGAIN) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the server did not accept the connection within {:?}",
                    timeout.unwrap_or_default()
                ),
            ))
        }
        Err(e) => return Err(e.into()),
    }
    Ok(UnixStream::from(fd))
}

fn libc_timeval(timeout: Option<Duration>) -> nix::libc::timeval {
    let d = timeout.unwrap_or_default();
    nix::libc::timeval {
        tv_sec: d.as_secs() as nix::libc::time_t,
        tv_usec: d.subsec_micros() as nix::libc::suseconds_t,
    }
}

impl Conn {
    pub(crate) fn open(path: &Path, timeouts: Timeouts) -> io::Result<Conn> {
        let stream = open_stream(path, timeouts.connect).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot connect to {}: {e}", path.display()),
            )
        })?;
        stream.set_write_timeout(timeouts.request)?;
        stream.set_read_timeout(timeouts.request)?;
        Ok(Conn {
            reader: BufReader::new(stream),
            answered: 0,
        })
    }

    pub(crate) fn send(&mut self, line: &str) -> io::Result<()> {
        let mut request = Vec::with_capacity(line.len() + 1);
        request.extend_from_slice(line.as_bytes());
        request.push(b'\n');
        self.reader.get_ref().write_all(&request)
    }

    pub(crate) fn read_line(&mut self) -> io::Result<String> {
        let mut response = String::new();
        if self.reader.read_line(&mut response)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        if response.pop() != Some('\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection in the middle of a line",
            ));
        }
        Ok(response)
    }
}

impl Client {
    /// Connects to the server's socket with the default [`Timeouts`].
    ///
    /// # Errors
    /// [`Error::Io`] when the socket cannot be reached.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
        Client::connect_with(path, Timeouts::default())
    }

    /// Connects to the server's socket with the given timeouts.
    ///
    /// # Errors
    /// [`Error::Io`] when the socket cannot be reached in time.
    pub fn connect_with(path: impl AsRef<Path>, timeouts: Timeouts) -> Result<Client, Error> {
        let mut client = Client::lazy(path, timeouts);
        client.conn = Some(Conn::open(&client.path, timeouts)?);
        client.opened = 1;
        Ok(client)
    }

    /// A client that connects when it sends its first request.
    pub fn lazy(path: impl AsRef<Path>, timeouts: Timeouts) -> Client {
        Client {
            path: path.as_ref().to_owned(),
            conn: None,
            timeouts,
            opened: 0,
        }
    }

    /// The socket this client connects to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Sends one request line as is and returns the response line as is (without `\n`).
    /// Retried on a new connection only when the server cannot have read it (see the module
    /// documentation); a line that is not a read is never sent twice.
    ///
    /// # Errors
    /// [`Error::Io`] when the connection fails or a timeout passes.
    pub fn raw(&mut self, line: &str) -> Result<String, Error> {
        let op = if line.trim_start().starts_with('{') {
            serde_json::from_str::<JsonRequest>(line)
                .ok()
                .and_then(|r| Op::parse(&r.op))
        } else {
            line.split(' ').next().and_then(Op::parse)
        };
        self.round_trip(line, op.is_some_and(is_read))
    }

    fn round_trip(&mut self, line: &str, repeatable: bool) -> Result<String, Error> {
        let mut retried = false;
        loop {
            let conn = match &mut self.conn {
                Some(conn) => conn,
                None => {
                    let conn = Conn::open(&self.path, self.timeouts)?;
                    self.opened += 1;
                    self.conn.insert(conn)
                }
            };
            let reused = conn.answered > 0;
            if let Err(e) = conn.send(line) {
                self.conn = None;
                // A failed write never delivered the whole line: the server did not act on it.
                if is_disconnect(&e) && !retried {
                    retried = true;
                    continue;
                }
                return Err(self.timed(e).into());
            }
            match conn.read_line() {
                Ok(response) => {
                    if reused && !retried && closed_for_idleness(&response) {
                        // The server stopped reading before our line: it was not applied.
                        self.conn = None;
                        retried = true;
                        continue;
                    }
                    conn.answered += 1;
                    return Ok(response);
                }
                Err(e) => {
                    self.conn = None;
                    if is_disconnect(&e) && repeatable && !retried {
                        retried = true;
                        continue;
                    }
                    if is_disconnect(&e) {
                        return Err(Error::Io(io::Error::new(
                            e.kind(),
                            "the connection closed before the server answered; the request \
                             may or may not have been applied",
                        )));
                    }
                    return Err(self.timed(e).into());
                }
            }
        }
    }

    /// A read timeout surfaces as `WouldBlock`; say what it was.
    fn timed(&self, e: io::Error) -> io::Error {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            let after = self.timeouts.request.unwrap_or_default();
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no response within {after:?}"),
            )
        } else {
            e
        }
    }

    /// Sends a JSON-form request and decodes the body of a successful response.
    fn call<B: DeserializeOwned>(&mut self, request: &JsonRequest) -> Result<B, Error> {
        let repeatable = Op::parse(&request.op).is_some_and(is_read);
        let text = serde_json::to_string(request).map_err(|e| Error::Protocol(e.to_string()))?;
        let line = self.round_trip(&text, repeatable)?;
        parse_reply(&line)
    }

    /// A key's value, or `None` when there is no such key. Parsed into a tree: a number
    /// beyond `f64` precision is rounded and duplicate object keys collapse; use
    /// [`Client::get_raw`] for the exact stored text.
    ///
    /// # Errors
    /// An invalid key, or a connection or server failure.
    pub fn get(&mut self, key: &str) -> Result<Option<Value>, Error> {
        Ok(self.get_entry(key)?.map(|e| e.value))
    }

    /// A key's value and revision, or `None` when there is no such key.
    ///
    /// # Errors
    /// An invalid key, or a connection or server failure.
    pub fn get_entry(&mut self, key: &str) -> Result<Option<Entry>, Error> {
        match self.call::<wire::Got<String, Value>>(&JsonRequest::new(Op::Get).key(key)) {
            Ok(got) => Ok(Some(Entry {
                value: got.value,
                rev: got.rev,
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A key's value as the exact JSON text stored (no number rounded, no key reordered or
    /// dropped, any depth the server accepts), or `None` when there is no such key.
    ///
    /// # Errors
    /// An invalid key, or a connection or server failure.
    pub fn get_raw(&mut self, key: &str) -> Result<Option<RawEntry>, Error> {
        match self.call::<wire::Got<String, Box<RawValue>>>(&JsonRequest::new(Op::Get).key(key)) {
            Ok(got) => Ok(Some(RawEntry {
                value: got.value,
                rev: got.rev,
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every key matching `pattern` with its value as the exact JSON text stored.
    ///
    /// # Errors
    /// An invalid pattern, or a connection or server failure.
    pub fn get_matching_raw(
        &mut self,
        pattern: &str,
    ) -> Result<BTreeMap<String, Box<RawValue>>, Error> {
        let values: wire::Values<BTreeMap<String, Box<RawValue>>> =
            self.call(&JsonRequest::new(Op::Get).key(pattern))?;
        Ok(values.values)
    }

    /// Every key matching `pattern` (`*` or `prefix.*`) with its value.
    ///
    /// # Errors
    /// An invalid pattern, or a connection or server failure.
    pub fn get_matching(&mut self, pattern: &str) -> Result<BTreeMap<String, Value>, Error> {
        let values: wire::Values<BTreeMap<String, Value>> =
            self.call(&JsonRequest::new(Op::Get).key(pattern))?;
        Ok(values.values)
    }

    /// Stores `value` under `key`; returns the change's revision.
    ///
    /// # Errors
    /// An invalid key, a value over the server's limit, or a connection or server failure.
    pub fn put<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<u64, Error> {
        let value: Box<RawValue> =
            serde_json::value::to_raw_value(value).map_err(|e| Error::Protocol(e.to_string()))?;
        let mut request = JsonRequest::new(Op::Put).key(key);
        request.value = Some(&value);
        let rev: wire::Rev = self.call(&request)?;
        Ok(rev.rev)
    }

    /// Deletes `key`; returns the delete's revision, or `None` when there was no such key.
    ///
    /// # Errors
    /// An invalid key, or a connection or server failure.
    pub fn delete(&mut self, key: &str) -> Result<Option<u64>, Error> {
        match self.call::<wire::Rev>(&JsonRequest::new(Op::Del).key(key)) {
            Ok(rev) => Ok(Some(rev.rev)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes every key matching `pattern`; returns how many were deleted.
    ///
    /// # Errors
    /// An invalid pattern, or a connection or server failure.
    pub fn delete_matching(&mut self, pattern: &str) -> Result<u64, Error> {
        let deleted: wire::Deleted = self.call(&JsonRequest::new(Op::Del).key(pattern))?;
        Ok(deleted.deleted)
    }

    /// The keys covered by `target` (a key and what is below it, or a pattern); all keys for
    /// `None`. Sorted.
    ///
    /// # Errors
    /// An invalid target, or a connection or server failure.
    pub fn keys(&mut self, target: Option<&str>) -> Result<Vec<String>, Error> {
        let mut request = JsonRequest::new(Op::Keys);
        if let Some(target) = target {
            request = request.key(target);
        }
        let keys: wire::KeyList<Vec<String>> = self.call(&request)?;
        Ok(keys.keys)
    }

    /// Checks the server answers.
    ///
    /// # Errors
    /// A connection or server failure.
    pub fn health(&mut self) -> Result<(), Error> {
        self.call::<wire::Health<String>>(&JsonRequest::new(Op::Health))
            .map(drop)
    }

    /// The server's version.
    ///
    /// # Errors
    /// A connection or server failure.
    pub fn version(&mut self) -> Result<String, Error> {
        let version: wire::Version<String> = self.call(&JsonRequest::new(Op::Version))?;
        Ok(version.version)
    }

    /// The server's counters by name (`connections`, `subscribers`, `keys`, `rev`, `events`,
    /// `coalesced`).
    ///
    /// # Errors
    /// A connection or server failure.
    pub fn stats(&mut self) -> Result<BTreeMap<String, u64>, Error> {
        let stats = self.server_stats()?;
        Ok([
            ("connections", stats.connections as u64),
            ("subscribers", stats.subscribers as u64),
            ("keys", stats.keys as u64),
            ("rev", stats.rev),
            ("events", stats.events),
            ("coalesced", stats.coalesced),
            ("threads", stats.threads as u64),
            ("behind", stats.behind as u64),
            ("dropped_slow", stats.dropped_slow),
            ("not_durable", stats.not_durable),
        ]
        .into_iter()
        .map(|(name, n)| (name.to_owned(), n))
        .collect())
    }

    /// The server's counters and the names of its connections, as STATS sends them.
    ///
    /// # Errors
    /// A connection or server failure.
    pub fn server_stats(&mut self) -> Result<Stats, Error> {
        self.call(&JsonRequest::new(Op::Stats))
    }

    /// The subscribers a change to `key` would reach.
    ///
    /// # Errors
    /// An invalid key, or a connection or server failure.
    pub fn trace(&mut self, key: &str) -> Result<Vec<Subscriber>, Error> {
        let traced: wire::Traced<String, Vec<Subscriber>> =
            self.call(&JsonRequest::new(Op::Trace).key(key))?;
        Ok(traced.subscribers)
    }

    /// Names this connection (shown by STATS, TRACE and the server's log).
    ///
    /// # Errors
    /// An invalid name, or a connection or server failure.
    pub fn hello(&mut self, name: &str) -> Result<(), Error> {
        let mut request = JsonRequest::new(Op::Hello);
        request.name = Some(name.into());
        self.call::<wire::Done>(&request).map(drop)
    }

    /// Subscribes to `target` on a new, dedicated connection (this client stays usable).
    /// The subscription yields the initial values, a [`Event::Ready`] marker, then changes.
    ///
    /// # Errors
    /// An invalid target, or a connection or server failure.
    pub fn subscribe(&self, target: &str) -> Result<Subscription, Error> {
        Subscription::open(Conn::open(&self.path, self.timeouts)?, target)
    }

    /// Subscribes to `target` resuming after revision `from_rev` (`SUB ... FROM`): only what
    /// changed after it comes before [`Event::Ready`], or [`Event::Reset`] and the full
    /// snapshot when the server's history does not reach back. One connection, as
    /// [`Client::subscribe`]; [`Client::watch`] resumes on its own.
    ///
    /// # Errors
    /// An invalid target, or a connection or server failure.
    pub fn subscribe_from(&self, target: &str, from_rev: u64) -> Result<Subscription, Error> {
        Subscription::open_from(
            Conn::open(&self.path, self.timeouts)?,
            target,
            Some(from_rev),
        )
    }

    /// A subscription to `target` that survives the connection: when it is lost (the server
    /// restarts, its socket is replaced) it reconnects and resumes (see [`Watch`]). The first
    /// connection is made here, so a wrong path or target is an error now rather than a retry
    /// loop.
    ///
    /// # Errors
    /// An invalid target, or a connection or server failure on the first connection.
    pub fn watch(&self, target: &str) -> Result<Watch, Error> {
        Watch::open(
            &self.path,
            self.timeouts,
            target,
            Conn::open(&self.path, self.timeouts)?,
            None,
            None,
        )
    }

    /// [`Client::watch`] resuming after `from_rev`, a resume point kept from an earlier watch
    /// ([`Watch::resume_rev`], saved across a restart of this program, say): the first events
    /// are what changed after it (deletes included), or [`Event::Reset`] and the full snapshot.
    /// The watch does not know which keys the consumer already holds, so on that `Reset` the
    /// consumer itself drops every key the snapshot does not restate (the watch reports as
    /// deleted only the keys it delivered itself).
    ///
    /// # Errors
    /// An invalid target, or a connection or server failure on the first connection.
    pub fn watch_from(&self, target: &str, from_rev: u64) -> Result<Watch, Error> {
        Watch::open(
            &self.path,
            self.timeouts,
            target,
            Conn::open(&self.path, self.timeouts)?,
            Some(from_rev),
            None,
        )
    }

    /// [`Client::watch_from`] naming the history `from_rev` belongs to (the watch's
    /// [`Watch::resume_epoch`], kept with it): a server whose data directory was wiped or
    /// replaced since then answers with [`Event::Reset`] and the full snapshot, however far its
    /// revisions have gone. Without the epoch a resume cannot tell.
    ///
    /// # Errors
    /// An invalid target or epoch, or a connection or server failure on the first connection.
    pub fn watch_from_epoch(
        &self,
        target: &str,
        from_rev: u64,
        epoch: &str,
    ) -> Result<Watch, Error> {
        Watch::open(
            &self.path,
            self.timeouts,
            target,
            Conn::open(&self.path, self.timeouts)?,
            Some(from_rev),
            Some(epoch),
        )
    }

    /// [`Client::watch`] on this client's own connection (no idle request connection is left
    /// beside it).
    ///
    /// # Errors
    /// An invalid target, or a connection or server failure on the first connection.
    pub fn into_watch(mut self, target: &str) -> Result<Watch, Error> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => Conn::open(&self.path, self.timeouts)?,
        };
        Watch::open(&self.path, self.timeouts, target, conn, None, None)
    }

    /// Turns this client's connection into a subscription to `target`, so that no idle
    /// request connection is left beside it.
    ///
    /// # Errors
    /// An invalid target, or a connection or server failure.
    pub fn into_subscription(mut self, target: &str) -> Result<Subscription, Error> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => Conn::open(&self.path, self.timeouts)?,
        };
        Subscription::open(conn, target)
    }
}

/// Whether a request changes nothing, so sending it twice is harmless.
fn is_read(op: Op) -> bool {
    matches!(
        op,
        Op::Get | Op::Keys | Op::Trace | Op::Stats | Op::Health | Op::Version | Op::Help
    )
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::NotConnected
    )
}

/// Whether a response is the server's notice that it closed the connection for idleness
/// (sent instead of reading further, so the request that crossed it was never read).
fn closed_for_idleness(line: &str) -> bool {
    matches!(
        parse_reply::<wire::Done>(line),
        Err(Error::Server { code: Some(ErrorCode::Timeout), ref message, .. })
            if message.contains("idle timeout")
    )
}

/// Decodes a response line: the body of a success, [`Error::Server`] for a failure.
///
/// # Errors
/// A failure response, or a line that is not a response of the expected shape.
pub fn parse_reply<B: DeserializeOwned>(line: &str) -> Result<B, Error> {
    let protocol = |e: serde_json::Error| Error::Protocol(format!("{e}: {line:?}"));
    let status: wire::Status = serde_json::from_str(line).map_err(protocol)?;
    if status.ok {
        // The body is read from the line itself, not through `Reply`'s flattened field:
        // serde buffers a flattened field as a tree, which cannot hold a `RawValue` and
        // counts nesting against the recursion limit. Body types ignore `ok` and `id`.
        serde_json::from_str(line).map_err(protocol)
    } else {
        let reply: Reply<wire::Failure<String>, Value> =
            serde_json::from_str(line).map_err(protocol)?;
        Err(Error::Server {
            code: ErrorCode::from_wire(&reply.body.error),
            raw_code: reply.body.error,
            message: reply.body.message,
        })
    }
}

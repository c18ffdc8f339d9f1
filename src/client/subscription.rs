//! Reading events: parsing event lines ([`Event::parse`], [`RawEvent::parse`]), the
//! one-connection [`Subscription`], and the [`Interrupter`] that ends a blocking read.

use std::io;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::value::RawValue;

use super::{parse_reply, watch, Conn, Event, RawEvent};
use crate::error::Error;
use crate::wire::{self, JsonRequest, Op};

impl Event {
    /// Parses an event line. Response lines (`{"ok":true}` after `subscribe`/`unsubscribe`)
    /// give `Ok(None)`; error responses give [`Error::Server`].
    ///
    /// # Errors
    /// An error response, or a line that is neither an event nor a response.
    pub fn parse(line: &str) -> Result<Option<Event>, Error> {
        #[derive(serde::Deserialize)]
        struct Probe {
            ok: Option<bool>,
        }
        let probe: Probe =
            serde_json::from_str(line).map_err(|e| Error::Protocol(format!("{e}: {line:?}")))?;
        if probe.ok.is_some() {
            return parse_reply::<wire::Done>(line).map(|_| None);
        }
        serde_json::from_str(line)
            .map(Some)
            .map_err(|e| Error::Protocol(format!("not an event ({e}): {line:?}")))
    }
}

impl RawEvent {
    /// Parses an event line keeping its value as the server's JSON text. Response lines give
    /// `Ok(None)`; error responses give [`Error::Server`].
    ///
    /// (An internally tagged enum is read through a buffered tree, which cannot hold a
    /// `RawValue`; so the fields are read flat and the event assembled here.)
    ///
    /// # Errors
    /// An error response, or a line that is neither an event nor a response.
    pub fn parse(line: &str) -> Result<Option<RawEvent>, Error> {
        Ok(parse_raw_event(line)?.map(|(event, _)| event))
    }
}

/// Parses an event line as [`RawEvent::parse`] does, with the event's `skipped` count (0 when
/// absent): how many earlier changes of its key a put or del stands for.
///
/// # Errors
/// An error response, or a line that is neither an event nor a response.
pub fn parse_raw_event(line: &str) -> Result<Option<(RawEvent, u64)>, Error> {
    #[derive(serde::Deserialize)]
    struct Flat {
        ok: Option<bool>,
        event: Option<String>,
        key: Option<String>,
        value: Option<Box<RawValue>>,
        rev: Option<u64>,
        sub: Option<String>,
        count: Option<u64>,
        skipped: Option<u64>,
        epoch: Option<String>,
    }
    let bad = |why: &str| Error::Protocol(format!("not an event ({why}): {line:?}"));
    let flat: Flat =
        serde_json::from_str(line).map_err(|e| Error::Protocol(format!("{e}: {line:?}")))?;
    if flat.ok.is_some() {
        return parse_reply::<wire::Done>(line).map(|_| None);
    }
    let event = flat.event.as_deref().ok_or_else(|| bad("no event field"))?;
    let key = || flat.key.clone().ok_or_else(|| bad("no key"));
    let rev = flat.rev.ok_or_else(|| bad("no rev"));
    let skipped = flat.skipped.unwrap_or(0);
    Ok(Some((
        match event {
            "init" | "put" => {
                let key = key()?;
                let value = flat.value.ok_or_else(|| bad("no value"))?;
                let rev = rev?;
                if event == "init" {
                    wire::Event::Init { key, value, rev }
                } else {
                    wire::Event::Put { key, value, rev }
                }
            }
            "del" => wire::Event::Del {
                key: key()?,
                rev: rev?,
            },
            "ready" => wire::Event::Ready {
                sub: flat.sub.ok_or_else(|| bad("no sub"))?,
                count: flat.count.ok_or_else(|| bad("no count"))?,
                rev: flat.rev.unwrap_or(0),
                epoch: flat.epoch,
            },
            "reset" => wire::Event::Reset {
                sub: flat.sub.ok_or_else(|| bad("no sub"))?,
            },
            "shutdown" => wire::Event::Shutdown,
            other => return Err(bad(&format!("unknown event {other:?}"))),
        },
        skipped,
    )))
}

/// Sends a SUB (resuming after `from_rev` if given, in the history `epoch` if known) on `conn`
/// and reads its acknowledgement; then clears the read timeout: events may be minutes apart,
/// only the answer had a deadline.
pub(crate) fn subscribe_on(
    conn: &mut Conn,
    target: &str,
    from_rev: Option<u64>,
    epoch: Option<&str>,
) -> Result<(), Error> {
    let mut request = JsonRequest::new(Op::Sub).key(target);
    request.from_rev = from_rev;
    request.epoch = from_rev.and(epoch).map(std::borrow::Cow::Borrowed);
    let request = serde_json::to_string(&request).map_err(|e| Error::Protocol(e.to_string()))?;
    conn.send(&request)?;
    parse_reply::<wire::Done>(&conn.read_line()?)?;
    conn.reader.get_ref().set_read_timeout(None)?;
    Ok(())
}

/// A dedicated subscriber connection; iterate it for events. Ends after [`Event::Shutdown`] or
/// when the server closes the connection.
pub struct Subscription {
    conn: Conn,
}

/// Ends a [`Subscription`]'s blocking read from another thread (a signal handler's, say): the
/// subscription then ends as if the server had closed it.
pub struct Interrupter(pub(super) Interrupts);

pub(super) enum Interrupts {
    /// One connection: shutting it down ends its blocking read.
    Stream(UnixStream),
    /// A [`Watch`]: stops its reconnecting too.
    Watch(std::sync::Arc<watch::Stop>),
}

impl Interrupter {
    pub(super) fn stream(stream: UnixStream) -> Interrupter {
        Interrupter(Interrupts::Stream(stream))
    }

    pub fn interrupt(&self) {
        match &self.0 {
            Interrupts::Stream(stream) => {
                let _ = stream.shutdown(Shutdown::Both);
            }
            Interrupts::Watch(stop) => stop.stop(),
        }
    }
}

impl Subscription {
    pub(super) fn open(conn: Conn, target: &str) -> Result<Subscription, Error> {
        Subscription::open_from(conn, target, None)
    }

    pub(super) fn open_from(
        mut conn: Conn,
        target: &str,
        from_rev: Option<u64>,
    ) -> Result<Subscription, Error> {
        subscribe_on(&mut conn, target, from_rev, None)?;
        Ok(Subscription { conn })
    }

    /// Adds another subscription on this connection; its initial values and marker follow in
    /// the event stream.
    ///
    /// # Errors
    /// The connection failed (a server error arrives in the stream).
    pub fn subscribe(&mut self, target: &str) -> Result<(), Error> {
        self.send(JsonRequest::new(Op::Sub).key(target))
    }

    /// Drops a subscription of this connection.
    ///
    /// # Errors
    /// The connection failed (a server error arrives in the stream).
    pub fn unsubscribe(&mut self, target: &str) -> Result<(), Error> {
        self.send(JsonRequest::new(Op::Unsub).key(target))
    }

    fn send(&mut self, request: JsonRequest) -> Result<(), Error> {
        let line = serde_json::to_string(&request).map_err(|e| Error::Protocol(e.to_string()))?;
        Ok(self.conn.send(&line)?)
    }

    /// Waits at most `timeout` for each next line (`None`: forever); a read that times out
    /// fails with [`io::ErrorKind::WouldBlock`] or [`io::ErrorKind::TimedOut`].
    ///
    /// # Errors
    /// The socket refused the setting.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), Error> {
        Ok(self.conn.reader.get_ref().set_read_timeout(timeout)?)
    }

    /// A handle that ends this subscription from another thread.
    ///
    /// # Errors
    /// No descriptor was free to make it.
    pub fn interrupter(&self) -> Result<Interrupter, Error> {
        Ok(Interrupter::stream(self.conn.reader.get_ref().try_clone()?))
    }

    /// The next line from the server as is, or `None` when the connection is closed.
    ///
    /// # Errors
    /// The connection failed.
    pub fn next_line(&mut self) -> Result<Option<String>, Error> {
        match self.conn.read_line() {
            Ok(line) => Ok(Some(line)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl Iterator for Subscription {
    type Item = Result<Event, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let line = match self.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            };
            match Event::parse(&line) {
                Ok(Some(event)) => return Some(Ok(event)),
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

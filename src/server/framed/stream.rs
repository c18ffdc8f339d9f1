//! A framed subscription: the same mailbox, snapshot and delivery guarantees as a line
//! subscriber, with its lines turned into frames.
//!
//! The subscription's mailbox writes line-protocol lines (as for any subscriber) into one end
//! of an in-process socket pair; the connection thread — which, as for a line subscriber, is
//! also the mailbox's own sender (woken through its eventfd) — reads the other end and writes
//! each line to the client as a frame. So the coalescing, per-key order and snapshot atomicity are
//! the store's and mailbox's own, and a slow framed client backs up into its mailbox (which
//! then keeps the latest state per key) exactly like a slow line client. The connection thread
//! also watches the client's socket, so a client that goes away ends the subscription at once.
//!
//! `UNSUB` arrives on another connection and names the subscription by (client id, key):
//! [`Registry`] maps that pair to the subscribed connections.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::value;
use super::wire::Frame;
use crate::key::Target;
use crate::mailbox::{Item, Mailbox, Turn};
use crate::server::Shared;

/// The acknowledgement line queued before the snapshot: becomes `HELLO`.
const HELLO_LINE: &[u8] = b"{\"ok\":true}\n";

/// How many bytes of lines the connection thread reads from the pair at once.
const READ_CHUNK: usize = 64 * 1024;

/// Framed subscriptions by (client id, subscription), for `UNSUB`. Shared by every framed
/// connection; locked only to add, take or drop an entry (never across I/O).
#[derive(Default)]
pub struct Registry {
    subs: Mutex<HashMap<(String, Target), Vec<Subscribed>>>,
}

/// A connection subscribed under some (client id, key): its id and its mailbox.
type Subscribed = (u64, Arc<Mailbox>);

impl Registry {
    fn add(&self, client: &str, target: &Target, conn: u64, mailbox: &Arc<Mailbox>) {
        self.subs
            .lock()
            .entry((client.to_owned(), target.clone()))
            .or_default()
            .push((conn, mailbox.clone()));
    }

    /// Takes the connections subscribed as (client, target).
    fn take(&self, client: &str, target: &Target) -> Vec<Subscribed> {
        self.subs
            .lock()
            .remove(&(client.to_owned(), target.clone()))
            .unwrap_or_default()
    }

    fn forget(&self, client: &str, target: &Target, conn: u64) {
        let mut subs = self.subs.lock();
        let key = (client.to_owned(), target.clone());
        if let Some(conns) = subs.get_mut(&key) {
            conns.retain(|(c, _)| *c != conn);
            if conns.is_empty() {
                subs.remove(&key);
            }
        }
    }
}

/// Ends the subscriptions named (client, target); false when there were none. Each ended
/// stream gets `CLOSE <key>` after the events already queued for it, and stays open.
pub fn unsubscribe(shared: &Shared, client: &str, target: &Target) -> bool {
    let conns = shared.framed.take(client, target);
    for (conn, mailbox) in &conns {
        // No event is queued for it after this returns; the marker follows the last one.
        let _ = shared.store.notifier().remove(*conn, target);
        let mut line = Vec::new();
        let _ = serde_json::to_writer(
            &mut line,
            &UnsubLine {
                unsub: &target.to_string(),
            },
        );
        line.push(b'\n');
        shared
            .store
            .notifier()
            .push(mailbox, Item::Reply(line.into()));
        mailbox.kick();
    }
    !conns.is_empty()
}

#[derive(serde::Serialize, Deserialize)]
struct UnsubLine<'a> {
    unsub: &'a str,
}

/// Why a subscription could not start.
#[derive(Debug)]
pub enum SubscribeError {
    Io(io::Error),
    Limit,
}

impl std::fmt::Display for SubscribeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubscribeError::Io(e) => write!(f, "cannot start the subscription: {e}"),
            SubscribeError::Limit => f.write_str("subscription table refused the subscription"),
        }
    }
}

/// Serves a subscription on `client_stream` until the client goes away or the server stops.
///
/// # Errors
/// The subscription could not be set up (nothing is left registered).
pub fn serve(
    shared: &Arc<Shared>,
    conn: u64,
    client: &str,
    target: &Target,
    client_stream: &UnixStream,
) -> Result<(), SubscribeError> {
    let (ours, theirs) = UnixStream::pair().map_err(SubscribeError::Io)?;
    let mailbox = Mailbox::new(ours).map_err(SubscribeError::Io)?;
    let subscription = Subscription {
        shared,
        conn,
        client,
        target,
        mailbox: mailbox.clone(),
    };
    let name = display_name(client);
    let max = shared.limits.max_subscriptions;
    shared
        .store
        .subscribe(
            conn,
            &name,
            &mailbox,
            target,
            None,
            max,
            HELLO_LINE.to_vec(),
        )
        .map_err(|_| SubscribeError::Limit)?;
    shared.framed.add(client, target, conn, &mailbox);
    // A subscriber: shutdown tells it last, after the request connections finished.
    shared.mark_subscriber(conn);
    log::info!("conn {conn} (framed client {client}) subscribed to {target}");
    // A client that accepts nothing for --send-timeout is dropped, as a line subscriber is.
    let _ = client_stream.set_write_timeout(shared.limits.send_timeout);
    relay(
        conn,
        &mailbox,
        &theirs,
        client_stream,
        &shared.stopping,
        &|| shared.store.notifier().note_dropped_slow(),
    );
    drop(subscription);
    Ok(())
}

/// Unregisters the subscription however the connection ends.
struct Subscription<'a> {
    shared: &'a Shared,
    conn: u64,
    client: &'a str,
    target: &'a Target,
    mailbox: Arc<Mailbox>,
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        self.shared
            .framed
            .forget(self.client, self.target, self.conn);
        self.mailbox.close();
        // The connection ends here: nothing of it may stay in the table (its mailbox holds
        // the socket pair and an eventfd).
        self.shared.store.notifier().forget(self.conn);
    }
}

/// The name `TRACE` shows: the client id when it fits the name rules (it does for upstream's
/// clients), else a sanitized form, since names are written into JSON unescaped.
fn display_name(client: &str) -> String {
    let ok = |c: char| c.is_ascii_alphanumeric() || "_-.:@#".contains(c);
    if !client.is_empty() && client.len() <= 64 && client.chars().all(ok) {
        return client.to_owned();
    }
    let cleaned: String = client
        .chars()
        .map(|c| if ok(c) { c } else { '_' })
        .take(56)
        .collect();
    format!("framed:{cleaned}")
}

/// Moves lines from the mailbox's socket to the client as frames, until the client closes (a
/// half-close only once the snapshot is sent), either socket fails, or the server's `shutdown`
/// line arrives. Between reads it takes the
/// mailbox's sending turn (what publishers' kicks left behind), as a line subscriber's
/// connection thread does.
fn relay(
    conn: u64,
    mailbox: &Mailbox,
    lines: &UnixStream,
    client: &UnixStream,
    stopping: &AtomicBool,
    dropped_slow: &dyn Fn(),
) {
    let mut mailbox_side = lines;
    let mut client_side = client;
    let _ = client.set_read_timeout(None);
    let mut pending: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut chunk = vec![0u8; READ_CHUNK];
    // Once the server is stopping, it has shut down our read side: what looks like the client
    // leaving is that, and the queue is still relayed up to the shutdown line.
    let mut watch_client = true;
    // The snapshot (up to the mailbox's `ready` line) has been relayed. A client that closes
    // its write side before then still gets HELLO and the snapshot, as a line subscriber
    // does, and the stream ends after them.
    let mut snapshot_sent = false;
    let mut half_closed = false;
    loop {
        // Send what is pending into the pair; the pair's other end is read below, so a full
        // pair only waits for this loop.
        if mailbox.send() == Turn::Dead {
            return;
        }
        let (lines_ready, client_ready, woken) = {
            let client_events = if watch_client {
                PollFlags::POLLIN
            } else {
                PollFlags::empty()
            };
            let mut fds = [
                PollFd::new(lines.as_fd(), PollFlags::POLLIN),
                PollFd::new(client.as_fd(), client_events),
                PollFd::new(mailbox.wake_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::warn!("conn {conn}: poll failed: {e}");
                    return;
                }
            }
            let any = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            (any(&fds[0]), watch_client && any(&fds[1]), any(&fds[2]))
        };
        if woken {
            mailbox.woken();
        }
        if client_ready {
            // A framed subscriber sends nothing after SUB: anything it does send is ignored,
            // end of file or an error ends the subscription.
            match client_side.read(&mut chunk) {
                Ok(0) if stopping.load(Ordering::SeqCst) => watch_client = false,
                Ok(0) if snapshot_sent => return,
                Ok(0) => {
                    watch_client = false;
                    half_closed = true;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
        if lines_ready {
            let n = match mailbox_side.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            // The pair has room again for what the mailbox holds back.
            mailbox.writable();
            pending.extend_from_slice(&chunk[..n]);
            let mut out = Vec::new();
            let mut start = 0;
            let mut stop = false;
            while let Some(pos) = pending[start..].iter().position(|&b| b == b'\n') {
                let line = &pending[start..start + pos];
                start += pos + 1;
                match translate(line) {
                    Translated::Frame(frame) => out.extend_from_slice(&frame),
                    Translated::Nothing => {}
                    Translated::Ready => {
                        snapshot_sent = true;
                        if half_closed {
                            stop = true;
                            break;
                        }
                    }
                    Translated::TooLarge(key) => log::warn!(
                        "conn {conn}: the value of {key} does not fit in an 8 MiB frame; not sent to this framed subscriber"
                    ),
                    Translated::Stop => {
                        stop = true;
                        break;
                    }
                }
            }
            pending.drain(..start);
            if let Err(e) = client_side.write_all(&out) {
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    log::warn!("conn {conn}: framed subscriber dropped: it accepted nothing for the send timeout (--send-timeout)");
                    dropped_slow();
                }
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            if stop {
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            if pending.capacity() > 4 * READ_CHUNK && pending.len() < READ_CHUNK {
                pending.shrink_to(READ_CHUNK);
            }
        }
    }
}

/// A line of the line protocol as a subscriber's mailbox writes it (or our `unsub` marker).
#[derive(Deserialize)]
struct Line<'a> {
    #[serde(default)]
    ok: Option<bool>,
    #[serde(borrow, default)]
    event: Option<&'a str>,
    #[serde(borrow, default)]
    key: Option<&'a str>,
    #[serde(borrow, default)]
    value: Option<&'a RawValue>,
    #[serde(borrow, default)]
    unsub: Option<&'a str>,
}

enum Translated {
    Frame(Vec<u8>),
    Nothing,
    /// The snapshot is complete (the line protocol's `ready`; no frame in this protocol).
    Ready,
    TooLarge(String),
    Stop,
}

/// One mailbox line as the frame a framed subscriber gets.
fn translate(line: &[u8]) -> Translated {
    let parsed: Line = match serde_json::from_slice(line) {
        Ok(parsed) => parsed,
        Err(e) => {
            log::error!("framed subscriber: unexpected line from the mailbox ({e})");
            return Translated::Nothing;
        }
    };
    let frame = match (parsed.event, parsed.key, parsed.value) {
        (Some("init" | "put"), Some(key), Some(v)) => {
            let bytes = value::to_bytes(v.get());
            match Frame::message("UPDATE", Some(key), Some(&bytes)).finish() {
                Some(frame) => frame,
                None => return Translated::TooLarge(key.to_owned()),
            }
        }
        (Some("del"), Some(key), None) => Frame::message("CLOSE", Some(key), None)
            .finish()
            .unwrap_or_default(),
        (Some("shutdown"), _, _) => return Translated::Stop,
        (Some("ready"), _, _) => return Translated::Ready,
        (Some(_), _, _) => return Translated::Nothing,
        (None, _, _) => match (parsed.ok, parsed.unsub) {
            (Some(true), _) => Frame::message("HELLO", None, None)
                .finish()
                .unwrap_or_default(),
            (_, Some(target)) => Frame::message("CLOSE", Some(target), None)
                .finish()
                .unwrap_or_default(),
            _ => return Translated::Nothing,
        },
    };
    Translated::Frame(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(line: &str) -> Option<String> {
        match translate(line.as_bytes()) {
            Translated::Frame(f) => Some(String::from_utf8(f[4..].to_vec()).unwrap()),
            Translated::Nothing => None,
            Translated::Ready => Some("ready".into()),
            Translated::TooLarge(k) => Some(format!("too large {k}")),
            Translated::Stop => Some("stop".into()),
        }
    }

    #[test]
    fn mailbox_lines_become_upstream_messages() {
        assert_eq!(frame("{\"ok\":true}").as_deref(), Some("HELLO\n"));
        assert_eq!(
            frame(r#"{"event":"init","key":"a.b","value":{"on":true},"rev":5}"#).as_deref(),
            Some("UPDATE a.b eyJvbiI6dHJ1ZX0=\n")
        );
        assert_eq!(
            frame(r#"{"event":"put","key":"a","value":"hi","rev":6}"#).as_deref(),
            Some("UPDATE a aGk=\n")
        );
        assert_eq!(
            frame(r#"{"event":"del","key":"a","rev":7}"#).as_deref(),
            Some("CLOSE a\n")
        );
        assert_eq!(
            frame(r#"{"event":"ready","sub":"a","count":2}"#).as_deref(),
            Some("ready")
        );
        assert_eq!(frame(r#"{"unsub":"a.b"}"#).as_deref(), Some("CLOSE a.b\n"));
        assert_eq!(frame(r#"{"event":"shutdown"}"#).as_deref(), Some("stop"));
        assert_eq!(frame("not json"), None);
    }

    #[test]
    fn display_names_fit_the_name_rules() {
        assert_eq!(display_name("rust-nkv-client-1234"), "rust-nkv-client-1234");
        assert_eq!(display_name("a\"b c"), "framed:a_b_c");
    }
}

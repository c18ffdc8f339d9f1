//! One client connection: read a line, parse it, dispatch it with one `match`, answer.
//!
//! A connection starts in request mode, where responses are batched into one `write` per burst
//! of pipelined requests. Its first `SUB` turns it into a subscriber connection: from then on
//! its responses travel through the mailbox with its events, so they stay in order, and the
//! same thread sends them (see [`Connection::serve_subscriber`]): it polls the socket and the
//! mailbox's wake-up descriptor, reads a request only when the mailbox can take its reply, and
//! drops the subscriber when its socket accepts nothing for `--send-timeout`.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::error::{ErrorCode, WriteError};
use crate::key::{Key, Target};
use crate::mailbox::{send_some, Item, Kicks, Mailbox, Turn};
use crate::notify::SubError;
use crate::protocol::{parse_request, Envelope, Request, Response, Stats};
use crate::server::accept::Leadership;
use crate::server::lines::{Line, LineReader};
use crate::server::spin::SpinWait;
use crate::server::{Limits, Shared, SHUTDOWN_STALL};
use crate::store::{DelOptions, PutOptions};

/// Batched responses are written once they reach this size; a large reply is written in parts
/// of this size.
const FLUSH_AT: usize = 64 * 1024;

/// Buffers keep at most this much capacity between uses (a large value passes through once).
const KEEP_CAPACITY: usize = 64 * 1024;

/// What to do after a request.
enum Reply {
    Send(Response),
    /// Send, then close the connection.
    SendAndClose(Response),
    /// The response is already queued (a `SUB`'s acknowledgement precedes its snapshot).
    Queued,
}

pub struct Connection<'a> {
    shared: &'a Arc<Shared>,
    id: u64,
    name: String,
    /// Shared with the line reader and the connection table (one descriptor).
    stream: Arc<UnixStream>,
    /// Set while this thread is also the one accepting connections (see `accept`): it is given
    /// up before anything that may wait on this client.
    lead: Option<&'a Leadership<'a>>,
    /// Responses not yet written (request mode).
    out: Vec<u8>,
    /// Set once the connection has subscribed.
    mailbox: Option<Arc<Mailbox>>,
    /// The subscriptions were ended and the mailbox closed (the connection is finishing).
    unsubscribed: bool,
    /// Subscribers given events by this connection's changes, kicked before this connection
    /// waits on its own client (see [`write_out`]).
    kicks: Kicks,
    requests: u64,
    /// Keys this connection put as session keys (some may have been taken over since): when
    /// the connection ends, those it still owns are deleted (see `Drop`).
    sessions: Vec<Key>,
}

impl<'a> Connection<'a> {
    pub fn new(
        shared: &'a Arc<Shared>,
        id: u64,
        name: String,
        stream: Arc<UnixStream>,
        lead: Option<&'a Leadership<'a>>,
    ) -> Connection<'a> {
        Connection {
            shared,
            id,
            name,
            stream,
            lead,
            out: Vec::new(),
            mailbox: None,
            unsubscribed: false,
            kicks: Kicks::default(),
            requests: 0,
            sessions: Vec::new(),
        }
    }

    /// Serves the connection until the client leaves, quits, or the server stops.
    pub fn serve(&mut self) {
        let limits = &self.shared.limits;
        let started = Instant::now();
        // The framed protocol of the system nkv replaces shares the socket (server/framed/).
        if crate::server::framed::serve_unless_line(
            self.shared,
            self.id,
            &self.stream,
            started,
            self.lead,
        ) {
            return;
        }
        let mut reader =
            LineReader::new(self.stream.clone(), limits.max_line(), limits.idle_timeout)
                .with_spin(SpinWait::new(self.shared.spin.clone()));
        loop {
            self.lead_step(&mut reader);
            let close = self.read_request(&mut reader, limits);
            if self.mailbox.is_some() {
                self.give_up_lead();
                if !close {
                    self.serve_subscriber(&mut reader, limits);
                }
                break;
            }
            // Batch responses to pipelined requests into one write, but never hold more than
            // FLUSH_AT of them: a client that sends without reading must not grow our memory.
            let batch_done = !reader.has_buffered_line() || self.out.len() >= FLUSH_AT;
            if close || (batch_done && !self.flush()) {
                break;
            }
        }
        self.finish();
    }

    /// While this thread also accepts: waits (watching the listener too) until the next
    /// [`read_request`](Self::read_request) cannot block — the first request is whole, or the
    /// client closed after it — and otherwise gives accepting up. So the accepting thread runs
    /// at most one request and never waits on a client.
    fn lead_step(&mut self, reader: &mut LineReader) {
        let Some(lead) = self.lead.filter(|lead| lead.held()) else {
            return;
        };
        // The first request's bytes are most likely there already (detection saw its start).
        let mut filled = self.requests > 0;
        loop {
            if self.requests == 0 && reader.is_ready() || reader.is_finished() {
                return;
            }
            if !filled {
                filled = true;
                if reader.fill().is_err() {
                    lead.give_up();
                    return;
                }
                continue;
            }
            if self.requests > 0 && reader.has_pending() {
                lead.give_up();
                return;
            }
            let timeout = reader.idle_left().map_or(PollTimeout::NONE, poll_timeout);
            if !lead.wait_readable(&self.stream, timeout) {
                return;
            }
            if reader.fill().is_err() {
                lead.give_up();
                return;
            }
        }
    }

    fn give_up_lead(&self) {
        if let Some(lead) = self.lead {
            lead.give_up();
        }
    }

    /// Reads and runs one request; returns whether the connection should close afterwards.
    fn read_request(&mut self, reader: &mut LineReader, limits: &Limits) -> bool {
        let line = match reader.next_line() {
            Ok(line) => line,
            Err(e) => {
                log::debug!("conn {}: read failed: {e}", self.id);
                return true;
            }
        };
        match line {
            Line::Complete(bytes) => {
                self.requests += 1;
                match parse_request(bytes, limits.max_value_bytes) {
                    Ok(envelope) => self.dispatch(envelope),
                    Err(err) => {
                        log::info!("conn {}: {}: {}", self.id, err.code, err.message);
                        let (response, id) = err.into_response();
                        self.respond(&response, id.as_deref());
                        false
                    }
                }
            }
            Line::Eof => true,
            Line::Unterminated => {
                self.requests += 1;
                let message = "line not terminated: the connection ended before its '\\n'; nothing was executed";
                log::info!("conn {}: bad_request: line not terminated", self.id);
                self.respond(&Response::error(ErrorCode::BadRequest, message), None);
                true
            }
            Line::TooLong => {
                let message = format!(
                    "line longer than {} bytes; closing the connection (--max-value-bytes)",
                    limits.max_line()
                );
                log::info!("conn {}: too_large: {message}", self.id);
                self.respond(&Response::error(ErrorCode::TooLarge, message), None);
                true
            }
            Line::TimedOut => {
                let message = "no complete line within the idle timeout; closing the connection (--idle-timeout)";
                log::info!("conn {}: timeout", self.id);
                self.respond(&Response::error(ErrorCode::Timeout, message), None);
                true
            }
        }
    }

    /// The subscriber connection's loop: one thread reads its requests and sends its mailbox.
    ///
    /// Each round: run the requests already buffered while the mailbox accepts them; send what
    /// is pending; then poll for a request (only while the mailbox accepts one — otherwise the
    /// client is throttled: we stop reading it), for the socket to take more (only when it was
    /// full), and for the wake-up a publisher rings when it leaves work behind. Ends when the
    /// mailbox is closed and sent (`QUIT`, end of file, `shutdown`) or dead (broken socket,
    /// `--send-timeout`).
    fn serve_subscriber(&mut self, reader: &mut LineReader, limits: &Limits) {
        let Some(mailbox) = self.mailbox.clone() else {
            return;
        };
        let mut ending = false;
        loop {
            while !ending && mailbox.status().accepts_requests && reader.is_ready() {
                ending = self.read_request(reader, limits);
            }
            if ending {
                self.end_subscriptions();
                mailbox.close();
            }
            reader.release();
            let turn = mailbox.send();
            let status = mailbox.status();
            if status.finished {
                break;
            }
            let mut timeout = PollTimeout::NONE;
            // While stopping, a subscriber that accepts nothing for a second is not waited for.
            let stopping = self.shared.stopping.load(Ordering::Relaxed);
            let send_timeout = if stopping {
                Some(
                    limits
                        .send_timeout
                        .map_or(SHUTDOWN_STALL, |t| t.min(SHUTDOWN_STALL)),
                )
            } else {
                limits.send_timeout
            };
            if let (Some(limit), Some(since)) = (send_timeout, status.stalled_since) {
                let waited = since.elapsed();
                if waited >= limit {
                    log::warn!(
                        "conn {} ({}): dropped: its socket accepted nothing for {:.1}s with events pending ({})",
                        self.id,
                        self.name,
                        waited.as_secs_f64(),
                        if stopping { "server stopping" } else { "--send-timeout" }
                    );
                    self.shared.store.notifier().note_dropped_slow();
                    mailbox.die();
                    break;
                }
                timeout = poll_timeout(limit - waited);
            }
            let want_read = !ending && status.accepts_requests;
            if want_read && reader.is_ready() {
                // Sending made room for a request that is already buffered.
                continue;
            }
            // A partial request line is bounded by --idle-timeout here, not by a blocking read.
            if let Some(left) = reader.idle_left().filter(|_| want_read) {
                let left = poll_timeout(left);
                if timeout == PollTimeout::NONE || left < timeout {
                    timeout = left;
                }
            }
            let mut events = PollFlags::empty();
            if want_read {
                events |= PollFlags::POLLIN;
            }
            if status.blocked || turn == Turn::Blocked {
                events |= PollFlags::POLLOUT;
            }
            let (socket, wake) = {
                let mut fds = [
                    PollFd::new(self.stream.as_fd(), events),
                    PollFd::new(mailbox.wake_fd(), PollFlags::POLLIN),
                ];
                let polled = poll(&mut fds, timeout);
                self.shared.spin.woke();
                match polled {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        log::error!("conn {}: poll failed: {e}", self.id);
                        break;
                    }
                }
                (
                    fds[0].revents().unwrap_or(PollFlags::empty()),
                    fds[1].revents().unwrap_or(PollFlags::empty()),
                )
            };
            if wake.contains(PollFlags::POLLIN) {
                mailbox.woken();
            }
            let hangup = PollFlags::POLLHUP | PollFlags::POLLERR;
            if socket.intersects(PollFlags::POLLOUT | hangup) {
                mailbox.writable();
            }
            if want_read && socket.intersects(PollFlags::POLLIN | hangup) {
                // Never a blocking read: what is there is buffered, and only complete lines run
                // (at the top of the loop), so this thread keeps sending whatever the client
                // holds back.
                if let Err(e) = reader.fill() {
                    log::debug!("conn {}: read failed: {e}", self.id);
                    ending = true;
                }
            }
        }
    }

    /// Ends this connection's subscriptions: no more events are queued for it. The caller then
    /// queues its last reply (if any) and closes the mailbox; once that is sent, the connection
    /// ends.
    fn end_subscriptions(&mut self) {
        if !self.unsubscribed {
            self.unsubscribed = true;
            self.shared.store.notifier().unregister(self.id);
        }
    }

    /// Runs one request; returns whether the connection should close afterwards.
    fn dispatch(&mut self, envelope: Envelope) -> bool {
        let Envelope { request, id } = envelope;
        let id = id.as_deref();
        let summary = log::log_enabled!(log::Level::Debug).then(|| request.summary());
        if !request.is_quick() {
            // A request that may take long runs only once another thread accepts.
            self.give_up_lead();
        }
        let reply = self.handle(request, id);
        if let Some(summary) = summary {
            let outcome = match &reply {
                Reply::Send(r) | Reply::SendAndClose(r) => r.outcome(),
                Reply::Queued => "ok",
            };
            log::debug!("conn {}: {summary}: {outcome}", self.id);
        }
        match reply {
            Reply::Send(response) => {
                self.respond(&response, id);
                false
            }
            Reply::SendAndClose(response) => {
                self.respond(&response, id);
                true
            }
            Reply::Queued => false,
        }
    }

    fn handle(&mut self, request: Request, id: Option<&str>) -> Reply {
        let store = &self.shared.store;
        if self.mailbox.is_some()
            && !matches!(
                request,
                Request::Sub(_)
                    | Request::SubFrom(..)
                    | Request::Unsub(_)
                    | Request::Hello(_)
                    | Request::Health
                    | Request::Quit
            )
        {
            return Reply::Send(Response::error(
                ErrorCode::WrongMode,
                "this is a subscriber connection: only SUB, UNSUB, HELLO, HEALTH and QUIT are accepted; use another connection for other requests",
            ));
        }
        let response = match request {
            Request::Put {
                key,
                value,
                if_rev,
                session,
            } => {
                let options = PutOptions {
                    if_rev,
                    session: session.then_some(self.id),
                };
                if session && !self.sessions.contains(&key) {
                    self.sessions.push(key.clone());
                }
                match store.put_with(key, value, options, &mut self.kicks) {
                    Ok(rev) => Response::Rev(rev),
                    Err(e) => self.write_failed(e),
                }
            }
            Request::Get(Target::Key(key)) => match store.get_with_class(&key) {
                Some((value, rev, class)) => Response::Value {
                    key,
                    value,
                    rev,
                    class,
                },
                None => not_found(&key),
            },
            Request::Get(Target::Pattern(pattern)) => {
                Response::Values(store.get_matching(&pattern))
            }
            Request::Del(Target::Key(key)) => match store.delete(&key, &mut self.kicks) {
                Ok(Some(rev)) => Response::Rev(rev),
                Ok(None) => not_found(&key),
                Err(e) => self.write_failed(e),
            },
            Request::DelIf { key, rev } => {
                let options = DelOptions {
                    if_rev: Some(rev),
                    only_owner: None,
                };
                match store.delete_with(&key, options, &mut self.kicks) {
                    Ok(Some(rev)) => Response::Rev(rev),
                    Ok(None) => not_found(&key),
                    Err(e) => self.write_failed(e),
                }
            }
            Request::Del(Target::Pattern(pattern)) => {
                match store.delete_matching(&pattern, &mut self.kicks) {
                    Ok(n) => Response::Deleted(n),
                    Err(e) => self.write_failed(e),
                }
            }
            Request::Keys(target) => Response::Keys(store.keys(target.as_ref())),
            Request::Sub(target) => return self.subscribe(&target, None, id),
            Request::SubFrom(target, from) => return self.subscribe(&target, Some(from), id),
            Request::Unsub(target) => match store.notifier().remove(self.id, &target) {
                Ok(()) => Response::Ok,
                Err(_) => Response::error(
                    ErrorCode::NotFound,
                    format!("this connection has no subscription {target}"),
                ),
            },
            Request::Hello(name) => {
                log::info!("conn {} is now named {name}", self.id);
                store.notifier().rename(self.id, &name);
                self.shared.set_name(self.id, &name);
                self.name = name;
                Response::Ok
            }
            Request::Trace(key) => {
                let subscribers = store.notifier().trace(&key);
                Response::Trace(key, subscribers)
            }
            Request::Stats => Response::Stats(Stats {
                connections: self.shared.connection_count(),
                subscribers: store.notifier().subscriber_count(),
                keys: store.len(),
                rev: store.rev(),
                events: store.notifier().events(),
                coalesced: store.notifier().coalesced(),
                not_durable: store.not_durable(),
                threads: self.shared.connection_count(),
                behind: store.notifier().behind(),
                dropped_slow: store.notifier().dropped_slow(),
                names: self.shared.names(),
                classes: store.class_counts(),
                sessions: store.class_counts().sessions,
                tombstones: store.history_stats().0,
                horizon: store.history_stats().1,
                lag: store.notifier().all(),
            }),
            Request::Health => Response::Health,
            Request::Version => Response::Version,
            Request::Help => Response::Help,
            Request::Quit => {
                // No event may follow the acknowledgement: leave the table first.
                if self.mailbox.is_some() {
                    self.end_subscriptions();
                }
                return Reply::SendAndClose(Response::Ok);
            }
        };
        Reply::Send(response)
    }

    fn subscribe(
        &mut self,
        target: &Target,
        from: Option<crate::protocol::Resume>,
        id: Option<&str>,
    ) -> Reply {
        let mailbox = match &self.mailbox {
            Some(mailbox) => mailbox.clone(),
            None => match self.become_subscriber() {
                Some(mailbox) => mailbox,
                None => {
                    return Reply::Send(Response::error(
                        ErrorCode::Internal,
                        "cannot set up the subscriber's mailbox (out of descriptors?)",
                    ))
                }
            },
        };
        let mut ack = Vec::new();
        Response::Ok.write(id, &mut ack);
        let store = &self.shared.store;
        let max = self.shared.limits.max_subscriptions;
        match store.subscribe(self.id, &self.name, &mailbox, target, from, max, ack) {
            Ok(count) => {
                self.shared.mark_subscriber(self.id);
                log::info!(
                    "conn {} ({}) subscribed to {target}{}: {count} events before ready",
                    self.id,
                    self.name,
                    from.map(|r| format!(" from rev {r}")).unwrap_or_default()
                );
                Reply::Queued
            }
            Err(SubError::Limit(max)) => Reply::Send(Response::error(
                ErrorCode::WrongMode,
                format!("this connection already has {max} subscriptions (--max-subscriptions)"),
            )),
            Err(SubError::Stopping) => Reply::SendAndClose(Response::error(
                ErrorCode::Internal,
                "the server is stopping",
            )),
            Err(SubError::NotSubscribed) => Reply::Send(Response::error(
                ErrorCode::Internal,
                "subscription table is inconsistent",
            )),
        }
    }

    /// Switches to subscriber mode: pending responses go out first, then the mailbox carries
    /// everything this connection sends.
    fn become_subscriber(&mut self) -> Option<Arc<Mailbox>> {
        if !self.flush() {
            return None;
        }
        let stream = self.stream.try_clone().ok()?;
        match Mailbox::new(stream) {
            Ok(mailbox) => {
                self.mailbox = Some(mailbox.clone());
                Some(mailbox)
            }
            Err(e) => {
                log::error!("conn {}: cannot create a mailbox: {e}", self.id);
                None
            }
        }
    }

    /// A put or delete that failed (`internal`, `no_space`, `conflict`) or is only not
    /// durable.
    fn write_failed(&self, err: WriteError) -> Response {
        if let WriteError::Conflict { current, .. } = err {
            log::debug!("conn {}: conflict: {err}", self.id);
            return Response::Conflict(err.to_string(), current);
        }
        log::error!("conn {}: {err}", self.id);
        Response::error(err.code(), err)
    }

    fn respond(&mut self, response: &Response, id: Option<&str>) {
        match &self.mailbox {
            Some(mailbox) => {
                let mut line = Vec::new();
                response.write(id, &mut line);
                self.shared
                    .store
                    .notifier()
                    .push(mailbox, Item::Reply(line.into()));
            }
            None => {
                let Connection {
                    stream,
                    out,
                    kicks,
                    lead,
                    ..
                } = self;
                let mut flush = |buf: &mut Vec<u8>| write_out(stream, kicks, buf, *lead);
                if let Err(e) = response.write_in_parts(id, out, FLUSH_AT, &mut flush) {
                    log::debug!("conn {}: write failed: {e}", self.id);
                    // The next flush fails too and ends the connection.
                    let _ = self.stream.shutdown(Shutdown::Both);
                }
            }
        }
    }

    /// Writes the batched responses and sends the events our changes queued for subscribers,
    /// before waiting on our own client. False when the client is gone.
    fn flush(&mut self) -> bool {
        let result = write_out(&self.stream, &mut self.kicks, &mut self.out, self.lead);
        self.kicks.run();
        // shrink_to, not a new Vec: glibc raises its mmap threshold when a large block is
        // freed, and would then keep later large buffers in the heap for good.
        self.out.shrink_to(KEEP_CAPACITY);
        if let Err(e) = result {
            log::debug!("conn {}: write failed: {e}", self.id);
            return false;
        }
        true
    }

    fn finish(&mut self) {
        if self.mailbox.is_none() {
            self.flush();
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        log::debug!(
            "conn {} ({}) closed after {} requests",
            self.id,
            self.name,
            self.requests
        );
    }
}

impl Drop for Connection<'_> {
    /// Ends the subscriptions however the connection ends, a panic included: nothing is queued
    /// for it any more, and nobody is left to send what was.
    fn drop(&mut self) {
        if let Some(mailbox) = self.mailbox.take() {
            self.shared.store.notifier().forget(self.id);
            mailbox.die();
        }
        if !self.sessions.is_empty() {
            let sessions = std::mem::take(&mut self.sessions);
            self.shared
                .store
                .end_session(self.id, &sessions, &mut self.kicks);
            self.kicks.run();
        }
    }
}

/// Writes `out` to the client. What the socket takes at once goes first; before waiting for
/// the client to take the rest, the subscribers our changes gave events to are kicked: a
/// writer that does not read its replies never withholds its changes from them, and the
/// accepting thread gives accepting up.
fn write_out(
    stream: &UnixStream,
    kicks: &mut Kicks,
    out: &mut Vec<u8>,
    lead: Option<&Leadership<'_>>,
) -> io::Result<()> {
    let mut sent = 0;
    while sent < out.len() {
        match send_some(stream, &out[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                out.clear();
                return Err(e);
            }
        }
    }
    if sent < out.len() {
        if let Some(lead) = lead {
            lead.give_up();
        }
        kicks.run();
        let mut stream = stream;
        let result = stream.write_all(&out[sent..]);
        out.clear();
        return result;
    }
    out.clear();
    Ok(())
}

fn poll_timeout(left: Duration) -> PollTimeout {
    let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

fn not_found(key: &crate::key::Key) -> Response {
    Response::error(ErrorCode::NotFound, format!("no key {key}"))
}

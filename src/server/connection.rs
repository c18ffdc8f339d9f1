//! One client connection: read a line, parse it, dispatch it with one `match`, answer.
//!
//! A connection starts in request mode, where responses are batched into one `write` per burst
//! of pipelined requests. Its first `SUB` turns it into a subscriber connection: from then on a
//! writer thread owns the sending side, and responses travel through the same mailbox as the
//! events so they stay in order with them.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;

use crate::error::ErrorCode;
use crate::key::Target;
use crate::mailbox::{mailbox, Kicks, Mailbox, Outgoing, Writer};
use crate::notify::SubError;
use crate::protocol::{parse_request, Envelope, Request, Response, Stats};
use crate::server::lines::{Line, LineReader};
use crate::server::{Shared, WriterGuard};

/// Batched responses are written once they reach this size.
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
    stream: UnixStream,
    /// Responses not yet written (request mode).
    out: Vec<u8>,
    /// Set once the connection has subscribed.
    mailbox: Option<Arc<Mailbox>>,
    /// Subscribers given events by this connection's changes, kicked after the responses are
    /// written (see [`Connection::flush`]).
    kicks: Kicks,
    requests: u64,
}

impl<'a> Connection<'a> {
    pub fn new(
        shared: &'a Arc<Shared>,
        id: u64,
        name: String,
        stream: UnixStream,
    ) -> Connection<'a> {
        Connection {
            shared,
            id,
            name,
            stream,
            out: Vec::with_capacity(4096),
            mailbox: None,
            kicks: Kicks::default(),
            requests: 0,
        }
    }

    /// Serves the connection until the client leaves, quits, or the server stops.
    pub fn serve(&mut self) {
        let limits = &self.shared.limits;
        let reader_stream = match self.stream.try_clone() {
            Ok(s) => s,
            Err(e) => {
                log::error!("conn {}: cannot clone socket: {e}", self.id);
                return;
            }
        };
        let mut reader = LineReader::new(reader_stream, limits.max_line(), limits.idle_timeout);
        loop {
            let line = match reader.next_line() {
                Ok(line) => line,
                Err(e) => {
                    log::debug!("conn {}: read failed: {e}", self.id);
                    break;
                }
            };
            let close = match line {
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
                Line::Eof => break,
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
            };
            // Batch responses to pipelined requests into one write, but never hold more than
            // FLUSH_AT of them: a client that sends without reading must not grow our memory.
            let batch_done = !reader.has_buffered_line() || self.out.len() >= FLUSH_AT;
            if close || (batch_done && !self.flush()) {
                break;
            }
        }
        self.finish();
    }

    /// Runs one request; returns whether the connection should close afterwards.
    fn dispatch(&mut self, envelope: Envelope) -> bool {
        let Envelope { request, id } = envelope;
        let id = id.as_deref();
        let summary = log::log_enabled!(log::Level::Debug).then(|| request.summary());
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
            Request::Put { key, value } => match store.put(key, value, &mut self.kicks) {
                Ok(rev) => Response::Rev(rev),
                Err(e) => self.internal(e),
            },
            Request::Get(Target::Key(key)) => match store.get(&key) {
                Some((value, rev)) => Response::Value { key, value, rev },
                None => not_found(&key),
            },
            Request::Get(Target::Pattern(pattern)) => {
                Response::Values(store.get_matching(&pattern))
            }
            Request::Del(Target::Key(key)) => match store.delete(&key, &mut self.kicks) {
                Ok(Some(rev)) => Response::Rev(rev),
                Ok(None) => not_found(&key),
                Err(e) => self.internal(e),
            },
            Request::Del(Target::Pattern(pattern)) => {
                match store.delete_matching(&pattern, &mut self.kicks) {
                    Ok(n) => Response::Deleted(n),
                    Err(e) => self.internal(e),
                }
            }
            Request::Keys(target) => Response::Keys(store.keys(target.as_ref())),
            Request::Sub(target) => return self.subscribe(&target, id),
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
                names: self.shared.names(),
            }),
            Request::Health => Response::Health,
            Request::Version => Response::Version,
            Request::Help => Response::Help,
            Request::Quit => return Reply::SendAndClose(Response::Ok),
        };
        Reply::Send(response)
    }

    fn subscribe(&mut self, target: &Target, id: Option<&str>) -> Reply {
        let mailbox = match &self.mailbox {
            Some(mailbox) => mailbox.clone(),
            None => match self.start_writer() {
                Some(mailbox) => mailbox,
                None => {
                    return Reply::Send(Response::error(
                        ErrorCode::Internal,
                        "cannot start the subscriber's writer",
                    ))
                }
            },
        };
        // A new snapshot waits until this subscriber has read what is already pending.
        mailbox.wait_caught_up();
        let mut ack = Vec::new();
        Response::Ok.write(id, &mut ack);
        let store = &self.shared.store;
        let max = self.shared.limits.max_subscriptions;
        match store.subscribe(self.id, &self.name, &mailbox, target, max, ack) {
            Ok(count) => {
                log::info!(
                    "conn {} ({}) subscribed to {target}: {count} initial values",
                    self.id,
                    self.name
                );
                Reply::Queued
            }
            Err(SubError::Limit(max)) => Reply::Send(Response::error(
                ErrorCode::WrongMode,
                format!("this connection already has {max} subscriptions (--max-subscriptions)"),
            )),
            Err(SubError::NotSubscribed) => Reply::Send(Response::error(
                ErrorCode::Internal,
                "subscription table is inconsistent",
            )),
        }
    }

    /// Switches to subscriber mode: pending responses go out first, then a writer thread owns
    /// the sending side.
    fn start_writer(&mut self) -> Option<Arc<Mailbox>> {
        if !self.flush() {
            return None;
        }
        let stream = self.stream.try_clone().ok()?;
        let (mailbox, writer) = mailbox(stream);
        let id = self.id;
        let guard = self.shared.writer_running();
        let spawned = thread::Builder::new()
            .name(format!("nkv-sub-{id}"))
            .stack_size(crate::server::THREAD_STACK)
            .spawn(move || run_writer(id, writer, guard));
        match spawned {
            Ok(_) => {
                self.mailbox = Some(mailbox.clone());
                Some(mailbox)
            }
            Err(e) => {
                log::error!("conn {id}: cannot start writer thread: {e}");
                None
            }
        }
    }

    fn internal(&self, err: impl std::fmt::Display) -> Response {
        log::error!("conn {}: {err}", self.id);
        Response::error(ErrorCode::Internal, err)
    }

    fn respond(&mut self, response: &Response, id: Option<&str>) {
        match &self.mailbox {
            Some(mailbox) => {
                let mut line = Vec::new();
                response.write(id, &mut line);
                self.shared
                    .store
                    .notifier()
                    .push(mailbox, Outgoing::Line(line));
                mailbox.kick();
            }
            None => response.write(id, &mut self.out),
        }
    }

    /// Writes the batched responses, then sends the events our changes queued for subscribers:
    /// a writer's acknowledgement never waits for the fan-out. False when the client is gone.
    fn flush(&mut self) -> bool {
        let mut result = Ok(());
        if !self.out.is_empty() {
            result = self.stream.write_all(&self.out);
            self.out.clear();
            self.out.shrink_to(KEEP_CAPACITY);
        }
        self.kicks.run();
        if let Err(e) = result {
            log::debug!("conn {}: write failed: {e}", self.id);
            return false;
        }
        true
    }

    fn finish(&mut self) {
        self.flush();
        if self.mailbox.is_none() {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
        log::debug!(
            "conn {} ({}) closed after {} requests",
            self.id,
            self.name,
            self.requests
        );
    }
}

impl Drop for Connection<'_> {
    /// Ends the subscriptions however the connection ends, a panic included: the writer sends
    /// what is queued, then closes the socket.
    fn drop(&mut self) {
        if let Some(mailbox) = self.mailbox.take() {
            self.shared.store.notifier().unregister(self.id);
            mailbox.close();
        }
    }
}

fn not_found(key: &crate::key::Key) -> Response {
    Response::error(ErrorCode::NotFound, format!("no key {key}"))
}

/// A subscriber connection's writer thread. `_running` keeps shutdown waiting until the last
/// queued line is written.
fn run_writer(id: u64, writer: Writer, _running: WriterGuard) {
    writer.run();
    log::debug!("conn {id}: subscriber writer stopped");
}

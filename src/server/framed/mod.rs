//! The framed front end: the protocol of the nkv this project replaces (0.1.1), served on the
//! same socket as the line protocol, onto the same store, with this project's guarantees.
//!
//! - [`detect`]: whether a new connection speaks frames (its first 4 bytes hold a NUL);
//! - [`read`]: the request frame, bounded by the idle timeout as a whole;
//! - [`wire`]: frames, requests, replies and stream messages;
//! - [`value`]: bytes ↔ stored JSON values;
//! - [`stream`]: a framed subscription and the (client id, key) registry `UNSUB` uses.
//!
//! One request per connection, as upstream: the reply is written and the connection closed,
//! except that `SUB` turns the connection into a stream. Every request the protocol can answer
//! is answered (`FAILED` where upstream dropped the connection or panicked).

mod detect;
mod read;
mod stream;
mod value;
mod wire;

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use crate::error::ErrorCode;
use crate::key::{Key, Pattern, Target};
use crate::mailbox::Kicks;
use crate::protocol::Response;
use crate::server::accept::Leadership;
use crate::server::Shared;
use crate::store::Value;
use detect::{detect, Detected};
use read::Incoming;
use wire::{BadRequest, Command, Frame, FramedRequest, ReplyKind, MAX_FRAME};

pub use detect::framed_refusal;
pub use stream::Registry;

/// The version a framed `VERSION` answers: the upstream release whose protocol this front end
/// speaks, so upstream's client, which compares it with its own, does not print a mismatch
/// warning into its output (see docs/PROTOCOL.md).
pub const UPSTREAM_VERSION: &str = "0.1.1";

/// Serves the connection if it is not a line connection: framed, or silent for the whole idle
/// timeout (answered with the line protocol's `timeout`, as the line reader would have, so the
/// wait is not doubled). False when the line protocol should serve it. The idle timeout counts
/// from `started`, when the connection was taken on; `lead` (the accepting thread's role) is
/// given up before anything that may wait on the client.
pub fn serve_unless_line(
    shared: &Arc<Shared>,
    conn: u64,
    stream: &UnixStream,
    started: Instant,
    lead: Option<&Leadership<'_>>,
) -> bool {
    let idle = shared.limits.idle_timeout;
    match detect(stream, idle, started, lead) {
        Detected::Line => false,
        Detected::Framed => {
            if let Some(lead) = lead {
                lead.give_up();
            }
            serve(shared, conn, stream, idle.map(|idle| started + idle));
            true
        }
        Detected::TimedOut => {
            log::info!("conn {conn}: timeout");
            let mut line = Vec::new();
            Response::error(
                ErrorCode::Timeout,
                "no complete line within the idle timeout; closing the connection (--idle-timeout)",
            )
            .write(None, &mut line);
            let mut writer = stream;
            let _ = writer.write_all(&line);
            close(stream);
            true
        }
    }
}

/// Serves one framed connection: one request, or a subscription stream. The request frame
/// must be whole by `deadline` (the idle timeout after the connection began).
fn serve(shared: &Arc<Shared>, conn: u64, stream: &UnixStream, deadline: Option<Instant>) {
    let payload = match read::read_frame(stream, deadline) {
        Ok(Incoming::Frame(payload)) => payload,
        Ok(Incoming::TooLarge { len, prefix }) => {
            // The start of a frame over 8 MiB is never the whole request.
            let reason = format!("frame of {len} bytes is over the {MAX_FRAME}-byte limit");
            refuse(conn, stream, &read::failed_start(&prefix, false, reason));
            return;
        }
        Ok(Incoming::Cut { prefix, len }) => {
            let reason = match len {
                Some(len) => format!(
                    "frame cut short: {} of its {len} bytes arrived within the idle timeout (--idle-timeout) or before the end of the stream",
                    prefix.len()
                ),
                None => "frame cut short in its length".to_owned(),
            };
            refuse(conn, stream, &read::failed_start(&prefix, false, reason));
            return;
        }
        Err(e) => {
            log::debug!("conn {conn}: framed read failed: {e}");
            close(stream);
            return;
        }
    };
    match wire::parse_request(&payload) {
        Ok(request) => handle(shared, conn, stream, request),
        Err(err) => {
            log::info!("conn {conn}: framed {err}");
            reply(stream, Frame::reply(err.kind, &err.id, false));
        }
    }
    close(stream);
}

/// Answers a request that could not be read whole with `FAILED`, and closes.
fn refuse(conn: u64, stream: &UnixStream, err: &BadRequest) {
    log::info!("conn {conn}: framed {err}");
    reply(stream, Frame::reply(err.kind, &err.id, false));
    close(stream);
}

/// Runs one request: the one `match` over framed commands.
fn handle(shared: &Arc<Shared>, conn: u64, stream: &UnixStream, req: FramedRequest<'_>) {
    let store = &shared.store;
    let kind = req.command.reply_kind();
    let id = req.id;
    let failed = |why: &dyn std::fmt::Display| {
        log::info!("conn {conn}: framed {:?} {id} failed: {why}", req.command);
        Frame::reply(kind, id, false)
    };
    let mut kicks = Kicks::default();
    let frame = match req.command {
        Command::Put => match Key::parse(req.key) {
            Err(e) => failed(&e),
            Ok(key) => match value::from_bytes(&req.value, shared.limits.max_value_bytes) {
                Err(e) => failed(&e),
                Ok(value) => match store.put(key, value, &mut kicks) {
                    Ok(_) => Frame::reply(kind, id, true),
                    Err(e) => {
                        log::error!("conn {conn}: {e}");
                        failed(&e)
                    }
                },
            },
        },
        Command::Get => match selection(req.key) {
            Err(e) => failed(&e),
            Ok(sel) => data_reply(id, &read(store, &sel)),
        },
        Command::Del => match selection(req.key) {
            Err(e) => failed(&e),
            Ok(sel) => match delete(store, &sel, &mut kicks) {
                Ok(()) => Frame::reply(kind, id, true),
                Err(e) => {
                    log::error!("conn {conn}: {e}");
                    failed(&e)
                }
            },
        },
        Command::Sub => match Target::parse(req.key) {
            Err(e) => failed(&e),
            Ok(target) => {
                // No reply: the stream itself (HELLO first) is the answer.
                if let Err(e) = stream::serve(shared, conn, req.client, &target, stream) {
                    log::warn!("conn {conn}: framed SUB {target}: {e}");
                }
                return;
            }
        },
        Command::Unsub => match Target::parse(req.key) {
            Err(e) => failed(&e),
            Ok(target) => {
                if stream::unsubscribe(shared, req.client, &target) {
                    Frame::reply(kind, id, true)
                } else {
                    failed(&format_args!("{} has no subscription {target}", req.client))
                }
            }
        },
        Command::Trace => match Key::parse(req.key) {
            Err(e) => failed(&e),
            Ok(key) => {
                let subscribers = store.notifier().trace(&key);
                if subscribers.is_empty() {
                    // As upstream: no subscriber is FAILED.
                    Frame::reply(kind, id, false)
                } else {
                    let mut frame = Frame::reply(kind, id, true);
                    for sub in &subscribers {
                        frame.field(&sub.name);
                    }
                    frame
                }
            }
        },
        Command::Health => Frame::reply(kind, id, true),
        Command::Version => {
            let mut frame = Frame::reply(kind, id, true);
            frame.field(UPSTREAM_VERSION);
            frame
        }
    };
    reply(stream, frame);
    // Acknowledge first, then send the fan-out.
    kicks.run();
}

/// What a framed key selects: upstream's `a.*` includes `a` itself.
enum Selection {
    Key(Key),
    /// The key and everything below it.
    Tree(Key),
    All,
}

fn selection(text: &str) -> Result<Selection, crate::key::KeyError> {
    Ok(match Target::parse(text)? {
        Target::Key(key) => Selection::Key(key),
        Target::Pattern(Pattern::Below(key)) => Selection::Tree(key),
        Target::Pattern(Pattern::All) => Selection::All,
    })
}

fn read(store: &crate::store::Store, sel: &Selection) -> Vec<(Key, Value)> {
    match sel {
        Selection::Key(key) => store
            .get(key)
            .map(|(v, _)| vec![(key.clone(), v)])
            .unwrap_or_default(),
        // Two reads, not one snapshot: each value is one the key really had.
        Selection::Tree(key) => {
            let mut values: Vec<(Key, Value)> = store
                .get(key)
                .map(|(v, _)| (key.clone(), v))
                .into_iter()
                .collect();
            values.extend(store.get_matching(&Pattern::Below(key.clone())));
            values
        }
        Selection::All => store.get_matching(&Pattern::All),
    }
}

/// Deletes what the selection names; a key that is not there is no error (as upstream).
fn delete(
    store: &crate::store::Store,
    sel: &Selection,
    kicks: &mut Kicks,
) -> Result<(), crate::error::WriteError> {
    match sel {
        Selection::Key(key) => store.delete(key, kicks).map(drop),
        Selection::Tree(key) => {
            store.delete(key, kicks)?;
            store
                .delete_matching(&Pattern::Below(key.clone()), kicks)
                .map(drop)
        }
        Selection::All => store.delete_matching(&Pattern::All, kicks).map(drop),
    }
}

/// `data <id> OK <k> <b64> …`, or `FAILED` when nothing matched (as upstream) or the reply
/// would not fit in a frame.
fn data_reply(id: &str, values: &[(Key, Value)]) -> Frame {
    if values.is_empty() {
        return Frame::reply(ReplyKind::Data, id, false);
    }
    let mut frame = Frame::reply(ReplyKind::Data, id, true);
    for (key, stored) in values {
        frame.field(key.as_str());
        frame.base64_field(&value::to_bytes(stored));
        if frame.payload_len() > MAX_FRAME {
            log::info!("framed GET {id}: the reply is over the {MAX_FRAME}-byte frame limit");
            return Frame::reply(ReplyKind::Data, id, false);
        }
    }
    frame
}

fn reply(mut stream: &UnixStream, frame: Frame) {
    // Replies other than a data reply are tiny; `data_reply` checked its own size.
    if let Some(bytes) = frame.finish() {
        let _ = stream.write_all(&bytes);
    }
}

fn close(stream: &UnixStream) {
    let _ = stream.shutdown(Shutdown::Both);
}

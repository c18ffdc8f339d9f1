//! The framed front end: the protocol of the nkv this project replaces (0.1.1), served on the
//! same socket as the line protocol, onto the same store, with this project's guarantees.
//!
//! - [`detect`]: whether a new connection speaks frames (its first 4 bytes hold a NUL);
//! - [`wire`]: frames, requests, replies and stream messages;
//! - [`value`]: bytes ↔ stored JSON values;
//! - [`stream`]: a framed subscription and the (client id, key) registry `UNSUB` uses.
//!
//! One request per connection, as upstream: the reply is written and the connection closed,
//! except that `SUB` turns the connection into a stream. Every request the protocol can answer
//! is answered (`FAILED` where upstream dropped the connection or panicked).

mod stream;
mod value;
mod wire;

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, MsgFlags};

use crate::error::ErrorCode;
use crate::key::{Key, Pattern, Target};
use crate::mailbox::Kicks;
use crate::protocol::Response;
use crate::server::Shared;
use crate::store::Value;
use wire::{BadRequest, Command, Frame, FramedRequest, ReplyKind, MAX_FRAME, PREFIX_OF_OVERSIZED};

pub use stream::Registry;

/// The version a framed `VERSION` answers: the upstream release whose protocol this front end
/// speaks, so upstream's client, which compares it with its own, does not print a mismatch
/// warning into its output (see docs/PROTOCOL.md).
pub const UPSTREAM_VERSION: &str = "0.1.1";

/// Linux's "peer closed its write side" poll event, which nix 0.29 does not name.
const POLLRDHUP: PollFlags = PollFlags::from_bits_retain(0x2000);

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Framed,
    Line,
    /// Nothing decisive arrived within the idle timeout.
    TimedOut,
}

/// Serves the connection if it is not a line connection: framed, or silent for the whole idle
/// timeout (answered with the line protocol's `timeout`, as the line reader would have, so the
/// wait is not doubled). False when the line protocol should serve it.
pub fn serve_unless_line(shared: &Arc<Shared>, conn: u64, stream: &UnixStream) -> bool {
    match detect(stream, shared.limits.idle_timeout) {
        Detected::Line => false,
        Detected::Framed => {
            serve(shared, conn, stream);
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

/// Whether the connection speaks frames. Peeks (consumes nothing): a frame's length is under
/// 16 MiB, so one of its first 4 bytes is NUL; a line request never holds a NUL. Decides as
/// soon as it sees a NUL, a `\n`, 4 bytes, or the end of the stream.
pub fn detect(stream: &UnixStream, idle: Option<Duration>) -> Detected {
    let mut head = [0u8; 4];
    let _ = stream.set_read_timeout(idle);
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        let n = match recv(stream.as_raw_fd(), &mut head, MsgFlags::MSG_PEEK) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return Detected::TimedOut,
            // Any other error: the line reader reports it as it always does.
            Err(_) => return Detected::Line,
        };
        let seen = &head[..n];
        if seen.contains(&0) {
            return Detected::Framed;
        }
        if n == 0 || n == head.len() || seen.contains(&b'\n') {
            return Detected::Line;
        }
        // 1 to 3 bytes and no verdict yet: rare (clients write a request at once), and a peek
        // cannot wait for more, so look again shortly (at once if the client hangs up), for at
        // most the idle timeout.
        if idle.is_some_and(|idle| started.elapsed() >= idle) {
            return Detected::TimedOut;
        }
        let mut fds = [PollFd::new(stream.as_fd(), POLLRDHUP)];
        let wait = PollTimeout::try_from(pause).unwrap_or(PollTimeout::MAX);
        if let Ok(1..) = poll(&mut fds, wait) {
            return Detected::Line;
        }
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Serves one framed connection: one request, or a subscription stream.
fn serve(shared: &Arc<Shared>, conn: u64, stream: &UnixStream) {
    let idle = shared.limits.idle_timeout;
    let _ = stream.set_read_timeout(idle);
    let mut reader = stream;
    let payload = match read_frame(&mut reader) {
        Ok(Incoming::Frame(payload)) => payload,
        Ok(Incoming::TooLarge { len, prefix }) => {
            let err = oversized(&prefix, len);
            log::info!("conn {conn}: framed {err}");
            reply(stream, Frame::reply(err.kind, &err.id, false));
            close(stream);
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

enum Incoming {
    Frame(Vec<u8>),
    /// Over [`MAX_FRAME`]: only the start is read, to answer it.
    TooLarge {
        len: usize,
        prefix: Vec<u8>,
    },
}

fn read_frame(reader: &mut impl Read) -> io::Result<Incoming> {
    let mut len = [0u8; 4];
    reader.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        let mut prefix = Vec::new();
        reader
            .take(PREFIX_OF_OVERSIZED as u64)
            .read_to_end(&mut prefix)?;
        return Ok(Incoming::TooLarge { len, prefix });
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload)?;
    Ok(Incoming::Frame(payload))
}

/// The `FAILED` reply for a frame over the limit, with the command and id of its start.
fn oversized(prefix: &[u8], len: usize) -> BadRequest {
    let mut err = match wire::parse_request(prefix) {
        Ok(req) => BadRequest {
            kind: req.command.reply_kind(),
            id: req.id.to_owned(),
            reason: String::new(),
        },
        Err(err) => err,
    };
    err.reason = format!("frame of {len} bytes is over the {MAX_FRAME}-byte limit");
    err
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_tells_frames_from_lines() {
        let case = |bytes: &[u8]| {
            let (a, mut b) = UnixStream::pair().unwrap();
            b.write_all(bytes).unwrap();
            if bytes.len() < 4 && !bytes.contains(&b'\n') && !bytes.contains(&0) {
                drop(b); // end of stream decides
                return detect(&a, Some(Duration::from_secs(5))) == Detected::Framed;
            }
            let verdict = detect(&a, Some(Duration::from_secs(5))) == Detected::Framed;
            // Nothing was consumed.
            let mut all = vec![0u8; bytes.len()];
            (&a).read_exact(&mut all).unwrap();
            assert_eq!(all, bytes);
            drop(b);
            verdict
        };
        assert!(case(b"\x1b\x00\x00\x00GET r c a\n"));
        assert!(case(b"\x00\x01\x00\x00PUT"));
        assert!(case(b"\x47\x01\x02\x00"), "length 0x020147");
        assert!(!case(b"GET a\n"));
        assert!(!case(b"\n"));
        assert!(!case(b"GE"));
        assert!(!case(b"{\"op\":\"health\"}\n"));
    }

    #[test]
    fn detection_waits_for_a_split_length() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"\x1b").unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            b.write_all(b"\x00\x00\x00").unwrap();
            b
        });
        assert_eq!(detect(&a, Some(Duration::from_secs(5))), Detected::Framed);
        drop(writer.join().unwrap());
    }

    #[test]
    fn detection_times_out_on_silence_and_on_a_stalled_start() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(
            detect(&a, Some(Duration::from_millis(50))),
            Detected::TimedOut
        );
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"GE").unwrap();
        assert_eq!(
            detect(&a, Some(Duration::from_millis(50))),
            Detected::TimedOut
        );
    }
}

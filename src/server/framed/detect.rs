//! Telling a framed connection from a line connection by its first bytes, and refusing a
//! connection over `--max-connections` in its own protocol.
//!
//! The rule (docs/PROTOCOL.md, "Framed protocol"): a frame's length is under 16 MiB, so one of
//! its first 4 bytes is NUL; a line request never holds a NUL. Fewer than 4 bytes without a NUL
//! decide nothing by themselves: a frame header may arrive split, and any byte (`\n`
//! included: lengths 10, 266, 522, …) can begin one. So detection waits for the 4th byte,
//! except that a connection which half-closed cannot send it (a line), and a complete line of
//! 1–3 bytes (never a valid request: the shortest, `HELP`, is 5 bytes) is answered as a line
//! after [`SHORT_LINE_WAIT`] without more bytes.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, MsgFlags};

use super::read::failed_start;
use super::wire::{Frame, PREFIX_OF_OVERSIZED};
use crate::server::accept::Leadership;

/// How long a complete line of 1–3 bytes waits for more bytes before it is served as a line;
/// within it, a frame header split after a `\n` byte is still recognised.
pub const SHORT_LINE_WAIT: Duration = Duration::from_secs(1);

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

/// The verdict on the bytes seen so far, if they give one.
fn verdict(seen: &[u8]) -> Option<Detected> {
    if seen.contains(&0) {
        Some(Detected::Framed)
    } else if seen.is_empty() || seen.len() >= 4 {
        // Nothing at all (end of stream), or 4 bytes without a NUL: not a frame.
        Some(Detected::Line)
    } else {
        None
    }
}

/// Whether the connection speaks frames. Peeks (consumes nothing); decides as soon as the
/// bytes seen decide (see the module documentation), the client half-closes, a complete short
/// line waited [`SHORT_LINE_WAIT`], or the idle timeout passes (counted from `started`).
/// While `lead` is held (the accepting thread serves this connection), the first bytes are
/// waited for beside the listener, and accepting is given up before any other wait. A socket
/// that already holds the bytes costs one peek and no timeout change.
pub fn detect(
    stream: &UnixStream,
    idle: Option<Duration>,
    started: Instant,
    lead: Option<&Leadership<'_>>,
) -> Detected {
    let mut head = [0u8; 4];
    let mut pause = Duration::from_millis(1);
    loop {
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
        let n = match recv(stream.as_raw_fd(), &mut head, flags) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => {
                // Nothing yet: wait for it (a poll, not a socket timeout, so the line reader
                // takes over a socket without one), bounded by what is left of the idle timeout.
                let left = idle.map(|idle| idle.saturating_sub(started.elapsed()));
                if left.is_some_and(|left| left.is_zero()) {
                    return Detected::TimedOut;
                }
                let timeout = left.map_or(PollTimeout::NONE, |left| {
                    PollTimeout::try_from(left.max(Duration::from_millis(1)))
                        .unwrap_or(PollTimeout::MAX)
                });
                if let Some(lead) = lead.filter(|lead| lead.held()) {
                    // Readable, or the leadership was given up: look again either way.
                    lead.wait_readable(stream, timeout);
                    continue;
                }
                let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, timeout) {
                    Ok(0) => return Detected::TimedOut,
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return Detected::Line,
                }
            }
            // Any other error: the line reader reports it as it always does.
            Err(_) => return Detected::Line,
        };
        let seen = &head[..n];
        if let Some(verdict) = verdict(seen) {
            return verdict;
        }
        // 1 to 3 bytes, no NUL: a frame needs more. Rare (clients write a request at once),
        // and a peek cannot wait for more, so look again shortly (at once if the client
        // half-closes: then no 4th byte can come).
        let waited = started.elapsed();
        let short_wait = idle.map_or(SHORT_LINE_WAIT, |idle| idle.min(SHORT_LINE_WAIT));
        if seen.contains(&b'\n') && waited >= short_wait {
            return Detected::Line;
        }
        if idle.is_some_and(|idle| waited >= idle) {
            return Detected::TimedOut;
        }
        if let Some(lead) = lead {
            lead.give_up();
        }
        let mut fds = [PollFd::new(stream.as_fd(), POLLRDHUP)];
        let wait = PollTimeout::try_from(pause).unwrap_or(PollTimeout::MAX);
        if let Ok(1..) = poll(&mut fds, wait) {
            return Detected::Line;
        }
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The refusal of a connection over `--max-connections`, when it is framed: a `FAILED` frame
/// of its request's kind and id (as far as its first bytes show them), with what was peeked
/// consumed. `None` for a line connection, or one whose first bytes are not there yet (the
/// caller, `server::refuse`, waits for them off the accepting thread, and answers those that
/// send nothing with the line protocol's error).
pub fn framed_refusal(stream: &UnixStream) -> Option<Vec<u8>> {
    let mut head = vec![0u8; 4 + PREFIX_OF_OVERSIZED];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    let n = recv(stream.as_raw_fd(), &mut head, flags).ok()?;
    head.truncate(n);
    if head[..n.min(4)].iter().all(|&b| b != 0) {
        return None;
    }
    // Consume what was peeked, so closing leaves no unread request behind.
    let _ = recv(
        stream.as_raw_fd(),
        &mut vec![0u8; n],
        MsgFlags::MSG_DONTWAIT,
    );
    let err = match head.get(..4) {
        Some(len) => {
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let payload = &head[4..];
            let whole = payload.len() >= len;
            failed_start(
                &payload[..payload.len().min(len)],
                whole,
                "the server is at --max-connections".into(),
            )
        }
        None => failed_start(&[], false, "the server is at --max-connections".into()),
    };
    log::info!("framed {err}");
    Frame::reply(err.kind, &err.id, false).finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn detect_now(a: &UnixStream, idle: Duration) -> Detected {
        detect(a, Some(idle), Instant::now(), None)
    }

    #[test]
    fn detection_tells_frames_from_lines() {
        let case = |bytes: &[u8]| {
            let (a, mut b) = UnixStream::pair().unwrap();
            b.write_all(bytes).unwrap();
            if bytes.len() < 4 && !bytes.contains(&b'\n') && !bytes.contains(&0) {
                drop(b); // end of stream decides
                return detect_now(&a, Duration::from_secs(5)) == Detected::Framed;
            }
            let verdict = detect_now(&a, Duration::from_secs(5)) == Detected::Framed;
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
        assert_eq!(detect_now(&a, Duration::from_secs(5)), Detected::Framed);
        drop(writer.join().unwrap());
    }

    #[test]
    fn a_newline_byte_starts_a_frame_unless_nothing_follows() {
        // Length 10 sent as 0a, then the rest: a frame, not an empty line.
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"\n").unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            b.write_all(b"\x00\x00\x00").unwrap();
            b
        });
        assert_eq!(detect_now(&a, Duration::from_secs(5)), Detected::Framed);
        drop(writer.join().unwrap());
        // A short complete line from a client that half-closed: a line, at once.
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"Q\n").unwrap();
        b.shutdown(std::net::Shutdown::Write).unwrap();
        let started = Instant::now();
        assert_eq!(detect_now(&a, Duration::from_secs(5)), Detected::Line);
        assert!(started.elapsed() < SHORT_LINE_WAIT);
        // One that stays open: a line after the short wait, well before the idle timeout.
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"Q\n").unwrap();
        let started = Instant::now();
        assert_eq!(detect_now(&a, Duration::from_secs(5)), Detected::Line);
        assert!(started.elapsed() >= SHORT_LINE_WAIT);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn detection_times_out_on_silence_and_on_a_stalled_start() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(
            detect_now(&a, Duration::from_millis(50)),
            Detected::TimedOut
        );
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"GE").unwrap();
        assert_eq!(
            detect_now(&a, Duration::from_millis(50)),
            Detected::TimedOut
        );
    }
}

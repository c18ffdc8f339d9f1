//! Reading request lines from a client, with a length limit and an idle timeout.
//!
//! `BufRead::read_until` would buffer a hostile endless line into memory; this reader stops at
//! `max_line` bytes and reports [`Line::TooLong`] without reading further.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};

use super::spin::{Polled, SpinWait};

const INITIAL_CAPACITY: usize = 16 * 1024;
/// What an idle subscriber connection keeps to read its next (short) request into.
const IDLE_CAPACITY: usize = 512;

/// What the next read produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// One line, without its `\n`.
    Complete(&'a [u8]),
    /// The client closed its write side and nothing is pending.
    Eof,
    /// The client closed its write side in the middle of a line. A request cut off by its
    /// client's death must not be executed (`PUT cfg {"mode":"fa` would store a fragment).
    Unterminated,
    /// The pending line is longer than the limit.
    TooLong,
    /// The client held a partial line (or sent nothing at all) for longer than the idle timeout.
    TimedOut,
}

pub struct LineReader {
    /// The connection's one descriptor, shared with its writer.
    stream: Arc<UnixStream>,
    buf: Vec<u8>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// How far `buf[start..]` is known to have no `\n`.
    scanned: usize,
    max_line: usize,
    idle: Option<Duration>,
    /// The read timeout currently set on the socket.
    /// The read timeout currently set on the socket (protocol detection sets none).
    armed: Option<Duration>,
    /// Since when the client has owed us the end of a line (or its first line): the idle
    /// timeout counts from here, however the bytes trickle in.
    waiting_since: Option<Instant>,
    /// After a complete line a quiet client is normal: only partial lines time out.
    seen_line: bool,
    eof: bool,
    /// Polls briefly for the next request before sleeping on the socket.
    spin: Option<SpinWait>,
}

impl LineReader {
    pub fn new(stream: Arc<UnixStream>, max_line: usize, idle: Option<Duration>) -> LineReader {
        LineReader {
            stream,
            buf: vec![0; INITIAL_CAPACITY.min(max_line + 1)],
            start: 0,
            end: 0,
            scanned: 0,
            max_line,
            idle,
            armed: None,
            waiting_since: None,
            seen_line: false,
            eof: false,
            spin: None,
        }
    }

    /// Polls for up to the spin window before each sleeping read (see [`super::spin`]).
    pub fn with_spin(mut self, spin: SpinWait) -> LineReader {
        self.spin = Some(spin);
        self
    }

    /// Whether a complete line is already buffered, so a response may wait to be batched with
    /// the next one: the next read will not block.
    pub fn has_buffered_line(&mut self) -> bool {
        let pending = &self.buf[self.start + self.scanned..self.end];
        match pending.iter().position(|&b| b == b'\n') {
            Some(_) => true,
            None => {
                self.scanned = self.end - self.start;
                false
            }
        }
    }

    /// Whether [`next_line`](Self::next_line) would return without reading the socket: a
    /// complete line is buffered, the client has closed, the pending line is already too long,
    /// or its idle time is up. A subscriber connection runs a request only then, so its thread
    /// never blocks in `read` (it also sends the mailbox).
    pub fn is_ready(&mut self) -> bool {
        self.has_buffered_line()
            || self.eof
            || self.scanned > self.max_line
            || self.idle_left().is_some_and(|left| left.is_zero())
    }

    /// Whether the client closed and nothing is left: the next line is [`Line::Eof`].
    pub fn is_finished(&self) -> bool {
        self.eof && self.start == self.end
    }

    /// Whether any unconsumed byte is buffered (a partial or complete line).
    pub fn has_pending(&self) -> bool {
        self.start < self.end
    }

    /// How long a partial line may still take to complete (`None`: no partial line, or no
    /// idle timeout). Counted like [`next_line`](Self::next_line)'s timeout.
    pub fn idle_left(&mut self) -> Option<Duration> {
        let idle = self.idle?;
        if self.start == self.end && self.seen_line {
            return None;
        }
        let since = *self.waiting_since.get_or_insert_with(Instant::now);
        Some(idle.saturating_sub(since.elapsed()))
    }

    /// Reads what the socket holds without blocking (poll said it is readable); complete lines
    /// are then taken with [`next_line`](Self::next_line) once [`is_ready`](Self::is_ready).
    ///
    /// # Errors
    /// The socket failed.
    pub fn fill(&mut self) -> io::Result<()> {
        if self.eof || self.has_buffered_line() || self.scanned > self.max_line {
            return Ok(());
        }
        self.shrink();
        self.make_room();
        match recv(
            self.stream.as_raw_fd(),
            &mut self.buf[self.end..],
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => self.eof = true,
            Ok(n) => self.end += n,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Reads the next line.
    ///
    /// # Errors
    /// The socket failed (other than the idle timeout, which is [`Line::TimedOut`]).
    pub fn next_line(&mut self) -> io::Result<Line<'_>> {
        self.shrink();
        loop {
            let pending = &self.buf[self.start + self.scanned..self.end];
            if let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                let line_end = self.start + self.scanned + pos;
                if line_end - self.start > self.max_line {
                    return Ok(Line::TooLong);
                }
                let line_start = self.start;
                self.start = line_end + 1;
                self.scanned = 0;
                self.seen_line = true;
                self.waiting_since = None;
                return Ok(Line::Complete(&self.buf[line_start..line_end]));
            }
            self.scanned = self.end - self.start;
            if self.scanned > self.max_line {
                return Ok(Line::TooLong);
            }
            if self.eof {
                if self.start == self.end {
                    return Ok(Line::Eof);
                }
                // Only complete lines are executed; `echo` ends its line, `printf 'GET k'`
                // does not.
                self.start = self.end;
                self.scanned = 0;
                return Ok(Line::Unterminated);
            }
            self.make_room();
            if !self.seen_line {
                // The first line is most likely there already (detection saw its start): take
                // it without arming the socket's timeout, which would cost two system calls.
                match recv(
                    self.stream.as_raw_fd(),
                    &mut self.buf[self.end..],
                    MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(0) => {
                        self.eof = true;
                        continue;
                    }
                    Ok(n) => {
                        self.end += n;
                        continue;
                    }
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(nix::errno::Errno::EAGAIN) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            // Only between requests: a partial line is waited for asleep, with the idle
            // timeout armed, however the client trickles it.
            if let Some(spin) = self.spin.as_mut().filter(|_| self.start == self.end) {
                let fd = self.stream.as_raw_fd();
                let room = &mut self.buf[self.end..];
                let polled = spin.poll(|| match recv(fd, room, MsgFlags::MSG_DONTWAIT) {
                    Err(Errno::EAGAIN | Errno::EINTR) => None,
                    got => Some(got),
                });
                match polled {
                    Polled::Ready(Ok(0)) => {
                        self.eof = true;
                        continue;
                    }
                    Polled::Ready(Ok(n)) => {
                        self.end += n;
                        continue;
                    }
                    Polled::Ready(Err(e)) => return Err(e.into()),
                    Polled::Sleep => {}
                }
            }
            if !self.arm_timeout()? {
                return Ok(Line::TimedOut);
            }
            let read = (&*self.stream).read(&mut self.buf[self.end..]);
            if let Some(spin) = &mut self.spin {
                spin.woke();
            }
            match read {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(Line::TimedOut)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Gives the read buffer back when nothing is pending, keeping [`IDLE_CAPACITY`]: a
    /// subscriber connection sends few short requests, and hundreds of them sit idle.
    pub fn release(&mut self) {
        if self.start == self.end && self.buf.len() > IDLE_CAPACITY {
            self.buf = vec![0; IDLE_CAPACITY];
            self.start = 0;
            self.end = 0;
            self.scanned = 0;
        }
    }

    /// Gives back the memory of a large line once it has been handled: a connection that sent
    /// one big value should not hold a buffer of that size for the rest of its life.
    fn shrink(&mut self) {
        let pending = self.end - self.start;
        if self.buf.len() > INITIAL_CAPACITY && pending <= INITIAL_CAPACITY / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = pending;
            self.buf.truncate(INITIAL_CAPACITY);
            self.buf.shrink_to_fit();
        }
    }

    /// Ensures there is space to read into, moving the pending bytes to the front or growing
    /// the buffer (never past the line limit plus the `\n`).
    fn make_room(&mut self) {
        if self.end < self.buf.len() {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.end < self.buf.len() {
                return;
            }
        }
        let grown = (self.buf.len() * 2)
            .min(self.max_line + 2)
            .max(self.end + 1)
            .max(IDLE_CAPACITY);
        self.buf.resize(grown, 0);
    }

    /// A timeout applies before the first line and while a partial line is pending, counted
    /// from when the wait began. Returns false when that time is already up.
    fn arm_timeout(&mut self) -> io::Result<bool> {
        let owed = !self.seen_line || self.start < self.end;
        let want = match self.idle {
            Some(idle) if owed => {
                let since = *self.waiting_since.get_or_insert_with(Instant::now);
                let left = idle.saturating_sub(since.elapsed());
                if left.is_zero() {
                    return Ok(false);
                }
                Some(left)
            }
            _ => None,
        };
        // Re-arm only when needed: a client sending whole lines costs no extra system call.
        if want != self.armed {
            self.stream.set_read_timeout(want)?;
            self.armed = want;
        }
        Ok(true)
    }
}

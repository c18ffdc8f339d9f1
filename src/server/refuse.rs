//! Refusing connections over `--max-connections`, off the accepting thread.
//!
//! A refusal is answered in the client's own protocol (a framed client reads a line as a frame
//! length), which takes its first bytes. When they are already there the accepting thread
//! answers at once; otherwise the connection goes to one refusing thread, which waits for the
//! first bytes of up to [`PENDING`] refused connections at a time, each at most
//! [`REFUSAL_WAIT`], and answers a connection that sent nothing in the line protocol. When
//! that thread is full (or cannot be started) the accepting thread answers in the line protocol
//! at once. So a flood of silent connections costs accepting nothing: before, each one held it
//! up for the whole wait, one after another (found by the issue-11 adversary: a client behind
//! 1,000 silent connections waited 50 s).

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::framed::framed_refusal;
use crate::error::ErrorCode;
use crate::protocol::Response;

/// How long a refused connection's first bytes are waited for.
pub const REFUSAL_WAIT: Duration = Duration::from_millis(50);

/// Most refused connections waiting for their first bytes at once.
const PENDING: usize = 64;

/// Answers `stream`, refused because the server has `limit` connections, and closes it.
pub fn refuse(stream: UnixStream, limit: usize) {
    if readable(&stream) {
        answer(&stream, limit);
        return;
    }
    let waiting = Waiting {
        stream,
        limit,
        until: Instant::now() + REFUSAL_WAIT,
    };
    match refuser() {
        Some(tx) => match tx.try_send(waiting) {
            Ok(()) => {}
            Err(TrySendError::Full(w) | TrySendError::Disconnected(w)) => {
                line_refusal(&w.stream, w.limit)
            }
        },
        None => line_refusal(&waiting.stream, waiting.limit),
    }
}

struct Waiting {
    stream: UnixStream,
    limit: usize,
    until: Instant,
}

/// The refusing thread's queue, started at the first refusal that has to wait.
fn refuser() -> Option<&'static Sender<Waiting>> {
    static TX: OnceLock<Option<Sender<Waiting>>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::bounded(PENDING);
        let started = thread::Builder::new()
            .name("nkv-refuse".into())
            .stack_size(64 * 1024)
            .spawn(move || run(&rx));
        match started {
            Ok(_) => Some(tx),
            Err(e) => {
                log::error!("cannot start the refusing thread: {e}; refusals answer at once");
                None
            }
        }
    })
    .as_ref()
}

/// Waits for the first bytes of every pending connection (or its deadline) and answers it.
fn run(rx: &Receiver<Waiting>) {
    let mut pending: Vec<Waiting> = Vec::new();
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(w) => pending.push(w),
                Err(_) => return,
            }
        }
        while pending.len() < PENDING {
            match rx.try_recv() {
                Ok(w) => pending.push(w),
                Err(_) => break,
            }
        }
        let now = Instant::now();
        let first = pending.iter().map(|w| w.until).min().unwrap_or(now);
        // New refusals arrive on the channel, which poll cannot watch: look again soon.
        let wait = first
            .saturating_duration_since(now)
            .min(Duration::from_millis(5));
        let mut fds: Vec<PollFd> = pending
            .iter()
            .map(|w| PollFd::new(w.stream.as_fd(), PollFlags::POLLIN))
            .collect();
        let _ = poll(
            &mut fds,
            PollTimeout::try_from(wait).unwrap_or(PollTimeout::ZERO),
        );
        let ready: Vec<bool> = fds
            .iter()
            .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        let now = Instant::now();
        let mut i = 0;
        pending.retain(|w| {
            let done = ready[i] || w.until <= now;
            i += 1;
            if done {
                answer(&w.stream, w.limit);
            }
            !done
        });
    }
}

fn readable(stream: &UnixStream) -> bool {
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1..))
}

/// The refusal in the protocol the bytes already there show (the line protocol if none).
fn answer(stream: &UnixStream, limit: usize) {
    match framed_refusal(stream) {
        Some(failed) => {
            let _ = (&*stream).write_all(&failed);
        }
        None => line_refusal(stream, limit),
    }
}

fn line_refusal(stream: &UnixStream, limit: usize) {
    let mut line = Vec::new();
    Response::error(
        ErrorCode::TooManyConnections,
        format!("the server has {limit} connections (--max-connections); try again later"),
    )
    .write(None, &mut line);
    let _ = (&*stream).write_all(&line);
}

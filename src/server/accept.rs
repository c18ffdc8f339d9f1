//! Accepting connections, one thread per connection, without a thread start per connection.
//!
//! Leader/followers: exactly one connection thread at a time, the *leader*, waits for the
//! next connection (polling the listener beside the stop pipe). When no other connection is
//! waiting behind the one it accepted, the leader serves the connection itself while still
//! holding the leadership (a [`Leadership`]): it runs the connection's first request if that
//! arrives whole without a blocking read and is quick (`Request::is_quick`), and goes back to
//! accepting when the client then closes — a one-shot client (`socat`, `nkv-client get`) costs
//! no wake-up of another thread. Before anything that could wait on its client (a partial line,
//! a second request, a reply the socket does not take at once, a subscription) or take long (a
//! write, a pattern), and as soon as another connection or the stop signal arrives, it passes
//! the leadership to an idle thread (or a new one). So accepting waits at most for one quick
//! request, never for a client or the disk. Refusals over `--max-connections` never wait on
//! the client either ([`super::refuse`]). When more connections are
//! waiting, the leader hands the one it accepted to an idle thread (or a new one) and goes on
//! accepting, so that connections are not accepted one wake-up apart.
//! A thread whose client has left waits [`LINGER`] for the leadership or a connection, then
//! exits: a burst of one-shot clients (`socat`, `nkv-client get`) is served by a few reused
//! threads instead of one thread start each.
//!
//! Stopping writes one byte into a pipe made at start (see [`super::StopHandle`]): it needs
//! neither the socket path, which may be gone or belong to another server by then, nor a free
//! descriptor, and it does not touch the listening socket, which under socket activation is
//! systemd's as well.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::PipeReader;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use parking_lot::{Condvar, Mutex};

use super::{serve, Shared, THREAD_STACK};

/// How long a connection thread whose client left waits to lead again before it exits.
const LINGER: Duration = Duration::from_secs(2);

/// An accepted connection: id, name, socket.
type Accepted = (u64, String, Arc<UnixStream>);

/// What an idle connection thread is given.
enum Turn {
    Lead,
    Serve(Accepted),
}

/// The idle connection threads and the turns handed to them: one lock and one condition
/// variable, so a hand-over costs one wake-up (no channel selection, no spinning).
#[derive(Default)]
struct Idle {
    state: Mutex<IdleState>,
    woken: Condvar,
}

#[derive(Default)]
struct IdleState {
    /// Threads waiting in [`Idle::wait`].
    waiting: usize,
    /// Turns given and not yet taken. Never more than `waiting`: each has a thread to take it,
    /// as a waiting thread leaves only when no turn is left.
    turns: VecDeque<Turn>,
}

impl Idle {
    /// Gives `turn` to a waiting thread; gives it back when every waiting thread has one.
    fn give(&self, turn: Turn) -> Result<(), Turn> {
        let mut state = self.state.lock();
        if state.waiting <= state.turns.len() {
            return Err(turn);
        }
        state.turns.push_back(turn);
        drop(state);
        self.woken.notify_one();
        Ok(())
    }

    /// Waits up to `linger` for a turn; `None` when none came.
    fn wait(&self, linger: Duration) -> Option<Turn> {
        let deadline = std::time::Instant::now() + linger;
        let mut state = self.state.lock();
        state.waiting += 1;
        let turn = loop {
            if let Some(turn) = state.turns.pop_front() {
                break Some(turn);
            }
            if self.woken.wait_until(&mut state, deadline).timed_out() {
                break state.turns.pop_front();
            }
        };
        state.waiting -= 1;
        turn
    }
}

/// What every connection thread shares to take turns at accepting.
pub(super) struct Acceptor {
    shared: Arc<Shared>,
    listener: UnixListener,
    /// The read end of the stop pipe. Never drained: once written, every poll sees it.
    wake: PipeReader,
    next_id: AtomicU64,
    /// The leadership, or a connection to serve, handed to an idle thread.
    idle: Idle,
    /// When an accept error was last logged, and how many failed since: out of descriptors,
    /// accept fails a hundred times a second, and the log says so once a second.
    accept_errors: Mutex<(Option<std::time::Instant>, u64)>,
}

/// What woke a waiting thread.
enum Woken {
    Connection,
    Stop,
}

impl Acceptor {
    pub(super) fn new(shared: Arc<Shared>, listener: UnixListener, wake: PipeReader) -> Acceptor {
        Acceptor {
            shared,
            listener,
            wake,
            next_id: AtomicU64::new(1),
            idle: Idle::default(),
            accept_errors: Mutex::new((None, 0)),
        }
    }

    /// Starts the first leader.
    ///
    /// # Errors
    /// No thread could be started.
    pub(super) fn start(self: &Arc<Self>) -> std::io::Result<()> {
        self.spawn(Turn::Lead).map(drop)
    }

    /// Blocks until the stop pipe is written.
    pub(super) fn wait_for_stop(&self) {
        loop {
            match wait(&[self.wake.as_fd()]) {
                Ok(_) => return,
                Err(e) => {
                    log::error!("waiting for the stop signal failed: {e}");
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    fn spawn(self: &Arc<Self>, turn: Turn) -> std::io::Result<thread::JoinHandle<()>> {
        let acceptor = self.clone();
        thread::Builder::new()
            .name("nkv-conn".into())
            .stack_size(THREAD_STACK)
            .spawn(move || acceptor.connection_thread(turn))
    }

    /// Leads or serves, as it is given turns; exits when stopping or idle for [`LINGER`].
    fn connection_thread(self: Arc<Self>, mut turn: Turn) {
        loop {
            match turn {
                Turn::Serve((id, name, stream)) => serve(&self.shared, id, name, stream, None),
                Turn::Lead => {
                    let Some(accepted) = self.accept_one() else {
                        return;
                    };
                    if self.more_waiting() {
                        self.hand_over(accepted);
                        continue;
                    }
                    let (id, name, stream) = accepted;
                    let lead = Leadership {
                        acceptor: &self,
                        held: Cell::new(true),
                        passed: Cell::new(false),
                    };
                    serve(&self.shared, id, name, stream, Some(&lead));
                    if !lead.passed.get() {
                        // Still ours (or nobody could take it): accept the next one.
                        continue;
                    }
                }
            }
            turn = match self.idle.wait(LINGER) {
                Some(turn) => turn,
                None => return,
            };
        }
    }

    /// Whether another connection is already waiting to be accepted.
    fn more_waiting(&self) -> bool {
        let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// Hands the leadership to an idle thread, or to a new one. False when neither exists.
    fn pass_lead(self: &Arc<Self>) -> bool {
        if self.idle.give(Turn::Lead).is_ok() {
            return true;
        }
        match self.spawn(Turn::Lead) {
            Ok(_) => true,
            Err(e) => {
                log::error!("cannot start a connection thread: {e}");
                false
            }
        }
    }

    /// Gives a connection to an idle thread, or to a new one; closes it when neither exists.
    fn hand_over(self: &Arc<Self>, accepted: Accepted) {
        let accepted = match self.idle.give(Turn::Serve(accepted)) {
            Ok(()) => return,
            Err(Turn::Serve(accepted)) => accepted,
            Err(Turn::Lead) => unreachable!("give returns the turn it was given"),
        };
        let id = accepted.0;
        if let Err(e) = self.spawn(Turn::Serve(accepted)) {
            log::error!("conn {id}: cannot start a thread: {e}; closed");
            self.shared.connections.lock().streams.remove(&id);
        }
    }

    /// Accepts the next connection that may be served; `None` once stopping.
    fn accept_one(&self) -> Option<Accepted> {
        loop {
            if self.shared.stopping.load(Ordering::SeqCst) {
                return None;
            }
            let woken = wait(&[self.listener.as_fd(), self.wake.as_fd()]);
            self.shared.spin.woke();
            match woken {
                Ok(Woken::Stop) => return None,
                Ok(Woken::Connection) => {}
                Err(e) => {
                    log::error!("waiting for connections failed: {e}");
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
            // Only the leader accepts, so a connection that poll reported is still there.
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Some(accepted) = self.register(stream) {
                        return Some(accepted);
                    }
                }
                Err(e) => {
                    self.log_accept_error(&e);
                    // Out of descriptors or memory: give closing connections a moment.
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    fn log_accept_error(&self, e: &std::io::Error) {
        let mut errors = self.accept_errors.lock();
        let now = std::time::Instant::now();
        if errors
            .0
            .is_some_and(|last| now < last + Duration::from_secs(1))
        {
            errors.1 += 1;
            return;
        }
        match errors.1 {
            0 => log::error!("accept failed: {e}"),
            n => log::error!("accept failed: {e} ({n} more failures in the last second)"),
        }
        *errors = (Some(now), 0);
    }

    /// Counts the connection in (or refuses it over `--max-connections`, in its own protocol,
    /// without waiting on it: see [`super::refuse`]).
    fn register(&self, stream: UnixStream) -> Option<Accepted> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (pid, uid) = match getsockopt(&stream, PeerCredentials) {
            Ok(cred) => (cred.pid(), cred.uid()),
            Err(_) => (0, u32::MAX),
        };
        let limit = self.shared.limits.max_connections;
        {
            let mut connections = self.shared.connections.lock();
            if connections.streams.len() >= limit {
                drop(connections);
                log::warn!("conn {id} (pid {pid}, uid {uid}) refused: too many connections");
                super::refuse::refuse(stream, limit);
                return None;
            }
            // One descriptor, shared with the connection's thread: no `dup` per connection.
            let stream = Arc::new(stream);
            connections.streams.insert(id, stream.clone());
            drop(connections);
            log::debug!("conn {id} opened (pid {pid}, uid {uid})");
            Some((id, format!("pid:{pid}"), stream))
        }
    }
}

/// The accepting role, held by a connection thread while it serves the connection it accepted
/// (see the module doc). Given up at most once; a connection served by a follower has none.
pub(super) struct Leadership<'a> {
    acceptor: &'a Arc<Acceptor>,
    held: Cell<bool>,
    /// Another thread accepts now: this one goes back to the idle threads when done.
    passed: Cell<bool>,
}

impl Leadership<'_> {
    /// Whether this thread is still the one that accepts.
    pub(super) fn held(&self) -> bool {
        self.held.get()
    }

    /// Passes accepting on to an idle thread (or a new one) before this thread may wait on its
    /// client. When no thread can be had, accepting resumes once this connection ends.
    pub(super) fn give_up(&self) {
        if self.held.replace(false) {
            if self.acceptor.pass_lead() {
                self.passed.set(true);
            } else {
                log::error!(
                    "no thread to take over accepting: it resumes when this connection ends"
                );
            }
        }
    }

    /// Waits, while still accepting's turn, for `stream` to be readable (or closed). Gives the
    /// leadership up and returns false instead when a connection or the stop signal comes
    /// while `stream` is not readable, or when `timeout` passes. A readable `stream` wins: its
    /// client may just have closed, and then this thread goes on accepting with no hand-over.
    pub(super) fn wait_readable(&self, stream: &UnixStream, timeout: PollTimeout) -> bool {
        if !self.held() {
            return false;
        }
        let mut fds = [
            PollFd::new(stream.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.acceptor.listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.acceptor.wake.as_fd(), PollFlags::POLLIN),
        ];
        let ready = loop {
            let polled = poll(&mut fds, timeout);
            self.acceptor.shared.spin.woke();
            match polled {
                Ok(n) => break n > 0,
                Err(Errno::EINTR) => continue,
                Err(_) => break false,
            }
        };
        let set = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        if ready && set(&fds[0]) {
            return true;
        }
        self.give_up();
        false
    }
}

/// Polls `fds` (the last is the stop pipe) until one is ready.
fn wait(fds: &[std::os::fd::BorrowedFd<'_>]) -> Result<Woken, Errno> {
    let mut polled: Vec<PollFd> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    loop {
        match poll(&mut polled, PollTimeout::NONE) {
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
    // The stop pipe first: once stopping, a waiting connection is not taken on.
    if polled.last().is_some_and(ready) {
        Ok(Woken::Stop)
    } else {
        Ok(Woken::Connection)
    }
}

//! Where a mailbox's bytes go and how the connection thread is woken: the subscriber's socket
//! and an eventfd. A trait so the loom model can put a bounded in-memory socket in their place.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{send, MsgFlags};

/// The two things a mailbox does outside its lock's state.
pub trait Port: Send + Sync {
    /// Sends some of `bytes` without blocking (`WouldBlock` when full).
    fn send(&self, bytes: &[u8]) -> io::Result<usize>;
    /// Wakes the connection thread.
    fn wake(&self);
    /// The connection thread consumes its wake-up.
    fn clear_wake(&self);
}

/// A subscriber's socket and the eventfd its connection thread polls.
pub struct SocketPort {
    stream: UnixStream,
    wake: EventFd,
}

impl SocketPort {
    /// # Errors
    /// The eventfd cannot be created (out of descriptors).
    pub fn new(stream: UnixStream) -> io::Result<SocketPort> {
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(SocketPort { stream, wake })
    }

    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }
}

impl Port for SocketPort {
    fn send(&self, bytes: &[u8]) -> io::Result<usize> {
        send_some(&self.stream, bytes)
    }

    fn wake(&self) {
        // Cannot block (non-blocking, and one unread wake-up is far below the maximum).
        let _ = self.wake.write(1);
    }

    fn clear_wake(&self) {
        let _ = self.wake.read();
    }
}

/// One non-blocking `send`; `MSG_NOSIGNAL` because a vanished subscriber must be an error, not
/// a signal.
pub fn send_some(stream: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
    send(
        stream.as_raw_fd(),
        bytes,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    )
    .map_err(io::Error::from)
}

//! Waiting briefly, awake, for a sequential client's next request before sleeping on it.
//!
//! A client that sends a request, reads the reply and sends the next one (a script's loop, a
//! service's request/response client) comes back within tens of microseconds. A thread that
//! sleeps in `read` meanwhile must be woken for each request, and on a virtual machine waking a
//! halted CPU costs more than the request itself: measured here (`nkv_bench`, `--only put`), a
//! memory-class `PUT` from one sequential client took 51 µs at the median with the sleeping
//! thread and 22 µs with this wait (see docs/PERFORMANCE.md). So before sleeping, a connection thread polls its socket for up to
//! `--spin` microseconds.
//!
//! Polling burns a CPU, so it is bounded five ways:
//! - at most one thread fewer than the CPUs polls at a time, and none on a single CPU, where
//!   polling only keeps the client it waits for from running;
//! - a connection polls only if no other connection thread woke up (for a request, a
//!   connection, a subscriber's work) since its own last wait, and stops as soon as one does:
//!   the server is then busy, its threads need the CPUs more than one client needs a quick
//!   reply, and a poller would only compete with them (measured: with 8 clients and polling
//!   whenever a slot was free, `GET` fell from 124k to 69k ops/s). So it pays only while one
//!   client is active, as a script's or a single service's is;
//! - a connection whose client did not come back within the window stops polling for its next
//!   [`BACK_OFF`] requests, so an interactive or slow client costs at most one window now and
//!   then;
//! - only between requests: a partial line is waited for asleep, with the idle timeout armed
//!   (a client trickling a line byte by byte must neither outlive `--idle-timeout` nor keep a
//!   CPU busy);
//! - `--spin 0` turns it off (for battery-powered devices, say).

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Requests a connection waits for asleep after one whose client took longer than the window.
const BACK_OFF: u32 = 8;

/// The server-wide budget of polling threads.
#[derive(Debug)]
pub struct Spin {
    window: Duration,
    /// Threads polling now.
    polling: AtomicUsize,
    /// At most this many at once.
    max: usize,
    /// Counts the times a connection thread woke from a wait: a poller stops when it moves.
    wakes: AtomicU64,
}

impl Spin {
    /// A budget for `window` per wait, sized to the CPUs this process may run on.
    pub fn new(window: Duration) -> Spin {
        let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        Spin::with_max(window, cpus.saturating_sub(1))
    }

    fn with_max(window: Duration, max: usize) -> Spin {
        Spin {
            window,
            polling: AtomicUsize::new(0),
            max: if window.is_zero() { 0 } else { max },
            wakes: AtomicU64::new(0),
        }
    }

    /// A connection thread woke from a wait (its client, the listener, a publisher's ring):
    /// the server has work, so pollers stop.
    pub fn woke(&self) {
        if self.max > 0 {
            self.wakes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes a polling slot, if one is free.
    fn enter(&self) -> Option<Slot<'_>> {
        self.polling
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self))
    }
}

/// A polling slot, given back on drop.
struct Slot<'a>(&'a Spin);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.polling.fetch_sub(1, Ordering::Release);
    }
}

/// One connection's side of the budget: whether its client has been coming back quickly.
#[derive(Debug)]
pub struct SpinWait {
    spin: std::sync::Arc<Spin>,
    /// Requests left to wait for asleep.
    backing_off: u32,
    /// [`Spin::wakes`] when this connection last stopped waiting: another value at the next
    /// wait means another thread woke meanwhile.
    wakes_seen: u64,
}

/// What polling found.
pub enum Polled<T> {
    /// `try_read` produced this.
    Ready(T),
    /// Nothing within the window, or polling was not allowed: sleep on the socket.
    Sleep,
}

impl SpinWait {
    pub fn new(spin: std::sync::Arc<Spin>) -> SpinWait {
        let wakes_seen = spin.wakes.load(Ordering::Relaxed);
        SpinWait {
            spin,
            backing_off: 0,
            wakes_seen,
        }
    }

    /// This connection's thread woke from a sleeping read: counted for the others, not for
    /// itself.
    pub fn woke(&mut self) {
        if self.spin.max > 0 {
            self.wakes_seen = self.spin.wakes.fetch_add(1, Ordering::Relaxed) + 1;
        }
    }

    /// Calls `try_read` (a non-blocking read: `None` when nothing is there yet) until it gives
    /// something, the window passes or another connection thread wakes, if this connection
    /// may poll and a slot is free.
    pub fn poll<T>(&mut self, mut try_read: impl FnMut() -> Option<T>) -> Polled<T> {
        if self.backing_off > 0 {
            self.backing_off -= 1;
            return Polled::Sleep;
        }
        let wakes = self.spin.wakes.load(Ordering::Relaxed);
        if wakes != self.wakes_seen {
            // The server is busy: not this client's slowness, so no backing off.
            self.wakes_seen = wakes;
            return Polled::Sleep;
        }
        let Some(_slot) = self.spin.enter() else {
            return Polled::Sleep;
        };
        let until = Instant::now() + self.spin.window;
        loop {
            if let Some(got) = try_read() {
                return Polled::Ready(got);
            }
            let now_wakes = self.spin.wakes.load(Ordering::Relaxed);
            if now_wakes != wakes {
                self.wakes_seen = now_wakes;
                return Polled::Sleep;
            }
            if Instant::now() >= until {
                self.backing_off = BACK_OFF;
                return Polled::Sleep;
            }
            // Not a pure spin: a thread woken onto this CPU must not wait behind the poller.
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn no_slot_means_no_polling() {
        let spin = Arc::new(Spin::with_max(Duration::from_millis(10), 0));
        let mut wait = SpinWait::new(spin);
        let mut calls = 0;
        assert!(matches!(
            wait.poll(|| {
                calls += 1;
                Some(())
            }),
            Polled::Sleep
        ));
        assert_eq!(calls, 0);
    }

    #[test]
    fn a_zero_window_never_polls() {
        let spin = Arc::new(Spin::with_max(Duration::ZERO, 4));
        assert!(spin.enter().is_none());
    }

    #[test]
    fn slots_are_bounded_and_given_back() {
        let spin = Spin::with_max(Duration::from_micros(1), 2);
        let a = spin.enter().expect("first slot");
        let b = spin.enter().expect("second slot");
        assert!(spin.enter().is_none());
        drop(a);
        let c = spin.enter().expect("a slot given back");
        drop((b, c));
        assert_eq!(spin.polling.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn another_thread_waking_stops_polling_without_backing_off() {
        let spin = Arc::new(Spin::with_max(Duration::from_secs(60), 1));
        let mut wait = SpinWait::new(spin.clone());
        let started = Instant::now();
        let mut calls = 0;
        let polled = wait.poll(|| {
            calls += 1;
            if calls == 3 {
                spin.woke();
            }
            None::<()>
        });
        assert!(matches!(polled, Polled::Sleep));
        assert!(started.elapsed() < Duration::from_secs(10), "it polled on");
        assert!(
            matches!(wait.poll(|| Some(1)), Polled::Ready(1)),
            "it backed off"
        );
    }

    #[test]
    fn a_thread_that_woke_meanwhile_means_no_polling_this_time() {
        let spin = Arc::new(Spin::with_max(Duration::from_secs(60), 1));
        let mut wait = SpinWait::new(spin.clone());
        spin.woke();
        let mut calls = 0;
        let polled = wait.poll(|| {
            calls += 1;
            Some(())
        });
        assert!(matches!(polled, Polled::Sleep));
        assert_eq!(calls, 0);
        assert!(matches!(wait.poll(|| Some(2)), Polled::Ready(2)));
    }

    #[test]
    fn its_own_wakes_do_not_stop_a_connection_polling() {
        let spin = Arc::new(Spin::with_max(Duration::from_secs(60), 1));
        let mut wait = SpinWait::new(spin);
        wait.woke();
        wait.woke();
        assert!(matches!(wait.poll(|| Some(3)), Polled::Ready(3)));
    }

    #[test]
    fn a_client_that_does_not_come_back_is_waited_for_asleep_for_a_while() {
        let spin = Arc::new(Spin::with_max(Duration::from_micros(50), 1));
        let mut wait = SpinWait::new(spin);
        assert!(matches!(wait.poll(|| None::<()>), Polled::Sleep));
        let mut calls = 0;
        for _ in 0..BACK_OFF {
            assert!(matches!(
                wait.poll(|| {
                    calls += 1;
                    Some(())
                }),
                Polled::Sleep
            ));
        }
        assert_eq!(calls, 0, "backing off, it must not poll");
        assert!(matches!(wait.poll(|| Some(7)), Polled::Ready(7)));
    }
}

//! What Ctrl-C (SIGINT) and SIGTERM do while the client follows events.
//!
//! Outside a terminal session they end the process with 128 + the signal number (130 for
//! Ctrl-C), the shell's convention, so `while nkv-client subscribe ...; do ...; done` stops.
//! At a session's prompt, Ctrl-C during `subscribe`, `wait` or `watch` ends that command and
//! returns to the prompt. Nothing is installed until a command follows events, so one-shot
//! requests keep the default behaviour.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use nkv::client::Interrupter;

/// Whether Ctrl-C should return to the prompt (set for a terminal session).
static TO_PROMPT: AtomicBool = AtomicBool::new(false);
/// The command being followed at the prompt, to interrupt.
static CURRENT: Mutex<Option<Interrupter>> = Mutex::new(None);
static INSTALL: Once = Once::new();
/// Set by `put --session`: an interrupt is how it is meant to end, so it exits 0.
static EXIT_ZERO: AtomicBool = AtomicBool::new(false);

/// Installs the handler thread (once).
pub fn install() {
    INSTALL.call_once(|| {
        let Ok(mut signals) = Signals::new([SIGINT, SIGTERM]) else {
            return;
        };
        std::thread::spawn(move || {
            for signal in signals.forever() {
                if signal == SIGINT && TO_PROMPT.load(Ordering::SeqCst) {
                    let current = CURRENT.lock().unwrap_or_else(|e| e.into_inner()).take();
                    if let Some(interrupter) = current {
                        interrupter.interrupt();
                    }
                    continue;
                }
                if EXIT_ZERO.load(Ordering::SeqCst) {
                    std::process::exit(0);
                }
                std::process::exit(128 + signal);
            }
        });
    });
}

/// Makes SIGINT and SIGTERM end the process with status 0 (`put --session`: exiting closes
/// the connection, and the server deletes the key).
pub fn exit_zero_on_interrupt() {
    EXIT_ZERO.store(true, Ordering::SeqCst);
    install();
}

/// Makes Ctrl-C return to the prompt instead of exiting.
pub fn return_to_prompt() {
    TO_PROMPT.store(true, Ordering::SeqCst);
    install();
}

/// Follows a command: Ctrl-C at the prompt interrupts it (through its interrupter).
pub struct Following;

impl Following {
    pub fn start(interrupter: Option<Interrupter>) -> Following {
        install();
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = interrupter;
        Following
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        CURRENT.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

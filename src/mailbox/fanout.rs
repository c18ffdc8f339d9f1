//! Sending a large fan-out on two CPUs at once.
//!
//! The thread that made a change kicks every mailbox it gave an event to, one `send` each;
//! with hundreds of subscribers that is most of the change's cost, done on one CPU while the
//! others may be idle. So a fan-out of at least [`SHARE_FROM`] mailboxes is split: the
//! publisher kicks one part and hands the others to helper threads (one per further CPU,
//! started at the first such fan-out), which kick them at the same time.
//!
//! Sharing needs no other care: a kick sends what its mailbox holds, in queue order, and at
//! most one thread sends per mailbox at a time (see the module doc of [`super`]), so which
//! thread kicks a mailbox, and when, changes neither what a subscriber receives nor its order.
//! A helper that falls behind is not waited for: with [`PENDING`] parts queued, the publisher
//! kicks its parts itself.

use std::sync::{Arc, OnceLock};
use std::thread;

use crossbeam_channel::{Receiver, Sender};

use super::Mailbox;

/// A fan-out to this many mailboxes or more is shared with the helpers: below it, waking a
/// helper costs more than the sends it would take over.
pub const SHARE_FROM: usize = 32;
/// Parts queued for the helpers at most.
const PENDING: usize = 16;

type Part = Vec<Arc<Mailbox>>;

/// Kicks every mailbox in `mailboxes` (emptying it), sharing a large fan-out with the helpers.
pub fn kick_all(mailboxes: &mut Vec<Arc<Mailbox>>) {
    if mailboxes.len() >= SHARE_FROM {
        if let Some(helpers) = helpers() {
            let parts = helpers.count + 1;
            let size = mailboxes.len().div_ceil(parts);
            while mailboxes.len() > size {
                let part = mailboxes.split_off(mailboxes.len() - size);
                if let Err(refused) = helpers.tx.try_send(part) {
                    kick(refused.into_inner());
                }
            }
        }
    }
    for mailbox in mailboxes.drain(..) {
        mailbox.kick();
    }
}

fn kick(part: Part) {
    for mailbox in part {
        mailbox.kick();
    }
}

struct Helpers {
    tx: Sender<Part>,
    count: usize,
}

/// The helpers' queue; `None` on one CPU, or when no helper could be started.
fn helpers() -> Option<&'static Helpers> {
    static HELPERS: OnceLock<Option<Helpers>> = OnceLock::new();
    HELPERS
        .get_or_init(|| {
            let cpus = thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
            let (tx, rx) = crossbeam_channel::bounded(PENDING);
            let mut count = 0;
            for _ in 1..cpus {
                let rx: Receiver<Part> = rx.clone();
                let started = thread::Builder::new()
                    .name("nkv-fanout".into())
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        for part in rx {
                            kick(part);
                        }
                    });
                match started {
                    Ok(_) => count += 1,
                    Err(e) => {
                        log::warn!("cannot start a fan-out thread: {e}");
                        break;
                    }
                }
            }
            (count > 0).then_some(Helpers { tx, count })
        })
        .as_ref()
}

//! What a subscriber connection is sent: typed items, formatted only when they are sent.

use std::sync::{Arc, OnceLock};

use crate::key::{Key, Target};
use crate::protocol::{write_ready, write_reset, Event, SHUTDOWN_EVENT};

/// One change as published to every covering subscriber. Shared (`Arc`) by all their mailboxes:
/// its line is formatted once, by whichever subscriber sends it first, and the same bytes go to
/// all of them.
#[derive(Debug)]
pub struct Published {
    pub event: Event,
    line: OnceLock<Box<[u8]>>,
}

impl Published {
    pub fn new(event: Event) -> Arc<Published> {
        Arc::new(Published {
            event,
            line: OnceLock::new(),
        })
    }

    /// The event line, `\n` included, formatted on first use.
    pub fn line(&self) -> &[u8] {
        self.line.get_or_init(|| {
            let mut out = Vec::with_capacity(self.weight() + 64);
            self.event.write(&mut out);
            out.into_boxed_slice()
        })
    }

    fn weight(&self) -> usize {
        self.event.value.as_ref().map_or(0, |v| v.len())
    }
}

/// An item in a mailbox.
#[derive(Debug, Clone)]
pub enum Item {
    /// A change of a key (shared with the other subscribers); may be coalesced.
    Change(Arc<Published>),
    /// A change that replaced `n` earlier pending changes of its key in this mailbox (it is
    /// sent with `"skipped":n`); may be coalesced again.
    Skipped(Arc<Published>, u64),
    /// A key's value in a subscription's snapshot; may take a later value of its key, is never
    /// dropped.
    Init(Event),
    /// The end of a subscription's snapshot; `rev` is the revision it was taken at.
    Ready {
        target: Target,
        count: usize,
        rev: u64,
        /// The history `rev` belongs to.
        epoch: crate::disk::Epoch,
    },
    /// A resume the delete history could not answer: a full snapshot follows.
    Reset(Target),
    /// A response line, `\n` included (`SUB`/`UNSUB`/`HELLO`/`HEALTH`/`QUIT` answers, errors).
    Reply(Box<[u8]>),
    /// The server is stopping: the last item a mailbox ever takes.
    Shutdown,
}

impl Item {
    /// The key of an event item.
    pub fn key(&self) -> Option<&Key> {
        match self {
            Item::Change(p) | Item::Skipped(p, _) => Some(&p.event.key),
            Item::Init(e) => Some(&e.key),
            _ => None,
        }
    }

    /// Value bytes held, for the queue's byte budget.
    pub fn weight(&self) -> usize {
        match self {
            Item::Change(p) | Item::Skipped(p, _) => p.weight(),
            Item::Init(e) => e.value.as_ref().map_or(0, |v| v.len()),
            Item::Reply(line) => line.len(),
            Item::Ready { .. } | Item::Reset(_) | Item::Shutdown => 0,
        }
    }

    /// A line rather than an event: never dropped, never merged into, never overtaken.
    pub fn is_line(&self) -> bool {
        self.key().is_none()
    }

    /// Roughly how many bytes the item's line takes, to bound a batch before formatting it.
    pub fn size_hint(&self) -> usize {
        self.weight() + 64
    }

    /// How many earlier changes of its key this item replaced.
    pub fn skipped(&self) -> u64 {
        match self {
            Item::Skipped(_, n) => *n,
            _ => 0,
        }
    }

    /// This change, standing also for `n` more replaced ones. Lines and `init`s are kept as
    /// they are (an `init` restates the key's whole state).
    pub fn replacing(self, n: u64) -> Item {
        match self {
            Item::Change(p) | Item::Skipped(p, _) => Item::Skipped(p, n),
            other => other,
        }
    }

    /// Appends the item's line.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            Item::Change(p) => out.extend_from_slice(p.line()),
            Item::Init(e) => e.write(out),
            Item::Skipped(p, n) => {
                // The shared line ends in `}\n`: the count goes before it.
                let line = p.line();
                out.extend_from_slice(&line[..line.len() - 2]);
                let _ = std::io::Write::write_fmt(out, format_args!(",\"skipped\":{n}}}\n"));
            }
            Item::Ready {
                target,
                count,
                rev,
                epoch,
            } => write_ready(target, *count, *rev, *epoch, out),
            Item::Reset(target) => write_reset(target, out),
            Item::Reply(line) => out.extend_from_slice(line),
            Item::Shutdown => out.extend_from_slice(SHUTDOWN_EVENT),
        }
    }
}

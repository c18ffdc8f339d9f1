//! What a subscriber connection is sent: typed items, formatted only when they are sent.

use std::sync::{Arc, OnceLock};

use crate::key::{Key, Target};
use crate::protocol::{write_ready, Event, SHUTDOWN_EVENT};

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
    /// A key's value in a subscription's snapshot; may take a later value of its key, is never
    /// dropped.
    Init(Event),
    /// The end of a subscription's snapshot.
    Ready { target: Target, count: usize },
    /// A response line, `\n` included (`SUB`/`UNSUB`/`HELLO`/`HEALTH`/`QUIT` answers, errors).
    Reply(Box<[u8]>),
    /// The server is stopping: the last item a mailbox ever takes.
    Shutdown,
}

impl Item {
    /// The key of an event item.
    pub fn key(&self) -> Option<&Key> {
        match self {
            Item::Change(p) => Some(&p.event.key),
            Item::Init(e) => Some(&e.key),
            _ => None,
        }
    }

    /// Value bytes held, for the queue's byte budget.
    pub fn weight(&self) -> usize {
        match self {
            Item::Change(p) => p.weight(),
            Item::Init(e) => e.value.as_ref().map_or(0, |v| v.len()),
            Item::Reply(line) => line.len(),
            Item::Ready { .. } | Item::Shutdown => 0,
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

    /// Appends the item's line.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            Item::Change(p) => out.extend_from_slice(p.line()),
            Item::Init(e) => e.write(out),
            Item::Ready { target, count } => write_ready(target, *count, out),
            Item::Reply(line) => out.extend_from_slice(line),
            Item::Shutdown => out.extend_from_slice(SHUTDOWN_EVENT),
        }
    }
}

//! The ordered, coalescing queue of one mailbox: pure data, no I/O, no locking (the mailbox holds
//! it under its one lock). Every decision about what is kept, replaced and taken next is made
//! here, so it can be model-checked on its own (see the proptest state machine below).
//!
//! # Rules
//! - Items are taken in push order (by sequence number); a replaced event keeps its place.
//! - While the queue is under its capacity (items and value bytes), every push is appended:
//!   a subscriber that keeps up sees every revision.
//! - Over capacity, a line (replies, markers) is still appended; an event of key `k`:
//!   - with a pending event of `k` after the last line: replaces it in place (coalesced);
//!   - with a pending non-`init` event of `k` before a line: that one is dropped and the new one
//!     appended (coalesced), so an event never moves ahead of a line pushed before it;
//!   - a change that replaces another stands for it too: it carries `skipped` = the replaced
//!     one's `skipped` + 1 ([`Item::Skipped`]), so `skipped` counts exactly the changes of its
//!     key this subscriber will never see (an `init` that replaces a change restates the whole
//!     state and carries none);
//!   - otherwise (no pending event of `k`, or it is a snapshot's `init` before its `ready`): is
//!     appended.
//! - After [`Item::Shutdown`] or [`Queue::close`] nothing more is accepted.
//!
//! So at most one event per key is pending beyond the capacity, plus one `init` per key of a
//! pending snapshot; the connection reads no request while a snapshot or too many replies are
//! pending, which bounds the rest.

use std::collections::{BTreeMap, HashMap};

use super::item::Item;
use crate::key::Key;

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Replaced an older pending event of the same key.
    Coalesced,
    /// The mailbox is closed; the item was dropped.
    Closed,
}

#[derive(Debug)]
pub struct Queue {
    items: BTreeMap<u64, Item>,
    next_seq: u64,
    /// Each key's latest pending event.
    latest: HashMap<Key, u64>,
    /// The sequence number of the last line ever pushed (pending or already taken).
    last_line: Option<u64>,
    value_bytes: usize,
    replies: usize,
    /// The most items pending since the queue was last empty.
    high_water: usize,
    /// Bytes of the pending replies (an `id` is echoed, so one reply can be megabytes).
    reply_bytes: usize,
    snapshots: usize,
    /// Changes replaced by a later one of their key, since the mailbox was created.
    coalesced: u64,
    closed: bool,
    cap_items: usize,
    cap_bytes: usize,
}

impl Queue {
    pub fn new(cap_items: usize, cap_bytes: usize) -> Queue {
        Queue {
            items: BTreeMap::new(),
            next_seq: 0,
            latest: HashMap::new(),
            last_line: None,
            value_bytes: 0,
            replies: 0,
            high_water: 0,
            reply_bytes: 0,
            snapshots: 0,
            coalesced: 0,
            closed: false,
            cap_items,
            cap_bytes,
        }
    }

    pub fn push(&mut self, item: Item) -> Pushed {
        if self.closed {
            return Pushed::Closed;
        }
        let weight = item.weight();
        let over = self.items.len() >= self.cap_items || self.value_bytes + weight > self.cap_bytes;
        if let (true, Some(key)) = (over, item.key()) {
            if let Some(&seq) = self.latest.get(key) {
                let pending_init = matches!(self.items.get(&seq), Some(Item::Init(_)));
                let after_last_line = self.last_line.is_none_or(|line| seq > line);
                if !pending_init && after_last_line {
                    let skipped = self.items.get(&seq).map_or(0, |o| o.skipped() + 1);
                    let old = self.items.insert(seq, item.replacing(skipped));
                    self.value_bytes -= old.map_or(0, |o| o.weight());
                    self.value_bytes += weight;
                    self.coalesced += 1;
                    return Pushed::Coalesced;
                }
                if !pending_init {
                    let mut item = item;
                    if let Some(old) = self.items.remove(&seq) {
                        self.value_bytes -= old.weight();
                        item = item.replacing(old.skipped() + 1);
                    }
                    self.coalesced += 1;
                    self.append(item, weight);
                    return Pushed::Coalesced;
                }
            }
        }
        self.append(item, weight);
        Pushed::Queued
    }

    fn append(&mut self, item: Item, weight: usize) {
        let seq = self.next_seq;
        self.next_seq += 1;
        match &item {
            Item::Reply(line) => {
                self.replies += 1;
                self.reply_bytes += line.len();
            }
            Item::Ready { .. } => self.snapshots += 1,
            Item::Shutdown => self.closed = true,
            Item::Change(_) | Item::Skipped(..) | Item::Init(_) | Item::Reset(_) => {}
        }
        match item.key() {
            Some(key) => {
                self.latest.insert(key.clone(), seq);
            }
            None => self.last_line = Some(seq),
        }
        self.value_bytes += weight;
        self.items.insert(seq, item);
        self.high_water = self.high_water.max(self.items.len());
    }

    /// The next item to send.
    pub fn front(&self) -> Option<&Item> {
        self.items.first_key_value().map(|(_, item)| item)
    }

    /// Takes the next item to send.
    pub fn pop(&mut self) -> Option<Item> {
        let (seq, item) = self.items.pop_first()?;
        if let Some(key) = item.key() {
            if self.latest.get(key) == Some(&seq) {
                self.latest.remove(key);
            }
        }
        match &item {
            Item::Reply(line) => {
                self.replies -= 1;
                self.reply_bytes -= line.len();
            }
            Item::Ready { .. } => self.snapshots -= 1,
            _ => {}
        }
        self.value_bytes -= item.weight();
        if self.items.is_empty() {
            // Give the memory of a burst back.
            self.latest = HashMap::new();
        }
        Some(item)
    }

    /// How many items were pending at most since the queue was last emptied, and starts
    /// counting again: the caller gives memory back after a large drain.
    pub fn take_high_water(&mut self) -> usize {
        std::mem::take(&mut self.high_water)
    }

    /// Accept nothing more.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Drops everything pending (the subscriber is gone) and accepts nothing more.
    pub fn clear(&mut self) {
        self.items.clear();
        self.latest = HashMap::new();
        self.value_bytes = 0;
        self.replies = 0;
        self.reply_bytes = 0;
        self.snapshots = 0;
        self.closed = true;
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Pending response lines.
    pub fn replies(&self) -> usize {
        self.replies
    }

    /// Bytes of the pending response lines.
    pub fn reply_bytes(&self) -> usize {
        self.reply_bytes
    }

    /// Pending `ready` markers (snapshots not yet fully taken).
    pub fn snapshots(&self) -> usize {
        self.snapshots
    }

    /// Changes replaced by a later one of their key since the start.
    pub fn coalesced(&self) -> u64 {
        self.coalesced
    }

    /// Whether the queue is past its capacity (so events are being coalesced).
    pub fn is_over(&self) -> bool {
        self.items.len() >= self.cap_items || self.value_bytes > self.cap_bytes
    }

    #[cfg(test)]
    pub fn value_bytes(&self) -> usize {
        self.value_bytes
    }
}

#[cfg(test)]
mod tests;

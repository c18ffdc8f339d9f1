//! Who subscribes to what, and publishing a change to the matching subscribers without blocking.
//!
//! Lock order: the store's map lock, then this table's lock, then a mailbox's mutex. Every
//! publish runs while the store holds its map lock exclusively, and every snapshot is taken while
//! it holds the map lock shared — that is what makes "snapshot + register" atomic. Sending (a
//! mailbox's kick) happens after the map lock is released.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::key::{Key, Target};
use crate::mailbox::{Item, Mailbox, Published, Pushed};
use crate::protocol::{Event, SubscriberInfo};

/// A subscriber connection as the table knows it.
struct Subscriber {
    name: String,
    targets: Vec<Target>,
    mailbox: Arc<Mailbox>,
}

fn info(id: u64, sub: &Subscriber) -> SubscriberInfo {
    let (pending, coalesced) = sub.mailbox.lag();
    SubscriberInfo {
        id,
        name: sub.name.clone(),
        subscriptions: sub.targets.iter().map(Target::to_string).collect(),
        pending,
        coalesced,
    }
}

/// Why a subscription could not be added or removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubError {
    /// The connection already has `max` subscriptions.
    Limit(usize),
    /// `UNSUB` of a target this connection does not have.
    NotSubscribed,
    /// The server is stopping: no new subscriptions.
    Stopping,
}

/// The subscription table.
#[derive(Default)]
pub struct Notifier {
    /// Subscriber connections by connection id. Written on SUB/UNSUB/close (rare); read by every
    /// publish. See the module doc for the lock order.
    subscribers: RwLock<HashMap<u64, Subscriber>>,
    /// Events queued to subscribers since start.
    events: AtomicU64,
    /// Events replaced in an overflowing mailbox by a later event of the same key.
    coalesced: AtomicU64,
    /// Subscribers disconnected because their socket accepted nothing for `--send-timeout`.
    dropped_slow: AtomicU64,
    /// Subscribers that left the table but whose connection is still sending what was queued
    /// (after end of file, say): they still count as `behind` until the connection ends.
    leaving: Mutex<HashMap<u64, Arc<Mailbox>>>,
    /// Set (under the table's write lock) once subscribers were sent `shutdown`: none is added
    /// after that, so none misses it.
    stopped: AtomicBool,
}

impl Notifier {
    /// Queues `event` for every subscriber that covers its key and returns their mailboxes, to
    /// be [kicked](Mailbox::kick) once the caller has released the map lock. Never blocks on a
    /// subscriber. The event is shared by all of them and formatted once. The caller holds the
    /// store's map lock exclusively.
    #[must_use = "queued events are sent when their mailboxes are kicked"]
    pub fn publish(&self, event: &Event) -> Vec<Arc<Mailbox>> {
        let subscribers = self.subscribers.read();
        let mut touched = Vec::new();
        let mut shared: Option<Arc<Published>> = None;
        for sub in subscribers.values() {
            if sub.targets.iter().any(|t| t.covers(&event.key)) {
                let published = shared.get_or_insert_with(|| Published::new(event.clone()));
                self.push(&sub.mailbox, Item::Change(published.clone()));
                touched.push(sub.mailbox.clone());
            }
        }
        touched
    }

    /// Pushes to one mailbox and counts what happened.
    pub fn push(&self, mailbox: &Mailbox, item: Item) {
        let is_event = item.key().is_some();
        match mailbox.push(item) {
            Pushed::Coalesced => {
                self.coalesced.fetch_add(1, Ordering::Relaxed);
            }
            Pushed::Queued | Pushed::Closed => {}
        }
        if is_event {
            self.events.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds `target` to connection `id`'s subscriptions (registering the connection on its first
    /// one) and returns its mailbox. The caller holds the store's map lock, shared, and fills the
    /// snapshot before releasing it.
    ///
    /// # Errors
    /// [`SubError::Limit`] when the connection already has `max` subscriptions.
    pub fn add(
        &self,
        id: u64,
        name: &str,
        mailbox: &Arc<Mailbox>,
        target: &Target,
        max: usize,
    ) -> Result<(), SubError> {
        let mut subscribers = self.subscribers.write();
        if self.stopped.load(Ordering::Acquire) {
            return Err(SubError::Stopping);
        }
        let sub = subscribers.entry(id).or_insert_with(|| Subscriber {
            name: name.to_owned(),
            targets: Vec::new(),
            mailbox: mailbox.clone(),
        });
        if sub.targets.contains(target) {
            return Ok(());
        }
        if sub.targets.len() >= max {
            return Err(SubError::Limit(max));
        }
        sub.targets.push(target.clone());
        Ok(())
    }

    /// Drops one subscription of connection `id`.
    ///
    /// # Errors
    /// [`SubError::NotSubscribed`] when the connection has no such subscription.
    pub fn remove(&self, id: u64, target: &Target) -> Result<(), SubError> {
        let mut subscribers = self.subscribers.write();
        let sub = subscribers.get_mut(&id).ok_or(SubError::NotSubscribed)?;
        let before = sub.targets.len();
        sub.targets.retain(|t| t != target);
        if sub.targets.len() == before {
            return Err(SubError::NotSubscribed);
        }
        Ok(())
    }

    /// Removes connection `id` from the table: no more events for it. Its mailbox is kept for
    /// `behind` until [`forget`](Notifier::forget).
    pub fn unregister(&self, id: u64) {
        if let Some(sub) = self.subscribers.write().remove(&id) {
            self.leaving.lock().insert(id, sub.mailbox);
        }
    }

    /// Forgets connection `id` entirely (its thread is ending).
    pub fn forget(&self, id: u64) {
        self.unregister(id);
        self.leaving.lock().remove(&id);
    }

    /// Renames connection `id` if it is a subscriber.
    pub fn rename(&self, id: u64, name: &str) {
        if let Some(sub) = self.subscribers.write().get_mut(&id) {
            sub.name = name.to_owned();
        }
    }

    /// The subscribers whose subscriptions cover `key`, by connection id.
    pub fn trace(&self, key: &Key) -> Vec<SubscriberInfo> {
        let subscribers = self.subscribers.read();
        let mut found: Vec<SubscriberInfo> = subscribers
            .iter()
            .filter(|(_, sub)| sub.targets.iter().any(|t| t.covers(key)))
            .map(|(id, sub)| info(*id, sub))
            .collect();
        found.sort_by_key(|info| info.id);
        found
    }

    /// Every subscriber, by connection id, with its lag.
    pub fn all(&self) -> Vec<SubscriberInfo> {
        let subscribers = self.subscribers.read();
        let mut found: Vec<SubscriberInfo> =
            subscribers.iter().map(|(id, sub)| info(*id, sub)).collect();
        found.sort_by_key(|info| info.id);
        found
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.read().len()
    }

    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    pub fn coalesced(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }

    /// Subscribers that are behind: coalescing, or their socket is full.
    pub fn behind(&self) -> usize {
        let subscribers = self.subscribers.read();
        let live = subscribers
            .values()
            .filter(|s| s.mailbox.is_behind())
            .count();
        drop(subscribers);
        live + self
            .leaving
            .lock()
            .values()
            .filter(|m| m.is_behind())
            .count()
    }

    pub fn dropped_slow(&self) -> u64 {
        self.dropped_slow.load(Ordering::Relaxed)
    }

    /// Counts a subscriber dropped for not reading within `--send-timeout`.
    pub fn note_dropped_slow(&self) {
        self.dropped_slow.fetch_add(1, Ordering::Relaxed);
    }

    /// Tells every subscriber the server is stopping: `shutdown` is the last item each mailbox
    /// takes; no subscription is added afterwards. The caller has let in-flight changes finish,
    /// so their events are queued before it.
    pub fn shutdown(&self) {
        let subscribers = self.subscribers.write();
        self.stopped.store(true, Ordering::Release);
        for sub in subscribers.values() {
            sub.mailbox.push(Item::Shutdown);
            sub.mailbox.ring();
        }
    }
}

//! The shared map of keys to values, kept on disk and announced to subscribers.
//!
//! A change of one key runs: take the key's stripe lock → next revision → write the file →
//! take the map lock exclusively → update the map and publish the event → release. The map lock
//! is never held across disk I/O; the stripe lock is what keeps file, map and events agreeing on
//! the order of one key's changes, while changes of different keys write their files in parallel.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::disk::{Disk, OpenError, Options, MAX_REV};
use crate::error::WriteError;
use crate::key::{Key, Pattern, Target};
use crate::mailbox::{Item, Kicks, Mailbox};
use crate::notify::{Notifier, SubError};
use crate::protocol::{Event, EventKind};

pub use crate::value::Value;

/// Number of per-key order locks. Keys hash onto them; more stripes, fewer false collisions.
const STRIPES: usize = 256;

#[derive(Clone)]
struct Entry {
    value: Value,
    rev: u64,
}

/// The store: map, disk and subscriptions.
pub struct Store {
    /// Every key's current value and revision. Shared by GET, KEYS and subscription snapshots;
    /// exclusive only for the instant a change is applied and published (never across I/O).
    map: RwLock<BTreeMap<Key, Entry>>,
    /// Per-key order: a change holds its key's stripe from revision to publish.
    stripes: Box<[Mutex<()>]>,
    hasher: RandomState,
    /// The last revision handed out.
    rev: AtomicU64,
    /// Changes applied and announced whose fsync failed (`not_durable` answers), for STATS.
    not_durable: AtomicU64,
    disk: Disk,
    notifier: Notifier,
}

impl Store {
    /// Opens (and locks) the data directory and loads every key.
    ///
    /// # Errors
    /// See [`Disk::open`].
    pub fn open(dir: &Path, options: &Options) -> Result<Store, OpenError> {
        let (disk, contents) = Disk::open(dir, options)?;
        let map = contents
            .entries
            .into_iter()
            .map(|l| {
                (
                    l.key,
                    Entry {
                        value: l.value,
                        rev: l.rev,
                    },
                )
            })
            .collect();
        Ok(Store {
            map: RwLock::new(map),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: RandomState::new(),
            rev: AtomicU64::new(contents.max_rev),
            not_durable: AtomicU64::new(0),
            disk,
            notifier: Notifier::default(),
        })
    }

    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    pub fn data_dir(&self) -> &Path {
        self.disk.dir()
    }

    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last revision handed out.
    pub fn rev(&self) -> u64 {
        self.rev.load(Ordering::Acquire)
    }

    fn stripe(&self, key: &Key) -> &Mutex<()> {
        let slot = self.hasher.hash_one(key.as_str()) as usize % self.stripes.len();
        &self.stripes[slot]
    }

    /// Changes answered `not_durable` since start.
    pub fn not_durable(&self) -> u64 {
        self.not_durable.load(Ordering::Relaxed)
    }

    /// The next revision; checked, so it never wraps past [`MAX_REV`].
    fn next_rev(&self) -> Result<u64, WriteError> {
        self.rev
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                r.checked_add(1).filter(|&n| n <= MAX_REV)
            })
            .map(|r| r + 1)
            .map_err(|_| WriteError::RevisionsExhausted(MAX_REV))
    }

    /// Whether the disk's outcome means the change is in place (and must be applied and
    /// announced so memory, disk and subscribers agree); the error, if any, is kept for the
    /// caller. A change that failed gives its revision back unless a later one was taken
    /// meanwhile (then the number is skipped): an unacknowledged revision is never reused
    /// after one acknowledged.
    fn in_place(
        &self,
        rev: u64,
        outcome: Result<(), WriteError>,
    ) -> Result<Option<WriteError>, WriteError> {
        match outcome {
            Ok(()) => Ok(None),
            Err(err @ WriteError::NotDurable { .. }) => {
                self.not_durable.fetch_add(1, Ordering::Relaxed);
                Ok(Some(err))
            }
            Err(err) => {
                let _ =
                    self.rev
                        .compare_exchange(rev, rev - 1, Ordering::AcqRel, Ordering::Acquire);
                Err(err)
            }
        }
    }

    /// Test hook, debug builds only: a put of the key named by `NKV_DEBUG_PANIC_KEY` panics
    /// while holding its stripe lock and the map lock, to prove a panicking connection thread
    /// neither takes the server down nor leaves shared state locked or poisoned.
    fn debug_panic(&self, key: &Key) {
        if cfg!(debug_assertions)
            && std::env::var_os("NKV_DEBUG_PANIC_KEY").is_some_and(|k| k == key.as_str())
        {
            let _map = self.map.write();
            panic!("NKV_DEBUG_PANIC_KEY: deliberate panic on put of {key}");
        }
    }

    /// A key's value and revision.
    pub fn get(&self, key: &Key) -> Option<(Value, u64)> {
        self.map.read().get(key).map(|e| (e.value.clone(), e.rev))
    }

    /// The keys and values a pattern matches, sorted by key.
    pub fn get_matching(&self, pattern: &Pattern) -> Vec<(Key, Value)> {
        let map = self.map.read();
        range(&map, &Target::Pattern(pattern.clone()))
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect()
    }

    /// The keys a target covers (all keys for `None`), sorted.
    pub fn keys(&self, target: Option<&Target>) -> Vec<Key> {
        let map = self.map.read();
        match target {
            None => map.keys().cloned().collect(),
            Some(t) => range(&map, t).map(|(k, _)| k.clone()).collect(),
        }
    }

    /// Stores `value` under `key`; returns the change's revision once the file is in place.
    /// The subscribers given the event are added to `kicks`, for the caller to kick once its
    /// reply is sent.
    ///
    /// # Errors
    /// The disk write failed; nothing changed (the revision number is skipped) — except for
    /// [`WriteError::NotDurable`]: the change is then applied and announced, only its fsync
    /// failed.
    pub fn put(&self, key: Key, value: Value, kicks: &mut Kicks) -> Result<u64, WriteError> {
        let order = self.stripe(&key).lock();
        self.debug_panic(&key);
        let rev = self.next_rev()?;
        let late = self.in_place(rev, self.disk.write(&key, rev, &value))?;
        let touched = {
            let mut map = self.map.write();
            map.insert(
                key.clone(),
                Entry {
                    value: value.clone(),
                    rev,
                },
            );
            self.notifier.publish(&Event {
                kind: EventKind::Put,
                key,
                value: Some(value),
                rev,
            })
        };
        drop(order);
        kicks.add(touched);
        late.map_or(Ok(rev), Err)
    }

    /// Deletes `key`; returns the delete's revision, or `None` if there was no such key.
    /// Subscribers to kick are added to `kicks`, as for [`put`](Store::put).
    ///
    /// # Errors
    /// The file could not be removed; nothing changed — except for
    /// [`WriteError::NotDurable`], as for [`put`](Store::put).
    pub fn delete(&self, key: &Key, kicks: &mut Kicks) -> Result<Option<u64>, WriteError> {
        let order = self.stripe(key).lock();
        if !self.map.read().contains_key(key) {
            return Ok(None);
        }
        let rev = self.next_rev()?;
        let late = self.in_place(rev, self.disk.remove(key, rev))?;
        let touched = {
            let mut map = self.map.write();
            map.remove(key);
            self.notifier.publish(&Event {
                kind: EventKind::Del,
                key: key.clone(),
                value: None,
                rev,
            })
        };
        drop(order);
        kicks.add(touched);
        late.map_or(Ok(Some(rev)), Err)
    }

    /// Deletes every key the pattern matches (each is its own change, with its own event).
    ///
    /// # Errors
    /// A file could not be removed; the keys deleted before it stay deleted. A delete that is
    /// only not durable does not stop the others; the last such error is returned at the end.
    pub fn delete_matching(
        &self,
        pattern: &Pattern,
        kicks: &mut Kicks,
    ) -> Result<usize, WriteError> {
        let mut deleted = 0;
        let mut late = None;
        for (key, _) in self.get_matching(pattern) {
            match self.delete(&key, kicks) {
                Ok(Some(_)) => deleted += 1,
                Ok(None) => {}
                Err(err @ WriteError::NotDurable { .. }) => {
                    deleted += 1;
                    late = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        late.map_or(Ok(deleted), Err)
    }

    /// Subscribes connection `id` to `target`: queues `ack`, an `init` event per covered key
    /// and the `ready` marker, and registers the subscription, all in one step no change can
    /// fall between. Returns the number of initial values; the caller sends them.
    ///
    /// # Errors
    /// The connection's subscription limit is reached; nothing was queued.
    pub fn subscribe(
        &self,
        id: u64,
        name: &str,
        mailbox: &Arc<Mailbox>,
        target: &Target,
        max_subs: usize,
        ack: Vec<u8>,
    ) -> Result<usize, SubError> {
        // Held shared until the snapshot is queued: no change can be applied meanwhile.
        let map = self.map.read();
        self.notifier.add(id, name, mailbox, target, max_subs)?;
        self.notifier.push(mailbox, Item::Reply(ack.into()));
        let mut count = 0;
        for (key, entry) in range(&map, target) {
            count += 1;
            self.notifier.push(
                mailbox,
                Item::Init(Event {
                    kind: EventKind::Init,
                    key: key.clone(),
                    value: Some(entry.value.clone()),
                    rev: entry.rev,
                }),
            );
        }
        self.notifier.push(
            mailbox,
            Item::Ready {
                target: target.clone(),
                count,
            },
        );
        drop(map);
        Ok(count)
    }
}

/// The entries a target covers, in key order, using the map's order: every key strictly
/// below `p` sorts in [`p.`, `p/`) because `/` is the byte after `.`.
fn range<'a>(
    map: &'a BTreeMap<Key, Entry>,
    target: &Target,
) -> Box<dyn Iterator<Item = (&'a Key, &'a Entry)> + 'a> {
    let (parent, include_self) = match target {
        Target::Pattern(Pattern::All) => return Box::new(map.iter()),
        Target::Pattern(Pattern::Below(parent)) => (parent, false),
        Target::Key(root) => (root, true),
    };
    let itself = include_self
        .then(|| map.get_key_value(parent.as_str()))
        .flatten();
    let lower = format!("{parent}.");
    let upper = format!("{parent}/");
    let below = map.range::<str, _>((
        Bound::Included(lower.as_str()),
        Bound::Excluded(upper.as_str()),
    ));
    Box::new(itself.into_iter().chain(below))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_segment_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &Options::new(false)).unwrap();
        for k in ["a", "a.b", "a.b.c", "ab", "a-b", "a.c", "b"] {
            store
                .put(
                    Key::parse(k).unwrap(),
                    Value::from("1"),
                    &mut Kicks::default(),
                )
                .unwrap();
        }
        let keys = |t: &str| -> Vec<String> {
            store
                .keys(Some(&Target::parse(t).unwrap()))
                .iter()
                .map(Key::to_string)
                .collect()
        };
        assert_eq!(keys("a"), ["a", "a.b", "a.b.c", "a.c"]);
        assert_eq!(keys("a.*"), ["a.b", "a.b.c", "a.c"]);
        assert_eq!(keys("a.b"), ["a.b", "a.b.c"]);
        assert_eq!(keys("*").len(), 7);
        assert_eq!(store.rev(), 7);
    }

    #[test]
    fn revisions_survive_a_restart_even_after_deletes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &Options::new(true)).unwrap();
            let a = Key::parse("a").unwrap();
            store
                .put(a.clone(), Value::from("1"), &mut Kicks::default())
                .unwrap();
            store
                .put(
                    Key::parse("b").unwrap(),
                    Value::from("2"),
                    &mut Kicks::default(),
                )
                .unwrap();
            assert_eq!(store.delete(&a, &mut Kicks::default()).unwrap(), Some(3));
            assert_eq!(store.delete(&a, &mut Kicks::default()).unwrap(), None);
        }
        let store = Store::open(dir.path(), &Options::new(false)).unwrap();
        assert_eq!(store.rev(), 3);
        assert_eq!(
            store.get(&Key::parse("b").unwrap()),
            Some((Value::from("2"), 2))
        );
    }
}

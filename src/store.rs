//! The shared map of keys to values, kept on disk and announced to subscribers.
//!
//! A change of one key runs: take the key's stripe lock → next revision → write the file →
//! take the map lock exclusively → update the map and publish the event → release. The map lock
//! is never held across disk I/O; the stripe lock is what keeps file, map and events agreeing on
//! the order of one key's changes, while changes of different keys write their files in parallel.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::class::{Class, ClassRules};
use crate::disk::{Disk, OpenError, Options};
use crate::error::WriteError;
use crate::history::History;
use crate::key::{Key, Pattern, Target};
use crate::mailbox::{Item, Kicks, Mailbox};
use crate::notify::{Notifier, SubError};
use crate::protocol::{Event, EventKind, Resume};
use crate::revseq::{RevSeq, Ticket};

pub use crate::value::Value;

/// Number of per-key order locks. Keys hash onto them; more stripes, fewer false collisions.
const STRIPES: usize = 256;

/// Revisions a change of a `memory` or `volatile` key may take before the data directory's
/// revision floor must be raised again. The floor is what the next start counts from, so
/// raising it ahead of those changes (in steps, not per change) keeps revisions going forward
/// across a restart that loses them, at the cost of a gap of at most this many.
const LEASE_STEP: u64 = 1 << 16;

/// Default bound of the delete history (`--tombstones`).
pub const DEFAULT_TOMBSTONES: usize = 100_000;

#[derive(Clone)]
struct Entry {
    value: Value,
    rev: u64,
    /// Where the value is kept (the class it was stored under).
    class: Class,
    /// The connection owning a session key; `None` for an ordinary key.
    owner: Option<u64>,
}

/// How the store is opened.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// The `volatile` class's directory; opened only when a rule uses the class.
    pub volatile_dir: PathBuf,
    pub classes: ClassRules,
    /// Most tombstones kept (`--tombstones`).
    pub tombstones: usize,
    pub options: Options,
}

impl Config {
    /// The data directory alone, default classes (nothing `volatile`).
    pub fn new(data_dir: &Path, options: &Options) -> Config {
        Config {
            data_dir: data_dir.to_owned(),
            volatile_dir: PathBuf::from("/dev/shm/nkv"),
            classes: ClassRules::default(),
            tombstones: DEFAULT_TOMBSTONES,
            options: options.clone(),
        }
    }
}

/// What a put asks for besides its value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PutOptions {
    /// Store only if the key is at this revision (0: only if it does not exist).
    pub if_rev: Option<u64>,
    /// A session key owned by this connection: `memory`, deleted when the connection ends.
    pub session: Option<u64>,
}

/// What a delete asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DelOptions {
    /// Delete only if the key is at this revision.
    pub if_rev: Option<u64>,
    /// Delete only if this connection owns the key as a session key (its end of session).
    pub only_owner: Option<u64>,
}

pub use crate::wire::ClassCounts;

/// The store: map, disk and subscriptions.
pub struct Store {
    /// Every key's current value and revision. Shared by GET, KEYS and subscription snapshots;
    /// exclusive only for the instant a change is applied and published (never across I/O).
    map: RwLock<BTreeMap<Key, Entry>>,
    /// Per-key order: a change holds its key's stripe from revision to publish.
    stripes: Box<[Mutex<()>]>,
    hasher: RandomState,
    /// The revision counter and the turnstile that applies changes in revision order.
    seq: RevSeq,
    /// The data directory's revision floor as last raised for `memory`/`volatile` changes
    /// (see [`LEASE_STEP`]); taken by such a change whose revision is above it.
    lease: Mutex<u64>,
    /// Held by a put that writes a file from the moment it takes its revision (once its
    /// record is written, see `Disk::write_numbered`) until it is applied. Such puts then
    /// take and apply their revisions in the same order, so none of them waits in the
    /// turnstile for another: on two CPUs with eight writers, a change waiting there for one
    /// that had been preempted, one wake-up after another, halved tmpfs puts. Waiting for
    /// this lock instead is rare, since what it covers is short (filling in the revision,
    /// the rename, the directory check, applying). Lock order: stripe → commit → the rest.
    commit: Mutex<()>,
    /// Tombstones for resumes. Written under the map write lock (a delete, a put that
    /// recreates a key), read under the map read lock (a resume): lock order map → history.
    history: Mutex<History>,
    /// Changes applied and announced whose fsync failed (`not_durable` answers), for STATS.
    not_durable: AtomicU64,
    classes: ClassRules,
    disk: Disk,
    /// The `volatile` directory, when a rule uses it.
    volatile: Option<Disk>,
    notifier: Notifier,
    /// The data directory's history identity, sent in every `ready`: a resume naming another
    /// one is from another history and gets a reset whatever its revision.
    epoch: crate::disk::Epoch,
}

impl Store {
    /// Opens (and locks) the data directory and loads every key, with the default classes.
    ///
    /// # Errors
    /// See [`Disk::open`].
    pub fn open(dir: &Path, options: &Options) -> Result<Store, OpenError> {
        Store::open_with(&Config::new(dir, options))
    }

    /// Opens the data directory (and the volatile directory, when a rule uses it), loads every
    /// key and the delete history saved at the last clean stop.
    ///
    /// # Errors
    /// See [`Disk::open`], for either directory.
    pub fn open_with(config: &Config) -> Result<Store, OpenError> {
        let (disk, contents) = Disk::open(&config.data_dir, &config.options)?;
        let epoch = disk.epoch();
        let mut max_rev = contents.max_rev;
        let data_rev = contents.max_rev;
        // What the stop's history must match: the data directory as found, and the volatile
        // keys as found (before any key is moved home).
        let found = crate::history::fingerprint(
            contents.entries.iter().map(|l| (&l.key, l.rev, &*l.value)),
        );
        let home = std::fs::canonicalize(&config.data_dir).unwrap_or(config.data_dir.clone());
        let (volatile, vcontents) = open_volatile(config, &home)?;
        let mut found_volatile: Vec<(Key, u64)> = Vec::new();
        if let Some(v) = &vcontents {
            max_rev = max_rev.max(v.max_rev);
            found_volatile = v.entries.iter().map(|l| (l.key.clone(), l.rev)).collect();
        }
        // The floor counts every revision found, in either directory: keys moved home keep
        // their revisions, and the next start must count from beyond them.
        disk.raise_floor(max_rev).map_err(|e| {
            OpenError::Disk(crate::error::DiskError::new(
                "write",
                disk.dir().join(crate::disk::layout::REV_FILE),
                std::io::Error::other(e.to_string()),
            ))
        })?;
        let (placed, settled) = crate::disk::place(
            &disk,
            contents.entries,
            volatile.as_ref().zip(vcontents.map(|v| v.entries)),
            &config.classes,
        );
        // Read only to move its keys home: released again unless a key is still there.
        let volatile = volatile.filter(|_| config.classes.uses(Class::Volatile) || !settled);
        let mut map = BTreeMap::new();
        for p in placed {
            let entry = Entry {
                value: p.value,
                rev: p.rev,
                class: p.class,
                owner: None,
            };
            map.insert(p.key, entry);
        }
        let seq = RevSeq::new(max_rev);
        let mut history = History::new(config.tombstones, max_rev);
        let saved = disk.take_tombstones().as_deref().and_then(History::decode);
        let rules = config.classes.describe();
        if saved.is_none() {
            // No saved history (a crash, a first start): the delete log, if it can be trusted,
            // answers resumes of persistent keys; otherwise no resume from before this start
            // can be answered, so the horizon is past every revision found. (A resume from a
            // `ready` of this server taken before its first change is then a reset too:
            // spurious, never wrong.)
            history = History::new(config.tombstones, max_rev + 1);
            if let Some(restored) = from_log(&disk, &map, &seq, config, data_rev, &rules) {
                history = restored;
            }
        }
        if let Some(saved) = saved {
            // A volatile key the stop did not have (its directory was not read then, or was
            // edited since) appeared with a revision a resume may already be past: the
            // history cannot tell it, so no resume from before this start is answered.
            let appeared = found_volatile
                .iter()
                .filter(|kr| !saved.volatile.contains(kr))
                .count();
            if saved.at == data_rev && saved.fingerprint == found && appeared == 0 {
                history = History::new(config.tombstones, saved.horizon);
                for (key, rev) in saved.tombstones {
                    if !map.contains_key(&key) {
                        history.record(key, rev);
                    }
                }
                let lost: Vec<Key> = saved
                    .transient
                    .into_iter()
                    .chain(saved.volatile.into_iter().map(|(k, _)| k))
                    .filter(|k| !map.contains_key(k))
                    .collect();
                if !lost.is_empty() {
                    // Gone with the restart: one new revision tells resuming subscribers.
                    let gone = max_rev + 1;
                    match disk.raise_floor(gone) {
                        Ok(()) => {
                            seq.raise(gone);
                            for key in lost {
                                history.record(key, gone);
                            }
                        }
                        Err(e) => {
                            log::warn!("delete history not restored: {e}");
                            history = History::new(config.tombstones, max_rev + 1);
                        }
                    }
                }
                log::info!(
                    "delete history restored: {} tombstones, horizon rev {}",
                    history.len(),
                    history.horizon()
                );
            } else {
                log::info!(
                    "delete history of rev {} ignored: the data directory changed since (rev {data_rev}), or {appeared} volatile keys appeared",
                    saved.at
                );
                history = History::new(config.tombstones, max_rev + 1);
            }
        }
        // The log starts again from the history this start trusts.
        disk.start_tomb_log(
            crate::disk::LogRecords {
                horizon: history.horizon(),
                rules,
                deletes: history.tombstones().map(|(k, r)| (k.clone(), r)).collect(),
                sessions: Vec::new(),
            },
            config.tombstones,
        );
        Ok(Store {
            epoch,
            map: RwLock::new(map),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: RandomState::new(),
            seq,
            lease: Mutex::new(0),
            commit: Mutex::new(()),
            history: Mutex::new(history),
            not_durable: AtomicU64::new(0),
            classes: config.classes.clone(),
            disk,
            volatile,
            notifier: Notifier::default(),
        })
    }

    /// Saves the delete history for the next start (a clean stop; called once no change is
    /// in flight). `memory` and session keys are gone once the process ends and `volatile`
    /// keys after a reboot: they are listed so the next start can tell resuming subscribers.
    pub fn save(&self) {
        let map = self.map.read();
        // The floor may already be above the last revision (a lease): the next start counts
        // from the floor, and the file must name what that start will find.
        let at = self.seq.last().max(*self.lease.lock());
        if let Err(e) = self.disk.raise_floor(at) {
            log::warn!("cannot save the delete history: {e}");
            return;
        }
        let transient: Vec<Key> = map
            .iter()
            .filter(|(_, e)| e.class == Class::Memory)
            .map(|(k, _)| k.clone())
            .collect();
        let volatile: Vec<(Key, u64)> = map
            .iter()
            .filter(|(_, e)| e.class == Class::Volatile)
            .map(|(k, e)| (k.clone(), e.rev))
            .collect();
        let fingerprint = crate::history::fingerprint(
            map.iter()
                .filter(|(_, e)| e.class == Class::Persistent)
                .map(|(k, e)| (k, e.rev, &*e.value)),
        );
        let text = self
            .history
            .lock()
            .encode(at, fingerprint, &transient, &volatile);
        drop(map);
        match self.disk.save_tombstones(text.as_bytes()) {
            Ok(()) => log::info!("delete history saved at rev {at}"),
            Err(e) => log::warn!("cannot save the delete history: {e}"),
        }
    }

    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    pub fn data_dir(&self) -> &Path {
        self.disk.dir()
    }

    pub fn classes(&self) -> &ClassRules {
        &self.classes
    }

    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys per class (walks the map: for STATS, not for hot paths).
    pub fn class_counts(&self) -> ClassCounts {
        let mut counts = ClassCounts::default();
        for entry in self.map.read().values() {
            match entry.class {
                Class::Persistent => counts.persistent += 1,
                Class::Volatile => counts.volatile += 1,
                Class::Memory => counts.memory += 1,
            }
            if entry.owner.is_some() {
                counts.sessions += 1;
            }
        }
        counts
    }

    /// Tombstones kept, and the revision the delete history reaches back to.
    pub fn history_stats(&self) -> (usize, u64) {
        let h = self.history.lock();
        (h.len(), h.horizon())
    }

    /// The last revision handed out.
    pub fn rev(&self) -> u64 {
        self.seq.last()
    }

    fn stripe(&self, key: &Key) -> &Mutex<()> {
        let slot = self.hasher.hash_one(key.as_str()) as usize % self.stripes.len();
        &self.stripes[slot]
    }

    /// Changes answered `not_durable` since start.
    pub fn not_durable(&self) -> u64 {
        self.not_durable.load(Ordering::Relaxed)
    }

    fn disk_of(&self, class: Class) -> Option<&Disk> {
        match class {
            Class::Persistent => Some(&self.disk),
            Class::Volatile => self.volatile.as_ref(),
            Class::Memory => None,
        }
    }

    /// Takes a put's revision, with what must be on disk before a change at it is: the lease
    /// for a key not in the data directory, the log record of a session key that replaces a
    /// persistent one.
    fn number(&self, key: &Key, class: Class, logged: bool) -> Result<Ticket<'_>, WriteError> {
        let ticket = self.seq.next()?;
        if class != Class::Persistent {
            self.lease(ticket.rev())?;
        }
        if logged {
            // A crash loses it: the next start must be able to tell resuming subscribers.
            self.disk.log_session(key, ticket.rev())?;
        }
        Ok(ticket)
    }

    /// Before a `memory` or `volatile` change of revision `rev` is applied: the data
    /// directory's floor must already be above it, so a restart that loses the change still
    /// counts on from beyond it (see [`LEASE_STEP`]).
    fn lease(&self, rev: u64) -> Result<(), WriteError> {
        let mut lease = self.lease.lock();
        if rev > *lease {
            let next = rev.saturating_add(LEASE_STEP).min(crate::disk::MAX_REV);
            self.disk.raise_floor(next)?;
            *lease = next;
        }
        Ok(())
    }

    /// Whether the disk's outcome means the change is in place (and must be applied and
    /// announced so memory, disk and subscribers agree); the error, if any, is kept for the
    /// caller. A failed change drops its revision ticket, which gives the number back unless
    /// a later one was taken meanwhile.
    fn in_place(&self, outcome: Result<(), WriteError>) -> Result<Option<WriteError>, WriteError> {
        match outcome {
            Ok(()) => Ok(None),
            Err(err @ WriteError::NotDurable { .. }) => {
                self.not_durable.fetch_add(1, Ordering::Relaxed);
                Ok(Some(err))
            }
            Err(err) => Err(err),
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

    /// A key's value, revision and class.
    pub fn get_with_class(&self, key: &Key) -> Option<(Value, u64, Class)> {
        self.map
            .read()
            .get(key)
            .map(|e| (e.value.clone(), e.rev, e.class))
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
        self.put_with(key, value, PutOptions::default(), kicks)
    }

    /// [`put`](Store::put) with a compare-and-set revision and/or as a session key.
    ///
    /// The key's class is its prefix's, or `memory` for a session key. A key whose class
    /// changes (a session put of a persistent key, a plain put of a session key under a
    /// persistent prefix) is written to its new place first, then removed from the old one.
    /// A plain put of a session key makes it an ordinary key (no owner); a session put by
    /// another connection moves the ownership to it.
    ///
    /// # Errors
    /// As for [`put`](Store::put); [`WriteError::Conflict`] when `if_rev` does not match.
    pub fn put_with(
        &self,
        key: Key,
        value: Value,
        options: PutOptions,
        kicks: &mut Kicks,
    ) -> Result<u64, WriteError> {
        let order = self.stripe(&key).lock();
        self.debug_panic(&key);
        let (old, was_session) = match self.map.read().get(&key) {
            Some(e) => (Some((e.rev, e.class)), e.owner.is_some()),
            None => (None, false),
        };
        if let Some(expected) = options.if_rev {
            let current = old.map_or(0, |(rev, _)| rev);
            if current != expected {
                return Err(WriteError::Conflict { expected, current });
            }
        }
        let class = match options.session {
            Some(_) => Class::Memory,
            None => self.classes.class_of(&key),
        };
        let logged = options.session.is_some()
            && !was_session
            && self.classes.class_of(&key) == Class::Persistent;
        // A file write takes the revision once the record is written, just before it is put
        // in place (see `Disk::write_numbered`): from then on it holds back every later change.
        // The store's `commit` lock is held from then until the change is applied.
        let mut taken = None;
        let late = match self.disk_of(class) {
            Some(disk) => {
                let late = disk.numbers_late();
                let mut number = || {
                    // Held until the change is applied (see `commit`).
                    let commit = late.then(|| self.commit.lock());
                    let ticket = self.number(&key, class, logged)?;
                    let rev = ticket.rev();
                    taken = Some((ticket, commit));
                    Ok(rev)
                };
                self.in_place(disk.write_numbered(&key, &value, &mut number))?
            }
            None => None,
        };
        let (ticket, commit) = match taken {
            Some(taken) => taken,
            None => (self.number(&key, class, logged)?, None),
        };
        let rev = ticket.rev();
        if let Some(old_disk) = old
            .filter(|(_, old_class)| *old_class != class)
            .and_then(|(_, old_class)| self.disk_of(old_class))
        {
            // Best effort: at start the later of two records of a key wins.
            if let Err(e) = old_disk.remove(&key, rev) {
                log::warn!("{key} moved to class {class}, its old file stays: {e}");
            }
        }
        ticket.wait_turn();
        let touched = {
            let mut map = self.map.write();
            let entry = Entry {
                value: value.clone(),
                rev,
                class,
                owner: options.session,
            };
            if map.insert(key.clone(), entry).is_none() {
                self.history.lock().forget(&key);
            }
            let touched = self.notifier.publish(&Event {
                kind: EventKind::Put,
                key,
                value: Some(value),
                rev,
            });
            ticket.finish();
            touched
        };
        drop(commit);
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
        self.delete_with(key, DelOptions::default(), kicks)
    }

    /// [`delete`](Store::delete) with a compare-and-set revision, or only of a session key
    /// still owned by the given connection (`None` otherwise).
    ///
    /// # Errors
    /// As for [`delete`](Store::delete); [`WriteError::Conflict`] when `if_rev` does not
    /// match an existing key's revision (an absent key is `None`, as for a plain delete,
    /// when `if_rev` is 0).
    pub fn delete_with(
        &self,
        key: &Key,
        options: DelOptions,
        kicks: &mut Kicks,
    ) -> Result<Option<u64>, WriteError> {
        let order = self.stripe(key).lock();
        let Some((current, class, owner)) =
            self.map.read().get(key).map(|e| (e.rev, e.class, e.owner))
        else {
            return match options.if_rev {
                Some(expected) if expected != 0 => Err(WriteError::Conflict {
                    expected,
                    current: 0,
                }),
                _ => Ok(None),
            };
        };
        if let Some(expected) = options.if_rev.filter(|&e| e != current) {
            return Err(WriteError::Conflict { expected, current });
        }
        if options.only_owner.is_some() && options.only_owner != owner {
            return Ok(None);
        }
        let ticket = self.seq.next()?;
        let rev = ticket.rev();
        if class != Class::Persistent {
            self.lease(rev)?;
        }
        if self.classes.class_of(key) == Class::Persistent {
            // Before the file goes: a crash then still knows of the delete.
            self.disk.log_delete(key, rev)?;
        }
        let late = match self.disk_of(class) {
            Some(disk) => self.in_place(disk.remove(key, rev))?,
            None => None,
        };
        ticket.wait_turn();
        let touched = {
            let mut map = self.map.write();
            map.remove(key);
            self.history.lock().record(key.clone(), rev);
            let touched = self.notifier.publish(&Event {
                kind: EventKind::Del,
                key: key.clone(),
                value: None,
                rev,
            });
            ticket.finish();
            touched
        };
        drop(order);
        kicks.add(touched);
        late.map_or(Ok(Some(rev)), Err)
    }

    /// Ends connection `owner`'s session: deletes the session keys it still owns (each with
    /// its `del` event). `keys` are the keys it ever put as session keys; those another
    /// connection took over are left alone.
    pub fn end_session(&self, owner: u64, keys: &[Key], kicks: &mut Kicks) {
        let options = DelOptions {
            if_rev: None,
            only_owner: Some(owner),
        };
        for key in keys {
            match self.delete_with(key, options, kicks) {
                Ok(Some(rev)) => {
                    log::debug!("session key {key} of conn {owner} deleted at rev {rev}")
                }
                Ok(None) => {}
                Err(e) => log::error!("cannot delete session key {key} of conn {owner}: {e}"),
            }
        }
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

    /// Subscribes connection `id` to `target`: queues `ack`, the snapshot and the `ready`
    /// marker, and registers the subscription, all in one step no change can fall between.
    /// Returns the number of events before `ready`; the caller sends them.
    ///
    /// The snapshot is an `init` per covered key — or, resuming `from` a revision the delete
    /// history reaches, only what changed after it: a `put` per covered key whose revision is
    /// greater and a `del` per covered tombstone after it. A resume it cannot answer (the
    /// history does not reach back, or `from` is beyond this server's settled revision) gets
    /// a `reset` line and then the full snapshot, as does one naming an epoch other than this
    /// directory's. `ready` carries the epoch and the settled revision: every
    /// change at or below it is in what was sent, every later one comes after `ready`.
    ///
    /// # Errors
    /// The connection's subscription limit is reached; nothing was queued.
    #[allow(clippy::too_many_arguments)]
    pub fn subscribe(
        &self,
        id: u64,
        name: &str,
        mailbox: &Arc<Mailbox>,
        target: &Target,
        from: Option<Resume>,
        max_subs: usize,
        ack: Vec<u8>,
    ) -> Result<usize, SubError> {
        // Held shared until the snapshot is queued: no change can be applied meanwhile.
        let map = self.map.read();
        self.notifier.add(id, name, mailbox, target, max_subs)?;
        self.notifier.push(mailbox, Item::Reply(ack.into()));
        let settled = self.seq.settled();
        let history = self.history.lock();
        let transient = from.is_some() && self.classes.may_cover_transient(target);
        // A resume naming another history's epoch cannot be answered from this one; one
        // naming none is taken on trust (it cannot tell a replaced directory).
        let resume = from
            .filter(|r| r.epoch.is_none_or(|e| e == self.epoch))
            .map(|r| r.rev)
            .filter(|&f| f <= settled && history.reaches_for(f, transient));
        if from.is_some() && resume.is_none() {
            self.notifier.push(mailbox, Item::Reset(target.clone()));
        }
        let mut count = 0;
        let event = |kind, key: &Key, value, rev| {
            Item::Init(Event {
                kind,
                key: key.clone(),
                value,
                rev,
            })
        };
        match resume {
            Some(from) => {
                for (key, entry) in range(&map, target).filter(|(_, e)| e.rev > from) {
                    count += 1;
                    let item = event(EventKind::Put, key, Some(entry.value.clone()), entry.rev);
                    self.notifier.push(mailbox, item);
                }
                for (key, rev) in history.since(from, target) {
                    count += 1;
                    self.notifier
                        .push(mailbox, event(EventKind::Del, key, None, rev));
                }
            }
            None => {
                for (key, entry) in range(&map, target) {
                    count += 1;
                    let item = event(EventKind::Init, key, Some(entry.value.clone()), entry.rev);
                    self.notifier.push(mailbox, item);
                }
            }
        }
        drop(history);
        self.notifier.push(
            mailbox,
            Item::Ready {
                target: target.clone(),
                count,
                rev: settled,
                epoch: self.epoch,
            },
        );
        drop(map);
        Ok(count)
    }
}

/// The delete history after a crash, from the delete log (see `disk::tomblog`): its
/// tombstones of keys still absent, a `del` at one new revision for each session key it names
/// that the crash lost, and a horizon past every revision found for targets that may cover a
/// `memory` or `volatile` key (their deletes are not logged). `None` when the log is missing,
/// was written under other class rules, or has a bad record.
fn from_log(
    disk: &Disk,
    map: &BTreeMap<Key, Entry>,
    seq: &RevSeq,
    config: &Config,
    floor: u64,
    rules: &str,
) -> Option<History> {
    let bytes = disk.read_tomb_log()?;
    let records = match crate::disk::LogRecords::parse(&bytes, floor) {
        Ok(records) if records.rules == rules => records,
        Ok(records) => {
            log::info!(
                "delete log ignored: written under class rules {}, now {rules}",
                records.rules
            );
            return None;
        }
        Err(e) => {
            log::warn!("delete log ignored (every older resume gets a reset): {e}");
            return None;
        }
    }
    .compact(config.tombstones);
    let last = seq.last();
    let mut history = History::new(config.tombstones, records.horizon);
    for (key, rev) in records.deletes {
        if !map.contains_key(&key) {
            history.record(key, rev);
        }
    }
    let lost: Vec<Key> = records
        .sessions
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !map.contains_key(k))
        .collect();
    let mut transient_horizon = last + 1;
    if !lost.is_empty() {
        let gone = last + 1;
        if let Err(e) = disk.raise_floor(gone) {
            log::warn!("delete log not restored: {e}");
            return None;
        }
        seq.raise(gone);
        for key in lost {
            history.record(key, gone);
        }
        transient_horizon = gone + 1;
    }
    history.set_transient_horizon(transient_horizon);
    log::info!(
        "delete history restored from the delete log after a crash: {} tombstones, horizon rev {} (rev {transient_horizon} for targets that may cover memory or volatile keys)",
        history.len(),
        history.horizon()
    );
    Some(history)
}

/// The volatile directory, when a rule uses it (created if missing), or when it exists and
/// its `.home` names this data directory (read so that keys left there from a start with
/// other rules move home instead of coming back later). Marked as this data directory's.
///
/// # Errors
/// The directory cannot be opened while a rule uses it (see [`Disk::open`]).
fn open_volatile(
    config: &Config,
    home: &Path,
) -> Result<(Option<Disk>, Option<crate::disk::Contents>), OpenError> {
    let path = &config.volatile_dir;
    let used = config.classes.uses(Class::Volatile);
    if !used {
        if crate::disk::home_of(path).as_deref() != Some(home) {
            return Ok((None, None));
        }
        return match Disk::open(path, &config.options) {
            Ok((disk, contents)) => Ok((Some(disk), Some(contents))),
            Err(e) => {
                log::warn!(
                    "volatile directory {} not read (no rule uses it): {e}",
                    path.display()
                );
                Ok((None, None))
            }
        };
    }
    let (disk, contents) = Disk::open(path, &config.options)?;
    match crate::disk::home_of(path) {
        Some(other) if other != home => log::warn!(
            "volatile directory {} belonged to data directory {}; it is now {}'s",
            path.display(),
            other.display(),
            home.display()
        ),
        _ => {}
    }
    if let Err(e) = disk.mark_home(home) {
        log::warn!(
            "cannot mark {} as {}'s: {e}",
            path.display(),
            home.display()
        );
    }
    Ok((Some(disk), Some(contents)))
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

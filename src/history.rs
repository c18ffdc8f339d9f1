//! The delete history: the revision of each deleted key (a tombstone), so a subscription that
//! resumes from a revision is told of the deletes it missed.
//!
//! Bounded: at most `cap` tombstones, one per key (a key deleted twice keeps its last; a key
//! put again loses its tombstone, its `put` tells the story). When the oldest is evicted the
//! *horizon* rises to its revision: a resume from `R ≥ horizon` is answerable (every delete
//! after `R` is still here); one from below it gets a reset and the full snapshot.
//!
//! Kept across a clean stop in the data directory's `.tombstones` (see [`History::encode`]):
//! written by `Store::save`, read and removed at the next start, and trusted only if the
//! directory's revision is still the one the file was written at (so a change after it makes
//! the next start begin a new horizon instead of trusting stale history). After a crash the
//! history of persistent keys comes from the delete log (`disk::tomblog`); targets that may
//! cover other keys then reach back only to the start (`transient_horizon`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use crate::key::{Key, Target};

#[derive(Debug)]
pub struct History {
    by_key: HashMap<Key, u64>,
    /// The keys deleted at each revision: several keys can share one (the keys a restart
    /// lost are all told gone at one new revision).
    by_rev: BTreeMap<u64, Vec<Key>>,
    /// How many tombstones `by_rev` holds (one per key in `by_key`).
    len: usize,
    cap: usize,
    horizon: u64,
    /// The horizon for a target that may cover a key that is not persistent by its rule: above
    /// `horizon` after a crash, which loses `memory` and `volatile` deletes (only persistent
    /// ones are in the delete log).
    transient_horizon: u64,
}

/// A history read back from `.tombstones`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Saved {
    /// The revision the file was written at.
    pub at: u64,
    /// [`fingerprint`] of the persistent keys when it was written: a data directory edited
    /// while the server was stopped (a key file removed or changed) no longer matches, and
    /// the history is then not trusted.
    pub fingerprint: u64,
    pub horizon: u64,
    pub tombstones: Vec<(Key, u64)>,
    /// Keys that existed at the stop but not on disk (memory, session): the start tells
    /// resuming subscribers they are gone.
    pub transient: Vec<Key>,
    /// The volatile keys at the stop, with their revisions: the start tells resuming
    /// subscribers of those it does not find (a reboot), and trusts the history only if it
    /// finds no other volatile key.
    pub volatile: Vec<(Key, u64)>,
}

const MAGIC: &str = "nkv-tombstones 1";

impl History {
    /// An empty history that reaches back to `horizon`.
    pub fn new(cap: usize, horizon: u64) -> History {
        History {
            by_key: HashMap::new(),
            by_rev: BTreeMap::new(),
            len: 0,
            cap,
            horizon,
            transient_horizon: horizon,
        }
    }

    /// Resumes of targets that may cover non-persistent keys are answered only from `rev`.
    pub fn set_transient_horizon(&mut self, rev: u64) {
        self.transient_horizon = rev;
    }

    /// Whether every delete after `rev` of the keys a target covers is still known;
    /// `transient`: the target may cover a key that is not persistent by its rule.
    pub fn reaches_for(&self, rev: u64, transient: bool) -> bool {
        self.reaches(rev) && (!transient || rev >= self.transient_horizon)
    }

    /// Every tombstone, in revision order.
    pub fn tombstones(&self) -> impl Iterator<Item = (&Key, u64)> + '_ {
        self.by_rev
            .iter()
            .flat_map(|(rev, keys)| keys.iter().map(move |key| (key, *rev)))
    }

    /// `key` was deleted at `rev`.
    pub fn record(&mut self, key: Key, rev: u64) {
        if let Some(old) = self.by_key.insert(key.clone(), rev) {
            self.unlink(&key, old);
        }
        self.by_rev.entry(rev).or_default().push(key);
        self.len += 1;
        while self.len > self.cap {
            let Some(mut oldest) = self.by_rev.first_entry() else {
                break;
            };
            let old = *oldest.key();
            if let Some(key) = oldest.get_mut().pop() {
                self.by_key.remove(&key);
                self.len -= 1;
            }
            if oldest.get().is_empty() {
                oldest.remove();
            }
            self.horizon = self.horizon.max(old);
        }
        if self.cap == 0 {
            self.horizon = self.horizon.max(rev);
        }
    }

    /// `key` exists again.
    pub fn forget(&mut self, key: &Key) {
        if let Some(rev) = self.by_key.remove(key) {
            self.unlink(key, rev);
        }
    }

    /// Removes `key`'s tombstone at `rev` from `by_rev` (the caller updates `by_key`).
    fn unlink(&mut self, key: &Key, rev: u64) {
        if let Some(keys) = self.by_rev.get_mut(&rev) {
            if let Some(at) = keys.iter().position(|k| k == key) {
                keys.swap_remove(at);
                self.len -= 1;
            }
            if keys.is_empty() {
                self.by_rev.remove(&rev);
            }
        }
    }

    /// Whether every delete after `rev` is still known.
    pub fn reaches(&self, rev: u64) -> bool {
        rev >= self.horizon
    }

    pub fn horizon(&self) -> u64 {
        self.horizon
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tombstones after `rev` that `target` covers, in revision order.
    pub fn since<'a>(
        &'a self,
        rev: u64,
        target: &'a Target,
    ) -> impl Iterator<Item = (&'a Key, u64)> + 'a {
        self.by_rev
            .range(rev.saturating_add(1)..)
            .flat_map(|(rev, keys)| keys.iter().map(move |key| (key, *rev)))
            .filter(move |(key, _)| target.covers(key))
    }

    /// The history as `.tombstones` holds it: a header line `nkv-tombstones 1 <at> <horizon>`,
    /// then `d <rev> <key>` per tombstone, `t <key>` per memory key and `v <rev> <key>` per
    /// volatile key.
    pub fn encode(
        &self,
        at: u64,
        fingerprint: u64,
        transient: &[Key],
        volatile: &[(Key, u64)],
    ) -> String {
        let mut out = format!("{MAGIC} {at} {} {fingerprint}\n", self.horizon);
        for (key, rev) in self.tombstones() {
            let _ = writeln!(out, "d {rev} {key}");
        }
        for key in transient {
            let _ = writeln!(out, "t {key}");
        }
        for (key, rev) in volatile {
            let _ = writeln!(out, "v {rev} {key}");
        }
        out
    }

    /// Parses what [`encode`](History::encode) wrote; `None` for anything else (the file is
    /// then ignored: the start begins a new horizon).
    pub fn decode(bytes: &[u8]) -> Option<Saved> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.lines();
        let header = lines.next()?.strip_prefix(MAGIC)?;
        let mut fields = header.split_whitespace();
        let at = fields.next()?.parse().ok()?;
        let horizon = fields.next()?.parse().ok()?;
        let fingerprint = fields.next()?.parse().ok()?;
        let mut saved = Saved {
            at,
            fingerprint,
            horizon,
            ..Saved::default()
        };
        for line in lines {
            match line.split_once(' ')? {
                ("d", rest) => {
                    let (rev, key) = rest.split_once(' ')?;
                    saved
                        .tombstones
                        .push((Key::parse(key).ok()?, rev.parse().ok()?));
                }
                ("t", key) => saved.transient.push(Key::parse(key).ok()?),
                ("v", rest) => {
                    let (rev, key) = rest.split_once(' ')?;
                    saved
                        .volatile
                        .push((Key::parse(key).ok()?, rev.parse().ok()?));
                }
                _ => return None,
            }
        }
        Some(saved)
    }
}

/// An order-independent digest of keys, revisions and value lengths (one SipHash with fixed
/// keys per entry, summed): what tells the data directory found at start from the one saved.
/// Value bytes are not hashed, so a stop stays fast however large the values: an edit made
/// while the server was stopped is noticed when it removes, adds or renumbers a key file or
/// changes a value's length (an edit that keeps both is not; the layout asks to bump `rev`).
/// Should a new Rust release change the hasher, a saved history just fails to match once (a
/// reset, never a stale key).
pub fn fingerprint<'a>(entries: impl Iterator<Item = (&'a Key, u64, &'a str)>) -> u64 {
    use std::hash::Hasher;
    entries.fold(0u64, |sum, (key, rev, value)| {
        #[allow(deprecated)]
        let mut h = std::hash::SipHasher::new();
        h.write(key.as_str().as_bytes());
        h.write_u8(0);
        h.write_u64(rev);
        h.write_usize(value.len());
        sum.wrapping_add(h.finish())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Key {
        Key::parse(k).unwrap()
    }

    #[test]
    fn the_horizon_rises_as_the_oldest_tombstones_go() {
        let mut h = History::new(2, 5);
        assert!(h.reaches(5) && !h.reaches(4));
        h.record(key("a"), 6);
        h.record(key("b"), 7);
        h.record(key("a"), 8);
        assert_eq!((h.len(), h.horizon()), (2, 5));
        h.record(key("c"), 9);
        assert_eq!((h.len(), h.horizon()), (2, 7));
        let all = Target::parse("*").unwrap();
        let since: Vec<_> = h.since(7, &all).map(|(k, r)| (k.to_string(), r)).collect();
        assert_eq!(since, [("a".to_owned(), 8), ("c".to_owned(), 9)]);
        h.forget(&key("a"));
        assert_eq!(h.since(0, &all).count(), 1);
    }

    /// The keys a restart lost are all gone at one revision: each keeps its tombstone, and
    /// putting one again forgets only its own (found by the issue-12 adversary: one map entry
    /// per revision kept only the last key, and `forget` removed another key's tombstone).
    #[test]
    fn keys_deleted_at_one_revision_each_keep_their_tombstone() {
        let mut h = History::new(10, 1);
        for k in ["r.a", "r.b", "r.c", "r.d"] {
            h.record(key(k), 5);
        }
        h.record(key("r.e"), 6);
        assert_eq!(h.len(), 5);
        let all = Target::parse("r").unwrap();
        let since = |h: &History| -> Vec<String> {
            let mut keys: Vec<_> = h.since(4, &all).map(|(k, _)| k.to_string()).collect();
            keys.sort();
            keys
        };
        assert_eq!(since(&h), ["r.a", "r.b", "r.c", "r.d", "r.e"]);
        h.forget(&key("r.a"));
        h.record(key("r.b"), 7);
        assert_eq!(since(&h), ["r.b", "r.c", "r.d", "r.e"]);
        assert_eq!(h.len(), 4);
        let saved = History::decode(h.encode(7, 0, &[], &[]).as_bytes()).unwrap();
        assert_eq!(saved.tombstones.len(), 4);
        // Eviction goes key by key, never past the revision of what it removes.
        let mut small = History::new(2, 1);
        for k in ["a", "b", "c"] {
            small.record(key(k), 5);
        }
        assert_eq!((small.len(), small.horizon()), (2, 5));
        assert_eq!(small.since(4, &Target::parse("*").unwrap()).count(), 2);
    }

    proptest::proptest! {
        /// Against a model with no bound: for every revision a resume can start from (at or
        /// above the horizon), `since` is exactly the model's deletes after it; never more
        /// than `cap` are kept.
        #[test]
        fn since_is_every_delete_after_any_answerable_revision(
            cap in 0usize..6,
            ops in proptest::collection::vec((0u8..3, 0u8..6, 0u64..4), 0..60),
        ) {
            let mut h = History::new(cap, 1);
            let mut model: HashMap<Key, u64> = HashMap::new();
            let mut rev = 1;
            for (op, k, step) in ops {
                let k = key(&format!("k{k}"));
                rev += step; // several deletes may share a revision
                if op == 0 {
                    h.forget(&k);
                    model.remove(&k);
                } else {
                    h.record(k.clone(), rev);
                    model.insert(k, rev);
                }
                proptest::prop_assert!(h.len() <= cap);
                proptest::prop_assert_eq!(h.len(), h.tombstones().count());
                let all = Target::parse("*").unwrap();
                for from in h.horizon()..=rev {
                    let mut got: Vec<_> = h.since(from, &all).map(|(k, r)| (k.clone(), r)).collect();
                    let mut want: Vec<_> = model
                        .iter()
                        .filter(|(_, &r)| r > from)
                        .map(|(k, &r)| (k.clone(), r))
                        .collect();
                    got.sort();
                    want.sort();
                    proptest::prop_assert_eq!(got, want);
                }
            }
        }
    }

    #[test]
    fn the_saved_form_round_trips_and_refuses_anything_else() {
        let mut h = History::new(10, 3);
        h.record(key("a.b"), 4);
        let text = h.encode(9, 77, &[key("runtime.x")], &[(key("run.y"), 2)]);
        let saved = History::decode(text.as_bytes()).unwrap();
        assert_eq!(
            saved,
            Saved {
                at: 9,
                fingerprint: 77,
                horizon: 3,
                tombstones: vec![(key("a.b"), 4)],
                transient: vec![key("runtime.x")],
                volatile: vec![(key("run.y"), 2)],
            }
        );
        assert!(History::decode(b"garbage").is_none());
        assert!(History::decode(b"nkv-tombstones 1 9 3\n").is_none());
        assert!(History::decode(b"nkv-tombstones 1 9 3 0\nd x a\n").is_none());
        assert!(History::decode(b"nkv-tombstones 1 9 3 0\nd 4 ../x\n").is_none());
        let (a, b) = (key("a"), key("b"));
        let one = fingerprint([(&a, 1, "1"), (&b, 2, "2")].into_iter());
        assert_eq!(one, fingerprint([(&b, 2, "2"), (&a, 1, "1")].into_iter()));
        assert_ne!(one, fingerprint([(&a, 1, "1")].into_iter()));
        assert_ne!(one, fingerprint([(&a, 1, "1"), (&b, 3, "2")].into_iter()));
        assert_ne!(one, fingerprint([(&a, 1, "1"), (&b, 2, "22")].into_iter()));
    }
}

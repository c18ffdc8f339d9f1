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
    by_rev: BTreeMap<u64, Key>,
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
        self.by_rev.iter().map(|(rev, key)| (key, *rev))
    }

    /// `key` was deleted at `rev`.
    pub fn record(&mut self, key: Key, rev: u64) {
        if let Some(old) = self.by_key.insert(key.clone(), rev) {
            self.by_rev.remove(&old);
        }
        self.by_rev.insert(rev, key);
        while self.by_rev.len() > self.cap {
            let Some((old, key)) = self.by_rev.pop_first() else {
                break;
            };
            self.by_key.remove(&key);
            self.horizon = self.horizon.max(old);
        }
        if self.cap == 0 {
            self.horizon = self.horizon.max(rev);
        }
    }

    /// `key` exists again.
    pub fn forget(&mut self, key: &Key) {
        if let Some(rev) = self.by_key.remove(key) {
            self.by_rev.remove(&rev);
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
        self.by_rev.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_rev.is_empty()
    }

    /// The tombstones after `rev` that `target` covers, in revision order.
    pub fn since<'a>(
        &'a self,
        rev: u64,
        target: &'a Target,
    ) -> impl Iterator<Item = (&'a Key, u64)> + 'a {
        self.by_rev
            .range(rev.saturating_add(1)..)
            .filter(move |(_, key)| target.covers(key))
            .map(|(rev, key)| (key, *rev))
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
        for (rev, key) in &self.by_rev {
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

//! The delete log (`.tombstone-log`): the delete history of persistent keys, kept so that it
//! survives a crash (the saved `.tombstones` is written only at a clean stop).
//!
//! One header line `nkv-tomblog 1 <horizon> <rules>` (`<rules>` the class rules it was written
//! under: a start with other rules does not trust it, since deletes of a key that was not
//! persistent then are not in it), then one line per record: `d <rev> <key>` (the
//! key was deleted at `rev`) or `s <rev> <key>` (the key became a session key at `rev`: a crash
//! loses it, and the next start must tell resuming subscribers). The log promises: every
//! delete of a key whose rule class is `persistent` after `<horizon>` is in it (or the key
//! exists again). A delete raises the revision floor, then appends its record (fsynced with
//! `--fsync`), then unlinks the key's file and is acknowledged: a record never names a
//! revision above the floor, and a torn last line is a delete that never happened (its file is
//! still there), so it is ignored safely. Any other bad line makes the whole log untrusted.
//! An append that fails removes the log (so a crash then costs a `reset`, never a missed
//! delete) and stops logging until the next start.
//!
//! Compacted (latest record per key, at most `cap` deletes, the horizon raised past the ones
//! dropped) and rewritten atomically at every start and whenever it has grown by more than
//! `cap` (at least 1,024) records.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use super::fault::Op;
use super::layout::TOMBSTONE_LOG;
use super::Disk;
use crate::error::WriteError;
use crate::key::Key;

const MAGIC: &str = "nkv-tomblog 1";
/// The most the log may hold before it is not trusted (as for the saved history).
const MAX_LOG: u64 = 256 << 20;

/// What a log holds, compacted or not.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LogRecords {
    pub horizon: u64,
    /// The class rules the log was written under (`ClassRules::describe`).
    pub rules: String,
    /// Deletes: key and revision.
    pub deletes: Vec<(Key, u64)>,
    /// Session keys and the revision they became one.
    pub sessions: Vec<(Key, u64)>,
}

impl LogRecords {
    /// Parses a log. `floor` is the data directory's revision floor: no record may be above
    /// it (a delete raises the floor before it appends).
    ///
    /// # Errors
    /// Why the log is not trusted.
    pub fn parse(bytes: &[u8], floor: u64) -> Result<LogRecords, String> {
        // A last line without its newline is an append that never finished: ignored.
        let whole = match bytes.iter().rposition(|&b| b == b'\n') {
            Some(end) => &bytes[..=end],
            None => return Err("no complete header line".into()),
        };
        let text = std::str::from_utf8(whole).map_err(|_| "not UTF-8".to_owned())?;
        let mut lines = text.lines();
        let header = lines.next().unwrap_or_default();
        let (horizon, rules) = header
            .strip_prefix(MAGIC)
            .and_then(|h| h.strip_prefix(' '))
            .and_then(|h| h.split_once(' '))
            .and_then(|(h, rules)| Some((h.parse::<u64>().ok()?, rules)))
            .ok_or_else(|| format!("bad header {header:?}"))?;
        if horizon > floor.saturating_add(1) {
            return Err(format!(
                "horizon {horizon} above the revision floor {floor}"
            ));
        }
        let mut records = LogRecords {
            horizon,
            rules: rules.to_owned(),
            ..LogRecords::default()
        };
        for (n, line) in lines.enumerate() {
            let bad = || format!("bad record on line {}: {line:?}", n + 2);
            let mut fields = line.splitn(3, ' ');
            let (Some(kind), Some(rev), Some(key)) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(bad());
            };
            let rev: u64 = rev.parse().map_err(|_| bad())?;
            let key = Key::parse(key).map_err(|_| bad())?;
            if rev > floor {
                return Err(format!("{} (revision above the floor {floor})", bad()));
            }
            match kind {
                "d" => records.deletes.push((key, rev)),
                "s" => records.sessions.push((key, rev)),
                _ => return Err(bad()),
            }
        }
        Ok(records)
    }

    /// The latest record per key; at most `cap` deletes (dropping the oldest raises the
    /// horizon to its revision).
    pub fn compact(self, cap: usize) -> LogRecords {
        let mut latest: HashMap<Key, (u64, bool)> = HashMap::new();
        let all = self
            .deletes
            .into_iter()
            .map(|(k, r)| (k, r, true))
            .chain(self.sessions.into_iter().map(|(k, r)| (k, r, false)));
        for (key, rev, delete) in all {
            let slot = latest.entry(key).or_insert((rev, delete));
            if rev >= slot.0 {
                *slot = (rev, delete);
            }
        }
        let mut out = LogRecords {
            horizon: self.horizon,
            rules: self.rules,
            ..LogRecords::default()
        };
        for (key, (rev, delete)) in latest {
            if delete {
                out.deletes.push((key, rev));
            } else {
                out.sessions.push((key, rev));
            }
        }
        out.deletes.sort_by_key(|(_, rev)| *rev);
        out.sessions.sort_by_key(|(_, rev)| *rev);
        if out.deletes.len() > cap {
            let dropped = out.deletes.len() - cap;
            if let Some((_, rev)) = out.deletes.get(dropped - 1) {
                out.horizon = out.horizon.max(*rev);
            }
            out.deletes.drain(..dropped);
        }
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!("{MAGIC} {} {}\n", self.horizon, self.rules);
        for (key, rev) in &self.deletes {
            let _ = writeln!(out, "d {rev} {key}");
        }
        for (key, rev) in &self.sessions {
            let _ = writeln!(out, "s {rev} {key}");
        }
        out.into_bytes()
    }
}

/// The open log and where the next record goes.
pub struct TombLog {
    file: File,
    len: u64,
    /// Records appended since the last compaction, and how many trigger the next one.
    appended: usize,
    cap: usize,
}

impl Disk {
    /// The log as found (`None` when there is none, or it is not a plain file of a sane size).
    pub fn read_tomb_log(&self) -> Option<Vec<u8>> {
        let file = match self.dir.open_read(TOMBSTONE_LOG) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                log::warn!(
                    "cannot read {}: {e}",
                    self.dir.join(TOMBSTONE_LOG).display()
                );
                return None;
            }
        };
        if !file
            .metadata()
            .is_ok_and(|m| m.is_file() && m.len() <= MAX_LOG)
        {
            log::warn!(
                "{} is not a plain file of at most {MAX_LOG} bytes: not trusted",
                self.dir.join(TOMBSTONE_LOG).display()
            );
            return None;
        }
        let mut bytes = Vec::new();
        file.take(MAX_LOG).read_to_end(&mut bytes).ok()?;
        Some(bytes)
    }

    /// Replaces the log with `records` (compacted to `cap`) and appends to it from now on.
    /// On failure the old log is removed and nothing is logged (a crash then costs a reset).
    pub fn start_tomb_log(&self, records: LogRecords, cap: usize) {
        let mut log = self.tomb_log.lock();
        *log = None;
        let bytes = records.compact(cap).encode();
        match self.write_tomb_log(&bytes, cap.max(1024)) {
            Ok(written) => *log = Some(written),
            Err(e) => {
                log::warn!("delete log off until the next start (a crash costs a reset): {e}");
                let _ = self.dir.unlink(TOMBSTONE_LOG);
            }
        }
    }

    /// Records that `key` is deleted at `rev`, before its file is removed: raises the floor,
    /// then appends. See the module doc.
    ///
    /// # Errors
    /// The floor could not be raised, or the append failed and the log could not be removed.
    pub fn log_delete(&self, key: &Key, rev: u64) -> Result<(), WriteError> {
        self.raise_floor(rev)?;
        self.append(&format!("d {rev} {key}\n"), rev)
    }

    /// Records that `key` became a session key at `rev` (before it is announced).
    ///
    /// # Errors
    /// As for [`log_delete`](Disk::log_delete).
    pub fn log_session(&self, key: &Key, rev: u64) -> Result<(), WriteError> {
        self.raise_floor(rev)?;
        self.append(&format!("s {rev} {key}\n"), rev)
    }

    fn append(&self, line: &str, rev: u64) -> Result<(), WriteError> {
        let mut guard = self.tomb_log.lock();
        let Some(log) = guard.as_mut() else {
            return Ok(());
        };
        let written = self
            .dir
            .fault(Op::AppendLog)
            .and_then(|()| log.file.write_all_at(line.as_bytes(), log.len))
            .and_then(|()| {
                if self.fsync {
                    self.dir
                        .fault(Op::SyncLog)
                        .and_then(|()| log.file.sync_data())
                } else {
                    Ok(())
                }
            });
        if let Err(e) = written {
            // The log no longer holds every delete: it must not be trusted after a crash.
            *guard = None;
            log::warn!(
                "delete log off until the next start (a crash then costs a reset): append of rev {rev}: {e}"
            );
            return self
                .dir
                .unlink(TOMBSTONE_LOG)
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| self.fail("remove", TOMBSTONE_LOG, e));
        }
        log.len += line.len() as u64;
        log.appended += 1;
        if log.appended > log.cap {
            let cap = log.cap;
            drop(guard);
            self.compact_tomb_log(cap);
        }
        Ok(())
    }

    /// Replaces the log with `bytes` (temp + rename) and opens it to append, compacting again
    /// after `cap` appends.
    fn write_tomb_log(&self, bytes: &[u8], cap: usize) -> Result<TombLog, WriteError> {
        self.replace_server_file(TOMBSTONE_LOG, bytes)?;
        let file = self
            .dir
            .open_rw(TOMBSTONE_LOG)
            .map_err(|e| self.fail("open", TOMBSTONE_LOG, e))?;
        Ok(TombLog {
            file,
            len: bytes.len() as u64,
            appended: 0,
            cap,
        })
    }

    /// Rewrites the log compacted, from what it holds (not from the history in memory: a
    /// delete appended but not yet applied must not be lost).
    fn compact_tomb_log(&self, cap: usize) {
        let mut guard = self.tomb_log.lock();
        if guard.is_none() {
            return;
        }
        let floor = self.floor.lock().value();
        let parsed = self
            .read_tomb_log()
            .ok_or_else(|| "unreadable".to_owned())
            .and_then(|bytes| LogRecords::parse(&bytes, floor));
        let bytes = match parsed {
            Ok(records) => records.compact(cap).encode(),
            Err(e) => {
                log::warn!("delete log off until the next start: cannot compact it: {e}");
                *guard = None;
                let _ = self.dir.unlink(TOMBSTONE_LOG);
                return;
            }
        };
        match self.write_tomb_log(&bytes, cap) {
            Ok(written) => *guard = Some(written),
            // The old log is still whole (the rename did not happen): keep appending to it.
            Err(e) => {
                log::warn!("cannot compact the delete log: {e}");
                if let Some(log) = guard.as_mut() {
                    log.appended = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Key {
        Key::parse(k).unwrap()
    }

    #[test]
    fn parse_trusts_only_whole_valid_records_below_the_floor() {
        let ok = b"nkv-tomblog 1 3 runtime=memory\nd 4 a.b\ns 5 c\nd 6 c\nd 7 x";
        let r = LogRecords::parse(ok, 10).unwrap();
        assert_eq!((r.horizon, r.rules.as_str()), (3, "runtime=memory"));
        assert_eq!(
            r.deletes,
            [(key("a.b"), 4), (key("c"), 6)],
            "torn last line ignored"
        );
        assert_eq!(r.sessions, [(key("c"), 5)]);
        for bad in [
            &b""[..],
            b"nkv-tomblog 1 3 r",
            b"nkv-tomblog 1 3\n",
            b"nkv-tomblog 2 3 r\n",
            b"nkv-tomblog 1 x r\n",
            b"nkv-tomblog 1 99 r\n",
            b"nkv-tomblog 1 3 r\nd 4\n",
            b"nkv-tomblog 1 3 r\nd x a\n",
            b"nkv-tomblog 1 3 r\nd 4 ../a\n",
            b"nkv-tomblog 1 3 r\nq 4 a\n",
            b"nkv-tomblog 1 3 r\nd 11 a\n",
            b"nkv-tomblog 1 3 r\nd 4 a\xff\n",
        ] {
            assert!(
                LogRecords::parse(bad, 10).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn compaction_keeps_the_latest_record_per_key_and_raises_the_horizon() {
        let records = LogRecords {
            horizon: 1,
            rules: "r".into(),
            deletes: vec![(key("a"), 2), (key("b"), 3), (key("a"), 5), (key("c"), 6)],
            sessions: vec![(key("c"), 4), (key("d"), 7)],
        };
        let c = records.compact(2);
        assert_eq!(c.deletes, [(key("a"), 5), (key("c"), 6)]);
        assert_eq!(c.sessions, [(key("d"), 7)]);
        assert_eq!(c.horizon, 3, "b's delete was dropped");
        let text = c.encode();
        assert_eq!(LogRecords::parse(&text, 7).unwrap(), c);
    }
}

/// Fault injection on the log through the real store: a failing append or fsync never fails
/// the delete, and the next start after a crash (the store dropped without `save`) then
/// answers older resumes with a reset instead of trusting a log that misses a delete.
#[cfg(test)]
mod fault_tests {
    use std::path::Path;

    use super::super::fault::{plan_for, Fault, Op};
    use crate::key::Key;
    use crate::mailbox::Kicks;
    use crate::store::{Config, Store, Value};

    fn open(data: &Path, fsync: bool) -> Store {
        open_capped(data, fsync, crate::store::DEFAULT_TOMBSTONES)
    }

    fn open_capped(data: &Path, fsync: bool, tombstones: usize) -> Store {
        let mut config = Config::new(data, &crate::disk::Options::new(fsync));
        config.tombstones = tombstones;
        Store::open_with(&config).unwrap()
    }

    fn key(k: &str) -> Key {
        Key::parse(k).unwrap()
    }

    /// Puts `a`, `b`, `c`, deletes `a` (logged), then deletes `b` with `fault` planned.
    /// Returns the revision after `a`'s delete and the revision of `b`'s.
    fn workload(data: &Path, fault: Option<Fault>) -> (u64, u64) {
        let store = open(data, true);
        let mut kicks = Kicks::default();
        for k in ["a", "b", "c"] {
            store.put(key(k), Value::from("1"), &mut kicks).unwrap();
        }
        let after_a = store.delete(&key("a"), &mut kicks).unwrap().unwrap();
        plan_for(data).set(fault);
        let b = store.delete(&key("b"), &mut kicks);
        plan_for(data).set(None);
        let b = b
            .expect("a delete log failure never fails the delete")
            .unwrap();
        assert_eq!(store.get(&key("b")), None);
        assert!(!data.join("b.json").exists());
        // Later deletes are not logged any more, and still work.
        store.delete(&key("c"), &mut kicks).unwrap();
        (after_a, b)
        // Dropped without `save`: a crash.
    }

    #[test]
    fn a_failing_append_or_fsync_costs_a_reset_never_a_missed_delete() {
        for op in [Op::AppendLog, Op::SyncLog] {
            for errno in [nix::libc::ENOSPC, nix::libc::EIO] {
                let tmp = tempfile::tempdir().unwrap();
                let data = tmp.path().join("data");
                let fault = Fault {
                    op,
                    errno,
                    times: 1,
                };
                let (after_a, b) = workload(&data, Some(fault));
                assert!(plan_for(&data).injected() > 0, "{op:?}: the fault was hit");
                assert!(
                    !data.join(super::TOMBSTONE_LOG).exists(),
                    "{op:?}/{errno}: the incomplete log is removed"
                );
                let store = open(&data, true);
                let (_, horizon) = store.history_stats();
                assert!(
                    horizon > b,
                    "{op:?}/{errno}: a resume from {after_a} must be reset (horizon {horizon})"
                );
            }
        }
    }

    #[test]
    fn without_faults_the_log_answers_after_a_crash() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let (after_a, _) = workload(&data, None);
        let store = open(&data, true);
        let (tombstones, horizon) = store.history_stats();
        assert_eq!(tombstones, 3);
        assert!(
            horizon <= after_a,
            "horizon {horizon}, resume from {after_a}"
        );
    }

    #[test]
    fn the_log_is_compacted_as_it_grows() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let store = open_capped(&data, false, 10);
        let mut kicks = Kicks::default();
        for _ in 0..6000 {
            store.put(key("k"), Value::from("1"), &mut kicks).unwrap();
            store.delete(&key("k"), &mut kicks).unwrap();
        }
        let len = std::fs::metadata(data.join(super::TOMBSTONE_LOG))
            .unwrap()
            .len();
        assert!(
            len < 40_000,
            "the log holds {len} bytes for one key's deletes"
        );
        let last = store.rev();
        drop(store);
        let store = open_capped(&data, false, 10);
        let (tombstones, horizon) = store.history_stats();
        assert_eq!(tombstones, 1);
        assert!(horizon < last, "the last delete is still answerable");
    }
}

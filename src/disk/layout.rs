//! Names in the data directory: which belong to keys and which to the server.
//!
//! A key never starts with `.` (its first segment is non-empty and `.` only separates
//! segments), so every name the server uses for itself starts with `.` and no key can ever
//! name one of them, whatever the key. Temporary files are numbered, not named after a key,
//! and are created exclusively: two writers can never share one.

use crate::key::Key;

/// A key's file is `<key>.json`.
pub const KEY_SUFFIX: &str = ".json";
/// Temporary files are `.tmp-<n>`, `n` unique for the server's life.
pub const TEMP_PREFIX: &str = ".tmp-";
/// The revision floor: the highest revision a delete handed out (fixed width, rewritten in
/// place so that a delete needs no new space).
pub const REV_FILE: &str = ".rev";
/// Space held back so that deletes and same-size overwrites work on a full file system.
pub const RESERVE_FILE: &str = ".reserve";
/// Where files the server cannot use are moved, out of the way of keys.
pub const QUARANTINE_DIR: &str = ".quarantine";
/// The lock file of layout 1 (the lock is now held on the directory itself).
pub const LEGACY_LOCK: &str = ".lock";
/// The start-up probe for a case-insensitive file system, `.case-probe-<pid>`.
pub const CASE_PROBE_PREFIX: &str = ".case-probe-";
/// The delete history (tombstones) saved at a clean stop, read and removed at the next start.
pub const TOMBSTONE_FILE: &str = ".tombstones";
/// In a volatile directory: the data directory it belongs to (its absolute path, one line).
/// A server whose rules use no `volatile` prefix still reads the volatile directory at start
/// when it names its own data directory, so no key is left there to come back later; one
/// that names another data directory is another server's and left alone.
pub const HOME_FILE: &str = ".home";
/// The append-only log of persistent deletes (`<rev> <key>` per line), so the delete history
/// survives a crash; compacted at start and at a clean stop.
pub const TOMBSTONE_LOG: &str = ".tombstone-log";
/// The history identity ([`super::epoch`]): one random id, 32 hex digits and a newline.
pub const EPOCH_FILE: &str = ".epoch";
/// Width of the revision in [`REV_FILE`]: `u64::MAX` has 20 digits.
pub const REV_WIDTH: usize = 20;

/// What a name in the data directory is.
#[derive(Debug, PartialEq, Eq)]
pub enum Name {
    Key(Key),
    Temp,
    RevFloor,
    Reserve,
    /// [`TOMBSTONE_FILE`], read by the store, not by the key scan.
    Tombstones,
    /// [`HOME_FILE`], read before the directory is opened.
    Home,
    /// [`TOMBSTONE_LOG`], read by the store.
    TombstoneLog,
    /// [`EPOCH_FILE`], read by the store.
    Epoch,
    Quarantine,
    /// `.lock` of layout 1.
    LegacyLock,
    /// `.<key>.tmp` or `.rev.tmp` of layout 1: a write that never finished.
    LegacyTemp,
    /// Not ours: quarantined at start.
    Foreign,
}

/// Classifies one directory entry's name.
pub fn classify(name: &str) -> Name {
    match name {
        REV_FILE => return Name::RevFloor,
        RESERVE_FILE => return Name::Reserve,
        TOMBSTONE_FILE => return Name::Tombstones,
        HOME_FILE => return Name::Home,
        TOMBSTONE_LOG => return Name::TombstoneLog,
        EPOCH_FILE => return Name::Epoch,
        QUARANTINE_DIR => return Name::Quarantine,
        LEGACY_LOCK => return Name::LegacyLock,
        _ => {}
    }
    if name.starts_with(CASE_PROBE_PREFIX) {
        return Name::Temp;
    }
    if let Some(n) = name.strip_prefix(TEMP_PREFIX) {
        if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
            return Name::Temp;
        }
    }
    if name.starts_with('.') && name.ends_with(".tmp") && name.len() > ".tmp".len() + 1 {
        return Name::LegacyTemp;
    }
    match key_of(name) {
        Some(key) => Name::Key(key),
        None => Name::Foreign,
    }
}

/// The file name that holds `key`.
pub fn file_name(key: &Key) -> String {
    format!("{key}{KEY_SUFFIX}")
}

/// The key a file name holds, if it is a key file.
pub fn key_of(file_name: &str) -> Option<Key> {
    Key::parse(file_name.strip_suffix(KEY_SUFFIX)?).ok()
}

/// The name of temporary file number `n`.
pub fn temp_name(n: u64) -> String {
    format!("{TEMP_PREFIX}{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip_and_stay_flat() {
        for text in [
            "a",
            "a.b.c",
            "x.json",
            "dev:1@room#2+x_y-z",
            "rev",
            "tmp-1",
            "lock",
        ] {
            let key = Key::parse(text).unwrap();
            let name = file_name(&key);
            assert!(!name.contains('/') && !name.starts_with('.'));
            assert_eq!(key_of(&name), Some(key.clone()));
            assert_eq!(classify(&name), Name::Key(key));
        }
        assert_eq!(key_of(".a.tmp"), None);
        assert_eq!(key_of("a"), None);
        assert_eq!(key_of("..json"), None);
    }

    #[test]
    fn server_names_never_collide_with_key_names() {
        assert_eq!(classify(".rev"), Name::RevFloor);
        assert_eq!(classify(".tmp-17"), Name::Temp);
        assert_eq!(classify(".tmp-"), Name::Foreign);
        assert_eq!(classify(".rev.tmp"), Name::LegacyTemp);
        assert_eq!(classify(".a.b.tmp"), Name::LegacyTemp);
        assert_eq!(classify(".lock"), Name::LegacyLock);
        assert_eq!(classify(".quarantine"), Name::Quarantine);
        assert_eq!(classify(".reserve"), Name::Reserve);
        assert_eq!(classify(".home"), Name::Home);
        assert_eq!(classify(".tombstone-log"), Name::TombstoneLog);
        assert_eq!(classify(".epoch"), Name::Epoch);
        assert_eq!(classify("notes.txt"), Name::Foreign);
        assert_eq!(classify("a..json"), Name::Foreign);
        // Every name the server creates for itself starts with '.', which no key file does.
        for name in [
            REV_FILE,
            RESERVE_FILE,
            QUARANTINE_DIR,
            HOME_FILE,
            TOMBSTONE_LOG,
            EPOCH_FILE,
            &temp_name(0),
        ] {
            assert!(name.starts_with('.'));
            assert!(!matches!(classify(name), Name::Key(_) | Name::Foreign));
        }
    }
}

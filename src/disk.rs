//! One file per key in the data directory. Knows nothing of sockets or subscribers.
//!
//! Layout of a data directory:
//! - `<key>.json` — one per key, content `{"rev":N,"value":<json>}` (a person can `cat` it);
//! - `.<key>.tmp` — a write in progress; renamed over `<key>.json`, or removed at the next start;
//! - `.rev` — the highest revision handed out by a delete, so revisions never go backwards
//!   even when the key with the highest revision is gone;
//! - `.lock` — held (`flock`) by the one server that owns the directory.
//!
//! A key's characters are all safe in a file name and a key never starts with `.`, so a key file
//! can never collide with the bookkeeping files or name a path outside the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::DiskError;
use crate::key::Key;
use crate::value::Value;

const SUFFIX: &str = ".json";
const TMP_SUFFIX: &str = ".tmp";
const REV_FILE: &str = ".rev";
const LOCK_FILE: &str = ".lock";

/// The file name that holds `key`.
pub fn file_name(key: &Key) -> String {
    format!("{key}{SUFFIX}")
}

/// The key a file name holds, if it is a key file.
pub fn key_of(file_name: &str) -> Option<Key> {
    Key::parse(file_name.strip_suffix(SUFFIX)?).ok()
}

/// A key as it was found on disk at start.
pub struct Loaded {
    pub key: Key,
    pub value: Value,
    pub rev: u64,
}

/// What was found on disk at start.
pub struct Contents {
    pub entries: Vec<Loaded>,
    /// The highest revision the directory has seen (key files and `.rev`).
    pub max_rev: u64,
}

#[derive(Deserialize)]
struct Record<'a> {
    rev: u64,
    #[serde(borrow)]
    value: &'a RawValue,
}

/// The data directory, owned exclusively while this value lives.
pub struct Disk {
    dir: PathBuf,
    fsync: bool,
    /// Open handle on the directory, to fsync renames and unlinks into it.
    dir_handle: File,
    /// The revision last written to `.rev`; held across that file's write so concurrent deletes
    /// store it in increasing order.
    rev_floor: Mutex<u64>,
    /// Holds the `flock` that keeps a second server out; released when dropped.
    _lock: File,
}

/// Why the data directory could not be opened.
#[derive(Debug)]
pub enum OpenError {
    Disk(DiskError),
    /// Another process holds the directory's lock.
    InUse(PathBuf),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Disk(err) => err.fmt(f),
            OpenError::InUse(path) => write!(
                f,
                "data directory {} is in use by another nkv-server (it holds the lock on {})",
                path.display(),
                path.join(LOCK_FILE).display()
            ),
        }
    }
}

impl std::error::Error for OpenError {}

impl From<DiskError> for OpenError {
    fn from(err: DiskError) -> OpenError {
        OpenError::Disk(err)
    }
}

impl Disk {
    /// Creates the directory if needed, locks it, removes stray temporary files and loads every
    /// key file. A file that cannot be read or parsed is logged and left in place.
    ///
    /// # Errors
    /// The directory cannot be created, locked or listed, or another server holds it.
    pub fn open(dir: &Path, fsync: bool) -> Result<(Disk, Contents), OpenError> {
        fs::create_dir_all(dir).map_err(|e| DiskError::new("create directory", dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| DiskError::new("open", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(OpenError::InUse(dir.to_owned())),
            Err(fs::TryLockError::Error(e)) => {
                return Err(DiskError::new("lock", &lock_path, e).into())
            }
        }
        let dir_handle = File::open(dir).map_err(|e| DiskError::new("open directory", dir, e))?;
        let contents = load(dir)?;
        let disk = Disk {
            dir: dir.to_owned(),
            fsync,
            dir_handle,
            rev_floor: Mutex::new(contents.max_rev),
            _lock: lock,
        };
        Ok((disk, contents))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of `key`'s file; always directly inside the data directory.
    pub fn path_of(&self, key: &Key) -> PathBuf {
        self.dir.join(file_name(key))
    }

    /// Stores `value` as `key`'s file, atomically: the file holds the old or the new record,
    /// never a mix. With `fsync`, the data and the rename are on stable storage on return.
    ///
    /// The caller serialises writes to one key (the temp file name is per key).
    ///
    /// # Errors
    /// The temp file cannot be written or renamed; the old value is then still in place.
    pub fn write(&self, key: &Key, rev: u64, value: &str) -> Result<(), DiskError> {
        let mut record = Vec::with_capacity(value.len() + 32);
        // Writing into a Vec cannot fail.
        let _ = write!(record, "{{\"rev\":{rev},\"value\":");
        record.extend_from_slice(value.as_bytes());
        record.extend_from_slice(b"}\n");
        self.replace(&format!(".{key}{TMP_SUFFIX}"), &file_name(key), &record)
    }

    /// Removes `key`'s file, first recording `rev` so the revision survives the key.
    ///
    /// # Errors
    /// `.rev` cannot be written or the file cannot be removed; the key is then still on disk.
    pub fn remove(&self, key: &Key, rev: u64) -> Result<(), DiskError> {
        self.raise_rev_floor(rev)?;
        let path = self.path_of(key);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(DiskError::new("remove", path, e)),
        }
        self.sync_dir()
    }

    fn raise_rev_floor(&self, rev: u64) -> Result<(), DiskError> {
        let mut floor = self.rev_floor.lock();
        if rev > *floor {
            self.replace(".rev.tmp", REV_FILE, format!("{rev}\n").as_bytes())?;
            *floor = rev;
        }
        Ok(())
    }

    fn replace(&self, tmp_name: &str, name: &str, content: &[u8]) -> Result<(), DiskError> {
        let tmp = self.dir.join(tmp_name);
        let result = (|| {
            let mut file = File::create(&tmp).map_err(|e| DiskError::new("create", &tmp, e))?;
            file.write_all(content)
                .map_err(|e| DiskError::new("write", &tmp, e))?;
            if self.fsync {
                file.sync_data()
                    .map_err(|e| DiskError::new("fsync", &tmp, e))?;
            }
            let path = self.dir.join(name);
            fs::rename(&tmp, &path).map_err(|e| DiskError::new("rename into place", &path, e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), DiskError> {
        if self.fsync {
            self.dir_handle
                .sync_all()
                .map_err(|e| DiskError::new("fsync directory", &self.dir, e))?;
        }
        Ok(())
    }
}

fn load(dir: &Path) -> Result<Contents, DiskError> {
    let mut contents = Contents {
        entries: Vec::new(),
        max_rev: 0,
    };
    let listing = fs::read_dir(dir).map_err(|e| DiskError::new("list", dir, e))?;
    for entry in listing {
        let entry = entry.map_err(|e| DiskError::new("list", dir, e))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            log::warn!("ignoring {}: not a UTF-8 file name", path.display());
            continue;
        };
        if name.starts_with('.') {
            if name.ends_with(TMP_SUFFIX) {
                match fs::remove_file(&path) {
                    Ok(()) => log::info!("removed stray temporary file {}", path.display()),
                    Err(e) => log::warn!("cannot remove stray file {}: {e}", path.display()),
                }
            } else if name == REV_FILE {
                match fs::read_to_string(&path).map(|t| t.trim().parse::<u64>()) {
                    Ok(Ok(rev)) => contents.max_rev = contents.max_rev.max(rev),
                    _ => log::warn!("ignoring {}: not a revision number", path.display()),
                }
            }
            continue;
        }
        let Some(key) = key_of(&name) else {
            log::warn!("ignoring {}: not a key file", path.display());
            continue;
        };
        match read_record(&path) {
            Ok((value, rev)) => {
                contents.max_rev = contents.max_rev.max(rev);
                contents.entries.push(Loaded { key, value, rev });
            }
            Err(why) => log::warn!("ignoring {}: {why}; left in place", path.display()),
        }
    }
    Ok(contents)
}

fn read_record(path: &Path) -> Result<(Value, u64), String> {
    let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
    let record: Record = serde_json::from_str(&text).map_err(|e| format!("not a record: {e}"))?;
    Ok((Value::from(record.value.get()), record.rev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip_and_stay_flat() {
        for text in ["a", "a.b.c", "x.json", "dev:1@room#2+x_y-z"] {
            let key = Key::parse(text).unwrap();
            let name = file_name(&key);
            assert!(!name.contains('/') && !name.starts_with('.'));
            assert_eq!(key_of(&name), Some(key));
        }
        assert_eq!(key_of(".a.tmp"), None);
        assert_eq!(key_of("a"), None);
        assert_eq!(key_of("..json"), None);
    }
}

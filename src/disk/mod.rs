//! One file per key in the data directory. Knows nothing of sockets or subscribers.
//!
//! - [`layout`]: which names are keys' and which the server's (they never collide);
//! - [`owner`]: directory ownership and modes, checked or set at start;
//! - [`dir`]: the directory descriptor every operation goes through (no symlink followed);
//! - [`load`]: reading the directory at start, quarantining what cannot be used;
//! - [`write`]: atomic replace, delete and the revision floor;
//! - [`reserve`]: space held back so a full disk can still be freed;
//! - [`fault`]: fault injection for the crate's tests.
//!
//! Layout of a data directory (layout 2; see docs/ARCHITECTURE.md):
//! - `<key>.json` — one per key, `{"rev":N,"value":<json>}` on one line (a person can `cat` it;
//!   the server pads `N` with spaces to a fixed width, see [`Disk::write_numbered`]);
//! - `.tmp-<n>` — a write in progress, created exclusively; renamed into place or removed at
//!   the next start;
//! - `.rev` — the highest revision handed out by a delete, 20 digits, rewritten in place;
//! - `.reserve` — space held back so deletes and same-size overwrites work on a full disk;
//! - `.quarantine/` — files found at start that are not valid records or not ours;
//! - `.tombstone-log` — the persistent deletes since the last compaction (see [`tomblog`]);
//! - `.tombstones` — the delete history saved at a clean stop;
//! - `.home` — in a volatile directory only: the data directory it belongs to.
//!
//! The directory itself carries the `flock` that keeps a second server out.

pub mod dir;
mod epoch;
pub mod fault;
#[cfg(test)]
mod fault_tests;
mod homes;
pub mod layout;
pub mod load;
pub mod owner;
#[cfg(test)]
mod power_tests;
mod reserve;
mod server_file;
mod spare;
mod tomblog;
mod write;

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};

use nix::sys::stat::Mode;
use nix::unistd::Gid;
use parking_lot::Mutex;

use crate::error::{is_no_space, DiskError};
use dir::{Access, Dir};
pub use epoch::Epoch;
pub use homes::{place, Placed};
pub use layout::{file_name, key_of};
pub use load::{Contents, Loaded};
use owner::{DirError, Policy};
pub use server_file::home_of;
pub use tomblog::LogRecords;

/// The largest revision: fits every signed 64-bit integer, and a record's revision above it
/// is refused at load instead of wrapping.
pub const MAX_REV: u64 = i64::MAX as u64;

/// How the data directory is opened.
#[derive(Clone, Debug)]
pub struct Options {
    /// Fsync every write and its directory entry before acknowledging it.
    pub fsync: bool,
    /// The value limit: bounds what load reads and sizes the reserve.
    pub max_value_bytes: usize,
    /// The socket's group (`--socket-group`): data is then `0o750`/`0o640` with that group.
    pub group: Option<Gid>,
    /// `--allow-unsafe-dirs`: use an existing directory whoever owns it and whatever its mode.
    pub allow_unsafe_dirs: bool,
}

impl Options {
    pub fn new(fsync: bool) -> Options {
        Options {
            fsync,
            max_value_bytes: 16 << 20,
            group: None,
            allow_unsafe_dirs: false,
        }
    }
}

/// The data directory, owned exclusively while this value lives.
pub struct Disk {
    dir: Dir,
    fsync: bool,
    /// Number of the next temporary file; unique for the server's life.
    next_temp: AtomicU64,
    /// The revision floor file, rewritten in place, and the value it holds. Held across that
    /// write so concurrent deletes store increasing values.
    floor: Mutex<write::Floor>,
    /// The space reserve; see [`reserve`].
    reserve: Mutex<reserve::Reserve>,
    /// What `reserve` holds (0 while used up), and whether it is short of its target: read
    /// without the lock by every put and delete, written under it.
    reserve_fit: AtomicU64,
    reserve_short: AtomicBool,
    /// The largest record a put may write (the value limit plus the record's frame).
    max_record: u64,
    /// The delete log, once the store started it (see [`tomblog`]); `None` before, in a
    /// volatile directory, and after an append failed. Taken by every append.
    tomb_log: Mutex<Option<tomblog::TombLog>>,
    /// Spare files a put rewrites and exchanges with a key's file, on tmpfs only (see
    /// [`spare`]).
    spares: Option<spare::Spares>,
}

/// Why the data directory could not be opened.
#[derive(Debug)]
pub enum OpenError {
    Disk(DiskError),
    Dir(DirError),
    /// Another process holds the directory's lock.
    InUse(PathBuf),
    /// The file system does not tell `a.B` from `a.b`: two keys would share one file.
    CaseInsensitive(PathBuf),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Disk(err) => err.fmt(f),
            OpenError::Dir(err) => write!(f, "data directory: {err}"),
            OpenError::InUse(path) => write!(
                f,
                "data directory {} is in use by another nkv-server (it holds the directory's lock)",
                path.display()
            ),
            OpenError::CaseInsensitive(path) => write!(
                f,
                "data directory {} is on a case-insensitive file system (keys a.B and a.b would share one file); use a case-sensitive one",
                path.display()
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

/// The process umask, read without changing it (`umask(2)` would race other threads).
fn current_umask() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Umask:"))?;
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
}

impl Disk {
    /// Creates the directory if needed (checking an existing one's owner and mode), locks it,
    /// migrates layout 1, removes stray temporary files and loads every key file; files that
    /// cannot be used are quarantined.
    ///
    /// # Errors
    /// The directory is unsafe, cannot be created, locked or listed, is on a case-insensitive
    /// file system, or another server holds it.
    pub fn open(path: &Path, options: &Options) -> Result<(Disk, Contents), OpenError> {
        let policy = Policy::new(options.group, options.allow_unsafe_dirs);
        owner::prepare(path, policy).map_err(OpenError::Dir)?;
        let file_mode = if options.group.is_some() {
            0o640
        } else {
            0o600
        };
        let access = Access {
            file_mode,
            group: options.group,
            umask_strips: current_umask().is_none_or(|m| m & file_mode != 0),
        };
        let dir = Dir::open(path, options.allow_unsafe_dirs, access)
            .map_err(|e| DiskError::new("open directory", path, e))?;
        match dir.file().try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(OpenError::InUse(path.to_owned())),
            Err(fs::TryLockError::Error(e)) => return Err(DiskError::new("lock", path, e).into()),
        }
        if !options.allow_unsafe_dirs {
            tighten(&dir, policy);
        }
        migrate_legacy_lock(&dir)?;
        if case_insensitive(&dir).map_err(|e| DiskError::new("probe", path, e))? {
            return Err(OpenError::CaseInsensitive(path.to_owned()));
        }
        let contents = load::load(&dir, options.max_value_bytes)?;
        let max_record = options.max_value_bytes as u64 + 64;
        let reserve = reserve::Reserve::open(&dir, contents.largest, max_record);
        let spares = spare::on_tmpfs(dir.file()).then(spare::Spares::default);
        let disk = Disk {
            floor: Mutex::new(write::Floor::open(&dir, &contents)?),
            reserve_fit: AtomicU64::new(reserve.fit()),
            reserve_short: AtomicBool::new(reserve.short()),
            reserve: Mutex::new(reserve),
            dir,
            fsync: options.fsync,
            next_temp: AtomicU64::new(unpredictable()),
            max_record,
            tomb_log: Mutex::new(None),
            spares,
        };
        if options.fsync {
            disk.dir
                .sync()
                .map_err(|e| DiskError::new("fsync directory", path, e))?;
        }
        Ok((disk, contents))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The path of `key`'s file; always directly inside the data directory.
    pub fn path_of(&self, key: &crate::key::Key) -> PathBuf {
        self.dir.join(&file_name(key))
    }
}

/// Gives the data directory the policy's mode and group (a directory of layout 1 was `0755`
/// under the usual umask: every value world-readable). Only a directory we own.
fn tighten(dir: &Dir, policy: Policy) {
    let fd = dir.file().as_raw_fd();
    let owned = dir.file().metadata().is_ok_and(|m| {
        std::os::unix::fs::MetadataExt::uid(&m) == nix::unistd::Uid::effective().as_raw()
    });
    if !owned {
        log::warn!(
            "data directory {} is not ours: leaving its mode",
            dir.path().display()
        );
        return;
    }
    if let Some(gid) = policy.group {
        if let Err(e) = nix::unistd::fchown(fd, None, Some(gid)) {
            log::warn!("cannot give {} to group {gid}: {e}", dir.path().display());
        }
    }
    if let Err(e) = nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(policy.mode as _)) {
        log::warn!("cannot set the mode of {}: {e}", dir.path().display());
    }
}

/// Layout 1 locked `.lock` instead of the directory: a server of that version may still run.
/// If it does, its lock is held; otherwise the file is removed.
fn migrate_legacy_lock(dir: &Dir) -> Result<(), OpenError> {
    let name = layout::LEGACY_LOCK;
    let file: File = match dir.open_rw(name) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {
            // A symlink or something else that is not ours: not a lock anyone holds.
            let _ = dir.unlink(name);
            return Ok(());
        }
    };
    if file.metadata().is_ok_and(|m| m.is_file()) {
        if let Err(fs::TryLockError::WouldBlock) = file.try_lock() {
            return Err(OpenError::InUse(dir.path().to_owned()));
        }
    }
    drop(file);
    match dir.unlink(name) {
        Ok(()) => log::info!(
            "migrated {}: the lock is now on the directory itself",
            dir.join(name).display()
        ),
        Err(e) => log::warn!("cannot remove {}: {e}", dir.join(name).display()),
    }
    Ok(())
}

/// A start for temporary file numbers that no one can guess in advance, so names planted
/// ahead are not met (and if one is, `O_EXCL` refuses it and the next number is tried).
fn unpredictable() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::process::id()) >> 16
}

/// Whether the file system folds case: a probe file is then found under its upper-case name.
fn case_insensitive(dir: &Dir) -> io::Result<bool> {
    let lower = format!("{}{}", layout::CASE_PROBE_PREFIX, std::process::id());
    let upper = lower.to_ascii_uppercase();
    let _ = dir.unlink(&lower);
    match dir.create_new(&lower, fault::Op::CreateTemp) {
        Ok(file) => drop(file),
        Err(e) if is_no_space(&e) => {
            log::warn!(
                "cannot check whether {} folds case: the file system is full",
                dir.path().display()
            );
            return Ok(false);
        }
        Err(e) => return Err(e),
    }
    let same = same_file(dir, &lower, &upper);
    dir.unlink(&lower)?;
    Ok(same)
}

/// Whether two names lead to one file (as `x` and `X` do where case is folded).
fn same_file(dir: &Dir, a: &str, b: &str) -> bool {
    match (dir.stat(a), dir.stat(b)) {
        (Ok(a), Ok(b)) => a.st_ino == b.st_ino && a.st_dev == b.st_dev,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(path: &Path) -> Dir {
        let access = Access {
            file_mode: 0o600,
            group: None,
            umask_strips: true,
        };
        Dir::open(path, false, access).unwrap()
    }

    #[test]
    fn case_folding_is_told_by_two_names_for_one_file() {
        // No case-insensitive file system can be mounted here (the kernel lacks
        // CONFIG_UNICODE, vfat is absent), so a hard link plays the folded name.
        let tmp = tempfile::tempdir().unwrap();
        let d = dir(tmp.path());
        fs::write(tmp.path().join("probe"), "").unwrap();
        fs::hard_link(tmp.path().join("probe"), tmp.path().join("PROBE")).unwrap();
        fs::write(tmp.path().join("other"), "").unwrap();
        fs::write(tmp.path().join("OTHER"), "").unwrap();
        assert!(same_file(&d, "probe", "PROBE"));
        assert!(!same_file(&d, "other", "OTHER"));
        assert!(!same_file(&d, "other", "missing"));
        // This file system keeps case: the real probe says so and leaves nothing behind.
        assert!(!case_insensitive(&d).unwrap());
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 4);
    }
}

//! On tmpfs, a put rewrites a spare file and exchanges it with the key's file, instead of
//! creating a new file and renaming it over the old one.
//!
//! Creating a file allocates an inode and renaming over a file frees one; on tmpfs (memory
//! accounting, page cache) that pair is most of a put's cost: measured here in a C loop,
//! create + write + close + rename took 22.8 µs, open + fstat + write + close + exchange (what
//! a put here does, plus one `fstatat`) 10.6–11.4 µs. So on tmpfs the server keeps a few
//! spare `.tmp-<n>` files: a put opens one (never through a symlink, and only a plain file of
//! ours with one link), writes its record over it, and `renameat2(RENAME_EXCHANGE)`s it with
//! `<key>.json`. The key's file then holds the new record, atomically as with a rename, and
//! the spare holds the old one, to be overwritten by a later put. A put of a new key renames
//! its spare into place; a put without a spare writes a fresh temporary file as elsewhere
//! and exchanges it, which leaves a spare behind.
//!
//! Only on tmpfs: it has no power loss to survive. On a disk file system, data rewritten in
//! place can reach the disk after the exchange does, and a power loss could then leave a
//! key's file holding a spare's old record; the classic create + rename is what such file
//! systems order correctly (ext4's `auto_da_alloc`, say).
//!
//! Spares hold old records, so they are bounded: at most [`MAX_SPARES`]; one that would hold
//! more than [`MAX_SPARE_BYTES`] is removed right after its exchange; those holding a key's
//! old record go when the key is deleted (no copy of a deleted value lingers); all go when the
//! file system is full (and the put is tried again without them). A restart removes them with
//! every `.tmp-<n>`. What an exchange moved out of a key's place that is not a regular file
//! (a planted symlink or FIFO) is removed; a directory is swapped back and the put fails, as a
//! rename over it would.

use std::fs::File;

use parking_lot::Mutex;

/// Spares kept at most: about the number of puts that write at the same time.
pub const MAX_SPARES: usize = 4;
/// A spare holding more than this is removed rather than reused.
pub const MAX_SPARE_BYTES: u64 = 64 * 1024;

/// Whether `dir` is on tmpfs.
pub fn on_tmpfs(dir: &File) -> bool {
    nix::sys::statfs::fstatfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// A spare: its name and the key file whose old record it holds.
struct Spare {
    name: String,
    holds: String,
}

/// The spare files, when the directory keeps any.
#[derive(Default)]
pub struct Spares {
    spares: Mutex<Vec<Spare>>,
}

impl Spares {
    /// A spare's name, if one is free.
    pub fn take(&self) -> Option<String> {
        self.spares.lock().pop().map(|s| s.name)
    }

    /// Gives `name`, now holding `holds`'s old record, back; `false` (the caller removes it)
    /// when enough spares are kept.
    pub fn give_back(&self, name: String, holds: &str) -> bool {
        let mut spares = self.spares.lock();
        if spares.len() >= MAX_SPARES {
            return false;
        }
        spares.push(Spare {
            name,
            holds: holds.to_owned(),
        });
        true
    }

    /// Takes out the spares that hold an old record of the key file `holds` (it is being
    /// deleted: no copy of it may linger).
    pub fn take_holding(&self, holds: &str) -> Vec<String> {
        let mut spares = self.spares.lock();
        let (gone, kept) = std::mem::take(&mut *spares)
            .into_iter()
            .partition(|s| s.holds == holds);
        *spares = kept;
        gone.into_iter().map(|s: Spare| s.name).collect()
    }

    /// Every spare's name, taken out.
    pub fn take_all(&self) -> Vec<String> {
        std::mem::take(&mut *self.spares.lock())
            .into_iter()
            .map(|s| s.name)
            .collect()
    }
}

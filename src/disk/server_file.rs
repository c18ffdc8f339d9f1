//! Files the server keeps for itself besides the revision floor (the saved delete history):
//! written whole through a temporary file and a rename, read once and removed at start.

use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::fault::Op;
use super::layout::{HOME_FILE, TOMBSTONE_FILE};
use super::Disk;
use crate::error::WriteError;

/// The most a saved server file may hold: what 100,000 tombstones of 200-byte keys need, with
/// room to spare; a larger file is not ours to trust.
const MAX_SERVER_FILE: u64 = 256 << 20;

impl Disk {
    /// Replaces the saved delete history with `bytes` (through a temporary file renamed into
    /// place; fsynced with `--fsync`).
    ///
    /// # Errors
    /// The file could not be written or renamed; the old one (if any) is left.
    pub fn save_tombstones(&self, bytes: &[u8]) -> Result<(), WriteError> {
        self.replace_server_file(TOMBSTONE_FILE, bytes)
    }

    /// Marks this (volatile) directory as belonging to the data directory `home`; see
    /// [`HOME_FILE`]. Written only when it changes.
    ///
    /// # Errors
    /// The file could not be written or renamed.
    pub fn mark_home(&self, home: &Path) -> Result<(), WriteError> {
        let mut line = home.as_os_str().as_bytes().to_vec();
        line.push(b'\n');
        if home_of(self.dir()).is_some_and(|h| h == home) {
            return Ok(());
        }
        self.replace_server_file(HOME_FILE, &line)
    }

    /// Replaces the server file `name` with `bytes` (through a temporary file renamed into
    /// place; fsynced with `--fsync`).
    pub(super) fn replace_server_file(&self, name: &str, bytes: &[u8]) -> Result<(), WriteError> {
        self.check_in_place()?;
        let (tmp, mut file) = self.create_temp()?;
        let fsync = self.fsync;
        let written = file
            .write_all(bytes)
            .and_then(|()| if fsync { file.sync_data() } else { Ok(()) })
            .and_then(|()| self.dir.rename(&tmp, name))
            .and_then(|()| if fsync { self.dir.sync() } else { Ok(()) });
        if let Err(e) = written {
            let _ = self.dir.unlink(&tmp);
            return Err(self.fail("write", name, e));
        }
        Ok(())
    }

    /// Reads and removes the saved delete history: it describes only the moment it was
    /// written, so it must never be read twice. `None` when there is none (or it is not a
    /// plain file of a sane size).
    pub fn take_tombstones(&self) -> Option<Vec<u8>> {
        let file = match self.dir.open_read(TOMBSTONE_FILE) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                log::warn!(
                    "cannot read {}: {e}",
                    self.dir.join(TOMBSTONE_FILE).display()
                );
                let _ = self.dir.unlink(TOMBSTONE_FILE);
                return None;
            }
        };
        let plain = file
            .metadata()
            .is_ok_and(|m| m.is_file() && m.len() <= MAX_SERVER_FILE);
        let mut bytes = Vec::new();
        let read = plain && file.take(MAX_SERVER_FILE).read_to_end(&mut bytes).is_ok();
        if let Err(e) = self
            .dir
            .fault(Op::Unlink)
            .and_then(|()| self.dir.unlink(TOMBSTONE_FILE))
        {
            log::warn!(
                "cannot remove {}: {e}; ignoring it",
                self.dir.join(TOMBSTONE_FILE).display()
            );
            return None;
        }
        read.then_some(bytes)
    }
}

/// The data directory a volatile directory belongs to, read from its [`HOME_FILE`] without
/// opening (or locking) the directory: `None` when there is none or it is not a small plain
/// file holding one absolute path.
pub fn home_of(volatile_dir: &Path) -> Option<PathBuf> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
        .open(volatile_dir.join(HOME_FILE))
        .ok()?;
    if !file
        .metadata()
        .is_ok_and(|m| m.is_file() && m.len() <= 4096)
    {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(4096).read_to_end(&mut bytes).ok()?;
    let line = bytes.strip_suffix(b"\n")?;
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(line));
    (path.is_absolute() && !line.contains(&b'\n')).then_some(path)
}

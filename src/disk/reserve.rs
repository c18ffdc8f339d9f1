//! The space reserve: `.reserve` holds an inode and as many bytes as the largest record.
//!
//! A put that finds the disk full, and whose record is no larger than the key's current file,
//! writes its record into the reserve and renames the reserve over the key's file: the old
//! file's space then pays for a new reserve. A put whose record is larger than every record so
//! far first grows the reserve; if that does not fit, the put does not fit, and nothing
//! changes. A delete re-creates a reserve that was used up.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use nix::fcntl::{fallocate, FallocateFlags};

use super::dir::Dir;
use super::fault::{Op, Rec};
use super::layout::RESERVE_FILE;
use super::write::{open_or_create, write_parts};
use super::Disk;
use crate::error::WriteError;

/// Granularity of the reserve, so it grows rarely.
const RESERVE_STEP: u64 = 64 * 1024;

/// The space reserve: `file` is `.reserve` with `size` bytes allocated; `None` while used up
/// and not yet re-created.
pub struct Reserve {
    file: Option<File>,
    size: u64,
    /// What the reserve should hold: the largest record so far, rounded up.
    target: u64,
    max: u64,
}

impl Reserve {
    /// Opens or creates `.reserve` and sizes it for the largest loaded record. Without room,
    /// the server runs with what it has, and says so.
    pub fn open(dir: &Dir, largest: u64, max: u64) -> Reserve {
        let mut reserve = Reserve {
            file: None,
            size: 0,
            target: round_up(largest).min(round_up(max)),
            max: round_up(max),
        };
        match open_or_create(dir, RESERVE_FILE, &[]) {
            Ok(file) => {
                reserve.size = file.metadata().map(|m| m.len()).unwrap_or(0);
                reserve.file = Some(file);
                if let Err(e) = reserve.grow(dir, reserve.target) {
                    log::warn!(
                        "cannot reserve {} bytes in {}: {e}; on a full disk, overwrites may fail",
                        reserve.target,
                        dir.join(RESERVE_FILE).display()
                    );
                }
            }
            Err(e) => log::warn!(
                "cannot create {}: {e}; on a full disk, overwrites may fail",
                dir.join(RESERVE_FILE).display()
            ),
        }
        reserve
    }

    /// How large a record the reserve can take now (0 while used up).
    pub fn fit(&self) -> u64 {
        if self.file.is_some() {
            self.size
        } else {
            0
        }
    }

    /// Whether the reserve is missing or smaller than its target.
    pub fn short(&self) -> bool {
        self.file.is_none() || self.size < self.target
    }

    /// Makes the reserve hold at least `want` bytes (re-creating it if used up).
    fn grow(&mut self, dir: &Dir, want: u64) -> io::Result<()> {
        let want = round_up(want).min(self.max).max(self.target);
        if self.file.is_none() {
            self.file = Some(open_or_create(dir, RESERVE_FILE, &[])?);
            self.size = 0;
        }
        if want <= self.size {
            return Ok(());
        }
        dir.fault(Op::Reserve)?;
        let file = self
            .file
            .as_ref()
            .expect("just ensured: the reserve file is open");
        allocate(file, want)?;
        self.size = want;
        self.target = want;
        Ok(())
    }
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(RESERVE_STEP).max(1) * RESERVE_STEP
}

/// Allocates `len` bytes to `file` (writing zeros where `fallocate` is not supported).
fn allocate(file: &File, len: u64) -> io::Result<()> {
    let size = len as nix::libc::off_t;
    match fallocate(file.as_raw_fd(), FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => {
            let zeros = vec![0u8; RESERVE_STEP as usize];
            let mut at = file.metadata()?.len();
            while at < len {
                let n = (len - at).min(RESERVE_STEP) as usize;
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            file.sync_data()
        }
        Err(e) => Err(e.into()),
    }
}

impl Disk {
    /// A record larger than any so far needs a larger reserve first: otherwise an overwrite
    /// of it could not be done on a full disk. If the reserve cannot grow, the put does not fit.
    pub(super) fn ensure_reserve(&self, len: u64) -> Result<(), WriteError> {
        // The common case, without the lock: the reserve already covers this record.
        if len <= self.reserve_fit.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut reserve = self.reserve.lock();
        let grown = if reserve.file.is_some() && len <= reserve.size {
            Ok(())
        } else {
            reserve
                .grow(&self.dir, len.min(self.max_record))
                .map_err(|e| self.fail("grow the reserve", RESERVE_FILE, e))
        };
        self.publish_reserve(&reserve);
        grown
    }

    /// Makes the lock-free view of the reserve match it; called with its lock held.
    fn publish_reserve(&self, reserve: &Reserve) {
        self.reserve_fit.store(reserve.fit(), Ordering::Release);
        self.reserve_short.store(reserve.short(), Ordering::Release);
    }

    /// The disk is full: if the new record is no larger than the key's current file, write it
    /// into the reserve and rename that over the key's file, then re-create the reserve.
    pub(super) fn write_with_reserve(
        &self,
        name: &str,
        parts: &[&[u8]],
        len: u64,
        rev: u64,
        no_space: WriteError,
    ) -> Result<(), WriteError> {
        // What the old file occupies: a record one digit longer (its revision grew) still
        // fits in the old file's last block.
        let old = match self.dir.stat(name) {
            Ok(st) => (st.st_size as u64).max(st.st_blocks as u64 * 512),
            Err(_) => return Err(no_space),
        };
        let mut reserve = self.reserve.lock();
        if len > old || len > reserve.size {
            return Err(no_space);
        }
        let Some(mut file) = reserve.file.take() else {
            return Err(no_space);
        };
        self.publish_reserve(&reserve);
        let written = (|| {
            file.set_len(0)?;
            self.dir.fault(Op::WriteTemp)?;
            write_parts(&mut file, parts)?;
            self.dir
                .note(|| Rec::Write(RESERVE_FILE.to_owned(), parts.concat()));
            if self.fsync {
                self.dir.fault(Op::SyncFile)?;
                file.sync_data()?;
                self.dir.note(|| Rec::SyncFile(RESERVE_FILE.to_owned()));
            }
            // The key's file gets the reserve's inode, and so its mode: make it the server's.
            self.dir.conform(&file)?;
            self.dir.rename(RESERVE_FILE, name)
        })();
        if let Err(e) = written {
            // Still `.reserve`: give it its space back for the next attempt.
            let size = reserve.size;
            reserve.size = 0;
            reserve.file = Some(file);
            let _ = reserve.grow(&self.dir, size);
            self.publish_reserve(&reserve);
            return Err(self.fail("write into the reserve for", name, e));
        }
        reserve.size = 0;
        log::info!(
            "disk full: {} written through the reserve",
            self.dir.join(name).display()
        );
        let synced = self.sync_dir(rev);
        self.restore_reserve(&mut reserve);
        synced
    }

    /// Re-creates a used-up reserve, if there is room again.
    pub(super) fn restore_reserve(&self, reserve: &mut Reserve) {
        if reserve.file.is_some() && reserve.size >= reserve.target {
            return;
        }
        let target = reserve.target;
        if let Err(e) = reserve.grow(&self.dir, target) {
            log::warn!(
                "cannot re-create {}: {e}; will retry",
                self.dir.join(RESERVE_FILE).display()
            );
        }
    }
}

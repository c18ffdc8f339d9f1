//! Changing the data directory: atomic replace, delete, the revision floor and the reserve.
//!
//! A put writes its record to a fresh `.tmp-<n>` (created exclusively, never through a
//! symlink), fsyncs it with `--fsync`, renames it over `<key>.json` and fsyncs the directory.
//! Until the rename nothing has changed; after it the change is in place, so a failing
//! directory fsync is reported as [`WriteError::NotDurable`], not as a failure.
//!
//! A full file system must still let a person free space through nkv:
//! - a delete rewrites the fixed-width `.rev` in place (no new block, no new inode) and
//!   unlinks the key's file;
//! - `.reserve` holds an inode and as many bytes as the largest record. A put that finds the
//!   disk full, and whose record is no larger than the key's current file, writes its record
//!   into the reserve and renames the reserve over the key's file: the old file's space then
//!   pays for a new reserve. A put whose record is larger than every record so far first grows
//!   the reserve; if that does not fit, the put does not fit, and nothing changes.

use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::Ordering;

use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::Uid;

use super::dir::Dir;
use super::fault::{Op, Rec};
use super::layout::{file_name, temp_name, RESERVE_FILE, REV_FILE, REV_WIDTH};
use super::load::Contents;
use super::Disk;
use crate::error::{DiskError, WriteError};
use crate::key::Key;

/// Granularity of the reserve, so it grows rarely.
const RESERVE_STEP: u64 = 64 * 1024;

/// The open revision floor and the value it holds.
pub struct Floor {
    file: File,
    value: u64,
}

/// The space reserve: `file` is `.reserve` with `size` bytes allocated; `None` while used up
/// and not yet re-created.
pub struct Reserve {
    file: Option<File>,
    size: u64,
    /// What the reserve should hold: the largest record so far, rounded up.
    target: u64,
    max: u64,
}

/// Whether `file` is a plain file of ours alone, safe to rewrite in place.
fn ours_alone(file: &File) -> bool {
    file.metadata()
        .is_ok_and(|m| m.is_file() && m.nlink() == 1 && m.uid() == Uid::effective().as_raw())
}

/// `rev` as the floor file holds it: fixed width, so rewriting it never changes its size.
fn floor_bytes(rev: u64) -> [u8; REV_WIDTH + 1] {
    let mut out = [b'\n'; REV_WIDTH + 1];
    let text = format!("{rev:0width$}", width = REV_WIDTH);
    out[..REV_WIDTH].copy_from_slice(&text.as_bytes()[..REV_WIDTH]);
    out
}

/// Opens `name` if it is a plain file of ours, else creates it anew through a temporary file.
fn open_or_create(dir: &Dir, name: &str, initial: &[u8]) -> io::Result<File> {
    if let Ok(file) = dir.open_rw(name) {
        if ours_alone(&file) {
            return Ok(file);
        }
    }
    let tmp = temp_name(u64::MAX - 1);
    let _ = dir.unlink(&tmp);
    let mut file = dir.create_new(&tmp, Op::CreateTemp)?;
    let written = file
        .write_all(initial)
        .and_then(|()| dir.rename(&tmp, name));
    if let Err(e) = written {
        let _ = dir.unlink(&tmp);
        return Err(e);
    }
    drop(file);
    dir.open_rw(name)
}

impl Floor {
    /// Opens `.rev` (creating it if missing or unusable) and writes the loaded maximum to it.
    pub fn open(dir: &Dir, contents: &Contents) -> Result<Floor, DiskError> {
        let bytes = floor_bytes(contents.max_rev);
        let file = open_or_create(dir, REV_FILE, &bytes)
            .map_err(|e| DiskError::new("create", dir.join(REV_FILE), e))?;
        file.write_all_at(&bytes, 0)
            .and_then(|()| file.set_len(bytes.len() as u64))
            .map_err(|e| DiskError::new("write", dir.join(REV_FILE), e))?;
        Ok(Floor {
            file,
            value: contents.max_rev,
        })
    }
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

/// Writes all of `parts` to `file` with as few system calls as possible.
fn write_parts(file: &mut File, parts: &[&[u8]]) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    while !parts.is_empty() {
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut n = file.write_vectored(&slices)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            if n >= parts[0].len() {
                n -= parts[0].len();
                parts.remove(0);
            } else {
                parts[0] = &parts[0][n..];
                n = 0;
            }
        }
    }
    Ok(())
}

impl Disk {
    fn check_in_place(&self) -> Result<(), WriteError> {
        if self.dir.still_in_place() {
            Ok(())
        } else {
            Err(WriteError::DirReplaced(self.dir.path().to_owned()))
        }
    }

    fn fail(&self, action: &'static str, name: &str, e: io::Error) -> WriteError {
        WriteError::from_disk(DiskError::new(action, self.dir.join(name), e))
    }

    /// Stores `value` as `key`'s file, atomically: the file holds the old or the new record,
    /// never a mix. With `fsync`, the data and the rename are on stable storage on return.
    ///
    /// # Errors
    /// See [`WriteError`]: only `NotDurable` means the new record is in place.
    pub fn write(&self, key: &Key, rev: u64, value: &str) -> Result<(), WriteError> {
        self.check_in_place()?;
        let header = format!("{{\"rev\":{rev},\"value\":");
        let parts: [&[u8]; 3] = [header.as_bytes(), value.as_bytes(), b"}\n"];
        let len = (header.len() + value.len() + 2) as u64;
        let name = file_name(key);
        self.ensure_reserve(len)?;
        let tmp = match self.write_temp(&parts) {
            Ok(tmp) => tmp,
            Err(err @ WriteError::NoSpace(_)) => {
                return self.write_with_reserve(&name, &parts, len, rev, err)
            }
            Err(err) => return Err(err),
        };
        if let Err(e) = self.dir.rename(&tmp, &name) {
            let _ = self.dir.unlink(&tmp);
            return Err(self.fail("rename into place", &name, e));
        }
        self.sync_dir(rev)
    }

    /// Writes `parts` to a new temporary file (fsynced with `--fsync`); returns its name.
    fn write_temp(&self, parts: &[&[u8]]) -> Result<String, WriteError> {
        let (tmp, mut file) = self.create_temp()?;
        let written = self
            .dir
            .fault(Op::WriteTemp)
            .and_then(|()| write_parts(&mut file, parts))
            .map_err(|e| self.fail("write", &tmp, e))
            .and_then(|()| {
                self.dir.note(|| Rec::Write(tmp.clone(), parts.concat()));
                if self.fsync {
                    self.dir
                        .fault(Op::SyncFile)
                        .and_then(|()| file.sync_data())
                        .map_err(|e| self.fail("fsync", &tmp, e))?;
                    self.dir.note(|| Rec::SyncFile(tmp.clone()));
                }
                Ok(())
            });
        drop(file);
        if let Err(err) = written {
            let _ = self.dir.unlink(&tmp);
            return Err(err);
        }
        Ok(tmp)
    }

    /// A new, exclusively created temporary file. A name someone planted is skipped.
    fn create_temp(&self) -> Result<(String, File), WriteError> {
        let mut last = None;
        for _ in 0..8 {
            let tmp = temp_name(self.next_temp.fetch_add(1, Ordering::Relaxed));
            match self.dir.create_new(&tmp, Op::CreateTemp) {
                Ok(file) => return Ok((tmp, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    log::warn!(
                        "{} exists though no write uses it; skipping it",
                        self.dir.join(&tmp).display()
                    );
                    last = Some((tmp, e));
                }
                Err(e) => return Err(self.fail("create", &tmp, e)),
            }
        }
        let (tmp, e) = last.expect("the loop ran and every attempt found an existing file");
        Err(self.fail("create", &tmp, e))
    }

    /// A record larger than any so far needs a larger reserve first: otherwise an overwrite
    /// of it could not be done on a full disk. If the reserve cannot grow, the put does not fit.
    fn ensure_reserve(&self, len: u64) -> Result<(), WriteError> {
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
    fn write_with_reserve(
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
    fn restore_reserve(&self, reserve: &mut Reserve) {
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

    /// Removes `key`'s file, first recording `rev` so the revision survives the key.
    ///
    /// # Errors
    /// See [`WriteError`]: only `NotDurable` means the file is gone.
    pub fn remove(&self, key: &Key, rev: u64) -> Result<(), WriteError> {
        self.check_in_place()?;
        self.raise_floor(rev)?;
        let name = file_name(key);
        match self
            .dir
            .fault(Op::Unlink)
            .and_then(|()| self.dir.unlink(&name))
        {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.fail("remove", &name, e)),
        }
        let synced = self.sync_dir(rev);
        // A delete frees space: the moment to re-create a reserve that was used up.
        if self.reserve_short.load(Ordering::Acquire) {
            let mut reserve = self.reserve.lock();
            self.restore_reserve(&mut reserve);
        }
        synced
    }

    /// Rewrites the floor in place (same size: it needs no new space).
    fn raise_floor(&self, rev: u64) -> Result<(), WriteError> {
        let mut floor = self.floor.lock();
        if rev <= floor.value {
            return Ok(());
        }
        self.dir
            .fault(Op::WriteRev)
            .and_then(|()| floor.file.write_all_at(&floor_bytes(rev), 0))
            .map_err(|e| self.fail("write", REV_FILE, e))?;
        self.dir
            .note(|| Rec::Write(REV_FILE.to_owned(), floor_bytes(rev).to_vec()));
        if self.fsync {
            self.dir
                .fault(Op::SyncRev)
                .and_then(|()| floor.file.sync_data())
                .map_err(|e| self.fail("fsync", REV_FILE, e))?;
            self.dir.note(|| Rec::SyncFile(REV_FILE.to_owned()));
        }
        floor.value = rev;
        Ok(())
    }

    fn sync_dir(&self, rev: u64) -> Result<(), WriteError> {
        if self.fsync {
            self.dir.sync().map_err(|e| WriteError::NotDurable {
                rev,
                source: DiskError::new("fsync directory", self.dir.path(), e),
            })?;
        }
        Ok(())
    }
}

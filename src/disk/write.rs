//! Changing the data directory: atomic replace, delete and the revision floor.
//!
//! A put writes its record to a fresh `.tmp-<n>` (created exclusively, never through a
//! symlink), fsyncs it with `--fsync`, renames it over `<key>.json` and fsyncs the directory.
//! Until the rename nothing has changed; after it the change is in place, so a failing
//! directory fsync is reported as [`WriteError::NotDurable`], not as a failure.
//!
//! A full file system must still let a person free space through nkv: a delete rewrites the
//! fixed-width `.rev` in place (no new block, no new inode) and unlinks the key's file; an
//! overwrite that finds the disk full goes through the reserve (see [`super::reserve`]).

use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::Ordering;

use nix::unistd::Uid;

use super::dir::Dir;
use super::fault::{Op, Rec};
use super::layout::{file_name, temp_name, REV_FILE, REV_WIDTH};
use super::load::Contents;
use super::Disk;
use crate::error::{DiskError, WriteError};
use crate::key::Key;

/// The open revision floor and the value it holds.
pub struct Floor {
    file: File,
    value: u64,
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

/// A record's first bytes, `{"rev":` and then its revision field.
const HEAD_START: &[u8] = b"{\"rev\":";

/// A record's head with its revision field still blank: [`REV_WIDTH`] spaces, which JSON
/// allows between a name and its value. The value is written behind it before the revision
/// is taken (see [`Disk::write_numbered`]).
fn blank_head() -> [u8; HEAD_START.len() + REV_WIDTH + 9] {
    let mut head = [b' '; HEAD_START.len() + REV_WIDTH + 9];
    head[..HEAD_START.len()].copy_from_slice(HEAD_START);
    head[HEAD_START.len() + REV_WIDTH..].copy_from_slice(b",\"value\":");
    head
}

/// `rev` as a record's revision field holds it: left-aligned, padded with spaces, so that it
/// fills the blank field in place.
fn rev_field(rev: u64) -> [u8; REV_WIDTH] {
    let mut field = [b' '; REV_WIDTH];
    // Formatted in place (no allocation on the put path); `u64::MAX` has 20 digits, so it
    // always fits.
    let _ = write!(&mut field[..], "{rev}");
    field
}

/// The revision of one write, asked for once the record's bytes are written but before it is
/// put in place, and remembered: a write that falls back to another path keeps it.
pub(super) struct Numbering<'a> {
    take: &'a mut dyn FnMut() -> Result<u64, WriteError>,
    rev: Option<u64>,
}

impl Numbering<'_> {
    pub(super) fn rev(&mut self) -> Result<u64, WriteError> {
        if let Some(rev) = self.rev {
            return Ok(rev);
        }
        let rev = (self.take)()?;
        self.rev = Some(rev);
        Ok(rev)
    }
}

/// The whole record `parts` make once its revision field holds `rev` (what a test's
/// power-loss simulation records; the server never builds it).
fn stamped(parts: &[&[u8]], rev: u64) -> Vec<u8> {
    let mut bytes = parts.concat();
    bytes[HEAD_START.len()..HEAD_START.len() + REV_WIDTH].copy_from_slice(&rev_field(rev));
    bytes
}

/// Opens `name` if it is a plain file of ours, else creates it anew through a temporary file.
pub(super) fn open_or_create(dir: &Dir, name: &str, initial: &[u8]) -> io::Result<File> {
    if let Ok(file) = dir.open_rw(name) {
        if ours_alone(&file) {
            // Tightened at start (an operator's `chmod -R`, a restore): the reserve becomes a
            // key's file. A failure is only logged here; the reserve is conformed again
            // before it is renamed, and that one is checked.
            if let Err(e) = dir.conform(&file) {
                log::warn!("cannot set the mode of {}: {e}", dir.join(name).display());
            }
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
    /// The revision the floor holds.
    pub(super) fn value(&self) -> u64 {
        self.value
    }

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

/// Writes all of `parts` to `file` with as few system calls as possible.
pub(super) fn write_parts(file: &mut File, parts: &[&[u8]]) -> io::Result<()> {
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
    pub(super) fn check_in_place(&self) -> Result<(), WriteError> {
        if self.dir.still_in_place() {
            Ok(())
        } else {
            Err(WriteError::DirReplaced(self.dir.path().to_owned()))
        }
    }

    pub(super) fn fail(&self, action: &'static str, name: &str, e: io::Error) -> WriteError {
        WriteError::from_disk(DiskError::new(action, self.dir.join(name), e))
    }

    /// Stores `value` as `key`'s file at revision `rev`; see [`Disk::write_numbered`].
    ///
    /// # Errors
    /// See [`WriteError`]: only `NotDurable` means the new record is in place.
    pub fn write(&self, key: &Key, rev: u64, value: &str) -> Result<(), WriteError> {
        self.write_numbered(key, value, &mut || Ok(rev))
    }

    /// Whether [`write_numbered`](Disk::write_numbered) takes the revision only after the
    /// record is written, with little left to do before it is in place. Not with `--fsync`:
    /// the file's fsync would then be part of that, and the fsyncs of concurrent puts would
    /// no longer overlap; the revision is taken first instead.
    pub fn numbers_late(&self) -> bool {
        !self.fsync
    }

    /// Stores `value` as `key`'s file, atomically: the file holds the old or the new record,
    /// never a mix. With `fsync`, the data and the rename are on stable storage on return.
    ///
    /// The revision is asked of `number` as late as it can be ([`Disk::numbers_late`]): once
    /// the record is written with a blank revision field, which is then filled in place
    /// before the record is put in place. A change holds every later one back from the moment
    /// it takes its revision until it is applied (see [`crate::revseq`]), so the less it does
    /// in between, the less the others wait.
    ///
    /// # Errors
    /// See [`WriteError`]: only `NotDurable` means the new record is in place; an error of
    /// `number` is returned as it is, with nothing in place.
    ///
    /// Whether the directory is still in place is checked once, after the change
    /// ([`Disk::sync_dir`]): a put into a directory replaced before or during it is refused
    /// either way, and a second check before would cost every put a path lookup.
    pub fn write_numbered(
        &self,
        key: &Key,
        value: &str,
        number: &mut dyn FnMut() -> Result<u64, WriteError>,
    ) -> Result<(), WriteError> {
        let mut numbering = Numbering {
            take: number,
            rev: None,
        };
        let head = blank_head();
        let parts: [&[u8]; 3] = [&head, value.as_bytes(), b"}\n"];
        let len = (head.len() + value.len() + 2) as u64;
        let name = file_name(key);
        self.ensure_reserve(len)?;
        if let Some(spares) = &self.spares {
            if self.write_over_spare(spares, &name, &parts, len, &mut numbering)? {
                return self.sync_dir(numbering.rev()?);
            }
        }
        let written = match self.write_temp(&parts, &mut numbering) {
            // The spares may be what fills the file system: without them it may fit.
            Err(WriteError::NoSpace(_)) if self.drop_spares() > 0 => {
                self.write_temp(&parts, &mut numbering)
            }
            written => written,
        };
        let tmp = match written {
            Ok(tmp) => tmp,
            Err(err @ WriteError::NoSpace(_)) => {
                let rev = numbering.rev()?;
                let record = stamped(&parts, rev);
                return self.write_with_reserve(&name, &[&record], len, rev, err);
            }
            Err(err) => return Err(err),
        };
        self.place(&tmp, &name)?;
        self.sync_dir(numbering.rev()?)
    }

    /// Puts the written temporary file `tmp` in place as `name`. On tmpfs it is exchanged
    /// with the old file, which stays as a spare (see [`super::spare`]).
    fn place(&self, tmp: &str, name: &str) -> Result<(), WriteError> {
        if let Some(spares) = &self.spares {
            match self.dir.exchange(tmp, name) {
                Ok(()) => return self.keep_spare(spares, tmp, name),
                // A new key (or no exchange here after all): a plain rename.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(nix::libc::ENOENT | nix::libc::EINVAL)
                    ) => {}
                Err(e) => {
                    let _ = self.dir.unlink(tmp);
                    return Err(self.fail("rename into place", name, e));
                }
            }
        }
        if let Err(e) = self.dir.rename(tmp, name) {
            let _ = self.dir.unlink(tmp);
            return Err(self.fail("rename into place", name, e));
        }
        Ok(())
    }

    /// After `tmp` was exchanged with `name`: keeps what `tmp` now names as a spare when it is
    /// a plain file of ours of at most [`super::spare::MAX_SPARE_BYTES`]; removes it when it
    /// is not (too large, a planted symlink or FIFO); swaps a directory back and fails, as a
    /// rename over it would.
    fn keep_spare(
        &self,
        spares: &super::spare::Spares,
        tmp: &str,
        name: &str,
    ) -> Result<(), WriteError> {
        let moved = self.dir.stat(tmp);
        if moved
            .as_ref()
            .is_ok_and(|st| st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFDIR)
        {
            let undone = self.dir.exchange(tmp, name);
            let _ = self.dir.unlink(tmp);
            let e = match undone {
                Ok(()) => io::Error::from_raw_os_error(nix::libc::EISDIR),
                Err(e) => e,
            };
            return Err(self.fail("rename into place", name, e));
        }
        let reusable = moved.is_ok_and(|st| {
            st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG
                && st.st_nlink == 1
                && st.st_uid == Uid::effective().as_raw()
                && st.st_size as u64 <= super::spare::MAX_SPARE_BYTES
        });
        if !reusable || !spares.give_back(tmp.to_owned(), name) {
            let _ = self.dir.unlink(tmp);
        }
        Ok(())
    }

    /// Writes the record over a spare and puts it in place; false when no spare could be
    /// used (none free, not a plain file of ours alone, too large, or the file system is
    /// full), and then the caller writes a new temporary file.
    fn write_over_spare(
        &self,
        spares: &super::spare::Spares,
        name: &str,
        parts: &[&[u8]],
        len: u64,
        numbering: &mut Numbering<'_>,
    ) -> Result<bool, WriteError> {
        let Some(spare) = spares.take() else {
            return Ok(false);
        };
        let opened = self.dir.open_rw(&spare).ok().and_then(|file| {
            let meta = file.metadata().ok()?;
            let usable = meta.is_file()
                && meta.nlink() == 1
                && meta.uid() == Uid::effective().as_raw()
                && meta.len() <= super::spare::MAX_SPARE_BYTES;
            usable.then_some((file, meta.len()))
        });
        let Some((mut file, old_len)) = opened else {
            // Planted, linked elsewhere or too large: never written to; removed if it is a
            // file (a directory stays, and is dealt with at the next start).
            let _ = self.dir.unlink(&spare);
            return Ok(false);
        };
        let trim_to = (old_len > len).then_some(len);
        let written = self.write_record(&mut file, &spare, parts, trim_to, numbering);
        drop(file);
        match written {
            Ok(()) => {}
            Err(WriteError::NoSpace(_)) => {
                // The spares themselves may be what fills the file system.
                let _ = self.dir.unlink(&spare);
                self.drop_spares();
                return Ok(false);
            }
            Err(err) => {
                let _ = self.dir.unlink(&spare);
                return Err(err);
            }
        }
        self.place(&spare, name)?;
        Ok(true)
    }

    /// Removes every spare (the file system is full, and they hold space); returns how many.
    pub(super) fn drop_spares(&self) -> usize {
        let Some(spares) = &self.spares else {
            return 0;
        };
        let all = spares.take_all();
        for spare in &all {
            let _ = self.dir.unlink(spare);
        }
        all.len()
    }

    /// Writes `parts` from the start of `file` (named `name`), cuts it to `trim_to` when
    /// given (a spare that held a longer record), fills in the revision (taking it now if the
    /// write has none yet) and fsyncs it with `--fsync`.
    fn write_record(
        &self,
        file: &mut File,
        name: &str,
        parts: &[&[u8]],
        trim_to: Option<u64>,
        numbering: &mut Numbering<'_>,
    ) -> Result<(), WriteError> {
        if !self.numbers_late() {
            numbering.rev()?;
        }
        self.dir
            .fault(Op::WriteTemp)
            .and_then(|()| write_parts(file, parts))
            .and_then(|()| trim_to.map_or(Ok(()), |len| file.set_len(len)))
            .map_err(|e| self.fail("write", name, e))?;
        let rev = numbering.rev()?;
        // In place, over bytes already written: it needs no new space.
        self.dir
            .fault(Op::FillRev)
            .and_then(|()| file.write_all_at(&rev_field(rev), HEAD_START.len() as u64))
            .map_err(|e| self.fail("write", name, e))?;
        self.dir
            .note(|| Rec::Write(name.to_owned(), stamped(parts, rev)));
        if self.fsync {
            self.dir
                .fault(Op::SyncFile)
                .and_then(|()| file.sync_data())
                .map_err(|e| self.fail("fsync", name, e))?;
            self.dir.note(|| Rec::SyncFile(name.to_owned()));
        }
        Ok(())
    }

    /// Writes `parts` to a new temporary file (fsynced with `--fsync`); returns its name.
    fn write_temp(
        &self,
        parts: &[&[u8]],
        numbering: &mut Numbering<'_>,
    ) -> Result<String, WriteError> {
        let (tmp, mut file) = self.create_temp()?;
        let written = self.write_record(&mut file, &tmp, parts, None, numbering);
        drop(file);
        if let Err(err) = written {
            let _ = self.dir.unlink(&tmp);
            return Err(err);
        }
        Ok(tmp)
    }

    /// A new, exclusively created temporary file. A name someone planted is skipped.
    pub(super) fn create_temp(&self) -> Result<(String, File), WriteError> {
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

    /// Removes `key`'s file, first recording `rev` so the revision survives the key.
    ///
    /// # Errors
    /// See [`WriteError`]: only `NotDurable` means the file is gone.
    pub fn remove(&self, key: &Key, rev: u64) -> Result<(), WriteError> {
        self.check_in_place()?;
        self.raise_floor(rev)?;
        let name = file_name(key);
        if let Some(spares) = &self.spares {
            // No copy of a deleted value lingers in a spare.
            for spare in spares.take_holding(&name) {
                let _ = self.dir.unlink(&spare);
            }
        }
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
    pub(crate) fn raise_floor(&self, rev: u64) -> Result<(), WriteError> {
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

    /// Ends a change that is in place (renamed or unlinked): fsyncs the directory with
    /// `--fsync`, then checks that the directory is still the one the path leads to: a
    /// directory replaced before or during the change (a slow fsync, say) would have it land
    /// in the orphaned directory, where no one reads it, while another server may own the new
    /// one. Then the change is not applied and not
    /// acknowledged ([`WriteError::DirReplaced`]), whatever the fsync said.
    pub(super) fn sync_dir(&self, rev: u64) -> Result<(), WriteError> {
        let synced = if self.fsync {
            self.dir.sync().map_err(|e| WriteError::NotDurable {
                rev,
                source: DiskError::new("fsync directory", self.dir.path(), e),
            })
        } else {
            Ok(())
        };
        self.check_in_place()?;
        synced
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use super::super::{Disk, Options};
    use crate::error::WriteError;
    use crate::key::Key;

    /// Data directories to try: on the default temporary file system and on tmpfs, where puts
    /// rewrite spare files instead of creating temporary ones.
    fn places() -> Vec<tempfile::TempDir> {
        let shm = Path::new("/dev/shm");
        let st = nix::sys::statfs::statfs(shm).expect("/dev/shm");
        assert_eq!(
            st.filesystem_type(),
            nix::sys::statfs::TMPFS_MAGIC,
            "/dev/shm is tmpfs"
        );
        vec![
            tempfile::tempdir().unwrap(),
            tempfile::tempdir_in(shm).unwrap(),
        ]
    }

    /// With and without fsync, on each of [`places`]: a data directory whose key `k` was
    /// written twice, so that on tmpfs a spare is left for the write under test.
    fn cases() -> Vec<(bool, tempfile::TempDir, Disk, Key)> {
        let mut out = Vec::new();
        for fsync in [false, true] {
            for tmp in places() {
                let (disk, _) = Disk::open(&tmp.path().join("data"), &Options::new(fsync)).unwrap();
                let key = Key::parse("k").unwrap();
                disk.write(&key, 1, "\"old\"").unwrap();
                disk.write(&key, 2, "\"old\"").unwrap();
                out.push((fsync, tmp, disk, key));
            }
        }
        out
    }

    /// The temporary files (and spares) in `data`, with their contents.
    fn temps(data: &Path) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(data)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .map(|e| fs::read_to_string(e.path()).unwrap())
            .collect();
        out.sort();
        out
    }

    #[test]
    fn without_fsync_the_revision_is_taken_once_the_record_is_written() {
        for (fsync, tmp, disk, key) in cases() {
            let data = tmp.path().join("data");
            let mut seen = None;
            let mut number = || {
                // What the directory holds when the revision is asked for.
                seen = Some(temps(&data));
                Ok(7)
            };
            disk.write_numbered(&key, "\"new\"", &mut number).unwrap();
            let seen = seen.expect("asked for a revision");
            let blank = format!("{{\"rev\":{},\"value\":\"new\"}}\n", " ".repeat(20));
            if fsync {
                assert!(!seen.contains(&blank), "with fsync: asked first, {seen:?}");
            } else {
                assert!(seen.contains(&blank), "without fsync: asked last, {seen:?}");
            }
            let record = fs::read_to_string(data.join("k.json")).unwrap();
            assert_eq!(
                record,
                format!("{{\"rev\":7{},\"value\":\"new\"}}\n", " ".repeat(19))
            );
            let parsed: serde_json::Value = serde_json::from_str(&record).unwrap();
            assert_eq!(parsed["rev"], 7);
        }
    }

    #[test]
    fn a_revision_that_cannot_be_taken_leaves_the_old_record_and_no_blank_one() {
        for (fsync, tmp, disk, key) in cases() {
            let data = tmp.path().join("data");
            let before = fs::read_to_string(data.join("k.json")).unwrap();
            let mut number = || Err(WriteError::RevisionsExhausted(1));
            let err = disk
                .write_numbered(&key, "\"new\"", &mut number)
                .unwrap_err();
            assert!(matches!(err, WriteError::RevisionsExhausted(1)), "{err}");
            assert_eq!(fs::read_to_string(data.join("k.json")).unwrap(), before);
            assert!(
                temps(&data).iter().all(|t| !t.contains("new")),
                "fsync {fsync}: {:?}",
                temps(&data)
            );
        }
    }
}

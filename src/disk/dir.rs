//! The data directory as a descriptor held for the server's life.
//!
//! Every operation is relative to that descriptor and never follows a symlink (`O_NOFOLLOW`,
//! `AT_SYMLINK_NOFOLLOW`; a key's name has no `/`, so only its last component could be one).
//! The descriptor also carries the `flock` that keeps a second server out: the lock is on the
//! directory itself, so removing a file cannot release it. Each call first asks the fault plan
//! (tests only) whether to fail.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, renameat2, OFlag, RenameFlags};
use nix::sys::stat::{fchmod, fstatat, FileStat, Mode};
use nix::unistd::{fchown, unlinkat, Gid, UnlinkatFlags};
use nix::NixPath;

use super::fault::{Faults, Op, Rec};

/// Who may read the files the server creates.
#[derive(Clone, Copy, Debug)]
pub struct Access {
    /// `0o600`, or `0o640` with a group.
    pub file_mode: u32,
    /// The group files are given (with `--socket-group`).
    pub group: Option<Gid>,
    /// Whether the process umask would strip bits of `file_mode`, so each new file needs an
    /// explicit `fchmod`.
    pub umask_strips: bool,
}

/// An open data directory.
pub struct Dir {
    file: File,
    path: PathBuf,
    dev: u64,
    ino: u64,
    access: Access,
    /// Whether the path may be a symlink (`--allow-unsafe-dirs`): its identity is then checked
    /// through the link.
    follow: bool,
    faults: Faults,
}

/// `O_CLOEXEC | O_NOFOLLOW`, which every open here uses.
fn base_flags() -> OFlag {
    OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_NOCTTY
}

impl Dir {
    /// Opens `path` (which must not be a symlink unless `follow`) as a directory.
    ///
    /// # Errors
    /// `path` is missing, not a directory, or (without `follow`) a symlink (`ELOOP`).
    pub fn open(path: &Path, follow: bool, access: Access) -> io::Result<Dir> {
        let mut flags = nix::libc::O_DIRECTORY;
        if !follow {
            flags |= nix::libc::O_NOFOLLOW;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)?;
        let meta = file.metadata()?;
        Ok(Dir {
            file,
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
            access,
            follow,
            faults: Faults::for_dir(path),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path of `name` inside the directory, for messages.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn access(&self) -> Access {
        self.access
    }

    /// Fails the operation if the test's fault plan says so.
    pub fn fault(&self, op: Op) -> io::Result<()> {
        self.faults.hit(op)
    }

    /// Records a file-system effect for the power-loss simulation (tests only).
    pub fn note(&self, rec: impl FnOnce() -> Rec) {
        self.faults.note(rec)
    }

    /// Whether the directory's path still leads to the directory we hold. It does not when the
    /// directory was removed or replaced under the running server: its writes would then go
    /// where no one will ever read them, while another server may own the new directory.
    ///
    /// Only an answer that shows the path leads elsewhere (another directory, nothing, not a
    /// directory, no longer reachable by us) counts as replaced. A failure that tells nothing
    /// about the path (EIO, ENOMEM) is asked again once, and then taken as in place: the change
    /// is already in the directory we hold, and refusing it would give its revision back for
    /// reuse while its record stays in the data directory.
    pub fn still_in_place(&self) -> bool {
        let look = || {
            self.fault(Op::CheckDir)?;
            if self.follow {
                std::fs::metadata(&self.path)
            } else {
                std::fs::symlink_metadata(&self.path)
            }
        };
        let shows_path = |e: &io::Error| {
            matches!(
                e.raw_os_error(),
                Some(
                    nix::libc::ENOENT
                        | nix::libc::ENOTDIR
                        | nix::libc::EACCES
                        | nix::libc::EPERM
                        | nix::libc::ELOOP
                        | nix::libc::ENAMETOOLONG
                )
            )
        };
        let meta = match look() {
            Err(e) if !shows_path(&e) => look(),
            looked => looked,
        };
        match meta {
            Ok(m) => m.dev() == self.dev && m.ino() == self.ino,
            Err(e) if shows_path(&e) => false,
            Err(e) => {
                log::warn!(
                    "cannot tell whether {} is still the data directory ({e}); taken as in place",
                    self.path.display()
                );
                true
            }
        }
    }

    /// Creates `name` exclusively (never an existing file, never through a symlink), with the
    /// server's file mode and group.
    pub fn create_new(&self, name: &str, op: Op) -> io::Result<File> {
        self.fault(op)?;
        let flags = base_flags() | OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL;
        let mode = Mode::from_bits_truncate(self.access.file_mode as _);
        let fd = openat(Some(self.fd()), name, flags, mode)?;
        // SAFETY: `openat` just returned this descriptor and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let fixed = (|| {
            if self.access.umask_strips {
                fchmod(file.as_raw_fd(), mode)?;
            }
            if let Some(gid) = self.access.group {
                fchown(file.as_raw_fd(), None, Some(gid))?;
            }
            Ok::<(), Errno>(())
        })();
        if let Err(e) = fixed {
            drop(file);
            let _ = self.unlink(name);
            return Err(e.into());
        }
        self.note(|| Rec::Create(name.to_owned()));
        Ok(file)
    }

    /// Gives an existing file of ours the server's mode and group: a file left more open
    /// (an operator's `chmod -R`, a restore) would hand its mode on to a key file it is
    /// renamed over.
    pub fn conform(&self, file: &File) -> io::Result<()> {
        let meta = file.metadata()?;
        if let Some(gid) = self.access.group {
            if meta.gid() != gid.as_raw() {
                fchown(file.as_raw_fd(), None, Some(gid))?;
            }
        }
        if meta.mode() & 0o7777 != self.access.file_mode {
            fchmod(
                file.as_raw_fd(),
                Mode::from_bits_truncate(self.access.file_mode as _),
            )?;
        }
        Ok(())
    }

    /// Opens an existing `name` for reading without following a symlink and without blocking
    /// on a FIFO or device (the caller checks it is a regular file before reading).
    pub fn open_read<N: ?Sized + NixPath>(&self, name: &N) -> io::Result<File> {
        let flags = base_flags() | OFlag::O_RDONLY | OFlag::O_NONBLOCK;
        let fd = openat(Some(self.fd()), name, flags, Mode::empty())?;
        // SAFETY: as in `create_new`.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Opens an existing `name` for reading and writing, as `open_read` does.
    pub fn open_rw(&self, name: &str) -> io::Result<File> {
        let flags = base_flags() | OFlag::O_RDWR | OFlag::O_NONBLOCK;
        let fd = openat(Some(self.fd()), name, flags, Mode::empty())?;
        // SAFETY: as in `create_new`.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// The status of `name` itself (a symlink is reported as one).
    pub fn stat<N: ?Sized + NixPath>(&self, name: &N) -> io::Result<FileStat> {
        Ok(fstatat(
            Some(self.fd()),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?)
    }

    /// Renames `from` to `to` within the directory, replacing `to` (never following links).
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.fault(Op::Rename)?;
        renameat(Some(self.fd()), from, Some(self.fd()), to)?;
        self.note(|| Rec::Rename(from.to_owned(), to.to_owned()));
        Ok(())
    }

    /// Swaps the names `a` and `b` atomically (`renameat2` with `RENAME_EXCHANGE`; both must
    /// exist), never following links.
    pub fn exchange(&self, a: &str, b: &str) -> io::Result<()> {
        self.fault(Op::Rename)?;
        renameat2(
            Some(self.fd()),
            a,
            Some(self.fd()),
            b,
            RenameFlags::RENAME_EXCHANGE,
        )?;
        self.note(|| Rec::Exchange(a.to_owned(), b.to_owned()));
        Ok(())
    }

    /// Moves `from` into the subdirectory `other` as `to` (names need not be UTF-8: a file
    /// with such a name is quarantined).
    pub fn rename_into<A, B>(&self, from: &A, other: &Dir, to: &B) -> io::Result<()>
    where
        A: ?Sized + NixPath,
        B: ?Sized + NixPath,
    {
        Ok(renameat(Some(self.fd()), from, Some(other.fd()), to)?)
    }

    /// Removes the file `name`.
    pub fn unlink(&self, name: &str) -> io::Result<()> {
        unlinkat(Some(self.fd()), name, UnlinkatFlags::NoRemoveDir)?;
        self.note(|| Rec::Unlink(name.to_owned()));
        Ok(())
    }

    /// Fsyncs the directory, so renames and unlinks in it are on stable storage.
    pub fn sync(&self) -> io::Result<()> {
        self.fault(Op::SyncDir)?;
        self.file.sync_all()?;
        self.note(|| Rec::SyncDir);
        Ok(())
    }

    /// Creates the subdirectory `name` unless it exists, opens it, and gives it the data
    /// directory's rule: `0o700`, or `0o750` and the group with `--socket-group`.
    pub fn subdir(&self, name: &str) -> io::Result<Dir> {
        let bits = if self.access.group.is_some() {
            0o750
        } else {
            0o700
        };
        let mode = Mode::from_bits_truncate(bits);
        match nix::sys::stat::mkdirat(Some(self.fd()), name, mode) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let flags = base_flags() | OFlag::O_RDONLY | OFlag::O_DIRECTORY;
        let fd = openat(Some(self.fd()), name, flags, Mode::empty())?;
        // SAFETY: as in `create_new`.
        let file = unsafe { File::from_raw_fd(fd) };
        if let Some(gid) = self.access.group {
            fchown(file.as_raw_fd(), None, Some(gid))?;
        }
        fchmod(file.as_raw_fd(), mode)?;
        let meta = file.metadata()?;
        Ok(Dir {
            file,
            path: self.path.join(name),
            dev: meta.dev(),
            ino: meta.ino(),
            access: self.access,
            follow: false,
            faults: Faults::for_dir(&self.path.join(name)),
        })
    }
}

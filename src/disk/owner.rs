//! Who owns the directories the server uses, and what it refuses at start.
//!
//! With the defaults under `/tmp`, another user of the host could create the socket or data
//! directory before the server and so read or plant values. So a directory the server creates
//! gets exactly `0o700` (`0o750` and the socket's group with `--socket-group`), whatever the
//! umask, and an existing one must be a real directory (not a symlink), owned by the server's
//! user (or root), and writable by no one else — unless the operator says otherwise.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};

/// How a directory is checked and created.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Mode of a directory we create: `0o700`, or `0o750` with a group.
    pub mode: u32,
    pub group: Option<Gid>,
    /// `--allow-unsafe-dirs`: use existing directories whoever owns them.
    pub allow_unsafe: bool,
    /// Accept a sticky directory writable by others (`/tmp` itself as a socket's directory):
    /// there no one else can remove or rename our files. Never for the data directory.
    pub sticky_ok: bool,
}

impl Policy {
    pub fn new(group: Option<Gid>, allow_unsafe: bool) -> Policy {
        Policy {
            mode: if group.is_some() { 0o750 } else { 0o700 },
            group,
            allow_unsafe,
            sticky_ok: false,
        }
    }
}

/// Why a directory was refused.
#[derive(Debug)]
pub enum DirError {
    Symlink(PathBuf),
    NotADirectory(PathBuf),
    Owner {
        path: PathBuf,
        uid: u32,
        euid: u32,
    },
    Writable {
        path: PathBuf,
        mode: u32,
    },
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

const OVERRIDE: &str = "(--allow-unsafe-dirs uses it anyway)";

impl std::fmt::Display for DirError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirError::Symlink(path) => write!(
                f,
                "{} is a symlink; refusing to use it {OVERRIDE}",
                path.display()
            ),
            DirError::NotADirectory(path) => write!(f, "{} is not a directory", path.display()),
            DirError::Owner { path, uid, euid } => write!(
                f,
                "{} is owned by uid {uid}, not by this server's uid {euid}; refusing to use it {OVERRIDE}",
                path.display()
            ),
            DirError::Writable { path, mode } => write!(
                f,
                "{} is writable by other users (mode {mode:04o}); refusing to use it {OVERRIDE}",
                path.display()
            ),
            DirError::Io {
                action,
                path,
                source,
            } => write!(f, "cannot {action} {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for DirError {}

/// Creates `dir` (and missing parents) with the policy's mode and group, or checks an existing
/// one. Returns whether `dir` was created by this call.
///
/// # Errors
/// See [`DirError`].
pub fn prepare(dir: &Path, policy: Policy) -> Result<bool, DirError> {
    let io = |action| {
        move |source| DirError::Io {
            action,
            path: dir.to_owned(),
            source,
        }
    };
    match fs::symlink_metadata(dir) {
        Ok(meta) => {
            check(dir, &meta, policy)?;
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            create(dir, policy).map_err(io("create directory"))?;
            Ok(true)
        }
        Err(e) => Err(io("inspect")(e)),
    }
}

fn check(dir: &Path, meta: &fs::Metadata, policy: Policy) -> Result<(), DirError> {
    if meta.file_type().is_symlink() {
        if policy.allow_unsafe {
            return match fs::metadata(dir) {
                Ok(m) if m.is_dir() => Ok(()),
                _ => Err(DirError::NotADirectory(dir.to_owned())),
            };
        }
        return Err(DirError::Symlink(dir.to_owned()));
    }
    if !meta.is_dir() {
        return Err(DirError::NotADirectory(dir.to_owned()));
    }
    if policy.allow_unsafe {
        return Ok(());
    }
    let euid = Uid::effective().as_raw();
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(DirError::Owner {
            path: dir.to_owned(),
            uid: meta.uid(),
            euid,
        });
    }
    let mode = meta.mode() & 0o7777;
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !(policy.sticky_ok && sticky) {
        return Err(DirError::Writable {
            path: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Creates `dir` with exactly the policy's mode and group, and its missing parents with search
/// (never list or write) permission for everyone added: a parent may also hold the socket
/// (`/tmp/nkv` holds `nkv.sock` and `data/`), which must stay reachable for those its mode
/// admits, whichever of the two directories is created first.
fn create(dir: &Path, policy: Policy) -> io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        if fs::symlink_metadata(parent).is_err() {
            let parents = Policy {
                mode: policy.mode | 0o011,
                ..policy
            };
            create(parent, parents)?;
        }
    }
    match fs::DirBuilder::new().mode(policy.mode).create(dir) {
        Ok(()) => {}
        // Created meanwhile by someone else: checked like any existing directory.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    set_owner_and_mode(dir, policy)
}

/// Gives `dir` exactly the policy's mode and group (the umask may have removed bits).
pub fn set_owner_and_mode(dir: &Path, policy: Policy) -> io::Result<()> {
    if let Some(gid) = policy.group {
        std::os::unix::fs::lchown(dir, None, Some(gid.as_raw()))?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(policy.mode))
}

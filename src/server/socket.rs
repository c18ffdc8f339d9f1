//! The listening socket: inherited from systemd, or bound by us without stealing a live one.

use std::fs;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::stat::{umask, Mode};
use nix::unistd::{Gid, Group};

use crate::disk::owner::{self, Policy};

/// Why the socket could not be set up.
#[derive(Debug)]
pub enum SocketError {
    /// A server answers on the path already.
    InUse(PathBuf),
    /// The path exists and is not a socket; we never delete such a file.
    NotASocket(PathBuf),
    /// Connecting to the existing socket failed with something other than "connection
    /// refused" (permission denied, say): a server may well be listening, so it is not stale.
    Unprobed {
        path: PathBuf,
        source: io::Error,
    },
    UnknownGroup(String),
    /// The socket's directory is unsafe (see [`owner::prepare`]).
    Dir(owner::DirError),
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl std::fmt::Display for SocketError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketError::InUse(path) => write!(
                f,
                "another nkv-server is already listening on {}; stop it first or choose another --socket",
                path.display()
            ),
            SocketError::NotASocket(path) => write!(
                f,
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
            SocketError::Unprobed { path, source } => write!(
                f,
                "cannot tell whether a server listens on {} ({source}); refusing to replace it: \
                 stop that server, remove the file, or choose another --socket (NKV_SOCKET)",
                path.display()
            ),
            SocketError::UnknownGroup(group) => write!(f, "--socket-group (NKV_SOCKET_GROUP): no group {group:?}"),
            SocketError::Dir(err) => write!(f, "socket directory: {err}"),
            SocketError::Io {
                action,
                path,
                source,
            } => write!(f, "cannot {action} {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for SocketError {}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SocketError {
    let path = path.to_owned();
    move |source| SocketError::Io {
        action,
        path,
        source,
    }
}

/// The listener systemd passed (`LISTEN_FDS`/`LISTEN_PID`), if any.
///
/// # Errors
/// The variables are malformed.
pub fn inherited() -> io::Result<Option<UnixListener>> {
    let mut fds = sd_notify::listen_fds()?;
    // SAFETY: systemd passed this descriptor to this process (listen_fds checked LISTEN_PID)
    // and nothing else in the process owns it.
    Ok(fds
        .next()
        .map(|fd| unsafe { UnixListener::from_raw_fd(fd) }))
}

/// Binds `path` with `mode` (and `group`), creating parent directories (`0700`, or `0750`
/// with a group, plus search permission for whom `mode` admits) or checking an existing one's owner and mode (see [`Policy`]). A stale
/// socket file left by a crashed server is replaced; a live one is never touched. Only
/// "connection refused" proves a socket stale: a socket we may not connect to (EACCES) can
/// have a live server behind it, run by another user.
///
/// # Errors
/// See [`SocketError`].
pub fn bind(
    path: &Path,
    mode: u32,
    group: Option<&str>,
    policy: Policy,
) -> Result<UnixListener, SocketError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        // A directory we create lets through exactly whom the socket's mode admits: search
        // (not list) permission for the group or others the socket is open to.
        let search = (if mode & 0o060 != 0 { 0o010 } else { 0 })
            | (if mode & 0o006 != 0 { 0o001 } else { 0 });
        let policy = Policy {
            mode: policy.mode | search,
            sticky_ok: true,
            ..policy
        };
        owner::prepare(parent, policy).map_err(SocketError::Dir)?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match UnixStream::connect(path) {
                Ok(_) => return Err(SocketError::InUse(path.to_owned())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    log::info!("replacing stale socket {}", path.display());
                    match fs::remove_file(path) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => {
                            return Err(io_err("remove stale socket", path)(e))
                        }
                        _ => {}
                    }
                }
                // Removed between the look and the connect: nothing to replace.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(SocketError::Unprobed {
                        path: path.to_owned(),
                        source,
                    })
                }
            }
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspect", path)(e)),
    }
    let gid = group.map(resolve_group).transpose()?;
    // Create the socket owner-only so no one can connect before its mode and group are set.
    // Start-up is single-threaded here, so the process-wide umask is ours to change briefly.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(io_err("bind", path))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid.as_raw()))
            .map_err(io_err("set the group of", path))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_err("set the mode of", path))?;
    Ok(listener)
}

pub(crate) fn resolve_group(group: &str) -> Result<Gid, SocketError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(Gid::from_raw(gid));
    }
    match Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid),
        _ => Err(SocketError::UnknownGroup(group.to_owned())),
    }
}

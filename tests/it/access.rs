//! Who may connect: the socket file's mode and group decide, and the server logs each peer.
//!
//! The tests that switch users need root (they run `nkv-client` through `setpriv`); as another
//! user they fail, saying why (never a silent pass).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::support::{BoundedOutput, Raw, Server, CLIENT};

const NOBODY: u32 = 65534;
/// A group no test user belongs to (it need not exist in /etc/group).
const GROUP: u32 = 4242;

fn mode_of(path: &Path) -> u32 {
    let meta = fs::metadata(path).expect("socket metadata");
    assert!(
        meta.file_type().is_socket(),
        "{} is not a socket",
        path.display()
    );
    meta.permissions().mode() & 0o7777
}

/// One request on a raw connection, for the log check.
fn health(path: &Path) {
    let mut raw = Raw::connect(path);
    raw.send("HEALTH");
    assert_eq!(
        raw.line().as_deref(),
        Some("{\"ok\":true,\"status\":\"ok\"}")
    );
}

#[test]
fn the_socket_is_created_0660_by_default() {
    let server = Server::start();
    assert_eq!(mode_of(&server.socket), 0o660);
}

#[test]
fn socket_mode_is_respected() {
    let server = Server::start_with(&["--socket-mode", "0600"]);
    assert_eq!(mode_of(&server.socket), 0o600);
    health(&server.socket);
}

#[test]
fn the_log_records_each_peer_pid_and_uid() {
    let server = Server::start();
    health(&server.socket);
    let pid = std::process::id();
    let uid = nix::unistd::geteuid().as_raw();
    let log = server.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("pid {pid}")) && l.contains(&format!("uid {uid}"))),
        "no log line names pid {pid} and uid {uid}:\n{log}"
    );
}

/// Fails unless running as root with `setpriv` available: like the tmpfs tests, these need
/// root, and a test that cannot run is an error, never a silent pass.
fn require_user_switching(test: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{test} needs root to run a client as another user"
    );
    assert!(
        Command::new("setpriv")
            .arg("--version")
            .bounded_output()
            .is_ok(),
        "{test} needs setpriv (apt-get install util-linux)"
    );
}

/// A temp dir that uid 65534 can traverse, holding a copy of `nkv-client` it can execute
/// (the build directory may not be reachable for it).
fn open_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temp dir");
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mut dir = tmp.path().to_path_buf();
    while let Some(parent) = dir.parent() {
        let mode = fs::metadata(parent).unwrap().permissions().mode();
        assert!(
            mode & 0o001 != 0,
            "{} is not traversable by other users; set TMPDIR to a directory that is",
            parent.display()
        );
        dir = parent.to_path_buf();
    }
    let client = tmp.path().join("nkv-client");
    fs::copy(CLIENT, &client).expect("copy nkv-client");
    fs::set_permissions(&client, fs::Permissions::from_mode(0o755)).unwrap();
    (tmp, client)
}

/// Runs `nkv-client --socket <socket> health` as uid 65534 with the given group settings.
fn client_as_nobody(client: &Path, socket: &Path, groups: &[&str]) -> (Output, u32) {
    let child = Command::new("setpriv")
        .arg(format!("--reuid={NOBODY}"))
        .args(groups)
        .arg("--")
        .arg(client)
        .arg("--socket")
        .arg(socket)
        .arg("health")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv");
    // setpriv execs the client, so this is the pid the server sees.
    let pid = child.id();
    (child.wait_with_output().expect("client output"), pid)
}

#[test]
fn a_user_outside_the_socket_group_is_refused() {
    require_user_switching("a_user_outside_the_socket_group_is_refused");
    let (tmp, client) = open_dir();
    let mut server = Server::new_in(tmp.path(), &[]);
    server.spawn_and_wait();
    assert_eq!(mode_of(&server.socket), 0o660);
    let (out, _) = client_as_nobody(
        &client,
        &server.socket,
        &[&format!("--regid={NOBODY}"), "--clear-groups"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr.to_lowercase().contains("permission denied"),
        "the client says why: {stderr:?}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");
    health(&server.socket);
}

#[test]
fn a_member_of_the_socket_group_is_admitted() {
    require_user_switching("a_member_of_the_socket_group_is_admitted");
    let (tmp, client) = open_dir();
    let mut server = Server::new_in(tmp.path(), &["--socket-group", &GROUP.to_string()]);
    server.spawn_and_wait();
    let meta = fs::metadata(&server.socket).unwrap();
    assert_eq!(meta.gid(), GROUP, "socket group");
    assert_eq!(mode_of(&server.socket), 0o660);

    let (out, pid) = client_as_nobody(
        &client,
        &server.socket,
        &[&format!("--regid={GROUP}"), &format!("--groups={GROUP}")],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // The server logged who it was.
    let log = server.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("pid {pid}")) && l.contains(&format!("uid {NOBODY}"))),
        "no log line names pid {pid} and uid {NOBODY}:\n{log}"
    );

    // Membership is what counts: the same user outside the group is refused.
    let (out, _) = client_as_nobody(
        &client,
        &server.socket,
        &[&format!("--regid={NOBODY}"), "--clear-groups"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
